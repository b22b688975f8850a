"""Resident memory across the folds of one `--all-folds` run: the trainer releasing each fold's model, optimizer,
EMA, validation set and caches when the fold ends (what cxrdist does) against keeping them until the process
ends (what `Trainer.close` did before), side by side, each variant in its own process.

    python benchmarks/fold_memory.py [--folds 3] [--n 300] [--pretrained preset:tiny] [--steps 4]

Prints the RSS after each fold and how much it grew per fold, for both variants. CPU, one process.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(args) -> None:
    """One variant, in this process: every fold of a fresh run, RSS after each."""
    from cxrdist.config import load_config
    from cxrdist.logging_utils import setup_logging
    from cxrdist.train import run as run_module
    from cxrdist.train.trainer import Trainer

    setup_logging(logging.WARNING)
    if args.variant == "keep":
        kept = []

        def keep_close(trainer) -> None:  # the accelerator lets go of the engine; the trainer keeps the rest
            trainer.accelerator.free_memory()
            trainer.logger.close()
            kept.append(trainer)

        Trainer.close = keep_close
    after = []
    train_fold = run_module.train_fold

    def counted(*a, **kw):
        result = train_fold(*a, **kw)
        after.append(rss_mib())
        return result

    run_module.train_fold = counted
    cfg = load_config("dev", [f"data.shards={args.shards}", f"model.pretrained={args.pretrained}",
                              "data.image_size=64", f"train.max_steps={args.steps}", "train.batch_size=4",
                              "eval.num_metric_images=0", "eval.num_grid_prompts=0", "eval.max_eval_samples=0", "eval.k_folds=0",
                              f"eval.eval_every_steps={args.steps}", "train.log_every=1000",
                              f"train.output_dir={args.out}", "train.text_cache_size=4096"])
    start = rss_mib()
    run_module.run_all_folds(cfg)
    print(json.dumps({"start": start, "after": after}))


def build_shards(n: int, folds: int, where: Path) -> Path:
    from cxrdist.data.shard import build_shards as build
    from cxrdist.data.sources import source_class

    out = where / "phantom"
    build(source_class("phantom")(n=n, size=64, seed=0), out, size=64, folds=folds, test_fraction=0.1, seed=0,
          shard_size=100, workers=2, progress=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pretrained", default="preset:tiny")
    parser.add_argument("--variant", choices=["release", "keep"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return measure(args)
    with tempfile.TemporaryDirectory() as tmp:
        shards = build_shards(args.n, args.folds, Path(tmp))
        rows = {}
        for variant in ("release", "keep"):
            command = [sys.executable, __file__, "--variant", variant, "--shards", str(shards),
                       "--out", str(Path(tmp) / variant), "--pretrained", args.pretrained, "--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "CXRDIST_PROGRESS": "off"})
            if done.returncode != 0:
                sys.exit(f"{variant}: failed\n{done.stderr[-3000:]}")
            rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"RSS (MiB) after each of {args.folds} folds, {args.steps} steps each, base {args.pretrained}")
    print(f"{'variant':<10}{'start':>9}" + "".join(f"{'fold ' + str(k):>9}" for k in range(args.folds))
          + f"{'growth/fold':>13}")
    growth = {}
    for variant, row in rows.items():
        after = row["after"]
        growth[variant] = (after[-1] - after[0]) / max(1, len(after) - 1)
        print(f"{variant:<10}{row['start']:>9.0f}" + "".join(f"{v:>9.0f}" for v in after) + f"{growth[variant]:>13.1f}")
    if growth["release"] > 0:
        print(f"growth per fold, keep / release: {growth['keep'] / growth['release']:.1f}x")


if __name__ == "__main__":
    main()
