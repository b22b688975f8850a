"""Metrics logging through accelerate's trackers: TensorBoard (the default), wandb, MLflow (`train.report_to`).

Scalars reach every chosen tracker through `accelerator.log`. Image grids, hparams and text go to TensorBoard's
writer when TensorBoard is one of them; wandb gets the grids too, and wandb / MLflow get the config at the start
and the final metrics at the end. Everything is a no-op on non-main ranks (accelerate's trackers only exist there).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cxrdist.errors import ConfigError
from cxrdist.sampling.output import contact_sheet

TRACKER_NAME = "tensorboard"
TRACKERS = ("tensorboard", "wandb", "mlflow")  # what train.report_to=all means; each one's package has its name
PROJECT = "cxrdist"  # the wandb project ($WANDB_PROJECT wins) and MLflow experiment ($MLFLOW_EXPERIMENT_NAME wins)


def tracker_names(report_to: str) -> list[str]:
    """train.report_to -> the trackers it names: one of TRACKERS, or all of them."""
    return list(TRACKERS) if report_to == "all" else [report_to]


def require_tracker_packages(report_to: str, installed: Callable[[str], bool] | None = None) -> list[str]:
    """The trackers of `report_to`, after checking (without importing them) that their packages are installed:
    accelerate would otherwise drop a missing one without a word. ConfigError, one line, naming the pip command."""
    installed = installed or _installed
    names = tracker_names(report_to)
    missing = [name for name in names if not installed(name)]
    if missing:
        what = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        raise ConfigError(f"train.report_to={report_to} needs the {what} package{'s' if len(missing) > 1 else ''}: "
                          f"pip install {' '.join(missing)}")
    return names


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a half-imported module without a spec is there
        return package in sys.modules


def log_with(report_to: str, run_dir: str | Path) -> list:
    """What `Accelerator(log_with=...)` gets for `report_to` (packages checked first).

    TensorBoard goes by name: accelerate writes it under the run folder, in `<run_dir>/tensorboard`. wandb and MLflow
    go as tracker objects, because accelerate would name their project after that folder name ("tensorboard");
    here the project is PROJECT and the run is named `<run>/<fold>`, grouped by run in wandb. Neither is imported
    here: accelerate imports it when the main process starts the tracker.
    """
    from accelerate.tracking import MLflowTracker, WandBTracker

    run_dir = Path(run_dir)
    label = f"{run_dir.parent.name}/{run_dir.name}"
    entries: list = []
    for name in require_tracker_packages(report_to):
        if name == "wandb":
            entries.append(WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=label,
                                        group=run_dir.parent.name))
        elif name == "mlflow":
            entries.append(MLflowTracker(PROJECT, run_name=label))
        else:
            entries.append(name)
    return entries


def flat_hparams(config: dict) -> dict[str, Any]:
    """Config as `section.key` -> scalar (TensorBoard hparams take only scalars; lists become strings)."""
    out: dict[str, Any] = {}
    for section, values in config.items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def memory_scalars(device: torch.device) -> dict[str, float]:
    """Memory figures logged with every training line, in MiB. On a GPU, what decides whether a batch fits is more
    than torch's peak allocation: the caching allocator's peak reserve (allocation + fragmentation) and the device's
    whole use as the driver sees it (every process, the CUDA context, library workspaces)."""
    if device.type != "cuda":
        return {"train/peak_memory_mb": peak_memory_mb(device)}
    free, total = torch.cuda.mem_get_info(device)
    return {"train/peak_memory_mb": peak_memory_mb(device),
            "train/peak_memory_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
            "train/device_memory_used_mb": (total - free) / 2**20}


def scalar_events(logdir: str | Path, tag: str) -> list:
    """TensorBoard's ScalarEvents (step, wall_time, value) of `tag` in the event files under `logdir`, in the order
    they were written; empty when the tag was never logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return list(acc.Scalars(tag)) if tag in acc.Tags().get("scalars", []) else []


class MetricsLogger:
    """One interface for the trainer: scalars, images, text, hparams, close."""

    def __init__(self, accelerator, run_label: str, config: dict, every: int = 1):
        self.accelerator, self.every = accelerator, every
        accelerator.init_trackers(run_label)
        trackers = list(accelerator.trackers) if accelerator.is_main_process else []
        tensorboard = [t for t in trackers if t.name == TRACKER_NAME]
        self._writer = tensorboard[0].tracker if tensorboard else None
        self._others = [t for t in trackers if t.name != TRACKER_NAME]  # wandb, MLflow
        self._hparams = flat_hparams(config)
        for tracker in self._others:
            tracker.store_init_configuration(self._hparams)  # TensorBoard's hparams come at the end, with metrics

    def due(self, step: int, *, last_step: bool = False) -> bool:
        """Training scalars every `every` optimizer steps (train.log_every) and at the run's last step (`last_step`);
        evaluations log whenever they run."""
        return last_step or step % self.every == 0

    def scalars(self, values: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None}
        if clean:
            self.accelerator.log(clean, step=step)

    def image(self, tag: str, images: np.ndarray, step: int) -> None:
        """N x H x W images in [0, 1], logged as one contact sheet (the same as a sampling run's grid.png).

        TensorBoard and wandb get it (wandb's tracker takes a list of arrays; an 8-bit one leaves wandb no value
        range to guess). MLflow does not: accelerate's MLflow tracker has no `log_images`, only `log_figure` for
        matplotlib / plotly figures, and calling mlflow.log_image directly would bypass the tracker this logger
        works through."""
        if self._writer is None and not any(hasattr(t, "log_images") for t in self._others):
            return
        sheet = contact_sheet(images, columns=4)
        if self._writer is not None:
            self._writer.add_image(tag, sheet, global_step=step, dataformats="HW")
            self._writer.flush()
        for tracker in self._others:
            if hasattr(tracker, "log_images"):
                tracker.log_images({tag: [np.round(sheet * 255).astype(np.uint8)]}, step=step)

    def text(self, tag: str, value: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, value, global_step=step)

    def hparams(self, metrics: dict[str, float]) -> None:
        """hparams with the final metrics, so runs compare in TensorBoard's HPARAMS tab; wandb and MLflow, which got
        the config at the start, get the metrics as scalars."""
        clean = {f"hparam/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._writer is not None:
            self._writer.add_hparams(self._hparams, clean, run_name=".")
            self._writer.flush()
        if clean:
            for tracker in self._others:
                tracker.log(clean)

    def close(self) -> None:
        """Finish this run's trackers. The process group stays up, because the next fold of --all-folds
        trains in the same processes; it is destroyed once, at exit (accel._end_process_group_at_exit)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()


class Window:
    """Running loss / throughput of training between two log lines, and over the whole fit."""

    def __init__(self):
        self.start = self.t0 = time.perf_counter()
        self.total_images = 0
        self.reset()

    def reset(self) -> None:
        self.losses, self.images, self.t0 = [], 0, time.perf_counter()
        self.last_grad_norm = float("nan")

    def add(self, n: int) -> None:
        self.images += n
        self.total_images += n

    def record(self, logs: dict[str, Any]) -> None:
        if math.isfinite(logs["loss"]):  # an inf/NaN loss is counted in the train state, not averaged in
            self.losses.append(logs["loss"])
        if logs["stepped"]:
            self.last_grad_norm = logs["grad_norm"]

    def mean_loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))

    def rate(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.t0)

    def overall_rate(self) -> float:
        return self.total_images / max(1e-9, time.perf_counter() - self.start)
