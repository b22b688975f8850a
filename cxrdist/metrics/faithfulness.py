"""Text faithfulness: does a generated image show what its report says?

Each generated image is read (`cxrdist.metrics.reader.read_image`) and compared, attribute by attribute,
with the attributes of the report it was generated from (`attributes_from_labels`). The score of an
attribute is the share of images whose reading matches; `macro` averages the primary attributes.
`faithfulness` returns a flat {attribute: accuracy, "macro": ...} dict; `faithfulness_details` adds
balanced accuracy and counts per attribute.

Targets of "unknown" (a label that does not say, e.g. an effusion without a side) are skipped. A reading of
"unknown" (an unreadable image) is never skipped: it counts as a miss, so broken samples cannot score.

Chance levels (`chance_level`) say what a generator that ignores the text would score:
- "prior" (default): sum over classes of p_c^2, with p the class shares among the targets. A text-blind
  generator that reproduces the training distribution hits class c with probability p_c, independently of
  the report; with training and test drawn alike, its expected accuracy is sum p_c^2.
- "majority": max p_c, a generator that always draws the commonest class (e.g. only normal studies).
Balanced accuracy (mean recall over the classes present) is reported too: its chance is 1/K for any
text-blind generator, which makes rare classes (a nodule zone) visible.

Intervals (95 %): each attribute's share has the Wilson score interval of a binomial proportion (it stays inside
[0, 1] and is not degenerate at 0 or n hits, where the normal approximation is); the macro score, a mean of
shares measured on the same images, has a percentile bootstrap over images, which keeps their correlation.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

import numpy as np

from cxrdist.metrics.attributes import ATTRIBUTES, SECONDARY_CLASSES, UNKNOWN, attributes_from_labels


Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
BOOTSTRAP_RESAMPLES = 2000  # for the macro score's interval: the percentile's Monte Carlo error is ~0.005


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion hits / n (NaNs for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = hits / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at 0 or n hits the bound is exactly 0 or 1 (the formula gives it up to rounding)
    return (0.0 if hits == 0 else float(centre - half)), (1.0 if hits == n else float(centre + half))


def _hits(readings: list[dict[str, str]], targets: list[dict[str, str]], name: str) -> np.ndarray:
    """Per image: 1.0 where the reading matches a stated target, 0.0 where it does not, NaN where none is stated."""
    return np.array([np.nan if t.get(name, UNKNOWN) == UNKNOWN else float(t[name] == r.get(name, UNKNOWN))
                     for r, t in zip(readings, targets)], dtype=np.float64)


def _score(readings: list[dict[str, str]], targets: list[dict[str, str]], name: str) -> dict:
    pairs = [(t[name], r.get(name, UNKNOWN)) for r, t in zip(readings, targets) if t.get(name, UNKNOWN) != UNKNOWN]
    if not pairs:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "n": 0,
                "ci95": [float("nan"), float("nan")]}
    hits = [target == read for target, read in pairs]
    recalls = [np.mean([h for (t, _), h in zip(pairs, hits) if t == cls]) for cls in sorted({t for t, _ in pairs})]
    return {"accuracy": float(np.mean(hits)), "balanced_accuracy": float(np.mean(recalls)), "n": len(pairs),
            "ci95": list(wilson_interval(int(sum(hits)), len(pairs)))}


def macro_interval(hits: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap of the macro score (mean over attributes of each attribute's share) from
    `hits` (images x attributes, NaN = not stated): images are resampled whole, so an image that is right or
    wrong about several attributes at once moves them together. A resample in which an attribute has no stated
    target averages over the others, as the macro score itself does."""
    n = hits.shape[0]
    if n == 0 or not np.isfinite(hits).any():
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    stated, right = np.isfinite(hits).astype(np.float64), np.nan_to_num(hits)
    macros = np.empty(resamples)
    for i in range(resamples):  # one resample at a time: memory stays images x attributes for any split size
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = (counts @ right) / (counts @ stated)  # NaN where a resample holds no stated target
        macros[i] = np.nanmean(shares) if np.isfinite(shares).any() else np.nan
    lo, hi = np.percentile(macros[np.isfinite(macros)], [2.5, 97.5])
    return [float(lo), float(hi)]


# Side-blind presence: a model can learn to draw a finding before it learns on which side the report puts it;
# these separate the two (diagnostics beside the macro score, never part of it).
PRESENCE_OF = {"effusion_present": ("effusion_left", "effusion_right"),
               "pneumothorax_present": ("pneumothorax_left", "pneumothorax_right")}
PRESENCE = (*PRESENCE_OF, "nodule_present")


def presence(attrs: dict[str, str]) -> dict[str, str]:
    """{"effusion_present", "pneumothorax_present", "nodule_present"}: yes / no / unknown, sides ignored."""
    out = {}
    for name, sides in PRESENCE_OF.items():
        values = [attrs.get(side, UNKNOWN) for side in sides]
        out[name] = "yes" if "yes" in values else "no" if all(v == "no" for v in values) else UNKNOWN
    nodule = attrs.get("nodule", UNKNOWN)
    out["nodule_present"] = UNKNOWN if nodule == UNKNOWN else "no" if nodule == "none" else "yes"
    return out


