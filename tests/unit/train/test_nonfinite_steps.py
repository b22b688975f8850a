"""Overflowing and non-finite steps: refused precisions, loss scaling, skipped steps that do not count.

fp16 cannot run on this CPU (accelerate builds no fp16 autocast or GradScaler without CUDA, and DeepSpeed's CPU
backend has no fp16), so the loss-scaling test drives accelerate's real GradScaler path -- `backward` on the
scaled loss, `AcceleratedOptimizer.step` through `scaler.step` / `update`, `optimizer_step_was_skipped` -- with
fp32 compute: the trainer's bookkeeping around it is what a GPU fp16 run executes.
"""
from __future__ import annotations

import pytest
import torch

from cxrdist.errors import ConfigError
from cxrdist.train import faults
from cxrdist.train import trainer as trainer_module
from support.fakes import make_trainer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")


def overflow_gradients_at(trainer, micro_steps: set[int]):
    """Make one adapter gradient inf in the given micro-steps (a finite loss whose gradients overflow, as in
    fp16 with too large a loss scale). Returns the list the current micro-step is written into."""
    current = [0]
    live = trainer.accelerator.unwrap_model(trainer.model)
    param = next(p for n, p in live.named_parameters() if "lora_B" in n)
    param.register_hook(lambda g: torch.full_like(g, float("inf")) if current[0] in micro_steps else g)
    original = trainer.train_step

    def step(batch, micro):
        current[0] = micro
        return original(batch, micro)

    trainer.train_step = step
    return current


def lora_values(trainer) -> torch.Tensor:
    live = trainer.accelerator.unwrap_model(trainer.model)
    return torch.cat([p.detach().flatten().float() for n, p in live.named_parameters() if "lora_" in n])


def test_fp16_without_cuda_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on CUDA")
    monkeypatch.setattr(trainer_module, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=r"train.mixed_precision=fp16 needs a CUDA GPU.*use train.mixed_precision=bf16"):
        make_trainer(tmp_path, "train.mixed_precision=fp16")


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_an_overflowing_step_without_a_loss_scaler_is_skipped_and_not_counted(tmp_path, precision):
    """fp32 / bf16 autocast: nothing below the trainer skips a step with inf gradients, so the trainer does
    (the reduced gradient norm decides, the same on every rank); the step counter and LR schedule ignore it."""
    trainer = make_trainer(tmp_path, f"train.mixed_precision={precision}", "train.max_steps=3", "optim.warmup_steps=0")
    overflow_gradients_at(trainer, {1})
    result = trainer.fit()
    assert (result.steps, trainer.state.skipped_steps, trainer.state.micro_step) == (3, 1, 4)
    assert trainer.lr_scheduler.scheduler.last_epoch == 3  # stepped once per optimizer step taken
    assert torch.isfinite(lora_values(trainer)).all()
    trainer.close()


def test_the_fp16_loss_scaler_skips_an_overflow_halves_its_scale_and_the_step_does_not_count(tmp_path, monkeypatch):
    real_build = trainer_module.build_accelerator

    def with_grad_scaler(cfg, run_dir):
        accelerator = real_build(cfg, run_dir)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
        return accelerator

    monkeypatch.setattr(trainer_module, "build_accelerator", with_grad_scaler)
    trainer = make_trainer(tmp_path, "train.max_steps=3", "optim.warmup_steps=0")
    assert trainer.accelerator.scaler is not None and trainer.loss_scale() == 1024.0
    overflow_gradients_at(trainer, {1})
    result = trainer.fit()
    assert (result.steps, trainer.state.skipped_steps, trainer.state.micro_step) == (3, 1, 4)
    assert trainer.loss_scale() == 512.0  # the scaler backed off once, for the one overflow
    assert trainer.lr_scheduler.scheduler.last_epoch == 3
    assert torch.isfinite(lora_values(trainer)).all()
    trainer.close()


def test_a_non_finite_loss_stops_with_the_step_and_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.INF_LOSS_ENV, "2")
    trainer = make_trainer(tmp_path, "train.max_steps=4", "train.checkpoint_every=1")
    with pytest.raises(trainer_module.NonFiniteLossError) as raised:
        trainer.fit()
    message = str(raised.value)
    assert "the training loss is inf" in message and "at step 2" in message
    assert "the last complete checkpoint is step_00000002" in message and "train.nonfinite_loss=skip" in message
    assert raised.value.reported  # printed where it was raised: a launcher stopping us cannot swallow it
    trainer.close()


def test_a_non_finite_loss_with_skip_is_counted_and_its_step_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.INF_LOSS_ENV, "1")
    trainer = make_trainer(tmp_path, "train.max_steps=3", "train.nonfinite_loss=skip")
    result = trainer.fit()
    assert result.steps == 3
    assert (trainer.state.nonfinite_losses, trainer.state.skipped_steps, trainer.state.micro_step) == (1, 1, 4)
    assert torch.isfinite(lora_values(trainer)).all()
    trainer.close()
