"""`cxrdist sample` end to end on the tiny preset: files, metadata, determinism, and every bad input."""
import json
import os
import shutil
import stat
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxrdist.cli import main
from cxrdist.config import LoraConfig
from cxrdist.models.loading import load_base
from cxrdist.models.lora import (adapter_metadata, adapter_state_dicts, attach_lora, lora_parameters,
                                 save_adapter)
from cxrdist.sampling.archive import write_zip

TEMPLATE = "chest x-ray: {report}"
FAST = ["--steps", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_base_path):
    """A LoRA checkpoint on preset:tiny with non-zero weights (so it changes the images)."""
    base = load_base("preset:tiny")
    spec = attach_lora(base, LoraConfig(unet_rank=4, text_rank=2))
    for param in lora_parameters(base.unet) + lora_parameters(base.text_encoder):
        param.data.normal_(std=0.05)
    folder = tmp_path_factory.mktemp("ckpt") / "best_model_fold3_epoch7"
    return save_adapter(folder, *adapter_state_dicts(base.unet, base.text_encoder),
                        adapter_metadata(base, spec, TEMPLATE, fold=3, epoch=7))


def run(*args):
    return CliRunner().invoke(main, ["sample", *args], catch_exceptions=False)


def pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*_s*.png"))}


def test_writes_pngs_with_metadata_index_and_grid(adapter, tmp_path):
    out = tmp_path / "out"
    result = run("--model-path", str(adapter), "--description", "Mild cardiomegaly.", "--description",
                 "Small left effusion.", "--num-images", "2", "--seed", "10", *FAST, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote 4 synthetic image(s)" in result.output and str(out) in result.output
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["0000_s10.png", "0001_s11.png", "0002_s12.png", "0003_s13.png", "grid.png"]
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == names[:4]
    first = Image.open(out / "0000_s10.png")
    assert first.mode == "L" and first.size == (64, 64)
    text = first.text
    assert text["synthetic"] == "true" and text["seed"] == "10" and text["steps"] == "2"
    assert text["scheduler"] == "dpm++" and text["guidance"] == "4.0" and text["negative_prompt"] == ""
    assert text["base"] == "preset:tiny" and text["model"] == str(adapter) and text["software"].startswith("cxrdist")
    assert text["prompt"] == "chest x-ray: Mild cardiomegaly."  # the checkpoint's template, applied once
    assert rows[2]["report"] == "Small left effusion." and rows[2]["seed"] == 12
    assert Image.open(out / "grid.png").size[0] > 64 and (out / "config.yaml").exists()
    assert not any(p.name.startswith(".partial") for p in out.iterdir())


def test_same_seed_same_images_other_seed_other_images(adapter, tmp_path):
    args = ["--model-path", str(adapter), "--description", "Normal heart.", "--num-images", "2", *FAST]
    assert run(*args, "--seed", "5", "--out", str(tmp_path / "a")).exit_code == 0
    assert run(*args, "--seed", "5", "--batch-size", "1", "--out", str(tmp_path / "b")).exit_code == 0
    assert run(*args, "--seed", "6", "--out", str(tmp_path / "c")).exit_code == 0
    a, b, c = (pixels(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys() and all(np.abs(a[k].astype(int) - b[k]).max() <= 1 for k in a)
    assert np.array_equal(a["0001_s6.png"], c["0000_s6.png"])  # seed 6 is seed 6, whatever its position
    assert not np.array_equal(a["0000_s5.png"], c["0000_s6.png"])


def test_zip_and_folder_give_the_same_images(adapter, tmp_path):
    archive = write_zip(adapter, tmp_path / "best_model_fold3_epoch7.zip")
    args = ["--description", "Normal heart.", *FAST]
    assert run("--model-path", str(adapter), *args, "--out", str(tmp_path / "f")).exit_code == 0
    result = run("--model-path", str(archive), *args, "--out", str(tmp_path / "z"))
    assert result.exit_code == 0, result.output
    assert all(np.array_equal(x, y) for x, y in zip(pixels(tmp_path / "f").values(), pixels(tmp_path / "z").values()))


def test_pipeline_folder_config_and_prompts_file(tiny_base_path, tmp_path):
    prompts = tmp_path / "reports.jsonl"
    prompts.write_text('{"report": "Cardiomegaly."}\n\n"Clear lungs."\n')
    cfg = tmp_path / "sample.yaml"
    cfg.write_text("sample:\n  steps: 3\n  scheduler: ddim\n")
    out = tmp_path / "out"
    result = run("--model-path", tiny_base_path, "--prompts-file", str(prompts), "--config", str(cfg),
                 "--set", "sample.guidance=2.5", "--steps", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Cardiomegaly.", "Clear lungs."]  # no template on a plain pipeline
    assert {(r["steps"], r["scheduler"], r["guidance"]) for r in rows} == {(2, "ddim", 2.5)}  # flag > --set > file


def test_base_override_replaces_a_missing_recorded_base(adapter, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    meta = json.loads((moved / "cxrdist.json").read_text())
    meta["base"]["source"] = str(tmp_path / "gone" / "sd-base")
    (moved / "cxrdist.json").write_text(json.dumps(meta))
    args = ["--model-path", str(moved), "--description", "Normal heart.", *FAST]
    result = CliRunner().invoke(main, ["sample", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--base" in result.output and not (tmp_path / "x").exists()
    assert run(*args, "--base", "preset:tiny", "--out", str(tmp_path / "y")).exit_code == 0


def _zip_with(path, member, symlink=False):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ckpt/cxrdist.json", "{}")
        info = zipfile.ZipInfo(member)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd" if symlink else "boom")
    return path


def _plain_lora(tmp_path, adapter):
    folder = tmp_path / "plain-lora"
    folder.mkdir(exist_ok=True)
    shutil.copy(adapter / "pytorch_lora_weights.safetensors", folder)
    return folder


def test_plain_diffusers_lora_loads_onto_base_like_ours(adapter, tmp_path):
    from cxrdist.sampling.loading import load_for_sampling
    from cxrdist.sampling.pipeline import SampleSettings, generate_images

    ours, meta = load_for_sampling(adapter)
    theirs, none = load_for_sampling(_plain_lora(tmp_path, adapter), base_override="preset:tiny")
    settings = SampleSettings(steps=1)
    assert none is None and meta["prompt_template"] == TEMPLATE
    assert np.allclose(generate_images(ours, ["Normal heart."], settings, seeds=[0]),
                       generate_images(theirs, ["Normal heart."], settings, seeds=[0]), atol=1e-5)


def _bad_inputs(tmp_path, adapter, tiny_base_path):
    """(label, extra args, expected message part) for every refused input."""
    not_a_model = tmp_path / "empty-folder"
    not_a_model.mkdir()
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    ok = ["--model-path", str(adapter), "--description", "Normal heart."]
    return [
        ("missing model", ["--model-path", str(tmp_path / "nope"), "--description", "x"], "not found"),
        ("not a model", ["--model-path", str(not_a_model), "--description", "x"], "is not a model"),
        ("unreadable zip", ["--model-path", str(garbage), "--description", "x"], "not a readable zip"),
        ("absolute member", ["--model-path", str(_zip_with(tmp_path / "abs.zip", "/tmp/evil")), "--description", "x"],
         "absolute path"),
        ("dotdot member", ["--model-path", str(_zip_with(tmp_path / "dots.zip", "ckpt/../../evil")), "--description",
                           "x"], "'..'"),
        ("symlink member", ["--model-path", str(_zip_with(tmp_path / "link.zip", "ckpt/link", symlink=True)),
                            "--description", "x"], "symbolic link"),
        ("wrong base", [*ok, "--base", "preset:tiny-minilm"], "does not fit base 'preset:tiny-minilm'"),
        ("diffusers LoRA without --base", ["--model-path", str(_plain_lora(tmp_path, adapter)), "--description", "x"],
         "pass --base"),
        ("base on pipeline", ["--model-path", tiny_base_path, "--description", "x", "--base", "preset:tiny"],
         "drop --base"),
        ("empty description", ["--model-path", str(adapter), "--description", "  "], "empty description"),
        ("no description", ["--model-path", str(adapter)], "no description"),
        ("zero images", [*ok, "--num-images", "0"], "sample.num_images"),
        ("unknown scheduler", [*ok, "--scheduler", "lms"], "sample.scheduler"),
        ("bad height", [*ok, "--height", "65"], "sample.height"),
        ("missing prompts file", [*ok, "--prompts-file", str(tmp_path / "none.txt")], "prompts file"),
        ("out is a file", [*ok, "--out", str(a_file)], "is a file"),
    ]


def test_every_bad_input_is_a_one_line_error_and_writes_nothing(adapter, tiny_base_path, tmp_path):
    for label, args, message in _bad_inputs(tmp_path, adapter, tiny_base_path):
        out = tmp_path / f"out-{label.replace(' ', '-')}"
        if "--out" not in args:
            args = [*args, "--out", str(out)]
        result = CliRunner().invoke(main, ["sample", *args, "--steps", "1"])
        assert result.exit_code != 0, label
        lines = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(lines) == 1 and message in lines[0], (label, result.output)
        assert "Traceback" not in result.output, label
        assert not out.exists(), label
    assert not (tmp_path.parent / "evil").exists() and not os.path.exists("/tmp/evil")


def test_a_folder_that_already_holds_samples_is_kept(adapter, tmp_path):
    out = tmp_path / "out"
    args = ["--model-path", str(adapter), "--description", "Normal heart.", *FAST, "--out", str(out)]
    assert run(*args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = CliRunner().invoke(main, ["sample", *args, "--seed", "99"])
    assert result.exit_code != 0 and "already holds samples" in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_model_path(adapter, tmp_path):
    locked = tmp_path / "locked"
    shutil.copytree(adapter, locked)
    locked.chmod(0)
    try:
        result = CliRunner().invoke(main, ["sample", "--model-path", str(locked), "--description", "x"])
        assert result.exit_code != 0 and "not readable" in result.output
    finally:
        locked.chmod(0o755)
