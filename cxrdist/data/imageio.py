"""Image decoding, resizing and encoding for the shard builder and the loaders.

Everything in between decode and encode is a 2-D float32 array in [0, 1]: 16-bit PNG/TIFF and DICOM keep
their full bit depth until `encode_png` quantises. Integer images are scaled by their type's full scale (255,
65535; a 32-bit integer image by its own maximum when that is larger). A floating-point image (32-bit float TIFF)
has no full scale of its own: when its values already lie in [0, 1] they are taken as they are, otherwise it is
windowed by its actual range (min..max, as a DICOM without a window is), so 12-bit values stored as floats keep
their contrast instead of clipping at 255. A float image with NaN or infinite pixels, or a constant one, is
refused with a reason: what a NaN pixel stands for cannot be known. A file that cannot be decoded raises
`RecordRejected` with a stable reason key, so the builder counts it instead of crashing or inventing pixels.
The same holds for images that decode but carry no picture (constant, tiny, or a DICOM whose rescale or
window tags flatten it): `check_pixels`, which the builder runs on every loaded image, rejects them.

Fast JPEG ingest: when the caller says what the image becomes (`fit=(size, mode)`), a JPEG much larger than that
is decoded at a reduced DCT scale (PIL `draft()`, 1/2, 1/4 or 1/8): the smallest one whose output is still at
least `DRAFT_MARGIN` x the fitted size on both sides; the Lanczos resize then brings it to the fitted size. A
2,500 x 3,050 px MIMIC-CXR-JPG film bound for 256 px is decoded at 1/8 scale (313 x 382 px), for 512 px at 1/4.
Such pixels are a `ReducedPixels` array whose `original_shape` is the file's, and `resize_square` fits from that
shape, so the final image has the full decode's geometry to the pixel.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from cxrdist.data.sources.base import RecordRejected
from cxrdist.fileio import special_file_kind

RESIZE_MODES = ("pad", "crop")
BIT_DEPTHS = (8, 16)

# PIL mode -> full-scale value. Modes not listed are converted to 8-bit grayscale first (RGB, palette...).
_PIL_FULL_SCALE = {"L": 255.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "1": 1.0}

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
# A JPEG is decoded at a reduced DCT scale only down to this multiple of its fitted size (see module docstring).
# 1, not 2: DCT-domain scaling keeps the low-frequency coefficients of each 8x8 block, so it is itself a low-pass
# filter, and the Lanczos step that follows has little aliasing left to remove. benchmarks/jpeg_ingest.py runs
# both floors side by side on 2,500 px films (three runs on a loaded machine, benchmarks/RESULTS.md): at 256 px,
# >= 2x the fit (1/4 scale) gave 1.96-2.11x the full decode + resize (1.66x in an earlier run) at 57 dB PSNR,
# >= 1x the fit (1/8 scale) 2.14-2.31x at 48 dB; at 512 px 2.14-2.47x at 68 dB against 2.98-3.16x at 52 dB.
# Only 1x meets the 2x target in every run, well within the 40 dB tolerance.
DRAFT_MARGIN = 1

# Below 16 px a side there is no anatomy left to learn from; the smallest shard size is 8, so such an image
# would be upsampled into a blur (or a thumbnail/icon got into the export).
MIN_SIDE = 16
# Images whose whole range spans fewer than 3 grey levels at 8 bits are blank: all-black DICOMs after a zero
# window or slope, a white placeholder, an empty scan. A real radiograph spans most of [0, 1].
MIN_RANGE = 2.0 / 255.0


def _looks_like_dicom(path: Path) -> bool:
    # DICOM Part 10 files carry "DICM" after a 128-byte preamble; exports often have no suffix at all.
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


class ReducedPixels(np.ndarray):
    """Pixels of a JPEG decoded at a reduced DCT scale; `original_shape` is the (H, W) stored in the file."""

    original_shape: tuple[int, int]


def original_shape(pixels: np.ndarray) -> tuple[int, int]:
    """The (H, W) of the file the pixels came from, also when they were decoded at a reduced scale."""
    return tuple(getattr(pixels, "original_shape", pixels.shape))


def decode_file(path: str | Path, fit: Optional[tuple[int, str]] = None) -> np.ndarray:
    """Decode PNG / JPEG / TIFF (8 or 16 bit) or DICOM to float32 [0, 1], shape (H, W).

    `fit=(size, resize mode)` says the caller will `resize_square` to that size: a large JPEG then decodes at a
    reduced DCT scale (see the module docstring). Other formats ignore it.
    """
    path = Path(path)
    try:
        kind = special_file_kind(path)
    except ValueError:  # a NUL byte in the path: no such file can exist
        kind = None
    if kind is not None:  # opening a FIFO blocks forever, a device never ends
        raise RecordRejected("missing_image", f"{path}: {kind}, not a regular file")
    if not path.is_file():
        raise RecordRejected("missing_image", str(path))
    if path.suffix.lower() in DICOM_SUFFIXES or _looks_like_dicom(path):
        return decode_dicom(path)
    return _decode_pil(path, fit)


def decode_bytes(data: bytes, fit: Optional[tuple[int, str]] = None) -> np.ndarray:
    """Decode an encoded image held in memory (PNG / JPEG / TIFF) to float32 [0, 1]."""
    return _decode_pil(io.BytesIO(data), fit)


def _draft(image: Image.Image, fit: tuple[int, str]) -> Optional[tuple[int, int]]:
    """Ask the JPEG decoder for the smallest DCT scale whose output keeps DRAFT_MARGIN x the fitted size; the
    file's (H, W) when it took one, else None."""
    size, mode = fit
    width, height = image.size
    new_h, new_w = fit_size(height, width, size, mode)
    wanted = (DRAFT_MARGIN * new_w, DRAFT_MARGIN * new_h)
    if wanted[0] * 2 > width or wanted[1] * 2 > height:
        return None  # not even a 1/2 scale would keep the margin
    image.draft(image.mode, wanted)  # PIL picks the largest of 1/2, 1/4, 1/8 that still gives >= wanted
    return (height, width) if image.size != (width, height) else None


