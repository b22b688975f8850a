"""Where a demo training step's time goes, and what the base's attention layout costs, side by side in one run.

Each variant is the demo preset's LoRA on a base UNet whose only difference is its number of attention heads
(the same weights: a head count splits the same projections differently), trained through the trainer's own
`Trainer.train_step` on one rank with one thread, as each of `make demo`'s ranks runs. The text cache is warmed
first, so the figures are a step of the second epoch on; the first epoch also encodes each new report once
(printed separately). torch.profiler groups the step's operator time by kind.

    python benchmarks/step_profile.py --shards shards/phantom --base models/phantom-base [--heads 8 2] [--steps 10]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# operator name fragment -> kind; the first match wins, the rest is "other (elementwise, copies, ...)"
KINDS = (("scaled_dot_product", "attention"), ("softmax", "attention"), ("bmm", "attention"),
         ("convolution", "convolution"), ("conv2d", "convolution"),
         ("aten::mm", "matmul (projections, LoRA, feed-forward)"), ("addmm", "matmul (projections, LoRA, feed-forward)"),
         ("linear", "matmul (projections, LoRA, feed-forward)"),
         ("norm", "normalisation"), ("gelu", "activations"), ("silu", "activations"),
         ("Optimizer.step", "optimizer step"), ("adamw", "optimizer step"))


def kind_of(name: str) -> str:
    lowered = name.lower()
    for fragment, kind in KINDS:
        if fragment.lower() in lowered:
            return kind
    return "other (elementwise, copies, ...)"


def base_with_heads(base: Path, heads: int, root: Path) -> Path:
    """A copy of `base` whose UNet splits its attention into `heads` heads (legacy `attention_head_dim`)."""
    out = root / f"heads{heads}"
    shutil.copytree(base, out)
    config_path = out / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["attention_head_dim"] = heads
    config_path.write_text(json.dumps(config, indent=2))
    return out


def measure(shards: str, base: Path, run_dir: Path, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from cxrdist.config import load_config
    from cxrdist.train.data import ShardData
    from cxrdist.train.steps import endless_batches
    from cxrdist.train.trainer import Trainer

    cfg = load_config("demo", [f"data.shards={shards}", f"model.pretrained={base}", "eval.eval_every_steps=0",
                               "train.checkpoint_every=0"])
    trainer = Trainer(cfg, fold=0, run_dir=run_dir, data_factory=functools.partial(ShardData, cfg, 0))
    trainer.model.train()
    batches_iter = endless_batches(trainer.data)  # into the next epoch where one is short of 2 * steps + 2
    batches = [next(batches_iter) for _ in range(2 * steps + 2)]
    started = time.perf_counter()
    for batch in batches:  # warm the text cache: every report of these batches, and the empty prompt
        for prompts in (batch["prompts"], [""]):
            trainer.model.encode_text(*trainer.encoder.token_ids(prompts))
    encode_ms = (time.perf_counter() - started) * 1000 / trainer.model.text_cache.misses
    for i in range(2):
        trainer.train_step(batches[i], i)
    started = time.perf_counter()
    for i in range(2, steps + 2):
        trainer.train_step(batches[i], i)
    step_ms = (time.perf_counter() - started) * 1000 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps + 2, 2 * steps + 2):
            trainer.train_step(batches[i], i)
    by_kind: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1000 / steps
    return {"step_ms": step_ms, "encode_ms": encode_ms, "batch": len(batches[0]["prompts"]), "kinds": dict(by_kind)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="the demo's shard set (cached latents)")
    parser.add_argument("--base", required=True)
    parser.add_argument("--heads", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    import torch

    from cxrdist.logging_utils import quiet_dependencies

    torch.set_num_threads(1)
    quiet_dependencies()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for heads in args.heads:
            base = base_with_heads(Path(args.base), heads, Path(tmp))
            results[heads] = measure(args.shards, base, Path(tmp) / f"run{heads}", args.steps)
    kinds = sorted({k for r in results.values() for k in r["kinds"]}, key=lambda k: -results[args.heads[0]]["kinds"].get(k, 0))
    print(f"\none rank, one thread, batch {results[args.heads[0]]['batch']}, mean of {args.steps} steps")
    print(f"{'':44}" + "".join(f"{f'{h} heads':>18}" for h in args.heads))
    print(f"{'training step, ms':44}" + "".join(f"{r['step_ms']:>18.0f}" for r in results.values()))
    for kind in kinds:
        cells = "".join(f"{r['kinds'].get(kind, 0):>10.0f} ({r['kinds'].get(kind, 0) / r['step_ms']:>4.0%})"
                        for r in results.values())
        print(f"  {kind:42}{cells}")
    print(f"{'first sight of a report: encoder, ms/report':44}" + "".join(f"{r['encode_ms']:>18.1f}" for r in results.values()))
    first = results[args.heads[0]]["step_ms"]
    for heads in args.heads[1:]:
        print(f"step time, {args.heads[0]} heads / {heads} heads: {first / results[heads]['step_ms']:.2f}x")


if __name__ == "__main__":
    main()
