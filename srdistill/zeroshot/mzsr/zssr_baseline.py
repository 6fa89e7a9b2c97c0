"""ZSSR (Shocher et al., CVPR 2018), the zero-shot baseline: an image-specific network trained
from scratch on the LR image's own sons, with ZSSR's learning-rate policy and back-projection
(``zssr``).
"""

from __future__ import annotations

import math
import time
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from srdistill.config import MZSRConfig
from srdistill.sr import degradation, imaging
from srdistill.sr.device import resolve_device
from srdistill.sr.models.mzsr import MZSRNet
from srdistill.zeroshot.mzsr.adaptation import _ensemble, son_pair
from srdistill.zeroshot.mzsr.inputs import _check_image, _check_kernel, _nchw, _to_uint8, dihedral, upsample

__all__ = [
    "zssr",
]


# ZSSR's quick-test and lr-policy constants (configs.py): reconstruction MSE every 50 steps;
# every 60 steps fit a line to the last 256 // 50 = 5 of them; lr /= 10 when the fitted
# slope is flat relative to its standard error (-1.5 * slope < std).
ZSSR_TEST_EVERY = 50


ZSSR_CHECK_EVERY = 60


ZSSR_SLOPE_RANGE = 256


ZSSR_CHANGE_RATIO = 1.5


