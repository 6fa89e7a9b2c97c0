"""Budgets, the selection methods (clip-kmeans, tripled and the baselines), subset_mmd and the
PNG export of the distilled set."""

from __future__ import annotations

import csv
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from srdistill.config import SelectConfig
from srdistill.distill.selection import (
    budget_patches, export_distilled, non_overlapping, select_patches, subset_mmd,
)

from conftest import T91


def make_table(cluster_sizes: list[int], *, seed: int = 0, sources=None, size: int = 32):
    """Synthetic kept-patch table: ``cluster_sizes[c]`` patches in cluster ``c``."""
    rng = np.random.default_rng(seed)
    n = sum(cluster_sizes)
    cluster = np.repeat(np.arange(len(cluster_sizes)), cluster_sizes).astype(np.int32)
    perm = rng.permutation(n)  # rows in no particular order
    sources = sources or [os.path.join(T91, f"t{i}.png") for i in (1, 2, 3)]
    return pa.table({
        "patch_id": pa.array([f"{i:016x}" for i in perm]),
        "source": pa.array([sources[i % len(sources)] for i in range(n)]),
        "x": pa.array((8 * (perm % 5)).astype(np.int32)),
        "y": pa.array((8 * (perm % 7)).astype(np.int32)),
        "size": pa.array(np.full(n, size, np.int32)),
        "psnr_bic": pa.array(rng.uniform(15, 23, n).astype(np.float32)),
        "grad": pa.array(rng.uniform(0, 100, n).astype(np.float32)),
        "kept": pa.array(np.ones(n, bool)),
        "cluster": pa.array(cluster[perm]),
    })


def test_budget_ipc_and_pixel_fraction():
    assert budget_patches(SelectConfig(ipc=10), n_clusters=7, corpus_pixels=0, patch_size=512) == 70
    pf = SelectConfig(pixel_fraction=0.0068)
    # 0.68% of 10,000 images of 1000x1000 px in 192x192 patches: floor(68e6 / 36864) = 1844
    assert budget_patches(pf, n_clusters=7, corpus_pixels=10**10, patch_size=192) == 1844
    assert budget_patches(pf, n_clusters=7, corpus_pixels=100, patch_size=192) == 1  # at least 1
    with pytest.raises(ValueError):
        budget_patches(pf, n_clusters=0, corpus_pixels=100, patch_size=192)


def test_clip_kmeans_balanced_and_hardest_first():
    table = make_table([30, 25, 40])
    out = select_patches(table, SelectConfig(max_overlap=1.0, ipc=5), n_total=15)
    assert out.num_rows == 15
    counts = np.bincount(out.column("cluster").to_numpy(), minlength=3)
    assert counts.tolist() == [5, 5, 5]
    assert out.column("rank").type == pa.int32() and out.column("score").type == pa.float32()
    cl, rank, score = (out.column(c).to_numpy() for c in ("cluster", "rank", "score"))
    all_cl, all_psnr = table.column("cluster").to_numpy(), table.column("psnr_bic").to_numpy()
    for c in range(3):
        assert rank[cl == c].tolist() == list(range(5))
        hardest = np.sort(all_psnr[all_cl == c])[:5]  # psnr_bic: lower is harder
        np.testing.assert_array_equal(score[cl == c], hardest)
    # grad: higher is harder
    out = select_patches(table, SelectConfig(max_overlap=1.0, ipc=4, score="grad"), n_total=12)
    cl, score = out.column("cluster").to_numpy(), out.column("score").to_numpy()
    for c in range(3):
        assert (np.diff(score[cl == c]) <= 0).all()


def test_clip_kmeans_redistributes_small_cluster_and_uneven_budget():
    table = make_table([2, 30, 30])
    out = select_patches(table, SelectConfig(max_overlap=1.0, ipc=10), n_total=30)
    counts = np.bincount(out.column("cluster").to_numpy(), minlength=3).tolist()
    assert counts == [2, 14, 14]
    out = select_patches(table, SelectConfig(max_overlap=1.0, ipc=10), n_total=7)  # not a multiple of 3
    counts = sorted(np.bincount(out.column("cluster").to_numpy(), minlength=3).tolist())
    assert counts == [2, 2, 3]
    # More than available: everything, once.
    out = select_patches(table, SelectConfig(max_overlap=1.0, ipc=100), n_total=300)
    assert out.num_rows == 62 and len(set(out.column("patch_id").to_pylist())) == 62


