"""`make gpu-check`: the real GPU path end to end in one command, with its figures written as it goes.

For a new cluster, or any session with a GPU: about 8 minutes on one H100 / H200 (`--budget`). Needs the CUDA build
of torch (`TORCH_SPEC=... make install`); without a usable CUDA device it stops in one line. Steps, in this order,
each recorded in OUT/gpu_check.json and OUT/gpu_check.md the moment it ends (a later failure or a kill keeps them):

1. environment (seconds): versions, the device and its compute capability, one bitsandbytes AdamW8bit step on the
   GPU, all through `cxrdist info --json`.
2. the real trainer, `launch/train.py` under `accelerate launch`, on `sd15-arch-narrow` (SD 1.5's module tree at 1/8
   width, random weights) at 256 px over phantom shards, from the `product` preset:
   - bf16 + AdamW8bit, killed (SIGKILL, as a preempted node) right after step 3 and continued with
     `--resume latest`: validation, checkpoints, the best-model export and the test split;
   - fp16 with accelerate's GradScaler;
   - DeepSpeed ZeRO-2 fp16 in one process (DeepSpeed's dynamic loss scale, bitsandbytes as its client optimizer);
   - a Sana base (`sana-arch-narrow`: Sana-0.6B's transformer and DC-AE layout at 1/8 width) in bf16 + AdamW8bit:
     flow matching, linear attention and the 32x autoencoder on the GPU;
   each must end with a finite training loss, finite test metrics, and a best export that `cxrdist sample` draws
   from (a non-blank PNG).
3. the throughput and memory sweep `benchmarks/gpu_train.py` on `sd15-arch` (the 860M UNet) for the time left:
   bf16, 256 and 512 px, checkpointing off/on, AdamW vs AdamW8bit, then the GPU guide's rows (docs/gpu.md), with
   `--deadline` so it ends inside the budget and lists what it skipped.

`--smoke` runs the same steps on the CPU in seconds each (`make test` does): the tiny presets at 64 px, fp32 where
the GPU run uses fp16 (CPU has no fp16 training), DeepSpeed with DS_ACCELERATOR=cpu, and the sweep's own --smoke.

    make gpu-check                                   # results in benchmarks/out/gpu_check/<date-time>/
    python scripts/gpu_check.py --out /tmp/gc --budget 600
    python scripts/gpu_check.py --smoke --out /tmp/gc-smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ACCEL = REPO / "configs" / "accelerate"

from cxrdist.fileio import write_json_atomic, write_text_atomic  # noqa: E402  (after the repository is on the path)
from cxrdist.processes import kill_tree  # noqa: E402
from cxrdist.train.tracking import scalar_events  # noqa: E402

REPORT = "Moderate cardiomegaly. Small left pleural effusion. No pneumothorax."


@dataclass(frozen=True)
class Mode:
    """What differs between the GPU check and its CPU smoke form; the steps are the same code."""

    preset: str
    sana_preset: str
    size: int
    batch: int
    phantoms: int
    fp16: str  # the precision of the "fp16" runs: fp16 on a GPU, fp32 ("no") on the CPU
    device: str  # for `cxrdist sample`
    launch_flags: tuple[str, ...]  # added to `accelerate launch` of the one-process, non-DeepSpeed runs
    env: tuple[tuple[str, str], ...]
    sweep: tuple[str, ...]  # benchmarks/gpu_train.py arguments besides --out and --deadline
    guide: tuple[str, ...]  # the GPU guide's rows, a second sweep ("" = none)


GPU = Mode(preset="sd15-arch-narrow", sana_preset="sana-arch-narrow", size=256, batch=8, phantoms=160, fp16="fp16", device="cuda",
           launch_flags=(), env=(),
           sweep=("--sizes", "256", "512"),
           guide=("--sizes", "256", "256", "512", "512", "512", "--batch", "16", "48", "8", "16", "24",
                  "--grad-accum", "3", "1", "6", "3", "2", "--checkpointing", "off", "--optims", "adamw8bit"))
SMOKE = Mode(preset="tiny", sana_preset="sana-tiny", size=64, batch=4, phantoms=60, fp16="no", device="cpu",
             launch_flags=("--cpu",), env=(("DS_ACCELERATOR", "cpu"), ("OMP_NUM_THREADS", "1")),
             sweep=("--smoke", "--checkpointing", "off"), guide=())


@dataclass
class Step:
    name: str
    status: str = "running"  # ok | failed | skipped
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    error: str = ""


class Report:
    """gpu_check.json and gpu_check.md in OUT, rewritten (through a temporary name) after every step."""

    def __init__(self, out: Path, command: str):
        self.out, self.command, self.started = out, command, time.time()
        self.environment: dict = {}
        self.steps: list[Step] = []

    def add(self, step: Step) -> None:
        self.steps.append(step)
        self.write()

    def write(self) -> None:
        data = {"date": time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(self.started)), "command": self.command,
                "wall_s": time.time() - self.started, "environment": self.environment,
                "steps": [asdict(s) for s in self.steps]}
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "gpu_check.json", data)
        write_text_atomic(self.out / "gpu_check.md", self.markdown(data))

    def markdown(self, data: dict) -> str:
        env = self.environment
        devices = env.get("devices", {})
        lines = ["# cxrdist GPU check", "", f"- date: {data['date']}; wall time {data['wall_s']:.0f} s",
                 f"- command: `{self.command}`"]
        if env:
            names = devices.get("cuda_devices") or [f"cpu ({devices.get('cpu_threads')} threads)"]
            lines += [f"- device: {', '.join(names)}; compute capability "
                      f"{', '.join(devices.get('cuda_capability') or ['n/a'])}; bf16 {devices.get('bf16')}",
                      f"- torch {env['packages'].get('torch')}, diffusers {env['packages'].get('diffusers')}, "
                      f"accelerate {env['packages'].get('accelerate')}, deepspeed {env['packages'].get('deepspeed')}, "
                      f"bitsandbytes {env['packages'].get('bitsandbytes')}",
                      f"- bitsandbytes: {env.get('bitsandbytes')}", f"- deepspeed: {env.get('deepspeed')}"]
        lines += ["", "| step | status | seconds | details |", "|---|---|---|---|"]
        for s in self.steps:
            detail = "; ".join(f"{k} {_short(v)}" for k, v in s.details.items())
            if s.error:
                detail = f"{s.error}; {detail}" if detail else s.error
            lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {detail.replace('|', '/')} |")
        sweep = self.out / "sweep" / "results.md"
        if sweep.exists():
            lines += ["", f"Throughput and memory: {sweep.relative_to(self.out)} (and guide/results.md)"]
        return "\n".join(lines) + "\n"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class CheckFailed(Exception):
    """A step's command failed or its outputs are not what the real path must produce."""


