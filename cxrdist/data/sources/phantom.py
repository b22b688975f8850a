"""Procedural PA chest-radiograph phantoms with reports: a miniature of the real job that runs offline.

`generate(index, size, seed)` draws one study from (seed, index) alone: findings (`phantom_reports`), a
patient's anatomy, then pixels. Geometry is drawn before any size-dependent noise, so one study is the same
patient at every `size`. All geometry is in image fractions: x in [-0.5, 0.5] from the image's left edge to
its right edge, y in [0, 1] from top to bottom. PA convention: the patient's LEFT is on the image's RIGHT
(x > midline), which is where the heart bulges and where the gastric bubble sits.

Every finding has a large geometric signature that survives 64 px and an imperfect generator:
cardiomegaly = heart width / thorax width in separated bands; effusion = an opaque meniscus filling the
costophrenic region (small: up to about the dome top, large: far above it, hiding the hemidiaphragm);
pneumothorax = an air-dark band without lung markings along the apex and lateral wall, with a pleural line;
nodule = a bright disc of 5-6 px (at 64 px) in one of six zones (thirds of the lung height, apex to dome).
Acquisition details the faithfulness score does not read (`phantom_acquisition`: a side marker at the image
edge, ECG electrodes above the shoulders, the exposure) stay outside every region the reader measures.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any, Iterator, Optional

import numpy as np

from cxrdist.data.sources.base import Record
from cxrdist.data.sources.phantom_acquisition import Acquisition, sample_acquisition
from cxrdist.data.sources.phantom_reports import (
    CTR_RANGES,
    ZONES,
    Findings,
    compose_report,
    findings_labels,
    sample_findings,
)
from cxrdist.errors import InputError

SIDE_SIGN = {"left": 1.0, "right": -1.0}  # patient side -> direction on the image (PA film)

# Densities before exposure: what a pixel shows when a structure fills it.
DENSITY = {
    "air": 0.03, "lung": 0.22, "soft_tissue": 0.50, "heart": 0.68, "abdomen": 0.66, "fluid": 0.40,
    "pneumothorax": 0.06, "rib": 0.07, "clavicle": 0.12, "nodule": 0.30, "pleural_line": 0.14, "hilum": 0.06,
}
HEART_SHIFT = 0.10  # heart centre sits 0.1 half-widths to the patient's left: ~55% of it left of midline
PTX_WIDTH = 0.22  # pneumothorax band, in fractions of the hemithorax half-width
EFFUSION_SHAPE = {"small": (0.0, 0.08), "large": (-0.05, 0.17)}  # (level vs dome top, rise at the wall)
NODULE_S_RANGE = (0.40, 0.86)  # lateral fraction of the hemithorax where nodule centres are placed
# Zone borders (image rows). Anatomy varies by about +-2% of the image height, so the thirds of each lung
# (apex to dome) fall within a pixel of these fixed rows; a reader needs no landmark to name a zone.
ZONE_BORDERS = (0.32, 0.515)
ZONE_MARGIN = 0.03  # nodule centres stay this far from a zone border
PLACEMENT_TRIES = 40  # random candidate centres per zone, tested at once
NODULE_CLEARANCE = 0.03  # free lung around a nodule's edge: keeps its local background pure lung
# Acquisition details, placed where `cxrdist.metrics.reader` reads no finding: the marker in the outer 3 px
# columns (beyond every thorax), electrodes above the apex. The marker's levels are the middles of the lung
# zones' rows (apex to 0.32, to 0.515, to the dome), so "upper" or "lower" means the same height in a
# caption about a marker as in a report about the lungs.
METAL = 0.95
MARKER_X, MARKER_HALF = 0.467, (0.025, 0.03)  # centre |x|; half width, half height
MARKER_Y = {"upper": 0.22, "middle": 0.42, "lower": 0.61}
ELECTRODE_X, ELECTRODE_Y, ELECTRODE_R = 0.30, 0.055, 0.03
EXPOSURE_SHIFT = {"under": 0.06, "normal": 0.0, "over": -0.06}  # under-exposed films are lighter


@dataclass(frozen=True)
class Anatomy:
    """One patient, in image fractions. `dome_*` is the top of each hemidiaphragm, `cp_*` the costophrenic
    angle (lowest lateral lung point). Right/left are the patient's."""

    midline: float
    half_width: float  # internal thoracic half-width (rib margin to midline), constant below the apex curve
    apex: float
    dome_right: float
    dome_left: float
    cp_depth: float  # how far the costophrenic angles lie below the dome tops
    ctr: float
    heart_cy: float
    heart_b: float  # vertical semi-axis
    mediastinum: float  # half-width of the upper mediastinum
    rib_spacing: float
    rib_phase: float

    @property
    def heart_a(self) -> float:
        return self.ctr * self.half_width

    @property
    def heart_cx(self) -> float:
        return self.midline + HEART_SHIFT * self.heart_a

    def dome(self, side: str) -> float:
        return self.dome_left if side == "left" else self.dome_right


