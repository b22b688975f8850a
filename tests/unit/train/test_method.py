"""train.method: what a run trains (cxrdist.models.trained) and how the config refuses what `full` would not read."""
from __future__ import annotations

import pytest
import torch

from cxrdist.config import Config, load_config
from cxrdist.errors import ConfigError


def test_method_is_lora_or_full():
    assert Config().train.method == "lora"
    with pytest.raises(ConfigError, match="'train.method' must be lora or full"):
        load_config(overrides=["train.method=dreambooth"])


def test_full_refuses_the_adapter_settings_it_would_not_read():
    assert load_config(overrides=["train.method=full"]).train.method == "full"
    with pytest.raises(ConfigError, match=r"^lora.unet_rank, lora.unet_targets set, but train.method=full .*"
                                          r"remove them \(or use train.method=lora\)$"):
        load_config(overrides=["train.method=full", "lora.unet_rank=4", "lora.unet_targets=[to_q]"])


def test_full_trains_every_denoiser_weight_and_nothing_else(tiny_base_path):
    from cxrdist.models.loading import load_base
    from cxrdist.models.trained import attach_training, fully_trained, trained_named_parameters

    base = load_base(tiny_base_path)
    spec = attach_training(base, load_config(overrides=["train.method=full"]))
    assert spec == {"method": "full", "denoiser": "UNet2DConditionModel", "text_encoder": None}
    assert fully_trained(base.unet) and not trained_named_parameters(base.text_encoder)
    assert not getattr(base.unet, "peft_config", None)


@pytest.mark.parametrize("deepspeed, unet_dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_a_fully_trained_denoiser_stays_fp32_under_autocast_and_is_cast_for_deepspeed(tiny_base_path, deepspeed,
                                                                                      unet_dtype):
    """accelerate's bf16 autocast computes from fp32 weights (rounding the base to bf16 and back would lose its
    precision before the first step); DeepSpeed computes from bf16 weights and keeps fp32 masters itself."""
    from cxrdist.models.diffusion import LoraDiffusionModel
    from cxrdist.models.loading import load_base
    from cxrdist.models.trained import attach_training
    from cxrdist.train.model_setup import configure_model

    cfg = load_config(overrides=["train.method=full", "train.mixed_precision=bf16"])
    base = load_base(tiny_base_path)
    before = base.unet.conv_in.weight.detach().clone()
    attach_training(base, cfg)
    model = LoraDiffusionModel(base.unet, base.text_encoder, False, family=base.family)
    configure_model(model, cfg, torch.bfloat16, deepspeed=deepspeed)
    assert {p.dtype for p in base.unet.parameters()} == {unet_dtype}
    assert {p.dtype for p in base.text_encoder.parameters()} == {torch.bfloat16}  # frozen: the compute dtype
    if not deepspeed:
        assert torch.equal(base.unet.conv_in.weight, before)  # not rounded on the way


def test_an_fsdp_launch_is_refused_in_one_line():
    from cxrdist.train.distributed import refuse_fsdp

    refuse_fsdp({"ACCELERATE_USE_FSDP": "false"})
    with pytest.raises(ConfigError, match=r"^FSDP launches are not supported yet: shard the model with DeepSpeed "
                                          r"ZeRO-3 instead \(accelerate launch --config_file "
                                          r"configs/accelerate/zero3.yaml \.\.\.\)$"):
        refuse_fsdp({"ACCELERATE_USE_FSDP": "true"})


def test_a_fully_trained_text_encoder_is_refused_under_zero3_and_lora_runs_get_whole_embedding_blocks(tiny_base_path):
    from deepspeed.utils import z3_leaf_module

    from cxrdist.models.loading import load_base
    from cxrdist.train.distributed import prepare_text_encoder_for_zero3

    base = load_base(tiny_base_path)
    with pytest.raises(ConfigError, match=r"^train.train_text_encoder=true is not supported under DeepSpeed ZeRO-3 "):
        prepare_text_encoder_for_zero3(base.text_encoder, {"method": "full", "text_encoder": "CLIPTextModel"})
    assert prepare_text_encoder_for_zero3(base.text_encoder, {"method": "full", "text_encoder": None}) == ["embeddings"]
    assert z3_leaf_module(dict(base.text_encoder.named_modules())["embeddings"])


def test_train_text_encoder_belongs_to_full_fine_tuning():
    assert load_config(overrides=["train.method=full", "train.train_text_encoder=true"]).train.train_text_encoder
    with pytest.raises(ConfigError, match=r"'train.train_text_encoder' must be false with train.method=lora "
                                          r"\(an adapter on the text encoder is lora.train_text_encoder\)"):
        load_config(overrides=["train.train_text_encoder=true"])


def test_a_second_fold_starts_from_the_pristine_base_and_a_one_process_full_run_resumes_exactly(tmp_path):
    """In one process (as --all-folds runs folds): a Trainer built after another trained fully starts from the base's
    own weights, never the previous fold's; and a run resumed from its step-1 checkpoint (trained.safetensors, no
    DeepSpeed) ends at the uninterrupted run's weights bit for bit."""
    import json

    from support.fakes import make_trainer, reset_accelerate

    from cxrdist.models.loading import load_base, preset_folder

    full = ["train.method=full", "lora.train_text_encoder=false", "optim.lr_unet=1e-3", "train.max_steps=2",
            "train.checkpoint_every=1"]
    pristine = dict(load_base(str(preset_folder("tiny"))).unet.named_parameters())

    def digest(run):
        return json.loads((run / "fold0" / "adapter_digests.json").read_text())["per_rank"]

    reset_accelerate()
    first = make_trainer(tmp_path / "first", *full)
    first.fit()
    first.close()
    reset_accelerate()
    second = make_trainer(tmp_path / "second", *full)
    assert all(torch.equal(p, pristine[name]) for name, p in second.base.unet.named_parameters())
    second.fit()
    second.close()
    reset_accelerate()
    checkpoint = tmp_path / "second" / "fold0" / "checkpoints" / "step_00000001"
    assert (checkpoint / "trained.safetensors").is_file()
    resumed = make_trainer(tmp_path / "resumed", *full, resume=str(checkpoint))
    resumed.fit()
    resumed.close()
    reset_accelerate()
    assert digest(tmp_path / "first") == digest(tmp_path / "second") == digest(tmp_path / "resumed")
