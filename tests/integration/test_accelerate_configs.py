"""The accelerate / DeepSpeed configs users pick from: every file validates, and the ones that can run on
a CPU-only machine really start 2 ranks (gloo) through `accelerate launch`."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from support.launching import free_port
from support.training import run_reaped

ROOT = Path(__file__).resolve().parents[2]
ACCEL = ROOT / "configs" / "accelerate"
DEEPSPEED = ROOT / "configs" / "deepspeed"
ALL_CONFIGS = ["single_gpu", "multi_gpu", "zero2", "zero3", "multi_node_zero2", "cpu_2ranks"]
LAUNCH_TIMEOUT_S = 240

# Prints one JSON line per rank. The Accelerator comes from the trainer's own builder (cxrdist.train.accel), so
# what is checked here -- world size, distributed type, backend, ZeRO stage -- is what `launch/train.py` gets.
PROBE = """
import json, os, sys, tempfile, torch
from cxrdist.config import load_config
from cxrdist.train import distributed
from cxrdist.train.accel import build_accelerator
acc = build_accelerator(load_config(None, ["train.collective_timeout_s=60"]), tempfile.mkdtemp())
total = torch.tensor([acc.process_index + 1.0], device=acc.device)
if acc.num_processes > 1:
    total = acc.reduce(total, "sum")
print("PROBE " + json.dumps({"rank": acc.process_index, "world": acc.num_processes,
      "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "type": acc.distributed_type.value, "backend": acc.state.backend, "sum": total.item(),
      "zero_stage": distributed.zero_stage(acc)}), flush=True)
acc.end_training()  # DeepSpeed on CPU sometimes aborts at exit with the process group still up
"""


def _launch(config: str, tmp_path: Path) -> list[dict]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / f"{config}.yaml"),
           "--main_process_port", str(free_port()), str(script)]
    proc = run_reaped(cmd, env=env, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Two ranks share the launcher's stdout: one rank's newline can land after the other's line, so records
    # are found by pattern, not by line.
    records = re.findall(r"PROBE (\{[^{}]*\})", proc.stdout)
    return sorted((json.loads(record) for record in records), key=lambda r: r["rank"])


def _ds(name: str) -> dict:
    return json.loads((DEEPSPEED / f"{name}.json").read_text())


# --------------------------------------------------------------------------------------------------------
# Every config validates (no launch needed)
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_accelerate_config_loads_with_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCEL / f"{name}.yaml"))
    raw = yaml.safe_load((ACCEL / f"{name}.yaml").read_text())
    assert config.num_processes >= 1 and config.num_machines >= 1
    # Precision belongs to our config (train.mixed_precision), never to the launcher file.
    assert "mixed_precision" not in raw
    if config.distributed_type.value == "DEEPSPEED":
        ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
        assert ds_file.exists(), f"{name}.yaml points at a missing {ds_file}"
        assert config.deepspeed_config.get("zero3_init_flag") is False  # base is loaded before the Accelerator


def test_cpu_config_is_the_two_process_form_that_works():
    raw = yaml.safe_load((ACCEL / "cpu_2ranks.yaml").read_text())
    # MULTI_CPU or `--cpu` start one process only; MULTI_GPU + use_cpu starts two, and the ranks see no GPU.
    assert raw["distributed_type"] == "MULTI_GPU" and raw["use_cpu"] is True and raw["num_processes"] == 2
    assert raw["gpu_ids"] == "-1,-1"


def test_multi_node_example_has_placeholders_for_every_node_setting():
    raw = yaml.safe_load((ACCEL / "multi_node_zero2.yaml").read_text())
    assert raw["num_machines"] > 1 and raw["num_processes"] % raw["num_machines"] == 0
    for key in ("machine_rank", "main_process_ip", "main_process_port"):
        assert key in raw
    text = (ACCEL / "multi_node_zero2.yaml").read_text()
    assert text.count("PLACEHOLDER") >= 3


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_json_is_driven_by_our_config(name, stage):
    config = _ds(name)
    assert config["zero_optimization"]["stage"] == stage
    # accelerate fills these from our config (batch, accumulation, precision) or cxrdist.train.distributed does.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    # A client optimizer (AdamW / AdamW8bit) is passed from code: no optimizer or scheduler block here.
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    # Our joint UNet + text encoder has no `config.hidden_size`, so size-derived "auto" values cannot be filled.
    for key, value in config["zero_optimization"].items():
        assert value != "auto", f"zero_optimization.{key} must be a number: the joint module has no hidden_size"


def test_deepspeed_json_is_accepted_by_the_plugin():
    from accelerate.utils import DeepSpeedPlugin

    for name in ("zero2", "zero3"):
        plugin = DeepSpeedPlugin(hf_ds_config=str(DEEPSPEED / f"{name}.json"))
        assert plugin.zero_stage == int(name[-1])


# --------------------------------------------------------------------------------------------------------
# Real launches: 2 processes each (~10-25 s per launch on 2 cores, hence slow)
# --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_cpu_config_starts_two_gloo_ranks_with_no_gpu_visible(tmp_path):
    ranks = _launch("cpu_2ranks", tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["zero_stage"] == 0 for r in ranks)
    assert all(r["backend"] == "gloo" and r["cuda_visible_devices"] == "-1,-1" for r in ranks)  # also beside GPUs


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a usable CUDA device")
@pytest.mark.timeout(3 * LAUNCH_TIMEOUT_S)
@pytest.mark.parametrize("name, asks", [("single_gpu", "CUDA_VISIBLE_DEVICES=0"), ("multi_gpu", "a launch of 2 ranks"),
                                        ("zero2", "a DeepSpeed launch without DS_ACCELERATOR=cpu")])
def test_gpu_configs_without_a_usable_gpu_stop_in_one_line(name, asks, phantom_shards, tmp_path):
    """The real training command under a GPU config on this CPU-only machine: every rank stops with the one line
    naming the cause before any model loads, the launch exits non-zero, and nothing is trained or written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("DS_ACCELERATOR", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / f"{name}.yaml"),
           "--main_process_port", str(free_port()), str(ROOT / "launch" / "train.py"), "--fold", "0",
           "--shards", str(phantom_shards), "--output-dir", str(tmp_path / "run"), "--preset", "tiny",
           "--set", "data.image_size=64"]
    proc = run_reaped(cmd, env=env, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors and all(f"this run asks for a GPU ({asks}" in line for line in errors), proc.stderr[-3000:]
    assert "CPU-only build" in errors[0] and "TORCH_SPEC=" in errors[0]
    assert not list((tmp_path / "run").rglob("*.safetensors")) and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_start_two_ranks_with_the_plugin_active(name, stage, tmp_path):
    ranks = _launch(name, tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["world"] == 2 and r["sum"] == 3.0
        assert r["type"] == "DEEPSPEED" and r["zero_stage"] == stage


@pytest.mark.skipif(not torch.cuda.is_available(), reason="single_gpu.yaml needs a GPU")
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_single_gpu_config_starts_one_process(tmp_path):
    ranks = _launch("single_gpu", tmp_path)
    assert len(ranks) == 1 and ranks[0]["world"] == 1
