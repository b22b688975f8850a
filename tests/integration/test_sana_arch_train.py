"""One optimizer step of the real trainer on the Sana-0.6B *architecture* (preset `sana-arch`: a 592M-parameter
transformer of 28 linear-attention blocks and Sana 1.0's 312M-parameter DC-AE, with random weights), on CPU.

`make test` runs it on `sana-arch-narrow`, the same module tree at 1/8 of every width (seconds); the full-size run
(4 GB of weights) is `make test-full` (CXRDIST_FULL_SIZE=1). The tiny Sana preset has the classes; this has the
module names and depth a real Sana base has: LoRA on to_q/to_k/to_v/to_out.0 of the self- and cross-attention of
all 28 blocks, gradient checkpointing, bf16, a 32x autoencoder and flow matching, through `launch/train.py`.
"""
from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

from support.training import architecture_run_inputs, launch_train, trainable_counts

pytestmark = pytest.mark.slow

# 256 px: 8 x 8 latents from the 32x DC-AE
SETS = ["data.image_size=256", "data.max_train_samples=4", "data.shuffle_buffer=1", "train.batch_size=1",
        "train.max_steps=1", "train.log_every=1", "train.mixed_precision=bf16", "model.gradient_checkpointing=true",
        "lora.train_text_encoder=false", "eval.num_metric_images=0", "eval.num_grid_prompts=0",
        "eval.max_eval_samples=1", "eval.val_loss_timesteps=[500]", "eval.run_test=false"]
ADAPTED = 28 * 2 * 4  # blocks x (attn1, attn2) x 4 projections
FULL_SIZE = os.environ.get("CXRDIST_FULL_SIZE") == "1"
VARIANTS = [
    pytest.param("sana-arch-narrow", 15_000_000, 0.05, id="narrow"),  # denoiser + text encoder: 19.8 M
    pytest.param("sana-arch", 700_000_000, 0.01, id="full-size", marks=pytest.mark.skipif(
        not FULL_SIZE, reason="the 1 B-parameter run (4 GB): make test-full, or CXRDIST_FULL_SIZE=1")),
]


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("preset,least_total,most_share", VARIANTS)
def test_sana_architecture_trains_lora_in_bf16_with_checkpointing(tmp_path, preset, least_total, most_share):
    import shutil

    shards, base = architecture_run_inputs(tmp_path, preset, 256)
    try:
        args = ["--fold", "1", "--shards", str(shards), "--output-dir", str(tmp_path / "run"),
                *[a for s in [f"model.pretrained=preset:{preset}", *SETS] for a in ("--set", s)]]
        res = launch_train(args, timeout=1200)
        log = res.stdout + res.stderr
        assert res.returncode == 0, log[-4000:]
        assert "1 optimizer steps" in log and "prediction flow" in log
        assert "mixed precision bf16, frozen base in bfloat16" in log
        trainable, total = trainable_counts(log)
        assert total > least_total and 0 < trainable < most_share * total

        run_dir = tmp_path / "run" / "fold1"
        tensors = load_file(str(run_dir / "checkpoints" / "step_00000001" / "adapter.safetensors"))
        lora_b = {k: v for k, v in tensors.items() if ".lora_B." in k}
        assert len(lora_b) == ADAPTED and all(".attn1." in k or ".attn2." in k for k in lora_b)
        zero = [k for k, v in lora_b.items() if not v.abs().max() > 0]
        assert not zero, f"{len(zero)} LoRA B tensors got no update through the checkpointed blocks, e.g. {zero[0]}"
        assert {str(v.dtype) for v in tensors.values()} == {"torch.float32"}
        assert sum(v.numel() for v in tensors.values()) == trainable
    finally:
        shutil.rmtree(base, ignore_errors=True)  # (4 GB at full size) in the session cache no other test uses
