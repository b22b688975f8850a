"""Hostile-input battery: one table of bad manifests, images, archives, models, configs and flags.

Every case runs the real command (click's CliRunner on `cxrdist`, or `python launch/train.py`) and is held
to the same contract (see _robustness_helpers): a failure is a non-zero exit with one `Error: ` line naming
the thing and no traceback; a record-level problem is a counted reject in a build that succeeds; whatever
was there before (inputs, an earlier output folder) is byte-identical afterwards.
"""
from __future__ import annotations

import codecs
import json
import os
import random
import shutil
import struct
import tarfile
import tempfile
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrdist.data.sources.manifest import MAX_REPORT_BYTES, ManifestSource
from cxrdist.models.lora import METADATA_NAME, WEIGHTS_NAME
from support.data_files import (SHARD_OPTS, leaky_manifest, png_digests_by_split, write_dicom,
                                write_manifest, write_png)
from support.robustness import (Case, Ctx, Plan, good_rows, index_of, invoke, mount_tmpfs, params, rejects_of,
                                run_case, shard_manifest)
from support.trust import adapter_metadata_json, write_adapter

# ---- shared builders ---------------------------------------------------------------------------------------
def _shard_texts(out: Path) -> list[str]:
    texts = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            texts += [tar.extractfile(m).read().decode("utf-8") for m in tar.getmembers() if m.name.endswith(".txt")]
    return texts


def _spy_report_reads(ctx: Ctx) -> list[str]:
    """Every report file the manifest source opens."""
    opened: list[str] = []
    real = ManifestSource._report_file

    def spy(report_file):
        opened.append(str(report_file))
        return real(report_file)

    ctx.monkeypatch.setattr(ManifestSource, "_report_file", staticmethod(spy))
    return opened


# ---- manifests ---------------------------------------------------------------------------------------------

def _manifest_bytes(name: str, data: bytes):
    def setup(ctx: Ctx) -> Plan:
        root = ctx.tmp / "in"
        root.mkdir()
        (root / name).write_bytes(data)
        out = ctx.tmp / "out"
        return Plan(shard_manifest(root / name, out), keep=[root], absent=[out])
    return setup


NON_UTF8_CSV = "image,group,report\na.png,g1,ok\nb.png,g2,caf\xe9\n".encode("latin-1")
NON_UTF8_JSONL = (b'{"image": "a.png", "group": "g", "report": "ok"}\n'
                  + '{"image": "b.png", "group": "g", "report": "caf\xe9"}\n'.encode("latin-1"))
CSV_OVER_LIMIT = ("image,group,report\na.png,g," + "x" * 200_000 + "\n").encode("utf-8")
# A 5000-digit number: Python refuses to convert it (int max str digits, 4300), json.loads raises ValueError.
JSONL_HUGE_INT = ('{"image": "a.png", "group": "g", "report": "ok", "age": ' + "9" * 5000 + "}\n").encode()
JSONL_DEEP = ('{"image": "a.png", "group": "g", "report": ' + "[" * 100_000 + "]" * 100_000 + "}\n").encode()


def _report_path_outside(report_path: str, make_target: bool = False):
    """6 good rows plus one whose report_path leaves --root; the build succeeds, that row is rejected unread."""
    def setup(ctx: Ctx) -> Plan:
        root = ctx.tmp / "in" / "data"
        rows = good_rows(root)
        if make_target:  # ../../x from the manifest's folder: make it exist, so only confinement stops it
            (ctx.tmp / "x").write_text("root:x:0:0 outside words", encoding="utf-8")
        (root / "inside.txt").write_text("Report from a file inside the root.", encoding="utf-8")
        rows[0] = {**rows[0], "report": "", "report_path": "inside.txt"}  # proves the spy sees reads
        write_png(root / "img" / "hostile.png", seed=50)
        rows.append({"image": "img/hostile.png", "group": "hostile", "report_path": report_path})
        manifest = write_manifest(root / "m.csv", rows)
        out = ctx.tmp / "out"
        opened = _spy_report_reads(ctx)

        def check(result) -> None:
            assert result.exit_code == 0, result.output
            rejects = rejects_of(out)
            assert [(r["id"], r["reason"]) for r in rejects] == [("m.csv:8", "outside_root")]
            # the outside file never opened, not even to be refused; the inside one at each of the build's two readings
            assert opened == [str(root / "inside.txt")] * 2
            assert index_of(out)["counts"]["written"] == 6
            assert not any("root:" in text or "outside words" in text for text in _shard_texts(out))
        keep = [ctx.tmp / "in"] + ([ctx.tmp / "x"] if make_target else [])
        return Plan(shard_manifest(manifest, out, "--root", root), keep=keep, check=check)
    return setup


