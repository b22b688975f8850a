"""The parts the training loop asks: the trainer state's counters and epoch arithmetic, the optimizer-step policy
(stepped, or skipped and why), the best model's state, the rule that collectives never run in code only the
main process runs, and the resume check that a checkpoint continues with the batching it was trained with."""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cxrdist.config import load_config
from cxrdist.errors import ConfigError
from cxrdist.train import distributed
from cxrdist.train.best import BestModel
from cxrdist.train.ranks import CollectiveOnOneRank, all_ranks, in_main_process_only, main_process_only
from cxrdist.train.step_policy import NONFINITE_NORM, OptimizerStep
from cxrdist.train.trainer import Trainer, TrainState


def test_train_state_position_and_epochs():
    state = TrainState()
    for _ in range(7):
        state.consumed_micro_batch()
    assert state.position(micro_per_epoch=3) == (2, 1) and state.epoch(3) == 3
    assert state.epochs_done_if_ended(3) is None
    state.consumed_micro_batch(), state.consumed_micro_batch()
    assert state.epochs_done_if_ended(3) == 3 and state.epoch(3) == 3  # the 9th micro-batch ended epoch 3
    assert TrainState().epoch(3) == 1
    state.took_step(), state.skipped_step(), state.counted_nonfinite_loss()
    assert (state.step, state.skipped_steps, state.nonfinite_losses) == (1, 1, 1)


def test_a_snapshot_takes_the_fields_of_the_saved_state_only():
    state = TrainState()
    state.snapshot(best_path="runs/x/best", stopped_early=True, time_budget={"budget_s": 60})
    assert state.state_dict()["best_path"] == "runs/x/best" and state.stopped_early
    with pytest.raises(KeyError, match="no field"):
        state.snapshot(best="runs/x/best")


def test_a_collective_inside_main_process_only_code_raises_at_once():
    calls = []

    @all_ranks
    def gather():
        calls.append(1)
        return "gathered"

    assert gather() == "gathered"
    with main_process_only():
        assert in_main_process_only()
        with pytest.raises(CollectiveOnOneRank, match="gather runs collectives on every rank"):
            gather()
    assert not in_main_process_only() and calls == [1]
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, state=SimpleNamespace(deepspeed_plugin=None),
                                  is_main_process=True)
    with main_process_only(), pytest.raises(CollectiveOnOneRank):
        distributed.lora_state_dicts(accelerator, torch.nn.Linear(2, 2))  # refused before it touches the module


def test_every_gather_and_every_all_ranks_method_is_marked():
    for function in (distributed.trained_named_state, distributed.trained_fp32_values, distributed.lora_state_dicts,
                     distributed.live_trained_state, distributed.set_fp32_masters, distributed.gathered_for_update):
        assert getattr(function, "all_ranks", False), function.__name__
    named = [name for name, _ in inspect.getmembers(Trainer, inspect.isfunction) if name.endswith("_all_ranks")]
    assert len(named) >= 10
    for name in [*named, "train_step"]:
        assert getattr(getattr(Trainer, name), "all_ranks", False), name


def _policy(max_grad_norm: float = 1.0):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, OptimizerStep(accelerator, model, optimizer, scheduler, max_grad_norm)


def test_a_step_with_inf_gradients_is_skipped_with_its_reason_and_the_schedule_waits():
    accelerator, model, step = _policy()
    before = model.weight.detach().clone()
    accelerator.backward(model(torch.ones(1, 4)).sum() * float("inf"))
    outcome = step()
    assert outcome.synced and not outcome.stepped and outcome.skipped_because == NONFINITE_NORM
    assert not math.isfinite(outcome.grad_norm) and torch.equal(model.weight, before)
    assert step.step_lrs == [0.1] and step.lr_scheduler.get_last_lr() == [0.1]  # the schedule did not move
    accelerator.backward(model(torch.ones(1, 4)).sum())
    outcome = step()
    assert outcome.stepped and outcome.skipped_because == "" and outcome.grad_norm == pytest.approx(math.sqrt(5))
    assert step.step_lrs == [0.1] and step.lr_scheduler.get_last_lr() == [0.05]  # this step used 0.1
    assert not torch.equal(model.weight, before) and step.loss_scale() is None


def test_the_best_model_state_round_trips_through_the_trainer_state(tmp_path):
    cfg = load_config(None, ["eval.metric=val_loss", "eval.patience=2"])
    accelerator = SimpleNamespace(is_main_process=False, wait_for_everyone=lambda: None)
    best = BestModel(accelerator, cfg, tmp_path, fold=1, base=None, spec={})
    for step, loss in ((1, 0.5), (2, 0.6), (3, 0.7)):
        improved = best.consider_all_ranks({"val_loss": loss}, step=step, epoch=step, weights_all_ranks=lambda: None,
                                           module=None, ema=None)
        assert improved == (step == 1)
    assert best.stopped and best.path == tmp_path / "best_model_fold1_epoch1"
    state = TrainState()
    state.snapshot(**best.state_dict())
    again = BestModel(accelerator, cfg, tmp_path, fold=1, base=None, spec={})
    again.load_state_dict(state.state_dict())
    assert again.stopped and again.path == best.path and again.stopper.best == 0.5 and again.stopper.bad_evals == 2


def test_resuming_with_another_world_size_is_refused_naming_both_values():
    from cxrdist.train.trainer import check_same_batching

    saved = {"world_size": 2, "effective_batch": 8}
    check_same_batching(Path("ckpt"), saved, {"world_size": 2, "effective_batch": 8})
    check_same_batching(Path("ckpt"), {"fold": 0}, {"world_size": 4, "effective_batch": 16})  # older checkpoints
    with pytest.raises(ConfigError, match=r"trained with world size 2, this launch has 4.*same number of processes \(2\)"):
        check_same_batching(Path("ckpt"), saved, {"world_size": 4, "effective_batch": 16})
