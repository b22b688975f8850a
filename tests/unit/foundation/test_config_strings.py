"""String-typed keys keep their text: from `--set` as typed, from YAML files without YAML 1.1's yes/no booleans."""
import pytest

from cxrdist.config import Config, config_from_dict, load_config, load_yaml, parse_overrides, parse_yaml
from cxrdist.errors import ConfigError


@pytest.mark.parametrize("override, section, key, expected", [
    ("train.mixed_precision=no", "train", "mixed_precision", "no"),
    ("sample.negative_prompt=no", "sample", "negative_prompt", "no"),
    ("sample.negative_prompt=off", "sample", "negative_prompt", "off"),
    ("sample.negative_prompt=lateral view, text", "sample", "negative_prompt", "lateral view, text"),
    ("data.prompt_template=Chest X-ray: {report}", "data", "prompt_template", "Chest X-ray: {report}"),
    ("data.prompt_template=[PA] {report}", "data", "prompt_template", "[PA] {report}"),
    ("train.run_name=007", "train", "run_name", "007"),
    ("train.run_name=1e3", "train", "run_name", "1e3"),
    ("model.revision=main", "model", "revision", "main"),
    ("model.pretrained=models/a=b: c", "model", "pretrained", "models/a=b: c"),
])
def test_string_overrides_keep_their_text(override, section, key, expected):
    assert getattr(getattr(load_config(None, [override]), section), key) == expected


@pytest.mark.parametrize("override, section, key, expected", [
    ("eval.val_loss_timesteps=[200,600]", "eval", "val_loss_timesteps", [200, 600]),
    ("eval.val_loss_timesteps=200,600", "eval", "val_loss_timesteps", [200, 600]),
    ("lora.unet_targets=[to_q, to_v]", "lora", "unet_targets", ["to_q", "to_v"]),
    ("lora.text_targets=", "lora", "text_targets", []),
    ("train.batch_size=4", "train", "batch_size", 4),
    ("optim.lr_unet=2e-4", "optim", "lr_unet", 2e-4),
    ("optim.lr_unet=2.0e-4", "optim", "lr_unet", 2e-4),
    ("data.augment=true", "data", "augment", True),
    ("data.augment=yes", "data", "augment", True),
    ("data.augment=off", "data", "augment", False),
    ("model.revision=null", "model", "revision", None),
])
def test_other_overrides_are_read_as_yaml(override, section, key, expected):
    assert getattr(getattr(load_config(None, [override]), section), key) == expected


def test_parse_overrides_keeps_the_raw_text():
    parsed = parse_overrides(["data.prompt_template=Chest X-ray: {report}", "train.batch_size= 4"])
    assert parsed == {"data": {"prompt_template": "Chest X-ray: {report}"}, "train": {"batch_size": " 4"}}


def test_bad_yaml_in_an_override_names_the_key():
    with pytest.raises(ConfigError, match=r"eval\.val_loss_timesteps"):
        load_config(None, ["eval.val_loss_timesteps=[200,"])


def test_yaml_files_keep_no_off_yes_on_as_strings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  augment: on\ntrain:\n  mixed_precision: no\n  export_zip: no\n"
                    "sample:\n  negative_prompt: yes\n")
    assert load_yaml(path) == {"data": {"augment": "on"}, "train": {"mixed_precision": "no", "export_zip": "no"},
                               "sample": {"negative_prompt": "yes"}}
    cfg = load_config(str(path))
    assert (cfg.train.mixed_precision, cfg.data.augment, cfg.train.export_zip, cfg.sample.negative_prompt) == \
        ("no", True, False, "yes")
    assert parse_yaml("[true, False, .5, 3, null]") == [True, False, 0.5, 3, None]


def test_no_strings_survive_save_and_reload(tmp_path):
    cfg = load_config(None, ["train.mixed_precision=no", "sample.negative_prompt=no"])
    again = config_from_dict(load_yaml(cfg.save(tmp_path / "config.yaml")))
    assert again == cfg and again.hash() == cfg.hash()
    assert (again.train.mixed_precision, again.sample.negative_prompt) == ("no", "no")


def test_merge_still_takes_plain_values():
    # cxrdist sample merges its click flags (already typed) the same way.
    from cxrdist.config import merge

    cfg = merge(Config(), {"sample": {"negative_prompt": "no", "guidance": 2.5, "steps": 3}})
    assert (cfg.sample.negative_prompt, cfg.sample.guidance, cfg.sample.steps) == ("no", 2.5, 3)
