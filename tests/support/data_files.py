"""Tiny hand-made inputs for the data tests: IU-style XML reports, PNG/TIFF/DICOM images, manifests.

Imported by the data test modules (unit and integration); it holds no tests itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from cxrdist.data.sharding.splits import assign_splits


def gradient(height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """A float image in [0, 1] with structure (ramp + blob), distinct per seed."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    blob = np.exp(-(((yy - cy) / (0.2 * height)) ** 2 + ((xx - cx) / (0.2 * width)) ** 2))
    return np.clip(0.5 * xx / max(width - 1, 1) + 0.5 * blob, 0, 1).astype(np.float32)


def write_png(path: Path, height: int = 40, width: int = 32, *, seed: int = 0, bits: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = gradient(height, width, seed=seed)
    if bits == 8:
        Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(path)
    else:
        Image.fromarray(np.rint(pixels * 65535).astype(np.uint16)).save(path)
    return path


def write_dicom(path: Path, values: np.ndarray, *, photometric: str = "MONOCHROME2", slope: float = 1.0,
                intercept: float = 0.0, window: tuple[float, float] | None = None, bits: int = 12) -> Path:
    """A minimal but valid DICOM file (explicit VR little endian) holding uint16 `values`."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path.name)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "anon"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = values.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def report_xml(uid: str, *, findings: str | None = None, impression: str | None = None,
               indication: str | None = None, images: Sequence[str] = (), mesh: Sequence[str] = ()) -> str:
    """An IU/Open-i style report with the structure of the real ecgen-radiology files."""
    def section(label: str, text: str | None) -> str:
        return f'<AbstractText Label="{label}">{text}</AbstractText>' if text is not None \
            else f'<AbstractText Label="{label}"/>'

    majors = "".join(f"<major>{term}</major>" for term in mesh)
    parents = "".join(
        f'<parentImage id="{image}"><figureId>F{i + 1}</figureId><caption>Xray Chest PA and Lateral</caption>'
        f'<panel type="single"><url>/hadoop/storage/radiology/extract/{image}.jpg</url></panel></parentImage>'
        for i, image in enumerate(images))
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<eCitation><meta type="rr"/><uId id="{uid}"/><pmcId id="{uid[3:]}"/><docSource>CXR</docSource>'
        '<MedlineCitation Owner="Indiana University" Status="supplied"><Article PubModel="Electronic">'
        '<Journal><JournalIssue><PubDate><Year>2013</Year></PubDate></JournalIssue></Journal>'
        '<ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle><Abstract>'
        f'{section("COMPARISON", "None.")}{section("INDICATION", indication)}'
        f'{section("FINDINGS", findings)}{section("IMPRESSION", impression)}'
        '</Abstract></Article></MedlineCitation>'
        f'<MeSH>{majors}<automatic>normal</automatic></MeSH>{parents}</eCitation>\n'
    )


def make_iu_tree(root: Path, n_reports: int = 6, images_per_report: int = 2, *, missing: Sequence[str] = (),
                 corrupt: Sequence[str] = (), size: tuple[int, int] = (40, 32)) -> Path:
    """ecgen-radiology/<n>.xml + png/<image>.png, every report with text; returns root."""
    reports, pngs = root / "ecgen-radiology", root / "png"
    reports.mkdir(parents=True, exist_ok=True)
    labels = ["Cardiomegaly/mild", "Pleural Effusion/left/small", "normal"]
    for n in range(1, n_reports + 1):
        images = [f"CXR{n}_1_IM-{n:04d}-{1001 + k}" for k in range(images_per_report)]
        xml = report_xml(f"CXR{n}", findings=f"Finding number {n}. Heart XXXX normal.",
                         impression=f"Impression {n}.", images=images, mesh=[labels[n % 3]])
        (reports / f"{n}.xml").write_text(xml, encoding="utf-8")
        for k, image in enumerate(images):
            if image in missing:
                continue
            path = write_png(pngs / f"{image}.png", *size, seed=n * 10 + k)
            if image in corrupt:
                path.write_bytes(path.read_bytes()[:60])  # truncated: header survives, data does not
    return root


def pack_iu_archives(tree: Path, folder: Path) -> Path:
    """The two Open-i downloads (NLMCXR_png.tgz, NLMCXR_reports.tgz) made from a `make_iu_tree` folder."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "NLMCXR_png.tgz", "w:gz") as tar:
        tar.add(tree / "png", arcname=".")
    with tarfile.open(folder / "NLMCXR_reports.tgz", "w:gz") as tar:
        tar.add(tree / "ecgen-radiology", arcname="ecgen-radiology")
    return folder


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        import csv

        keys = sorted({key for row in rows for key in row})
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    return path


def make_manifest_set(root: Path, n_groups: int = 12, per_group: int = 2, *, corrupt: Sequence[int] = (),
                      size: tuple[int, int] = (48, 36)) -> Path:
    """PNGs (every third one 16-bit) + a CSV manifest; indices in `corrupt` are truncated files."""
    rows = []
    labels = ["Cardiomegaly/mild", "Pleural Effusion/left/small", "normal"]
    for g in range(n_groups):
        for k in range(per_group):
            i = g * per_group + k
            path = write_png(root / "img" / f"im{i:03d}.png", *size, seed=i, bits=16 if i % 3 == 0 else 8)
            if i in corrupt:
                path.write_bytes(path.read_bytes()[:70])
            rows.append({"image": f"img/im{i:03d}.png", "group": f"patient{g:02d}",
                         "report": f"Report for patient {g}. View {k}.", "view": "PA" if k == 0 else "LATERAL",
                         "labels": labels[g % 3]})
    return write_manifest(root / "manifest.csv", rows)


def tar_members(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return tar.getnames()


def tar_metas(path: Path) -> list[dict]:
    import tarfile

    with tarfile.open(path) as tar:
        return [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]


def fill_disk_at_shard(monkeypatch, n: int) -> list[str]:
    """Make the shard builder's n-th tar write fail with ENOSPC (a full disk); returns the names it was asked to
    write, in order."""
    import errno

    from cxrdist.data.sharding import writer as shard_writer

    real_write, calls = shard_writer.write_tar, []

    def failing_write(path, samples):
        calls.append(path.name)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, samples)

    monkeypatch.setattr(shard_writer, "write_tar", failing_write)
    return calls


# Build options of the shard builder's unit tests (and of leaky_manifest's split): 32 px images, 3 folds, a quarter
# of the groups for test, shards of 4 samples, one worker, no progress output.
SHARD_OPTS = dict(size=32, folds=3, test_fraction=0.25, seed=0, shard_size=4, workers=1, progress=False)


def _row(image: str, group: str) -> dict:
    return {"image": image, "group": group, "report": f"Report of {group}.", "view": "PA", "labels": "normal"}


def _other_split_group(groups: list[str], original: str, suffix: str) -> str:
    """A new group id that the seeded split puts in another split than `original`: without deduplication the
    duplicate would sit in two splits. (The shuffle permutes sorted ids, so the candidates must sort at
    different places: `patient03<suffix>` sorts right after patient03.)"""
    for n in range(8):
        candidate = f"patient{n:02d}{suffix}"
        split = assign_splits(groups + [candidate], SHARD_OPTS["folds"], SHARD_OPTS["test_fraction"], SHARD_OPTS["seed"])
        if split[candidate] != split[original]:
            return candidate
    raise AssertionError("no group id lands in another split")


def leaky_manifest(root: Path) -> Path:
    rows = []
    for i in range(16):  # 8 patients x 2 images, all distinct
        write_png(root / "img" / f"im{i:03d}.png", 48, 36, seed=i)
        rows.append(_row(f"img/im{i:03d}.png", f"patient{i // 2:02d}"))
    groups = sorted({r["group"] for r in rows})
    # the same file under another patient id, and again spelled another way
    groups.append(_other_split_group(groups, "patient00", "relisted"))
    rows.append(_row("img/im000.png", groups[-1]))
    groups.append(_other_split_group(groups, "patient01", "respelled"))
    rows.append(_row("img/../img/im003.png", groups[-1]))
    # a byte-copy under another name and patient
    (root / "img" / "copy_of_im004.png").write_bytes((root / "img" / "im004.png").read_bytes())
    groups.append(_other_split_group(groups, "patient02", "copied"))
    rows.append(_row("img/copy_of_im004.png", groups[-1]))
    # a symbolic link to another image
    os.symlink(root / "img" / "im006.png", root / "img" / "link_to_im006.png")
    groups.append(_other_split_group(groups, "patient03", "linked"))
    rows.append(_row("img/link_to_im006.png", groups[-1]))
    return write_manifest(root / "manifest.csv", rows)


def png_digests_by_split(out: Path, index: dict) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, split in index["splits"].items():
        for entry in split["shards"]:
            with tarfile.open(out / entry["name"]) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".png"):
                        found.setdefault(name, []).append(hashlib.sha256(tar.extractfile(member).read()).hexdigest())
    return found


def build_uneven_shard_set(root: Path) -> Path:
    """13 patients x 2 images at 32 px in shards of 3: 3 folds of 6 or 8 images in 2-3 uneven shards, and a test
    split. What the loader tests split over ranks."""
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources.manifest import ManifestSource

    build_shards(ManifestSource(make_manifest_set(root / "in", n_groups=13)), root / "out", size=32, folds=3,
                 test_fraction=0.25, seed=0, shard_size=3, workers=1, progress=False)
    return root / "out"


def loader_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["keys"]]
