"""The adapter EMA (train.ema_decay): what it averages, when, what validation and the best export see, and that a
resumed run ends with the same EMA as an uninterrupted one. Tiny preset, in-memory data, one process."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cxrdist.config import load_config
from cxrdist.errors import ConfigError, InputError
from cxrdist.models.lora import lora_named_parameters
from cxrdist.train import distributed
from cxrdist.train.checkpoint import PICKLE_SUFFIXES, RESUME_MAY_DIFFER, check_pickles
from cxrdist.train.ema import EMA_FILE, decay_at
from cxrdist.train.steps import optimizer_steps
from support.fakes import make_trainer, reset_accelerate

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")

STEP2 = Path("fold0") / "checkpoints" / "step_00000002"
STEP4 = Path("fold0") / "checkpoints" / "step_00000004"
# 4 optimizer steps, checkpoints at 2 and 4, validation at 2 and 4, test split at the end.
RUN = ["train.max_steps=4", "train.checkpoint_every=2", "eval.eval_every_steps=2", "eval.run_test=true",
       "optim.lr_unet=3e-2", "optim.lr_text=3e-2", "optim.warmup_steps=0"]
EMA = "train.ema_decay=0.9"


def live(trainer) -> dict[str, torch.Tensor]:
    """The adapter values the module computes with, by full name (copies)."""
    return distributed.live_trained_state(trainer.accelerator, trainer.model)


def ema_values(trainer) -> dict[str, torch.Tensor]:
    return trainer.ema.named_cpu()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fit(tmp_path, *overrides, resume=None):
    """A finished run: (its folder, the EMA at each evaluation by step, the final EMA or None). One intra-op
    thread, whether called from a module fixture or a test: runs compared bit for bit must reduce alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(tmp_path, *overrides, resume=resume)
    finally:
        torch.set_num_threads(threads)


def _fit(tmp_path, *overrides, resume=None):
    reset_accelerate()
    trainer = make_trainer(tmp_path, *RUN, *overrides, resume=resume)
    at_eval = {}
    original = trainer.validate_all_ranks

    def evaluate():
        if trainer.ema is not None:
            at_eval[trainer.state.step] = ema_values(trainer)
        return original()

    trainer.validate_all_ranks = evaluate
    trainer.fit()
    final = ema_values(trainer) if trainer.ema is not None else None
    trainer.close()
    reset_accelerate()
    return tmp_path, at_eval, final


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("ema"), EMA)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("plain"))


def test_decay_warms_up_as_diffusers_ema_model_and_the_config_takes_zero_or_the_open_interval():
    assert [decay_at(0.3, k) for k in (1, 2, 3, 4, 5)] == [0.0, 2 / 11, 3 / 12, 0.3, 0.3]
    assert decay_at(0.9999, 1001) == pytest.approx(1001 / 1010)
    assert load_config(None, []).train.ema_decay == 0.0  # off by default
    assert load_config(None, ["train.ema_decay=0.999"]).train.ema_decay == 0.999
    for bad in ("1", "1.5", "-0.1", "nan"):
        with pytest.raises(ConfigError, match="train.ema_decay"):
            load_config(None, [f"train.ema_decay={bad}"])
    assert not "train.ema_decay".startswith(RESUME_MAY_DIFFER)  # it changes what is trained and exported


def test_the_ema_after_k_steps_is_the_hand_computed_average_of_the_adapters_after_each_step(tmp_path):
    trainer = make_trainer(tmp_path, "train.ema_decay=0.3", "optim.lr_unet=3e-2", "optim.lr_text=3e-2",
                           "optim.warmup_steps=0", "optim.scheduler=constant", "train.caption_dropout=0", n_train=8)
    try:
        start = live(trainer)
        after = [live(trainer) for _ in optimizer_steps(trainer, 5)]  # the adapters after each step
        got = ema_values(trainer)
        assert trainer.ema.updates == 5 and trainer.ema.last_decay == 0.3
    finally:
        trainer.close()
    expected = {}
    for k, values in enumerate(after, start=1):  # in float64: the EMA's own fp32 rounding stays within 1e-6
        d = 0.0 if k == 1 else min(0.3, k / (9 + k))
        expected = {n: (d * expected[n] if d else 0) + (1 - d) * v.double() for n, v in values.items()}
    assert got.keys() == expected.keys() == start.keys()
    assert any("unet." in n for n in got) and any("text_encoder." in n for n in got)
    assert all(t.dtype == torch.float32 for t in got.values())
    worst = max(float((got[n].double() - expected[n]).abs().max()) for n in got)
    assert worst < 1e-6, worst
    gap = max(float((got[n] - after[-1][n]).abs().max()) for n in got)
    assert gap > 1e-3, gap  # an average, not the last adapter
    lora_b = [n for n in got if "lora_B" in n]
    assert all(not torch.equal(got[n], start[n]) for n in lora_b)  # B started at zero and moved


