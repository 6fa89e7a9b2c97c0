"""Blur-and-subsample degradations of zero-shot SR (ZSSR, MZSR), in one place.

The degradation model of both papers (Shocher et al., "Zero-Shot" Super-Resolution Using Deep
Internal Learning, CVPR 2018; Soh et al., Meta-Transfer Learning for Zero-Shot Super-Resolution,
CVPR 2020, arXiv 2002.12213)::

    I_LR = (I_HR * k) ↓s  (+ n)

* ``*`` is applied as MZSR applies it: ``scipy.ndimage.correlate`` with ``mode="reflect"``
  (half-sample symmetric padding, ``d c b a | a b c d | d c b a``, MATLAB's ``'symmetric'``;
  not scipy's ``'mirror'``), per channel, in float64 on [0, 255] values. A correlation is a
  convolution with the kernel rotated by 180°: the two agree for the centrally symmetric
  Gaussians below, and a loaded asymmetric kernel (motion blur) is applied as stored, as
  MZSR and ZSSR do.
* ``↓s`` is direct subsampling ``[0::s, 0::s]`` (MZSR's "direct" models) or MATLAB bicubic
  ``imresize(·, 1/s)`` of the blurred float image (MZSR's "bicubic" model).
* ``n`` is additive white Gaussian noise of std ``noise_sigma`` on [0, 255], then the result is
  rounded half to even (``np.round``) and saturated to uint8.

``degrade(modcrop(HR, 2), isotropic_gaussian(21, 2.0), 2)`` reproduces MZSR's own test inputs
``Input/g20/Set5/*.png`` (tested on a copy of them, ``Set5/LR_g20_x2_MZSR``) bit for bit; the kernel
matches their ``kernel.mat`` to 5e-29 (max abs). On those images no blurred value lies within 2e-6 of a
.5 tie, so half-to-even and half-away-from-zero rounding agree; float32 arithmetic does not
(1-3 pixels differ per image).

Kernels are ``(h, w)`` float64 arrays indexed ``[row, column]``. Gaussian kernels are sampled on
the grid of pixel offsets from the kernel centre ``((size - 1) / 2, (size - 1) / 2)``, as
MZSR's ``gkernel.py``: for even sizes the centre falls between pixels, and there is no shift by
``(s - 1) / 2`` to align with the subsampling grid (ZSSR's optional ``kernel_shift`` and
BSRDM's ``shifted_anisotropic_Gaussian`` do that; MZSR does not). ``scipy.ndimage.correlate``
puts an even-sized kernel's origin at index ``size // 2``, so an even kernel shifts the
image by half a pixel; MZSR's kernels are odd (15 for training, 21 for g20).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "isotropic_gaussian",
    "anisotropic_gaussian",
    "random_kernel_params",
    "random_kernel",
    "kernel_covariance",
    "load_kernel",
    "blur",
    "degrade",
]


# --------------------------------------------------------------------------- kernels


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"kernel size must be a positive integer, got {size!r}")
    return int(size)


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def anisotropic_gaussian(size: int, theta: float, lambda1: float, lambda2: float) -> np.ndarray:
    """MZSR's anisotropic Gaussian blur kernel (Soh et al. 2020, meta-transfer set-up; their
    ``gkernel.py``).

    ``k(p) ∝ exp(-½ pᵀ Σ⁻¹ p)`` with ``Σ = R(θ) diag(λ1, λ2) R(θ)ᵀ``,
    ``R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]]``, normalised to sum 1. ``p = (x, y)`` is the
    offset of a pixel from the kernel centre ``((size - 1) / 2, (size - 1) / 2)`` in pixels,
    ``x`` along columns (to the right) and ``y`` along rows (downwards), as MZSR's
    ``np.meshgrid`` grid; so ``θ`` turns the first principal axis from the +x (column) axis
    towards +y (down the rows).

    Args:
        size: side of the square kernel in pixels (odd sizes keep the centre on a pixel).
        theta: rotation angle in radians (MZSR draws it from [0, π]).
        lambda1, lambda2: eigenvalues of ``Σ``: variances in pixels² (not standard
            deviations) along the rotated x and y axes.

    Returns:
        ``(size, size)`` float64, non-negative, summing to 1, centrally symmetric
        (``k == k[::-1, ::-1]``), with second moments ``≈ Σ`` when the kernel is large enough
        (see ``kernel_covariance``).

    Raises:
        ValueError: ``size`` not a positive integer, ``theta`` not finite, or a ``λ`` not a
            positive finite number.
    """
    size = _check_size(size)
    l1 = _check_positive("lambda1", lambda1)
    l2 = _check_positive("lambda2", lambda2)
    theta = float(theta)
    if not np.isfinite(theta):
        raise ValueError(f"theta must be finite, got {theta!r}")
    c, s = np.cos(theta), np.sin(theta)
    # Σ⁻¹ = R diag(1/λ1, 1/λ2) Rᵀ, written out (symmetric: one off-diagonal term)
    a = c * c / l1 + s * s / l2
    b = c * s * (1.0 / l1 - 1.0 / l2)
    d = s * s / l1 + c * c / l2
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    x, y = r[None, :], r[:, None]  # x: column offset, y: row offset
    k = np.exp(-0.5 * (a * x * x + 2.0 * b * x * y + d * y * y))
    return k / k.sum()


def isotropic_gaussian(size: int, variance: float) -> np.ndarray:
    """Isotropic Gaussian blur kernel: ``anisotropic_gaussian(size, 0, variance, variance)``.

    ``k(x, y) ∝ exp(-(x² + y²) / (2 · variance))`` on the centred grid, normalised to sum 1.
    MZSR's ``g^d_2.0`` test kernel (``Input/g20/kernel.mat``) is ``isotropic_gaussian(21, 2.0)``.

    Args:
        size: side in pixels.
        variance: ``σ²`` in pixels² (MZSR's "g20" is variance 2.0, i.e. σ ≈ 1.414).

    Returns:
        ``(size, size)`` float64, non-negative, summing to 1.

    Raises:
        ValueError: ``size`` not a positive integer or ``variance`` not positive and finite.
    """
    variance = _check_positive("variance", variance)
    return anisotropic_gaussian(size, 0.0, variance, variance)


def random_kernel_params(rng: np.random.Generator, scale: int) -> tuple[float, float, float]:
    """One draw of MZSR's meta-training task distribution (Soh et al. 2020).

    ``θ ~ U[0, π)``, ``λ1 ~ U[1, 2.5·scale)``, ``λ2 ~ U[1, λ1)`` (variances in pixels²), drawn in
    that order as ``generate_kernel(k1=2.5 * scale)`` in MZSR's ``gkernel.py``.

    Args:
        rng: the random generator (``np.random.default_rng(seed)``).
        scale: the SR scale factor ``s`` (positive integer).

    Returns:
        ``(theta, lambda1, lambda2)``: radians, pixels², pixels²; ``1 <= λ2 <= λ1``.

    Raises:
        ValueError: ``scale`` not a positive integer.
    """
    _check_scale(scale)
    theta = np.pi * rng.random()
    l1 = 1.0 + (2.5 * scale - 1.0) * rng.random()
    l2 = 1.0 + (l1 - 1.0) * rng.random()
    return float(theta), float(l1), float(l2)


def random_kernel(rng: np.random.Generator, scale: int, size: int = 15) -> np.ndarray:
    """A random anisotropic Gaussian kernel from MZSR's task distribution.

    ``anisotropic_gaussian(size, *random_kernel_params(rng, scale))``; MZSR meta-trains with
    ``size = 15``.

    Returns:
        ``(size, size)`` float64, non-negative, summing to 1.

    Raises:
        ValueError: ``scale`` or ``size`` not a positive integer.
    """
    size = _check_size(size)
    return anisotropic_gaussian(size, *random_kernel_params(rng, scale))


def _as_kernel(kernel: np.ndarray, what: str = "kernel") -> np.ndarray:
    k = np.asarray(kernel)
    if k.ndim != 2 or k.size == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array, got shape {k.shape}")
    if not np.issubdtype(k.dtype, np.number) or np.iscomplexobj(k):
        raise ValueError(f"{what} must be a real numeric array, got dtype {k.dtype}")
    k = k.astype(np.float64)
    if not np.all(np.isfinite(k)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return k


def kernel_covariance(kernel: np.ndarray) -> np.ndarray:
    """Second central moments of a kernel taken as a distribution over pixel positions.

    ``C = Σ_p w(p) (p - μ)(p - μ)ᵀ`` with ``w = kernel / kernel.sum()``, ``p = (x, y)`` =
    (column, row) in pixels and ``μ`` the centroid: the same (x, y) order as ``Σ`` in
    ``anisotropic_gaussian``, whose kernels have ``C ≈ Σ``: the sampling error of a Gaussian on
    the integer grid falls as ``exp(-2π²λ)`` (about 2e-7 relative at ``λ = 1``), so what remains
    is the truncation of the tails at the kernel border (relative error < 2e-5 for size 31 and
    ``λ <= 10``, MZSR's range at ×4).

    Args:
        kernel: ``(h, w)`` real array with a positive sum.

    Returns:
        ``(2, 2)`` float64 in pixels², symmetric (not necessarily positive definite for
        kernels with negative lobes).

    Raises:
        ValueError: not a non-empty finite 2-D array, or a sum that is not positive.
    """
    k = _as_kernel(kernel)
    total = k.sum()
    if not total > 0:
        raise ValueError(f"kernel sums to {total:g}; it must have a positive sum")
    w = k / total
    ys, xs = np.indices(k.shape, dtype=np.float64)
    mx, my = (w * xs).sum(), (w * ys).sum()
    dx, dy = xs - mx, ys - my
    cxy = (w * dx * dy).sum()
    return np.array([[(w * dx * dx).sum(), cxy], [cxy, (w * dy * dy).sum()]])


# --------------------------------------------------------------------------- loading

_KERNEL_NAMES = ("kernel", "kernels")


def _fail(path, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def _is_numeric(a) -> bool:
    return (
        isinstance(a, np.ndarray)
        and a.dtype != object
        and np.issubdtype(a.dtype, np.number)
        and not np.iscomplexobj(a)
        and not np.issubdtype(a.dtype, np.bool_)
    )


def _object_vector(items) -> np.ndarray:
    """A 1-D object array of ``items`` (``np.array`` would stack equal-shape arrays)."""
    items = list(items)
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def _read_mat(path: Path) -> dict[str, np.ndarray]:
    """Variables of a MATLAB file as MATLAB shapes; cell arrays become 1-D object arrays of
    their elements in MATLAB's linear (column-major) order."""
    with open(path, "rb") as f:
        header = f.read(128)
    if header.startswith(b"MATLAB 7.3"):
        return _read_mat73(path)
    import scipy.io

    try:
        raw = scipy.io.loadmat(str(path))
    except NotImplementedError:  # v7.3 without the text header
        return _read_mat73(path)
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError, ... on bad files
        raise _fail(path, f"not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from None
    out = {}
    for name, value in raw.items():
        if name.startswith("__"):
            continue
        if isinstance(value, np.ndarray) and value.dtype == object:
            value = _object_vector(value.ravel(order="F"))
        out[name] = value
    return out


def _read_mat73(path: Path) -> dict[str, np.ndarray]:
    """MATLAB v7.3 (HDF5) variables. HDF5 stores MATLAB's column-major arrays with the axes
    reversed, so every array is transposed back to its MATLAB shape."""
    try:
        import h5py
    except ImportError:
        raise ImportError(
            f"{path} is a MATLAB v7.3 (HDF5) file: reading it needs h5py (pip install h5py)"
        ) from None
    out = {}
    try:
        with h5py.File(path, "r") as f:
            for name, ds in f.items():
                if name.startswith("#") or not isinstance(ds, h5py.Dataset):
                    continue  # '#refs#', '#subsystem#'; structs are groups: not kernels
                cls = ds.attrs.get("MATLAB_class", b"")
                cls = cls.decode() if isinstance(cls, bytes) else str(cls)
                if ds.dtype == h5py.ref_dtype:  # a cell array: references, C order = MATLAB's
                    elems = [np.asarray(f[ref][()]).T for ref in ds[()].ravel()]
                    out[name] = _object_vector(elems)
                elif cls in ("char", "logical") or ds.attrs.get("MATLAB_empty", 0):
                    continue
                else:
                    out[name] = np.asarray(ds[()]).T
    except OSError as exc:
        raise _fail(path, f"not a readable MATLAB v7.3 / HDF5 file ({exc})") from None
    return out


def _read_image_kernel(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("1", "L", "I", "F") or im.mode.startswith("I;16"):
                return np.asarray(im).astype(np.float64)
            if im.mode == "LA":
                return np.asarray(im)[..., 0].astype(np.float64)
            rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    except UnidentifiedImageError:
        raise _fail(
            path, "unsupported kernel file (expected .mat, .npy, .npz or an image file)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _fail(path, f"corrupt image file ({exc})") from None
    return rgb @ np.array([0.299, 0.587, 0.114])  # luma; a gray RGB image keeps its values


def _pick_variable(path: Path, variables: dict, key: str | None):
    names = sorted(variables)
    if key is not None:
        if key not in variables:
            raise _fail(path, f"no variable {key!r}; variables: {', '.join(names) or '(none)'}")
        return key, variables[key]

    def kernel_like(v) -> bool:
        if _is_numeric(v):
            return v.ndim >= 2
        return isinstance(v, np.ndarray) and v.dtype == object and v.size > 0

    candidates = [n for n in names if kernel_like(variables[n])]
    if len(candidates) > 1:
        named = [n for n in candidates if n.lower() in _KERNEL_NAMES]
        candidates = named if len(named) == 1 else candidates
    if not candidates:
        raise _fail(
            path,
            f"no 2-D or 3-D numeric array or cell array in it; variables: {', '.join(names) or '(none)'}",
        )
    if len(candidates) > 1:
        raise _fail(path, f"ambiguous: several arrays ({', '.join(candidates)}); pass key=")
    return candidates[0], variables[candidates[0]]


def _stack_axis(shape: tuple[int, int, int], matlab_order: bool) -> int:
    """The axis of a 3-D array that enumerates kernels: the one that differs when the other two
    are equal (square kernels); otherwise the last (MATLAB ``h×w×n``) or first (NumPy ``n×h×w``)."""
    a, b, c = shape
    if a == b != c:
        return 2
    if b == c != a:
        return 0
    return 2 if matlab_order else 0


def _select(path: Path, name: str, value, index: int, matlab_order: bool) -> np.ndarray:
    where = f"variable {name!r}" if name else "array"
    if isinstance(value, np.ndarray) and value.dtype == object:  # cell array / object array
        n = value.size
        if not -n <= index < n:
            raise _fail(path, f"index {index} out of range: {where} holds {n} kernels")
        value = value[index]
        where = f"{where}[{index}]"
        if not _is_numeric(value):
            raise _fail(path, f"{where} is not a numeric array ({type(value).__name__})")
        if value.ndim > 2:
            value = value.squeeze()
        if value.ndim != 2:
            raise _fail(path, f"{where} has shape {value.shape}: a kernel must be 2-D")
        return value
    if not _is_numeric(value):
        kind = getattr(value, "dtype", type(value).__name__)
        raise _fail(path, f"{where} is not a real numeric array ({kind})")
    if value.ndim > 3:
        value = value.squeeze()  # e.g. (1, 21, 21, 1)
    if value.ndim == 2:
        if index not in (0, -1):
            raise _fail(path, f"index {index} out of range: {where} is a single 2-D kernel {value.shape}")
        return value
    if value.ndim == 3:
        axis = _stack_axis(value.shape, matlab_order)
        n = value.shape[axis]
        if not -n <= index < n:
            raise _fail(
                path, f"index {index} out of range: {where} {value.shape} holds {n} kernels along axis {axis}"
            )
        return np.take(value, index, axis=axis)
    raise _fail(path, f"{where} has shape {value.shape}: expected a 2-D kernel or a 3-D stack of kernels")


def load_kernel(path: str | Path, *, key: str | None = None, index: int = 0) -> np.ndarray:
    """Read a blur kernel from a file and normalise it to sum 1.

    Formats, by suffix:

    * ``.mat``: MATLAB v4-v7 via ``scipy.io.loadmat``, v7.3 (HDF5) via ``h5py``. The variable
      is ``key``; without it, the only numeric array of 2+ dimensions or cell array in the file,
      or among several the one named ``kernel``/``kernels`` (any case).
    * ``.npy`` (one array) and ``.npz`` (variables as for ``.mat``).
    * anything else is decoded as an image (PNG, BMP, TIFF, ...; Pillow): grayscale as stored,
      colour reduced to luma (0.299 R + 0.587 G + 0.114 B); the intensities are the weights.

    A 3-D array is a stack of kernels: the axis whose length differs from the two equal (square
    kernel) sides enumerates them (BSRDM's ``kernels_x2.mat`` is ``11×11×6``: axis 2); if that
    does not decide, MATLAB files stack along the last axis and NumPy files along the first. A
    cell array (KAIR's ``kernels_12.mat``: a ``1×12`` cell; ``Levin09.mat``: v7.3) is indexed in
    MATLAB's linear order. ``index`` picks the kernel (negative counts from the end); a single
    2-D kernel accepts only ``index`` 0 (or -1).

    Args:
        path: the file.
        key: the variable name in a ``.mat`` / ``.npz`` file.
        index: which kernel of a stack or cell array.

    Returns:
        ``(h, w)`` float64 summing to 1. Entries may be negative where the stored kernel is
        (e.g. KAIR's bicubic-equivalent kernels); only the sum must be positive.

    Raises:
        FileNotFoundError: no such file.
        ValueError (the message starts with the path): unreadable or unsupported file, unknown
            ``key`` or no/several candidate arrays (the variables are listed), an array that is
            not 2-D or 3-D, ``index`` out of range, non-finite values, or a sum that is not
            positive.
        ImportError: a v7.3 ``.mat`` file and h5py is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: kernel file not found")
    index = int(index)
    suffix = path.suffix.lower()
    if suffix == ".mat":
        name, value = _pick_variable(path, _read_mat(path), key)
        k = _select(path, name, value, index, matlab_order=True)
    elif suffix in (".npy", ".npz"):
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:  # ValueError, OSError, EOFError, zipfile errors, ...
            raise _fail(path, f"not a readable NumPy file ({type(exc).__name__}: {exc})") from None
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                variables = {n: data[n] for n in data.files}
            name, value = _pick_variable(path, variables, key)
        else:
            if key is not None:
                raise _fail(path, f"key={key!r} given, but a .npy file holds a single array")
            name, value = "", data
        k = _select(path, name, value, index, matlab_order=False)
    else:
        if key is not None:
            raise _fail(path, f"key={key!r} given, but an image file holds a single kernel")
        k = _select(path, "", _read_image_kernel(path), index, matlab_order=False)
    k = np.asarray(k, dtype=np.float64)
    if k.size == 0:
        raise _fail(path, f"the kernel is empty (shape {k.shape})")
    if not np.all(np.isfinite(k)):
        raise _fail(path, "the kernel contains NaN or infinite values")
    total = k.sum()
    if not total > 0:
        raise _fail(path, f"the kernel sums to {total:g}; a blur kernel must have a positive sum")
    return k / total


# --------------------------------------------------------------------------- degradation


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


def _spatial_axes(ndim: int, shape) -> tuple[int, int]:
    if ndim in (2, 3):
        return 0, 1
    if ndim == 4:
        return 1, 2
    raise ValueError(f"expected (H, W), (H, W, C) or (B, H, W, C), got shape {tuple(shape)}")


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Blur each channel with ``kernel``: MZSR's ``filters.correlate(·, kernel)`` (mode
    ``"reflect"``, half-sample symmetric padding; the kernel's origin at index ``size // 2``).

    Args:
        img: ``(H, W)``, ``(H, W, C)`` or a batch ``(B, H, W, C)``; any real dtype, values kept
            in their units (uint8 input is blurred as [0, 255] floats, not rescaled).
        kernel: ``(h, w)`` real array, used as given (not normalised, not flipped).

    Returns:
        float64 array of ``img``'s shape, unrounded and unclipped.

    Raises:
        ValueError: an unsupported image shape, or a kernel that is not a finite 2-D array.
    """
    from scipy import ndimage

    img = np.asarray(img)
    ah, _ = _spatial_axes(img.ndim, img.shape)
    k = _as_kernel(kernel)
    shape = [1] * img.ndim
    shape[ah], shape[ah + 1] = k.shape
    return ndimage.correlate(img.astype(np.float64), k.reshape(shape), mode="reflect")


def degrade(
    hr: np.ndarray,
    kernel: np.ndarray,
    scale: int,
    *,
    subsample: Literal["direct", "bicubic"] = "direct",
    noise_sigma: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``LR = round(subsample(HR ⋆ k, s) + n)``: the ZSSR/MZSR degradation (module docstring).

    Steps: ``blur`` in float64 (reflect padding, correlation); then ``subsample="direct"``:
    ``[::s, ::s]`` (the top-left pixel of each ``s×s`` block), or ``"bicubic"``:
    ``srdistill.sr.imaging.imresize(blurred, 1/s)`` on the unrounded float image (MATLAB bicubic,
    antialiased); then ``+ N(0, noise_sigma²)`` per value if ``noise_sigma > 0``; then round half
    to even and clip to [0, 255]. ``degrade(modcrop(hr, 2), isotropic_gaussian(21, 2.0), 2)``
    reproduces MZSR's g20 Set5 inputs bit for bit.

    Args:
        hr: uint8 ``(H, W)``, ``(H, W, C)`` or a batch ``(B, H, W, C)`` (every image blurred with
            the same kernel; cost is per pixel, so batching saves only Python overhead). Crop
            H and W to multiples of ``scale`` first (``imaging.modcrop``) for the usual
            ``H/s × W/s`` output.
        kernel: ``(h, w)`` blur kernel summing to 1 (the generators here and ``load_kernel``
            return such), used as given.
        scale: integer factor ``s >= 1``.
        subsample: ``"direct"`` or ``"bicubic"``.
        noise_sigma: std of the additive Gaussian noise in [0, 255] grey levels (0: none).
        rng: source of the noise; ``None`` uses a fresh unseeded ``np.random.default_rng()``.
            Not used when ``noise_sigma`` is 0.

    Returns:
        uint8, ``hr``'s layout with H and W replaced by ``ceil(H / s)``, ``ceil(W / s)``.

    Raises:
        TypeError: ``hr`` is not uint8 (``degrade_float`` takes float images).
        ValueError: bad shape, kernel, scale, ``subsample`` or ``noise_sigma``, or an image
            smaller than ``scale``.
    """
    hr = np.asarray(hr)
    if hr.dtype != np.uint8:
        raise TypeError(f"degrade expects a uint8 image, got dtype {hr.dtype} (degrade_float takes floats)")
    x = _degrade(hr, kernel, scale, subsample, noise_sigma, rng)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def degrade_float(
    img: np.ndarray,
    kernel: np.ndarray,
    scale: int,
    *,
    subsample: Literal["direct", "bicubic"] = "direct",
    noise_sigma: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``degrade`` on float images in [0, 1], without the rounding: blur, subsample, noise of
    std ``noise_sigma / 255``, clip to [0, 1]. MZSR (``dataGenerator.py``, ``test.py``) and ZSSR
    (``father_to_son``) keep their LR images as such floats; rounded to uint8 (``round(x *
    255)``) they are ``degrade``'s output.

    Args:
        img: float ``(H, W)``, ``(H, W, C)`` or ``(B, H, W, C)`` in [0, 1].
        kernel, scale, subsample, rng: as ``degrade``.
        noise_sigma: noise std in [0, 255] grey levels, as ``degrade``.

    Returns:
        float64 in [0, 1], ``img``'s layout with H and W replaced by ``ceil(H/s)``, ``ceil(W/s)``.

    Raises:
        TypeError: ``img`` is not a float array.
        ValueError: as ``degrade``.
    """
    img = np.asarray(img)
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"degrade_float expects a float image in [0, 1], got dtype {img.dtype}")
    return np.clip(_degrade(img, kernel, scale, subsample, noise_sigma / 255.0, rng), 0.0, 1.0)


def _degrade(x: np.ndarray, kernel: np.ndarray, scale: int, subsample: str, noise_sigma: float,
             rng: np.random.Generator | None) -> np.ndarray:  # fmt: skip
    """Blur, subsample and add noise (std in ``x``'s units); float64, neither rounded nor clipped."""
    ah, aw = _spatial_axes(x.ndim, x.shape)
    s = _check_scale(scale)
    if subsample not in ("direct", "bicubic"):
        raise ValueError(f"subsample must be 'direct' or 'bicubic', got {subsample!r}")
    noise_sigma = float(noise_sigma)
    if not np.isfinite(noise_sigma) or noise_sigma < 0:
        raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma!r}")
    if min(x.shape[ah], x.shape[aw]) < s:
        raise ValueError(f"image of size {x.shape[ah]}x{x.shape[aw]} is smaller than scale {s}")
    x = blur(x, kernel)
    if subsample == "direct":
        index = [slice(None)] * x.ndim
        index[ah] = index[aw] = slice(None, None, s)
        x = x[tuple(index)]
    elif s > 1:
        from srdistill.sr.imaging import imresize

        x = imresize(x, 1.0 / s, spatial_axes=(ah, aw))
    if noise_sigma > 0:
        rng = np.random.default_rng() if rng is None else rng
        x = x + rng.normal(0.0, noise_sigma, size=x.shape)
    return x
