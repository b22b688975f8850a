"""GPU LoRA training benchmark of the REAL trainer: images/s, peak GPU memory, MFU.

Every variant builds `cxrdist.train.trainer.Trainer` exactly as `cxrdist.train.run.train_fold` does
(`preflight`, then `Trainer(cfg, fold=0, run_dir=..., data_factory=ShardData)`) from the `product` preset
plus the variant's `--set`-style overrides, over phantom shards built once at the benchmark's image size
(`--shards-dir`, default OUT/shards). The measured loop is the body of `Trainer._fit`: `trainer.train_step`
over `trainer.data.train_batches(epoch)`, i.e. the loader, template + caption dropout + tokenising, the frozen
VAE encode, per-sample noise and timesteps, UNet + text-encoder LoRA forward/backward under the trainer's own
mixed precision (frozen base cast to bf16, adapters fp32), clipping, the optimizer and the lr schedule.
Left out: what runs every N steps, not every step (the TensorBoard line, evaluation, checkpoint saves).

Default sweep (one GPU): preset sd15-arch (SD 1.5 architecture, random weights: nothing is downloaded),
bf16, 256 px at batch 32 and 512 px at batch 8 (the same pixels per step), gradient checkpointing off/on,
optim adamw/adamw8bit: 8 variants, each in a fresh interpreter (peak memory and freed memory per variant
are then exact, and an OOM or a crash costs one row, not the sweep).

Time budget (estimated for one H100/H200; not yet measured -- each row's `wall s` shows the real cost):
per variant about 15-25 s fixed (interpreter + imports ~8 s, loading the 4 GB fp32 preset from the page
cache ~5 s, LoRA + bf16 cast + prepare ~3 s, FLOP-counted and profiled steps ~3 s) plus 1 + 2 + 15 + 1 steps
of 0.1-0.5 s: 8 x ~30 s = ~4 min. A first run adds ~1 min to write the sd15-arch preset into the cache
(random init + 4 GB) and ~10-20 s for the phantom shards (a process pool). Total ~5-6 min, inside an 8 min budget;
--variant-timeout (240 s) caps a hung variant.

Per variant:
- images/s: images of all ranks over the wall time of the measured steps (loader included), between
  torch.cuda.synchronize() calls, after 1 FLOP-counted + --warmup warm-up steps;
- step ms / data ms: wall time per optimizer step, and the part of it spent waiting for the loader;
- host ms: host-side overhead of one train_step: its wall time minus the time the GPU was busy in it (union
  of kernel/memcpy intervals from one torch.profiler step): Python, tokenising, per-sample RNG, launch
  latency. An upper bound (the profiler adds host work per op); n/a on CPU;
- peak GiB: torch.cuda.max_memory_allocated() over the variant's steps (reset after the trainer is built;
  weights included), the max over ranks;
- GFLOP/img: FLOPs of one real training step (forward + backward + optimizer step, VAE encode included)
  counted with torch.utils.flop_counter.FlopCounterMode, per image; it counts matmul/conv/attention only
  (norms, elementwise ops and the optimizer's arithmetic are not counted, so MFU is slightly conservative);
  VAE % is the frozen VAE encode's share of it (zero with cached latents);
- MFU = model FLOPs/img x images/s / (ranks x dense bf16 peak). Model FLOPs come from the checkpointing-OFF
  variant at the same resolution, because recomputation is not useful work; HFU uses the variant's own
  count (recomputation included). The peak comes from PEAK_BF16_TFLOPS by the EXACT device name, or from
  --peak-tflops; an unknown GPU without --peak-tflops is refused.

    python benchmarks/gpu_train.py --out benchmarks/out/gpu_train           # default sweep, one GPU
    python benchmarks/gpu_train.py --sizes 512 --batch 16 --optims adamw8bit --out /tmp/b
    python benchmarks/gpu_train.py --smoke --out /tmp/gpu_smoke             # CPU, tiny preset, 64 px (CI)

Several GPUs (DDP or DeepSpeed ZeRO-2; the trainer picks them up from the launcher's environment). Either
give the sweep a launcher, so each variant is its own launch (isolated as above):
    python benchmarks/gpu_train.py --out out/ddp \\
        --launcher "accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2"
    python benchmarks/gpu_train.py --out out/zero2 \\
        --launcher "accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 2"
(`python -m accelerate.commands.launch` instead of `accelerate launch` when accelerate is not on PATH), or
launch the whole sweep once, which runs the variants one after another inside the same ranks:
    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 2 \\
        benchmarks/gpu_train.py --out out/zero2
images/s then counts the images of every rank and MFU divides by ranks x peak. A cross-check with the real
entry point: `accelerate launch ... launch/train.py --fold 0 --config product --set ...` logs
train/images_per_s and train/peak_memory_mb to TensorBoard.

Writes OUT/results.json and OUT/results.md (atomically), per-variant logs in OUT/logs and run folders in
OUT/runs, and prints a summary table.
"""
from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, keyed by the EXACT torch.cuda.get_device_name()
# string. Exact, because names that share a substring differ: "NVIDIA H100 PCIe" (756) vs the SXM part
# "NVIDIA H100 80GB HBM3" (989); an NVL or MIG name is neither. Anything else needs --peak-tflops.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA L4": 121.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.0,
}
SHARD_FOLDS, SHARD_TEST_FRACTION = 5, 0.1  # fold 0 validates: ~72 % of the phantoms are training samples


