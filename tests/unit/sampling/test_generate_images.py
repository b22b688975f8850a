"""generate_images: seeded, batch-independent, template once, both encoder families, modes restored."""
import numpy as np
import pytest
import torch

from cxrdist.config import SCHEDULERS, LoraConfig, load_config
from cxrdist.errors import ConfigError, InputError
from cxrdist.models.loading import load_base, preset_folder
from cxrdist.models.lora import attach_lora, lora_parameters
from cxrdist.sampling.output import contact_sheet
from cxrdist.sampling.pipeline import SampleSettings, build_scheduler, generate_images

REPORTS = ["Mild cardiomegaly. No effusion.", "Normal heart size. Small left pleural effusion.", "Clear lungs."]
FAST = SampleSettings(steps=2, batch_size=8)


@pytest.fixture(scope="module")
def tiny(tiny_base_path):
    return load_base(tiny_base_path)


def test_same_seed_same_image_and_seeds_matter(tiny):
    a = generate_images(tiny, REPORTS, FAST, seeds=[1, 2, 3])
    b = generate_images(tiny, REPORTS, FAST, seeds=[1, 2, 3])
    c = generate_images(tiny, REPORTS, FAST, seeds=[4, 5, 6])
    assert a.shape == (3, 64, 64) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.01
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0.05


def test_image_does_not_depend_on_its_batch(tiny):
    together = generate_images(tiny, REPORTS, SampleSettings(steps=2, batch_size=3), seeds=[1, 2, 3])
    alone = generate_images(tiny, [REPORTS[1]], SampleSettings(steps=2, batch_size=1), seeds=[2])
    shuffled = generate_images(tiny, [REPORTS[2], REPORTS[1]], SampleSettings(steps=2, batch_size=2), seeds=[3, 2])
    assert np.allclose(together[1], alone[0], atol=1e-4)
    assert np.allclose(together[1], shuffled[1], atol=1e-4)
    assert np.allclose(together[2], shuffled[0], atol=1e-4)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs_and_is_reproducible(tiny, name):
    settings = SampleSettings(steps=3, scheduler=name, guidance=0.0)  # guidance <= 1 also skips CFG
    a = generate_images(tiny, REPORTS[:2], settings, seeds=[7, 8])
    assert np.array_equal(a, generate_images(tiny, REPORTS[:2], settings, seeds=[7, 8]))


def test_scheduler_table_builds_and_unknown_is_refused(tiny):
    dpm = build_scheduler("dpm++", tiny.scheduler_config)
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler" and dpm.config.algorithm_type == "dpmsolver++"
    with pytest.raises(InputError, match="unknown scheduler 'lms'"):
        build_scheduler("lms", tiny.scheduler_config)
    with pytest.raises(InputError, match="sampler setting scheduler='lms' must be one of dpm"):
        generate_images(tiny, REPORTS[:1], SampleSettings(steps=1, scheduler="lms"), seeds=[0])
    with pytest.raises(ConfigError, match="sample.scheduler"):
        load_config(None, ["sample.scheduler=lms"])


def test_template_applied_exactly_once(tiny, monkeypatch):
    import cxrdist.sampling.pipeline as sample

    seen = []
    real = sample.encode_prompts_masked

    def spy(tokenizer, text_encoder, prompts, warn=True, limit=77, **kwargs):  # kwargs: e.g. lowercase
        seen.extend(prompts)
        return real(tokenizer, text_encoder, prompts, warn=warn, limit=limit, **kwargs)

    monkeypatch.setattr(sample, "encode_prompts_masked", spy)
    generate_images(tiny, ["Normal heart.", "Normal heart."], SampleSettings(steps=1, negative_prompt="blurry"),
                    template="chest x-ray: {report}", seeds=[0, 1])
    assert seen == ["chest x-ray: Normal heart.", "blurry"]  # duplicates encoded once, negative not templated


def test_long_prompt_warns_what_was_cut(tiny, caplog):
    with caplog.at_level("WARNING"):
        generate_images(tiny, ["heart normal " * 40 + "zebra tail"], SampleSettings(steps=1), seeds=[0])
    assert "cut" in caplog.text and "zebra tail" in caplog.text


