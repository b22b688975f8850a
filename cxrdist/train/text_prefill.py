"""Fill the frozen-text cache before the first step, each distinct training prompt encoded once across all ranks.

Without it every rank encodes a report the first time *it* sees it, and the data order hands each report to a
different rank every epoch, so on 2 ranks each rank ends up encoding nearly every report itself: for the demo
(2,343 distinct reports, MiniLM on one CPU thread, about 37 ms a report) that is some 85 s of every rank's
training time. Here rank r encodes prompts r, r + world, ... alone (the cache's own row-at-a-time call, so a
context is bit-for-bit the one a cache miss would compute), and one all-gather gives every rank all of them.
The assignment depends only on the training split, so a resumed run fills the same contexts.
"""
from __future__ import annotations

import logging
import time

import torch

from cxrdist.models.diffusion import FrozenTextCache, pad_rows
from cxrdist.models.text import CONTEXT_TOKENS, apply_template, tokenize

log = logging.getLogger(__name__)


def distinct_prompts(reports: list[str], template: str, with_empty: bool) -> list[str]:
    """The templated prompts in first-seen order, plus the empty prompt when caption dropout can draw it."""
    prompts = dict.fromkeys(apply_template(template, r) for r in reports)
    if with_empty:
        prompts.setdefault("")
    return list(prompts)


def prefill_text_cache(accelerator, cache: FrozenTextCache, text_encoder, tokenizer, prompts: list[str],
                       context_tokens: int = CONTEXT_TOKENS, lowercase: bool = False, instruction=None) -> int:
    """Encode `prompts` (each once, spread over the ranks) into every rank's cache; returns how many were added.

    Collective: every rank must call it with the same prompts. Prompts beyond the cache's bound are not filled
    (they are encoded on first sight, as before).
    """
    prompts = prompts[: cache.max_items]
    if not prompts:
        return 0
    started = time.perf_counter()
    # the ids BatchEncoder.token_ids gives the model
    ids, mask = tokenize(tokenizer, prompts, warn=False, limit=context_tokens, lowercase=lowercase,
                         instruction=instruction)
    keys = FrozenTextCache.keys(ids, mask)

    def encode(i: int) -> torch.Tensor:
        return FrozenTextCache.encode_row(text_encoder, ids, mask, i, trim=cache.trim, instruction=cache.instruction,
                                          limit=cache.limit)

    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1 or len(prompts) < world:
        contexts = [encode(i) for i in range(len(prompts))]
    else:
        share = -(-len(prompts) // world)  # rows per rank; a short last share is padded with its first row
        mine = [encode(i) for i in range(rank, len(prompts), world)]
        mine += mine[:1] * (share - len(mine))
        # one shape for the gather: trimmed contexts padded to the budget, cut back to each report's length below
        gathered = accelerator.gather(pad_rows(mine, ids.shape[1]))  # (world * share, tokens, width), rank-major
        # prompt i was encoded by rank i % world as its (i // world)-th row
        contexts = [gathered[(i % world) * share + i // world] for i in range(len(prompts))]
        if cache.trim:
            contexts = [row[: FrozenTextCache.own_length(mask[i])].clone() for i, row in enumerate(contexts)]
    for key, context in zip(keys, contexts):
        cache.put(key, context)
    log.info("text cache: %d distinct training prompts encoded once over %d rank(s) in %.1f s; %.1f MB held%s",
             len(prompts), world, time.perf_counter() - started, cache.nbytes() / 2**20,
             " (each report at its own length)" if cache.trim else "")
    return len(prompts)
