from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from srdistill.sr.imaging import (
    ImageReadError, crop, image_size, imresize, modcrop, read_image, to_gray,
)  # fmt: skip

from conftest import data_path

SETS = ["Set5", "Set14"]


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("dataset", SETS)
def test_imresize_reproduces_matlab_lr_bit_for_bit(dataset, scale):
    lr_dir = data_path(f"{dataset}/LR_bicubic/X{scale}")
    hr_files = sorted((lr_dir.parents[1] / "HR").glob("*.png"))
    assert hr_files
    for f in hr_files:
        hr = modcrop(read_image(f), scale)
        lr = imresize(hr, 1 / scale)
        ref = read_image(lr_dir / f"{f.stem}x{scale}.png")
        assert lr.shape == ref.shape, f.name
        assert np.array_equal(lr, ref), f"{f.name}: {np.count_nonzero(lr != ref)} pixels differ"


def test_imresize_output_shape_float_and_errors():
    rng = np.random.default_rng(0)
    img = rng.random((17, 23, 3))
    up = imresize(img, 2.0)
    assert up.shape == (34, 46, 3) and up.dtype == np.float64
    assert imresize(img, output_shape=(9, 5)).shape == (9, 5, 3)
    const = np.full((20, 20), 100, np.uint8)
    assert np.array_equal(imresize(const, 0.5), np.full((10, 10), 100, np.uint8))
    with pytest.raises(ValueError):
        imresize(img)
    with pytest.raises(ValueError):
        imresize(img, 0.5, output_shape=(3, 3))


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_float32_batched_resize_matches_float64_per_image(factor):
    rng = np.random.default_rng(factor)
    batch = rng.integers(0, 256, (3, 300, 50), dtype=np.uint8)  # 300 rows: several tiles
    kw = {"spatial_axes": (1, 2), "compute_dtype": np.float32}
    fast = imresize(imresize(batch, 1 / factor, **kw), float(factor), **kw)
    for img, got in zip(batch, fast):
        ref = imresize(imresize(img, 1 / factor), float(factor))
        assert got.shape == ref.shape == (300 + (-300) % factor, 50 + (-50) % factor)
        diff = np.abs(got.astype(int) - ref)
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-4 * ref.size


def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_read_image_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    # 16-bit grayscale: 8-bit value v stored as v * 257 must come back as v
    v16 = (rgb[..., 0].astype(np.uint16) * 257)
    Image.fromarray(v16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    assert np.array_equal(out[..., 0], rgb[..., 0]) and np.array_equal(out[..., 2], rgb[..., 0])
    Image.fromarray(rgb[..., 1]).save(tmp_path / "gray.png")
    assert np.array_equal(read_image(tmp_path / "gray.png")[..., 1], rgb[..., 1])
    Image.fromarray(np.dstack([rgb, np.full((12, 10), 7, np.uint8)])).save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "pal.png")
    assert np.array_equal(read_image(tmp_path / "pal.png"), np.asarray(pal.convert("RGB")))


def test_read_image_applies_exif_rotation(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0, 0] = 255  # top-left marker
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    im.save(tmp_path / "rot.png", exif=exif)
    out = read_image(tmp_path / "rot.png")
    assert out.shape == (6, 4, 3)
    assert out[0, -1, 0] == 255  # the marker moved to the top-right
    assert image_size(tmp_path / "rot.png") == (6, 4)  # as stored


def test_read_image_errors_name_file_and_reason(tmp_path):
    (tmp_path / "text.png").write_text("not a png")
    good = _png_bytes(Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 50))
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    for name, reason in [("text.png", "not an image"), ("trunc.png", "truncated"), ("missing.png", "not found")]:
        with pytest.raises(ImageReadError) as info:
            read_image(tmp_path / name)
        assert name in str(info.value) and reason in info.value.reason


def test_modcrop_crop_gray():
    img = np.arange(7 * 9 * 3, dtype=np.uint8).reshape(7, 9, 3)
    assert modcrop(img, 4).shape == (4, 8, 3)
    assert crop(img, 2, 1, 3).shape == (3, 3, 3)
    with pytest.raises(ValueError):
        crop(img, 7, 0, 3)
    g = to_gray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8))
    assert g.tolist() == [[76, 150, 29, 18]]
