"""MZSR's meta-transfer learning (``meta_train``): tasks of random-kernel HR/LR patches
(``sample_task``), MAML's inner steps and the multi-step query loss (``meta_backward``,
``loss_weights``), one outer Adam step (``meta_step``). The method and what differs from the
paper: the package docstring (``srdistill.zeroshot.mzsr``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from srdistill.config import MZSRConfig
from srdistill.sr import degradation
from srdistill.sr.device import resolve_device
from srdistill.sr.models.mzsr import MZSRNet
from srdistill.sr.training import (DataParallel, _load_images, _resume, _resume_history, announce, load_checkpoint,
                                   save_checkpoint)
from srdistill.zeroshot.mzsr.inputs import Tensor, _Upsampled, _nchw, dihedral, upsample

__all__ = [
    "loss_weights",
    "meta_backward",
    "meta_step",
    "meta_train",
    "sample_task",
]


log = logging.getLogger(__name__)


Task = tuple[Tensor, Tensor, Tensor, Tensor]


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
