"""Entry points behind launch/train.py: one fold, or every fold with a cross-validation summary.

Run folders: `<root>/fold{k}/` where `<root>` is `--output-dir` or `train.output_dir/<run_name or config
hash>`; the CV summary goes to `<root>/cv_summary.json` and `<root>/cv/` (TensorBoard).
All input checks run here or in the Trainer before any model is loaded, and fail with one line; those that
depend on what the run folder holds run once the Trainer owns the folder (cxrdist.train.checkpoint.run_folder_lock).

`--resume auto` (what launch/slurm/train.sbatch passes to a requeued job) continues from the latest complete
checkpoint when the run folder has one and starts the run otherwise.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional

from cxrdist.config import Config
from cxrdist.errors import InputError
from cxrdist.sampling.output import read_prompts
from cxrdist.train.checkpoint import check_resumable
from cxrdist.train.preemption import StopRequested, announce, resume_command, signal_name
from cxrdist.train.trainer import FoldResult, Trainer

log = logging.getLogger(__name__)


def run_root(cfg: Config, output_dir: Optional[str] = None) -> Path:
    return Path(output_dir) if output_dir else Path(cfg.train.output_dir) / (cfg.train.run_name or cfg.hash())


def fold_dir(root: Path, fold: int) -> Path:
    return Path(root) / f"fold{fold}"


def preflight(cfg: Config, fold: int, run_dir: Path, resume: Optional[str]) -> None:
    """Cheap checks with one-line errors: shards and fold, base model path, output folder, resume config. (Whether
    the folder already holds a run is checked by the Trainer, under the folder's lock.)"""
    from cxrdist.data.index import load_index
    from cxrdist.models.loading import resolve_base_path

    index = load_index(cfg.data.shards)
    index.check_fold(fold)
    index.check_image_size(cfg.data.image_size)
    resolve_base_path(cfg.model.pretrained, cfg.model.revision)
    if cfg.eval.prompts_file:
        read_prompts((), cfg.eval.prompts_file)  # readable, non-empty, valid JSON lines
    if cfg.eval.metric != "val_loss" and cfg.eval.num_metric_images < 1:
        raise InputError(f"eval.metric={cfg.eval.metric} needs generated images: set eval.num_metric_images >= 1")
    _check_writable(run_dir)
    if resume not in (None, "latest", "auto"):
        check_resumable(Path(resume), cfg, fold)


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe.{os.getpid()}"  # one per process: every rank runs this check
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"output folder {run_dir} is not writable ({exc.strerror}): choose another --output-dir") from None


def train_fold(cfg: Config, fold: int, *, run_dir: Path, resume: Optional[str] = None) -> FoldResult:
    """Train one fold from a fresh adapter, export the best checkpoint, evaluate it on the test split."""
    from cxrdist.train.data import ShardData

    preflight(cfg, fold, run_dir, resume)
    factory = functools.partial(ShardData, cfg, fold)
    trainer = Trainer(cfg, fold=fold, run_dir=run_dir, data_factory=factory, resume=resume,
                      resume_command=resume_command(run_dir.parent))
    try:
        if trainer.accelerator.is_main_process:
            cfg.save(run_dir / "config.yaml")
        result = trainer.fit()
    finally:
        trainer.close()
    if trainer.accelerator.is_main_process:
        print_summary(cfg, result)
    return result


def print_summary(cfg: Config, result: FoldResult) -> None:
    best = f"{result.best_value:.5g} at epoch {result.best_epoch}" if result.best_value is not None else "none"
    lines = [f"fold {result.fold}: {result.steps} steps{' (stopped early)' if result.stopped_early else ''}, "
             f"{result.images_per_s:.3g} images/s over the whole fit (all ranks; the text prefill, validations and "
             "checkpoints included; TensorBoard's train/images_per_s is the rate between two log lines)",
             f"  best {cfg.eval.metric}: {best} -> {result.best_path}",
             "  test: " + (", ".join(f"{k}={v:.5g}" for k, v in result.test_metrics.items()) or "not run"),
             f"  run folder: {result.run_dir} (tensorboard --logdir {result.run_dir})"]
    print("\n".join(lines), flush=True)


def run(cfg: Config, fold: int, *, output_dir: Optional[str] = None, resume: Optional[str] = None) -> FoldResult:
    return train_fold(cfg, fold, run_dir=fold_dir(run_root(cfg, output_dir), fold), resume=resume)


def run_all_folds(cfg: Config, *, output_dir: Optional[str] = None, resume: Optional[str] = None) -> dict:
    """Every fold from a fresh adapter, then mean ± std of every metric (JSON + TensorBoard)."""
    from cxrdist.data.index import load_index
    from cxrdist.train.folds import finished_result, write_cv_summary

    if resume not in (None, "latest", "auto"):
        # One checkpoint belongs to one fold; given to every fold, it would resume fold 0 and refuse the rest.
        raise InputError(f"--all-folds --resume {resume}: a checkpoint path names one fold; use --resume latest "
                         "(each fold continues from its own latest checkpoint), or --fold K --resume PATH")
    root = run_root(cfg, output_dir)
    folds = load_index(cfg.data.shards).folds
    results = []
    for fold in range(folds):
        run_dir = fold_dir(root, fold)
        done = finished_result(run_dir) if resume else None
        # --resume latest continues the interrupted fold; folds not started yet start fresh: what "auto" does
        results.append(done or train_fold(cfg, fold, run_dir=run_dir, resume="auto" if resume else None))
        if results[-1].stop_signal and fold + 1 < folds:
            _stop_between_folds(results[-1], root)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    return write_cv_summary(cfg, root, results)


def _stop_between_folds(result: FoldResult, root: Path) -> None:
    """A signal of train.preempt_signals came while a fold was finishing: stop before the next fold starts."""
    message = (f"stopped by {signal_name(result.stop_signal)} after fold {result.fold} finished: continue with: "
               f"{resume_command(root)}")
    if int(os.environ.get("RANK", "0")) == 0:
        announce(message)
    stop = StopRequested(message, result.stop_signal)
    stop.reported = True
    raise stop
