"""Faithfulness score, chance levels, and pixel metrics with an explicit data range."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrdist.data.sources.phantom import draw_study
from cxrdist.metrics import chance_level, diversity, faithfulness, faithfulness_details, format_report, image_metrics
from cxrdist.metrics.attributes import ATTRIBUTES, UNKNOWN
from cxrdist.metrics.faithfulness import faithfulness_from_attributes


@pytest.fixture(scope="module")
def phantoms():
    studies = [draw_study(i, 99) for i in range(160)]
    return [draw_study(i, 99).render(64) for i in range(160)], [s.labels for s in studies]


def test_real_phantoms_are_faithful_and_shuffled_ones_are_near_chance(phantoms):
    images, labels = phantoms
    scores = faithfulness(images, labels)
    assert scores["macro"] >= 0.98 and min(scores[name] for name in ATTRIBUTES) >= 0.97
    assert all(isinstance(v, float) for v in scores.values())  # flat: one number per attribute
    shuffled = faithfulness([images[i] for i in np.random.default_rng(0).permutation(len(images))], labels)
    assert abs(shuffled["macro"] - chance_level(labels)["macro"]) < 0.08
    assert shuffled["macro_balanced"] < 0.6
    details = faithfulness_details(images, labels)
    assert details["attributes"]["heart"]["n"] == len(images)
    assert "macro" in format_report(details, chance_level(labels))


def test_chance_levels_by_hand():
    labels = [["normal"]] * 3 + [["Cardiomegaly/mild"]]
    assert chance_level(labels)["heart"] == pytest.approx(0.75**2 + 0.25**2)
    assert chance_level(labels, kind="majority")["heart"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        chance_level(labels, kind="uniform")


def test_unknown_targets_are_skipped_and_unknown_readings_miss():
    normal = {name: ("none" if name == "nodule" else "no") for name in ATTRIBUTES} | {"heart": "normal"}
    target = dict(normal, effusion_left=UNKNOWN)
    scores = faithfulness_from_attributes([normal, {n: UNKNOWN for n in normal}], [target, normal])
    assert scores["attributes"]["effusion_left"]["n"] == 1
    assert scores["attributes"]["heart"]["accuracy"] == 0.5


def test_image_metrics_use_unit_range():
    rng = np.random.default_rng(0)
    ref = rng.random((3, 64, 64)).astype(np.float32)
    same = image_metrics(ref, ref)
    assert same["mse"] == 0 and same["ssim"] == pytest.approx(1.0) and same["psnr"] == 100.0
    noisy = np.clip(ref + rng.normal(0, 0.05, ref.shape), 0, 1).astype(np.float32)
    m = image_metrics(noisy, ref)
    assert m["psnr"] == pytest.approx(10 * np.log10(1 / m["mse"]), abs=0.3)
    signed = image_metrics(torch.from_numpy(noisy) * 2 - 1, torch.from_numpy(ref) * 2 - 1, value_range=(-1, 1))
    assert signed["ssim"] == pytest.approx(m["ssim"], abs=1e-4) and signed["psnr"] == pytest.approx(m["psnr"], abs=1e-3)
    with pytest.raises(ValueError, match="value_range"):
        image_metrics(torch.from_numpy(noisy) * 2 - 1, torch.from_numpy(ref) * 2 - 1)


def test_diversity_is_mean_pairwise_similarity(phantoms):
    images = phantoms[0]
    assert diversity([images[0]] * 3) == pytest.approx(1.0)
    assert diversity(images[:4]) < 0.9
    big = np.kron(np.stack(images[:3]), np.ones((3, 3), np.float32))  # 192 px: MS-SSIM fits
    assert 0 < diversity(big) < 1 and diversity(big, measure="ssim") < 1
    with pytest.raises(ValueError):
        diversity(images[:1])


def test_presence_ignores_the_side_and_stays_out_of_macro():
    normal = {name: ("none" if name == "nodule" else "no") for name in ATTRIBUTES} | {"heart": "normal"}
    target = dict(normal, effusion_left="yes", nodule="left upper")
    wrong_side = dict(normal, effusion_right="yes", nodule="right lower")
    scores = faithfulness_from_attributes([wrong_side], [target])
    assert scores["attributes"]["effusion_left"]["accuracy"] == 0 and scores["attributes"]["nodule"]["accuracy"] == 0
    assert scores["presence"]["effusion_present"]["accuracy"] == 1 and scores["presence"]["nodule_present"]["accuracy"] == 1
    assert scores["presence"]["pneumothorax_present"]["accuracy"] == 1
    assert scores["macro"] == pytest.approx(3 / 6)  # primary only: both effusion sides and the zone miss
    missed = faithfulness_from_attributes([normal], [target])
    assert missed["presence"]["effusion_present"]["accuracy"] == 0
    half = dict(normal, effusion_left=UNKNOWN)  # a side the labels do not state: presence unknown unless the other says yes
    assert faithfulness_from_attributes([normal], [half])["presence"]["effusion_present"]["n"] == 0
    assert chance_level([["normal"], ["Pleural Effusion/left"]])["effusion_present"] == pytest.approx(0.5)
