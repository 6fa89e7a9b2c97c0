"""``mine.psnr_bic_resize = opencv``: SRDD's released patch criterion (``src/1_select_patches.py``),
pinned from its definition: OpenCV ``INTER_CUBIC`` (Keys a = -0.75, half-pixel centres,
edge-replicated border, no antialiasing) x4 down to ``int(side/4)`` and back in float32, PSNR
``10 log10(255^2 / MSE)`` over every pixel of the grayscale crop; and its keep fraction on the
"291" corpus (T91 + BSD200) next to the MATLAB-bicubic default."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from srdistill import storage
from srdistill.config import MineConfig
from srdistill.distill.mining import _down_up, apply_keep_rule, mine_image, mine_images, patch_positions, score_patches
from srdistill.sr.imaging import read_image, to_gray

from conftest import T91, need_dataset


def keys_a075(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.75 (OpenCV's ``INTER_CUBIC``)."""
    a, t = -0.75, np.abs(t)
    near = (a + 2) * t**3 - (a + 3) * t**2 + 1
    far = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float64 weights of a 1-D resize: source ``(i + 0.5) n_in / n_out - 0.5``,
    the 4 nearest taps weighted by ``keys_a075`` whatever the scale (no antialiasing), taps
    outside clamped to the edge."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(src))
        for tap in range(base - 1, base + 3):
            m[i, min(max(tap, 0), n_in - 1)] += keys_a075(src - tap)
    return m


def down_up_reference(gray: np.ndarray, s: int = 4) -> np.ndarray:
    """The released reconstruction from the definition, float64: ``(H, W)`` -> ``(H, W)``."""
    h, w = gray.shape
    g = gray.astype(np.float64)
    down = cubic_matrix(h, int(h / s)) @ g @ cubic_matrix(w, int(w / s)).T
    return cubic_matrix(int(h / s), h) @ down @ cubic_matrix(int(w / s), w).T


def psnr_reference(patch: np.ndarray, recon: np.ndarray) -> float:
    mse = np.mean((patch.astype(np.float64) - recon) ** 2)
    return 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("shape", [(32, 32), (30, 37)])  # 37: int(37/4) = 9, resampled by 37/9
def test_opencv_down_up_is_keys_a075_without_antialiasing(shape):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, *shape)).astype(np.uint8)
    out = _down_up(batch, 4, "opencv")
    assert out.shape == batch.shape and out.dtype == np.float32
    for img, rec in zip(batch, out):
        np.testing.assert_allclose(rec, down_up_reference(img), atol=2e-3)  # float32 vs float64
    # No uint8 rounding or clipping between or after the passes: noise overshoots [0, 255].
    assert out.min() < 0 or out.max() > 255
    assert not np.allclose(out, np.round(out))
    # The MATLAB bicubic (antialiased, a = -0.5) is another reconstruction.
    if shape[0] % 4 == 0 and shape[1] % 4 == 0:
        assert np.abs(_down_up(batch, 4, "matlab") - out).mean() > 1.0


def test_opencv_patch_psnr_is_the_released_formula_on_a_real_image():
    rgb = read_image(str(min(T91.glob("*.png"))))
    gray = to_gray(rgb)
    pos = patch_positions(gray.shape[1], gray.shape[0], 64, 32)
    assert len(pos) >= 4
    psnr, _ = score_patches(gray, pos, 64, stride=32, window="patch", resize="opencv")
    pil = Image.fromarray(rgb)
    for (x, y), got in zip(pos, psnr):
        crop = np.asarray(pil.crop((x, y, x + 64, y + 64)).convert("L"))  # as the release crops
        assert got == pytest.approx(psnr_reference(crop, down_up_reference(crop)), abs=2e-3)
        # and straight through cv2, float32, as the released script calls it
        f = crop.astype(np.float32)
        up = cv2.resize(cv2.resize(f, (16, 16), interpolation=cv2.INTER_CUBIC), (64, 64), interpolation=cv2.INTER_CUBIC)
        assert got == pytest.approx(20 * np.log10(255.0 / np.sqrt(np.mean((f - up) ** 2))), abs=1e-3)
    matlab, _ = score_patches(gray, pos, 64, stride=32, window="patch", resize="matlab")
    assert (matlab - psnr).mean() > 0.5  # MATLAB's bicubic restores the patches better


