"""Default sampler (DPM-Solver++, 25 steps) vs the original project's PNDM at 500 steps, side by side; or any
samplers and step counts given as --variant SCHEDULER:STEPS (the first is the reference).

    python benchmarks/sampler_speed.py --model-path runs/demo/fold0/best_model_fold0_epoch* \
        --shards shards/phantom --samples 32
    python benchmarks/sampler_speed.py --model-path ... --shards shards/phantom --samples 128 \
        --variant dpm++:25 --variant dpm++:15 --variant dpm++:10

Both variants generate the same test reports with the same seeds through `cxrdist.evaluation.runs`, in one run,
and the script prints text faithfulness (per attribute and macro), SSIM/PSNR and the time ratio.
"""
from __future__ import annotations

import argparse
import json
import re
import time

from cxrdist.evaluation.runs import EvaluateOptions, evaluate_model, format_table
from cxrdist.logging_utils import setup_logging
from cxrdist.sampling.loading import load_for_sampling

VARIANTS = {"dpm++ 25 steps": ("dpm++", 25), "pndm 500 steps": ("pndm", 500)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--variant", action="append", default=[], metavar="SCHEDULER:STEPS",
                        help="compare these instead (repeat; the first is the reference), e.g. dpm++:25")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    if args.variant:
        if not all(re.fullmatch(r"[\w+]+:\d+", v) for v in args.variant):
            parser.error(f"--variant takes SCHEDULER:STEPS, e.g. dpm++:25 (got {' '.join(args.variant)})")
        variants = {v: (v.split(":")[0], int(v.split(":")[1])) for v in args.variant}
    setup_logging()
    base, meta = load_for_sampling(args.model_path)
    template = (meta or {}).get("prompt_template", "{report}")
    results, seconds = {}, {}
    for name, (scheduler, steps) in variants.items():
        opts = EvaluateOptions(split="test", max_samples=args.samples, steps=steps, scheduler=scheduler,
                               guidance=args.guidance, batch_size=args.batch_size, diversity_prompts=0)
        started = time.perf_counter()
        results[name] = evaluate_model(base, template, args.shards, opts, progress=False)
        seconds[name] = time.perf_counter() - started
    print(format_table(results))
    reference, *others = variants
    for other in others:
        gap = results[other]["faithfulness"]["macro"] - results[reference]["faithfulness"]["macro"]
        print(f"\n{other}: macro faithfulness {gap:+.3f} against {reference} ({args.samples} test reports); "
              f"time {seconds[other] / seconds[reference]:.2f}x ({seconds[other]:.0f} s vs {seconds[reference]:.0f} s)")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"results": results, "seconds": seconds}, handle, indent=2)


if __name__ == "__main__":
    main()
