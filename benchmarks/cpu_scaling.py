"""CPU scale-out, side by side in one run: 1 rank vs 2 ranks (DDP) at the same per-rank batch, and DDP vs
DeepSpeed ZeRO-2 step time on 2 ranks.

Every variant is a fresh launch of this file in worker mode (`accelerate launch` with our configs for the
2-rank variants, plain `python` for 1 rank), one intra-op thread per rank. The worker builds the Accelerator
exactly as the trainer does (`cxrdist.train.accel.build_accelerator`: DeepSpeed config from our config,
gloo), the tiny preset with LoRA on UNet and text encoder as one module, AdamW, and times optimizer steps
(forward + backward + gradient all-reduce or ZeRO reduce-scatter/all-gather + step) on fixed random latents,
so data loading and evaluation are not part of the figure. Times are taken on rank 0 between barriers.

    python benchmarks/cpu_scaling.py                  # ~1.5 min on 2 cores; prints a table and the ratios
    python benchmarks/cpu_scaling.py --rounds 2 --out benchmarks/out/cpu_scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "configs" / "accelerate"
# name -> accelerate config (None: one plain process)
VARIANTS = {"1 rank": None, "2 ranks DDP": ACCEL / "cpu_2ranks.yaml", "2 ranks ZeRO-2": ACCEL / "zero2.yaml"}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from cxrdist.config import load_config
    from cxrdist.logging_utils import quiet_dependencies
    from cxrdist.models.diffusion import DiffusionObjective, LoraDiffusionModel
    from cxrdist.models.loading import load_base
    from cxrdist.models.lora import attach_lora
    from cxrdist.train.accel import build_accelerator, describe
    from cxrdist.train.optim import build_optimizer
    from cxrdist.train.model_setup import configure_model

    quiet_dependencies()
    cfg = load_config(None, ["model.pretrained=preset:tiny", f"train.batch_size={args.batch}", "optim.name=adamw"])
    with tempfile.TemporaryDirectory() as tmp:
        acc = build_accelerator(cfg, tmp)
        base = load_base(cfg.model.pretrained, cfg.model.revision, cfg.model.vae_dtype, cfg.model.variant)
        attach_lora(base, cfg.lora)
        model = LoraDiffusionModel(base.unet, base.text_encoder, cfg.lora.train_text_encoder)
        configure_model(model, cfg, torch.float32)
        model, optimizer = acc.prepare(model, build_optimizer(model, cfg.optim, acc.device))
        objective = DiffusionObjective(base.scheduler_config)
        g = torch.Generator().manual_seed(1000 + acc.process_index)
        size = base.image_size // base.vae_scale_factor
        latents = torch.randn(args.batch, int(base.unet.config.in_channels), size, size, generator=g)
        ids = base.tokenizer(["heart size is normal"] * args.batch, padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt")
        times = []
        for step in range(args.warmup + args.steps):
            acc.wait_for_everyone()
            start = time.perf_counter()
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, objective.num_timesteps, (args.batch,), generator=g)
            noisy, target = objective.noisy_inputs(latents, noise, t)
            loss = objective.per_sample_loss(model(noisy, t, ids["input_ids"], ids["attention_mask"]), target, t).mean()
            acc.backward(loss)
            acc.clip_grad_norm_([p for grp in optimizer.param_groups for p in grp["params"]], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            acc.wait_for_everyone()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        if acc.is_main_process:
            print("RESULT " + json.dumps({"mode": describe(acc), "world": acc.num_processes, "batch": args.batch,
                                          "step_s": statistics.median(times), "mean_step_s": statistics.mean(times),
                                          "steps": len(times)}), flush=True)
        acc.end_training()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: Path | None, args: argparse.Namespace) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--batch", str(args.batch), "--steps", str(args.steps),
          "--warmup", str(args.warmup)]
    cmd = [sys.executable] + (["-m", "accelerate.commands.launch", "--config_file", str(config),
                               "--main_process_port", str(free_port())] if config else []) + me
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{config or 'one process'} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(found[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4, help="per-rank micro batch (same for every variant)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="repeat all variants, interleaved; best round kept")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, config in VARIANTS.items():
            result = launch(config, args)
            result["samples_per_s"] = result["world"] * result["batch"] / result["step_s"]
            if name not in best or result["step_s"] < best[name]["step_s"]:
                best[name] = result
            print(f"  {name}: {result['step_s'] * 1000:.1f} ms/step", file=sys.stderr, flush=True)
    one, ddp, zero2 = (best[name] for name in VARIANTS)
    ratios = {"samples_per_s 2 ranks DDP / 1 rank": ddp["samples_per_s"] / one["samples_per_s"],
              "samples_per_s 2 ranks ZeRO-2 / 1 rank": zero2["samples_per_s"] / one["samples_per_s"],
              "step time ZeRO-2 / DDP (2 ranks)": zero2["step_s"] / ddp["step_s"]}
    print(f"tiny preset, LoRA UNet + text encoder, AdamW, batch {args.batch} per rank, 1 thread per rank, "
          f"median of {args.steps} steps after {args.warmup} warm-up, best of {args.rounds} round(s)")
    print("| variant | ranks | ms/step | samples/s |\n|---|---|---|---|")
    for name, r in best.items():
        print(f"| {name} | {r['world']} | {r['step_s'] * 1000:.1f} | {r['samples_per_s']:.1f} |")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"variants": best, "ratios": ratios, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
