"""No code runs from a checkpoint: a payload planted in any pickle-format file is refused, unopened, in one line.

A planted file is `torch.save` of an object whose unpickling calls `Path.touch(marker)`: if anything loaded it
with the full unpickler, the marker file would appear.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cxrdist.errors import InputError
from cxrdist.train.checkpoint import PICKLE_SUFFIXES, TRAINER_STATE, check_pickles
from support.fakes import make_trainer, reset_accelerate
from support.trust import plant

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """One trained checkpoint for the module (tests copy it before planting anything)."""
    reset_accelerate()
    tmp = tmp_path_factory.mktemp("trained")
    trainer = make_trainer(tmp / "train", "train.max_steps=2", "train.checkpoint_every=1")
    trainer.fit()
    trainer.close()
    reset_accelerate()
    path = tmp / "train" / "fold0" / "checkpoints" / "step_00000002"
    assert (path / TRAINER_STATE).is_file() and not list(path.glob("custom_checkpoint_*"))
    return path


def resume(tmp_path, path: Path):
    return make_trainer(tmp_path / "resume", "train.max_steps=2", "train.checkpoint_every=1", resume=str(path))


def test_the_trainer_state_is_json_and_every_pickle_of_a_checkpoint_reads_weights_only(checkpoint, tmp_path):
    pickles = sorted(p.name for p in checkpoint.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    assert pickles == ["optimizer.bin", "random_states_0.pkl", "scheduler.bin"]
    check_pickles(checkpoint)
    trainer = resume(tmp_path, checkpoint)
    assert trainer.state.step == 2 and trainer.state.micro_step == 2
    trainer.close()


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_a_payload_in_any_pickle_of_a_checkpoint_is_refused_and_runs_nothing(checkpoint, tmp_path, name):
    copy = tmp_path / "copy" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    marker = tmp_path / "payload_ran"
    plant(copy / name, marker)
    with pytest.raises(InputError, match=rf"cannot resume from .*: {name} holds something other than tensors") as err:
        resume(tmp_path, copy)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_truncated_checkpoint_file_and_a_missing_trainer_state_are_refused_in_one_line(checkpoint, tmp_path):
    copy = tmp_path / "copy" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    data = (copy / "optimizer.bin").read_bytes()
    (copy / "optimizer.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"optimizer.bin holds something other than tensors.*or is damaged"):
        resume(tmp_path, copy)
    (copy / TRAINER_STATE).unlink()
    with pytest.raises(InputError, match=r"has no trainer_state.json .*never loaded\): start a new run"):
        resume(tmp_path, copy)


def test_deepspeed_files_load_weights_only_with_its_classes_allowed_and_nothing_else(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from cxrdist.train import distributed

    folder = tmp_path / "pytorch_model"
    folder.mkdir()
    torch.save({"loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False),
                "zero_stage": ZeroStageEnum.gradients, "fp32": torch.ones(3)}, folder / "optim_states.pt")
    check_pickles(tmp_path)  # DeepSpeed's own classes are allowed

    class Engine:
        checkpoint_engine = type("CheckpointEngine", (), {"load": lambda self, path, map_location=None: None})()

    engine = Engine()
    distributed.load_weights_only(engine)
    assert torch.equal(engine.checkpoint_engine.load(str(folder / "optim_states.pt"))["fp32"], torch.ones(3))
    marker = tmp_path / "payload_ran"
    plant(folder / "optim_states.pt", marker)
    with pytest.raises(InputError, match=r"pytorch_model/optim_states.pt holds something other"):
        check_pickles(tmp_path)
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.checkpoint_engine.load(str(folder / "optim_states.pt"))
    assert not marker.exists()
