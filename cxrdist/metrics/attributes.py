"""The attributes a faithfulness score checks, and how to get them from labels or report text.

An attribute is a small categorical fact that both a report and an image can state. The same dictionaries
come from three places: a study's labels (`attributes_from_labels`: phantom labels and IU MeSH terms), its
report (`attributes_from_report`), and its pixels (`cxrdist.metrics.reader.read_image`). Sides are the
PATIENT's. A value of "unknown" means the source does not say (e.g. "Pleural Effusion" without a side);
scores skip it.
"""
from __future__ import annotations

import re

SIDES = ("left", "right")
ZONES = ("upper", "middle", "lower")
NODULE_CLASSES = ("none",) + tuple(f"{side} {zone}" for side in SIDES for zone in ZONES)

# Primary attributes make the macro score; secondary ones (severity grades) are reported beside it.
ATTRIBUTE_CLASSES: dict[str, tuple[str, ...]] = {
    "heart": ("normal", "enlarged"),
    "effusion_left": ("no", "yes"),
    "effusion_right": ("no", "yes"),
    "pneumothorax_left": ("no", "yes"),
    "pneumothorax_right": ("no", "yes"),
    "nodule": NODULE_CLASSES,
}
SECONDARY_CLASSES: dict[str, tuple[str, ...]] = {
    "heart_severity": ("normal", "mild", "moderate", "severe"),
    "effusion_left_size": ("none", "small", "large"),
    "effusion_right_size": ("none", "small", "large"),
}
ATTRIBUTES = tuple(ATTRIBUTE_CLASSES)
ALL_CLASSES = {**ATTRIBUTE_CLASSES, **SECONDARY_CLASSES}
UNKNOWN = "unknown"

# Words in MeSH qualifiers and report text, mapped to our vocabulary.
SEVERITY_WORDS = {"mild": "mild", "mildly": "mild", "minimal": "mild", "small": "mild", "moderate": "moderate",
                  "moderately": "moderate", "severe": "severe", "severely": "severe", "marked": "severe",
                  "markedly": "severe", "large": "severe"}
EFFUSION_SIZE_WORDS = {"small": "small", "trace": "small", "minimal": "small", "tiny": "small", "mild": "small",
                       "large": "large", "moderate": "large", "sizable": "large", "massive": "large"}
ZONE_WORDS = {"upper": "upper", "apex": "upper", "apical": "upper", "apices": "upper", "middle": "middle",
              "mid": "middle", "midlung": "middle", "lingula": "middle", "hilum": "middle", "lower": "lower",
              "base": "lower", "bases": "lower", "basilar": "lower", "basal": "lower"}


def normal_attributes() -> dict[str, str]:
    """What a study without findings states."""
    attrs = {name: classes[0] for name, classes in ALL_CLASSES.items()}
    return attrs


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _sides(words: list[str]) -> tuple[str, ...]:
    if "bilateral" in words or "bilaterally" in words or "both" in words or "pneumothoraces" in words:
        return SIDES
    return tuple(s for s in SIDES if s in words)


def _first(words: list[str], table: dict[str, str]) -> str:
    return next((table[w] for w in words if w in table), "")


# --------------------------------------------------------------------------------------- from labels
def _apply_cardiomegaly(attrs: dict[str, str], words: list[str]) -> None:
    if "borderline" in words:  # a CTR near 0.5: neither class is honest
        attrs["heart"] = attrs["heart_severity"] = UNKNOWN
        return
    severity = _first(words, SEVERITY_WORDS)
    if attrs["heart"] != "enlarged" or severity:  # a later bare "Cardiomegaly." keeps a stated grade
        attrs["heart_severity"] = severity or UNKNOWN
    attrs["heart"] = "enlarged"


def _size_for(words: list[str], side: str) -> str:
    """The size word closest before `side` ("small right and large left"), else the first one anywhere
    ("Pleural Effusion/left/small")."""
    if side in words:
        before = [EFFUSION_SIZE_WORDS[w] for w in words[: words.index(side)] if w in EFFUSION_SIZE_WORDS]
        if before:
            return before[-1]
    return _first(words, EFFUSION_SIZE_WORDS) or UNKNOWN


