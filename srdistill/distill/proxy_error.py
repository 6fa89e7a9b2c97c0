"""``proxy_error``: a patch's error under small SR networks trained briefly on the corpus itself.

After EL2N (Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples
Early in Training", NeurIPS 2021, arXiv 2107.07075, section 3): the EL2N score of a training
example ``(x, y)`` is ``E_w ||p(w_t, x) - y||_2``, the norm of the error of the network's output
after a few epochs ``t`` of training, averaged over several random initialisations ``w_0``;
examples with a high score are the ones worth keeping. For super-resolution the "label" is the
HR patch and the output the SR image, so here

    proxy_error(patch) = mean over seeds s of  mean_pixels,channels (f_s(LR) - HR)^2

with ``f_s`` an ESPCN (``srdistill.sr.models.ESPCN``, ``select.proxy.n_feats`` channels) at the
run's scale, initialised from ``torch.manual_seed(s)`` and trained for ``select.proxy.steps``
Adam steps (L1 loss, the training stage's loss) on random crops of the corpus' own patches,
LR made by MATLAB bicubic (``training.sample_batch``, as training makes it). No label and no
pretrained model is needed. What differs from the paper: the squared error per pixel (a mean,
so patches of any size compare) instead of the norm, a regression output instead of class
probabilities, and a fixed number of steps instead of epochs.

Cost: about a minute for 12,000 96x96 patches at x2 with the defaults on 2 free CPU cores,
mostly the scoring pass (``bench/bench_proxy_error.py``, ``docs/BENCHMARKS.md``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from srdistill.config import ProxyConfig
from srdistill.sr import imaging
from srdistill.sr.device import resolve_device, to_tensor
from srdistill.sr.models import build_model
from srdistill.sr.training import sample_batch

__all__ = ["PROXY_COLUMN", "attach_proxy_error", "proxy_error_scores"]

#: The column ``select.score = proxy_error`` ranks by.
PROXY_COLUMN = "proxy_error"
#: Training crops drawn from the patches once, shared by the seeds (bounds memory).
POOL_CROPS = 4096
#: HR pixels read and scored at once (bounds memory).
_CHUNK_PIXELS = 1 << 22
#: LR pixels per forward pass when scoring.
_FORWARD_PIXELS = 1 << 18


def _columns(table: pa.Table) -> list[np.ndarray]:
    missing = [c for c in ("source", "x", "y", "size") if c not in table.column_names]
    if missing:
        raise ValueError(f"proxy_error: table lacks column(s) {missing}")
    return [table.column(c).to_numpy(zero_copy_only=False) for c in ("source", "x", "y", "size")]


def _crop_pool(cols: list[np.ndarray], crop: int, n_crops: int, seed: int) -> list[np.ndarray]:
    """``n_crops`` ``(crop, crop, 3)`` uint8 windows: uniform patch, uniform position inside it;
    patches indexed in (source, y, x, size) order, so the pool does not depend on the row order."""
    rng = np.random.default_rng(seed)
    canonical = np.lexsort((cols[3], cols[1], cols[2], cols[0].astype(str)))
    rows = canonical[rng.integers(len(cols[0]), size=n_crops)]
    room = cols[3][rows].astype(np.int64) - crop + 1
    dx, dy = rng.integers(room), rng.integers(room)
    pool: list[np.ndarray] = [None] * n_crops  # type: ignore[list-item]
    windows = cols[0][rows], cols[1][rows] + dx, cols[2][rows] + dy, np.full(n_crops, crop)
    for idx, crops in imaging.iter_crops(*windows, max_pixels=_CHUNK_PIXELS):
        for i, c in zip(idx, crops):
            pool[i] = c
    return pool


def _train(pool: list[np.ndarray], scale: int, crop: int, seed: int, cfg: ProxyConfig, device) -> torch.nn.Module:
    """One proxy ESPCN: ``torch.manual_seed(seed)`` weights, ``cfg.steps`` Adam steps on L1."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_model("espcn", scale, n_feats=cfg.n_feats).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    net.train()
    for _ in range(cfg.steps):
        lr, hr = sample_batch(pool, rng, batch_size=cfg.batch_size, hr_size=crop, scale=scale)
        loss = F.l1_loss(net(to_tensor(lr, device)), to_tensor(hr, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


def _errors(nets: list[torch.nn.Module], patches: list[np.ndarray], scale: int, device) -> np.ndarray:
    """Mean over ``nets`` of each patch's MSE (RGB in [0, 1], output clamped, border ``scale``)."""
    hr = np.stack([imaging.modcrop(p, scale) for p in patches])  # (B, H, W, 3), one size
    lr = imaging.imresize(hr, 1 / scale, spatial_axes=(1, 2))
    batch = max(1, _FORWARD_PIXELS // (lr.shape[1] * lr.shape[2]))
    out = np.zeros(len(hr))
    with torch.inference_mode():
        for lo in range(0, len(hr), batch):
            x, y = to_tensor(lr[lo : lo + batch], device), to_tensor(hr[lo : lo + batch], device)
            y = y[:, :, scale:-scale, scale:-scale]
            for net in nets:
                sr = net(x).clamp(0.0, 1.0)[:, :, scale:-scale, scale:-scale]
                out[lo : lo + batch] += ((sr - y) ** 2).mean(dim=(1, 2, 3)).double().cpu().numpy()
    return out / len(nets)


def proxy_error_scores(table: pa.Table, scale: int, cfg: ProxyConfig) -> np.ndarray:
    """EL2N-style error of every patch under proxy SR networks trained briefly on the patches.

    1. Pool: ``min(cfg.steps * cfg.batch_size, POOL_CROPS)`` windows of side ``c = min(cfg.crop,
       smallest patch)`` rounded down to a multiple of ``scale``, each from a uniform random
       patch at a uniform position inside it (``np.random.default_rng(cfg.seeds[0])``, patches
       in (source, y, x, size) order, so the scores do not depend on the row order).
    2. Proxies: for each seed ``s`` in ``cfg.seeds``, an ESPCN of ``cfg.n_feats`` channels at
       ``scale``, weights from ``torch.manual_seed(s)``, trained for ``cfg.steps`` Adam steps
       (learning rate ``cfg.lr``, L1 loss) on batches of ``cfg.batch_size`` pool windows drawn by
       ``training.sample_batch`` with ``np.random.default_rng(s)`` (flips, rot90, LR by MATLAB
       bicubic with uint8 rounding).
    3. Score: each whole patch (modcropped to a multiple of ``scale``) is downscaled the same
       way, super-resolved by every proxy (output clamped to [0, 1]) and compared with the HR
       patch: mean squared error over RGB pixels in [0, 1], a border of ``scale`` pixels shaved
       (as evaluation does), averaged over the seeds.

    Deterministic given ``cfg.seeds`` on one device and thread count. Higher = the proxy learnt
    the patch less = harder (``LOWER_IS_HARDER["proxy_error"]`` is False). Memory: the pool
    (``POOL_CROPS * c^2 * 3`` bytes at most) plus about 4 million HR pixels at a time. Time:
    see the module docstring.

    Args:
        table: ``source``, ``x``, ``y``, ``size`` columns (the patch table), N rows.
        scale: SR factor, 2..8.
        cfg: ``select.proxy``; ``cfg.device`` via ``device.resolve_device`` (``auto``: CUDA if
            available).

    Returns:
        ``(N,)`` float32, >= 0, rows in ``table`` order (empty for no rows).

    Raises:
        ValueError: a column is missing, ``scale`` out of range, or a patch not larger than
            ``2 * scale`` after modcrop.
        imaging.ImageReadError: a source image cannot be read.
        RuntimeError: ``cfg.device`` is ``cuda`` without CUDA.
    """
    cols = _columns(table)
    if not 2 <= scale <= 8:
        raise ValueError(f"proxy_error: scale must be in 2..8, got {scale}")
    n = table.num_rows
    if n == 0:
        return np.empty(0, np.float32)
    smallest = int(cols[3].min())
    if smallest // scale * scale <= 2 * scale:
        raise ValueError(f"proxy_error: patches of size {smallest} are too small for scale {scale} "
                         f"(need more than {2 * scale} pixels after cropping to a multiple of it)")  # fmt: skip
    device = resolve_device(cfg.device)
    crop = min(cfg.crop, smallest) // scale * scale
    pool = _crop_pool(cols, crop, min(cfg.steps * cfg.batch_size, POOL_CROPS), cfg.seeds[0])
    nets = [_train(pool, scale, crop, seed, cfg, device) for seed in cfg.seeds]
    del pool
    scores = np.empty(n, np.float32)
    for rows, patches in imaging.iter_crops(*cols, max_pixels=_CHUNK_PIXELS):
        for side in np.unique(cols[3][rows]):  # one batch shape per patch size
            same = np.flatnonzero(cols[3][rows] == side)
            scores[rows[same]] = _errors(nets, [patches[j] for j in same], scale, device)
    return scores


def attach_proxy_error(table: pa.Table, scores: np.ndarray) -> pa.Table:
    """``table`` with the float32 column ``proxy_error`` = ``scores`` (replacing one already
    there), so that ``select.score = proxy_error`` can rank by it.

    Args:
        table: N rows.
        scores: ``(N,)`` ``proxy_error_scores(table, ...)``, rows in ``table`` order.

    Raises:
        ValueError: ``scores`` is not ``(N,)`` or has a non-finite value.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != (table.num_rows,) or not np.isfinite(scores).all():
        raise ValueError(f"attach_proxy_error: scores must be ({table.num_rows},) and finite, got shape "
                         f"{scores.shape}")  # fmt: skip
    if PROXY_COLUMN in table.column_names:
        table = table.drop_columns([PROXY_COLUMN])
    return table.append_column(PROXY_COLUMN, pa.array(scores, type=pa.float32()))
