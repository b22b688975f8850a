"""What a phantom study contains, and how a radiologist would write it up.

This module is the clinical side of the phantom world: it draws the findings of one study from the
`PREVALENCE` table, turns them into MeSH-style labels (the same shape as the IU source's terms, so the
metrics read both), and writes an Open-i style report (findings sentences, then a short impression)
from phrasing tables. Pixels live in `phantom.py`.

Sides are always the PATIENT's sides. On a PA film the patient's left is on the image's right; only
`phantom.py` converts sides to image coordinates.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

SIDES = ("left", "right")
ZONES = ("upper", "middle", "lower")

# Study-level prevalences. A study is normal with probability `normal_study`; an abnormal study draws
# every finding independently with the conditional probabilities below and is redrawn if it came out
# empty. Marginals (1e5 draws): cardiomegaly 0.32, effusion 0.24 per side, pneumothorax 0.18 per side,
# nodule 0.29 (4.8% per zone), normal studies 0.40. Chosen so that every attribute has a minority
# class of roughly 20-35%: rare enough to look like radiology, common enough for a tiny model to learn.
PREVALENCE = {
    "normal_study": 0.40,
    "cardiomegaly": 0.50,
    "effusion_left": 0.38,
    "effusion_right": 0.38,
    "pneumothorax_left": 0.28,
    "pneumothorax_right": 0.28,
    "nodule": 0.45,
}
SEVERITY_WEIGHTS = {"mild": 0.40, "moderate": 0.35, "severe": 0.25}
# A lower-zone nodule often finds no room beside a large heart and is moved to another zone (phantom.py);
# drawing lower zones more often leaves the final six zones roughly even (4-5% of studies each).
NODULE_ZONE_WEIGHTS = {"upper": 0.30, "middle": 0.30, "lower": 0.40}
EFFUSION_SIZE_WEIGHTS = {"small": 0.5, "large": 0.5}

# Cardiothoracic ratio bands. The gaps between bands keep the classes separable for a reader that
# measures a blurry generated heart; 0.50 is the clinical normal/enlarged cut.
CTR_RANGES = {
    "normal": (0.38, 0.46),
    "mild": (0.52, 0.56),
    "moderate": (0.60, 0.63),
    "severe": (0.67, 0.70),
}


@dataclass(frozen=True)
class Findings:
    """The truth of one study. `effusion_*` is "" (none), "small" or "large"; `nodule_side`/`nodule_zone`
    are "" when there is no nodule; `severity` is "" for a normal heart."""

    severity: str = ""
    effusion_left: str = ""
    effusion_right: str = ""
    pneumothorax_left: bool = False
    pneumothorax_right: bool = False
    nodule_side: str = ""
    nodule_zone: str = ""

    @property
    def is_normal(self) -> bool:
        return self == Findings()

    def effusion(self, side: str) -> str:
        return self.effusion_left if side == "left" else self.effusion_right

    def pneumothorax(self, side: str) -> bool:
        return self.pneumothorax_left if side == "left" else self.pneumothorax_right

    def to_dict(self) -> dict:
        return asdict(self)


def pick_weighted(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """A key drawn with probability proportional to its weight (one uniform draw; rng.choice is slow)."""
    u = rng.random() * sum(weights.values())
    for name, w in weights.items():
        u -= w
        if u < 0:
            return name
    return name


def sample_findings(rng: np.random.Generator) -> Findings:
    """One study's findings, drawn from `PREVALENCE`."""
    if rng.random() < PREVALENCE["normal_study"]:
        return Findings()

    def graded(finding: str, weights: dict[str, float]) -> str:
        # the prevalence draw first, then the grade: the order every phantom set was drawn in
        return pick_weighted(rng, weights) if rng.random() < PREVALENCE[finding] else ""

    while True:
        drawn = Findings(
            severity=graded("cardiomegaly", SEVERITY_WEIGHTS),
            effusion_left=graded("effusion_left", EFFUSION_SIZE_WEIGHTS),
            effusion_right=graded("effusion_right", EFFUSION_SIZE_WEIGHTS),
            pneumothorax_left=bool(rng.random() < PREVALENCE["pneumothorax_left"]),
            pneumothorax_right=bool(rng.random() < PREVALENCE["pneumothorax_right"]),
            **_sample_nodule(rng),
        )
        if not drawn.is_normal:
            return drawn


