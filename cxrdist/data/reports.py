"""Radiology report text -> sections -> the prompt: one parser for every source (IU, MIMIC-CXR, CheXpert Plus,
manifest `--sections`).

A free-text report (MIMIC-CXR's `sSTUDY.txt`, a hospital export) is a header block followed by headed sections:

    WET READ: ___ ___ 4:12 PM  No acute process.            a preliminary read, before the final report
     ______________________________________________________
                                 FINAL REPORT
     EXAMINATION:  CHEST (PA AND LAT)
     INDICATION:  ___F with cough
     COMPARISON:  ___
     FINDINGS:  The heart is normal in size. ...
     IMPRESSION:  No acute cardiopulmonary process.

What the parser does with it:
- A heading is a line that starts with a known section name and a colon, in any case (`Findings:`), or with an
  unknown name in upper case (`NOTIFICATION:`), which then ends the section before it. An upper-case known
  heading is also found inside a line, for reports that were flattened to one line (`... FINDINGS: x IMPRESSION:
  y`), and so is a known heading in any case right after the end of a sentence (`... clear. Impression: y`).
  `Note: ...` or `Heart size: normal` in mixed case are text, not headings.
- `FINDINGS AND IMPRESSION:` (and `FINDINGS/IMPRESSION:`) is one combined section: it stands in for FINDINGS or
  IMPRESSION when that section is missing, and is used once even when both are asked for.
- `WET READ:` and `PROVISIONAL FINDINGS IMPRESSION (PFI):` are preliminary reads: section `wet_read`, never part
  of FINDINGS / IMPRESSION. A separator line (`____`) or `FINAL REPORT` ends them.
- Addenda (`ADDENDUM:`, or a line `FINAL ADDENDUM` / `ADDENDUM`) run until the next `FINAL REPORT` line: all of
  that text, headed parts included, is section `addendum`, so an addendum's own IMPRESSION does not merge into
  the report's.
- De-identification markers are removed: `___` (MIMIC) and `XXXX` (IU), also glued to words (`x-XXXX`).
- Headings are recognised by their English names only, but text in any language and script is kept as it is: a
  report is empty only when it holds no letter of any script (`has_words`). A report without English headings
  (a Spanish, Russian or Chinese one) is one unheaded body: a manifest without --sections takes its whole text;
  where sections are asked for, only the last-paragraph fallback can take it.
- The fallback for reports with neither FINDINGS nor IMPRESSION is the last paragraph of the report body, as the
  MIMIC-CXR reference splitter does; but not the wet read, an addendum, or the first paragraph of an INDICATION /
  COMPARISON / TECHNIQUE / EXAMINATION section (a later paragraph there, after a blank line, is unheaded body
  text and is taken).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from cxrdist.errors import DataError

# Sections a user may ask for, in the usual order of a report.
SECTIONS = ("findings", "impression", "indication", "comparison", "technique", "examination", "wet_read",
            "addendum")
DEFAULT_SECTIONS = ("findings", "impression")  # INDICATION is not visible in an image, so off by default
COMBINED = "findings_impression"  # "FINDINGS AND IMPRESSION:": stands in for either when it is missing
HEADER = "header"  # text before the first heading ("FINAL REPORT", free text of an unheaded report)

# Heading text (lower case, spaces collapsed) -> section name.
_ALIASES = {
    "findings": "findings", "finding": "findings",
    "impression": "impression", "impressions": "impression", "conclusion": "impression",
    "conclusions": "impression", "impression and recommendation": "impression",
    "impression and recommendations": "impression",
    "findings and impression": COMBINED, "findings and impressions": COMBINED, "findings/impression": COMBINED,
    "findings / impression": COMBINED, "impression and findings": COMBINED, "findings impression": COMBINED,
    "indication": "indication", "indications": "indication", "clinical indication": "indication",
    "history": "indication", "clinical history": "indication", "reason for exam": "indication",
    "reason for examination": "indication", "reason for study": "indication", "clinical information": "indication",
    "comparison": "comparison", "comparisons": "comparison", "comparison exam": "comparison",
    "technique": "technique", "examination": "examination", "exam": "examination", "procedure": "examination",
    "type of examination": "examination",
    "wet read": "wet_read", "provisional findings impression (pfi)": "wet_read",
    "provisional findings impression": "wet_read",
    "addendum": "addendum", "addenda": "addendum",
}
# Sections the last-paragraph fallback never takes its text from: not a description of the image.
_NOT_DESCRIPTIVE = {"wet_read", "addendum", "indication", "comparison", "technique", "examination"}

_LINE_HEADING = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&(),#-]{0,48}?)[ \t]*:", re.MULTILINE)
# Not preceded by a letter of any script ([^\W\d_] is a letter): "ÜFINDINGS:" is one word, not a heading.
_INLINE_HEADING = re.compile(
    r"(?<![^\W\d_])(" + "|".join(re.escape(k.upper()) for k in sorted(_ALIASES, key=len, reverse=True))
    + r")[ \t]*:")
# After the end of a sentence a known heading counts in any case: "... normal. Impression: clear."
_SENTENCE_HEADING = re.compile(
    r"[.!?;][ \t]+(" + "|".join(re.escape(k) for k in sorted(_ALIASES, key=len, reverse=True)) + r")[ \t]*:",
    re.IGNORECASE)
_BOUNDARY = re.compile(r"^[ \t]*(FINAL REPORT|PRELIMINARY REPORT|(?:FINAL )?ADDEND(?:UM|A)(?:[ \t]*#?\d+)?"
                       r"|[_=-]{10,})[ \t]*:?[ \t]*$", re.MULTILINE | re.IGNORECASE)
_VERSION = re.compile(r"\s+version\s*#?\s*\d+$")  # "WET READ VERSION #1"
_WET_READ_TIME = re.compile(r"^\s*\d{1,2}:\d{2}(?:\s*[AP]M)?\b\s*", re.IGNORECASE)  # "___ ___ 4:12 PM" left over

_DEID = re.compile(r"X{3,}|_{3,}")  # "XXXX" (IU), "___" (MIMIC): removed identifiers, also glued to words
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
_REPEATED_PUNCT = re.compile(r"([.,;:!?])(?:\s*[.,;:!?])+")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def clean_text(text: str) -> str:
    """Drop de-identification markers, collapse whitespace, tidy the punctuation the removal leaves behind."""
    text = _DEID.sub(" ", text)
    text = " ".join(text.split())
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(r"\1", text)
    return text.lstrip(" .,;:!?").strip()


def has_words(text: str) -> bool:
    """Whether the text holds a letter of any script (Unicode categories L*: Latin, Cyrillic, Greek, Arabic, CJK, ...).

    Reports come in every language (PadChest is Spanish; many national data sets are not in Latin script), so
    "empty" means no letters at all, never "no ASCII letters": digits and punctuation alone are not a report.
    """
    return any(char.isalpha() for char in text)


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be written as UTF-8 (a lone surrogate such as a JSON `"\\udcff"` escape), or None.

    Python strings may hold lone surrogates (U+D800..U+DFFF); no UTF-8 file, tar member or JSON line can, so such
    text is refused where it enters, as one record, not later in the middle of writing a shard.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
    return None


def check_sections(sections: Sequence[str], allowed: Sequence[str] = SECTIONS, option: str = "--sections") -> tuple:
    """The requested section names as a tuple; DataError naming the unknown ones and the choices otherwise."""
    chosen = tuple(s.strip().lower() for s in sections if s.strip())
    unknown = [s for s in chosen if s not in allowed]
    if unknown or not chosen:
        raise DataError(f"unknown report section(s) {', '.join(unknown) or '(none given)'} in {option}: choose "
                        f"from {', '.join(allowed)}")
    return chosen


@dataclass
class ReportSections:
    sections: dict[str, str] = field(default_factory=dict)  # section name -> raw text (repeats joined)
    last_paragraph: str = ""  # the fallback text (raw), "" when the report body has none


def _heading_name(raw: str, line_start: bool) -> str | None:
    """The section a heading opens, the unknown heading's own name, or None when `raw:` is text."""
    name = _VERSION.sub("", " ".join(raw.lower().split()))
    if name in _ALIASES:
        return _ALIASES[name]
    if line_start and raw.isupper() and len(name.split()) <= 5:
        return name  # an unknown upper-case heading (NOTIFICATION, RECOMMENDATION(S)): a section of its own
    return None


