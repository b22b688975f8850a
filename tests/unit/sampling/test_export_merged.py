"""Merged export: same images as base + adapter, adapter untouched, a plain diffusers folder; init-model."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cxrdist.cli import main
from cxrdist.config import LoraConfig
from cxrdist.errors import InputError
from cxrdist.models.loading import load_base
from cxrdist.models.lora import (adapter_metadata, adapter_state_dicts, attach_lora, lora_parameters,
                                 save_adapter)
from cxrdist.models.text import encode_prompts
from cxrdist.sampling.loading import load_for_sampling
from cxrdist.sampling.merge import MERGED_FORMAT, merge_adapter
from cxrdist.sampling.pipeline import SampleSettings, generate_images
from support.folders import tree_hash

REPORTS = ["Mild cardiomegaly.", "Small right effusion."]


def _adapter(preset, folder):
    base = load_base(preset)
    spec = attach_lora(base, LoraConfig(unet_rank=4, text_rank=2))
    for param in lora_parameters(base.unet) + lora_parameters(base.text_encoder):
        param.data.normal_(std=0.05)
    return save_adapter(folder, *adapter_state_dicts(base.unet, base.text_encoder),
                        adapter_metadata(base, spec, "cxr: {report}"))


def test_merged_pipeline_matches_base_plus_adapter(tmp_path, tiny_base_path):
    adapter = _adapter("preset:tiny", tmp_path / "adapter")
    before = tree_hash(adapter)
    merged = merge_adapter(adapter, tmp_path / "merged")
    assert tree_hash(adapter) == before  # the checkpoint is only read

    meta = json.loads((merged / "cxrdist.json").read_text())
    assert meta["format"] == MERGED_FORMAT and meta["prompt_template"] == "cxr: {report}"
    index = json.loads((merged / "model_index.json").read_text())
    assert index.get("safety_checker") in (None, [None, None])

    plain = load_base(str(merged))  # a normal pipeline folder: no adapter, no cxrdist code needed
    assert not lora_parameters(plain.unet) and not lora_parameters(plain.text_encoder)
    live, _ = load_for_sampling(adapter)
    settings = SampleSettings(steps=2)
    expected = generate_images(live, REPORTS, settings, template="cxr: {report}", seeds=[3, 4])
    got = generate_images(plain, REPORTS, settings, template="cxr: {report}", seeds=[3, 4])
    assert np.allclose(got, expected, atol=2e-3)
    untouched = generate_images(load_base(tiny_base_path), REPORTS, settings, template="cxr: {report}", seeds=[3, 4])
    assert np.abs(untouched - expected).max() > 1e-2  # the adapter mattered, so the match above means something


def test_bert_text_encoder_lora_merges_too(tmp_path):
    adapter = _adapter("preset:tiny-minilm", tmp_path / "adapter")
    merged = merge_adapter(adapter, tmp_path / "merged")
    live, _ = load_for_sampling(adapter)
    plain = load_base(str(merged))
    a = encode_prompts(live.tokenizer, live.text_encoder, REPORTS)
    b = encode_prompts(plain.tokenizer, plain.text_encoder, REPORTS)
    without = load_base("preset:tiny-minilm")
    c = encode_prompts(without.tokenizer, without.text_encoder, REPORTS)
    # float32 rounding of merged against separate LoRA matmuls grows over the encoder's layers and differs
    # between CPUs (1.2e-4 at a scale of 5.6 seen on one): bound it by the embeddings' size
    scale = a.abs().max()
    assert (a - b).abs().max() <= 1e-4 * scale
    assert (a - c).abs().max() > 1e-2 * scale  # the adapter does change the encoder, so the bound means something


def test_merge_refuses_pipelines_and_used_folders(tmp_path, tiny_base_path):
    with pytest.raises(InputError, match="nothing to merge"):
        merge_adapter(tiny_base_path, tmp_path / "m")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not an empty folder"):
        merge_adapter(tiny_base_path, used)
    assert (used / "keep.txt").read_text() == "x"


def test_export_and_init_model_commands(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["init-model", "tiny", "--out", str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny" / "model_index.json").exists() and str(tmp_path / "tiny") in result.output
    assert load_base(str(tmp_path / "tiny")).image_size == 64
    result = runner.invoke(main, ["init-model", "tiny", "--out", str(tmp_path / "tiny")])
    assert result.exit_code != 0 and "not empty" in result.output
    result = runner.invoke(main, ["init-model", "huge", "--out", str(tmp_path / "huge")])
    assert result.exit_code != 0 and "unknown model preset 'huge'" in result.output

    adapter = _adapter(str(tmp_path / "tiny"), tmp_path / "adapter")
    result = runner.invoke(main, ["export", "--model-path", str(adapter), "--format", "merged", "--out",
                                  str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    result = runner.invoke(main, ["export", "--model-path", str(adapter), "--format", "zip"])
    assert result.exit_code == 0 and (tmp_path / "adapter.zip").exists()
    result = runner.invoke(main, ["export", "--model-path", str(adapter)])
    assert result.exit_code != 0 and "--format" in result.output
    result = runner.invoke(main, ["export", "--model-path", str(adapter), "--merge"])  # one spelling: --format
    assert result.exit_code != 0 and "No such option '--merge'" in result.output
    result = runner.invoke(main, ["export", "--model-path", str(adapter), "--format", "merged"])
    assert result.exit_code != 0 and "--out" in result.output
