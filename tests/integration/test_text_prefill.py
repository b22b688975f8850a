"""The frozen-text cache prefill on 2 real gloo ranks: each prompt encoded by one rank, every rank holds all."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from support.launching import ACCEL, free_port
from support.training import child_env, run_reaped

RANK = textwrap.dedent("""
    import json, sys, torch
    from accelerate import Accelerator
    from cxrdist.models.diffusion import FrozenTextCache, LoraDiffusionModel
    from cxrdist.models.loading import load_base
    from cxrdist.models.text import tokenize
    from cxrdist.train.text_prefill import distinct_prompts, prefill_text_cache

    acc = Accelerator(cpu=True)
    base = load_base(sys.argv[1])
    encoded = []
    real = FrozenTextCache.encode_row
    FrozenTextCache.encode_row = staticmethod(lambda enc, ids, mask, i, **kw: encoded.append(i) or real(enc, ids, mask, i, **kw))
    reports = [f"Report {i % 6}: {'small' if i % 2 else 'large'} effusion." for i in range(14)]
    prompts = distinct_prompts(reports, "{report}", with_empty=True)  # 7 prompts: an odd count over 2 ranks
    model = LoraDiffusionModel(base.unet, base.text_encoder, False, text_cache_size=64)
    prefill_text_cache(acc, model.text_cache, base.text_encoder, base.tokenizer, prompts)
    mine = sorted(encoded)
    FrozenTextCache.encode_row = staticmethod(real)
    ids, mask = tokenize(base.tokenizer, prompts)
    cached = model.encode_text(ids, mask)
    local = torch.stack([real(base.text_encoder, ids, mask, i) for i in range(len(prompts))])
    # one file per rank: two ranks printing at once can interleave their lines on the shared stdout
    with open(f"{sys.argv[2]}/rank{acc.process_index}.json", "w") as out:
        json.dump({"rank": acc.process_index, "world": acc.num_processes, "prompts": len(prompts),
                   "encoded": mine, "stored": len(model.text_cache.store), "misses": model.text_cache.misses,
                   "exact": bool(torch.equal(cached, local))}, out)
""")


@pytest.mark.timeout(240)
def test_two_ranks_split_the_encoding_and_both_hold_every_context(tmp_path, tiny_base_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / "cpu_2ranks.yaml"),
           "--main_process_port", str(free_port()), str(script), tiny_base_path, str(tmp_path)]  # base built once, first
    proc = run_reaped(cmd, env=child_env(), timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == 2 for r in results)
    assert results[0]["encoded"] == [0, 2, 4, 6] and results[1]["encoded"] == [1, 3, 5]  # each prompt once
    for r in results:
        assert r["prompts"] == r["stored"] == 7 and r["misses"] == 0 and r["exact"], r
