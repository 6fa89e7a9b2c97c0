"""Patch mining: sliding-window HR patches scored for how much they teach an SR network.

SRDD (Cho et al., arXiv 2509.14777, §3.1 and its released code) slides a 512x512 window with
stride 256 over each HR image and keeps the patches whose grayscale PSNR against their own x4
bicubic down-then-up reconstruction is below 23 dB: patches that bicubic cannot restore carry
texture an SR network must learn. The paper's text speaks of "high-gradient" patches, so a
mean Sobel gradient magnitude is computed too, and either can drive the keep rule.

The released ``src/1_select_patches.py`` converts each RGB crop to Pillow's ``L`` (ITU-R 601-2
luma, uint8), takes it to float32 and scores it by ``10 log10(255^2 / MSE)`` over all its
pixels (no border crop, no clipping or rounding of the reconstruction) against
``cv2.resize(cv2.resize(p, (int(w/4), int(h/4)), INTER_CUBIC), (w, h), INTER_CUBIC)``: OpenCV's
bicubic, Keys a = -0.75, half-pixel centres, edge-replicated border, no antialiasing when
downscaling, float32 between the passes. ``MineConfig.psnr_bic_resize = "opencv"`` computes
exactly that (through ``cv2``); with ``psnr_bic_window = "patch"`` and a 512/256 window it is
the released criterion. Window positions are ``range(0, side - size + 1, stride)`` there as here
(the remainder at the right/bottom edge is not covered).

Differences from the released code, by default:

* ``psnr_bic_resize = "matlab"``: MATLAB's bicubic (``imaging.imresize``: a = -0.5, antialiased
  when downscaling, uint8 rounding after each pass), the convention of SR benchmarks. It
  restores a patch better than OpenCV's, so the same patch reads ~1.3 dB higher and a 23 dB
  threshold keeps fewer patches (``bench/keep_fraction.py`` measures both on a corpus).
* ``psnr_bic_window = "image"``: the whole image is resampled once (see ``score_patches``).
* A patch bicubic restores exactly scores 99 dB (the release: ``inf``); both are kept or
  dropped alike by any threshold below 99.

Functions over numpy/pyarrow, and the shard I/O through ``storage``; no Ray here (``runner.py``
runs ``mine_shard`` over the shards of a corpus plan).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from threadpoolctl import threadpool_limits

from srdistill import storage
from srdistill.config import LOWER_IS_HARDER, MineConfig
from srdistill.sr.image_stats import sobel_rows
from srdistill.sr.imaging import ImageReadError, fetch, image_size, imresize, read_image_gray

__all__ = [
    "PATCH_SCHEMA",
    "MINED_SCHEMA",
    "part_name",
    "map_patch_part",
    "mine_shard",
    "keep_rule",
    "kept_mask",
    "read_patches",
    "summarize_parts",
    "dedupe_parts",
    "content_digest",
    "patch_id",
    "patch_positions",
    "prefetched",
    "score_patches",
    "mine_image",
    "mine_images",
    "apply_keep_rule",
]

#: Columns of the patch table (``read_patches``).
PATCH_SCHEMA = pa.schema(
    [
        ("patch_id", pa.string()),
        ("source", pa.string()),
        ("x", pa.int32()),
        ("y", pa.int32()),
        ("size", pa.int32()),
        ("img_w", pa.int32()),
        ("img_h", pa.int32()),
        ("psnr_bic", pa.float32()),
        ("grad", pa.float32()),
    ]
)
#: Schema of ``mine_images`` and of the stored parts: a patch row has ``error == ""``; a skipped
#: image is one row with ``x = y = -1`` and the reason in ``error``. ``content``: ``content_digest``
#: of the decoded image on each of its rows (null where it was not decoded), for ``dedupe_parts``.
MINED_SCHEMA = PATCH_SCHEMA.append(pa.field("error", pa.string())).append(pa.field("content", pa.binary(16)))
#: ``mine/skipped.parquet``: every skipped image and why.
SKIPPED_SCHEMA = pa.schema([("source", pa.string()), ("error", pa.string())])

# Pixels (patch count x size^2) scored at once, bounding memory for large patches.
_CHUNK_PIXELS = 1 << 22
# Rows of a per-pixel map (Sobel magnitude, squared error) made at once: ~0.7 MB of float32 at
# DIV2K's width, kept in cache from the filter to the block sums (2.3x faster than whole maps).
_BAND_ROWS = 96


def patch_id(key: str, x: int, y: int, size: int) -> str:
    """Stable id of a patch: the first 16 hex digits of sha1(``key|x|y|size``).

    ``key`` is the image path relative to the corpus root (POSIX separators), so the ids do not
    change when the corpus is mounted elsewhere.
    """
    return hashlib.sha1(f"{key}|{x}|{y}|{size}".encode()).hexdigest()[:16]


def patch_positions(width: int, height: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left ``(x, y)`` of every full window, row-major; empty if the image is too small."""
    return [
        (x, y)
        for y in range(0, height - size + 1, stride)
        for x in range(0, width - size + 1, stride)
    ]


