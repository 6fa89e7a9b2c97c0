"""faiss spherical k-means: recovery of separated clusters, sampling, small N, validation;
streaming sample, two-level k-means and the flat / IVF centroid index."""

from __future__ import annotations

import numpy as np
import pytest

from srdistill.config import ClusterConfig
from srdistill.distill import clustering
from srdistill.distill.clustering import (
    CentroidIndex,
    assign_to_centroids,
    sample_rows,
    spherical_kmeans,
    train_centroids,
)


def sphere_clusters(n_per: int, k: int, d: int = 32, spread: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, k)))[0].T  # (k, d) orthonormal
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] + spread * rng.normal(size=(k * n_per, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), labels[perm]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if the labellings agree up to a permutation of label ids."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_separated_clusters_are_recovered():
    x, labels = sphere_clusters(200, 7)
    res = spherical_kmeans(x, ClusterConfig(k=7, seed=0))
    assert res.k_used == 7 and res.n_train == len(x)
    assert res.centroids.shape == (7, 32) and res.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    assert res.assign.dtype == np.int32 and res.cos_sim.dtype == np.float32
    assert same_partition(res.assign, labels)
    assert res.cos_sim.min() > 0.8
    again = spherical_kmeans(x, ClusterConfig(k=7, seed=0))
    np.testing.assert_array_equal(res.assign, again.assign)


def test_training_sample_smaller_than_n_still_assigns_all():
    x, labels = sphere_clusters(500, 5, seed=1)
    res = spherical_kmeans(x, ClusterConfig(k=5, max_train_points=300))
    assert res.n_train == 300
    assert res.assign.shape == (len(x),) and res.cos_sim.shape == (len(x),)
    assert same_partition(res.assign, labels)
    # cos_sim is the similarity to the assigned centroid, which is the best one.
    sims = x @ res.centroids.T
    np.testing.assert_array_equal(res.assign, sims.argmax(axis=1))
    np.testing.assert_allclose(res.cos_sim, sims.max(axis=1), atol=1e-5)


def test_fewer_points_than_clusters():
    x, _ = sphere_clusters(1, 3)
    res = spherical_kmeans(x, ClusterConfig(k=7))
    assert res.k_used == 3 and res.centroids.shape == (3, 32)
    assert sorted(res.assign.tolist()) == [0, 1, 2]
    one = spherical_kmeans(x[:1], ClusterConfig(k=7))
    assert one.k_used == 1 and one.assign.tolist() == [0]


def test_float64_input_and_unnormalised_rows_are_accepted():
    x, labels = sphere_clusters(50, 3, seed=2)
    res = spherical_kmeans(3.0 * x.astype(np.float64), ClusterConfig(k=3))
    assert same_partition(res.assign, labels)


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((0, 8), np.float32), "empty"),
        (np.ones(8, np.float32), "2-D"),
        (np.ones((4, 8), np.int64), "floating"),
        (np.array([[1.0, np.nan], [0.0, 1.0]], np.float32), "NaN"),
        (np.array([[0.0, 0.0], [0.0, 1.0]], np.float32), "zero"),
    ],
)
def test_bad_input_is_rejected(x, match):
    with pytest.raises(ValueError, match=match):
        spherical_kmeans(x, ClusterConfig(k=2))


def split(x: np.ndarray, sizes: list[int]):
    """``x`` as consecutive batches of the given sizes (a generator, consumed once)."""
    assert sum(sizes) == len(x)
    bounds = np.cumsum([0, *sizes])
    return (x[a:b] for a, b in zip(bounds[:-1], bounds[1:]))


def blobs(n_per: int, k: int, d: int, spread: float, seed: int = 0):
    """Gaussian blobs around ``k`` random unit centres; returns (x, labels, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] + spread * rng.normal(size=(k * n_per, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels, centres.astype(np.float32)


def purity(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of points in the majority true label of their found cluster."""
    table = np.zeros((found.max() + 1, truth.max() + 1), dtype=np.int64)
    np.add.at(table, (found, truth), 1)
    return table.max(axis=1).sum() / len(found)


def test_sample_rows_equals_the_in_memory_sample():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 8)).astype(np.float32)
    sizes = [0, 333, 1, 0, 400, 266]
    got = sample_rows(split(x, sizes), 1000, 137, seed=5)
    idx = np.sort(np.random.default_rng(5).choice(1000, 137, replace=False))
    np.testing.assert_array_equal(got, x[idx])
    assert got.dtype == np.float32
    # n_total <= max_points: every row, in order.
    np.testing.assert_array_equal(sample_rows(split(x, sizes), 1000, 1000, seed=5), x)


def test_sample_rows_rejects_a_wrong_row_count():
    x = np.ones((10, 4), np.float32)
    with pytest.raises(ValueError, match="10 rows but n_total is 11"):
        sample_rows(split(x, [4, 6]), 11, 3, seed=0)
    with pytest.raises(ValueError, match="10 rows but n_total is 9"):
        sample_rows(split(x, [4, 6]), 9, 3, seed=0)
    with pytest.raises(ValueError, match="0 rows but n_total is 5"):
        sample_rows([], 5, 3, seed=0)
    with pytest.raises(ValueError, match="dimension 3, earlier batches 4"):
        sample_rows([x[:5], x[5:, :3]], 10, 3, seed=0)