class NoGpu(CheckFailed):
    """The GPU check found no usable CUDA device: nothing after the environment step can run."""


class Runner:
    def __init__(self, args, mode: Mode, report: Report):
        self.args, self.mode, self.report = args, mode, report
        self.out = Path(args.out)
        self.deadline = time.monotonic() + args.budget
        self.failure: Optional[CheckFailed] = None  # the latest step's failure
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **dict(mode.env)}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], timeout: float, env: Optional[dict] = None) -> str:
        """Run one command with its output in OUT/logs/NAME.log; returns that output, raises CheckFailed on a
        non-zero exit (naming the last line it printed) or when it outlives `timeout`."""
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle:
            handle.write("$ " + shlex.join(cmd) + "\n")
            handle.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.env, stdout=handle, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)  # the launcher and its ranks (each in a session of its own)
                proc.wait()
                raise CheckFailed(f"{name} did not finish in {timeout:.0f} s (log: {log})") from None
        text = log.read_text(errors="replace")
        if proc.returncode != 0:
            raise CheckFailed(f"{name} exited {proc.returncode}: {_last_error(text)} (log: {log})")
        return text

    def step(self, name: str, body) -> Optional[dict]:
        """Run `body()` (-> details) as one recorded step; a failure is recorded and the check goes on."""
        step, started = Step(name), time.monotonic()
        try:
            step.details = body() or {}
            step.status = "ok"
        except CheckFailed as exc:
            step.status, step.error, self.failure = "failed", str(exc), exc
        step.seconds = time.monotonic() - started
        self.report.add(step)
        if isinstance(self.failure, NoGpu):
            return None  # main() says it in its one line
        print(f"gpu_check: {name}: {step.status} in {step.seconds:.0f} s"
              + (f" ({step.error})" if step.error else ""), flush=True)
        return step.details if step.status == "ok" else None

    # -- step 1 -------------------------------------------------------------------------------------------

    def environment(self) -> dict:
        cmd = [sys.executable, "-m", "cxrdist.cli", "info", "--json"]
        proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "logs" / "environment.log", f"$ {shlex.join(cmd)}\n{proc.stderr}{proc.stdout}")
        if proc.returncode != 0:
            raise CheckFailed(f"cxrdist info exited {proc.returncode}: {_last_error(proc.stderr + proc.stdout)}")
        info = json.loads(proc.stdout)
        self.report.environment = info
        devices = info["devices"]
        if not self.args.smoke and not devices.get("cuda"):
            raise NoGpu(f"no usable CUDA device ({devices.get('cuda_unusable')}): install a CUDA build of torch "
                        "(TORCH_SPEC=... make install), or run with --smoke for the CPU form")
        if not str(info["bitsandbytes"]).startswith("usable"):
            raise CheckFailed(f"bitsandbytes: {info['bitsandbytes']}")
        return {"device": ", ".join(devices.get("cuda_devices") or ["cpu"]),
                "capability": ", ".join(devices.get("cuda_capability") or ["n/a"]),
                "bitsandbytes": info["bitsandbytes"]}

    # -- step 2 -------------------------------------------------------------------------------------------

    def shards(self) -> dict:
        shards = self.out / "shards"
        if not (shards / "index.json").exists():
            self.run("shards", [sys.executable, "-m", "cxrdist.cli", "shard", "phantom", "--n",
                                str(self.mode.phantoms), "--size", str(self.mode.size), "--folds", "5",
                                "--test-fraction", "0.2", "--shard-size", "32", "--out", str(shards)], 300)
        return {"shards": str(shards), "phantoms": self.mode.phantoms, "px": self.mode.size}

    def single_gpu_launch(self) -> list[str]:
        """`accelerate launch` arguments of the one-process runs: single_gpu.yaml, plus the mode's flags (`--cpu` in
        the smoke form; never for DeepSpeed, which accelerate would then drop without a word)."""
        return ["--config_file", str(ACCEL / "single_gpu.yaml"), *self.mode.launch_flags]

    def train_command(self, name: str, launch: list[str], precision: str, resume: bool = False,
                      preset: Optional[str] = None, config: str = "product") -> list[str]:
        """launch/train.py under `accelerate launch LAUNCH`, a short run of the `product` config (or `config`) on the
        mode's model preset (or `preset`)."""
        m = self.mode
        sets = {"data.image_size": m.size, "train.batch_size": m.batch, "train.grad_accum": 1,
                "train.mixed_precision": precision, "train.max_steps": 6, "train.checkpoint_every": 2,
                "train.log_every": 1, "optim.warmup_steps": 0, "eval.eval_every_steps": 3,
                "eval.num_metric_images": 2, "eval.num_grid_prompts": 2, "eval.inference_steps": 4,
                "eval.max_eval_samples": 8, "data.num_workers": 0, "data.shuffle_buffer": 16}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch,
               str(REPO / "launch" / "train.py"), "--config", config, "--preset", preset or m.preset, "--fold", "0",
               "--shards", str(self.out / "shards"), "--output-dir", str(self.out / "runs" / name)]
        cmd += [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]
        return cmd + (["--resume", "latest"] if resume else [])

    def check_run(self, name: str, log: str) -> dict:
        """Finite training losses, finite test metrics, and a best export that `cxrdist sample` draws from."""
        fold = self.out / "runs" / name / "fold0"
        losses = [(e.step, e.value) for e in scalar_events(fold / "tensorboard", "train/loss")]
        if not losses or not all(math.isfinite(v) for _, v in losses):
            raise CheckFailed(f"{name}: training losses {losses[-3:] if losses else 'missing'} (not all finite)")
        metrics_file = fold / "test_metrics.json"
        if not metrics_file.exists():
            raise CheckFailed(f"{name}: no {metrics_file.name}: the test split did not run")
        metrics = json.loads(metrics_file.read_text())
        numbers = metrics.get("test") or {}
        if not numbers or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers.values()):
            raise CheckFailed(f"{name}: test metrics missing or not finite: {numbers}")
        best = Path(metrics["checkpoint"])
        samples = self.out / "samples" / name
        self.run(f"{name}-sample", [sys.executable, "-m", "cxrdist.cli", "sample", "--model-path", str(best),
                                    "--description", REPORT, "--steps", "4", "--device", self.mode.device,
                                    "--out", str(samples)], max(60.0, min(300.0, self.left())))
        blank = _blank_images(samples)
        if blank is None:
            raise CheckFailed(f"{name}: cxrdist sample wrote no image into {samples}")
        if blank:
            raise CheckFailed(f"{name}: cxrdist sample drew a blank image ({blank})")
        steps = max(step for step, _ in losses)
        return {"steps": steps, "last loss": losses[-1][1], **{f"test {k}": v for k, v in numbers.items()},
                "export": best.name, "sample": str(samples.relative_to(self.out)), **_log_facts(log)}

    def bf16_adamw8bit_killed_and_resumed(self) -> dict:
        name = "bf16-adamw8bit"
        launch = self.single_gpu_launch()
        killed = {**self.env, "CXRDIST_FAULT_KILL_AT_STEP": "3"}  # SIGKILL right after optimizer step 3
        try:
            self.run(f"{name}-killed", self.train_command(name, launch, "bf16"), self.left(), env=killed)
            raise CheckFailed(f"{name}: the run meant to be killed after step 3 finished instead")
        except CheckFailed as exc:
            log = (self.out / "logs" / f"{name}-killed.log").read_text(errors="replace")
            if "exited" not in str(exc) or not ("SIGKILL" in log or "status -9" in log):
                raise
        checkpoints = sorted(p.name for p in (self.out / "runs" / name / "fold0" / "checkpoints").glob("step_*"))
        if "step_00000002" not in checkpoints:
            raise CheckFailed(f"{name}: no step-2 checkpoint before the kill (found {checkpoints})")
        log = self.run(f"{name}-resumed", self.train_command(name, launch, "bf16", resume=True), self.left())
        if "resumed from" not in log or "step_00000002" not in log:
            raise CheckFailed(f"{name}: the resumed run did not continue from step_00000002")
        return {"resumed from": "step_00000002", "optimizer": _optimizer_chain(log), **self.check_run(name, log)}

    def fp16_grad_scaler(self) -> dict:
        name = f"{self.mode.fp16}-adamw"
        cmd = self.train_command(name, self.single_gpu_launch(), self.mode.fp16)
        log = self.run(name, cmd + ["--set", "optim.name=adamw"], self.left())
        return {"precision": self.mode.fp16, **self.check_run(name, log)}

    def zero2_fp16_adamw8bit(self) -> dict:
        name = f"zero2-{self.mode.fp16}-adamw8bit"
        launch = ["--config_file", str(ACCEL / "zero2.yaml"), "--num_processes", "1"]
        log = self.run(name, self.train_command(name, launch, self.mode.fp16), self.left())
        if "DeepSpeed ZeRO-2" not in log:
            raise CheckFailed(f"{name}: the run did not train under DeepSpeed ZeRO-2")
        return {"precision": self.mode.fp16, "optimizer": _optimizer_chain(log), **self.check_run(name, log)}

    def sana_bf16_adamw8bit(self) -> dict:
        name = "sana-bf16-adamw8bit"
        cmd = self.train_command(name, self.single_gpu_launch(), "bf16", preset=self.mode.sana_preset)
        # Sana takes no text-encoder LoRA, and min-SNR weighting (the product preset's) has no meaning for flow matching
        log = self.run(name, cmd + ["--set", "lora.train_text_encoder=false", "--set", "train.snr_gamma=0"], self.left())
        if "prediction flow" not in log:
            raise CheckFailed(f"{name}: the run did not train with flow matching")
        return {"preset": self.mode.sana_preset, "optimizer": _optimizer_chain(log), **self.check_run(name, log)}

    def full_finetune_bf16_adamw8bit(self) -> dict:
        """train.method=full (the product-full preset: every UNet weight, gradient checkpointing, AdamW8bit) in one
        process: the trainable count, the peak memory it logged and the usual run checks."""
        name = "full-bf16-adamw8bit"
        cmd = self.train_command(name, self.single_gpu_launch(), "bf16", config="product-full")
        log = self.run(name, cmd, self.left())
        trained = [line.split("trainable ", 1)[1].split(" parameters")[0] for line in log.splitlines()
                   if "| trainable " in line]
        if not trained:
            raise CheckFailed(f"{name}: the trainer did not report what it trains")
        fold = self.out / "runs" / name / "fold0"
        peak = [e.value for e in scalar_events(fold / "tensorboard", "train/peak_memory_mb")]
        return {"trainable": trained[0], "peak memory MiB": round(max(peak)) if peak else "n/a",
                "optimizer": _optimizer_chain(log), **self.check_run(name, log)}

    # -- step 3 -------------------------------------------------------------------------------------------

    def sweep(self, name: str, extra: tuple[str, ...]) -> dict:
        deadline = self.left() - 15  # the sweep's own summary and this report
        if deadline < 30:
            raise CheckFailed(f"{name}: only {max(0.0, self.left()):.0f} s of the --budget left")
        out = self.out / name
        self.run(name, [sys.executable, str(REPO / "benchmarks" / "gpu_train.py"), "--out", str(out), *extra,
                        "--deadline", f"{deadline:.0f}"], deadline + 60)
        rows = json.loads((out / "results.json").read_text())["rows"]
        counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "oom", "failed", "skipped")}
        if counts["failed"]:
            raise CheckFailed(f"{name}: {counts['failed']} variant(s) failed (see {out / 'results.md'})")
        return {**{k: v for k, v in counts.items() if v}, "results": str((out / "results.md").relative_to(self.out))}


