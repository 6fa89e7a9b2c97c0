"""k-center greedy (Sener and Savarese 2018): the 2-approximation against brute force, coverage
of separated groups, pixel descriptors of real patches, and the ``kcenter`` selection method."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from srdistill.config import MineConfig, SelectConfig
from srdistill.distill.kcenter import attach_descriptors, covering_radius, kcenter_greedy, patch_descriptors
from srdistill.distill.mining import mine_images, split_mined
from srdistill.distill.selection import select_patches

from conftest import T91
from test_selection import make_table, with_complexity


def t91_patches(n_images: int = 4, size: int = 32, stride: int = 16) -> pa.Table:
    """Every window of the first ``n_images`` vendored T91 images (a real patch table)."""
    files = sorted(str(p) for p in T91.glob("*.png"))[:n_images]
    return split_mined(mine_images(files, MineConfig(patch_size=size, stride=stride, keep_rule="all")))[0]


def test_greedy_radius_is_within_twice_the_optimum():
    for trial in range(6):
        x = np.random.default_rng(trial).standard_normal((12, 2)).astype(np.float32)
        best = min(covering_radius(x, list(c)) for c in itertools.combinations(range(12), 3))
        for seed in range(4):
            picks = kcenter_greedy(x, 3, seed=seed)
            assert picks.dtype == np.int64 and len(set(picks.tolist())) == 3
            assert covering_radius(x, picks) <= 2 * best + 1e-6, (trial, seed)


def test_each_pick_is_the_farthest_point():
    x = np.random.default_rng(1).standard_normal((300, 5))
    picks = kcenter_greedy(x, 20, seed=4)
    assert picks[0] == np.random.default_rng(4).integers(300)  # the seeded first centre
    for t in range(1, 20):
        dist = np.linalg.norm(x[:, None] - x[picks[:t]][None], axis=2).min(axis=1)
        assert dist[picks[t]] == pytest.approx(dist.max(), rel=1e-5)


def test_picks_cover_every_separated_blob():
    rng = np.random.default_rng(0)
    sizes = [400, 120, 30, 8, 3, 1]
    centres = 20.0 * rng.standard_normal((len(sizes), 16))
    blob = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[blob] + rng.standard_normal((len(blob), 16))
    for seed in range(3):
        picks = kcenter_greedy(x, len(sizes), seed=seed)
        assert sorted(blob[picks].tolist()) == list(range(len(sizes))), seed
    # a uniform sample of the same size misses the small blobs
    uniform = rng.choice(len(blob), size=len(sizes), replace=False)
    assert len(set(blob[uniform].tolist())) < len(sizes)


def test_edge_cases_and_errors():
    x = np.zeros((5, 3), np.float32)  # all points equal: distinct rows, lowest first after the seed
    picks = kcenter_greedy(x, 4, seed=0)
    assert len(set(picks.tolist())) == 4
    assert kcenter_greedy(x, 9, seed=0).tolist() == sorted(range(5), key=lambda i: (i != picks[0], i))
    assert kcenter_greedy(x, 0, seed=0).shape == (0,)
    with pytest.raises(ValueError, match="not finite"):
        kcenter_greedy(np.array([[0.0], [np.nan]]), 1, seed=0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        kcenter_greedy(np.zeros(4), 1, seed=0)
    with pytest.raises(ValueError, match="m must be"):
        kcenter_greedy(x, -1, seed=0)


def test_descriptors_of_real_patches():
    table = t91_patches()
    desc = patch_descriptors(table)
    assert desc.shape == (table.num_rows, 81) and desc.dtype == np.float32 and np.isfinite(desc).all()
    np.testing.assert_allclose(desc.mean(axis=0), 0.0, atol=1e-5)
    # each block adds 1 on average to the squared norm (thumbnail 64, orientations 8, colour 9)
    for lo, hi in ((0, 64), (64, 72), (72, 81)):
        assert (desc[:, lo:hi] ** 2).sum(axis=1).mean() == pytest.approx(1.0, abs=1e-4)
    # the gradient block orders patches as the mined gradient score does
    strength = desc[:, 64:72].sum(axis=1)
    grad = table.column("grad").to_numpy()
    assert np.corrcoef(np.argsort(np.argsort(strength)), np.argsort(np.argsort(grad)))[0, 1] > 0.8
    # rows follow the table: a shuffled table gives the same rows, shuffled
    perm = np.random.default_rng(0).permutation(table.num_rows)
    np.testing.assert_allclose(patch_descriptors(table.take(pa.array(perm))), desc[perm], atol=1e-5)
    assert patch_descriptors(table.slice(0, 0)).shape == (0, 81)
    with pytest.raises(ValueError, match="size"):
        patch_descriptors(table.drop_columns(["size"]))


KC = dict(method="kcenter", ipc=1, max_overlap=1.0)


def test_kcenter_selection_on_descriptors():
    table = t91_patches()
    out = select_patches(table, SelectConfig(**KC), n_total=12)
    assert out.num_rows == 12 and len(set(out.column("patch_id").to_pylist())) == 12
    assert out.column("rank").to_pylist() == list(range(12))
    np.testing.assert_array_equal(out.column("score").to_numpy(), out.column("psnr_bic").to_numpy())
    shuffled = table.take(pa.array(np.random.default_rng(3).permutation(table.num_rows)))
    assert out.equals(select_patches(shuffled, SelectConfig(**KC), n_total=12))
    # attached descriptors are used as they are: the same picks as computing them
    attached = attach_descriptors(table)
    same = select_patches(attached, SelectConfig(**KC), n_total=12)
    assert same.column("patch_id").equals(out.column("patch_id"))
    # the picks spread out: farther from each other than a random sample's
    desc = patch_descriptors(table)
    row = {p: i for i, p in enumerate(table.column("patch_id").to_pylist())}

    def spread(sel):
        d = desc[[row[p] for p in sel.column("patch_id").to_pylist()]]
        return np.linalg.norm(d[:, None] - d[None], axis=2)[np.triu_indices(len(d), 1)].min()

    rnd = [spread(select_patches(table, SelectConfig(**{**KC, "method": "random"}, seed=s), n_total=12))
           for s in range(5)]  # fmt: skip
    assert spread(out) > max(rnd)
    # seeded: another first centre, another set
    other = select_patches(table, SelectConfig(**KC, seed=1), n_total=12)
    assert set(other.column("patch_id").to_pylist()) != set(out.column("patch_id").to_pylist())


def test_kcenter_on_stored_features_covers_every_cluster_and_names_missing_columns():
    base = make_table([300, 60, 12, 4])
    labels = base.column("cluster").to_numpy()
    table = with_complexity(base)  # feature: one direction per cluster
    out = select_patches(table, SelectConfig(**KC, features="vit"), n_total=4)
    ids = out.column("patch_id").to_pylist()
    row = {p: i for i, p in enumerate(table.column("patch_id").to_pylist())}
    assert sorted(labels[[row[p] for p in ids]].tolist()) == [0, 1, 2, 3]
    clip = table.append_column("embedding", table.column("feature"))
    same = select_patches(clip, SelectConfig(**KC, features="clip"), n_total=4)
    assert same.column("patch_id").to_pylist() == ids
    with pytest.raises(ValueError, match=r"\['embedding'\].*features 'clip'"):
        select_patches(table, SelectConfig(**KC, features="clip"), n_total=4)
    with pytest.raises(ValueError, match=r"\['feature'\].*features 'vit'"):
        select_patches(table.drop_columns(["feature"]), SelectConfig(**KC, features="vit"), n_total=4)
    with pytest.raises(ValueError, match="source"):
        select_patches(table.drop_columns(["source"]), SelectConfig(**KC), n_total=4)
    assert select_patches(table, SelectConfig(**KC, features="vit"), n_total=0).num_rows == 0
