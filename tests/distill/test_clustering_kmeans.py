"""``cluster.method = kmeans``: SRDD's released clustering (``src/2_cluster_clip.py``), sklearn's
Euclidean ``KMeans`` with k-means++ seeding on the raw (not normalised) features, checked
against sklearn run directly; the streaming path; config validation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from srdistill.config import ClusterConfig
from srdistill.distill.clustering import (
    CentroidIndex,
    assign_to_centroids,
    cluster_embeddings,
    sample_rows,
    spherical_kmeans,
    train_centroids,
)

RELEASE = {"method": "kmeans", "nredo": 10, "niter": 300, "seed": 42}  # KMeans(n_clusters, random_state=42)


def blobs(n: int = 400, k: int = 6, d: int = 16, seed: int = 0) -> np.ndarray:
    """Overlapping Gaussian blobs of different norms and spreads, float32 (CLIP-like dtype)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * rng.uniform(0.5, 3.0, (k, 1))
    labels = rng.integers(0, k, n)
    return (centres[labels] + rng.uniform(0.3, 1.2, (n, 1)) * rng.normal(size=(n, d))).astype(np.float32)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if the labellings agree up to a permutation of label ids."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_equals_sklearn_run_directly():
    x = blobs()
    cfg = ClusterConfig(k=6, **RELEASE)
    res = cluster_embeddings(x, cfg)
    ref = KMeans(n_clusters=6, init="k-means++", n_init=10, max_iter=300, random_state=42).fit(x)
    assert res.k_used == 6 and res.n_train == len(x)
    assert res.assign.dtype == np.int32 and res.centroids.dtype == np.float32
    assert same_partition(res.assign, ref.labels_)
    # the same centroids, raw (not unit rows), in sklearn's order
    np.testing.assert_allclose(res.centroids, ref.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert np.abs(np.linalg.norm(res.centroids, axis=1) - 1).max() > 0.1
    # every row goes to its Euclidean-nearest centroid; cos_sim is the cosine to that centroid
    dist = ((x[:, None, :].astype(np.float64) - res.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(res.assign, dist.argmin(1))
    c = res.centroids[res.assign].astype(np.float64)
    cos = (x * c).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(c, axis=1)
    np.testing.assert_allclose(res.cos_sim, cos, atol=1e-5)
    # seed, nredo and niter are sklearn's random_state, n_init and max_iter: one k-means++ run
    # from seed 0 ends in a worse local optimum here, and 2 iterations stop short of it
    for niter in (300, 2):
        one = cluster_embeddings(x, ClusterConfig(k=6, method="kmeans", nredo=1, niter=niter, seed=0))
        other = KMeans(n_clusters=6, init="k-means++", n_init=1, max_iter=niter, random_state=0).fit(x)
        np.testing.assert_allclose(one.centroids, other.cluster_centers_, rtol=1e-4, atol=1e-4)
        assert not same_partition(one.assign, ref.labels_)


def test_kmeans_clusters_raw_features_not_normalised_ones():
    """Two groups in the same directions at norms 1 and 10: Euclidean k-means splits them by norm,
    which normalising the rows (the spherical method) makes impossible."""
    rng = np.random.default_rng(3)
    theta = rng.uniform(0, 0.3, 200)
    norm = np.repeat([1.0, 10.0], 100)
    x = np.zeros((200, 8), np.float32)
    x[:, 0], x[:, 1] = norm * np.cos(theta), norm * np.sin(theta)
    by_norm = (norm > 5).astype(int)
    res = cluster_embeddings(x, ClusterConfig(k=2, **RELEASE))
    assert same_partition(res.assign, by_norm)
    ref = KMeans(n_clusters=2, init="k-means++", n_init=10, random_state=42).fit_predict(x)
    assert same_partition(res.assign, ref)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert not same_partition(cluster_embeddings(unit, ClusterConfig(k=2, **RELEASE)).assign, by_norm)
    assert not same_partition(spherical_kmeans(x, ClusterConfig(k=2)).assign, by_norm)


def test_streaming_kmeans_fits_the_seeded_sample_and_equals_the_in_memory_path():
    x = blobs(n=900, seed=4)
    cfg = ClusterConfig(k=6, max_train_points=300, **RELEASE)
    batches = [x[:250], x[250:251], x[251:700], x[700:]]
    sample = sample_rows(iter(batches), len(x), cfg.max_train_points, cfg.seed)
    idx = np.sort(np.random.default_rng(42).choice(len(x), 300, replace=False))
    np.testing.assert_array_equal(sample, x[idx])
    centroids, k = train_centroids(sample, cfg)
    ref = KMeans(n_clusters=6, init="k-means++", n_init=10, max_iter=300, random_state=42).fit(x[idx])
    np.testing.assert_allclose(centroids, ref.cluster_centers_, rtol=1e-4, atol=1e-4)
    index = CentroidIndex(centroids, cfg)
    assert index.kind == "l2" and k == 6
    assign = np.concatenate([index.search(b)[0] for b in batches])
    mem = cluster_embeddings(x, cfg)
    assert mem.n_train == 300
    np.testing.assert_array_equal(assign, mem.assign)
    np.testing.assert_array_equal(assign, ref.predict(x))
    got, _ = assign_to_centroids(x, centroids, cfg=cfg)
    np.testing.assert_array_equal(got, assign)


def test_kmeans_fewer_points_than_clusters_and_zero_rows():
    x = np.array([[0, 0, 0], [1, 2, 3], [3, 2, 1]], np.float32)
    res = cluster_embeddings(x, ClusterConfig(k=7, **RELEASE))
    assert res.k_used == 3 and sorted(res.assign.tolist()) == [0, 1, 2]
    assert res.cos_sim[0] == 0.0  # an all-zero row has no direction (kept: Euclidean is defined)
    with pytest.raises(ValueError, match="all zero"):
        cluster_embeddings(x, ClusterConfig(k=2))  # the spherical method needs a direction


def test_bad_method_is_rejected_clearly():
    with pytest.raises(ValueError, match=r"method[\s\S]*'spherical-faiss' or 'kmeans'"):
        ClusterConfig(method="sklearn")
    with pytest.raises(ValueError, match="spherical_kmeans needs cluster.method 'spherical-faiss', got 'kmeans'"):
        spherical_kmeans(blobs(n=20), ClusterConfig(k=2, method="kmeans"))
    assert ClusterConfig().method == "spherical-faiss"
