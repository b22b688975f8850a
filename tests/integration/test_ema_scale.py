"""The adapter EMA (train.ema_decay) on 2 CPU ranks under DeepSpeed ZeRO-3 in bf16: the module holds bf16
partitions (stage3_param_persistence_threshold=0: the LoRA tensors really are split), the masters are fp32 in the
optimizer. One launch, a checkpoint after every step: each step's EMA must be the warm-up average of the fp32
masters checkpointed at that step, the same on both ranks, and the best export must be the EMA of its step."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from support.launching import LAUNCH_TIMEOUT_S, best_export, deepspeed_config, launch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_base_path")]

DECAY = 0.9


def warmup(update: int) -> float:
    return 0.0 if update == 1 else min(DECAY, update / (9 + update))


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_zero3_bf16_ranks_keep_the_same_ema_of_the_fp32_masters_and_export_it(phantom_shards, tmp_path):
    config = deepspeed_config(tmp_path, 3, stage3_param_persistence_threshold=0)
    run = tmp_path / "run"
    res = launch(config, phantom_shards, run, f"train.ema_decay={DECAY}", "train.mixed_precision=bf16",
                 "train.checkpoint_every=1", "train.keep_last=4")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "DeepSpeed ZeRO-3 | 2 rank(s)" in res.stderr and "EMA of the trained weights: decay 0.9" in res.stderr
    digests = json.loads((run / "fold1" / "adapter_digests.json").read_text())
    assert len(digests["ema_per_rank"]) == 2 and len(set(digests["ema_per_rank"])) == 1, digests
    checkpoints = run / "fold1" / "checkpoints"
    ema = expected = None
    for step in (1, 2, 3, 4):
        raw = load_file(str(checkpoints / f"step_{step:08d}" / "adapter.safetensors"))  # the fp32 masters
        ema = load_file(str(checkpoints / f"step_{step:08d}" / "ema.safetensors"))
        d = warmup(step)
        expected = {k: v.double() if d == 0 else d * expected[k] + (1 - d) * v.double() for k, v in raw.items()}
        assert ema.keys() == raw.keys() and all(t.numel() > 0 for t in ema.values())
        worst = max(float((ema[k].double() - expected[k]).abs().max()) for k in ema)
        assert worst < 1e-6, (step, worst)
    gap = max(float((ema[k] - raw[k]).abs().max()) for k in ema)
    assert gap > 1e-4, gap  # an average of several steps, not the last adapter
    best = best_export(run)
    training = json.loads((best / "cxrdist.json").read_text())["training"]
    assert training["weights"] == "ema" and training["ema"]["decay"] == DECAY
    at_best = load_file(str(checkpoints / f"step_{training['step']:08d}" / "ema.safetensors"))
    exported = load_file(str(best / "pytorch_lora_weights.safetensors"))
    assert exported.keys() == {k.replace(".default", "") for k in at_best}
    assert all((exported[k.replace(".default", "")] == at_best[k]).all() for k in at_best)
