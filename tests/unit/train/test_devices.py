"""A GPU launch on a machine where torch has no usable CUDA device stops in one line; CPU runs asked for go on.

The environments are those each launcher gives its ranks (checked with real launches in
tests/integration/test_accelerate_configs.py): accelerate's one-process launcher sets ACCELERATE_USE_CPU and
CUDA_VISIBLE_DEVICES from `gpu_ids`, the multi-process one WORLD_SIZE, a DeepSpeed launch ACCELERATE_USE_DEEPSPEED.
"""
from __future__ import annotations

import pytest
import torch

from cxrdist import env_info
from cxrdist.errors import ConfigError
from cxrdist.train import devices

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals need a machine without CUDA")

SINGLE_GPU = {"ACCELERATE_USE_CPU": "False", "CUDA_VISIBLE_DEVICES": "0"}
MULTI_GPU = {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}
CPU_2RANKS = {**MULTI_GPU, "CUDA_VISIBLE_DEVICES": "-1,-1"}
ZERO2 = {**MULTI_GPU, "ACCELERATE_USE_DEEPSPEED": "true"}


@pytest.fixture(autouse=True)
def no_driver(monkeypatch):
    monkeypatch.setattr(devices, "driver_gpu_count", lambda: 0)
    monkeypatch.setattr(env_info, "driver_gpu_count", lambda: 0)


@pytest.mark.parametrize("env, wanted", [
    (SINGLE_GPU, "CUDA_VISIBLE_DEVICES=0"),
    (MULTI_GPU, "a launch of 2 ranks"),
    (ZERO2, "a DeepSpeed launch without DS_ACCELERATOR=cpu"),
    ({**ZERO2, "CUDA_VISIBLE_DEVICES": ""}, "a DeepSpeed launch"),  # DeepSpeed's own switch is what counts there
    ({"CUDA_VISIBLE_DEVICES": "GPU-5e2f1c"}, "CUDA_VISIBLE_DEVICES=GPU-5e2f1c"),  # a SLURM-assigned UUID
])
def test_gpu_launches_without_cuda_are_refused_in_one_line(env, wanted):
    with pytest.raises(ConfigError) as refused:
        devices.check_training_device(env)
    message = str(refused.value)
    assert "\n" not in message and f"asks for a GPU ({wanted}" in message
    if torch.version.cuda is None:  # this machine's case: the wheel itself, and how to get the CUDA one
        assert "CPU-only build" in message and "TORCH_SPEC=" in message
    on_cpu = "DS_ACCELERATOR=cpu" if "DEEPSPEED" in str(env) else "configs/accelerate/cpu_2ranks.yaml"
    assert on_cpu in message


@pytest.mark.parametrize("env", [
    CPU_2RANKS,
    {**MULTI_GPU, "ACCELERATE_USE_CPU": "1"},  # README: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...
    {**MULTI_GPU, "CUDA_VISIBLE_DEVICES": ""},
    {**ZERO2, "DS_ACCELERATOR": "cpu"},
    {"ACCELERATE_USE_CPU": "True"},  # `accelerate launch --cpu`
    {},  # one plain `python launch/train.py` on a machine without a GPU
    {"ACCELERATE_USE_CPU": "False"},  # plain `accelerate launch` without a config file, ditto
])
def test_cpu_runs_asked_for_go_on(env):
    devices.check_training_device(env)


def test_gpus_the_driver_lists_ask_for_a_gpu_even_from_one_plain_process(monkeypatch):
    monkeypatch.setattr(devices, "driver_gpu_count", lambda: 8)
    monkeypatch.setattr(env_info, "driver_gpu_count", lambda: 8)
    with pytest.raises(ConfigError, match=r"asks for a GPU \(the 8 NVIDIA GPU\(s\) in this machine\)"):
        devices.check_training_device({})
    devices.check_training_device({"ACCELERATE_USE_CPU": "1"})


def test_the_cause_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is a CPU-only build" in env_info.cuda_unusable_reason()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert "CUDA_VISIBLE_DEVICES='-1' hides every GPU" in env_info.cuda_unusable_reason()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(env_info, "driver_gpu_count", lambda: 2)
    assert "(CUDA 12.8) cannot use the 2 GPU(s) the NVIDIA driver lists" in env_info.cuda_unusable_reason()
    monkeypatch.setattr(env_info, "driver_gpu_count", lambda: 0)
    assert "sees no GPU" in env_info.cuda_unusable_reason()
    with pytest.raises(ConfigError, match="check `nvidia-smi`"):
        devices.check_training_device(SINGLE_GPU)


@pytest.mark.parametrize("value, hidden", [(None, False), ("", True), ("-1", True), ("-1,-1", True), ("0", False),
                                           ("0,1", False), (" -1", True), ("GPU-5e2f1c", False)])
def test_which_cuda_visible_devices_values_hide_every_gpu(value, hidden):
    assert env_info.visible_devices_hidden(value) is hidden
