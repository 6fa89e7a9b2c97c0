"""MZSR: meta-transfer learning for zero-shot SR, its test-time adaptation, and the ZSSR baseline.

Papers:

* MZSR: Soh, Cho, Cho, "Meta-Transfer Learning for Zero-Shot Super-Resolution", CVPR 2020,
  arXiv:2002.12213; official TensorFlow code JWSoh/MZSR.
* ZSSR: Shocher, Cohen, Irani, "'Zero-Shot' Super-Resolution using Deep Internal Learning",
  CVPR 2018, arXiv:1712.06087; official code assafshocher/ZSSR.
* The multi-step loss MZSR uses is MAML++'s: Antoniou, Edwards, Storkey, "How to train your
  MAML", ICLR 2019, arXiv:1810.09502. MAML: Finn, Abbeel, Levine, ICML 2017, arXiv:1703.03400.

The three MZSR stages::

    from srdistill.config import MZSRConfig, TrainConfig, RECIPES
    from srdistill.training import train_sr, load_checkpoint
    from srdistill import mzsr
    # 1. large-scale bicubic pretraining: plain SR training (not in this module)
    pre = train_sr(TrainConfig(model="mzsr", **RECIPES["mzsr"]), 2, hr_files, Path("runs/pre"))
    # 2. meta-transfer learning over random-kernel tasks
    meta = mzsr.meta_train(MZSRConfig(), hr_files, Path("runs/meta"), init=pre)
    # 3. per test image: a few SGD steps on (I_son, LR), then super-resolve
    model, _ = load_checkpoint(meta)
    adapted = mzsr.adapt(model, lr_img, kernel, 2, steps=10, lr=MZSRConfig().adapt_lr)
    sr = mzsr.super_resolve(adapted, lr_img, 2)          # (2h, 2w, 3) uint8

and the baseline ``sr, info = mzsr.zssr(lr_img, kernel, 2, MZSRConfig())``.

One input convention everywhere in MZSR (pretraining, meta-training, adaptation,
super-resolution, ZSSR), the official code's: the LR image, as floats in [0, 1], is upsampled
to the HR size by MATLAB bicubic (``imaging.imresize``, no rounding) and fed to
``MZSRNet.forward_upsampled`` (``x + body(x)``). The pretraining (``train_sr``, which calls
``MZSRNet.forward``) gets the same input: ``MZSRNet(upsample="matlab")``, the default, does
that upsampling inside ``forward`` (as MZSR's ``Large-Scale_Training/train.py`` feeds
``imresize(lr, scale, kernel='cubic')``); the pretraining LR are MATLAB-bicubic downscaled and
rounded to uint8, as the DIV2K bicubic LR the release trains on. An MZSR model is evaluated
with ``super_resolve`` (numpy float64 upsampling), which ``model(lr)`` equals up to float32
rounding. Through this path a zero residual gives the paper's bicubic baseline (Set5, g20 x2:
28.74 dB; paper 28.73).

The released TensorFlow models (``Model/Directx2``, ``Directx4``, ``Bicubicx2``,
``Multi-scale``, and the pretrained ``Pretrained/Pretrained``) are converted by ``import_tf``
(``srdistill mzsr import-tf``) into checkpoints that load as ours, with the settings each was
released with (``RELEASED_TF``: scale, subsampling, test-time learning rates of ``test.py``).

LR images made here (task LR, test-time sons, ZSSR sons, back-projection) are floats in [0, 1]
(``degradation.degrade_float``), as MZSR and ZSSR keep them; rounded, they are ``degrade``'s
output bit for bit.
Test-time adaptation trains on the whole LR image, as MZSR ``test.py``.

What differs from the papers / official code:

* The HR task patches are random crops of the given images with a random flip/rot90 (the
  official code reads pre-cut 64x64 patches from a TFRecord).
* Multi-step loss: ``MZSRConfig.loss_weights`` ``uniform`` (default) is what the release
  trains with: its ``train.py`` builds MAML++'s annealed weights from ``global_step`` but never
  increments that variable (``apply_gradients`` gets no ``global_step``), so they stay at their
  step-0 values, uniform (1/5 each), for a fresh run (a run resumed with ``--step S`` keeps the
  weights of step S instead). ``annealed`` is that schedule as written (``loss_weights``).
  The weighted query loss is a sum (weights sum to 1) where the official code takes a mean over
  the inner steps (a constant 1/5 factor that Adam cancels up to its eps).
* The pretraining (``train_sr``) draws random HR crops (96x96 at x2 with ``RECIPES["mzsr"]``)
  with a random flip/rot90; the release cuts 96x96 patches on a stride-120 grid of DIV2K and
  keeps those whose mean squared gradient is at least e^-6 (JWSoh/MainSR
  ``generate_TFRecord.py``), without flips.
* Adam's state, the step and the task sampler's RNG are checkpointed, so a run resumes exactly.
* ZSSR's augmentation here is: a random crop (``zssr_crop``), with probability 1/2 taken from
  the image downscaled by ``U[zssr_min_scale, 1)`` (MATLAB bicubic), and a random flip/rot90.
  The official code draws, with probabilities 0.05 / 0.45 / 0.5, an untouched crop, a
  flip/rot90 crop, or an affine warp (random scale, arbitrary rotation, shear; OpenCV bicubic);
  arbitrary rotations and shears are left out. The network is MZSRNet with ZSSR's
  initialisation (conv weights ~ N(0, 0.1/fan_in)); ZSSR's convolutions have no biases, these
  have zero-initialised ones. Kernels are applied as given (ZSSR recentres a given kernel on its
  centre of mass; MZSR's g20 protocol, which ``degradation`` reproduces, does not). Flipping or
  rotating the image also flips/rotates its kernel: for kernels without those symmetries ZSSR's
  given-kernel config turns the flip/rot90 augmentation and the self-ensemble off
  (``zssr_dihedral_augment=False``, ``zssr_ensemble="none"``, ``zssr_back_projection=2``);
  the defaults here are its default (ideal-case) config, right for the isotropic g20 kernel.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from srdistill.config import MZSRConfig
from srdistill.sr import degradation, imaging
from srdistill.sr.device import resolve_device
from srdistill.sr.models.mzsr import MZSRNet, from_tf_variables, tf_variable_names
from srdistill.sr.training import (
    DataParallel,
    _load_images,
    _resume,
    _resume_history,
    announce,
    load_checkpoint,
    save_checkpoint,
)
from srdistill.zeroshot import tfbundle

__all__ = [
    "RELEASED_TF",
    "adapt",
    "dihedral",
    "import_tf",
    "loss_weights",
    "meta_backward",
    "meta_step",
    "meta_train",
    "sample_task",
    "son_pair",
    "super_resolve",
    "undo_dihedral",
    "upsample",
    "zero_shot",
    "zssr",
]

log = logging.getLogger(__name__)

Tensor = torch.Tensor
Task = tuple[Tensor, Tensor, Tensor, Tensor]

# ZSSR's quick-test and lr-policy constants (configs.py): reconstruction MSE every 50 steps;
# every 60 steps fit a line to the last 256 // 50 = 5 of them; lr /= 10 when the fitted
# slope is flat relative to its standard error (-1.5 * slope < std).
ZSSR_TEST_EVERY = 50
ZSSR_CHECK_EVERY = 60
ZSSR_SLOPE_RANGE = 256
ZSSR_CHANGE_RATIO = 1.5


# --------------------------------------------------------------------------- helpers


def _check_kernel(kernel: np.ndarray) -> np.ndarray:
    """A blur kernel as ``(kh, kw)`` float64; ValueError naming the problem otherwise."""
    k = np.asarray(kernel)
    if k.ndim != 2 or min(k.shape) < 1:
        raise ValueError(f"kernel must be a 2-D (kh, kw) array, got shape {k.shape}")
    k = k.astype(np.float64)
    if not np.all(np.isfinite(k)) or k.sum() <= 0:
        raise ValueError("kernel must be finite with a positive sum")
    return k


def _check_image(img: np.ndarray, name: str, min_side: int) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image with both sides >= ``min_side``; ValueError otherwise."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"{name} must be an (H, W, 3) uint8 array, got {img.dtype} {img.shape}")
    if min(img.shape[:2]) < min_side:
        raise ValueError(
            f"{name} is {img.shape[1]}x{img.shape[0]}, smaller than the {min_side}x{min_side} "
            "needed"
        )
    return img


def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """Variant ``k`` in 0..7 of the 8 flips/rotations of ``(H, W, ...)``: ``rot90`` by ``k % 4``
    quarter turns, then a left-right flip for ``k >= 4`` (ZSSR's ensemble order)."""
    out = np.rot90(img, k % 4)
    return np.fliplr(out) if k >= 4 else out


def undo_dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """The inverse of ``dihedral(., k)``."""
    if k >= 4:
        img = np.fliplr(img)
    return np.rot90(img, -(k % 4))


def _as_float(img: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float64 [0, 1]; float arrays are returned as float64 unchanged."""
    return img / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)


def upsample(
    lr: np.ndarray, scale: int | None = None, *, output_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """The network input: MATLAB bicubic upsampling of LR images, as floats, no rounding.

    Args:
        lr: ``(h, w, 3)`` or ``(B, h, w, 3)``; uint8 [0, 255] or float [0, 1].
        scale: integer factor (output ``scale*h x scale*w``), or
        output_shape: ``(H, W)`` of the output instead.

    Returns:
        ``(H, W, 3)`` or ``(B, H, W, 3)`` float32, about [0, 1] (bicubic overshoots a little).
    """
    axes = (0, 1) if lr.ndim == 3 else (1, 2)
    kw = {"output_shape": output_shape} if output_shape is not None else {"scale": scale}
    return imaging.imresize(_as_float(lr), spatial_axes=axes, **kw).astype(np.float32)


def _nchw(x: np.ndarray, device: torch.device | str) -> Tensor:
    """``(H, W, 3)`` or ``(B, H, W, 3)`` float -> ``(B, 3, H, W)`` float32 tensor on ``device``."""
    if x.ndim == 3:
        x = x[None]
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return x.permute(0, 3, 1, 2).to(device)


def _hwc(x: Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` tensor -> ``(H, W, 3)`` float64 array."""
    return x[0].permute(1, 2, 0).double().cpu().numpy()


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255], clipped and rounded."""
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


class _Upsampled(nn.Module):
    """``net.forward_upsampled`` as ``forward``, so that ``torch.func.functional_call`` can run
    the network on a dict of fast weights (names prefixed ``net.``)."""

    def __init__(self, net: MZSRNet):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_upsampled(x)


# --------------------------------------------------------------------------- meta-training


def loss_weights(step: int, cfg: MZSRConfig) -> np.ndarray:
    """The multi-step-loss weights of the query losses after each inner step, at meta-step ``step``.

    ``cfg.loss_weights == "uniform"`` (MZSR's release): ``1/T`` each at every step, ``T =
    cfg.inner_steps``. The released ``train.py`` computes MAML++'s annealed weights from
    ``global_step``, a ``tf.Variable`` set to the starting step (``--step``, 0 for a fresh run)
    that nothing increments (``apply_gradients`` is not given it), so a fresh run trains with
    the weights of step 0, which are uniform.

    ``"annealed"`` (MAML++'s schedule as ``get_loss_weights`` is written): with ``m =
    cfg.msl_min_weight / T`` and ``r = 1 / T / cfg.msl_anneal_iterations``, the first ``T - 1``
    weights are ``max(1/T - step*r, m)``, the last ``min(1/T + step*(T-1)*r, 1 - (T-1)*m)``.
    They start uniform, sum to 1 at every step, and reach their final values (``m`` each, the
    last ``1 - (T-1)*m``) after ``(1 - T*m) * msl_anneal_iterations`` steps.

    Returns:
        ``(T,)`` float64, summing to 1.
    """
    t = cfg.inner_steps
    if cfg.loss_weights == "uniform":
        return np.full(t, 1.0 / t)
    m = cfg.msl_min_weight / t
    if cfg.msl_anneal_iterations == 0:
        shift = math.inf
    else:
        shift = step / t / cfg.msl_anneal_iterations
    w = np.full(t, max(1.0 / t - shift, m))
    w[-1] = min(1.0 / t + (t - 1) * shift, 1.0 - (t - 1) * m)
    return w


def sample_task(
    images: list[np.ndarray],
    rng: np.random.Generator,
    cfg: MZSRConfig,
    *,
    device: torch.device | str = "cpu",
) -> Task:
    """One meta-training task: a random kernel, and its support and query sets.

    The kernel is ``degradation.random_kernel(rng, cfg.scale, cfg.kernel_size)`` (MZSR's
    anisotropic Gaussians: theta ~ U[0, pi], lambda1 ~ U[1, 2.5*scale], lambda2 ~ U[1, lambda1]).
    Each of the ``cfg.support + cfg.query`` patches is an ``hr_patch`` HR crop of a uniformly
    drawn image at a uniform position, in one of its 8 flips/rotations; its LR is
    ``degrade_float(crop, kernel, scale)`` (``cfg.subsample``, ``cfg.noise_sigma``), and the
    network input is that LR upsampled back by MATLAB bicubic
    (``upsample``), as in MZSR's ``dataGenerator.py``.

    Args:
        images: ``(H, W, 3)`` uint8 HR images, each at least ``cfg.hr_patch`` on both sides.
        rng: the sampler's generator (advanced in place).
        cfg: the settings (``scale``, ``kernel_size``, ``hr_patch``, ``support``, ``query``,
            ``subsample``, ``noise_sigma``).
        device: where the tensors go.

    Returns:
        ``(support_in, support_hr, query_in, query_hr)``: ``(support, 3, P, P)`` and
        ``(query, 3, P, P)`` float32 in [0, 1] (inputs: about [0, 1]), ``P = cfg.hr_patch``;
        ``*_in`` are the upsampled LR, ``*_hr`` the targets.

    Raises:
        ValueError: no image, or an image smaller than ``cfg.hr_patch``.
    """
    p = cfg.hr_patch
    if not images:
        raise ValueError("sample_task needs at least one HR image")
    small = [i for i, im in enumerate(images) if min(im.shape[:2]) < p]
    if small:
        shape = images[small[0]].shape
        raise ValueError(
            f"{len(small)} image(s) smaller than hr_patch {p} (e.g. #{small[0]}, "
            f"{shape[1]}x{shape[0]})"
        )
    kernel = degradation.random_kernel(rng, cfg.scale, cfg.kernel_size)
    crops = []
    for _ in range(cfg.support + cfg.query):
        img = images[rng.integers(len(images))]
        y = rng.integers(img.shape[0] - p + 1)
        x = rng.integers(img.shape[1] - p + 1)
        crops.append(dihedral(img[y : y + p, x : x + p], int(rng.integers(8))))
    hr = np.stack(crops) / 255.0  # (N, P, P, 3) float64 in [0, 1]
    lr = degradation.degrade_float(hr, kernel, cfg.scale, subsample=cfg.subsample,
                                   noise_sigma=cfg.noise_sigma, rng=rng)  # (N, P/s, P/s, 3)
    inp = upsample(lr, output_shape=(p, p))  # (N, P, P, 3) float32
    inp_t, hr_t = _nchw(inp, device), _nchw(hr, device)
    n = cfg.support
    return inp_t[:n], hr_t[:n], inp_t[n:], hr_t[n:]


def meta_backward(model: MZSRNet, tasks: Sequence[Task], cfg: MZSRConfig, step: int) -> dict:
    """Accumulate the MAML meta-gradient of ``tasks`` into ``model``'s ``.grad`` (MZSR Alg. 1).

    For each task, starting from the model's parameters theta, ``cfg.inner_steps`` SGD steps
    ``phi <- phi - inner_lr * grad L1(f_phi(support_in), support_hr)`` run on a dict of fast
    weights through ``torch.func.functional_call`` (the model's own parameters are not
    modified); with ``cfg.first_order`` False the inner gradients keep their graph
    (``create_graph=True``), so the meta-gradient is the exact second-order one. The task's meta
    loss is ``sum_j w_j * L1(f_phi_j(query_in), query_hr)`` over the inner steps ``j`` with
    ``w = loss_weights(step, cfg)``; the gradient of the mean over tasks is added to ``.grad``
    (one backward per task, so memory holds one task's graph at a time). Tasks may be on any
    device and dtype matching the model's.

    Args:
        model: the meta-learner (an ``MZSRNet``); used through ``forward_upsampled``.
        tasks: ``(support_in, support_hr, query_in, query_hr)`` tuples (``sample_task``).
        cfg: ``inner_steps``, ``inner_lr``, ``first_order``, ``msl_*``.
        step: meta-updates done so far (sets the multi-step-loss weights).

    Returns:
        Means over the tasks (floats, L1 on [0, 1] pixels): ``support_loss`` (before the inner
        steps; MZSR's "pre-update" loss), ``support_loss_after`` (after them), ``query_loss``
        (after the last inner step; MZSR's "post-update" loss), ``meta_loss`` (the weighted
        loss that is differentiated).
    """
    wrapper = _Upsampled(model)
    named = [(n, p) for n, p in wrapper.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    weights = loss_weights(step, cfg)
    out = dict.fromkeys(("support_loss", "support_loss_after", "query_loss", "meta_loss"), 0.0)
    for s_in, s_hr, q_in, q_hr in tasks:
        fast = [p for _, p in named]
        meta_loss = s_in.new_zeros(())
        for j in range(cfg.inner_steps):
            s_loss = F.l1_loss(functional_call(wrapper, dict(zip(names, fast)), (s_in,)), s_hr)
            if j == 0:
                out["support_loss"] += s_loss.item()
            grads = torch.autograd.grad(s_loss, fast, create_graph=not cfg.first_order)
            fast = [p - cfg.inner_lr * g for p, g in zip(fast, grads)]
            last = j == cfg.inner_steps - 1
            if weights[j] > 0 or last:
                q_loss = F.l1_loss(functional_call(wrapper, dict(zip(names, fast)), (q_in,)), q_hr)
                meta_loss = meta_loss + float(weights[j]) * q_loss
        (meta_loss / len(tasks)).backward()
        out["query_loss"] += q_loss.item()
        out["meta_loss"] += meta_loss.item()
        with torch.no_grad():
            after = F.l1_loss(functional_call(wrapper, dict(zip(names, fast)), (s_in,)), s_hr)
        out["support_loss_after"] += after.item()
    return {k: v / len(tasks) for k, v in out.items()}


def meta_step(
    model: MZSRNet,
    tasks: Sequence[Task],
    cfg: MZSRConfig,
    meta_optimizer: torch.optim.Optimizer,
    step: int,
    *,
    world_size: int = 1,
) -> dict:
    """One meta-update: ``meta_backward`` on ``tasks``, then one ``meta_optimizer`` step.

    With ``world_size > 1`` (data-parallel workers, each with its share of the tasks) the
    meta-gradients and the reported losses are averaged over the workers with
    ``torch.distributed.all_reduce`` (the process group is the runner's).

    Returns:
        The losses of ``meta_backward`` (averaged over the workers).
    """
    meta_optimizer.zero_grad(set_to_none=True)
    losses = meta_backward(model, tasks, cfg, step)
    if world_size > 1:  # distributed: average gradients and losses over the workers
        params = [p for p in model.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        stats = flat.new_tensor([losses[k] for k in sorted(losses)])
        both = torch.cat([flat, stats])
        torch.distributed.all_reduce(both)
        both /= world_size
        for p, g in zip(params, both[: flat.numel()].split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
        losses = dict(zip(sorted(losses), both[flat.numel() :].tolist()))
    meta_optimizer.step()
    return losses


def _initial_model(cfg: MZSRConfig, init: str | Path | None) -> MZSRNet:
    """The pretrained MZSRNet of ``init``, or a fresh one (seeded by the caller)."""
    if init is None:
        log.warning("meta_train without an init checkpoint: MZSR meta-trains from the bicubic "
                    "pretraining (training.train_sr with RECIPES['mzsr'])")  # fmt: skip
        return MZSRNet(cfg.scale, n_feats=cfg.n_feats, n_layers=cfg.n_layers)
    model, meta = load_checkpoint(init)
    if meta["arch"] != "mzsr" or meta["scale"] != cfg.scale:
        raise ValueError(
            f"init {str(init)!r} is a {meta['arch']} x{meta['scale']} checkpoint, "
            f"not mzsr x{cfg.scale}"
        )
    if (model.config["n_feats"], model.config["n_layers"]) != (cfg.n_feats, cfg.n_layers):
        raise ValueError(
            f"init {str(init)!r} has n_feats={model.config['n_feats']}, n_layers="
            f"{model.config['n_layers']}; the config says {cfg.n_feats}, {cfg.n_layers}"
        )
    return model.train()


def meta_train(
    cfg: MZSRConfig,
    hr_images: list[str | Path],
    out_dir: Path,
    *,
    init: str | Path | None = None,
    progress: bool = True,
    dp: DataParallel = DataParallel(),
) -> Path:
    """MZSR's meta-transfer learning: ``cfg.meta_iterations`` meta-updates over kernel tasks.

    Each update samples ``cfg.tasks_per_batch`` tasks (``sample_task``) and takes one Adam step
    (``cfg.meta_lr``, betas 0.9/0.999, eps 1e-8) on the multi-step query loss after
    ``cfg.inner_steps`` inner SGD steps (``meta_step``). The weights start from ``init`` (the
    bicubic-pretrained checkpoint); tasks are drawn from ``np.random.default_rng(cfg.seed)``
    (plus the worker rank). It resumes from ``out_dir/last.safetensors`` (weights, Adam state,
    step, sampler RNG) and then ends with the same weights as an uninterrupted run (same
    device and threads); a resume is announced on stderr and logged (``{"step": S,
    "resumed_from_step": S, ...}``), ``elapsed_s`` carries on from the checkpoint's, and
    ``model.safetensors`` records ``elapsed_s`` and ``resumed_from`` (the steps resumed at).

    Data parallel (``dp``, as ``training.train_sr``): worker ``rank`` of ``world_size`` draws its
    tasks from the shard ``hr_images[rank::world_size]``, ``tasks_per_batch // world_size`` a
    step, and the meta-gradients are all-reduced in ``meta_step``. ``dp.prepare_model`` is not
    used: DDP expects one forward per backward, MAML's inner loop runs many.

    Files in ``out_dir`` (rank 0): ``model.safetensors`` (arch ``mzsr``; metadata: ``step``,
    ``mzsr_config``, ``init``, ``n_train_images``, ``skipped_images``), ``last.safetensors``
    (every ``cfg.checkpoint_every`` updates and at the end), ``log.jsonl`` (every
    ``cfg.log_every`` updates: step, the means of ``meta_step``'s losses over those updates,
    the last inner step's loss weight, elapsed seconds).

    Args:
        cfg: the settings.
        hr_images: HR image files; those smaller than ``cfg.hr_patch`` are skipped (warning).
        out_dir: created if missing.
        init: the pretrained MZSRNet checkpoint (``train_sr``'s ``model.safetensors``); None
            starts from a random network (not MZSR's recipe; a warning is logged).
        progress: tqdm progress bar (rank 0).
        dp: the data-parallel context; one process by default.

    Returns:
        ``out_dir / "model.safetensors"``.

    Raises:
        ValueError: no usable image, ``tasks_per_batch`` not divisible by the workers, an
            ``init`` of another arch/scale/size, or a ``last.safetensors`` of another
            arch/scale.
        RuntimeError: a ``last.safetensors`` of another network size (``n_feats``/``n_layers``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = dp.device or resolve_device(cfg.device)
    lead = dp.rank == 0
    if cfg.tasks_per_batch % dp.world_size:
        raise ValueError(f"tasks_per_batch {cfg.tasks_per_batch} is not a multiple of the "
                         f"{dp.world_size} workers")  # fmt: skip
    shard = list(hr_images)[dp.rank :: dp.world_size] or list(hr_images)  # distributed
    images, skipped = _load_images(shard, cfg.hr_patch)
    if not images:
        raise ValueError(f"no training image is at least {cfg.hr_patch}x{cfg.hr_patch} (hr_patch); "
                         f"{len(skipped)} image(s) given")  # fmt: skip

    step = 0
    elapsed0, resumed_from, resumed = 0.0, [], False  # carried over from the checkpoint
    last = out_dir / "last.safetensors"
    resume = dp.resume_from if dp.resume_from is not None else last
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, dp.rank])
    if resume.exists():  # the weights come from the checkpoint
        net = MZSRNet(cfg.scale, n_feats=cfg.n_feats, n_layers=cfg.n_layers).to(device)
    else:
        net = _initial_model(cfg, init).to(device)
    model_kwargs = {k: v for k, v in net.config.items() if k != "scale"}
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.meta_lr, betas=(0.9, 0.999), eps=1e-8)
    if resume.exists():
        step, rng_state = _resume(resume, net, optimizer, None, arch="mzsr", scale=cfg.scale)
        elapsed0, resumed_from = _resume_history(resume)
        resumed = step < cfg.meta_iterations  # else nothing is left to train
        if resumed:
            resumed_from = [*resumed_from, step]
        if dp.world_size == 1:
            rng.bit_generator.state = rng_state
        else:  # distributed: only rank 0's sampler state is saved; every rank reseeds
            rng = np.random.default_rng([cfg.seed, dp.rank, step])

    final = out_dir / "model.safetensors"
    config_json = cfg.model_dump(mode="json")
    init_str = str(init) if init is not None else None

    def elapsed() -> float:
        return elapsed0 + time.perf_counter() - t0

    def checkpoint() -> None:
        extra = {"step": step, "rng_state": rng.bit_generator.state, "mzsr_config": config_json,
                 "init": init_str, "elapsed_s": elapsed(), "resumed_from": resumed_from}  # fmt: skip
        save_checkpoint(net, last, arch="mzsr", scale=cfg.scale, model_kwargs=model_kwargs,
                        extra=extra, optimizer=optimizer)  # fmt: skip
        if step >= cfg.meta_iterations:
            extra = {"step": step, "mzsr_config": config_json, "init": init_str,
                     "n_train_images": len(images), "skipped_images": skipped, "elapsed_s": elapsed(),
                     "resumed_from": resumed_from}  # fmt: skip
            save_checkpoint(net, final, arch="mzsr", scale=cfg.scale, model_kwargs=model_kwargs,
                            extra=extra)  # fmt: skip

    n_tasks = cfg.tasks_per_batch // dp.world_size
    net.train()
    bar = tqdm(total=cfg.meta_iterations, initial=min(step, cfg.meta_iterations),
               disable=not (progress and lead), desc=f"MZSR meta-transfer x{cfg.scale}",
               mininterval=0.5 if sys.stderr.isatty() else 30)  # fmt: skip
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    n_sum = 0
    metrics: dict = {}
    log_file = open(out_dir / "log.jsonl", "a") if lead else None
    if lead and resumed:
        announce(f"resuming {resume} from meta-step {step} of {cfg.meta_iterations} "
                 f"(elapsed {elapsed0:.1f} s carried on)")  # fmt: skip
        log_file.write(json.dumps({"step": step, "resumed_from_step": step, "iterations": cfg.meta_iterations,
                                   "elapsed_s": elapsed0, "checkpoint": str(resume)}) + "\n")  # fmt: skip
        log_file.flush()
    try:
        while step < cfg.meta_iterations:
            tasks = [sample_task(images, rng, cfg, device=device) for _ in range(n_tasks)]
            losses = meta_step(net, tasks, cfg, optimizer, step, world_size=dp.world_size)
            step += 1
            bar.update(1)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            n_sum += 1
            if step % cfg.log_every == 0 or step == cfg.meta_iterations:
                metrics = {"step": step, **{k: v / n_sum for k, v in sums.items()},
                           "last_step_weight": float(loss_weights(step - 1, cfg)[-1]),
                           "elapsed_s": elapsed()}  # fmt: skip
                sums, n_sum = {}, 0
                if log_file:
                    log_file.write(json.dumps(metrics) + "\n")
                    log_file.flush()
                bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("support_loss", "query_loss")})
            if step % cfg.checkpoint_every == 0 or step == cfg.meta_iterations:
                if lead:
                    checkpoint()
                if dp.report:  # distributed: every rank reports, rank 0 with the checkpoint
                    dp.report({**metrics, "step": step}, out_dir if lead else None)
    finally:
        bar.close()
        if log_file:
            log_file.close()
    if lead and not final.exists():  # resumed at or past the last step: nothing ran
        checkpoint()
    return final


# --------------------------------------------------------------------------- test time


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


# --------------------------------------------------------------------------- ZSSR


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


# --------------------------------------------------------------------------- released models

#: JWSoh/MZSR's released TensorFlow checkpoints by name: whether meta-trained, and the
#: ``MZSRConfig`` settings each was released with (``main.py`` model choice, ``test.py``
#: ``methods`` and per-model learning rates: lr of step i, the last repeating). ``Multi-scale``
#: was meta-trained over several scales; its scale has to be given. ``Pretrained`` is the
#: large-scale bicubic x2 pretraining (``Large-Scale_Training``), the init of meta-training.
RELEASED_TF: dict[str, dict] = {
    "Directx2": {"meta_trained": True, "scale": 2, "subsample": "direct",
                 "adapt_lr": (2e-2, 1e-2, 1e-2, 1e-2, 5e-3)},
    "Multi-scale": {"meta_trained": True, "scale": None, "subsample": "direct",
                    "adapt_lr": (1e-2, 1e-2, 1e-2, 5e-3)},
    "Bicubicx2": {"meta_trained": True, "scale": 2, "subsample": "bicubic",
                  "adapt_lr": (1e-2, 1e-2, 1e-2, 1e-3)},
    "Directx4": {"meta_trained": True, "scale": 4, "subsample": "direct",
                 "adapt_lr": (1e-2, 5e-3, 5e-3, 5e-3, 5e-3, 1e-3)},
    "Pretrained": {"meta_trained": False, "scale": 2},
}  # fmt: skip


def import_tf(
    prefix: str | Path,
    out: str | Path,
    cfg: MZSRConfig,
    *,
    meta_trained: bool,
    scope: str = "MODEL",
) -> Path:
    """Convert an MZSR TensorFlow checkpoint into an srdistill ``mzsr`` checkpoint.

    Reads ``SCOPE/conv{1..n_layers}/kernel|bias`` from the tensor bundle at ``prefix``
    (``tfbundle``, no TensorFlow needed; other variables such as Adam slots are ignored),
    transposes the kernels HWIO -> OIHW (``models.mzsr.from_tf_variables``; values copied
    exactly) and writes ``out`` with ``training.save_checkpoint``: arch ``mzsr``, scale
    ``cfg.scale``, ``model_kwargs`` (``n_feats`` read from the weights, ``n_layers``,
    ``upsample="matlab"``), and ``imported_from`` (the prefix, its variables, whether the
    checksums were verified). A meta-trained model also gets ``mzsr_config`` (``cfg`` with
    ``n_feats`` as read), so ``srdistill eval --adapt-steps``, ``zssr adapt --model`` and
    ``mzsr.zero_shot`` use it as one of ours; a pretrained one (``meta_trained=False``) has no
    MZSR config and serves as ``meta_train``'s ``init`` (``mzsr train --pretrained``) or as a
    plain SR model.

    Args:
        prefix: checkpoint prefix (``Model/Directx2``), one of its files, or its folder.
        out: the ``.safetensors`` file to write (its folder is created).
        cfg: the settings recorded with the model (``scale``, ``n_layers``, ``subsample``,
            ``adapt_lr``, ...); ``RELEASED_TF`` has the released models' ones.
        meta_trained: record ``mzsr_config`` (True) or not (the bicubic pretraining).
        scope: the variables' scope (MZSR: ``MODEL``).

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: no ``PREFIX.index`` or a data file missing.
        ValueError: not a readable tensor bundle (compressed, truncated, corrupted: checksums
            are verified when ``google-crc32c`` is installed), MZSR variables missing (named),
            an unsupported dtype, or shapes that do not fit ``MZSRNet``.
    """
    bundle = tfbundle.TensorBundle(prefix)
    names = tf_variable_names(cfg.n_layers, scope)
    missing = [n for n in names if n not in bundle]
    if missing:
        others = [n for n in bundle.names() if n.endswith("/kernel")][:8]
        raise ValueError(f"checkpoint {bundle.prefix} lacks MZSR variables {missing} (n_layers="
                         f"{cfg.n_layers}, scope {scope!r}); its kernels: {others}")  # fmt: skip
    extra_layer = f"{scope}/conv{cfg.n_layers + 1}/kernel"
    variables = {n: bundle.read(n) for n in names + ([extra_layer] if extra_layer in bundle else [])}
    net = from_tf_variables(variables, cfg.scale, n_layers=cfg.n_layers, scope=scope)
    cfg = cfg.model_copy(update={"n_feats": net.config["n_feats"]})
    extra = {"imported_from": {"prefix": str(bundle.prefix), "format": "tensorflow-bundle-v2",
                               "variables": names, "crc32c_verified": tfbundle.CRC32C_AVAILABLE}}  # fmt: skip
    if meta_trained:
        extra["mzsr_config"] = cfg.model_dump(mode="json")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_kwargs = {k: v for k, v in net.config.items() if k != "scale"}
    save_checkpoint(net, out, arch="mzsr", scale=cfg.scale, model_kwargs=model_kwargs, extra=extra)
    return out
