"""k-center greedy coreset selection and cheap patch descriptors to run it on.

Sener and Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set Approach",
ICLR 2018 (arXiv 1708.00489), Algorithm 1 ("k-Center-Greedy"): a subset ``s`` whose covering
radius ``max_i min_{j in s} ||x_i - x_j||`` over all points is small bounds the gap between
a model's loss on the subset and on the whole set (their Theorem 1); greedily adding

    u = argmax_{i not in s} min_{j in s} ||x_i - x_j||_2

(the point farthest from the current centres) gives a covering radius at most twice the
optimal one for the same number of centres (Gonzalez, "Clustering to minimize the maximum
intercluster distance", Theoret. Comput. Sci. 38, 1985). Here the set starts empty, so the
first centre is drawn at random (the paper starts from the labelled pool), and the features are
not a trained network's activations (there are no labels to train one): pixel descriptors
(``patch_descriptors``), or the CLIP / ViT features the pipeline already computes
(``select.features``). The paper's robust mixed-integer refinement (their section 4.2) is not
implemented.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from srdistill.sr import imaging

__all__ = ["DESCRIPTOR_COLUMN", "attach_descriptors", "covering_radius", "feature_matrix", "kcenter_greedy",
           "patch_descriptors"]

#: Column ``select_patches`` reads descriptors from when present (``attach_descriptors``).
DESCRIPTOR_COLUMN = "descriptor"
#: Side of the luminance thumbnail.
THUMB = 8
#: Unsigned gradient-orientation bins over [0, pi).
ORIENTATIONS = 8
#: ITU-R BT.601 luma weights of R, G, B.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: Pixels decoded and described at once by ``patch_descriptors`` (bounds memory, ~0.4 GB).
_CHUNK_PIXELS = 1 << 21
#: Distance-update rows per matrix product in ``kcenter_greedy`` (bounds the temporaries).
_ROWS = 1 << 16


def feature_matrix(features: np.ndarray, m: int, caller: str) -> np.ndarray:
    """``features`` as a C-contiguous ``(N, D)`` float32 array, checked for a selector ``caller``
    that picks ``m`` of its rows.

    Raises:
        ValueError: ``features`` not 2-D or not finite, or ``m < 0`` (the message names ``caller``).
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{caller}: features must be (N, D), got shape {x.shape}")
    if m < 0:
        raise ValueError(f"{caller}: m must be >= 0, got {m}")
    if not np.isfinite(x).all():
        raise ValueError(f"{caller}: {int((~np.isfinite(x)).any(axis=1).sum())} feature row(s) are not finite")
    return x


def kcenter_greedy(features: np.ndarray, m: int, *, seed: int) -> np.ndarray:
    """Sener and Savarese's k-center greedy (ICLR 2018, Algorithm 1) from an empty set.

    The first centre is drawn uniformly with ``np.random.default_rng(seed)``; each further
    centre is the point whose Euclidean distance to its nearest centre is largest (ties to the
    lowest row). The nearest-centre distances are kept in one ``(N,)`` float32 vector updated
    with each new centre (``|x|^2 - 2 x.c + |c|^2``, rows in blocks of ``2^16``): O(N m D)
    time, memory O(N) beyond ``features``. Once every point coincides with a centre (m above
    the number of distinct points), the remaining picks are the lowest unpicked rows.

    Args:
        features: ``(N, D)`` float array (cast to float32), finite.
        m: centres to pick, ``0 <= m``; ``min(m, N)`` are returned.
        seed: seed of the first centre.

    Returns:
        ``(min(m, N),)`` int64 row indices in pick order, no repeats.

    Raises:
        ValueError: ``features`` not 2-D or not finite, or ``m < 0``.
    """
    x = feature_matrix(features, m, "kcenter_greedy")
    n = len(x)
    m = min(m, n)
    picks = np.empty(m, dtype=np.int64)
    if m == 0:
        return picks
    sq = np.einsum("ij,ij->i", x, x)  # (N,) squared norms
    nearest = np.full(n, np.inf, dtype=np.float32)  # squared distance to the nearest centre
    centre = int(np.random.default_rng(seed).integers(n))
    for t in range(m):
        picks[t] = centre
        c = x[centre]
        for lo in range(0, n, _ROWS):
            d = x[lo : lo + _ROWS] @ c  # (rows,)
            d *= -2.0
            d += sq[lo : lo + _ROWS]
            d += sq[centre]
            np.maximum(d, 0.0, out=d)  # rounding can make |x - x|^2 slightly negative
            np.minimum(nearest[lo : lo + _ROWS], d, out=nearest[lo : lo + _ROWS])
        nearest[centre] = -1.0  # never again, even when rounding leaves it above 0
        centre = int(np.argmax(nearest))  # first maximum: the lowest row
    return picks


def covering_radius(features: np.ndarray, centres: np.ndarray) -> float:
    """``max_i min_{j in centres} ||x_i - x_j||_2`` (float64): the k-center objective.

    Args:
        features: ``(N, D)`` float array.
        centres: ``(k,)`` row indices, ``k >= 1``.

    Raises:
        ValueError: no centre.
    """
    if len(centres) == 0:
        raise ValueError("covering_radius: no centre")
    x = np.asarray(features, dtype=np.float64)
    d = np.linalg.norm(x[:, None, :] - x[np.asarray(centres)][None, :, :], axis=2)
    return float(d.min(axis=1).max())