def _report_file_rejected(content: bytes, reason: str):
    def setup(ctx: Ctx) -> Plan:
        root = ctx.tmp / "in"
        rows = good_rows(root)
        (root / "reports").mkdir()
        (root / "reports" / "r.txt").write_bytes(content)
        write_png(root / "img" / "hostile.png", seed=50)
        rows.append({"image": "img/hostile.png", "group": "hostile", "report_path": "reports/r.txt"})
        manifest = write_manifest(root / "m.jsonl", rows)
        out = ctx.tmp / "out"

        def check(result) -> None:
            assert result.exit_code == 0, result.output
            assert [(r["id"], r["reason"]) for r in rejects_of(out)] == [("m.jsonl:7", reason)]
            assert not any("\ufffd" in text for text in _shard_texts(out))  # nothing repaired into the text
        return Plan(shard_manifest(manifest, out, "--root", root), keep=[root], check=check)
    return setup


def _wrong_root(ctx: Ctx) -> Plan:
    root = ctx.tmp / "in"
    manifest = write_manifest(root / "m.csv", good_rows(root, 8))
    out = ctx.tmp / "out"

    def check(result) -> None:
        assert not (out / "index.json").exists() and not list(out.glob("*.tar"))
        assert "missing_image" in (out / "rejects.jsonl").read_text()
        again = invoke(Plan(shard_manifest(manifest, out, "--root", root)))  # corrected, same --out
        assert again.exit_code == 0 and again.exc_info is None, again.output
        assert index_of(out)["counts"]["written"] == 8
    return Plan(shard_manifest(manifest, out, "--root", ctx.tmp / "elsewhere"), keep=[root], check=check)


def _duplicates(ctx: Ctx) -> Plan:
    """One image under two group ids (and spelt another way), a byte-copy, a link: never in two splits."""
    manifest = leaky_manifest(ctx.tmp / "in")
    out = ctx.tmp / "out"
    o = SHARD_OPTS  # the helper picks group ids that the split with these options would separate

    def check(result) -> None:
        assert result.exit_code == 0, result.output
        index = index_of(out)
        by_split = png_digests_by_split(out, index)
        every = [d for digests in by_split.values() for d in digests]
        assert len(every) == len(set(every)) == 16
        assert index["rejects"] == {"duplicate_content": 1, "duplicate_path": 3}
    argv = ["shard", "manifest", manifest, "--out", out, "--size", o["size"], "--folds", o["folds"],
            "--test-fraction", o["test_fraction"], "--seed", o["seed"], "--shard-size", o["shard_size"],
            "--workers", "1"]
    return Plan(argv, keep=[ctx.tmp / "in"], check=check)


def _existing_shard_set(ctx: Ctx) -> Plan:
    """A second build into a folder holding a finished shard set, without --resume: refused, folder untouched."""
    root = ctx.tmp / "in"
    manifest = write_manifest(root / "m.csv", good_rows(root))
    out = ctx.tmp / "out"
    first = invoke(Plan(shard_manifest(manifest, out)))
    assert first.exit_code == 0, first.output
    return Plan(shard_manifest(manifest, out), keep=[root, out])


def _nul_in_image_path(ctx: Ctx) -> Plan:
    root = ctx.tmp / "in"
    rows = good_rows(root) + [{"image": "img/a\0b.png", "group": "nul", "report": "Text."}]
    manifest = write_manifest(root / "m.jsonl", rows)
    out = ctx.tmp / "out"

    def check(result) -> None:
        assert result.exit_code == 0, result.output
        assert [r["reason"] for r in rejects_of(out)] in (["bad_path"], ["missing_image"])
    return Plan(shard_manifest(manifest, out), keep=[root], check=check)