def test_a_skipped_step_leaves_the_ema_alone(tmp_path):
    """An inf gradient in micro-step 1: that optimizer step is skipped, so the EMA sees 3 updates in 3 steps and
    is bit for bit what it was before the skipped micro-step."""
    trainer = make_trainer(tmp_path, "train.max_steps=3", "optim.warmup_steps=0", "train.ema_decay=0.5")
    param = next(p for n, p in lora_named_parameters(trainer.accelerator.unwrap_model(trainer.model))
                 if "lora_B" in n)
    current, snapshots = [0], {}
    param.register_hook(lambda g: torch.full_like(g, float("inf")) if current[0] == 1 else g)
    original = trainer.train_step

    def step(batch, micro):
        current[0] = micro
        before = ema_values(trainer)
        out = original(batch, micro)
        snapshots[micro] = (before, ema_values(trainer), out["stepped"])
        return out

    trainer.train_step = step
    try:
        trainer.fit()
        assert (trainer.state.step, trainer.state.skipped_steps, trainer.ema.updates) == (3, 1, 3)
    finally:
        trainer.close()
    assert [snapshots[m][2] for m in range(4)] == [True, False, True, True]
    before, after, _ = snapshots[1]
    assert same(before, after)
    assert not same(*snapshots[2][:2])  # the next real step updates it


def test_validation_sees_the_ema_and_training_continues_on_the_raw_adapter_bit_for_bit(tmp_path):
    trainer = make_trainer(tmp_path, EMA, "optim.lr_unet=3e-2", "optim.lr_text=3e-2")
    try:
        list(optimizer_steps(trainer, 3))
        raw, ema = live(trainer), ema_values(trainer)
        assert not same(raw, ema)
        optimizer_state = {k: v.clone() for s in trainer.optimizer.state_dict()["state"].values()
                           for k, v in s.items() if torch.is_tensor(v)}
        seen = []
        original = trainer.validator.run

        def run(model):
            seen.append(live(trainer))
            return original(model)

        trainer.validator.run = run
        trainer.validate_all_ranks()
        assert len(seen) == 1 and same(seen[0], ema)  # evaluated with the EMA
        assert same(live(trainer), raw)  # and the raw adapter is back, bit for bit
        assert same(ema_values(trainer), ema)
        after = {k: v for s in trainer.optimizer.state_dict()["state"].values() for k, v in s.items()
                 if torch.is_tensor(v)}
        assert optimizer_state.keys() == after.keys() and all(torch.equal(optimizer_state[k], after[k])
                                                               for k in after)

        def failing(model):
            raise RuntimeError("evaluation failed")

        trainer.validator.run = failing
        with pytest.raises(RuntimeError, match="evaluation failed"):
            trainer.validate_all_ranks()
        assert same(live(trainer), raw)  # restored on an error too
    finally:
        trainer.close()


def test_ema_off_writes_nothing_new_and_ema_on_trains_the_same_raw_adapter(ema_run, plain_run):
    on, _, _ = ema_run
    off, _, final = plain_run
    assert final is None
    for step in (STEP2, STEP4):
        assert not (off / step / EMA_FILE).exists() and (on / step / EMA_FILE).is_file()
        # evaluations with the EMA swapped in at steps 2 and 4 did not disturb what was trained
        adapter_on, adapter_off = (load_file(str(run / step / "adapter.safetensors")) for run in (on, off))
        assert same(adapter_on, adapter_off)
    best_off = next((off / "fold0").glob("best_model_fold0_epoch*"))
    meta = json.loads((best_off / "cxrdist.json").read_text())
    assert "weights" not in meta["training"] and "ema" not in meta["training"]
    assert "moving average" not in (best_off / "README.md").read_text()
    assert "ema_per_rank" not in json.loads((off / "fold0" / "adapter_digests.json").read_text())
    on_val = json.loads((next((on / "fold0").glob("best_model_fold0_epoch*")) / "metrics.json").read_text())
    off_val = json.loads((best_off / "metrics.json").read_text())
    assert on_val["metrics"]["val_loss"] != off_val["metrics"]["val_loss"]  # validation judged other weights