def faithfulness_from_attributes(readings: list[dict[str, str]], targets: list[dict[str, str]],
                                 intervals: bool = False) -> dict:
    """Scores from attribute dicts already read (`readings`) and expected (`targets`), aligned by index.

    Returns {"attributes": {name: {"accuracy", "balanced_accuracy", "n"}}, "secondary": {same, for severity
    grades}, "presence": {same, side-blind}, "macro": mean primary accuracy, "macro_balanced": mean primary
    balanced accuracy, "n_images"}. Each attribute's dict also holds "ci95", the Wilson interval of its
    accuracy. `intervals` adds "macro_ci95", the macro's bootstrap interval (about a second per 10,000
    images; validation during training does without it).
    """
    if len(readings) != len(targets):
        raise ValueError(f"{len(readings)} readings but {len(targets)} targets")
    primary = {name: _score(readings, targets, name) for name in ATTRIBUTES}
    secondary = {name: _score(readings, targets, name) for name in SECONDARY_CLASSES}
    read_presence, target_presence = [presence(r) for r in readings], [presence(t) for t in targets]
    side_blind = {name: _score(read_presence, target_presence, name) for name in PRESENCE}
    scored = [v for v in primary.values() if v["n"]]
    scores = {
        "attributes": primary,
        "secondary": secondary,
        "presence": side_blind,
        "macro": float(np.mean([v["accuracy"] for v in scored])) if scored else float("nan"),
        "macro_balanced": float(np.mean([v["balanced_accuracy"] for v in scored])) if scored else float("nan"),
        "n_images": len(readings),
    }
    if intervals:
        hits = np.stack([_hits(readings, targets, name) for name in ATTRIBUTES], axis=1) if readings else None
        scores["macro_ci95"] = macro_interval(hits) if hits is not None else [float("nan"), float("nan")]
    return scores


def faithfulness_details(images: Iterable[np.ndarray], labels: list[list[str]],
                         readings: Optional[list[dict[str, str]]] = None, intervals: bool = False) -> dict:
    """Read each image and score it against the attributes of its labels; nested result with balanced
    accuracy, counts and intervals (see `faithfulness_from_attributes`). Pass `readings` to reuse readings."""
    from cxrdist.metrics.reader import read_image

    targets = [attributes_from_labels(lab) for lab in labels]
    if readings is None:
        readings = [read_image(img) for img in images]
    return faithfulness_from_attributes(readings, targets, intervals)


GROUPS = ("attributes", "secondary", "presence")  # the order of the flat dict and of tables


def faithfulness(images: Iterable[np.ndarray], labels: list[list[str]],
                 readings: Optional[list[dict[str, str]]] = None) -> dict[str, float]:
    """Share of images whose reading matches their report, flat: {attribute: accuracy, ..., "macro": mean
    over the primary attributes, "macro_balanced": mean primary balanced accuracy}. Primary attributes
    come first, then the secondary grades (heart_severity, effusion_*_size), then side-blind presence
    (effusion_present, pneumothorax_present, nodule_present).

    `images[i]` (2-D, [0, 1] or uint8) was generated from the report whose labels are `labels[i]`."""
    return flat_scores(faithfulness_details(images, labels, readings))


def flat_scores(details: dict) -> dict[str, float]:
    """`faithfulness`'s flat dict from `faithfulness_details`' nested one."""
    flat = {name: v["accuracy"] for group in GROUPS for name, v in details[group].items()}
    flat["macro"], flat["macro_balanced"] = details["macro"], details["macro_balanced"]
    return flat


def flat_intervals(details: dict) -> dict[str, dict]:
    """Per key of `flat_scores` that has one: {"ci95": [lo, hi], "n": stated targets} (the macro's n = images)."""
    out = {name: {"ci95": v["ci95"], "n": v["n"]} for group in GROUPS for name, v in details[group].items()}
    out["macro"] = {"ci95": details.get("macro_ci95", [float("nan")] * 2), "n": details["n_images"]}
    return out


def chance_level(labels: list[list[str]], kind: str = "prior") -> dict[str, float]:
    """Expected accuracy per attribute (primary, secondary, presence) and "macro" (primary only) of a generator
    that ignores the text. `kind`: "prior" (sum of squared class shares) or "majority" (largest share)."""
    if kind not in ("prior", "majority"):
        raise ValueError(f"chance_level kind must be 'prior' or 'majority', not {kind!r}")
    targets = [attributes_from_labels(lab) for lab in labels]
    targets = [{**t, **presence(t)} for t in targets]
    out = {}
    for name in (*ATTRIBUTES, *SECONDARY_CLASSES, *PRESENCE):
        counts = Counter(t[name] for t in targets if t[name] != UNKNOWN)
        total = sum(counts.values())
        if not total:
            out[name] = float("nan")
            continue
        shares = np.array(list(counts.values()), dtype=float) / total
        out[name] = float((shares**2).sum() if kind == "prior" else shares.max())
    out["macro"] = float(np.nanmean([out[n] for n in ATTRIBUTES]))
    return out


def format_report(scores: dict, chance: Optional[dict[str, float]] = None) -> str:
    """A small table from `faithfulness_details`: attribute, accuracy, balanced accuracy, n, chance."""
    lines = [f"{'attribute':<22}{'accuracy':>9}{'balanced':>9}{'n':>6}" + (f"{'chance':>8}" if chance else "")]
    for group in GROUPS:
        for name, v in scores[group].items():
            row = f"{name:<22}{v['accuracy']:>9.3f}{v['balanced_accuracy']:>9.3f}{v['n']:>6d}"
            lines.append(row + (f"{chance[name]:>8.3f}" if chance and name in chance else ""))
    macro = f"{'macro':<22}{scores['macro']:>9.3f}{scores['macro_balanced']:>9.3f}{scores['n_images']:>6d}"
    lines.append(macro + (f"{chance['macro']:>8.3f}" if chance else ""))
    return "\n".join(lines)
