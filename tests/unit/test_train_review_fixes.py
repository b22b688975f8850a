"""Defects found in review of the trainer, each pinned by a test that failed before its fix."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cxrdist.config import load_config
from cxrdist.errors import ConfigError, DataError, InputError


def test_a_frozen_text_encoder_stays_in_eval_mode_when_the_model_trains():
    """MiniLM has dropout 0.1: a frozen encoder in train mode gives a different context at every call."""
    from cxrdist.models.diffusion import LoraDiffusionModel
    from cxrdist.models.loading import load_base
    from cxrdist.models.text import tokenize

    base = load_base("preset:tiny-minilm")
    model = LoraDiffusionModel(base.unet, base.text_encoder, train_text_encoder=False).train()
    assert model.unet.training and not model.text_encoder.training
    assert not any(m.training for m in model.text_encoder.modules())
    ids, mask = tokenize(base.tokenizer, ["Mild cardiomegaly. Small left pleural effusion."], warn=False)
    torch.manual_seed(1)
    first = model.encode_text(ids, mask)
    torch.manual_seed(2)
    assert torch.equal(first, model.encode_text(ids, mask))
    trained = LoraDiffusionModel(base.unet, base.text_encoder, train_text_encoder=True).train()
    assert trained.text_encoder.training  # an encoder that trains keeps its train mode


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_are_finite_on_a_zero_terminal_snr_schedule(prediction_type):
    from cxrdist.models.diffusion import DiffusionObjective

    conf = {"num_train_timesteps": 1000, "prediction_type": prediction_type, "beta_schedule": "scaled_linear",
            "rescale_betas_zero_snr": True}
    objective = DiffusionObjective(conf, snr_gamma=5.0)
    assert float(objective.scheduler.alphas_cumprod[-1]) == 0.0  # SNR is exactly 0 at the last timestep
    weights = objective.snr_weights(torch.arange(1000))
    assert torch.isfinite(weights).all()
    if prediction_type == "epsilon":  # min(SNR, gamma) / SNR: 1 wherever SNR < gamma, the limit at SNR = 0
        assert float(weights[-1]) == 1.0
        snr = objective.scheduler.alphas_cumprod[10] / (1 - objective.scheduler.alphas_cumprod[10])
        assert float(weights[10]) == pytest.approx(min(float(snr), 5.0) / float(snr))


def test_all_folds_refuse_one_checkpoint_path_for_every_fold(tmp_path):
    from cxrdist.train.run import run_all_folds

    with pytest.raises(InputError, match=r"a checkpoint path names one fold; use --resume latest"):
        run_all_folds(load_config(None), output_dir=str(tmp_path), resume=str(tmp_path / "fold0/checkpoints/step_1"))


def test_resuming_with_another_world_size_is_refused_naming_both_values():
    from cxrdist.train.trainer import check_same_batching

    saved = {"world_size": 2, "effective_batch": 8}
    check_same_batching(Path("ckpt"), saved, {"world_size": 2, "effective_batch": 8})
    check_same_batching(Path("ckpt"), {"fold": 0}, {"world_size": 4, "effective_batch": 16})  # older checkpoints
    with pytest.raises(ConfigError, match=r"trained with world size 2, this launch has 4.*same number of processes \(2\)"):
        check_same_batching(Path("ckpt"), saved, {"world_size": 4, "effective_batch": 16})


class _FakeRanks:
    """Two ranks seen from one of them: rank 1's view of a folder can differ from rank 0's (another node)."""

    num_processes, device = 2, "cpu"

    def __init__(self, rank: int, other_sees: bool):
        self.process_index, self.is_main_process, self.other_sees = rank, rank == 0, other_sees

    def wait_for_everyone(self) -> None:
        pass

    def gather(self, tensor):
        other = torch.tensor([1.0 if self.other_sees else 0.0])
        return torch.cat([tensor, other] if self.is_main_process else [other, tensor])


def test_a_run_folder_that_another_rank_cannot_see_is_refused(tmp_path):
    from cxrdist.train.checkpoint import SHARED_PROBE, check_shared_folder

    check_shared_folder(_FakeRanks(0, other_sees=True), tmp_path / "run")
    assert not (tmp_path / "run" / SHARED_PROBE).exists()  # rank 0 cleans up after the check
    with pytest.raises(InputError, match=r"not shared by all ranks: rank\(s\) \[1\].*filesystem that every node mounts"):
        check_shared_folder(_FakeRanks(1, other_sees=True), tmp_path / "node1", wait_s=0.2)  # rank 1 sees nothing
    with pytest.raises(InputError, match=r"rank\(s\) \[1\]"):
        check_shared_folder(_FakeRanks(0, other_sees=False), tmp_path / "run", wait_s=0.2)  # rank 0 learns it too


def test_eval_k_folds_is_checked_against_the_shard_set():
    from cxrdist.train.data import check_shards

    index = SimpleNamespace(folds=2, root="shards/x", channels=1, splits={"fold0": 1, "fold1": 1, "test": 1},
                            check_fold=lambda fold: f"fold{fold}", check_image_size=lambda size: None)
    assert check_shards(index, load_config(None), 0, 1) == "fold0"  # default 0: the shard set's folds
    assert check_shards(index, load_config(None, ["eval.k_folds=2"]), 0, 1) == "fold0"
    with pytest.raises(DataError, match=r"split into 2 folds but eval.k_folds=5: set eval.k_folds=2"):
        check_shards(index, load_config("product"), 0, 1)


def test_a_stop_line_starts_its_own_line_even_under_a_progress_bar(capsys):
    """The launcher's log is read line by line: `Error: rank 0 ...` must not trail the bar's last update."""
    import sys

    from tqdm.auto import tqdm

    from cxrdist.errors import CxrdistError, report_now

    bar = tqdm(total=2, file=sys.stderr, desc="train")
    bar.update(1)
    error = report_now(CxrdistError("rank 0 lost the other ranks at step 1"))
    bar.close()
    assert error.reported
    # split on "\n" only: splitlines() also splits on the bar's "\r", so a line glued to the bar would pass
    assert "Error: rank 0 lost the other ranks at step 1" in capsys.readouterr().err.split("\n")
