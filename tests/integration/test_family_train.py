"""Sana and PixArt-Σ bases through the real trainer on 2 CPU ranks (gloo, DS_ACCELERATOR=cpu), in bf16:
ZeRO-3 for Sana (flow matching, DC-AE, Gemma-2) against DDP, ZeRO-2 for PixArt-Σ (learned sigma, T5). 4 optimizer
steps of the tiny presets, validation at steps 2 and 4; ranks agree, the loss falls, the export is a transformer
LoRA. (Both families under every launcher, fp32 and bf16, agree the same way when run by hand; these two keep
`make test` short.)"""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from support.launching import (ACCEL, LAUNCH_TIMEOUT_S, MAX_SHARE_MOVED, MOVED, best_export, check_common,
                               deepspeed_config, launch, max_diff, share_beyond)

PRESETS = {"sana": "sana-tiny", "pixart-sigma": "pixart-sigma-tiny"}
BF16 = "train.mixed_precision=bf16"
# Early Adam steps move an element by about +-lr whatever its gradient's size, so an element whose near-zero
# gradient flips sign under bf16 rounding ends up to twice the sum of the LRs (2 x 0.025) from the other run's.
SIGN_FLIP_MAX = 5e-2


@pytest.fixture(scope="module")
def family_bases():
    """Both presets built before any launch: two ranks materialising one at once collide."""
    from cxrdist.models.loading import preset_folder

    return {family: preset_folder(preset) for family, preset in PRESETS.items()}


def _sets(family: str) -> tuple[str, ...]:
    return f"model.pretrained=preset:{PRESETS[family]}", "lora.train_text_encoder=false", BF16


def _adapter(run):
    tensors = load_file(str(best_export(run) / "pytorch_lora_weights.safetensors"))
    assert tensors and all(k.startswith("transformer.") for k in tensors)  # what SanaPipeline.load_lora_weights reads
    return tensors


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 60)
def test_sana_zero3_trains_like_ddp(family_bases, phantom_shards, tmp_path):
    ddp = tmp_path / "ddp"
    res = launch(ACCEL / "cpu_2ranks.yaml", phantom_shards, ddp, *_sets("sana"))
    check_common(ddp, res, "DDP")
    zero3 = tmp_path / "zero3"
    # persistence threshold 0: the LoRA tensors really are partitioned, and the export must gather them
    res = launch(deepspeed_config(tmp_path, 3, stage3_param_persistence_threshold=0), phantom_shards, zero3,
                 *_sets("sana"))
    check_common(zero3, res, "DeepSpeed ZeRO-3")
    a, b = _adapter(ddp), _adapter(zero3)
    assert max_diff(a, b) < SIGN_FLIP_MAX and share_beyond(a, b, MOVED) < MAX_SHARE_MOVED  # measured 0.034, 0.7 %


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_pixart_sigma_trains_under_zero2(family_bases, phantom_shards, tmp_path):
    run = tmp_path / "zero2"
    res = launch(ACCEL / "zero2.yaml", phantom_shards, run, *_sets("pixart-sigma"))
    check_common(run, res, "DeepSpeed ZeRO-2")
    assert "prediction epsilon" in res.stderr
    _adapter(run)
