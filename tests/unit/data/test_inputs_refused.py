"""Hostile or broken data inputs: manifests, report files, degenerate images, phantom flags, YAML configs.

Every bad input is one clear error (a CxrdistError, printed by the CLI as one line) or a counted reject in
rejects.jsonl; none is a traceback, and no local file outside the data folder ends up in a shard.
"""
from __future__ import annotations

import json
import re
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxrdist.cli import main
from cxrdist.config import load_config, load_yaml
from cxrdist.data.imageio import check_pixels, decode_file
from cxrdist.data.shard import build_shards
from cxrdist.data.sources.base import RecordRejected
from cxrdist.data.sources.manifest import MAX_REPORT_BYTES, ManifestSource
from cxrdist.data.sources.phantom import PhantomSource
from cxrdist.errors import ConfigError, DataError, InputError
from support.data_files import tar_members, write_dicom, write_manifest, write_png


def _rejects(source) -> dict[str, str]:
    """{image or row: reason} after listing every record."""
    list(source.records())
    return {where: reason for where, reason, _ in source.rejected()}


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# ---- manifests that are not UTF-8 or not parseable ---------------------------------------------------------

def test_non_utf8_csv_and_jsonl_are_one_error_naming_the_line(tmp_path):
    csv_file = tmp_path / "m.csv"
    csv_file.write_bytes("image,group,report\na.png,g1,ok\nb.png,g2,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"m.csv:3 is not UTF-8 .*re-save"):
        list(ManifestSource(csv_file).records())
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(b'{"image": "a.png", "group": "g", "report": "ok"}\n'
                      + '{"image": "b.png", "group": "g", "report": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"m.jsonl:2 is not UTF-8"):
        list(ManifestSource(jsonl).records())


def test_csv_field_over_the_csv_limit_is_one_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,group,report\na.png,g," + "x" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"m.csv:\d+ cannot be parsed as CSV .*field larger"):
        list(ManifestSource(manifest).records())


def test_cli_prints_one_line_for_a_non_utf8_manifest(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("image,group,report\na.png,g,\xff\xfe\n".encode("latin-1"))
    result = CliRunner().invoke(main, ["shard", "manifest", str(manifest), "--out", str(tmp_path / "out")])
    assert "is not UTF-8" in _one_error_line(result)


# ---- manifests that point at files outside the data --------------------------------------------------------

@pytest.fixture
def data(tmp_path):
    """tmp/data/{img/a.png, reports/r.txt}, and tmp/secret.txt outside the data folder."""
    root = tmp_path / "data"
    write_png(root / "img" / "a.png")
    (root / "reports").mkdir()
    (root / "reports" / "r.txt").write_text("Small effusion.", encoding="utf-8")
    (tmp_path / "secret.txt").write_text("root:x:0:0 secret words", encoding="utf-8")
    return root


def test_root_confines_every_image_and_report_path_symlinks_resolved(data, tmp_path):
    secret = tmp_path / "secret.txt"
    (data / "reports" / "link.txt").symlink_to(secret)
    manifest = write_manifest(data / "m.csv", [
        {"image": "img/a.png", "group": "ok", "report_path": "reports/r.txt"},
        {"image": "img/a.png", "group": "abs", "report_path": str(secret)},
        {"image": "img/a.png", "group": "dots", "report_path": "../secret.txt"},
        {"image": "img/a.png", "group": "link", "report_path": "reports/link.txt"},
        {"image": "/etc/hostname", "group": "img", "report_path": "reports/r.txt"},
        {"image": "img/a.png", "group": "passwd", "report_path": "/etc/passwd"},
    ])
    source = ManifestSource(manifest, root=data)
    records = list(source.records())
    assert [r.group for r in records] == ["ok"]
    assert [reason for _, reason, _ in source.rejected()] == ["outside_root"] * 5
    assert all("secret" not in r.prompt and "root:" not in r.prompt for r in records)


def test_without_root_relative_paths_stay_in_the_manifest_folder_absolute_ones_are_allowed(data, tmp_path):
    manifest = write_manifest(data / "m.csv", [
        {"image": "img/a.png", "group": "dots", "report_path": "../secret.txt"},
        {"image": "../../x.png", "group": "img-dots", "report_path": "reports/r.txt"},
        {"image": "img/../img/a.png", "group": "inside", "report_path": "reports/./r.txt"},
        {"image": str(data / "img" / "a.png"), "group": "absolute", "report_path": str(data / "reports/r.txt")},
    ])
    source = ManifestSource(manifest)
    records = list(source.records())
    assert [r.group for r in records] == ["inside", "absolute"]
    assert [reason for _, reason, _ in source.rejected()] == ["outside_root", "outside_root"]


def test_report_files_too_large_undecodable_or_not_regular_are_rejected(data):
    (data / "reports" / "big.txt").write_text("word " * (MAX_REPORT_BYTES // 5 + 10), encoding="utf-8")
    (data / "reports" / "latin1.txt").write_bytes("Cardiom\xe9galie.".encode("latin-1"))
    (data / "reports" / "folder.txt").mkdir()
    manifest = write_manifest(data / "m.jsonl", [
        {"image": "img/a.png", "group": "big", "report_path": "reports/big.txt"},
        {"image": "img/a.png", "group": "latin1", "report_path": "reports/latin1.txt"},
        {"image": "img/a.png", "group": "folder", "report_path": "reports/folder.txt"},
        {"image": "img/a.png", "group": "inline", "report": "x" * (MAX_REPORT_BYTES + 1)},
        {"image": "img/a.png", "group": "tilde", "report_path": "~no-such-user-xyz/r.txt"},
        {"image": "img/a.png", "group": "ok", "report_path": "reports/r.txt"},
    ])
    source = ManifestSource(manifest, root=data)
    records = list(source.records())
    assert [r.group for r in records] == ["ok"] and records[0].prompt == "Small effusion."
    assert [reason for _, reason, _ in source.rejected()] == [
        "report_too_large", "undecodable_report", "missing_report", "report_too_large", "bad_path"]
    assert all("\ufffd" not in r.prompt for r in records)


# ---- degenerate images -------------------------------------------------------------------------------------

def test_constant_tiny_and_flattened_dicom_images_are_rejected(tmp_path):
    ramp = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (40, 1))  # 40 x 40, a usable image
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(tmp_path / "constant.png")
    write_png(tmp_path / "tiny.png", 8, 40)
    for name, kwargs in {"slope0.dcm": dict(slope=0.0, intercept=100.0),
                         "ww0.dcm": dict(window=(2000, 0)), "black.dcm": dict(window=(90000, 100))}.items():
        write_dicom(tmp_path / name, ramp, **kwargs)
    reasons = {}
    for name in ("constant.png", "tiny.png", "slope0.dcm", "ww0.dcm", "black.dcm"):
        with pytest.raises(RecordRejected) as info:
            check_pixels(decode_file(tmp_path / name), name)
        reasons[name] = info.value.reason
    assert reasons == {"constant.png": "degenerate_image", "tiny.png": "image_too_small",
                       "slope0.dcm": "degenerate_image", "ww0.dcm": "degenerate_image",
                       "black.dcm": "degenerate_image"}
    assert check_pixels(decode_file(write_dicom(tmp_path / "ok.dcm", ramp)), "ok").shape == (40, 40)


def test_the_builder_counts_hostile_rows_and_degenerate_images_as_rejects(data, tmp_path):
    rows = []
    for i in range(16):
        write_png(data / "img" / f"good{i}.png", seed=i)
        rows.append({"image": f"img/good{i}.png", "group": f"p{i}", "report": f"Report {i}."})
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(data / "img" / "black.png")
    write_png(data / "img" / "tiny.png", 10, 10)
    write_dicom(data / "img" / "slope0.dcm", np.arange(1600, dtype=np.uint16).reshape(40, 40), slope=0.0)
    rows += [{"image": "img/black.png", "group": "b1", "report": "Black."},
             {"image": "img/tiny.png", "group": "b2", "report": "Tiny."},
             {"image": "img/slope0.dcm", "group": "b3", "report": "Flat."},
             {"image": "img/a.png", "group": "b4", "report_path": str(tmp_path / "secret.txt")},
             {"image": str(tmp_path / "outside.png"), "group": "b5", "report": "Outside."}]
    write_png(tmp_path / "outside.png", seed=99)
    manifest = write_manifest(data / "m.jsonl", rows)
    out = tmp_path / "out"
    index = build_shards(ManifestSource(manifest, root=data), out, size=32, folds=2, test_fraction=0.0,
                         shard_size=64, workers=1, progress=False)
    assert index["rejects"] == {"degenerate_image": 2, "image_too_small": 1, "outside_root": 2}
    assert index["counts"]["written"] == 16
    texts = []
    for tar_path in sorted(out.glob("*.tar")):
        assert tar_members(tar_path)
        with tarfile.open(tar_path) as tar:
            texts += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert len(texts) == 16 and not any("secret" in text for text in texts)
    listed = [json.loads(line)["reason"] for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(listed) == sorted(["degenerate_image"] * 2 + ["image_too_small"] + ["outside_root"] * 2)


# ---- phantom flags -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [(dict(n=0), "--n"), (dict(n=5, size=8), "--size")])
def test_phantom_n_and_size_are_input_errors(kwargs, flag):
    with pytest.raises(InputError, match=flag):
        PhantomSource(**kwargs)


@pytest.mark.parametrize("args, flag", [(["--n", "0"], "--n"), (["--size", "8"], "--size")])
def test_cli_shard_phantom_bad_flags_are_one_line(tmp_path, args, flag):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["shard", "phantom", *args, "--out", str(out)])
    assert flag in _one_error_line(result) and not out.exists()


# ---- YAML configs ------------------------------------------------------------------------------------------

def test_yaml_in_utf16_is_read_and_undecodable_yaml_is_one_error(tmp_path):
    utf16 = tmp_path / "c.yaml"
    utf16.write_text("train:\n  seed: 7\n", encoding="utf-16")  # BOM + UTF-16, as PowerShell's `>` writes
    assert load_config(str(utf16)).train.seed == 7
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  run_name: caf\xe9\n")
    with pytest.raises(ConfigError, match="bad.yaml is not UTF-8"):
        load_yaml(bad)


def test_a_folder_named_like_a_yaml_file_is_one_error(tmp_path):
    folder = tmp_path / "x.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="x.yaml is a folder"):
        load_config(str(folder))
    result = CliRunner().invoke(main, ["sample", "--model-path", str(tmp_path), "--description", "x",
                                       "--config", str(folder)])
    assert "is a folder" in _one_error_line(result)


def test_yaml_that_is_not_a_mapping_names_the_file(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^config file {re.escape(str(listing))} must hold sections"):
        load_yaml(listing)