@pytest.mark.parametrize(
    "cfg",
    [
        ClusterConfig(k=6, max_train_points=700, seed=3),
        # two-level training and IVF assignment
        ClusterConfig(k=16, max_train_points=700, two_level_min_k=16, ivf_min_k=16, nprobe=2),
    ],
)
def test_streaming_path_equals_spherical_kmeans(cfg):
    x, _ = sphere_clusters(125, 16, seed=4)
    # Not quite unit rows: both paths normalise, and must do it identically.
    x = x * np.random.default_rng(1).uniform(0.5, 2.0, size=(len(x), 1)).astype(np.float32)
    sizes = [300, 0, 777, 923]
    ref = spherical_kmeans(x, cfg)
    sample = sample_rows(split(x, sizes), len(x), cfg.max_train_points, cfg.seed)
    centroids, k_used = train_centroids(sample, cfg)
    index = CentroidIndex(centroids, cfg)
    parts = [index.search(b, batch=128) for b in split(x, sizes)]
    assign = np.concatenate([p[0] for p in parts])
    cos_sim = np.concatenate([p[1] for p in parts])
    assert (k_used, len(sample)) == (ref.k_used, ref.n_train) == (cfg.k, 700)
    # the same training sample and seed; searches in other batch sizes may sum in another
    # order (BLAS blocking differs by CPU), so similarities agree to float32 rounding
    np.testing.assert_allclose(centroids, ref.centroids, atol=1e-6)
    np.testing.assert_array_equal(assign, ref.assign)
    np.testing.assert_allclose(cos_sim, ref.cos_sim, atol=1e-6)
    assert assign.dtype == np.int32 and cos_sim.dtype == np.float32


def test_ivf_index_agrees_with_flat_and_is_deterministic():
    x, _, centres = blobs(40, 64, d=32, spread=0.15, seed=2)
    cfg = ClusterConfig(k=64, ivf_min_k=64, nprobe=4)
    ivf = CentroidIndex(centres, cfg)
    assert (ivf.kind, ivf.k, ivf.d, ivf.nlist, ivf.nprobe) == ("ivf", 64, 32, 32, 4)
    flat = CentroidIndex(centres, ClusterConfig(k=64))
    assert flat.kind == "flat" and flat.nlist is None
    a_ivf, s_ivf = ivf.search(x)
    a_flat, s_flat = flat.search(x)
    assert a_ivf.dtype == np.int32 and s_ivf.dtype == np.float32
    assert (a_ivf == a_flat).mean() >= 0.95
    assert (s_ivf <= s_flat + 1e-6).all()  # the exact search is never beaten
    same = a_ivf == a_flat
    np.testing.assert_allclose(s_ivf[same], s_flat[same], atol=1e-6)
    again = CentroidIndex(centres, cfg).search(x)
    np.testing.assert_array_equal(again[0], a_ivf)
    np.testing.assert_array_equal(again[1], s_ivf)
    # assign_to_centroids goes through the same index (unit rows used as given).
    np.testing.assert_array_equal(assign_to_centroids(x, centres, cfg=cfg)[0], a_ivf)
    assert [a.shape for a in ivf.search(x[:0])] == [(0,), (0,)]


def test_two_level_clustering_recovers_separated_blobs(monkeypatch):
    calls = []
    real = clustering._two_level
    monkeypatch.setattr(clustering, "_two_level", lambda *a: calls.append(a[1]) or real(*a))
    x, labels, _ = blobs(60, 16, d=32, spread=0.05, seed=3)
    cfg = ClusterConfig(k=16, two_level_min_k=16)
    centroids, k_used = train_centroids(x, cfg)
    assert calls == [16] and k_used == 16
    assert centroids.shape == (16, 32) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assign, _ = CentroidIndex(centroids, cfg).search(x)
    assert purity(assign, labels) > 0.9 and purity(labels, assign) > 0.9
    np.testing.assert_array_equal(train_centroids(x, cfg)[0], centroids)


def test_split_counts_are_proportional_and_bounded():
    counts = clustering._split_counts(np.array([0, 1, 5, 94]), 10)
    assert counts.tolist() == [0, 1, 1, 8]
    assert clustering._split_counts(np.array([1, 999]), 10).tolist() == [1, 9]
    assert clustering._split_counts(np.array([3, 3, 4]), 10).tolist() == [3, 3, 4]
    assert clustering._split_counts(np.array([50, 50]), 3).sum() == 3


def test_centroid_index_rejects_bad_input():
    centroids = np.eye(32, dtype=np.float32)[:4]
    index = CentroidIndex(centroids, ClusterConfig())
    with pytest.raises(ValueError, match="dimension 16, the centroids 32"):
        index.search(np.ones((3, 16), np.float32))
    with pytest.raises(ValueError, match="unit"):
        CentroidIndex(2 * centroids, ClusterConfig())
    with pytest.raises(ValueError, match="2-D"):
        CentroidIndex(centroids[0], ClusterConfig())


def test_config_needs_at_least_k_training_points():
    with pytest.raises(ValueError, match="max_train_points 5 < cluster.k 7"):
        ClusterConfig(k=7, max_train_points=5)
    with pytest.raises(ValueError, match="nprobe"):
        ClusterConfig(nprobe=0)
