"""Phantom acquisition details: captions that never state a finding, drawn on the patient's side, invisible to
the reader, and the pretraining conditioning built from them."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from cxrdist.config import PretrainConfig
from cxrdist.data.sources.phantom import MARKER_Y, draw_study, render
from cxrdist.data.sources.phantom_acquisition import (
    ELECTRODE_SIDES,
    EXPOSURES,
    MARKER_PLACES,
    Acquisition,
    describe,
    sample_acquisition,
)
from cxrdist.errors import DataError
from cxrdist.metrics.attributes import attributes_from_report, normal_attributes
from cxrdist.metrics.reader import read_image
from cxrdist.train.pretrain import acquisition_caption, caption_contexts, image_captions

FINDING_WORDS = ("heart", "cardi", "effusion", "fluid", "pneumothora", "nodul", "mass", "lung", "pleura", "zone")


@pytest.fixture(scope="module")
def studies():
    return [draw_study(i, seed=5) for i in range(600)]


def test_captions_name_no_finding_and_read_as_a_normal_report(studies):
    for s in studies:
        caption = s.acquisition.caption
        assert caption and not any(word in caption.lower() for word in FINDING_WORDS), caption
        assert attributes_from_report(caption) == normal_attributes(), caption


def test_captions_say_what_was_drawn():
    rng = np.random.default_rng(0)
    for marker in ("none", *MARKER_PLACES):
        for electrodes in ELECTRODE_SIDES:
            for exposure in EXPOSURES:
                text = describe(marker, electrodes, exposure, rng).lower()
                if marker != "none" and "marker" in text:
                    side, level = marker.split()
                    assert side in text and level in text, text
                sentence = " ".join(part for part in text.split(".") if "electrode" in part)
                if electrodes in ("left", "right") and sentence:
                    assert electrodes in sentence and ({"left", "right"} - {electrodes}).pop() not in sentence, text
                if exposure != "normal" and "expos" in text:
                    assert any(word in text for word in {"under": ("under", "low"), "over": ("over", "high")}[exposure])


def test_every_value_occurs_and_the_stream_is_separate(studies):
    counts = Counter(s.acquisition.marker for s in studies)
    assert set(counts) == {"none", *MARKER_PLACES} and min(counts.values()) > 40
    assert set(s.acquisition.electrodes for s in studies) == set(ELECTRODE_SIDES)
    assert set(s.acquisition.exposure for s in studies) == set(EXPOSURES)
    assert sample_acquisition(7, 5) == sample_acquisition(7, 5) != sample_acquisition(8, 5)
    # the findings, anatomy and report come from the study's own stream, unchanged by the acquisition's
    assert studies[3].report == draw_study(3, seed=5).report


def _with(study, acquisition: Acquisition | None) -> np.ndarray:
    return render(study.anatomy, study.findings, study.nodule, study.exposure, np.random.default_rng(0), 64, acquisition)


def test_marker_and_electrodes_sit_on_the_patients_side(studies):
    """PA film: the patient's left is the image's right, for the marker's edge and the electrode alike."""
    for side, columns, other in (("left", slice(60, 64), slice(0, 4)), ("right", slice(0, 4), slice(60, 64))):
        for level, centre in MARKER_Y.items():
            s = studies[0]
            acq = Acquisition(f"{side} {level}", "none", "normal", "")
            diff = _with(s, acq) - _with(s, None)
            rows = slice(int(centre * 64) - 1, int(centre * 64) + 2)
            assert diff[rows, columns].mean() > 0.2 and abs(diff[:, other]).max() < 1e-6
        diff = _with(studies[0], Acquisition("none", side, "normal", "")) - _with(studies[0], None)
        own, far = (slice(32, 64), slice(0, 32)) if side == "left" else (slice(0, 32), slice(32, 64))
        assert diff[:8, own].sum() > 1 and abs(diff[:8, far]).max() < 1e-6 and abs(diff[8:]).max() < 1e-6


def test_exposure_lightens_or_darkens_the_film(studies):
    s = studies[1]
    mean = {e: _with(s, Acquisition("none", "none", e, "")).mean() for e in EXPOSURES}
    assert mean["under"] > mean["normal"] + 0.03 > mean["over"] + 0.06


def test_the_reader_reads_the_same_findings_with_or_without_them(studies):
    for s in studies[:300]:
        assert read_image(_with(s, s.acquisition)) == read_image(_with(s, None)), s.acquisition


def test_pretraining_captions_come_from_the_shard_and_missing_ones_are_one_line():
    meta = {"extra": {"phantom": {"acquisition": {"caption": "Overexposed film."}}}}
    assert acquisition_caption(meta) == "Overexposed film."
    assert acquisition_caption({}) is None and acquisition_caption({"extra": {"phantom": {}}}) is None
    cfg = PretrainConfig()
    assert image_captions(cfg, ["a", "b"], "s") == ["a", "b"]
    assert image_captions(replace(cfg, captions="generic"), [None, "b"], "s") == [cfg.caption] * 2
    with pytest.raises(DataError, match="1 of 2 images in s carry no acquisition caption.*pretrain.captions=generic"):
        image_captions(cfg, [None, "b"], "s")


def test_each_image_is_conditioned_on_its_own_caption(tiny_base_path):
    from cxrdist.models.loading import load_base
    from cxrdist.models.text import encode_prompts

    base = load_base(tiny_base_path)
    parts = {"tokenizer": base.tokenizer, "text_encoder": base.text_encoder}
    captions = ["Overexposed film.", "Left upper side marker.", "Overexposed film."]
    contexts, masks, rows = caption_contexts(parts, captions, batch_size=1)
    assert len(contexts) == len(masks) == 3 and rows.tolist()[0] == rows.tolist()[2] != rows.tolist()[1]
    expected = encode_prompts(base.tokenizer, base.text_encoder, captions + [""], warn=False)
    torch.testing.assert_close(contexts[rows], expected[:3])
    torch.testing.assert_close(contexts[-1], expected[3])  # the empty prompt is the last row