def _uid_rename_collision(ctx: Ctx) -> Plan:
    """Three distinct images: a/x.png, b/x_r3.png, c/x.png. The second x.png is renamed x_r3 (its line), which
    the first b/x_r3.png already took: every distinct image must still be written once."""
    root = ctx.tmp / "in"
    rows = []
    for seed, image in enumerate(["a/x.png", "b/x_r3.png", "c/x.png"], start=70):
        write_png(root / image, seed=seed)
        rows.append({"image": image, "group": f"q{seed}", "report": f"Report {seed}."})
    manifest = write_manifest(root / "m.jsonl", rows + good_rows(root))
    out = ctx.tmp / "out"

    def check(result) -> None:
        assert result.exit_code == 0, result.output
        assert rejects_of(out) == [] and index_of(out)["counts"]["written"] == 9, rejects_of(out)
    return Plan(shard_manifest(manifest, out), keep=[root], check=check)



MANIFEST_CASES = [
    Case("manifest-non-utf8-csv", _manifest_bytes("m.csv", NON_UTF8_CSV), r"m\.csv:3 is not UTF-8 .*re-save"),
    Case("manifest-non-utf8-jsonl", _manifest_bytes("m.jsonl", NON_UTF8_JSONL), r"m\.jsonl:2 is not UTF-8"),
    Case("manifest-csv-field-over-limit", _manifest_bytes("m.csv", CSV_OVER_LIMIT),
         r"m\.csv:\d+ cannot be parsed as CSV .*field larger"),
    Case("manifest-jsonl-not-an-object", _manifest_bytes("m.jsonl", b'[1, 2]\n'), r"m\.jsonl:1 is not a JSON object"),
    Case("manifest-jsonl-huge-number", _manifest_bytes("m.jsonl", JSONL_HUGE_INT), r"m\.jsonl:1 .*JSON"),
    Case("manifest-jsonl-deeply-nested", _manifest_bytes("m.jsonl", JSONL_DEEP), r"m\.jsonl:1 .*JSON"),
    Case("manifest-empty-file", _manifest_bytes("m.csv", b""), r"column 'image' not in"),
    Case("manifest-no-report-column", _manifest_bytes("m.csv", b"image,group\na.png,g\n"), r"has no report column"),
    Case("manifest-report-path-etc-passwd", _report_path_outside("/etc/passwd"), None),
    Case("manifest-report-path-dotdot", _report_path_outside("../../x", make_target=True), None),
    Case("manifest-report-file-over-256k", _report_file_rejected(b"word " * (MAX_REPORT_BYTES // 5 + 10),
                                                                 "report_too_large"), None),
    Case("manifest-report-file-undecodable", _report_file_rejected("Cardiom\xe9galie.".encode("latin-1"),
                                                                   "undecodable_report"), None),
    Case("manifest-wrong-root-every-image-missing", _wrong_root,
         r"8 of 8 inputs rejected \(missing_image \d+\), more than --max-reject-fraction 0\.5"),
    Case("manifest-duplicate-images-one-split", _duplicates, None),
    Case("manifest-out-holds-a-shard-set", _existing_shard_set, r"already holds a shard set .*--resume"),
    Case("manifest-nul-in-image-path", _nul_in_image_path, None),
    Case("manifest-uid-rename-collision", _uid_rename_collision, None),
]


# ---- images ------------------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(path: Path, width: int, height: int, rows: int = 0) -> None:
    """A valid 8-bit grayscale PNG header for width x height; the data holds `rows` zero rows (a few KB that
    would inflate to width x height bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = [_png_chunk(b"IDAT", zlib.compress(b"\0" * (width + 1) * rows))] if rows else []
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + b"".join(idat) + _png_chunk(b"IEND", b""))


def _hostile_missing(img: Path) -> str:
    return "missing.png"


def _hostile_corrupt(img: Path) -> str:
    path = write_png(img / "corrupt.png", seed=60)
    path.write_bytes(path.read_bytes()[:60])  # header survives, pixel data does not
    return "corrupt.png"


def _hostile_zero_bytes(img: Path) -> str:
    (img / "empty.png").write_bytes(b"")
    return "empty.png"


def _hostile_png_named_jpg(img: Path) -> str:
    path = write_png(img / "tmp.png", seed=61)
    path.rename(img / "really_a_png.jpg")  # decoded by content: a usable image
    return "really_a_png.jpg"


def _hostile_text_named_png(img: Path) -> str:
    (img / "notes.png").write_text("this is a text file, not an image\n" * 20, encoding="utf-8")
    return "notes.png"


def _hostile_huge_dimensions(img: Path) -> str:
    _png_claiming(img / "strip.png", 1, 200_000_000)  # 2e8 px: over twice PIL's MAX_IMAGE_PIXELS
    return "strip.png"


def _hostile_bomb(img: Path) -> str:
    _png_claiming(img / "bomb.png", 20_000, 20_000, rows=64)  # 400 MB of pixels promised by a 1 KB file
    return "bomb.png"


def _hostile_constant(img: Path) -> str:
    Image.fromarray(np.full((40, 32), 128, np.uint8)).save(img / "grey.png")
    return "grey.png"


def _hostile_tiny(img: Path) -> str:
    write_png(img / "tiny.png", 10, 12, seed=62)
    return "tiny.png"


def _hostile_bad_dicom(img: Path) -> str:
    pytest.importorskip("pydicom")
    (img / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + random.Random(300).randbytes(300))
    return "bad.dcm"


def _hostile_flat_dicom(img: Path) -> str:
    pytest.importorskip("pydicom")
    write_dicom(img / "slope0.dcm", np.arange(40 * 40, dtype=np.uint16).reshape(40, 40), slope=0.0)
    return "slope0.dcm"


def _image_case(make_hostile, reason):
    """6 good rows plus one whose image is hostile: the build succeeds; that image is one reject (reason), or,
    with reason None, a usable image written like the others."""
    def setup(ctx: Ctx) -> Plan:
        root = ctx.tmp / "in"
        rows = good_rows(root)
        name = make_hostile(root / "img")
        rows.append({"image": f"img/{name}", "group": "hostile", "report": "Hostile image."})
        manifest = write_manifest(root / "m.csv", rows)
        out = ctx.tmp / "out"

        def check(result) -> None:
            assert result.exit_code == 0, result.output
            index = index_of(out)
            rejects = [(Path(r.get("source_path", r["id"])).name, r["reason"]) for r in rejects_of(out)]
            assert rejects == ([(name, reason)] if reason else []), rejects
            assert index["counts"]["written"] == (6 if reason else 7)
        return Plan(shard_manifest(manifest, out), keep=[root], check=check)
    return setup


IMAGE_CASES = [
    Case("image-missing", _image_case(_hostile_missing, "missing_image"), None),
    Case("image-corrupt-truncated", _image_case(_hostile_corrupt, "corrupt_image"), None),
    Case("image-zero-bytes", _image_case(_hostile_zero_bytes, "corrupt_image"), None),
    Case("image-png-named-jpg", _image_case(_hostile_png_named_jpg, None), None),
    Case("image-text-named-png", _image_case(_hostile_text_named_png, "corrupt_image"), None),
    Case("image-huge-dimensions", _image_case(_hostile_huge_dimensions, "corrupt_image"), None),
    Case("image-decompression-bomb", _image_case(_hostile_bomb, "corrupt_image"), None),
    Case("image-constant", _image_case(_hostile_constant, "degenerate_image"), None),
    Case("image-under-16px", _image_case(_hostile_tiny, "image_too_small"), None),
    Case("image-bad-dicom", _image_case(_hostile_bad_dicom, "corrupt_image"), None),
    Case("image-dicom-slope-0", _image_case(_hostile_flat_dicom, "degenerate_image"), None),
]


# ---- archives (`cxrdist sample --model-path x.zip`) ---------------------------------------------------------

def _sample(model, out, *extra) -> list:
    return ["sample", "--model-path", model, "--description", "Normal heart.", "--steps", "1", "--out", out, *extra]


def _zip_case(build):
    def setup(ctx: Ctx) -> Plan:
        ctx.forbid_model_load()
        archive = ctx.tmp / "in" / "model.zip"
        archive.parent.mkdir()
        escape = build(archive)
        out = ctx.tmp / "out"
        return Plan(_sample(archive, out), keep=[archive.parent], absent=[out, *escape])
    return setup


def _zip_bad_crc(archive: Path) -> list:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("m/cxrdist.json", json.dumps(adapter_metadata_json()))
        z.writestr("m/pytorch_lora_weights.safetensors", b"A" * 1000)
    data = bytearray(archive.read_bytes())
    data[data.index(b"A" * 1000) + 500] = ord("B")  # the stored bytes no longer match their CRC
    archive.write_bytes(bytes(data))
    return []


def _zip_member(name_of):
    def build(archive: Path) -> list:
        target = Path(tempfile.gettempdir()) / f"cxrdist-zip-slip-{uuid.uuid4().hex}"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("m/cxrdist.json", json.dumps(adapter_metadata_json()))
            z.writestr(name_of(target), "evil")
        return [target]
    return build


def _zip_bomb(archive: Path) -> list:
    """A small archive whose directory claims ~4 GiB unpacked for its weights."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/cxrdist.json", json.dumps(adapter_metadata_json()))
        z.writestr("m/pytorch_lora_weights.safetensors", b"\0" * 4096)
    data = bytearray(archive.read_bytes())
    claimed = struct.pack("<I", 0xFFFFFFF0)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
        start = data.rindex(signature)  # the last entry is the weights member
        data[start + offset:start + offset + 4] = claimed
    archive.write_bytes(bytes(data))
    return []


