"""`cxrdist pretrain` for a few steps, then `cxrdist evaluate` on the result: the offline path stays alive."""
from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from cxrdist.cli import main
from cxrdist.metrics.attributes import ATTRIBUTES
from cxrdist.models.loading import load_base
from support.browser import open_page


@pytest.fixture(scope="module")
def pretrained_base(phantom_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "base"
    result = CliRunner().invoke(main, [
        "pretrain", "--shards", str(phantom_shards), "--out", str(out),
        "--set", "pretrain.vae_steps=2", "--set", "pretrain.vae_batch_size=4",
        "--set", "pretrain.unet_steps=3", "--set", "pretrain.unet_batch_size=4"])
    assert result.exit_code == 0, result.output
    assert "VAE PSNR" in result.output
    return out


def test_pretrain_writes_a_small_loadable_base_with_provenance(pretrained_base):
    size = sum(f.stat().st_size for f in pretrained_base.rglob("*") if f.is_file())
    assert size < 10 * 2**20
    base = load_base(str(pretrained_base))
    assert (base.image_size, base.channels, base.text_encoder_kind) == (64, 1, "bert")
    assert base.vae.config.scaling_factor != 0.18215  # measured on this VAE's own latents
    saved = yaml.safe_load((pretrained_base / "cxrdist_pretrain.yaml").read_text())
    assert saved["pretrain"]["unet_steps"] == 3
    assert saved["pretrain"]["captions"] == "acquisition"
    assert "captioned with how its film was taken" in (pretrained_base / "README.md").read_text()


def test_pretrain_refuses_a_non_empty_output(pretrained_base, phantom_shards):
    result = CliRunner().invoke(main, ["pretrain", "--shards", str(phantom_shards), "--out", str(pretrained_base)])
    assert result.exit_code == 1 and "not empty" in result.output


def test_evaluate_scores_faithfulness_against_chance(pretrained_base, phantom_shards, tmp_path):
    out = tmp_path / "eval.json"
    args = ["evaluate", "--model-path", str(pretrained_base), "--shards", str(phantom_shards), "--split", "test",
            "--max-samples", "6", "--steps", "2", "--out", str(out), "--set", "sample.batch_size=6"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "macro" in result.output and "chance" in result.output
    data = json.loads(out.read_text())[str(pretrained_base)]
    assert data["samples"] == 6
    faith = data["faithfulness"]
    primary = [faith[name] for name in ATTRIBUTES if not math.isnan(faith[name])]
    assert primary and faith["macro"] == pytest.approx(sum(primary) / len(primary))  # the documented macro
    assert all(round(value * 6, 6).is_integer() for value in primary)  # shares of the 6 generated images
    assert set(data["chance"]) >= {"heart", "effusion_left", "nodule"}
    assert data["image_metrics"]["ssim"] < 0.99 and data["diversity"] is not None  # generated, not copied
    # Fixed seeds: a second evaluation of the same model scores exactly the same.
    again = tmp_path / "again.json"
    assert CliRunner().invoke(main, [*args[:-4], "--out", str(again), "--set", "sample.batch_size=6"]).exit_code == 0
    rerun = json.loads(again.read_text())[str(pretrained_base)]
    for key in ("faithfulness", "chance", "image_metrics", "diversity"):  # as JSON text: NaN equals NaN there
        assert json.dumps(rerun[key], sort_keys=True) == json.dumps(data[key], sort_keys=True), key


def test_evaluate_rejects_an_unknown_split(pretrained_base, phantom_shards):
    result = CliRunner().invoke(main, ["evaluate", "--model-path", str(pretrained_base), "--shards",
                                       str(phantom_shards), "--split", "fold9", "--max-samples", "2"])
    assert result.exit_code == 1 and "fold 9 is out of range" in result.output


def test_evaluate_all_metrics_writes_json_keys_and_a_self_contained_report(pretrained_base, phantom_shards, tmp_path):
    out, report = tmp_path / "eval.json", tmp_path / "report.html"
    args = ["evaluate", "--model-path", str(pretrained_base), "--shards", str(phantom_shards), "--split", "test",
            "--max-samples", "12", "--steps", "2", "--metrics", "all", "--bootstrap", "5", "--out", str(out),
            "--report", str(report), "--set", "sample.batch_size=12"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())[str(pretrained_base)]
    for key in ("fid", "kid", "precision", "recall", "density", "coverage"):
        assert math.isfinite(data[key]), key
    assert data["fid_ci95"][0] <= data["fid_ci95"][1] and data["kid_std"] >= 0
    assert data["distribution"]["n_real"] == data["distribution"]["n_generated"] == 12
    memo = data["memorization"]
    assert 0 <= memo["flagged_fraction"] <= 1 and memo["calibration"]["heldout_images"] == 12
    assert memo["nearest"] and {"generated", "training", "ssim", "cosine", "flagged"} <= set(memo["nearest"][0])
    assert data["classifier"]["classifier"] == "reader" and "Cardiomegaly" in data["classifier"]["findings"]
    assert "fid" in result.output and "memorized share" in result.output
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") >= 12
    assert "closest generated-training pairs" in page and "src=\"http" not in page  # nothing to fetch
    # Every metric of a full run, as a reader's browser shows it: all its images load, nothing is requested.
    shown = open_page(report)
    assert shown.other_requests == [] and shown.console_errors == [] and shown.broken_images == []
    assert shown.images >= 12 and "memorized share" in shown.text and "AUROC" in shown.text
    assert f"{str(pretrained_base)} (base)" in shown.text


def test_evaluate_names_the_bad_metric_or_features(pretrained_base, phantom_shards):
    base = ["evaluate", "--model-path", str(pretrained_base), "--shards", str(phantom_shards), "--max-samples", "6"]
    result = CliRunner().invoke(main, [*base, "--metrics", "fid,lpips"])
    assert result.exit_code == 1 and "lpips" in result.output and "choose from" in result.output
    result = CliRunner().invoke(main, [*base, "--metrics", "fid", "--features", "vgg", "--steps", "2"])
    assert result.exit_code == 1 and "--features 'vgg' is not known" in result.output


def test_pretrain_builds_a_sana_family_base_that_samples(phantom_shards, tmp_path):
    """pretrain.preset=sana-minilm: a DC-AE and a Sana transformer trained with flow matching, written as a
    SanaPipeline folder that cxrdist loads as the Sana family and `cxrdist sample` draws from."""
    from PIL import Image

    out = tmp_path / "sana-base"
    result = CliRunner().invoke(main, [
        "pretrain", "--shards", str(phantom_shards), "--out", str(out), "--set", "pretrain.preset=sana-minilm",
        "--set", "pretrain.vae_steps=2", "--set", "pretrain.vae_batch_size=4",
        "--set", "pretrain.unet_steps=2", "--set", "pretrain.unet_batch_size=4"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "SanaPipeline"
    base = load_base(str(out))
    assert (base.family.name, type(base.vae).__name__, base.channels, base.image_size) == ("sana", "AutoencoderDC", 1, 64)
    assert (out / "text_encoder" / "cxrdist_reference.json").exists()  # MiniLM referenced, not copied
    assert "Sana transformer (flow objective)" in (out / "README.md").read_text()
    samples = tmp_path / "samples"
    result = CliRunner().invoke(main, ["sample", "--model-path", str(out), "--out", str(samples), "--steps", "2",
                                       "--description", "Small left pleural effusion."])
    assert result.exit_code == 0, result.output
    images = sorted(samples.glob("*.png"))
    assert images and Image.open(images[0]).size == (64, 64)
