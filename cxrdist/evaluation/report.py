"""One self-contained HTML page for an evaluation: the metric table with intervals, per-attribute faithfulness,
real against generated images per finding, and the memorization audit's closest pairs. Images are embedded
as PNG data URIs, so the page is a single file to attach to a paper's supplement or a pull request."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from cxrdist.evaluation.runs import Evaluated, format_table
from cxrdist.fileio import write_text_atomic
from cxrdist.metrics.classifier import FINDINGS, targets_from_labels

PER_FINDING = 6  # reports per finding in the real-vs-generated grids
THUMB = 128  # displayed side in px


def png_data_uri(image: np.ndarray) -> str:
    from PIL import Image

    pixels = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(image: np.ndarray, title: str = "") -> str:
    return (f'<img src="{png_data_uri(image)}" width="{THUMB}" height="{THUMB}" title="{html.escape(title)}" '
            'style="image-rendering:pixelated;margin:1px">')


def finding_grids(evaluated: dict[str, Evaluated]) -> str:
    """Per finding: the first reports that state it; the real image, then each model's image of that report."""
    first = next(iter(evaluated.values()))
    data = first.references.data
    targets = targets_from_labels(data.labels, FINDINGS)
    normal = [i for i in range(len(data.labels)) if not np.nansum(targets[i])]
    groups = [(f, [i for i in range(len(data.labels)) if targets[i, j] == 1.0][:PER_FINDING])
              for j, f in enumerate(FINDINGS)] + [("no finding", normal[:PER_FINDING])]
    parts = []
    for finding, rows in groups:
        if not rows:
            continue
        parts.append(f"<h3>{html.escape(finding)}</h3><table><tr><th></th>"
                     + "".join(f"<th title='{html.escape(data.reports[i])}'>#{i}</th>" for i in rows) + "</tr>")
        parts.append("<tr><td>real</td>" + "".join(f"<td>{_img(data.references[i], data.reports[i])}</td>"
                                                     for i in rows) + "</tr>")
        for name, ev in evaluated.items():
            parts.append(f"<tr><td>{html.escape(name)}</td>"
                         + "".join(f"<td>{_img(ev.generated[i], data.reports[i])}</td>" for i in rows) + "</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def nearest_pairs(name: str, ev: Evaluated) -> str:
    audit = ev.result.get("memorization")
    if not audit or ev.references.pool is None:
        return ""
    cells = []
    for pair in audit["nearest"]:
        flag = " FLAGGED" if pair["flagged"] else ""
        cells.append(f"<td>{_img(ev.generated[pair['generated']], 'generated')}"
                     f"{_img(ev.references.pool[pair['training']], 'nearest training image')}<br>"
                     f"SSIM {pair['ssim']:.3f}, cosine {pair['cosine']:.3f}{flag}</td>")
    rows = "".join("<tr>" + "".join(cells[i : i + 4]) + "</tr>" for i in range(0, len(cells), 4))
    return (f"<h3>{html.escape(name)}: flagged {audit['flagged_fraction']:.1%} above SSIM {audit['threshold']:.3f}"
            f" (the {audit['calibration']['quantile']:.0%} quantile of the real images' nearest-training SSIM)</h3>"
            f"<p>Each pair: generated image, then its nearest training image.</p><table>{rows}</table>")


def render_report(evaluated: dict[str, Evaluated], title: str) -> str:
    results = {name: ev.result for name, ev in evaluated.items()}
    first = next(iter(results.values()))
    opts = first["options"]
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>Split <b>{html.escape(str(first['split']))}</b>, {first['samples']} reports, one image each "
            f"({opts['scheduler']}, {opts['steps']} steps, guidance {opts['guidance']}, seeds from {opts['seed']}). "
            "Values are followed by their standard error (+-): bootstrap for FID, the spread over subsets for KID, "
            "the standard error of the mean for the others, Hanley-McNeil for AUROC.</p>",
            f"<h2>Metrics</h2><pre>{html.escape(format_table(results))}</pre>"]
    if "faithfulness" in first:
        body.append("<p>Faithfulness: share of generated images whose phantom-reader reading matches the report, per "
                    "attribute; chance is what a generator that ignores the text would score.</p>")
    body.append("<h2>Real and generated images, per finding</h2>" + finding_grids(evaluated))
    pairs = "".join(nearest_pairs(name, ev) for name, ev in evaluated.items())
    if pairs:
        body.append("<h2>Memorization: the closest generated-training pairs</h2>" + pairs)
    style = "body{font-family:sans-serif;max-width:1200px;margin:auto} td{text-align:center;font-size:11px}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def write_report(evaluated: dict[str, Evaluated], path: str | Path, title: str = "cxrdist evaluation") -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, render_report(evaluated, title))
    return out
