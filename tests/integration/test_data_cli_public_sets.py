"""`cxrdist shard mimic-cxr` and `cxrdist shard chexpert-plus` end to end through the CLI, errors included."""
from __future__ import annotations

import json

from click.testing import CliRunner

from cxrdist.cli import main
from support.mimic_files import make_chexpert_plus_tree, make_mimic_tree


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def test_mimic_cxr_command(tmp_path):
    root = make_mimic_tree(tmp_path / "mimic")
    out = tmp_path / "out"
    code, output = _run("shard", "mimic-cxr", "--root", root, "--out", out, "--size", 32, "--folds", 2,
                        "--shard-size", 4, "--workers", 1, "--uncertain", "uncertain", "--fallback")
    assert code == 0, output
    assert "18 samples" in output and "test 4 (2 groups)" in output and "split official" in output
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == "mimic-cxr" and index["splits"]["test"]["labels"]["Pleural Effusion/uncertain"] >= 1
    code, output = _run("shard", "mimic-cxr", "--root", tmp_path / "nowhere", "--out", tmp_path / "o2")
    assert code == 1 and "is not a folder" in output and len(output.strip().splitlines()) == 1
    code, output = _run("shard", "mimic-cxr", "--root", root, "--out", tmp_path / "o3", "--sections", "summary")
    assert code == 1 and "unknown report section" in output


def test_test_fraction_is_refused_with_the_official_split(tmp_path):
    root = make_mimic_tree(tmp_path / "mimic")
    table = make_chexpert_plus_tree(tmp_path / "cp")
    for command in (["mimic-cxr", "--root", root], ["chexpert-plus", "--root", table.parent, "--csv", table]):
        out = tmp_path / f"out-{command[0]}"
        code, output = _run("shard", *command, "--out", out, "--test-fraction", 0.2, "--workers", 1)
        assert code == 1 and len(output.strip().splitlines()) == 1, output
        assert "--test-fraction does not apply with --official-split" in output and "--no-official-split" in output
        assert not (out / "index.json").exists()
    out = tmp_path / "drawn"
    code, output = _run("shard", "mimic-cxr", "--root", root, "--out", out, "--no-official-split", "--test-fraction",
                        0.5, "--size", 32, "--folds", 2, "--workers", 1)
    assert code == 0, output
    index = json.loads((out / "index.json").read_text())
    assert index["test_fraction"] == 0.5 and "official_split" not in index["options"]


def test_chexpert_plus_command(tmp_path):
    table = make_chexpert_plus_tree(tmp_path / "cp")
    out = tmp_path / "out"
    code, output = _run("shard", "chexpert-plus", "--root", table.parent, "--csv", table, "--out", out,
                        "--size", 32, "--folds", 2, "--workers", 1, "--views", "all")
    assert code == 0, output
    assert "12 samples" in output and "empty_report 4" in output and "test 4 (2 groups)" in output
