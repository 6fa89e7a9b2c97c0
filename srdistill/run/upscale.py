"""Super-resolve images: load an upscaler (as ``srdistill eval`` does), run it in tiles, write PNGs.

    srdistill upscale photo.jpg shots/ s3://bucket/lr/ --model runs/demo/train/model.safetensors --scale 2 --out sr/
    srdistill upscale big.png --model edsr-baseline --weights EDSR_baseline_x2.pt --scale 2 --out sr/ --half

* ``load_upscaler``: ``bicubic`` (MATLAB's, ``imaging.imresize``), ``zssr``, an srdistill
  checkpoint (a meta-trained MZSR one adapts to each image with ``adapt_steps``), or an
  architecture of ``srdistill.sr.models.ARCHS`` with officially released weights (EDSR, RCAN,
  SwinIR). ``srdistill eval`` loads its models with it too.
* ``upscale_image``: one ``(h, w, 3)`` uint8 image in tiles of bounded size.
* ``list_inputs`` / ``upscale_files``: files, folders and ``s3://`` prefixes in; one PNG per
  image out, named after it; an unreadable image is skipped and reported.

Tiling. The LR image is cut into a grid of cores of ``tile x tile`` pixels (the last row and
column smaller). Each core is run inside a window ``overlap`` pixels wider on every side,
clamped inside the image, so every window of an image has one size and windows batch together;
only the core's part of each window's output is kept. If every output pixel of the network
depends only on the LR pixels within ``R`` of it (its receptive-field radius: zero-padded
convolutions, bicubic upsampling within 2 px), an ``overlap >= R`` gives exactly the
whole-image output, up to the float rounding of the convolution algorithms: each kept pixel sees
the same inputs, and at the image border the same padding. ``receptive_radius`` bounds ``R``
from the layers, and the default overlap is that bound (EDSR-baseline 36, ESPCN 4, MZSR x2 6,
bicubic 2). RCAN (its channel attention averages every feature map over the whole input) and
SwinIR (window attention on a grid anchored at the input's corner, mirror padding to multiples
of the window) have no finite ``R``: tiles approximate their whole-image output (default overlap
32; for SwinIR keep tile and overlap multiples of its window, 8, as the defaults are, so that
most windows see the whole image's attention windows), ``tile=0`` is exact. MZSR adapts to
the whole image (its test-time training, memory growing with the image), then super-resolves
in tiles. ZSSR trains on and runs the whole image.

Memory: the LR image, the uint8 output and one batch of windows with the network's activations;
never the whole image through the network (unless it fits in one tile).

No Ray here.
"""

from __future__ import annotations

import math
import os
import posixpath
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union
from urllib.parse import urlsplit

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import nn
from tqdm.auto import tqdm

from srdistill import storage
from srdistill.sr import imaging
from srdistill.sr.device import resolve_device, to_tensor
from srdistill.sr.evaluation import IMAGE_EXTENSIONS
from srdistill.sr.models import ARCHS, ESPCN, RCAN, MZSRNet, SwinIR

__all__ = [
    "MZSRAdaptation",
    "load_upscaler",
    "receptive_radius",
    "upscale_image",
    "list_inputs",
    "upscale_files",
    "UpscaleReport",
]

#: Overlap for networks without a finite receptive field (RCAN, SwinIR): tiles approximate.
APPROXIMATE_OVERLAP = 32


@dataclass
class MZSRAdaptation:
    """A meta-trained MZSR network with MZSR's per-image test-time adaptation (arXiv
    2002.12213): ``steps`` gradient steps on the image's own pair (its son made with
    ``kernel``), learning rates ``lr``, then ``mzsr.super_resolve``.

    Called on an ``(h, w, 3)`` uint8 LR image it returns ``(s*h, s*w, 3)`` uint8 (what
    ``evaluation.evaluate`` runs); ``adapt`` returns the adapted network only, for tiling.
    """

    net: MZSRNet
    kernel: np.ndarray | None
    scale: int
    steps: int
    lr: tuple[float, ...]
    subsample: Literal["direct", "bicubic"] = "direct"

    def adapt(self, lr_image: np.ndarray) -> MZSRNet:
        """The network adapted to ``lr_image`` (``(h, w, 3)`` uint8): an adapted copy, or the
        network itself for 0 steps. Raises ValueError as ``mzsr.adapt``."""
        from srdistill.zeroshot import mzsr

        if not self.steps:
            return self.net
        return mzsr.adapt(self.net, lr_image, self.kernel, self.scale, steps=self.steps, lr=self.lr,
                          subsample=self.subsample)  # fmt: skip

    def __call__(self, lr_image: np.ndarray) -> np.ndarray:
        from srdistill.zeroshot import mzsr

        return mzsr.super_resolve(self.adapt(lr_image), lr_image, self.scale)