def _box_means(values: Callable[[int, int], np.ndarray], shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray,
               size: int, stride: int) -> np.ndarray:  # fmt: skip
    """Mean of an ``(H, W) = shape`` float32 map over each ``size`` square at (xs, ys): (N,) float64.

    ``values(r0, r1)`` gives the map's rows ``r0:r1`` as ``(r1 - r0, W)`` float32. When every
    corner is a multiple of ``stride`` and ``stride`` divides ``size`` (the sliding window
    case), the map is asked for bands of whole blocks, about ``_BAND_ROWS`` rows (small enough
    to stay in cache) and stride x stride block sums are added up: a block's rows in float32 (exact for
    integers below ``2**24 / stride``), the rest in float64. Otherwise a summed-area table of
    the whole map in float64.
    """
    if size % stride == 0 and not (xs % stride).any() and not (ys % stride).any():
        nby, nbx = (ys.max() + size) // stride, (xs.max() + size) // stride
        sat, step = np.zeros((nby + 1, nbx + 1)), max(1, _BAND_ROWS // stride)
        for b0 in range(0, nby, step):
            b1 = min(nby, b0 + step)
            rows = values(b0 * stride, b1 * stride)[:, : nbx * stride].reshape(b1 - b0, stride, -1).sum(axis=1)
            sat[b0 + 1 : b1 + 1, 1:] = rows.reshape(b1 - b0, nbx, stride).sum(axis=2, dtype=np.float64)
        sat = sat.cumsum(0).cumsum(1)
        xs, ys, k = xs // stride, ys // stride, size // stride
    else:
        sat = np.zeros((shape[0] + 1, shape[1] + 1))
        sat[1:, 1:] = values(0, shape[0]).astype(np.float64).cumsum(1).cumsum(0)
        k = size
    total = sat[ys + k, xs + k] - sat[ys, xs + k] - sat[ys + k, xs] + sat[ys, xs]
    return total / (size * size)


def _down_up(batch: np.ndarray, factor: int, resize: Literal["matlab", "opencv"] = "matlab") -> np.ndarray:
    """Bicubic x``factor`` down-then-up reconstruction of ``(N, H, W)`` uint8 images.

    ``matlab``: ``imresize(imresize(b, 1/factor), factor)`` (``imaging.imresize``, float32
    products, uint8 after each pass); the output is ``factor * ceil(side / factor)`` per side.
    ``opencv``: per image, SRDD's released resize: float32 ``cv2.resize`` ``INTER_CUBIC`` to
    ``(int(W / factor), int(H / factor))`` and back to ``(W, H)``, no rounding or clipping (a
    side not divisible by ``factor`` is resampled by ``side / int(side / factor)``, as there).

    Returns:
        ``(N, H', W')`` float32 grey levels, ``H' >= H``, ``W' >= W`` (equal for ``opencv`` and
        for sides divisible by ``factor``).
    """
    if resize == "opencv":
        return np.stack([_cv2_down_up(img.astype(np.float32), factor) for img in batch])
    kw = {"spatial_axes": (1, 2), "compute_dtype": np.float32}
    return imresize(imresize(batch, 1 / factor, **kw), float(factor), **kw).astype(np.float32)


def _cv2_down_up(img: np.ndarray, factor: int) -> np.ndarray:
    """SRDD's released reconstruction of one ``(H, W)`` float32 image (``_down_up``'s ``opencv``)."""
    h, w = img.shape
    down = cv2.resize(img, (int(w / factor), int(h / factor)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(down, (w, h), interpolation=cv2.INTER_CUBIC)


def _patch_sse(gray: np.ndarray, positions: list[tuple[int, int]], size: int, factor: int,
               resize: Literal["matlab", "opencv"]) -> np.ndarray:  # fmt: skip
    """Sum of squared errors of each ``size`` patch at ``positions`` against its own down-up
    reconstruction (``psnr_bic_window = "patch"``): (N,) float64, accumulated by ``cv2.norm``."""
    sse = np.empty(len(positions))
    if resize == "opencv":
        for i, (x, y) in enumerate(positions):
            patch = gray[y : y + size, x : x + size].astype(np.float32)
            sse[i] = cv2.norm(patch, _cv2_down_up(patch, factor), cv2.NORM_L2SQR)
        return sse
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, len(positions), chunk):
        batch = np.stack([gray[y : y + size, x : x + size] for x, y in positions[start : start + chunk]])
        kw = {"spatial_axes": (1, 2), "compute_dtype": np.float32}
        recon = imresize(imresize(batch, 1 / factor, **kw), float(factor), **kw)  # (n, s', s') uint8
        for i, (patch, rec) in enumerate(zip(batch, recon)):
            sse[start + i] = cv2.norm(patch, rec[:size, :size], cv2.NORM_L2SQR)
    return sse


def score_patches(
    gray: np.ndarray,
    positions: list[tuple[int, int]],
    size: int,
    *,
    stride: int,
    bic_scale: int = 4,
    window: Literal["patch", "image"] = "patch",
    resize: Literal["matlab", "opencv"] = "matlab",
) -> tuple[np.ndarray, np.ndarray]:
    """``psnr_bic`` and ``grad`` of square patches of one grayscale image.

    Args:
        gray: ``(H, W)`` uint8 grayscale image.
        positions: top-left ``(x, y)`` of each patch.
        size: patch side in pixels, divisible by ``bic_scale``.
        stride: window step the positions were made with (enables block sums).
        bic_scale: factor of the bicubic down-then-up reconstruction (SRDD: 4).
        window: ``"patch"`` resamples each cropped patch on its own (SRDD's criterion exactly,
            symmetric padding at the patch border); ``"image"`` resamples the whole image once
            and averages the squared error over each patch, so pixels near a patch border see
            their real neighbours. Same values away from the border, ~4x less work at stride
            size/2 (see docs/BENCHMARKS.md for speed and rank agreement). For ``opencv`` the
            image is first edge-replicated at its right/bottom to a multiple of ``bic_scale``
            per side (so the x``bic_scale`` grid is the patches'), and cropped back after.
        resize: the bicubic of the reconstruction (``MineConfig.psnr_bic_resize``):
            ``"matlab"``, MATLAB's ``imresize(imresize(patch, 1/s), s)`` with uint8 rounding
            after each pass; ``"opencv"``, SRDD's released ``cv2.resize`` ``INTER_CUBIC``
            (a = -0.75, no antialiasing) down to ``side/s`` and back, in float32.

    Returns:
        ``psnr_bic`` (N,) float32 in dB: ``10 log10(255^2 / MSE)`` of the patch (grey levels
        0..255, every pixel, no border crop) vs its bicubic down-then-up reconstruction; lower
        = harder; patches restored exactly capped at 99 dB. ``grad`` (N,) float32: mean Sobel
        gradient magnitude / 8 over the patch in grey levels per pixel, Sobel taken on the
        whole image.

    Raises:
        ValueError: ``resize`` is not ``"matlab"`` or ``"opencv"``.
    """
    if resize not in ("matlab", "opencv"):
        raise ValueError(f"resize must be 'matlab' or 'opencv', got {resize!r}")
    n = len(positions)
    if n == 0:
        return np.empty(0, np.float32), np.empty(0, np.float32)
    xs = np.array([p[0] for p in positions])
    ys = np.array([p[1] for p in positions])
    h, w = gray.shape
    padded = cv2.copyMakeBorder(gray, 1, 1, 0, 0, cv2.BORDER_REPLICATE)
    grad = _box_means(lambda r0, r1: sobel_rows(padded, r0, r1), (h, w), xs, ys, size, stride).astype(np.float32)
    if window == "image":
        if resize == "opencv":  # whole x bic_scale blocks: the same grid as the patches'
            src = np.pad(gray, ((0, -h % bic_scale), (0, -w % bic_scale)), mode="edge")
            recon = _cv2_down_up(src.astype(np.float32), bic_scale)
        else:
            kw = {"compute_dtype": np.float32}
            recon = imresize(imresize(gray, 1 / bic_scale, **kw), float(bic_scale), **kw)

        def sq_err(r0: int, r1: int) -> np.ndarray:
            err = cv2.subtract(recon[r0:r1, :w], gray[r0:r1], dtype=cv2.CV_32F)
            return cv2.multiply(err, err, err)

        mse = _box_means(sq_err, (h, w), xs, ys, size, stride)
    else:
        mse = _patch_sse(gray, positions, size, bic_scale, resize) / (size * size)
    with np.errstate(divide="ignore"):
        psnr_bic = np.minimum(10 * np.log10(255.0**2 / mse), 99.0).astype(np.float32)
    return psnr_bic, grad


def _skip_row(path: str, reason: str, content: bytes | None = None) -> dict:
    return {"patch_id": "", "source": path, "x": -1, "y": -1, "size": 0, "img_w": 0, "img_h": 0,
            "psnr_bic": np.nan, "grad": np.nan, "error": reason, "content": content}  # fmt: skip


def content_digest(img: np.ndarray) -> bytes:
    """16-byte XXH3-128 digest of a decoded image (its shape, dtype and pixels): equal exactly
    when the decoded content is, whatever the file bytes or format. (Not collision-resistant
    against crafted inputs, which a corpus of one's own images does not hold; ~0.1 ms for a
    DIV2K image, against ~8 ms for BLAKE2b.)"""
    h = xxhash.xxh3_128(f"{img.shape}|{img.dtype.str}|".encode())
    h.update(np.ascontiguousarray(img).data)
    return h.digest()


def _load(path: str, cfg: MineConfig) -> tuple[np.ndarray, np.ndarray] | str:
    """``(rgb, gray)`` uint8 of the image at ``path`` (``imaging.read_image_gray``), or the reason
    it is skipped (missing, unreadable, a side over ``cfg.max_side``, smaller than one patch).

    Raises:
        OSError: S3 failed after its retries.
    """
    try:
        src = fetch(path)
        w, h = image_size(src)
        if max(w, h) > cfg.max_side:
            return f"too large: {w}x{h} has a side over max_side={cfg.max_side}"
        if min(w, h) < cfg.patch_size:
            return f"too small: {w}x{h} is smaller than one {cfg.patch_size}x{cfg.patch_size} patch"
        return read_image_gray(src)
    except ImageReadError as exc:
        return exc.reason


def _mine_loaded(path: str, loaded: tuple[np.ndarray, np.ndarray] | str, cfg: MineConfig, key: str | None,
                 root: str | None) -> list[dict]:  # fmt: skip
    """``mine_image``'s rows for what ``_load`` returned."""
    if isinstance(loaded, str):
        return [_skip_row(path, loaded)]
    img, gray = loaded
    size, (h, w) = cfg.patch_size, gray.shape
    content = content_digest(img)
    if key is None:
        key = Path(os.path.relpath(path, root)).as_posix() if root else path
    positions = patch_positions(w, h, size, cfg.stride)
    psnr_bic, grad = score_patches(
        gray, positions, size, stride=cfg.stride, bic_scale=cfg.bic_scale, window=cfg.psnr_bic_window,
        resize=cfg.psnr_bic_resize,
    )
    return [
        {"patch_id": patch_id(key, x, y, size), "source": path, "x": x, "y": y, "size": size,
         "img_w": w, "img_h": h, "psnr_bic": float(p), "grad": float(g), "error": "", "content": content}  # fmt: skip
        for (x, y), p, g in zip(positions, psnr_bic, grad)
    ]


def mine_image(path: str, cfg: MineConfig, *, key: str | None = None, root: str | None = None) -> list[dict]:
    """Patches of one image with their scores, or one skip row explaining why there are none.

    Args:
        path: local path or ``s3://`` URI of the image.
        key: the name patch ids derive from (``patch_id``); default: ``path`` relative to
            ``root`` (POSIX separators), or ``path`` itself without ``root``.

    Returns:
        Rows of ``MINED_SCHEMA``. A skipped image (missing, unreadable, truncated, a side over
        ``cfg.max_side``, smaller than one patch) gives a single row with ``error`` set; it
        never raises for bad image data.

    Raises:
        OSError: S3 failed after its retries (transient; the shard is retried, nothing skipped).
    """
    return _mine_loaded(path, _load(path, cfg), cfg, key, root)


@contextmanager
def one_core() -> Iterator[None]:
    """OpenBLAS and OpenCV on one thread inside (restored after): scoring's matrix products are
    small, and their threads only contend with the other workers (a Ray task of one CPU sets
    ``OMP_NUM_THREADS=1`` anyway; this covers the in-process callers)."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        cv2.setNumThreads(threads)


def mine_images(paths: list[str] | np.ndarray, cfg: MineConfig, *, root: str | None = None,
                keys: list[str] | None = None, skips: list[str] | None = None,
                prefetch: bool = True) -> pa.Table:  # fmt: skip
    """``mine_image`` over several images (``keys[i]`` naming ``paths[i]``), as one
    ``MINED_SCHEMA`` table, rows in input order. ``skips[i]``, when not empty, is a reason
    decided before (the plan's ``skip``): ``paths[i]`` is not read, one skip row says why.

    Scoring runs on one core (``one_core``); with ``prefetch`` the next image is fetched and
    decoded in a second thread meanwhile (Pillow, OpenCV and BLAS release the GIL), so an S3
    read or a PNG decode overlaps the scoring of the image before.

    Raises:
        OSError: S3 failed after its retries.
    """
    items = list(zip(map(str, paths), keys if keys is not None else [None] * len(paths),
                     skips if skips is not None else [""] * len(paths)))  # fmt: skip

    def load(item: tuple[str, str | None, str]) -> tuple[np.ndarray, np.ndarray] | str:
        path, _, why = item
        return why or _load(path, cfg)

    rows: list[dict] = []
    with one_core():
        for (path, key, _), loaded in zip(items, prefetched(load, items, enabled=prefetch)):
            rows += _mine_loaded(path, loaded, cfg, key, root)
    return pa.Table.from_pylist(rows, schema=MINED_SCHEMA)


def prefetched(fn: Callable, items: list, *, enabled: bool = True) -> Iterator:
    """``fn(item)`` for each of ``items``, in order; with ``enabled``, each computed in a second
    thread while the caller works on the one before (reading and decoding overlap the work,
    when both release the GIL: Pillow, OpenCV, BLAS and torch do)."""
    if not enabled:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(fn, items[0]) if items else None
        for i in range(len(items)):
            done, ahead = ahead.result(), (pool.submit(fn, items[i + 1]) if i + 1 < len(items) else None)
            yield done


def part_name(shard: int) -> str:
    """File name of a shard's output part: ``part-000123.parquet`` (also for embeddings)."""
    return f"part-{shard:06d}.parquet"


def _arrow_column(values: np.ndarray) -> pa.Array:
    """``(N,)`` strings -> string, ``(N,)`` numbers -> their type, ``(N, D)`` ->
    ``fixed_size_list<float32>[D]``."""
    values = np.asarray(values)
    if values.ndim == 2:
        flat = pa.array(values.astype(np.float32, copy=False).reshape(-1), type=pa.float32())
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    if values.dtype.kind in "OUS":
        return pa.array(values.astype(str), type=pa.string())
    return pa.array(values)


def map_patch_part(fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], shard: int, *, mine_uri: str,
                   out_uri: str, batch_size: int, kept_only: bool) -> int:  # fmt: skip
    """Run ``fn`` over one mined shard's patches in batches and write ``out_uri/part-<shard>.parquet``
    (the per-shard outputs of embedding and complexity scoring).

    Reads ``read_patches(mine_uri, [patch_id, source, x, y, size], kept_only=kept_only,
    shard=shard)``; calls ``fn`` on batches of at most ``batch_size`` rows (numpy arrays of those
    columns) and once on an empty batch, so a shard without patches still gets a part with
    the full schema. An ``fn`` with ``prepare`` and ``forward`` methods (``fn(b) ==
    fn.forward(fn.prepare(b))``, e.g. ``embedding.ClipEmbedder``) has the next batch prepared in
    a second thread meanwhile (``prefetched``). ``fn`` returns a dict of ``(n,)`` or ``(n, D)`` arrays, rows in input
    order; they are concatenated and written atomically in that column order: ``(n, D)`` as
    ``fixed_size_list<float32>[D]``, strings as ``string``, numbers as their dtype.
    Idempotent: a shard whose part exists is skipped, so a retried or resumed shard neither
    loses nor duplicates rows.

    Returns:
        Rows written, or -1 when the part already existed.

    Raises:
        Whatever ``fn`` raises (e.g. ``ImageReadError``); OSError: storage failed after retries.
    """
    out = storage.join(out_uri, part_name(shard))
    if storage.exists(out):
        return -1
    cols = ["patch_id", "source", "x", "y", "size"]
    part = read_patches(mine_uri, cols, kept_only=kept_only, shard=shard)
    arrays = {c: part.column(c).to_numpy(zero_copy_only=False) for c in cols}
    batches = [{c: v[i : i + batch_size] for c, v in arrays.items()} for i in range(0, part.num_rows, batch_size)]
    results = [fn({c: v[:0] for c, v in arrays.items()})]
    if hasattr(fn, "prepare"):  # decoding and cropping the next batch overlap this one's forward
        results += [fn.forward(prepared) for prepared in prefetched(fn.prepare, batches)]
    else:
        results += [fn(batch) for batch in batches]
    table = pa.table({k: _arrow_column(np.concatenate([r[k] for r in results])) for k in results[0]})
    storage.write_parquet(out, table)
    return part.num_rows


def mine_shard(plan_uri: str, shard: int, parts_uri: str, cfg: MineConfig) -> int:
    """Mine shard ``shard`` of the corpus plan into ``parts_uri/part_name(shard)``.

    Idempotent: the part is written atomically (visible only complete) and a shard whose part
    exists is not mined again, so a retried task or a resumed run neither loses nor duplicates
    patches. The part holds ``MINED_SCHEMA`` rows in plan order (patch rows row-major per
    image, one skip row per skipped image).

    Returns:
        The number of rows written, or -1 when the part already existed.

    Raises:
        OSError: reading the plan or an S3 image, or writing the part, failed after retries.
    """
    from srdistill.corpus import read_shard

    out = storage.join(parts_uri, part_name(shard))
    if storage.exists(out):
        return -1
    plan = read_shard(plan_uri, shard)
    skips = plan.column("skip").to_pylist() if "skip" in plan.column_names else None
    table = mine_images(plan.column("uri").to_pylist(), cfg, keys=plan.column("key").to_pylist(), skips=skips)
    storage.write_parquet(out, table)
    return table.num_rows


def keep_rule(cfg: MineConfig, scores: np.ndarray | None = None,
              ids: Callable[[float], list[str]] | None = None) -> dict:  # fmt: skip
    """The keep rule of ``cfg`` resolved to a cut, the same for every part of the patch table.

    ``threshold``: harder than ``cfg.threshold`` (``psnr_bic < t`` or ``grad > t``);
    ``top_fraction``: the ``ceil(fraction * N)`` hardest of the N ``scores`` ((N,) float, dB for
    ``psnr_bic``, grey levels/px for ``grad``; ties at the cut broken by ascending ``patch_id``:
    ``ids(score_at_cut)`` returns the ids of the tied patches);
    ``all``: every patch.

    Returns:
        ``{"rule", "score", "lower", "cut", "tie_id"}``: a patch is kept when its score is strictly
        harder than ``cut``, or equal to it with ``patch_id <= tie_id`` (``cut`` None: all kept).
    """
    lower = LOWER_IS_HARDER[cfg.keep_score]
    rule = {"rule": cfg.keep_rule, "score": cfg.keep_score, "lower": lower, "cut": None, "tie_id": None}
    if cfg.keep_rule == "threshold":
        rule["cut"] = float(cfg.threshold)
    elif cfg.keep_rule == "top_fraction" and scores is not None and len(scores):
        key = np.asarray(scores, np.float64) * (1 if lower else -1)
        n_keep = int(np.ceil(cfg.top_fraction * len(key)))
        cut = np.partition(key, n_keep - 1)[n_keep - 1]
        ties = sorted(ids(float(cut * (1 if lower else -1))))
        rule["cut"] = float(cut * (1 if lower else -1))
        rule["tie_id"] = ties[n_keep - int((key < cut).sum()) - 1]
    return rule


def kept_mask(table: pa.Table, rule: dict) -> np.ndarray:
    """``(N,)`` bool: which rows of a patch table (columns ``rule["score"]``, ``patch_id``) ``rule``
    keeps."""
    if rule["cut"] is None:
        return np.ones(table.num_rows, dtype=bool)
    s = table.column(rule["score"]).to_numpy(zero_copy_only=False).astype(np.float64)
    harder = s < rule["cut"] if rule["lower"] else s > rule["cut"]
    if rule["tie_id"] is not None:
        ids = table.column("patch_id").to_numpy(zero_copy_only=False)
        harder |= (s == rule["cut"]) & (ids <= rule["tie_id"])
    return harder


def apply_keep_rule(table: pa.Table, cfg: MineConfig) -> pa.Table:
    """Append the boolean ``kept`` column (``keep_rule`` over this table alone) to a patch table."""
    scores = table.column(cfg.keep_score).to_numpy(zero_copy_only=False)
    ids = table.column("patch_id").to_numpy(zero_copy_only=False)
    rule = keep_rule(cfg, scores, lambda cut: ids[scores.astype(np.float64) == cut].tolist())
    return table.append_column("kept", pa.array(kept_mask(table, rule)))


#: Start of the skip reason of an image already mined under another URI: ``duplicate of <uri>``.
DUPLICATE = "duplicate of "
_IMAGE_COLUMNS = ["source", "x", "y", "error", "content"]


def _part_images(uri: str) -> tuple[pa.Table, np.ndarray] | None:
    """The columns ``_IMAGE_COLUMNS`` of the mined part ``uri`` and the row index where each of
    its decoded images starts (its (0, 0) patch, or its skip row when it carries a digest), in
    row order; ``None`` for a part written before digests existed (no ``content`` column)."""
    fs, path = storage.filesystem(uri)
    with storage.errors("read", uri), fs.open_input_file(path) as f:
        if "content" not in pq.read_schema(f).names:
            return None
    t = storage.read_parquet(uri, columns=_IMAGE_COLUMNS)
    has = pc.is_valid(t.column("content"))
    origin = pc.and_(pc.equal(t.column("x"), 0), pc.equal(t.column("y"), 0))
    first = pc.or_(origin, pc.not_equal(t.column("error"), ""))
    return t, np.flatnonzero(pc.and_(has, first).to_numpy(zero_copy_only=False))


def dedupe_parts(parts_uri: str) -> int:
    """Keep every decoded image once: of the images with the same ``content`` digest (the same
    decoded pixels, see ``content_digest``), the first in plan order (parts by shard, rows in
    plan order; for a directory that is the smallest path) keeps its patches; each later one's
    patch rows are replaced, in place in its part (rewritten atomically), by one skip row
    ``duplicate of <first uri>`` that keeps the digest.

    The outcome depends only on the plan, not on which shard finished first, and the pass is
    idempotent: after a kill between two part rewrites it is simply run again. Patch ids of the
    images kept do not change.

    Memory: 16 bytes per decoded image for the digests (plus ~3x that while ``np.unique``
    sorts them) and the URIs of the first occurrences that have duplicates; one part at a time.

    Returns:
        The number of images that duplicate an earlier one.
    """
    parts = storage.list_files(parts_uri, [".parquet"])
    chunks, counts = [], []
    for uri in parts:  # pass 1: the digests of all decoded images, in plan order
        found = _part_images(uri)
        digests = [] if found is None else found[0].column("content").take(pa.array(found[1], pa.int64())).to_pylist()
        chunks.append(np.array(digests, dtype="S16"))
        counts.append(len(digests))
    if not sum(counts):
        return 0
    digests = np.concatenate(chunks)
    del chunks
    _, first_at, inverse = np.unique(digests, return_index=True, return_inverse=True)
    del digests
    first = first_at[inverse.reshape(-1)]  # ordinal -> ordinal of its first occurrence
    del inverse, first_at
    dup = first != np.arange(len(first))
    if not dup.any():
        return 0
    wanted = set(first[dup].tolist())
    first_uri: dict[int, str] = {}
    offset = 0
    for uri, n in zip(parts, counts):  # pass 2: rewrite the parts holding unmarked duplicates
        if not n:
            continue
        t, starts = _part_images(uri)
        ords = offset + np.arange(n)
        offset += n
        sources = t.column("source").to_numpy(zero_copy_only=False)
        errors_ = t.column("error").to_numpy(zero_copy_only=False)
        for o, row in zip(ords.tolist(), starts.tolist()):
            if o in wanted:
                first_uri[o] = sources[row]
        marks = {int(row): first_uri[int(first[o])] for o, row in zip(ords, starts) if dup[o] and errors_[row] == ""}
        if not marks:
            continue
        rows, replaced, drop = storage.read_parquet(uri).to_pylist(), [], False
        for i, r in enumerate(rows):
            if i in marks:
                replaced.append(_skip_row(r["source"], DUPLICATE + marks[i], r["content"]))
                drop = True
            elif drop and r["error"] == "" and (r["x"], r["y"]) != (0, 0) and r["source"] == replaced[-1]["source"]:
                continue  # a further patch of the duplicate just replaced
            else:
                drop = False
                replaced.append(r)
        storage.write_parquet(uri, pa.Table.from_pylist(replaced, schema=MINED_SCHEMA))
    return int(dup.sum())


def summarize_parts(parts_uri: str, cfg: MineConfig, skipped_uri: str) -> tuple[dict, dict]:
    """Drop duplicate images (``dedupe_parts``), then stream over the mined parts once (twice
    for ``top_fraction``): resolve the keep rule and count. Skipped images (also what the
    listing could not list, and duplicates) go to the parquet file ``skipped_uri`` (``source``,
    ``error``).

    Memory: one part at a time, plus 8 bytes per patch for ``top_fraction`` (its cut is a global
    order statistic).

    Returns:
        ``(rule, counts)``: ``keep_rule``'s dict; ``patches``, ``patches_kept``,
        ``images_mined``, ``images_skipped``, ``images_duplicate`` (of them, those skipped as
        ``duplicate of <uri>``), ``corpus_pixels`` (HR pixels of the images that gave patches;
        each image lies in exactly one part).
    """
    import pyarrow.dataset as pads

    dedupe_parts(parts_uri)
    ok = pads.field("error") == ""
    scores = None
    if cfg.keep_rule == "top_fraction":
        scores = storage.read_dataset(parts_uri, columns=[cfg.keep_score], filter=ok).column(0).to_numpy()

    def tied(cut: float) -> list[str]:
        at = ok & (pads.field(cfg.keep_score) == pa.scalar(cut, pa.float32()))
        return storage.read_dataset(parts_uri, columns=["patch_id"], filter=at).column(0).to_pylist()

    rule = keep_rule(cfg, scores, tied)
    del scores
    counts = dict.fromkeys(("patches", "patches_kept", "images_mined", "images_skipped", "images_duplicate",
                            "corpus_pixels"), 0)  # fmt: skip
    cols = ["patch_id", "source", "img_w", "img_h", cfg.keep_score, "error"]
    with storage.atomic_writer(skipped_uri) as sink, pq.ParquetWriter(sink, SKIPPED_SCHEMA) as writer:
        for uri in storage.list_files(parts_uri, [".parquet"]):
            part = storage.read_parquet(uri, columns=cols)
            bad = pc.not_equal(part.column("error"), "")
            skipped = part.filter(bad)
            if skipped.num_rows:
                writer.write_table(skipped.select(["source", "error"]).cast(SKIPPED_SCHEMA))
            patches = part.filter(pc.invert(bad))
            counts["patches"] += patches.num_rows
            counts["patches_kept"] += int(kept_mask(patches, rule).sum())
            counts["images_mined"] += pc.count_distinct(patches.column("source")).as_py()
            counts["images_skipped"] += skipped.num_rows
            counts["images_duplicate"] += pc.sum(pc.starts_with(skipped.column("error"), DUPLICATE)).as_py() or 0
            counts["corpus_pixels"] += corpus_pixels(patches)
    return rule, counts


def read_patches(mine_uri: str, columns: list[str] | None = None, *, kept_only: bool = False,
                 filter=None, shard: int | None = None) -> pa.Table:  # fmt: skip
    """The patch table of a run's ``mine`` stage (``mine_uri/patches/part-*.parquet`` with the
    keep rule in ``mine_uri/keep.json``), sorted by shard then row; skipped-image rows dropped.

    Args:
        columns: ``PATCH_SCHEMA`` columns and/or ``"kept"`` (default: all, with ``kept``).
        kept_only: only the patches the keep rule kept.
        filter: an extra ``pyarrow.dataset`` expression.
        shard: read only this shard's part.

    Returns:
        A table of the asked columns (``kept`` bool computed from the rule).

    Raises:
        FileNotFoundError: the stage has not written ``keep.json`` or the parts.
        OSError: storage failed after retries.
    """
    import pyarrow.dataset as pads

    rule = storage.read_json(storage.join(mine_uri, "keep.json"))
    want = list(PATCH_SCHEMA.names) + ["kept"] if columns is None else list(columns)
    need = [c for c in want if c != "kept"]
    if "kept" in want or kept_only:
        need += [c for c in (rule["score"], "patch_id") if c not in need]
    expr = pads.field("error") == ""
    if filter is not None:
        expr = expr & filter
    parts = storage.join(mine_uri, "patches", *([part_name(shard)] if shard is not None else []))
    table = storage.read_dataset(parts, columns=need, filter=expr)
    if "kept" in want or kept_only:
        mask = kept_mask(table, rule)
        if kept_only:
            table, mask = table.filter(pa.array(mask)), np.ones(int(mask.sum()), dtype=bool)
        if "kept" in want:
            table = table.append_column("kept", pa.array(mask))
    return table.select(want)


def corpus_pixels(table: pa.Table) -> int:
    """HR pixels of all images that gave patches (each source counted once)."""
    if table.num_rows == 0:
        return 0
    per_source = table.group_by("source").aggregate([("img_w", "max"), ("img_h", "max")])
    w = per_source.column("img_w_max").to_numpy().astype(np.int64)
    h = per_source.column("img_h_max").to_numpy().astype(np.int64)
    return int((w * h).sum())


def split_mined(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """Separate ``MINED_SCHEMA`` rows into the patch table (sorted) and the skipped-image list."""
    is_skip = pc.not_equal(table.column("error"), "")
    skipped = table.filter(is_skip).select(["source", "error"]).to_pylist()
    patches = table.filter(pc.invert(is_skip)).drop_columns(["error"])
    patches = patches.sort_by([("source", "ascending"), ("y", "ascending"), ("x", "ascending")])
    return patches, [{"file": r["source"], "reason": r["error"]} for r in skipped]
