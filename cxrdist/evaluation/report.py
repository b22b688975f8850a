"""One self-contained HTML page for an evaluation: faithfulness per attribute as a chart against chance (and
the base, when it was evaluated too), the metric table with the intervals that were computed, real against
generated images per finding, and the memorization audit's closest pairs.

Everything is inline (PNG data URIs, an SVG chart, a style block; no script), and the page's content security
policy forbids loading anything else, so it is one file to attach to a paper's supplement or a pull request and
opening it makes no request."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from cxrdist.evaluation.runs import Cell, Evaluated, MetricRow, format_value, metric_rows
from cxrdist.fileio import write_text_atomic
from cxrdist.metrics.attributes import ATTRIBUTES
from cxrdist.metrics.classifier import FINDINGS, targets_from_labels

PER_FINDING = 6  # reports per finding in the real-vs-generated grids
THUMB = 128  # displayed side in px
# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
CONTENT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

# What the interval beside each group's values is (only groups that were measured are described).
INTERVALS = {
    "faithfulness": "faithfulness: a 95 % interval in brackets, Wilson's for each attribute's share, a bootstrap over "
                    "images for the macro score",
    "image": "SSIM / PSNR / MSE: ± the standard error of the mean over image pairs; diversity: over its reports",
    "distribution": "FID: ± its bootstrap standard error and the 95 % bootstrap interval; KID: ± the standard "
                    "deviation over subsets; precision / recall / density / coverage: ± the standard error",
    "memorization": "memorized share: ± its standard error (the threshold is a calibrated value, not an estimate)",
    "classifier": "AUROC: ± Hanley and McNeil's standard error",
}


def png_data_uri(image: np.ndarray) -> str:
    from PIL import Image

    pixels = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(image: np.ndarray, title: str = "") -> str:
    return (f'<img src="{png_data_uri(image)}" width="{THUMB}" height="{THUMB}" title="{html.escape(title)}" '
            'style="image-rendering:pixelated;margin:1px">')


def model_label(name: str, result: dict) -> str:
    """The model's path, and whether it is a base or trained from one."""
    model = result.get("model") or {}
    if not model:
        return name
    if not model.get("trained"):
        return f"{name} (base)"
    return f"{name} (trained from {model['base']})" if model.get("base") else f"{name} (trained)"


def missing_base_note(results: dict[str, dict]) -> str:
    """A sentence when trained models were evaluated without the base they came from."""
    evaluated = {str(r.get("model", {}).get("path")) for r in results.values()}
    bases = sorted({r["model"]["base"] for r in results.values()
                    if r.get("model", {}).get("trained") and r["model"].get("base")} - evaluated)
    if not bases:
        return ""
    return (f"<p class='note'>The base{'s' if len(bases) > 1 else ''} of the trained models "
            f"({', '.join(html.escape(b) for b in bases)}) {'were' if len(bases) > 1 else 'was'} not evaluated here: "
            "add it with another --model-path to draw it beside chance.</p>")


def faithfulness_chart(results: dict[str, dict]) -> str:
    """Horizontal bars per primary attribute and the macro score, one per model, with 95 % interval whiskers
    and the attribute's chance level as a dashed line (SVG, no script)."""
    names = list(results)
    first = results[names[0]]
    attributes = [a for a in (*ATTRIBUTES, "macro") if a in first["faithfulness"]]
    bar, gap, label_w, plot_w, top = 12, 14, 190, 520, 28
    group_h = bar * len(names) + gap
    height = top + group_h * len(attributes) + 8
    x = lambda v: label_w + plot_w * float(v)  # noqa: E731 - a scale, read where it is used
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 60}" height="{height}" '
             'role="img" aria-label="faithfulness per attribute, with 95 % intervals and chance" '
             'font-family="sans-serif" font-size="12">']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{x(tick):.1f}" y1="{top - 6}" x2="{x(tick):.1f}" y2="{height - 8}" stroke="#ddd"/>'
                     f'<text x="{x(tick):.1f}" y="{top - 10}" text-anchor="middle" fill="#555">{tick:g}</text>')
    for row, attr in enumerate(attributes):
        y0 = top + row * group_h
        weight = "bold" if attr == "macro" else "normal"
        parts.append(f'<text x="{label_w - 8}" y="{y0 + bar * len(names) / 2 + 4:.1f}" text-anchor="end" '
                     f'font-weight="{weight}">{html.escape(attr)}</text>')
        for i, name in enumerate(names):
            value = results[name]["faithfulness"].get(attr)
            if value is None or not np.isfinite(value):
                continue
            y = y0 + i * bar
            colour = PALETTE[i % len(PALETTE)]
            ci = (results[name].get("faithfulness_intervals") or {}).get(attr, {}).get("ci95")
            tip = f"{model_label(name, results[name])}: {attr} {value:.3f}"
            parts.append(f'<rect x="{label_w}" y="{y + 1}" width="{plot_w * value:.1f}" height="{bar - 2}" '
                         f'fill="{colour}"><title>{html.escape(tip)}</title></rect>')
            if ci and all(np.isfinite(ci)):
                mid = y + bar / 2
                parts.append(f'<path d="M{x(ci[0]):.1f} {mid:.1f}H{x(ci[1]):.1f}M{x(ci[0]):.1f} {mid - 4:.1f}'
                             f'V{mid + 4:.1f}M{x(ci[1]):.1f} {mid - 4:.1f}V{mid + 4:.1f}" stroke="#222" '
                             f'stroke-width="1.2"><title>95 % interval {ci[0]:.3f} to {ci[1]:.3f}</title></path>')
        chance = first.get("chance", {}).get(attr)
        if chance is not None and np.isfinite(chance):
            parts.append(f'<line x1="{x(chance):.1f}" y1="{y0 - 2}" x2="{x(chance):.1f}" '
                         f'y2="{y0 + bar * len(names) + 2}" stroke="#000" stroke-width="2" stroke-dasharray="3 2">'
                         f'<title>chance {chance:.3f}</title></line>')
    parts.append("</svg>")
    legend = "".join(f"<span class='key'><span class='swatch' style='background:{PALETTE[i % len(PALETTE)]}'>"
                     f"</span>{html.escape(model_label(name, results[name]))}</span>" for i, name in enumerate(names))
    legend += ("<span class='key'><span class='chance'></span>chance (a generator that ignores the text)</span>"
               "<span class='key'>&#x2500;&#x2524; 95 % interval</span>")
    return "".join(parts) + f"<p class='legend'>{legend}</p>"


