"""`cxrdist evaluate`: text faithfulness, image and distribution metrics, a memorization audit and classifier
agreement of one or more models on a shard split, as JSON and a self-contained HTML report."""
from __future__ import annotations

from pathlib import Path

import click

from cxrdist.cli_options import config_options, friendly_errors
from cxrdist.commands.sample import apply_sample_flags


@click.command()
@click.option("--model-path", "model_paths", multiple=True, required=True,
              help="Adapter folder/.zip, training checkpoint (checkpoints/step_N) or full pipeline folder "
                   "(repeat to compare models side by side).")
@click.option("--base", default=None, help="Override the base recorded in an adapter.")
@click.option("--shards", required=True, type=click.Path(file_okay=False),
              help="Shard set with index.json: a folder, a URL or a pipe: command.")
@click.option("--split", default="test", show_default=True, help="test, or foldK.")
@click.option("--max-samples", default=200, show_default=True, type=int, help="First N reports of the split (0 = all).")
@click.option("--steps", default=None, type=int, help="Sampling steps (default: sample.steps).")
@click.option("--scheduler", default=None, help="Sampler (default: sample.scheduler).")
@click.option("--guidance", default=None, type=float, help="Guidance scale (default: sample.guidance).")
@click.option("--seed", default=None, type=int, help="Image i of the split gets seed + i (default: sample.seed).")
@click.option("--metrics", "metrics", default="faithfulness,image,diversity", show_default=True,
              help="Comma list of faithfulness, image, diversity, fid, kid, prdc, memorization, classifier; or all.")
@click.option("--features", default="pixels", show_default=True,
              help="Features for fid/kid/prdc/memorization: pixels[:SIDE], inception, txv:WEIGHTS, "
                   "raddino:PATH_OR_HUB_ID.")
@click.option("--classifier", "classifier_name", default="reader", show_default=True,
              help="For --metrics classifier: reader (phantoms) or txv:WEIGHTS.")
@click.option("--bootstrap", default=50, show_default=True, type=click.IntRange(0, 10_000),
              help="FID resamples for its standard error and 95% interval.")
@click.option("--memorization-pool", default=None, type=click.IntRange(0),
              help="Training images the memorization audit searches (first N of the training folds; 0 = all; "
                   "default: eval.memorization_pool).")
@click.option("--memorization-quantile", default=0.99, show_default=True, type=click.FloatRange(0.5, 1, max_open=True),
              help="Threshold = this quantile of the split's real images' nearest-training SSIM.")
@click.option("--out", "out_json", default=None, type=click.Path(dir_okay=False), help="Write results as JSON here.")
@click.option("--report", "report_html", default=None, type=click.Path(dir_okay=False),
              help="Write a self-contained HTML report here.")
@config_options
@friendly_errors
def evaluate(model_paths, base, shards, split, max_samples, steps, scheduler, guidance, seed, metrics, features,
             classifier_name, bootstrap, memorization_pool, memorization_quantile, out_json, report_html, config,
             overrides) -> None:
    """Generate one image per report of a split and score the images: against their text, and as a set against
    the split's real images and the training images."""
    from cxrdist.cli_options import load_command_config
    from cxrdist.errors import InputError
    from cxrdist.evaluation.runs import EvaluateOptions, format_table, parse_metrics, run_model_path
    from cxrdist.logging_utils import setup_logging
    from cxrdist.sampling.pipeline import check_seed_range

    setup_logging()
    if max_samples < 0:
        raise InputError("--max-samples must be >= 0 (0 = the whole split)")
    for flag, target in (("--out", out_json), ("--report", report_html)):
        if target and Path(target).is_dir():
            raise InputError(f"{flag} {target} is a directory: give a file path")
    # The sampler flags are `cxrdist sample`'s, checked by the same rules (--guidance -5, --steps 0 are refused
    # by both), and the seed by the same range check, all before a model loads.
    # One source for each setting: a flag given here, else the config's (sample.* for the sampler and the seed,
    # eval.memorization_pool for the audit), as `cxrdist sample` and training's validation read them.
    cfg = load_command_config(config, overrides, command="evaluate", reads=("sample", "eval"))
    cfg = apply_sample_flags(cfg, {"steps": steps, "scheduler": scheduler, "guidance": guidance, "seed": seed})
    check_seed_range(cfg.sample.seed, max(max_samples, 1), setting=None)
    pool = cfg.eval.memorization_pool if memorization_pool is None else memorization_pool
    opts = EvaluateOptions(split=split, max_samples=max_samples, steps=cfg.sample.steps,
                           scheduler=cfg.sample.scheduler, guidance=cfg.sample.guidance, seed=cfg.sample.seed,
                           batch_size=cfg.sample.batch_size, metrics=parse_metrics(metrics), features=features,
                           classifier=classifier_name, bootstrap=bootstrap, memorization_pool=pool,
                           memorization_quantile=memorization_quantile)
    evaluated = {path: run_model_path(path, shards, opts, base_override=base) for path in model_paths}
    results = {path: ev.result for path, ev in evaluated.items()}
    click.echo(format_table(results))
    if report_html:
        from cxrdist.evaluation.report import write_report

        click.echo(f"report written to {write_report(evaluated, report_html)}")
    if out_json:
        from cxrdist.fileio import write_json_atomic

        out = Path(out_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, results)
        click.echo(f"results written to {out}")
