"""What each rank of a full fine-tune (train.method=full) writes of the trained state, per launcher, side by side.

Runs the real trainer for 2 steps of a tiny preset under one process, DDP, DeepSpeed ZeRO-2 and ZeRO-3 (bf16, 2 CPU
ranks for the three multi-rank launchers) and reads each run's step-2 checkpoint: the bytes of model and optimizer
state each rank wrote, per trained parameter, and the ratio to one process. This is docs/full-finetuning.md's
memory table checked where a CPU can check it: a checkpoint holds what a rank keeps of the trained state (weights
or fp32 masters and AdamW's two moments), not activations or gathered layers.

    python benchmarks/full_memory.py [--preset tiny] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "configs" / "accelerate"
LAUNCHERS = {"one process": None, "DDP": "cpu_2ranks.yaml", "ZeRO-2": "zero2.yaml", "ZeRO-3": "zero3.yaml"}
SETS = ["train.method=full", "lora.train_text_encoder=false", "train.mixed_precision=bf16", "data.image_size=64",
        "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=2", "eval.eval_every_steps=2",
        "eval.num_metric_images=0", "eval.num_grid_prompts=0", "eval.max_eval_samples=1", "eval.run_test=false",
        "data.max_train_samples=16", "data.shuffle_buffer=1"]


def shards(folder: Path) -> Path:
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources import source_class

    out = folder / "shards"
    build_shards(source_class("phantom")(n=60, size=64, seed=0), out, size=64, folds=2, test_fraction=0.2, seed=0,
                 shard_size=32, workers=1, progress=False)
    return out


def train(name: str, config: str | None, preset: str, shard_dir: Path, out: Path) -> tuple[str, float]:
    prefix = [sys.executable]
    if config is not None:
        prefix += ["-m", "accelerate.commands.launch", "--config_file", str(ACCEL / config)]
    cmd = prefix + [str(REPO / "launch" / "train.py"), "--fold", "1", "--shards", str(shard_dir), "--output-dir",
                    str(out), "--set", f"model.pretrained=preset:{preset}"]
    for s in SETS:
        cmd += ["--set", s]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"full_memory: {name} failed:\n{proc.stderr[-3000:]}")
    return proc.stderr, time.time() - started


def per_rank_bytes(checkpoint: Path, world: int) -> list[int]:
    """Bytes of model and optimizer state each rank wrote: DeepSpeed's files carry the rank in their name; the rest
    (accelerate's optimizer.bin, the trainer's trained.safetensors, ZeRO-2's whole bf16 module) rank 0 writes."""
    sizes = [0] * world
    for file in checkpoint.rglob("*"):
        if not file.is_file():
            continue
        rank = re.search(r"zero_pp_rank_(\d+)_", file.name)
        if rank:
            sizes[int(rank.group(1))] += file.stat().st_size
        elif file.name in ("optimizer.bin", "trained.safetensors", "mp_rank_00_model_states.pt"):
            sizes[0] += file.stat().st_size
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    from cxrdist.models.loading import load_base, preset_folder

    count = sum(p.numel() for p in load_base(str(preset_folder(args.preset))).unet.parameters())
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="full-memory-"))
    shard_dir = shards(root)
    rows = []
    for name, config in LAUNCHERS.items():
        run = root / name.replace(" ", "-")
        log, seconds = train(name, config, args.preset, shard_dir, run)
        world = 1 if config is None else 2
        sizes = per_rank_bytes(run / "fold1" / "checkpoints" / "step_00000002", world)
        rows.append({"launcher": name, "ranks": world, "bytes_per_rank": sizes,
                     "bytes_per_param_per_rank": [round(s / count, 2) for s in sizes], "seconds": round(seconds, 1)})
    one = max(rows[0]["bytes_per_rank"])
    print(f"{args.preset}: {count:,} trained parameters (the whole UNet), bf16, step-2 checkpoint; "
          f"bytes of model + optimizer state written by each rank")
    print(f"{'launcher':12} {'ranks':>5}  {'bytes per rank':>24}  {'B/param per rank':>18}  "
          f"{'largest rank / one process':>26}")
    for row in rows:
        sizes = " / ".join(f"{s:,}" for s in row["bytes_per_rank"])
        per = " / ".join(f"{b:g}" for b in row["bytes_per_param_per_rank"])
        ratio = max(row["bytes_per_rank"]) / one
        print(f"{row['launcher']:12} {row['ranks']:>5}  {sizes:>24}  {per:>18}  {ratio:>26.2f}")
    summary = {"preset": args.preset, "trained": count, "rows": rows}
    (root / "full_memory.json").write_text(json.dumps(summary, indent=2))
    print(f"results: {root / 'full_memory.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
