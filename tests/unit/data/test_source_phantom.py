"""Phantom source: determinism, the Source contract, label/report/geometry consistency, PA convention."""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import replace

import numpy as np
import pytest

from cxrdist.data.sources.phantom import PhantomSource, draw_study, generate, render, study_rng
from cxrdist.data.sources.phantom_reports import CTR_RANGES
from cxrdist.metrics.attributes import attributes_from_labels, attributes_from_report

N_STUDIES = 1500


@pytest.fixture(scope="module")
def studies():
    return [draw_study(i, seed=3) for i in range(N_STUDIES)]


def test_generate_is_deterministic_per_seed_and_index():
    a, b = generate(17, 64, seed=5), generate(17, 64, seed=5)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    assert not np.array_equal(a[0], generate(17, 64, seed=6)[0])
    assert not np.array_equal(a[0], generate(18, 64, seed=5)[0])


def test_image_format_and_size_independent_geometry():
    for size in (32, 64, 128):
        img = generate(4, size, seed=0)[0]
        assert img.shape == (size, size) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.1
    assert draw_study(4, 0).geometry() == draw_study(4, 0).geometry()
    small, large = generate(4, 32, 0)[0], generate(4, 128, 0)[0]
    assert np.abs(small - large.reshape(32, 4, 32, 4).mean(axis=(1, 3))).mean() < 0.05  # same patient


def test_source_contract():
    source = PhantomSource(n=30, size=32, seed=2)
    records = list(source.records())
    assert [r.uid for r in records] == [f"phantom-{i:06d}" for i in range(30)]
    assert len({r.group for r in records}) == 30 and source.rejected() == []
    clone = pickle.loads(pickle.dumps(source))  # load() runs in worker processes
    for r in records[:5]:
        assert r.source == "phantom" and r.view == "PA" and "." not in r.uid
        json.dumps(r.extra)
        image, report, labels, _ = generate(int(r.extra["phantom"]["index"]), 32, 2)
        assert r.prompt == report and r.labels == labels
        assert np.array_equal(clone.load(r), image)


def test_prevalences_are_balanced_enough(studies):
    attrs = [s.attributes for s in studies]
    share = lambda name, value: np.mean([a[name] == value for a in attrs])  # noqa: E731
    assert 0.36 < np.mean([s.findings.is_normal for s in studies]) < 0.44
    assert 0.25 < share("heart", "enlarged") < 0.40
    for side in ("left", "right"):
        assert 0.18 < share(f"effusion_{side}", "yes") < 0.30
        assert 0.13 < share(f"pneumothorax_{side}", "yes") < 0.23
    zones = [a["nodule"] for a in attrs if a["nodule"] != "none"]
    assert len(set(zones)) == 6 and min(zones.count(z) for z in set(zones)) > 0.02 * N_STUDIES


def test_labels_report_and_geometry_agree(studies):
    for s in studies:
        truth = s.attributes
        assert attributes_from_labels(s.labels) == truth, s.labels
        assert attributes_from_report(s.report) == truth, s.report
        lo, hi = CTR_RANGES[s.findings.severity or "normal"]
        assert lo <= s.anatomy.ctr <= hi
        assert bool(s.nodule) == (truth["nodule"] != "none")
        assert len(s.report.split()) <= 40  # fits CLIP's 77 tokens (67 at most, measured)


def test_absent_findings_are_negated_explicitly(studies):
    negation = r"\b(no|without)\b[^.]*"
    for s in studies:
        text, a = s.report.lower(), s.attributes
        if a["effusion_left"] == a["effusion_right"] == "no":
            assert re.search(negation + r"effusion", text), text
        if a["pneumothorax_left"] == a["pneumothorax_right"] == "no":
            assert re.search(negation + r"pneumothorax", text), text
        if a["nodule"] == "none":
            assert re.search(negation + r"nodul", text), text
        if a["heart"] == "normal":
            assert "normal" in text.split(".")[0], text


def test_nodule_lies_in_its_zone_and_side(studies):
    for s in studies:
        if not s.nodule:
            continue
        side, zone = s.attributes["nodule"].split()
        assert (s.nodule["x"] > s.anatomy.midline) == (side == "left")  # patient left = image right
        borders = {"upper": (0, 0.32), "middle": (0.32, 0.515), "lower": (0.515, 1)}[zone]
        assert borders[0] < s.nodule["y"] < borders[1]


def _difference(study, **without) -> np.ndarray:
    """Image with the study's findings minus the same patient rendered without some of them."""
    def draw(findings):
        return render(study.anatomy, findings, study.nodule if findings.nodule_side else {}, study.exposure,
                      np.random.default_rng(0), 64)
    return draw(study.findings) - draw(replace(study.findings, **without))


def _find(studies, predicate):
    return next(s for s in studies if predicate(s.findings))


def test_left_effusion_brightens_the_image_right_lower_zone(studies):
    s = _find(studies, lambda f: f.effusion_left and not f.effusion_right)
    diff = _difference(s, effusion_left="")
    lower = diff[40:54]
    assert lower[:, 44:60].mean() > 0.05 and abs(lower[:, :32].mean()) < 0.005  # patient left = image right


def test_pneumothorax_darkens_its_own_side_apex(studies):
    s = _find(studies, lambda f: f.pneumothorax_right and not f.pneumothorax_left)
    upper = _difference(s, pneumothorax_right=False)[12:30]
    assert upper[:, :32].mean() < -0.01 and abs(upper[:, 32:].mean()) < 0.003  # patient right = image left


def test_nodule_is_a_bright_disc_at_least_4px_wide(studies):
    s = _find(studies, lambda f: f.nodule_side == "left")
    diff = _difference(s, nodule_side="", nodule_zone="")
    assert (diff > 0.15).sum() >= 12 and diff[:, :32].max() < 0.01
    assert 2 * s.nodule["r"] * 64 >= 4.3


def test_study_rng_streams_differ_by_index():
    assert study_rng(1, 0).random() != study_rng(2, 0).random()
