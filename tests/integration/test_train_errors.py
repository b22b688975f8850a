"""Bad input to launch/train.py: one-line errors, exit 1, nothing overwritten."""
from __future__ import annotations

import importlib.util
import os

import pytest
from click.testing import CliRunner

from support.training import QUICK, REPO


@pytest.fixture(scope="module")
def train_cli():
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _invoke(cli, shards, out, *extra):
    sets = [a for s in QUICK for a in ("--set", s)]
    return CliRunner().invoke(cli, ["--shards", str(shards), "--output-dir", str(out), *sets, *extra])


def _one_line(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error:"), result.output
    return lines[-1]


@pytest.mark.parametrize("extra, expected", [
    (["--fold", "7"], "fold 7 is out of range"),
    (["--fold", "0", "--set", "data.image_size=128"], "holds 64x64 images but 128"),
    (["--fold", "0", "--pretrained", "/nonexistent/sd-base"], "not found"),
    (["--fold", "0", "--set", "train.bach_size=4"], "unknown config key 'train.bach_size'"),
    (["--fold", "0", "--set", "eval.metric=ssim", "--set", "eval.num_metric_images=0"], "needs generated images"),
    (["--fold", "0", "--resume", "latest"], "no complete checkpoint"),
    (["--fold", "0", "--set", "optim.warmup_steps=500", "--set", "train.max_steps=4"], "warmup_steps=500"),
    (["--all-folds", "--fold", "1"], "--fold K or --all-folds"),
])
def test_bad_input_is_one_line(train_cli, phantom_shards, tmp_path, extra, expected, one_thread):
    line = _one_line(_invoke(train_cli, phantom_shards, tmp_path / "run", *extra))
    assert expected in line, line


def test_missing_shards_and_channel_mismatch(train_cli, phantom_shards, tmp_path, one_thread):
    assert "index.json not found" in _one_line(_invoke(train_cli, tmp_path / "none", tmp_path / "run", "--fold", "0"))
    from cxrdist.config import load_config
    from cxrdist.data.index import load_index
    from cxrdist.errors import DataError
    from cxrdist.train.data import check_shards

    cfg = load_config(None, QUICK + [f"data.shards={phantom_shards}"])
    with pytest.raises(DataError, match="1-channel images but the model's VAE takes 4"):
        check_shards(load_index(phantom_shards), cfg, 0, channels=4)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_dir_not_writable(train_cli, phantom_shards, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "not writable" in _one_line(_invoke(train_cli, phantom_shards, locked / "run", "--fold", "0"))
    finally:
        locked.chmod(0o700)


def test_output_dir_that_is_a_file(train_cli, phantom_shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert "not writable" in _one_line(_invoke(train_cli, phantom_shards, blocker, "--fold", "0"))
    assert blocker.read_text() == "keep me"
