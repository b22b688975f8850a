"""MIMIC-CXR source on fixture trees in the PhysioNet layouts (MIMIC-CXR-JPG and the DICOM release): views, the
official split, patient-level folds, report sections, CheXpert labels, the DICOM path, resume and rejects."""
from __future__ import annotations

import gzip
import json

import pytest

from cxrdist.data.index import load_index, verify_checksums
from cxrdist.data.inspect import summary_lines
from cxrdist.data.shard import build_shards
from cxrdist.data.sources import source_class
from cxrdist.data.sources.mimic_cxr import MimicCXRSource
from cxrdist.errors import DataError, InputError
from support.data_files import tar_metas
from support.mimic_files import dicom_id, expected_prompt, make_mimic_tree, study_id, subject_id

OPTS = dict(size=32, folds=2, seed=0, shard_size=4, workers=1, progress=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_mimic_tree(tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg")


def _metas(out):
    return [m for tar in sorted(out.glob("*.tar")) for m in tar_metas(tar)]


def test_frontal_views_by_default_lateral_on_request(tree):
    source = MimicCXRSource(tree)
    records = list(source.records())
    assert {r.view for r in records} == {"PA", "AP"}
    assert source.summary()["other_views"] == 18 and source.summary()["images"] == 15
    with_lateral = list(MimicCXRSource(tree, views="PA,AP,LATERAL").records())
    assert {r.view for r in with_lateral} == {"PA", "AP", "LATERAL"} and len(with_lateral) == 30
    assert {r.view for r in MimicCXRSource(tree, views="lateral").records()} == {"LATERAL"}
    assert source_class("mimic-cxr") is MimicCXRSource


def test_records_carry_report_sections_labels_and_ids(tree):
    records = {r.uid: r for r in MimicCXRSource(tree).records()}
    subject, study = subject_id(0), study_id(0, 0)
    first = records[dicom_id(subject, study, "PA")]
    assert first.group == subject and first.split == "test" and first.source == "mimic-cxr"
    assert first.prompt == expected_prompt(0, study)
    assert first.labels == ["Cardiomegaly"] and first.extra["negative_labels"] == ["Edema"]
    assert first.source_path.endswith(f"files/p10/p{subject}/s{study}/{first.uid}.jpg")
    combined = records[dicom_id(subject_id(0), study_id(0, 1), "PA")]
    assert combined.prompt == expected_prompt(1, study_id(0, 1)) and combined.labels == ["normal"]
    wet_read = records[dicom_id(subject_id(1), study_id(1, 0), "AP")]  # mixed-case headings, wet read left out
    assert wet_read.prompt == expected_prompt(2, study_id(1, 0)) and wet_read.view == "AP"


def test_empty_reports_are_rejected_unless_the_fallback_is_asked_for(tree):
    source = MimicCXRSource(tree)
    list(source.records())
    empty = [(ident, reason) for ident, reason, _ in source.rejected()]
    assert empty == [(dicom_id(subject_id(n // 2), study_id(n // 2, n % 2), "PA" if n % 3 != 2 else "AP"),
                      "empty_report") for n in (3, 8, 13)]
    fallback = {r.uid: r.prompt for r in MimicCXRSource(tree, fallback=True).records()}
    assert fallback[empty[0][0]] == f"Lungs are clear in study {study_id(1, 1)}."
    indication = {r.uid: r.prompt for r in MimicCXRSource(tree, sections=["indication"]).records()}
    assert indication[dicom_id(subject_id(0), study_id(0, 0), "PA")] == "M with cough // eval for pneumonia"


@pytest.mark.parametrize("policy, labels, negative", [
    ("drop", ["Cardiomegaly"], ["Edema"]),
    ("positive", ["Cardiomegaly", "Pleural Effusion"], ["Edema"]),
    ("negative", ["Cardiomegaly"], ["Edema", "Pleural Effusion"]),
    ("uncertain", ["Cardiomegaly", "Pleural Effusion/uncertain"], ["Edema"]),
])
def test_uncertain_labels_policy(tree, policy, labels, negative):
    record = next(iter(MimicCXRSource(tree, uncertain=policy).records()))
    assert record.labels == labels and record.extra["negative_labels"] == negative


def test_official_split_and_patient_level_folds(tree, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="--test-fraction does not apply with --official-split.*"
                                         "--no-official-split"):
        build_shards(MimicCXRSource(tree), out, test_fraction=0.5, **OPTS)  # it would go unused
    index = build_shards(MimicCXRSource(tree), out, **OPTS)
    metas = _metas(out)
    by_split: dict[str, set] = {}
    for meta in metas:
        by_split.setdefault(meta["split"], set()).add(meta["group"])
    assert by_split["test"] == {subject_id(0), subject_id(1)}
    assert all(m["extra"]["official_split"] == "test" for m in metas if m["split"] == "test")
    assert all(m["extra"]["official_split"] in ("train", "validate") for m in metas if m["split"] != "test")
    groups = [g for members in by_split.values() for g in members]
    assert len(groups) == len(set(groups)) == 9  # no patient in two splits
    assert index["options"]["official_split"] is True and index["counts"]["written"] == 15
    assert index["source_summary"]["split"] == "official" and verify_checksums(out) == []
    drawn = build_shards(MimicCXRSource(tree, official_split=False), tmp_path / "drawn", test_fraction=0.34, **OPTS)
    assert "official_split" not in drawn["options"] and drawn["splits"]["test"]["groups"] == 3
    # index.json claims no test fraction it did not draw, and reads back
    assert index["test_fraction"] is None and index["options"]["test_fraction"] is None
    assert drawn["test_fraction"] == 0.34 and load_index(tmp_path / "drawn").test_fraction == 0.34
    assert load_index(out).test_fraction is None
    assert "official test split" in "\n".join(summary_lines(load_index(out)))


def test_subject_in_both_official_splits_goes_to_test_whole(tmp_path):
    root = make_mimic_tree(tmp_path / "m", n_subjects=6)
    split = root / "mimic-cxr-2.0.0-split.csv.gz"
    lines = gzip.decompress(split.read_bytes()).decode().splitlines()
    moved = next(i for i, line in enumerate(lines) if line.endswith(",train"))
    lines[moved] = lines[moved][: -len("train")] + "test"  # one image of a training patient in test
    split.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    out = tmp_path / "out"
    build_shards(MimicCXRSource(root, views="all"), out, **OPTS)
    patient = lines[moved].split(",")[2]
    splits_of_patient = {m["split"] for m in _metas(out) if m["group"] == patient}
    assert splits_of_patient == {"test"}


def test_dicom_release_layout_with_views_from_headers(tmp_path):
    root = make_mimic_tree(tmp_path / "mimic-cxr", n_subjects=6, layout="dicom", reports="folder")
    source = MimicCXRSource(root)
    records = list(source.records())
    assert source.summary()["layout"] == "dicom" and {r.view for r in records} == {"PA", "AP"}
    assert all(r.source_path.endswith(".dcm") for r in records)
    out = tmp_path / "out"
    index = build_shards(source, out, **OPTS)
    assert index["counts"]["written"] == len(records) == 10 and index["counts"]["rejected"] == 2  # 2 empty


def test_nested_zip_plain_csv_and_no_labels(tmp_path):
    root = make_mimic_tree(tmp_path / "m", n_subjects=3, reports="zip-nested", gz=False, labels=False)
    source = MimicCXRSource(root)
    records = list(source.records())
    assert len(records) == 5 and all(r.labels == [] for r in records)
    assert source.summary()["labels"] == "none" and source.summary()["images_without_labels"] == 5


def test_bad_inputs_are_rejects_with_reasons(tmp_path):
    missing = dicom_id(subject_id(2), study_id(2, 0), "PA")
    corrupt = dicom_id(subject_id(3), study_id(3, 0), "PA")
    root = make_mimic_tree(tmp_path / "m", missing=[missing], corrupt=[corrupt])
    out = tmp_path / "out"
    index = build_shards(MimicCXRSource(root), out, **OPTS)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons[missing] == "missing_image" and reasons[corrupt] == "corrupt_image"
    assert index["rejects"] == {"corrupt_image": 1, "empty_report": 3, "missing_image": 1}
    assert index["counts"]["written"] == 13


def test_resume_keeps_finished_shards_and_matches_a_clean_build(tree, tmp_path):
    clean, out = tmp_path / "clean", tmp_path / "out"
    build_shards(MimicCXRSource(tree), clean, **OPTS)
    build_shards(MimicCXRSource(tree), out, **OPTS)
    victim = sorted(out.glob("fold*.tar"))[0]
    victim.unlink()
    (out / ".parts" / victim.name.replace(".tar", ".json")).unlink()
    (out / "index.json").unlink()  # as a killed build leaves it
    index = build_shards(MimicCXRSource(tree), out, resume=True, **OPTS)
    assert index["run"]["shards_written"] == 1 and index["run"]["shards_resumed"] >= 2
    for tar in clean.glob("*.tar"):
        assert tar.read_bytes() == (out / tar.name).read_bytes()
    with pytest.raises(DataError, match="differ from the interrupted build"):
        build_shards(MimicCXRSource(tree, views="all"), out, resume=True, **OPTS)


def test_missing_or_damaged_tables_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        MimicCXRSource(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no mimic-cxr-2.0.0-metadata.csv.*--root"):
        MimicCXRSource(tmp_path / "empty")
    root = make_mimic_tree(tmp_path / "m", n_subjects=3)
    (root / "mimic-cxr-2.0.0-split.csv.gz").rename(root / "split.bak")
    with pytest.raises(DataError, match="no mimic-cxr-2.0.0-split.*--no-official-split"):
        MimicCXRSource(root)
    assert len(list(MimicCXRSource(root, official_split=False).records())) == 5
    (root / "split.bak").rename(root / "mimic-cxr-2.0.0-split.csv.gz")
    metadata = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    metadata.write_bytes(metadata.read_bytes()[:60])  # a truncated download
    with pytest.raises(DataError, match="metadata.csv.gz:.*replace the file with an intact copy"):
        list(MimicCXRSource(root).records())
    with pytest.raises(DataError, match="--reports .* does not exist"):
        MimicCXRSource(root, reports=tmp_path / "no.zip")
    with pytest.raises(DataError, match="--labeler"):
        MimicCXRSource(root, labeler="negbio")
