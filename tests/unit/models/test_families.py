"""PixArt-Σ and Sana bases through the same trainer, sampler and export: the tiny presets of both families,
checked against the computations diffusers' own training scripts and pipelines define."""
from __future__ import annotations

import json

import pytest
import torch

from cxrdist.errors import InputError, ModelError
from support.fakes import make_trainer, reset_accelerate

FAMILY_PRESETS = {"sana": "sana-tiny", "pixart-sigma": "pixart-sigma-tiny"}
TRANSFORMER_LORA = ["lora.train_text_encoder=false", "lora.unet_rank=4", "lora.unet_alpha=4"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_paths():
    from cxrdist.models.loading import preset_folder

    return {family: str(preset_folder(preset)) for family, preset in FAMILY_PRESETS.items()}


def _load(path):
    from cxrdist.models.loading import load_base

    return load_base(path)


@pytest.mark.parametrize("family, denoiser, vae, encoder", [
    ("sana", "SanaTransformer2DModel", "AutoencoderDC", "Gemma2Model"),
    ("pixart-sigma", "PixArtTransformer2DModel", "AutoencoderKL", "T5EncoderModel"),
])
def test_family_read_from_model_index(base_paths, family, denoiser, vae, encoder):
    base = _load(base_paths[family])
    assert base.family.name == family
    assert (type(base.unet).__name__, type(base.vae).__name__, type(base.text_encoder).__name__) == (denoiser, vae,
                                                                                                     encoder)
    assert base.context_tokens == 300 and base.image_size == 64 and base.channels == 3


def test_unsupported_pipeline_names_the_supported_ones(tmp_path, base_paths):
    import shutil

    folder = tmp_path / "flux"
    shutil.copytree(base_paths["sana"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ModelError) as caught:
        _load(str(folder))
    message = str(caught.value)
    assert "FluxPipeline" in message and "\n" not in message
    assert all(name in message for name in ("StableDiffusionPipeline", "PixArtSigmaPipeline", "SanaPipeline"))


# diffusers' `--weighting_scheme` -> (train.flow_timesteps, train.flow_loss_weight): the script draws and weights
# with one key; cxrdist's two keys cover each of its choices
SCRIPT_SCHEMES = {"none": ("uniform", "none"), "logit_normal": ("logit_normal", "none"), "mode": ("mode", "none"),
                  "sigma_sqrt": ("uniform", "sigma_sqrt"), "cosmap": ("uniform", "cosmap")}


@pytest.mark.parametrize("scheme", sorted(SCRIPT_SCHEMES))
def test_flow_objective_is_diffusers_sana_script(base_paths, scheme):
    """Timesteps, noisy input, target and loss as train_dreambooth_lora_sana.py computes them for each of its
    `--weighting_scheme` choices (logit mean 0.3, std 0.8, mode scale 1.29), written out here from the script."""
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler

    from cxrdist.models.diffusion import DiffusionObjective, FlowSettings

    base = _load(base_paths["sana"])
    density, weight = SCRIPT_SCHEMES[scheme]
    settings = FlowSettings(timesteps=density, logit_mean=0.3, logit_std=0.8, mode_scale=1.29, loss_weight=weight)
    objective = DiffusionObjective(base.scheduler_config, objective="flow", flow=settings)
    x0 = torch.randn(6, 8, 8, 8)
    noise = torch.randn(6, 8, 8, 8)
    timesteps = objective.sample_timesteps(6, torch.Generator().manual_seed(3))
    noisy, target = objective.noisy_inputs(x0, noise, timesteps)

    # the script's lines, on the same draws
    reference = FlowMatchEulerDiscreteScheduler.from_config(base.scheduler_config)
    generator = torch.Generator().manual_seed(3)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(mean=0.3, std=0.8, size=(6,), generator=generator))
    else:
        u = torch.rand(6, generator=generator)
        if scheme == "mode":
            u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    indices = (u * reference.config.num_train_timesteps).long()
    ref_t = reference.timesteps[indices]
    step_indices = [(reference.timesteps == t).nonzero().item() for t in ref_t]
    sigmas = reference.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    assert torch.equal(timesteps, ref_t)
    assert torch.equal(noisy, (1.0 - sigmas) * x0 + sigmas * noise)
    assert torch.equal(target, noise - x0)
    weighting = {"sigma_sqrt": sigmas ** -2.0, "cosmap": 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))}.get(
        scheme, torch.ones_like(sigmas)).float()
    pred = torch.randn_like(x0)
    ref_loss = torch.mean((weighting * (pred.float() - target.float()) ** 2).reshape(6, -1), 1).mean()
    torch.testing.assert_close(objective.per_sample_loss(pred, target, timesteps).mean(), ref_loss, rtol=1e-6, atol=0)
    # validation reads the unweighted loss, whatever the training weighting
    unweighted = torch.mean(((pred - target) ** 2).reshape(6, -1), 1)
    torch.testing.assert_close(objective.per_sample_loss(pred, target, timesteps, weighted=False), unweighted)