@dataclass(frozen=True)
class Exposure:
    tone: float  # curvature of the response, d + tone * d * (1 - d): a cheap gamma
    contrast: float
    brightness: float
    noise: float


def sample_anatomy(rng: np.random.Generator, findings: Findings) -> Anatomy:
    """A patient: a thorax of random proportions, the heart size its findings call for."""
    lo, hi = CTR_RANGES[findings.severity or "normal"]
    ctr = rng.uniform(lo, hi)
    half_width = rng.uniform(0.355, 0.40)
    apex = rng.uniform(0.10, 0.14)
    dome_right = rng.uniform(0.68, 0.71)  # the right hemidiaphragm usually sits higher
    dome_left = dome_right + rng.uniform(0.01, 0.025)
    a = ctr * half_width
    return Anatomy(
        midline=rng.uniform(-0.015, 0.015), half_width=half_width, apex=apex, dome_right=dome_right,
        dome_left=dome_left, cp_depth=rng.uniform(0.11, 0.14), ctr=ctr,
        heart_cy=dome_right - rng.uniform(0.05, 0.065), heart_b=0.5 * a + rng.uniform(0.03, 0.045),
        mediastinum=rng.uniform(0.055, 0.07), rib_spacing=rng.uniform(0.07, 0.085), rib_phase=rng.uniform(0, 1),
    )


def sample_exposure(rng: np.random.Generator) -> Exposure:
    return Exposure(tone=rng.uniform(-0.2, 0.2), contrast=rng.uniform(0.9, 1.15),
                    brightness=rng.uniform(-0.04, 0.04), noise=rng.uniform(0.006, 0.02))


# ------------------------------------------------------------------------------------------- geometry
def wall_fraction(anat: Anatomy, y: np.ndarray) -> np.ndarray:
    """Thoracic half-width at height y as a fraction of `half_width`: a rounded apex, then straight walls
    (straight so that the widest internal diameter is measurable anywhere in the mid thorax)."""
    top = 0.26
    t = np.minimum(np.maximum((anat.apex + top - y) * (1 / top), 0.0), 1.0)
    return np.where(y < anat.apex, 0.0, (1.0 - t**2.5) ** 0.4)


def dome_height(anat: Anatomy, side: str, s: np.ndarray) -> np.ndarray:
    """y of the hemidiaphragm at lateral fraction s: top at s = 0.4, steep to the costophrenic angle."""
    top = anat.dome(side)
    lateral = np.maximum((s - 0.4) / 0.6, 0)
    medial = np.maximum((0.4 - s) / 0.4, 0)
    return top + anat.cp_depth * lateral**2 + 0.05 * medial**2


def meniscus_height(anat: Anatomy, side: str, size: str, s: np.ndarray) -> np.ndarray:
    """Upper surface of an effusion: flat medially, climbing the lateral chest wall."""
    level, rise = EFFUSION_SHAPE[size]
    return anat.dome(side) + level - rise * np.minimum(np.maximum((s - 0.3) / 0.7, 0), 1) ** 1.5


def pneumothorax_width(anat: Anatomy, y: np.ndarray) -> np.ndarray:
    """Band width (fraction of half-width) at height y: full over the upper lung, tapering to 0 mid-chest."""
    full_until, gone_at = anat.apex + 0.25, anat.apex + 0.45
    return PTX_WIDTH * np.minimum(np.maximum((gone_at - y) / (gone_at - full_until), 0), 1)


