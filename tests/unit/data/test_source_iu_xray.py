"""IU / Open-i report parsing on hand-written XML that follows the real ecgen-radiology structure."""
from __future__ import annotations

import pytest

from cxrdist.data.sources.iu_xray import IUXraySource, build_prompt, clean_text, parse_report
from cxrdist.errors import DataError
from support.data_files import make_iu_tree, report_xml, write_png


def _write(tmp_path, name, xml):
    folder = tmp_path / "ecgen-radiology"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(xml, encoding="utf-8")
    return folder / name


def test_parse_sections_images_and_mesh(tmp_path):
    path = _write(tmp_path, "1.xml", report_xml(
        "CXR1", findings="The heart is normal in size. XXXX are normal.", impression="No acute disease.",
        indication="XXXX-year-old with cough", images=["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"],
        mesh=["Cardiomegaly/mild", "Pleural Effusion/left/small"]))
    report = parse_report(path)
    assert report.uid == "CXR1"
    assert report.images == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert report.mesh == ["Cardiomegaly/mild", "Pleural Effusion/left/small"]  # <automatic> is not a label
    assert report.sections["indication"] == "XXXX-year-old with cough"
    assert build_prompt(report.sections) == "The heart is normal in size. are normal. No acute disease."
    assert build_prompt(report.sections, ["impression", "indication"]) == "No acute disease. -year-old with cough"


@pytest.mark.parametrize("findings, impression, expected", [
    ("Heart normal.", "No acute disease.", "Heart normal. No acute disease."),
    (None, "Normal chest x-XXXX.", "Normal chest x-."),  # missing FINDINGS section text
    ("Lungs   are\n clear .", None, "Lungs are clear."),  # missing IMPRESSION, messy whitespace
    ("XXXX.", "XXXX XXXX.", ""),  # only placeholders: no usable text
    (None, None, ""),
])
def test_findings_impression_combinations(tmp_path, findings, impression, expected):
    path = _write(tmp_path, "7.xml", report_xml("CXR7", findings=findings, impression=impression, images=["a"]))
    assert build_prompt(parse_report(path).sections) == expected


def test_clean_text_removes_placeholders_and_collapses_space():
    assert clean_text("  No XXXX  XXXX.\tHeart  size normal , mediastinum  XXXX. ") == \
        "No. Heart size normal, mediastinum."
    assert clean_text("XXXX") == ""


def test_source_records_rejects_and_counts(tmp_path):
    root = make_iu_tree(tmp_path / "iu", n_reports=4, images_per_report=2, missing=["CXR2_1_IM-0002-1002"])
    _write(tmp_path / "iu", "5.xml", report_xml("CXR5", findings="XXXX.", impression=None, images=["CXR5_x"]))
    write_png(tmp_path / "iu" / "png" / "CXR5_x.png")
    _write(tmp_path / "iu", "6.xml", report_xml("CXR6", findings="Clear lungs.", images=[]))
    _write(tmp_path / "iu", "8.xml", "<eCitation><uId id='CXR8'/>")  # broken XML
    source = IUXraySource([root])
    records = list(source.records())
    assert len(records) == 7  # 4 reports x 2 images, one missing
    assert {r.group for r in records} == {"CXR1", "CXR2", "CXR3", "CXR4"}
    first = records[0]
    assert first.uid == "CXR1_1_IM-0001-1001" and first.source == "iu-xray"
    assert first.prompt == "Finding number 1. Heart normal. Impression 1."
    assert first.labels == ["Pleural Effusion/left/small"]
    reasons = {(ident, reason) for ident, reason, _ in source.rejected()}
    assert reasons == {("CXR2_1_IM-0002-1002", "missing_image"), ("5.xml", "empty_report"),
                       ("6.xml", "no_images"), ("8.xml", "bad_xml")}
    assert source.summary() == {"reports_seen": 7, "reports_used": 4, "images_listed": 8,
                                "images_found": 7, "images_missing": 1}
    assert source.load(first).shape == (40, 32)


def test_numeric_report_order_and_bad_inputs(tmp_path):
    for n in (10, 2, 1):
        _write(tmp_path, f"{n}.xml", report_xml(f"CXR{n}", findings="Clear.", images=[f"I{n}"]))
        write_png(tmp_path / f"I{n}.png")
    assert [r.group for r in IUXraySource([tmp_path]).records()] == ["CXR1", "CXR2", "CXR10"]
    with pytest.raises(DataError, match="no ecgen-radiology"):
        list(IUXraySource([tmp_path / "empty"]).records())
    with pytest.raises(DataError, match="unknown report field"):
        IUXraySource([tmp_path], fields=["conclusion"])
