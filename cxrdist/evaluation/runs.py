"""Evaluate a model on a shard split: does each generated image follow its report, and do the images, as a
set, look like the split's real ones without copying training images?

For every report of the split (or the first `max_samples`, in the split's fixed order) one image is
generated with a fixed seed. Then, by `metrics` (METRICS; "all" = every one):
- `faithfulness`: the analytic phantom reader measures each attribute of the generated image; the share that
  matches the report's labels, per attribute and macro-averaged, next to the chance level of the same labels;
- `image`: SSIM / PSNR / MSE against the paired real image (a perfect generator does not reproduce it: this
  says little beyond "same kind of image");
- `diversity`: within-prompt similarity of several seeds of the same report;
- `fid`, `kid`, `prdc`: distribution metrics between the split's real images and the generated ones, on the
  features `--features` names (cxrdist.metrics.features, cxrdist.metrics.distribution);
- `memorization`: each generated image's nearest training image, flagged above a threshold calibrated on the
  split's real images, training and real images both as the model's VAE draws them (cxrdist.metrics.memorization);
- `classifier`: per-finding AUROC of a classifier on the generated images against the reports' labels
  (cxrdist.metrics.classifier).
The split, the training pool and their features are read and computed once per process (the pool as drawn
once per base), so several models compare on the same references.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from cxrdist.data.index import load_index
from cxrdist.data.loader import SplitImages, eval_loader, read_split_images
from cxrdist.errors import DataError, InputError
from cxrdist.metrics.faithfulness import chance_level, faithfulness_details, flat_intervals, flat_scores
from cxrdist.metrics.features import image_batch
from cxrdist.metrics.image import diversity, image_metrics, standard_error
from cxrdist.metrics.memorization import AuditSide
from cxrdist.sampling.loading import load_for_sampling
from cxrdist.sampling.pipeline import NonFiniteSample, SampleSettings, as_drawn, generate_images

log = logging.getLogger(__name__)

METRICS = ("faithfulness", "image", "diversity", "fid", "kid", "prdc", "memorization", "classifier")
DEFAULT_METRICS = ("faithfulness", "image", "diversity")
DISTRIBUTION = ("fid", "kid", "prdc")
PRDC_KEYS = ("precision", "recall", "density", "coverage")


def parse_metrics(text: str) -> tuple[str, ...]:
    """`--metrics` ("fid,kid,memorization", "all") -> the names, in METRICS order; InputError for an unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return METRICS
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise InputError(f"--metrics {text!r}: unknown {', '.join(unknown) or '(empty)'}; choose from "
                         f"{', '.join(METRICS)} or all")
    return tuple(n for n in METRICS if n in names)


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
    metrics: tuple[str, ...] = DEFAULT_METRICS
    features: str = "pixels"  # cxrdist.metrics.features spec for fid / kid / prdc / memorization
    classifier: str = "reader"  # cxrdist.metrics.classifier name
    bootstrap: int = 50  # FID resamples for its standard error and interval
    nearest_k: int = 5  # precision / recall / density / coverage neighbourhoods
    memorization_pool: int = 10_000  # training images searched, the first N of the training splits (0 = all)
    memorization_quantile: float = 0.99  # of the real images' nearest-training SSIM: the flagging threshold
    memorization_threshold: float | None = None  # fixed threshold instead of calibrating


def read_split(shards: str, split: str, max_samples: int) -> SplitImages:
    index = load_index(shards)
    data = read_split_images(eval_loader(shards, split, batch_size=64, image_size=index.image_size, channels=1,
                                         max_samples=max_samples))
    if data is None:
        raise DataError(f"split '{split}' of {shards} has no samples: check the split name with `cxrdist shard inspect`")
    return data


def training_splits(shards: str, split: str) -> list[str]:
    """The splits a model evaluated on `split` may have trained on: every fold but `split` (never test)."""
    return [s for s in load_index(shards).fold_names if s != split]


def read_training_pool(shards: str, split: str, limit: int) -> np.ndarray:
    """Training images for the memorization audit: the first `limit` of the training splits (0 = all)."""
    index = load_index(shards)
    splits = training_splits(shards, split)
    if not splits:
        raise DataError(f"{shards} has no training folds besides {split}: the memorization audit needs some")
    images, left = [], limit or None
    for name in splits:
        if left is not None and left <= 0:
            break
        part = read_split_images(eval_loader(shards, name, batch_size=64, image_size=index.image_size, channels=1,
                                             max_samples=left or 0))
        if part is not None:
            images.append(part.references)
            left = None if left is None else left - len(part.references)
    pool = np.concatenate(images) if images else np.zeros((0, index.image_size, index.image_size), np.float32)
    total = index.count(splits)
    log.info("memorization pool: %d of %d training images (%s)%s", len(pool), total, ", ".join(splits),
             "" if len(pool) == total else " - raise --memorization-pool to search more")
    return pool


