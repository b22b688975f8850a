"""Distribution metrics between real and generated images on one feature space: FID, KID, and precision /
recall / density / coverage (Naeem et al. 2020, k nearest neighbours).

FID and KID are torchmetrics' own (`FrechetInceptionDistance`, `KernelInceptionDistance`), fed features that
were computed once (`GivenFeatures` passes them through), so every metric and the memorization audit share
one pass of the extractor. Uncertainty, stated with every value:
- FID: the standard deviation over `bootstrap` resamples of both sets (`fid_se`) and their 2.5-97.5 %
  percentiles (`fid_ci95`). FID is biased upward at small N and the bias depends on N and on the feature
  dimension: compare FIDs only at equal N and features, and rely on KID (unbiased) when N is small.
- KID: torchmetrics' mean and standard deviation over random subsets of half the smaller set (`kid_std`).
- Precision and density average over generated images, recall and coverage over real ones: `_se` is the
  standard error of that mean with the other set fixed.
PRDC is written here on torch.cdist (the reference package prints on every call and starts 8 worker
processes, which a bootstrap cannot afford); tests check it against the reference implementation.
"""
from __future__ import annotations

import math

import torch

NEAREST_K = 5
BOOTSTRAP = 50
KID_SUBSETS = 100


class GivenFeatures(torch.nn.Module):
    """The identity, for torchmetrics' `feature=` argument: the inputs already are features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check(real: torch.Tensor, fake: torch.Tensor, minimum: int) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) < minimum:
        raise ValueError(f"distribution metrics need at least {minimum} real and generated images, got "
                         f"{len(real)} and {len(fake)}: evaluate more reports (--max-samples)")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1]), reset_real_features=True)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """torchmetrics' KID (polynomial kernel, degree 3): (mean, std) over KID_SUBSETS random subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = max(2, min(len(real), len(fake)) // 2)
    kid = KernelInceptionDistance(feature=GivenFeatures(real.shape[1]), subsets=KID_SUBSETS, subset_size=size)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the subsets are drawn with torch's global generator
        mean, std = kid.compute()
    return float(mean), float(std)


def _kth_neighbour_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (itself, at distance 0, excluded)."""
    return torch.cdist(x, x).kthvalue(k + 1, dim=1).values


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = NEAREST_K) -> dict[str, float]:
    """Precision, recall, density and coverage with k-NN balls, each with its standard error."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and generated images")
    real, fake = real.double(), fake.double()
    real_radius, fake_radius = _kth_neighbour_radius(real, k), _kth_neighbour_radius(fake, k)
    d = torch.cdist(real, fake)  # (n_real, n_fake)
    inside_real = d < real_radius[:, None]  # fake j inside real i's ball
    per_fake_precision = inside_real.any(dim=0).double()
    per_fake_density = inside_real.sum(dim=0).double() / k
    per_real_recall = (d < fake_radius[None, :]).any(dim=1).double()
    per_real_coverage = (d.min(dim=1).values < real_radius).double()
    out = {}
    for name, values in (("precision", per_fake_precision), ("recall", per_real_recall),
                         ("density", per_fake_density), ("coverage", per_real_coverage)):
        out[name] = float(values.mean())
        out[f"{name}_se"] = float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return out


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, feature_name: str, k: int = NEAREST_K,
                         bootstrap: int = BOOTSTRAP, seed: int = 0) -> dict:
    """fid, kid, precision, recall, density, coverage with their uncertainty (module docstring), plus what they
    were computed on. `real` / `fake`: (N, D) features of the split's real images and of the generated ones."""
    _check(real, fake, minimum=k + 1)
    out: dict = {"fid": frechet_distance(real, fake)}
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(bootstrap):
        ri = torch.randint(len(real), (len(real),), generator=generator)
        fi = torch.randint(len(fake), (len(fake),), generator=generator)
        draws.append(frechet_distance(real[ri], fake[fi]))
    if draws:
        ordered = torch.tensor(draws, dtype=torch.float64)
        out["fid_se"] = float(ordered.std(unbiased=True)) if len(draws) > 1 else math.nan
        out["fid_ci95"] = [float(ordered.quantile(0.025)), float(ordered.quantile(0.975))]
    out["kid"], out["kid_std"] = kernel_distance(real, fake, seed)
    out.update(prdc(real, fake, k))
    out["distribution"] = {"features": feature_name, "feature_dim": int(real.shape[1]), "n_real": len(real),
                           "n_generated": len(fake), "nearest_k": k, "bootstrap": bootstrap,
                           "kid_subset_size": max(2, min(len(real), len(fake)) // 2)}
    return out

