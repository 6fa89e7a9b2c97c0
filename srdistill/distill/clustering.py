"""k-means of CLIP embeddings (SRDD's class-agnostic grouping, step 2).

SRDD (Cho, Jung, Cho, Soh; arXiv 2509.14777) groups its patches by k-means on CLIP ViT-B/32
image embeddings with k = 7 (variants 5, 9, 14); the cluster id then replaces the class label
of the class-conditional diffusion model. Its released ``src/2_cluster_clip.py`` runs
scikit-learn's ``KMeans(n_clusters=7, random_state=42)`` (Euclidean Lloyd, k-means++ seeding;
``n_init`` left to sklearn's default: 10 runs before sklearn 1.4, 1 from 1.4 on, its
environment file does not say which) on the raw, not normalised, ``get_image_features`` of all
patches at once, and keeps ``fit_predict``'s labels.

``ClusterConfig.method`` picks one of two k-means:

* ``"spherical-faiss"`` (default): faiss' ``Kmeans`` with ``spherical=True`` (Johnson, Douze,
  Jégou, "Billion-scale similarity search with GPUs", arXiv 1702.08734; github
  facebookresearch/faiss) on L2-normalised rows: centroids are re-normalised after each
  iteration, so points are grouped by cosine similarity, which suits CLIP embeddings (CLIP
  compares them by cosine) and scales to large ``N`` and ``k`` as below.
* ``"kmeans"``: SRDD's released clustering, ``sklearn.cluster.KMeans(n_clusters=k,
  init="k-means++", n_init=cfg.nredo, max_iter=cfg.niter, random_state=cfg.seed)`` on the raw
  rows (Euclidean), every row then assigned to its Euclidean-nearest centroid (an exact
  ``faiss.IndexFlatL2``). With ``nredo=10, niter=300, seed=42`` and all rows in the training
  sample it reproduces the release (sklearn < 1.4 defaults); the two-level and IVF options
  below do not apply to it. The rows are raw only if the embed stage stored them raw.

Differences of ``spherical-faiss`` from SRDD, all there to scale past memory and to large ``k``:

* Centroids are trained on a seeded random sample of at most ``max_train_points`` rows
  (``sample_rows`` draws it from a stream of batches, never holding all ``N x D``
  embeddings), then every point is assigned to its most similar centroid batch by batch
  (``CentroidIndex``). With fewer points than clusters, ``k`` drops to the sample size.
  (``kmeans`` shares this: past ``max_train_points`` rows it too fits on the sample.)
* The best of ``cfg.nredo`` k-means runs is kept, ``cfg.niter`` iterations each (random
  initialisation; sklearn's default ``tol`` stop does not exist in faiss).
* For ``k >= cfg.two_level_min_k`` the centroids come from two-level k-means: a coarse
  spherical k-means into ``round(sqrt(k))`` clusters, then each coarse cluster split by its
  own spherical k-means into a number of fine clusters proportional to its size, ``k`` in
  all. Each level costs ``O(n sqrt(k) D)`` per iteration instead of ``O(n k D)``; the price
  is that a fine cluster never straddles two coarse ones. This is the scheme of faiss'
  ``faiss.contrib.clustering.two_level_clustering``, implemented here with ``faiss.Kmeans``
  because that helper does not fit: importing it prints to stdout when scipy is missing (as
  in this environment), it fixes the coarse level's ``max_points_per_centroid`` (so passing
  ours raises ``TypeError``) and leaves the fine level to subsample and warn on stderr, and
  its floor-proportional split can give a small coarse cluster 0 fine clusters, which
  ``faiss.Kmeans`` rejects. Here each coarse cluster gets between 1 and its size fine
  clusters (largest remainder), and no level subsamples.
* For ``k >= cfg.ivf_min_k`` points are assigned through an inverted file
  (``faiss.IndexIVFFlat``, inner product; Jégou, Douze, Schmid, "Product quantization for
  nearest neighbor search", TPAMI 2011): the centroids are grouped into
  ``nlist ~ 4 sqrt(k)`` lists by a seeded spherical k-means of the centroids themselves and
  a point is compared with the centroids of its ``cfg.nprobe`` most similar lists only. The
  assignment is then approximate (a point may get a centroid that is not its most similar
  one); below the threshold it is exact (``faiss.IndexFlatIP``).

Everything is deterministic for a given input, batch-independent and config: the streaming
path ``sample_rows`` -> ``train_centroids`` -> ``CentroidIndex.search`` per batch gives
exactly (bit for bit) the result of ``cluster_embeddings`` on the concatenated batches (for
``kmeans``, on one machine: sklearn's multi-threaded sums may differ in the last bits across
thread counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

try:
    import faiss
except ImportError as exc:  # faiss comes from one of two extras (two builds of one package)
    raise ImportError("clustering needs faiss: pip install 'srdistill[cpu]' (faiss-cpu) or "
                      "'srdistill[gpu]' (faiss-gpu)") from exc
import numpy as np

from srdistill.config import ClusterConfig

__all__ = [
    "ASSIGN_BATCH",
    "CentroidIndex",
    "KMeansResult",
    "assign_to_centroids",
    "cluster_embeddings",
    "sample_rows",
    "spherical_kmeans",
    "train_centroids",
]

#: Rows per faiss search call when assigning points.
ASSIGN_BATCH = 65_536
#: Centroids of ``CentroidIndex`` must have an L2 norm within this of 1.
UNIT_TOL = 1e-3


@dataclass(frozen=True)
class KMeansResult:
    """Result of ``cluster_embeddings`` / ``spherical_kmeans``.

    Attributes:
        centroids: ``(k_used, D)`` float32: unit-L2 rows (``spherical-faiss``), or raw
            Euclidean means of their points (``kmeans``).
        assign: ``(N,)`` int32 in ``[0, k_used)``, the nearest centroid of each point: most
            similar by cosine (``spherical-faiss``; for ``k_used >= cfg.ivf_min_k`` the most
            similar one the IVF index finds) or by Euclidean distance (``kmeans``).
        cos_sim: ``(N,)`` float32 in ``[-1, 1]``, cosine similarity to that centroid (0 for an
            all-zero row under ``kmeans``).
        k_used: number of clusters actually fitted (``min(cfg.k, n_train)``).
        n_train: number of points the centroids were trained on
            (``min(N, cfg.max_train_points)``).
    """

    centroids: np.ndarray
    assign: np.ndarray
    cos_sim: np.ndarray
    k_used: int
    n_train: int


def _validate(
    x: np.ndarray, *, dim: int | None = None, allow_empty: bool = False, unit: bool = True
) -> np.ndarray:
    """Check embeddings and return them as C-contiguous float32 rows: unit-L2 (a copy; all-zero
    rows rejected) when ``unit``, else as given (``kmeans`` works on raw rows).

    Rows are normalised one by one, so normalising a subset of rows gives the same bits as
    normalising all rows and taking that subset.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"embeddings have dimension {x.shape[1]}, the centroids {dim}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"embeddings must be floating point, got dtype {x.dtype}")
    if x.shape[1] == 0 or (x.shape[0] == 0 and not allow_empty):
        raise ValueError(f"embeddings are empty, shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise ValueError(f"embeddings contain NaN or inf in {bad} of {x.shape[0]} rows")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not unit:
        return x
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} embedding rows are all zero")
    return x / norms