def _zssr_init(net: MZSRNet, variance: float, generator: torch.Generator) -> None:
    """ZSSR's initialisation: conv weights ~ N(0, variance / fan_in), biases 0."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, 0.0, math.sqrt(variance / fan_in), generator=generator)
            nn.init.zeros_(m.bias)


def _zssr_father(
    lr: np.ndarray, rng: np.random.Generator, cfg: MZSRConfig, scale: int
) -> np.ndarray:
    """A random training father of ``(h, w, 3)`` float ``lr``: a crop of at most ``zssr_crop``,
    with sides multiples of ``scale``, possibly from a downscaled copy, in a random flip/rot90."""
    c = cfg.zssr_crop
    h, w = lr.shape[:2]
    f = 1.0
    if cfg.zssr_scale_augment and rng.random() < 0.5:
        f = rng.uniform(cfg.zssr_min_scale, 1.0)
    # the window that becomes a crop of side <= c once downscaled by f
    wh, ww = min(h, math.ceil(c / f)), min(w, math.ceil(c / f))
    out_h = (min(c, int(wh * f)) // scale) * scale
    out_w = (min(c, int(ww * f)) // scale) * scale
    if min(out_h, out_w) < 2 * scale:  # too small once downscaled: take it at full size
        f, wh, ww = 1.0, min(h, c), min(w, c)
        out_h, out_w = (wh // scale) * scale, (ww // scale) * scale
    y, x = rng.integers(h - wh + 1), rng.integers(w - ww + 1)
    win = lr[y : y + wh, x : x + ww]
    if f < 1.0:
        win = imaging.imresize(win, output_shape=(out_h, out_w))
    father = win[:out_h, :out_w]
    if cfg.zssr_dihedral_augment:
        father = dihedral(father, int(rng.integers(8)))
    return np.ascontiguousarray(father)


def _zssr_plateau(points: Sequence[Sequence[float]]) -> bool:
    """ZSSR's lr-policy test: True when a line fitted to ``[step, MSE]`` points is flat relative
    to its noise, ``-1.5 * slope < std(slope)`` (``np.polyfit`` with ``cov=True``). Needs at
    least 4 points (the covariance estimate's minimum); False with fewer."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 4:
        return False
    (slope, _), cov = np.polyfit(pts[:, 0], pts[:, 1], 1, cov=True)
    return bool(-ZSSR_CHANGE_RATIO * slope < math.sqrt(cov[0, 0]))


def zssr(
    lr_image: np.ndarray,
    kernel: np.ndarray,
    scale: int,
    cfg: MZSRConfig,
    *,
    seed: int = 0,
    subsample: Literal["direct", "bicubic"] = "direct",
    device: str | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """The ZSSR baseline: an MZSRNet trained from scratch on the test image alone.

    Each Adam step (lr ``cfg.zssr_lr``) takes a random father from the LR image (see the module
    header for the augmentation), makes its son ``degrade(father, kernel, scale)`` and
    minimises ``L1(net(upsample(son)), father)``. Every 50 steps the reconstruction MSE of the
    whole image (its ``son_pair``) is measured; every 60 steps, once more than
    ``cfg.zssr_min_iterations`` steps have passed since the last drop, a line is fitted to the
    last 5 measurements and the lr is divided by 10 if ``-1.5 * slope < std(slope)`` (ZSSR's
    policy); training stops when the lr falls below ``cfg.zssr_min_lr`` or after
    ``cfg.zssr_iterations`` steps. The output is the geometric self-ensemble
    (``cfg.zssr_ensemble``) with ``cfg.zssr_back_projection`` back-projection iterations on
    every member and on the fused image (ZSSR ``final_test``). Deterministic for a fixed
    ``seed`` on the CPU.

    Args:
        lr_image: ``(h, w, 3)`` uint8, at least ``4*scale`` on both sides.
        kernel: ``(kh, kw)`` blur kernel of the LR image.
        scale: SR factor.
        cfg: the ``zssr_*`` settings and ``n_feats``/``n_layers`` of the network.
        seed: seeds the initialisation and the crops.
        subsample: how sons are subsampled (as the LR was made).
        device: ``auto``/``cpu``/``cuda``; None takes ``cfg.device``.
        progress: a tqdm bar.

    Returns:
        ``(sr, info)``: ``(scale*h, scale*w, 3)`` uint8, and ``iterations`` (steps taken),
        ``seconds`` (training and inference), ``lr_drops`` (steps at which the lr was divided),
        ``final_lr``, ``train_loss`` (L1 per step), ``rec_mse`` (``[step, MSE]`` pairs of the
        whole-image reconstruction, the last one after training).

    Raises:
        ValueError: a bad image or kernel.
    """
    img = _check_image(lr_image, "lr_image", 4 * scale)
    k = _check_kernel(kernel)
    dev = resolve_device(device or cfg.device)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    net = MZSRNet(scale, n_feats=cfg.n_feats, n_layers=cfg.n_layers)
    _zssr_init(net, cfg.zssr_init_variance, gen)
    net = net.to(dev).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.zssr_lr)
    lr_f = img / 255.0
    test_in, test_target = son_pair(img, k, scale, subsample=subsample, device=dev)

    def rec_mse() -> float:
        with torch.no_grad():
            return F.mse_loss(net.forward_upsampled(test_in).clamp(0, 1), test_target).item()

    lr_now, drops = cfg.zssr_lr, [0]
    losses: list[float] = []
    rec: list[list[float]] = []
    it = 0
    for it in tqdm(range(cfg.zssr_iterations), disable=not progress, desc="ZSSR"):
        father = _zssr_father(lr_f, rng, cfg, scale)  # (H, W, 3) float64
        son = degradation.degrade_float(father, k, scale, subsample=subsample)
        inp = _nchw(upsample(son, output_shape=father.shape[:2]), dev)
        loss = F.l1_loss(net.forward_upsampled(inp), _nchw(father, dev))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if it % ZSSR_TEST_EVERY == 0:
            rec.append([it, rec_mse()])
        if (it + 1) % ZSSR_CHECK_EVERY == 0 and it - drops[-1] > cfg.zssr_min_iterations:
            if _zssr_plateau(rec[-(ZSSR_SLOPE_RANGE // ZSSR_TEST_EVERY) :]):
                lr_now /= 10
                drops.append(it)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
        if lr_now < cfg.zssr_min_lr:
            break
    rec.append([it + 1, rec_mse()])
    net.eval()

    def back_project(sr: np.ndarray) -> np.ndarray:
        for _ in range(cfg.zssr_back_projection):
            residual = lr_f - degradation.degrade_float(sr, k, scale, subsample=subsample)  # (h, w, 3)
            sr = np.clip(sr + imaging.imresize(residual, output_shape=sr.shape[:2]), 0.0, 1.0)
        return sr

    sr = back_project(_ensemble(net, lr_f, scale, cfg.zssr_ensemble, refine=back_project))
    info = {"iterations": it + 1, "seconds": time.perf_counter() - t0, "lr_drops": drops[1:],
            "final_lr": lr_now, "train_loss": losses, "rec_mse": rec}  # fmt: skip
    return _to_uint8(sr), info