def free_lung(anat: Anatomy, f: Findings, side: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which points (x, y) lie in aerated lung of `side`, away from every other structure."""
    s = SIDE_SIGN[side] * (x - anat.midline) / anat.half_width
    heart = ((x - anat.heart_cx) / anat.heart_a) ** 2 + ((y - anat.heart_cy) / anat.heart_b) ** 2 <= 1
    mediastinum = (np.abs(x - anat.midline) < anat.mediastinum) & (y < anat.heart_cy)
    knob = (x - anat.midline - anat.mediastinum) ** 2 + (y - anat.apex - 0.2) ** 2 < 0.035**2
    hilum = (np.abs(x - anat.midline) - anat.mediastinum - 0.03) ** 2 + (y - anat.apex - 0.28) ** 2 < 0.04**2
    free = (s > 0) & (s < wall_fraction(anat, y)) & (y < dome_height(anat, side, s)) & (y > anat.apex)
    free &= ~(heart | mediastinum | knob | hilum)
    if f.pneumothorax(side):
        free &= s < wall_fraction(anat, y) - pneumothorax_width(anat, y)
    if f.effusion(side):
        free &= y < meniscus_height(anat, side, f.effusion(side), s)
    return free


_RING = np.exp(2j * np.pi * np.arange(16) / 16)


def nodule_fits(anat: Anatomy, f: Findings, side: str, x, y, r: float) -> np.ndarray:
    """For candidate centres (x, y): does a nodule of radius r, plus NODULE_CLEARANCE all round, lie in free
    lung? Then it is visible, its local background is plain lung, and it is read in its centre's zone."""
    centres = np.atleast_1d(x) + 1j * np.atleast_1d(y)
    points = np.concatenate([centres[:, None], centres[:, None] + (r + NODULE_CLEARANCE) * _RING], axis=1)
    return free_lung(anat, f, side, points.real, points.imag).all(axis=1)


def zone_rows(anat: Anatomy, side: str, zone: str) -> tuple[float, float]:
    """The y range of a zone: about the thirds of the lung height from apex to dome top."""
    edges = (anat.apex, *ZONE_BORDERS, anat.dome(side))
    k = ZONES.index(zone)
    return edges[k], edges[k + 1]


def place_nodule(rng: np.random.Generator, anat: Anatomy, f: Findings) -> tuple[Findings, dict[str, float]]:
    """Centre and radius for the findings' nodule. A zone with no room (e.g. the left base beside a severe
    heart) moves the nodule to another zone, and the findings say so before any report is written."""
    if not f.nodule_side:
        return f, {}
    r = rng.uniform(0.034, 0.042)
    zones = [f.nodule_zone] + [z for z in rng.permutation(ZONES).tolist() if z != f.nodule_zone]
    for zone in zones:
        top, bottom = zone_rows(anat, f.nodule_side, zone)
        ys = rng.uniform(top + ZONE_MARGIN, bottom - ZONE_MARGIN, size=PLACEMENT_TRIES)
        xs = anat.midline + SIDE_SIGN[f.nodule_side] * anat.half_width * rng.uniform(*NODULE_S_RANGE, size=PLACEMENT_TRIES)
        fits = np.flatnonzero(nodule_fits(anat, f, f.nodule_side, xs, ys, r))
        if len(fits):
            return replace(f, nodule_zone=zone), {"x": float(xs[fits[0]]), "y": float(ys[fits[0]]), "r": r}
    return replace(f, nodule_side="", nodule_zone=""), {}


# ------------------------------------------------------------------------------------------- drawing
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return (c - 0.5)[None, :], c[:, None]


@lru_cache(maxsize=16)
def _upsampler(n: int, size: int) -> np.ndarray:
    """(size, n) bilinear interpolation matrix: smooth fields are drawn coarse and upsampled by matmul."""
    pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((size, n), dtype=np.float32)
    m[np.arange(size), lo] += 1 - w
    m[np.arange(size), hi] += w
    return m


def _soft(distance: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased inside-mask from a signed distance (image fractions, positive inside): a 1.5 px ramp.
    (Two in-place ufuncs instead of np.clip, whose Python wrapper costs more than the work at 64 px.)"""
    m = distance * (size / 1.5) + 0.5
    np.maximum(m, 0.0, out=m)
    return np.minimum(m, 1.0, out=m)


def _lung_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Lung markings: smooth noise at two scales (8 and 16 cells), summed at 16 and upsampled once."""
    up8, up16 = _upsampler(8, 16), _upsampler(16, size)
    coarse = up8 @ rng.standard_normal((8, 8), dtype=np.float32) @ up8.T
    field = 0.035 * coarse + 0.02 * rng.standard_normal((16, 16), dtype=np.float32)
    return up16 @ field @ up16.T


def _span(lo: float, hi: float, size: int) -> slice:
    """Pixel rows (or columns) covering image fractions [lo, hi]: most structures are drawn in a box."""
    return slice(max(0, int(lo * size) - 1), min(size, int(hi * size) + 2))


def _xspan(lo: float, hi: float, size: int) -> slice:
    return _span(lo + 0.5, hi + 0.5, size)


def render(anat: Anatomy, f: Findings, nodule: dict[str, float], exposure: Exposure,
           rng: np.random.Generator, size: int, acquisition: Acquisition | None = None) -> np.ndarray:
    """Pixels, float32 in [0, 1]: body, lungs and abdomen, pleural findings, ribs, mediastinum and heart,
    clavicles, nodule, acquisition details, then exposure and noise. Each layer replaces (`_mix`) or adds to
    what lies under it."""
    x, y = _grid(size)
    dx = x - anat.midline
    s = np.abs(dx) / anat.half_width  # (1, size): lateral fraction of the hemithorax
    left = dx > 0  # patient's left = image right
    d = np.full((size, size), DENSITY["soft_tissue"], dtype=np.float32)
    _draw_air_above_shoulders(d, anat, dx, y, size)
    dome = np.where(left, dome_height(anat, "left", s), dome_height(anat, "right", s))  # (1, size)
    thorax = _soft(wall_fraction(anat, y) * anat.half_width - np.abs(dx), size)
    aerated = _soft(dome - y, size)  # above the diaphragm
    # inside the thorax: textured lung above the diaphragm, abdomen below (in place: this is the hot path)
    inside = _lung_texture(rng, size)
    inside *= 1 - 0.5 * np.minimum(s, 1)  # markings fade towards the periphery
    inside += DENSITY["lung"] - DENSITY["abdomen"]
    inside *= aerated
    inside += DENSITY["abdomen"] - d
    inside *= thorax
    d += inside
    _draw_gastric_bubble(d, anat, x, y, size)
    for side in ("left", "right"):
        on_side = left if side == "left" else ~left
        if f.pneumothorax(side):
            _draw_pneumothorax(d, anat, on_side, s, y, size)
        if f.effusion(side):
            _draw_effusion(d, anat, side, f.effusion(side), on_side, s, y, thorax, aerated, size)
    rows = _span(anat.apex, max(anat.dome_left, anat.dome_right) + anat.cp_depth + 0.03, size)
    d[rows] += thorax[rows] * _soft(dome + 0.02 - y[rows], size) * _ribs(anat, s, y[rows])  # under the heart
    _draw_mediastinum(d, anat, x, y, size)
    _draw_clavicles(d, anat, dx, y, size)
    if nodule:
        _draw_disc(d, nodule["x"], nodule["y"], nodule["r"], DENSITY["nodule"], x, y, size)
    if acquisition is not None:
        _draw_acquisition(d, anat, acquisition, x, y, size)
        exposure = replace(exposure, brightness=exposure.brightness + EXPOSURE_SHIFT[acquisition.exposure])
    return _expose(d, exposure, rng)


def _mix(d: np.ndarray, rows: slice, cols: slice, mask: np.ndarray, value: float) -> None:
    d[rows, cols] += mask * (value - d[rows, cols])


def _draw_air_above_shoulders(d: np.ndarray, anat: Anatomy, dx, y, size: int) -> None:
    rows = _span(0, anat.apex + 0.02, size)
    shoulders = anat.apex - 0.03 + 0.25 * np.maximum(np.abs(dx) - 0.1, 0) ** 2
    _mix(d, rows, slice(None), _soft(shoulders - y[rows], size) * _soft(np.abs(dx) - 0.1, size), DENSITY["air"])


def _draw_gastric_bubble(d: np.ndarray, anat: Anatomy, x, y, size: int) -> None:
    """Gas under the LEFT hemidiaphragm (image right): the everyday clue that a film is not flipped."""
    cx, cy = anat.midline + 0.45 * anat.half_width, anat.dome_left + 0.07
    rows, cols = _span(cy - 0.04, cy + 0.04, size), _xspan(cx - 0.065, cx + 0.065, size)
    r = np.sqrt(((x[:, cols] - cx) / 0.06) ** 2 + ((y[rows] - cy) / 0.035) ** 2)
    d[rows, cols] -= 0.25 * _soft(0.035 * (1 - r), size)


def _draw_effusion(d, anat: Anatomy, side: str, size_class: str, on_side, s, y, thorax, aerated, size) -> None:
    """Fluid fills aerated lung below the meniscus. It is less dense than the heart, so the heart border
    and the dome stay visible through it and the heart can still be measured beside a large effusion."""
    men = meniscus_height(anat, side, size_class, s)  # (1, size)
    rows = _span(float(men[on_side].min()) - 0.02, anat.dome(side) + anat.cp_depth + 0.03, size)
    mask = on_side * thorax[rows] * _soft(y[rows] - men, size) * aerated[rows]
    _mix(d, rows, slice(None), mask, DENSITY["fluid"])


def _draw_pneumothorax(d, anat: Anatomy, on_side, s, y, size: int) -> None:
    """Air between the chest wall and a collapsed lung edge; the edge itself is a thin pleural line."""
    rows = _span(anat.apex - 0.02, anat.apex + 0.47, size)
    yr, hw = y[rows], anat.half_width
    wall = wall_fraction(anat, yr)
    collapsed = (wall - pneumothorax_width(anat, yr)) * hw - s * hw  # > 0 inside the collapsed lung
    band = on_side * _soft(wall * hw - s * hw, size) * _soft(-collapsed, size) * (yr < anat.apex + 0.46)
    line = on_side * _soft(0.6 / size - np.abs(collapsed), size) * ((yr < anat.apex + 0.42) & (yr > anat.apex))
    _mix(d, rows, slice(None), band, DENSITY["pneumothorax"])
    d[rows] += DENSITY["pleural_line"] * line


def _draw_mediastinum(d, anat: Anatomy, x, y, size: int) -> None:
    """Upper mediastinum (trachea, aortic knob, hila) and the heart, an ellipse sitting on the diaphragm."""
    a, b, cx, cy = anat.heart_a, anat.heart_b, anat.heart_cx, anat.heart_cy
    rows, cols = _span(cy - b - 0.02, cy + b + 0.02, size), _xspan(cx - a - 0.02, cx + a + 0.02, size)
    r = np.sqrt(((x[:, cols] - cx) / a) ** 2 + ((y[rows] - cy) / b) ** 2)
    # (1 - r) * a is the true distance at the left and right extremes, where the CTR is measured.
    _mix(d, rows, cols, _soft((1 - r) * a, size), DENSITY["heart"])
    cols = _xspan(anat.midline - anat.mediastinum - 0.02, anat.midline + anat.mediastinum + 0.02, size)
    rows = slice(0, int(cy * size))
    _mix(d, rows, cols, _soft(anat.mediastinum - np.abs(x[:, cols] - anat.midline), size), DENSITY["heart"])
    knob = (anat.midline + anat.mediastinum + 0.005, anat.apex + 0.2)
    _draw_disc(d, *knob, 0.03, DENSITY["heart"], x, y, size, replace=True)
    rows, cols = _span(anat.apex - 0.1, anat.apex + 0.2, size), _xspan(anat.midline - 0.03, anat.midline + 0.03, size)
    d[rows, cols] -= 0.22 * _soft(0.014 - np.abs(x[:, cols] - anat.midline), size)  # trachea
    hy = anat.apex + 0.28
    rows = _span(hy - 0.08, hy + 0.08, size)
    gy = np.exp(-((y[rows] - hy) ** 2) / 0.0008)
    for sign in (-1, 1):  # hila: separable Gaussians, an outer product in a box
        hx = anat.midline + sign * (anat.mediastinum + 0.03)
        cols = _xspan(hx - 0.08, hx + 0.08, size)
        d[rows, cols] += DENSITY["hilum"] * (gy * np.exp(-((x[:, cols] - hx) ** 2) / 0.0008))


def _draw_disc(d, cx: float, cy: float, r: float, value: float, x, y, size: int, replace: bool = False) -> None:
    rows, cols = _span(cy - r - 0.02, cy + r + 0.02, size), _xspan(cx - r - 0.02, cx + r + 0.02, size)
    disc = _soft(r - np.sqrt((x[:, cols] - cx) ** 2 + (y[rows] - cy) ** 2), size)
    if replace:
        _mix(d, rows, cols, disc, value)
    else:
        d[rows, cols] += value * disc


def _ribs(anat: Anatomy, s, y) -> np.ndarray:
    """Posterior ribs: faint bands drooping laterally, periodic in height."""
    k = 2 * np.pi / anat.rib_spacing
    phase = (k * (y - anat.apex) + 2 * np.pi * anat.rib_phase) - (0.09 * k) * np.minimum(s, 1.2) ** 1.8
    band = np.cos(phase, out=phase)
    band *= 1.6 * DENSITY["rib"]
    band -= 0.6 * DENSITY["rib"]
    np.maximum(band, 0, out=band)
    return np.minimum(band, DENSITY["rib"], out=band)


def _draw_clavicles(d, anat: Anatomy, dx, y, size: int) -> None:
    rows = _span(anat.apex - 0.02, anat.apex + 0.07, size)
    centre = anat.apex + 0.05 - 0.05 * np.abs(dx) / anat.half_width
    along = _soft(0.33 - np.abs(dx), size) * _soft(np.abs(dx) - 0.04, size)
    d[rows] += DENSITY["clavicle"] * along * _soft(0.011 - np.abs(y[rows] - centre), size)


def _draw_acquisition(d, anat: Anatomy, acq: Acquisition, x, y, size: int) -> None:
    """A side marker (a metal block at the image edge) and ECG electrodes (metal discs above the shoulders)."""
    if acq.marker != "none":
        side, level = acq.marker.split()
        cx, cy, (hx, hy) = SIDE_SIGN[side] * MARKER_X, MARKER_Y[level], MARKER_HALF
        rows, cols = _span(cy - hy, cy + hy, size), _xspan(cx - hx, cx + hx, size)
        block = _soft(hx - np.abs(x[:, cols] - cx), size) * _soft(hy - np.abs(y[rows] - cy), size)
        _mix(d, rows, cols, block, METAL)
    for side in acq.electrode_sides():
        _draw_disc(d, anat.midline + SIDE_SIGN[side] * ELECTRODE_X, ELECTRODE_Y, ELECTRODE_R, METAL, x, y, size,
                   replace=True)


def _expose(d: np.ndarray, e: Exposure, rng: np.random.Generator) -> np.ndarray:
    np.maximum(d, 0, out=d)
    np.minimum(d, 1, out=d)
    img = d * (e.contrast * (1 + e.tone)) - (e.contrast * e.tone) * (d * d)
    img += e.brightness + e.noise * rng.standard_normal(d.shape, dtype=np.float32)
    np.maximum(img, 0, out=img)
    return np.minimum(img, 1, out=img)


# ------------------------------------------------------------------------------------------- study
def study_rng(index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, 0x50A7])


def findings_attributes(f: Findings) -> dict[str, str]:
    """The faithfulness attributes (`cxrdist.metrics.attributes`) of a study, straight from its truth."""
    attrs = {
        "heart": "enlarged" if f.severity else "normal",
        "heart_severity": f.severity or "normal",
        "nodule": f"{f.nodule_side} {f.nodule_zone}" if f.nodule_side else "none",
    }
    for side in ("left", "right"):
        attrs[f"effusion_{side}"] = "yes" if f.effusion(side) else "no"
        attrs[f"effusion_{side}_size"] = f.effusion(side) or "none"
        attrs[f"pneumothorax_{side}"] = "yes" if f.pneumothorax(side) else "no"
    return attrs


@dataclass(frozen=True)
class Study:
    """Everything about one study except its pixels. `rng` continues the study's stream: rendering draws
    the lung texture and noise from it, so a study renders identically wherever it is rendered."""

    index: int
    seed: int
    findings: Findings
    anatomy: Anatomy
    nodule: dict[str, float]
    exposure: Exposure
    report: str
    rng: np.random.Generator
    acquisition: Acquisition

    @property
    def labels(self) -> list[str]:
        return findings_labels(self.findings)

    @property
    def attributes(self) -> dict[str, str]:
        return findings_attributes(self.findings)

    def geometry(self) -> dict[str, Any]:
        """JSON-serialisable truth: findings, attributes, anatomy, nodule, exposure (floats rounded)."""
        as_floats = lambda d: {k: round(float(v), 5) for k, v in d.items()}  # noqa: E731
        return {
            "index": self.index, "seed": self.seed, "findings": self.findings.to_dict(),
            "attributes": self.attributes, "anatomy": as_floats(asdict(self.anatomy)),
            "nodule": as_floats(self.nodule), "exposure": as_floats(asdict(self.exposure)),
            "acquisition": self.acquisition.to_dict(),
        }

    def render(self, size: int = 64) -> np.ndarray:
        """Pixels; call once per Study object (it consumes the stream)."""
        return render(self.anatomy, self.findings, self.nodule, self.exposure, self.rng, size, self.acquisition)


def draw_study(index: int, seed: int = 0) -> Study:
    """Study `index` of the set `seed`: findings, then anatomy, nodule, exposure, report - in that order,
    independent of the image size, so one study is the same patient at every size. The acquisition details
    come from a stream of their own."""
    rng = study_rng(index, seed)
    findings = sample_findings(rng)
    anat = sample_anatomy(rng, findings)
    findings, nodule = place_nodule(rng, anat, findings)
    exposure = sample_exposure(rng)
    return Study(index, seed, findings, anat, nodule, exposure, compose_report(findings, rng), rng,
                 sample_acquisition(index, seed))


def generate(index: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, str, list[str], dict[str, str]]:
    """(image float32 [size, size] in [0, 1], report, labels, attributes) of study `index`."""
    study = draw_study(index, seed)
    return study.render(size), study.report, study.labels, study.attributes


class PhantomSource:
    """`Source` of `n` phantom studies, one PA image per patient; pixels are regenerated in `load`."""

    name = "phantom"

    def __init__(self, n: int, size: int = 64, seed: int = 0) -> None:
        # InputError, not ValueError: `cxrdist shard phantom` prints it as one line naming the flag.
        if n < 1:
            raise InputError(f"--n must be >= 1 phantoms (got {n})")
        if size < 16:
            raise InputError(f"--size must be >= 16 px for phantoms, whose anatomy needs room (got {size})")
        self.n, self.size, self.seed = n, size, seed

    def records(self) -> Iterator[Record]:
        for index in range(self.n):
            study = draw_study(index, self.seed)
            yield Record(
                uid=f"phantom-{index:06d}", group=f"phantom-patient-{index:06d}", prompt=study.report,
                labels=study.labels, view="PA", source=self.name,
                source_path=f"phantom:seed={self.seed}:index={index}:size={self.size}",
                extra={"phantom": study.geometry()},
            )

    def load(self, record: Record, fit: Optional[tuple[int, str]] = None) -> np.ndarray:
        # fit is ignored: a phantom is drawn at its own size, there is no large file to decode smaller
        index = int(record.extra["phantom"]["index"]) if record.extra else int(record.uid.rsplit("-", 1)[1])
        return draw_study(index, self.seed).render(self.size)

    def rejected(self) -> list[tuple[str, str, str]]:
        return []
