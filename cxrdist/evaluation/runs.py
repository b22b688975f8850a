"""Evaluate a model on a shard split: does each generated image follow its report?

For every report of the split (or the first `max_samples`, in the split's fixed order) one image is
generated with a fixed seed. The analytic reader measures each attribute of the generated image and the
share that matches the report's labels is the text faithfulness (per attribute and macro-averaged), shown
next to the chance level of the same labels. SSIM / PSNR / MSE against the paired real image and a
within-prompt diversity (several seeds of the same report) complete the picture.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cxrdist.data.index import load_index
from cxrdist.data.loader import SplitImages, eval_loader, read_split_images
from cxrdist.errors import DataError
from cxrdist.metrics.faithfulness import chance_level, faithfulness
from cxrdist.metrics.image import diversity, image_metrics
from cxrdist.sampling.loading import load_for_sampling
from cxrdist.sampling.pipeline import SampleSettings, generate_images

log = logging.getLogger(__name__)


@dataclass
class EvaluateOptions:
    split: str = "test"
    max_samples: int = 200  # 0 = the whole split
    steps: int = 25
    scheduler: str = "dpm++"
    guidance: float = 4.0
    seed: int = 0
    batch_size: int = 32
    diversity_prompts: int = 8  # reports sampled with several seeds for the diversity measure
    diversity_seeds: int = 4


def read_split(shards: str, split: str, max_samples: int) -> SplitImages:
    index = load_index(shards)
    data = read_split_images(eval_loader(shards, split, batch_size=64, image_size=index.image_size, channels=1,
                                         max_samples=max_samples))
    if data is None:
        raise DataError(f"split '{split}' of {shards} has no samples: check the split name with `cxrdist shard inspect`")
    return data


def evaluate_model(base, template: str, shards: str, opts: EvaluateOptions, progress: bool = True) -> dict[str, Any]:
    """Generate, read and score. `base` has any adapter already attached; `template` is applied once."""
    data = read_split(shards, opts.split, opts.max_samples)
    settings = SampleSettings(steps=opts.steps, scheduler=opts.scheduler, guidance=opts.guidance,
                              batch_size=opts.batch_size)
    n = len(data.reports)
    started = time.perf_counter()
    images = generate_images(base, data.reports, settings, template=template,
                             seeds=[opts.seed + i for i in range(n)], progress=progress)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "split": opts.split,
        "samples": n,
        "faithfulness": faithfulness(list(images), data.labels),
        "chance": chance_level(data.labels),
        "image_metrics": image_metrics(images, data.references),
        "seconds_generating": round(seconds, 2),
        "images_per_second": round(n / seconds, 3) if seconds else None,
        "options": asdict(opts),
    }
    result["diversity"] = within_prompt_diversity(base, data.reports, template, settings, opts, diversity)
    return result


def evaluate_model_path(model_path: str, shards: str, opts: EvaluateOptions, base_override: str | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Load whatever `cxrdist sample --model-path` takes and evaluate it with its own prompt template."""
    model, meta = load_for_sampling(model_path, base_override=base_override)
    return evaluate_model(model, (meta or {}).get("prompt_template", "{report}"), shards, opts, progress)


def within_prompt_diversity(base, reports: list[str], template: str, settings, opts: EvaluateOptions, measure) -> float | None:
    """Mean over a few reports of the similarity between images of different seeds (lower = more diverse)."""
    k, s = min(opts.diversity_prompts, len(reports)), opts.diversity_seeds
    if k == 0 or s < 2:
        return None
    prompts = [r for r in reports[:k] for _ in range(s)]
    seeds = [10_000 + opts.seed + i for i in range(len(prompts))]
    images = generate_images(base, prompts, settings, template=template, seeds=seeds)
    return float(np.mean([measure(list(images[i * s : (i + 1) * s])) for i in range(k)]))


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Rows = attributes (+ macro, image metrics), columns = models; chance from the first model's labels."""
    names = list(results)
    first = results[names[0]]
    attributes = [a for a in first["faithfulness"] if a != "macro"]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'':<22}{'chance':>8}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for attr in attributes + ["macro"]:
        chance = first["chance"].get(attr)
        row = f"{attr:<22}{(f'{chance:.3f}' if chance is not None else '-'):>8}"
        row += "".join(f"{results[n]['faithfulness'].get(attr, float('nan')):>{width + 2}.3f}" for n in names)
        lines.append(row)
    for metric in ("ssim", "psnr", "mse"):
        row = f"{metric:<22}{'':>8}" + "".join(f"{results[n]['image_metrics'][metric]:>{width + 2}.4f}" for n in names)
        lines.append(row)
    row = f"{'diversity (ssim)':<22}{'':>8}"
    row += "".join(f"{(results[n]['diversity'] if results[n]['diversity'] is not None else float('nan')):>{width + 2}.4f}" for n in names)
    lines.append(row)
    return "\n".join(lines)
