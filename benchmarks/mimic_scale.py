"""Scale of the MIMIC-CXR source: a synthetic tree in the MIMIC-CXR-JPG layout, sharded with 1 and N workers.

The tree has the published tables (metadata, split, chexpert; gzip), mimic-cxr-reports.zip and, per study, a PA
and a lateral JPEG (so half the rows are filtered by --views, as in the real set). Images are 1,024 x 1,248 px by
default (the real ones are about 2,500 px; `--height` to change), built from a few base films so that writing the
tree stays quick, each with its own noise so no two files are byte-copies. Prints images/s, images/s per core
and the parallel efficiency (rate with N workers / (N x rate with 1 worker)), all from one run.

    python benchmarks/mimic_scale.py [--n 20000] [--workers 2] [--size 256] [--height 1248]

`--list-only --rows 377000` measures memory instead: it writes only the tables and the reports zip (tiny image
files holding their own id, so nothing is decoded and none are byte-copies), every view kept (`--views all`:
one record per row, as many as MIMIC-CXR-JPG has images), findings about `--report-chars` long (MIMIC's
FINDINGS + IMPRESSION run to a few hundred characters), then reads the source as a build does
(cxrdist.data.listing: a first reading keeps one key per record, a second streams the Records into shards,
here without decoding) and prints the peak RSS (resource.getrusage)
after each reading and the bytes per record. The tree is written by a forked child, so the peak is the
build's record handling alone.

    python benchmarks/mimic_scale.py --list-only [--rows 377000] [--report-chars 600]
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


def write_layout(root: Path, n_images: int, image_shape: tuple[int, int], write_image, report_text) -> Path:
    """The MIMIC-CXR-JPG layout of `n_images` (a PA and a lateral a study, two studies a subject, every tenth
    subject in the official test split): `write_image(path, number)` writes each image file, `report_text(study)`
    gives each study's report; the metadata, split and chexpert tables (gzip) and mimic-cxr-reports.zip."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.mimic_files import (LABEL_COLUMNS, METADATA_COLUMNS, dicom_id, study_id, subject_id,
                                     write_table)

    meta, split, labels = [], [], []
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as reports:
        for number in range(max(1, n_images // 2)):
            i, k = number // 2, number % 2
            subject, study = subject_id(i), study_id(i, k)
            folder = root / f"files/p{subject[:2]}/p{subject}/s{study}"
            folder.mkdir(parents=True, exist_ok=True)
            for view in ("PA", "LATERAL"):
                dicom = dicom_id(subject, study, view)
                write_image(folder / f"{dicom}.jpg", number)
                meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view,
                             "Rows": image_shape[0], "Columns": image_shape[1]})
                split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject,
                              "split": "test" if i % 10 == 0 else "train"})
            reports.writestr(f"files/p{subject[:2]}/p{subject}/s{study}.txt", report_text(study))
            labels.append({"subject_id": subject, "study_id": study, "Cardiomegaly": "1.0" if number % 2 else "-1.0"})
    write_table(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, meta)
    write_table(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split)
    write_table(root / "mimic-cxr-2.0.0-chexpert.csv.gz", LABEL_COLUMNS, labels)
    return root


