"""train.report_to: which of accelerate's trackers a run logs to, refused early when a package is missing."""
from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from cxrdist.config import load_config
from cxrdist.errors import ConfigError
from cxrdist.progress import ENV
from cxrdist.train import tracking
from cxrdist.train import trainer as trainer_module
from cxrdist.train.tracking import MetricsLogger, log_with, require_tracker_packages, tracker_names
from support.fakes import make_trainer, reset_accelerate

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")


def names(entries) -> list[str]:
    """Tracker names of a log_with list: strings / LoggerType values, or tracker objects."""
    from accelerate.tracking import GeneralTracker

    return [e.name if isinstance(e, GeneralTracker) else str(e.value if hasattr(e, "value") else e) for e in entries]


def test_report_to_is_tensorboard_by_default_and_checked_by_the_config():
    assert load_config(None).train.report_to == "tensorboard"
    for value in ("tensorboard", "wandb", "mlflow", "all"):
        assert load_config(None, [f"train.report_to={value}"]).train.report_to == value
    with pytest.raises(ConfigError, match=r"'train.report_to' must be tensorboard, wandb, mlflow or all"):
        load_config(None, ["train.report_to=neptune"])


def test_report_to_names_the_trackers():
    assert tracker_names("tensorboard") == ["tensorboard"]
    assert tracker_names("wandb") == ["wandb"]
    assert tracker_names("mlflow") == ["mlflow"]
    assert tracker_names("all") == ["tensorboard", "wandb", "mlflow"]


def test_a_missing_tracker_package_is_one_line_with_the_pip_command():
    only_tensorboard = {"tensorboard"}.__contains__
    assert require_tracker_packages("tensorboard", only_tensorboard) == ["tensorboard"]
    with pytest.raises(ConfigError) as wandb:
        require_tracker_packages("wandb", only_tensorboard)
    assert str(wandb.value) == "train.report_to=wandb needs the wandb package: pip install wandb"
    with pytest.raises(ConfigError) as both:
        require_tracker_packages("all", only_tensorboard)
    assert str(both.value) == "train.report_to=all needs the wandb and mlflow packages: pip install wandb mlflow"
    with pytest.raises(ConfigError, match=r"needs the tensorboard, wandb and mlflow packages: pip install tensorboard"):
        require_tracker_packages("all", lambda package: False)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_wandb_without_wandb_stops_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError) as raised:
        make_trainer(tmp_path, "train.report_to=wandb")
    assert str(raised.value) == "train.report_to=wandb needs the wandb package: pip install wandb"
    assert "wandb" not in sys.modules  # looked up, never imported


def test_the_chosen_trackers_reach_the_accelerator(tmp_path, monkeypatch):
    from cxrdist.train.accel import build_accelerator

    monkeypatch.setattr(tracking, "_installed", lambda package: True)  # as if wandb and mlflow were installed
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    run_dir = tmp_path / "myrun" / "fold2"
    entries = log_with("all", run_dir)
    assert names(entries) == ["tensorboard", "wandb", "mlflow"]
    wandb, mlflow = entries[1], entries[2]
    assert (wandb.run_name, wandb.init_kwargs) == ("cxrdist", {"name": "myrun/fold2", "group": "myrun"})
    assert (mlflow.run_name, names(log_with("mlflow", run_dir))) == ("myrun/fold2", ["mlflow"])
    acc = build_accelerator(load_config(None, ["train.report_to=all"]), run_dir)
    assert names(acc.log_with) == ["tensorboard", "wandb", "mlflow"]
    reset_accelerate()
    assert names(build_accelerator(load_config(None), run_dir).log_with) == ["tensorboard"]


class FakeTracker:
    def __init__(self, name: str, images: bool):
        self.name, self.calls = name, []
        if images:
            self.log_images = lambda values, step: self.calls.append(("images", values, step))

    def store_init_configuration(self, values):
        self.calls.append(("config", values))

    def log(self, values, step=None):
        self.calls.append(("log", values, step))


