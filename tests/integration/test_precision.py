"""Mixed precision on the launchers users run, for real on 2 CPU ranks (gloo, DS_ACCELERATOR=cpu).

What runs here, per launcher x train.mixed_precision (the fp32 column is tests/integration/test_scale_train.py):
- bf16: one process (tests/unit/train/test_nonfinite_steps.py), DDP (cpu_2ranks.yaml), ZeRO-2, ZeRO-3 -- each
  trains with ranks in step and a falling loss; the exports are fp32 and load in plain diffusers; a ZeRO-2 bf16
  run whose rank dies resumes bit for bit; an inf loss on one rank skips that step on both (with AdamW8bit as
  DeepSpeed's client optimizer).
- fp16: refused before any model loads on a machine without CUDA (accelerate has no CPU fp16 autocast or
  GradScaler, DeepSpeed's CPU backend no fp16); its loss-scaling bookkeeping is tested in the unit tests.
Under DeepSpeed bf16 the engine holds every parameter, the adapters too, in bf16 and keeps fp32 master
copies in its optimizer: checkpoints and exports must come from those masters, never from the bf16 copies.
"""
from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from support.launching import (ACCEL, LAUNCH_TIMEOUT_S, MAX_SHARE_MOVED, MOVED, STEP4, best_export, check_common,
                               deepspeed_config, last_by_step, launch, max_diff, rewind_to_step2, scalars,
                               share_beyond, two_machines)
from support.training import child_env

# The tiny preset is built before any launch: two ranks materialising it at once collide.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_base_path")]

BF16 = "train.mixed_precision=bf16"
# How close two bf16 runs from the same seed end. Early Adam steps move an element by about +-lr whatever the size
# of its gradient, so an element whose near-zero gradient flips sign under bf16 rounding ends up to the sum of the
# LRs (0.025 here) away; such elements are few. Measured after 4 steps at lr 1e-2 (|w| up to ~0.5):
# - DDP bf16 (fp32 adapters under autocast) vs ZeRO-2 bf16 (bf16 adapters, fp32 masters): max 2.9e-3 on the
#   phantoms before they carried acquisition details; on today's phantoms max 1.2e-2 (six of 30,208 elements
#   beyond 1e-2, all in lora_A, whose gradients start near zero) and 0.33% of elements beyond 1e-3.
# - ZeRO-3 bf16 vs ZeRO-2 bf16: max 3.0e-2 but only 3.2% of elements beyond 1e-3 (its step-1 forward already
#   differs at 1e-4); in fp32 the two agree to 1.3e-5 (test_scale_train).
# A broken path -- an update lost or applied twice, one step skipped -- moves 30% (one skipped step) to 93% (two
# steps) of the elements beyond 1e-3. A bf16-rounded export is caught by _not_bf16_rounded.
SIGN_FLIP_CEILING = 2.5e-2  # the sum of the LRs: no element of a sound bf16 run moves farther


def _not_bf16_rounded(tensors: dict[str, torch.Tensor]) -> bool:
    """fp32 values that a bf16 copy could not hold: they come from an fp32 master, not from the bf16 module."""
    trained = [t for k, t in tensors.items() if "lora_B" in k or "lora.up" in k]
    return all(t.dtype == torch.float32 for t in tensors.values()) and any(
        not torch.equal(t, t.to(torch.bfloat16).float()) for t in trained)


