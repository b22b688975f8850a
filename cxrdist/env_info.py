"""What this machine offers: stack versions, devices, bf16, and whether bitsandbytes / DeepSpeed can run."""
from __future__ import annotations

import importlib.metadata
import os
import sys

STACK = ["torch", "diffusers", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes",
         "webdataset", "tensorboard", "torchmetrics", "click", "safetensors", "pydicom", "numpy", "pillow"]


def package_versions() -> dict[str, str]:
    out = {}
    for name in STACK:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def devices() -> dict[str, object]:
    import torch

    info: dict[str, object] = {"cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["bf16"] = torch.cuda.is_bf16_supported()
    else:
        info["bf16"] = "cpu autocast only"
    info["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return info


def bitsandbytes_status() -> str:
    """Run one real 8-bit AdamW step on a 4096-element tensor (the size where 8-bit state starts)."""
    try:
        import warnings

        import torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
        param = torch.nn.Parameter(torch.zeros(4096))
        opt = bnb.optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.ones_like(param)
        opt.step()
        return f"usable (AdamW8bit step ran on {param.device})"
    except Exception as exc:  # report, never crash `info`
        return f"not usable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def deepspeed_status() -> str:
    try:
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        return f"usable (version {deepspeed.__version__}, accelerator {get_accelerator().device_name()})"
    except Exception as exc:
        return f"not usable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def collect() -> dict[str, object]:
    return {
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "devices": devices(),
        "bitsandbytes": bitsandbytes_status(),
        "deepspeed": deepspeed_status(),
    }