def test_selection_is_deterministic_and_independent_of_row_order():
    table = make_table([20, 20, 20])
    shuffled = table.take(pa.array(np.random.default_rng(5).permutation(table.num_rows)))
    for method in ("clip-kmeans", "score-topk", "random"):
        cfg = SelectConfig(max_overlap=1.0, ipc=4, method=method, seed=3)
        a = select_patches(table, cfg, n_total=12)
        b = select_patches(shuffled, cfg, n_total=12)
        assert a.equals(b), method


def test_baselines_honour_the_same_budget():
    table = make_table([50, 5, 5])
    topk = select_patches(table, SelectConfig(max_overlap=1.0, ipc=5, method="score-topk"), n_total=15)
    assert topk.num_rows == 15 and topk.column("rank").to_pylist() == list(range(15))
    all_scores = np.sort(table.column("psnr_bic").to_numpy())
    np.testing.assert_array_equal(topk.column("score").to_numpy(), all_scores[:15])
    rnd = select_patches(table, SelectConfig(max_overlap=1.0, ipc=5, method="random", seed=1), n_total=15)
    assert rnd.num_rows == 15 and len(set(rnd.column("patch_id").to_pylist())) == 15
    other = select_patches(table, SelectConfig(max_overlap=1.0, ipc=5, method="random", seed=2), n_total=15)
    assert set(rnd.column("patch_id").to_pylist()) != set(other.column("patch_id").to_pylist())


def test_overlapping_windows_are_thinned_hardest_first():
    # one image, 64-px windows at stride 32 on a 3x3 grid; psnr_bic decreasing with position
    xs, ys = np.meshgrid([0, 32, 64], [0, 32, 64])
    n = xs.size
    table = pa.table({
        "patch_id": pa.array([f"{i:016x}" for i in range(n)]),
        "source": pa.array(["/img.png"] * n),
        "x": pa.array(xs.ravel().astype(np.int32)), "y": pa.array(ys.ravel().astype(np.int32)),
        "size": pa.array(np.full(n, 64, np.int32)),
        "psnr_bic": pa.array(np.linspace(25, 15, n).astype(np.float32)),  # last = hardest
        "cluster": pa.array(np.zeros(n, np.int32)),
    })
    key = table.column("psnr_bic").to_numpy()
    # 0.5: side neighbours (exactly half overlap) stay, anything overlapping more goes
    assert non_overlapping(table, key, 1.0).all()
    assert non_overlapping(table, key, 0.5).all()
    keep = non_overlapping(table, key, 0.25)  # side neighbours go, diagonal (1/4) stays
    assert keep.tolist() == [True, False, True, False, True, False, True, False, True]
    assert non_overlapping(table, key, 0.0).tolist() == [True, False, True] + [False] * 3 + [True, False, True]
    out = select_patches(table, SelectConfig(ipc=9, max_overlap=0.0), n_total=9)
    assert out.num_rows == 4  # only disjoint windows remain to choose from
    assert sorted(zip(out.column("x").to_pylist(), out.column("y").to_pylist())) == [(0, 0), (0, 64), (64, 0), (64, 64)]
    other_image = table.set_column(1, "source", pa.array([f"/img{i}.png" for i in range(n)]))
    assert non_overlapping(other_image, key, 0.0).all()  # overlap only counts within an image


def test_missing_column_is_an_error():
    table = make_table([5, 5]).drop_columns(["cluster"])
    with pytest.raises(ValueError, match="cluster"):
        select_patches(table, SelectConfig(ipc=1), n_total=2)
    # the baselines do not need clusters
    assert select_patches(table, SelectConfig(ipc=1, method="random"), n_total=2).num_rows == 2