def _sample_nodule(rng: np.random.Generator) -> dict[str, str]:
    if rng.random() >= PREVALENCE["nodule"]:
        return {"nodule_side": "", "nodule_zone": ""}
    return {"nodule_side": SIDES[int(rng.integers(2))], "nodule_zone": pick_weighted(rng, NODULE_ZONE_WEIGHTS)}


# ----------------------------------------------------------------------------------------------- labels
LABEL_ZONE = {"upper": "upper lobe", "middle": "middle lobe", "lower": "lower lobe"}


def findings_labels(f: Findings) -> list[str]:
    """MeSH-style terms, IU style: "Cardiomegaly/mild", "Pleural Effusion/bilateral/small", ..."""
    if f.is_normal:
        return ["normal"]
    labels = []
    if f.severity:
        labels.append(f"Cardiomegaly/{f.severity}")
    if f.effusion_left and f.effusion_left == f.effusion_right:
        labels.append(f"Pleural Effusion/bilateral/{f.effusion_left}")
    else:
        labels += [f"Pleural Effusion/{s}/{f.effusion(s)}" for s in SIDES if f.effusion(s)]
    if f.pneumothorax_left and f.pneumothorax_right:
        labels.append("Pneumothorax/bilateral")
    else:
        labels += [f"Pneumothorax/{s}" for s in SIDES if f.pneumothorax(s)]
    if f.nodule_side:
        labels.append(f"Nodule/{f.nodule_side}/{LABEL_ZONE[f.nodule_zone]}")
    return labels


# ---------------------------------------------------------------------------------------------- phrasing
# Every template states or negates one attribute. Placeholders: {sev} severity adjective, {sevly} its
# adverb, {side}, {size}, {zone}. Synonyms vary the wording so that a model must read meaning, not a string.
HEART_NORMAL = (
    "The heart is normal in size.",
    "Heart size is normal.",
    "Normal heart size.",
    "The cardiac silhouette is within normal limits.",
)
HEART_ENLARGED = (
    "{Sev} cardiomegaly.",
    "The heart is {sevly} enlarged.",
    "{Sev} enlargement of the cardiac silhouette.",
    "There is {sev} cardiomegaly.",
)
SEVERITY_WORDS = {"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe", "marked")}
SEVERITY_ADVERBS = {"mild": "mildly", "moderate": "moderately", "severe": "severely", "marked": "markedly"}

NODULE_ABSENT = (
    "No pulmonary nodule.",
    "The lungs are clear without nodule or mass.",
    "No focal nodule or mass.",
    "No suspicious pulmonary nodules.",
)
NODULE_PRESENT = (
    "There is a nodule in the {side} {zone}.",
    "{Side} {zone} pulmonary nodule.",
    "A rounded nodule projects over the {side} {zone}.",
    "Nodular opacity in the {side} {zone}.",
)
ZONE_WORDS = {
    "upper": ("upper lobe", "upper zone", "upper lung"),
    "middle": ("mid lung", "middle zone", "midlung"),
    "lower": ("lower lobe", "lung base", "lower zone"),
}

PLEURA_CLEAR = (
    "No pleural effusion or pneumothorax.",
    "No pneumothorax or pleural effusion.",
    "There is no pleural effusion or pneumothorax.",
    "No effusion or pneumothorax.",
)
EFFUSION_ABSENT = ("No pleural effusion.", "No effusion.")
EFFUSION_ONE_SIDE = (
    "{Size} {side} pleural effusion.",
    "There is a {size} {side} pleural effusion.",
    "{Size} {side}-sided pleural effusion.",
)
EFFUSION_BOTH_SAME = (
    "{Size} bilateral pleural effusions.",
    "Bilateral {size} pleural effusions.",
    "There are {size} pleural effusions bilaterally.",
)
EFFUSION_BOTH_DIFFERENT = ("{Size_r} right and {size_l} left pleural effusions.",)
PNEUMOTHORAX_ABSENT = ("No pneumothorax.", "There is no pneumothorax.")
PNEUMOTHORAX_ONE_SIDE = (
    "{Side} pneumothorax.",
    "There is a {side} pneumothorax.",
    "{Side}-sided pneumothorax.",
    "{Side} apical pneumothorax.",
)
PNEUMOTHORAX_BOTH = ("Bilateral pneumothoraces.", "Bilateral pneumothorax.")

