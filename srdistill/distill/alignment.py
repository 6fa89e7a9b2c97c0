"""Feature-level distribution alignment of the selected set (TripleD step 3).

TripleD (issue 8; only its abstract is public) states that "a lightweight CNN aligns the
selected subset's distribution with the full set's at feature level". This module is our
reading of that sentence, configured by ``config.AlignConfig``:

* ``AlignNet``: a small residual CNN ``x -> clamp(x + f(x), 0, 1)`` whose last convolution is
  zero-initialised, so it starts as the identity and the selected images are only changed as
  far as the loss asks.
* It is trained with Adam on the selected images to minimise::

      L = D(phi(net(x)), Y) + fidelity_weight * mean|net(x) - x|

  where ``phi`` is a frozen, differentiable feature extractor (in the pipeline the ViT of
  ``srdistill.distill.complexity``), ``Y`` a sample of the full corpus' features, and ``D`` either
  the squared MMD (``metrics.feature_mmd2``: Gretton et al., JMLR 2012, eq. 5, a sum of
  Gaussian kernels around a bandwidth fixed once by the median heuristic on ``Y``) or
  ``moment_loss`` (squared distance of the feature means plus of the feature standard
  deviations, the first two moments; cf. moment matching in distribution-matching dataset
  distillation, Zhao & Bilen, WACV 2023). The L1 fidelity term (pixels in [0, 1]) keeps the
  transformed images close to the real ones.
* The trained net is applied to every whole image; the quantised (uint8) results are the
  distilled set (``align_images``; ``align_folder`` for a folder of PNGs).

Reproducibility: the net is initialised under ``torch.manual_seed(cfg.seed)`` in a forked
RNG (the caller's torch RNG state is untouched) and batches are drawn from
``np.random.default_rng(cfg.seed)``, so on CPU two runs with the same inputs and config give
bit-identical images (on CUDA up to cuDNN's non-deterministic convolution kernels).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from srdistill.config import AlignConfig
from srdistill.distill.selection import _png_bytes, _write_atomic
from srdistill.sr import imaging
from srdistill.sr.device import resolve_device, to_tensor
from srdistill.sr.metrics import feature_mmd2, median_bandwidth, psnr

__all__ = ["AlignNet", "moment_loss", "align_images", "align_folder"]

log = logging.getLogger(__name__)

#: ``(N, 3, h, w)`` float32 [0, 1] tensor -> ``(N, D)`` float32 tensor, differentiable in its input.
FeatureFn = Callable[[torch.Tensor], torch.Tensor]

_STD_EPS = 1e-8  # added to the variance in moment_loss: a finite gradient at zero spread


class AlignNet(nn.Module):
    """Residual colour/texture transform ``out = clamp(x + f(x), 0, 1)``.

    ``f`` is ``blocks`` 3x3 convolutions with padding 1 (``3 -> channels``, ``channels ->
    channels`` x ``blocks - 2``, ``channels -> 3``) with a ReLU between consecutive ones and
    none after the last. The last convolution's weight and bias are zero, so at
    initialisation ``f(x) = 0`` exactly and the net is the identity on inputs in [0, 1].
    Fully convolutional: any ``H, W >= 1``.

    Args:
        channels: hidden width, >= 1.
        blocks: number of convolutions, >= 2.

    Raises:
        ValueError: ``channels < 1`` or ``blocks < 2``.

    Shapes:
        input ``(N, 3, H, W)`` float32 in [0, 1]; output the same shape, dtype and range.
    """

    def __init__(self, channels: int = 32, blocks: int = 3):
        super().__init__()
        if channels < 1 or blocks < 2:
            raise ValueError(f"AlignNet needs channels >= 1 and blocks >= 2, got {channels}, {blocks}")
        widths = [3] + [channels] * (blocks - 1) + [3]
        layers: list[nn.Module] = []
        for i in range(blocks):
            if i:
                layers.append(nn.ReLU(inplace=True))
            layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, padding=1))
        last = layers[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.body(x)).clamp(0.0, 1.0)


def moment_loss(x_feat: torch.Tensor, y_feat: torch.Tensor) -> torch.Tensor:
    """Moment matching: ``|mean(x) - mean(y)|^2 + |std(x) - std(y)|^2`` over the feature axis.

    Means and (population, ``ddof=0``) standard deviations are taken per feature dimension
    over the samples; ``std = sqrt(var + 1e-8)`` so the gradient stays finite when a dimension
    has no spread (e.g. a single sample). Differentiable in ``x_feat``.

    Args:
        x_feat: ``(n, d)`` float tensor, n >= 1 (e.g. features of the transformed batch).
        y_feat: ``(m, d)`` float tensor, m >= 1 (the reference, e.g. corpus features).

    Returns:
        A scalar float32 tensor >= 0, in squared feature units.

    Raises:
        ValueError: not 2-D, empty, or different feature dimensions.
    """
    if x_feat.ndim != 2 or y_feat.ndim != 2 or x_feat.shape[1] != y_feat.shape[1] \
            or not len(x_feat) or not len(y_feat):  # fmt: skip
        raise ValueError(
            f"moment_loss needs (n, d) and (m, d) features, got {tuple(x_feat.shape)} and {tuple(y_feat.shape)}"
        )
    x, y = x_feat.float(), y_feat.float()

    def std(a: torch.Tensor) -> torch.Tensor:
        return (a.var(dim=0, unbiased=False) + _STD_EPS).sqrt()

    return (x.mean(0) - y.mean(0)).pow(2).sum() + (std(x) - std(y)).pow(2).sum()


def _check_images(images: list[np.ndarray], crop: int | None) -> None:
    if not len(images):
        raise ValueError("align_images: no images")
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ValueError(f"align_images: image {i} must be (H, W, 3) uint8, got {desc}")
        if crop is not None and min(img.shape[:2]) < crop:
            raise ValueError(
                f"align_images: image {i} of size {img.shape[1]}x{img.shape[0]} (WxH) is smaller "
                f"than align.crop={crop}"
            )
    if crop is None:
        sizes = sorted({img.shape[:2] for img in images})
        if len(sizes) > 1:
            raise ValueError(
                f"align_images: with align.crop=None all images must share one size, got "
                f"{len(sizes)} sizes (HxW), e.g. {sizes[:3]}; set align.crop"
            )


def _sample(images: list[np.ndarray], rng: np.random.Generator, batch_size: int, crop: int | None) -> np.ndarray:
    """One training batch, ``(B, h, w, 3)`` uint8: ``batch_size`` random crops of side ``crop``
    (uniform image, uniform position), or (``crop=None``) ``min(batch_size, n)`` whole images
    drawn without replacement."""
    if crop is None:
        idx = rng.choice(len(images), size=min(batch_size, len(images)), replace=False)
        return np.stack([images[i] for i in idx])
    crops = []
    for _ in range(batch_size):
        img = images[rng.integers(len(images))]
        y = rng.integers(img.shape[0] - crop + 1)
        x = rng.integers(img.shape[1] - crop + 1)
        crops.append(img[y : y + crop, x : x + crop])
    return np.stack(crops)


@torch.no_grad()
def _features(images: list[np.ndarray], feature_fn: FeatureFn, device: torch.device, batch_size: int) -> torch.Tensor:
    """``(n, D)`` float32 features of whole images, in input order; images of one size are
    batched ``batch_size`` at a time to bound memory."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for idx in by_shape.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            feats = feature_fn(to_tensor(np.stack([images[i] for i in chunk]), device)).float()
            for i, f in zip(chunk, feats):
                out[i] = f
    return torch.stack(out)  # type: ignore[arg-type]


