"""kohya-format LoRA export: diffusers' own kohya loader gives the adapter's images; names, alphas, refusals, CLI."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cxrdist.cli import main
from cxrdist.config import LoraConfig
from cxrdist.errors import InputError, ModelError
from cxrdist.models.loading import load_base
from cxrdist.models.lora import (WEIGHTS_NAME, adapter_metadata, adapter_state_dicts, attach_lora,
                                 lora_parameters, save_adapter)
from cxrdist.models.text import encode_prompts
from cxrdist.sampling.kohya import KOHYA_FORMAT, export_kohya
from cxrdist.sampling.loading import load_for_sampling
from cxrdist.sampling.pipeline import SampleSettings, assemble_pipeline, build_scheduler, generate_images
from support.folders import tree_hash

REPORTS = ["Mild cardiomegaly.", "Small right effusion."]
TEMPLATE = "cxr: {report}"
SEEDS = [3, 4]
# alpha != rank on both parts, so a file that drops the alphas (scale 1) gives other images
UNET_RANK, UNET_ALPHA, TEXT_RANK, TEXT_ALPHA = 4, 2.0, 2, 6.0


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A cxrdist adapter on the tiny preset (CLIP text encoder) with nonzero LoRA weights on UNet and text encoder."""
    base = load_base("preset:tiny")
    spec = attach_lora(base, LoraConfig(unet_rank=UNET_RANK, unet_alpha=UNET_ALPHA, text_rank=TEXT_RANK,
                                        text_alpha=TEXT_ALPHA))
    generator = torch.Generator().manual_seed(7)
    for param in lora_parameters(base.unet) + lora_parameters(base.text_encoder):
        param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return save_adapter(tmp_path_factory.mktemp("kohya") / "adapter",
                        *adapter_state_dicts(base.unet, base.text_encoder),
                        adapter_metadata(base, spec, TEMPLATE))


def _load_with_diffusers(kohya_file):
    """A fresh tiny base with the kohya file loaded by diffusers' own `load_lora_weights` (its kohya converter)."""
    base = load_base("preset:tiny")
    assemble_pipeline(base, build_scheduler("ddpm", base.scheduler_config)).load_lora_weights(str(kohya_file))
    return base


def _images(base):
    return generate_images(base, REPORTS, SampleSettings(steps=2), template=TEMPLATE, seeds=SEEDS)


def _embeddings(base):
    return encode_prompts(base.tokenizer, base.text_encoder, [TEMPLATE.format(report=r) for r in REPORTS])


def test_kohya_file_loaded_by_diffusers_gives_the_adapters_images(adapter, tmp_path):
    before = tree_hash(adapter)
    done = export_kohya(adapter, tmp_path / "cxr.safetensors")
    assert tree_hash(adapter) == before  # the adapter is only read
    assert done.path == tmp_path / "cxr.safetensors" and done.unet_modules > 0 and done.text_modules > 0

    kohya = _load_with_diffusers(done.path)
    assert getattr(kohya.unet, "peft_config", None) and getattr(kohya.text_encoder, "peft_config", None)
    live, _ = load_for_sampling(adapter)  # the diffusers-format adapter, loaded the cxrdist way
    plain = load_base("preset:tiny")

    expected, got, untouched = _images(live), _images(kohya), _images(plain)
    assert np.allclose(got, expected, atol=2e-3)
    assert np.abs(untouched - expected).max() > 1e-2  # the adapter matters, so the match above means something
    # the text-encoder LoRA arrived too, with its own alpha
    assert torch.allclose(_embeddings(kohya), _embeddings(live), atol=1e-5)
    assert (_embeddings(plain) - _embeddings(live)).abs().max() > 1e-3

    # The alphas carry the scale: the same tensors with alpha = rank (what a converter that drops lora_alpha
    # writes) load fine and give other images.
    tensors = load_file(str(done.path))
    for key in tensors:
        if key.endswith(".alpha"):
            tensors[key] = torch.tensor(float(UNET_RANK if key.startswith("lora_unet_") else TEXT_RANK))
    save_file(tensors, str(tmp_path / "alpha_is_rank.safetensors"))
    wrong = _images(_load_with_diffusers(tmp_path / "alpha_is_rank.safetensors"))
    assert np.abs(wrong - expected).max() > 1e-2


