"""Metrics: pixel similarity (MSE / SSIM / PSNR, diversity) and text faithfulness on the phantom world.

Light imports only here: `image` (torch, torchmetrics) loads when first used.
"""
from cxrdist.metrics.attributes import (
    ATTRIBUTE_CLASSES,
    ATTRIBUTES,
    SECONDARY_CLASSES,
    attributes_from_labels,
    attributes_from_report,
)
from cxrdist.metrics.faithfulness import (
    chance_level,
    faithfulness,
    faithfulness_details,
    faithfulness_from_attributes,
    format_report,
)
from cxrdist.metrics.reader import measure, read_image

__all__ = [
    "ATTRIBUTES", "ATTRIBUTE_CLASSES", "SECONDARY_CLASSES", "attributes_from_labels", "attributes_from_report",
    "chance_level", "faithfulness", "faithfulness_details", "faithfulness_from_attributes", "format_report", "measure", "read_image",
    "image_metrics", "diversity",
]


def __getattr__(name: str):
    if name in ("image_metrics", "diversity"):
        from cxrdist.metrics import image

        return getattr(image, name)
    raise AttributeError(f"module 'cxrdist.metrics' has no attribute {name!r}")
