"""Trainer parts without a training loop: early stopping, optimizers, objective, resume checks, CV summary."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from cxrdist.config import load_config
from cxrdist.errors import ConfigError
from cxrdist.train.early_stop import EarlyStopper


def test_early_stopping_min_counts_patience_in_evaluations():
    s = EarlyStopper("val_loss", "min", patience=2)
    stops = []
    for epoch, value in enumerate([1.0, 0.8, 0.85, 0.79, 0.9, 0.95, 0.5], start=1):
        s.update(value, step=epoch * 10, epoch=epoch)
        stops.append(s.should_stop)
    # improvement at 1, 2, 4; two bad evaluations (5, 6) -> stop after epoch 6, not before
    assert stops == [False, False, False, False, False, True, False]
    assert (s.best, s.best_epoch, s.best_step) == (0.5, 7, 70)


def test_early_stopping_max_mode_like_the_original_ssim_and_state_round_trip():
    s = EarlyStopper("ssim", "max", patience=1)
    assert s.update(0.3, step=1, epoch=1) and not s.update(0.3, step=2, epoch=2)  # equal is not better
    assert s.should_stop and s.best == 0.3 and s.best_epoch == 1
    t = EarlyStopper("ssim", "max", patience=1)
    t.load_state_dict(s.state_dict())
    assert t == s
    assert not EarlyStopper("x", "min", patience=0).should_stop
    nan = EarlyStopper("x", "min", patience=5)
    assert not nan.update(float("nan"), step=1, epoch=1)  # a NaN never becomes the best


def _tiny_model(tiny_base_path, train_text=True):
    from cxrdist.config import LoraConfig
    from cxrdist.models.diffusion import LoraDiffusionModel
    from cxrdist.models.loading import load_base
    from cxrdist.models.lora import attach_lora

    base = load_base(tiny_base_path)
    attach_lora(base, LoraConfig(train_text_encoder=train_text))
    return base, LoraDiffusionModel(base.unet, base.text_encoder, train_text)


def test_optimizer_groups_have_their_own_lr_and_decay(tiny_base_path):
    from cxrdist.train.optim import build_optimizer

    cfg = load_config(None, ["optim.lr_unet=1e-3", "optim.lr_text=2e-4", "optim.weight_decay_text=0.5"])
    _, model = _tiny_model(tiny_base_path)
    opt = build_optimizer(model, cfg.optim, "cpu")
    (unet, text) = opt.param_groups
    assert (unet["name"], unet["lr"], unet["weight_decay"]) == ("unet", 1e-3, cfg.optim.weight_decay_unet)
    assert (text["name"], text["lr"], text["weight_decay"]) == ("text", 2e-4, 0.5)
    _, frozen_text = _tiny_model(tiny_base_path, train_text=False)
    assert [g["name"] for g in build_optimizer(frozen_text, cfg.optim, "cpu").param_groups] == ["unet"]


def test_adamw8bit_builds_or_says_clearly_why_not(tiny_base_path, monkeypatch):
    from cxrdist.train.optim import build_optimizer

    cfg = load_config(None, ["optim.name=adamw8bit"])
    _, model = _tiny_model(tiny_base_path)
    opt = build_optimizer(model, cfg.optim, "cpu")
    assert type(opt).__name__ == "AdamW8bit"  # bitsandbytes runs on CPU in this stack
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes.*optim.name=adamw"):
        build_optimizer(model, cfg.optim, "cpu")


def test_adamw8bit_takes_one_real_step_on_the_training_device_when_built(tiny_base_path, monkeypatch):
    """A bitsandbytes that imports and builds its optimizer but has no kernel for the device (a missing CUDA binary)
    is refused in one line when the optimizer is built, before the first training step."""
    import bitsandbytes as bnb

    from cxrdist.train.optim import build_optimizer

    cfg = load_config(None, ["optim.name=adamw8bit"])
    _, model = _tiny_model(tiny_base_path)
    stepped_on = []
    real_step = bnb.optim.AdamW8bit.step

    def recording_step(self, *args, **kwargs):
        stepped_on.extend(p.device.type for g in self.param_groups for p in g["params"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", recording_step)
    build_optimizer(model, cfg.optim, "cpu")
    assert stepped_on == ["cpu"]  # the probe's one tensor; the model's adapters were not stepped

    def missing_kernel(self, *args, **kwargs):
        raise RuntimeError("CUDA binary for this GPU not found\nlong traceback text")

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", missing_kernel)
    with pytest.raises(ConfigError) as refused:
        build_optimizer(model, cfg.optim, "cpu")
    message = str(refused.value)
    assert "\n" not in message and "cannot run on cpu" in message and "CUDA binary for this GPU not found" in message
    assert "optim.name=adamw" in message
    assert all(p.grad is None for p in model.parameters())  # nothing of the model was touched


def test_objective_uses_the_bases_ddpm_schedule_and_prediction_type():
    from cxrdist.models.diffusion import DiffusionObjective

    conf = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "v_prediction", "_class_name": "PNDMScheduler"}
    obj = DiffusionObjective(conf, snr_gamma=5.0)
    assert type(obj.scheduler).__name__ == "DDPMScheduler" and obj.prediction_type == "v_prediction"
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    noisy, target = obj.noisy_inputs(x0, noise, t)
    assert torch.allclose(target, obj.scheduler.get_velocity(x0, noise, t))
    ac = obj.scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    assert torch.allclose(obj.snr_weights(t), torch.clamp(snr, max=5.0) / (snr + 1))
    assert torch.allclose(obj.per_sample_loss(target + 1, target, t), obj.snr_weights(t))
    assert torch.allclose(obj.per_sample_loss(target + 1, target, t, weighted=False), torch.ones(3))  # validation
    eps = DiffusionObjective({**conf, "prediction_type": "epsilon"})
    assert torch.equal(eps.noisy_inputs(x0, noise, t)[1], noise)
    assert torch.allclose(eps.per_sample_loss(noise + 1, noise, t), torch.ones(3))  # no weighting when gamma=0


def test_noise_offset_changes_per_channel_means_only_when_set():
    from cxrdist.models.diffusion import DiffusionObjective

    conf = {"num_train_timesteps": 1000, "prediction_type": "epsilon"}
    x = torch.zeros(64, 4, 16, 16)
    plain = DiffusionObjective(conf).sample_noise(tuple(x.shape), torch.Generator().manual_seed(0))
    offset = DiffusionObjective(conf, noise_offset=0.5).sample_noise(tuple(x.shape), torch.Generator().manual_seed(0))
    assert plain.mean(dim=(2, 3)).std() < 0.1 < offset.mean(dim=(2, 3)).std()


def test_timestep_bias_draws_the_chosen_part_of_the_schedule_more_often():
    import functools

    from cxrdist.errors import ModelError
    from cxrdist.models.diffusion import DiffusionObjective, timestep_weights

    conf = {"num_train_timesteps": 1000, "prediction_type": "epsilon"}

    def draws(**bias):
        weighting = functools.partial(timestep_weights, **bias) if bias else None
        obj = DiffusionObjective(conf, timestep_weighting=weighting)
        g = torch.Generator().manual_seed(0)
        return torch.cat([obj.sample_timesteps(1, g) for _ in range(4000)])

    uniform = draws()
    assert torch.equal(uniform, draws(bias="later", multiplier=1.0))  # a multiplier of 1 is the uniform draw
    assert 0.2 < (uniform >= 750).float().mean() < 0.3
    later = draws(bias="later", multiplier=3.0, portion=0.25)  # 3 x 0.25 / (3 x 0.25 + 0.75) = 0.5
    assert 0.46 < (later >= 750).float().mean() < 0.54 and later.min() >= 0 and later.max() <= 999
    earlier = draws(bias="earlier", multiplier=3.0, portion=0.25)
    assert 0.46 < (earlier < 250).float().mean() < 0.54
    ranged = draws(bias="range", multiplier=5.0, begin=200, end=400)  # 5 x 0.2 / (5 x 0.2 + 0.8) = 0.56
    assert 0.52 < ((ranged >= 200) & (ranged < 400)).float().mean() < 0.6
    with pytest.raises(ModelError, match="timestep_bias_begin/end = 200/1200.*num_train_timesteps"):
        DiffusionObjective(conf, timestep_weighting=functools.partial(
            timestep_weights, bias="range", multiplier=2.0, begin=200, end=1200))


def test_resume_refuses_a_checkpoint_of_another_config_naming_the_keys(tmp_path):
    import json

    from cxrdist.models.lora import CHECKPOINT_CONFIG, CHECKPOINT_MARKER
    from cxrdist.train.checkpoint import check_resumable

    old = load_config(None, ["train.batch_size=4", "lora.unet_rank=4"])
    old.save(tmp_path / CHECKPOINT_CONFIG)
    (tmp_path / CHECKPOINT_MARKER).write_text(json.dumps({"step": 3, "fold": 1}))
    check_resumable(tmp_path, load_config(None, ["train.batch_size=4", "lora.unet_rank=4", "train.log_every=1"]), 1)
    new = load_config(None, ["train.batch_size=8", "lora.unet_rank=4"])
    with pytest.raises(ConfigError, match=r"train.batch_size: 4 -> 8"):
        check_resumable(tmp_path, new, 1)
    with pytest.raises(ConfigError, match="fold 1, not fold 2"):
        check_resumable(tmp_path, old, 2)


def test_cv_summary_mean_and_sample_std():
    from cxrdist.train.folds import mean_std

    out = mean_std([{"a": 1.0, "b": 2.0}, {"a": 3.0}, {"a": 5.0, "b": float("nan")}])
    assert out["a"] == {"mean": 3.0, "std": 2.0, "n": 3}
    assert out["b"] == {"mean": 2.0, "std": 0.0, "n": 1}
    assert math.isclose(mean_std([{"x": 0.1}, {"x": 0.3}])["x"]["std"], math.sqrt(0.02))


def test_frozen_text_cache_is_exact_bounded_and_hits(tiny_base_path):
    import torch

    from cxrdist.models.diffusion import LoraDiffusionModel
    from cxrdist.models.text import encode_ids, tokenize

    base, _ = _tiny_model(tiny_base_path, train_text=False)
    model = LoraDiffusionModel(base.unet, base.text_encoder, False, text_cache_size=3)
    ids, mask = tokenize(base.tokenizer, ["Normal heart.", "Small left effusion.", "Normal heart.", "Right nodule."])
    with torch.no_grad():
        fresh = torch.cat([encode_ids(base.text_encoder, ids[i : i + 1], mask[i : i + 1]) for i in range(4)])
    first = model.encode_text(ids, mask)
    assert torch.equal(first, fresh)
    assert (model.text_cache.misses, model.text_cache.hits) == (3, 1)  # the repeated report came from the cache
    again = model.encode_text(ids[[1, 0]], mask[[1, 0]])
    assert torch.equal(again, fresh[[1, 0]]) and model.text_cache.hits == 3
    model.encode_text(*tokenize(base.tokenizer, ["Bilateral effusions.", "Severe cardiomegaly."]))
    assert len(model.text_cache.store) == 3  # bounded: the oldest entries were dropped
    assert LoraDiffusionModel(base.unet, base.text_encoder, True, text_cache_size=3).text_cache is None


def test_text_cache_prefill_on_one_rank_holds_exactly_what_cache_misses_compute(tiny_base_path):
    import torch

    from cxrdist.models.diffusion import LoraDiffusionModel
    from cxrdist.models.text import tokenize
    from cxrdist.train.text_prefill import distinct_prompts, prefill_text_cache

    base, _ = _tiny_model(tiny_base_path, train_text=False)
    reports = ["Normal heart.", "Small left effusion.", "Normal heart.", "Right nodule."]
    prompts = distinct_prompts(reports, "chest x-ray: {report}", with_empty=True)
    assert prompts == ["chest x-ray: Normal heart.", "chest x-ray: Small left effusion.", "chest x-ray: Right nodule.", ""]
    assert "" not in distinct_prompts(reports, "{report}", with_empty=False)

    class OneRank:
        num_processes, process_index, device = 1, 0, torch.device("cpu")

    filled = LoraDiffusionModel(base.unet, base.text_encoder, False, text_cache_size=8)
    assert prefill_text_cache(OneRank(), filled.text_cache, base.text_encoder, base.tokenizer, prompts) == 4
    ids, mask = tokenize(base.tokenizer, prompts)
    contexts = filled.encode_text(ids, mask)
    assert (filled.text_cache.hits, filled.text_cache.misses) == (4, 0)  # nothing left to encode
    fresh = LoraDiffusionModel(base.unet, base.text_encoder, False, text_cache_size=8)
    assert torch.equal(contexts, fresh.encode_text(ids, mask))  # bit for bit what first sight computes
    bounded = LoraDiffusionModel(base.unet, base.text_encoder, False, text_cache_size=2)
    assert prefill_text_cache(OneRank(), bounded.text_cache, base.text_encoder, base.tokenizer, prompts) == 2
    assert len(bounded.text_cache.store) == 2


def test_closing_a_trainer_releases_its_model_optimizer_and_validation_set(tmp_path):
    """What `--all-folds` relies on to start each fold from the memory the first one started from."""
    import gc
    import weakref

    from support.fakes import make_trainer, reset_accelerate

    trainer = make_trainer(tmp_path, "train.max_steps=1")
    trainer.fit()
    held = [weakref.ref(x) for x in (trainer.base.unet, trainer.base.text_encoder, trainer.optimizer,
                                     trainer.validator)]
    trainer.close()
    reset_accelerate()
    gc.collect()
    assert [ref() is None for ref in held] == [True] * len(held)


def test_preempt_signals_default_to_the_schedulers_and_ctrl_c_and_refuse_others_in_one_line():
    assert load_config(None, []).train.preempt_signals == ["SIGTERM", "SIGUSR1", "SIGINT"]
    assert load_config(None, ["train.preempt_signals=[usr2, SIGTERM, term]"]).train.preempt_signals == \
        ["SIGUSR2", "SIGTERM"]
    assert load_config(None, ["train.preempt_signals=[]"]).train.preempt_signals == []
    for bad in ("[SIGKILL]", "[SIGTERN]", "[SIGSEGV]"):
        with pytest.raises(ConfigError, match=r"config key 'train.preempt_signals' must be a list of SIGTERM, ") as err:
            load_config(None, [f"train.preempt_signals={bad}"])
        assert "\n" not in str(err.value)


def test_stop_signals_record_the_first_ignore_repeats_and_a_second_ctrl_c_stops_at_once(monkeypatch):
    import os
    import signal

    from cxrdist.train import preemption

    before = signal.getsignal(signal.SIGUSR1)
    with preemption.StopSignals(["SIGUSR1", "SIGINT"]) as stop:
        assert stop.received == 0 and stop.agreed(type("One", (), {"num_processes": 1})()) == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM and the launcher both deliver it: still one request
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C seen twice, within REPEAT_INTERRUPT_S
        assert stop.received == signal.SIGUSR1
        monkeypatch.setattr(preemption, "REPEAT_INTERRUPT_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGUSR1) is before and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_resume_command_is_the_launch_command_with_the_run_folder_and_resume_latest(monkeypatch):
    from cxrdist.train import preemption

    argv = ["launch/train.py", "--fold", "2", "--resume", "runs/x/fold2/checkpoints/step_8", "--output-dir=old",
            "--set", "eval.val_loss_timesteps=[200, 600]"]
    agent = ["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--config_file", "z2.yaml", "launch/train.py",
             "--fold", "2"]
    monkeypatch.setattr(preemption, "_parent_argv", lambda: agent)
    assert preemption.resume_command(Path("/runs/my run"), argv) == (
        "accelerate launch --config_file z2.yaml launch/train.py --fold 2 --set 'eval.val_loss_timesteps=[200, 600]' "
        "--output-dir '/runs/my run' --resume latest")
    monkeypatch.setattr(preemption, "_parent_argv", lambda: ["-bash"])  # started from a shell
    module = ["/site-packages/cxrdist/train/__main__.py", "--all-folds", "--resume", "auto"]
    command = preemption.resume_command(Path("r"), module)
    assert command.endswith(" -m cxrdist.train --all-folds --output-dir r --resume latest")
    assert command.split()[0] in ("python", sys.executable)


def test_the_resume_command_names_the_environments_python_not_the_base_it_links_to(monkeypatch, tmp_path):
    """A virtual environment's python is a symlink to the base interpreter. With the base's folder first on PATH,
    `python` resolves to the same file but runs without the environment's packages: print the full path then."""
    from cxrdist.train import preemption

    base = tmp_path / "base" / "bin"
    venv = tmp_path / "venv" / "bin"
    base.mkdir(parents=True)
    venv.mkdir(parents=True)
    (base / "python").write_text("")
    (base / "python").chmod(0o755)
    (venv / "python").symlink_to(base / "python")
    monkeypatch.setattr(preemption.sys, "executable", str(venv / "python"))
    monkeypatch.setenv("PATH", f"{base}{os.pathsep}{venv}")
    assert preemption._python() == str(venv / "python")
    monkeypatch.setenv("PATH", f"{venv}{os.pathsep}{base}")
    assert preemption._python() == "python"


def test_a_stop_still_running_after_two_thirds_of_the_launchers_grace_says_so(monkeypatch, caplog):
    """torch's elastic agent SIGKILLs TORCH_ELASTIC_SHUTDOWN_TIMEOUT s after passing the signal on: a process still
    busy before then logs what it is doing and the last complete checkpoint, so a SIGKILL does not end it silently."""
    import logging
    import os
    import signal
    import time

    from cxrdist.train import preemption

    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "1")
    with caplog.at_level(logging.WARNING, logger="cxrdist.train.preemption"):
        with preemption.StopSignals(["SIGUSR2"], status=lambda: "saving the checkpoint of step 7") as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.05)
    assert stop.received == signal.SIGUSR2
    assert [r.getMessage() for r in caplog.records] == [
        "SIGUSR2 came 1 s ago and this process is still saving the checkpoint of step 7: if it is killed before the "
        "checkpoint is complete, continue from that one"]
