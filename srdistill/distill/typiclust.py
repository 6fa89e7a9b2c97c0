"""TypiClust: the most typical patch of each of ``m`` k-means clusters, a low-budget selector.

Hacohen, Dekel and Weinshall, "Active Learning on a Budget: Opposite Strategies Suit High and
Low Budgets", ICML 2022 (arXiv 2202.02794), section 3 and Algorithm 1 (TPC_RP). Their finding,
like Sorscher et al.'s for data pruning ("Beyond neural scaling laws", NeurIPS 2022), is that
with a tiny budget a learner gains most from *typical* examples spread over the data, and from
hard or atypical ones only once the budget is large. The selection:

1. Cluster the candidates' features into ``m`` clusters (the budget; the paper clusters into
   ``|labelled| + B``, and nothing is labelled here) with k-means.
2. Typicality of a point ``x`` in its cluster (paper, section 3): the inverse mean Euclidean
   distance to its ``K`` nearest neighbours in that cluster,
   ``1 / ((1/K) sum_{x_i in KNN(x)} ||x - x_i||_2)``, ``K = min(knn, cluster size - 1)``.
3. From the clusters largest first (the paper's "largest uncovered cluster"; with one pick per
   cluster and no labelled set this is the whole rule), pick each cluster's most typical point.
   Clusters of fewer than ``min_cluster_size`` points are left out, as in the authors'
   released code, unless there are not enough others to fill the budget.

k-means is scikit-learn's, as in the authors' released code (``KMeans`` for small budgets,
``MiniBatchKMeans`` for large ones; the switch at 50 clusters is ours). Departures: the number
of clusters is the budget with no cap (the released code caps it and then takes several
points per cluster); the features are not those of a self-supervised network trained on the
data (there is none here) but the pixel descriptors of ``srdistill.distill.kcenter`` or the
CLIP / ViT features of the pipeline (``select.features``).
The seed changes the k-means initialisation and therefore the set: draws differ by it.
"""

from __future__ import annotations

import numpy as np

from srdistill.distill.kcenter import feature_matrix

__all__ = ["typicality", "typiclust_select"]


def typicality(features: np.ndarray, knn: int = 20) -> np.ndarray:
    """Hacohen et al.'s typicality (ICML 2022, section 3) of each row among the rows given.

    Args:
        features: ``(n, D)`` float array (cast to float32), finite; one cluster's points.
        knn: neighbours ``K`` (the paper's 20), ``>= 1``; ``min(knn, n - 1)`` are used.

    Returns:
        ``(n,)`` float64: ``1 / (mean distance to the K nearest other rows + 1e-12)``; a
        single row gets ``inf`` (it is its cluster's only and most typical point).

    Raises:
        ValueError: ``features`` not 2-D or ``knn < 1``.
    """
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or knn < 1:
        raise ValueError(f"typicality: need (n, D) features and knn >= 1, got shape {x.shape}, knn {knn}")
    n = len(x)
    k = min(knn, n - 1)
    if k == 0:
        return np.full(n, np.inf)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    dist, _ = index.search(x, k + 1)  # the nearest is the point itself (distance 0), dropped below
    d = np.sqrt(np.maximum(np.sort(dist, axis=1)[:, 1:], 0.0)).astype(np.float64)
    return 1.0 / (d.mean(axis=1) + 1e-12)


def typiclust_select(features: np.ndarray, m: int, *, seed: int, knn: int = 20,
                     min_cluster_size: int = 5) -> np.ndarray:  # fmt: skip
    """TypiClust (Hacohen et al., ICML 2022, Algorithm 1) from an empty labelled set.

    k-means into ``min(m, N)`` clusters (scikit-learn, k-means++ initialisation seeded by
    ``seed``; ``KMeans`` for ``m <= 50``, else ``MiniBatchKMeans`` with batches of
    ``max(1024, 3 m)``). Clusters of at least ``min_cluster_size`` points,
    largest first (ties: lower cluster index), give their most typical point (``typicality``;
    ties: lowest row); if they are fewer than ``m``, the smaller clusters follow in the same
    order, and if the clusters are still fewer (empty ones), the most typical remaining points
    of the largest clusters fill the budget, one per cluster in turn.

    Args:
        features: ``(N, D)`` float array (cast to float32), finite.
        m: points to pick, ``>= 0``; ``min(m, N)`` are returned.
        seed: seed of the k-means initialisation.
        knn: neighbours of the typicality (``typicality``).
        min_cluster_size: clusters smaller than this are used last.

    Returns:
        ``(min(m, N),)`` int64 row indices in pick order, no repeats.

    Raises:
        ValueError: ``features`` not 2-D or not finite, or ``m < 0``.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = feature_matrix(features, m, "typiclust_select")
    n = len(x)
    m = min(m, n)
    if m == 0:
        return np.empty(0, dtype=np.int64)
    if m == n:
        labels = np.arange(n)
    else:
        seed = int(seed) % (2**32)
        km = (KMeans(m, n_init=1, random_state=seed) if m <= 50 else
              MiniBatchKMeans(m, batch_size=max(1024, 3 * m), n_init=3, random_state=seed))  # fmt: skip
        labels = km.fit_predict(x)
    sizes = np.bincount(labels, minlength=m)
    order = np.lexsort((np.arange(m), -sizes, sizes < min_cluster_size))  # big enough, largest first
    members = np.split(np.argsort(labels, kind="stable"), np.cumsum(sizes)[:-1])  # rows of each cluster, ascending
    ranked = {}  # cluster -> its rows, most typical first
    for c in order[sizes[order] > 0]:
        rows = members[c]
        ranked[c] = rows[np.lexsort((rows, -typicality(x[rows], knn)))]
    picks: list[int] = []
    depth = 0
    while len(picks) < m:  # one per cluster; a second round only when clusters came out empty
        picks += [int(r[depth]) for r in ranked.values() if depth < len(r)][: m - len(picks)]
        depth += 1
    return np.asarray(picks, dtype=np.int64)