class UnknownDeviceError(ValueError):
    """No peak on file for this device name and no --peak-tflops."""


def normalise_device_name(name: str) -> str:
    """The only normalisation: surrounding and repeated whitespace (drivers have padded names)."""
    return " ".join(str(name).split())


def peak_for_name(name: str) -> Optional[float]:
    """Dense bf16 peak for an exact device name, else None (never a substring match)."""
    return PEAK_BF16_TFLOPS.get(normalise_device_name(name))


def resolve_peak(name: str, override: Optional[float]) -> tuple[float, str]:
    """(peak TFLOP/s, where it came from); --peak-tflops wins; an unknown name without it is refused."""
    if override is not None:
        if not override > 0:
            raise UnknownDeviceError(f"--peak-tflops must be > 0, got {override}")
        return float(override), "--peak-tflops"
    peak = peak_for_name(name)
    if peak is None:
        raise UnknownDeviceError(f"no dense bf16 peak on file for device '{name}' (exact names only: "
                                 f"{', '.join(PEAK_BF16_TFLOPS)}): pass --peak-tflops N")
    return peak, "table"


# ---------------------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    size: int
    batch: int
    checkpointing: bool
    optim: str

    @property
    def name(self) -> str:
        return f"{self.size}px-b{self.batch}-ckpt{'on' if self.checkpointing else 'off'}-{self.optim}"


@dataclass
class Job:
    """Everything one measurement needs; JSON round-trips to a worker process."""

    variant: Variant
    config: str
    overrides: list[str]
    warmup: int
    steps: int
    run_dir: str
    row_file: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        return cls(**{**data, "variant": Variant(**data["variant"])})


def plan(args) -> list[Variant]:
    return [Variant(size, batch, ckpt, optim) for size, batch in zip(args.sizes, args.batch)
            for ckpt in args.checkpointing for optim in args.optims]


def steps_per_variant(args) -> int:
    return 1 + args.warmup + args.steps + 1  # FLOP-counted + warm-up + measured + profiled


def variant_overrides(v: Variant, args, shards: Path) -> list[str]:
    """The user's --set first, then the sweep's keys, so the table's labels stay true."""
    keys = [f"model.pretrained=preset:{args.preset}", f"data.shards={shards}", f"data.image_size={v.size}",
            f"train.batch_size={v.batch}", "train.grad_accum=1", f"train.mixed_precision={args.mixed_precision}",
            f"model.gradient_checkpointing={str(v.checkpointing).lower()}", f"optim.name={v.optim}",
            f"train.max_steps={steps_per_variant(args)}", "optim.warmup_steps=0",  # product's 200 > max_steps
            f"eval.k_folds={SHARD_FOLDS}"]
    if args.smoke:
        keys.append("data.num_workers=0")  # DataLoader worker start-up would dominate a 64 px CPU step
    return list(args.set) + keys


# ---------------------------------------------------------------------------------------------------------
# Inputs: the preset in the cache and phantom shards, built once (by rank 0 when launched)
# ---------------------------------------------------------------------------------------------------------

