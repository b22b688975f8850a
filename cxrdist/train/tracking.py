"""Metrics logging through accelerate's TensorBoard tracker (scalars, image grids, hparams, text).

Everything is a no-op on non-main ranks (accelerate's trackers only exist there).
"""
from __future__ import annotations

import json
import resource
import sys
from typing import Any

import numpy as np
import torch

from cxrdist.sampling.output import contact_sheet

TRACKER_NAME = "tensorboard"


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


class MetricsLogger:
    """One interface for the trainer: scalars, images, text, hparams, close."""

    def __init__(self, accelerator, run_label: str, config: dict, every: int = 1):
        self.accelerator, self.every = accelerator, every
        accelerator.init_trackers(run_label)
        self._writer = accelerator.get_tracker(TRACKER_NAME, unwrap=True) if accelerator.is_main_process else None
        self._hparams = flat_hparams(config)

    def due(self, step: int) -> bool:
        """Training scalars every `every` optimizer steps (train.log_every); evaluations log whenever they run."""
        return step % self.every == 0

    def scalars(self, values: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None}
        if clean:
            self.accelerator.log(clean, step=step)

    def image(self, tag: str, images: np.ndarray, step: int) -> None:
        """N x H x W images in [0, 1], logged as one contact sheet (the same as a sampling run's grid.png)."""
        if self._writer is not None:
            self._writer.add_image(tag, contact_sheet(images, columns=4), global_step=step, dataformats="HW")
            self._writer.flush()

    def text(self, tag: str, value: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, value, global_step=step)

    def hparams(self, metrics: dict[str, float]) -> None:
        """hparams with the final metrics, so runs compare in TensorBoard's HPARAMS tab."""
        if self._writer is not None:
            clean = {f"hparam/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self._writer.add_hparams(self._hparams, clean, run_name=".")
            self._writer.flush()

    def close(self) -> None:
        """Finish this run's trackers. The process group stays up, because the next fold of --all-folds
        trains in the same processes; it is destroyed once, at exit (accel._end_process_group_at_exit)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