def _blank_images(folder: Path) -> Optional[str]:
    """None when `folder` holds no PNG, '' when every image has some contrast, else the first blank one's name."""
    import numpy as np
    from PIL import Image

    pngs = [p for p in sorted(folder.glob("*.png")) if p.name != "grid.png"]
    if not pngs:
        return None
    for png in pngs:
        pixels = np.asarray(Image.open(png), dtype=np.float32)
        if float(pixels.std()) < 1.0:
            return png.name
    return ""


def _optimizer_chain(log: str) -> str:
    """The trainer's start-up line naming the optimizer that really steps, e.g. DeepSpeedZeroOptimizer > AdamW8bit."""
    for line in log.splitlines():
        if ": optimizer " in line:
            return line.split(": optimizer ", 1)[1].strip()[:120]
    return "n/a"


def _log_facts(log: str) -> dict:
    """What the trainer said of itself: how it ran (distribution, device, precision) and its summary's images/s."""
    facts = {}
    for line in log.splitlines():
        if " rank(s) on " in line and "| fold " in line:
            parts = [p.strip() for p in line.split("|")]
            facts["ran as"] = "; ".join(parts[2:4])
        if "images/s (all ranks" in line:
            facts["images/s"] = line.split(",")[1].strip().split(" ")[0]
    return facts


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("Error:", "gpu_train: error", "RuntimeError", "torch."))]
    return (errors or lines or ["(no output)"])[-1][:300]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="new folder for gpu_check.md / .json, logs/, runs/, samples/ and "
                    "the sweeps (default benchmarks/out/gpu_check/<date-time>)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole check; the sweep gets what the runs leave (default 480; 600 --smoke)")
    ap.add_argument("--smoke", action="store_true", help="the same steps on the CPU, tiny (what make test runs)")
    args = ap.parse_args(argv)
    args.budget = args.budget or (600.0 if args.smoke else 480.0)
    args.out = args.out or str(REPO / "benchmarks" / "out" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S"))
    if args.budget <= 0:
        ap.error("--budget must be > 0 seconds")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = SMOKE if args.smoke else GPU
    out = Path(args.out)
    if (out / "gpu_check.json").exists():
        print(f"gpu_check: error: {out} already holds a check: choose another --out", file=sys.stderr)
        return 2
    report = Report(out, shlex.join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]))
    runner = Runner(args, mode, report)
    if runner.step("1 environment", runner.environment) is None and isinstance(runner.failure, NoGpu):
        print(f"gpu_check: error: {runner.failure}", file=sys.stderr)
        return 2
    if runner.step("2 shards", runner.shards) is not None:
        runner.step("2a bf16 + AdamW8bit, killed after step 3, --resume latest",
                    runner.bf16_adamw8bit_killed_and_resumed)
        runner.step(f"2b {mode.fp16} + AdamW (GradScaler)" if mode.fp16 == "fp16" else "2b fp32 + AdamW",
                    runner.fp16_grad_scaler)
        runner.step(f"2c ZeRO-2 {mode.fp16} + AdamW8bit, one process", runner.zero2_fp16_adamw8bit)
        runner.step("2d Sana bf16 + AdamW8bit", runner.sana_bf16_adamw8bit)
        runner.step("2e full fine-tune bf16 + AdamW8bit", runner.full_finetune_bf16_adamw8bit)
    if mode.guide:  # first: docs/gpu.md's memory table is built from these rows
        runner.step("3a GPU guide rows", lambda: runner.sweep("guide", mode.guide))
    runner.step("3b throughput sweep", lambda: runner.sweep("sweep", mode.sweep))
    report.write()
    failed = [s.name for s in report.steps if s.status != "ok"]
    print(f"gpu_check: {len(report.steps) - len(failed)}/{len(report.steps)} steps ok in "
          f"{time.time() - report.started:.0f} s; results: {out / 'gpu_check.md'}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
