"""Pixel metrics between generated and reference images: MSE, SSIM, PSNR, and within-prompt diversity.

Every metric works on values in [0, 1] with `data_range=1.0` stated explicitly (the project this grew from
computed SSIM/PSNR with the wrong range). Images in [-1, 1] (VAE / diffusion space) are accepted only when
the caller says so with `value_range=(-1, 1)`; the range is never guessed, and values outside the declared
range raise an error instead of being silently clipped.
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence, Union

import numpy as np
import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[np.ndarray]]
DATA_RANGE = 1.0
RANGE_TOLERANCE = 1e-3  # float noise allowed outside the declared range
MS_SSIM_MIN_SIDE = 161  # 5 scales of an 11-px window need a side > (11 - 1) * 2**4 = 160


def to_unit_batch(images: ArrayLike, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """(N, C, H, W) float32 tensor in [0, 1] from (H, W), (N, H, W), (N, C, H, W) or a list of 2-D arrays.
    uint8 input is read as 0..255 whatever `value_range` says."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(i) for i in images])
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if t.dtype == torch.uint8:
        t, value_range = t.float() / 255.0, (0.0, 1.0)
    t = t.detach().to(torch.float32).cpu()
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4:
        raise ValueError(f"expected (H, W), (N, H, W) or (N, C, H, W) images, got shape {tuple(t.shape)}")
    lo, hi = value_range
    if t.numel() and (t.min() < lo - RANGE_TOLERANCE or t.max() > hi + RANGE_TOLERANCE):
        raise ValueError(f"image values span [{t.min():.3f}, {t.max():.3f}], outside the declared value_range "
                         f"{value_range}; pass the right value_range (e.g. (-1, 1) for VAE space)")
    return ((t - lo) / (hi - lo)).clamp(0.0, 1.0)


def image_metrics(generated: ArrayLike, reference: ArrayLike,
                  value_range: tuple[float, float] = (0.0, 1.0)) -> dict[str, float]:
    """Mean over image pairs of MSE, SSIM (11-px Gaussian window) and PSNR (dB), all on [0, 1] with
    data_range=1.0, each with the standard error of its mean over the pairs (`*_se`; None for one pair). PSNR
    is computed per image then averaged; identical pairs are capped at 100 dB."""
    g, r = to_unit_batch(generated, value_range), to_unit_batch(reference, value_range)
    if g.shape != r.shape:
        raise ValueError(f"generated {tuple(g.shape)} and reference {tuple(r.shape)} differ in shape")
    mse = ((g - r) ** 2).mean(dim=(1, 2, 3))
    psnr = peak_signal_noise_ratio(g, r, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(g, r, data_range=DATA_RANGE, reduction="none")
    per_pair = {"mse": mse, "ssim": ssim, "psnr": torch.nan_to_num(psnr, posinf=100.0).clamp(max=100.0)}
    out: dict[str, float | None] = {}
    for name, values in per_pair.items():
        out[name] = float(values.mean())
        out[f"{name}_se"] = standard_error(values.double().numpy())
    return out


def standard_error(values: np.ndarray) -> float | None:
    """Standard error of the mean (sample standard deviation / sqrt(n)); None below two values."""
    values = np.asarray(values, dtype=np.float64).ravel()
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) >= 2 else None


def diversity(images: ArrayLike, value_range: tuple[float, float] = (0.0, 1.0), measure: str = "auto") -> float:
    """Mean pairwise similarity of several images generated from ONE prompt (different seeds): lower means
    more diverse; 1.0 means identical images. `measure` "auto" uses MS-SSIM when both sides are at least
    161 px and plain SSIM otherwise (MS-SSIM's five scales do not fit in 64 px)."""
    batch = to_unit_batch(images, value_range)
    if len(batch) < 2:
        raise ValueError("diversity needs at least two images of the same prompt")
    side = min(batch.shape[-2:])
    if measure == "auto":
        measure = "ms_ssim" if side >= MS_SSIM_MIN_SIDE else "ssim"
    if measure not in ("ssim", "ms_ssim"):
        raise ValueError(f"measure must be 'auto', 'ssim' or 'ms_ssim', not {measure!r}")
    pairs = list(combinations(range(len(batch)), 2))
    a = batch[[i for i, _ in pairs]]
    b = batch[[j for _, j in pairs]]
    if measure == "ms_ssim":
        return float(multiscale_structural_similarity_index_measure(a, b, data_range=DATA_RANGE))
    return float(structural_similarity_index_measure(a, b, data_range=DATA_RANGE))
