"""Image features for distribution metrics and the memorization audit, behind one interface.

`feature_extractor(spec)` turns a `--features` value into a callable: grayscale images (N, 1, H, W) in [0, 1]
-> float features (N, D). What each one sees:

- `pixels[:SIDE]` (the default; SIDE 16): the image area-averaged to SIDE x SIDE. No weights, nothing to
  download, the same numbers everywhere. It sees global layout and density (heart size, fluid, air, a
  collapsed lung) and is blind to texture and to anything smaller than 1/SIDE of the image: on real radiographs
  use a learned extractor. On phantoms it ranks real, adapted, text-blind and broken images as expected
  (benchmarks/RESULTS.md, "Distribution metrics").
- `inception`: torchmetrics' FID Inception-v3 (2048-d pool features), needs `torch-fidelity` and its weights.
- `txv:WEIGHTS`: a torchxrayvision DenseNet (e.g. `txv:densenet121-res224-all`, 1024-d), as RoentGen reports.
- `raddino:PATH_OR_HUB_ID`: a transformers vision backbone (e.g. `microsoft/rad-dino`), CLS / pooled features.

The learned extractors are imported only when chosen; a missing package is one line naming the pip command.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

DEFAULT_FEATURES = "pixels"
PIXEL_SIDE = 16
FEATURE_BATCH = 64


class FeatureError(ValueError):
    """A --features value that names nothing usable, or an extractor whose package or weights are missing."""


@dataclass
class FeatureExtractor:
    name: str  # the spec it was built from, recorded with every result
    embed: Callable[[torch.Tensor], torch.Tensor]  # (n, 1, H, W) in [0, 1] -> (n, D)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of (N, 1, H, W) images in [0, 1], in batches, as float64 on the CPU."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected grayscale (N, 1, H, W) images, got shape {tuple(images.shape)}")
        parts = [self.embed(images[i : i + FEATURE_BATCH].float()).double().cpu()
                 for i in range(0, len(images), FEATURE_BATCH)]
        return torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.float64)


def image_batch(images) -> torch.Tensor:
    """(N, H, W) grayscale images in [0, 1] (numpy or torch) -> the (N, 1, H, W) float32 batch extractors take."""
    return torch.as_tensor(images, dtype=torch.float32)[:, None]


def _need(package: str, pip_name: str, what: str):
    """Import `package`; FeatureError naming the flag (`what`) and the pip command when it is missing."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise FeatureError(f"{what} needs the {pip_name} package: pip install {pip_name}") from None


def pixel_features(side: int = PIXEL_SIDE) -> FeatureExtractor:
    def embed(x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, side).flatten(1)

    return FeatureExtractor(f"pixels:{side}", embed)


def inception_features() -> FeatureExtractor:
    _need("torch_fidelity", "torch-fidelity", "--features inception")
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).eval()
    except Exception as err:  # the weights download on first use
        raise FeatureError(f"--features inception: could not load the FID Inception weights ({err}); run once "
                           "where github.com is reachable, or pick --features pixels / txv:... / raddino:...") from None

    def embed(x: torch.Tensor) -> torch.Tensor:
        rgb = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
        return net(rgb).reshape(len(x), -1)

    return FeatureExtractor("inception", embed)


def load_txv(weights: str, option: str):
    """A torchxrayvision model in eval mode; FeatureError naming `option` (the flag that asked) otherwise."""
    xrv = _need("torchxrayvision", "torchxrayvision", option)
    try:
        return xrv.models.get_model(weights).eval()
    except Exception as err:
        raise FeatureError(f"{option}: torchxrayvision could not load the weights {weights!r} ({err})") from None


def txv_input(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> torchxrayvision's input convention: one channel, 224 px, values in [-1024, 1024]."""
    return F.interpolate(x, size=(224, 224), mode="area") * 2048.0 - 1024.0


def txv_features(weights: str) -> FeatureExtractor:
    net = load_txv(weights, f"--features txv:{weights}")
    return FeatureExtractor(f"txv:{weights}", lambda x: net.features2(txv_input(x)))


# DINOv2's (and RAD-DINO's) ImageNet normalisation, used when the folder brings no image processor.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def raddino_features(source: str) -> FeatureExtractor:
    transformers = _need("transformers", "transformers", f"--features raddino:{source}")
    try:
        net = transformers.AutoModel.from_pretrained(source).eval()
    except Exception as err:
        raise FeatureError(f"--features raddino:{source}: not a transformers vision model here ({err})") from None
    size, mean, std = _processor_settings(transformers, source, net)

    def embed(x: torch.Tensor) -> torch.Tensor:
        rgb = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        rgb = (rgb.expand(-1, 3, -1, -1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        out = net(pixel_values=rgb)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    return FeatureExtractor(f"raddino:{source}", embed)


def _processor_settings(transformers, source: str, net) -> tuple[int, tuple, tuple]:
    """Input side and normalisation from the model's image processor, else the model config's image size."""
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(source)
    except Exception:  # a bare backbone folder: its config still says the size it was trained at
        return int(getattr(net.config, "image_size", 224)), _IMAGENET_MEAN, _IMAGENET_STD
    crop = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
    side = crop.get("height") or crop.get("shortest_edge") or getattr(net.config, "image_size", 224)
    return int(side), tuple(proc.image_mean or _IMAGENET_MEAN), tuple(proc.image_std or _IMAGENET_STD)


FEATURE_KINDS = ("pixels[:SIDE]", "inception", "txv:WEIGHTS", "raddino:PATH_OR_HUB_ID")


def feature_extractor(spec: str = DEFAULT_FEATURES) -> FeatureExtractor:
    """Build the extractor a `--features` value names (see the module docstring)."""
    kind, _, arg = spec.strip().partition(":")
    if kind == "pixels":
        if arg and not (arg.isdigit() and 2 <= int(arg) <= 256):
            raise FeatureError(f"--features {spec}: the side must be a whole number from 2 to 256, e.g. pixels:16")
        return pixel_features(int(arg) if arg else PIXEL_SIDE)
    if kind == "inception" and not arg:
        return inception_features()
    if kind == "txv" and arg:
        return txv_features(arg)
    if kind == "raddino" and arg:
        return raddino_features(arg)
    raise FeatureError(f"--features {spec!r} is not known: use one of {', '.join(FEATURE_KINDS)}")
