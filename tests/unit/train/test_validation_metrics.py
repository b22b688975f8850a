"""eval.metrics: FID, KID, precision/recall/density/coverage and the memorization audit at every validation,
logged next to the validation loss, and usable as the early-stopping metric."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cxrdist.config import load_config
from cxrdist.errors import ConfigError
from cxrdist.sampling.pipeline import as_drawn
from cxrdist.train import validation
from support.fakes import make_trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

SET = ["eval.metrics=[fid,kid,prdc,memorization]", "eval.num_metric_images=16", "eval.num_grid_prompts=0",
       "eval.inference_steps=2", "eval.val_loss_timesteps=[500]", "eval.metric=fid"]


def test_set_metrics_score_the_validation_images_flag_training_copies_and_drive_early_stopping(tmp_path,
                                                                                                 monkeypatch):
    trainer = make_trainer(tmp_path / "run", *SET, n_train=24, n_val=16)
    trainer.validator._load()
    real = trainer.validator._subset.references

    def generating(images):
        monkeypatch.setattr(validation, "generate", lambda base, reports, cfg, dtype, seed: images[: len(reports)])
        return trainer.validator.run(trainer.model)[0]

    perfect = generating(real)  # the validation split's own images: what a perfect generator draws
    assert {"val_loss", "fid", "kid", "precision", "recall", "density", "coverage",
            "memorization_flagged"} <= set(perfect)
    assert abs(perfect["fid"]) < 1e-4 and perfect["precision"] == perfect["recall"] == 1.0
    assert perfect["memorization_flagged"] <= 0.1  # the split's real images are not training images

    noise = generating(np.random.default_rng(0).random(real.shape).astype(np.float32))
    assert noise["fid"] > 1.0 and noise["kid"] > perfect["kid"] and noise["coverage"] < 0.5
    assert trainer.best.stopper.mode == "min" and all(math.isfinite(v) for v in noise.values())

    copies = np.concatenate([b["pixel_values"].mean(dim=1).add(1).div(2).numpy()
                             for b in trainer.data.first_samples("train", 16)])
    drawn = as_drawn(trainer.validator.base, copies)  # training images as the model draws them back
    assert generating(drawn)["memorization_flagged"] >= 0.9
    trainer.close()


def test_bad_set_metric_settings_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="eval.metrics"):
        load_config(None, ["eval.metrics=[fid,lpips]"])
    with pytest.raises(ConfigError, match="eval.num_metric_images"):
        load_config(None, ["eval.metrics=[fid]", "eval.num_metric_images=8"])
    assert load_config(None, ["eval.metric=kid", "eval.num_metric_images=16"]).eval.metrics == ["kid"]
    with pytest.raises(ConfigError, match="eval.features"):
        make_trainer(tmp_path / "run", "eval.metrics=[fid]", "eval.num_metric_images=16", "eval.features=vgg")


def test_validation_images_that_come_out_nan_stop_the_run_in_one_line(tmp_path, monkeypatch):
    from cxrdist.errors import ModelError
    from cxrdist.sampling.pipeline import NonFiniteSample

    trainer = make_trainer(tmp_path / "run", *SET, n_train=24, n_val=16)

    def diverged(base, reports, cfg, dtype, seed):
        raise NonFiniteSample(3, seed + 3, "in the latents", "preset:tiny", dtype)

    monkeypatch.setattr(validation, "generate", diverged)
    with pytest.raises(ModelError, match=r"validation image 3 \(seed 3\) came out as NaN/inf in the latents: the "
                                         r"adapter diverged; lower optim.lr_unet") as caught:
        trainer.validator.run(trainer.model)
    assert caught.value.reported  # printed at once: a launcher may stop this rank before the CLI could
    trainer.close()
