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
        info["cuda_capability"] = [".".join(map(str, torch.cuda.get_device_capability(i)))
                                   for i in range(torch.cuda.device_count())]
        info["bf16"] = torch.cuda.is_bf16_supported()
    else:
        info["cuda_unusable"] = cuda_unusable_reason()
        info["bf16"] = "cpu autocast only"
    info["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return info


def driver_gpu_count() -> int:
    """GPUs the NVIDIA kernel driver lists (Linux), whether or not torch can use them; 0 without the driver."""
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def visible_devices_hidden(value: str | None) -> bool:
    """True when a CUDA_VISIBLE_DEVICES value (None: unset) names no device: empty, or a first entry CUDA cannot use
    (-1). CUDA reads the list up to its first invalid entry, so "-1" (or "-1,-1") hides every GPU on purpose."""
    if value is None:
        return False
    first = value.split(",")[0].strip()
    return first == "" or first.startswith("-")


def cuda_unusable_reason() -> str:
    """Why torch sees no CUDA device here, as a clause naming the cause (call only when none is usable)."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if visible_devices_hidden(os.environ.get("CUDA_VISIBLE_DEVICES")):
        return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU"
    listed = driver_gpu_count()
    if listed:
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use the {listed} GPU(s) the NVIDIA "
                "driver lists (is the driver older than this build needs? `nvidia-smi` shows the newest CUDA it supports)")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU on this machine"


def adamw8bit_step(device) -> None:
    """One real bitsandbytes AdamW8bit step on `device`, on a 4096-element tensor (the size from which its state is
    8-bit): a library without a kernel for that device fails here, not at the first training step. Raises what
    bitsandbytes raised, or RuntimeError when the step ran but left a non-finite value."""
    import warnings

    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
    device = torch.device(device)
    param = torch.nn.Parameter(torch.zeros(4096, device=device))
    optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
    param.grad = torch.ones_like(param)
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: a failing one reports on the next sync
    if not bool(torch.isfinite(param).all()) or not bool((param != 0).all()):
        raise RuntimeError(f"the AdamW8bit step on {device} did not give a finite update")


def bitsandbytes_status() -> str:
    """One real 8-bit AdamW step on the device training would use (the first GPU when there is one)."""
    try:
        import torch

        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        adamw8bit_step(device)
        return f"usable (AdamW8bit step ran on {device})"
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
