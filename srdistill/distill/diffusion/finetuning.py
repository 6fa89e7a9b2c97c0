"""The fine-tuning loop of SRDD's diffusion model (``finetune``), in plain PyTorch or under
DeepSpeed ZeRO when the runner (Ray Train) hands it a data-parallel context
(``DiffusionParallel``); its iteration count and EMA schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from srdistill.config import FinetuneConfig
from srdistill.distill.diffusion.backbone import Backbone, _check_loss, save_finetuned
from srdistill.distill.diffusion.encoding import EncodedSet, _to_signed
from srdistill.distill.diffusion.losses import MemoryBank, posterior_tables, srdd_loss, vb_bits
from srdistill.sr.device import resolve_device
from srdistill.sr.training import ScalarLog, announce

__all__ = [
    "DiffusionParallel",
    "ema_decay",
    "finetune",
    "total_iterations",
]


@dataclass(frozen=True)
class DiffusionParallel:
    """What a data-parallel runner (Ray Train) hands to ``finetune``; one process by default.

    Worker ``rank`` of ``world_size`` trains on its shard of the encoded set with
    ``batch_size // world_size`` samples a step. ``report(metrics, checkpoint_dir)`` is called
    by every rank at every checkpoint with this rank's checkpoint directory (files named per
    rank, so the runner can merge them); ``resume_from`` is a restored checkpoint directory.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    report: Callable[[dict, Path | None], None] | None = None
    resume_from: Path | None = None


