"""Fast JPEG ingest: large JPEGs bound for a small square decode at a reduced DCT scale (PIL draft()), never
below the fitted size, and come out within a tight tolerance of the full decode, with its geometry."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrdist.data.imageio import ReducedPixels, decode_bytes, decode_file, original_shape, resize_square
from cxrdist.data.shard import build_shards
from cxrdist.data.sources.manifest import ManifestSource
from support.data_files import gradient, tar_metas, write_manifest, write_png


def _jpeg(path, height=640, width=512, seed=0):
    pixels = gradient(height, width, seed=seed)
    yy = np.arange(height, dtype=np.float32)[:, None]
    pixels = np.clip(pixels + 0.05 * np.sin(yy / 9.0), 0, 1)  # rib-like stripes: detail the resize must keep
    Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(path, quality=95)
    return path


def _psnr(a, b):
    return 10 * np.log10(1.0 / float(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_draft_decode_is_close_to_the_full_decode(tmp_path, mode):
    path = _jpeg(tmp_path / "film.jpg")
    full = decode_file(path)
    reduced = decode_file(path, (64, mode))
    assert isinstance(reduced, ReducedPixels) and not isinstance(full, ReducedPixels)
    assert original_shape(reduced) == (640, 512) == original_shape(full)
    # the smallest DCT scale that still covers the fitted size on both sides: 1/8 (80x64 >= 64x51 or 80x64)
    fitted = (64, 51) if mode == "pad" else (80, 64)
    assert reduced.shape[0] >= fitted[0] and reduced.shape[1] >= fitted[1]
    assert reduced.shape == (80, 64)
    assert _psnr(resize_square(full, 64, mode), resize_square(reduced, 64, mode)) >= 40


def test_no_draft_when_the_image_is_not_much_larger(tmp_path):
    path = _jpeg(tmp_path / "small.jpg", 100, 80)
    assert decode_file(path, (64, "pad")).shape == (100, 80)  # a 1/2 scale (50x40) would fall under the fit
    png = write_png(tmp_path / "big.png", 640, 512)
    assert decode_file(png, (64, "pad")).shape == (640, 512)  # only JPEGs have a DCT scale
    big = _jpeg(tmp_path / "big.jpg", 200, 160)
    assert decode_bytes(big.read_bytes(), (32, "pad")).shape == (50, 40)  # 1/4: 1/8 (25x20) is under 32x26


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_a_reduced_decode_keeps_the_full_decode_geometry(tmp_path, mode):
    # 200x169 bound for 32 px: the full decode fits to 32x27 (pad) or 38x32 (crop); the 1/4 decode (50x43)
    # alone would round to 32x28 or 37x32, shifting the padding or the crop, and every edge, by a pixel.
    yy = np.arange(200, dtype=np.float32)[:, None]
    film = 0.15 + 0.7 * gradient(200, 169, seed=0) + 0.05 * np.sin(yy / 9.0)  # never near 0: padding stands out
    path = tmp_path / "odd.jpg"
    Image.fromarray(np.rint(np.clip(film, 0, 1) * 255).astype(np.uint8)).save(path, quality=95)
    reduced = decode_file(path, (32, mode))
    assert reduced.shape == (50, 43)
    full, fast = resize_square(decode_file(path), 32, mode), resize_square(reduced, 32, mode)
    shifted = resize_square(np.asarray(reduced), 32, mode)  # fitted from the reduced shape alone
    assert np.array_equal(full > 0.05, fast > 0.05)  # the same padded box
    assert _psnr(full, fast) >= 40 > _psnr(full, shifted)


def test_builder_passes_the_fit_and_keeps_the_original_size(tmp_path):
    rows = []
    for i in range(6):
        _jpeg(tmp_path / f"im{i}.jpg", seed=i)
        rows.append({"image": f"im{i}.jpg", "group": f"p{i}", "report": f"Report {i}."})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    build_shards(ManifestSource(manifest), out, size=32, folds=2, test_fraction=0.34, seed=0, shard_size=4,
                 workers=1, progress=False)
    metas = [m for tar in sorted(out.glob("*.tar")) for m in tar_metas(tar)]
    assert len(metas) == 6 and all(m["original_size"] == [640, 512] for m in metas)
