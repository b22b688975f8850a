"""Every config key's allowed values are part of its type (`Literal[...]`, `Annotated[..., AtLeast(n)]`), checked by
one rule when the config loads: a value accepted there cannot fail later for being that value."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from cxrdist.config import AtLeast, Config, load_config
from cxrdist.errors import ConfigError

# Each was accepted at load and failed later: a division by zero on the first step or evaluation, a silent run of
# 0 steps, a KeyError after the base model had loaded.
ONCE_ACCEPTED = {
    "train.log_every=0": r"^config key 'train.log_every' must be >= 1, got 0$",
    "eval.eval_every_epochs=0": r"^config key 'eval.eval_every_epochs' must be >= 1, got 0$",
    "train.max_steps=-5": r"^config key 'train.max_steps' must be >= 0, got -5$",
    "model.attention=flash": r"^config key 'model.attention' must be sdpa or default, got 'flash'$",
    "model.vae_dtype=int8": r"^config key 'model.vae_dtype' must be fp32, bf16 or fp16, got 'int8'$",
}


@pytest.mark.parametrize("override", sorted(ONCE_ACCEPTED))
def test_values_that_used_to_fail_later_are_refused_at_load(override):
    with pytest.raises(ConfigError, match=ONCE_ACCEPTED[override]):
        load_config(overrides=[override])


def _declared() -> list[tuple[str, str, typing.Any]]:
    """(section, key, type with its declarations) of every key of every section."""
    out, defaults = [], Config()
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(type(getattr(defaults, section.name)), include_extras=True)
        out += [(section.name, key, tp) for key, tp in hints.items() if not key.isupper()]
    return out


CHOICES = [(s, k, typing.get_args(tp)) for s, k, tp in _declared() if typing.get_origin(tp) is typing.Literal]
BOUNDS = [(s, k, m.low) for s, k, tp in _declared() for m in getattr(tp, "__metadata__", ()) if isinstance(m, AtLeast)]


def test_choice_keys_and_lower_bounded_keys_are_declared_in_their_types():
    assert {"model.attention", "model.vae_dtype", "optim.name", "train.method", "eval.metric"} <= {
        f"{s}.{k}" for s, k, _ in CHOICES}
    assert {"train.log_every", "eval.eval_every_epochs", "train.max_steps", "train.epochs"} <= {
        f"{s}.{k}" for s, k, _ in BOUNDS}


@pytest.mark.parametrize("section, key, choices", CHOICES, ids=[f"{s}.{k}" for s, k, _ in CHOICES])
def test_every_choice_key_takes_each_of_its_values_and_refuses_another(section, key, choices):
    for value in choices:
        overrides = [f"{section}.{key}={value}"]
        if section == "eval" and key == "metric" and value in ("fid", "kid"):
            overrides.append("eval.num_metric_images=16")  # a set metric needs a set of images
        assert getattr(getattr(load_config(overrides=overrides), section), key) == value
    with pytest.raises(ConfigError, match=rf"^config key '{section}\.{key}' must be .*, got 'nonsense'$"):
        load_config(overrides=[f"{section}.{key}=nonsense"])


@pytest.mark.parametrize("section, key, low", BOUNDS, ids=[f"{s}.{k}" for s, k, _ in BOUNDS])
def test_every_bounded_key_takes_its_bound_and_refuses_below_it(section, key, low):
    below = int(low) - 1
    with pytest.raises(ConfigError, match=rf"^config key '{section}\.{key}' must be >= {int(low)}, got {below}$"):
        load_config(overrides=[f"{section}.{key}={below}"])
    section_type = type(getattr(Config(), section))
    with pytest.raises(ConfigError):  # built directly, as code does, the same rule holds
        section_type(**{key: below})


def test_each_choice_is_one_its_consumer_knows():
    """The tables that read a choice key have an entry for every value the config accepts."""
    from cxrdist.config import ATTENTIONS, LR_SCHEDULES, OPTIMIZERS, VAE_DTYPES
    from cxrdist.models.loading import DTYPES
    from cxrdist.train import model_setup, optim

    assert set(model_setup.ATTENTION) == set(ATTENTIONS)
    assert set(optim.OPTIMIZERS) == set(OPTIMIZERS)
    assert set(optim.SCHEDULES) == set(LR_SCHEDULES)
    assert set(DTYPES) == set(VAE_DTYPES)