def test_live_adapters_keep_their_modes_and_grads(tiny_base_path):
    base = load_base(tiny_base_path)
    attach_lora(base, LoraConfig(unet_rank=2, text_rank=2, unet_dropout=0.1))
    base.unet.train()
    base.text_encoder.train()
    base.unet.conv_in.eval()  # a mixed state must come back as it was
    before = {n: (m.training) for n, m in base.unet.named_modules()}
    generate_images(base, REPORTS[:2], FAST, seeds=[0, 1])
    assert {n: m.training for n, m in base.unet.named_modules()} == before
    assert base.text_encoder.training and not base.vae.training
    assert all(p.requires_grad for p in lora_parameters(base.unet) + lora_parameters(base.text_encoder))
    assert not any(p.requires_grad for n, p in base.unet.named_parameters() if "lora_" not in n)


def test_bert_encoder_preset_samples():
    base = load_base(str(preset_folder("tiny-minilm")))
    images = generate_images(base, REPORTS[:2], SampleSettings(steps=2), seeds=[0, 1])
    assert images.shape == (2, 64, 64) and np.isfinite(images).all()


def test_bad_settings_are_one_line_errors(tiny):
    with pytest.raises(InputError, match="one seed per image"):
        generate_images(tiny, REPORTS, FAST, seeds=[0])
    with pytest.raises(InputError, match="multiple of 8"):
        generate_images(tiny, REPORTS[:1], SampleSettings(steps=1, height=60), seeds=[0])


def test_contact_sheet_tiles_images():
    images = np.zeros((5, 8, 8), dtype=np.float32)
    sheet = contact_sheet(images, pad=2)
    assert sheet.shape == (2 * 10 + 2, 3 * 10 + 2)
    assert sheet[2:10, 2:10].max() == 0.0 and sheet[0, 0] == 1.0


def test_bf16_autocast_runs_without_casting_weights(tiny):
    images = generate_images(tiny, REPORTS[:1], SampleSettings(steps=2), seeds=[0], dtype=torch.bfloat16)
    assert np.isfinite(images).all() and next(tiny.unet.parameters()).dtype == torch.float32


def test_incomplete_training_checkpoint_is_a_one_line_error(tmp_path):
    from cxrdist.errors import ModelError
    from cxrdist.sampling.loading import load_for_sampling

    step = tmp_path / "checkpoints" / "step_00000040"
    step.mkdir(parents=True)
    (step / "cxrdist_checkpoint.json").write_text('{"step": 40}')
    with pytest.raises(ModelError, match="step_00000040 has no adapter.safetensors: it is incomplete"):
        load_for_sampling(step)


@pytest.mark.parametrize("removed_first", ["config.yaml", "adapter.safetensors"])
def test_a_training_checkpoint_rotated_away_while_read_is_a_one_line_error(tmp_path, monkeypatch, removed_first):
    """Training removes old checkpoints (train.keep_last) while `cxrdist sample` may be reading one."""
    import shutil

    from safetensors.torch import save_file

    from cxrdist.errors import ModelError
    from cxrdist.sampling import loading

    step = tmp_path / "checkpoints" / "step_00000040"
    step.mkdir(parents=True)
    (step / "cxrdist_checkpoint.json").write_text('{"step": 40}')
    load_config(None, []).save(step / "config.yaml")
    save_file({"x": torch.zeros(1)}, str(step / "adapter.safetensors"))
    real_yaml, real_file = loading.load_yaml, loading.load_file

    def rotated(real, name):
        def read(path, *args, **kwargs):
            if str(path).endswith(name):
                shutil.rmtree(step)  # the trainer's rotation, between our check and our read
            return real(path, *args, **kwargs)
        return read

    monkeypatch.setattr(loading, "load_yaml", rotated(real_yaml, removed_first) if removed_first == "config.yaml"
                        else real_yaml)
    monkeypatch.setattr(loading, "load_file", rotated(real_file, removed_first)
                        if removed_first == "adapter.safetensors" else real_file)
    with pytest.raises(ModelError, match=r"step_00000040 was removed while being read \(training keeps only the "
                                         r"newest train.keep_last checkpoints\): use a newer step"):
        loading.load_for_sampling(step)
