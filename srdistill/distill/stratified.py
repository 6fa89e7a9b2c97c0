"""Score-stratified selection: Coverage-centric Coreset Selection, and a hard + ordinary mix.

``ccs_select`` is Coverage-centric Coreset Selection (Zheng, Liu, Wang, Prakash, "Coverage-centric
Coreset Selection for High Pruning Rates", ICLR 2023, arXiv 2210.15809), Algorithm 1: at high
pruning rates the hardest examples alone cover the data distribution badly, so CCS

1. prunes the hardest ``beta`` fraction (their "hard cutoff"; there, mislabelled or
   ambiguous examples; here ``select.prune_hard``, default 0),
2. cuts the remaining range of the difficulty score into ``k`` equal-width strata,
3. shares the budget over the non-empty strata by visiting them from the smallest: the
   smallest stratum gets ``min(its size, floor(remaining budget / strata left))``, and so on,
   so small strata are taken whole and the rest is shared evenly among the larger ones,
4. samples uniformly at random inside each stratum.

The difficulty here is a patch hardness score (``select.score``: ``psnr_bic``, ``grad`` or
``proxy_error``) in place of the paper's training-dynamics scores (forgetting, AUM, EL2N).
Equal-width strata give an outlying score value a stratum, and a share, of its own (e.g.
``psnr_bic``'s 99 dB cap of flat patches).

``hard_mix_select`` is the plain mix that ``docs/RESULTS.md``'s reading suggests: a fixed share of
the budget goes to the hardest patches, the rest is a uniform sample of the others.

Both take an ascending hardness key (smaller = harder, NaN last; ``selection._hardness_key``)
over candidates in their tie-break order (``patch_id``), so the result is deterministic given
the seed and independent of how the rows came in.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ccs_allocation", "ccs_select", "hard_mix_select", "rounded_count"]


def rounded_count(fraction: float, n: int) -> int:
    """``fraction * n`` rounded to the nearest integer, .5 up (``floor(fraction n + 0.5)``)."""
    return int(np.floor(fraction * n + 0.5))


def ccs_allocation(sizes: np.ndarray, m: int) -> np.ndarray:
    """CCS's budget allocation over strata (Zheng et al., ICLR 2023, Algorithm 1, lines 5-11).

    The non-empty strata are visited from the smallest (ties: the lower index first); each gets
    ``min(size, floor(budget left / non-empty strata left))``. The total is ``min(m, sum(sizes))``:
    a stratum given less than its size gets at least the floor share, and every later one is at
    least as large, so the last stratum can always take what is left.

    Args:
        sizes: ``(k,)`` int stratum sizes, >= 0.
        m: budget, >= 0.

    Returns:
        ``(k,)`` int64 picks per stratum, each ``<= sizes``, summing to ``min(m, sizes.sum())``.

    Raises:
        ValueError: a negative size or budget.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if m < 0 or (sizes < 0).any():
        raise ValueError(f"ccs_allocation: sizes and m must be >= 0, got {sizes.tolist()} and {m}")
    quotas = np.zeros(len(sizes), dtype=np.int64)
    visit = [s for s in np.lexsort((np.arange(len(sizes)), sizes)) if sizes[s] > 0]
    left = int(m)
    for i, s in enumerate(visit):
        quotas[s] = min(int(sizes[s]), left // (len(visit) - i))
        left -= int(quotas[s])
    return quotas


def ccs_select(
    key: np.ndarray, m: int, *, strata: int, prune_hard: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coverage-centric Coreset Selection (Zheng et al., ICLR 2023, Algorithm 1).

    1. Prune: the ``rounded_count(prune_hard, N)`` hardest candidates (smallest ``key``, ties
       by row) are dropped.
    2. Strata: the hardness ``h = -key`` of the N' remaining is cut into ``strata`` equal-width
       bins over ``[min h, max h]``: ``floor(strata (h - min) / (max - min))``, the maximum in
       the last bin; all in bin 0 when every ``h`` is equal. Bin 0 = easiest.
    3. Budget: ``ccs_allocation`` of ``min(m, N')`` over the bins' sizes.
    4. Picks: uniform without replacement inside each bin (``np.random.default_rng(seed)``,
       bins in index order, candidates of a bin in row order).

    Args:
        key: ``(N,)`` float ascending hardness key, finite.
        m: budget, >= 0; fewer are returned when fewer than ``m`` remain after pruning.
        strata: number of bins, >= 1.
        prune_hard: fraction in ``[0, 1)``.
        seed: seed of the draws.

    Returns:
        ``(chosen, rank, bin)``: int64 arrays of the picks' rows, their draw order within their
        bin (0, 1, ...) and their bin, ordered by (bin, rank).

    Raises:
        ValueError: a non-finite key, ``strata < 1`` or ``prune_hard`` outside ``[0, 1)``.
    """
    key = np.asarray(key, dtype=np.float64)
    if not np.isfinite(key).all():
        raise ValueError(f"stratified: {int((~np.isfinite(key)).sum())} candidate(s) have a non-finite score")
    if strata < 1 or not 0.0 <= prune_hard < 1.0:
        raise ValueError(f"stratified: need strata >= 1 and prune_hard in [0, 1), got {strata}, {prune_hard}")
    n = len(key)
    keep = np.sort(np.lexsort((np.arange(n), key))[rounded_count(prune_hard, n) :])
    hardness = -key[keep]
    lo, span = (hardness.min(), np.ptp(hardness)) if len(keep) else (0.0, 0.0)
    scaled = (hardness - lo) / span if span > 0 else np.zeros(len(keep))
    bins = np.minimum((scaled * strata).astype(np.int64), strata - 1)
    quotas = ccs_allocation(np.bincount(bins, minlength=strata), min(m, len(keep)))
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([keep[rng.choice(np.flatnonzero(bins == b), size=q, replace=False)]
                             for b, q in enumerate(quotas)])  # fmt: skip
    rank = np.concatenate([np.arange(q) for q in quotas])
    return chosen.astype(np.int64), rank.astype(np.int64), np.repeat(np.arange(strata, dtype=np.int64), quotas)


def hard_mix_select(
    key: np.ndarray, m: int, *, hard_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hardest ``rounded_count(hard_fraction, m)`` candidates plus a uniform sample of the
    others for the rest of the budget.

    Args:
        key: ``(N,)`` float ascending hardness key (NaN counts as the easiest).
        m: budget, ``0 <= m``; ``min(m, N)`` are returned.
        hard_fraction: share of the budget taken hardest first, in ``[0, 1]``.
        seed: seed of the uniform draw (``np.random.default_rng(seed)``, the others in row
            order).

    Returns:
        ``(chosen, rank, group)``: int64 rows, rank within the group (the hard ones hardest
        first, ties by row; the others in draw order) and group (0 = hard, 1 = ordinary),
        ordered by (group, rank).

    Raises:
        ValueError: ``hard_fraction`` outside ``[0, 1]``.
    """
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard-mix: hard_fraction must be in [0, 1], got {hard_fraction}")
    n = len(key)
    m = min(m, n)
    n_hard = rounded_count(hard_fraction, m)
    order = np.lexsort((np.arange(n), np.asarray(key, dtype=np.float64)))
    hard, others = order[:n_hard], np.sort(order[n_hard:])
    drawn = np.random.default_rng(seed).choice(others, size=m - n_hard, replace=False)
    chosen = np.concatenate([hard, drawn]).astype(np.int64)
    rank = np.concatenate([np.arange(n_hard), np.arange(m - n_hard)]).astype(np.int64)
    group = np.repeat(np.array([0, 1], dtype=np.int64), [n_hard, m - n_hard])
    return chosen, rank, group
