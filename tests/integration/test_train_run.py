"""End-to-end training on a real phantom shard set with the tiny preset: outputs, TensorBoard, best model,
test split, early stopping, folds, and the exported model through `cxrdist sample`."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from cxrdist.config import load_config
from support.training import QUICK


def scalar_tags(run_dir: Path) -> tuple[set, set, object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags["scalars"]), set(tags["images"]), acc


def test_one_fold_end_to_end(phantom_shards, tmp_path, one_thread):
    from click.testing import CliRunner

    from cxrdist.cli import main as cli
    from cxrdist.train.run import run

    cfg = load_config(None, QUICK + [f"data.shards={phantom_shards}", "train.epochs=2", "eval.patience=0",
                                     "train.export_zip=true", "train.keep_last=1"])
    result = run(cfg, 1, output_dir=str(tmp_path / "run"))
    run_dir = tmp_path / "run" / "fold1"
    assert result.steps == 16 and result.best_path is not None and result.best_path.parent == run_dir
    assert result.best_path.name == f"best_model_fold1_epoch{result.best_epoch}"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000016"]  # keep_last=1
    assert (run_dir / "config.yaml").exists() and result.best_path.with_suffix(".zip").exists()
    for name in ("pytorch_lora_weights.safetensors", "cxrdist.json", "metrics.json", "README.md"):
        assert (result.best_path / name).exists(), name

    report = json.loads((run_dir / "test_metrics.json").read_text())
    assert report["validation_split"] == "fold1" and report["checkpoint"] == str(result.best_path)
    assert set(report["test"]) >= {"val_loss", "mse", "ssim", "psnr"}
    assert 0 <= report["test"]["ssim"] <= 1 and report["test"]["mse"] < 1

    scalars, images, acc = scalar_tags(run_dir)
    assert {"train/loss", "train/grad_norm", "train/images_per_s", "train/peak_memory_mb", "lr/unet", "lr/text",
            "val/val_loss", "val/ssim", "val/psnr", "val/mse", "test/val_loss", "test/ssim"} <= scalars
    assert {"val/samples", "test/samples"} <= images
    assert [e.step for e in acc.Scalars("val/val_loss")] == [8, 16]  # once per epoch
    assert len(acc.Scalars("train/loss")) == 8  # every log_every=2 optimizer steps

    out = tmp_path / "samples"
    res = CliRunner().invoke(cli, ["sample", "--model-path", str(result.best_path), "--description",
                                   "Heart size is normal. No pleural effusion.", "--steps", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert list(out.rglob("*.png"))

    # Any training checkpoint loads for sampling/evaluation, holding that step's trained tensors.
    from safetensors.torch import load_file

    from cxrdist.sampling.loading import load_for_sampling

    step = run_dir / "checkpoints" / "step_00000016"
    model, meta = load_for_sampling(step)
    saved = load_file(str(step / "adapter.safetensors"))
    live = {f"unet.{n}": p for n, p in model.unet.named_parameters() if "lora_" in n}
    assert live.keys() == {k for k in saved if k.startswith("unet.")}
    assert all(torch.equal(live[k], saved[k]) for k in live)
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)  # trained, not a fresh adapter
    assert meta["prompt_template"] == cfg.data.prompt_template


def test_early_stopping_and_final_test_use_the_best_checkpoint(phantom_shards, tmp_path, one_thread, monkeypatch):
    """Scripted validation values: best at epoch 2, then two worse evaluations -> stop after epoch 4 (patience 2),
    and the test split is evaluated with the epoch-2 adapter, not the last weights."""
    from safetensors.torch import load_file

    from cxrdist.train import validation as ev
    from cxrdist.train.best import weights_digest
    from cxrdist.train.run import run
    from cxrdist.train.trainer import Trainer

    scripted = [1.0, 0.5, 0.7, 0.6]
    real_run = ev.Evaluator.run

    def fake_run(self, model):
        metrics, images = real_run(self, model)
        if self.split != "test":
            metrics["val_loss"] = scripted.pop(0)
        return metrics, images

    live = {}
    real_test = Trainer.test_all_ranks

    def spy_test(self):
        live["before_test"] = {k: v.clone() for k, v in self.accelerator.unwrap_model(self.model).state_dict().items() if "lora_" in k}
        out = real_test(self)
        live["at_test"] = {k: v.clone() for k, v in self.accelerator.unwrap_model(self.model).state_dict().items() if "lora_" in k}
        return out

    monkeypatch.setattr(ev.Evaluator, "run", fake_run)
    monkeypatch.setattr(Trainer, "test_all_ranks", spy_test)
    cfg = load_config(None, QUICK + [f"data.shards={phantom_shards}", "train.epochs=10", "eval.patience=2",
                                     "data.max_train_samples=8", "eval.num_metric_images=0", "eval.num_grid_prompts=0"])
    result = run(cfg, 0, output_dir=str(tmp_path / "run"))
    assert result.stopped_early and result.steps == 8  # 2 steps per epoch, 4 epochs
    assert (result.best_epoch, result.best_value) == (2, 0.5)
    assert result.best_path.name == "best_model_fold0_epoch2"
    assert sorted(p.name for p in result.run_dir.glob("best_model_*")) == ["best_model_fold0_epoch2"]
    report = json.loads((result.run_dir / "test_metrics.json").read_text())
    assert report["checkpoint"] == str(result.best_path) and report["weights_sha256"] == weights_digest(result.best_path)
    assert report["best_epoch"] == 2 and report["validation_split"] == "fold0"
    changed = [k for k in live["at_test"] if not torch.equal(live["at_test"][k], live["before_test"][k])]
    assert changed, "the test ran with the last weights, not the best checkpoint"
    exported = load_file(str(result.best_path / "pytorch_lora_weights.safetensors"))
    unet_key = next(k for k in exported if k.startswith("unet.") and "lora_B" in k)
    live_key = next(k for k in live["at_test"] if unet_key.split("unet.", 1)[1].replace(".weight", "") in k)
    assert torch.equal(live["at_test"][live_key], exported[unet_key])


def test_all_folds_fresh_adapters_and_cv_summary(phantom_shards, tmp_path, one_thread, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cxrdist.train.run import run_all_folds
    from cxrdist.train.trainer import Trainer

    starts = []
    real_fit = Trainer.fit

    def spy_fit(self):
        lora_b = [p for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if "lora_B" in n]
        starts.append((self.fold, self.data.val_split, max(float(p.detach().abs().max()) for p in lora_b)))
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", spy_fit)
    cfg = load_config(None, QUICK + [f"data.shards={phantom_shards}", "train.max_steps=3", "eval.eval_every_steps=3",
                                     "eval.num_metric_images=1", "eval.num_grid_prompts=0"])
    summary = run_all_folds(cfg, output_dir=str(tmp_path / "cv"))
    assert starts == [(0, "fold0", 0.0), (1, "fold1", 0.0)]  # zero-initialised B: a fresh adapter per fold
    assert set(summary["folds"]) == {"0", "1"}
    for key in ("best_val", "test_val_loss", "test_ssim", "test_psnr", "test_mse"):
        per_fold = [summary["folds"][fold][key] for fold in ("0", "1")]
        stats = summary["summary"][key]
        assert stats["n"] == 2
        assert stats["mean"] == pytest.approx(statistics.mean(per_fold))
        assert stats["std"] == pytest.approx(statistics.stdev(per_fold))  # sample std across the two folds
    assert json.loads((tmp_path / "cv" / "cv_summary.json").read_text()) == summary
    acc = EventAccumulator(str(tmp_path / "cv" / "cv"))
    acc.Reload()
    assert {"cv/test_ssim_mean", "cv/test_ssim_std", "cv/best_val_mean"} <= set(acc.Tags()["scalars"])
