"""cxrdist.train.distributed without launching processes: DeepSpeed config filling, the offload refusal, checkpoint
arguments, and LoRA state dicts read from a (non-DeepSpeed) prepared module."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cxrdist.errors import ConfigError
from cxrdist.train import distributed

DEEPSPEED = Path(__file__).resolve().parents[3] / "configs" / "deepspeed"


def _plugin(name="zero2", offload="none"):
    from accelerate.utils import DeepSpeedPlugin

    config = json.loads((DEEPSPEED / f"{name}.json").read_text())
    config["zero_optimization"]["offload_optimizer"] = {"device": offload}
    return DeepSpeedPlugin(hf_ds_config=copy.deepcopy(config))


def _accelerator(plugin=None, world=2, unwrap=lambda m: m):
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=world, unwrap_model=unwrap)


def test_cpu_flag_is_off_for_deepspeed_launches(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.wants_cpu_flag() is True
    assert distributed.process_group_backend() is None  # a plain `python train.py`: no process group at all
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.process_group_backend() == "gloo"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert distributed.wants_cpu_flag() is False  # cpu=True would silently drop the DeepSpeed plugin
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert distributed.wants_cpu_flag() is False and distributed.process_group_backend() is None


def test_zero_stage_reads_the_active_plugin():
    assert distributed.zero_stage(_accelerator(None)) == 0
    assert distributed.zero_stage(_accelerator(_plugin("zero2"))) == 2
    assert distributed.zero_stage(_accelerator(_plugin("zero3"))) == 3
    assert distributed.zero_stage(_plugin("zero3")) == 3  # a plugin on its own works too


def test_configure_deepspeed_writes_batch_accumulation_and_clipping():
    plugin = _plugin("zero2")
    distributed.configure_deepspeed(_accelerator(plugin, world=4), micro_batch=6, grad_accum=3, max_grad_norm=0.5,
                              optim_name="adamw8bit")
    config = plugin.deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] == 6
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 6 * 3 * 4
    # accelerate would otherwise replace "auto" by a hard-coded 1.0
    assert config["gradient_clipping"] == 0.5


def test_configure_deepspeed_is_a_no_op_without_deepspeed():
    accelerator = _accelerator(None)
    # adamw8bit next to an offloading DeepSpeed config is refused; without DeepSpeed nothing is checked or written.
    distributed.configure_deepspeed(accelerator, micro_batch=2, grad_accum=1, max_grad_norm=1.0, optim_name="adamw8bit")
    assert vars(accelerator.state) == {"deepspeed_plugin": None}
    assert distributed.checkpoint_kwargs(accelerator) == ({}, {})


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_eight_bit_adamw_with_optimizer_offload_is_refused_with_what_to_do(device):
    with pytest.raises(ConfigError) as err:
        distributed.check_optimizer_offload(_plugin("zero2", offload=device), "adamw8bit")
    message = str(err.value)
    assert "\n" not in message
    assert f"offload_optimizer.device={device}" in message and "DeepSpeedCPUAdam" in message
    assert "use optim.name=adamw" in message
    with pytest.raises(ConfigError):  # also refused through configure_deepspeed, before prepare()
        distributed.configure_deepspeed(_accelerator(_plugin("zero3", offload=device)), 2, 1, 1.0, "adamw8bit")


def test_offload_is_fine_for_plain_adamw_and_8bit_is_fine_without_offload():
    distributed.check_optimizer_offload(_plugin("zero2", offload="cpu"), "adamw")
    distributed.check_optimizer_offload(_plugin("zero2", offload="none"), "adamw8bit")
    distributed.check_optimizer_offload(_accelerator(None), "adamw8bit")


def test_checkpoint_kwargs_exclude_the_frozen_base_only_under_deepspeed():
    assert distributed.checkpoint_kwargs(_accelerator(None)) == ({}, {})
    save, load = distributed.checkpoint_kwargs(_accelerator(_plugin("zero3")))
    assert save == {"exclude_frozen_parameters": True} and load == {"load_module_strict": False}


class _Joint(torch.nn.Module):
    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


def test_lora_state_dicts_without_deepspeed_match_the_adapter_export(tiny_base_path):
    from cxrdist.config import LoraConfig
    from cxrdist.models.loading import load_base
    from cxrdist.models.lora import adapter_state_dicts, attach_lora

    base = load_base(tiny_base_path)
    attach_lora(base, LoraConfig(unet_rank=4, text_rank=2))
    with torch.no_grad():
        for p in base.unet.parameters():
            if p.requires_grad:
                p.add_(0.01)  # B starts at zero: make every tensor distinct from its init
    joint = _Joint(base.unet, base.text_encoder)
    wrapper = SimpleNamespace(module=joint)  # stands in for DDP: unwrap_model returns .module
    unet_sd, text_sd = distributed.lora_state_dicts(_accelerator(None, unwrap=lambda m: m.module), wrapper)
    ref_unet, ref_text = adapter_state_dicts(base.unet, base.text_encoder)
    assert unet_sd.keys() == ref_unet.keys() and text_sd.keys() == ref_text.keys()
    assert all(torch.equal(unet_sd[k], ref_unet[k]) for k in ref_unet)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in unet_sd.values())
    assert not any("lora_" not in k for k in unet_sd)  # frozen base weights never leak into the export
