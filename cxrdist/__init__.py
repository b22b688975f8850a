"""cxrdist: text-to-chest-X-ray generation with LoRA, accelerate and DeepSpeed."""

__version__ = "0.1.0"
