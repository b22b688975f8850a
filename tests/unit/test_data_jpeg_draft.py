"""Fast JPEG ingest: large JPEGs bound for a small square decode at a reduced DCT scale (PIL draft()), never
below twice the fitted size, and come out within a tight tolerance of the full decode."""
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
    # 1/2 or 1/4 scale, but at least twice the fitted size (64 px here) on both sides
    fitted = (64, 51) if mode == "pad" else (80, 64)
    assert reduced.shape[0] >= 2 * fitted[0] and reduced.shape[1] >= 2 * fitted[1]
    assert reduced.shape[0] < 640
    assert _psnr(resize_square(full, 64, mode), resize_square(reduced, 64, mode)) >= 40


def test_no_draft_when_the_image_is_not_much_larger(tmp_path):
    path = _jpeg(tmp_path / "small.jpg", 200, 160)
    assert decode_file(path, (64, "pad")).shape == (200, 160)  # a 1/2 scale would fall under 2x the fit
    png = write_png(tmp_path / "big.png", 640, 512)
    assert decode_file(png, (64, "pad")).shape == (640, 512)  # only JPEGs have a DCT scale
    assert decode_bytes(path.read_bytes(), (32, "pad")).shape == (100, 80)


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