@dataclass
class References:
    """What every model of one evaluation is compared with, computed once."""

    data: SplitImages
    feature_name: str = ""
    real_features: torch.Tensor | None = None
    pool: np.ndarray | None = None  # the training images searched, as they are (the report shows these)
    extractor: Any = field(default=None, repr=False)
    # the audit's side per VAE (base fingerprint): models of one base share their VAE and so the drawn pool
    audits: dict[str, AuditSide] = field(default_factory=dict, repr=False)

    def audit_side(self, base) -> AuditSide:
        key = f"{base.fingerprint}:{base.vae.dtype}"
        if key not in self.audits:
            self.audits[key] = AuditSide.build(self.extractor, self.data.references, self.pool,
                                               functools.partial(as_drawn, base))
        return self.audits[key]


@functools.lru_cache(maxsize=2)
def _references(shards: str, split: str, max_samples: int, features: str | None, pool_limit: int | None) -> References:
    refs = References(read_split(shards, split, max_samples))
    if features is not None:
        from cxrdist.metrics.features import FeatureError, feature_extractor

        try:
            refs.extractor = feature_extractor(features)
        except FeatureError as err:
            raise InputError(str(err)) from None
        refs.feature_name = refs.extractor.name
        refs.real_features = refs.extractor(image_batch(refs.data.references))
    if pool_limit is not None:
        refs.pool = read_training_pool(shards, split, pool_limit)
    return refs


def references_for(shards: str, opts: EvaluateOptions) -> References:
    wants = set(opts.metrics)
    features = opts.features if wants & {*DISTRIBUTION, "memorization"} else None
    pool = opts.memorization_pool if "memorization" in wants else None
    return _references(shards, opts.split, opts.max_samples, features, pool)


@dataclass
class Evaluated:
    """One model's scores (JSON-ready) and the images behind them, for the report."""

    result: dict[str, Any]
    generated: np.ndarray
    references: References


def run_evaluation(base, template: str, shards: str, opts: EvaluateOptions, progress: bool = True) -> Evaluated:
    """Generate, then score by `opts.metrics`. `base` has any adapter already attached; `template` is applied once."""
    refs = references_for(shards, opts)
    data = refs.data
    settings = SampleSettings(steps=opts.steps, scheduler=opts.scheduler, guidance=opts.guidance,
                              batch_size=opts.batch_size)
    n = len(data.reports)
    started = time.perf_counter()
    images = generate_images(base, data.reports, settings, template=template,
                             seeds=[opts.seed + i for i in range(n)], progress=progress)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {"split": opts.split, "samples": n, "seconds_generating": round(seconds, 2),
                              "images_per_second": round(n / seconds, 3) if seconds else None,
                              "options": asdict(opts)}
    wants = set(opts.metrics)
    scoring = time.perf_counter()
    result.update(score_against_split(images, data, wants))
    generated = image_batch(images)
    generated_features = refs.extractor(generated) if refs.extractor is not None else None
    if wants & set(DISTRIBUTION):
        result.update(_distribution(refs, generated_features, opts))
    if "memorization" in wants:
        from cxrdist.metrics.memorization import memorization_audit

        side = refs.audit_side(base)
        result["memorization"] = memorization_audit(side.nearest(generated, generated_features), side.heldout,
                                                    opts.memorization_quantile, opts.memorization_threshold)
        result["memorization"]["features"] = refs.feature_name
    if "classifier" in wants:
        from cxrdist.metrics.classifier import classifier, classifier_agreement

        try:
            clf = classifier(opts.classifier)
        except ValueError as err:
            raise InputError(str(err)) from None
        result["classifier"] = classifier_agreement(clf, images, data.references, data.labels)
    if "diversity" in wants:
        per_prompt = within_prompt_diversity(base, data.reports, template, settings, opts, diversity)
        result["diversity"] = float(np.mean(per_prompt)) if per_prompt else None
        result["diversity_se"] = standard_error(np.array(per_prompt)) if per_prompt else None
    result["seconds_scoring"] = round(time.perf_counter() - scoring, 2)
    return Evaluated(result, images, refs)


