"""Classifier agreement: per-finding AUROC of a classifier's scores on generated images against the labels of
the reports they were generated from (as RoentGen measures it), next to the same classifier on the real images.

A classifier is anything with `findings` (names) and `scores(images) -> (N, len(findings))`, higher meaning
more likely. `classifier(name)` builds one:
- `reader`: the phantom reader's continuous measurements (cardiothoracic ratio, height of the fluid, darkness
  of the apical band, nodule response), so the whole path runs offline on phantoms;
- `txv:WEIGHTS`: a torchxrayvision model (e.g. `txv:densenet121-res224-all`) for real radiographs.

Targets come from the MeSH-style labels (phantom labels, IU terms and the sources mapped to them): a finding is
positive when its term is listed, negative when the study has labels without it, unknown (skipped) otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Nodule")


def finding_targets(labels: list[str]) -> dict[str, float]:
    """1.0 / 0.0 / nan (unknown) per finding, from one study's MeSH-style labels. A study without labels is
    unknown for every finding; a listed term is positive whatever its qualifiers say (an effusion without a
    side is still an effusion); a borderline heart is unknown."""
    if not labels:
        return {f: math.nan for f in FINDINGS}
    terms = {}
    for label in labels:
        term, *qualifiers = [part.strip().lower() for part in label.split("/")]
        terms.setdefault(term, []).extend(qualifiers)
    out = {f: float(f.lower() in terms) for f in FINDINGS}
    if "borderline" in terms.get("cardiomegaly", []):
        out["Cardiomegaly"] = math.nan
    return out


def targets_from_labels(labels: list[list[str]], findings: tuple[str, ...]) -> np.ndarray:
    rows = [finding_targets(lab) for lab in labels]
    return np.array([[row.get(f, math.nan) for f in findings] for row in rows], dtype=float).reshape(-1, len(findings))


@dataclass
class Classifier:
    name: str
    findings: tuple[str, ...]
    scores: Callable[[np.ndarray], np.ndarray]  # (N, H, W) in [0, 1] -> (N, len(findings))


def reader_classifier() -> Classifier:
    from cxrdist.metrics.reader import measure

    def scores(images: np.ndarray) -> np.ndarray:
        out = []
        for img in images:
            m = measure(img)
            if "ctr" not in m:  # unreadable: the least likely score for every finding
                out.append([-math.inf] * len(FINDINGS))
                continue
            out.append([m["ctr"], -min(m["effusion_base_left"], m["effusion_base_right"]),
                        -min(m["pneumothorax_left"], m["pneumothorax_right"]), m["nodule_response"]])
        return np.array(out, dtype=float).reshape(-1, len(FINDINGS))

    return Classifier("reader", FINDINGS, scores)


# Our finding names -> torchxrayvision's pathology names.
TXV_NAMES = {"Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Effusion", "Pneumothorax": "Pneumothorax",
             "Nodule": "Nodule"}


def txv_classifier(weights: str) -> Classifier:
    from cxrdist.metrics.features import load_txv, txv_input

    net = load_txv(weights, f"--classifier txv:{weights}")
    columns = {ours: net.pathologies.index(theirs) for ours, theirs in TXV_NAMES.items() if theirs in net.pathologies}
    findings = tuple(columns)

    @torch.no_grad()
    def scores(images: np.ndarray) -> np.ndarray:
        x = txv_input(torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None])
        out = torch.cat([net(x[i : i + 32]) for i in range(0, len(x), 32)]).numpy()
        return out[:, [columns[f] for f in findings]]

    return Classifier(f"txv:{weights}", findings, scores)


def classifier(name: str) -> Classifier:
    kind, _, arg = name.partition(":")
    if kind == "reader" and not arg:
        return reader_classifier()
    if kind == "txv" and arg:
        return txv_classifier(arg)
    raise ValueError(f"--classifier {name!r} is not known: use reader (phantoms) or txv:WEIGHTS")


def auroc(scores: np.ndarray, targets: np.ndarray) -> dict:
    """AUROC (torchmetrics) with the Hanley-McNeil standard error; None when one class is missing."""
    from torchmetrics.functional.classification import binary_auroc

    keep = ~np.isnan(targets)
    s, t = scores[keep], targets[keep]
    pos, neg = int(t.sum()), int(len(t) - t.sum())
    if pos == 0 or neg == 0:
        return {"auroc": None, "se": None, "n_positive": pos, "n_negative": neg}
    finite = np.where(np.isfinite(s), s, np.nanmin(np.where(np.isfinite(s), s, np.inf)) - 1.0)
    a = float(binary_auroc(torch.from_numpy(finite).double(), torch.from_numpy(t).long()))
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt(max(0.0, a * (1 - a) + (pos - 1) * (q1 - a * a) + (neg - 1) * (q2 - a * a)) / (pos * neg))
    return {"auroc": a, "se": se, "n_positive": pos, "n_negative": neg}


def classifier_agreement(clf: Classifier, generated: np.ndarray, real: np.ndarray | None,
                         labels: list[list[str]]) -> dict:
    """{finding: {"generated": auroc dict, "real": auroc dict}} and the macro mean over findings scored."""
    targets = targets_from_labels(labels, clf.findings)
    gen_scores = clf.scores(generated)
    real_scores = clf.scores(real) if real is not None else None
    per = {}
    for j, finding in enumerate(clf.findings):
        per[finding] = {"generated": auroc(gen_scores[:, j], targets[:, j])}
        if real_scores is not None:
            per[finding]["real"] = auroc(real_scores[:, j], targets[:, j])
    values = [v["generated"]["auroc"] for v in per.values() if v["generated"]["auroc"] is not None]
    return {"classifier": clf.name, "findings": per, "macro_auroc": float(np.mean(values)) if values else None}