def _raw_descriptors(batch: np.ndarray) -> list[np.ndarray]:
    """``(k, S, S, 3)`` uint8 patches -> [thumbnails (k, 64), orientation histograms (k, 8),
    colour moments (k, 9)], before standardisation (pixels in float32, sums in float64)."""
    rgb = batch.astype(np.float32) / np.float32(255.0)
    luma = rgb @ _LUMA  # (k, S, S) in [0, 1]
    thumb = imaging.imresize(luma, output_shape=(THUMB, THUMB), spatial_axes=(1, 2), compute_dtype=np.float32)
    p = np.pad(luma, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, 1:-1, 2:] - p[:, 1:-1, :-2]) / 2.0  # central differences
    gy = (p[:, 2:, 1:-1] - p[:, :-2, 1:-1]) / 2.0
    mag = np.hypot(gx, gy).reshape(len(batch), -1)
    angle = np.mod(np.arctan2(gy, gx), np.pi).reshape(len(batch), -1)  # unsigned, [0, pi)
    bins = np.minimum((angle * (ORIENTATIONS / np.pi)).astype(np.int64), ORIENTATIONS - 1)
    hist = np.stack([(mag * (bins == b)).mean(axis=1, dtype=np.float64) for b in range(ORIENTATIONS)], axis=1)
    pixels = rgb.reshape(len(batch), -1, 3)
    mean = pixels.mean(axis=1, dtype=np.float64)
    centred = pixels - mean[:, None].astype(np.float32)
    square = centred * centred
    moments = [mean, np.sqrt(square.mean(axis=1, dtype=np.float64)),
               np.cbrt((square * centred).mean(axis=1, dtype=np.float64))]  # fmt: skip
    return [thumb.reshape(len(batch), -1), np.log1p(100.0 * hist), np.concatenate(moments, axis=1)]


def patch_descriptors(table: pa.Table) -> np.ndarray:
    """A pixel descriptor of every patch, no pretrained model: ``(N, 81)`` float32.

    Three blocks, from each patch's RGB pixels (``imaging.iter_crops``, chunks of about 2
    million pixels):

    * 64: the luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B, in [0, 1]) resized to 8x8 by
      MATLAB bicubic with antialiasing (``imaging.imresize``, float32): layout and brightness;
    * 8: gradient orientation histogram: central differences of the luma, unsigned orientation
      in 8 bins over [0, pi), each bin the sum of the gradient magnitudes in it divided by the
      pixel count, as ``log(1 + 100 h)`` (texture direction and strength, compressed);
    * 9: colour moments (Stricker and Orengo, "Similarity of color images", SPIE 1995) of R, G
      and B in [0, 1]: mean, standard deviation, cube root of the third central moment.

    Each column is standardised over the rows of ``table`` (zero mean, unit variance; a constant
    column becomes 0) and each block divided by the square root of its width, so each block adds
    the same expected amount (1 per pair, on average) to a squared Euclidean distance.

    Args:
        table: ``source``, ``x``, ``y``, ``size`` columns (the patch table), N rows.

    Returns:
        ``(N, 81)`` float32, finite, rows in ``table`` order (``(0, 81)`` for no rows).

    Raises:
        ValueError: a column is missing or a patch leaves its image.
        imaging.ImageReadError: a source image cannot be read.
    """
    missing = [c for c in ("source", "x", "y", "size") if c not in table.column_names]
    if missing:
        raise ValueError(f"patch_descriptors: table lacks column(s) {missing}")
    widths = (THUMB * THUMB, ORIENTATIONS, 9)
    n = table.num_rows
    if n == 0:
        return np.empty((0, sum(widths)), np.float32)
    cols = [table.column(c).to_numpy(zero_copy_only=False) for c in ("source", "x", "y", "size")]
    blocks = [np.empty((n, w)) for w in widths]
    for rows, patches in imaging.iter_crops(*cols, max_pixels=_CHUNK_PIXELS):
        for side in np.unique(cols[3][rows]):  # one batch per patch size
            same = np.flatnonzero(cols[3][rows] == side)
            for block, part in zip(blocks, _raw_descriptors(np.stack([patches[j] for j in same]))):
                block[rows[same]] = part
    out = []
    for block in blocks:
        std = block.std(axis=0)
        out.append((block - block.mean(axis=0)) / np.where(std > 0, std, 1.0) / np.sqrt(block.shape[1]))
    return np.concatenate(out, axis=1).astype(np.float32)


def attach_descriptors(table: pa.Table, descriptors: np.ndarray | None = None) -> pa.Table:
    """``table`` with ``DESCRIPTOR_COLUMN`` (``fixed_size_list<float32>[D]``) set to
    ``descriptors`` (default: ``patch_descriptors(table)``), replacing one already there.

    ``select_patches`` with ``select.features = descriptor`` reads this column when present and
    otherwise computes descriptors of its candidates itself; attach once to select many times.

    Raises:
        ValueError: ``descriptors`` is not ``(table.num_rows, D)``.
    """
    desc = patch_descriptors(table) if descriptors is None else np.asarray(descriptors, dtype=np.float32)
    if desc.ndim != 2 or len(desc) != table.num_rows:
        raise ValueError(f"attach_descriptors: descriptors of shape {desc.shape} for {table.num_rows} rows")
    if DESCRIPTOR_COLUMN in table.column_names:
        table = table.drop_columns([DESCRIPTOR_COLUMN])
    col = pa.FixedSizeListArray.from_arrays(pa.array(desc.ravel()), desc.shape[1])
    return table.append_column(DESCRIPTOR_COLUMN, col)