def _decode_pil(src, fit: Optional[tuple[int, str]] = None) -> np.ndarray:
    try:
        with Image.open(src) as image:
            reduced_from = _draft(image, fit) if fit is not None and image.format == "JPEG" else None
            image.load()  # forces the full decode here, so truncated files fail now and not later
            # Float images are read as floats: converting them to "L" would clip every value above 255.
            if image.mode not in _PIL_FULL_SCALE and image.mode != "F":
                image = image.convert("L")
            pixels = np.asarray(image)
            full_scale = _PIL_FULL_SCALE.get(image.mode, 1.0)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RecordRejected("corrupt_image", f"{src}: {exc}") from None
    if pixels.ndim != 2 or pixels.size == 0:
        raise RecordRejected("unsupported_image", f"{src}: shape {pixels.shape}")
    if image.mode == "F":
        return _window_float(pixels, src)
    if image.mode == "I" and pixels.max(initial=0) > 65535:
        full_scale = float(pixels.max())  # 32-bit integer images: scale by their own range
    out = pixels.astype(np.float32)
    out *= np.float32(1.0 / full_scale)
    if reduced_from is not None:
        out = out.view(ReducedPixels)
        out.original_shape = reduced_from
    return out


def _window_float(pixels: np.ndarray, src) -> np.ndarray:
    """A floating-point image to [0, 1]: as it is when it already lies in [0, 1], else min..max (module docstring)."""
    values = pixels.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - np.count_nonzero(finite))
        raise RecordRejected("bad_pixels", f"{src}: {bad} of {values.size} pixels are NaN or infinite in a "
                                           "floating-point image")
    low, high = float(values.min()), float(values.max())
    if 0.0 <= low and high <= 1.0:
        return values  # already in the range every decoder gives; check_pixels refuses a near-constant one
    if not high > low:
        raise RecordRejected("degenerate_image", f"{src}: constant floating-point image (every pixel is {low:g})")
    # float64 for the subtraction: float32 (high - low) can overflow for values near the float32 limit.
    return ((values.astype(np.float64) - low) / (high - low)).astype(np.float32)


