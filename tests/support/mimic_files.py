"""Fixture trees in the published layouts of MIMIC-CXR-JPG, MIMIC-CXR (DICOM) and CheXpert Plus: small JPEGs,
PNGs and DICOMs, the tables with their real column names, and report texts written for the tests that follow the
real section structure (header block, FINDINGS / IMPRESSION, combined sections, wet reads, addenda, `___`).

Imported by the data test modules; it holds no tests itself.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from support.data_files import gradient, write_dicom

METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
LABEL_COLUMNS = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                 "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
                 "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]

STANDARD = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___M with cough  // eval for pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 Heart size is enlarged in study {study}. No pleural effusion or pneumothorax.

 IMPRESSION:

 Cardiomegaly without edema.
"""
COMBINED = """                                 FINAL REPORT
 INDICATION:  History: ___F with dyspnea
 COMPARISON:  ___.
 FINDINGS AND IMPRESSION:  Small left pleural effusion in study {study}. Heart size normal.
"""
WET_READ = """WET READ: ___ ___ 4:12 PM
  Possible right lower lobe opacity.
 ______________________________________________________________________________
                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)
 Findings:  Right lower lobe opacity in study {study}.
 Impression:  Pneumonia.
"""
ADDENDUM = """                                 FINAL ADDENDUM
 ADDENDUM:  Findings were discussed with Dr. ___ on ___.
 ______________________________________________________________________________
                                 FINAL REPORT
 CHEST RADIOGRAPH PERFORMED ON ___

 COMPARISON:  None.

 Lungs are clear in study {study}.
"""
IMPRESSION_ONLY = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 IMPRESSION:  No acute cardiopulmonary process in study {study}.
"""
TEMPLATES = (STANDARD, COMBINED, WET_READ, ADDENDUM, IMPRESSION_ONLY)
EMPTY = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 INDICATION:  ___
"""


def subject_id(i: int) -> str:
    return f"{10 + i % 10}{i:06d}"  # folders p10 .. p19, as in the release


def study_id(i: int, k: int) -> str:
    return f"5{i:04d}{k:03d}"


def dicom_id(subject: str, study: str, view: str) -> str:
    digest = hashlib.sha1(f"{subject}/{study}/{view}".encode()).hexdigest()  # 40 hex digits, as 5 x 8 in MIMIC
    return "-".join(digest[n:n + 8] for n in range(0, 40, 8))


def write_jpeg(path: Path, height: int = 64, width: int = 48, *, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(gradient(height, width, seed=seed) * 255).astype(np.uint8)).save(path, quality=90)
    return path


