"""Image I/O and the degradation of the SR evaluation protocol, in one place.

* ``read_image`` turns any decodable file (8/16-bit, grayscale, palette, RGBA, CMYK,
  EXIF-rotated) into ``(H, W, 3) uint8`` RGB, and raises ``ImageReadError`` naming the file and
  the reason for anything else (not an image, truncated, too large, decompression bomb).
* ``imresize`` is MATLAB's ``imresize(..., 'bicubic')``: Keys cubic with a = -0.5, antialiased
  when downscaling (kernel stretched by 1/scale), symmetric boundary, dimension with the
  smaller scale first, and for uint8 input a round-half-away-from-zero to uint8 after each of
  the two passes. It reproduces ``Set5|Set14/LR_bicubic/X{2,3,4}`` bit for bit.
* ``modcrop`` crops H and W to multiples of the scale before degrading (the standard protocol).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from srdistill import storage

__all__ = [
    "ImageReadError",
    "fetch",
    "read_image",
    "read_image_gray",
    "image_size",
    "write_png",
    "imresize",
    "modcrop",
    "crop",
    "read_crops",
    "iter_crops",
    "to_gray",
]


class ImageReadError(ValueError):
    """A file could not be read as an image. ``reason`` is a short, loggable explanation."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def fetch(path: str | Path) -> str | Path | io.BytesIO:
    """What ``image_size``/``read_image`` open: a local path as is; an ``s3://`` URI read once into
    memory (so header check and decode cost one GET).

    Raises:
        ImageReadError: the object does not exist.
        OSError: S3 failed after its retries (transient: the caller's task should be retried,
            not the image skipped).
    """
    if isinstance(path, io.IOBase) or not storage.is_s3(path):
        return path
    try:
        return io.BytesIO(storage.read_bytes(path))
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None


def _rewind(src):
    if hasattr(src, "seek"):
        src.seek(0)
    return src


def image_size(path: str | Path | io.BytesIO) -> tuple[int, int]:
    """``(width, height)`` as stored, from the file header without decoding pixels.

    The EXIF orientation is not applied (Pillow decodes a whole PNG to find its EXIF); a
    rotated image has width and height swapped, which size limits on the longer or shorter
    side do not see.

    Raises:
        ImageReadError: the file is missing or not a recognised image.
    """
    try:
        with Image.open(_rewind(fetch(path))) as im:
            return im.size
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(path, f"corrupt image header ({exc})") from None


def read_image(path: str | Path | io.BytesIO) -> np.ndarray:
    """Decode an image file to RGB.

    Grayscale is replicated to three channels, palette images are expanded, alpha is dropped
    (the colour channels are kept as stored), 16-bit data is mapped to 8 bits with
    ``round(v / 257)``, and the EXIF orientation tag is applied.

    Args:
        path: image file (PNG, JPEG, BMP, TIFF, WebP, ... anything Pillow decodes): a local
            path, an ``s3://`` URI or what ``fetch`` returned.

    Returns:
        ``(H, W, 3) uint8`` array, RGB.

    Raises:
        ImageReadError: missing file, not an image, truncated/corrupt data, or a
            decompression bomb (more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels).
    """
    with _decoded(path) as im:
        return _to_rgb_uint8(im)


def read_image_gray(path: str | Path | io.BytesIO) -> tuple[np.ndarray, np.ndarray]:
    """``(read_image(path), to_gray(read_image(path)))`` with one decode: ``(H, W, 3)`` and
    ``(H, W)`` uint8. An RGB file's grey is converted from the decoded image directly (one copy
    of the pixels less than ``to_gray``); the values are the same.

    Raises:
        ImageReadError: as ``read_image``.
    """
    with _decoded(path) as im:
        rgb = _to_rgb_uint8(im)
        return rgb, (np.asarray(im.convert("L")) if im.mode == "RGB" else to_gray(rgb))