def test_flow_settings_are_refused_for_ddpm_bases_and_with_a_timestep_bias(base_paths):
    from cxrdist.config import load_config
    from cxrdist.errors import ConfigError
    from cxrdist.models.diffusion import DiffusionObjective, FlowSettings

    with pytest.raises(ModelError, match="flow-matching bases"):
        DiffusionObjective(_load(base_paths["pixart-sigma"]).scheduler_config, flow=FlowSettings(loss_weight="cosmap"))
    with pytest.raises(ConfigError, match="train.flow_timesteps"):
        load_config(None, ["train.flow_timesteps=logit_normal", "train.timestep_bias=later",
                           "train.timestep_bias_multiplier=2"])
    with pytest.raises(ConfigError, match="train.flow_loss_weight"):
        load_config(None, ["train.flow_loss_weight=snr"])


def test_flow_objective_refuses_min_snr(base_paths):
    from cxrdist.models.diffusion import DiffusionObjective

    with pytest.raises(ModelError, match="train.snr_gamma=0"):
        DiffusionObjective(_load(base_paths["sana"]).scheduler_config, snr_gamma=5.0, objective="flow")


def test_pixart_prediction_is_the_noise_half(base_paths):
    """The trained module's prediction is the first half of PixArt-Σ's learned-sigma output, as diffusers' PixArt
    scripts and pipeline take it, with the text's attention mask passed to the transformer. The batch is cut to its
    longest report first: the same prediction as at the full 300 tokens, to float precision."""
    from cxrdist.models.diffusion import LoraDiffusionModel, trim_padding
    from cxrdist.models.text import tokenize

    base = _load(base_paths["pixart-sigma"])
    model = LoraDiffusionModel(base.unet, base.text_encoder, False, family=base.family)
    ids, mask = tokenize(base.tokenizer, ["Small left effusion.", "Normal heart."], limit=base.context_tokens)
    assert ids.shape[1] == 300 and mask.sum() < mask.numel()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ours = model(x, t, ids, mask)
        outputs = []
        for text_ids, text_mask in ((ids, mask), trim_padding(ids, mask)):
            context = base.text_encoder(text_ids, attention_mask=text_mask)[0]
            outputs.append(base.unet(x, encoder_hidden_states=context, encoder_attention_mask=text_mask, timestep=t,
                                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample)
    full, trimmed = outputs
    assert full.shape[1] == 8 and trim_padding(ids, mask)[0].shape[1] == int(mask.sum(1).max()) < 300
    assert torch.equal(ours, trimmed.chunk(2, dim=1)[0])
    torch.testing.assert_close(ours, full.chunk(2, dim=1)[0], rtol=0, atol=1e-5)


def test_text_cache_keeps_each_report_at_its_own_length(base_paths):
    """Under a transformer family the frozen-text cache holds a report's context at the report's length (its bytes
    are tokens x width, not the 300-token budget), keys a report the same at any padded width, and a batch served
    from it predicts what the uncached model does, to float precision."""
    from cxrdist.models.diffusion import LoraDiffusionModel
    from cxrdist.models.text import tokenize

    base = _load(base_paths["sana"])
    cached = LoraDiffusionModel(base.unet, base.text_encoder, False, text_cache_size=8, family=base.family)
    plain = LoraDiffusionModel(base.unet, base.text_encoder, False, family=base.family)
    reports = ["Small left effusion.", "Normal heart. Lungs are clear. No pneumothorax or effusion."]
    ids, mask = tokenize(base.tokenizer, reports, limit=base.context_tokens)
    x, t = torch.randn(2, 8, 8, 8), torch.tensor([100.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(cached(x, t, ids, mask), plain(x, t, ids, mask), rtol=0, atol=1e-5)
        cached(x[:1], t[:1], ids[:1], mask[:1])  # the short report alone: a narrower batch, the same key
    assert cached.text_cache.trim and (cached.text_cache.misses, cached.text_cache.hits) == (2, 1)
    lengths = sorted(len(context) for context in cached.text_cache.store.values())
    assert lengths == sorted(mask.sum(1).tolist()) and max(lengths) < 300
    assert cached.text_cache.nbytes() == sum(lengths) * 64 * 4  # tokens x the encoder's width x fp32
    bound = cached.text_cache.describe_bound(base.text_encoder, base.context_tokens)
    assert bound.startswith("at most 8 reports x 300 tokens x 64 channels x 4 bytes")

    # the prefill stores what a first-sight encode computes, bit for bit, at each report's own length
    from cxrdist.train.text_prefill import prefill_text_cache

    class OneRank:
        num_processes, process_index, device = 1, 0, torch.device("cpu")

    filled = LoraDiffusionModel(base.unet, base.text_encoder, False, text_cache_size=8, family=base.family)
    assert prefill_text_cache(OneRank(), filled.text_cache, base.text_encoder, base.tokenizer, reports,
                              base.context_tokens) == 2
    for key, context in cached.text_cache.store.items():
        assert torch.equal(filled.text_cache.store[key], context)


@pytest.mark.parametrize("family", ["sana", "pixart-sigma"])
def test_lora_trains_and_only_adapters_change(tmp_path, family, fresh_accelerate):
    from cxrdist.train.validation import build_loss_set, diffusion_loss

    trainer = make_trainer(tmp_path, f"model.pretrained=preset:{FAMILY_PRESETS[family]}", *TRANSFORMER_LORA,
                           "optim.lr_unet=1e-2", "train.caption_dropout=0", n_train=8)
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        data = build_loss_set(trainer.data.train_batches(0), trainer.encoder, "cpu", 0)
        loss0 = diffusion_loss(trainer.model, trainer.objective, data, [100, 500, 900], 8, trainer.accelerator)
        micro, stepped = 0, 0
        for epoch in range(15):
            for batch in trainer.data.train_batches(epoch):
                stepped += trainer.train_step(batch, micro)["stepped"]
                micro += 1
        loss1 = diffusion_loss(trainer.model, trainer.objective, data, [100, 500, 900], 8, trainer.accelerator)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    finally:
        trainer.close()
    assert stepped == 30 and loss1 < loss0
    assert changed and all("lora_" in n for n in changed)


@pytest.mark.parametrize("family", ["sana", "pixart-sigma"])
def test_text_encoder_lora_refused_in_one_line(tmp_path, family, fresh_accelerate):
    with pytest.raises(ModelError) as caught:
        make_trainer(tmp_path, f"model.pretrained=preset:{FAMILY_PRESETS[family]}", "lora.train_text_encoder=true")
    assert "lora.train_text_encoder=false" in str(caught.value) and "\n" not in str(caught.value)


def _adapted(base_path, seed=0):
    """A base with a LoRA whose B factors are random (a zero-initialised adapter would change nothing)."""
    from cxrdist.config import LoraConfig
    from cxrdist.models.lora import attach_lora

    base = _load(base_path)
    spec = attach_lora(base, LoraConfig(unet_rank=4, unet_alpha=8, train_text_encoder=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return base, spec


def _export(base, spec, out):
    from cxrdist.models.lora import adapter_metadata, adapter_state_dicts, save_adapter

    unet_sd, _ = adapter_state_dicts(base.unet, base.text_encoder)
    return save_adapter(out, unet_sd, None, adapter_metadata(base, spec, "{report}"))


def _transformer_out(transformer, family, x, t, context, mask):
    from cxrdist.models.families import FAMILIES

    with torch.no_grad():
        return FAMILIES[family].call_denoiser(transformer, x, t, context, mask)


@pytest.mark.parametrize("family", ["sana", "pixart-sigma"])
def test_exported_adapter_loads_in_plain_diffusers(tmp_path, base_paths, family):
    """Sana: SanaPipeline.load_lora_weights; PixArt-Σ (no LoRA loader in diffusers): peft.PeftModel on the
    pipeline's transformer. Either way the transformer computes what cxrdist's adapted one does."""
    from diffusers import DiffusionPipeline

    from cxrdist.models.lora import load_adapter

    base, spec = _adapted(base_paths[family])
    folder = _export(base, spec, tmp_path / "adapter")
    x, t = torch.randn(2, base.unet.config.in_channels, 8, 8), torch.tensor([50, 700])
    context, mask = torch.randn(2, 300, 64), torch.ones(2, 300, dtype=torch.long)
    mask[1, 20:] = 0
    ours = _transformer_out(base.unet, family, x, t, context, mask)

    pipe = DiffusionPipeline.from_pretrained(base_paths[family])
    plain = _transformer_out(pipe.transformer, family, x, t, context, mask)
    assert not torch.allclose(plain, ours, atol=1e-4)  # the adapter does something
    if family == "sana":
        pipe.load_lora_weights(str(folder))
        theirs = _transformer_out(pipe.transformer, family, x, t, context, mask)
    else:
        from peft import PeftModel

        theirs = _transformer_out(PeftModel.from_pretrained(pipe.transformer, str(folder / "peft")), family, x, t,
                                  context, mask)
    assert torch.allclose(theirs, ours, atol=1e-5)

    fresh = _load(base_paths[family])
    meta = load_adapter(folder, fresh)
    assert meta["base"]["family"] == family
    saved, loaded = dict(base.unet.named_parameters()), dict(fresh.unet.named_parameters())
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[n], loaded[n]) for n in saved)
    assert torch.allclose(_transformer_out(fresh.unet, family, x, t, context, mask), ours, atol=1e-6)


@pytest.mark.parametrize("family", ["sana", "pixart-sigma"])
def test_cxrdist_sample_and_plain_diffusers_draw_the_same_image(tmp_path, base_paths, family):
    """The exported adapter in the family's plain diffusers pipeline (the README's loading lines), the same
    DPM-Solver++ scheduler, seed, steps and guidance: the image cxrdist's sampler draws, to float precision."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from cxrdist.sampling.pipeline import SampleSettings, build_scheduler, generate_images

    base, spec = _adapted(base_paths[family])
    folder = _export(base, spec, tmp_path / "adapter")
    report = "Small left pleural effusion. Normal heart size."
    settings = SampleSettings(steps=4, scheduler="dpm++", guidance=3.0, batch_size=1)
    ours = generate_images(base, [report], settings, seeds=[7])[0]

    pipe = DiffusionPipeline.from_pretrained(base_paths[family])
    pipe.scheduler = build_scheduler("dpm++", dict(pipe.scheduler.config), base.family)
    extra = {"use_resolution_binning": False, "complex_human_instruction": None} if family == "sana" else {
        "use_resolution_binning": False, "clean_caption": False}

    def draw() -> np.ndarray:
        with torch.no_grad():
            image = pipe(report, num_inference_steps=4, guidance_scale=3.0, height=64, width=64, output_type="np",
                         generator=[torch.Generator("cpu").manual_seed(7)], **extra).images[0]
        return np.asarray(image, dtype=np.float32).mean(axis=-1)  # cxrdist averages a 3-channel VAE's output

    assert np.abs(draw() - ours).max() > 1e-2  # without the adapter: another image
    if family == "sana":
        pipe.load_lora_weights(str(folder))
    else:
        from peft import PeftModel

        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(folder / "peft"))
    theirs = draw()  # Sana with complex_human_instruction=None: the adapter was trained on the report alone
    assert ours.shape == theirs.shape == (64, 64)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_adapter_refused_on_another_family(tmp_path, base_paths):
    from cxrdist.models.lora import load_adapter

    base, spec = _adapted(base_paths["sana"])
    folder = _export(base, spec, tmp_path / "adapter")
    with pytest.raises(ModelError, match="trained on a Sana base"):
        load_adapter(folder, _load(base_paths["pixart-sigma"]))


@pytest.mark.parametrize("family", ["sana", "pixart-sigma"])
def test_sampling_through_the_family_pipeline(tmp_path, base_paths, family):
    import numpy as np

    from cxrdist.sampling.pipeline import SampleSettings, generate_images

    base, _ = _adapted(base_paths[family])
    settings = SampleSettings(steps=3, scheduler="dpm++", guidance=3.0, batch_size=2)
    reports = ["Small left effusion.", "Normal heart.", "Large right pneumothorax."]
    images = generate_images(base, reports, settings, seeds=[1, 2, 3])
    assert images.shape == (3, 64, 64) and np.isfinite(images).all()
    again = generate_images(base, reports[1:2], settings, seeds=[2])  # image i depends on its report and seed only
    assert np.allclose(again[0], images[1], atol=1e-5)


def test_flow_family_samplers(base_paths):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cxrdist.sampling.pipeline import build_scheduler

    base = _load(base_paths["sana"])
    assert isinstance(build_scheduler("euler", base.scheduler_config, base.family), FlowMatchEulerDiscreteScheduler)
    dpm = build_scheduler("dpm++", base.scheduler_config, base.family)
    assert dpm.config.prediction_type == "flow_prediction" and dpm.config.use_flow_sigmas
    with pytest.raises(InputError, match="choose one of dpm\\+\\+, euler"):
        build_scheduler("ddim", base.scheduler_config, base.family)


@pytest.mark.parametrize("family", ["sana", "pixart-sigma"])
def test_merged_export_is_a_plain_family_pipeline(tmp_path, base_paths, family):
    from diffusers import DiffusionPipeline

    from cxrdist.sampling.merge import merge_adapter

    base, spec = _adapted(base_paths[family])
    folder = _export(base, spec, tmp_path / "adapter")
    x, t = torch.randn(1, base.unet.config.in_channels, 8, 8), torch.tensor([300])
    context, mask = torch.randn(1, 300, 64), torch.ones(1, 300, dtype=torch.long)
    ours = _transformer_out(base.unet, family, x, t, context, mask)
    merged = merge_adapter(folder, tmp_path / "merged")
    pipe = DiffusionPipeline.from_pretrained(str(merged))
    assert type(pipe).__name__ == {"sana": "SanaPipeline", "pixart-sigma": "PixArtSigmaPipeline"}[family]
    assert torch.allclose(_transformer_out(pipe.transformer, family, x, t, context, mask), ours, atol=1e-5)


def test_kohya_export_refused_for_transformers(tmp_path, base_paths):
    from cxrdist.sampling.kohya import export_kohya

    base, spec = _adapted(base_paths["sana"])
    folder = _export(base, spec, tmp_path / "adapter")
    with pytest.raises(ModelError, match="--format merged or zip"):
        export_kohya(folder, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def teardown_module():
    reset_accelerate()


def test_long_reports_are_read_whole_at_300_tokens(base_paths):
    """A 150-token report: cut at CLIP's 77, read whole by the transformer families' 300; counted per epoch."""
    from cxrdist.models.diffusion import BatchEncoder

    base = _load(base_paths["sana"])
    report = "Heart size is normal and the lungs are clear. " * 15
    reads = BatchEncoder(base.vae, base.tokenizer, "{report}", 0.0, context_tokens=base.context_tokens)
    ids, mask = reads.token_ids([report, "Normal."])
    assert ids.shape == (2, 300) and 77 < int(mask[0].sum()) < 300
    assert (reads.cut_prompts, reads.seen_prompts) == (0, 2)
    cuts = BatchEncoder(base.vae, base.tokenizer, "{report}", 0.0)  # SD's budget
    cuts.token_ids([report, "Normal."])
    assert (cuts.cut_prompts, cuts.seen_prompts) == (1, 2)


@pytest.mark.parametrize("family", ["sana", "pixart-sigma"])
def test_a_resumed_run_with_ema_ends_where_the_uninterrupted_one_does(tmp_path, family, fresh_accelerate):
    """4 steps with the adapter EMA, checkpoints and validation at 2 and 4; a run resumed from step 2 ends bit for
    bit at the same adapter and EMA, and the best export holds the EMA weights."""
    from safetensors.torch import load_file

    run = ["train.max_steps=4", "train.checkpoint_every=2", "eval.eval_every_steps=2", "optim.lr_unet=1e-2",
           "train.ema_decay=0.9", f"model.pretrained=preset:{FAMILY_PRESETS[family]}", *TRANSFORMER_LORA]

    def fit(folder, resume=None):
        reset_accelerate()
        trainer = make_trainer(folder, *run, resume=resume)
        try:
            trainer.fit()
        finally:
            trainer.close()
        return folder / "fold0"

    whole = fit(tmp_path / "whole")
    exported = {p.name: p.stat().st_mtime_ns for p in whole.glob("best_model_fold0_epoch*/*")}
    resumed = fit(tmp_path / "resumed", resume=str(whole / "checkpoints" / "step_00000002"))
    # the resumed run, in its own folder, exported its own best and left the first run's alone
    assert {p.name: p.stat().st_mtime_ns for p in whole.glob("best_model_fold0_epoch*/*")} == exported
    assert sorted(resumed.glob("best_model_fold0_epoch*"))
    for name in ("adapter.safetensors", "ema.safetensors"):
        a = load_file(str(whole / "checkpoints" / "step_00000004" / name))
        b = load_file(str(resumed / "checkpoints" / "step_00000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    best = sorted(whole.glob("best_model_fold0_epoch*"))[-1]
    assert json.loads((best / "cxrdist.json").read_text())["training"]["weights"] == "ema"
    card = (best / "README.md").read_text()
    assert {"sana": "complex_human_instruction=None", "pixart-sigma": "PeftModel.from_pretrained"}[family] in card


def test_flow_timestep_bias_weighs_timestep_values(base_paths):
    """train.timestep_bias means the same timesteps for a flow schedule (listed from 1000 down) as for DDPM's."""
    import functools

    from cxrdist.models.diffusion import DiffusionObjective, timestep_weights

    bias = functools.partial(timestep_weights, bias="range", multiplier=3.0, begin=0, end=500)
    objective = DiffusionObjective(_load(base_paths["sana"]).scheduler_config, timestep_weighting=bias,
                                   objective="flow")
    drawn = objective.sample_timesteps(20000, torch.Generator().manual_seed(0))
    share = float((drawn <= 500).float().mean())  # values 1..500 are weights 0..499
    assert abs(share - 0.75) < 0.02, share


def test_a_t5_tokenizer_shipped_as_spiece_model_loads(tmp_path, base_paths):
    """PixArt-Σ's tokenizer folder holds spiece.model and no tokenizer.json: loading it needs sentencepiece (a
    dependency), which this builds offline from a small SentencePiece model trained on reports."""
    import io
    import shutil

    import sentencepiece

    folder = tmp_path / "pixart"
    shutil.copytree(base_paths["pixart-sigma"], folder)
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    model = io.BytesIO()
    reports = ["Heart size is normal.", "Small left pleural effusion.", "Large right pneumothorax.",
               "Nodule in the left upper zone.", "No acute cardiopulmonary process."] * 40
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(reports), model_writer=model, vocab_size=40,
                                             model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                             minloglevel=2)
    (folder / "tokenizer" / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    base = _load(str(folder))
    assert type(base.tokenizer).__name__ == "T5Tokenizer"
    from cxrdist.models.text import tokenize

    ids, mask = tokenize(base.tokenizer, ["Small left pleural effusion."], limit=base.context_tokens)
    assert ids.shape == (1, 300)
    assert base.tokenizer.decode(ids[0][mask[0].bool()], skip_special_tokens=True) == "Small left pleural effusion."


def test_a_validation_sampler_that_does_not_fit_the_family_is_refused_before_training(tmp_path, fresh_accelerate):
    from cxrdist.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.scheduler=ddim does not fit Sana's noise schedule: choose one of "
                                          "dpm\\+\\+, euler"):
        make_trainer(tmp_path, "model.pretrained=preset:sana-tiny", *TRANSFORMER_LORA, "eval.scheduler=ddim")
