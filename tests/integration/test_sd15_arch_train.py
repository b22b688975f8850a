"""One optimizer step of the real trainer on the Stable Diffusion 1.5 *architecture* (preset `sd15-arch`:
an 860M-parameter UNet and a 12-layer CLIP text encoder with random weights), on CPU at 128 px.

`make test` runs it on `sd15-arch-narrow`, the same module tree at 1/8 of every width (20 M parameters, seconds);
the full-size run (4 GB of weights, about 3 minutes) is `make test-full` (CXRDIST_FULL_SIZE=1).

The tiny presets use the same classes but not SD's real module tree. This run puts the real module names,
the peft targets (to_q/to_k/to_v/to_out.0 in all 16 UNet transformer blocks, q/k/v/out_proj in all 12 CLIP
layers), the SDPA attention processors, UNet + CLIP gradient checkpointing and bf16 autocast together, through
`launch/train.py` in a child process. It checks:
  * the run finishes with bf16, 1 step, and logs a trainable parameter count that is a tiny share of the total;
  * every LoRA B tensor (zero at the start) is non-zero in the step-1 checkpoint for both the UNet and the
    text encoder, stored in fp32: gradients went through the checkpointed layers of both models;
  * only adapters were trained and saved: the checkpoint holds exactly the logged trainable parameters, all
    `lora_` tensors, and the base model's weight files on disk have the same sha256 before and after (the
    "before" digests are taken while the child trains; size, mtime and inode from before the launch make any
    write during that time show).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from support.training import architecture_run_inputs, launch_train, trainable_counts

pytestmark = pytest.mark.slow

# 128 px: 16 x 16 latents reach the mid block as 2 x 2. At 64 px it sees one position, where self-attention's
# softmax is constant and its to_q / to_k get no gradient at all.
SETS = ["data.image_size=128", "data.max_train_samples=4",
        "data.shuffle_buffer=1", "train.batch_size=1", "train.max_steps=1", "train.log_every=1",
        "train.mixed_precision=bf16", "model.gradient_checkpointing=true", "model.attention=sdpa",
        "lora.train_text_encoder=true", "eval.num_metric_images=0", "eval.num_grid_prompts=0",
        "eval.max_eval_samples=1", "eval.val_loss_timesteps=[500]", "eval.run_test=false"]
UNET_ADAPTED, TEXT_ADAPTED = 16 * 2 * 4, 12 * 4  # (transformer blocks x attn1/attn2 x 4 projections), (layers x 4)
FULL_SIZE = os.environ.get("CXRDIST_FULL_SIZE") == "1"
# preset, the least parameter count that proves it is that preset, the most the adapters may be of it
VARIANTS = [
    pytest.param("sd15-arch-narrow", 15_000_000, 0.05, id="narrow"),
    pytest.param("sd15-arch", 900_000_000, 0.01, id="full-size", marks=pytest.mark.skipif(
        not FULL_SIZE, reason="the 860M-parameter run (4 GB, ~3 min): make test-full, or CXRDIST_FULL_SIZE=1")),
]


def weight_digests(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        out[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return out


def weight_stats(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime in ns, inode) of every weight file: an in-place write or a replaced file changes them."""
    return {path.relative_to(folder).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino)
            for path in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("preset,least_total,most_share", VARIANTS)
def test_sd15_architecture_trains_lora_only_in_bf16_with_checkpointing(tmp_path, preset, least_total, most_share):
    shards, base = architecture_run_inputs(tmp_path, preset, 128)  # full size: ~4 GB, ~1 min to build
    stats = weight_stats(base)
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"} <= stats.keys()
    try:
        args = ["--fold", "1", "--shards", str(shards), "--output-dir", str(tmp_path / "run"),
                *[a for s in [f"model.pretrained=preset:{preset}", *SETS] for a in ("--set", s)]]
        # The weights (4 GB at full size) are hashed on the other core while the child trains (one thread
        # there): a write by the child before the hash reaches it changes `stats`, checked below with the
        # digests after the run.
        with ThreadPoolExecutor(max_workers=1) as pool:
            hashing = pool.submit(weight_digests, base)
            res = launch_train(args, timeout=1200)
            before = hashing.result()
        assert before.keys() == stats.keys()
        log = res.stdout + res.stderr
        assert res.returncode == 0, log[-4000:]

        # (a) bf16, 1 optimizer step, the preset's size, and a small trainable share.
        run_dir = tmp_path / "run" / "fold1"
        saved_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved_cfg["train"]["mixed_precision"] == "bf16" and saved_cfg["model"]["gradient_checkpointing"]
        assert "1 optimizer steps" in log and "fold 1: 1 steps" in log
        assert "mixed precision bf16, frozen base in bfloat16" in log
        trainable, total = trainable_counts(log)
        assert total > least_total and 0 < trainable < most_share * total

        # (b) the adapters of both models changed, and are kept in fp32.
        ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
        assert [p.name for p in ckpts] == ["step_00000001"]
        tensors = load_file(str(ckpts[0] / "adapter.safetensors"))
        lora_b = {k: v for k, v in tensors.items() if ".lora_B." in k}
        for prefix, expected in (("unet.", UNET_ADAPTED), ("text_encoder.", TEXT_ADAPTED)):
            names = [k for k in lora_b if k.startswith(prefix)]
            assert len(names) == expected, (prefix, len(names))
            zero = [k for k in names if not lora_b[k].abs().max() > 0]
            assert not zero, f"{len(zero)} {prefix} LoRA B tensors got no update, e.g. {zero[0]}"
        assert {str(v.dtype) for v in tensors.values()} == {"torch.float32"}

        # (c) only LoRA was trained and saved; the frozen base on disk is untouched.
        assert all(".lora_A." in k or ".lora_B." in k for k in tensors)
        assert sum(v.numel() for v in tensors.values()) == trainable
        run_bytes = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
        assert run_bytes < 100 * 2**20, f"run folder holds {run_bytes / 2**20:.0f} MiB: base weights were saved?"
        assert weight_stats(base) == stats and weight_digests(base) == before
    finally:
        shutil.rmtree(base, ignore_errors=True)  # (4 GB at full size) in the session cache that no other test uses