def _zip_random_bytes(archive: Path) -> list:
    archive.write_bytes(random.Random(2048).randbytes(2048))
    return []


ARCHIVE_CASES = [
    Case("zip-bad-crc", _zip_case(_zip_bad_crc), r"model\.zip is damaged .*CRC"),
    Case("zip-slip-dotdot", _zip_case(_zip_member(lambda t: f"m/../../../../../../../..{t}")), r"'\.\.' component"),
    Case("zip-slip-absolute", _zip_case(_zip_member(lambda t: str(t))), r"has an absolute path"),
    Case("zip-bomb-claimed-size", _zip_case(_zip_bomb), r"model\.zip claims .* limit .*zip bomb"),
    Case("zip-not-a-zip", _zip_case(_zip_random_bytes), r"model\.zip is not a readable zip archive"),
]


# ---- models ------------------------------------------------------------------------------------------------

def _copied_adapter(ctx: Ctx) -> Path:
    folder = ctx.tmp / "in" / "adapter"
    shutil.copytree(ctx.fixture("tiny_adapter"), folder)
    return folder


def _lora_wrong_shapes(ctx: Ctx) -> Plan:
    """An adapter made for a wider base: every lora_A takes 8 more inputs, every lora_B gives 8 more outputs."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = _copied_adapter(ctx)
    weights = load_file(str(folder / WEIGHTS_NAME))
    wider = {}
    for key, tensor in weights.items():
        if "lora_A" in key:
            tensor = torch.zeros(tensor.shape[0], tensor.shape[1] + 8)
        elif "lora_B" in key:
            tensor = torch.zeros(tensor.shape[0] + 8, tensor.shape[1])
        wider[key] = tensor
    save_file(wider, str(folder / WEIGHTS_NAME))
    out = ctx.tmp / "out"
    return Plan(_sample(folder, out), keep=[folder], absent=[out])


def _lora_wrong_rank(ctx: Ctx) -> Plan:
    """cxrdist.json says rank 8, the tensors are rank 4."""
    folder = _copied_adapter(ctx)
    meta = json.loads((folder / METADATA_NAME).read_text())
    meta["adapter"]["unet"]["rank"] = 8
    (folder / METADATA_NAME).write_text(json.dumps(meta))
    out = ctx.tmp / "out"
    return Plan(_sample(folder, out), keep=[folder], absent=[out])


def _adapter_case(metadata_text=None, weights=None):
    def setup(ctx: Ctx) -> Plan:
        ctx.forbid_model_load()  # each of these is refused before the base loads
        folder = write_adapter(ctx.tmp / "in" / "adapter")
        if metadata_text is not None:
            data = metadata_text if isinstance(metadata_text, bytes) else metadata_text.encode("utf-8")
            (folder / METADATA_NAME).write_bytes(data)
        if weights is not None:
            (folder / WEIGHTS_NAME).write_bytes(weights(folder / WEIGHTS_NAME))
        out = ctx.tmp / "out"
        return Plan(_sample(folder, out), keep=[folder], absent=[out])
    return setup


def _truncated_pipeline_weights(ctx: Ctx) -> Plan:
    folder = ctx.tmp / "in" / "pipeline"
    shutil.copytree(ctx.fixture("tiny_base_path"), folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = ctx.tmp / "out"
    return Plan(_sample(folder, out), keep=[folder], absent=[out])


MODEL_CASES = [
    Case("lora-shape-mismatch", _lora_wrong_shapes, r"does not fit base 'preset:tiny': UNet '.*' has shape"),
    Case("lora-rank-disagrees-with-metadata", _lora_wrong_rank, r"does not fit base 'preset:tiny'"),
    Case("cxrdist-json-not-json", _adapter_case("{not json"), r"cxrdist\.json is not valid JSON"),
    Case("cxrdist-json-not-utf8", _adapter_case(b'{"format": "caf\xe9"}'), r"cxrdist\.json is not valid JSON"),
    Case("cxrdist-json-not-an-object", _adapter_case("[1, 2]"), r"cxrdist\.json is not a JSON object"),
    Case("cxrdist-json-wrong-format", _adapter_case(json.dumps({**adapter_metadata_json(), "format": "other/9"})),
         r"has format 'other/9'"),
    Case("cxrdist-json-no-base", _adapter_case(json.dumps({"format": adapter_metadata_json()["format"]})),
         r"is incomplete: 'base\.source' is missing"),
    Case("cxrdist-json-rank-not-int", _adapter_case(json.dumps(
        {**adapter_metadata_json(), "adapter": {"unet": {"rank": "4", "alpha": 4, "targets": ["to_q"]}, "text_encoder": None}})),
         r"'adapter\.unet\.rank' is not a positive integer"),
    Case("safetensors-random-bytes", _adapter_case(weights=lambda p: random.Random(4096).randbytes(4096)),
         r"is not a valid safetensors file"),
    Case("safetensors-truncated", _adapter_case(weights=lambda p: p.read_bytes()[:-3]),
         r"is not a valid safetensors file"),
    Case("safetensors-empty", _adapter_case(weights=lambda p: b""), r"is not a valid safetensors file"),
    Case("pipeline-truncated-unet-weights", _truncated_pipeline_weights, r"cannot load unet from"),
]


# ---- config ------------------------------------------------------------------------------------------------

def _config_case(*, text: str | bytes | None = None, folder: bool = False, overrides=(), runner: str = "cli",
                 loads=None):
    """`cxrdist sample` (or launch/train.py) with a hostile --config file and/or --set items.

    `loads`: the file is valid; the run then fails later, on the missing model, and load_config must give
    these values (section, key, value)."""
    def setup(ctx: Ctx) -> Plan:
        ctx.forbid_model_load()
        root = ctx.tmp / "in"
        root.mkdir()
        args: list = []
        if text is not None or folder:
            path = root / "x.yaml"
            if folder:
                path.mkdir()
            else:
                path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
            args += ["--config", path]
        for item in overrides:
            args += ["--set", item]
        out = ctx.tmp / "out"
        if runner == "train":
            argv = ["--fold", "0", "--shards", ctx.tmp / "no-shards", "--output-dir", out, *args]
        else:
            argv = _sample(ctx.tmp / "no-model", out, *args)

        def check(result) -> None:
            if loads:
                from cxrdist.config import load_config

                cfg = load_config(str(root / "x.yaml"))
                section, key, value = loads
                assert getattr(getattr(cfg, section), key) == value
        return Plan(argv, keep=[root], absent=[out], check=check, runner=runner)
    return setup



CONFIG_CASES = [
    Case("config-set-unknown-key", _config_case(overrides=["train.bogus=1"]), r"unknown config key 'train\.bogus'"),
    Case("config-file-unknown-section", _config_case(text="trian:\n  epochs: 2\n"),
         r"unknown config section 'trian'"),
    Case("config-file-unknown-key", _config_case(text="sample:\n  stepz: 2\n"), r"unknown config key 'sample\.stepz'"),
    Case("config-set-wrong-type", _config_case(overrides=["train.batch_size=abc"]),
         r"'train\.batch_size' must be an integer"),
    Case("config-file-wrong-type", _config_case(text="sample:\n  steps: many\n"),
         r"'sample\.steps' must be an integer"),
    Case("config-file-section-not-mapping", _config_case(text="sample: 3\n"), r"section 'sample' must be a mapping"),
    Case("config-set-inf", _config_case(overrides=["optim.lr_unet=inf"]), r"'optim\.lr_unet' must be a finite"),
    Case("config-set-nan", _config_case(overrides=["sample.guidance=nan"]), r"'sample\.guidance' must be a finite"),
    Case("config-file-nan", _config_case(text="eval:\n  guidance: .nan\n"), r"'eval\.guidance' must be a finite"),
    Case("config-file-utf16-bom-loads",
         _config_case(text=codecs.BOM_UTF16_LE + "sample:\n  steps: 3\n".encode("utf-16-le"),
                      loads=("sample", "steps", 3)), r"model path '.*no-model' not found"),
    Case("config-file-undecodable", _config_case(text=b"train:\n  run_name: caf\xe9\n"), r"x\.yaml is not UTF-8"),
    Case("config-file-not-yaml", _config_case(text="train: [unclosed\n"), r"x\.yaml is not valid YAML"),
    Case("config-file-is-a-folder", _config_case(folder=True), r"x\.yaml is a folder"),
    Case("config-set-without-equals", _config_case(overrides=["train.batch_size"]),
         r"override 'train\.batch_size' must look like section\.key=value"),
    Case("config-set-key-not-dotted", _config_case(overrides=["batch_size=4"]), r"must be section\.key"),
    Case("config-set-huge-int", _config_case(overrides=["train.batch_size=" + "1" * 5000]),
         r"'train\.batch_size'"),
    Case("config-file-huge-int", _config_case(text="train:\n  batch_size: " + "1" * 5000 + "\n"),
         r"x\.yaml|'train\.batch_size'"),
    Case("config-set-deeply-nested", _config_case(overrides=["lora.unet_targets=" + "[" * 3000 + "]" * 3000]),
         r"lora\.unet_targets"),
    Case("config-file-deeply-nested", _config_case(text="lora:\n  unet_targets: " + "[" * 3000 + "]" * 3000 + "\n"),
         r"x\.yaml|lora\.unet_targets"),
    Case("config-set-float-overflow", _config_case(overrides=["optim.lr_unet=1" + "0" * 400]),
         r"'optim\.lr_unet'"),
    Case("train-set-unknown-key", _config_case(overrides=["train.bogus=1"], runner="train"),
         r"unknown config key 'train\.bogus'"),
    Case("train-config-file-is-a-folder", _config_case(folder=True, runner="train"), r"x\.yaml is a folder"),
]


# ---- sampling flags ----------------------------------------------------------------------------------------

def _sample_flags(*flags, out_under_file: bool = False, out_with_samples: bool = False):
    def setup(ctx: Ctx) -> Plan:
        ctx.forbid_model_load()
        model = ctx.fixture("tiny_adapter")  # a real model: only the order of the checks spares loading it
        keep, absent = [], []
        if out_under_file:
            a_file = ctx.tmp / "a-file"
            a_file.write_text("keep me")
            out = a_file / "sub" / "out"
            keep.append(a_file)
        elif out_with_samples:
            out = ctx.tmp / "out"
            out.mkdir()
            (out / "index.jsonl").write_text('{"file": "0000_s0.png"}\n')
            (out / "0000_s0.png").write_bytes(b"earlier sample")
            keep.append(out)
        else:
            out = ctx.tmp / "out"
            absent.append(out)
        argv = ["sample", "--model-path", model, "--out", out, *flags]
        if not any(str(f).startswith("--description") for f in flags):
            argv += ["--description", "Normal heart."]
        def check(result) -> None:
            assert ctx.model_loads == [], "the model was loaded"
        return Plan(argv, keep=[*keep, model], absent=absent, check=check)
    return setup


def _prompts_file(ctx: Ctx) -> Plan:
    ctx.forbid_model_load()
    prompts = ctx.tmp / "in" / "prompts.txt"
    prompts.parent.mkdir()
    prompts.write_bytes("Cardiom\xe9galie.\n".encode("latin-1"))
    out = ctx.tmp / "out"
    argv = ["sample", "--model-path", ctx.fixture("tiny_adapter"), "--prompts-file", prompts, "--out", out]
    return Plan(argv, keep=[prompts.parent], absent=[out])


SAMPLE_CASES = [
    Case("sample-out-under-a-file", _sample_flags(out_under_file=True), r"a-file is a file, not a folder"),
    Case("sample-out-holds-samples", _sample_flags(out_with_samples=True), r"already holds samples"),
    Case("sample-steps-0", _sample_flags("--steps", "0"), r"'sample\.steps' must be >= 1 \(--steps\)"),
    Case("sample-seed-2-64", _sample_flags("--seed", str(2**64)), r"--seed 18446744073709551616 is out of range"),
    Case("sample-seed-negative", _sample_flags("--seed=-1"), r"--seed -1 is out of range"),
    Case("sample-negative-guidance", _sample_flags("--guidance=-1"), r"'sample\.guidance' must be >= 0"),
    Case("sample-empty-description", _sample_flags("--description", ""), r"empty description"),
    Case("sample-blank-description", _sample_flags("--description", "  \t "), r"empty description"),
    Case("sample-prompts-file-not-utf8", _prompts_file, r"prompts file .* cannot be read"),
]


# ---- shard flags -------------------------------------------------------------------------------------------

def _phantom(*flags):
    def setup(ctx: Ctx) -> Plan:
        out = ctx.tmp / "out"
        return Plan(["shard", "phantom", "--out", out, "--workers", "1", *flags], absent=[out])
    return setup


def _manifest_flags(*flags):
    def setup(ctx: Ctx) -> Plan:
        root = ctx.tmp / "in"
        manifest = write_manifest(root / "m.csv", good_rows(root))
        out = ctx.tmp / "out"
        return Plan(["shard", "manifest", manifest, "--out", out, "--workers", "1", *flags], keep=[root],
                    absent=[out])
    return setup


SHARD_FLAG_CASES = [
    Case("phantom-n-0", _phantom("--n", "0"), r"--n must be >= 1"),
    Case("phantom-size-8", _phantom("--n", "5", "--size", "8"), r"--size must be >= 16"),
    Case("phantom-size-12", _phantom("--n", "5", "--size", "12"), r"--size must be"),
    Case("phantom-seed-negative", _phantom("--n", "5", "--seed", "-1"), r"--seed must be in 0\.\.2\*\*63-1"),
    Case("manifest-size-12", _manifest_flags("--size", "12"), r"--size must be a multiple of 8"),
    Case("manifest-seed-2-64", _manifest_flags("--seed", str(2**64)), r"--seed must be in 0\.\.2\*\*63-1"),
]


# ---- disk full ---------------------------------------------------------------------------------------------

def _disk_full(ctx: Ctx) -> Plan:
    """A 1 MiB tmpfs holding an earlier shard set and a filler: a new build runs out of space half-way."""
    mount = mount_tmpfs(ctx, "small", "1m")
    earlier = mount / "earlier"
    first = invoke(Plan(["shard", "phantom", "--n", "10", "--size", "32", "--folds", "2", "--out", earlier,
                         "--workers", "1"]))
    assert first.exit_code == 0, first.output
    stats = os.statvfs(mount)
    with open(mount / "filler", "wb") as handle:
        handle.write(b"\0" * (stats.f_bavail * stats.f_frsize - 24 * 1024))  # leave 24 KiB
    out = mount / "new"
    argv = ["shard", "phantom", "--n", "40", "--size", "64", "--folds", "2", "--out", out, "--workers", "1"]

    def check(result) -> None:
        assert not (out / "index.json").exists() and not list(out.glob("*.cxrdist-tmp"))
        (mount / "filler").unlink()  # space freed: the interrupted build completes with --resume
        again = invoke(Plan([*argv, "--resume"]))
        assert again.exit_code == 0 and again.exc_info is None, again.output
        assert index_of(out)["counts"]["written"] == 40
    return Plan(argv, keep=[earlier, mount / "filler"], check=check)


DISK_CASES = [Case("disk-full-tmpfs", _disk_full, r"disk full while writing .*new")]


CASES = MANIFEST_CASES + IMAGE_CASES + ARCHIVE_CASES + MODEL_CASES + CONFIG_CASES + SAMPLE_CASES + \
    SHARD_FLAG_CASES + DISK_CASES


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_input(case: Case, ctx: Ctx):
    run_case(case, ctx)
