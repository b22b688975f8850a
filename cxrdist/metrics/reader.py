"""An analytic reader for phantom-world radiographs: measures each attribute back from pixels.

It reads real phantoms and generated images alike, so it relies on relations, not on exact values: the
image is rescaled by its own percentiles and every threshold sits between tissue levels measured in the
same image (lung, soft tissue, heart). Landmarks are found, not assumed: the thoracic walls and midline from
where the lungs end, the heart borders from where the central bright mass ends, each costophrenic region's
lowest aerated row. Everything happens at `CANONICAL_SIZE` (64 px); other sizes are resampled first.
Pure numpy, deterministic, a few hundred microseconds per image.

Sides are the patient's: on a PA image the patient's left is on the image's RIGHT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cxrdist.metrics.attributes import ALL_CLASSES, UNKNOWN

CANONICAL_SIZE = 64
SIDE_SIGN = {"left": 1.0, "right": -1.0}


@dataclass(frozen=True)
class ReaderThresholds:
    """Decision points. CTR cuts sit in the gaps between the phantom's CTR bands; the others sit between
    the distributions measured on real phantoms (see benchmarks/phantom_speed.py and the reader tests)."""

    ctr_cuts: tuple[float, float, float] = (0.49, 0.58, 0.65)  # normal | mild | moderate | severe
    effusion_base: float = 0.715  # lowest aerated lateral row above this (image fraction): effusion
    effusion_large: float = 0.60  # ... and above this: a large one
    pneumothorax: float = -0.17  # lateral-apical band darker than lung by this share of heart-lung contrast
    nodule: float = 0.20  # centre-surround response, share of heart-lung contrast (non-nodule max ~0.14)
    min_contrast: float = 0.15  # below this heart-lung contrast the image is unreadable


THRESHOLDS = ReaderThresholds()
# Fixed image regions (fractions): rows where walls / lung level are sampled, where the heart is widest...
WALL_ROWS = (0.34, 0.46)
HEART_LEVEL_ROWS = (0.50, 0.60)
HEART_ROWS = (0.48, 0.655)
# Heart border = where the image crosses this share of the lung-to-heart step. High, so that fluid beside
# the heart (about 0.4 of the step) never passes for heart; a high edge lies inside the blurred border, by
# CTR_OFFSET on average (measured on 700 real phantoms: -0.0275, sd 0.0067), which is added back.
HEART_EDGE = 0.7
CTR_OFFSET = 0.0275
EFFUSION_S = (0.83, 0.93)
EFFUSION_SCAN = (0.45, 0.92)  # rows searched for the lowest aerated lateral lung
PNEUMOTHORAX_ROWS = (0.26, 0.42)
PNEUMOTHORAX_S = (0.82, 0.93)
NODULE_ROWS = (0.17, 0.68)
NODULE_S = (0.38, 0.88)
NODULE_RING = 4  # px from a candidate centre to its four background samples
ZONE_BORDERS = (0.32, 0.515)  # the phantom's zone rows (upper | middle | lower)


def to_canonical(img: np.ndarray) -> np.ndarray:
    """2-D float in [0, 1] at the canonical size. uint8 is scaled by 255; colour is averaged to grey."""
    a = np.asarray(img)
    if a.ndim == 3:
        a = a.mean(axis=0 if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3) else -1)
    a = a.astype(np.float32) / (255.0 if np.asarray(img).dtype == np.uint8 else 1.0)
    if a.shape != (CANONICAL_SIZE, CANONICAL_SIZE):
        resized = Image.fromarray(a, mode="F").resize((CANONICAL_SIZE, CANONICAL_SIZE), Image.BILINEAR
                                                    if min(a.shape) < CANONICAL_SIZE else Image.BOX)
        a = np.asarray(resized, dtype=np.float32)
    return a


def _normalise(a: np.ndarray) -> np.ndarray:
    """Percentile rescaling: immune to the exposure, offset and gain of whoever made the image."""
    lo, hi = np.percentile(a, (1, 99))
    return np.clip((a - lo) / max(hi - lo, 1e-6), -0.2, 1.2)


def _box(a: np.ndarray, k: int) -> np.ndarray:
    """k x k mean filter (edge-padded), by cumulative sums."""
    p = k // 2
    c = np.pad(a, ((p + 1, p), (p + 1, p)), mode="edge").cumsum(0).cumsum(1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def _rows(span: tuple[float, float]) -> slice:
    return slice(int(round(span[0] * CANONICAL_SIZE)), int(round(span[1] * CANONICAL_SIZE)))


def _to_col(x: float) -> float:
    """Image fraction (x in [-0.5, 0.5]) -> column coordinate (pixel centres at integers)."""
    return (x + 0.5) * CANONICAL_SIZE - 0.5


def _to_x(col: float) -> float:
    return (col + 0.5) / CANONICAL_SIZE - 0.5


def _columns(mid: float, hw: float, side: str, s_span: tuple[float, float]) -> np.ndarray:
    """Column indices covering lateral fractions s_span of one hemithorax."""
    xs = [mid + SIDE_SIGN[side] * s * hw for s in s_span]
    lo, hi = sorted(_to_col(x) for x in xs)
    cols = np.arange(int(math.ceil(lo)), int(math.floor(hi)) + 1)
    return np.clip(cols, 0, CANONICAL_SIZE - 1)


def _crossing(profile: np.ndarray, threshold: float, start: int, step: int) -> float:
    """First position, walking from `start` by `step`, where `profile` passes `threshold` (sign given by its
    value at `start`), interpolated between pixels. Returns the far end when it never does."""
    above = profile[start] > threshold
    i = start
    while 0 <= i + step < len(profile):
        j = i + step
        if (profile[j] > threshold) != above:
            t = (threshold - profile[i]) / (profile[j] - profile[i])
            return i + step * t
        i = j
    return float(i)


@dataclass(frozen=True)
class Levels:
    lung: float
    tissue: float
    heart: float

    @property
    def contrast(self) -> float:
        return self.heart - self.lung


def _levels(a: np.ndarray) -> Levels:
    rows = a[_rows(WALL_ROWS)]
    x = _to_x(np.arange(CANONICAL_SIZE))
    lung = float(np.median(rows[:, (np.abs(x) > 0.13) & (np.abs(x) < 0.25)]))
    tissue = float(np.median(rows[:, np.abs(x) > 0.45]))
    heart = float(np.median(a[_rows(HEART_LEVEL_ROWS)][:, np.abs(x) < 0.05]))
    return Levels(lung=lung, tissue=tissue, heart=heart)


def _walls(smooth: np.ndarray, lv: Levels) -> tuple[float, float]:
    """(midline, half-width) of the thorax in image fractions, from the medians of per-row wall crossings."""
    threshold = (lv.lung + lv.tissue) / 2
    left, right = [], []
    for row in smooth[_rows(WALL_ROWS)]:
        left.append(_crossing(row, threshold, 0, 1))
        right.append(_crossing(row, threshold, CANONICAL_SIZE - 1, -1))
    xl, xr = _to_x(float(np.median(left))), _to_x(float(np.median(right)))
    return (xl + xr) / 2, max((xr - xl) / 2, 1e-3)


def _heart_borders(smooth: np.ndarray, lv: Levels, mid: float, hw: float) -> dict[str, float]:
    """Widest extent of the central dense mass on each side of the midline (image fractions). Rows where
    the mass runs into the chest wall (below the dome) do not count."""
    threshold = lv.lung + HEART_EDGE * lv.contrast
    start = int(round(_to_col(mid)))
    extent = {"left": 0.0, "right": 0.0}
    for row in smooth[_rows(HEART_ROWS)]:
        if row[start] <= threshold:
            continue
        for side in ("left", "right"):
            border = _crossing(row, threshold, start, 1 if side == "left" else -1)
            reach = abs(_to_x(border) - mid)
            if reach < 0.9 * hw:
                extent[side] = max(extent[side], reach)
    return extent


def _effusion_base(smooth: np.ndarray, lv: Levels, mid: float, hw: float, side: str) -> float:
    """Lowest row (image fraction) of aerated lung next to the lateral chest wall. Scanned upwards from
    below the diaphragm, so a nodule higher up cannot pass for fluid."""
    profile = np.median(smooth[:, _columns(mid, hw, side, EFFUSION_S)], axis=1)
    threshold = (lv.lung + lv.tissue) / 2
    top, bottom = (int(round(v * CANONICAL_SIZE)) for v in EFFUSION_SCAN)
    dark = np.nonzero(profile[top:bottom] <= threshold)[0]
    if len(dark) == 0:
        return EFFUSION_SCAN[0]
    i = top + int(dark[-1])
    t = (threshold - profile[i]) / max(profile[i + 1] - profile[i], 1e-6)
    return (i + min(max(t, 0.0), 1.0) + 0.5) / CANONICAL_SIZE


def _pneumothorax_darkness(a: np.ndarray, lv: Levels, mid: float, hw: float, side: str) -> float:
    """How much darker than lung the lateral-apical band is, per unit of heart-lung contrast (< 0: darker)."""
    band = a[_rows(PNEUMOTHORAX_ROWS)][:, _columns(mid, hw, side, PNEUMOTHORAX_S)]
    return float((np.median(band) - lv.lung) / lv.contrast)


def _shifted(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """a[i + dy, j + dx], edge-padded."""
    p = max(abs(dy), abs(dx))
    padded = np.pad(a, p, mode="edge")
    n = a.shape[0]
    return padded[p + dy: p + dy + n, p + dx: p + dx + a.shape[1]]


def _nodule(smooth: np.ndarray, lv: Levels, mid: float, hw: float) -> tuple[float, float, float]:
    """(response, x, y) of the strongest compact bright spot in the lungs. The response is the 3x3 mean
    minus the BRIGHTEST of four 3x3 means NODULE_RING px away: a disc is brighter than all four, while the
    edge of the heart, a dome, a fluid level or a rib is matched by at least one of them."""
    k = NODULE_RING
    around = np.max([_shifted(smooth, dy, dx) for dy, dx in ((k, 0), (-k, 0), (0, k), (0, -k))], axis=0)
    response = (smooth - around) / lv.contrast
    x = _to_x(np.arange(CANONICAL_SIZE))[None, :]
    y = (np.arange(CANONICAL_SIZE)[:, None] + 0.5) / CANONICAL_SIZE
    s = np.abs(x - mid) / hw
    search = (s >= NODULE_S[0]) & (s <= NODULE_S[1]) & (y >= NODULE_ROWS[0]) & (y <= NODULE_ROWS[1])
    masked = np.where(search, response, -np.inf)
    i, j = np.unravel_index(int(np.argmax(masked)), masked.shape)
    return float(masked[i, j]), float(x[0, j]), float(y[i, 0])


def measure(img: np.ndarray) -> dict[str, float]:
    """Raw measurements: ctr, thorax midline / half-width, heart extent per side, lateral aerated base per
    side, pneumothorax band darkness per side, nodule response and position, heart-lung contrast."""
    a = _normalise(to_canonical(img))
    smooth = _box(a, 3)
    lv = _levels(smooth)
    m: dict[str, float] = {"contrast": lv.contrast}
    if lv.contrast < THRESHOLDS.min_contrast:
        return m
    mid, hw = _walls(smooth, lv)
    heart = _heart_borders(smooth, lv, mid, hw)
    m.update(midline=mid, half_width=hw, heart_left=heart["left"], heart_right=heart["right"],
             ctr=(heart["left"] + heart["right"]) / (2 * hw) + CTR_OFFSET)
    for side in ("left", "right"):
        m[f"effusion_base_{side}"] = _effusion_base(smooth, lv, mid, hw, side)
        m[f"pneumothorax_{side}"] = _pneumothorax_darkness(a, lv, mid, hw, side)
    m["nodule_response"], m["nodule_x"], m["nodule_y"] = _nodule(smooth, lv, mid, hw)
    return m


def _grade(value: float, cuts: tuple[float, ...], classes: tuple[str, ...]) -> str:
    return classes[sum(value > c for c in cuts)]


def _nodule_class(m: dict[str, float], t: ReaderThresholds) -> str:
    if m["nodule_response"] < t.nodule:
        return "none"
    side = "left" if m["nodule_x"] > m["midline"] else "right"
    return f"{side} {_grade(m['nodule_y'], ZONE_BORDERS, ('upper', 'middle', 'lower'))}"


def classify(m: dict[str, float], t: ReaderThresholds = THRESHOLDS) -> dict[str, str]:
    """Attribute classes from `measure`'s output; every attribute is UNKNOWN for an unreadable image."""
    if "ctr" not in m:
        return {name: UNKNOWN for name in ALL_CLASSES}
    severity = _grade(m["ctr"], t.ctr_cuts, ALL_CLASSES["heart_severity"])
    out = {"heart": "normal" if severity == "normal" else "enlarged", "heart_severity": severity,
           "nodule": _nodule_class(m, t)}
    for side in ("left", "right"):
        base = m[f"effusion_base_{side}"]
        out[f"effusion_{side}"] = "yes" if base < t.effusion_base else "no"
        out[f"effusion_{side}_size"] = _grade(-base, (-t.effusion_base, -t.effusion_large), ("none", "small", "large"))
        out[f"pneumothorax_{side}"] = "yes" if m[f"pneumothorax_{side}"] < t.pneumothorax else "no"
    return out


def read_image(img: np.ndarray) -> dict[str, str]:
    """Attributes (see `cxrdist.metrics.attributes`) read from one image: 2-D, float in [0, 1] or uint8."""
    return classify(measure(img))