#: What ``load_upscaler`` returns and ``evaluation.evaluate`` takes: ``"bicubic"``, a network
#: ``(B, 3, h, w)`` float32 [0, 1] -> ``(B, 3, s*h, s*w)``, or a per-image function ``(h, w, 3)``
#: uint8 -> ``(s*h, s*w, 3)`` uint8 (``MZSRAdaptation``, ZSSR).
Model = Union[Literal["bicubic"], nn.Module, Callable[[np.ndarray], np.ndarray]]


def _zssr_upscaler(kernel: np.ndarray, scale: int, iterations: int, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """Per image: ZSSR from scratch (``mzsr.zssr``, ZSSR's default settings), seed 0."""
    from srdistill.config import MZSRConfig
    from srdistill.zeroshot import mzsr

    cfg = MZSRConfig(scale=scale, zssr_iterations=iterations, device=device)
    return lambda lr: mzsr.zssr(lr, kernel, scale, cfg, seed=0)[0]


def _weights_name(weights: str) -> str:
    from srdistill.weights import is_url

    return Path(urlsplit(weights).path if is_url(weights) else weights).name


def load_upscaler(
    model: str,
    scale: int,
    *,
    weights: str | None = None,
    kernel: np.ndarray | None = None,
    adapt_steps: int = 0,
    zssr_iterations: int = 3000,
    device: str = "auto",
    subsample: Literal["direct", "bicubic"] | None = "direct",
) -> tuple[Model, str]:
    """The upscaler ``--model``/``--weights`` name, and its label for tables.

    Args:
        model: ``"bicubic"`` (MATLAB-exact); ``"zssr"`` (needs ``kernel``); an srdistill
            ``.safetensors`` checkpoint (its recorded scale must be ``scale``; a meta-trained
            MZSR one, i.e. with its ``mzsr_config``, becomes an ``MZSRAdaptation``); or, with
            ``weights``, a key of ``srdistill.sr.models.ARCHS``.
        scale: SR factor.
        weights: officially released weights of ``model``: a file or an http(s) URL, optionally
            ``URL#sha256=HEX`` (``weights.fetch_weights``: downloaded once into the cache).
        kernel: ``(k, k)`` blur kernel of the LR images, for MZSR's adaptation and ZSSR.
        adapt_steps: MZSR test-time adaptation steps per image (needs a meta-trained MZSR
            checkpoint and ``kernel``).
        zssr_iterations: at most this many ZSSR steps per image.
        device: ``auto``/``cpu``/``cuda``: where networks are put.
        subsample: how MZSR's sons are subsampled: ``direct`` (as ``eval --kernel`` makes its
            LR), ``bicubic``, or None for the checkpoint's MZSR config.

    Returns:
        ``(model, label)``: ``"bicubic"``, an ``nn.Module`` in eval mode on ``device``, or a
        per-image function (see ``Model``); e.g. ``"edsr-baseline (model.safetensors)"``.

    Raises:
        FileNotFoundError: no such checkpoint or weights file.
        OSError: downloading ``weights`` failed.
        ValueError: an unknown model, a scale other than the checkpoint's or one the network
            does not support, weights that do not match, or options that do not go together
            (``adapt_steps`` without a meta-trained MZSR checkpoint or ``kernel``, ``zssr``
            without ``kernel``).
        RuntimeError: ``device="cuda"`` without CUDA.
    """
    from srdistill.sr.training import load_checkpoint, load_released_weights
    from srdistill.weights import fetch_weights

    if adapt_steps and (weights is not None or model in ("bicubic", "zssr")):
        raise ValueError(f"--adapt-steps needs a meta-trained MZSR checkpoint as --model, not {model!r}"
                         f"{' with --weights' if weights is not None else ''}")  # fmt: skip
    if weights is not None:
        if model not in ARCHS:
            raise ValueError(f"--model {model!r} with --weights must be a network name: one of {', '.join(ARCHS)}")
        try:
            net = load_released_weights(model, scale, fetch_weights(weights))
        except ValueError as exc:  # load_state_dict's report is a line per key: keep the first
            lines = str(exc).splitlines()
            if len(lines) < 2:
                raise
            detail = lines[1].strip()
            detail = detail if len(detail) <= 200 else detail[:200] + " ..."
            raise ValueError(f"{lines[0].split(': Error(s)')[0]}: {detail} (weights of another scale or "
                             "network?)") from None  # fmt: skip
        return net.to(resolve_device(device)).eval(), f"{model} ({_weights_name(weights)})"
    if model == "bicubic":
        return "bicubic", "bicubic"
    if model == "zssr":
        if kernel is None:
            raise ValueError("--model zssr needs --kernel (ZSSR trains on the image's own blur)")
        return _zssr_upscaler(kernel, scale, zssr_iterations, device), f"ZSSR (<= {zssr_iterations} steps)"
    if model in ARCHS and not Path(model).exists():
        raise ValueError(f"--model {model!r} is a network name: give its released weights with --weights "
                         "(a file or URL), or an srdistill checkpoint as --model")  # fmt: skip
    if not Path(model).exists():
        raise FileNotFoundError(f"--model {model!r} is not 'bicubic', 'zssr', an existing checkpoint file or "
                                f"(with --weights) a network name ({', '.join(ARCHS)})")  # fmt: skip
    net, meta = load_checkpoint(model)
    name = Path(model).name
    if int(meta.get("scale", scale)) != scale:
        raise ValueError(f"checkpoint {model!r} is for x{meta['scale']}, not --scale {scale}")
    net = net.to(resolve_device(device)).eval()
    if "mzsr_config" in meta:  # meta-trained: MZSR's input convention, optional adaptation
        from srdistill.config import MZSRConfig

        if adapt_steps and kernel is None:
            raise ValueError("--adapt-steps needs --kernel (the son is made with the image's blur)")
        cfg = MZSRConfig.model_validate(meta["mzsr_config"])
        adaptation = MZSRAdaptation(net, kernel, scale, adapt_steps, tuple(cfg.adapt_lr), subsample or cfg.subsample)
        return adaptation, f"MZSR({adapt_steps}) ({name})"
    if adapt_steps:  # never ignored silently: only a meta-trained MZSR model adapts
        raise ValueError(f"--adapt-steps needs a meta-trained MZSR checkpoint; {model!r} is a {meta['arch']} "
                         "checkpoint without an MZSR config (`srdistill mzsr train` or `srdistill mzsr import-tf` "
                         "of a meta-trained model writes one)")  # fmt: skip
    return net, f"{meta.get('arch', 'model')} ({name})"


def receptive_radius(model: Model) -> int | None:
    """A bound on the receptive-field radius of ``model`` in LR pixels: output pixels depend
    only on LR pixels within this distance (the overlap that makes tiles exact). None where
    there is none (RCAN, SwinIR, per-image functions other than MZSR's adaptation).

    The convolutions are summed in module order (an upper bound: residual branches run in
    parallel), each ``(k // 2) * dilation`` pixels at the resolution it runs at
    (``PixelShuffle`` multiplies it; MZSR's run at ``scale``), plus bicubic upsampling's 2 px
    where it comes first (``bicubic``, MZSR); ESPCN's bicubic residual runs beside its
    convolutions. EDSR-baseline x2: 1 + 32 + 1 + 1 + 1/2 -> 36; ESPCN: 4; MZSR x2: 2 + 8/2 = 6.
    """
    if isinstance(model, MZSRAdaptation):
        model = model.net
    if isinstance(model, str):
        return 2
    if not isinstance(model, nn.Module) or isinstance(model, (RCAN, SwinIR)):
        return None
    first = isinstance(model, MZSRNet)
    radius, factor = (2.0, model.scale) if first else (0.0, 1)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            radius += (m.kernel_size[0] // 2) * m.dilation[0] / factor
        elif isinstance(m, nn.PixelShuffle):
            factor *= m.upscale_factor
    if isinstance(model, ESPCN):
        radius = max(radius, 2.0)
    return math.ceil(radius - 1e-9)


def _windows(n: int, tile: int, overlap: int) -> tuple[list[tuple[int, int, int]], int]:
    """Tiles along an axis of ``n`` pixels: ``([(core start, core end, window start), ...],
    window length)``. Cores of ``tile`` (the last smaller) cover ``0..n``; each window has
    length ``min(n, tile + 2 * overlap)`` and reaches ``overlap`` past its core on each side,
    or to the image's edge."""
    if tile <= 0 or tile >= n:
        return [(0, n, 0)], n
    win = min(n, tile + 2 * overlap)
    return [(c, min(c + tile, n), min(max(c - overlap, 0), n - win)) for c in range(0, n, tile)], win


def _device(model: Model) -> torch.device | None:
    """The device of a network (an ``MZSRAdaptation``'s too), else None."""
    net = model.net if isinstance(model, MZSRAdaptation) else model
    return next(net.parameters()).device if isinstance(net, nn.Module) else None


def _check(model: Model, tile: int, overlap: int | None, batch: int, half: bool) -> None:
    """ValueError for a negative tile/overlap, a batch < 1, or ``half`` without a network on CUDA."""
    if tile < 0 or (overlap is not None and overlap < 0) or batch < 1:
        raise ValueError(f"--tile {tile} and --tile-overlap {overlap} must be >= 0, the batch {batch} >= 1")
    device = _device(model)
    if half and (device is None or device.type != "cuda"):
        where = "no network" if device is None else f"the network on {device.type}"
        raise ValueError(f"--half needs a network on CUDA (float16 autocast), not {where}")


def _network_fn(net: nn.Module, half: bool) -> Callable[[np.ndarray], np.ndarray]:
    """``(B, h, w, 3)`` uint8 -> ``(B, s*h, s*w, 3)`` uint8 through ``net`` on its device: clamp
    to [0, 1], ``round(255 x)``, as ``evaluation.evaluate``; with ``half`` under float16 autocast."""
    device = next(net.parameters()).device

    @torch.no_grad()
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.autocast(device.type, dtype=torch.float16, enabled=half):
            sr = net(to_tensor(batch, device))  # (B, 3, s*h, s*w)
        sr = (sr.float().clamp(0, 1) * 255).round().byte()
        return sr.permute(0, 2, 3, 1).cpu().numpy()

    return run


def upscale_image(
    model: Model,
    lr: np.ndarray,
    scale: int,
    *,
    tile: int = 256,
    overlap: int | None = None,
    batch: int = 4,
    half: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """Super-resolve one image, in tiles (see the module header for when tiles are exact).

    Args:
        model: what ``load_upscaler`` returns. A network runs on its device in eval mode; an
            ``MZSRAdaptation`` adapts to the whole image first; another function (ZSSR) is
            called on the whole image.
        lr: ``(h, w, 3)`` uint8 RGB.
        scale: SR factor (the model's).
        tile: core side in LR pixels; 0 = the whole image in one pass.
        overlap: LR pixels of context around each core; None = ``receptive_radius(model)``
            (exact tiles), or ``APPROXIMATE_OVERLAP`` where that is None.
        batch: windows per forward pass.
        half: float16 autocast (CUDA only).
        progress: a tqdm bar over the tiles on stderr (when there is more than one batch).

    Returns:
        ``(scale*h, scale*w, 3)`` uint8: bicubic as ``imaging.imresize``, a network's output
        clamped to [0, 1] and rounded, as ``evaluation.evaluate`` scores it.

    Raises:
        ValueError: ``--half`` without CUDA, a negative tile/overlap, or what the upscaler
            raises for the image (e.g. MZSR: too small to adapt on).
    """
    _check(model, tile, overlap, batch, half)
    if isinstance(model, MZSRAdaptation):
        model = model.adapt(lr)
    if isinstance(model, str):
        fn = lambda b: imaging.imresize(b, scale, spatial_axes=(1, 2))  # noqa: E731
    elif isinstance(model, nn.Module):
        model.eval()
        fn = _network_fn(model, half)
    else:
        return model(lr)
    if overlap is None:
        overlap = receptive_radius(model) or APPROXIMATE_OVERLAP
    h, w = lr.shape[:2]
    rows, wh = _windows(h, tile, overlap)
    cols, ww = _windows(w, tile, overlap)
    jobs = [(r, c) for r in rows for c in cols]
    s = scale
    out = np.empty((s * h, s * w, 3), np.uint8)
    with tqdm(total=len(jobs), unit="tile", leave=False, file=sys.stderr,
              disable=not progress or len(jobs) <= batch) as bar:  # fmt: skip
        for i in range(0, len(jobs), batch):
            part = jobs[i : i + batch]
            windows = np.stack([lr[y : y + wh, x : x + ww] for (_, _, y), (_, _, x) in part])  # (B, wh, ww, 3)
            sr = fn(windows)  # (B, s*wh, s*ww, 3) uint8
            for k, ((y0, y1, y), (x0, x1, x)) in enumerate(part):
                out[s * y0 : s * y1, s * x0 : s * x1] = sr[k, s * (y0 - y) : s * (y1 - y), s * (x0 - x) : s * (x1 - x)]
            bar.update(len(part))
    return out


def _kind(uri: str) -> pafs.FileType:
    fs, path = storage.filesystem(uri)
    with storage.errors("stat", uri):
        return fs.get_file_info(path).type


def list_inputs(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """Every image to upscale, with the relative name of its output.

    A file (local, or an ``s3://`` object) is taken whatever its name, its output named
    ``STEM.png``; a folder or ``s3://`` prefix is listed recursively (``storage.list_files``,
    names ending in ``IMAGE_EXTENSIONS``), each output ``SUB/DIRS/STEM.png`` as below it.

    Returns:
        ``[(uri, output name), ...]`` in the order given, each folder's files sorted.

    Raises:
        FileNotFoundError: an input does not exist, or a folder/prefix holds no image.
        ValueError: two images would be written to the same output name (both named).
        OSError: listing failed.
    """
    items: list[tuple[str, str]] = []
    for uri in inputs:
        kind = _kind(uri)
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input {uri!r} does not exist")
        if kind == pafs.FileType.File:
            items.append((uri, Path(uri).stem + ".png"))
            continue
        files = storage.list_files(uri, IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"input {uri!r} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        root = storage.filesystem(uri)[1]
        for f in files:
            rel = posixpath.relpath(storage.filesystem(f)[1], root) if storage.is_s3(f) else os.path.relpath(f, root)
            items.append((f, str(Path(rel).with_suffix(".png"))))
    seen: dict[str, str] = {}
    for uri, name in items:
        if name in seen:
            raise ValueError(f"{seen[name]} and {uri} would both be written as {name!r}: upscale them separately")
        seen[name] = uri
    return items


@dataclass
class UpscaleReport:
    """What ``upscale_files`` did: ``written`` output paths, ``skipped`` ``(input, reason)``."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def upscale_files(
    model: Model,
    inputs: Sequence[str],
    out_dir: str | Path,
    scale: int,
    *,
    tile: int = 256,
    overlap: int | None = None,
    batch: int = 4,
    half: bool = False,
    progress: bool = True,
) -> UpscaleReport:
    """Upscale every image of ``inputs`` (``list_inputs``) into ``out_dir`` as PNG.

    Each image is read (``imaging.read_image``: 8/16-bit, grey, palette, alpha dropped, EXIF
    rotation applied), super-resolved by ``upscale_image`` and written atomically to
    ``out_dir/NAME.png``; an existing output is replaced. An image that cannot be read or
    upscaled (``ValueError``, e.g. corrupt, or too small for MZSR's adaptation) is skipped,
    reported on stderr and in the report; other images go on. A tqdm bar over the images (and
    over the tiles of a large one) on stderr with ``progress``.

    Raises:
        FileNotFoundError, ValueError: bad inputs (``list_inputs``), or an output that would
            overwrite an input (checked before anything is written).
        OSError: S3 failed after its retries, or writing failed.
    """
    _check(model, tile, overlap, batch, half)
    items = list_inputs(inputs)
    out_dir = Path(out_dir)
    sources = {os.path.realpath(uri) for uri, _ in items if not storage.is_s3(uri)}
    for uri, name in items:
        if os.path.realpath(out_dir / name) in sources:
            raise ValueError(f"--out {str(out_dir)!r}: {name} would overwrite an input ({uri}); give another --out")
    if overlap is None and isinstance(model, nn.Module) and receptive_radius(model) is None and tile:
        tqdm.write(f"note: {type(model).__name__} has no finite receptive field: tiles of {tile} px approximate "
                   "its whole-image output (--tile 0 for exact)", file=sys.stderr)  # fmt: skip
    report = UpscaleReport()
    for uri, name in tqdm(items, unit="image", file=sys.stderr, disable=not progress):
        try:
            lr = imaging.read_image(imaging.fetch(uri))
            sr = upscale_image(model, lr, scale, tile=tile, overlap=overlap, batch=batch, half=half,
                               progress=progress)  # fmt: skip
        except ValueError as exc:  # ImageReadError is a ValueError
            reason = exc.reason if isinstance(exc, imaging.ImageReadError) else str(exc)
            report.skipped.append((uri, reason))
            tqdm.write(f"skipped {uri}: {reason}", file=sys.stderr)
            continue
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        imaging.write_png(path, sr)
        report.written.append(path)
    return report
