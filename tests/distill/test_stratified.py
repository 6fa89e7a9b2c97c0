"""Coverage-centric Coreset Selection (Zheng et al. 2023) and the hard + uniform mix: CCS's
budget rule on hand-made strata, bins, pruning, and both as ``select_patches`` methods."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from srdistill.config import SelectConfig
from srdistill.distill.selection import select_patches
from srdistill.distill.stratified import ccs_allocation, ccs_select, hard_mix_select, rounded_count

from test_selection import make_table


def test_ccs_allocation_follows_the_rule():
    # visit 1, 5, 20, 30 (smallest first): min(1, 20 // 4), min(5, 19 // 3), min(20, 14 // 2), 7
    assert ccs_allocation(np.array([5, 0, 1, 20, 30]), 20).tolist() == [5, 0, 1, 7, 7]
    # equal sizes: the floor share, the remainder to the last visited (the highest index)
    assert ccs_allocation(np.array([10, 10, 10]), 10).tolist() == [3, 3, 4]
    # small strata whole, the rest evenly: 2 + 3, then (40 - 5) over two
    assert ccs_allocation(np.array([50, 2, 3, 50]), 40).tolist() == [17, 2, 3, 18]
    # a budget above the candidates takes everything
    assert ccs_allocation(np.array([2, 0, 3]), 10).tolist() == [2, 0, 3]
    assert ccs_allocation(np.array([4, 4]), 0).tolist() == [0, 0]
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 30, rng.integers(1, 12))
        m = int(rng.integers(0, 200))
        q = ccs_allocation(sizes, m)
        assert (q <= sizes).all() and q.sum() == min(m, sizes.sum())
    with pytest.raises(ValueError, match="sizes and m"):
        ccs_allocation(np.array([3, -1]), 2)


def test_ccs_bins_picks_and_pruning():
    key = np.random.default_rng(1).normal(size=500)  # smaller = harder
    hardness = -key
    lo, width = hardness.min(), np.ptp(hardness) / 10
    bins = np.minimum(((hardness - lo) / width).astype(int), 9)
    chosen, rank, stratum = ccs_select(key, 60, strata=10, prune_hard=0.0, seed=0)
    assert len(set(chosen.tolist())) == 60 and chosen.dtype == np.int64
    np.testing.assert_array_equal(stratum, bins[chosen])  # each pick comes from its bin
    np.testing.assert_array_equal(np.bincount(stratum, minlength=10), ccs_allocation(np.bincount(bins, minlength=10), 60))
    assert (np.diff(stratum) >= 0).all()
    for b in np.unique(stratum):
        assert rank[stratum == b].tolist() == list(range((stratum == b).sum()))
    # the sparse extreme bins are taken whole; a random sample would take ~0-1 of each
    counts = np.bincount(bins, minlength=10)
    assert np.bincount(stratum, minlength=10)[0] == counts[0] and counts[0] < 6
    # seeded
    again = ccs_select(key, 60, strata=10, prune_hard=0.0, seed=0)
    assert all((a == b).all() for a, b in zip(again, (chosen, rank, stratum)))
    assert set(ccs_select(key, 60, strata=10, prune_hard=0.0, seed=1)[0].tolist()) != set(chosen.tolist())
    # pruning: the 20% hardest are never picked, and the bins span what is left
    hardest = set(np.argsort(key)[:100].tolist())
    chosen, _, stratum = ccs_select(key, 60, strata=10, prune_hard=0.2, seed=0)
    assert not hardest & set(chosen.tolist())
    everything = ccs_select(key, 1000, strata=10, prune_hard=0.2, seed=0)[0]
    assert sorted(everything.tolist()) == sorted(set(range(500)) - hardest)
    # equal scores: one bin
    assert set(ccs_select(np.zeros(20), 5, strata=4, prune_hard=0.0, seed=0)[2].tolist()) == {0}
    with pytest.raises(ValueError, match="non-finite"):
        ccs_select(np.array([0.0, np.nan]), 1, strata=2, prune_hard=0.0, seed=0)


def test_hard_mix_exact_hard_count():
    key = np.random.default_rng(2).normal(size=200)
    order = np.argsort(key)
    for fraction, m in ((0.5, 39), (0.29, 100), (0.0, 10), (1.0, 10), (0.25, 3)):
        chosen, rank, group = hard_mix_select(key, m, hard_fraction=fraction, seed=0)
        n_hard = rounded_count(fraction, m)
        assert len(chosen) == m and len(set(chosen.tolist())) == m
        assert (group == 0).sum() == n_hard
        assert chosen[group == 0].tolist() == order[:n_hard].tolist()  # hardest first
        assert not set(chosen[group == 1].tolist()) & set(order[:n_hard].tolist())
        assert rank.tolist() == list(range(n_hard)) + list(range(m - n_hard))
    assert rounded_count(0.5, 39) == 20 and rounded_count(0.29, 100) == 29
    assert len(hard_mix_select(key, 500, hard_fraction=0.5, seed=0)[0]) == 200
    with pytest.raises(ValueError, match="hard_fraction"):
        hard_mix_select(key, 5, hard_fraction=1.5, seed=0)


@pytest.mark.parametrize("method", ["stratified", "hard-mix"])
def test_select_patches_methods(method):
    table = make_table([40, 30, 30])
    cfg = SelectConfig(method=method, ipc=1, max_overlap=1.0, seed=3)
    out = select_patches(table, cfg, n_total=20)
    assert out.num_rows == 20 and len(set(out.column("patch_id").to_pylist())) == 20
    assert out.column_names == table.column_names + ["rank", "score"]  # cluster reused
    cl, rank, score = (out.column(c).to_numpy() for c in ("cluster", "rank", "score"))
    assert out.column("cluster").type == pa.int32() and out.column("rank").type == pa.int32()
    np.testing.assert_array_equal(score, out.column("psnr_bic").to_numpy())
    assert (np.diff(cl) >= 0).all()  # by (cluster, rank)
    for c in np.unique(cl):
        assert rank[cl == c].tolist() == list(range((cl == c).sum()))
    shuffled = table.take(pa.array(np.random.default_rng(5).permutation(table.num_rows)))
    assert out.equals(select_patches(shuffled, cfg, n_total=20))
    other = select_patches(table, cfg.model_copy(update={"seed": 4}), n_total=20)
    assert set(other.column("patch_id").to_pylist()) != set(out.column("patch_id").to_pylist())
    psnr = table.column("psnr_bic").to_numpy()
    if method == "hard-mix":  # group 0: exactly the 10 hardest (lowest psnr_bic)
        np.testing.assert_array_equal(np.sort(score[cl == 0]), np.sort(psnr)[:10])
        assert (score[cl == 1] > np.sort(psnr)[9]).all()
        topk = select_patches(table, SelectConfig(method="score-topk", ipc=1, max_overlap=1.0), n_total=20)
        full = select_patches(table, cfg.model_copy(update={"hard_fraction": 1.0}), n_total=20)
        assert full.column("patch_id").to_pylist() == topk.column("patch_id").to_pylist()
    else:  # bin 0 = easiest: the highest psnr_bic; bins are equal-width in psnr_bic
        edges = np.linspace(psnr.max(), psnr.min(), 9)  # hardness rises as psnr_bic falls
        for b in np.unique(cl):
            assert (score[cl == b] <= edges[b] + 1e-4).all() and (score[cl == b] >= edges[b + 1] - 1e-4).all()
        pruned = select_patches(table, cfg.model_copy(update={"prune_hard": 0.1}), n_total=20)
        assert pruned.column("score").to_numpy().min() > np.sort(psnr)[9]
        # grad: higher is harder, so the top bin holds the highest grad
        g = select_patches(table, cfg.model_copy(update={"score": "grad"}), n_total=20)
        gs, gc = g.column("score").to_numpy(), g.column("cluster").to_numpy()
        assert gs[gc == gc.max()].min() > gs[gc == gc.min()].max()


def test_stratified_thins_overlaps_first_and_rejects_nan():
    table = make_table([20, 20])
    with_nan = table.set_column(table.column_names.index("psnr_bic"), "psnr_bic",
                                pa.array(np.r_[np.nan, table.column("psnr_bic").to_numpy()[1:]].astype(np.float32)))
    with pytest.raises(ValueError, match="non-finite"):
        select_patches(with_nan, SelectConfig(method="stratified", ipc=1, max_overlap=1.0), n_total=5)
    # thinning runs first: a budget above what thinning leaves returns exactly those candidates
    thin = select_patches(table, SelectConfig(method="score-topk", ipc=1, max_overlap=0.0), n_total=1000)
    for method in ("stratified", "hard-mix"):
        out = select_patches(table, SelectConfig(method=method, ipc=1, max_overlap=0.0), n_total=1000)
        assert sorted(out.column("patch_id").to_pylist()) == sorted(thin.column("patch_id").to_pylist())
