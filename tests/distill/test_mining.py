from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from srdistill.config import MineConfig
from srdistill.distill.mining import (
    MINED_SCHEMA, PATCH_SCHEMA, apply_keep_rule, corpus_pixels, keep_rule, kept_mask, mine_image,
    mine_images, part_name, patch_id, patch_positions, read_patches, score_patches, split_mined,
    summarize_parts,
)  # fmt: skip
from srdistill.sr.imaging import imresize
from srdistill.sr.metrics import psnr

from conftest import data_path


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


def test_image_window_agrees_with_patch_window_on_real_image():
    from srdistill.sr.imaging import read_image, to_gray

    gray = to_gray(read_image(data_path("BSD200/HR/100075.png")))
    pos = patch_positions(gray.shape[1], gray.shape[0], 96, 48)
    a, _ = score_patches(gray, pos, 96, stride=48, window="patch")
    b, _ = score_patches(gray, pos, 96, stride=48, window="image")
    assert np.abs(a - b).mean() < 0.2
    rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    assert np.corrcoef(rank_a, rank_b)[0, 1] > 0.98


def test_grad_box_means_match_direct_mean():
    from srdistill.sr.image_stats import sobel_magnitude

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


# --------------------------------------------------------------------------- keep rule, parts


def _fake_patches(n: int, seed: int, *, sources: int = 4) -> pa.Table:
    """A ``PATCH_SCHEMA`` table of ``n`` patches whose scores take few distinct values (many
    ties), rows in a random order of ``patch_id``."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in rng.permutation(n):
        src = f"/corpus/img{i % sources}.png"
        rows.append({"patch_id": patch_id(src, int(i), 0, 32), "source": src, "x": int(i), "y": 0,
                     "size": 32, "img_w": 640 + 10 * (i % sources), "img_h": 480,
                     "psnr_bic": float(rng.integers(18, 24)), "grad": float(rng.integers(0, 5) * 7.5)})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=PATCH_SCHEMA)


def _reference_top(table: pa.Table, fraction: float, score: str, lower: bool) -> np.ndarray:
    """The ``ceil(fraction * N)`` hardest patches, ties by ascending ``patch_id``, by sorting."""
    s = table.column(score).to_numpy().astype(np.float64)
    ids = np.asarray(table.column("patch_id").to_pylist())
    order = np.lexsort((ids, s if lower else -s))
    mask = np.zeros(table.num_rows, bool)
    mask[order[: int(np.ceil(fraction * table.num_rows))]] = True
    return mask


@pytest.mark.parametrize("score", ["psnr_bic", "grad"])
@pytest.mark.parametrize("fraction", [0.1, 0.37, 0.5, 1.0])
def test_top_fraction_ties_broken_by_patch_id(score, fraction):
    table = _fake_patches(203, seed=1)
    cfg = MineConfig(patch_size=32, stride=32, keep_rule="top_fraction", top_fraction=fraction, keep_score=score)
    want = _reference_top(table, fraction, score, lower=score == "psnr_bic")
    kept = apply_keep_rule(table, cfg).column("kept").to_numpy(zero_copy_only=False)
    assert kept.sum() == int(np.ceil(fraction * table.num_rows))
    assert np.array_equal(kept, want)
    # the rule resolved once over the whole table gives every slice of it the same decisions,
    # whatever the row order (parts are mined in any order)
    s = table.column(score).to_numpy()
    ids = np.asarray(table.column("patch_id").to_pylist())
    rule = keep_rule(cfg, s, lambda cut: ids[s.astype(np.float64) == cut].tolist())
    assert rule["cut"] is not None and rule["tie_id"] is not None and rule["lower"] == (score == "psnr_bic")
    json.loads(json.dumps(rule))  # stored as mine/keep.json
    sliced = np.concatenate([kept_mask(table.slice(a, 50), rule) for a in range(0, table.num_rows, 50)])
    assert np.array_equal(sliced, want)


def test_threshold_and_all_rules_need_no_scores():
    table = _fake_patches(40, seed=2)
    thr = keep_rule(MineConfig(patch_size=32, stride=32, threshold=21.0))
    assert thr == {"rule": "threshold", "score": "psnr_bic", "lower": True, "cut": 21.0, "tie_id": None}
    assert np.array_equal(kept_mask(table, thr), table.column("psnr_bic").to_numpy() < 21.0)
    grad = keep_rule(MineConfig(patch_size=32, stride=32, keep_score="grad", threshold=15.0))
    assert np.array_equal(kept_mask(table, grad), table.column("grad").to_numpy() > 15.0)
    every = keep_rule(MineConfig(patch_size=32, stride=32, keep_rule="all"))
    assert every["cut"] is None and kept_mask(table, every).all()


def _mined(patches: pa.Table, skipped: list[str]) -> pa.Table:
    """``MINED_SCHEMA`` rows: the patches (``error == ""``) and a skip row per ``skipped`` source."""
    rows = [{**r, "error": ""} for r in patches.to_pylist()]
    for src in skipped:
        rows.insert(len(rows) // 2, {"patch_id": "", "source": src, "x": -1, "y": -1, "size": 0,
                                     "img_w": 0, "img_h": 0, "psnr_bic": None, "grad": None,
                                     "error": "not an image file"})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=MINED_SCHEMA)


def test_read_patches_over_parts(tmp_path):
    """Two parts with skip rows, keep.json from ``summarize_parts``: ``read_patches`` returns the
    patch rows only (shard order), ``kept`` as ``apply_keep_rule`` over the whole table."""
    cfg = MineConfig(patch_size=32, stride=32, keep_rule="top_fraction", top_fraction=0.3)
    table = _fake_patches(120, seed=3)
    in_first = pa.compute.is_in(table.column("source"), pa.array(["/corpus/img0.png", "/corpus/img2.png"]))
    first, second = table.filter(in_first), table.filter(pa.compute.invert(in_first))  # an image per part
    table = pa.concat_tables([first, second])
    mine = tmp_path / "mine"
    (mine / "patches").mkdir(parents=True)
    pq.write_table(_mined(first, ["/corpus/bad1.png", "/corpus/bad2.png"]), mine / "patches" / part_name(0))
    pq.write_table(_mined(second, ["/corpus/bad3.jpg"]), mine / "patches" / part_name(1))
    (mine / "patches" / f".{part_name(2)}.0123.tmp").write_bytes(b"in flight")  # ignored
    rule, counts = summarize_parts(str(mine / "patches"), cfg, str(mine / "skipped.parquet"))
    (mine / "keep.json").write_text(json.dumps(rule))
    assert counts["patches"] == 120 and counts["images_skipped"] == 3 and counts["images_mined"] == 4
    assert counts["patches_kept"] == 36 and counts["corpus_pixels"] == 480 * (640 + 650 + 660 + 670)
    assert sorted(pq.read_table(mine / "skipped.parquet").column("source").to_pylist()) == [
        "/corpus/bad1.png", "/corpus/bad2.png", "/corpus/bad3.jpg"]

    want = apply_keep_rule(table, cfg)
    got = read_patches(str(mine))
    assert got.column_names == [*PATCH_SCHEMA.names, "kept"]
    assert got.equals(want)  # skip rows dropped, shard then row order, the same kept
    assert got.column("kept").to_numpy(zero_copy_only=False).sum() == 36

    kept = read_patches(str(mine), kept_only=True)
    assert kept.column_names == [*PATCH_SCHEMA.names, "kept"] and all(kept.column("kept").to_pylist())
    assert kept.column("patch_id").to_pylist() == want.filter(want.column("kept")).column("patch_id").to_pylist()

    ids = read_patches(str(mine), ["patch_id", "grad"], kept_only=True)
    assert ids.column_names == ["patch_id", "grad"] and ids.num_rows == 36
    assert read_patches(str(mine), ["kept"]).column_names == ["kept"]
    assert read_patches(str(mine), ["source", "x"]).column_names == ["source", "x"]

    src = "/corpus/img1.png"
    one = read_patches(str(mine), ["patch_id", "source", "kept"], filter=pads.field("source") == src)
    sub = want.filter(pa.compute.equal(want.column("source"), src))
    assert one.column("patch_id").to_pylist() == sub.column("patch_id").to_pylist()
    assert one.column("kept").to_pylist() == sub.column("kept").to_pylist()  # the global rule, not the slice's