def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main_rank_first(ready: Callable[[], bool], build: Callable[[], Any], what: str, timeout_s: float = 900) -> None:
    """Rank 0 builds; the other ranks of a direct launch wait until it is `ready` (no process group exists yet,
    so a file on disk is the signal)."""
    if ready():
        return
    if global_rank() == 0:
        build()
        return
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"rank {global_rank()}: {what} was not ready within {timeout_s:.0f} s")
        time.sleep(1)


def ensure_preset(name: str) -> None:
    """Materialise the preset's diffusers folder in the cache once (the trainer loads it like any folder)."""
    from cxrdist.models.loading import cache_dir, preset_folder

    def build() -> None:
        say(f"building preset '{name}' into {cache_dir() / 'presets'} (once per cache; sd15-arch: ~1 min, 4 GB)")
        started = time.perf_counter()
        preset_folder(name)
        say(f"preset ready in {time.perf_counter() - started:.0f} s")

    main_rank_first(lambda: any((cache_dir() / "presets").glob(f"{name}-d*/model_index.json")), build,
                    f"preset {name}")


def shard_count(size: int, batch: int, args) -> int:
    """Phantoms for one epoch of a variant's steps on every rank, +20 % for uneven fold sizes."""
    train_fraction = (1 - SHARD_TEST_FRACTION) * (SHARD_FOLDS - 1) / SHARD_FOLDS
    need = batch * args.world_hint * steps_per_variant(args)
    return math.ceil(need / train_fraction * 1.2) + 10