def test_opencv_image_window_pads_to_whole_blocks():
    """``window="image"``: the image edge-replicated to a multiple of 4 per side, resampled once,
    cropped back; the MSE averaged over each window."""
    rng = np.random.default_rng(1)
    gray = np.clip(rng.normal(128, 50, (70, 93)), 0, 255).astype(np.uint8)
    pos = patch_positions(93, 70, 32, 16)
    psnr, _ = score_patches(gray, pos, 32, stride=16, window="image", resize="opencv")
    padded = np.pad(gray, ((0, 2), (0, 3)), mode="edge")
    recon = down_up_reference(padded)[:70, :93]
    want = [psnr_reference(gray[y : y + 32, x : x + 32], recon[y : y + 32, x : x + 32]) for x, y in pos]
    np.testing.assert_allclose(psnr, want, atol=2e-3)
    per_patch, _ = score_patches(gray, pos, 32, stride=16, window="patch", resize="opencv")
    assert np.abs(per_patch - psnr).mean() < 0.5  # only the pixels near a window border differ


def test_mine_image_uses_the_configured_resize(tmp_path):
    path = str(min(T91.glob("*.png")))
    rows = {r: mine_image(path, MineConfig(patch_size=64, stride=32, psnr_bic_window="patch", psnr_bic_resize=r))
            for r in ("matlab", "opencv")}  # fmt: skip
    gray = to_gray(read_image(path))
    pos = [(row["x"], row["y"]) for row in rows["opencv"]]
    for r, got in rows.items():
        want, _ = score_patches(gray, pos, 64, stride=32, window="patch", resize=r)
        np.testing.assert_allclose([row["psnr_bic"] for row in got], want, rtol=0, atol=1e-6)
    assert MineConfig().psnr_bic_resize == "matlab"


def test_bad_resize_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"psnr_bic_resize[\s\S]*'matlab' or 'opencv'"):
        MineConfig(psnr_bic_resize="pil")
    with pytest.raises(ValueError, match="resize must be 'matlab' or 'opencv', got 'cv2'"):
        score_patches(np.zeros((8, 8), np.uint8), [(0, 0)], 8, stride=8, resize="cv2")


def test_keep_fraction_on_the_291_corpus():
    """192/96 windows per patch, x4, psnr_bic < 23 dB over T91 + BSD200 (bench/keep_fraction.py):
    1729 windows; OpenCV (the release) keeps 786 (45.5 %), MATLAB 548 (31.7 %); MATLAB reads
    ~1.35 dB higher on the same window."""
    paths = [p for name in ("T91", "BSD200") for p in storage.list_files(str(need_dataset(name)), (".png",))]
    assert len(paths) == 291
    cfg = MineConfig(patch_size=192, stride=96, bic_scale=4, psnr_bic_window="patch", threshold=23.0)
    scores, fraction = {}, {}
    for r in ("matlab", "opencv"):
        c = cfg.model_copy(update={"psnr_bic_resize": r})
        t = mine_images(paths, c)
        patches = apply_keep_rule(t.filter(pc.equal(t.column("error"), "")), c)
        assert patches.num_rows == 1729
        scores[r] = patches.column("psnr_bic").to_numpy().astype(np.float64)
        fraction[r] = pc.sum(patches.column("kept")).as_py() / patches.num_rows
    assert fraction["opencv"] == pytest.approx(786 / 1729, abs=0.005)
    assert fraction["matlab"] == pytest.approx(548 / 1729, abs=0.005)
    assert (scores["matlab"] - scores["opencv"]).mean() == pytest.approx(1.351, abs=0.01)  # bench/keep_fraction.py
