"""Decoding (PNG 8/16-bit, TIFF, JPEG, DICOM), resizing and deterministic encoding."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxrdist.data.imageio import decode_bytes, decode_file, encode_png, resize_square
from cxrdist.data.sources.base import RecordRejected
from support.data_files import write_dicom, write_png


def test_png_8_and_16_bit_keep_their_scale(tmp_path):
    eight = decode_file(write_png(tmp_path / "a.png", bits=8))
    sixteen = decode_file(write_png(tmp_path / "b.png", bits=16))
    assert eight.dtype == np.float32 and eight.shape == (40, 32)
    assert 0.0 <= eight.min() and eight.max() <= 1.0
    assert np.abs(eight - sixteen).max() < 1 / 255  # same picture, the 16-bit one finer
    assert len(np.unique(sixteen)) > len(np.unique(eight))


def test_tiff_16_and_jpeg_and_rgb(tmp_path):
    values = (np.linspace(0, 65535, 30 * 20).reshape(30, 20)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "x.tif")
    tif = decode_file(tmp_path / "x.tif")
    assert tif.shape == (30, 20) and tif.max() == pytest.approx(1.0) and tif.min() == 0.0
    Image.new("RGB", (16, 12), (200, 100, 50)).save(tmp_path / "x.jpg", quality=95)
    jpg = decode_file(tmp_path / "x.jpg")
    assert jpg.shape == (12, 16) and 0.3 < jpg.mean() < 0.7


def test_dicom_monochrome2_window_and_rescale(tmp_path):
    raw = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (8, 1))  # 8 x 40, values 0..3900
    plain = decode_file(write_dicom(tmp_path / "plain.dcm", raw))
    assert plain[0, 0] == 0.0 and plain[0, -1] == pytest.approx(1.0)  # no window: full stretch
    windowed = decode_file(write_dicom(tmp_path / "win.dcm", raw, window=(2000, 1000)))
    assert windowed[0, 0] == 0.0 and windowed[0, -1] == 1.0
    assert 0.0 < windowed[0, 20] < 1.0  # 2000 = window centre -> mid grey
    assert windowed[0, 20] == pytest.approx(0.5, abs=0.01)
    # slope 2 / intercept -1000 moves values 0..3900 to -1000..6800: centre 2000 is now raw 1500
    rescaled = decode_file(write_dicom(tmp_path / "res.dcm", raw, window=(2000, 1000), slope=2.0, intercept=-1000))
    assert rescaled[0, 15] == pytest.approx(0.5, abs=0.01)


def test_dicom_monochrome1_is_inverted(tmp_path):
    raw = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (8, 1))
    mono2 = decode_file(write_dicom(tmp_path / "m2.dcm", raw))
    mono1 = decode_file(write_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # detected by content even without a suffix
    no_suffix = write_dicom(tmp_path / "IM0001", raw, photometric="MONOCHROME1")
    np.testing.assert_allclose(decode_file(no_suffix), mono1)


def test_dicom_keeps_bit_depth_until_quantisation(tmp_path):
    raw = np.tile(np.arange(0, 4096, dtype=np.uint16), (2, 1))  # 4096 distinct 12-bit levels
    pixels = decode_file(write_dicom(tmp_path / "deep.dcm", raw))
    assert len(np.unique(pixels)) == 4096
    assert len(np.unique(decode_bytes(encode_png(pixels, 16)))) == 4096


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files_are_rejected_not_replaced(tmp_path, damage):
    path = write_png(tmp_path / "a.png", 64, 64)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 3], "garbage": b"\x89PNG not really", "empty": b""}[damage])
    with pytest.raises(RecordRejected) as info:
        decode_file(path)
    assert info.value.reason == "corrupt_image"


def test_missing_and_corrupt_dicom(tmp_path):
    with pytest.raises(RecordRejected, match="missing_image"):
        decode_file(tmp_path / "nope.png")
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 10)
    with pytest.raises(RecordRejected, match="corrupt_image"):
        decode_file(bad)


def test_resize_pad_and_crop_keep_aspect_and_orientation():
    pixels = np.zeros((200, 100), dtype=np.float32)
    pixels[:, 50:] = 1.0  # right half bright
    padded = resize_square(pixels, 64, "pad")
    assert padded.shape == (64, 64)
    assert padded[:, :16].max() == 0.0 and padded[:, 48:].max() == 0.0  # 32 px wide content, centred
    assert padded[32, 40] > 0.9 and padded[32, 20] < 0.1  # never flipped
    cropped = resize_square(pixels, 64, "crop")
    assert cropped.shape == (64, 64)
    assert cropped[:, 40:].min() > 0.9 and cropped[:, :24].max() < 0.1


def test_png_encoding_is_deterministic_and_exact():
    pixels = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    assert encode_png(pixels) == encode_png(pixels.copy())
    back = np.asarray(Image.open(io.BytesIO(encode_png(pixels))))
    assert back.dtype == np.uint8 and np.abs(back / 255.0 - pixels).max() <= 0.5 / 255 + 1e-6
    back16 = np.asarray(Image.open(io.BytesIO(encode_png(pixels, 16))))
    assert back16.dtype == np.uint16
