"""The odd inputs of docs/RELIABILITY.md, one file each in one folder: every one is listed,
then mined or skipped with a reason, and none raises."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from srdistill import storage
from srdistill.config import MineConfig
from srdistill.distill.mining import mine_image
from srdistill.sr.imaging import read_image

CFG = MineConfig(patch_size=32, stride=32, max_side=10_000)
RGB = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)


def _png16(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (colour type 2, bit depth 16) of ``rgb`` (H, W, 3) uint16."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _write(folder, name: str) -> None:
    path = folder / name
    if name == "truncated.png":
        Image.fromarray(RGB).save(path)
        path.write_bytes(path.read_bytes()[:300])
    elif name == "text.png":
        path.write_text("not an image\n")
    elif name == "zero_byte.png":
        path.write_bytes(b"")
    elif name == "one_pixel.png":
        Image.fromarray(RGB[:1, :1]).save(path)
    elif name == "wide_10001.png":
        Image.fromarray(np.zeros((40, 10_001), np.uint8)).save(path)
    elif name == "gray16.png":
        Image.fromarray(RGB[..., 0].astype(np.uint16) * 257).save(path)
    elif name == "rgb16.png":  # 16 bits per channel: PIL cannot write it, so the PNG is made by hand
        path.write_bytes(_png16(RGB.astype(np.uint16) * 257))
    elif name == "gray.png":
        Image.fromarray(RGB[..., 1]).save(path)
    elif name == "rgba.png":
        Image.fromarray(np.dstack([RGB, np.full(RGB.shape[:2], 9, np.uint8)])).save(path)
    elif name == "cmyk.jpg":
        Image.fromarray(RGB).convert("CMYK").save(path, quality=95)
    elif name == "exif_rotated.jpg":
        im = Image.fromarray(RGB)
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(path, exif=exif, quality=95)
    elif name == "image.webp":
        Image.fromarray(RGB).save(path, lossless=True)
    elif name == "image.tiff":
        Image.fromarray(RGB).save(path)
    elif name == "UPPER.PNG":
        Image.fromarray(RGB).save(path, format="PNG")
    else:  # pragma: no cover
        raise AssertionError(name)


#: file -> None (mined, with its decoded size) or words its skip reason must contain
CASES = {
    "truncated.png": "truncated", "text.png": "not an image", "zero_byte.png": "not an image",
    "one_pixel.png": "too small", "wide_10001.png": "too large",
    "gray16.png": None, "rgb16.png": None, "gray.png": None, "rgba.png": None, "cmyk.jpg": None,
    "exif_rotated.jpg": None, "image.webp": None, "image.tiff": None, "UPPER.PNG": None,
}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    for name in CASES:
        _write(root, name)
    return root


def test_every_odd_file_is_listed(folder):
    listed = {p.rsplit("/", 1)[1] for p in storage.list_files(str(folder), CFG.extensions)}
    assert listed == set(CASES)  # upper-case extension included


@pytest.mark.parametrize("name", sorted(CASES))
def test_odd_file_is_mined_or_skipped_with_a_reason(folder, name):
    rows = mine_image(str(folder / name), CFG)
    reason = CASES[name]
    if reason is None:
        assert rows and all(r["error"] == "" for r in rows), rows[:1]
        sides = (80, 64) if name == "exif_rotated.jpg" else (64, 80)  # rotated 90 degrees on read
        n = (sides[0] // 32) * (sides[1] // 32)
        assert len(rows) == n
        if name in ("rgb16.png", "image.webp", "image.tiff", "UPPER.PNG"):  # lossless: the pixels come back
            assert np.array_equal(read_image(folder / name), RGB)
    else:
        assert len(rows) == 1 and rows[0]["error"], rows
        assert reason in rows[0]["error"]