def _html_cell(cell: Cell, digits: int) -> str:
    if cell.missing():
        return "<td>-</td>"
    extra = ""
    if cell.se is not None:
        extra += f" <span class='err'>&plusmn;{format_value(Cell(cell.se), digits)}</span>"
    if cell.ci95 is not None:
        extra += f" <span class='err'>[{cell.ci95[0]:.{digits}f}, {cell.ci95[1]:.{digits}f}]</span>"
    return f"<td>{format_value(cell, digits)}{extra}</td>"


def metrics_table(results: dict[str, dict], rows: list[MetricRow]) -> str:
    names = list(results)
    head = "<tr><th></th><th>chance</th>" + "".join(f"<th>{html.escape(model_label(n, results[n]))}</th>"
                                                    for n in names) + "</tr>"
    body, group = [], None
    for row in rows:
        if row.group != group:
            group = row.group
            body.append(f"<tr class='group'><th colspan='{len(names) + 2}'>{html.escape(group)}</th></tr>")
        chance = "" if row.chance is None else format_value(Cell(row.chance), row.digits)
        label = ("&nbsp;&nbsp;" if row.sub else "") + html.escape(row.label)
        body.append(f"<tr><th>{label}</th><td>{chance}</td>"
                    + "".join(_html_cell(c, row.digits) for c in row.cells) + "</tr>")
    distribution = next(iter(results.values())).get("distribution")
    caption = ""
    if distribution:
        caption = (f"<caption>distribution metrics on {html.escape(str(distribution['features']))} features: "
                   f"{distribution['n_real']} real against {distribution['n_generated']} generated images"
                   "</caption>")
    return f"<table class='metrics'>{caption}{head}{''.join(body)}</table>"


def intervals_statement(rows: list[MetricRow]) -> str:
    """What each interval is, for the groups measured, and which rows have none."""
    groups = list(dict.fromkeys(r.group for r in rows))
    described = [INTERVALS[g] for g in groups if g in INTERVALS]
    without = [r.label for r in rows if all(c.se is None and c.ci95 is None for c in r.cells)
               and not all(c.missing() for c in r.cells)]
    text = "Intervals: " + "; ".join(described) + "." if described else "No metric with an interval was measured."
    if without:
        text += f" Shown without one (none was computed): {', '.join(without)}."
    return f"<p>{html.escape(text)}</p>"


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


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 12px}
td{text-align:center;font-size:11px} .metrics td,.metrics th{font-size:13px;padding:2px 10px;text-align:right}
.metrics tr.group th{text-align:left;background:#eee} .err{color:#555;font-size:11px}
.metrics caption{caption-side:bottom;font-size:12px;color:#555;text-align:left}
.legend .key{margin-right:18px;white-space:nowrap;font-size:13px}
.swatch{display:inline-block;width:12px;height:12px;margin-right:5px;vertical-align:middle}
.chance{display:inline-block;width:0;height:12px;border-left:2px dashed #000;margin:0 6px;vertical-align:middle}
.note{color:#8a4b00}"""


def render_report(evaluated: dict[str, Evaluated], title: str) -> str:
    results = {name: ev.result for name, ev in evaluated.items()}
    first = next(iter(results.values()))
    opts = first["options"]
    rows = metric_rows(results)
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>Split <b>{html.escape(str(first['split']))}</b>, {first['samples']} reports, one image each "
            f"({html.escape(str(opts['scheduler']))}, {opts['steps']} steps, guidance {opts['guidance']}, seeds "
            f"from {opts['seed']}).</p>", intervals_statement(rows)]
    if "faithfulness" in first:
        body.append("<h2>Faithfulness per attribute</h2><p>The share of generated images whose phantom-reader "
                    "reading matches the report, per attribute; the macro score averages them. Chance is what a "
                    "generator that ignores the text would score on these reports.</p>")
        body.append(missing_base_note(results) + faithfulness_chart(results))
    body.append("<h2>Metrics</h2>" + metrics_table(results, rows))
    body.append("<h2>Real and generated images, per finding</h2>" + finding_grids(evaluated))
    pairs = "".join(nearest_pairs(name, ev) for name, ev in evaluated.items())
    if pairs:
        body.append("<h2>Memorization: the closest generated-training pairs</h2>" + pairs)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CONTENT_POLICY}\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>")


def write_report(evaluated: dict[str, Evaluated], path: str | Path, title: str = "cxrdist evaluation") -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, render_report(evaluated, title))
    return out
