"""Does a phantom base put things where its caption says? Side marker place and ECG electrode sides, read back
from images each base draws for held-out acquisition captions (`cxrdist.data.sources.phantom_acquisition`).

    python benchmarks/base_spatial.py --base models/phantom-base --base /path/to/other-base --samples 128

The captions belong to phantom studies of a set no base was pretrained on (`--seed`, default 2). The first row
reads the real phantoms of those studies (the reading's own accuracy); chance is the share of the commonest class.
A base pretrained with `pretrain.captions: generic` never saw these words and should sit at chance; one pretrained
with `acquisition` captions should not. Findings are not read here: `cxrdist evaluate` scores those.
"""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from cxrdist.data.sources.phantom import (ELECTRODE_X, ELECTRODE_Y, MARKER_HALF, MARKER_X, MARKER_Y, SIDE_SIGN,
                                          draw_study)
from cxrdist.data.sources.phantom_acquisition import MARKER_PLACES
from cxrdist.data.sources.phantom_reports import SIDES
from cxrdist.metrics.reader import CANONICAL_SIZE, to_canonical


def _columns(centre: float, half_width: float) -> slice:
    """The canonical-image columns an x span (image fractions, centre 0) touches."""
    lo, hi = sorted((0.5 + centre - half_width, 0.5 + centre + half_width))
    return slice(int(np.floor(lo * CANONICAL_SIZE)), int(np.ceil(hi * CANONICAL_SIZE)))


# where phantom.py draws the marker on each side (the patient's left is the image's right on a PA film)
MARKER_COLUMNS = {side: _columns(SIDE_SIGN[side] * MARKER_X, MARKER_HALF[0]) for side in SIDES}
MARKER_CONTRAST = 0.15  # box above its edge strip's median, in 1-99 percentile ranges (real: markers >= 0.27, none <= 0.03)
ELECTRODE_CONTRAST = 0.35


def _normalised(img: np.ndarray) -> np.ndarray:
    a = to_canonical(img)
    lo, hi = np.percentile(a, (1, 99))
    return (a - lo) / max(hi - lo, 1e-6)


def read_marker(a: np.ndarray) -> str:
    scores = {}
    for place in MARKER_PLACES:
        side, level = place.split()
        strip = a[:, MARKER_COLUMNS[side]]
        row = int(MARKER_Y[level] * CANONICAL_SIZE)
        scores[place] = strip[row - 1 : row + 2].mean() - np.median(strip)
    best = max(scores, key=scores.get)
    return best if scores[best] > MARKER_CONTRAST else "none"


def read_electrodes(a: np.ndarray) -> str:
    row = int(ELECTRODE_Y * CANONICAL_SIZE)
    top = a[: row + 4]
    found = []
    for side in SIDES:
        col = int((0.5 + SIDE_SIGN[side] * ELECTRODE_X) * CANONICAL_SIZE)
        if a[row - 1 : row + 2, col - 2 : col + 2].mean() - np.median(top) > ELECTRODE_CONTRAST:
            found.append(side)
    return "both" if len(found) == 2 else found[0] if found else "none"


def score(images, truths) -> dict[str, float]:
    read = [(read_marker(a), read_electrodes(a)) for a in map(_normalised, images)]
    return {"marker": float(np.mean([r[0] == t.marker for r, t in zip(read, truths)])),
            "electrodes": float(np.mean([r[1] == t.electrodes for r, t in zip(read, truths)]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", action="append", required=True, help="a base model folder; repeat")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=2, help="phantom set the captions come from")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()

    from cxrdist.models.loading import load_base
    from cxrdist.sampling.pipeline import SampleSettings, generate_images

    studies = [draw_study(i, args.seed) for i in range(args.samples)]
    truths = [s.acquisition for s in studies]
    chance = {name: max(Counter(getattr(t, name) for t in truths).values()) / len(truths)
              for name in ("marker", "electrodes")}
    print(f"{'images':<34}{'marker (7)':>12}{'electrodes (4)':>16}")
    print(f"{'chance (commonest class)':<34}{chance['marker']:>12.3f}{chance['electrodes']:>16.3f}")
    real = score([s.render(64) for s in studies], truths)
    print(f"{'real phantoms (the reading itself)':<34}{real['marker']:>12.3f}{real['electrodes']:>16.3f}")
    settings = SampleSettings(steps=args.steps, scheduler="dpm++", guidance=args.guidance, batch_size=32)
    for path in args.base:
        base = load_base(path)
        images = generate_images(base, [t.caption for t in truths], settings, seeds=list(range(len(truths))))
        result = score(images, truths)
        print(f"{path:<34}{result['marker']:>12.3f}{result['electrodes']:>16.3f}", flush=True)


if __name__ == "__main__":
    main()
