"""Each training component decides its own cadence from its config section: the logger (train.log_every), the
validator (eval.eval_every_steps / eval_every_epochs) and the checkpointer (train.checkpoint_every)."""
from __future__ import annotations

from types import SimpleNamespace

from cxrdist.config import load_config
from cxrdist.train.checkpoint import Checkpointer
from cxrdist.train.tracking import MetricsLogger
from cxrdist.train.validation import Evaluator


def _accelerator():
    return SimpleNamespace(register_save_state_pre_hook=lambda hook: None,
                           register_load_state_pre_hook=lambda hook: None,
                           init_trackers=lambda label: None, is_main_process=False)


def _validator(*overrides: str) -> Evaluator:
    return Evaluator(load_config(None, list(overrides)), _accelerator(), data=None, split="fold0", encoder=None,
                     objective=None, base=None, dtype=None)


def test_checkpointer_saves_every_n_steps_or_at_epoch_ends(tmp_path):
    every_3 = Checkpointer(_accelerator(), tmp_path, load_config(None, ["train.checkpoint_every=3"]))
    assert [s for s in range(1, 10) if every_3.due(s, epoch_end=False)] == [3, 6, 9]
    per_epoch = Checkpointer(_accelerator(), tmp_path, load_config(None, ["train.checkpoint_every=0"]))
    assert not per_epoch.due(3, epoch_end=False) and per_epoch.due(4, epoch_end=True)


def test_validator_runs_every_n_steps_or_every_kth_epoch():
    by_steps = _validator("eval.eval_every_steps=4")
    assert [s for s in range(1, 13) if by_steps.due(s, epochs_done=None)] == [4, 8, 12]
    by_epochs = _validator("eval.eval_every_steps=0", "eval.eval_every_epochs=2")
    assert [e for e in range(1, 7) if by_epochs.due(e * 5, epochs_done=e)] == [2, 4, 6]
    assert not by_epochs.due(10, epochs_done=None)  # mid-epoch: never


def test_logger_logs_every_n_steps():
    logger = MetricsLogger(_accelerator(), "tensorboard", {}, every=5)
    assert [s for s in range(1, 16) if logger.due(s)] == [5, 10, 15]


def test_every_component_is_due_at_the_last_step_whatever_its_cadence(tmp_path):
    checkpointer = Checkpointer(_accelerator(), tmp_path, load_config(None, ["train.checkpoint_every=3"]))
    validator = _validator("eval.eval_every_steps=0", "eval.eval_every_epochs=2")
    logger = MetricsLogger(_accelerator(), "tensorboard", {}, every=5)
    assert not checkpointer.due(7, epoch_end=False) and checkpointer.due(7, epoch_end=False, last_step=True)
    assert not validator.due(7, epochs_done=None) and validator.due(7, epochs_done=None, last_step=True)
    assert not logger.due(7) and logger.due(7, last_step=True)
