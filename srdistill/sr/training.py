"""SR training on a (small, distilled) set of HR images, and safetensors checkpoints.

The whole loop is ``train_sr``: random HR crops with flips/rot90, LR made from each crop by
MATLAB bicubic (``imaging.imresize``, uint8 rounding: the evaluation degradation), L1 loss,
Adam, optional step decay. It is reproducible from ``cfg.seed`` and resumes exactly where it
stopped from ``out_dir/last.safetensors``::

    from srdistill.config import TrainConfig
    from srdistill.sr.training import train_sr, load_checkpoint
    path = train_sr(TrainConfig(model="espcn", iterations=2000), 2, hr_files, Path("runs/x2"))
    model, meta = load_checkpoint(path)

Files written in ``out_dir``:

* ``model.safetensors``: the final network (see ``save_checkpoint`` for the metadata).
* ``last.safetensors``: weights + Adam state + step + sampler RNG state, replaced atomically
  every ``cfg.checkpoint_every`` steps and at the end; a later call resumes from it.
* ``log.jsonl``: one line per ``cfg.log_every`` steps: step, mean L1 loss (on [0, 1] pixels)
  over those steps, learning rate, elapsed seconds (training time over all the calls of a
  resumed run); with ``cfg.curriculum.enabled`` also one line at the start of each stage (see
  ``train_sr``); a resumed run one ``{"step": S, "resumed_from_step": S, "iterations",
  "elapsed_s", "checkpoint"}`` line where it resumed (also announced on stderr).
* ``tensorboard/`` (``cfg.tensorboard``): TensorBoard event files of the ``log.jsonl`` metrics
  (``train/loss``, ``train/lr``, ``train/elapsed_s``, ``train/val_psnr_y``) at their steps.

Every file is written mode ``0o666 & ~umask`` (0644), safetensors' own 0600 included.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from srdistill.config import TrainConfig
from srdistill.sr import curriculum, imaging
from srdistill.sr.device import resolve_device, to_tensor
from srdistill.sr.models import ARCHS, build_model

__all__ = [
    "DataParallel",
    "ScalarLog",
    "lr_at",
    "require_tensorboard",
    "train_sr",
    "sample_batch",
    "save_checkpoint",
    "load_checkpoint",
    "load_released_weights",
]

log = logging.getLogger(__name__)

_OPTIM_PREFIX = "__optimizer__."  # tensor-name prefix of the Adam state in last.safetensors
_EMA_PREFIX = "__ema__."  # and of the EMA weights
_RESERVED = ("format", "arch", "scale", "model_kwargs", "optimizer_param_groups", "ema_n_averaged")
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``),
    else set and restored at once under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _publish(tmp: str | Path, path: str | Path) -> None:
    """``os.replace(tmp, path)`` after giving ``tmp`` the mode of a plainly created file
    (``0o666 & ~umask``, 0644 under the usual umask 022): safetensors' writer creates its files
    0600, readable by their owner only, unlike every other output."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def announce(message: str) -> None:
    """One line on the console (stderr, above any tqdm bar) and in the log."""
    tqdm.write(message, file=sys.stderr)
    log.info(message)


def require_tensorboard(option: str) -> type:
    """``torch.utils.tensorboard.SummaryWriter``, for the config field ``option`` that asks for it.

    Raises:
        ImportError: one line naming ``option`` and ``pip install tensorboard``, when the
            ``tensorboard`` package (which ``torch.utils.tensorboard`` needs) cannot be imported.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(f"{option}: true needs the tensorboard package ({exc}); run: pip install tensorboard "
                          "(or pip install 'srdistill[tensorboard]'), or set it false") from None  # fmt: skip
    return SummaryWriter


class ScalarLog:
    """TensorBoard scalars of a training loop's log rows, or nothing (``log_dir`` None).

    ``add(row)`` writes every number of a ``log.jsonl`` row but ``step`` as a scalar at
    ``row["step"]``, tagged ``f"{prefix}/{key}"``; a resumed run (``start_step`` > 0) first drops
    the events a killed run wrote after ``start_step`` (``purge_step``). Event files go to
    ``log_dir`` (created), flushed on every ``add``.

    Raises:
        ImportError: ``log_dir`` given and tensorboard missing (``require_tensorboard(option)``).
    """

    def __init__(self, log_dir: Path | None, prefix: str, *, option: str, start_step: int = 0):
        self.prefix = prefix
        self.writer = None
        if log_dir is not None:
            writer_cls = require_tensorboard(option)
            # a resumed run redoes the steps after start_step: drop those a killed run logged
            self.writer = writer_cls(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)

    def add(self, row: dict) -> None:
        """Write each numeric (non-bool) value of a ``log.jsonl`` row, except ``step``, as the
        scalar ``<prefix>/<key>`` at ``row["step"]``; a no-op without a writer.

        Raises:
            KeyError: ``row`` has no ``step``.
        """
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{self.prefix}/{key}", value, global_step=int(row["step"]))
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file (a no-op without a writer)."""
        if self.writer is not None:
            self.writer.close()