# Sentences that carry no attribute: real reports have them, and a model must learn to ignore them.
FILLER = (
    "The mediastinum is unremarkable.",
    "Osseous structures are intact.",
    "No acute bony abnormality.",
)
FILLER_PROBABILITY = 0.3
IMPRESSION_NORMAL = (
    "No acute cardiopulmonary abnormality.",
    "No acute cardiopulmonary process.",
    "No active disease.",
)


def _choose(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _fill(template: str, **words: str) -> str:
    """Format a template; `{Name}` gets the capitalised form of `name`."""
    caps = {k[0].upper() + k[1:]: v[0].upper() + v[1:] for k, v in words.items()}
    return template.format(**words, **caps)


def _heart_sentence(f: Findings, rng: np.random.Generator) -> str:
    if not f.severity:
        return _choose(rng, HEART_NORMAL)
    sev = _choose(rng, SEVERITY_WORDS[f.severity])
    return _fill(_choose(rng, HEART_ENLARGED), sev=sev, sevly=SEVERITY_ADVERBS[sev])


def _nodule_sentence(f: Findings, rng: np.random.Generator) -> str:
    if not f.nodule_side:
        return _choose(rng, NODULE_ABSENT)
    return _fill(_choose(rng, NODULE_PRESENT), side=f.nodule_side, zone=_choose(rng, ZONE_WORDS[f.nodule_zone]))


def _effusion_sentence(f: Findings, rng: np.random.Generator) -> str:
    sides = [s for s in SIDES if f.effusion(s)]
    if not sides:
        return _choose(rng, EFFUSION_ABSENT)
    if len(sides) == 1:
        return _fill(_choose(rng, EFFUSION_ONE_SIDE), side=sides[0], size=f.effusion(sides[0]))
    if f.effusion_left == f.effusion_right:
        return _fill(_choose(rng, EFFUSION_BOTH_SAME), size=f.effusion_left)
    return _fill(_choose(rng, EFFUSION_BOTH_DIFFERENT), size_r=f.effusion_right, size_l=f.effusion_left)


def _pneumothorax_sentence(f: Findings, rng: np.random.Generator) -> str:
    sides = [s for s in SIDES if f.pneumothorax(s)]
    if not sides:
        return _choose(rng, PNEUMOTHORAX_ABSENT)
    if len(sides) == 2:
        return _choose(rng, PNEUMOTHORAX_BOTH)
    return _fill(_choose(rng, PNEUMOTHORAX_ONE_SIDE), side=sides[0])


def _pleura_sentences(f: Findings, rng: np.random.Generator) -> list[str]:
    if not (f.effusion_left or f.effusion_right or f.pneumothorax_left or f.pneumothorax_right):
        return [_choose(rng, PLEURA_CLEAR)]
    return [_effusion_sentence(f, rng), _pneumothorax_sentence(f, rng)]


def _impression(f: Findings, rng: np.random.Generator) -> str:
    """A short list of the positive findings (or a normal statement)."""
    if f.is_normal:
        return _choose(rng, IMPRESSION_NORMAL)
    items = []
    if f.severity:
        items.append(f"{f.severity} cardiomegaly")
    eff = [s for s in SIDES if f.effusion(s)]
    items += ["bilateral effusions"] if len(eff) == 2 else [f"{s} effusion" for s in eff]
    ptx = [s for s in SIDES if f.pneumothorax(s)]
    items += ["bilateral pneumothoraces"] if len(ptx) == 2 else [f"{s} pneumothorax" for s in ptx]
    if f.nodule_side:
        items.append(f"{f.nodule_side} {f.nodule_zone} zone nodule")
    # One short sentence per finding: as cheap in tokens as a list, and no clause mixes two sides.
    return " ".join(item[0].upper() + item[1:] + "." for item in items)


def compose_report(f: Findings, rng: Optional[np.random.Generator] = None) -> str:
    """Open-i style text: findings sentences (heart, lungs, pleura, maybe a filler), then the impression.

    At most 67 CLIP tokens (start/end included, checked on 20,000 studies) and 37 words, so a
    77-token text encoder never cuts anything.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    sentences = [_heart_sentence(f, rng), _nodule_sentence(f, rng), *_pleura_sentences(f, rng)]
    if rng.random() < FILLER_PROBABILITY and len(findings_labels(f)) <= 2:  # no filler in long reports
        sentences.insert(1, _choose(rng, FILLER))
    sentences.append(_impression(f, rng))
    return " ".join(sentences)