def score_against_split(images: np.ndarray, data: SplitImages, wants: set[str]) -> dict[str, Any]:
    """The scores of `images` (one per report of `data`, in order) that need only the split: faithfulness with
    its intervals and chance levels, and the paired image metrics, as `wants` asks."""
    out: dict[str, Any] = {}
    if "faithfulness" in wants:
        details = faithfulness_details(list(images), data.labels, intervals=True)
        out["faithfulness"] = flat_scores(details)
        out["faithfulness_intervals"] = flat_intervals(details)
        out["chance"] = chance_level(data.labels)
    if "image" in wants:
        out["image_metrics"] = image_metrics(images, data.references)
    return out


def _distribution(refs: References, generated: torch.Tensor, opts: EvaluateOptions) -> dict[str, Any]:
    from cxrdist.metrics.distribution import distribution_metrics

    wants = set(opts.metrics)
    full = distribution_metrics(refs.real_features, generated, refs.feature_name, k=opts.nearest_k,
                                bootstrap=opts.bootstrap if "fid" in wants else 0, seed=opts.seed)
    keep = {"distribution"}
    if "fid" in wants:
        keep |= {"fid", "fid_se", "fid_ci95"}
    if "kid" in wants:
        keep |= {"kid", "kid_std"}
    if "prdc" in wants:
        keep |= {*PRDC_KEYS, *(f"{k}_se" for k in PRDC_KEYS)}
    return {k: v for k, v in full.items() if k in keep}


def evaluate_model(base, template: str, shards: str, opts: EvaluateOptions, progress: bool = True) -> dict[str, Any]:
    """The JSON-ready scores of `run_evaluation`."""
    return run_evaluation(base, template, shards, opts, progress).result


