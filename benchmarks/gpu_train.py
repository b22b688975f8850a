"""GPU LoRA training benchmark of the REAL trainer: images/s, GPU memory (allocated, reserved, device), MFU.

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
are then exact, and an OOM or a crash costs one row, not the sweep). `--sizes`, `--batch` and `--grad-accum`
give rows of their own (one value each per size; a size without a batch gets 32 at 256 px, 8 at 512 px, the
same pixels per step otherwise), e.g. the GPU guide's rows: `--sizes 256 512 --batch 16 8 --grad-accum 3 6`.

Time: per variant about 15-25 s fixed (interpreter + imports, loading the 4 GB preset from the page cache, LoRA +
bf16 cast + prepare, FLOP-counted and profiled steps) plus 1 + 2 + 15 + 1 micro-steps; a first run adds about a
minute to write the sd15-arch preset into the cache and seconds for the phantom shards. Each row's `wall s` is
the real cost. `--deadline SECONDS` bounds the whole run: a variant whose expected cost (the slowest finished
row at its size, else of any size) no longer fits is skipped and listed as skipped, and a running one is killed
when the deadline comes. results.md and results.json are rewritten after every row, so a run cut short keeps
every row it finished. `--variant-timeout` (240 s) caps a hung variant.

Per variant:
- images/s: images of all ranks over the wall time of the measured micro-steps (loader included), between
  torch.cuda.synchronize() calls, after 1 FLOP-counted + --warmup warm-up micro-steps;
- step ms / data ms: wall time per micro-step (an optimizer step every --grad-accum of them), and the part of
  it spent waiting for the loader;
- host ms: host-side overhead of one train_step: its wall time minus the time the GPU was busy in it (union
  of kernel/memcpy intervals from one torch.profiler step): Python, tokenising, per-sample RNG, launch
  latency. An upper bound (the profiler adds host work per op); n/a on CPU;
- alloc GiB / reserved GiB: torch.cuda.max_memory_allocated() and max_memory_reserved() over the variant's steps
  (reset after the trainer is built; weights included; the reserve adds the caching allocator's blocks and
  fragmentation), the max over ranks; used GiB: the device's whole use after the measured steps as the driver
  reports it (total - free from mem_get_info: every process, the CUDA context, library workspaces), of total GiB;
- GFLOP/img: FLOPs of one real training step (forward + backward + optimizer step, VAE encode included)
  counted with torch.utils.flop_counter.FlopCounterMode, per image; it counts matmul/conv/attention only
  (norms, elementwise ops and the optimizer's arithmetic are not counted, so MFU is slightly conservative);
  VAE % is the frozen VAE encode's share of it (zero with cached latents);
- MFU = model FLOPs/img x images/s / (ranks x dense peak). Model FLOPs come from the checkpointing-OFF
  variant at the same resolution, because recomputation is not useful work; HFU uses the variant's own
  count (recomputation included). The dense bf16/fp16 tensor-core peak comes from PEAK_BF16_TFLOPS by the EXACT
  device name, or from --peak-tflops. A device not in the table (an NVL part, a MIG slice, a new GPU) is measured
  all the same, with MFU n/a; so is a run with --mixed-precision no (fp32/TF32 has another peak), unless
  --peak-tflops gives the peak that applies.

The process that runs the sweep never touches CUDA itself when the variants run in their own processes (the
default on a GPU): the device is described by a short child process, so the parent holds no CUDA context (which
costs memory on the GPU and fails under the exclusive-process compute mode).

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
train/images_per_s, train/peak_memory_mb, train/peak_memory_reserved_mb and train/device_memory_used_mb.

Writes OUT/results.json and OUT/results.md (atomically, after every row), per-variant logs in OUT/logs and run
folders in OUT/runs, and prints a summary table.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import shlex
import shutil
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

from cxrdist.errors import CxrdistError  # noqa: E402  (after the repository is on the path)
from cxrdist.fileio import write_text_atomic  # noqa: E402
from cxrdist.processes import kill_tree  # noqa: E402
from cxrdist.train.steps import endless_batches  # noqa: E402  (training batches across epochs)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s (the datasheets' sparse figures halved), keyed by the EXACT
# torch.cuda.get_device_name() string. Exact, because names that share a substring differ: "NVIDIA H100 PCIe" (756)
# vs the SXM part "NVIDIA H100 80GB HBM3" (989) vs "NVIDIA H100 NVL" (835); a MIG slice has a share of its GPU's.
# Any other name is measured with MFU n/a, or against --peak-tflops.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA L4": 121.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
}
SHARD_FOLDS, SHARD_TEST_FRACTION = 5, 0.1  # fold 0 validates: ~72 % of the phantoms are training samples
DEFAULT_BATCH = {256: 32, 512: 8}  # per rank; other sizes get the same pixels per micro-step as 256 px at 32
PRECISIONS_WITH_TABLE_PEAK = ("bf16", "fp16")  # the table's dense tensor-core peak is the same for both


class PeakError(ValueError):
    """--peak-tflops is not a usable peak."""


def normalise_device_name(name: str) -> str:
    """The only normalisation: surrounding and repeated whitespace (drivers have padded names)."""
    return " ".join(str(name).split())


def peak_for_name(name: str) -> Optional[float]:
    """Dense bf16 peak for an exact device name, else None (never a substring match)."""
    return PEAK_BF16_TFLOPS.get(normalise_device_name(name))


def resolve_peak(name: str, override: Optional[float], mixed_precision: str = "bf16") -> tuple[Optional[float], str]:
    """(peak TFLOP/s or None, where it came from or why there is none). --peak-tflops wins; a device not in the
    table, or fp32 training, has no peak (MFU n/a) but is measured all the same."""
    if override is not None:
        if not override > 0:
            raise PeakError(f"--peak-tflops must be > 0, got {override}")
        return float(override), "--peak-tflops"
    if mixed_precision not in PRECISIONS_WITH_TABLE_PEAK:
        return None, (f"--mixed-precision {mixed_precision} has no dense bf16/fp16 peak to compare with: MFU n/a "
                      "(pass --peak-tflops for the fp32/TF32 peak)")
    peak = peak_for_name(name)
    if peak is None:
        return None, f"no peak on file for device '{normalise_device_name(name)}': MFU n/a (pass --peak-tflops)"
    return peak, "table"


def default_batch(size: int) -> int:
    return DEFAULT_BATCH.get(size, max(1, round(32 * (256 / size) ** 2)))


# ---------------------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    size: int
    batch: int
    checkpointing: bool
    optim: str
    accum: int = 1

    @property
    def name(self) -> str:
        batch = f"b{self.batch}" + (f"x{self.accum}" if self.accum > 1 else "")
        return f"{self.size}px-{batch}-ckpt{'on' if self.checkpointing else 'off'}-{self.optim}"


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
    return [Variant(size, batch, ckpt, optim, accum)
            for size, batch, accum in zip(args.sizes, args.batch, args.grad_accum)
            for ckpt in args.checkpointing for optim in args.optims]


def micro_steps_per_variant(args) -> int:
    return 1 + args.warmup + args.steps + 1  # FLOP-counted + warm-up + measured + profiled


def variant_overrides(v: Variant, args, shards: Path) -> list[str]:
    """The user's --set first, then the sweep's keys, so the table's labels stay true."""
    optimizer_steps = math.ceil(micro_steps_per_variant(args) / v.accum)
    keys = [f"model.pretrained=preset:{args.preset}", f"data.shards={shards}", f"data.image_size={v.size}",
            f"train.batch_size={v.batch}", f"train.grad_accum={v.accum}",
            f"train.mixed_precision={args.mixed_precision}",
            f"model.gradient_checkpointing={str(v.checkpointing).lower()}", f"optim.name={v.optim}",
            f"train.max_steps={optimizer_steps + 1}", "optim.warmup_steps=0",  # product's 200 > max_steps
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
    """Materialise the preset's diffusers folder in the cache once (the trainer loads it like any folder), in the
    folder the trainer's loader looks in (`preset_path`)."""
    from cxrdist.models.loading import preset_folder, preset_path

    def build() -> None:
        say(f"building preset '{name}' into {preset_path(name)} (once per cache; sd15-arch: ~1 min, 4 GB)")
        started = time.perf_counter()
        preset_folder(name)
        say(f"preset ready in {time.perf_counter() - started:.0f} s")

    main_rank_first(lambda: (preset_path(name) / "model_index.json").exists(), build, f"preset {name}")


def shard_count(size: int, batch: int, args) -> int:
    """Phantoms for one epoch of a variant's micro-steps on every rank, +20 % for uneven fold sizes."""
    train_fraction = (1 - SHARD_TEST_FRACTION) * (SHARD_FOLDS - 1) / SHARD_FOLDS
    need = batch * args.world_hint * micro_steps_per_variant(args)
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
# The device, described by the process that computes (a child of the sweep's own when variants are isolated)
# ---------------------------------------------------------------------------------------------------------

def device_facts() -> dict:
    """Name, count, capability and memory of the first CUDA device, or why there is none."""
    import torch

    from cxrdist.env_info import cuda_unusable_reason

    facts = {"torch": torch.__version__, "cuda_version": torch.version.cuda}
    if not torch.cuda.is_available():
        return {**facts, "cuda": False, "name": f"cpu ({torch.get_num_threads()} threads)", "count": 1,
                "capability": None, "total_gib": None, "unusable": cuda_unusable_reason()}
    props = torch.cuda.get_device_properties(0)
    return {**facts, "cuda": True, "name": normalise_device_name(props.name), "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}", "total_gib": props.total_memory / 2**30, "unusable": None}


def probe_device(isolated: bool) -> dict:
    """`device_facts()` from a short child process when the variants run in processes of their own (this one then
    never initialises CUDA), else from this process, which computes anyway."""
    if not isolated:
        return device_facts()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--describe-device"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"describing the device failed: {last_line_of(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# One variant (runs in a worker process, or in-process)
# ---------------------------------------------------------------------------------------------------------

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


def memory_gib(accelerator) -> dict[str, Optional[float]]:
    """Peak allocated and reserved memory (max over ranks) and the device's whole use and size, in GiB; None on CPU."""
    import torch

    device = accelerator.device
    if device.type != "cuda":
        return {"peak_alloc_gib": None, "peak_reserved_gib": None, "device_used_gib": None, "device_total_gib": None}
    free, total = torch.cuda.mem_get_info(device)
    mine = torch.tensor([float(torch.cuda.max_memory_allocated(device)), float(torch.cuda.max_memory_reserved(device)),
                         float(total - free)], device=device)
    worst = accelerator.gather(mine).view(-1, 3).max(dim=0).values.tolist()
    return {"peak_alloc_gib": worst[0] / 2**30, "peak_reserved_gib": worst[1] / 2**30,
            "device_used_gib": worst[2] / 2**30, "device_total_gib": total / 2**30}


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
    memory = memory_gib(acc)
    batch = next(batches)
    host = host_overhead_ms(trainer, batch, warmup + 1 + steps) if acc.is_main_process else None
    if not acc.is_main_process:
        trainer.train_step(batch, warmup + 1 + steps)  # keep the ranks in step with rank 0's profiled one
    return {"world_size": acc.num_processes, "images_per_s": images * acc.num_processes / elapsed,
            "step_ms": 1e3 * elapsed / steps, "data_ms": 1e3 * data_s / steps, "host_ms": host,
            **memory, "gflop_img": flops / 1e9, "vae_share": vae_share, "distribution": _describe(acc)}


def _describe(accelerator) -> str:
    from cxrdist.train.accel import describe

    return describe(accelerator)


def empty_row(job: Job) -> dict:
    return {**asdict(job.variant), "name": job.variant.name, "status": "failed", "world_size": None,
            "distribution": None, "images_per_s": None, "step_ms": None, "data_ms": None, "host_ms": None,
            "peak_alloc_gib": None, "peak_reserved_gib": None, "device_used_gib": None, "device_total_gib": None,
            "gflop_img": None, "vae_share": None, "model_gflop_img": None, "model_flops_from": None, "mfu": None,
            "hfu": None, "wall_s": None, "error": ""}


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


def run_in_subprocess(job: Job, args, log_path: Path, timeout_s: float) -> dict:
    """One variant in a fresh interpreter (or a fresh --launcher launch); its output goes to `log_path`."""
    job_file = log_path.with_suffix(".job.json")
    job.row_file = str(log_path.with_suffix(".row.json"))
    Path(job.row_file).unlink(missing_ok=True)
    write_atomic(job_file, json.dumps(asdict(job), indent=2))
    prefix = shlex.split(args.launcher) if args.launcher else [sys.executable]
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([*prefix, str(SCRIPT), "--worker", str(job_file)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)  # the whole launch: launcher and every rank it started (each in its own session)
            proc.wait()
            why = "--deadline" if timeout_s < args.variant_timeout else "--variant-timeout"
            rc = f"killed after {timeout_s:.0f} s ({why})"
    if Path(job.row_file).exists():
        row = json.loads(Path(job.row_file).read_text())
    else:
        row = empty_row(job)
        row["error"] = f"exit {rc}: {last_line(log_path)}"
    row["wall_s"] = time.perf_counter() - started  # the variant's real cost: interpreter start and imports too
    return row


def last_line_of(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no output)"


def last_line(path: Path) -> str:
    return last_line_of(path.read_text(errors="replace"))


def expected_wall_s(done: list[dict], v: Variant) -> Optional[float]:
    """What a variant is expected to cost: the slowest finished row of its size, else of any size; None before any
    row finished (the first variant always gets its chance)."""
    walls = [r["wall_s"] for r in done if r["status"] != "skipped" and r["wall_s"]]
    same = [r["wall_s"] for r in done if r["status"] != "skipped" and r["wall_s"] and r["size"] == v.size]
    return max(same or walls) if walls else None


def skipped_row(job: Job, need: Optional[float], left: float) -> dict:
    row = empty_row(job)
    cost = f"about {need:.0f} s needed" if need is not None else "no time"
    row.update(status="skipped", error=f"--deadline: {cost}, {max(0.0, left):.0f} s left")
    return row


def run_sweep(args, on_row: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
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
        f"+ 1 profiled micro-steps each")
    rows: list[dict] = []
    for i, v in enumerate(variants, 1):
        job = Job(v, args.config, variant_overrides(v, args, shards[v.size]), args.warmup, args.steps,
                  str(out / "runs" / v.name))
        left = args.deadline_at - time.monotonic() if args.deadline_at is not None else math.inf
        need = expected_wall_s(rows, v)
        if left <= 0 or (need is not None and need > left):
            row = skipped_row(job, need, left)
        else:
            say(f"[{i}/{len(variants)}] {v.name} ...")
            if args.isolation == "inprocess":
                row = run_in_process(job)
            else:
                row = run_in_subprocess(job, args, out / "logs" / f"{v.name}.log", min(args.variant_timeout, left))
        rows.append(row)
        say(f"[{i}/{len(variants)}] {v.name}: {progress_summary(row)}")
        on_row(rows)
    return rows


def progress_summary(r: dict) -> str:
    if r["status"] == "skipped":
        return f"SKIPPED ({r['error']})"
    if r["status"] != "ok":
        return f"{r['status'].upper()} ({r['error']}) after {r['wall_s'] or 0:.0f} s"
    host = "n/a" if r["host_ms"] is None else f"{r['host_ms']:.0f} ms"
    memory = ("n/a" if r["peak_alloc_gib"] is None else
              f"{r['peak_alloc_gib']:.2f} GiB allocated, {r['peak_reserved_gib']:.2f} reserved, "
              f"{r['device_used_gib']:.2f} of {r['device_total_gib']:.1f} used on the device")
    return (f"{r['images_per_s']:.2f} images/s, step {r['step_ms']:.0f} ms (data {r['data_ms']:.0f} ms, "
            f"host {host}), memory {memory}, {r['gflop_img']:.2f} GFLOP/img ({r['wall_s']:.0f} s)")


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
           "alloc GiB", "reserved GiB", "used GiB", "GFLOP/img", "VAE %", "MFU", "HFU", "wall s")


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
    batch = f"{r['batch']} x {r.get('accum', 1)}" if r.get("accum", 1) > 1 else str(r["batch"])
    mfu = pct(r["mfu"]) + ("*" if own_flops(r) and r["mfu"] is not None else "")
    cells = [r["size"], batch, ranks, "on" if r["checkpointing"] else "off", r["optim"], status,
             fmt(r["images_per_s"], ".2f", ""), fmt(r["step_ms"], ".0f", ""), fmt(r["data_ms"], ".1f", ""),
             fmt(r["host_ms"], ".1f"), fmt(r["peak_alloc_gib"], ".2f"), fmt(r["peak_reserved_gib"], ".2f"),
             fmt(r["device_used_gib"], ".2f"), fmt(r["gflop_img"], ".1f", ""), pct(r["vae_share"]), mfu,
             pct(r["hfu"]), fmt(r["wall_s"], ".0f", "")]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(meta: dict, rows: list[dict]) -> str:
    peak = (f"{meta['peak_tflops']:g} TFLOP/s dense ({meta['peak_source']})" if meta["peak_tflops"]
            else meta["peak_source"])
    memory = f", {meta['device_total_gib']:.1f} GiB" if meta["device_total_gib"] else ""
    capability = f", compute capability {meta['capability']}" if meta["capability"] else ""
    skipped = [r["name"] for r in rows if r["status"] == "skipped"]
    state = ([f"- partial: {len(rows)} of {meta['variants']} variants so far (the run is still going, or was cut "
              "short)"] if not meta["finished"] else [])
    lines = ["# GPU LoRA training benchmark (cxrdist Trainer)", "",
             f"- date: {meta['date']}",
             f"- device: {meta['device']} x{meta['device_count']}{capability}{memory}; peak: {peak}",
             f"- torch {meta['torch']} (CUDA {meta['cuda']}), diffusers {meta['diffusers']}, "
             f"accelerate {meta['accelerate']}",
             f"- config {meta['config']} + preset {meta['preset']}, mixed precision {meta['mixed_precision']}; "
             f"1 FLOP-counted + {meta['warmup']} warm-up, {meta['steps']} measured, 1 profiled micro-step per variant "
             f"({meta['isolation']}{', launcher: ' + meta['launcher'] if meta['launcher'] else ''})",
             f"- FLOPs: {meta['flops_method']}",
             f"- command: `{meta['command']}`; wall time {meta['wall_s']:.0f} s"
             + (f" of a {meta['deadline_s']:.0f} s deadline" if meta["deadline_s"] else ""),
             *state,
             *([f"- skipped at the deadline: {', '.join(skipped)}"] if skipped else []), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = ["", "\\* no checkpointing-off variant at this size: MFU from the variant's own count, which "
             "includes recomputation (an over-estimate)."] if any(own_flops(r) and r["mfu"] for r in rows) else []
    return "\n".join(lines + [table_row(r) for r in rows] + notes) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def command_line(args) -> str:
    line = shlex.join(["python", "benchmarks/gpu_train.py", *args.argv])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"{line} (launched as {world} ranks)" if world > 1 else line


def metadata(args, device: dict, peak: Optional[float], source: str, wall_s: float, finished: bool) -> dict:
    import accelerate
    import diffusers

    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": device["name"], "device_count": device["count"],
            "capability": device["capability"], "device_total_gib": device["total_gib"],
            "torch": device["torch"], "cuda": device["cuda_version"], "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "peak_tflops": peak, "peak_source": source,
            "config": args.config, "preset": args.preset, "mixed_precision": args.mixed_precision,
            "warmup": args.warmup, "steps": args.steps, "isolation": args.isolation, "launcher": args.launcher,
            "overrides": list(args.set), "wall_s": wall_s, "deadline_s": args.deadline, "finished": finished,
            "variants": len(plan(args)), "command": command_line(args),
            "flops_method": "FlopCounterMode over one real train_step (forward + backward + optimizer step, VAE "
                            "encode included; matmul/conv/attention only); MFU uses the checkpointing-off "
                            "count at the same resolution, HFU the variant's own count"}


def write_results(args, device: dict, peak: Optional[float], source: str, started: float, rows: list[dict],
                  finished: bool) -> str:
    """results.json and results.md as they stand (called after every row): returns the markdown."""
    add_utilisation(rows, peak)
    meta = metadata(args, device, peak, source, time.perf_counter() - started, finished)
    out = Path(args.out)
    write_atomic(out / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = markdown(meta, rows)
    write_atomic(out / "results.md", text)
    return text


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
                    help="batch per rank for each size, in the order of --sizes (default 32 at 256 px, 8 at 512 px, "
                         "the same pixels per micro-step at other sizes; 2 with --smoke)")
    ap.add_argument("--grad-accum", type=int, nargs="+", default=None,
                    help="train.grad_accum for each size, in the order of --sizes (default 1)")
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--optims", nargs="+", default=["adamw", "adamw8bit"], choices=["adamw", "adamw8bit"])
    ap.add_argument("--mixed-precision", default=None, choices=["bf16", "fp16", "no"],
                    help="train.mixed_precision (default bf16; no with --smoke)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps after the FLOP-counted one (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 15; 2 with --smoke)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every variant (applied before the sweep's own keys)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense peak of one device in TFLOP/s for the precision measured (default: the bf16/fp16 "
                         "table by exact device name; MFU is n/a without one)")
    ap.add_argument("--isolation", choices=["subprocess", "inprocess"], default=None,
                    help="a fresh process per variant (default on GPU) or all in this one (default with --smoke)")
    ap.add_argument("--launcher", default="", help="command that starts each variant, e.g. 'accelerate launch "
                    "--config_file configs/accelerate/zero2.yaml --num_processes 2'")
    ap.add_argument("--variant-timeout", type=float, default=240.0,
                    help="seconds before a variant's process is killed (default 240)")
    ap.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                    help="wall-clock budget of the whole run: variants that cannot finish in time are skipped "
                         "(and listed), a running one is killed at the deadline")
    ap.add_argument("--shards-dir", default=None, help="where the phantom shards are built once (default OUT/shards)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check: tiny preset, 64 px, batch 2, fp32, 1 FLOP-counted warm-up + 2 measured steps")
    ap.add_argument("--worker", metavar="JOB_JSON", help=argparse.SUPPRESS)  # one variant's process
    ap.add_argument("--describe-device", action="store_true", help=argparse.SUPPRESS)  # the device probe's process
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.worker or args.describe_device:
        return args
    if not args.out:
        ap.error("--out is required")
    apply_mode_defaults(args, ap)
    return args


def per_size(values: Optional[list[int]], sizes: list[int], default: Callable[[int], int], flag: str, ap) -> list[int]:
    """One value per --sizes entry: the list given (a single value serves every size), else `default(size)`."""
    if values is None:
        return [default(size) for size in sizes]
    if len(values) == 1:
        values = values * len(sizes)
    if len(values) != len(sizes):
        ap.error(f"{flag} needs one value per --sizes entry (or a single value), got {values} for {sizes}")
    if min(values) < 1:
        ap.error(f"{flag} values must be >= 1, got {values}")
    return values


def apply_mode_defaults(args, ap) -> None:
    smoke = args.smoke
    args.preset = args.preset or ("tiny" if smoke else "sd15-arch")
    args.sizes = args.sizes or ([64] if smoke else [256, 512])
    args.batch = per_size(args.batch, args.sizes, (lambda size: 2) if smoke else default_batch, "--batch", ap)
    args.grad_accum = per_size(args.grad_accum, args.sizes, lambda size: 1, "--grad-accum", ap)
    args.mixed_precision = args.mixed_precision or ("no" if smoke else "bf16")  # CPU bf16 is emulated and slow
    args.warmup = (0 if smoke else 2) if args.warmup is None else args.warmup
    args.steps = (2 if smoke else 15) if args.steps is None else args.steps
    args.checkpointing = [c == "on" for c in dict.fromkeys(args.checkpointing)]
    args.optims = list(dict.fromkeys(args.optims))
    args.isolation = args.isolation or ("inprocess" if smoke else "subprocess")
    args.shards_dir = args.shards_dir or str(Path(args.out) / "shards")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.deadline is not None and not args.deadline > 0:
        ap.error(f"--deadline must be > 0 seconds, got {args.deadline}")
    if args.launcher and args.isolation == "inprocess":
        ap.error("--launcher starts one launch per variant: it needs --isolation subprocess")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args.isolation = "inprocess"  # started by a launcher: the variants run inside these ranks


def world_hint(launcher: str, device_count: int) -> int:
    """Ranks to size the shard sets for (one epoch on every rank): the launch's, the launcher's
    --num_processes, or every visible GPU."""
    import re

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["WORLD_SIZE"])
    named = re.search(r"--num_processes[= ](\d+)", launcher)
    return int(named.group(1)) if named else (max(1, device_count) if launcher else 1)


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    from cxrdist.logging_utils import quiet_dependencies

    quiet_dependencies()
    if args.worker:
        return worker_main(args.worker)
    if args.describe_device:
        print(json.dumps(device_facts()), flush=True)
        return 0
    args.deadline_at = time.monotonic() + args.deadline if args.deadline else None
    try:
        device = probe_device(args.isolation == "subprocess")
        if not device["cuda"] and not args.smoke:
            raise PeakError(f"no usable CUDA device here ({device['unusable']}): run with --smoke for the CPU check")
        peak, source = resolve_peak(device["name"], args.peak_tflops, args.mixed_precision)
    except (PeakError, RuntimeError) as exc:
        print(f"gpu_train: error: {exc}", file=sys.stderr)
        return 2
    args.world_hint = world_hint(args.launcher, device["count"])
    peak_text = f"peak {peak:g} TFLOP/s dense ({source})" if peak else source
    say(f"device {device['name']} x{device['count']}, {peak_text}, torch {device['torch']}")
    out = Path(args.out)

    def on_row(rows: list[dict]) -> None:
        if global_rank() == 0:
            write_results(args, device, peak, source, started, rows, finished=False)

    try:
        rows = run_sweep(args, on_row)
    except CxrdistError as exc:  # a preset or shard set that cannot be built: one line, rows so far are written
        print(f"gpu_train: error: {exc}", file=sys.stderr)
        return 2
    if global_rank() != 0:
        return 0
    text = write_results(args, device, peak, source, started, rows, finished=True)
    print("\n" + text, flush=True)
    ok = sum(r["status"] == "ok" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    logs = f"; per-variant logs: {out / 'logs'}" if args.isolation == "subprocess" else ""
    skip_text = f", {skipped} skipped at the --deadline" if skipped else ""
    say(f"{ok}/{len(rows)} variants measured{skip_text} in {time.perf_counter() - started:.0f} s; results: "
        f"{out / 'results.md'} and {out / 'results.json'}{logs}")
    return 0 if all(r["status"] in ("ok", "oom", "skipped") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
