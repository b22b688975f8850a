"""The Sana phantom base's transformer shape: one full training step (forward and backward, batch 16, one thread)
of the shipped UNet base's denoiser and of Sana transformers of about its size, side by side.

    python benchmarks/sana_base_shape.py

Sana reads 300 text tokens; training cuts a batch to its longest report (cxrdist.models.diffusion.trim_padding), so
the rows with 48 tokens are what a phantom report batch costs. Sana-0.6B uses 1 x 1 patches on a 32x autoencoder;
on the phantom base's 4x DC-AE (16 x 16 latents), 2 x 2 patches give 64 tokens, the grid of the UNet's 8 x 8 level.
Ratios are against the UNet base's step.
"""
from __future__ import annotations

import time

import torch

# (name, patch size, text tokens, blocks): the `sana-minilm` preset is "2x2 patches, 6 blocks, 48 tokens"
SANA_SHAPES = [("1x1 patches, 4 blocks, 300 tokens", 1, 300, 4), ("1x1 patches, 4 blocks, 48 tokens", 1, 48, 4),
               ("2x2 patches, 4 blocks, 48 tokens", 2, 48, 4), ("2x2 patches, 6 blocks, 48 tokens (preset)", 2, 48, 6)]


def step_ms(call, repeats: int = 5, warmup: int = 3) -> float:
    for i in range(warmup + repeats):
        if i == warmup:
            started = time.perf_counter()
        call().float().pow(2).mean().backward()
    return (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    from diffusers import SanaTransformer2DModel

    from cxrdist.models.families import FAMILIES
    from cxrdist.models.presets import build_preset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, t = torch.randn(16, 4, 16, 16), torch.randint(1, 1000, (16,)).float()
    unet = build_preset("tiny-minilm")["unet"]
    context = torch.randn(16, 77, 384)
    baseline = step_ms(lambda: unet(x, t, encoder_hidden_states=context).sample)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"{'denoiser':44s} {'params':>8s} {'step ms':>8s} {'vs UNet':>8s}")
    print(f"{'UNet base (tiny-minilm), 77 tokens':44s} {params:7.2f}M {baseline:8.0f} {1.0:8.2f}")
    for name, patch, tokens, blocks in SANA_SHAPES:
        model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=24,
                                       num_layers=blocks, num_cross_attention_heads=4, cross_attention_head_dim=24,
                                       cross_attention_dim=96, caption_channels=384, mlp_ratio=2.5, sample_size=16,
                                       patch_size=patch, interpolation_scale=1)
        text = torch.randn(16, tokens, 384)
        mask = torch.ones(16, tokens, dtype=torch.long)
        mask[:, 30:] = 0
        ms = step_ms(lambda: FAMILIES["sana"].call_denoiser(model, x, t, text, mask))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:44s} {params:7.2f}M {ms:8.0f} {ms / baseline:8.2f}")


if __name__ == "__main__":
    main()
