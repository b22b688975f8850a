"""Commands agree on where a setting comes from: one source each (a flag, else the config key the flag names), and a
`--set` on a section a command does not read is refused instead of doing nothing."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from cxrdist.cli import main


@pytest.mark.parametrize("command, args", [
    ("sample", ["--model-path", "nowhere", "--description", "x"]),
    ("evaluate", ["--model-path", "nowhere", "--shards", "nowhere"]),
    ("pretrain", ["--shards", "nowhere", "--out", "nowhere"]),
])
def test_a_set_on_a_section_the_command_does_not_read_is_refused_in_one_line(command, args):
    result = CliRunner().invoke(main, [command, *args, "--set", "train.batch_size=4"])
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: --set train.batch_size=4: `cxrdist {command}` reads no train.* setting (only ")
    assert line.endswith("): drop it")


class Captured(Exception):
    pass


def _evaluate_options(monkeypatch, *args: str):
    """The options `cxrdist evaluate` would run with (it stops before any model loads)."""
    seen = {}

    def capture(path, shards, opts, base_override=None):
        seen["opts"] = opts
        raise Captured

    monkeypatch.setattr("cxrdist.evaluation.runs.run_model_path", capture)
    result = CliRunner().invoke(main, ["evaluate", "--model-path", "m", "--shards", "s", *args])
    assert isinstance(result.exception, Captured), result.output
    return seen["opts"]


def test_evaluate_takes_the_seed_and_the_audit_pool_from_the_config_unless_a_flag_gives_them(monkeypatch):
    opts = _evaluate_options(monkeypatch)
    assert (opts.seed, opts.memorization_pool, opts.steps) == (0, 2048, 25)  # sample.seed, eval.memorization_pool
    opts = _evaluate_options(monkeypatch, "--set", "sample.seed=7", "--set", "eval.memorization_pool=64",
                             "--set", "sample.steps=9")
    assert (opts.seed, opts.memorization_pool, opts.steps) == (7, 64, 9)
    opts = _evaluate_options(monkeypatch, "--set", "sample.seed=7", "--seed", "3", "--memorization-pool", "0")
    assert (opts.seed, opts.memorization_pool) == (3, 0)  # a flag wins; 0 = the whole training split


def test_evaluate_steps_0_is_refused_not_replaced(monkeypatch):
    result = CliRunner().invoke(main, ["evaluate", "--model-path", "m", "--shards", "s", "--steps", "0"])
    assert result.exit_code == 1 and "'sample.steps' must be >= 1 (--steps)" in result.output


def test_cxrdist_train_is_the_training_command_and_cache_latents_is_registered_on_shard():
    from cxrdist.train.cli import main as training_command

    assert main.commands["train"] is training_command  # launch/train.py and python -m cxrdist.train run it too
    assert CliRunner().invoke(main, ["train", "--help"]).exit_code == 0
    assert "cache-latents" in main.commands["shard"].commands

