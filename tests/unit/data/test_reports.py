"""Report section parsing shared by every source, on report texts written for these tests in the structure of
MIMIC-CXR's free-text reports (header block, headed sections, wet reads, addenda, `___` markers)."""
from __future__ import annotations

import pytest

from cxrdist.data.reports import build_prompt, check_sections, clean_text, report_prompt, split_sections
from cxrdist.errors import DataError

FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

WET_READ = """WET READ: ___ ___ 4:12 PM
  Possible small left effusion.
 ______________________________________________________________________________
                                 FINAL REPORT
 INDICATION:  History: ___M with chest pain
 FINDINGS AND IMPRESSION:  Heart size is normal. Small left pleural effusion.
"""

ADDENDUM_FIRST = """                                 FINAL ADDENDUM
 ADDENDUM:  Findings were discussed with Dr. ___ at 10:00.
 IMPRESSION:  Called to the team.
 ______________________________________________________________________________
                                 FINAL REPORT
 PA AND LATERAL CHEST ___

 Lungs are clear.

 Stable mild cardiomegaly.
"""

ADDENDUM_LAST = """FINDINGS:  Lungs are clear.
IMPRESSION:  Normal chest.

ADDENDUM:  The comparison study was from ___.
"""


def test_full_report_sections_and_default_prompt():
    report = split_sections(FULL)
    assert set(report.sections) == {"examination", "indication", "technique", "comparison", "findings",
                                    "impression"}
    assert report_prompt(FULL) == ("There is no focal consolidation, pleural effusion or pneumothorax. Bilateral "
                                   "nodular opacities most likely represent nipple shadows. No acute "
                                   "cardiopulmonary process.")
    assert report_prompt(FULL, ["impression", "indication"]) == \
        "No acute cardiopulmonary process. F with new onset ascites // eval for infection"
    assert report_prompt(FULL, ["comparison"]) == ""  # only a de-identification marker: no words


@pytest.mark.parametrize("text", [
    "Findings: Lungs are clear.\nImpression: Normal chest.\n",
    "findings: Lungs are clear.\nimpression: Normal chest.\n",
    "  FINDINGS:Lungs are clear.\n  IMPRESSION :  Normal chest.",
    "FINDINGS: Lungs are clear. IMPRESSION: Normal chest.",  # flattened to one line
    "Findings: Lungs are clear. Impression: Normal chest.",
    "Findings:\n\nLungs are clear.\n\nConclusion:\nNormal chest.",
])
def test_headings_in_any_case_and_layout(text):
    assert report_prompt(text) == "Lungs are clear. Normal chest."


def test_mixed_case_words_before_a_colon_are_text():
    text = "FINDINGS: Heart size: normal.\nNote: lungs clear.\nIMPRESSION: Normal."
    assert report_prompt(text) == "Heart size: normal. Note: lungs clear. Normal."


def test_unknown_upper_case_heading_ends_the_section():
    text = "IMPRESSION: No pneumothorax.\nNOTIFICATION: Dr. ___ was paged at 10:15.\n"
    assert report_prompt(text) == "No pneumothorax."
    assert split_sections(text).sections["notification"].startswith("Dr.")


def test_combined_findings_and_impression_is_used_once():
    assert report_prompt(WET_READ) == "Heart size is normal. Small left pleural effusion."
    assert report_prompt(WET_READ, ["impression"]) == "Heart size is normal. Small left pleural effusion."
    both = "FINDINGS: Lungs clear.\nFINDINGS/IMPRESSION: Stable.\n"
    assert report_prompt(both) == "Lungs clear. Stable."  # the combined one fills the missing impression


def test_wet_read_is_its_own_section():
    report = split_sections(WET_READ)
    assert report.sections["wet_read"] == "Possible small left effusion."
    assert report.sections["indication"] == "History: ___M with chest pain"
    assert report_prompt(WET_READ, ["wet_read"]) == "Possible small left effusion."
    pfi = "PROVISIONAL FINDINGS IMPRESSION (PFI): ___ ___ no pneumonia\n\nFINAL REPORT\nIMPRESSION: Clear lungs."
    assert report_prompt(pfi) == "Clear lungs."


def test_addenda_stay_out_of_findings_and_impression():
    assert report_prompt(ADDENDUM_FIRST) == ""  # no FINDINGS / IMPRESSION in the final report
    assert report_prompt(ADDENDUM_FIRST, fallback=True) == "Stable mild cardiomegaly."
    assert report_prompt(ADDENDUM_FIRST, ["addendum"]) == \
        "Findings were discussed with Dr. at 10:00. Called to the team."
    assert report_prompt(ADDENDUM_LAST) == "Lungs are clear. Normal chest."
    assert report_prompt(ADDENDUM_LAST, ["addendum"]) == "The comparison study was from."


def test_fallback_takes_the_last_descriptive_paragraph_only():
    assert report_prompt("Portable chest.\n\nNo change in the left effusion.", fallback=True) == \
        "No change in the left effusion."
    assert report_prompt("Portable chest.\n\nNo change.") == ""  # fallback off
    assert report_prompt("EXAMINATION: Chest.\nCOMPARISON: ___.", fallback=True) == ""
    assert report_prompt("COMPARISON: None.\n\nLungs are clear.", fallback=True) == "Lungs are clear."
    assert report_prompt("FINDINGS: Clear.\n\nSomething else.", fallback=True) == "Clear. Something else."


def test_missing_sections_and_de_identification():
    assert report_prompt("") == "" and report_prompt("   \n") == ""
    assert report_prompt("INDICATION: cough.") == ""
    assert clean_text("Compared to ___, the XXXX  is stable , x-XXXX.") == "Compared to, the is stable, x-."
    assert build_prompt({"findings": "XXXX.", "impression": "___"}) == ""
    assert build_prompt({"findings": "Clear.", "impression": "Normal."}, ["impression", "findings"]) == \
        "Normal. Clear."


def test_unknown_section_names_are_one_clear_error():
    assert check_sections(["Findings", " impression "]) == ("findings", "impression")
    with pytest.raises(DataError, match="unknown report section.*conclusion.*choose from findings"):
        check_sections(["findings", "conclusion"])
    with pytest.raises(DataError, match="none given"):
        check_sections([])
