"""The frozen text encoder's cache: exact, bounded and hit; a one-rank prefill holds exactly what cache misses compute."""
from __future__ import annotations

from support.training import tiny_lora_model


def test_frozen_text_cache_is_exact_bounded_and_hits(tiny_base_path):
    import torch

    from cxrdist.models.diffusion import LoraDiffusionModel
    from cxrdist.models.text import encode_ids, tokenize

    base, _ = tiny_lora_model(tiny_base_path, train_text=False)
    model = LoraDiffusionModel(base.unet, base.text_encoder, False, text_cache_size=3)
    ids, mask = tokenize(base.tokenizer, ["Normal heart.", "Small left effusion.", "Normal heart.", "Right nodule."])
    with torch.no_grad():
        fresh = torch.cat([encode_ids(base.text_encoder, ids[i : i + 1], mask[i : i + 1]) for i in range(4)])
    first = model.encode_text(ids, mask)
    assert torch.equal(first, fresh)
    assert (model.text_cache.misses, model.text_cache.hits) == (3, 1)  # the repeated report came from the cache
    again = model.encode_text(ids[[1, 0]], mask[[1, 0]])
    assert torch.equal(again, fresh[[1, 0]]) and model.text_cache.hits == 3
    model.encode_text(*tokenize(base.tokenizer, ["Bilateral effusions.", "Severe cardiomegaly."]))
    assert len(model.text_cache.store) == 3  # bounded: the oldest entries were dropped
    assert LoraDiffusionModel(base.unet, base.text_encoder, True, text_cache_size=3).text_cache is None


def test_text_cache_prefill_on_one_rank_holds_exactly_what_cache_misses_compute(tiny_base_path):
    import torch

    from cxrdist.models.diffusion import LoraDiffusionModel
    from cxrdist.models.text import tokenize
    from cxrdist.train.text_prefill import distinct_prompts, prefill_text_cache

    base, _ = tiny_lora_model(tiny_base_path, train_text=False)
    reports = ["Normal heart.", "Small left effusion.", "Normal heart.", "Right nodule."]
    prompts = distinct_prompts(reports, "chest x-ray: {report}", with_empty=True)
    assert prompts == ["chest x-ray: Normal heart.", "chest x-ray: Small left effusion.", "chest x-ray: Right nodule.", ""]
    assert "" not in distinct_prompts(reports, "{report}", with_empty=False)

    class OneRank:
        num_processes, process_index, device = 1, 0, torch.device("cpu")

    filled = LoraDiffusionModel(base.unet, base.text_encoder, False, text_cache_size=8)
    assert prefill_text_cache(OneRank(), filled.text_cache, base.text_encoder, base.tokenizer, prompts) == 4
    ids, mask = tokenize(base.tokenizer, prompts)
    contexts = filled.encode_text(ids, mask)
    assert (filled.text_cache.hits, filled.text_cache.misses) == (4, 0)  # nothing left to encode
    fresh = LoraDiffusionModel(base.unet, base.text_encoder, False, text_cache_size=8)
    assert torch.equal(contexts, fresh.encode_text(ids, mask))  # bit for bit what first sight computes
    bounded = LoraDiffusionModel(base.unet, base.text_encoder, False, text_cache_size=2)
    assert prefill_text_cache(OneRank(), bounded.text_cache, base.text_encoder, base.tokenizer, prompts) == 2
    assert len(bounded.text_cache.store) == 2
