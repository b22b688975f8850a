"""`cxrdist shard ...` end to end through the CLI: IU from archives, manifest with DICOM, inspect."""
from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from cxrdist.cli import main
from support.data_files import make_iu_tree, pack_iu_archives, write_dicom, write_manifest, write_png


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_iu_xray_from_archives_then_inspect(tmp_path):
    tree = make_iu_tree(tmp_path / "tree", n_reports=10, missing=["CXR4_1_IM-0004-1002"],
                        corrupt=["CXR6_1_IM-0006-1001"], size=(60, 50))
    src = tmp_path / "archives"
    pack_iu_archives(tree, src)
    out = tmp_path / "shards"
    code, output = _run("shard", "iu-xray", "--from", src, "--out", out, "--size", 32, "--folds", 2,
                        "--shard-size", 5, "--workers", 1)
    assert code == 0, output
    assert "18 samples" in output and "missing_image 1" in output and "corrupt_image 1" in output
    assert "reports seen 10" in output and "images missing 1" in output
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == "iu-xray" and index["counts"]["written"] == 18
    assert index["source_summary"]["images_found"] == 19

    code, output = _run("shard", "inspect", out, "--verify")
    assert code == 0, output
    assert "all sha256 match" in output and (out / "preview.png").is_file()
    victim = next(out.glob("fold0-*.tar"))
    victim.write_bytes(victim.read_bytes()[:-1024] + b"\1" * 1024)
    code, output = _run("shard", "inspect", out, "--verify", "--no-preview")
    assert code == 1 and "failed verification" in output and victim.name in output


def test_manifest_with_dicom_and_clear_errors(tmp_path):
    write_png(tmp_path / "a.png", 50, 40)
    write_png(tmp_path / "b.png", 50, 40, bits=16)
    write_dicom(tmp_path / "c.dcm", (np.arange(50 * 40).reshape(50, 40) % 4096).astype(np.uint16),
                photometric="MONOCHROME1", window=(2048, 4096))
    (tmp_path / "d.png").write_bytes(b"not a png")
    rows = [{"file": n, "pid": f"p{i}", "text": f"Report {i}."} for i, n in enumerate(["a.png", "b.png", "c.dcm",
                                                                                       "d.png"])]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    code, output = _run("shard", "manifest", manifest, "--out", out, "--image-col", "file", "--group-col", "pid",
                        "--text-col", "text", "--size", 16, "--folds", 2, "--test-fraction", 0, "--workers", 1)
    assert code == 0, output
    assert "3 samples" in output and "corrupt_image 1" in output
    rejects = (out / "rejects.jsonl").read_text()
    assert "d.png" in rejects
    code, output = _run("shard", "manifest", manifest, "--out", out, "--image-col", "file")
    assert code == 1 and "column 'group' not in" in output
    code, output = _run("shard", "manifest", manifest, "--out", out, "--image-col", "file", "--group-col", "pid",
                        "--text-col", "text", "--size", 16, "--folds", 2, "--test-fraction", 0)
    assert code == 1 and "already holds a shard set" in output
    code, output = _run("shard", "inspect", tmp_path / "nowhere")
    assert code == 1 and "index.json not found" in output


def test_phantom_command_is_wired(tmp_path):
    code, output = _run("shard", "phantom", "--help")
    assert code == 0 and "--size" in output and "[default: 64]" in output
