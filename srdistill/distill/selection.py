"""Budgeted selection of the distilled real set (a coreset) and its export as PNGs.

SRDD (Cho, Jung, Cho, Soh; arXiv 2509.14777) mines hard patches, clusters them by CLIP
embedding (k = 7) and synthesises IPC ("images per cluster", 1 or 10) images per cluster with a
cluster-conditioned diffusion model. This module is the real-data counterpart of that budget:
it picks actual patches, under the same budget, with these methods:

* ``clip-kmeans``: per cluster, the hardest patches by ``score`` (``psnr_bic`` lowest or
  ``grad`` highest first), the budget shared as evenly as possible across clusters.
* ``tripled``: complexity-stratified kernel herding, our design of TripleD's selection step
  ("Distribution-aware Dataset Distillation for Efficient Image Restoration", 2025; only the
  abstract is public: a pre-trained ViT scores image complexity, a subset is chosen by
  complexity, its feature distribution is aligned with the full set). The candidates are cut
  into ``strata`` equal-count quantile bins of ``complexity_score``; the budget is shared in
  proportion to the bins' sizes (largest remainder), so the subset's complexity histogram
  matches the corpus'; under these quotas, kernel herding (Chen, Welling, Smola, "Super-Samples
  from Kernel Herding", UAI 2010) on the ViT features greedily minimises the MMD between the
  picks and all candidates, with random Fourier features (Rahimi, Recht, "Random Features for
  Large-Scale Kernel Machines", NIPS 2007) of a Gaussian kernel of median-heuristic width.
* ``score-topk``: the globally hardest patches, ignoring clusters (a baseline).
* ``random``: a uniform random sample (a baseline).

Label-free selectors from the data-pruning literature that need no pretrained model:

* ``kcenter``: k-center greedy coreset (Sener and Savarese, ICLR 2018; ``srdistill.distill.kcenter``)
  in the feature space ``features``: pixel descriptors (``descriptor``, default), CLIP
  embeddings (``clip``) or ViT features (``vit``).
* ``typiclust``: the most typical point of each of ``m`` k-means clusters, the low-budget
  selector of Hacohen et al. (ICML 2022; ``srdistill.distill.typiclust``), in the same
  feature spaces as ``kcenter``.
* ``stratified``: Coverage-centric Coreset Selection (Zheng et al., ICLR 2023;
  ``srdistill.distill.stratified``): optionally drop the hardest ``prune_hard``, cut ``score`` into
  ``strata`` equal-width bins, share the budget by CCS's smallest-bin-first rule, sample at
  random within each bin.
* ``hard-mix``: ``hard_fraction`` of the budget hardest by ``score``, the rest uniform from the
  other candidates (``srdistill.distill.stratified``).

Any method that ranks by ``score`` can rank by ``proxy_error``, the error of small SR networks
trained briefly on the corpus (after EL2N, Paul et al., NeurIPS 2021; ``srdistill.distill.proxy_error``),
once that column is attached (``proxy_error.attach_proxy_error``).

``subset_mmd`` measures how well a subset's features represent the corpus' (squared MMD), the
same yardstick for every method.

Budgets are ``ipc * n_clusters`` patches, or a fraction of the corpus' HR pixels (SRDD reports
0.68% of OST). Ties are broken by ``patch_id`` and rows are put in ``patch_id`` order first,
so the result does not depend on the input row order (Ray Data does not preserve it).
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from srdistill.config import FEATURE_METHODS, LOWER_IS_HARDER, SelectConfig
from srdistill.distill.kcenter import DESCRIPTOR_COLUMN, kcenter_greedy, patch_descriptors
from srdistill.distill.typiclust import typiclust_select
from srdistill.distill.stratified import ccs_select, hard_mix_select
from srdistill.sr import imaging

__all__ = [
    "budget_patches", "non_overlapping", "select_patches", "subset_mmd", "export_distilled",
]

METHODS = ("clip-kmeans", "random", "score-topk", "tripled", "kcenter", "typiclust", "stratified", "hard-mix")
#: ``select.features`` -> the column ``kcenter`` and ``typiclust`` read (``descriptor``: computed when absent).
FEATURE_COLUMNS = {"descriptor": DESCRIPTOR_COLUMN, "clip": "embedding", "vit": "feature"}
#: Complexity columns copied into ``provenance.csv`` when the selection has them.
COMPLEXITY_COLUMNS = ("vit_complexity", "entropy", "grad_energy")
#: Random Fourier features of the herding kernel (``tripled``).
RFF_FEATURES = 512

_PNG_NAME = re.compile(r"^c-?\d{3,}_r\d{4,}_[0-9A-Za-z]+\.png$")


def budget_patches(
    cfg: SelectConfig, *, n_clusters: int, corpus_pixels: int, patch_size: int
) -> int:
    """Total number of patches to select.

    Args:
        cfg: the budget: ``ipc`` (patches per cluster) or ``pixel_fraction`` in ``(0, 1]``.
        n_clusters: clusters actually fitted (``KMeansResult.k_used``), >= 1.
        corpus_pixels: HR pixels of all readable source images (sum of W*H), >= 0.
        patch_size: patch side in HR pixels, >= 1.

    Returns:
        ``cfg.ipc * n_clusters``, or ``max(1, floor(pixel_fraction * corpus_pixels /
        patch_size**2))``.

    Raises:
        ValueError: an argument out of range.
    """
    if n_clusters < 1 or corpus_pixels < 0 or patch_size < 1:
        raise ValueError(
            f"need n_clusters >= 1, corpus_pixels >= 0, patch_size >= 1; got {n_clusters}, "
            f"{corpus_pixels}, {patch_size}"
        )
    if cfg.ipc is not None:
        return cfg.ipc * n_clusters
    return max(1, int(cfg.pixel_fraction * corpus_pixels // patch_size**2))


def _hardness_key(scores: np.ndarray, score: str) -> np.ndarray:
    """Ascending key: smaller = harder; NaN sorts last."""
    scores = scores.astype(np.float64)
    return scores if LOWER_IS_HARDER[score] else -scores


def non_overlapping(table: pa.Table, key: np.ndarray, max_overlap: float) -> np.ndarray:
    """Greedy non-maximum suppression of overlapping windows, hardest first.

    Visits patches in ascending ``key`` (hardest first, ties by row order) and drops a patch
    when the intersection with an already kept patch of the same source covers more than
    ``max_overlap`` of its area. With SRDD's stride = size/2, 0.5 drops nothing that is only a
    diagonal neighbour, 0.25 drops side neighbours too, 0.0 keeps disjoint windows only.

    Args:
        table: ``source``, ``x``, ``y``, ``size`` columns, N rows.
        key: ``(N,)`` ascending hardness key.
        max_overlap: fraction in [0, 1]; 1.0 keeps everything.

    Returns:
        ``(N,)`` bool mask of the patches kept.
    """
    n = table.num_rows
    keep = np.ones(n, dtype=bool)
    if max_overlap >= 1.0 or n == 0:
        return keep
    src = table.column("source").to_numpy(zero_copy_only=False)
    xs, ys, sz = (table.column(c).to_numpy(zero_copy_only=False).astype(np.int64) for c in ("x", "y", "size"))
    kept_in: dict[str, list[int]] = {}
    for i in np.lexsort((np.arange(n), key)):
        others = kept_in.setdefault(src[i], [])
        for j in others:
            w = min(xs[i] + sz[i], xs[j] + sz[j]) - max(xs[i], xs[j])
            h = min(ys[i] + sz[i], ys[j] + sz[j]) - max(ys[i], ys[j])
            if w > 0 and h > 0 and w * h > max_overlap * sz[i] * sz[i]:
                keep[i] = False
                break
        else:
            others.append(i)
    return keep


def _feature_matrix(table: pa.Table, column: str = "feature") -> np.ndarray:
    """A list column -> ``(N, D)`` float32 array (fixed-size or equal-length lists)."""
    col = table.column(column)
    if col.null_count:
        raise ValueError(f"select: {col.null_count} row(s) have no {column!r}")
    n = table.num_rows
    flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if n == 0 or flat.size % n or flat.size == 0:
        raise ValueError(f"select: {column!r} of {n} rows does not form an (N, D) matrix ({flat.size} values)")
    return flat.reshape(n, -1)


def _feature_space(table: pa.Table, cfg: SelectConfig) -> np.ndarray:
    """The ``(N, D)`` float32 features ``kcenter`` and ``typiclust`` run on (``cfg.features``)."""
    column = FEATURE_COLUMNS[cfg.features]
    if column not in table.column_names:  # descriptor only: the others are required columns
        return patch_descriptors(table)
    return _feature_matrix(table, column)


def _random_fourier_features(x: np.ndarray, omega: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """``(N, D)`` -> ``(N, R)`` float64 ``sqrt(2/R) cos(x omega + phase)``: for ``omega`` with
    i.i.d. N(0, 1/sigma^2) entries and ``phase`` uniform in [0, 2 pi), ``phi(a) . phi(b)`` is an
    unbiased estimate of the Gaussian kernel ``exp(-|a - b|^2 / (2 sigma^2))`` (Rahimi & Recht
    2007, Algorithm 1)."""
    r = omega.shape[1]
    return np.sqrt(2.0 / r) * np.cos(x.astype(np.float64) @ omega + phase)


def _herd(phi: np.ndarray, group: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """Kernel herding (Chen, Welling, Smola, UAI 2010, eq. 4-5) over a finite candidate set,
    with a quota per group.

    With ``mu`` the mean embedding of all candidates, ``w_0 = mu``; step ``t`` picks the
    unpicked candidate maximising ``<w_t, phi(x)>`` among the groups whose quota is not filled
    and sets ``w_{t+1} = w_t + mu - phi(x_pick)``, i.e. ``<w_t, phi(x)> = (t + 1) E_y k(x, y) -
    sum_{s < t} k(x, x_s)``: the greedy step that most reduces the MMD of the picks to all
    candidates (for a kernel with constant ``k(x, x)``) under the quotas.

    Args:
        phi: ``(N, R)`` feature map of the candidates, rows in tie-break order.
        group: ``(N,)`` int64 group of each row, in ``[0, len(quotas))``.
        quotas: ``(G,)`` int64 picks per group, each ``<=`` the group's size.

    Returns:
        ``(quotas.sum(),)`` int64 row indices in pick order, no repeats; ties go to the lowest
        row. O(m N R) time for m picks.
    """
    mu = phi.mean(axis=0)
    w = mu.copy()
    left = quotas.astype(np.int64).copy()
    open_ = left[group] > 0
    picks = np.empty(int(left.sum()), dtype=np.int64)
    for t in range(len(picks)):
        gain = phi @ w
        gain[~open_] = -np.inf
        i = int(np.argmax(gain))  # first maximum: lowest row = lowest patch_id
        picks[t], open_[i] = i, False
        left[group[i]] -= 1
        if not left[group[i]]:
            open_[group == group[i]] = False
        w += mu - phi[i]
    return picks


def _proportional_quotas(sizes: np.ndarray, m: int) -> np.ndarray:
    """Share ``m <= sizes.sum()`` slots in proportion to ``sizes`` by largest remainder
    (Hamilton's method); equal remainders favour the later (more complex) stratum. Each quota
    is within 1 of ``m * size / total`` and never exceeds its size (``ceil(m s / n) <= s``)."""
    total = int(sizes.sum())
    base, rem = np.divmod(m * sizes, total)
    extra = np.lexsort((-np.arange(len(sizes)), -rem))[: m - int(base.sum())]
    base[extra] += 1
    assert (base <= sizes).all() and base.sum() == m
    return base


def _tripled(table: pa.Table, scores: np.ndarray, m: int, cfg: SelectConfig):
    """``tripled`` on candidates in ``patch_id`` order: (chosen rows, rank, stratum)."""
    n = table.num_rows
    n_strata = min(cfg.strata, n)
    # Equal-count quantile bins of the complexity: by rank, ascending, ties by patch_id
    # (NaN ranks as the most complex).
    order = np.lexsort((np.arange(n), scores.astype(np.float64)))
    stratum = np.empty(n, dtype=np.int64)
    stratum[order] = np.arange(n) * n_strata // n
    sizes = np.bincount(stratum, minlength=n_strata)
    quotas = _proportional_quotas(sizes, m)

    feats = _feature_matrix(table)
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(n, size=min(n, 2048), replace=False))
    import torch

    from srdistill.sr.metrics import median_bandwidth

    sigma = median_bandwidth(torch.from_numpy(feats[sample]))
    omega = rng.standard_normal((feats.shape[1], RFF_FEATURES)) / sigma
    phase = rng.uniform(0.0, 2.0 * np.pi, RFF_FEATURES)

    phi = _random_fourier_features(feats, omega, phase).astype(np.float32)
    chosen = _herd(phi, stratum, quotas)
    strat = stratum[chosen]
    rank = np.empty(len(chosen), dtype=np.int64)  # pick order within the stratum
    for s in range(n_strata):
        rank[strat == s] = np.arange(int(quotas[s]))
    order = np.lexsort((rank, strat))  # by (stratum, rank)
    return chosen[order], rank[order], strat[order]


def select_patches(table: pa.Table, cfg: SelectConfig, *, n_total: int) -> pa.Table:
    """Choose ``n_total`` patches by ``cfg.method`` (see the module docstring).

    Args:
        table: kept patches with the patch-table columns (``patch_id``, ``cfg.score``, ...)
            plus ``cluster`` (int32; required by ``clip-kmeans``). ``tripled`` needs
            ``cfg.complexity_score`` (float, higher = more complex) and ``feature``
            (``fixed_size_list<float32>[D]``, the ViT features; unit L2 norm expected) instead
            of ``cfg.score``. ``kcenter`` and ``typiclust`` need the column of ``cfg.features``
            (``FEATURE_COLUMNS``: ``embedding`` for ``clip``, ``feature`` for ``vit``; for
            ``descriptor`` the ``descriptor`` column if present (``kcenter.attach_descriptors``),
            else ``source``, ``x``, ``y``, ``size`` to compute ``kcenter.patch_descriptors`` of
            the candidates). ``cfg.score = proxy_error`` needs that column
            (``proxy_error.attach_proxy_error``).
        cfg: ``method``, ``score`` (``psnr_bic``: lower is harder; ``grad``, ``proxy_error``:
            higher is harder), ``seed`` (all but ``clip-kmeans`` and ``score-topk``),
            ``complexity_score`` and ``strata`` (``tripled``), ``features`` (``kcenter``, ``typiclust``),
            ``strata`` and ``prune_hard`` (``stratified``), ``hard_fraction`` (``hard-mix``).
        n_total: budget in patches (``budget_patches``), >= 0. If it exceeds the rows
            available, all rows are returned (``stratified``: all that remain after
            ``prune_hard``); the caller records the shortfall.

    Returns:
        The chosen rows with all input columns plus ``rank`` (int32: within its cluster,
        0 = hardest, for ``clip-kmeans``; pick order within its stratum for ``tripled`` and
        ``stratified``, within its group for ``hard-mix``; global order otherwise) and
        ``score`` (float32, the value of ``cfg.score``, or of ``cfg.complexity_score`` for
        ``tripled``). ``cluster`` (int32, added if absent) is rewritten by three methods: the
        complexity stratum for ``tripled`` (0 = least complex), the score bin for
        ``stratified`` (0 = easiest), the group for ``hard-mix`` (0 = hard, 1 = uniform); these
        and ``clip-kmeans`` order rows by (cluster, rank), the others by rank.

    First, windows overlapping a harder window of the same image by more than
    ``cfg.max_overlap`` of their area are dropped (``non_overlapping``), for every method;
    ``tripled`` counts the more complex window (by ``cfg.complexity_score``) as the harder.
    ``clip-kmeans`` takes patches round-robin over clusters in hardness order: every cluster
    gets ``n_total // n_clusters`` or one more; a cluster with fewer patches than its share
    gives all it has and the rest goes to the others; leftover slots go to the clusters whose
    next candidate is hardest. Ties are broken by ``patch_id``. Deterministic.

    ``tripled`` (our design of TripleD's complexity-aware selection; see the module docstring):

    1. Strata: the N remaining candidates, sorted by ``cfg.complexity_score`` ascending (ties
       by ``patch_id``, NaN last), are cut into ``S = min(cfg.strata, N)`` equal-count bins
       (rank ``r`` goes to bin ``floor(r S / N)``).
    2. Budget: ``m = min(n_total, N)`` is shared in proportion to the bin sizes by largest
       remainder (ties to the more complex bin), so each bin gets ``m * N_s / N`` rounded up or
       down and the subset's complexity histogram matches the candidates'. A proportional
       quota never exceeds its bin, so nothing needs redistributing.
    3. Herding: one Gaussian kernel ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))`` for all bins,
       ``sigma`` = ``metrics.median_bandwidth`` of a ``cfg.seed``-seeded sample of at most 2048
       candidates' features, approximated by ``RFF_FEATURES`` = 512 random Fourier features
       ``phi`` (seeded by ``cfg.seed``). With ``mu`` the mean embedding of all candidates, kernel
       herding (Chen, Welling, Smola, UAI 2010) picks greedily, without repeats, the candidate
       maximising ``<w, phi(x)>`` among the bins whose quota is not yet filled, starting from
       ``w = mu`` and updating ``w += mu - phi(x_pick)``: each pick most reduces the MMD
       between the picks and all candidates while the bins keep their quotas. (Herding each
       bin towards its own mean instead gave 2-3x higher MMD to the corpus on the test data:
       a bin's few picks were spent on matching that bin alone.) Ties go to the lowest
       ``patch_id``. O(m N R) time, ``(N, R)`` float32 memory, numpy.

    ``kcenter``: ``kcenter.kcenter_greedy`` on the candidates' features, first centre drawn
    with ``cfg.seed``; ``rank`` is the pick order. ``typiclust``: ``typiclust.typiclust_select``
    on the same features, k-means seeded by ``cfg.seed``; ``rank`` is the pick order
    (largest cluster first). ``stratified``: ``stratified.ccs_select``
    (CCS) on the candidates' hardness by ``cfg.score`` with ``cfg.strata`` equal-width bins.
    ``hard-mix``: ``stratified.hard_mix_select``. All three draw from the candidates in
    ``patch_id`` order with ``np.random.default_rng(cfg.seed)``: deterministic given the seed.

    Raises:
        ValueError: a required column is missing (the message names it, and the
            ``select.features`` that needs it), ``n_total < 0`` or an unknown method,
            (``tripled``, ``kcenter``, ``typiclust``) a null feature or features that do not form
            an (N, D) matrix, (``kcenter``, ``typiclust``) non-finite features, or (``stratified``) a non-finite score.
    """
    if cfg.method not in METHODS:
        raise ValueError(f"select.method {cfg.method!r} is not one of {list(METHODS)}")
    tripled = cfg.method == "tripled"
    score_col = cfg.complexity_score if tripled else cfg.score
    required = {"patch_id", score_col} | ({"cluster"} if cfg.method == "clip-kmeans" else set())
    required |= {"feature"} if tripled else set()
    required |= {"source", "x", "y", "size"} if cfg.max_overlap < 1.0 else set()
    why = ""
    if cfg.method in FEATURE_METHODS:
        column = FEATURE_COLUMNS[cfg.features]
        pixels = cfg.features == "descriptor" and column not in table.column_names
        required |= {"source", "x", "y", "size"} if pixels else {column}
        why = f" (select.features {cfg.features!r})"
    missing = sorted(required - set(table.column_names))
    if missing:
        if "proxy_error" in missing:
            why += "; attach proxy_error.proxy_error_scores with proxy_error.attach_proxy_error"
        raise ValueError(f"select: table lacks column(s) {missing} needed by {cfg.method!r}{why}")
    if n_total < 0:
        raise ValueError(f"select: n_total must be >= 0, got {n_total}")
    table = table.drop_columns([c for c in ("rank", "score") if c in table.column_names])
    # Canonical row order (patch_id), independent of how the table was assembled.
    pids = table.column("patch_id").to_numpy(zero_copy_only=False).astype(str)
    table = table.take(pa.array(np.argsort(pids, kind="stable")))
    key = _hardness_key(table.column(score_col).to_numpy(zero_copy_only=False), score_col)
    table = table.filter(pa.array(non_overlapping(table, key, cfg.max_overlap)))
    n = table.num_rows
    scores = table.column(score_col).to_numpy(zero_copy_only=False).astype(np.float32)
    key = _hardness_key(scores, score_col)
    tie = np.arange(n)  # rows are in patch_id order now
    m = min(n_total, n)

    stratum = None
    if cfg.method == "random":
        chosen = np.random.default_rng(cfg.seed).choice(n, size=m, replace=False)
        rank = np.arange(m)
    elif cfg.method == "score-topk":
        chosen = np.lexsort((tie, key))[:m]
        rank = np.arange(m)
    elif cfg.method == "clip-kmeans":
        cluster = table.column("cluster").to_numpy(zero_copy_only=False).astype(np.int64)
        order = np.lexsort((tie, key, cluster))  # by cluster, hardest first
        sorted_cluster = cluster[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_cluster)) + 1]
        sizes = np.diff(np.r_[starts, n])
        within = np.empty(n, dtype=np.int64)
        within[order] = np.arange(n) - np.repeat(starts, sizes)
        # Round-robin: all rank-0 patches (hardest of each cluster) first, then rank 1, ...
        chosen = np.lexsort((tie, key, within))[:m]
        chosen = chosen[np.lexsort((within[chosen], cluster[chosen]))]
        rank = within[chosen]
    elif cfg.method == "kcenter":
        chosen = kcenter_greedy(_feature_space(table, cfg), m, seed=cfg.seed) if m else tie[:0]
        rank = np.arange(m)
    elif cfg.method == "typiclust":
        chosen = typiclust_select(_feature_space(table, cfg), m, seed=cfg.seed) if m else tie[:0]
        rank = np.arange(m)
    elif cfg.method == "stratified":
        chosen, rank, stratum = ccs_select(key, m, strata=cfg.strata, prune_hard=cfg.prune_hard, seed=cfg.seed)
    elif cfg.method == "hard-mix":
        chosen, rank, stratum = hard_mix_select(key, m, hard_fraction=cfg.hard_fraction, seed=cfg.seed)
    elif m == 0:  # tripled, nothing to pick
        chosen = rank = stratum = np.empty(0, dtype=np.int64)
    else:  # tripled
        chosen, rank, stratum = _tripled(table, scores, m, cfg)
    out = table.take(pa.array(chosen, type=pa.int64()))
    if stratum is not None:
        strata = pa.array(stratum.astype(np.int32), type=pa.int32())
        if "cluster" in out.column_names:
            out = out.set_column(out.column_names.index("cluster"), "cluster", strata)
        else:
            out = out.append_column("cluster", strata)
    out = out.append_column("rank", pa.array(rank.astype(np.int32), type=pa.int32()))
    return out.append_column("score", pa.array(scores[chosen], type=pa.float32()))


def subset_mmd(
    selected_features: np.ndarray,
    corpus_features: np.ndarray,
    *,
    max_corpus: int = 4096,
    seed: int = 0,
) -> float:
    """Squared MMD between a subset's features and the corpus' (lower = more representative).

    ``metrics.feature_mmd2`` (Gretton et al., JMLR 2012, eq. 5, biased V-statistic; sum of
    Gaussian kernels at 0.5, 1 and 2 times the bandwidth) between the subset and a
    ``seed``-seeded uniform sample, without replacement, of at most ``max_corpus`` corpus rows;
    the bandwidth is the median heuristic (``metrics.median_bandwidth``) on that sample, so
    values are comparable across subsets of the same corpus with the same ``max_corpus`` and
    ``seed``. Used for every selection method, so they are measured by one yardstick.

    Args:
        selected_features: ``(n, D)`` float array (e.g. the selected patches' ViT features),
            n >= 1.
        corpus_features: ``(N, D)`` float array (all candidates' features), N >= 1.
        max_corpus: corpus rows kept, >= 1 (the kernel matrices are ``max_corpus^2``).
        seed: seed of the corpus sample.

    Returns:
        MMD^2 as a float in ``[0, 6]`` (computed in float32); 0 iff the two distributions agree.

    Raises:
        ValueError: not 2-D, empty, different D, or ``max_corpus < 1``.
    """
    import torch

    from srdistill.sr.metrics import feature_mmd2, median_bandwidth

    x = np.asarray(selected_features, dtype=np.float32)
    y = np.asarray(corpus_features, dtype=np.float32)
    if x.ndim != 2 or y.ndim != 2 or not len(x) or not len(y) or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"subset_mmd needs (n, D) and (N, D) features, n, N >= 1; got {x.shape} and {y.shape}"
        )
    if max_corpus < 1:
        raise ValueError(f"subset_mmd: max_corpus must be >= 1, got {max_corpus}")
    if len(y) > max_corpus:
        y = y[np.sort(np.random.default_rng(seed).choice(len(y), size=max_corpus, replace=False))]
    ty = torch.tensor(y)
    sigma = median_bandwidth(ty, max_points=len(ty))
    return float(feature_mmd2(torch.tensor(x), ty, bandwidth=sigma))


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export_distilled(selected: pa.Table, out_dir: Path) -> list[Path]:
    """Write the selected patches as PNGs plus ``provenance.csv``.

    Each patch is cropped from its source (``imaging.read_image``, each source read once)
    and saved as ``c{cluster:03d}_r{rank:04d}_{patch_id}.png``: ``(size, size, 3)`` uint8 RGB.
    PNGs are written to a temporary name and renamed, so a killed export never leaves a
    half-written PNG; a file whose bytes would not change is not rewritten; PNGs of that
    naming pattern that are not in ``selected`` (left by an earlier selection) are removed, so
    ``out_dir`` holds exactly the distilled set.

    ``provenance.csv`` has one row per PNG: ``file, patch_id, source, x, y, size, cluster,
    score`` (``score`` as ``str(np.float32(v))``), then, for those of ``COMPLEXITY_COLUMNS``
    (``vit_complexity``, ``entropy``, ``grad_energy``) that ``selected`` has, one column each,
    same format (null -> ``nan``), so training can read each image's complexity. For
    ``tripled`` the ``cluster`` of a file name is its complexity stratum.

    Args:
        selected: ``select_patches`` output (``patch_id``, ``source``, ``x``, ``y``, ``size``,
            ``cluster``, ``rank``, ``score``; optionally complexity columns; other columns
            such as ``feature`` are ignored).
        out_dir: directory, created if missing.

    Returns:
        Paths of the PNGs, in ``selected`` row order.

    Raises:
        ValueError: a column is missing or a patch lies outside its source image.
        imaging.ImageReadError: a source image cannot be read.
    """
    cols = ("patch_id", "source", "x", "y", "size", "cluster", "rank", "score")
    missing = [c for c in cols if c not in selected.column_names]
    if missing:
        raise ValueError(f"export: table lacks column(s) {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = [c for c in COMPLEXITY_COLUMNS if c in selected.column_names]
    rows = selected.select(list(cols) + extra).to_pylist()
    names = [f"c{r['cluster']:03d}_r{r['rank']:04d}_{r['patch_id']}.png" for r in rows]
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_source.setdefault(r["source"], []).append(i)
    for src, idx in by_source.items():
        img = imaging.read_image(src)  # (H, W, 3) uint8
        for i in idx:
            r = rows[i]
            try:
                patch = imaging.crop(img, r["x"], r["y"], r["size"])
            except ValueError as exc:
                raise ValueError(f"{src}: {exc}") from None
            data = _png_bytes(patch)
            path = out_dir / names[i]
            if path.is_file() and path.read_bytes() == data:
                continue
            _write_atomic(path, data)
    keep = set(names)
    for path in out_dir.iterdir():
        stale_png = _PNG_NAME.match(path.name) and path.name not in keep
        if stale_png or (path.name.startswith(".") and ".tmp-" in path.name):
            path.unlink()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "patch_id", "source", "x", "y", "size", "cluster", "score"] + extra)
    for name, r in zip(names, rows):
        writer.writerow([name, r["patch_id"], r["source"], r["x"], r["y"], r["size"],
                         r["cluster"], str(np.float32(r["score"]))]
                        + [str(np.float32(np.nan if r[c] is None else r[c])) for c in extra])
    _write_atomic(out_dir / "provenance.csv", buf.getvalue().encode())
    return [out_dir / name for name in names]
