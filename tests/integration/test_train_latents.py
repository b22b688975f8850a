"""Cached latents: written into the shards by `cxrdist shard cache-latents`, used by the trainer, refused
when made by another VAE."""
from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from support.training import QUICK


@pytest.fixture(scope="module")
def cached_shards(phantom_shards, tmp_path_factory):
    from cxrdist.cli import main as cli

    out = tmp_path_factory.mktemp("cached") / "phantom"
    shutil.copytree(phantom_shards, out)
    res = CliRunner().invoke(cli, ["shard", "cache-latents", str(out), "--pretrained", "preset:tiny", "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    assert "cached latents [4, 16, 16]" in res.output
    return out


def test_cached_latents_match_on_the_fly_encoding_and_verify(cached_shards, phantom_shards, one_thread):
    from cxrdist.data.index import verify_checksums
    from cxrdist.data.latents import check_cached_latents, latents_info
    from cxrdist.data.loader import eval_loader
    from cxrdist.models.loading import load_base

    assert verify_checksums(cached_shards) == []  # index.json updated with the new shard digests
    base = load_base("preset:tiny")
    assert check_cached_latents(cached_shards, base.vae) and latents_info(phantom_shards) is None
    batch = next(iter(eval_loader(cached_shards, "test", batch_size=4, image_size=64)))
    expected = base.vae.encode(batch["pixel_values"]).latent_dist.mode()
    assert torch.allclose(batch["latents"], expected, atol=1e-2, rtol=1e-2)


def test_training_uses_cached_latents_and_refuses_another_vae(cached_shards, phantom_shards, tmp_path, one_thread,
                                                             monkeypatch):
    from diffusers import AutoencoderKL

    from cxrdist.config import load_config
    from cxrdist.data.loader import eval_loader
    from cxrdist.errors import DataError
    from cxrdist.models.diffusion import BatchEncoder
    from cxrdist.models.loading import load_base
    from cxrdist.train.run import run

    encodes = []
    real_encode = AutoencoderKL.encode

    def counting_encode(self, *args, **kwargs):
        encodes.append(1)
        return real_encode(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    # The spy sees the trainer's encoder path: a batch without latents goes through the VAE.
    base = load_base("preset:tiny")
    plain = next(iter(eval_loader(phantom_shards, "test", batch_size=2, image_size=64)))
    BatchEncoder(base.vae, base.tokenizer, "{report}", 0.0).latents(plain, "cpu")
    assert encodes, "the spy must see the VAE encoder of a batch without cached latents"
    encodes.clear()
    quick = QUICK + ["train.max_steps=2", "eval.num_metric_images=0", "eval.num_grid_prompts=0", "eval.run_test=false"]
    run(load_config(None, quick + [f"data.shards={cached_shards}"]), 0, output_dir=str(tmp_path / "a"))
    assert not encodes  # neither training nor validation ran the VAE encoder
    other = load_config(None, QUICK + [f"data.shards={cached_shards}", "model.vae_dtype=bf16", "train.max_steps=2"])
    with pytest.raises(DataError, match="were made by VAE .* this run's VAE is"):
        run(other, 0, output_dir=str(tmp_path / "b"))