@contextmanager
def _decoded(path: str | Path | io.BytesIO) -> Iterator[Image.Image]:
    """The decoded, EXIF-transposed Pillow image of ``path``; any failure while it is open (the
    caller's conversions included) as ``ImageReadError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_rewind(fetch(path))) as im:
                im.load()
                ImageOps.exif_transpose(im, in_place=True)  # not in place: a copy even when upright
                yield im
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (unidentified format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(path, f"too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image data ({exc})") from None


def _to_rgb_uint8(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        if mode == "F":  # float images are assumed to be in [0, 1]
            a = a * 255.0
        elif a.max(initial=0) > 255 or mode.startswith("I;16"):
            a = a / 257.0
        a = np.clip(np.floor(a + 0.5), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if mode != "RGB":
        im = im.convert("RGB")  # L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...
    return np.asarray(im, dtype=np.uint8).copy()


def write_png(path: str | Path, img: np.ndarray) -> None:
    """Write ``(H, W, 3)`` or ``(H, W)`` uint8 as PNG atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.ascontiguousarray(img)).save(tmp, format="PNG")
    tmp.replace(path)


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so H and W are multiples of ``scale``. ``(H, W[, C])`` any dtype."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def crop(img: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """The square patch ``img[y:y+size, x:x+size]``; raises ValueError if it leaves the image."""
    h, w = img.shape[:2]
    if x < 0 or y < 0 or x + size > w or y + size > h:
        raise ValueError(f"patch ({x}, {y}, {size}) outside image of size {w}x{h}")
    return img[y : y + size, x : x + size]


def read_crops(sources, xs, ys, sizes) -> list[np.ndarray]:
    """The patches ``(source[i], x[i], y[i], size[i])`` as ``(size, size, 3)`` uint8 arrays, in
    order; each source image is decoded once.

    Raises:
        ImageReadError: a source cannot be read.
        ValueError: a patch leaves its image (the message names the source).
    """
    images: dict[str, np.ndarray] = {}
    out = []
    for src, x, y, size in zip(sources, xs, ys, sizes):
        src = str(src)
        if src not in images:
            images[src] = read_image(src)
        try:
            out.append(crop(images[src], int(x), int(y), int(size)))
        except ValueError as exc:
            raise ValueError(f"{src}: {exc}") from None
    return out


def iter_crops(sources, xs, ys, sizes, *, max_pixels: int = 1 << 22):
    """``read_crops`` of many patches in bounded memory: yields ``(rows, patches)``, where
    ``rows`` is an int64 array of indices into the inputs and ``patches`` their ``(size, size,
    3)`` uint8 arrays, in chunks of at most ``max_pixels`` patch pixels (at least one patch)
    taken in source order, so each source is decoded once per chunk it appears in. Every index
    appears exactly once.

    Raises:
        ImageReadError, ValueError: as ``read_crops``.
    """
    sources = np.asarray(sources).astype(str)
    xs, ys, sizes = (np.asarray(v) for v in (xs, ys, sizes))
    if not len(sources):
        return
    order = np.argsort(sources, kind="stable")
    chunk = max(1, max_pixels // int(sizes.max()) ** 2)
    for lo in range(0, len(order), chunk):
        rows = order[lo : lo + chunk]
        yield rows, read_crops(sources[rows], xs[rows], ys[rows], sizes[rows])


def to_gray(img: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, Pillow's ``convert("L")``: ``(H, W, 3)`` uint8 RGB -> ``(H, W)`` uint8.

    ``L = (19595 R + 38470 G + 7471 B + 2^15) >> 16`` (0.299, 0.587, 0.114 in 16-bit fixed
    point). A 2-D input is returned unchanged.
    """
    if img.ndim == 2:
        return img
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("L"))


# --------------------------------------------------------------------------- MATLAB bicubic


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys (1981) cubic convolution kernel with a = -0.5, as in MATLAB."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * (
        (ax > 1) & (ax <= 2)
    )