def sample_batch(
    images: list[np.ndarray],
    rng: np.random.Generator,
    *,
    batch_size: int,
    hr_size: int,
    scale: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Random training pairs: uniform image, uniform crop position, random hflip/vflip/rot90.

    Args:
        images: ``(H, W, 3)`` uint8 HR images, each at least ``hr_size`` on both sides.
        rng: the sampler's generator (advanced in place).
        batch_size: crops to draw.
        hr_size: HR crop side in pixels, a multiple of ``scale``.
        scale: SR factor.

    Returns:
        ``(lr, hr)``: ``(B, hr_size/scale, hr_size/scale, 3)`` and ``(B, hr_size, hr_size, 3)``
        uint8, with ``lr = imaging.imresize(hr, 1/scale)`` (MATLAB bicubic, uint8 rounding).
    """
    crops = []
    for _ in range(batch_size):
        img = images[rng.integers(len(images))]
        y = rng.integers(img.shape[0] - hr_size + 1)
        x = rng.integers(img.shape[1] - hr_size + 1)
        crop = img[y : y + hr_size, x : x + hr_size]
        hflip, vflip, rot = rng.random(3) < 0.5
        if hflip:
            crop = crop[:, ::-1]
        if vflip:
            crop = crop[::-1]
        if rot:
            crop = crop.transpose(1, 0, 2)  # rot90 up to the flips: the 8 dihedral variants
        crops.append(crop)
    hr = np.stack(crops)  # (B, H, W, 3)
    lr = imaging.imresize(hr, 1 / scale, spatial_axes=(1, 2))  # (B, H/s, W/s, 3)
    return lr, hr


def _load_images(paths: list[str | Path], min_side: int) -> tuple[list[np.ndarray], list[dict]]:
    """Read every HR image; those smaller than ``min_side`` are skipped (returned with a reason)."""
    images, skipped = [], []
    for p in paths:
        img = imaging.read_image(p)
        if min(img.shape[:2]) < min_side:
            reason = (
                f"{img.shape[1]}x{img.shape[0]} is smaller than the {min_side}x{min_side} HR crop"
            )
            log.warning("skipping training image %s: %s", p, reason)
            skipped.append({"file": str(p), "reason": reason})
        else:
            images.append(img)
    return images, skipped


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of the update after ``step`` finished steps (``cfg.schedule``), >= ``lr_min``."""
    if cfg.schedule == "cosine":
        lr = cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * step / cfg.iterations))
    elif cfg.schedule == "multistep":
        lr = cfg.lr * 0.5 ** sum(step >= m for m in cfg.lr_milestones)
    else:
        lr = cfg.lr * 0.5 ** (step // cfg.lr_decay_every) if cfg.lr_decay_every else cfg.lr
    return max(lr, cfg.lr_min)


@dataclass(frozen=True)
class DataParallel:
    """What a data-parallel runner (``runner.train_ray``, Ray Train) hands to ``train_sr``.

    The default is a single process. Worker ``rank`` of ``world_size`` samples its crops from
    its shard ``hr_images[rank::world_size]`` with ``batch_size // world_size`` crops a step;
    ``prepare_model`` wraps the network for gradient all-reduce (DDP); ``report`` receives the
    metrics of every checkpoint step and, on rank 0, the directory holding ``last.safetensors``
    (every rank must call it, as Ray Train requires); ``resume_from`` is a checkpoint file the
    runner restored.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    prepare_model: Callable[[nn.Module], nn.Module] | None = None
    report: Callable[[dict, Path | None], None] | None = None
    resume_from: Path | None = None


def train_sr(
    cfg: TrainConfig,
    scale: int,
    hr_images: list[str | Path],
    out_dir: Path,
    *,
    progress: bool = True,
    dp: DataParallel = DataParallel(),
) -> Path:
    """Train ``cfg.model`` at ``scale`` on HR images; resume from ``out_dir/last.safetensors``.

    Each step draws ``cfg.batch_size`` HR crops of ``cfg.lr_patch * scale`` pixels (see
    ``sample_batch``), makes their LR by MATLAB bicubic, and takes one Adam step (betas
    0.9/0.999, eps 1e-8, lr from ``lr_at``) on the L1 loss between ``model(LR)`` and HR, both
    float32 in [0, 1] (EDSR's recipe, arXiv:1707.02921 §4), with optional gradient-norm
    clipping, an EMA of the weights (which is then the saved model), periodic PSNR on
    ``cfg.val_dataset`` and bf16/fp16 autocast on CUDA. Weights are initialised from
    ``torch.manual_seed(cfg.seed)`` and crops drawn from ``np.random.default_rng(cfg.seed)``
    (plus the worker rank); a resumed run restores the Adam, EMA and sampler state, so it ends
    with the same weights as an uninterrupted one (on the same device and threads). A resume
    is announced on stderr (``announce``) and logged (``resumed_from_step``); ``elapsed_s``
    carries on from the checkpoint's, and ``model.safetensors`` records ``elapsed_s`` and
    ``resumed_from`` (the steps resumed at, ``[]`` for a run never interrupted).

    Curriculum (``cfg.curriculum.enabled``, TripleD step 4; ``srdistill.sr.curriculum``): the
    usable images are scored (``curriculum.image_complexity``) and steps before
    ``curriculum.switch_step(cfg)`` draw only from the easy ones (``split_easy``); at the
    switch the current network's loss on each image (``per_image_loss``, centre crop of the
    HR crop size) picks the stage-2 pool (``stage2_pool``), which the remaining steps draw
    from. ``log.jsonl`` gets ``{"step": 0, "curriculum_stage": 1, "images", "easy",
    "switch_step"}`` at the start and ``{"step": switch, "curriculum_stage": 2, "pool", "easy",
    "uncertain", "easy_loss", "hard_loss"}`` at the switch; ``last.safetensors`` keeps the pool
    (``curriculum_pool``, indices into the usable images in ``hr_images`` order), so a run
    resumed past the switch reuses it, and ``model.safetensors`` records ``curriculum``
    (``Schedule.summary``). Data parallel: each rank schedules its own shard; only rank 0's
    pool is saved, so on resume with ``world_size > 1`` each rank rebuilds its pool with the
    restored network (the sampler is reseeded then too). Disabled, nothing changes: the same
    random draws and weights as without the option.

    Args:
        cfg: training settings.
        scale: SR factor (2, 3, 4, ...).
        hr_images: HR image files; those smaller than the HR crop are skipped with a warning
            (recorded in the model metadata as ``skipped_images``).
        out_dir: created if missing; holds ``model.safetensors``, ``last.safetensors``,
            ``log.jsonl`` and, with ``cfg.tensorboard``, ``tensorboard/`` (rank 0).
        progress: show a tqdm progress bar (rank 0).
        dp: data-parallel context (see ``DataParallel``); one process by default.

    Returns:
        ``out_dir / "model.safetensors"``.

    Raises:
        ValueError: no usable image, ``last.safetensors`` belongs to another arch/scale, or
            the curriculum cannot score the images (``curriculum.image_complexity``).
        imaging.ImageReadError: an image cannot be read.
        ImportError: ``cfg.tensorboard`` without the tensorboard package (``require_tensorboard``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = dp.device or resolve_device(cfg.device)
    lead = dp.rank == 0
    hr_size = cfg.lr_patch * scale
    shard = list(hr_images)[dp.rank :: dp.world_size] or list(hr_images)  # distributed
    images, skipped = _load_images(shard, hr_size)
    if not images:
        raise ValueError(
            f"no training image is at least {hr_size}x{hr_size} (lr_patch {cfg.lr_patch} x scale "
            f"{scale}); {len(skipped)} image(s) given"
        )
    schedule = None
    if cfg.curriculum.enabled:
        dropped = {s["file"] for s in skipped}
        usable = [p for p in shard if str(p) not in dropped]  # aligned with ``images``
        schedule = curriculum.Schedule.plan(cfg, usable, images)

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, dp.rank])
    try:
        net = build_model(cfg.model, scale, **cfg.model_kwargs).to(device)
    except TypeError as exc:
        raise ValueError(f"train.model_kwargs {cfg.model_kwargs} do not fit {cfg.model}: {exc}") from None
    model = dp.prepare_model(net) if dp.prepare_model else net  # distributed: DDP wrapper
    model_kwargs = {k: v for k, v in net.config.items() if k != "scale"}
    trainable = [p for p in net.parameters() if p.requires_grad]  # EDSR's mean shifts are frozen
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    ema = None
    if cfg.ema_decay is not None:
        ema = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay)
        )
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    if amp_dtype is not None and device.type != "cuda":
        log.warning("amp=%s applies on CUDA only; training in float32 on %s", cfg.amp, device)
        amp_dtype = None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step = 0
    elapsed0 = 0.0  # training seconds before this call (from the checkpoint)
    resumed_from: list[int] = []  # the steps this run was resumed at, oldest first
    resumed = False
    last = out_dir / "last.safetensors"
    resume = dp.resume_from if dp.resume_from is not None else last
    if resume.exists():
        step, rng_state = _resume(resume, net, optimizer, ema, arch=cfg.model, scale=scale)
        elapsed0, resumed_from = _resume_history(resume)
        if dp.world_size == 1:
            rng.bit_generator.state = rng_state  # exactly where the sampler stopped
            if schedule is not None and step >= schedule.switch_step:
                pool = _metadata(resume).get("curriculum_pool")  # the pool chosen at the switch
                if pool is not None:
                    schedule.restore_pool(json.loads(pool))
        else:  # only rank 0's sampler state is saved: every rank reseeds from the step
            rng = np.random.default_rng([cfg.seed, dp.rank, step])
        resumed = step < cfg.iterations  # else nothing is left to train: no resume to record
        if resumed:
            resumed_from = [*resumed_from, step]

    final = out_dir / "model.safetensors"

    def elapsed() -> float:
        return elapsed0 + time.perf_counter() - t0

    def checkpoint() -> None:
        extra = {"step": step, "rng_state": rng.bit_generator.state,
                 "train_config": cfg.model_dump(mode="json"), "elapsed_s": elapsed(),
                 "resumed_from": resumed_from}  # fmt: skip
        if schedule is not None and schedule.pool is not None:
            extra["curriculum_pool"] = schedule.pool.tolist()
        save_checkpoint(net, last, arch=cfg.model, scale=scale, model_kwargs=model_kwargs,
                        extra=extra, optimizer=optimizer, ema=ema)  # fmt: skip
        if step >= cfg.iterations:  # the trained network (the EMA if kept)
            extra = {"step": step, "train_config": cfg.model_dump(mode="json"), "ema": ema is not None,
                     "n_train_images": len(images), "skipped_images": skipped, "elapsed_s": elapsed(),
                     "resumed_from": resumed_from}  # fmt: skip
            if schedule is not None:
                extra["curriculum"] = schedule.summary()
            save_checkpoint(ema.module if ema else net, final, arch=cfg.model, scale=scale,
                            model_kwargs=model_kwargs, extra=extra)  # fmt: skip

    tb = ScalarLog(out_dir / "tensorboard" if lead and cfg.tensorboard else None, "train",
                   option="train.tensorboard", start_step=step)  # fmt: skip
    model.train()
    bar = tqdm(total=cfg.iterations, initial=min(step, cfg.iterations), disable=not (progress and lead),
               desc=f"train {cfg.model} x{scale}", mininterval=0.5 if sys.stderr.isatty() else 30)  # fmt: skip
    t0, loss_sum, loss_n = time.perf_counter(), 0.0, 0
    metrics: dict = {}
    log_file = open(out_dir / "log.jsonl", "a") if lead else None

    def note(record: dict) -> None:
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def draw_from(step: int) -> list[np.ndarray]:
        """The images step ``step`` samples from: all, or those of its curriculum stage."""
        if schedule is None:
            return images
        if schedule.needs_pool(step):  # the switch: measure the network, then pick the pool
            if step > schedule.switch_step:
                log.warning("curriculum pool not restored from %s: rebuilt at step %d", resume, step)
            losses = curriculum.per_image_loss(net, images, scale, device, crop=hr_size)
            pool = schedule.build_pool(losses)
            easy = schedule.easy
            note({"step": step, "curriculum_stage": 2, "pool": len(pool), "easy": int(easy.sum()),
                  "uncertain": int(easy[pool].sum()), "easy_loss": float(losses[easy].mean()),
                  "hard_loss": float(losses[~easy].mean()) if (~easy).any() else None})  # fmt: skip
        return [images[i] for i in schedule.indices_at(step)]

    if lead and resumed:
        announce(f"resuming {resume} from step {step} of {cfg.iterations} "
                 f"(elapsed {elapsed0:.1f} s carried on)")  # fmt: skip
        note({"step": step, "resumed_from_step": step, "iterations": cfg.iterations,
              "elapsed_s": elapsed0, "checkpoint": str(resume)})  # fmt: skip

    try:
        if schedule is not None and step == 0:
            note({"step": 0, "curriculum_stage": 1, "images": len(images), "easy": int(schedule.easy.sum()),
                  "switch_step": schedule.switch_step})  # fmt: skip
        while step < cfg.iterations:
            lr_now = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            lr_np, hr_np = sample_batch(draw_from(step), rng, batch_size=cfg.batch_size // dp.world_size,
                                        hr_size=hr_size, scale=scale)  # fmt: skip
            lr_t = to_tensor(lr_np, device)  # (B, 3, p, p) float32 in [0, 1]
            hr_t = to_tensor(hr_np, device)  # (B, 3, s*p, s*p)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = F.l1_loss(model(lr_t).float(), hr_t)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(net)
            step += 1
            bar.update(1)
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1

            if step % cfg.log_every == 0 or step == cfg.iterations:
                metrics = {"step": step, "loss": loss_sum / loss_n, "lr": lr_now,
                           "elapsed_s": elapsed()}  # fmt: skip
                loss_sum, loss_n = 0.0, 0
                if lead and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.iterations):
                    metrics["val_psnr_y"] = _validate(ema.module if ema else net, cfg, scale, device)
                note(metrics)
                tb.add(metrics)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "val_psnr_y")})
            if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
                if lead:
                    checkpoint()
                if dp.report:  # distributed: every rank reports, rank 0 with the checkpoint
                    dp.report({**metrics, "step": step}, out_dir if lead else None)
    finally:
        bar.close()
        tb.close()
        if log_file:
            log_file.close()

    if lead and not final.exists():  # resumed at or past the last step: nothing ran
        checkpoint()
    return final


