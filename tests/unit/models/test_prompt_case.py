"""PixArt-Σ and Sana read prompts as diffusers' pipelines feed them: lower-cased and stripped (their
`_text_preprocessing` with clean_caption=False, also what diffusers' training scripts encode). With a cased tokenizer
(T5's and Gemma's are) training, the text cache, sampling and the plain diffusers pipeline then agree token for
token; the tiny presets' uncased BERT tokenizer would hide a difference, so these tests use a cased one."""
from __future__ import annotations

import pytest
import torch

from cxrdist.models.diffusion import BatchEncoder
from cxrdist.models.families import FAMILIES
from cxrdist.models.text import encode_prompts_masked, tokenize

REPORT = "Small LEFT pleural Effusion. Normal heart."
WORDS = ("small", "left", "pleural", "effusion", "normal", "heart", ".")


def cased_tokenizer(model_max_length: int = 300):
    """A word-level tokenizer in which "Small" and "small" are different tokens (ids below 40)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS,
                                                  *(w.capitalize() for w in WORDS[:-1]), "LEFT"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=model_max_length)


@pytest.fixture(scope="module", params=["sana", "pixart-sigma"])
def base(request):
    from cxrdist.models.loading import load_base, preset_folder

    loaded = load_base(str(preset_folder(f"{request.param}-tiny")))
    loaded.tokenizer = cased_tokenizer()
    return loaded


def test_the_families_that_lower_case_are_the_pipelines_that_do():
    assert {name for name, family in FAMILIES.items() if family.lowercase_prompts} == {"sana", "pixart-sigma"}
    tokenizer = cased_tokenizer()
    cased, _ = tokenize(tokenizer, [REPORT], warn=False)
    lowered, _ = tokenize(tokenizer, [REPORT], warn=False, lowercase=True)
    assert not torch.equal(cased, lowered) and 1 not in lowered[0].tolist()  # every lower-case word is known


def test_our_text_conditioning_is_the_diffusers_pipelines_to_float_precision(base):
    from cxrdist.sampling.pipeline import assemble_pipeline, build_scheduler

    pipe = assemble_pipeline(base, build_scheduler("dpm++", base.scheduler_config, base.family))
    extra = {"complex_human_instruction": None} if base.family.name == "sana" else {}
    with torch.no_grad():
        theirs, their_mask, *_ = pipe.encode_prompt(REPORT, do_classifier_free_guidance=False, device="cpu",
                                                    clean_caption=False, max_sequence_length=300, **extra)
        ours, our_mask = encode_prompts_masked(base.tokenizer, base.text_encoder, [REPORT], limit=300,
                                               lowercase=base.lowercase_prompts)
        unlowered, _ = encode_prompts_masked(base.tokenizer, base.text_encoder, [REPORT], limit=300)
    assert torch.equal(our_mask.bool(), their_mask.bool())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (unlowered - theirs).abs().max() > 1e-3  # the cased prompt is another conditioning


def test_training_tokens_are_the_samplers(base):
    encoder = BatchEncoder(base.vae, base.tokenizer, "{report}", 0.0, context_tokens=base.context_tokens,
                           lowercase=base.lowercase_prompts)
    trained_on, _ = encoder.token_ids(encoder.prompts([REPORT], None))
    sampled_with, _ = tokenize(base.tokenizer, [REPORT], warn=False, limit=base.context_tokens,
                               lowercase=base.lowercase_prompts)
    assert torch.equal(trained_on, sampled_with) and encoder.cut_prompts == 0