@lru_cache(maxsize=256)
def _contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-pixel weights ``(out_len, P)`` float64 and 0-based source indices ``(out_len, P)``."""
    width = 4.0
    if scale < 1:  # antialiasing: stretch the kernel by 1/scale
        width /= scale

        def h(v):
            return scale * _cubic(scale * v)
    else:
        h = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(np.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    weights = h(u[:, None] - idx)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    idx = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(weights != 0, axis=0)
    return np.ascontiguousarray(weights[:, keep]), np.ascontiguousarray(idx[:, keep])


def _tile(scale: float) -> int:
    """Output pixels per banded-matrix tile: small enough that each tile's input band (about
    ``tile / scale`` pixels plus the kernel's width) holds few zeros, large enough for BLAS
    (measured on DIV2K-sized images: 16 when downscaling, 32 when upscaling)."""
    return 16 if scale < 1 else 32


@lru_cache(maxsize=256)
def _band_tiles(
    in_len: int, out_len: int, scale: float, dtype: str
) -> tuple[tuple[int, int, int, int, np.ndarray], ...]:
    """The resize along one axis as dense tiles ``(o0, o1, lo, hi, T)``: ``out[o0:o1] = T @ in[lo:hi]``.

    ``T`` holds the MATLAB weights with the symmetric padding folded in (a mirrored index adds
    its weight to the column of the pixel it mirrors), so each tile is one BLAS product.
    """
    weights, idx = _contributions(in_len, out_len, scale)
    tiles, step = [], _tile(scale)
    for o0 in range(0, out_len, step):
        o1 = min(out_len, o0 + step)
        lo, hi = int(idx[o0:o1].min()), int(idx[o0:o1].max()) + 1
        band = np.zeros((o1 - o0, hi - lo))
        rows = np.repeat(np.arange(o1 - o0), weights.shape[1])
        np.add.at(band, (rows, (idx[o0:o1] - lo).ravel()), weights[o0:o1].ravel())
        tiles.append((o0, o1, lo, hi, band.astype(dtype)))
    return tuple(tiles)


def _resize_axis(x: np.ndarray, axis: int, out_len: int, scale: float) -> np.ndarray:
    """Resize C-contiguous ``x`` (float32 or float64) along ``axis`` by banded matrix products,
    same dtype, C-contiguous. No transposed copies: the last axis is multiplied from the right
    (``x[..., lo:hi] @ T.T``), any other from the left, batched over the axes before it."""
    n = x.shape[axis]
    out = np.empty(x.shape[:axis] + (out_len,) + x.shape[axis + 1 :], dtype=x.dtype)
    tiles = _band_tiles(n, out_len, scale, x.dtype.str)
    if axis == x.ndim - 1:
        for o0, o1, lo, hi, band in tiles:
            np.matmul(x[..., lo:hi], band.T, out=out[..., o0:o1])
        return out
    lead, trail = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1 :])
    xv, ov = x.reshape(lead, n, trail), out.reshape(lead, out_len, trail)
    for o0, o1, lo, hi, band in tiles:
        np.matmul(band, xv[:, lo:hi], out=ov[:, o0:o1])
    return out


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """In place: MATLAB's conversion to uint8 (round half away from zero, saturate)."""
    x += 0.5
    np.floor(x, out=x)
    return np.clip(x, 0, 255, out=x)


def imresize(
    img: np.ndarray,
    scale: float | None = None,
    *,
    output_shape: tuple[int, int] | None = None,
    spatial_axes: tuple[int, int] = (0, 1),
    compute_dtype: type = np.float64,
) -> np.ndarray:
    """MATLAB-compatible bicubic ``imresize``.

    Args:
        img: ``(H, W)`` or ``(H, W, C)`` array; uint8 or float. With ``spatial_axes`` other
            layouts work too, e.g. a batch of patches ``(N, H, W)`` with ``spatial_axes=(1, 2)``.
        scale: factor applied to both sides (``1/4`` downscales x4). Output side
            ``ceil(side * scale)`` as MATLAB computes it.
        output_shape: ``(H_out, W_out)`` instead of ``scale``.
        spatial_axes: the (height, width) axes of ``img``.
        compute_dtype: ``np.float64`` (default, bit-exact with MATLAB on the reference LR
            sets) or ``np.float32`` (about 1.5x faster; a .5 tie may round the other way).

    Returns:
        The resized array. uint8 input gives uint8 (rounded and clipped after each pass, as
        MATLAB does); float input gives ``compute_dtype`` (no clipping).

    Raises:
        ValueError: neither or both of ``scale``/``output_shape`` given, or a non-positive size.
    """
    if (scale is None) == (output_shape is None):
        raise ValueError("give exactly one of scale or output_shape")
    ah, aw = spatial_axes
    in_shape = (img.shape[ah], img.shape[aw])
    if output_shape is not None:
        out_shape = tuple(int(s) for s in output_shape)
        scales = (out_shape[0] / in_shape[0], out_shape[1] / in_shape[1])
    else:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        scales = (float(scale), float(scale))
        out_shape = tuple(math.ceil(s * scale) for s in in_shape)
    if min(out_shape) < 1:
        raise ValueError(f"output shape {out_shape} from input {in_shape} is empty")
    is_uint8 = img.dtype == np.uint8
    x = np.ascontiguousarray(img, dtype=compute_dtype)
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)  # smaller scale first, as MATLAB
    for d in order:
        axis = spatial_axes[d]
        x = _resize_axis(x, axis, out_shape[d], scales[d])
        if is_uint8:
            x = _round_uint8(x)
    return x.astype(np.uint8) if is_uint8 else x