def _headings(text: str) -> list[tuple[int, int, str]]:
    """(start, end, section) of every heading and boundary line, in text order, overlaps dropped."""
    found = []
    for match in _BOUNDARY.finditer(text):
        word = match.group(1).upper()
        found.append((match.start(), match.end(), "addendum" if "ADDEND" in word else HEADER))
    for match in _LINE_HEADING.finditer(text):
        name = _heading_name(match.group(1).strip(), line_start=True)
        if name is not None:
            found.append((match.start(1), match.end(), name))
    for match in [*_INLINE_HEADING.finditer(text), *_SENTENCE_HEADING.finditer(text)]:
        found.append((match.start(1), match.end(), _ALIASES[" ".join(match.group(1).lower().split())]))
    found.sort()
    kept: list[tuple[int, int, str]] = []
    for start, end, name in found:
        if not kept or start >= kept[-1][1]:
            kept.append((start, end, name))
    return kept


def split_sections(text: str) -> ReportSections:
    """A free-text report's sections (see the module docstring for the rules)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    parts: list[tuple[str, str]] = []  # (section, raw text) in document order
    position, current, in_addendum = 0, HEADER, False
    for start, end, name in _headings(text):
        parts.append((current, text[position:start]))
        if name == "addendum":
            in_addendum = True
        elif name == HEADER and not text[start:end].strip().startswith(("_", "=", "-")):
            in_addendum = False  # FINAL REPORT / PRELIMINARY REPORT: the report proper starts (again)
        current = "addendum" if in_addendum else name
        position = end
    parts.append((current, text[position:]))
    report = ReportSections()
    for name, body in parts:
        if name == "wet_read":
            body = _WET_READ_TIME.sub("", _DEID.sub(" ", body))
        if body.strip():
            previous = report.sections.get(name)
            report.sections[name] = f"{previous}\n{body.strip()}" if previous else body.strip()
    report.last_paragraph = _last_paragraph(parts)
    return report


def _last_paragraph(parts: Sequence[tuple[str, str]]) -> str:
    for name, body in reversed(parts):
        if not has_words(clean_text(body)):
            continue
        paragraphs = [p for p in _PARAGRAPH.split(body) if has_words(clean_text(p))]
        if name in _NOT_DESCRIPTIVE and len(paragraphs) < 2:
            return ""  # the report ends in a section that does not describe the image: no fallback
        # (a paragraph after a blank line below COMPARISON: etc. is unheaded body text, and is taken)
        return paragraphs[-1].strip()
    return ""


def build_prompt(sections: Mapping[str, str], fields: Sequence[str] = DEFAULT_SECTIONS, fallback: str = "") -> str:
    """The chosen sections, cleaned, in the order given, joined by a space; a combined FINDINGS AND IMPRESSION
    section stands in (once) for a missing findings or impression; `fallback` is used when neither FINDINGS nor
    IMPRESSION (nor the combined section) has words; "" when nothing has words."""
    parts, combined_used = [], False
    for name in fields:
        text = clean_text(sections.get(name, "") or "")
        if not has_words(text) and name in ("findings", "impression") and not combined_used:
            combined = clean_text(sections.get(COMBINED, "") or "")
            if has_words(combined):
                text, combined_used = combined, True
        if has_words(text):
            parts.append(text)
    descriptive = [clean_text(sections.get(n, "") or "") for n in ("findings", "impression", COMBINED)]
    if fallback and not any(has_words(t) for t in descriptive) and has_words(clean_text(fallback)):
        parts.append(clean_text(fallback))
    return " ".join(parts)


def report_prompt(text: str, fields: Sequence[str] = DEFAULT_SECTIONS, fallback: bool = False) -> str:
    """Free-text report -> prompt: split into sections, keep `fields`, optionally the last-paragraph fallback."""
    report = split_sections(text)
    return build_prompt(report.sections, fields, report.last_paragraph if fallback else "")
