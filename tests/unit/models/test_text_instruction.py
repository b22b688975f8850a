"""model.text_instruction=sana: prompts encoded after SanaPipeline's `complex_human_instruction`, as that pipeline
encodes them (the same contexts and masks to float precision), through every path that encodes text (training
batches trimmed to their longest report, the text cache, sampling), recorded in the export so that cxrdist and
plain diffusers draw the same image from it."""
from __future__ import annotations

import inspect

import pytest
import torch

from cxrdist.errors import ConfigError
from cxrdist.models.diffusion import BatchEncoder, LoraDiffusionModel
from cxrdist.models.text import Instruction, encode_prompts_masked, instruction_for, instruction_text

REPORTS = ["Small left pleural effusion. Normal heart size. No pneumothorax.", "Normal chest.", ""]


def _load(preset: str):
    from cxrdist.models.loading import load_base, preset_folder

    return load_base(str(preset_folder(preset)))


@pytest.fixture(scope="module")
def sana():
    return _load("sana-tiny")


def _default_instruction() -> list[str]:
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


def test_the_instruction_is_sanas_own_default_and_only_for_sana(sana):
    assert instruction_text("sana") == "\n".join(_default_instruction()) and instruction_text("none") is None
    assert instruction_for("none", sana) is None and instruction_for("sana", sana).tokens > 100
    with pytest.raises(ConfigError, match="model.text_instruction=sana applies to Sana bases; .* is PixArt-Σ"):
        instruction_for("sana", _load("pixart-sigma-tiny"))


def test_contexts_are_the_sana_pipelines_to_float_precision(sana):
    from cxrdist.sampling.pipeline import assemble_pipeline, build_scheduler

    instruction = instruction_for("sana", sana)
    pipe = assemble_pipeline(sana, build_scheduler("dpm++", sana.scheduler_config, sana.family))
    with torch.no_grad():
        ours, our_mask = encode_prompts_masked(sana.tokenizer, sana.text_encoder, REPORTS, limit=300, lowercase=True,
                                               instruction=instruction)
        for i, report in enumerate(REPORTS[:2]):
            theirs, their_mask, uncond, uncond_mask = pipe.encode_prompt(
                report, do_classifier_free_guidance=True, negative_prompt="", device="cpu", clean_caption=False,
                max_sequence_length=300, complex_human_instruction=_default_instruction())
            assert torch.equal(our_mask[i], their_mask[0])
            torch.testing.assert_close(ours[i], theirs[0], rtol=0, atol=1e-6)
        # the empty prompt is encoded without it, as the pipeline encodes its negative prompt
        assert torch.equal(our_mask[2], uncond_mask[0])
        torch.testing.assert_close(ours[2], uncond[0], rtol=0, atol=1e-6)
        plain, _ = encode_prompts_masked(sana.tokenizer, sana.text_encoder, REPORTS[:1], limit=300, lowercase=True)
    assert ours.shape == (3, 300, ours.shape[-1]) and (plain[0] - ours[0]).abs().max() > 1e-3


@pytest.mark.parametrize("cache", [0, 8], ids=["encoded", "cached"])
def test_training_batches_trimmed_or_cached_condition_the_denoiser_as_the_full_width_does(sana, cache):
    instruction = instruction_for("sana", sana)
    encoder = BatchEncoder(sana.vae, sana.tokenizer, "{report}", 0.0, context_tokens=300, lowercase=True,
                           instruction=instruction)
    ids, mask = encoder.token_ids(REPORTS)
    assert ids.shape[1] == instruction.width(300) and encoder.cut_prompts == 0
    model = LoraDiffusionModel(sana.unet, sana.text_encoder, False, text_cache_size=cache, family=sana.family,
                               instruction=instruction).eval()
    x = torch.randn(3, sana.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 500, 900])
    with torch.no_grad():
        contexts, cut_mask = encode_prompts_masked(sana.tokenizer, sana.text_encoder, REPORTS, limit=300,
                                                   lowercase=True, instruction=instruction)
        reference = sana.family.call_denoiser(sana.unet, x, t, contexts, cut_mask)
        for _ in range(2):  # with a cache: a miss, then hits
            torch.testing.assert_close(model(x, t, ids, mask), reference, rtol=0, atol=1e-5)


def test_the_export_records_it_and_plain_diffusers_draws_the_same_image(sana, tmp_path):
    import numpy as np
    from diffusers import SanaPipeline

    from cxrdist.config import LoraConfig
    from cxrdist.models.loading import preset_folder
    from cxrdist.models.lora import adapter_metadata, adapter_state_dicts, attach_lora, save_adapter
    from cxrdist.sampling.loading import load_for_sampling
    from cxrdist.sampling.pipeline import SampleSettings, build_scheduler, generate_images

    base = _load("sana-tiny")
    base.instruction = instruction_for("sana", base)
    spec = attach_lora(base, LoraConfig(unet_rank=4, unet_alpha=8, train_text_encoder=False))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    unet_sd, _ = adapter_state_dicts(base.unet, base.text_encoder)
    folder = save_adapter(tmp_path / "adapter", unet_sd, None, adapter_metadata(base, spec, "{report}"))
    loaded, meta = load_for_sampling(folder)
    assert meta["text_instruction"] == instruction_text("sana") and loaded.instruction == base.instruction
    settings = SampleSettings(steps=4, scheduler="dpm++", guidance=3.0, batch_size=1)
    ours = generate_images(loaded, [REPORTS[0]], settings, seeds=[7])[0]

    pipe = SanaPipeline.from_pretrained(str(preset_folder("sana-tiny")))
    pipe.scheduler = build_scheduler("dpm++", dict(pipe.scheduler.config), base.family)
    pipe.load_lora_weights(str(folder))
    with torch.no_grad():  # the pipeline's default complex_human_instruction: what the adapter was trained after
        image = pipe(REPORTS[0], num_inference_steps=4, guidance_scale=3.0, height=64, width=64, output_type="np",
                     generator=[torch.Generator("cpu").manual_seed(7)], use_resolution_binning=False).images[0]
    theirs = np.asarray(image, dtype=np.float32).mean(axis=-1)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    assert isinstance(loaded.instruction, Instruction)
