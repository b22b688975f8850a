"""Manifest source: CSV / JSONL with column mapping; PNG, 16-bit and DICOM inputs."""
from __future__ import annotations

import numpy as np
import pytest

from cxrdist.data.sources import SOURCES, source_class
from cxrdist.data.sources.base import RecordRejected
from cxrdist.data.sources.manifest import ManifestColumns, ManifestSource
from cxrdist.errors import DataError
from support.data_files import write_dicom, write_manifest, write_png


def test_registry_is_lazy_and_complete():
    assert set(SOURCES) >= {"iu-xray", "manifest", "phantom"}
    assert SOURCES["phantom"] == "cxrdist.data.sources.phantom:PhantomSource"
    assert source_class("manifest") is ManifestSource
    with pytest.raises(DataError, match="unknown data source"):
        source_class("nope")


def test_csv_with_png_16bit_dicom_and_report_files(tmp_path):
    write_png(tmp_path / "img" / "a.png")
    write_png(tmp_path / "img" / "b.png", bits=16)
    write_dicom(tmp_path / "img" / "c.dcm", np.arange(48 * 40, dtype=np.uint16).reshape(48, 40),
                photometric="MONOCHROME1")
    (tmp_path / "r.txt").write_text("Small  left effusion.\n", encoding="utf-8")
    manifest = write_manifest(tmp_path / "m.csv", [
        {"path": "img/a.png", "patient": "p1", "text": "Normal heart. ___ seen.", "findings": "Cardiomegaly|Edema",
         "position": "pa", "report_file": ""},
        {"path": "img/b.png", "patient": "p1", "text": "", "findings": "", "position": "lateral",
         "report_file": "r.txt"},
        {"path": "img/c.dcm", "patient": "p2", "text": "Clear.", "findings": "[\"normal\"]", "position": "",
         "report_file": ""},
        {"path": "", "patient": "p3", "text": "x", "findings": "", "position": "", "report_file": ""},
        {"path": "img/d.png", "patient": "p3", "text": "   ", "findings": "", "position": "", "report_file": ""},
    ])
    columns = ManifestColumns(image="path", group="patient", text="text", text_path="report_file",
                              view="position", labels="findings")
    source = ManifestSource(manifest, columns)
    records = list(source.records())
    assert [r.uid for r in records] == ["a", "b", "c"]
    assert records[0].prompt == "Normal heart. seen." and records[0].labels == ["Cardiomegaly", "Edema"]
    assert records[0].view == "PA" and records[1].view == "LATERAL"
    assert records[1].prompt == "Small left effusion."
    assert records[2].labels == ["normal"] and records[2].group == "p2"
    assert [reason for _, reason, _ in source.rejected()] == ["bad_row", "empty_report"]
    pixels = source.load(records[2])
    assert pixels.shape == (48, 40) and pixels[0, 0] == pytest.approx(1.0)  # MONOCHROME1 inverted
    assert source.load(records[1]).dtype == np.float32


def test_jsonl_defaults_and_duplicate_names(tmp_path):
    write_png(tmp_path / "x" / "img.png")
    write_png(tmp_path / "y" / "img.png", seed=1)
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"image": "x/img.png", "group": "s1", "report": "One.", "labels": ["Nodule/right"], "view": "AP"},
        {"image": "y/img.png", "group": "s2", "report": "Two."},
    ])
    records = list(ManifestSource(manifest).records())
    assert [r.uid for r in records] == ["img", "img_r2"]
    assert records[0].labels == ["Nodule/right"] and records[1].labels == []
    with pytest.raises(RecordRejected, match="missing_image"):
        ManifestSource(manifest).load(type(records[0])(uid="z", group="g", prompt="p",
                                                       source_path=str(tmp_path / "no.png")))


def test_bad_manifests_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ManifestSource(tmp_path / "none.csv")
    manifest = write_manifest(tmp_path / "m.csv", [{"file": "a.png", "pid": "1", "report": "x"}])
    with pytest.raises(DataError, match="column 'image' not in .*--image-col"):
        list(ManifestSource(manifest).records())
    with pytest.raises(DataError, match="'notes'.*columns are: file, pid, report"):
        list(ManifestSource(manifest, ManifestColumns(image="file", group="pid", text="notes")).records())
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"image": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match="b.jsonl:2 is not valid JSON"):
        list(ManifestSource(bad).records())
    with pytest.raises(DataError, match="must be .csv"):
        list(ManifestSource(write_manifest(tmp_path / "m.txt", [{"a": 1}])).records())


def test_sections_keep_only_the_chosen_parts(tmp_path):
    for name in ("a", "b", "c"):
        write_png(tmp_path / f"{name}.png")
    (tmp_path / "b.txt").write_text("FINAL REPORT\n INDICATION: ___ cough\n FINDINGS: Lungs clear.\n"
                                    " IMPRESSION: Normal.\n", encoding="utf-8")
    manifest = write_manifest(tmp_path / "m.csv", [
        {"image": "a.png", "group": "1", "report": "INDICATION: pain. IMPRESSION: Small effusion.", "report_path": ""},
        {"image": "b.png", "group": "2", "report": "", "report_path": "b.txt"},
        {"image": "c.png", "group": "3", "report": "Portable chest.\n\nNo change.", "report_path": ""},
    ])
    whole = [r.prompt for r in ManifestSource(manifest).records()]
    assert whole[0] == "INDICATION: pain. IMPRESSION: Small effusion."  # without --sections: as before
    source = ManifestSource(manifest, sections=["findings", "impression"])
    assert [r.prompt for r in source.records()] == ["Small effusion.", "Lungs clear. Normal."]
    assert [(r, d) for _, r, d in source.rejected()] == [("empty_report", "no words in findings/impression")]
    assert [r.prompt for r in ManifestSource(manifest, sections=["impression"], fallback=True).records()] == \
        ["Small effusion.", "Normal.", "No change."]
    with pytest.raises(DataError, match="unknown report section"):
        ManifestSource(manifest, sections=["summary"])
