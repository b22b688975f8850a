"""How a phantom film was taken, and a caption that says so without naming any finding.

Real bases learn from captions about everything but radiology: where things are, what is on the left or at
the top, how bright a picture is. The phantom base is pretrained the same way (`cxrdist pretrain`,
`pretrain.captions: acquisition`): on captions about three acquisition attributes that the faithfulness
score never reads, so its cross-attention learns the phantom world's spatial words ("left", "upper",
"both") while it stays at chance on every finding.

- `marker`: a radiopaque side marker, a small bright block at the image edge on the patient's left or right
  side, at the upper, middle or lower level (or none). The same six places the nodule zones name, but
  outside the lungs.
- `electrodes`: ECG electrodes above the left, right or both shoulders (or none).
- `exposure`: under- (lighter film), normal or over-exposed (darker film).

Everything is drawn from a stream of its own (`acquisition_rng`), so a study's findings, anatomy and report
are the same with or without it. Sides are the PATIENT's; `phantom.py` turns them into image positions,
away from every region `cxrdist.metrics.reader` measures.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cxrdist.data.sources.phantom_reports import SIDES, ZONES, pick_weighted

MARKER_PLACES = tuple(f"{side} {level}" for side in SIDES for level in ZONES)
ELECTRODE_SIDES = ("none", "left", "right", "both")
EXPOSURES = ("under", "normal", "over")
# A marker on most films, in one of six places; electrodes on about half; a fifth of films mis-exposed each way.
MARKER_NONE = 1 / 7
ELECTRODE_WEIGHTS = {"none": 0.4, "left": 0.2, "right": 0.2, "both": 0.2}
EXPOSURE_WEIGHTS = {"under": 0.2, "normal": 0.6, "over": 0.2}

# Phrasings: one is drawn per study; an empty phrasing leaves the attribute unsaid (the caption's other parts
# still say something), so the base also learns to draw what a caption does not mention.
MARKER_PHRASES = ("Side marker at the {side} {level} edge.", "{Side} {level} side marker.",
                  "A lead marker on the {side}, {level} edge.")
NO_MARKER_PHRASES = ("No side marker.", "")
ELECTRODE_PHRASES = {
    "left": ("ECG electrode above the left shoulder.", "Left shoulder electrode."),
    "right": ("ECG electrode above the right shoulder.", "Right shoulder electrode."),
    "both": ("ECG electrodes above both shoulders.", "Bilateral shoulder electrodes."),
    "none": ("No ECG electrodes.", ""),
}
EXPOSURE_PHRASES = {
    "under": ("Underexposed film.", "Low exposure, the film is light."),
    "over": ("Overexposed film.", "High exposure, the film is dark."),
    "normal": ("Adequate exposure.", ""),
}
FALLBACK_CAPTION = "Chest radiograph."


@dataclass(frozen=True)
class Acquisition:
    """`marker`: "none" or one of MARKER_PLACES ("left upper"...); `electrodes`: one of ELECTRODE_SIDES;
    `exposure`: one of EXPOSURES; `caption`: what the pretraining text says about them."""

    marker: str
    electrodes: str
    exposure: str
    caption: str

    def electrode_sides(self) -> tuple[str, ...]:
        return SIDES if self.electrodes == "both" else () if self.electrodes == "none" else (self.electrodes,)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def acquisition_rng(index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, 0xAC05])


def describe(marker: str, electrodes: str, exposure: str, rng: np.random.Generator) -> str:
    """A caption in shuffled order; words about findings (heart, effusion, nodule...) never appear."""
    if marker == "none":
        parts = [NO_MARKER_PHRASES[rng.integers(len(NO_MARKER_PHRASES))]]
    else:
        side, level = marker.split()
        phrase = MARKER_PHRASES[rng.integers(len(MARKER_PHRASES))]
        parts = [phrase.format(side=side, Side=side.capitalize(), level=level)]
    for table, value in ((ELECTRODE_PHRASES, electrodes), (EXPOSURE_PHRASES, exposure)):
        parts.append(table[value][rng.integers(len(table[value]))])
    parts = [parts[i] for i in rng.permutation(len(parts)) if parts[i]]
    return " ".join(parts) or FALLBACK_CAPTION


def sample_acquisition(index: int, seed: int) -> Acquisition:
    rng = acquisition_rng(index, seed)
    marker = "none" if rng.random() < MARKER_NONE else MARKER_PLACES[rng.integers(len(MARKER_PLACES))]
    electrodes = pick_weighted(rng, ELECTRODE_WEIGHTS)
    exposure = pick_weighted(rng, EXPOSURE_WEIGHTS)
    return Acquisition(marker, electrodes, exposure, describe(marker, electrodes, exposure, rng))
