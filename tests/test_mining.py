from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from srdistill.config import MineConfig
from srdistill.imaging import imresize
from srdistill.metrics import psnr
from srdistill.mining import (
    apply_keep_rule, corpus_pixels, mine_image, mine_images, patch_id, patch_positions,
    score_patches, split_mined,
)  # fmt: skip


def test_patch_positions_and_ids():
    assert patch_positions(10, 6, 4, 3) == [(0, 0), (3, 0), (6, 0)]
    assert patch_positions(3, 10, 4, 2) == []
    assert patch_id("/a.png", 0, 0, 64) == patch_id("/a.png", 0, 0, 64)
    assert len({patch_id("/a.png", x, 0, 64) for x in range(50)}) == 50


def _textured(h=96, w=128, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.float64)
    img[:, w // 2 :] = rng.integers(0, 256, (h, w - w // 2))  # right half noise, left half flat
    img[:, : w // 2] = 120
    return img.astype(np.uint8)


@pytest.mark.parametrize("window", ["patch", "image"])
def test_scores_rank_texture_harder_than_flat(window):
    gray = _textured()
    positions = [(0, 0), (64, 0)]
    p, g = score_patches(gray, positions, 32, stride=32, window=window)
    assert p[0] == pytest.approx(99.0)  # flat: bicubic restores it exactly (capped)
    assert g[0] == pytest.approx(0.0)
    assert p[1] < 20 and g[1] > 20  # noise: hard to upscale, strong gradient


def test_patch_window_psnr_is_srdd_definition():
    rng = np.random.default_rng(3)
    gray = np.clip(rng.normal(128, 40, (64, 64)), 0, 255).astype(np.uint8)
    p, _ = score_patches(gray, [(16, 16)], 32, stride=16, window="patch")
    patch = gray[16:48, 16:48]
    ref = psnr(patch, imresize(imresize(patch, 1 / 4), 4.0))
    assert p[0] == pytest.approx(ref, abs=1e-3)


def test_image_window_agrees_with_patch_window_on_real_image(shared_data):
    from srdistill.imaging import read_image, to_gray

    gray = to_gray(read_image(shared_data / "BSD200" / "HR" / "100075.png"))
    pos = patch_positions(gray.shape[1], gray.shape[0], 96, 48)
    a, _ = score_patches(gray, pos, 96, stride=48, window="patch")
    b, _ = score_patches(gray, pos, 96, stride=48, window="image")
    assert np.abs(a - b).mean() < 0.2
    rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    assert np.corrcoef(rank_a, rank_b)[0, 1] > 0.98


def test_grad_box_means_match_direct_mean():
    from srdistill.mining import sobel_magnitude

    gray = _textured(seed=5)
    mag = sobel_magnitude(gray)
    for stride in (16, 24):  # block sums (16 | 32) and the summed-area-table path (24)
        pos = patch_positions(gray.shape[1], gray.shape[0], 32, stride)
        _, g = score_patches(gray, pos, 32, stride=stride)
        direct = [mag[y : y + 32, x : x + 32].mean() for x, y in pos]
        assert np.allclose(g, direct, rtol=1e-5)


def test_mine_image_skips_with_reasons(tmp_path):
    cfg = MineConfig(patch_size=32, stride=32, max_side=500)
    (tmp_path / "text.png").write_text("hello")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "one.png")
    Image.fromarray(np.zeros((4, 600), np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(_textured()).save(tmp_path / "ok.png")
    reasons = {n: mine_image(str(tmp_path / n), cfg) for n in ["text.png", "one.png", "wide.png", "ok.png"]}
    assert "not an image" in reasons["text.png"][0]["error"]
    assert "too small" in reasons["one.png"][0]["error"]
    assert "too large" in reasons["wide.png"][0]["error"]
    ok = reasons["ok.png"]
    assert len(ok) == 12 and all(r["error"] == "" for r in ok)


def test_mine_images_split_and_keep_rules(tmp_path):
    Image.fromarray(_textured()).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG broken")
    cfg = MineConfig(patch_size=32, stride=32)
    table = mine_images([str(tmp_path / "a.png"), str(tmp_path / "b.png")], cfg)
    patches, skipped = split_mined(table)
    assert patches.num_rows == 12 and [s["file"] for s in skipped] == [str(tmp_path / "b.png")]
    ids = []
    for mount in ("mnt1", "mnt2"):  # the same corpus mounted at two places: the same ids
        (tmp_path / mount / "sub").mkdir(parents=True)
        shutil.copy(tmp_path / "a.png", tmp_path / mount / "sub" / "a.png")
        rooted, _ = split_mined(mine_images([str(tmp_path / mount / "sub" / "a.png")], cfg, root=str(tmp_path / mount)))
        ids.append(rooted.column("patch_id").to_pylist())
    assert ids[0] == ids[1] == [patch_id("sub/a.png", r["x"], r["y"], 32) for r in rooted.to_pylist()]
    assert "error" not in patches.column_names
    assert corpus_pixels(patches) == 96 * 128
    thr = apply_keep_rule(patches, MineConfig(patch_size=32, stride=32, threshold=23.0))
    kept = thr.column("kept").to_numpy(zero_copy_only=False)
    assert kept.sum() == 6  # the six noise patches
    top = apply_keep_rule(patches, MineConfig(patch_size=32, stride=32, keep_rule="top_fraction",
                                              top_fraction=0.25, keep_score="grad"))  # fmt: skip
    assert top.column("kept").to_numpy(zero_copy_only=False).sum() == 3
    every = apply_keep_rule(patches, MineConfig(patch_size=32, stride=32, keep_rule="all"))
    assert all(every.column("kept").to_pylist())
    assert isinstance(every, pa.Table)
