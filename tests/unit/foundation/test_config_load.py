import pytest

from cxrdist.config import Config, config_from_dict, diff_configs, load_config, parse_overrides
from cxrdist.errors import ConfigError


def test_presets_carry_the_documented_values():
    dev = load_config("dev")
    assert (dev.train.epochs, dev.eval.k_folds, dev.train.batch_size, dev.data.image_size,
            dev.validation_sampling()[0]) == (1, 0, 8, 64, 20)
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


def test_validation_draws_images_as_the_sample_section_says_unless_eval_sets_its_own():
    cfg = load_config(overrides=["sample.steps=7", "sample.scheduler=ddim", "sample.guidance=2.5"])
    assert (cfg.eval.inference_steps, cfg.eval.scheduler, cfg.eval.guidance) == (None, None, None)
    assert cfg.validation_sampling() == (7, "ddim", 2.5)  # one setting, not two kept equal by hand
    own = load_config(overrides=["sample.steps=7", "eval.inference_steps=3", "eval.guidance=1"])
    assert own.validation_sampling() == (3, "dpm++", 1.0)
    with pytest.raises(ConfigError, match="'eval.inference_steps' must be >= 1"):
        load_config(overrides=["eval.inference_steps=0"])


def test_a_run_saved_with_explicit_validation_sampling_resumes_under_the_null_that_means_the_same(tmp_path):
    """Checkpoints written before eval.* could be null hold `inference_steps: 25`; the same settings now are null +
    sample.steps 25: a resume compares the resolved values, so it is not refused."""
    from cxrdist.models.lora import CHECKPOINT_CONFIG, CHECKPOINT_MARKER
    from cxrdist.train.checkpoint import check_resumable

    old = load_config(overrides=["eval.inference_steps=25", "eval.scheduler=dpm++", "eval.guidance=4.0"])
    old.save(tmp_path / CHECKPOINT_CONFIG)
    (tmp_path / CHECKPOINT_MARKER).write_text('{"step": 2, "fold": 0}')
    check_resumable(tmp_path, load_config())  # null everywhere, sample.* at 25 / dpm++ / 4.0: the same run
    with pytest.raises(ConfigError, match=r"eval.inference_steps: 25 -> 10"):
        check_resumable(tmp_path, load_config(overrides=["sample.steps=10"]))


def test_dev_fits_the_shard_set_a_first_cxrdist_shard_phantom_writes():
    """`cxrdist shard phantom --out shards/phantom` with its defaults, then `--config dev`: the same image size, and
    no fold count pinned that the set does not have."""
    from click.testing import CliRunner

    from cxrdist.cli import main

    phantom = next(c for c in main.commands["shard"].commands.values() if c.name == "phantom")
    defaults = {p.name: p.default for p in phantom.params}
    dev = load_config("dev")
    assert dev.data.image_size == defaults["size"] and dev.eval.k_folds in (0, defaults["folds"])
    assert dev.data.shards == "shards/phantom"
    assert CliRunner().invoke(main, ["shard", "phantom", "--help"]).exit_code == 0


def test_the_run_hash_changes_with_what_trains_not_with_sampling_or_pretraining_settings():
    base = load_config()
    unread = ["sample.num_images=4", "sample.device=cpu", "pretrain.vae_steps=7"]
    assert load_config(overrides=unread).hash() == base.hash()
    assert load_config(overrides=["optim.lr_unet=3e-4"]).hash() != base.hash()
    # the sample section's sampler also draws validation images while eval.* is null: that changes a run
    assert load_config(overrides=["sample.steps=7"]).hash() != base.hash()
    assert load_config(overrides=["sample.steps=7", "eval.inference_steps=25"]).hash() == base.hash()
