"""GPU LoRA training throughput, memory and MFU on the Stable Diffusion 1.5 architecture (random weights).

One training step is what the trainer does per micro-batch: frozen VAE encode (no grad), text encoder with
LoRA, UNet with LoRA forward + backward under bf16 autocast, gradient clipping, optimizer step. Swept over
resolution x LoRA rank x gradient checkpointing x optimizer (adamw | adamw8bit) x batch (ascending until
out of memory). Reported per configuration:
- images/s: timed after warmup, between torch.cuda.synchronize() calls;
- peak GPU memory: torch.cuda.max_memory_allocated() over warmup + timed steps;
- MFU: model FLOPs per image / time per image / the device's dense bf16 peak. FLOPs are counted with
  torch.utils.flop_counter.FlopCounterMode on one forward + backward step at batch 1 without gradient
  checkpointing (so recomputation is not counted as useful work) and scaled by the batch size.

    python benchmarks/gpu_train.py --out benchmarks/out/gpu_train            # full sweep on a GPU
    python benchmarks/gpu_train.py --smoke --preset tiny --out /tmp/smoke    # CPU liveness check

Writes results.json and results.md into --out and prints the table. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched on the device name in this order.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
]
OPTIMIZERS = {
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
    "adamw8bit": lambda params, lr: _bnb().optim.AdamW8bit(params, lr=lr),
}


def _bnb():
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    try:
        import bitsandbytes
    except ImportError:
        raise SystemExit("adamw8bit needs bitsandbytes: `pip install bitsandbytes`") from None
    return bitsandbytes


@dataclass
class Row:
    preset: str
    size: int
    rank: int
    checkpointing: bool
    optim: str
    batch: int
    status: str  # ok | oom
    images_per_s: float = 0.0
    step_s: float = 0.0
    peak_mem_gib: float = 0.0
    gflops_per_image: float = 0.0
    mfu: float | None = None


def peak_for_name(name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    return peak_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def build_base(preset: str):
    """Small presets load from the preset cache (fast when it is warm); sd15-arch is built in memory with its
    seeded random weights, which avoids writing a 4 GB folder just to read it back."""
    from cxrdist.models.loading import BaseModel, load_base
    from cxrdist.models.presets import build_preset

    if preset != "sd15-arch":
        return load_base(f"preset:{preset}")

    parts = build_preset(preset)
    return BaseModel(unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                     tokenizer=parts["tokenizer"], scheduler_config=dict(parts["scheduler"].config),
                     source=f"preset:{preset}", path="", fingerprint=preset)


def with_lora(pristine, rank: int, device: torch.device):
    """A fresh copy of the base with LoRA of `rank` on UNet and text encoder, frozen base, on `device`."""
    from cxrdist.config import LoraConfig
    from cxrdist.models.lora import attach_lora

    base = copy.copy(pristine)
    base.unet, base.text_encoder = copy.deepcopy(pristine.unet), copy.deepcopy(pristine.text_encoder)
    attach_lora(base, LoraConfig(unet_rank=rank, unet_alpha=rank, text_rank=rank, text_alpha=rank))
    base.vae.requires_grad_(False)
    base.unet.to(device).train()
    base.text_encoder.to(device).train()
    base.vae.to(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    return base


def set_checkpointing(base, on: bool) -> None:
    text = base.text_encoder
    if on:
        base.unet.enable_gradient_checkpointing()
        (getattr(text, "activation_checkpointing_enable", None) or text.gradient_checkpointing_enable)()
    else:
        base.unet.disable_gradient_checkpointing()
        (getattr(text, "activation_checkpointing_disable", None) or text.gradient_checkpointing_disable)()


def make_batch(base, batch: int, size: int, device: torch.device):
    images = torch.rand(batch, base.channels, size, size, device=device) * 2 - 1
    ids = torch.randint(0, base.tokenizer.vocab_size, (batch, 77), device=device)
    return images, ids


def train_step(base, optimizer, params, images, ids, autocast_dtype) -> None:
    device_type = images.device.type
    with torch.no_grad():
        latents = base.vae.encode(images.to(base.vae.dtype)).latent_dist.sample().float() * 0.18215
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        encoded = base.text_encoder(ids)[0]
        pred = base.unet(latents + noise, timesteps, encoded).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_flops_per_image(base, size: int, device: torch.device, autocast_dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    set_checkpointing(base, False)
    params = [p for m in (base.unet, base.text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    images, ids = make_batch(base, 1, size, device)
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(base, optimizer, params, images, ids, autocast_dtype)
    return float(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(base, optim: str, batch: int, size: int, args, device, autocast_dtype) -> tuple[str, float, float]:
    """(status, seconds per step, peak GiB) for one configuration."""
    params = [p for m in (base.unet, base.text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[optim](params, 1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        images, ids = make_batch(base, batch, size, device)
        for _ in range(args.warmup):
            train_step(base, optimizer, params, images, ids, autocast_dtype)
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(base, optimizer, params, images, ids, autocast_dtype)
        _sync(device)
        step_s = (time.perf_counter() - start) / args.steps
    except torch.OutOfMemoryError:
        return "oom", 0.0, 0.0
    finally:
        del optimizer
        for p in params:
            p.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return "ok", step_s, peak


def sweep(args) -> list[Row]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    # bf16 autocast on the GPU; the CPU smoke run stays fp32 (CPU bf16 is emulated and ~10x slower).
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    peak = peak_tflops(device, args.peak_tflops)
    pristine = build_base(args.preset)
    rows: list[Row] = []
    for size in args.sizes:
        for rank in args.ranks:
            base = with_lora(pristine, rank, device)
            flops = count_flops_per_image(base, size, device, autocast_dtype)
            for checkpointing in args.checkpointing:
                set_checkpointing(base, checkpointing)
                for optim in args.optims:
                    for batch in args.batches:
                        status, step_s, mem = measure(base, optim, batch, size, args, device, autocast_dtype)
                        row = Row(args.preset, size, rank, checkpointing, optim, batch, status, peak_mem_gib=mem,
                                  gflops_per_image=flops / 1e9)
                        if status == "ok":
                            row.step_s = step_s
                            row.images_per_s = batch / step_s
                            row.mfu = (flops * row.images_per_s / (peak * 1e12)) if peak else None
                        rows.append(row)
                        print(format_row(row), flush=True)
                        if status == "oom":
                            break  # larger batches will not fit either
            del base
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


HEADER = "| px | rank | grad ckpt | optim | batch | images/s | step s | peak GiB | GFLOP/img | MFU |"


def format_row(r: Row) -> str:
    if r.status != "ok":
        return f"| {r.size} | {r.rank} | {'on' if r.checkpointing else 'off'} | {r.optim} | {r.batch} | OOM | | | | |"
    mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
    return (f"| {r.size} | {r.rank} | {'on' if r.checkpointing else 'off'} | {r.optim} | {r.batch} | "
            f"{r.images_per_s:.2f} | {r.step_s:.3f} | {r.peak_mem_gib:.2f} | {r.gflops_per_image:.1f} | {mfu} |")


def device_description(args) -> dict:
    if torch.cuda.is_available() and not args.smoke:
        props = torch.cuda.get_device_properties(0)
        return {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "peak_bf16_tflops": peak_tflops(torch.device("cuda"), args.peak_tflops)}
    return {"device": "cpu (smoke)", "threads": torch.get_num_threads(), "peak_bf16_tflops": args.peak_tflops}


def write_outputs(rows: list[Row], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), **device_description(args), "preset": args.preset,
            "warmup": args.warmup, "steps": args.steps, "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    precision = "fp32 (smoke)" if args.smoke or not torch.cuda.is_available() else "bf16 autocast"
    lines = [f"{meta['date']}, {meta['device']}, preset {args.preset}, {precision}, "
             f"{args.warmup} warmup + {args.steps} timed steps", "", HEADER, "|" + "---|" * 10]
    (out / "results.md").write_text("\n".join(lines + [format_row(r) for r in rows]) + "\n")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--preset", default=None, help="model preset (default sd15-arch; tiny for --smoke)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--optims", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, when the name is unknown")
    ap.add_argument("--smoke", action="store_true", help="CPU, fp32, 64 px, batch 1, 1 step per configuration")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset = args.preset or "tiny"
        args.sizes, args.batches, args.warmup, args.steps = [64], [1], 0, 1
    args.preset = args.preset or "sd15-arch"
    args.checkpointing = [c == "on" for c in args.checkpointing]
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device here: run with --smoke for a CPU liveness check")
    return args


def main(argv=None) -> int:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from cxrdist.logging_utils import quiet_dependencies

    quiet_dependencies()
    args = parse_args(argv)
    torch.manual_seed(0)
    print(HEADER, flush=True)
    rows = sweep(args)
    write_outputs(rows, args)
    print(f"wrote {Path(args.out) / 'results.md'} and results.json ({len(rows)} configurations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
