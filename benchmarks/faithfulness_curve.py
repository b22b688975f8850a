"""Text faithfulness against training time: every saved checkpoint of one or more runs, scored alike.

    python benchmarks/faithfulness_curve.py --run runs/demo/fold0 --shards shards/phantom --samples 128 \
        --base models/phantom-base

or train the configurations first, one after the other on 2 CPU ranks as `make demo` does (demo preset, fold 0,
a checkpoint every --every steps, validation only at the end), then score them all:

    python benchmarks/faithfulness_curve.py --shards shards/phantom --base models/phantom-base \
        --launch demo= --launch lr1e-2=optim.lr_unet=1e-2 --max-steps 1000 --every 100 --root runs/curve

Each `checkpoints/step_N` of each run (keep them with `--set train.keep_last=...`) is loaded as
`cxrdist sample` loads it and evaluated on the same held-out test reports with the same seeds through
`cxrdist.evaluation.runs`, so rows differ only in the adapter. Training time per checkpoint is the wall clock between
the run's first and that step's TensorBoard `train/loss` events (validation pauses included), extrapolated
back to step 0 at the run's mean rate. The last lines give each run's training minutes to the first checkpoint
with macro >= --target (0.90) and every primary attribute >= --attribute-floor (0.80).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cxrdist.evaluation.runs import EvaluateOptions, evaluate_model_path
from cxrdist.logging_utils import setup_logging
from cxrdist.metrics.attributes import ATTRIBUTES
from cxrdist.metrics.faithfulness import PRESENCE
from cxrdist.models.lora import CHECKPOINT_MARKER
from cxrdist.train.checkpoint import CHECKPOINTS, complete_checkpoints


def checkpoints(run_dir: Path) -> list[Path]:
    found = complete_checkpoints(run_dir)
    if not found:
        raise SystemExit(f"{run_dir} has no complete checkpoint under {CHECKPOINTS}/: train with "
                         "train.checkpoint_every and a large train.keep_last")
    return found


def seconds_at_steps(run_dir: Path) -> dict[int, float]:
    """Training seconds at each logged step, from the wall times of TensorBoard's train/loss events."""
    from cxrdist.train.tracking import scalar_events

    events = scalar_events(run_dir / "tensorboard", "train/loss")
    if not events:
        return {}
    first, last = events[0], events[-1]
    per_step = (last.wall_time - first.wall_time) / max(1, last.step - first.step)
    return {e.step: e.wall_time - first.wall_time + first.step * per_step for e in events}


COLUMNS = (*ATTRIBUTES, *PRESENCE)  # per attribute, then side-blind presence


def short(attribute: str) -> str:
    return (attribute.replace("effusion_", "eff_").replace("pneumothorax_", "ptx_").replace("nodule_", "nod_")
            .replace("present", "any").replace("left", "L").replace("right", "R"))


def row(label: str, step: str, minutes: str, result: dict) -> str:
    f = result["faithfulness"]
    return (f"{label:<14}{step:>6}{minutes:>8}{f['macro']:>8.3f}{f['macro_balanced']:>9.3f}"
            + "".join(f"{f[a]:>9.3f}" for a in COLUMNS))


def meets(faith: dict, target: float, floor: float) -> bool:
    return faith["macro"] >= target and all(faith[a] >= floor for a in ATTRIBUTES if faith[a] == faith[a])


REPO = Path(__file__).resolve().parents[1]


def launch(name: str, overrides: str, args) -> Path:
    """Train one configuration as `make demo` does (2 CPU ranks, one thread each, fold 0); returns its fold folder."""
    out = Path(args.root) / name
    if (out / "fold0" / "test_metrics.json").exists():
        print(f"{name}: reusing the finished run in {out}", flush=True)
        return out / "fold0"
    sets = [f"train.max_steps={args.max_steps}", f"optim.warmup_steps={max(1, args.max_steps // 20)}",
            f"train.checkpoint_every={args.every}", f"train.keep_last={args.max_steps // args.every + 1}",
            f"eval.eval_every_steps={args.max_steps}", *filter(None, overrides.split())]
    command = ["accelerate", "launch", "--config_file", str(REPO / "configs/accelerate/cpu_2ranks.yaml"),
               str(REPO / "launch/train.py"), "--config", args.config, "--fold", "0", "--shards", args.shards,
               "--pretrained", args.base, "--output-dir", str(out)]
    for item in sets:
        command += ["--set", item]
    print(f"{name}: training ({' '.join(sets)})", flush=True)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CXRDIST_PROGRESS": "off"}
    log_path = Path(args.root) / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        if subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"{name}: training failed, see {log_path}")
    print(f"{name}: trained in {(time.perf_counter() - started) / 60:.1f} min (log {log_path})", flush=True)
    return out / "fold0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="a fold folder (runs/NAME/foldK); repeat")
    parser.add_argument("--launch", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="train this configuration first: the preset plus space-separated key=value overrides; repeat")
    parser.add_argument("--config", default="demo", help="preset or YAML the launched runs start from")
    parser.add_argument("--max-steps", type=int, default=1000, help="optimizer steps of each launched run")
    parser.add_argument("--every", type=int, default=100, help="checkpoint (and score) every N steps of a launched run")
    parser.add_argument("--root", default="runs/curve", help="where launched runs go (runs/curve/NAME)")
    parser.add_argument("--shards", required=True)
    parser.add_argument("--base", default=None, help="also score this base model (the step-0 row)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--target", type=float, default=0.90, help="macro faithfulness whose training time is printed")
    parser.add_argument("--attribute-floor", type=float, default=0.80,
                        help="...reached only when every primary attribute also scores at least this")
    args = parser.parse_args()
    if not args.run and not args.launch:
        parser.error("give --run FOLDER or --launch NAME=OVERRIDES")
    if args.launch and not args.base:
        parser.error("--launch trains LoRA on --base: give it")
    setup_logging()
    for item in args.launch:
        name, _, overrides = item.partition("=")
        args.run.append(str(launch(name, overrides, args)))
    opts = EvaluateOptions(split="test", max_samples=args.samples, steps=args.steps, scheduler="dpm++",
                           guidance=args.guidance, batch_size=args.batch_size, diversity_prompts=0)
    print(f"{'run':<14}{'step':>6}{'min':>8}{'macro':>8}{'balanced':>9}" + "".join(f"{short(a):>9}" for a in COLUMNS))
    results: dict[str, dict] = {}
    if args.base:
        results["base"] = {"step": 0, "minutes": 0.0, **evaluate_model_path(args.base, args.shards, opts, progress=False)}
        print(row("base", "0", "0.0", results["base"]), flush=True)
    reached: dict[str, str] = {}
    for run in map(Path, args.run):
        label = run.parent.name
        times = seconds_at_steps(run)
        reached[label] = "not reached"
        for ckpt in checkpoints(run):
            step = json.loads((ckpt / CHECKPOINT_MARKER).read_text())["step"]
            minutes = times[step] / 60 if step in times else float("nan")
            result = evaluate_model_path(str(ckpt), args.shards, opts, progress=False)
            results[f"{label}/{ckpt.name}"] = {"step": step, "minutes": round(minutes, 2), **result}
            print(row(label, str(step), f"{minutes:.1f}", result), flush=True)
            if reached[label] == "not reached" and meets(result["faithfulness"], args.target, args.attribute_floor):
                reached[label] = f"{minutes:.1f} training minutes (step {step})"
    for label, when in reached.items():
        print(f"{label}: macro >= {args.target:.2f} with every primary attribute >= {args.attribute_floor:.2f}: {when}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
