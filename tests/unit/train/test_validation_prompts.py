"""eval.prompts_file: the validation grid shows the file's prompts, with the same seeds at every evaluation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxrdist.errors import InputError
from cxrdist.train import validation
from support.fakes import make_trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

PROMPTS = ["Small left apical pneumothorax.", "Moderate cardiomegaly.", "Large right pleural effusion."]


def test_the_grid_is_the_files_prompts_with_fixed_seeds(tmp_path, monkeypatch):
    prompts_file = tmp_path / "grid.jsonl"  # the .txt form is read by the same function (cxrdist sample's tests)
    prompts_file.write_text("".join(json.dumps({"report": p}) + "\n" for p in PROMPTS))
    seen = []
    real = validation.generate

    def spy(base, reports, cfg, dtype, seed):
        seen.append((list(reports), seed))
        return real(base, reports, cfg, dtype, seed)

    monkeypatch.setattr(validation, "generate", spy)
    trainer = make_trainer(tmp_path / "run", f"eval.prompts_file={prompts_file}", "eval.num_grid_prompts=2",
                           "eval.inference_steps=2", "eval.val_loss_timesteps=[500]")
    _, first = trainer.validator.run(trainer.model)
    _, second = trainer.validator.run(trainer.model)
    assert seen == [(PROMPTS, 0), (PROMPTS, 0)]  # the file's prompts (all of them), not the split's reports
    assert first.shape[0] == len(PROMPTS) and np.array_equal(first, second)  # same weights, same seeds: same grid
    trainer.close()


def test_without_a_file_the_grid_is_the_splits_first_reports(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(validation, "generate", lambda base, reports, cfg, dtype, seed: (
        seen.append(list(reports)) or np.zeros((len(reports), 64, 64), np.float32)))
    trainer = make_trainer(tmp_path / "run", "eval.num_grid_prompts=2", "eval.val_loss_timesteps=[500]")
    _, grid = trainer.validator.run(trainer.model)
    assert len(seen) == 1 and len(seen[0]) == 2 and not set(seen[0]) & set(PROMPTS)
    assert grid.shape[0] == 2
    trainer.close()


def test_a_missing_or_empty_prompts_file_is_refused_before_training(tmp_path):
    with pytest.raises(InputError, match="prompts file .*missing.txt not found"):
        make_trainer(tmp_path / "a", f"eval.prompts_file={tmp_path / 'missing.txt'}")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="holds no prompts"):
        make_trainer(tmp_path / "b", f"eval.prompts_file={empty}")