class _Plain:
    """The plain-PyTorch engine: AdamW, optional clipping, checkpoints with torch.save."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], cfg: FinetuneConfig):
        self.model, self.params, self.clip = model, params, cfg.grad_clip
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def __call__(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss = fn()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        return loss

    def save(self, ckpt: Path, rank: int) -> None:
        trained = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save({"model": trained, "optimizer": self.optimizer.state_dict()}, ckpt / ".engine.tmp")
        os.replace(ckpt / ".engine.tmp", ckpt / "engine.pt")

    def load(self, ckpt: Path) -> None:
        state = torch.load(ckpt / "engine.pt", weights_only=True)
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])


class _DeepSpeed:
    """DeepSpeed engine (ZeRO ``cfg.zero_stage``, bf16 when asked) around the denoiser; the
    optimizer is torch's AdamW (DeepSpeed's fused Adam needs CUDA ops we do not build)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], cfg: FinetuneConfig,
                 micro_batch: int, bf16: bool):  # fmt: skip
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if cfg.grad_clip:
            ds_config["gradient_clipping"] = cfg.grad_clip
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.stage = cfg.zero_stage

    def __call__(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss = fn()
        self.engine.backward(loss)
        self.engine.step()
        return loss

    def gathered(self, params: list[nn.Parameter]):
        """Context in which ZeRO-3-partitioned ``params`` are whole (a no-op below stage 3)."""
        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)

    def save(self, ckpt: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(ckpt), tag="deepspeed")

    def load(self, ckpt: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(ckpt), tag="deepspeed", load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint in {str(ckpt)!r}")


def total_iterations(cfg: FinetuneConfig, num_patches: int) -> int:
    """The optimizer steps of a run: ``cfg.iterations``, or with ``cfg.epochs`` set
    ceil(epochs x steps per epoch), steps per epoch = ``num_patches`` // ``cfg.batch_size``
    (at least 1): SRDD's release loops over epochs of a shuffled ``DataLoader`` with
    ``drop_last``, ``global batch`` samples a step. ``num_patches`` counts all encoded patches
    (every worker's shard)."""
    if cfg.epochs is None:
        return cfg.iterations
    return max(1, int(np.ceil(cfg.epochs * max(1, num_patches // cfg.batch_size) - 1e-9)))


def ema_decay(cfg: FinetuneConfig, step: int) -> float:
    """EMA decay of the update after optimizer step ``step`` (0-based): ``cfg.ema_decay``, or
    with ``cfg.ema_warmup`` min(ema_decay, (1 + step) / (10 + step)) (as diffusers' EMAModel),
    so that a short run is not dominated by the initial weights. SRDD's release: no warm-up
    (its EMA starts as a copy of the model and moves by 1 - 0.9999 a step)."""
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


def _epoch_batch(n: int, micro: int, steps_per_epoch: int, step: int, seed: int, rank: int) -> np.ndarray:
    """Rows of step ``step`` when training in epochs: each epoch is a fresh permutation of this
    worker's ``n`` rows (seeded by seed, rank and epoch, so a resumed run continues it), cut
    into ``steps_per_epoch`` batches of ``micro``; the rest is dropped (``drop_last``), and a
    shard smaller than an epoch's batches is repeated."""
    epoch, pos = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, rank, epoch, 1]).permutation(n)
    if n < micro * steps_per_epoch:
        order = np.resize(order, micro * steps_per_epoch)
    return order[pos * micro : (pos + 1) * micro]


def _draw(data: EncodedSet, backbone: Backbone, cfg: FinetuneConfig, idx: np.ndarray,
          rng: np.random.Generator, device: torch.device) -> torch.Tensor:  # fmt: skip
    """Clean training samples x0 ``(B, C, h, w)`` float32 for rows ``idx``: DiT latents drawn
    from the stored moments (the mirror view when flipped) x latent_scale; UNet pixel crops in
    [-1, 1] (centre or random crop, random horizontal flip)."""
    flips = rng.random(len(idx)) < 0.5 if cfg.flip else np.zeros(len(idx), bool)
    if backbone.vae is not None:
        moments = data.samples[idx, flips.astype(np.int64)].to(device).float()  # (B, 2C, h, w)
        mean, std = moments.chunk(2, dim=1)
        noise = torch.from_numpy(rng.standard_normal(mean.shape, dtype=np.float32)).to(device)
        return (mean + std * noise) * backbone.latent_scale
    res = backbone.resolution
    crops = []
    for i, flip in zip(idx, flips):
        img = data.samples[i].numpy()
        h, w = img.shape[:2]
        if cfg.crop == "random":
            y, x = int(rng.integers(0, h - res + 1)), int(rng.integers(0, w - res + 1))
        else:
            y, x = (h - res) // 2, (w - res) // 2
        crop = img[y : y + res, x : x + res]
        crops.append(crop[:, ::-1] if flip else crop)
    return _to_signed(np.stack(crops), device)


def finetune(cfg: FinetuneConfig, backbone: Backbone, data: EncodedSet, out_dir: Path, *,
             progress: bool = True, dp: DiffusionParallel = DiffusionParallel()) -> Path:  # fmt: skip
    """Fine-tune ``backbone``'s trainable parameters (in place) on one worker's encoded set
    with SRDD's loss; the saved model is their EMA.

    Each step draws ``cfg.batch_size // world_size`` samples (``_draw``; uniformly with
    replacement, or with ``cfg.epochs`` set, epoch by epoch: a shuffled pass over this
    worker's shard without its last partial batch, as the release's ``DataLoader``), a
    timestep t ~ U{0..T-1} and Gaussian noise, replaces each label by the null class with
    probability ``cfg.class_dropout`` (so classifier-free guidance works), and takes an AdamW
    step on ``srdd_loss`` (L_simple, + L_t of ``vb_bits`` with ``cfg.loss == "hybrid"``; memory
    terms by the conditioning label or, ``cfg.memory_labels == "cluster"``, by the cluster)
    over the trainable parameters; an EMA of them (decay ``ema_decay``) is the saved model.
    The run has ``total_iterations`` steps (``cfg.epochs`` counts ``data.num_total``, all
    workers' patches), logged first as ``{"step": 0, "iterations": ..., "epochs": ...}`` when
    ``epochs`` is set. Under a data-parallel ``dp`` (Ray Train) the step runs in a DeepSpeed engine
    (ZeRO ``cfg.zero_stage``); otherwise in plain PyTorch. On CUDA the forward pass runs under
    bf16 autocast (DeepSpeed's bf16 mode too) unless ``cfg.precision == "fp32"``. Every
    ``cfg.checkpoint_every`` steps and at the end a checkpoint (engine
    state, EMA, step, RNG, memory banks; one file set per rank) goes to
    ``out_dir/checkpoint`` and to ``dp.report``; a later call (or ``dp.resume_from``) resumes
    from it at its step, announced on stderr and logged as ``{"step": S, "resumed_from_step":
    S, ...}``; ``elapsed_s`` carries on from the checkpoint's, and ``backbone.json`` records
    ``finetune: {step, iterations, epochs, patches, elapsed_s, resumed_from}`` (the steps
    resumed at).

    Args:
        cfg: fine-tuning settings.
        backbone: from ``build_backbone``; its trainable parameters are updated.
        data: this worker's shard (``load_encoded``).
        out_dir: created if missing; ``model/`` (``save_finetuned``, rank 0), ``checkpoint/``,
            ``log.jsonl`` (rank 0: step, loss terms, images/s) and, with ``cfg.tensorboard``,
            ``tensorboard/`` (rank 0: the ``log.jsonl`` numbers as scalars ``finetune/<key>``).

    Returns:
        ``out_dir / "model"``.

    Raises:
        ValueError: empty data, labels outside ``[0, k)``, a checkpoint of another run, or
            ``loss: hybrid`` for a backbone without learned variance.
        ImportError: ``cfg.tensorboard`` without the tensorboard package.
    """
    from diffusers import DDPMScheduler

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(data.clusters) == 0:
        raise ValueError("finetune: no encoded patch to train on")
    if int(data.clusters.min()) < 0 or int(data.clusters.max()) >= backbone.num_clusters:
        raise ValueError(f"finetune: cluster ids must lie in [0, {backbone.num_clusters})")
    _check_loss(cfg, backbone)
    iterations = total_iterations(cfg, data.num_total)
    steps_per_epoch = max(1, data.num_total // cfg.batch_size)
    device = dp.device or resolve_device(cfg.device)
    lead = dp.rank == 0
    micro = max(1, cfg.batch_size // dp.world_size)
    use_ds = dp.report is not None  # data-parallel: DeepSpeed all-reduces the gradients
    bf16 = device.type == "cuda" and cfg.precision == "bf16"
    model = backbone.model.to(device).train()
    if backbone.vae is not None:
        backbone.vae.to(device)
    trainable = backbone.trainable_parameters()
    names, params = list(trainable), list(trainable.values())
    engine = _DeepSpeed(model, params, cfg, micro, bf16) if use_ds else _Plain(model, params, cfg)
    gathered = engine.gathered if use_ds else (lambda ps: contextlib.nullcontext())
    with gathered(params):
        ema = [p.detach().float().clone() for p in params]
    sched = DDPMScheduler(**backbone.schedule)
    alphas = sched.alphas_cumprod.to(device)
    tables = posterior_tables(sched.betas) if cfg.loss == "hybrid" else None
    memory = MemoryBank(backbone.num_clusters, cfg.memory_size)
    rng = np.random.default_rng([cfg.seed, dp.rank])
    step = 0
    elapsed0, resumed_from, resumed = 0.0, [], False  # carried over from the checkpoint
    ckpt = out_dir / "checkpoint"
    resume = dp.resume_from if dp.resume_from is not None else ckpt
    if dp.resume_from is not None and not (resume / f"state_rank{dp.rank}.pt").is_file():
        raise ValueError(f"{str(resume)!r} holds no state for rank {dp.rank}: it was saved by a "
                         "run with fewer workers; resume with the same finetune.workers")  # fmt: skip
    if (resume / f"state_rank{dp.rank}.pt").is_file():
        engine.load(resume)
        state = torch.load(resume / f"state_rank{dp.rank}.pt", weights_only=False)
        if state["names"] != names:
            raise ValueError(f"{str(resume)!r} is a checkpoint of another model: delete it")
        step = state["step"]
        ema = [t.to(device) for t in state["ema"]]
        rng.bit_generator.state = state["rng"]
        memory.load_state_dict(state["memory"], device)
        elapsed0, resumed_from = float(state.get("elapsed_s", 0.0)), list(state.get("resumed_from", []))
        resumed = step < iterations  # else nothing is left to train
        if resumed:
            resumed_from.append(step)

    def elapsed() -> float:
        return elapsed0 + time.perf_counter() - t0

    def history() -> dict:
        return {"step": step, "iterations": iterations, "epochs": cfg.epochs, "patches": data.num_total,
                "elapsed_s": round(elapsed(), 2), "resumed_from": resumed_from}  # fmt: skip

    def save_checkpoint() -> None:
        ckpt.mkdir(parents=True, exist_ok=True)
        engine.save(ckpt, dp.rank)
        tmp = ckpt / f".state_rank{dp.rank}.tmp"
        torch.save({"step": step, "names": names, "ema": [t.cpu() for t in ema],
                    "rng": rng.bit_generator.state, "memory": memory.state_dict(),
                    "elapsed_s": elapsed(), "resumed_from": resumed_from}, tmp)  # fmt: skip
        os.replace(tmp, ckpt / f"state_rank{dp.rank}.pt")
        if lead and step >= iterations:
            save_finetuned(backbone, ckpt / "model", _final_weights(backbone, names, ema), {"finetune": history()})

    start = step
    log_file = out_dir / "log.jsonl"
    tb = ScalarLog(out_dir / "tensorboard" if lead and cfg.tensorboard else None, "finetune",
                   option="finetune.tensorboard", start_step=step)  # fmt: skip
    bar = tqdm(total=iterations, initial=step, desc="finetune", disable=not (progress and lead),
               mininterval=0.5 if sys.stderr.isatty() else 30)  # a line per 30 s in a log file
    t0, seen, sums, n = time.perf_counter(), 0, {"loss": 0.0, "simple": 0.0, "vb": 0.0, "pos": 0.0, "neg": 0.0}, 0
    if lead and step == 0 and cfg.epochs is not None:
        with open(log_file, "a") as f:
            f.write(json.dumps({"step": 0, "iterations": iterations, "epochs": cfg.epochs, "patches": data.num_total,
                                "steps_per_epoch": steps_per_epoch, "batch_size": cfg.batch_size}) + "\n")  # fmt: skip
    if lead and resumed:
        announce(f"resuming {resume} from step {step} of {iterations} "
                 f"(elapsed {elapsed0:.1f} s carried on)")  # fmt: skip
        with open(log_file, "a") as f:
            f.write(json.dumps({"step": step, "resumed_from_step": step, "iterations": iterations,
                                "elapsed_s": round(elapsed0, 2), "checkpoint": str(resume)}) + "\n")  # fmt: skip
    while step < iterations:
        if cfg.epochs is None:
            idx = rng.integers(0, len(data.clusters), micro)
        else:
            idx = _epoch_batch(len(data.clusters), micro, steps_per_epoch, step, cfg.seed, dp.rank)
        x0 = _draw(data, backbone, cfg, idx, rng, device)
        clusters = data.clusters[idx].to(device)
        drop = torch.from_numpy(rng.random(micro) < cfg.class_dropout).to(device)
        labels = torch.where(drop, torch.full_like(clusters, backbone.null_class), clusters)
        memory_labels = clusters if cfg.memory_labels == "cluster" else labels
        t = torch.from_numpy(rng.integers(0, sched.config.num_train_timesteps, micro)).to(device)
        noise = torch.from_numpy(rng.standard_normal(x0.shape, dtype=np.float32)).to(device)
        x_t = sched.add_noise(x0, noise, t)
        parts: dict[str, float] = {}

        def loss_fn() -> torch.Tensor:
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                eps, v = backbone.predict(x_t, t, labels)
            vb = vb_bits(tables, eps, v, x0, x_t, t) if tables is not None else None
            loss, p = srdd_loss(eps, noise, x_t, x0, alphas[t], memory_labels, memory, cfg.lambda_pos,
                                cfg.lambda_neg, vb=vb, reduce=cfg.memory_reduce)  # fmt: skip
            parts.update(p)
            return loss

        loss = engine(loss_fn)
        with torch.no_grad(), gathered(params):
            decay = ema_decay(cfg, step)
            for e, p in zip(ema, params):
                e.lerp_(p.detach().float(), 1 - decay)
        step += 1
        seen += micro
        n += 1
        sums["loss"] += float(loss.detach())
        for k in ("simple", "vb", "pos", "neg"):
            sums[k] += parts[k]
        bar.update(1)
        if lead and (step % cfg.log_every == 0 or step == iterations):
            secs = time.perf_counter() - t0  # this call's
            row = {"step": step, **{k: round(v / n, 6) for k, v in sums.items()},
                   "images_per_s": round(seen * dp.world_size / max(secs, 1e-9), 3),
                   "elapsed_s": round(elapsed0 + secs, 2)}  # fmt: skip
            with open(log_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            tb.add(row)
            sums, n = dict.fromkeys(sums, 0.0), 0
        if step % cfg.checkpoint_every == 0 or step == iterations:
            save_checkpoint()
            if dp.report is not None:
                dp.report({"step": step, "loss": float(loss.detach())}, ckpt)
    bar.close()
    tb.close()
    model.eval()
    final = out_dir / "model"
    if start == step:  # resumed at or past the iterations: nothing to train, hand the model out
        save_checkpoint()
        if dp.report is not None:
            dp.report({"step": step}, ckpt)
    if lead:
        save_finetuned(backbone, final, _final_weights(backbone, names, ema), {"finetune": history()})
    return final


def _final_weights(backbone: Backbone, names: list[str], ema: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors ``save_finetuned`` writes: the EMA of the trainable parameters (a tied one
    under its first name only), plus (for a model trained in full) the buffers."""
    weights = dict(zip(names, ema))
    if backbone.trainable == "full":
        aliases = dict(backbone.model.named_parameters(remove_duplicate=False))
        for key, value in backbone.model.state_dict().items():
            if key not in aliases:
                weights.setdefault(key, value.float())
    return {k: v.float() for k, v in weights.items()}
