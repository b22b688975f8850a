"""`cxrdist evaluate`: text faithfulness, SSIM/PSNR and diversity of a model on a shard split."""
from __future__ import annotations

from pathlib import Path

import click

from cxrdist.cli_options import config_options, friendly_errors


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
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", "out_json", default=None, type=click.Path(dir_okay=False), help="Write results as JSON here.")
@config_options
@friendly_errors
def evaluate(model_paths, base, shards, split, max_samples, steps, scheduler, guidance, seed, out_json, config,
             overrides) -> None:
    """Generate one image per report of a split and score how well the images follow the text."""
    from cxrdist.config import load_config
    from cxrdist.errors import InputError
    from cxrdist.evaluation.runs import EvaluateOptions, evaluate_model_path, format_table
    from cxrdist.logging_utils import setup_logging

    setup_logging()
    if max_samples < 0:
        raise InputError("--max-samples must be >= 0 (0 = the whole split)")
    if out_json and Path(out_json).is_dir():
        raise InputError(f"--out {out_json} is a directory: give a .json file path")
    cfg = load_config(config, overrides)
    opts = EvaluateOptions(split=split, max_samples=max_samples, steps=steps or cfg.sample.steps,
                           scheduler=scheduler or cfg.sample.scheduler,
                           guidance=cfg.sample.guidance if guidance is None else guidance, seed=seed,
                           batch_size=cfg.sample.batch_size)
    results = {}
    for path in model_paths:
        results[path] = evaluate_model_path(path, shards, opts, base_override=base)
    click.echo(format_table(results))
    if out_json:
        from cxrdist.fileio import write_json_atomic

        out = Path(out_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, results)
        click.echo(f"results written to {out}")