def test_export_writes_pngs_and_provenance(tmp_path):
    table = make_table([6, 6], size=40)
    selected = select_patches(table, SelectConfig(ipc=3), n_total=6)
    paths = export_distilled(selected, tmp_path / "distilled")
    assert len(paths) == 6 and all(p.is_file() for p in paths)
    assert sorted(p.name for p in (tmp_path / "distilled").glob("*.png")) == sorted(
        p.name for p in paths
    )
    for path, row in zip(paths, selected.to_pylist()):
        assert path.name == f"c{row['cluster']:03d}_r{row['rank']:04d}_{row['patch_id']}.png"
        with Image.open(path) as im:
            assert im.size == (40, 40) and im.mode == "RGB"
            src = np.asarray(Image.open(row["source"]).convert("RGB"))
            x, y = row["x"], row["y"]
            np.testing.assert_array_equal(np.asarray(im), src[y : y + 40, x : x + 40])
    with open(tmp_path / "distilled" / "provenance.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert list(rows[0]) == ["file", "patch_id", "source", "x", "y", "size", "cluster", "score"]
    assert {r["file"] for r in rows} == {p.name for p in paths}
    # Re-export: identical files are left alone; a smaller selection removes stale PNGs.
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    assert export_distilled(selected, tmp_path / "distilled") == paths
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in paths)
    fewer = select_patches(table, SelectConfig(ipc=1), n_total=2)
    export_distilled(fewer, tmp_path / "distilled")
    assert len(list((tmp_path / "distilled").glob("*.png"))) == 2
    assert not list((tmp_path / "distilled").glob(".*"))


# --- tripled: complexity strata + kernel herding on ViT features -------------------------------


def with_complexity(table: pa.Table, *, dim: int = 16, seed: int = 0) -> pa.Table:
    """Add TripleD columns to a ``make_table`` table: unit ``feature`` vectors drawn around one
    random centre per ``cluster`` (a Gaussian mixture with the clusters' unequal sizes),
    complexity scores that rise with the cluster index plus noise, and ``cluster`` = -1."""
    rng = np.random.default_rng(seed)
    lab = table.column("cluster").to_numpy()
    n = len(lab)
    centres = rng.standard_normal((lab.max() + 1, dim))
    feat = centres[lab] + 0.35 * rng.standard_normal((n, dim))
    feat /= np.linalg.norm(feat, axis=1, keepdims=True)
    comp = lab + rng.normal(0.0, 0.6, n)
    table = table.set_column(table.column_names.index("cluster"), "cluster",
                             pa.array(np.full(n, -1, np.int32)))
    table = table.set_column(table.column_names.index("grad"), "grad", pa.array(comp.astype(np.float32)))
    return (table.append_column("vit_complexity", pa.array(comp.astype(np.float32)))
            .append_column("entropy", pa.array((8 - comp / 2 + rng.normal(0, 0.1, n)).astype(np.float32)))
            .append_column("grad_energy", pa.array((100 * comp + 5).astype(np.float32)))
            .append_column("feature", pa.FixedSizeListArray.from_arrays(
                pa.array(feat.astype(np.float32).ravel()), dim)))


def features(table: pa.Table) -> np.ndarray:
    col = table.column("feature").combine_chunks()
    return col.flatten().to_numpy().reshape(table.num_rows, -1)


TRIPLED = dict(method="tripled", ipc=1, max_overlap=1.0)


