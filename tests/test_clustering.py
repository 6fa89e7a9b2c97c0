"""faiss spherical k-means: recovery of separated clusters, sampling, small N, validation."""

from __future__ import annotations

import numpy as np
import pytest

from srdistill.clustering import spherical_kmeans
from srdistill.config import ClusterConfig


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