def _sample_indices(n_total: int, max_points: int, seed: int) -> np.ndarray | None:
    """Sorted row indices of the training sample, or ``None`` for all rows.

    ``numpy.random.default_rng(seed).choice(n_total, max_points, replace=False)``, sorted.
    numpy draws it in ``O(max_points)`` memory when ``max_points <= n_total / 50`` and by a
    permutation of ``n_total`` int64 otherwise, i.e. under ``400`` bytes per sampled row.
    """
    if n_total <= max_points:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=max_points, replace=False))


def sample_rows(
    batches: Iterable[np.ndarray], n_total: int, max_points: int, seed: int
) -> np.ndarray:
    """The seeded training sample of a stream of embedding batches, one batch at a time.

    Returns exactly the rows ``spherical_kmeans`` trains on for the concatenation ``X`` of
    ``batches`` (with ``max_points = cfg.max_train_points``, ``seed = cfg.seed``):
    ``X[np.sort(np.random.default_rng(seed).choice(n_total, max_points, replace=False))]``,
    or all of ``X`` when ``n_total <= max_points``. Only the sample and the current batch
    are held: memory ``O(max_points * D + one batch)``. Rows are returned as given (not
    validated or normalised; ``train_centroids`` does that).

    Args:
        batches: ``(n_i, D)`` arrays in a fixed order, ``sum(n_i) == n_total``; empty
            batches are allowed. Consumed once.
        n_total: total number of rows, >= 1.
        max_points: sample size cap, >= 1.
        seed: sampling seed (``cfg.seed``).

    Returns:
        ``(min(n_total, max_points), D)`` array in ascending row order, dtype the
        ``numpy.result_type`` of the batches (as ``np.concatenate`` gives).

    Raises:
        ValueError: ``n_total`` or ``max_points`` < 1; a batch is not 2-D or its ``D``
            differs from the first batch's; the batches hold more or fewer rows than
            ``n_total`` (both numbers named).
    """
    if n_total < 1:
        raise ValueError(f"n_total must be >= 1, got {n_total}")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    idx = _sample_indices(n_total, max_points, seed)
    size = n_total if idx is None else len(idx)
    out: np.ndarray | None = None
    seen = filled = 0
    for i, batch in enumerate(batches):
        batch = np.asarray(batch)
        if batch.ndim != 2:
            raise ValueError(f"batch {i} must be 2-D (rows, D), got shape {batch.shape}")
        if out is not None and batch.shape[1] != out.shape[1]:
            raise ValueError(
                f"batch {i} has dimension {batch.shape[1]}, earlier batches {out.shape[1]}"
            )
        end = seen + batch.shape[0]
        if end > n_total:
            raise ValueError(f"batches hold at least {end} rows but n_total is {n_total}")
        if idx is None:
            rows = batch
        else:
            lo, hi = np.searchsorted(idx, [seen, end])
            rows = batch[idx[lo:hi] - seen]
        if out is None:
            out = np.empty((size, batch.shape[1]), dtype=batch.dtype)
        elif np.result_type(out, rows) != out.dtype:
            out = out.astype(np.result_type(out, rows))
        out[filled : filled + len(rows)] = rows
        filled += len(rows)
        seen = end
    if seen != n_total or out is None:
        raise ValueError(f"batches hold {seen} rows but n_total is {n_total}")
    return out


