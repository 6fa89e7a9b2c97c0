"""MZSR at test time: a few SGD steps on the LR image's own son (``son_pair``, ``adapt``), then
super-resolution of the LR image (``super_resolve``, optionally a dihedral self-ensemble);
``zero_shot`` does both.
"""

from __future__ import annotations

import copy
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from srdistill.sr import degradation, imaging
from srdistill.sr.models.mzsr import MZSRNet
from srdistill.zeroshot.mzsr.inputs import (Tensor, _check_image, _check_kernel, _hwc, _nchw, _to_uint8, dihedral,
                                            undo_dihedral, upsample)

__all__ = [
    "adapt",
    "son_pair",
    "super_resolve",
    "zero_shot",
]


def son_pair(
    lr_image: np.ndarray,
    kernel: np.ndarray,
    scale: int,
    *,
    subsample: Literal["direct", "bicubic"] = "direct",
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """MZSR's test-time training pair of an LR image: (upsampled I_son, LR).

    The LR image, cropped to multiples of ``scale`` (``imaging.modcrop``) and as floats, is the
    "father"; ``I_son = degrade(father, kernel, scale)`` (floats, no rounding, as MZSR
    ``test.py``) and the input is ``I_son`` upsampled back to the father's size (``upsample``).

    Args:
        lr_image: ``(h, w, 3)`` uint8, at least ``2*scale`` on both sides.
        kernel: ``(kh, kw)`` blur kernel of the LR image (its degradation).
        scale: SR factor.
        subsample: ``degrade``'s subsampling (``direct`` for the g20 protocol).
        device: where the tensors go.

    Returns:
        ``(input, target)``: both ``(1, 3, h', w')`` float32, ``h' = h - h % scale``; target in
        [0, 1], input about [0, 1].

    Raises:
        ValueError: not an ``(h, w, 3)`` uint8 image, too small, or a bad kernel.
    """
    img = _check_image(lr_image, "lr_image", 2 * scale)
    k = _check_kernel(kernel)
    father = imaging.modcrop(img, scale) / 255.0  # (h', w', 3) float64
    son = degradation.degrade_float(father, k, scale, subsample=subsample)  # (h'/s, w'/s, 3)
    inp = upsample(son, output_shape=father.shape[:2])
    return _nchw(inp, device), _nchw(father, device)


def _lr_schedule(lr: float | Sequence[float], steps: int) -> list[float]:
    """Per-step learning rates: a constant, or a sequence whose last value repeats."""
    seq = [float(lr)] if np.isscalar(lr) else [float(v) for v in lr]
    if not seq or min(seq) <= 0:
        raise ValueError(f"lr must be positive (a float or a non-empty sequence), got {lr!r}")
    return [seq[min(i, len(seq) - 1)] for i in range(steps)]


def adapt(
    model: MZSRNet,
    lr_image: np.ndarray,
    kernel: np.ndarray,
    scale: int,
    *,
    steps: int,
    lr: float | Sequence[float],
    subsample: Literal["direct", "bicubic"] = "direct",
) -> MZSRNet:
    """MZSR's meta-test: ``steps`` plain gradient-descent steps on the image's own pair.

    The loss is ``L1(model.forward_upsampled(input), target)`` on the whole image's
    ``son_pair`` (MZSR ``test.py`` trains on the whole LR image, batch 1; memory grows with the
    image: about ``n_feats * 4 * h * w`` bytes per layer kept for the backward). Step ``i``
    uses ``lr[i]`` (the last value repeating; ``MZSRConfig.adapt_lr`` is MZSR's schedule for
    its direct x2 model). The pair has no randomness, so the result is deterministic.

    Args:
        model: the meta-trained ``MZSRNet`` (not modified).
        lr_image: ``(h, w, 3)`` uint8 test image.
        kernel: its blur kernel (known or estimated), ``(kh, kw)``.
        scale: SR factor (the model's).
        steps: gradient steps (MZSR(1): 1, MZSR(10): 10); 0 returns an unadapted copy.
        lr: learning rate, or one per step.
        subsample: how the son is subsampled (as the LR was made).

    Returns:
        An adapted deep copy of ``model``, in eval mode, on the model's device.

    Raises:
        ValueError: a bad image, kernel, lr or steps, or a scale different from the model's.
    """
    if scale != model.scale:
        raise ValueError(f"scale {scale} differs from the model's {model.scale}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    rates = _lr_schedule(lr, steps)
    adapted = copy.deepcopy(model)
    device = next(adapted.parameters()).device
    inp, target = son_pair(lr_image, kernel, scale, subsample=subsample, device=device)
    dtype = next(adapted.parameters()).dtype
    inp, target = inp.to(dtype), target.to(dtype)
    adapted.train()
    optimizer = torch.optim.SGD(adapted.parameters(), lr=rates[0] if rates else 1.0)
    for rate in rates:
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = F.l1_loss(adapted.forward_upsampled(inp), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return adapted.eval()


@torch.no_grad()
def _sr_float(model: MZSRNet, lr: np.ndarray, scale: int) -> np.ndarray:
    """One pass: ``(h, w, 3)`` float [0, 1] -> ``(s*h, s*w, 3)`` float64 clipped to [0, 1]."""
    param = next(model.parameters())
    x = _nchw(upsample(lr, scale), param.device).to(param.dtype)
    return np.clip(_hwc(model.forward_upsampled(x)), 0.0, 1.0)


def _ensemble(
    model: MZSRNet,
    lr: np.ndarray,
    scale: int,
    how: Literal["median", "mean", "none"],
    refine: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Geometric self-ensemble: the 8 flips/rotations of ``lr`` through ``model``, undone and
    fused by ``how`` (``none``: the identity only); ``refine(sr)`` is applied to each member."""
    outs = []
    for k in range(8 if how != "none" else 1):
        sr = undo_dihedral(_sr_float(model, dihedral(lr, k), scale), k)
        outs.append(refine(sr) if refine else sr)
    if how == "median":
        return np.median(outs, axis=0)
    return np.mean(outs, axis=0)


def super_resolve(
    model: MZSRNet,
    lr_image: np.ndarray,
    scale: int,
    *,
    ensemble: Literal["none", "median", "mean"] = "none",
) -> np.ndarray:
    """Super-resolve with MZSR's input convention (MATLAB bicubic, ``forward_upsampled``).

    Args:
        model: an ``MZSRNet`` at ``scale``.
        lr_image: ``(h, w, 3)`` uint8.
        scale: SR factor.
        ensemble: ``none`` (one pass, MZSR), or the 8-variant geometric self-ensemble fused by
            ``median`` (ZSSR) or ``mean``.

    Returns:
        ``(scale*h, scale*w, 3)`` uint8 (clipped, rounded), ready for ``metrics.psnr_y``.

    Raises:
        ValueError: not an ``(h, w, 3)`` uint8 image, or a scale different from the model's.
    """
    if scale != model.scale:
        raise ValueError(f"scale {scale} differs from the model's {model.scale}")
    img = _check_image(lr_image, "lr_image", 1)
    return _to_uint8(_ensemble(model, img / 255.0, scale, ensemble))


def zero_shot(
    model: MZSRNet,
    lr_image: np.ndarray,
    kernel: np.ndarray,
    scale: int,
    *,
    steps: int,
    lr: float | Sequence[float],
    subsample: Literal["direct", "bicubic"] = "direct",
) -> np.ndarray:
    """MZSR(``steps``) on one image: ``adapt`` a copy of ``model`` (no copy for 0 steps), then
    ``super_resolve``. ``(h, w, 3)`` uint8 -> ``(scale*h, scale*w, 3)`` uint8; errors as
    ``adapt`` and ``super_resolve``."""
    adapted = adapt(model, lr_image, kernel, scale, steps=steps, lr=lr, subsample=subsample) if steps else model
    return super_resolve(adapted, lr_image, scale)