def test_tripled_budget_order_and_determinism():
    table = with_complexity(make_table([300, 150, 100, 50]))
    out = select_patches(table, SelectConfig(**TRIPLED), n_total=40)
    assert out.num_rows == 40 and len(set(out.column("patch_id").to_pylist())) == 40
    assert out.column_names == table.column_names + ["rank", "score"]  # feature kept, cluster reused
    assert out.column("cluster").type == pa.int32() and out.column("rank").type == pa.int32()
    cl, rank, score = (out.column(c).to_numpy() for c in ("cluster", "rank", "score"))
    np.testing.assert_array_equal(score, out.column("vit_complexity").to_numpy())
    assert set(cl.tolist()) == set(range(8))  # default 8 strata, 0 = least complex
    assert (np.diff(cl) >= 0).all()  # ordered by (cluster, rank)
    for s in range(8):
        assert rank[cl == s].tolist() == list(range((cl == s).sum()))
    for s in range(7):  # quantile bins: every score of a stratum <= every score of the next
        assert score[cl == s].max() <= score[cl == s + 1].min()
    # independent of row order, deterministic, seeded
    shuffled = table.take(pa.array(np.random.default_rng(7).permutation(table.num_rows)))
    assert out.equals(select_patches(shuffled, SelectConfig(**TRIPLED), n_total=40))
    other = select_patches(table, SelectConfig(**TRIPLED, seed=1), n_total=40)
    assert other.num_rows == 40
    # the complexity score chosen is the one stratified and reported
    ent = select_patches(table, SelectConfig(**TRIPLED, complexity_score="entropy"), n_total=40)
    np.testing.assert_array_equal(ent.column("score").to_numpy(), ent.column("entropy").to_numpy())
    # a budget above the rows: all of them, once; zero: none
    everything = select_patches(table, SelectConfig(**TRIPLED), n_total=1000)
    assert sorted(everything.column("patch_id").to_pylist()) == sorted(table.column("patch_id").to_pylist())
    assert select_patches(table, SelectConfig(**TRIPLED), n_total=0).num_rows == 0


def test_tripled_represents_the_corpus_better_than_random_and_topk():
    table = with_complexity(make_table([300, 150, 100, 50]))
    corpus = features(table)
    for budget in (16, 40):
        tripled = subset_mmd(features(select_patches(table, SelectConfig(**TRIPLED), n_total=budget)), corpus)
        rnd = np.mean([
            subset_mmd(features(select_patches(
                table, SelectConfig(method="random", ipc=1, max_overlap=1.0, seed=s), n_total=budget)), corpus)
            for s in range(5)
        ])
        # score-topk by complexity (``grad`` holds the complexity in this table)
        topk = subset_mmd(features(select_patches(
            table, SelectConfig(method="score-topk", score="grad", ipc=1, max_overlap=1.0), n_total=budget)), corpus)
        assert tripled < 0.75 * rnd and tripled < topk, (budget, tripled, rnd, topk)
        # one stratum: plain kernel herding, far closer than a random sample of the same size
        herded = subset_mmd(features(select_patches(
            table, SelectConfig(**TRIPLED, strata=1), n_total=budget)), corpus)
        assert herded < 0.25 * rnd, (budget, herded, rnd)