def _kmeans_unit(
    x: np.ndarray, k: int, cfg: ClusterConfig, *, nredo: int | None = None
) -> np.ndarray:
    """faiss spherical k-means of unit rows ``x`` ``(n, D)`` float32, ``1 <= k <= n``.

    No subsampling by faiss. Returns ``(k, D)`` float32 unit rows.
    """
    n, d = x.shape
    kmeans = faiss.Kmeans(
        d,
        k,
        niter=cfg.niter,
        nredo=cfg.nredo if nredo is None else nredo,
        seed=cfg.seed,
        spherical=True,
        verbose=False,
        # We sample ourselves: stop faiss from subsampling again or warning about few points.
        min_points_per_centroid=1,
        max_points_per_centroid=-(-n // k),
    )
    kmeans.train(x)
    centroids = kmeans.centroids.astype(np.float32)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return centroids


def _split_counts(sizes: np.ndarray, k: int) -> np.ndarray:
    """Fine clusters per coarse cluster: proportional to ``sizes``, summing to ``k``.

    Largest-remainder apportionment of ``k`` over ``sizes`` (int, ``>= 0``) with every
    non-empty coarse cluster getting between 1 and its size, empty ones 0. Needs
    ``#non-empty <= k <= sum(sizes)``. Ties go to the lowest index (deterministic).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(sizes.sum())
    nonempty = sizes > 0
    if not int(nonempty.sum()) <= k <= n:
        raise ValueError(
            f"cannot split {n} points in {int(nonempty.sum())} groups into {k} clusters"
        )
    counts = np.where(nonempty, np.maximum(sizes * k // n, 1), 0)
    # n * (quota - count): how far each count lies below its exact share sizes * k / n.
    while counts.sum() < k:
        below = np.where(counts < sizes, sizes * k - counts * n, np.iinfo(np.int64).min)
        counts[np.argmax(below)] += 1
    while counts.sum() > k:
        below = np.where(counts > 1, sizes * k - counts * n, np.iinfo(np.int64).max)
        counts[np.argmin(below)] -= 1
    return counts


def _two_level(x: np.ndarray, k: int, cfg: ClusterConfig) -> np.ndarray:
    """Two-level spherical k-means of unit rows ``x`` into ``k`` centroids (see module doc)."""
    k1 = max(1, int(np.floor(np.sqrt(k) + 0.5)))
    coarse = _kmeans_unit(x, k1, cfg)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(coarse)
    assign1 = np.concatenate(
        [flat.search(x[s : s + ASSIGN_BATCH], 1)[1][:, 0] for s in range(0, len(x), ASSIGN_BATCH)]
    )
    counts = _split_counts(np.bincount(assign1, minlength=k1), k)
    fine = [
        _kmeans_unit(np.ascontiguousarray(x[assign1 == c]), int(counts[c]), cfg)
        for c in range(k1)
        if counts[c] > 0
    ]
    return np.concatenate(fine, axis=0)


def _kmeans_sklearn(x: np.ndarray, k: int, cfg: ClusterConfig) -> np.ndarray:
    """SRDD's released k-means: sklearn Euclidean Lloyd with k-means++ seeding, best of
    ``cfg.nredo`` runs of at most ``cfg.niter`` iterations, of raw rows ``x`` ``(n, D)``
    float32, ``1 <= k <= n``. Returns ``(k, D)`` float32 centroids."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, init="k-means++", n_init=cfg.nredo, max_iter=cfg.niter, random_state=cfg.seed)
    return np.ascontiguousarray(km.fit(x).cluster_centers_, dtype=np.float32)


def _train(x: np.ndarray, cfg: ClusterConfig) -> tuple[np.ndarray, int]:
    """Centroids of validated rows ``x`` (unit for ``spherical-faiss``, raw for ``kmeans``)."""
    k = min(cfg.k, x.shape[0])
    if cfg.method == "kmeans":
        return _kmeans_sklearn(x, k, cfg), k
    if k >= cfg.two_level_min_k:
        return _two_level(x, k, cfg), k
    return _kmeans_unit(x, k, cfg), k


def train_centroids(sample: np.ndarray, cfg: ClusterConfig) -> tuple[np.ndarray, int]:
    """k-means centroids of a training sample (normally ``sample_rows``' output).

    ``k_used = min(cfg.k, n)``. ``cfg.method == "kmeans"``: ``sklearn.cluster.KMeans(k_used,
    init="k-means++", n_init=cfg.nredo, max_iter=cfg.niter, random_state=cfg.seed)`` on the
    raw rows (SRDD's released clustering). ``"spherical-faiss"``, for
    ``k_used < cfg.two_level_min_k``: one
    ``faiss.Kmeans(D, k_used, niter=cfg.niter, nredo=cfg.nredo, seed=cfg.seed,
    spherical=True)`` run on all ``n`` rows (best of ``nredo`` random initialisations);
    otherwise two-level k-means (coarse ``round(sqrt(k_used))`` clusters, each split into
    fine clusters in proportion to its size; see the module docstring). Deterministic for a
    given sample and config.

    Args:
        sample: ``(n, D)`` floating-point embeddings, ``n >= 1``; for ``spherical-faiss`` rows
            are L2-normalised here (they normally already are), for ``kmeans`` used as given.
        cfg: ``method``, ``k``, ``niter``, ``nredo``, ``seed``, ``two_level_min_k``.

    Returns:
        ``(centroids (k_used, D) float32, k_used)``: unit-L2 rows for ``spherical-faiss``,
        raw for ``kmeans``.

    Raises:
        ValueError: ``sample`` is not 2-D, not floating point, empty, has NaN/inf or
            (``spherical-faiss``) all-zero rows.
    """
    return _train(_validate(sample, unit=cfg.method != "kmeans"), cfg)


def _ivf_nlist(k: int) -> int:
    """IVF lists for ``k`` centroids: ``round(4 sqrt(k))``, at most ``k``."""
    return max(1, min(k, int(np.floor(4.0 * np.sqrt(k) + 0.5))))


class CentroidIndex:
    """Nearest centroid of embedding batches, by the metric of ``cfg.method``.

    ``kmeans``: Euclidean distance of raw rows to raw centroids, exact (``faiss.IndexFlatL2``,
    kind ``"l2"``). ``spherical-faiss``: inner product (= cosine on unit rows);
    ``k < cfg.ivf_min_k``: exact search, ``faiss.IndexFlatIP``. ``k >= cfg.ivf_min_k``:
    ``faiss.IndexIVFFlat`` with the inner-product metric (inverted file; Jégou, Douze,
    Schmid, TPAMI 2011): its ``nlist = round(4 sqrt(k))`` list centroids are a seeded
    spherical k-means (``cfg.niter``, ``cfg.seed``, one run) of the ``k`` centroids
    themselves, and each query scans the ``min(cfg.nprobe, nlist)`` most similar lists, so
    the result is approximate. A query whose probed lists are all empty falls back to the
    exact search. Building and searching are deterministic.

    Attributes:
        k: number of centroids. d: their dimension.
        kind: ``"flat"``, ``"ivf"`` or ``"l2"``. unit: rows are L2-normalised (not ``kmeans``).
        nlist: IVF lists (``None`` unless ``ivf``). nprobe: lists searched (``None`` unless ``ivf``).

    Args:
        centroids: ``(k, D)`` floating point, ``k >= 1``, used as given: for
            ``spherical-faiss`` unit-L2 rows (norms within ``UNIT_TOL`` of 1), for ``kmeans``
            any finite rows.
        cfg: ``method``, ``ivf_min_k``, ``nprobe``, ``niter``, ``seed``.

    Raises:
        ValueError: ``centroids`` not 2-D, not floating point, empty, not finite or
            (``spherical-faiss``) not unit rows.
    """

    def __init__(self, centroids: np.ndarray, cfg: ClusterConfig) -> None:
        c = np.asarray(centroids)
        if c.ndim != 2 or 0 in c.shape:
            raise ValueError(f"centroids must be a non-empty 2-D (k, D) array, got shape {c.shape}")
        if not np.issubdtype(c.dtype, np.floating) or not np.isfinite(c).all():
            raise ValueError(f"centroids must be finite floating point (dtype {c.dtype})")
        c = np.ascontiguousarray(c, dtype=np.float32)
        self.k, self.d = c.shape
        self.unit = cfg.method != "kmeans"
        self.nlist: int | None = None
        self.nprobe: int | None = None
        if not self.unit:
            self.kind = "l2"
            self._centroids = c
            self._index = faiss.IndexFlatL2(self.d)
            self._index.add(c)
            return
        norms = np.linalg.norm(c, axis=1)
        if np.abs(norms - 1.0).max() > UNIT_TOL:
            raise ValueError(
                f"centroids must be unit-L2 rows; norms range {norms.min():.4g}..{norms.max():.4g}"
            )
        self._flat = faiss.IndexFlatIP(self.d)
        self._flat.add(c)
        if self.k < cfg.ivf_min_k:
            self.kind = "flat"
            self._index = self._flat
            return
        self.kind = "ivf"
        self.nlist = _ivf_nlist(self.k)
        self.nprobe = min(cfg.nprobe, self.nlist)
        self._quantizer = faiss.IndexFlatIP(self.d)  # kept referenced: the IVF does not own it
        self._quantizer.add(_kmeans_unit(c, self.nlist, cfg, nredo=1))
        ivf = faiss.IndexIVFFlat(self._quantizer, self.d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(c)  # the quantizer already holds nlist centroids: faiss keeps them
        ivf.add(c)
        ivf.nprobe = self.nprobe
        self._index = ivf

    def _search(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search C-contiguous float32 rows ``(n, d)`` (unit unless ``l2``); one faiss call."""
        if self.kind == "l2":
            ids = self._index.search(x, 1)[1][:, 0]
            c = self._centroids[ids]
            dots = np.einsum("nd,nd->n", x, c, dtype=np.float64)
            norms = np.linalg.norm(x, axis=1) * np.linalg.norm(c, axis=1)
            cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
            return ids.astype(np.int32), np.clip(cos, -1.0, 1.0).astype(np.float32)
        sims, ids = self._index.search(x, 1)
        sims, ids = sims[:, 0], ids[:, 0]
        miss = ids < 0
        if miss.any():
            s2, i2 = self._flat.search(np.ascontiguousarray(x[miss]), 1)
            sims[miss], ids[miss] = s2[:, 0], i2[:, 0]
        return ids.astype(np.int32), sims.astype(np.float32)

    def _assign(self, x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
        assign = np.empty(x.shape[0], dtype=np.int32)
        cos_sim = np.empty(x.shape[0], dtype=np.float32)
        for start in range(0, x.shape[0], batch):
            part = np.ascontiguousarray(x[start : start + batch], dtype=np.float32)
            assign[start : start + batch], cos_sim[start : start + batch] = self._search(part)
        return assign, cos_sim

    def search(self, x: np.ndarray, *, batch: int = ASSIGN_BATCH) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of each row (most similar, or Euclidean-nearest for ``kmeans``).

        Rows are prepared exactly as ``cluster_embeddings`` does (L2-normalised for
        ``spherical-faiss``, unit rows passing through; as given for ``kmeans``), so
        searching batch by batch gives the same bits as ``cluster_embeddings``.

        Args:
            x: ``(n, D)`` floating-point embeddings, ``n >= 0``, ``D == self.d``.
            batch: rows per faiss call (memory ``batch * k`` floats for ``flat``).

        Returns:
            ``(assign (n,) int32 in [0, k), cos_sim (n,) float32 in [-1, 1])``.

        Raises:
            ValueError: ``x`` not 2-D, its dimension differs from the centroids' (both
                named), not floating point, NaN/inf or (``spherical-faiss``) all-zero rows.
        """
        return self._assign(_validate(x, dim=self.d, allow_empty=True, unit=self.unit), batch)


def assign_to_centroids(
    x: np.ndarray,
    centroids: np.ndarray,
    *,
    batch: int = ASSIGN_BATCH,
    cfg: ClusterConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: by inner product (cosine for unit rows), or by
    Euclidean distance for ``cfg.method == "kmeans"``.

    A ``CentroidIndex(centroids, cfg)`` searched in batches; rows are used as given (not
    renormalised, unlike ``CentroidIndex.search``).

    Args:
        x: ``(N, D)`` float32, unit-L2 rows (raw for ``kmeans``).
        centroids: ``(k, D)`` float32, unit-L2 rows (raw for ``kmeans``).
        batch: rows per faiss search call, bounding memory at ``batch * k`` floats.
        cfg: the metric (``method``) and exact vs IVF search (``ivf_min_k``, ``nprobe``);
            default ``ClusterConfig()``.

    Returns:
        ``(assign (N,) int32, cos_sim (N,) float32)``.

    Raises:
        ValueError: bad centroids (see ``CentroidIndex``), ``x`` not 2-D or of another
            dimension than the centroids.
    """
    index = CentroidIndex(centroids, cfg if cfg is not None else ClusterConfig())
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != index.d:
        raise ValueError(f"x has shape {x.shape}, expected (N, {index.d}) like the centroids")
    return index._assign(x, batch)


def cluster_embeddings(x: np.ndarray, cfg: ClusterConfig) -> KMeansResult:
    """k-means of in-memory embeddings by ``cfg.method`` (SRDD: k = 7 on CLIP ViT-B/32
    embeddings).

    Trains centroids (``train_centroids``) on a random sample of at most
    ``cfg.max_train_points`` rows (drawn with ``numpy.random.default_rng(cfg.seed)``, as
    ``sample_rows``), then assigns all ``N`` rows through ``CentroidIndex``. Deterministic
    for a given input and config; equal bit for bit to the streaming path
    ``sample_rows`` -> ``train_centroids`` -> ``CentroidIndex.search`` over batches of ``x``.

    Args:
        x: ``(N, D)`` floating-point embeddings; for ``spherical-faiss`` rows are
            L2-normalised here (they normally already are), for ``kmeans`` used raw.
        cfg: ``method``, ``k``, ``niter``, ``nredo``, ``seed``, ``max_train_points``,
            ``two_level_min_k``, ``ivf_min_k``, ``nprobe``.

    Returns:
        ``KMeansResult``; ``k_used = min(cfg.k, n_train)`` (``= min(cfg.k, N)`` since the
        config requires ``max_train_points >= k``).

    Raises:
        ValueError: ``x`` is not 2-D, not floating point, empty, has NaN/inf or
            (``spherical-faiss``) all-zero rows.
    """
    x = _validate(x, unit=cfg.method != "kmeans")
    idx = _sample_indices(x.shape[0], cfg.max_train_points, cfg.seed)
    train = x if idx is None else x[idx]
    centroids, k = _train(train, cfg)
    assign, cos_sim = CentroidIndex(centroids, cfg)._assign(x, ASSIGN_BATCH)
    return KMeansResult(centroids, assign, cos_sim, k_used=k, n_train=train.shape[0])


def spherical_kmeans(x: np.ndarray, cfg: ClusterConfig) -> KMeansResult:
    """``cluster_embeddings`` for ``cfg.method == "spherical-faiss"`` (faiss spherical k-means
    of L2-normalised rows).

    Raises:
        ValueError: ``cfg.method`` is another method (use ``cluster_embeddings``), and as
            ``cluster_embeddings``.
    """
    if cfg.method != "spherical-faiss":
        raise ValueError(f"spherical_kmeans needs cluster.method 'spherical-faiss', got {cfg.method!r}: "
                         "call cluster_embeddings")  # fmt: skip
    return cluster_embeddings(x, cfg)