def evaluate_model_path(model_path: str, shards: str, opts: EvaluateOptions, base_override: str | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Load whatever `cxrdist sample --model-path` takes and evaluate it with its own prompt template."""
    return run_model_path(model_path, shards, opts, base_override, progress).result


def run_model_path(model_path: str, shards: str, opts: EvaluateOptions, base_override: str | None = None,
                   progress: bool = True) -> Evaluated:
    model, meta = load_for_sampling(model_path, base_override=base_override)
    try:
        evaluated = run_evaluation(model, (meta or {}).get("prompt_template", "{report}"), shards, opts, progress)
    except NonFiniteSample as exc:  # the index within the call, the seed names which image it was
        raise exc.naming(str(model_path), exc.index) from None
    evaluated.result["model"] = describe_model(model_path, meta, base_override)
    return evaluated


def describe_model(model_path: str, meta: dict | None, base_override: str | None = None) -> dict[str, Any]:
    """What was evaluated: a trained model (one with cxrdist metadata: an adapter, a full fine-tune's export, a
    training checkpoint; or a plain diffusers LoRA, which loads only onto --base) and the base it was trained
    from, or a pipeline without metadata (a base)."""
    recorded = (meta or {}).get("base")
    base = base_override or (recorded.get("source") if isinstance(recorded, dict) else None)
    return {"path": str(model_path), "trained": meta is not None or base_override is not None, "base": base}


def within_prompt_diversity(base, reports: list[str], template: str, settings, opts: EvaluateOptions,
                            measure) -> list[float]:
    """Per report of the first few: the similarity between its images of different seeds (lower = more
    diverse); empty when the options ask for none."""
    k, s = min(opts.diversity_prompts, len(reports)), opts.diversity_seeds
    if k == 0 or s < 2:
        return []
    prompts = [r for r in reports[:k] for _ in range(s)]
    seeds = [10_000 + opts.seed + i for i in range(len(prompts))]
    images = generate_images(base, prompts, settings, template=template, seeds=seeds)
    return [float(measure(list(images[i * s : (i + 1) * s]))) for i in range(k)]


@dataclass
class Cell:
    """One model's value of one metric, with what was computed about its uncertainty."""

    value: float | None
    se: float | None = None  # standard error
    ci95: tuple[float, float] | None = None  # 95 % interval

    def missing(self) -> bool:
        return self.value is None or (isinstance(self.value, float) and np.isnan(self.value))


@dataclass
class MetricRow:
    """A row of the results table: one metric, a cell per model (the real-image row has one), chance if any."""

    label: str
    cells: list[Cell]
    digits: int
    chance: float | None = None
    group: str = ""  # faithfulness, image, distribution, memorization, classifier
    sub: bool = False  # a detail of the row above it


def _interval(block: dict | None, key: str) -> tuple[float, float] | None:
    ci = (block or {}).get(key, {}).get("ci95")
    return (float(ci[0]), float(ci[1])) if ci and all(np.isfinite(ci)) else None


def metric_rows(results: dict[str, dict[str, Any]]) -> list[MetricRow]:
    """The table both `format_table` and the HTML report show: rows = what was measured (attributes and macro,
    image metrics, distribution metrics, memorization, classifier AUROC), cells = models; chance from the first
    model's labels."""
    names = list(results)
    first = results[names[0]]
    rows: list[MetricRow] = []
    if "faithfulness" in first:
        for attr in [a for a in first["faithfulness"] if a != "macro"] + ["macro"]:
            cells = [Cell(results[n]["faithfulness"].get(attr),
                          ci95=_interval(results[n].get("faithfulness_intervals"), attr)) for n in names]
            rows.append(MetricRow(attr, cells, 3, first["chance"].get(attr), "faithfulness"))
    if "image_metrics" in first:
        for metric in ("ssim", "psnr", "mse"):
            rows.append(MetricRow(metric, [Cell(results[n]["image_metrics"][metric],
                                                results[n]["image_metrics"].get(f"{metric}_se")) for n in names],
                                  4, group="image"))
    if "diversity" in first:
        rows.append(MetricRow("diversity (ssim)", [Cell(results[n]["diversity"], results[n].get("diversity_se"))
                                                   for n in names], 4, group="image"))
    for key, error, digits in (("fid", "fid_se", 3), ("kid", "kid_std", 5), *((k, f"{k}_se", 3) for k in PRDC_KEYS)):
        if key in first:
            cells = [Cell(results[n].get(key), results[n].get(error),
                          tuple(results[n]["fid_ci95"]) if key == "fid" and results[n].get("fid_ci95") else None)
                     for n in names]
            rows.append(MetricRow(key, cells, digits, group="distribution"))
    if "memorization" in first:
        rows.append(MetricRow("memorized share", [Cell(results[n]["memorization"]["flagged_fraction"],
                                                       results[n]["memorization"]["flagged_fraction_se"])
                                                  for n in names], 3, group="memorization"))
        rows.append(MetricRow("threshold (ssim)", [Cell(results[n]["memorization"]["threshold"]) for n in names], 3,
                              group="memorization", sub=True))
    if "classifier" in first:
        for finding in first["classifier"]["findings"]:
            cells = [Cell(results[n]["classifier"]["findings"][finding]["generated"]["auroc"],
                          results[n]["classifier"]["findings"][finding]["generated"]["se"]) for n in names]
            rows.append(MetricRow(f"AUROC {finding}", cells, 3, group="classifier"))
            real = first["classifier"]["findings"][finding].get("real", {})
            if real.get("auroc") is not None:  # the same real images for every model
                rows.append(MetricRow("on the real images", [Cell(real["auroc"], real["se"])], 3,
                                      group="classifier", sub=True))
    return rows


def format_value(cell: Cell, digits: int) -> str:
    return "-" if cell.missing() else f"{cell.value:.{digits}f}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """`metric_rows` as text: each value with its standard error (+-) where one was computed; chance first."""
    names = list(results)
    first = results[names[0]]
    width = max(14, *(len(n) for n in names))
    lines = [f"{'':<24}{'chance':>8}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for row in metric_rows(results):
        chance = "" if row.chance is None else format_value(Cell(row.chance), row.digits)
        cells = [format_value(c, row.digits) + ("" if c.se is None else f" +-{format_value(Cell(c.se), row.digits)}")
                 for c in row.cells]
        label = ("  " if row.sub else "") + row.label
        lines.append(f"{label[:24]:<24}{chance:>8}" + "".join(f"{c:>{width + 2}}" for c in cells))
        if row.group == "distribution" and row.label == _last_distribution(first):
            d = first["distribution"]
            lines.append(f"  (features {d['features']}, {d['n_real']} real vs {d['n_generated']} generated images)")
    return "\n".join(lines)


def _last_distribution(first: dict[str, Any]) -> str | None:
    present = [k for k in ("fid", "kid", *PRDC_KEYS) if k in first]
    return present[-1] if present and "distribution" in first else None