def build_tree(root: Path, n_images: int, height: int) -> Path:
    """Real JPEGs: a few base films, each image with its own noise so no two files are byte-copies."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.mimic_files import STANDARD

    width = int(height * 0.82)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bases = [0.45 + 0.3 * np.sin(xx / width * np.pi) * np.cos((yy / height - 0.5) * np.pi) * (0.8 + 0.1 * k)
             + 0.05 * np.sin(yy / (20 + 5 * k)) for k in range(4)]

    def write_film(path: Path, number: int) -> None:
        noise = rng.normal(0, 0.01, size=(-(-height // 8), -(-width // 8))).astype(np.float32)
        film = bases[number % 4] + np.kron(noise, np.ones((8, 8), dtype=np.float32))[:height, :width]
        Image.fromarray(np.rint(np.clip(film, 0, 1) * 255).astype(np.uint8)).save(path, quality=90)

    return write_layout(root, n_images, (height, width), write_film, lambda study: STANDARD.format(study=study))


FINDINGS = ("The lungs are clear without focal consolidation, effusion or pneumothorax. The cardiomediastinal "
            "silhouette is within normal limits. Mild degenerative changes of the thoracic spine. ")


def build_tables(root: Path, n_rows: int, report_chars: int) -> Path:
    """The tables and reports zip of `n_rows` images and a tiny file per image: what listing reads, without
    pixels. Each file holds its own path, so none are byte-copies."""
    body = (FINDINGS * (report_chars // len(FINDINGS) + 1))[:report_chars]
    return write_layout(root, n_rows, (3050, 2500), lambda path, number: path.write_text(path.stem),
                        lambda study: f" FINDINGS:\n\n Study {study}. {body}\n\n IMPRESSION:\n\n No acute process.\n")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def list_memory(rows: int, report_chars: int) -> None:
    import multiprocessing
    import sys

    from cxrdist.data.listing import list_records
    from cxrdist.data.sharding.options import ShardOptions
    from cxrdist.data.sharding.splits import assign_splits, filled_shards
    from cxrdist.data.sources.mimic_cxr import MimicCXRSource

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mimic-cxr-jpg"
        started = time.perf_counter()
        child = multiprocessing.get_context("fork").Process(target=build_tables, args=(root, rows, report_chars))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"writing the tables failed (exit code {child.exitcode})")
        print(f"tables, reports zip and {rows} tiny image files written in {time.perf_counter() - started:.0f} s")
        source = MimicCXRSource(root, views="all")
        before = _peak_rss_bytes()
        started = time.perf_counter()
        listing = list_records(source, workers=1)
        listed_in = time.perf_counter() - started
        after_listing = _peak_rss_bytes()
        n = len(listing.keys)
        sampled = listing.keys[:20000]
        key_bytes = sum(sys.getsizeof(k) + sum(sys.getsizeof(x) for x in k) for k in sampled) / max(len(sampled), 1)
        print(f"first reading: {n} record keys ({len(listing.rejects)} rejected) in {listed_in:.1f} s, peak RSS "
              f"{after_listing / 2**20:.0f} MiB (+{(after_listing - before) / 2**20:.0f} MiB, "
              f"{(after_listing - before) / max(n, 1):.0f} bytes per record; a key alone is {key_bytes:.0f})")
        options = ShardOptions(folds=5, official_split=True, shard_size=1000)
        assignment = assign_splits([k.group for k in listing.keys], options.folds, None, options.seed,
                                   {k.group for k in listing.keys if k.split == "test"})
        started = time.perf_counter()
        shards = streamed = 0
        for _, records in filled_shards(listing.stream(source), assignment, options):
            shards, streamed = shards + 1, streamed + len(records)
        peak = _peak_rss_bytes()
        print(f"second reading: {streamed} records in {shards} shards of {options.shard_size} (no images) in "
              f"{time.perf_counter() - started:.1f} s, peak RSS {peak / 2**20:.0f} MiB "
              f"(+{(peak - before) / 2**20:.0f} MiB over the whole build's record handling)")


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
    shard_flags = {"n": 20000, "workers": os.cpu_count() or 1, "size": 256, "height": 1248}
    list_flags = {"rows": 377000, "report_chars": 600}
    parser.add_argument("--n", type=int, help="images in the tree (half frontal) [20000]")
    parser.add_argument("--workers", type=int, help="[all cores]")
    parser.add_argument("--size", type=int, help="[256]")
    parser.add_argument("--height", type=int, help="[1248]")
    parser.add_argument("--list-only", action="store_true",
                        help="measure the memory of listing --rows records (tables only, no images)")
    parser.add_argument("--rows", type=int, help="with --list-only: metadata rows (images) [377000]")
    parser.add_argument("--report-chars", type=int, help="with --list-only: findings length [600]")
    args = parser.parse_args()
    unused = list_flags if not args.list_only else shard_flags
    given = [f"--{name.replace('_', '-')}" for name in unused if getattr(args, name) is not None]
    if given:
        verb = "does" if len(given) == 1 else "do"
        parser.error(f"{', '.join(given)} {verb} not apply {'with' if args.list_only else 'without'} --list-only")
    for name, default in {**shard_flags, **list_flags}.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    if args.list_only:
        list_memory(args.rows, args.report_chars)
        return
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
