"""Attributes from MeSH-style labels (phantom and IU) and from report text."""
from __future__ import annotations

from cxrdist.metrics.attributes import UNKNOWN, attributes_from_labels, attributes_from_report, normal_attributes


def test_normal_and_unknown_terms():
    assert attributes_from_labels(["normal"]) == normal_attributes()
    assert attributes_from_labels(["Calcified Granuloma/lung/upper lobe/right", "Spondylosis/thoracic vertebrae"]) \
        == normal_attributes()


def test_iu_style_terms():
    a = attributes_from_labels(["Cardiomegaly/mild", "Pleural Effusion/bilateral/small", "Pneumothorax/right/apex",
                                "Nodule/lung/upper lobe/left"])
    assert a["heart"] == "enlarged" and a["heart_severity"] == "mild"
    assert a["effusion_left"] == a["effusion_right"] == "yes" and a["effusion_left_size"] == "small"
    assert a["pneumothorax_right"] == "yes" and a["pneumothorax_left"] == "no"
    assert a["nodule"] == "left upper"
    assert attributes_from_labels(["Nodule/lung/base/right"])["nodule"] == "right lower"
    assert attributes_from_labels(["Nodule/lingula/left"])["nodule"] == "left middle"


def test_terms_that_do_not_say_become_unknown():
    a = attributes_from_labels(["Pleural Effusion", "Cardiomegaly/borderline", "Nodule/lung"])
    assert a["effusion_left"] == a["effusion_right"] == a["heart"] == a["nodule"] == UNKNOWN
    two = attributes_from_labels(["Nodule/left/upper lobe", "Nodule/right/base"])
    assert two["nodule"] == UNKNOWN  # one zone per study
    assert attributes_from_labels(["Cardiomegaly"])["heart_severity"] == UNKNOWN


def test_report_text_with_negations_and_mixed_sizes():
    a = attributes_from_report("The heart is moderately enlarged. No pulmonary nodule. Small right and large left "
                               "pleural effusions. No pneumothorax. Moderate cardiomegaly. Bilateral effusions.")
    assert a["heart_severity"] == "moderate"
    assert (a["effusion_right_size"], a["effusion_left_size"]) == ("small", "large")
    assert a["pneumothorax_left"] == a["pneumothorax_right"] == "no" and a["nodule"] == "none"
    b = attributes_from_report("Heart size is normal. There is a nodule in the right lung base. "
                               "No pleural effusion. Left apical pneumothorax.")
    assert b["heart"] == "normal" and b["nodule"] == "right lower" and b["pneumothorax_left"] == "yes"
    assert attributes_from_report("No cardiomegaly. No effusion or pneumothorax.") == normal_attributes()
