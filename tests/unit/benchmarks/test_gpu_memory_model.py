"""benchmarks/gpu_memory_model.py counts a training step's GPU memory with CUDA autocast's dtypes, on fake tensors."""
from __future__ import annotations

import contextlib

import pytest
import torch

from cxrdist.config import load_config

from support.scripts import load_script

PX = 16  # the tiny VAE's 4x4 latents: shapes are all that matter to fake tensors


@pytest.fixture(scope="module")
def gmm():
    return load_script("benchmarks/gpu_memory_model.py", "gpu_memory_model_bench")


@pytest.fixture(scope="module")
def steps(gmm):
    """tiny preset, product's LoRA / optimizer / precision, 16 px: batch 2, 4, 6, checkpointing off; 4 on."""
    return {(batch, ckpt): gmm.simulate_step("tiny", load_config("product"), PX, batch, ckpt) for batch, ckpt in
            [(2, False), (4, False), (6, False), (4, True)]}


def test_emulated_autocast_matches_torch_cuda_kernels_and_is_undone(gmm):
    gmm.check_tables()  # the tables classify exactly this build's AutocastCUDA ops
    results = gmm.check_rules()  # raises on any difference
    assert results["group_norm"] == ("float32", "float32")
    assert results["linear fp32 in"] == ("bfloat16", "bfloat16")
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    with gmm.cuda_autocast():
        assert torch.nn.functional.group_norm(x, 4).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast is itself again afterwards
        assert torch.nn.functional.group_norm(x, 4).dtype == torch.bfloat16


def test_norm_outputs_are_saved_in_fp32_under_cuda_rules_only(gmm):
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                                torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 4, 8, 8)

    def saved_by_dtype(rules) -> dict:
        saved = gmm.SavedForBackward(skip_storages={p.untyped_storage()._cdata for p in model.parameters()})
        with rules(), saved.hooks(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()
        return saved.by_dtype()

    cuda, cpu = saved_by_dtype(gmm.cuda_autocast_rules), saved_by_dtype(contextlib.nullcontext)
    # GroupNorm's input and output (SiLU's input) of 2 x 8 x 8 x 8: fp32 on CUDA, bf16 under CPU autocast
    assert cuda.get("float32", 0) >= 2 * 2 * 8 * 8 * 8 * 4
    assert cpu.get("float32", 0) < cuda["float32"] and cpu["bfloat16"] > cuda["bfloat16"]


def test_fake_tensors_count_what_a_real_step_holds(gmm, steps):
    """The same step on real (computed) CPU tensors: every count equal, so fake tensors leave nothing out."""
    real = gmm.simulate_step("tiny", load_config("product"), PX, 2, False, fake=False)
    fake = steps[(2, False)]
    assert (real.held, real.step_peak, real.vae_encode) == (fake.held, fake.step_peak, fake.vae_encode)
    for dtype in ("bfloat16", "float32"):
        assert real.saved_by_dtype[dtype] == fake.saved_by_dtype[dtype]


def test_activations_scale_with_batch_and_checkpointing_cuts_them(steps):
    two, four, six, four_ckpt = steps[(2, False)], steps[(4, False)], steps[(6, False)], steps[(4, True)]
    per_two_images = four.held - two.held
    assert per_two_images > 0.8 * two.held  # mostly per-image activations (the rest: casts of the weights)
    # affine in the batch, up to the allocator's 512-byte rounding of these tiny tensors
    assert six.held - four.held == pytest.approx(per_two_images, rel=0.03)
    assert six.step_peak > four.step_peak > two.step_peak >= two.held > 0
    assert four_ckpt.held < four.held / 2
    assert four.vae_encode == pytest.approx(2 * two.vae_encode, rel=0.1)
    assert four.saved_by_dtype["float32"] > 0  # group/layer norm outputs under CUDA autocast
    # weights, adapters, gradients and optimizer state do not depend on the batch
    assert (four.frozen, four.adapters, four.grads) == (two.frozen, two.adapters, two.grads)
    assert four.grads == four.adapters == 4 * four.params["adapters"]  # fp32


def test_half_precision_base_halves_the_frozen_weights(gmm, steps):
    fp32 = gmm.simulate_step("tiny", load_config("product", ["train.mixed_precision=no", "model.vae_dtype=fp32"]),
                             PX, 2, False)
    bf16 = steps[(2, False)]
    frozen_params = 2 * sum(bf16.params[k] for k in ("unet", "text_encoder", "vae"))  # bytes in bf16
    buffers = bf16.frozen - frozen_params  # e.g. CLIP's int64 position ids: the same in both
    assert buffers >= 0
    assert fp32.frozen - buffers == 2 * frozen_params
    assert fp32.adapters == bf16.adapters


def test_optimizer_state_follows_bitsandbytes_min_8bit_size(gmm):
    small, large = torch.empty(4095), torch.empty(4096)
    assert gmm.optimizer_state_bytes([small], "adamw") == 8 * 4095
    assert gmm.optimizer_state_bytes([small], "adamw8bit") == 8 * 4095 + 2 * 256 * 4
    assert gmm.optimizer_state_bytes([large], "adamw8bit") == 2 * 4096 + 2 * 4 * 16 + 2 * 256 * 4


def test_estimate_adds_the_stated_allowance(gmm, steps):
    step = steps[(2, False)]
    counted = step.counted("adamw8bit")
    assert counted == (step.frozen + step.adapters + step.grads + step.optimizer["adamw8bit"] + step.val_set
                       + step.step_peak)
    assert gmm.estimate_gib(counted) == pytest.approx(counted / 2**30 * 1.10 + 1.25)


def test_command_line_prints_the_table(gmm, capsys):
    assert gmm.main(["--preset", "tiny", "--sizes", "32", "--batches", "2", "--images", "4",
                     "--checkpointing", "off", "--optims", "adamw8bit,adamw"]) == 0
    out = capsys.readouterr().out
    assert "| 32 | 2 x 2 | off | adamw8bit |" in out and "| 32 | 2 x 2 | off | adamw |" in out
    with pytest.raises(SystemExit):
        gmm.parse_args(["--batches", "5"])  # 5 does not divide 48
