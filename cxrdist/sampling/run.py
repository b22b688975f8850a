"""A whole `cxrdist sample` run: device, model, seeds, generation and the output folder."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from cxrdist.errors import InputError
from cxrdist.models.loading import DTYPES
from cxrdist.models.text import apply_template
from cxrdist.sampling.loading import load_for_sampling
from cxrdist.sampling.output import check_output_dir, write_samples
from cxrdist.sampling.pipeline import NonFiniteSample, SampleSettings, check_seed_range, generate_images


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is not here is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{name}' asked for, but CUDA is not available here: use --device cpu")
    return device


def default_out_dir(model_path: str | Path) -> Path:
    stem = Path(model_path).name.removesuffix(".zip") or "model"
    return Path("samples") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def sample_to_folder(cfg, model_path: str | Path, reports: list[str], out_dir: str | Path,
                     base_override: str | None = None) -> dict:
    """Load the model, generate `cfg.sample.num_images` images per report (image i gets seed
    `cfg.sample.seed + i`), write them with metadata; return a summary. Inputs are checked before the model
    loads, and nothing is written before every image exists."""
    check_seed_range(cfg.sample.seed, len(reports) * cfg.sample.num_images)
    out = check_output_dir(out_dir)  # writable now, not after every image was generated
    device = resolve_device(cfg.sample.device)
    dtype = DTYPES[cfg.sample.dtype]
    base, meta = load_for_sampling(model_path, base_override, vae_dtype=cfg.model.vae_dtype)
    base.to(device)
    if dtype != torch.float32:  # half weights save memory; the VAE keeps model.vae_dtype (fp16 VAEs overflow)
        base.unet.to(dtype=dtype)
        base.text_encoder.to(dtype=dtype)
    template = (meta or {}).get("prompt_template", "{report}")
    expanded = [r for r in reports for _ in range(cfg.sample.num_images)]
    seeds = [cfg.sample.seed + i for i in range(len(expanded))]
    settings = SampleSettings.from_config(cfg.sample)
    start = time.perf_counter()
    try:
        images = generate_images(base, expanded, settings, template=template, seeds=seeds, device=device,
                                 dtype=dtype, progress=True)
    except NonFiniteSample as exc:  # raised before anything is written: name what the user passed
        raise exc.naming(str(model_path), exc.index // cfg.sample.num_images) from None
    seconds = time.perf_counter() - start
    common = {"negative_prompt": settings.negative_prompt, "steps": settings.steps, "scheduler": settings.scheduler,
              "guidance": settings.guidance, "height": int(images.shape[1]), "width": int(images.shape[2]),
              "template": template, "dtype": cfg.sample.dtype, "model": str(model_path), "base": base.source,
              "base_fingerprint": base.fingerprint}
    records = [{"report": r, "prompt": apply_template(template, r), "seed": s, **common}
               for r, s in zip(expanded, seeds)]
    files = write_samples(out, images, records, cfg)
    return {"out": out, "files": files, "seconds": seconds, "height": images.shape[1], "width": images.shape[2],
            "device": str(device)}
