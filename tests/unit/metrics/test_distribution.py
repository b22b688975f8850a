"""Distribution metrics, the memorization audit and classifier agreement, on features and images whose answers
are known: a shifted copy has FID = |shift|^2, PRDC equals a literal reading of its definition, copies of
training images are flagged and unrelated images are not, a perfect score has AUROC 1."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrdist.data.sources.phantom import draw_study
from cxrdist.data.sources.phantom_reports import findings_labels
from cxrdist.metrics.classifier import auroc, classifier, classifier_agreement, targets_from_labels
from cxrdist.metrics.distribution import distribution_metrics, frechet_distance, kernel_distance, prdc
from cxrdist.metrics.features import FeatureError, feature_extractor, image_batch
from cxrdist.metrics.memorization import calibrated_threshold, memorization_audit, nearest_training


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# ------------------------------------------------------------------------------------------------ features
def test_pixel_features_are_area_means_and_bad_specs_name_the_choices():
    images = torch.rand(3, 1, 64, 64)
    feats = feature_extractor("pixels:8")(images)
    assert feats.shape == (3, 64) and feats.dtype == torch.float64
    assert torch.allclose(feats[0, 0], images[0, 0, :8, :8].mean().double(), atol=1e-6)
    assert feature_extractor().name == "pixels:16"
    for bad in ("pixels:1", "pixels:x", "vgg", "txv", "raddino"):
        with pytest.raises(FeatureError, match="pixels"):
            feature_extractor(bad)


def test_a_missing_optional_package_is_one_line_with_the_pip_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_txv(name, *args, **kwargs):
        if name == "torchxrayvision":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_txv)
    with pytest.raises(FeatureError, match="pip install torchxrayvision"):
        feature_extractor("txv:densenet121-res224-all")


def test_raddino_features_load_a_local_transformers_backbone(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path / "rad-dino")
    extractor = feature_extractor(f"raddino:{tmp_path / 'rad-dino'}")
    images = torch.rand(5, 1, 64, 64)
    feats = extractor(images)
    assert feats.shape == (5, 32) and torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])  # image-dependent, not a constant
    with pytest.raises(FeatureError, match="raddino"):
        feature_extractor(f"raddino:{tmp_path / 'nothing-here'}")


# ------------------------------------------------------------------------------------------ FID, KID, PRDC
def test_fid_of_a_shifted_copy_is_the_squared_shift_and_zero_for_the_same_set():
    real = gaussian(400, 6, 0)
    shift = torch.tensor([0.5, -1.0, 0.0, 0.25, 0.0, 2.0], dtype=torch.float64)
    assert frechet_distance(real, real + shift) == pytest.approx(float((shift**2).sum()), rel=1e-4)
    assert abs(frechet_distance(real, real)) < 1e-6


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    real, same, far = gaussian(120, 8, 0), gaussian(120, 8, 1), gaussian(120, 8, 2, shift=1.0)
    near_mean, near_std = kernel_distance(real, same)
    far_mean, _ = kernel_distance(real, far)
    assert abs(near_mean) < 3 * near_std + 1e-3
    assert far_mean > 10 * max(abs(near_mean), near_std)
    assert kernel_distance(real, far, seed=3) == kernel_distance(real, far, seed=3)  # seeded subsets


def literal_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al. 2020, eqs. (1)-(4), one loop per definition."""
    def radius(x, i):
        d = sorted(np.linalg.norm(x - x[i], axis=1))
        return d[k]  # d[0] is the point itself

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    dist = lambda a, b: float(np.linalg.norm(a - b))  # noqa: E731
    precision = np.mean([any(dist(real[i], f) < r_real[i] for i in range(len(real))) for f in fake])
    recall = np.mean([any(dist(r, fake[j]) < r_fake[j] for j in range(len(fake))) for r in real])
    density = np.mean([sum(dist(real[i], f) < r_real[i] for i in range(len(real))) for f in fake]) / k
    coverage = np.mean([min(dist(real[i], f) for f in fake) < r_real[i] for i in range(len(real))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_prdc_matches_a_literal_reading_of_its_definition(shift):
    real, fake = gaussian(60, 3, 0), gaussian(50, 3, 1, shift)
    ours = prdc(real, fake, k=5)
    expected = literal_prdc(real.numpy(), fake.numpy(), 5)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
        assert ours[f"{name}_se"] >= 0
    assert any(ours[f"{name}_se"] > 0 for name in expected)


def test_distribution_metrics_rank_a_copy_above_a_shifted_set_and_state_their_uncertainty():
    real, same, shifted = gaussian(200, 4, 0), gaussian(200, 4, 1), gaussian(200, 4, 2, shift=1.5)
    good = distribution_metrics(real, same, "test", bootstrap=20)
    bad = distribution_metrics(real, shifted, "test", bootstrap=20)
    assert good["fid"] < bad["fid"] and good["kid"] < bad["kid"]
    assert good["precision"] > bad["precision"] and good["coverage"] > bad["coverage"]
    lo, hi = bad["fid_ci95"]
    assert lo < bad["fid"] < hi and bad["fid_se"] > 0
    assert good["distribution"] == {"features": "test", "feature_dim": 4, "n_real": 200, "n_generated": 200,
                                    "nearest_k": 5, "bootstrap": 20, "kid_subset_size": 100}
    with pytest.raises(ValueError, match="--max-samples"):
        distribution_metrics(real[:3], same[:3], "test")


# ------------------------------------------------------------------------------------------ memorization
def phantoms(seed: int, n: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([draw_study(i, seed).render(64) for i in range(n)]).astype(np.float32))[:, None]


@pytest.fixture(scope="module")
def audit_sets():
    pool, heldout, other = phantoms(1, 120), phantoms(2, 60), phantoms(3, 40)
    extract = feature_extractor("pixels")
    near = lambda images: nearest_training(images, extract(images), pool, extract(pool))  # noqa: E731
    return pool, near, near(heldout), other


def test_copies_of_training_images_are_flagged_and_unseen_phantoms_are_not(audit_sets):
    pool, near, heldout, other = audit_sets
    noise = torch.randn(pool[:40].shape, generator=torch.Generator().manual_seed(0)) * 0.01
    copies = (pool[:40] + noise).clamp(0, 1)
    copied = memorization_audit(near(copies), heldout)
    assert copied["flagged_fraction"] == 1.0
    assert {p["training"] for p in copied["nearest"]} <= set(range(40))  # each copy found its own source
    assert all(p["generated"] == p["training"] for p in copied["nearest"])
    unseen = memorization_audit(near(other), heldout)
    assert unseen["flagged_fraction"] <= 0.05, unseen
    assert unseen["threshold"] == copied["threshold"] == calibrated_threshold(heldout["ssim"])
    assert copied["calibration"]["heldout_flagged_fraction"] <= 0.02


def test_the_threshold_can_be_fixed_and_the_quantile_is_checked(audit_sets):
    _, near, heldout, other = audit_sets
    assert memorization_audit(near(other), heldout, threshold=-1.0)["flagged_fraction"] == 1.0
    with pytest.raises(ValueError, match="quantile"):
        calibrated_threshold(heldout["ssim"], 0.2)


# ------------------------------------------------------------------------------------------ classifier
def test_auroc_of_perfect_reversed_and_one_class_scores():
    targets = np.array([0, 0, 1, 1, np.nan, 1.0])
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9, 5.0, 0.7]), targets)["auroc"] == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1, 5.0, 0.0]), targets)["auroc"] == 0.0
    assert auroc(np.ones(3), np.ones(3))["auroc"] is None
    hanley = auroc(np.array([0.1, 0.6, 0.4, 0.9]), np.array([0.0, 0, 1, 1]))
    assert hanley["auroc"] == 0.75 and 0 < hanley["se"] < 0.5


