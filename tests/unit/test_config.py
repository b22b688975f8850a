import pytest

from cxrdist.config import Config, config_from_dict, diff_configs, load_config, parse_overrides
from cxrdist.errors import ConfigError


def test_presets_carry_the_documented_values():
    dev = load_config("dev")
    assert (dev.train.epochs, dev.eval.k_folds, dev.train.batch_size, dev.data.image_size,
            dev.eval.inference_steps) == (1, 2, 8, 128, 20)
    product = load_config("product")
    assert (product.train.epochs, product.eval.k_folds, product.data.image_size) == (100, 5, 256)
    # 48 images per optimizer step, as the original project's product configuration, in micro-batches an L4 holds
    assert (product.train.batch_size, product.train.grad_accum) == (16, 3)


def test_overrides_apply_after_preset_with_types():
    cfg = load_config("dev", ["optim.lr_unet=2e-4", "lora.unet_targets=to_q,to_v", "train.caption_dropout=0"])
    assert cfg.optim.lr_unet == pytest.approx(2e-4)
    assert cfg.lora.unet_targets == ["to_q", "to_v"]
    assert cfg.train.caption_dropout == 0.0


@pytest.mark.parametrize("override, needle", [
    ("train.batchsize=4", "train.batchsize"),
    ("trian.epochs=1", "trian"),
    ("train.epochs=many", "train.epochs"),
    ("train.epochs", "section.key=value"),
    ("optim.name=sgd", "optim.name"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.report_to=neptune", "train.report_to"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config("dev", [override])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="dev"):
        load_config("nope")


def test_round_trip_through_file_and_dict(tmp_path):
    cfg = load_config("product", ["train.seed=7"])
    path = cfg.save(tmp_path / "config.yaml")
    again = load_config(str(path))
    assert again == cfg and again.hash() == cfg.hash()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_diff_names_changed_keys():
    a = Config()
    b = load_config(None, ["lora.unet_rank=4"])
    assert diff_configs(a, b) == ["lora.unet_rank: 8 -> 4"]
    assert parse_overrides(["a.b=1"]) == {"a": {"b": "1"}}  # raw text: merge reads it by the key's type
    assert load_config(None, ["lora.unet_rank=4"]).lora.unet_rank == 4