def test_kohya_key_names_alphas_and_metadata(adapter, tmp_path):
    out = export_kohya(adapter, tmp_path / "cxr.safetensors").path
    kohya = load_file(str(out))
    peft = load_file(str(adapter / WEIGHTS_NAME))

    unet_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te_q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # SD 1.x kohya spelling, original CLIP layout
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(kohya[f"{unet_q}.lora_down.weight"], peft[f"{prefix}.lora_A.weight"])
    assert torch.equal(kohya[f"{unet_q}.lora_up.weight"], peft[f"{prefix}.lora_B.weight"])
    assert f"{unet_q.replace('to_q', 'to_out_0')}.lora_up.weight" in kohya
    te_prefix = next(k for k in peft if k.endswith("layers.0.self_attn.q_proj.lora_A.weight")).rsplit(".lora_A", 1)[0]
    assert torch.equal(kohya[f"{te_q}.lora_down.weight"], peft[f"{te_prefix}.lora_A.weight"])

    modules = {k.split(".")[0] for k in kohya}
    assert all(m.startswith(("lora_unet_", "lora_te_")) and "." not in m for m in modules)
    assert not any(m.startswith("lora_te1_") for m in modules)
    # every module has exactly down, up and a scalar alpha; nothing else is in the file
    assert sorted(kohya) == sorted(f"{m}.{s}" for m in modules for s in ("alpha", "lora_down.weight", "lora_up.weight"))
    assert len(modules) == len(peft) // 2
    for module in modules:
        alpha = kohya[f"{module}.alpha"]
        assert alpha.ndim == 0 and alpha.item() == (UNET_ALPHA if module.startswith("lora_unet_") else TEXT_ALPHA)
        assert kohya[f"{module}.lora_down.weight"].shape[0] == (
            UNET_RANK if module.startswith("lora_unet_") else TEXT_RANK)

    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(UNET_RANK), str(UNET_ALPHA))
    assert (meta["cxrdist_text_encoder_dim"], meta["cxrdist_text_encoder_alpha"]) == (str(TEXT_RANK), str(TEXT_ALPHA))
    assert meta["ss_sd_model_name"] == "preset:tiny" and meta["ss_network_train_unet_only"] == "False"
    assert meta["cxrdist_format"] == KOHYA_FORMAT and meta["cxrdist_prompt_template"] == TEMPLATE
    assert meta["cxrdist_synthetic"] == "true" and "synthetic" in meta["ss_training_comment"]
    assert meta["cxrdist_source_sha256"] == hashlib.sha256((adapter / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert not list(tmp_path.glob("*.cxrdist-tmp"))


def _edited_copy(adapter, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(adapter, copy)
    meta = json.loads((copy / "cxrdist.json").read_text())
    edit(meta)
    (copy / "cxrdist.json").write_text(json.dumps(meta))
    return copy


def test_kohya_export_refusals(adapter, tmp_path, tiny_base_path):
    out = tmp_path / "cxr.safetensors"
    with pytest.raises(ModelError, match="full pipeline, not a LoRA adapter"):
        export_kohya(tiny_base_path, out)
    with pytest.raises(ModelError, match="is a file"):
        export_kohya(adapter / WEIGHTS_NAME, out)
    with pytest.raises(ModelError, match="not found"):
        export_kohya(tmp_path / "nothing", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no cxrdist.json: not a cxrdist LoRA adapter folder"):
        export_kohya(tmp_path / "empty", out)
    with pytest.raises(InputError, match=r"must end in \.safetensors"):
        export_kohya(adapter, tmp_path / "cxr.ckpt")
    bert = _edited_copy(adapter, tmp_path, lambda m: m["base"].update(text_encoder="bert"))
    with pytest.raises(ModelError, match="bert text encoder"):
        export_kohya(bert, out)
    shutil.rmtree(bert)
    wrong_rank = _edited_copy(adapter, tmp_path, lambda m: m["adapter"]["unet"].update(rank=8))
    with pytest.raises(ModelError, match="not of rank 8 as cxrdist.json records"):
        export_kohya(wrong_rank, out)
    assert not out.exists() and not list(tmp_path.glob("*.cxrdist-tmp"))  # refusals write nothing

    out.write_bytes(b"keep")
    with pytest.raises(InputError, match="already exists"):
        export_kohya(adapter, out)
    assert out.read_bytes() == b"keep"


def test_kohya_write_is_atomic(adapter, tmp_path, monkeypatch):
    import cxrdist.fileio

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cxrdist.fileio.os, "fsync", full_disk)
    with pytest.raises(InputError, match=r"disk full while writing .*cxr\.safetensors: free space"):
        export_kohya(adapter, tmp_path / "cxr.safetensors")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary name


def test_export_command_kohya_and_format_flag(adapter, tmp_path):
    runner = CliRunner()
    out = tmp_path / "lora" / "cxr.safetensors"
    result = runner.invoke(main, ["export", "--model-path", str(adapter), "--format", "kohya", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and str(out) in result.output and "kohya LoRA" in result.output
    result = runner.invoke(main, ["export", "--model-path", str(adapter), "--format", "kohya", "--out", str(out)])
    assert result.exit_code == 1 and "Error:" in result.output and "already exists" in result.output

    result = runner.invoke(main, ["export", "--model-path", str(adapter), "--format", "kohya"])
    assert result.exit_code == 1 and "--out FILE.safetensors" in result.output
    result = runner.invoke(main, ["export", "--model-path", str(adapter), "--format", "kohya", "--base",
                                  "preset:tiny", "--out", str(tmp_path / "b.safetensors")])
    assert result.exit_code == 1 and "--base only applies" in result.output
    assert not (tmp_path / "b.safetensors").exists()

    # the other formats under the same flag
    result = runner.invoke(main, ["export", "--model-path", str(adapter), "--format", "zip",
                                  "--out", str(tmp_path / "a.zip")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.zip").is_file()