def test_the_phantom_reader_as_a_classifier_separates_real_findings():
    studies = [draw_study(i, 7) for i in range(160)]
    images = np.stack([s.render(64) for s in studies])
    labels = [findings_labels(s.findings) for s in studies]
    targets = targets_from_labels(labels, ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Nodule"))
    assert np.nanmin(targets.sum(axis=0)) >= 5  # every finding present in some studies
    out = classifier_agreement(classifier("reader"), images, images, labels)
    for finding, v in out["findings"].items():
        assert v["generated"]["auroc"] >= 0.95, (finding, v)
    shuffled = classifier_agreement(classifier("reader"), images[::-1].copy(), None, labels)
    assert shuffled["macro_auroc"] < 0.75  # images that ignore their reports score near 0.5
    with pytest.raises(ValueError, match="reader"):
        classifier("resnet")


def test_targets_from_labels_know_unknowns():
    targets = targets_from_labels([["normal"], ["Pleural Effusion"], ["Nodule/left/upper lobe"], [],
                                   ["Cardiomegaly/borderline"]], ("Cardiomegaly", "Pleural Effusion", "Nodule"))
    assert targets[0].tolist() == [0.0, 0.0, 0.0]
    assert targets[1].tolist() == [0.0, 1.0, 0.0]  # an effusion without a side is still an effusion
    assert targets[2].tolist() == [0.0, 0.0, 1.0]
    assert all(math.isnan(v) for v in targets[3])  # a study without labels says nothing
    assert math.isnan(targets[4][0]) and targets[4][1] == 0.0


def test_samples_that_decode_training_latents_are_flagged_against_the_pool_as_the_vae_draws_it():
    """A sample is a decoded latent: a perfect copy is the training image's decoded latent. The audit compares
    samples with the pool and the held-out images as the model's VAE draws them (benchmarks/RESULTS.md has the
    4,000-image case where comparing with the originals missed a memorizer's copies)."""
    from cxrdist.metrics.memorization import AuditSide
    from cxrdist.models.loading import load_base
    from cxrdist.sampling.pipeline import as_drawn

    base = load_base(str(Path(__file__).parents[3] / "models" / "phantom-base"))
    pool, heldout, other = (phantoms(seed, n)[:, 0].numpy() for seed, n in ((1, 120), (2, 200), (3, 60)))
    draw = functools.partial(as_drawn, base)
    drawn_pool = draw(pool)
    assert drawn_pool.shape == pool.shape and 0 <= drawn_pool.min() and drawn_pool.max() <= 1
    assert np.abs(drawn_pool - pool).mean() > 0.005  # the VAE changes the image: the reason for drawing
    extract = feature_extractor("pixels")
    side = AuditSide.build(extract, heldout, pool, draw)

    copies = image_batch(drawn_pool[:40])  # what a model that memorized 40 training latents draws
    copied = memorization_audit(side.nearest(copies, extract(copies)), side.heldout)
    assert copied["flagged_fraction"] == 1.0
    assert all(p["generated"] == p["training"] for p in copied["nearest"])
    unseen = image_batch(draw(other))  # unseen patients, drawn through the same VAE
    assert memorization_audit(side.nearest(unseen, extract(unseen)), side.heldout)["flagged_fraction"] <= 0.05
