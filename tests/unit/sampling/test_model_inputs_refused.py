"""Hostile or broken model inputs: zips, adapter metadata, weight files, base paths, --out and --seed.

Each is one ModelError / InputError (one line at the CLI), raised before the slow part (loading a base,
generating images) wherever it can be, and nothing already on disk is touched.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zipfile

import pytest
from click.testing import CliRunner

from cxrdist.cli import main
from cxrdist.config import load_config
from cxrdist.errors import InputError, ModelError
from cxrdist.models.loading import fingerprint, load_base, resolve_base_path
from cxrdist.models.lora import (ADAPTER_FORMAT, METADATA_NAME, WEIGHTS_NAME, adapter_metadata,
                                 read_adapter_metadata)
from cxrdist.sampling.archive import UNPACK_ALLOWANCE, safe_extract
from cxrdist.sampling.loading import load_for_sampling
from cxrdist.sampling.output import check_output_dir
from cxrdist.sampling.pipeline import SEED_MAX, SampleSettings, generate_images
from cxrdist.sampling.run import sample_to_folder
from support.trust import adapter_metadata_json, write_adapter

# ---- zip archives ------------------------------------------------------------------------------------------

def test_zip_with_a_bad_crc_is_one_error_and_leaves_nothing(tmp_path):
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("m/cxrdist.json", "{}")
        z.writestr("m/pytorch_lora_weights.safetensors", b"A" * 1000)
    data = bytearray(archive.read_bytes())
    data[data.index(b"A" * 1000) + 500] = ord("B")  # stored data no longer matches its CRC
    archive.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="m.zip is damaged .*CRC"):
        safe_extract(archive, tmp_path / "dest")
    assert not [p for p in (tmp_path / "dest").rglob("*") if p.is_file()]


def test_only_model_files_are_extracted(tmp_path):
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("m/cxrdist.json", "m/pytorch_lora_weights.safetensors", "m/unet/config.json",
                     "m/tokenizer/vocab.txt", "m/config.yaml", "m/optimizer.pkl", "m/samples/0000_s0.png",
                     "m/run.log", "m/random_states_0.pkl"):
            z.writestr(name, "x")
    out = safe_extract(archive, tmp_path / "dest")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "m/config.yaml", "m/cxrdist.json", "m/pytorch_lora_weights.safetensors", "m/tokenizer/vocab.txt",
        "m/unet/config.json"]


def test_a_small_zip_cannot_unpack_to_much_more_than_its_size(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/cxrdist.json", "{}")
        z.writestr("m/pytorch_lora_weights.safetensors", bytes(2 * UNPACK_ALLOWANCE))  # zeros deflate ~1000x
    assert archive.stat().st_size < 2**20  # 128 MiB from well under 1 MiB
    with pytest.raises(ModelError, match="bomb.zip claims .* limit"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").rglob("*.safetensors"))


# ---- adapter metadata and weight files ---------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"format": ADAPTER_FORMAT}), "'base.source' is missing"),
    (json.dumps({**adapter_metadata_json(), "adapter": {"unet": {"rank": 4, "alpha": 4}, "text_encoder": None}}),
     "'adapter.unet.targets'"),
    (json.dumps({**adapter_metadata_json(), "adapter": {"unet": {"rank": "4", "alpha": 4, "targets": ["to_q"]},
                                            "text_encoder": None}}), "'adapter.unet.rank'"),
    (json.dumps([1, 2]), "is not a JSON object"),
])
def test_malformed_or_incomplete_cxrdist_json_is_one_error(tmp_path, text, message):
    folder = write_adapter(tmp_path / "a")
    (folder / METADATA_NAME).write_text(text)
    with pytest.raises(ModelError, match=message):
        read_adapter_metadata(folder)
    with pytest.raises(ModelError, match=message):
        load_for_sampling(folder)


@pytest.mark.parametrize("weights", [os.urandom(4096), b"", "truncate"])
def test_random_or_truncated_adapter_weights_fail_before_the_base_loads(tmp_path, weights, monkeypatch):
    folder = write_adapter(tmp_path / "a")
    if weights == "truncate":
        weights = (folder / WEIGHTS_NAME).read_bytes()[:-3]
    (folder / WEIGHTS_NAME).write_bytes(weights)
    monkeypatch.setattr("cxrdist.sampling.loading.load_base", lambda *a, **k: pytest.fail("the base must not load"))
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        load_for_sampling(folder)


def test_truncated_base_weights_are_one_error(tmp_path, tiny_base_path):
    broken = tmp_path / "base"
    shutil.copytree(tiny_base_path, broken)
    weights = broken / "text_encoder" / "model.safetensors"  # transformers raises SafetensorError as is
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load text_encoder"):
        load_base(str(broken))


# ---- base paths --------------------------------------------------------------------------------------------

def test_a_relative_base_path_is_recorded_absolute(tmp_path, tiny_base_path, monkeypatch):
    shutil.copytree(tiny_base_path, tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    base = load_base("models/base")
    assert base.source == str((tmp_path / "models" / "base").resolve())
    assert adapter_metadata(base, {}, "{report}")["base"]["source"] == base.source
    assert load_base("preset:tiny").source == "preset:tiny"  # presets and hub ids stay as given


def test_path_like_names_that_do_not_exist_are_errors_not_hub_lookups(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./base", "../base", "~/nope-xyz/base", "runs/base", "a/b/c", "C:\\models\\base"):
        with pytest.raises(ModelError, match="not found"):
            resolve_base_path(name)


def test_a_hub_id_offline_and_not_cached_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ModelError, match="not in the local hub cache and HF_HUB_OFFLINE"):
        load_base("someorg/some-model")
    assert time.perf_counter() - start < 5
    # a cached hub id still resolves offline (the check reads the cache layout huggingface_hub writes)
    snapshot = tmp_path / "hub" / "models--someorg--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (tmp_path / "hub" / "models--someorg--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--cached" / "refs" / "main").write_text("a" * 40)
    assert resolve_base_path("someorg/cached") == "someorg/cached"


def test_an_adapter_whose_recorded_local_base_is_gone_asks_for_base(tmp_path, tiny_base_path, monkeypatch):
    # Older adapters recorded a relative path: from another folder, `runs/base` looks like a hub id.
    folder = write_adapter(tmp_path / "a", adapter_metadata_json("runs/base", fingerprint(tiny_base_path)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("cxrdist.sampling.loading.load_base", lambda *a, **k: pytest.fail("no hub lookup"))
    with pytest.raises(ModelError, match=r"was a local folder .* relative path.*pass --base"):
        load_for_sampling(folder)


# ---- sample --out and --seed -------------------------------------------------------------------------------

def test_out_under_a_file_or_unwritable_fails_before_the_model_loads(tmp_path):
    cfg = load_config(None)
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    with pytest.raises(InputError, match="is a file, not a folder"):
        sample_to_folder(cfg, tmp_path / "no-model", ["x"], a_file / "sub" / "out")
    assert a_file.read_text() == "keep me"
    if sys.platform.startswith("linux"):  # /proc refuses new entries even to root
        with pytest.raises(InputError, match="cannot be written"):
            check_output_dir("/proc/cxrdist-test/out")
    check_output_dir(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind


@pytest.mark.parametrize("seed", [2**64, -1, SEED_MAX])
def test_seed_out_of_range_is_refused_before_the_model_loads(tmp_path, seed):
    cfg = load_config(None, [f"sample.seed={seed}", "sample.num_images=2"])
    with pytest.raises(InputError, match="--seed .* out of range"):
        sample_to_folder(cfg, tmp_path / "no-model", ["x"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="out of range"):
        generate_images(None, ["x"], SampleSettings(), seeds=[seed if seed != SEED_MAX else 2**63])


def test_cli_seed_2_64_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["sample", "--model-path", str(tmp_path), "--description", "x",
                                       "--seed", str(2**64), "--out", str(tmp_path / "out")])
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(lines) == 1 and "out of range" in lines[0], result.output
    assert "Traceback" not in result.output