def decode_dicom(path: str | Path) -> np.ndarray:
    """DICOM to float32 [0, 1]: modality LUT (slope/intercept), then VOI LUT or window, MONOCHROME1 inverted."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pragma: no cover - pydicom is a declared dependency
        raise RecordRejected("unsupported_format", "DICOM needs pydicom: pip install pydicom") from None
    try:
        with warnings.catch_warnings():  # malformed-tag chatter; a real failure raises below
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path))
            raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad/compressed data; all mean "cannot read this"
        raise RecordRejected("corrupt_image", f"{path}: {type(exc).__name__}: {exc}") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if raw.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise RecordRejected("unsupported_image", f"{path}: {photometric} with shape {raw.shape}")
    _check_dicom_tags(ds, path)
    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        values = _window(values, ds.WindowCenter, ds.WindowWidth)
    else:
        if "VOILUTSequence" in ds:
            # A VOI LUT is a table indexed by stored values, so it needs integers.
            values = np.asarray(apply_voi_lut(np.rint(values).astype(np.int64), ds), dtype=np.float64)
        values = _stretch(values)
    if photometric == "MONOCHROME1":
        values = 1.0 - values  # MONOCHROME1 stores bright = low values; flip so bone is bright everywhere
    return values.astype(np.float32)


def _check_dicom_tags(ds, path) -> None:
    """Refuse tags that flatten every pixel to one value (the image would come out all black or all white)."""
    try:
        slope, width = ds.get("RescaleSlope", 1), ds.get("WindowWidth")
        slope, width = (1.0 if slope is None else _first(slope)), (None if width is None else _first(width))
    except (TypeError, ValueError) as exc:
        raise RecordRejected("corrupt_image", f"{path}: unreadable RescaleSlope or WindowWidth ({exc})") from None
    if slope == 0:
        raise RecordRejected("degenerate_image", f"{path}: RescaleSlope is 0, which maps every pixel to the "
                                                 "intercept")
    if width is not None and "WindowCenter" in ds and width < 1:
        # PS3.3 C.11.2.1.2 requires WindowWidth >= 1; 0 or less is a broken export, not a window to guess at.
        raise RecordRejected("degenerate_image", f"{path}: WindowWidth {width:g} (DICOM requires >= 1)")


def _first(value) -> float:
    # WindowCenter/Width may be multi-valued (several presets); the first is the default view.
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _window(values: np.ndarray, center, width) -> np.ndarray:
    # DICOM PS3.3 C.11.2.1.2 linear window, mapped to [0, 1] instead of the output bit range.
    c, w = _first(center), max(_first(width), 1.0)
    out = (values - (c - 0.5)) / (w - 1.0) + 0.5 if w > 1 else (values >= c).astype(np.float64)
    return np.clip(out, 0.0, 1.0)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def check_pixels(pixels: np.ndarray, where: str) -> np.ndarray:
    """Refuse arrays that would silently become garbage (wrong rank, NaN, out of range, no picture)."""
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or min(pixels.shape) < 1:
        got = getattr(pixels, "shape", type(pixels))
        raise RecordRejected("bad_pixels", f"{where}: expected a 2-D array, got {got}")
    if min(pixels.shape) < MIN_SIDE:
        raise RecordRejected("image_too_small", f"{where}: {pixels.shape[1]}x{pixels.shape[0]} px, under "
                                                f"{MIN_SIDE} px on a side")
    pixels = pixels.astype(np.float32, copy=False)
    low, high = float(pixels.min()), float(pixels.max())  # NaN propagates through min/max: one pass each
    if not (np.isfinite(low) and np.isfinite(high)):
        raise RecordRejected("bad_pixels", f"{where}: NaN or infinite values")
    shown_low, shown_high = min(max(low, 0.0), 1.0), min(max(high, 0.0), 1.0)  # the range left after clipping
    if shown_high - shown_low < MIN_RANGE:
        raise RecordRejected("degenerate_image", f"{where}: constant image (every pixel within "
                                                 f"{shown_high - shown_low:.4f} of {shown_low:.3f})")
    return pixels if 0.0 <= low and high <= 1.0 else np.clip(pixels, 0.0, 1.0)


def fit_size(height: int, width: int, size: int, mode: str) -> tuple[int, int]:
    """Scaled (h, w) keeping the aspect ratio: longest side = size (pad) or shortest side = size (crop)."""
    scale = size / (max(height, width) if mode == "pad" else min(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_square(pixels: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Aspect-preserving resize to size x size, then black padding or a centre crop. Never flips."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    # The fit comes from the file's shape: a reduced decode (ceil(side / scale) px) can round to a fitted size one
    # pixel off the full decode's, which would shift the padding or crop and every edge with it.
    new_h, new_w = fit_size(*original_shape(pixels), size, mode)
    if (new_h, new_w) != pixels.shape:
        image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))
        # reducing_gap first box-reduces by an integer factor, then Lanczos: same quality, ~6x faster on
        # 2000x2500 inputs than Lanczos over the full image.
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
        pixels = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if mode == "pad":
        out = np.zeros((size, size), dtype=np.float32)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        out[top:top + new_h, left:left + new_w] = pixels
        return out
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(pixels[top:top + size, left:left + size])


def _quantise(pixels: np.ndarray, bit_depth: int) -> Image.Image:
    full = (1 << bit_depth) - 1
    values = np.rint(np.clip(pixels, 0.0, 1.0) * full)
    if bit_depth == 8:
        return Image.fromarray(values.astype(np.uint8))
    return Image.fromarray(values.astype(np.uint16))


def encode_png(pixels: np.ndarray, bit_depth: int = 8) -> bytes:
    """Grayscale PNG bytes; no timestamps or text chunks, so equal pixels give equal bytes."""
    if bit_depth not in BIT_DEPTHS:
        raise ValueError(f"bit depth must be one of {BIT_DEPTHS}, got {bit_depth}")
    buffer = io.BytesIO()
    _quantise(pixels, bit_depth).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()



def to_model_range(array: np.ndarray) -> np.ndarray:
    """8- or 16-bit grayscale pixels -> float32 in [-1, 1], the range the VAE is trained on (the original project
    fed it [0, 1]). One formula for the loader and latent caching, so cached latents match on-the-fly ones."""
    scale = 65535.0 if array.dtype == np.uint16 else 255.0
    return array.astype(np.float32) * np.float32(2.0 / scale) - np.float32(1.0)
