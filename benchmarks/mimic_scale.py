"""Scale of the MIMIC-CXR source: a synthetic tree in the MIMIC-CXR-JPG layout, sharded with 1 and N workers.

The tree has the published tables (metadata, split, chexpert; gzip), mimic-cxr-reports.zip and, per study, a PA
and a lateral JPEG (so half the rows are filtered by --views, as in the real set). Images are 1,024 x 1,248 px by
default (the real ones are about 2,500 px; `--height` to change), built from a few base films so that writing the
tree stays quick, each with its own noise so no two files are byte-copies. Prints images/s, images/s per core
and the parallel efficiency (rate with N workers / (N x rate with 1 worker)), all from one run.

    python benchmarks/mimic_scale.py [--n 20000] [--workers 2] [--size 256] [--height 1248]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def build_tree(root: Path, n_images: int, height: int) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.mimic_files import (LABEL_COLUMNS, METADATA_COLUMNS, STANDARD, dicom_id, study_id,
                                     subject_id, write_table)

    width = int(height * 0.82)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bases = [0.45 + 0.3 * np.sin(xx / width * np.pi) * np.cos((yy / height - 0.5) * np.pi) * (0.8 + 0.1 * k)
             + 0.05 * np.sin(yy / (20 + 5 * k)) for k in range(4)]
    meta, split, labels = [], [], []
    root.mkdir(parents=True, exist_ok=True)
    reports = zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w")
    n_studies = max(1, n_images // 2)
    for number in range(n_studies):
        i, k = number // 2, number % 2
        subject, study = subject_id(i), study_id(i, k)
        folder = root / f"files/p{subject[:2]}/p{subject}/s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        for view in ("PA", "LATERAL"):
            dicom = dicom_id(subject, study, view)
            noise = rng.normal(0, 0.01, size=(-(-height // 8), -(-width // 8))).astype(np.float32)
            film = bases[number % 4] + np.kron(noise, np.ones((8, 8), dtype=np.float32))[:height, :width]
            Image.fromarray(np.rint(np.clip(film, 0, 1) * 255).astype(np.uint8)).save(folder / f"{dicom}.jpg",
                                                                                     quality=90)
            meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view,
                         "Rows": height, "Columns": width})
            split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject,
                          "split": "test" if i % 10 == 0 else "train"})
        reports.writestr(f"files/p{subject[:2]}/p{subject}/s{study}.txt", STANDARD.format(study=study))
        labels.append({"subject_id": subject, "study_id": study, "Cardiomegaly": "1.0" if number % 2 else "-1.0"})
    reports.close()
    write_table(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, meta)
    write_table(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split)
    write_table(root / "mimic-cxr-2.0.0-chexpert.csv.gz", LABEL_COLUMNS, labels)
    return root


def shard_rate(root: Path, out: Path, size: int, workers: int) -> tuple[float, float, int]:
    """(images/s of the whole build, seconds spent listing records, images written)."""
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources.mimic_cxr import MimicCXRSource

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    source = MimicCXRSource(root)
    n = sum(1 for _ in source.records())
    listing = time.perf_counter() - started
    start = time.perf_counter()
    index = build_shards(source, out, size=size, folds=5, shard_size=1000, workers=workers, progress=False)
    return index["counts"]["written"] / (time.perf_counter() - start), listing, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="images in the tree (half frontal)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--height", type=int, default=1248)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        root = build_tree(Path(tmp) / "mimic-cxr-jpg", args.n, args.height)
        seconds = time.perf_counter() - started
        print(f"tree: {args.n} JPEGs of {int(args.height * 0.82)}x{args.height} px in {seconds:.0f} s")
        one, listing, n = shard_rate(root, Path(tmp) / "out1", args.size, 1)
        many, _, _ = shard_rate(root, Path(tmp) / "outN", args.size, args.workers)
        print(f"listing {n} frontal records from {args.n} rows: {listing:.2f} s")
        print("| workers | images/s | images/s per core | parallel efficiency |")
        print("|---|---|---|---|")
        print(f"| 1 | {one:.1f} | {one:.1f} | 1.00 |")
        print(f"| {args.workers} | {many:.1f} | {many / args.workers:.1f} | {many / (args.workers * one):.2f} |")


if __name__ == "__main__":
    main()