def test_the_best_export_holds_the_ema_says_so_and_the_test_split_uses_it(ema_run, tmp_path):
    run, at_eval, final = ema_run
    assert sorted(at_eval) == [2, 4]
    best = next((run / "fold0").glob("best_model_fold0_epoch*"))
    meta = json.loads((best / "cxrdist.json").read_text())
    training = meta["training"]
    assert training["weights"] == "ema" and training["ema"]["decay"] == 0.9
    assert training["ema"]["updates"] == training["step"] and "(1 + n) / (10 + n)" in training["ema"]["warmup"]
    assert json.loads((best / "metrics.json").read_text())["weights"] == "ema"
    assert "exponential moving average of the adapter (decay 0.9" in (best / "README.md").read_text()
    # Load the export into a fresh model: its adapters are the EMA of the best step, by full parameter name.
    trainer = make_trainer(tmp_path, *RUN, EMA)
    try:
        from cxrdist.train.best import load_exported

        load_exported(trainer.accelerator.unwrap_model(trainer.model), best)
        assert same(live(trainer), at_eval[training["step"]])
    finally:
        trainer.close()
    raw = load_file(str(run / "fold0" / "checkpoints" / f"step_{training['step']:08d}" / "adapter.safetensors"))
    assert not same(raw, at_eval[training["step"]])
    report = json.loads((run / "fold0" / "test_metrics.json").read_text())
    assert report["checkpoint"] == str(best)  # Trainer.test_all_ranks evaluated this (EMA) export
    digests = json.loads((run / "fold0" / "adapter_digests.json").read_text())
    assert len(digests["ema_per_rank"]) == 1


def test_every_checkpoint_holds_the_ema_as_safetensors_and_its_pickles_still_read_weights_only(ema_run):
    run, at_eval, final = ema_run
    for step, ema in ((STEP2, at_eval[2]), (STEP4, final)):
        folder = run / step
        pickles = sorted(p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
        assert pickles == ["optimizer.bin", "random_states_0.pkl", "scheduler.bin"]
        check_pickles(folder)
        assert same(load_file(str(folder / EMA_FILE)), ema)


def test_a_resumed_run_ends_with_the_same_ema_as_the_uninterrupted_one(ema_run, tmp_path):
    run, _, final = ema_run
    resumed, _, final_resumed = fit(tmp_path / "resumed", EMA, resume=str(run / STEP2))
    assert same(final_resumed, final)
    assert same(load_file(str(resumed / STEP4 / EMA_FILE)), load_file(str(run / STEP4 / EMA_FILE)))
    assert same(load_file(str(resumed / STEP4 / "adapter.safetensors")),
                load_file(str(run / STEP4 / "adapter.safetensors")))


def test_a_checkpoint_without_or_with_a_damaged_ema_is_refused_in_one_line(ema_run, tmp_path):
    run, _, _ = ema_run
    copy = tmp_path / "copy" / STEP2.name
    shutil.copytree(run / STEP2, copy)
    data = (copy / EMA_FILE).read_bytes()
    (copy / EMA_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cannot resume from .*: ema.safetensors is unreadable") as err:
        make_trainer(tmp_path / "a", *RUN, EMA, resume=str(copy))
    assert "\n" not in str(err.value) and "train.ema_decay=0.9 needs the adapter EMA" in str(err.value)
    reset_accelerate()
    (copy / EMA_FILE).unlink()
    with pytest.raises(InputError, match=r"cannot resume from .*: it has no ema.safetensors; .*a new run") as err:
        make_trainer(tmp_path / "b", *RUN, EMA, resume=str(copy))
    assert "\n" not in str(err.value)
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"train.ema_decay: 0.9 -> 0.0"):  # EMA switched off: another config
        make_trainer(tmp_path / "c", *RUN, resume=str(run / STEP2))
