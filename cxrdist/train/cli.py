"""LoRA training entry point: `accelerate launch launch/train.py --fold 3 [options]` or
`accelerate launch -m cxrdist.train --fold 3` (the same command, from an installed package).

Thin on purpose: parse, build the config, call `cxrdist.train.run`. Without a GPU the same command runs on
CPU (the accelerator is built with cpu=True and a gloo process group; see configs/accelerate/).

Exit status: 0 when the run finished; 1 with a one-line error; 128 + the signal's number (143 SIGTERM, 138
SIGUSR1, 130 SIGINT) when a signal of train.preempt_signals stopped it with a checkpoint -- what a process that
signal killed reports, so nothing downstream mistakes a stopped run for a finished one (cxrdist.train.preemption).
"""
from __future__ import annotations

import os
import signal

import click

from cxrdist.cli_options import config_options, friendly_errors
from cxrdist.errors import InputError, report_now

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_overrides(overrides, pretrained, preset, shards) -> list[str]:
    """Shortcut flags become ordinary `--set` overrides, applied after the config file."""
    extra = list(overrides)
    if pretrained and preset:
        raise click.UsageError("give either --pretrained or --preset, not both")
    if pretrained or preset:
        extra.append(f"model.pretrained={pretrained or 'preset:' + preset}")
    if shards:
        extra.append(f"data.shards={shards}")
    return extra


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--fold", type=int, default=None, help="Fold held out for validation (0..K-1).")
@click.option("--all-folds", is_flag=True, help="Train every fold from a fresh adapter and write a CV summary.")
@config_options
@click.option("--pretrained", default=None, help="Base model folder or hub id (sets model.pretrained).")
@click.option("--preset", default=None, help="Named tiny base instead, e.g. tiny (sets model.pretrained=preset:NAME).")
@click.option("--shards", default=None,
              help="Shard set: a folder, a URL (https://, s3://, gs://, ...) or a pipe: command (sets data.shards).")
@click.option("--output-dir", default=None, help="Run folder (default train.output_dir/<run_name or config hash>).")
@click.option("--resume", default=None, metavar="latest|auto|PATH",
              help="Continue from the latest or a given checkpoint; auto: from the latest when there is one, "
                   "else start.")
@click.option("--zip", "export_zip", is_flag=True, help="Also write the best model as a .zip (sets train.export_zip).")
@friendly_errors
def main(fold, all_folds, config, overrides, pretrained, preset, shards, output_dir, resume, export_zip):
    """Fine-tune a base on one fold (or all folds) of a shard set: LoRA adapters, or every weight of the denoiser
    with train.method=full."""
    from cxrdist.config import load_config
    from cxrdist.logging_utils import setup_logging

    if (fold is None) == (not all_folds):
        raise click.UsageError("give --fold K or --all-folds")
    setup_logging()
    extra = build_overrides(overrides, pretrained, preset, shards) + (["train.export_zip=true"] if export_zip else [])
    cfg = load_config(config, extra)

    from cxrdist.train.preemption import StopRequested
    from cxrdist.train.run import run, run_all_folds

    try:
        if all_folds:
            run_all_folds(cfg, output_dir=output_dir, resume=resume)
        else:
            run(cfg, fold, output_dir=output_dir, resume=resume)
    except StopRequested as stop:  # its line is out (main process); the checkpoint is complete
        raise SystemExit(stop.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C (or SIGINT left out of train.preempt_signals): nothing saved
        report_now(InputError("interrupted: stopped at once, without saving the step in progress; continue from "
                              "the last complete checkpoint with --resume latest"))
        raise SystemExit(128 + signal.SIGINT) from None