def test_tripled_strata_share_the_budget_in_proportion():
    table = with_complexity(make_table([300, 150, 100, 50]))
    n = table.num_rows
    for strata, budget in ((7, 40), (8, 37), (3, 10), (5, 599)):
        out = select_patches(table, SelectConfig(**TRIPLED, strata=strata), n_total=budget)
        sizes = np.bincount(np.arange(n) * strata // n)  # equal-count bins by rank
        counts = np.bincount(out.column("cluster").to_numpy(), minlength=strata)
        assert counts.sum() == budget and len(counts) == strata
        assert (np.abs(counts - budget * sizes / n) < 1).all(), (strata, budget, counts)
    # equal remainders: the extra slots go to the most complex strata
    out = select_patches(table, SelectConfig(**TRIPLED, strata=8), n_total=37)
    assert np.bincount(out.column("cluster").to_numpy()).tolist() == [4, 4, 4, 5, 5, 5, 5, 5]
    # fewer candidates than strata: one stratum per candidate
    small = with_complexity(make_table([3, 2]))
    out = select_patches(small, SelectConfig(**TRIPLED, strata=8), n_total=3)
    assert out.num_rows == 3 and np.bincount(out.column("cluster").to_numpy()).max() == 1
    assert out.column("cluster").to_numpy().max() <= 4


def test_tripled_covers_every_complexity_stratum_unlike_topk():
    table = with_complexity(make_table([300, 150, 100, 50]))
    comp = table.column("vit_complexity").to_numpy()
    edges = np.quantile(comp, np.linspace(0, 1, 9)[1:-1])  # corpus octiles

    def histogram(out):
        return np.bincount(np.digitize(out.column("vit_complexity").to_numpy(), edges), minlength=8)

    tripled = histogram(select_patches(table, SelectConfig(**TRIPLED), n_total=24))
    assert (tripled == 3).all(), tripled
    topk = histogram(select_patches(
        table, SelectConfig(method="score-topk", score="grad", ipc=1, max_overlap=1.0), n_total=24))
    assert topk[-1] == 24, topk


def test_tripled_thins_overlaps_most_complex_first_and_needs_its_columns():
    xs, ys = np.meshgrid([0, 32, 64], [0, 32, 64])
    n = xs.size
    table = with_complexity(pa.table({
        "patch_id": pa.array([f"{i:016x}" for i in range(n)]),
        "source": pa.array(["/img.png"] * n),
        "x": pa.array(xs.ravel().astype(np.int32)), "y": pa.array(ys.ravel().astype(np.int32)),
        "size": pa.array(np.full(n, 64, np.int32)),
        "grad": pa.array(np.zeros(n, np.float32)),
        "cluster": pa.array(np.zeros(n, np.int32)),
    }))
    comp = np.linspace(0, 0.5, n).astype(np.float32)
    comp[4] = 1.0  # the centre window, which overlaps all others, is the most complex
    table = table.set_column(table.column_names.index("vit_complexity"), "vit_complexity", pa.array(comp))
    out = select_patches(table, SelectConfig(method="tripled", ipc=1, max_overlap=0.0), n_total=9)
    assert list(zip(out.column("x").to_pylist(), out.column("y").to_pylist())) == [(32, 32)]
    out = select_patches(table, SelectConfig(method="tripled", ipc=1, max_overlap=0.5), n_total=9)
    assert out.num_rows == 9  # SRDD's half overlap drops nothing
    # tripled needs the complexity score and the features, not the hardness score
    big = with_complexity(make_table([10, 10])).drop_columns(["psnr_bic", "grad"])
    assert select_patches(big, SelectConfig(**TRIPLED), n_total=4).num_rows == 4
    for col in ("feature", "vit_complexity"):
        with pytest.raises(ValueError, match=col):
            select_patches(big.drop_columns([col]), SelectConfig(**TRIPLED), n_total=4)


def test_subset_mmd():
    table = with_complexity(make_table([300, 150, 100, 50]))
    corpus = features(table)
    assert subset_mmd(corpus, corpus) < 1e-5
    one_cluster = subset_mmd(corpus[table.column("grad").to_numpy() < 0.5][:40], corpus)
    spread = subset_mmd(corpus[::15], corpus)
    assert 0 <= spread < one_cluster <= 6
    assert subset_mmd(corpus[:40], corpus, max_corpus=100, seed=3) == subset_mmd(
        corpus[:40], corpus, max_corpus=100, seed=3)
    assert subset_mmd(corpus[:40], corpus, max_corpus=100, seed=3) != subset_mmd(
        corpus[:40], corpus, max_corpus=100, seed=4)
    for bad in (corpus[:0], corpus[:, :8], corpus[0]):
        with pytest.raises(ValueError):
            subset_mmd(bad, corpus)


def test_export_writes_complexity_columns(tmp_path):
    table = with_complexity(make_table([8, 8], size=40))
    selected = select_patches(table, SelectConfig(method="tripled", ipc=1, strata=4), n_total=6)
    paths = export_distilled(selected, tmp_path / "distilled")
    assert len(paths) == 6 and all(p.is_file() for p in paths)
    for path, row in zip(paths, selected.to_pylist()):
        assert path.name == f"c{row['cluster']:03d}_r{row['rank']:04d}_{row['patch_id']}.png"
    with open(tmp_path / "distilled" / "provenance.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "patch_id", "source", "x", "y", "size", "cluster", "score",
                             "vit_complexity", "entropy", "grad_energy"]
    for r, sel in zip(rows, selected.to_pylist()):
        assert r["patch_id"] == sel["patch_id"]
        for col in ("vit_complexity", "entropy", "grad_energy"):
            assert r[col] == str(np.float32(sel[col]))
        assert float(r["vit_complexity"]) == pytest.approx(sel["vit_complexity"])
    # only the columns present are written
    export_distilled(selected.drop_columns(["entropy", "feature"]), tmp_path / "distilled")
    with open(tmp_path / "distilled" / "provenance.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[-2:] == ["vit_complexity", "grad_energy"] and "entropy" not in header