def write_table(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> Path:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def make_mimic_tree(root: Path, n_subjects: int = 9, studies: int = 2, *, layout: str = "jpg",
                    reports: str = "zip", test_subjects: Sequence[int] = (0, 1), gz: bool = True,
                    labels: bool = True, missing: Sequence[str] = (), corrupt: Sequence[str] = (),
                    empty_reports: Sequence[str] = (), size: tuple[int, int] = (64, 48)) -> Path:
    """Per study a frontal (PA, or AP for every third study) and a lateral image, a report (templates in turn),
    a CheXpert label row; subjects in `test_subjects` are MIMIC's test split, every third other one `validate`.
    `missing` / `corrupt` are dicom_ids whose image is left out / truncated; `empty_reports` are study ids
    whose report has no FINDINGS, IMPRESSION or last paragraph. Returns root."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".csv.gz" if gz else ".csv"
    meta, split, label_rows, records, texts = [], [], [], [], {}
    for i in range(n_subjects):
        subject = subject_id(i)
        official = "test" if i in test_subjects else ("validate" if i % 3 == 2 else "train")
        for k in range(studies):
            study = study_id(i, k)
            number = i * studies + k
            frontal = "AP" if number % 3 == 2 else "PA"
            folder = f"files/p{subject[:2]}/p{subject}/s{study}"
            for v, view in enumerate((frontal, "LATERAL")):
                dicom = dicom_id(subject, study, view)
                meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                             "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                             "Rows": size[0], "Columns": size[1], "StudyDate": "21800506", "StudyTime": "213014.531",
                             "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                             "ViewCodeSequence_CodeMeaning": {"PA": "postero-anterior", "AP": "antero-posterior"}.get(
                                 view, "lateral"),
                             "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
                split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": official})
                path = root / folder / f"{dicom}.{'jpg' if layout == 'jpg' else 'dcm'}"
                records.append({"subject_id": subject, "study_id": study, "dicom_id": dicom,
                                "path": f"{folder}/{dicom}.dcm"})
                if dicom in missing:
                    continue
                if layout == "jpg":
                    write_jpeg(path, *size, seed=number * 2 + v)
                else:
                    values = np.rint(gradient(*size, seed=number * 2 + v) * 4000).astype(np.uint16)
                    _with_view(write_dicom(path, values), view)
                if dicom in corrupt:
                    path.write_bytes(path.read_bytes()[:200])
            template = EMPTY if study in empty_reports else TEMPLATES[number % len(TEMPLATES)]
            texts[f"{folder}.txt"] = template.format(study=study)
            label_rows.append({"subject_id": subject, "study_id": study, **_labels(number)})
    if layout == "jpg":
        write_table(root / f"mimic-cxr-2.0.0-metadata{suffix}", METADATA_COLUMNS, meta)
    else:
        write_table(root / "cxr-record-list.csv.gz", ["subject_id", "study_id", "dicom_id", "path"], records)
    write_table(root / f"mimic-cxr-2.0.0-split{suffix}", ["dicom_id", "study_id", "subject_id", "split"], split)
    if labels:
        write_table(root / f"mimic-cxr-2.0.0-chexpert{suffix}", LABEL_COLUMNS, label_rows)
    _write_reports(root, texts, reports)
    return root


def _labels(number: int) -> dict[str, str]:
    row = {name: "" for name in LABEL_COLUMNS[2:]}
    if number % 2 == 0:
        row.update({"Cardiomegaly": "1.0", "Edema": "0.0", "Pleural Effusion": "-1.0"})
    else:
        row.update({"No Finding": "1.0", "Pneumothorax": "0.0"})
    return row


def _with_view(path: Path, view: str) -> Path:
    import pydicom

    ds = pydicom.dcmread(str(path))
    ds.ViewPosition = view
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _write_reports(root: Path, texts: dict[str, str], how: str) -> None:
    if how == "folder":  # extracted beside the images, as in the DICOM release
        for name, text in texts.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text, encoding="utf-8")
        return
    prefix = "mimic-cxr-reports/" if how == "zip-nested" else ""
    with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as archive:
        for name, text in sorted(texts.items()):
            archive.writestr(prefix + name, text)


def expected_prompt(number: int, study: str) -> str:
    """The default (findings, impression) prompt of the report written for study `number`."""
    return [f"Heart size is enlarged in study {study}. No pleural effusion or pneumothorax. Cardiomegaly without "
            "edema.", f"Small left pleural effusion in study {study}. Heart size normal.",
            f"Right lower lobe opacity in study {study}. Pneumonia.", "",
            f"No acute cardiopulmonary process in study {study}."][number % len(TEMPLATES)]


CHEXPERT_PLUS_COLUMNS = ["path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
                         "patient_report_date_order", "report", "section_narrative", "section_clinical_history",
                         "section_history", "section_comparison", "section_technique", "section_procedure_comments",
                         "section_findings", "section_impression", "section_end_of_impression", "section_summary",
                         "section_accession_number", "age", "sex", "race", "ethnicity", "interpreter_needed",
                         "insurance_type", "recent_bmi", "deceased", "split"]


def make_chexpert_plus_tree(root: Path, n_patients: int = 8, *, valid_patients: Sequence[int] = (0, 1),
                            dicom: bool = False, missing: Sequence[str] = (), size: tuple[int, int] = (64, 48)) -> Path:
    """PNG/<split>/patientNNNNN/study1/view1_frontal.png + view2_lateral.png (and DICOM/... .dcm when `dicom`),
    and df_chexpert_plus_240401.csv. The table names the PNGs with the .jpg suffix of the original CheXpert paths.
    Patients in `valid_patients` are split `valid`. Every fourth patient's report has only a free-text `report`
    (sections empty) ending in a descriptive paragraph. Returns the table's path."""
    rows = []
    for i in range(n_patients):
        split = "valid" if i in valid_patients else "train"
        patient = f"patient{i:05d}"
        for v, (side, projection) in enumerate((("Frontal", "PA" if i % 2 else "AP"), ("Lateral", ""))):
            name = f"{split}/{patient}/study1/view{v + 1}_{side.lower()}"
            if name not in missing:
                png = root / "PNG" / f"{name}.png"
                png.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.rint(gradient(*size, seed=i * 2 + v) * 255).astype(np.uint8)).save(png)
                if dicom:
                    values = np.rint(gradient(*size, seed=i * 2 + v) * 4000).astype(np.uint16)
                    write_dicom(root / "DICOM" / f"{name}.dcm", values)
            free_text_only = i % 4 == 3
            findings = "" if free_text_only else f"Heart size normal for patient {i}. No ___ effusion."
            impression = "" if free_text_only else "No acute disease."
            report = (f"NARRATIVE:\nCHEST 2 VIEWS\n\nCOMPARISON: None.\n\nMild cardiomegaly in patient {i}."
                      if free_text_only else f"FINDINGS: {findings}\nIMPRESSION: {impression}")
            rows.append({"path_to_image": f"{name}.jpg", "path_to_dcm": f"{name}.dcm", "frontal_lateral": side,
                         "ap_pa": projection, "deid_patient_id": patient, "patient_report_date_order": "1",
                         "report": report, "section_findings": findings, "section_impression": impression,
                         "section_clinical_history": f"Cough, patient {i}.", "split": split})
    return write_table(root / "df_chexpert_plus_240401.csv", CHEXPERT_PLUS_COLUMNS,
                       [{k: row.get(k, "") for k in CHEXPERT_PLUS_COLUMNS} for row in rows])
