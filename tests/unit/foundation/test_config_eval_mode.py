"""eval.mode follows eval.metric: early stopping and the best export keep the best checkpoint, not the worst."""
import re
from pathlib import Path

import pytest

from cxrdist.config import (METRIC_MODES, SET_METRICS, Config, EvalConfig, config_from_dict, diff_configs, load_config,
                            load_yaml)
from cxrdist.errors import ConfigError
from cxrdist.train.early_stop import EarlyStopper

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("metric, mode", [("val_loss", "min"), ("mse", "min"), ("ssim", "max"), ("psnr", "max"),
                                          ("faithfulness", "max")])
def test_mode_defaults_to_the_metric_direction(metric, mode):
    assert METRIC_MODES[metric] == mode
    assert load_config(None, [f"eval.metric={metric}"]).eval.mode == mode
    assert EvalConfig(metric=metric).mode == mode


@pytest.mark.parametrize("preset", ["dev", "product", "demo"])
def test_changing_the_metric_of_a_preset_flips_the_mode(preset):
    # product and demo say `mode: min` for val_loss; that must not pin ssim to min.
    assert load_config(preset).eval.mode == "min"
    assert load_config(preset, ["eval.metric=ssim"]).eval.mode == "max"
    assert load_config(preset, ["eval.metric=ssim", "eval.metric=mse"]).eval.mode == "min"


def test_explicit_agreeing_mode_and_auto_are_accepted():
    assert load_config(None, ["eval.metric=psnr", "eval.mode=max"]).eval.mode == "max"
    assert load_config(None, ["eval.metric=psnr", "eval.mode=auto"]).eval.mode == "max"
    assert load_config(None, ["eval.mode=max", "eval.metric=ssim"]).eval.mode == "max"


@pytest.mark.parametrize("overrides, right", [
    (["eval.metric=ssim", "eval.mode=min"], "eval.mode=max"),
    (["eval.metric=val_loss", "eval.mode=max"], "eval.mode=min"),
])
def test_contradicting_mode_names_both_keys_and_the_fix(overrides, right):
    with pytest.raises(ConfigError, match=r"eval\.mode.*eval\.metric.*" + re.escape(right)):
        load_config(None, overrides)


def test_contradiction_in_a_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  metric: faithfulness\n  mode: min\n")
    with pytest.raises(ConfigError, match=r"eval\.mode=max"):
        load_config(str(path))


def test_bad_mode_is_refused():
    with pytest.raises(ConfigError, match=r"eval\.mode.*auto, min or max"):
        load_config(None, ["eval.mode=up"])


@pytest.mark.parametrize("metric", list(METRIC_MODES))
def test_resolved_mode_round_trips_with_the_same_hash(tmp_path, metric):
    sets = ["eval.num_metric_images=16"] if metric in SET_METRICS else []  # FID / KID need a set of images
    cfg = load_config("demo", [f"eval.metric={metric}", *sets])
    saved = load_yaml(cfg.save(tmp_path / "config.yaml"))
    assert saved["eval"]["mode"] == METRIC_MODES[metric]
    again = config_from_dict(saved)
    assert again == cfg and again.hash() == cfg.hash() and diff_configs(again, cfg) == []
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_default_config_is_unchanged_by_auto():
    """The resolved default is min for val_loss, so a config saved with `mode: min` and one that leaves it at auto
    are the same run: the same values and the same hash (the default run folder's name)."""
    assert Config().to_dict()["eval"]["mode"] == "min"
    auto, explicit = load_config(overrides=["eval.mode=auto"]), load_config(overrides=["eval.mode=min"])
    assert auto == explicit == Config() and auto.hash() == explicit.hash() == Config().hash()


def test_saved_pretrain_config_still_loads():
    assert config_from_dict(load_yaml(REPO / "models/phantom-base/cxrdist_pretrain.yaml")).eval.mode == "min"


def test_stopper_refuses_an_unresolved_mode():
    with pytest.raises(ConfigError, match=r"eval\.mode"):
        EarlyStopper("ssim", "auto")
    assert EarlyStopper("ssim", "max").is_better(0.5)