def _apply_effusion(attrs: dict[str, str], words: list[str]) -> None:
    sides = _sides(words)
    for side in sides or SIDES:
        if not sides and attrs[f"effusion_{side}"] == "yes":
            continue  # "effusion" without a side adds nothing to a side already known
        size = _size_for(words, side) if sides else UNKNOWN
        if attrs[f"effusion_{side}"] != "yes" or size != UNKNOWN:  # keep a size stated earlier
            attrs[f"effusion_{side}_size"] = size
        attrs[f"effusion_{side}"] = "yes" if sides else UNKNOWN


def _apply_pneumothorax(attrs: dict[str, str], words: list[str]) -> None:
    sides = _sides(words)
    for side in sides or SIDES:
        if sides or attrs[f"pneumothorax_{side}"] != "yes":
            attrs[f"pneumothorax_{side}"] = "yes" if sides else UNKNOWN


def _apply_nodule(attrs: dict[str, str], words: list[str]) -> None:
    sides, zone = _sides(words), _first(words, ZONE_WORDS)
    value = f"{sides[0]} {zone}" if len(sides) == 1 and zone else UNKNOWN
    if attrs["nodule"] not in ("none", value):  # a second nodule elsewhere: no single zone to score
        value = UNKNOWN
    attrs["nodule"] = value


# MeSH term (first path element, lower case) -> how it sets the attributes.
LABEL_RULES = {
    "cardiomegaly": _apply_cardiomegaly,
    "pleural effusion": _apply_effusion,
    "pneumothorax": _apply_pneumothorax,
    "nodule": _apply_nodule,
}


def attributes_from_labels(labels: list[str]) -> dict[str, str]:
    """Attributes from MeSH-style labels ("Cardiomegaly/mild", "Pleural Effusion/bilateral/small",
    "Pneumothorax/right", "Nodule/left/upper lobe", "normal"). IU lists every finding of a study, so a
    finding not listed is absent; terms we do not score are ignored."""
    attrs = normal_attributes()
    for label in labels:
        term, *qualifiers = [part.strip() for part in label.split("/")]
        rule = LABEL_RULES.get(term.lower())
        if rule is not None:
            rule(attrs, _words(" ".join(qualifiers)))
    return attrs


# --------------------------------------------------------------------------------------- from text
NEGATION = re.compile(r"\b(no|without|negative for|resolved|free of)\b")
HEART_NORMAL = re.compile(r"(normal (heart|cardiac)|(heart|cardiac)[a-z ]* (normal|within normal limits)"
                          r"|cardiomediastinal silhouette is (normal|within normal limits|unremarkable))")
HEART_ENLARGED = re.compile(r"(cardiomegaly|(heart|cardiac silhouette)[a-z ]* enlarged|cardiac enlargement"
                            r"|enlarge(ment|d) of the cardiac)")


def _clauses(text: str) -> list[str]:
    return [c.strip() for c in re.split(r"[.;]", text.lower()) if c.strip()]


def attributes_from_report(text: str) -> dict[str, str]:
    """Attributes stated in report text, by simple rules: a clause mentioning a finding sets it, a negated
    clause ("No pleural effusion or pneumothorax.") clears it. Findings never mentioned count as absent."""
    attrs = normal_attributes()
    for clause in _clauses(text):
        negated = bool(NEGATION.search(clause))
        words = _words(clause)
        if HEART_ENLARGED.search(clause) and not negated:
            _apply_cardiomegaly(attrs, words)
        elif HEART_NORMAL.search(clause):
            attrs["heart"], attrs["heart_severity"] = "normal", "normal"
        if negated:
            continue  # "No X" leaves X at its default (absent); a side-specific negation needs no action either
        if "effusion" in words or "effusions" in words:
            _apply_effusion(attrs, words)
        if "pneumothorax" in words or "pneumothoraces" in words:
            _apply_pneumothorax(attrs, words)
        if any(w.startswith("nodul") for w in words):
            _apply_nodule(attrs, words)
    return attrs
