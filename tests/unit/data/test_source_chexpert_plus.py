"""CheXpert Plus source on a fixture tree in the release layout (PNG/ and DICOM/ folders, the published table's
columns): views, the split column, patient-level folds, sections from the section columns and the report text,
the DICOM path and rejects."""
from __future__ import annotations

import json

import pytest

from cxrdist.data.shard import build_shards
from cxrdist.data.sources import source_class
from cxrdist.data.sources.chexpert_plus import CheXpertPlusSource
from cxrdist.errors import DataError
from support.data_files import tar_metas
from support.mimic_files import make_chexpert_plus_tree, write_table

OPTS = dict(size=32, folds=2, seed=0, shard_size=4, workers=1, progress=False)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return make_chexpert_plus_tree(tmp_path_factory.mktemp("chexpert-plus"), dicom=True)


def test_frontal_views_sections_and_groups(table):
    source = CheXpertPlusSource(table.parent, table)
    records = list(source.records())
    assert len(records) == 6 and {r.view for r in records} == {"PA", "AP"}  # patients 3 and 7: no sections
    assert [reason for _, reason, _ in source.rejected()] == ["empty_report", "empty_report"]
    first = records[0]
    assert first.group == "patient00000" and first.split == "test" and first.source_path.endswith(".png")
    assert first.prompt == "Heart size normal for patient 0. No effusion. No acute disease."
    assert first.uid == "valid_patient00000_study1_view1_frontal"
    assert source_class("chexpert-plus") is CheXpertPlusSource
    assert len(list(CheXpertPlusSource(table.parent, table, views="all").records())) == 12
    history = [r.prompt for r in CheXpertPlusSource(table.parent, table, sections=["indication"]).records()]
    assert history[0] == "Cough, patient 0."


def test_fallback_parses_the_free_text_report(table):
    records = {r.group: r for r in CheXpertPlusSource(table.parent, table, fallback=True).records()}
    assert records["patient00003"].prompt == "Mild cardiomegaly in patient 3."


def test_split_column_is_honoured_with_patient_level_folds(table, tmp_path):
    out = tmp_path / "out"
    index = build_shards(CheXpertPlusSource(table.parent, table, views="all", fallback=True), out, **OPTS)
    metas = [m for tar in sorted(out.glob("*.tar")) for m in tar_metas(tar)]
    test_groups = {m["group"] for m in metas if m["split"] == "test"}
    assert test_groups == {"patient00000", "patient00001"}
    by_group: dict[str, set] = {}
    for meta in metas:
        by_group.setdefault(meta["group"], set()).add(meta["split"])
    assert all(len(splits) == 1 for splits in by_group.values())  # frontal and lateral of a patient together
    assert index["counts"]["written"] == 16 and index["splits"]["test"]["count"] == 4


def test_dicom_images_and_missing_files(tmp_path):
    table = make_chexpert_plus_tree(tmp_path / "cp", n_patients=6, dicom=True,
                                    missing=["train/patient00002/study1/view1_frontal"])
    source = CheXpertPlusSource(table.parent, table, image_format="dicom")
    records = list(source.records())
    assert all(r.source_path.endswith(".dcm") for r in records) and len(records) == 4
    assert source.load(records[0]).shape == (64, 48)
    png = CheXpertPlusSource(table.parent, table)
    list(png.records())
    assert ("missing_image" in [reason for _, reason, _ in png.rejected()])
    out = tmp_path / "out"
    build_shards(CheXpertPlusSource(table.parent, table, image_format="dicom"), out, **OPTS)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == ["empty_report", "missing_image"]


def test_bad_tables_are_one_clear_error(tmp_path, table):
    with pytest.raises(DataError, match="not found: pass df_chexpert_plus"):
        CheXpertPlusSource(table.parent, tmp_path / "none.csv")
    bad = write_table(tmp_path / "bad.csv", ["path_to_image", "deid_patient_id", "frontal_lateral"],
                      [{"path_to_image": "a.jpg", "deid_patient_id": "p1", "frontal_lateral": "Frontal"}])
    with pytest.raises(DataError, match="no column split .*--no-official-split"):
        list(CheXpertPlusSource(table.parent, bad).records())
    with pytest.raises(DataError, match="no column for section findings"):
        list(CheXpertPlusSource(table.parent, bad, official_split=False).records())
    outside = write_table(tmp_path / "out.csv", ["path_to_image", "deid_patient_id", "frontal_lateral", "ap_pa",
                                                 "section_findings", "section_impression", "split"],
                          [{"path_to_image": "../../etc/passwd", "deid_patient_id": "p1", "frontal_lateral": "Frontal",
                            "ap_pa": "PA", "section_findings": "Clear lungs.", "split": "train"}])
    source = CheXpertPlusSource(table.parent, outside)
    assert list(source.records()) == [] and source.rejected()[0][1] == "missing_image"
