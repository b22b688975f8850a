"""Memorization audit: is a generated image a near-copy of a training radiograph?

For every generated image: its nearest training images by feature cosine (the `candidates` closest), then,
among those, the one with the highest pixel SSIM. The image is flagged when that SSIM is above a threshold.

Training images are compared as the model's VAE draws them (encoded and decoded, see `AuditSide.build`), and so are
the held-out images that calibrate the threshold: a sample is a decoded latent, so a perfect copy of a training
image is its decoded latent, not the original. Compared with originals, the VAE's own loss hides copies: on the
phantoms a VAE round trip keeps SSIM 0.86 of the original while an unrelated phantom comes to 0.79, and a
memorizing LoRA's copies (median SSIM 0.997 to the drawn training image) passed for unseen images.

The threshold is calibrated on the data itself, not chosen by hand: held-out real images of the same
split are by construction not copies of training images, so the `quantile` (default 0.99) of THEIR nearest-
training SSIM is where "as close as an unrelated patient's radiograph gets" ends. A text-blind or well-
generalising model is then flagged at about 1 - quantile of its images, a model that reproduces training
images at far more. `memorization.nearest` keeps the closest pairs for the report's contact sheet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cxrdist.metrics.features import image_batch

CANDIDATES = 8
QUANTILE = 0.99
KEEP_NEAREST = 16  # pairs listed in the result and drawn on the contact sheet
SSIM_BATCH = 256


def _unit(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.double(), dim=1)


def nearest_candidates(query: torch.Tensor, pool: torch.Tensor, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosines, indices) of the `candidates` pool rows with the highest cosine to each query row."""
    sims = _unit(query) @ _unit(pool).T
    k = min(candidates, pool.shape[0])
    return sims.topk(k, dim=1)


def pairwise_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of a[i] with b[i] (images (N, 1, H, W) in [0, 1]), one value per pair."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    out = []
    for i in range(0, len(a), SSIM_BATCH):
        out.append(structural_similarity_index_measure(a[i : i + SSIM_BATCH].float(), b[i : i + SSIM_BATCH].float(),
                                                       data_range=1.0, reduction="none"))
    return torch.cat(out) if out else torch.zeros(0)


def nearest_training(images: torch.Tensor, features: torch.Tensor, pool_images: torch.Tensor,
                     pool_features: torch.Tensor, candidates: int = CANDIDATES) -> dict[str, torch.Tensor]:
    """For each image: the index of its nearest training image (highest SSIM among the feature candidates),
    that SSIM, and the feature cosine to it."""
    cosines, idx = nearest_candidates(features, pool_features, candidates)
    n, k = idx.shape
    ssim = pairwise_ssim(images.repeat_interleave(k, dim=0), pool_images[idx.reshape(-1)]).reshape(n, k)
    best = ssim.argmax(dim=1)
    rows = torch.arange(n)
    return {"index": idx[rows, best], "ssim": ssim[rows, best].double(), "cosine": cosines[rows, best]}


@dataclass
class AuditSide:
    """The real side of the audit, computed once per VAE: the training pool as drawn (the (N, 1, H, W) batch
    searched), its features, and the nearest-training results of the drawn held-out images (the calibration)."""

    pool: torch.Tensor
    pool_features: torch.Tensor
    heldout: dict[str, torch.Tensor]

    @classmethod
    def build(cls, extractor: Callable[[torch.Tensor], torch.Tensor], heldout: np.ndarray, pool: np.ndarray,
              draw: Callable[[np.ndarray], np.ndarray]) -> "AuditSide":
        """`heldout` / `pool`: (N, H, W) images in [0, 1]; `draw`: the model's VAE round trip (sampling.as_drawn)."""
        pool_batch, heldout_batch = image_batch(draw(pool)), image_batch(draw(heldout))
        pool_features = extractor(pool_batch)
        return cls(pool_batch, pool_features,
                   nearest_training(heldout_batch, extractor(heldout_batch), pool_batch, pool_features))

    def nearest(self, generated: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return nearest_training(generated, features, self.pool, self.pool_features)


def calibrated_threshold(heldout_ssim: torch.Tensor, quantile: float = QUANTILE) -> float:
    if not 0.5 <= quantile < 1:
        raise ValueError(f"the memorization quantile must be in [0.5, 1), not {quantile}")
    if len(heldout_ssim) < 2:
        raise ValueError("the memorization audit needs at least 2 held-out real images to calibrate its threshold")
    return float(torch.quantile(heldout_ssim.double(), quantile))


def memorization_audit(generated: dict[str, torch.Tensor], heldout: dict[str, torch.Tensor],
                       quantile: float = QUANTILE, threshold: float | None = None,
                       keep: int = KEEP_NEAREST) -> dict:
    """Flagged share of generated images and the closest pairs.

    `generated` / `heldout`: `nearest_training` results for the generated images and for the split's real
    images. `threshold` overrides the calibration (e.g. to apply one calibrated threshold to several models)."""
    if threshold is None:
        threshold = calibrated_threshold(heldout["ssim"], quantile)
    flagged = generated["ssim"] > threshold
    order = torch.argsort(generated["ssim"], descending=True)[:keep]
    nearest = [{"generated": int(i), "training": int(generated["index"][i]),
                "ssim": round(float(generated["ssim"][i]), 4), "cosine": round(float(generated["cosine"][i]), 4),
                "flagged": bool(flagged[i])} for i in order]
    n = len(flagged)
    share = float(flagged.double().mean()) if n else float("nan")
    return {
        "flagged_fraction": share,
        "flagged_fraction_se": float((share * (1 - share) / n) ** 0.5) if n else float("nan"),
        "threshold": threshold,
        "calibration": {"quantile": quantile, "heldout_images": len(heldout["ssim"]),
                        "heldout_flagged_fraction": float((heldout["ssim"] > threshold).double().mean()),
                        "heldout_median_ssim": float(heldout["ssim"].median())},
        "median_nearest_ssim": float(generated["ssim"].median()) if n else float("nan"),
        "nearest": nearest,
    }
