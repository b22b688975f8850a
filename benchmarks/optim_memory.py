"""Peak RSS of LoRA training on the SD 1.5-architecture UNet: AdamW vs bitsandbytes AdamW8bit, rank 4 vs 64.

Each variant runs in a fresh subprocess (one after another, in this one run) so allocator state never
leaks between variants. The child builds the UNet (diffusers' defaults = SD 1.5 architecture, random
weights, as in the `sd15-arch` preset), attaches LoRA to the attention projections, and runs a few
training steps on small latents with random text conditioning. A sampler thread reads the RSS every few ms:
- base MiB: RSS after the model and adapters exist, before the first step;
- peak MiB: highest RSS during the steps; delta = peak - base (what training adds);
- optimizer state: elements and bytes by dtype. bitsandbytes keeps tensors with fewer than
  `min_8bit_size` (4096) elements in 32-bit, so most state of a low-rank adapter stays fp32.

    python benchmarks/optim_memory.py --out benchmarks/out/optim_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

VARIANTS = [("adamw", 4), ("adamw8bit", 4), ("adamw", 64), ("adamw8bit", 64)]
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakRss:
    """Samples RSS in a thread; `peak` is the highest value seen while running."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def optimizer_state_by_dtype(optimizer) -> dict[str, dict[str, int]]:
    """{'float32': {'elements': n, 'bytes': b}, 'uint8': {...}} over every tensor in the optimizer state."""
    import torch

    out: dict[str, dict[str, int]] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                slot = out.setdefault(str(value.dtype).replace("torch.", ""), {"elements": 0, "bytes": 0})
                slot["elements"] += value.numel()
                slot["bytes"] += value.numel() * value.element_size()
    return out


def adam_moment_split(optimizer) -> dict[str, int]:
    """LoRA parameter elements whose Adam moments are kept 8-bit vs 32-bit."""
    import torch

    split = {"params_8bit_state": 0, "params_32bit_state": 0}
    for param, state in optimizer.state.items():
        moment = state.get("state1", state.get("exp_avg"))
        key = "params_8bit_state" if moment is not None and moment.dtype == torch.uint8 else "params_32bit_state"
        split[key] += param.numel()
    return split


def make_optimizer(name: str, params):
    import torch

    if name == "adamw8bit":
        warnings.filterwarnings("ignore", message=".*kernels-community.*")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def child(optim: str, rank: int, latent: int, steps: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from cxrdist.models.lora import _peft_config

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # sd15-arch UNet
    unet.requires_grad_(False)
    unet.add_adapter(_peft_config(rank, rank, 0.0, ["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    unet.train()
    optimizer = make_optimizer(optim, params)
    latents = torch.randn(1, 4, latent, latent)
    text = torch.randn(1, 77, 768)
    base = rss_bytes()
    start = time.perf_counter()
    with PeakRss() as sampler:
        for _ in range(steps):
            noise = torch.randn_like(latents)
            pred = unet(latents + noise, torch.tensor([500]), text).sample
            torch.nn.functional.mse_loss(pred, noise).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {"optim": optim, "rank": rank, "lora_params": sum(p.numel() for p in params),
            "base_mib": base / 2**20, "peak_mib": sampler.peak / 2**20, "delta_mib": (sampler.peak - base) / 2**20,
            "step_s": (time.perf_counter() - start) / steps, "state": optimizer_state_by_dtype(optimizer),
            **adam_moment_split(optimizer)}


def run_variant(optim: str, rank: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", optim, str(rank), "--latent", str(args.latent), "--steps", str(args.steps)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"variant {optim} rank {rank} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict]) -> list[str]:
    lines = ["| optim | rank | LoRA params | 8-bit-state params | 32-bit-state params | state MiB | base MiB | "
             "peak MiB | delta MiB | s/step |", "|" + "---|" * 10]
    for r in rows:
        state_mib = sum(v["bytes"] for v in r["state"].values()) / 2**20
        lines.append(f"| {r['optim']} | {r['rank']} | {r['lora_params']:,} | {r['params_8bit_state']:,} | "
                     f"{r['params_32bit_state']:,} | {state_mib:.1f} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} | "
                     f"{r['delta_mib']:.1f} | {r['step_s']:.2f} |")
    by = {(r["optim"], r["rank"]): r for r in rows}
    for rank in sorted({r["rank"] for r in rows}):
        a, b = by.get(("adamw", rank)), by.get(("adamw8bit", rank))
        if a and b:
            sa = sum(v["bytes"] for v in a["state"].values())
            sb = sum(v["bytes"] for v in b["state"].values())
            share8 = b["params_8bit_state"] / max(1, b["lora_params"])
            lines.append(f"rank {rank}: 8-bit state / 32-bit state = {sb / sa:.2f} ({(sa - sb) / 2**20:.1f} MiB saved); "
                         f"peak RSS 8-bit / 32-bit = {b['peak_mib'] / a['peak_mib']:.3f}; "
                         f"{100 * share8:.0f}% of LoRA params have 8-bit state")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--latent", type=int, default=8, help="latent side (8 = 64 px images, 16 = 128 px)")
    ap.add_argument("--steps", type=int, default=2, help="Adam state exists from the first step on")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    ap.add_argument("--child", nargs=2, metavar=("OPTIM", "RANK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.latent, args.steps)))
        return 0
    start = time.perf_counter()
    rows = [run_variant(optim, rank, args) for optim, rank in VARIANTS]
    print("\n".join(summarise(rows)))
    print(f"{len(rows)} variants, latents 4x{args.latent}x{args.latent}, batch 1, {args.steps} steps, "
          f"{time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
