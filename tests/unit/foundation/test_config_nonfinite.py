"""inf and nan are refused, naming the key, for every float field."""
import dataclasses
import math
import re
import typing

import pytest

from cxrdist.config import Config, load_config, merge
from cxrdist.errors import ConfigError


def _float_keys() -> list[str]:
    keys = []
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.default_factory)
        keys += [f"{section.name}.{name}" for name, tp in hints.items()
                 if tp is float or float in typing.get_args(tp)]  # Optional[float] too
    return keys


FLOAT_KEYS = _float_keys()


def test_the_float_keys_include_the_ones_that_matter():
    assert {"eval.guidance", "sample.guidance", "optim.lr_unet", "optim.lr_text", "pretrain.vae_lr",
            "pretrain.unet_lr", "optim.max_grad_norm", "optim.eps", "train.snr_gamma", "eval.min_delta",
            "pretrain.kl_weight", "lora.unet_alpha"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text", ["inf", "-inf", ".inf", "nan", ".nan", "1e400"])
def test_non_finite_overrides_are_refused(key, text):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' must be a finite number")):
        load_config(None, [f"{key}={text}"])


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "nan"])
def test_non_finite_values_from_files_are_refused(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' must be a finite number")):
        merge(Config(), {section: {name: value}})


def test_direct_construction_is_checked_too():
    from cxrdist.config import PretrainConfig

    with pytest.raises(ConfigError, match=r"pretrain\.vae_lr"):
        PretrainConfig(vae_lr=float("nan"))


def test_finite_values_still_pass():
    cfg = load_config(None, ["eval.guidance=7.5", "optim.max_grad_norm=0", "train.snr_gamma=5"])
    assert (cfg.eval.guidance, cfg.optim.max_grad_norm, cfg.train.snr_gamma) == (7.5, 0.0, 5.0)