def align_images(
    images: list[np.ndarray],
    target_features: np.ndarray,
    feature_fn: FeatureFn,
    cfg: AlignConfig,
) -> tuple[list[np.ndarray], dict]:
    """Train an ``AlignNet`` so the images' features match ``target_features``; apply it.

    Training: ``cfg.iterations`` Adam steps (lr ``cfg.lr``) on
    ``D(feature_fn(net(x)), target) + cfg.fidelity_weight * mean|net(x) - x|`` where ``D`` is
    ``metrics.feature_mmd2`` with a bandwidth fixed once by ``metrics.median_bandwidth`` on the
    target (``cfg.loss == "mmd"``) or ``moment_loss`` (``"moments"``). Each step's ``x`` is
    ``cfg.batch_size`` random ``cfg.crop``-side crops (uniform image, uniform position), or
    with ``cfg.crop=None`` ``min(cfg.batch_size, len(images))`` whole images drawn without
    replacement. Then the net is applied to every whole image (no grad, one at a time) and the
    result is rounded to uint8. ``cfg.enabled`` and ``cfg.corpus_features`` are the caller's
    business (whether to run, how many corpus features to sample) and are not read here.

    Args:
        images: the selected set, ``(H_i, W_i, 3)`` uint8 RGB; sizes may differ when
            ``cfg.crop`` is set (each side >= ``cfg.crop``), and must all be equal otherwise.
        target_features: ``(M, D)`` float (cast to float32) numpy array, M >= 2: a sample of
            the full corpus' features from the same ``feature_fn``.
        feature_fn: ``(N, 3, h, w)`` float32 [0, 1] tensor on the resolved ``cfg.device`` ->
            ``(N, D)`` float32 tensor, differentiable in its input, deterministic (a frozen
            network in eval mode; its parameters are not optimised). Called on training
            batches (``h = w = cfg.crop``, or the common size) and on whole images.
        cfg: ``AlignConfig``; ``cfg.device`` is resolved by ``device.resolve_device``.

    Returns:
        ``(aligned, report)``: ``aligned[i]`` is ``images[i]`` transformed, same shape, uint8;
        ``report`` has

        * ``iterations``: ``cfg.iterations``;
        * ``loss``: total loss ``L`` of the last step (float);
        * ``mmd_before`` / ``mmd_after``: ``feature_mmd2`` (same fixed bandwidth) between the
          whole-image features of all original / aligned (uint8) images and the target;
        * ``fidelity_l1``: mean absolute pixel difference between aligned and original over
          all pixels and channels of all images, divided by 255 (in [0, 1]);
        * ``psnr_to_original``: RGB PSNR (dB, peak 255) of each aligned image against its
          original, averaged over images (``inf`` if every image is unchanged);
        * ``bandwidth``: the fixed kernel bandwidth (feature units); ``images``: the count;
        * ``seconds``: wall time of the call.

    Raises:
        ValueError: no images, an image not ``(H, W, 3)`` uint8, an image smaller than
            ``cfg.crop`` (named by index), mixed sizes with ``cfg.crop=None``, a malformed or
            non-finite ``target_features``, or a feature dimension that differs from
            ``feature_fn``'s.
        RuntimeError: ``cfg.device == "cuda"`` without CUDA.
        FloatingPointError: the loss became non-finite (e.g. ``feature_fn`` gave NaN).
    """
    t0 = time.perf_counter()
    _check_images(images, cfg.crop)
    target_np = np.asarray(target_features, dtype=np.float32)
    if target_np.ndim != 2 or target_np.shape[0] < 2 or target_np.shape[1] < 1:
        raise ValueError(f"align_images: target_features must be (M, D) with M >= 2, got {target_np.shape}")
    if not np.isfinite(target_np).all():
        raise ValueError("align_images: target_features has non-finite values")
    device = resolve_device(cfg.device)
    target = torch.from_numpy(target_np).to(device)
    bandwidth = median_bandwidth(target)

    def distance(feats: torch.Tensor) -> torch.Tensor:
        if cfg.loss == "mmd":
            return feature_mmd2(feats, target, bandwidth=bandwidth)
        return moment_loss(feats, target)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = AlignNet(cfg.channels, cfg.blocks)  # built on CPU: the same init on every device
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)

    feats_before = _features(images, feature_fn, device, cfg.batch_size)
    if feats_before.shape[1] != target.shape[1]:
        raise ValueError(
            f"align_images: feature_fn gives {feats_before.shape[1]}-d features but "
            f"target_features are {target.shape[1]}-d"
        )
    mmd_before = float(feature_mmd2(feats_before, target, bandwidth=bandwidth))

    loss_value = float("nan")
    for step in range(cfg.iterations):
        x = to_tensor(_sample(images, rng, cfg.batch_size, cfg.crop), device)
        y = net(x)
        d = distance(feature_fn(y).float())
        fid = F.l1_loss(y, x)
        loss = d + cfg.fidelity_weight * fid
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"align_images: non-finite loss at step {step}")
        if log.isEnabledFor(logging.DEBUG) and (step % 50 == 0 or step == cfg.iterations - 1):
            log.debug("align step %d: loss %.5f (D %.5f, L1 %.5f)",
                      step, loss_value, float(d.detach()), float(fid.detach()))

    net.eval()
    aligned: list[np.ndarray] = []
    with torch.no_grad():
        for img in images:
            out = net(to_tensor(img, device))[0].permute(1, 2, 0)
            aligned.append((out * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy())

    feats_after = _features(aligned, feature_fn, device, cfg.batch_size)
    mmd_after = float(feature_mmd2(feats_after, target, bandwidth=bandwidth))
    abs_sum = sum(float(np.abs(a.astype(np.int16) - b).sum()) for a, b in zip(aligned, images))
    n_values = sum(img.size for img in images)
    report = {
        "iterations": cfg.iterations,
        "loss": loss_value,
        "mmd_before": mmd_before,
        "mmd_after": mmd_after,
        "fidelity_l1": abs_sum / n_values / 255.0,
        "psnr_to_original": float(np.mean([psnr(a, b) for a, b in zip(aligned, images)])),
        "bandwidth": bandwidth,
        "images": len(images),
        "seconds": time.perf_counter() - t0,
    }
    log.info(
        "aligned %d images (%s): MMD^2 %.4f -> %.4f, PSNR to original %.2f dB",
        len(images), cfg.loss, mmd_before, mmd_after, report["psnr_to_original"],
    )  # fmt: skip
    return aligned, report


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan (e.g. psnr_to_original of unchanged images)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def align_folder(
    in_dir: str | Path,
    out_dir: str | Path,
    target_features: np.ndarray,
    feature_fn: FeatureFn,
    cfg: AlignConfig,
) -> dict:
    """Align every ``*.png`` of ``in_dir`` (sorted by name) and write them to ``out_dir``.

    Each aligned image is written under its input name (PNG, ``(H, W, 3)`` uint8 RGB, same
    size), through a temporary file and a rename (``selection._write_atomic``). PNGs already in
    ``out_dir`` that are not in ``in_dir`` are removed, so ``out_dir`` holds exactly the aligned
    set. ``in_dir/provenance.csv`` is copied if present. ``out_dir/align.json`` holds the report
    plus ``"config"`` (``cfg.model_dump()``); non-finite numbers are written as ``null``.
    No caching: every call retrains (idempotence is the pipeline's business).

    Args:
        in_dir: folder of the selected PNGs (e.g. ``selection.export_distilled``'s output).
        out_dir: output folder, created if missing; must differ from ``in_dir``.
        target_features, feature_fn, cfg: as ``align_images``.

    Returns:
        ``align_images``' report.

    Raises:
        ValueError: ``in_dir`` has no PNG, ``out_dir`` is ``in_dir``, or as ``align_images``.
        imaging.ImageReadError: a PNG cannot be read.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    paths = sorted(in_dir.glob("*.png"))
    if not paths:
        raise ValueError(f"align_folder: no *.png in {in_dir}")
    if out_dir.exists() and out_dir.resolve() == in_dir.resolve():
        raise ValueError(f"align_folder: out_dir must differ from in_dir ({in_dir})")
    images = [imaging.read_image(p) for p in paths]
    aligned, report = align_images(images, target_features, feature_fn, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, img in zip(paths, aligned):
        _write_atomic(out_dir / path.name, _png_bytes(img))
    names = {p.name for p in paths}
    for path in out_dir.glob("*.png"):
        if path.name not in names:
            path.unlink()
    provenance = in_dir / "provenance.csv"
    if provenance.is_file():
        _write_atomic(out_dir / "provenance.csv", provenance.read_bytes())
    payload = _json_safe({**report, "config": cfg.model_dump(mode="json")})
    _write_atomic(out_dir / "align.json", (json.dumps(payload, indent=2) + "\n").encode())
    return report
