"""Training throughput, measured side by side in one run on the same shard set and the same batches:

  trainer (VAE on the fly)  vs  trainer (cached latents)  vs  a plain reference loop doing the same work
  (template + tokenise, VAE encode, noise, UNet + text-encoder forward/backward, clip, AdamW step).

Prints images/s (median over rounds; the variants alternate so machine load hits all of them alike) and the
ratios: cached / on-the-fly, and trainer / reference (the bar: our overhead <= 5 %).

    python benchmarks/train_throughput.py [--steps 30] [--rounds 3] [--batch-size 8] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_shards(root: Path, n: int) -> tuple[Path, Path]:
    from cxrdist.data.latents import cache_latents
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources import source_class
    from cxrdist.models.loading import load_vae

    plain = root / "plain"
    build_shards(source_class("phantom")(n=n, size=64, seed=0), plain, size=64, folds=2, test_fraction=0.1,
                 shard_size=256, workers=1, progress=False)
    cached = root / "cached"
    shutil.copytree(plain, cached)
    cache_latents(cached, load_vae("preset:tiny"), base="preset:tiny", progress=False)
    return plain, cached


def trainer_rate(shards: Path, out: Path, steps: int, batch: int) -> float:
    """images/s of Trainer.fit's loop (log windows after the first; evaluation and saving excluded)."""
    from cxrdist.config import load_config
    from cxrdist.train.run import run
    from cxrdist.train.tracking import MetricsLogger

    rates = []
    real = MetricsLogger.scalars

    def spy(self, values, step):
        if "train/images_per_s" in values and step > 5:
            rates.append(values["train/images_per_s"])
        return real(self, values, step)

    MetricsLogger.scalars = spy
    try:
        cfg = load_config(None, [f"data.shards={shards}", "data.image_size=64", "model.pretrained=preset:tiny",
                                 f"train.batch_size={batch}", f"train.max_steps={steps}", "train.log_every=5",
                                 "eval.num_metric_images=0", "eval.num_grid_prompts=0", "eval.run_test=false",
                                 "eval.max_eval_samples=8", "eval.val_loss_timesteps=[500]", "train.caption_dropout=0.1"])
        run(cfg, 0, output_dir=str(out))
    finally:
        MetricsLogger.scalars = real
    return statistics.mean(rates)


def reference_rate(shards: Path, steps: int, batch: int) -> float:
    """The same work written as the plainest loop: no accelerate, no logging, no checkpoints."""
    import torch
    from diffusers import DDPMScheduler

    from cxrdist.config import LoraConfig
    from cxrdist.data.loader import train_loader
    from cxrdist.models.loading import load_base
    from cxrdist.models.lora import attach_lora, lora_parameters
    from cxrdist.models.text import apply_template

    torch.manual_seed(0)
    base = load_base("preset:tiny")
    attach_lora(base, LoraConfig())
    params = lora_parameters(base.unet) + lora_parameters(base.text_encoder)
    opt = torch.optim.AdamW([{"params": lora_parameters(base.unet), "lr": 1e-4},
                             {"params": lora_parameters(base.text_encoder), "lr": 5e-5}], weight_decay=1e-2)
    sched = DDPMScheduler.from_config(base.scheduler_config)
    base.unet.train()
    base.text_encoder.train()
    t0, seen = None, 0
    loader = train_loader(shards, 0, batch_size=batch, image_size=64, shuffle_buffer=256)
    for i, b in enumerate(loader):
        if i == 5:
            t0, seen = time.perf_counter(), 0
        if i == steps:
            break
        with torch.no_grad():
            lat = base.vae.encode(b["pixel_values"]).latent_dist.mode() * base.vae.config.scaling_factor
        prompts = ["" if torch.rand(()) < 0.1 else apply_template("{report}", p) for p in b["prompts"]]
        ids = base.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (lat.shape[0],))
        pred = base.unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=base.text_encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += lat.shape[0]
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=600)
    args = ap.parse_args()
    import torch

    from cxrdist.logging_utils import setup_logging

    torch.set_num_threads(args.threads)
    setup_logging(level=40)
    root = Path(tempfile.mkdtemp(prefix="cxrdist-bench-"))
    try:
        plain, cached = build_shards(root, args.samples)
        results = {"trainer, VAE on the fly": [], "trainer, cached latents": [], "reference loop": []}
        for r in range(args.rounds):
            results["trainer, VAE on the fly"].append(trainer_rate(plain, root / f"a{r}", args.steps, args.batch_size))
            results["trainer, cached latents"].append(trainer_rate(cached, root / f"b{r}", args.steps, args.batch_size))
            results["reference loop"].append(reference_rate(plain, args.steps, args.batch_size))
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"\ntiny preset, 64 px, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, "
              f"{args.threads} thread(s), device cpu")
        for k, v in results.items():
            print(f"  {k:26s} {med[k]:7.2f} images/s   (rounds: {', '.join(f'{x:.2f}' for x in v)})")
        print(f"  cached / on-the-fly        {med['trainer, cached latents'] / med['trainer, VAE on the fly']:.3f}x")
        print(f"  trainer / reference        {med['trainer, VAE on the fly'] / med['reference loop']:.3f}x "
              f"(overhead {100 * (1 - med['trainer, VAE on the fly'] / med['reference loop']):+.1f} %)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
