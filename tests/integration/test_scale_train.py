"""The real trainer on 2 CPU ranks (gloo, DS_ACCELERATOR=cpu): DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Each launch is one `accelerate launch` of launch/train.py with one of our configs, and checks as much as it
can: 4 optimizer steps of the tiny preset, checkpoints at steps 2 and 4, validation at 2 and 4.
The shard set makes the data uneven per rank on purpose: the 32 training samples sit in ONE shard and the
validation cap (eval.max_eval_samples=1) leaves rank 1 without any validation sample, which would hang a
shard-per-rank split and a ZeRO-3 evaluation that skipped the empty rank.
The ZeRO-3 launch uses stage3_param_persistence_threshold=0, so the LoRA tensors really are partitioned
(with the shipped threshold they are small enough to stay whole, and a naive export would pass by luck).
"""
from __future__ import annotations


import pytest
from safetensors.torch import load_file

from support.launching import (ACCEL, ADAPTER_ATOL, LAUNCH_TIMEOUT_S, STEP4, base_bytes, best_export,
                               check_common, checkpoint_bytes, deepspeed_config, last_by_step, launch,
                               launch_until, max_diff, scalars)
from support.training import child_env

# The tiny preset is built before any launch: two ranks materialising it at once collide.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_base_path")]


@pytest.fixture(scope="module")
def zero2_run(phantom_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2") / "run"
    return out, launch(ACCEL / "zero2.yaml", phantom_shards, out)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_zero2_trains_with_ranks_in_step_and_saves_adapter_sized_checkpoints(zero2_run, tiny_base_path):
    run, res = zero2_run
    check_common(run, res, "DeepSpeed ZeRO-2")
    assert "DeepSpeedZeroOptimizer > AdamW" in res.stderr  # our client optimizer, inside ZeRO
    size, base = checkpoint_bytes(run), base_bytes(tiny_base_path)
    adapter = (run / STEP4 / "adapter.safetensors").stat().st_size
    # frozen base left out: measured 0.05 x base (adapter, optimizer partitions, RNG, DeepSpeed's scripts)
    assert adapter < size < 0.1 * base, (size, base, adapter)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_zero3_gathers_partitioned_lora_for_export_and_matches_zero2(zero2_run, phantom_shards, tmp_path,
                                                                     tiny_base_path):
    run2, res2 = zero2_run
    assert res2.returncode == 0, res2.stderr[-3000:]
    config = deepspeed_config(tmp_path, 3, stage3_param_persistence_threshold=0)
    run3 = tmp_path / "zero3"
    res3 = launch(config, phantom_shards, run3)
    check_common(run3, res3, "DeepSpeed ZeRO-3")
    assert checkpoint_bytes(run3) < 0.1 * base_bytes(tiny_base_path)
    # the validation images were generated (every rank runs the sampler in step under ZeRO-3)
    assert len(scalars(run3, "val/ssim")) == 2
    exp2, exp3 = best_export(run2), best_export(run3)
    assert exp2.name == exp3.name
    a = load_file(str(exp2 / "pytorch_lora_weights.safetensors"))
    b = load_file(str(exp3 / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("unet.") for k in b) and any(k.startswith("text_encoder.") for k in b)
    assert all(t.numel() > 0 for t in b.values()), "empty (still partitioned) tensors in the ZeRO-3 export"
    assert max(float(t.abs().max()) for k, t in b.items() if "lora_B" in k) > 0  # trained, not the initial zeros
    assert max_diff(a, b) < ADAPTER_ATOL


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_a_silent_rank_makes_the_other_fail_after_the_collective_timeout(phantom_shards, tmp_path):
    """Rank 1 stops (SIGSTOP: alive, never answering) after step 1. No launcher notices a stopped process, so
    rank 0 must fail by itself after train.collective_timeout_s -- also inside DeepSpeed's own process groups,
    which do not inherit the world group's timeout unless we set torch's default."""
    # A rank 0 waiting on the default timeout (30 minutes) would never print the line within launch_until's timeout.
    # The test stops reading (and kills the launch) at rank 0's line: the launcher itself would then wait 30 s
    # for the stopped rank 1 before killing it, which says nothing about cxrdist.
    message, stderr = launch_until(ACCEL / "zero2.yaml", phantom_shards, tmp_path / "silent",
                                   "train.collective_timeout_s=8", "train.max_steps=2",
                                   line_starts="Error: rank 0 lost the other ranks",
                                   env=child_env(DS_ACCELERATOR="cpu", CXRDIST_FAULT_KILL_AT_STEP="1",
                                                 CXRDIST_FAULT_KILL_RANK="1", CXRDIST_FAULT_SIGNAL="SIGSTOP"))
    assert message and "collective_timeout_s=8" in message and "--resume latest" in message, stderr[-3000:]


@pytest.mark.timeout(180)
def test_adamw8bit_with_optimizer_offload_is_refused_on_every_rank(phantom_shards, tmp_path):
    config = deepspeed_config(tmp_path, 2, offload_optimizer={"device": "cpu"})
    run = tmp_path / "offload"
    res = launch(config, phantom_shards, run, "optim.name=adamw8bit", timeout=150)
    assert res.returncode != 0
    refusals = [line for line in res.stderr.splitlines() if line.startswith("Error: optim.name=adamw8bit cannot run")]
    assert len(refusals) == 2, res.stderr[-3000:]  # both ranks, before anything was built or written
    assert "offload_optimizer.device=cpu" in refusals[0] and "use optim.name=adamw" in refusals[0]
    assert not (run / "fold1" / "checkpoints").exists()


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S)
def test_ddp_ranks_match_a_single_process_with_the_same_global_batch(phantom_shards, tmp_path):
    """2 ranks x batch 4 vs 1 process x batch 8: same samples per step (data.rank_split=samples) and per-sample
    noise, so the adapters agree up to float reduction order, and the rank-reduced validation loss (all 48
    validation samples, each on exactly one rank) equals the one-process value."""
    full_eval = ("eval.max_eval_samples=0", "data.rank_split=samples")
    ddp = launch(ACCEL / "cpu_2ranks.yaml", phantom_shards, tmp_path / "ddp", *full_eval)
    check_common(tmp_path / "ddp", ddp, "DDP")
    one = launch(None, phantom_shards, tmp_path / "one", *full_eval, "train.batch_size=8",
                 env=child_env())
    assert one.returncode == 0, one.stderr[-3000:]
    assert "1 rank(s)" in one.stderr and "effective batch 8" in one.stderr and "effective batch 8" in ddp.stderr
    a = load_file(str(tmp_path / "ddp" / STEP4 / "adapter.safetensors"))
    b = load_file(str(tmp_path / "one" / STEP4 / "adapter.safetensors"))
    assert max_diff(a, b) < ADAPTER_ATOL
    val_ddp = last_by_step(scalars(tmp_path / "ddp", "val/val_loss"))
    val_one = last_by_step(scalars(tmp_path / "one", "val/val_loss"))
    assert val_ddp.keys() == val_one.keys() == {2, 4}
    for step in (2, 4):
        assert val_ddp[step] == pytest.approx(val_one[step], rel=1e-4), (step, val_ddp, val_one)
    assert scalars(tmp_path / "ddp", "train/loss")[-1][1] == pytest.approx(
        scalars(tmp_path / "one", "train/loss")[-1][1], rel=1e-4)
