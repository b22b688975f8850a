"""The optimizers: a learning rate and weight decay per parameter group, and 8-bit AdamW built (or refused in one line) and stepping on the training device."""
from __future__ import annotations

import sys

import pytest

from cxrdist.config import load_config
from cxrdist.errors import ConfigError
from support.training import tiny_lora_model


def test_optimizer_groups_have_their_own_lr_and_decay(tiny_base_path):
    from cxrdist.train.optim import build_optimizer

    cfg = load_config(None, ["optim.lr_unet=1e-3", "optim.lr_text=2e-4", "optim.weight_decay_text=0.5"])
    _, model = tiny_lora_model(tiny_base_path)
    opt = build_optimizer(model, cfg.optim, "cpu")
    (unet, text) = opt.param_groups
    assert (unet["name"], unet["lr"], unet["weight_decay"]) == ("unet", 1e-3, cfg.optim.weight_decay_unet)
    assert (text["name"], text["lr"], text["weight_decay"]) == ("text", 2e-4, 0.5)
    _, frozen_text = tiny_lora_model(tiny_base_path, train_text=False)
    assert [g["name"] for g in build_optimizer(frozen_text, cfg.optim, "cpu").param_groups] == ["unet"]


def test_adamw8bit_builds_or_says_clearly_why_not(tiny_base_path, monkeypatch):
    from cxrdist.train.optim import build_optimizer

    cfg = load_config(None, ["optim.name=adamw8bit"])
    _, model = tiny_lora_model(tiny_base_path)
    opt = build_optimizer(model, cfg.optim, "cpu")
    assert type(opt).__name__ == "AdamW8bit"  # bitsandbytes runs on CPU in this stack
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes.*optim.name=adamw"):
        build_optimizer(model, cfg.optim, "cpu")


def test_adamw8bit_takes_one_real_step_on_the_training_device_when_built(tiny_base_path, monkeypatch):
    """A bitsandbytes that imports and builds its optimizer but has no kernel for the device (a missing CUDA binary)
    is refused in one line when the optimizer is built, before the first training step."""
    import bitsandbytes as bnb

    from cxrdist.train.optim import build_optimizer

    cfg = load_config(None, ["optim.name=adamw8bit"])
    _, model = tiny_lora_model(tiny_base_path)
    stepped_on = []
    real_step = bnb.optim.AdamW8bit.step

    def recording_step(self, *args, **kwargs):
        stepped_on.extend(p.device.type for g in self.param_groups for p in g["params"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", recording_step)
    build_optimizer(model, cfg.optim, "cpu")
    assert stepped_on == ["cpu"]  # the probe's one tensor; the model's adapters were not stepped

    def missing_kernel(self, *args, **kwargs):
        raise RuntimeError("CUDA binary for this GPU not found\nlong traceback text")

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", missing_kernel)
    with pytest.raises(ConfigError) as refused:
        build_optimizer(model, cfg.optim, "cpu")
    message = str(refused.value)
    assert "\n" not in message and "cannot run on cpu" in message and "CUDA binary for this GPU not found" in message
    assert "optim.name=adamw" in message
    assert all(p.grad is None for p in model.parameters())  # nothing of the model was touched
