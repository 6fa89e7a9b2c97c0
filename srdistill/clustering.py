"""Spherical k-means of CLIP embeddings (SRDD's class-agnostic grouping, step 2).

SRDD (Cho, Jung, Cho, Soh; arXiv 2509.14777) groups its patches by k-means on CLIP ViT-B/32
image embeddings with k = 7 (variants 5, 9, 14); the cluster id then replaces the class label
of the class-conditional diffusion model. Here the k-means is faiss' ``Kmeans`` with
``spherical=True`` (Johnson, Douze, Jégou, "Billion-scale similarity search with GPUs",
arXiv 1702.08734; github facebookresearch/faiss): centroids are re-normalised after each
iteration, so points are grouped by cosine similarity, which suits L2-normalised embeddings.

Differences from SRDD: to scale past memory, centroids are trained on a seeded random sample
of at most ``max_train_points`` rows, then every point is assigned to its nearest centroid by
inner product in fixed-size batches. With fewer points than clusters, ``k`` drops to ``N``.
The best of ``cfg.nredo`` k-means runs is kept (SRDD's code runs one).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from srdistill.config import ClusterConfig

__all__ = ["KMeansResult", "spherical_kmeans", "assign_to_centroids"]

#: Rows per faiss search call when assigning all points.
ASSIGN_BATCH = 65_536
@dataclass(frozen=True)
class KMeansResult:
    """Result of ``spherical_kmeans``.

    Attributes:
        centroids: ``(k_used, D)`` float32, unit-L2 rows.
        assign: ``(N,)`` int32 in ``[0, k_used)``, the nearest centroid of each point.
        cos_sim: ``(N,)`` float32 in ``[-1, 1]``, cosine similarity to that centroid.
        k_used: number of clusters actually fitted (``min(cfg.k, N)``).
        n_train: number of points the centroids were trained on.
    """

    centroids: np.ndarray
    assign: np.ndarray
    cos_sim: np.ndarray
    k_used: int
    n_train: int


def _validate(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"embeddings must be floating point, got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"embeddings are empty, shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise ValueError(f"embeddings contain NaN or inf in {bad} of {x.shape[0]} rows")
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} embedding rows are all zero")
    return x / norms


def assign_to_centroids(
    x: np.ndarray, centroids: np.ndarray, *, batch: int = ASSIGN_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row by inner product (cosine for unit rows).

    Args:
        x: ``(N, D)`` float32, unit-L2 rows.
        centroids: ``(k, D)`` float32, unit-L2 rows.
        batch: rows per faiss search call, bounding memory at ``batch * k`` floats.

    Returns:
        ``(assign (N,) int32, cos_sim (N,) float32)``.
    """
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    assign = np.empty(x.shape[0], dtype=np.int32)
    cos_sim = np.empty(x.shape[0], dtype=np.float32)
    for start in range(0, x.shape[0], batch):
        sims, ids = index.search(np.ascontiguousarray(x[start : start + batch]), 1)
        assign[start : start + batch] = ids[:, 0]
        cos_sim[start : start + batch] = sims[:, 0]
    return assign, cos_sim


def spherical_kmeans(x: np.ndarray, cfg: ClusterConfig) -> KMeansResult:
    """Spherical k-means of embeddings (SRDD: k = 7 on CLIP ViT-B/32 embeddings).

    Trains ``faiss.Kmeans(D, k, niter=cfg.niter, nredo=cfg.nredo, seed=cfg.seed, spherical=True)``
    (best of ``cfg.nredo`` random initialisations) on a random
    sample of at most ``cfg.max_train_points`` rows (drawn with
    ``numpy.random.default_rng(cfg.seed)``), then assigns all ``N`` rows. Deterministic for a
    given input and config.

    Args:
        x: ``(N, D)`` floating-point embeddings; rows are L2-normalised here (they normally
            already are).
        cfg: ``k``, ``niter``, ``seed``, ``max_train_points``.

    Returns:
        ``KMeansResult``; ``k_used = min(cfg.k, N)``.

    Raises:
        ValueError: ``x`` is not 2-D, not floating point, empty, has NaN/inf or all-zero rows.
    """
    x = _validate(x)
    n, d = x.shape
    k = min(cfg.k, n)
    if n > cfg.max_train_points:
        rng = np.random.default_rng(cfg.seed)
        train = x[np.sort(rng.choice(n, size=cfg.max_train_points, replace=False))]
    else:
        train = x
    n_train = train.shape[0]
    kmeans = faiss.Kmeans(
        d,
        k,
        niter=cfg.niter,
        nredo=cfg.nredo,
        seed=cfg.seed,
        spherical=True,
        verbose=False,
        # We sample ourselves: stop faiss from subsampling again or warning about few points.
        min_points_per_centroid=1,
        max_points_per_centroid=-(-n_train // k),
    )
    kmeans.train(train)
    centroids = kmeans.centroids.astype(np.float32)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    assign, cos_sim = assign_to_centroids(x, centroids)
    return KMeansResult(centroids, assign, cos_sim, k_used=k, n_train=n_train)