def test_wandb_and_mlflow_get_the_config_the_grids_they_can_take_and_the_final_metrics():
    wandb, mlflow = FakeTracker("wandb", images=True), FakeTracker("mlflow", images=False)
    logged = []
    acc = SimpleNamespace(init_trackers=lambda label: None, is_main_process=True, trackers=[wandb, mlflow],
                          log=lambda values, step: logged.append((values, step)))
    logger = MetricsLogger(acc, "tensorboard", {"train": {"batch_size": 4, "report_to": "all"}})
    assert logger._writer is None  # no TensorBoard among them: nothing asks for it
    logger.scalars({"train/loss": 0.5, "train/loss_scale": None}, step=3)
    logger.image("val/samples", np.full((2, 8, 8), 0.5, dtype=np.float32), step=3)
    logger.hparams({"best_value": 0.25, "note": "text"})
    assert logged == [({"train/loss": 0.5}, 3)]
    config = ("config", {"train.batch_size": 4, "train.report_to": "all"})
    assert wandb.calls[0] == config and mlflow.calls[0] == config
    kind, values, step = wandb.calls[1]
    sheet = values["val/samples"][0]
    assert (kind, step, sheet.dtype, sheet.ndim) == ("images", 3, np.uint8, 2) and sheet[3, 3] == 128
    assert wandb.calls[2] == mlflow.calls[1] == ("log", {"hparam/best_value": 0.25}, None)
    assert len(mlflow.calls) == 2  # no images: accelerate's MLflow tracker has no log_images


def test_resuming_with_another_tracker_is_allowed(tmp_path):
    from cxrdist.models.lora import CHECKPOINT_CONFIG, CHECKPOINT_MARKER
    from cxrdist.train.checkpoint import check_resumable

    load_config(None, ["train.batch_size=4"]).save(tmp_path / CHECKPOINT_CONFIG)
    (tmp_path / CHECKPOINT_MARKER).write_text(json.dumps({"step": 3, "fold": 1}))
    check_resumable(tmp_path, load_config(None, ["train.batch_size=4", "train.report_to=mlflow"]), 1)
    with pytest.raises(ConfigError, match=r"train.batch_size: 4 -> 8"):
        check_resumable(tmp_path, load_config(None, ["train.batch_size=8", "train.report_to=mlflow"]), 1)


def test_the_default_run_writes_tensorboard_events_and_plain_progress_lines(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv(ENV, "lines")
    trainer = make_trainer(tmp_path, "train.max_steps=2", "eval.num_grid_prompts=2")
    trainer.fit()
    trainer.close()
    events = EventAccumulator(str(tmp_path / "fold0" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert "val/samples" in events.Tags()["images"]
    err = capsys.readouterr().err
    steps = [line for line in err.splitlines() if line.startswith("train: ")]
    assert "\r" not in err and steps[-1].startswith("train: step 2/2 (100%)") and "done in" in steps[-1]


def test_gpu_memory_lines_carry_the_reserve_and_the_devices_own_count(monkeypatch):
    """On a GPU the logged memory is the allocation peak, the allocator's reserve peak and the device's whole use;
    on the CPU the process's peak resident memory."""
    import torch

    from cxrdist.train.tracking import memory_scalars

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 12 * gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (9 * gib, 24 * gib))
    assert memory_scalars(torch.device("cuda", 0)) == {"train/peak_memory_mb": 10240.0,
                                                       "train/peak_memory_reserved_mb": 12288.0,
                                                       "train/device_memory_used_mb": 15360.0}
    cpu = memory_scalars(torch.device("cpu"))
    assert list(cpu) == ["train/peak_memory_mb"] and cpu["train/peak_memory_mb"] > 10


def test_scalar_events_read_back_in_order_and_a_missing_tag_is_empty(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from cxrdist.train.tracking import scalar_events

    with SummaryWriter(str(tmp_path)) as writer:
        for step, value in ((1, 0.5), (2, 0.25), (3, 0.125)):
            writer.add_scalar("train/loss", value, step)
    assert [(e.step, e.value) for e in scalar_events(tmp_path, "train/loss")] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert scalar_events(tmp_path, "val/val_loss") == []


def test_the_lr_logged_at_step_s_is_the_rate_step_s_used(tmp_path):
    """The schedule steps after the optimizer; lr/* at step s is the rate of step s, not of s + 1 (warm-up over 4
    steps of a constant schedule: (s) / 5 of the peak at step s, 1-based)."""
    reset_accelerate()
    trainer = make_trainer(tmp_path, "train.max_steps=6", "optim.scheduler=constant", "optim.warmup_steps=4",
                           "optim.lr_unet=1e-3", "lora.train_text_encoder=false")
    trainer.fit()
    trainer.close()
    reset_accelerate()
    logged = {e.step: e.value for e in tracking.scalar_events(tmp_path / "fold0" / "tensorboard", "lr/unet")}
    assert logged == pytest.approx({s: 1e-3 * min(1.0, s / 5) for s in range(1, 7)})
