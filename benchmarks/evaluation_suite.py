"""Do the distribution metrics and the memorization audit rank what they should, and what does the full
evaluation cost next to faithfulness alone?

    python benchmarks/evaluation_suite.py --shards shards/phantom --base models/phantom-base \
        --adapter runs/demo/fold0/best_model_fold0_epoch24 --memorizer runs/memorize/fold0/checkpoints/step_00000600 \
        --memorizer-guidance 1 --samples 512

One table, every row scored against the same real images (the first --samples of the test split) on the same
features (--features, default the offline `pixels`):
- `training images, drawn`: as many training images, encoded and decoded by the base's VAE: what a model that
  memorized them draws, so the audit must flag all of them; their FID is the floor the VAE allows;
- `base`, `adapter`, `memorizer`: one image per test report, the same seeds; `memorizer, its training reports`:
  the memorizer prompted with its own N training reports in turn (--memorizer-train FOLD:N), as an extraction
  attack would;
- `adapter, shuffled reports`: the adapter on the same reports in a shuffled order; the marginal distribution of
  reports is unchanged, so FID should barely move (FID does not see text), while faithfulness falls;
- `noise`: uniform noise images, the ceiling.
The memorization columns use one threshold, calibrated on the test split's real images (their nearest-training
SSIM, quantile --quantile) against the first --pool images of the training folds, both as the base's VAE draws
them (encoded and decoded), as `cxrdist evaluate` does.

The memorizer is an adapter trained long on 8 training images, e.g.
    accelerate launch --config_file configs/accelerate/cpu_2ranks.yaml launch/train.py --config demo --fold 0 \
        --shards shards/phantom --output-dir runs/memorize --set data.max_train_samples=8 train.batch_size=4 \
        --set train.max_steps=600 train.caption_dropout=0 eval.run_test=false
Trained without caption dropout, it has no unconditional branch that classifier-free guidance could use:
--memorizer-guidance (default --guidance) samples its rows, 1 being how an extraction attack would sample it.

--time also runs `run_evaluation` twice on the base, with --metrics faithfulness and with every metric, and prints
the ratio of their wall times (the issue's budget: at most 3x).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import numpy as np

from cxrdist.evaluation.runs import METRICS, EvaluateOptions, read_split, read_training_pool, run_evaluation
from cxrdist.logging_utils import setup_logging
from cxrdist.metrics.distribution import distribution_metrics
from cxrdist.metrics.faithfulness import faithfulness
from cxrdist.metrics.features import feature_extractor, image_batch as batch
from cxrdist.metrics.memorization import AuditSide, calibrated_threshold, memorization_audit
from cxrdist.models.loading import load_base
from cxrdist.sampling.loading import load_for_sampling
from cxrdist.sampling.pipeline import SampleSettings, as_drawn, generate_images


def generate(model_path: str, reports: list[str], args, guidance: float | None = None) -> np.ndarray:
    model, meta = load_for_sampling(model_path)
    guidance = args.guidance if guidance is None else guidance
    settings = SampleSettings(steps=args.steps, scheduler="dpm++", guidance=guidance, batch_size=32)
    return generate_images(model, reports, settings, template=(meta or {}).get("prompt_template", "{report}"),
                           seeds=list(range(len(reports))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", default=None)
    p.add_argument("--memorizer", default=None)
    p.add_argument("--memorizer-train", default="0:8", help="FOLD:N of the memorizer's run (data.max_train_samples=N "
                   "on fold FOLD): it is also prompted with those N training reports, the classic extraction test")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--features", default="pixels")
    p.add_argument("--pool", type=int, default=0, help="training images searched by the audit (0 = all)")
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--memorizer-guidance", type=float, default=None, help="guidance of the memorizer rows [--guidance]")
    p.add_argument("--bootstrap", type=int, default=50)
    p.add_argument("--time", action="store_true", help="also time faithfulness-only against every metric")
    p.add_argument("--time-only", action="store_true", help="only the timing, no table")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args()
    setup_logging()

    table, threshold = ({}, None) if args.time_only else rank_table(args)
    timing = time_evaluations(args) if args.time or args.time_only else None
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"threshold": threshold, "rows": table, "timing": timing, "args": vars(args)}, handle, indent=2)


def rank_table(args) -> tuple[dict, float]:
    real = read_split(args.shards, "test", args.samples)
    pool = read_training_pool(args.shards, "test", args.pool)
    extract = feature_extractor(args.features)
    real_f = extract(batch(real.references))
    base = load_base(args.base)
    side = AuditSide.build(extract, real.references, pool, functools.partial(as_drawn, base))
    threshold = calibrated_threshold(side.heldout["ssim"], args.quantile)
    n = len(real.reports)

    # the last N of the pool as its VAE draws them: what a model that memorized them would draw
    rows: dict[str, np.ndarray] = {"training images, drawn": as_drawn(base, pool[-n:])}
    rows["base"] = generate(args.base, real.reports, args)
    if args.adapter:
        rows["adapter"] = generate(args.adapter, real.reports, args)
        order = np.random.default_rng(0).permutation(n)
        shuffled = generate(args.adapter, [real.reports[i] for i in order], args)
        rows["adapter, shuffled reports"] = shuffled[np.argsort(order)]  # image i now belongs to report i
    if args.memorizer:
        from cxrdist.data.loader import train_reports

        rows["memorizer"] = generate(args.memorizer, real.reports, args, args.memorizer_guidance)
        fold, count = (int(x) for x in args.memorizer_train.split(":"))
        own = train_reports(args.shards, fold, max_samples=count)
        rows["memorizer, its training reports"] = generate(args.memorizer, [own[i % len(own)] for i in range(n)],
                                                           args, args.memorizer_guidance)
    rows["noise"] = np.random.default_rng(1).random(real.references.shape).astype(np.float32)

    table = {}
    for name, images in rows.items():
        feats = extract(batch(images))
        dist = distribution_metrics(real_f, feats, extract.name, bootstrap=args.bootstrap)
        audit = memorization_audit(side.nearest(batch(images), feats), side.heldout, threshold=threshold)
        # faithfulness needs the test reports' own images; the training-report row has other prompts
        macro = float("nan") if "training reports" in name else faithfulness(list(images), real.labels)["macro"]
        table[name] = {**{k: dist[k] for k in ("fid", "fid_se", "kid", "kid_std", "precision", "recall", "density",
                                                "coverage")},
                       "memorized": audit["flagged_fraction"], "median_nearest_ssim": audit["median_nearest_ssim"],
                       "faithfulness_macro": macro}

    print(f"\n{n} test images vs each row; features {extract.name}; {len(pool)} training images searched; "
          f"memorization threshold SSIM {threshold:.3f} (quantile {args.quantile} of the real images' nearest)")
    print(f"{'':<28}{'FID':>16}{'KID':>20}{'prec':>7}{'recall':>7}{'dens':>7}{'cover':>7}{'memorized':>10}"
          f"{'nn SSIM':>8}{'macro':>7}")
    for name, r in table.items():
        print(f"{name:<28}{r['fid']:>9.3f} +-{r['fid_se']:<5.3f}{r['kid']:>11.5f} +-{r['kid_std']:<7.5f}"
              f"{r['precision']:>7.3f}{r['recall']:>7.3f}{r['density']:>7.3f}{r['coverage']:>7.3f}"
              f"{r['memorized']:>10.3f}{r['median_nearest_ssim']:>8.3f}{r['faithfulness_macro']:>7.3f}")

    return table, threshold


def time_evaluations(args) -> dict:
    """Wall time of run_evaluation on the base with --metrics faithfulness, then with every metric."""
    from cxrdist.models.loading import load_base

    base = load_base(args.base)
    opts = EvaluateOptions(split="test", max_samples=args.samples, steps=args.steps, guidance=args.guidance,
                           features=args.features, bootstrap=args.bootstrap, memorization_pool=args.pool)
    seconds = {}
    for label, metrics in (("faithfulness", ("faithfulness",)), ("all", METRICS)):
        started = time.perf_counter()
        run_evaluation(base, "{report}", args.shards, dataclasses.replace(opts, metrics=metrics), progress=False)
        seconds[label] = time.perf_counter() - started
    timing = {**seconds, "ratio": seconds["all"] / seconds["faithfulness"]}
    print(f"\nevaluation of {args.samples} reports on the base: faithfulness only {seconds['faithfulness']:.1f} s, "
          f"every metric {seconds['all']:.1f} s: {timing['ratio']:.2f}x (each reads what it needs)")
    return timing


if __name__ == "__main__":
    main()