def _validate(net: nn.Module, cfg: TrainConfig, scale: int, device: torch.device) -> float:
    """Mean PSNR on Y (dB) of ``net`` on ``cfg.val_dataset`` (the evaluation protocol)."""
    from srdistill.sr.evaluation import evaluate  # evaluation imports this module

    return evaluate(net, cfg.val_dataset, scale, device=str(device.type))["psnr_y"]


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    arch: str,
    scale: int,
    model_kwargs: dict,
    extra: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> None:
    """Write ``model``'s state dict to a safetensors file, atomically (temp file + ``os.replace``).

    Metadata (all strings): ``arch``, ``scale``, ``model_kwargs`` (JSON) and every key of
    ``extra`` as JSON. With ``optimizer`` its tensors are stored under ``__optimizer__.*`` and
    its ``param_groups`` as JSON, and with ``ema`` the averaged weights under ``__ema__.*``, so
    training can resume from the file.

    Args:
        model: a network of ``ARCHS[arch]``.
        path: target file (``.safetensors``).
        arch: key of ``srdistill.sr.models.ARCHS``.
        scale: SR factor.
        model_kwargs: constructor kwargs other than ``scale`` (JSON-serialisable).
        extra: more JSON-serialisable metadata (step, config, ...).
        optimizer: optional optimizer whose state is saved too.

    Raises:
        ValueError: ``arch`` unknown, or ``extra`` uses a reserved key.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {sorted(ARCHS)}")
    extra = extra or {}
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra metadata uses reserved keys {clash}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "pt",
        "arch": arch,
        "scale": str(int(scale)),
        "model_kwargs": json.dumps(model_kwargs),
    }
    metadata.update({k: json.dumps(v) for k, v in extra.items()})
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, param_state in state["state"].items():
            for name, value in param_state.items():
                tensors[f"{_OPTIM_PREFIX}{idx}.{name}"] = (
                    torch.as_tensor(value).detach().cpu().contiguous()
                )
        metadata["optimizer_param_groups"] = json.dumps(state["param_groups"])
    if ema is not None:
        for k, v in ema.module.state_dict().items():
            tensors[f"{_EMA_PREFIX}{k}"] = v.detach().cpu().contiguous()
        metadata["ema_n_averaged"] = str(int(ema.n_averaged))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    _publish(tmp, path)  # 0644, not safetensors' 0600


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the raw metadata of a safetensors checkpoint, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(
            f"checkpoint {str(path)!r} is not a readable safetensors file ({exc})"
        ) from None
    missing = [k for k in ("arch", "scale", "model_kwargs") if k not in metadata]
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} lacks metadata {missing} (not written by srdistill?)"
        )
    return tensors, metadata


def load_checkpoint(
    path: str | Path, *, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict]:
    """Rebuild a network from a checkpoint written by ``save_checkpoint``.

    Args:
        path: ``.safetensors`` file.
        device: where to put the model.

    Returns:
        ``(model, meta)``: the model in eval mode, and the metadata decoded: ``arch`` (str),
        ``scale`` (int), ``model_kwargs`` (dict) and the ``extra`` keys (e.g. ``step``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a safetensors file, srdistill metadata missing, unknown arch, or the
            weights do not match the architecture.
    """
    tensors, raw = _read(path)
    meta = {
        k: json.loads(v)
        for k, v in raw.items()
        if k not in ("format", "arch", "optimizer_param_groups", "ema_n_averaged")
    }
    meta["arch"] = raw["arch"]
    meta["scale"] = int(raw["scale"])
    if meta["arch"] not in ARCHS:
        raise ValueError(
            f"checkpoint {str(path)!r}: arch {meta['arch']!r} is not one of {sorted(ARCHS)}"
        )
    model = build_model(meta["arch"], meta["scale"], **meta["model_kwargs"])
    weights = {k: v for k, v in tensors.items() if not k.startswith("__")}  # no training state
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {str(path)!r} does not match {meta['arch']}: {exc}") from None
    return model.to(device).eval(), meta


def load_released_weights(arch: str, scale: int, path: str | Path) -> nn.Module:
    """A network of ``ARCHS[arch]`` at ``scale`` with weights from an official release file.

    Accepts a PyTorch pickle (``.pt``/``.pth``, read with ``weights_only=True``) or a
    safetensors file holding the state dict directly (EDSR/RCAN releases), or under
    ``"params_ema"``/``"params"`` (SwinIR releases) or ``"state_dict"``; a ``"module."`` prefix
    (DataParallel) is stripped. Loading is strict: every key and shape must match.

    Returns:
        The model in eval mode on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown arch, an unreadable file, or weights that do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    model = build_model(arch, scale)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and safetensors raise many types for a bad file
        raise ValueError(f"weights file {str(path)!r} is not readable ({exc})") from None
    for key in ("params_ema", "params", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{str(path)!r} does not match {arch} x{scale}: {exc}") from None
    return model.eval()


def _metadata(path: Path) -> dict[str, str]:
    """The raw (JSON-string) metadata of a safetensors file, without reading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _resume_history(path: Path) -> tuple[float, list[int]]:
    """``(elapsed_s, resumed_from)`` stored in a checkpoint; ``(0.0, [])`` for older ones."""
    raw = _metadata(path)
    elapsed = float(json.loads(raw["elapsed_s"])) if "elapsed_s" in raw else 0.0
    resumed = [int(s) for s in json.loads(raw["resumed_from"])] if "resumed_from" in raw else []
    return elapsed, resumed


def _resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: torch.optim.swa_utils.AveragedModel | None,
    *,
    arch: str,
    scale: int,
) -> tuple[int, dict]:
    """Load weights, optimizer and EMA state of ``last.safetensors`` in place; return (step, rng)."""
    tensors, raw = _read(path)
    if raw["arch"] != arch or int(raw["scale"]) != scale:
        raise ValueError(
            f"{str(path)!r} is a {raw['arch']} x{raw['scale']} checkpoint, not {arch} x{scale}: "
            "use another output directory or delete it"
        )
    if "step" not in raw or "optimizer_param_groups" not in raw or "rng_state" not in raw:
        raise ValueError(
            f"{str(path)!r} has no training state (step, optimizer, rng_state) to resume from"
        )
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("__")}, strict=True)
    if ema is not None:
        if "ema_n_averaged" not in raw:
            raise ValueError(f"{str(path)!r} was trained without EMA; cannot resume with ema_decay set")
        n = len(_EMA_PREFIX)
        ema.module.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(_EMA_PREFIX)})
        ema.n_averaged.fill_(int(raw["ema_n_averaged"]))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(_OPTIM_PREFIX):
            idx, name = key[len(_OPTIM_PREFIX) :].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": json.loads(raw["optimizer_param_groups"])}
    )
    return int(json.loads(raw["step"])), json.loads(raw["rng_state"])
