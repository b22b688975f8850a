"""Logging set up once per process; quiet the noise our dependencies print."""
from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: int = logging.INFO, rank: int | None = None) -> None:
    """Configure the root logger once; non-main ranks only report warnings and errors."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0 else f"[rank{rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S", force=True)
    quiet_dependencies()


def quiet_dependencies() -> None:
    """bitsandbytes warns about `kernels-community` on import; diffusers/transformers log at INFO."""
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("diffusers", "transformers", "bitsandbytes", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The same notice as a log record (bitsandbytes' CPU backend logs it at import): only 4-bit CPU kernels, unused.
    kernels_notice = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _KernelsNotice) for f in kernels_notice.filters):
        kernels_notice.addFilter(_KernelsNotice())
    warnings.filterwarnings("ignore", message=".*will assume that the vocabulary was not modified.*")
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # DeepSpeed otherwise probes and warns on every import. Not in a DeepSpeed launch: there DS_ACCELERATOR is the
    # user's own statement that a machine without CUDA is meant to train on the CPU (cxrdist.train.devices).
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if not deepspeed_launch and (not os.environ.get("CUDA_VISIBLE_DEVICES", "x") or not _cuda_available()):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class _KernelsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
