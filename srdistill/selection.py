"""Budgeted selection of the distilled real set (a coreset) and its export as PNGs.

SRDD (Cho, Jung, Cho, Soh; arXiv 2509.14777) mines hard patches, clusters them by CLIP
embedding (k = 7) and synthesises IPC ("images per cluster", 1 or 10) images per cluster with a
cluster-conditioned diffusion model. This module is the real-data counterpart of that budget:
it picks actual patches, under the same budget, with three methods:

* ``clip-kmeans``: per cluster, the hardest patches by ``score`` (``psnr_bic`` lowest or
  ``grad`` highest first), the budget shared as evenly as possible across clusters.
* ``score-topk``: the globally hardest patches, ignoring clusters (a baseline).
* ``random``: a uniform random sample (a baseline).

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

from srdistill import imaging
from srdistill.config import LOWER_IS_HARDER, SelectConfig

__all__ = ["budget_patches", "non_overlapping", "select_patches", "export_distilled"]

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


def select_patches(table: pa.Table, cfg: SelectConfig, *, n_total: int) -> pa.Table:
    """Choose ``n_total`` patches by ``cfg.method``.

    Args:
        table: kept patches with the patch-table columns (``patch_id``, ``cfg.score``, ...)
            plus ``cluster`` (int32; required by ``clip-kmeans``).
        cfg: ``method``, ``score`` (``psnr_bic``: lower is harder; ``grad``: higher is
            harder), ``seed`` (``random``).
        n_total: budget in patches (``budget_patches``), >= 0. If it exceeds the rows
            available, all rows are returned; the caller records the shortfall.

    Returns:
        The chosen rows with all input columns plus ``rank`` (int32: within its cluster,
        0 = hardest, for ``clip-kmeans``; global order otherwise) and ``score`` (float32, the
        value of ``cfg.score``). ``clip-kmeans`` rows are ordered by (cluster, rank), others by
        rank.

    First, windows overlapping a harder window of the same image by more than
    ``cfg.max_overlap`` of their area are dropped (``non_overlapping``), for every method.
    ``clip-kmeans`` takes patches round-robin over clusters in hardness order: every cluster
    gets ``n_total // n_clusters`` or one more; a cluster with fewer patches than its share
    gives all it has and the rest goes to the others; leftover slots go to the clusters whose
    next candidate is hardest. Ties are broken by ``patch_id``. Deterministic.

    Raises:
        ValueError: a required column is missing or ``n_total < 0``.
    """
    required = {"patch_id", cfg.score} | ({"cluster"} if cfg.method == "clip-kmeans" else set())
    required |= {"source", "x", "y", "size"} if cfg.max_overlap < 1.0 else set()
    missing = sorted(required - set(table.column_names))
    if missing:
        raise ValueError(f"select: table lacks column(s) {missing} needed by {cfg.method!r}")
    if n_total < 0:
        raise ValueError(f"select: n_total must be >= 0, got {n_total}")
    table = table.drop_columns([c for c in ("rank", "score") if c in table.column_names])
    # Canonical row order (patch_id), independent of how the table was assembled.
    pids = table.column("patch_id").to_numpy(zero_copy_only=False).astype(str)
    table = table.take(pa.array(np.argsort(pids, kind="stable")))
    key = _hardness_key(table.column(cfg.score).to_numpy(zero_copy_only=False), cfg.score)
    table = table.filter(pa.array(non_overlapping(table, key, cfg.max_overlap)))
    n = table.num_rows
    scores = table.column(cfg.score).to_numpy(zero_copy_only=False).astype(np.float32)
    key = _hardness_key(scores, cfg.score)
    tie = np.arange(n)  # rows are in patch_id order now
    m = min(n_total, n)

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
    else:
        raise ValueError(
            f"select.method {cfg.method!r} is not one of ['clip-kmeans', 'random', 'score-topk']"
        )
    out = table.take(pa.array(chosen, type=pa.int64()))
    out = out.append_column("rank", pa.array(rank.astype(np.int32), type=pa.int32()))
    return out.append_column("score", pa.array(scores[chosen], type=pa.float32()))


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

    Args:
        selected: ``select_patches`` output (``patch_id``, ``source``, ``x``, ``y``, ``size``,
            ``cluster``, ``rank``, ``score``).
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
    rows = selected.select(list(cols)).to_pylist()
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
    writer.writerow(["file", "patch_id", "source", "x", "y", "size", "cluster", "score"])
    for name, r in zip(names, rows):
        writer.writerow([name, r["patch_id"], r["source"], r["x"], r["y"], r["size"],
                         r["cluster"], str(np.float32(r["score"]))])
    _write_atomic(out_dir / "provenance.csv", buf.getvalue().encode())
    return [out_dir / name for name in names]