def ensure_shards(root: Path, size: int, n: int) -> Path:
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources import source_class

    out = root / f"phantom-{size}px-n{n}"

    def build() -> None:
        started = time.perf_counter()
        if out.exists():
            shutil.rmtree(out)  # an interrupted build of ours (no index.json): start over
        workers = min(os.cpu_count() or 1, max(1, n // 64))  # a pool only pays for itself on bigger sets
        build_shards(source_class("phantom")(n=n, size=size, seed=0), out, size=size, folds=SHARD_FOLDS,
                     test_fraction=SHARD_TEST_FRACTION, seed=0, shard_size=32, workers=workers, progress=False)
        say(f"shards: {n} phantoms at {size} px -> {out} ({time.perf_counter() - started:.0f} s)")

    main_rank_first((out / "index.json").exists, build, f"shard set {out}")
    return out


# ---------------------------------------------------------------------------------------------------------
# One variant (runs in a worker process, or in-process)
# ---------------------------------------------------------------------------------------------------------

def endless_batches(data):
    """Training batches across epochs (shards are sized for one epoch; a second one only costs data time)."""
    for epoch in itertools.count():
        yield from data.train_batches(epoch)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_step_flops(trainer, batch: dict, micro: int) -> tuple[float, Optional[float]]:
    """(FLOPs per image of one real train_step, share of them outside the trained module, i.e. the VAE)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(batch, micro)
    total = float(counter.get_total_flops())
    # Top-level modules are keyed by class name (LoraDiffusionModel, or its DDP / DeepSpeed wrapper).
    trained = sum(counter.get_flop_counts().get(type(trainer.model).__name__, {}).values())
    images = len(batch["keys"])
    return total / images, (1 - trained / total) if trained and total else None


def busy_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def host_overhead_ms(trainer, batch: dict, micro: int) -> Optional[float]:
    """Wall time of one train_step minus the GPU's busy time in it; None on CPU or if profiling fails."""
    import torch

    if trainer.accelerator.device.type != "cuda":
        trainer.train_step(batch, micro)
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    stepped = False
    try:
        sync(trainer.accelerator.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            trainer.train_step(batch, micro)
            stepped = True
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - start) * 1e6
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    except Exception as exc:  # the profiler is a nicety: never lose the row for it
        say(f"host overhead not measured ({one_line(exc)})")
        if not stepped:  # the other ranks took this step: take it too, or the next collective hangs
            trainer.train_step(batch, micro)
        return None
    return max(0.0, wall_us - busy_us(spans)) / 1e3


def peak_memory_gib(accelerator) -> Optional[float]:
    import torch

    device = accelerator.device
    if device.type != "cuda":
        return None
    mine = torch.tensor([float(torch.cuda.max_memory_allocated(device))], device=device)
    return float(accelerator.gather(mine).max()) / 2**30


def time_training(trainer, warmup: int, steps: int) -> dict:
    """The measurement itself on a built trainer; every rank runs every step (they meet in backward)."""
    import torch

    acc = trainer.accelerator
    batches = endless_batches(trainer.data)
    trainer.model.train()
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    flops, vae_share = count_step_flops(trainer, next(batches), 0)  # also the first warm-up step
    for micro in range(1, warmup + 1):
        trainer.train_step(next(batches), micro)
    sync(acc.device)
    data_s, images, start = 0.0, 0, time.perf_counter()
    for micro in range(warmup + 1, warmup + 1 + steps):
        fetch = time.perf_counter()
        batch = next(batches)
        data_s += time.perf_counter() - fetch
        images += len(batch["keys"])
        trainer.train_step(batch, micro)
    sync(acc.device)
    elapsed = time.perf_counter() - start
    peak = peak_memory_gib(acc)
    batch = next(batches)
    host = host_overhead_ms(trainer, batch, warmup + 1 + steps) if acc.is_main_process else None
    if not acc.is_main_process:
        trainer.train_step(batch, warmup + 1 + steps)  # keep the ranks in step with rank 0's profiled one
    return {"world_size": acc.num_processes, "images_per_s": images * acc.num_processes / elapsed,
            "step_ms": 1e3 * elapsed / steps, "data_ms": 1e3 * data_s / steps, "host_ms": host,
            "peak_mem_gib": peak, "gflop_img": flops / 1e9, "vae_share": vae_share,
            "distribution": _describe(acc)}


def _describe(accelerator) -> str:
    from cxrdist.train.accel import describe

    return describe(accelerator)


def empty_row(job: Job) -> dict:
    return {**asdict(job.variant), "name": job.variant.name, "status": "failed", "world_size": None,
            "distribution": None, "images_per_s": None, "step_ms": None, "data_ms": None, "host_ms": None,
            "peak_mem_gib": None, "gflop_img": None, "vae_share": None, "model_gflop_img": None,
            "model_flops_from": None, "mfu": None, "hfu": None, "wall_s": None, "error": ""}


def measure(job: Job) -> dict:
    """Build the real trainer for `job` (as train_fold does), time it, free it. OOM is a row, not a crash."""
    import torch

    from cxrdist.config import load_config
    from cxrdist.train.data import ShardData
    from cxrdist.train.run import preflight
    from cxrdist.train.trainer import Trainer

    row, started, trainer = empty_row(job), time.perf_counter(), None
    cfg = load_config(job.config, job.overrides)
    run_dir = Path(job.run_dir)
    preflight(cfg, 0, run_dir, None)
    try:
        trainer = Trainer(cfg, fold=0, run_dir=run_dir, data_factory=functools.partial(ShardData, cfg, 0))
        if trainer.accelerator.is_main_process:
            cfg.save(run_dir / "config.yaml")
        row.update(time_training(trainer, job.warmup, job.steps), status="ok")
    except torch.OutOfMemoryError as exc:
        row.update(status="oom", error=str(exc).splitlines()[0][:200])
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row["wall_s"] = time.perf_counter() - started
    return row


def worker_main(job_file: str) -> int:
    """Entry point of one variant's process (or of every rank of a --launcher launch)."""
    from cxrdist.logging_utils import setup_logging

    setup_logging()
    job = Job.from_dict(json.loads(Path(job_file).read_text()))
    row = measure(job)
    if global_rank() == 0:
        write_atomic(Path(job.row_file), json.dumps(row, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------
# Running the sweep
# ---------------------------------------------------------------------------------------------------------

def say(message: str) -> None:
    if global_rank() == 0:
        print(f"gpu_train: {message}", flush=True)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def run_in_process(job: Job) -> dict:
    started = time.perf_counter()
    try:
        return measure(job)
    except Exception as exc:  # one broken variant must not hide the others' numbers
        row = empty_row(job)
        row.update(error=one_line(exc), wall_s=time.perf_counter() - started)
        return row


def run_in_subprocess(job: Job, args, log_path: Path) -> dict:
    """One variant in a fresh interpreter (or a fresh --launcher launch); its output goes to `log_path`."""
    job_file = log_path.with_suffix(".job.json")
    job.row_file = str(log_path.with_suffix(".row.json"))
    Path(job.row_file).unlink(missing_ok=True)
    write_atomic(job_file, json.dumps(asdict(job), indent=2))
    prefix = shlex.split(args.launcher) if args.launcher else [sys.executable]
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([*prefix, str(SCRIPT), "--worker", str(job_file)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.variant_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole launch: launcher and every rank it started
            proc.wait()
            rc = f"killed after --variant-timeout {args.variant_timeout:.0f} s"
    if Path(job.row_file).exists():
        row = json.loads(Path(job.row_file).read_text())
    else:
        row = empty_row(job)
        row["error"] = f"exit {rc}: {last_line(log_path)}"
    row["wall_s"] = time.perf_counter() - started  # the variant's real cost: interpreter start and imports too
    return row


def last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no output)"


def run_sweep(args) -> list[dict]:
    out = Path(args.out)
    if args.isolation == "subprocess":
        (out / "logs").mkdir(parents=True, exist_ok=True)
    ensure_preset(args.preset)
    shards = {size: ensure_shards(Path(args.shards_dir), size, shard_count(size, batch, args))
              for size, batch in zip(args.sizes, args.batch)}
    variants = plan(args)
    how = "in this process" if args.isolation == "inprocess" else ("one launch each" if args.launcher else
                                                                    "each in a fresh interpreter")
    say(f"{len(variants)} variants, {how}; {1 + args.warmup} warm-up (1 FLOP-counted) + {args.steps} measured "
        f"+ 1 profiled steps each")
    rows = []
    for i, v in enumerate(variants, 1):
        job = Job(v, args.config, variant_overrides(v, args, shards[v.size]), args.warmup, args.steps,
                  str(out / "runs" / v.name))
        say(f"[{i}/{len(variants)}] {v.name} ...")
        if args.isolation == "inprocess":
            row = run_in_process(job)
        else:
            row = run_in_subprocess(job, args, out / "logs" / f"{v.name}.log")
        rows.append(row)
        say(f"[{i}/{len(variants)}] {v.name}: {progress_summary(row)}")
    return rows


def progress_summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status'].upper()} ({r['error']}) after {r['wall_s'] or 0:.0f} s"
    host = "n/a" if r["host_ms"] is None else f"{r['host_ms']:.0f} ms"
    peak = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f} GiB"
    return (f"{r['images_per_s']:.2f} images/s, step {r['step_ms']:.0f} ms (data {r['data_ms']:.0f} ms, "
            f"host {host}), peak {peak}, {r['gflop_img']:.2f} GFLOP/img ({r['wall_s']:.0f} s)")


def add_utilisation(rows: list[dict], peak_tflops: Optional[float]) -> None:
    """MFU from recomputation-free model FLOPs (the checkpointing-off count at the same resolution), HFU from
    each variant's own count. Both over ranks x peak; None without a peak."""
    model_flops = {r["size"]: r["gflop_img"] for r in rows if r["status"] == "ok" and not r["checkpointing"]}
    for r in rows:
        if r["status"] != "ok":
            continue
        own = r["size"] not in model_flops
        r["model_gflop_img"] = r["gflop_img"] if own else model_flops[r["size"]]
        r["model_flops_from"] = "own count (includes recomputation)" if own else "ckpt-off count"
        if peak_tflops:
            achievable = peak_tflops * 1e3 * r["world_size"]  # GFLOP/s of all ranks
            r["mfu"] = r["model_gflop_img"] * r["images_per_s"] / achievable
            r["hfu"] = r["gflop_img"] * r["images_per_s"] / achievable


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------

COLUMNS = ("px", "batch", "ranks", "grad ckpt", "optim", "status", "images/s", "step ms", "data ms", "host ms",
           "peak GiB", "GFLOP/img", "VAE %", "MFU", "HFU", "wall s")


def fmt(value, spec: str, na: str = "n/a") -> str:
    return na if value is None else format(value, spec)


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.3g}%"


def own_flops(r: dict) -> bool:
    return str(r.get("model_flops_from") or "").startswith("own")


def table_row(r: dict) -> str:
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error'][:80]}".replace("|", "/")
    ranks = "" if r["world_size"] is None else str(r["world_size"])
    if r["world_size"] and r["world_size"] > 1:
        ranks += f" ({r['distribution']})"
    cells = [r["size"], r["batch"], ranks, "on" if r["checkpointing"] else "off", r["optim"],
             status,
             fmt(r["images_per_s"], ".2f", ""), fmt(r["step_ms"], ".0f", ""), fmt(r["data_ms"], ".1f", ""),
             fmt(r["host_ms"], ".1f"), fmt(r["peak_mem_gib"], ".2f"), fmt(r["gflop_img"], ".1f", ""),
             pct(r["vae_share"]), pct(r["mfu"]) + ("*" if own_flops(r) else ""), pct(r["hfu"]),
             fmt(r["wall_s"], ".0f", "")]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(meta: dict, rows: list[dict]) -> str:
    peak = (f"{meta['peak_bf16_tflops']:g} TFLOP/s dense bf16 ({meta['peak_source']})" if meta["peak_bf16_tflops"]
            else "none (MFU n/a)")
    lines = ["# GPU LoRA training benchmark (cxrdist Trainer)", "",
             f"- date: {meta['date']}",
             f"- device: {meta['device']} x{meta['device_count']}, peak {peak}",
             f"- torch {meta['torch']} (CUDA {meta['cuda']}), diffusers {meta['diffusers']}, "
             f"accelerate {meta['accelerate']}",
             f"- config {meta['config']} + preset {meta['preset']}, mixed precision {meta['mixed_precision']}; "
             f"1 FLOP-counted + {meta['warmup']} warm-up, {meta['steps']} measured, 1 profiled step per variant "
             f"({meta['isolation']}{', launcher: ' + meta['launcher'] if meta['launcher'] else ''})",
             f"- FLOPs: {meta['flops_method']}",
             f"- command: `{meta['command']}`; sweep wall time {meta['wall_s']:.0f} s", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = ["", "\\* no checkpointing-off variant at this size: MFU from the variant's own count, which "
             "includes recomputation (an over-estimate)."] if any(map(own_flops, rows)) else []
    return "\n".join(lines + [table_row(r) for r in rows] + notes) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def command_line(args) -> str:
    line = shlex.join(["python", "benchmarks/gpu_train.py", *args.argv])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"{line} (launched as {world} ranks)" if world > 1 else line


def metadata(args, device: str, count: int, peak: Optional[float], source: Optional[str], wall_s: float) -> dict:
    import accelerate
    import diffusers
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": device, "device_count": count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "peak_bf16_tflops": peak, "peak_source": source,
            "config": args.config, "preset": args.preset, "mixed_precision": args.mixed_precision,
            "warmup": args.warmup, "steps": args.steps, "isolation": args.isolation, "launcher": args.launcher,
            "overrides": list(args.set), "wall_s": wall_s, "command": command_line(args),
            "flops_method": "FlopCounterMode over one real train_step (forward + backward + optimizer step, VAE "
                            "encode included; matmul/conv/attention only); MFU uses the checkpointing-off "
                            "count at the same resolution, HFU the variant's own count"}


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for results.json, results.md, logs/ and runs/")
    ap.add_argument("--config", default="product", help="config preset or YAML file the variants start from")
    ap.add_argument("--preset", default=None, help="model preset (default sd15-arch; tiny with --smoke)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="image sizes (default 256 512; 64 with --smoke)")
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="batch per rank for each size, in the order of --sizes (default 32 8; 2 with --smoke)")
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--optims", nargs="+", default=["adamw", "adamw8bit"], choices=["adamw", "adamw8bit"])
    ap.add_argument("--mixed-precision", default=None, choices=["bf16", "fp16", "no"],
                    help="train.mixed_precision (default bf16; no with --smoke)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps after the FLOP-counted one (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 15; 2 with --smoke)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every variant (applied before the sweep's own keys)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak of one device in TFLOP/s: required for names not in the table")
    ap.add_argument("--isolation", choices=["subprocess", "inprocess"], default=None,
                    help="a fresh process per variant (default on GPU) or all in this one (default with --smoke)")
    ap.add_argument("--launcher", default="", help="command that starts each variant, e.g. 'accelerate launch "
                    "--config_file configs/accelerate/zero2.yaml --num_processes 2'")
    ap.add_argument("--variant-timeout", type=float, default=240.0,
                    help="seconds before a variant's process is killed (default 240)")
    ap.add_argument("--shards-dir", default=None, help="where the phantom shards are built once (default OUT/shards)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check: tiny preset, 64 px, batch 2, fp32, 1 FLOP-counted warm-up + 2 measured steps")
    ap.add_argument("--worker", metavar="JOB_JSON", help=argparse.SUPPRESS)  # one variant's process
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return args
    if not args.out:
        ap.error("--out is required")
    apply_mode_defaults(args, ap)
    return args


def apply_mode_defaults(args, ap) -> None:
    import torch

    smoke = args.smoke
    args.preset = args.preset or ("tiny" if smoke else "sd15-arch")
    args.sizes = args.sizes or ([64] if smoke else [256, 512])
    args.batch = args.batch or ([2] * len(args.sizes) if smoke else [32, 8][: len(args.sizes)])
    if len(args.batch) == 1 and len(args.sizes) > 1:
        args.batch = args.batch * len(args.sizes)
    if len(args.batch) != len(args.sizes):
        ap.error(f"--batch needs one value per --sizes entry (or a single value), got {args.batch} for {args.sizes}")
    args.mixed_precision = args.mixed_precision or ("no" if smoke else "bf16")  # CPU bf16 is emulated and slow
    args.warmup = (0 if smoke else 2) if args.warmup is None else args.warmup
    args.steps = (2 if smoke else 15) if args.steps is None else args.steps
    args.checkpointing = [c == "on" for c in dict.fromkeys(args.checkpointing)]
    args.optims = list(dict.fromkeys(args.optims))
    args.isolation = args.isolation or ("inprocess" if smoke else "subprocess")
    args.shards_dir = args.shards_dir or str(Path(args.out) / "shards")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.launcher and args.isolation == "inprocess":
        ap.error("--launcher starts one launch per variant: it needs --isolation subprocess")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched:
        args.isolation = "inprocess"  # started by a launcher: the variants run inside these ranks
    if not smoke and not torch.cuda.is_available():
        ap.error("no CUDA device here: run with --smoke for the CPU check")
    args.world_hint = world_hint(args.launcher, launched)


def world_hint(launcher: str, launched: bool) -> int:
    """Ranks to size the shard sets for (one epoch on every rank): the launch's, the launcher's
    --num_processes, or every visible GPU."""
    import re

    import torch

    if launched:
        return int(os.environ["WORLD_SIZE"])
    named = re.search(r"--num_processes[= ](\d+)", launcher)
    return int(named.group(1)) if named else (max(1, torch.cuda.device_count()) if launcher else 1)


def describe_device(args) -> tuple[str, int, Optional[float], Optional[str]]:
    """(name, count, peak, source). On a GPU the peak is required (raises UnknownDeviceError); on CPU optional."""
    import torch

    if args.smoke or not torch.cuda.is_available():
        peak = resolve_peak("cpu", args.peak_tflops) if args.peak_tflops is not None else (None, None)
        return f"cpu ({torch.get_num_threads()} threads)", 1, *peak
    name = torch.cuda.get_device_name(0)
    return name, torch.cuda.device_count(), *resolve_peak(name, args.peak_tflops)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cxrdist.logging_utils import quiet_dependencies

    quiet_dependencies()
    if args.worker:
        return worker_main(args.worker)
    try:
        device, count, peak, source = describe_device(args)
    except UnknownDeviceError as exc:
        print(f"gpu_train: error: {exc}", file=sys.stderr)
        return 2
    import torch

    peak_text = f"peak {peak:g} TFLOP/s dense bf16 ({source})" if peak else "no peak given: MFU n/a"
    say(f"device {device} x{count}, {peak_text}, torch {torch.__version__}")
    started = time.perf_counter()
    rows = run_sweep(args)
    add_utilisation(rows, peak)
    if global_rank() != 0:
        return 0
    meta = metadata(args, device, count, peak, source, time.perf_counter() - started)
    out = Path(args.out)
    write_atomic(out / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = markdown(meta, rows)
    write_atomic(out / "results.md", text)
    ok = sum(r["status"] == "ok" for r in rows)
    print("\n" + text, flush=True)
    logs = f"; per-variant logs: {out / 'logs'}" if args.isolation == "subprocess" else ""
    say(f"{ok}/{len(rows)} variants measured in {meta['wall_s']:.0f} s; results: {out / 'results.md'} and "
        f"{out / 'results.json'}{logs}")
    return 0 if all(r["status"] in ("ok", "oom") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