@pytest.fixture(scope="module")
def zero2_bf16(phantom_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("z2bf16") / "run"
    return out, launch(ACCEL / "zero2.yaml", phantom_shards, out, BF16)


@pytest.fixture(scope="module")
def ddp_bf16(phantom_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpbf16") / "run"
    return out, launch(ACCEL / "cpu_2ranks.yaml", phantom_shards, out, BF16)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_zero2_bf16_trains_and_exports_fp32_master_weights(zero2_bf16):
    run, res = zero2_bf16
    check_common(run, res, "DeepSpeed ZeRO-2")
    assert "mixed precision bf16, frozen base in bfloat16, inputs in bfloat16" in res.stderr
    assert _not_bf16_rounded(load_file(str(run / STEP4 / "adapter.safetensors")))
    assert _not_bf16_rounded(load_file(str(best_export(run) / "pytorch_lora_weights.safetensors")))


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_ddp_bf16_trains_and_ends_near_zero2_bf16(ddp_bf16, zero2_bf16):
    run, res = ddp_bf16
    check_common(run, res, "DDP")
    assert "mixed precision bf16" in res.stderr
    ddp = load_file(str(run / STEP4 / "adapter.safetensors"))
    assert _not_bf16_rounded(ddp)
    assert zero2_bf16[1].returncode == 0, zero2_bf16[1].stderr[-3000:]
    zero2 = load_file(str(zero2_bf16[0] / STEP4 / "adapter.safetensors"))
    assert max_diff(ddp, zero2) < SIGN_FLIP_CEILING and share_beyond(ddp, zero2, MOVED) < MAX_SHARE_MOVED


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_zero3_bf16_gathers_fp32_masters_and_matches_zero2_bf16(zero2_bf16, phantom_shards, tmp_path):
    config = deepspeed_config(tmp_path, 3, stage3_param_persistence_threshold=0)  # adapters really partitioned
    run = tmp_path / "z3"
    res = launch(config, phantom_shards, run, BF16)
    check_common(run, res, "DeepSpeed ZeRO-3")
    export = load_file(str(best_export(run) / "pytorch_lora_weights.safetensors"))
    assert all(t.numel() > 0 for t in export.values()) and _not_bf16_rounded(export)
    a = load_file(str(run / STEP4 / "adapter.safetensors"))
    b = load_file(str(zero2_bf16[0] / STEP4 / "adapter.safetensors"))
    assert a.keys() == b.keys() and share_beyond(a, b, MOVED) < MAX_SHARE_MOVED
    for tag in ("train/loss", "val/val_loss"):
        assert last_by_step(scalars(run, tag)) == pytest.approx(last_by_step(scalars(zero2_bf16[0], tag)), rel=1e-3)


def test_the_zero2_bf16_export_loads_in_plain_diffusers_and_changes_its_output(zero2_bf16, tiny_base_path):
    from diffusers import StableDiffusionPipeline

    from cxrdist.models.text import encode_prompts

    run, res = zero2_bf16
    assert res.returncode == 0, res.stderr[-3000:]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base_path, safety_checker=None)

    def predict() -> torch.Tensor:
        context = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["Mild cardiomegaly. No effusion."])
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample

    before = predict()
    pipe.load_lora_weights(str(best_export(run)))
    assert (predict() - before).abs().max() > 1e-4


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 60)
def test_a_dead_rank_stops_the_other_loudly_and_resume_latest_continues_exactly(zero2_bf16, phantom_shards, tmp_path):
    """Rank 1 SIGKILLs itself after step 3 (checkpoint at 2): rank 0 exits non-zero quickly with a line saying
    how to continue; `--resume latest` under ZeRO-2 bf16 then ends with the uninterrupted run's adapter and lr, bit
    for bit: the engine restores the bf16 module and the fp32 masters, our state the data position and noise."""
    run2, res2 = zero2_bf16
    assert res2.returncode == 0, res2.stderr[-3000:]
    out = tmp_path / "dies"
    # a rank 0 left waiting would hang for gloo's 30 minutes: the launch's own timeout (LAUNCH_TIMEOUT_S) fails it
    dead = launch(ACCEL / "zero2.yaml", phantom_shards, out, BF16, "train.collective_timeout_s=20",
                  env=child_env(DS_ACCELERATOR="cpu", CXRDIST_FAULT_KILL_AT_STEP="3", CXRDIST_FAULT_KILL_RANK="1"))
    assert dead.returncode != 0
    assert "exitcode  : -9" in dead.stderr or f"exitcode: -{int(signal.SIGKILL)}" in dead.stderr
    message = [line for line in dead.stderr.splitlines() if line.startswith("Error: rank 0")]
    assert message and "--resume latest" in message[0] and "step_00000002" in message[0], dead.stderr[-3000:]
    assert sorted(p.name for p in (out / "fold1" / "checkpoints").iterdir()) == ["step_00000002"]

    resumed = launch(ACCEL / "zero2.yaml", phantom_shards, out, BF16, "train.collective_timeout_s=20",
                     extra=("--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "step_00000002" in resumed.stderr
    a = load_file(str(run2 / STEP4 / "adapter.safetensors"))
    b = load_file(str(out / STEP4 / "adapter.safetensors"))
    assert max_diff(a, b) == 0.0
    for tag in ("lr/unet", "lr/text", "train/loss"):
        assert last_by_step(scalars(out, tag))[4] == pytest.approx(last_by_step(scalars(run2, tag))[4], rel=1e-6), tag


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_adamw8bit_under_zero2_bf16_skips_a_nonfinite_loss_of_one_rank_on_both(zero2_bf16, phantom_shards, tmp_path):
    """bitsandbytes' AdamW8bit as DeepSpeed's client optimizer, in bf16. Rank 1's loss is inf in micro-batch 2
    (step 3's); with train.nonfinite_loss=skip both ranks skip step 3 (DeepSpeed's overflow check), which counts
    for nothing: 4 steps need 5 windows, and the LR of step 4 is the uninterrupted run's."""
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "skip"
    res = launch(ACCEL / "zero2.yaml", phantom_shards, run, BF16, "train.nonfinite_loss=skip", "optim.name=adamw8bit",
                 env=child_env(DS_ACCELERATOR="cpu", CXRDIST_FAULT_INF_LOSS_AT_MICRO_STEP="2",
                               CXRDIST_FAULT_KILL_RANK="1"))
    check_common(run, res, "DeepSpeed ZeRO-2")
    assert "DeepSpeedZeroOptimizer > AdamW8bit" in res.stderr
    assert "optimizer step 3 skipped" in res.stderr
    assert last_by_step(scalars(run, "train/skipped_steps"))[4] == 1
    assert sorted(p.name for p in (run / "fold1" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    ref = last_by_step(scalars(zero2_bf16[0], "lr/unet"))
    assert last_by_step(scalars(run, "lr/unet")) == pytest.approx(ref, rel=1e-6)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("config", [None, "zero2.yaml"], ids=["one-process", "zero2"])
def test_fp16_without_cuda_is_refused_in_one_line_before_any_model_loads(config, phantom_shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on CUDA")
    run = tmp_path / "fp16"
    res = launch(ACCEL / config if config else None, phantom_shards, run, "train.mixed_precision=fp16",
                 env=child_env(DS_ACCELERATOR="cpu"), timeout=150)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("Error: train.mixed_precision=fp16")]
    assert lines and len(lines) == (2 if config else 1), res.stderr[-3000:]
    assert "use train.mixed_precision=bf16 or no" in lines[0]
    assert "Traceback" not in res.stderr.split("Error:")[0]  # nothing ran before the refusal
    assert not (run / "fold1" / "checkpoints").exists()


@pytest.mark.timeout(180)
def test_a_deepspeed_config_that_accelerate_would_run_as_ddp_is_refused(phantom_shards, tmp_path):
    res = launch(ACCEL / "zero2.yaml", phantom_shards, tmp_path / "dropped",
                 env=child_env(DS_ACCELERATOR="cpu", ACCELERATE_USE_CPU="1"), timeout=150)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("Error: a DeepSpeed config was launched")]
    assert len(lines) == 2 and "ACCELERATE_USE_CPU=1 is set" in lines[0], res.stderr[-3000:]
    assert "unset ACCELERATE_USE_CPU" in lines[0]


@pytest.mark.timeout(180)
def test_a_payload_planted_in_a_deepspeed_checkpoint_file_is_refused_on_every_rank(zero2_bf16, phantom_shards,
                                                                                    tmp_path):
    """DeepSpeed's engine would unpickle its files with weights_only=False; here the file is refused unopened."""
    import shutil

    from support.trust import plant  # tests/unit: the planted object touches a marker when unpickled

    run, res = zero2_bf16
    assert res.returncode == 0, res.stderr[-3000:]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = tmp_path / "payload_ran"
    plant(copy / STEP4 / "pytorch_model" / "mp_rank_00_model_states.pt", marker)
    resumed = launch(ACCEL / "zero2.yaml", phantom_shards, copy, BF16, extra=("--resume", "latest"), timeout=150)
    assert resumed.returncode != 0
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("Error: cannot resume from")]
    assert len(lines) == 2 and "pytorch_model/mp_rank_00_model_states.pt holds something other" in lines[0], \
        resumed.stderr[-3000:]
    assert not marker.exists()


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 60)
def test_multi_node_zero2_bf16_as_two_launchers_ends_where_one_machine_does_and_resumes(zero2_bf16, phantom_shards,
                                                                                        tmp_path):
    """configs/accelerate/multi_node_zero2.yaml with one process per "machine": two `accelerate launch` processes
    on this host (static rendezvous on 127.0.0.1, DeepSpeed's standard multinode launcher) train exactly like the
    one-machine ZeRO-2 bf16 run; the run folder is seen by both, so the shared-folder check passes. Rewound to its
    step-2 checkpoint, the two launchers' `--resume latest` ends with the same adapter again."""
    out = tmp_path / "two_machines"
    main, other = two_machines(ACCEL / "multi_node_zero2.yaml", phantom_shards, (out, out), BF16)
    assert other.returncode == 0, other.stderr[-3000:]
    check_common(out, main, "DeepSpeed ZeRO-2")
    one_machine = load_file(str(zero2_bf16[0] / STEP4 / "adapter.safetensors"))
    assert max_diff(load_file(str(out / STEP4 / "adapter.safetensors")), one_machine) == 0.0  # measured 0.0
    again = rewind_to_step2(out, tmp_path / "resumed")
    main, other = two_machines(ACCEL / "multi_node_zero2.yaml", phantom_shards, (again, again), BF16,
                               extra=("--resume", "latest"))
    assert main.returncode == other.returncode == 0, (main.stderr[-3000:], other.stderr[-3000:])
    assert "resumed from" in main.stderr and "step_00000002" in main.stderr
    assert max_diff(load_file(str(again / STEP4 / "adapter.safetensors")), one_machine) == 0.0
