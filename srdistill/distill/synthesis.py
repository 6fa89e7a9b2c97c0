"""SRDD's synthesis of the distilled set (Cho et al., arXiv 2509.14777, §3.4).

The fine-tuned cluster-conditioned diffusion model (``srdistill.distill.diffusion``) is sampled N times
per cluster ("images per cluster", IPC); the synthetic images replace the real patches as the
SR training set. Three samplers, all diffusers schedulers built from the model's DDPM
training schedule (``SynthConfig.sampler``):

* ``ddim`` (our default): DDIM with eta = 0 (Song et al., arXiv 2010.02502, Eq. 12), clipping
  the predicted x0 to [-1, 1] in pixel space only (VAE latents are unbounded).
* ``dpm-solver++``: the 2nd-order multistep DPM-Solver++ (Lu et al., arXiv 2211.01095, Alg. 2),
  first order at the last steps (``lower_order_final``), which keeps few-step sampling stable.
* ``ddpm``: SRDD's released sampler (its ``sample.py`` on DiT's improved-DDPM
  ``GaussianDiffusion`` + ``respace.py``): ancestral DDPM (Ho et al., arXiv 2006.11239, Alg. 2)
  on ``steps`` timesteps chosen by improved-DDPM's respacing (``space_timesteps``; Nichol &
  Dhariwal, arXiv 2102.09672, §4), i.e. the DDPM of the respaced betas
  beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}, with the model called at the original
  timesteps t_i. The step samples the posterior q(x_{t_{i-1}} | x_{t_i}, x0_hat): mean
  sqrt(alpha_bar_prev) beta_i / (1 - alpha_bar) x0_hat + sqrt(1 - beta_i) (1 - alpha_bar_prev) /
  (1 - alpha_bar) x_t, and, when the denoiser outputs variance channels v
  (``Backbone.learned_variance``: DiT), log variance frac log beta_i + (1 - frac) log beta~_i
  with frac = (v + 1) / 2 and beta~_i = beta_i (1 - alpha_bar_prev) / (1 - alpha_bar)
  (improved-DDPM Eq. 15); without them the "fixed small" variance beta~_i (Ho et al. §3.2; the
  better of the two fixed choices at few steps, improved-DDPM §4). No noise is added at the
  last step (t = 0); x0_hat is not clipped for latents (the release: ``clip_denoised=False``),
  clipped to [-1, 1] in pixel space as ``ddim`` does. This is diffusers' ``DDPMScheduler``
  (``variance_type="learned_range"`` / ``"fixed_small"``, custom ``timesteps``), which computes
  exactly that posterior for t > 0 (checked by ``tests/distill/test_synthesis.py`` against the closed
  forms).

``ddim`` and ``dpm-solver++`` use "trailing" timestep spacing, so the first step is at
t = T - 1 where x_T really is pure noise (Lin et al., arXiv 2305.08891, Table 2); the ``ddpm``
respacing also starts at T - 1 (for ``steps`` >= 2). Classifier-free guidance (Ho & Salimans,
arXiv 2207.12598, Eq. 6) mixes the conditional and the null-class noise predictions,
eps = eps_uncond + s (eps_cond - eps_uncond); SRDD samples with s = 4. With
``guidance_channels`` N only the first N noise channels are guided and the rest, like the
variance channels, are the conditional prediction: DiT's ``forward_with_cfg``, which SRDD's
release inherits, guides 3 of the 4 latent channels.

The denoised latents are decoded by the training VAE, or by a separate decoder VAE
(``SynthConfig.vae_path``: SRDD trains with ``stabilityai/sd-vae-ft-ema`` and decodes with
``stabilityai/sd-vae-ft-mse``; ``load_decoder_vae``).

Image ``index`` of cluster ``c`` draws all its randomness from its own CPU generator seeded
``image_seed(seed, c, index)``: first x_T, then (``ddpm``) the noise of each step in turn. It
is the same image whichever batch, actor or machine samples it, so a rerun reproduces it and
an interrupted run resumes by skipping the PNGs already written. ``Synthesizer`` is the
per-batch callable (a Ray Data actor class in ``runner.synthesize_ray``; no Ray here);
``synthesize`` is the stage: plan, sample, ``provenance.csv`` and ``synthesis.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from srdistill.config import SynthConfig
from srdistill.distill import diffusion
from srdistill.distill.diffusion.backbone import _LAYOUT_HELP, _resolve_dir
from srdistill.distill.selection import _png_bytes, _write_atomic
from srdistill.sr.device import resolve_device
from srdistill.weights import snapshot_ref

__all__ = [
    "PROVENANCE_COLUMNS",
    "SAMPLERS",
    "Synthesizer",
    "apply_guidance",
    "denoise_loop",
    "image_name",
    "image_seed",
    "initial_noise",
    "load_decoder_vae",
    "make_scheduler",
    "model_timesteps",
    "per_cluster_counts",
    "plan_jobs",
    "resolve_decoder",
    "sample",
    "space_timesteps",
    "synthesize",
]

SAMPLERS = ("ddim", "dpm-solver++", "ddpm")
#: Columns of ``provenance.csv``, one row per synthesized PNG.
PROVENANCE_COLUMNS = ("file", "cluster", "index", "seed", "sampler", "steps", "guidance_scale")
#: Columns ``Synthesizer`` returns per job.
RESULT_COLUMNS = PROVENANCE_COLUMNS + ("seconds",)
_PNG_NAME = re.compile(r"^c\d{3,}_i\d{4,}\.png$")
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
_DECODER_HELP = ("synthesize.vae_path must be a local directory or Hugging Face id of an AutoencoderKL "
                 "(config.json + weights; the layout of stabilityai/sd-vae-ft-mse) for the dit backbone")


# --------------------------------------------------------------------------- sampling


def space_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The ``steps`` timesteps of improved-DDPM's respacing of a ``num_train_timesteps``-step
    process, one section (``space_timesteps(T, "N")`` of Nichol & Dhariwal's code, as DiT and
    SRDD sample): ``round(x_i)`` for x_0 = 0, x_{i+1} = x_i + (T - 1) / (N - 1) summed in float64
    and rounded by Python's ``round`` (half to even), so 0 and T - 1 are included (N >= 2); the
    float sum matters: where i (T - 1) / (N - 1) is a half-integer (e.g. T = 1000, N = 21) it
    decides the tie. N = 1 gives ``[0]`` (as the original).

    Returns:
        Ascending distinct ints in ``[0, T)``, ``steps`` of them.

    Raises:
        ValueError: ``steps`` < 1 or > ``num_train_timesteps``.
    """
    n, t = int(steps), int(num_train_timesteps)
    if not 1 <= n <= t:
        raise ValueError(f"cannot respace {t} diffusion steps into {n}: need 1 <= steps <= {t}")
    stride = 1.0 if n == 1 else (t - 1) / (n - 1)
    picked, position = [], 0.0
    for _ in range(n):
        picked.append(round(position))
        position += stride
    return picked


def make_scheduler(sampler: str, schedule: dict, *, pixel_space: bool, learned_variance: bool = False):
    """A fresh diffusers scheduler for ``sampler`` on the model's DDPM training schedule.

    Args:
        sampler: ``"ddim"``: ``DDIMScheduler`` with eta 0 at ``step`` (Song et al., arXiv
            2010.02502, Eq. 12 with sigma = 0), ``set_alpha_to_one=False`` (the last step lands
            on alpha_bar_0, as DiT samples), x0 clipped to [-1, 1] when ``pixel_space``.
            ``"dpm-solver++"``: ``DPMSolverMultistepScheduler`` with
            ``algorithm_type="dpmsolver++"``, ``solver_order=2`` (Lu et al., arXiv 2211.01095,
            Alg. 2), lower order at the final steps, with dynamic thresholding of the data
            prediction (ratio 0.995, max 1) when ``pixel_space``. Both: timestep spacing
            ``"trailing"``. ``"ddpm"``: ``DDPMScheduler`` (ancestral, see the module docstring)
            with ``variance_type`` ``"learned_range"`` if ``learned_variance`` else
            ``"fixed_small"``, x0 clipped to [-1, 1] only when ``pixel_space``; its timesteps
            are set by ``set_timesteps(timesteps=space_timesteps(...)[::-1])``.
        schedule: ``Backbone.schedule``: ``num_train_timesteps``, ``beta_start``, ``beta_end``,
            ``beta_schedule`` (others ignored; missing ones take DiT's values). The model
            predicts epsilon.
        pixel_space: the sampled tensor is an image in [-1, 1] (``unet``), not a VAE latent.
        learned_variance: the model output carries variance channels (``ddpm`` only).

    Returns:
        The scheduler; call ``set_timesteps(steps)`` before use (``ddpm``:
        ``set_timesteps(timesteps=space_timesteps(T, steps)[::-1])``). Stateful
        (``dpm-solver++`` keeps its previous model outputs): one per sampling loop.

    Raises:
        ValueError: ``sampler`` is not one of ``SAMPLERS`` (the message names it).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    base = {k: schedule.get(k, diffusion.DEFAULT_SCHEDULE[k]) for k in _SCHEDULE_KEYS}
    base.update(prediction_type="epsilon")
    if sampler == "ddpm":
        return DDPMScheduler(**base, variance_type="learned_range" if learned_variance else "fixed_small",
                             clip_sample=pixel_space, clip_sample_range=1.0)  # fmt: skip
    base.update(timestep_spacing="trailing")
    if sampler == "ddim":
        return DDIMScheduler(**base, clip_sample=pixel_space, clip_sample_range=1.0,
                             set_alpha_to_one=False, steps_offset=0)  # fmt: skip
    if sampler == "dpm-solver++":
        # pixel space: bound the data prediction as DDIM's clipping does (Lu et al. §5, dynamic
        # thresholding with ratio 0.995 and max 1); unbounded, the x0 of the first trailing
        # step (1/sqrt(alpha_bar_999) ~ 156x the noise error) saturates the image
        return DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2,
                                           lower_order_final=True, thresholding=pixel_space,
                                           dynamic_thresholding_ratio=0.995, sample_max_value=1.0)  # fmt: skip
    raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")


def _set_timesteps(scheduler, sampler: str, steps: int, device: torch.device | str | None = None) -> None:
    """``steps`` timesteps: improved-DDPM's respacing for ``ddpm``, trailing spacing otherwise."""
    if sampler == "ddpm":
        ts = space_timesteps(scheduler.config.num_train_timesteps, steps)[::-1]
        scheduler.set_timesteps(timesteps=ts, device=device)
    else:
        scheduler.set_timesteps(steps, device=device)


def model_timesteps(sampler: str, schedule: dict, steps: int) -> list[int]:
    """The timesteps at which ``sampler`` calls the denoiser, in order (first = noisiest), for
    ``steps`` steps on ``schedule`` (``Backbone.schedule``).

    Raises:
        ValueError: unknown ``sampler``; ``steps`` < 1 or more than the training timesteps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = make_scheduler(sampler, schedule, pixel_space=False)
    _set_timesteps(scheduler, sampler, steps)
    return [int(t) for t in scheduler.timesteps]


def _generators(seeds: list[int]) -> list[torch.Generator]:
    gens = []
    for seed in seeds:
        seed = int(seed)
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed {seed} outside [0, 2**64)")
        gens.append(torch.Generator().manual_seed(seed))
    return gens


def _draw(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """``(len(generators), *shape)`` float32 N(0, 1) on the CPU, image ``i`` from ``generators[i]``."""
    out = torch.empty((len(generators), *shape), dtype=torch.float32)
    for i, gen in enumerate(generators):
        out[i] = torch.randn(tuple(shape), generator=gen)
    return out


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """The starting noise x_T: ``(len(seeds), *shape)`` float32 N(0, 1) on the CPU.

    Image ``i`` is the first draw of its own ``torch.Generator().manual_seed(seeds[i])``, so it
    does not depend on the batch it is sampled in nor on the device.

    Raises:
        ValueError: a seed is negative or >= 2**64.
    """
    return _draw(shape, _generators(seeds))


def apply_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float,
                   channels: int | None = None) -> torch.Tensor:  # fmt: skip
    """Classifier-free guidance (Ho & Salimans, arXiv 2207.12598, Eq. 6) of noise predictions.

    Args:
        eps_cond, eps_uncond: ``(B, C, h, w)`` conditional and null-class predictions.
        scale: s; the result is eps_uncond + s (eps_cond - eps_uncond).
        channels: guide only channels ``[0, channels)`` and take the others from ``eps_cond``
            (DiT's ``forward_with_cfg`` guides 3 of 4); ``None`` = all ``C``.

    Returns:
        ``(B, C, h, w)``, the dtype of the inputs.

    Raises:
        ValueError: ``channels`` < 1 or > C.
    """
    c = eps_cond.shape[1]
    if channels is not None and not 1 <= channels <= c:
        raise ValueError(f"guidance_channels {channels} outside [1, {c}]: the noise prediction has {c} channels")
    if channels is None or channels == c:
        return eps_uncond + scale * (eps_cond - eps_uncond)
    out = eps_cond.clone()
    head_c, head_u = eps_cond[:, :channels], eps_uncond[:, :channels]
    out[:, :channels] = head_u + scale * (head_c - head_u)
    return out


def _check_request(backbone: diffusion.Backbone, labels: torch.Tensor, seeds: list[int], steps: int,
                   guidance_scale: float | None, guidance_channels: int | None) -> torch.Tensor:  # fmt: skip
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
    if len(seeds) != len(labels):
        raise ValueError(f"{len(seeds)} seeds for {len(labels)} labels: need one seed per image")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= backbone.num_clusters):
        bad = labels[(labels < 0) | (labels >= backbone.num_clusters)].tolist()
        raise ValueError(f"cluster label(s) {bad[:5]} outside [0, {backbone.num_clusters})")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0 or None, got {guidance_scale}")
    _check_guidance_channels(guidance_channels, backbone.sample_shape[0], backbone.kind)
    return labels


def _check_guidance_channels(channels: int | None, available: int, kind: str) -> None:
    if channels is not None and not 1 <= channels <= available:
        raise ValueError(f"synthesize.guidance_channels {channels} outside [1, {available}]: the {kind} "
                         f"denoiser predicts {available} noise channels")  # fmt: skip


def _model_device(backbone: diffusion.Backbone) -> torch.device:
    return next(backbone.model.parameters()).device


@torch.inference_mode()
def denoise_loop(backbone: diffusion.Backbone, labels: torch.Tensor, seeds: list[int], *,
                 sampler: str = "ddim", steps: int = 50, guidance_scale: float | None = 4.0,
                 guidance_channels: int | None = None,
                 device: str | torch.device | None = None) -> torch.Tensor:  # fmt: skip
    """Run the reverse process from ``initial_noise`` to x_0 in the denoiser's space.

    Each of the ``steps`` steps predicts the noise (``Backbone.predict``) and takes a scheduler
    step (``make_scheduler``). With ``guidance_scale`` s the denoiser runs once on the doubled
    batch ``[x, x]`` with labels ``[labels, null_class]`` and the guided prediction is
    ``apply_guidance(eps_cond, eps_uncond, s, guidance_channels)``, for every s, 1 included
    (which equals eps_cond up to float rounding); the variance channels (``ddpm`` with a
    ``learned_variance`` backbone) are the conditional half's. ``None`` runs the conditional
    pass only (unguided, half the compute). ``ddpm`` draws the noise of each step but the last
    from image ``i``'s generator, after x_T.

    Args:
        backbone: a ``diffusion.Backbone`` (``load_finetuned``), in eval mode.
        labels: ``(B,)`` integer cluster ids in ``[0, num_clusters)``.
        seeds: ``B`` seeds in ``[0, 2**64)``, one per image (``image_seed``).
        sampler: ``"ddim"``, ``"dpm-solver++"`` or ``"ddpm"``.
        steps: number of denoiser evaluations (x2 batch when guided), >= 1 (``ddpm``: at most
            the training timesteps).
        guidance_scale: s >= 0, or ``None``.
        guidance_channels: guide the first N noise channels only (``None`` = all).
        device: where to run; ``None`` = the device of ``backbone.model`` (which must be there).

    Returns:
        ``(B, *backbone.sample_shape)`` float32 on ``device``: VAE latents x latent_scale
        (``dit``) or pixels in about [-1, 1] (``unet``); ``backbone.decode`` makes images.

    Raises:
        ValueError: unknown sampler, labels outside ``[0, num_clusters)`` or not ``(B,)``,
            ``len(seeds) != B``, ``steps`` < 1 (or too many for ``ddpm``), a bad
            ``guidance_scale``, ``guidance_channels`` outside ``[1, C]``.
    """
    labels = _check_request(backbone, labels, seeds, steps, guidance_scale, guidance_channels)
    learned = sampler == "ddpm" and backbone.learned_variance
    scheduler = make_scheduler(sampler, backbone.schedule, pixel_space=backbone.vae is None,
                               learned_variance=learned)  # fmt: skip
    device = torch.device(device) if device is not None else _model_device(backbone)
    _set_timesteps(scheduler, sampler, steps, device)
    generators = _generators(seeds)
    x = _draw(backbone.sample_shape, generators).to(device) * scheduler.init_noise_sigma
    labels = labels.to(device)
    b = len(labels)
    if b == 0:
        return x
    guided = guidance_scale is not None
    if guided:
        model_labels = torch.cat([labels, torch.full_like(labels, backbone.null_class)])
    else:
        model_labels = labels
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        if guided:
            x_in = torch.cat([x_in, x_in])
        t_in = t.to(device=device, dtype=torch.long).expand(len(model_labels))
        eps, var = backbone.predict(x_in, t_in, model_labels)
        eps = eps.float()
        if guided:
            eps = apply_guidance(eps[:b], eps[b:], guidance_scale, guidance_channels)
            var = None if var is None else var[:b]
        if sampler == "ddim":
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        elif sampler == "ddpm":
            out = torch.cat([eps, var.float()], dim=1) if learned else eps
            x = scheduler.step(out, int(t), x, generator=generators).prev_sample
        else:
            x = scheduler.step(eps, t, x).prev_sample
    return x


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` float in [-1, 1] -> ``(B, H, W, 3)`` uint8, rounded to nearest."""
    x = images.float().clamp(-1, 1).add(1).mul(127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


@torch.inference_mode()
def sample(backbone: diffusion.Backbone, labels: torch.Tensor, seeds: list[int], *,
           sampler: str = "ddim", steps: int = 50, guidance_scale: float | None = 4.0,
           guidance_channels: int | None = None, decoder: nn.Module | None = None,
           device: str | torch.device | None = None) -> np.ndarray:  # fmt: skip
    """Sample one image per label from the cluster-conditioned model (SRDD §3.4).

    ``denoise_loop`` (DDIM, arXiv 2010.02502, DPM-Solver++, arXiv 2211.01095, or ancestral
    DDPM, with classifier-free guidance, arXiv 2207.12598, unless ``guidance_scale`` is
    ``None``), then ``backbone.decode`` (the VAE decoder for ``dit``: ``decoder`` if given, else
    the training VAE) to [-1, 1] and round(127.5 (x + 1)).

    Args:
        backbone: a ``diffusion.Backbone`` in eval mode.
        labels: ``(B,)`` integer cluster ids in ``[0, num_clusters)``.
        seeds: ``B`` seeds, one per image: image ``i`` depends only on ``(labels[i],
            seeds[i])`` and the settings, not on the batch (up to float rounding of batched
            kernels, at most 1 grey level in practice).
        decoder: a separate ``AutoencoderKL`` (``load_decoder_vae``); ``dit`` only.
        sampler, steps, guidance_scale, guidance_channels, device: see ``denoise_loop``.

    Returns:
        ``(B, resolution, resolution, 3)`` uint8 RGB.

    Raises:
        ValueError: as ``denoise_loop``; a ``decoder`` with the ``unet`` backbone.
    """
    if decoder is not None and backbone.vae is None:
        raise ValueError("a decoder VAE needs the dit backbone: the unet backbone samples pixels")
    x0 = denoise_loop(backbone, labels, seeds, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                      guidance_channels=guidance_channels, device=device)  # fmt: skip
    if len(x0) == 0:
        return np.zeros((0, backbone.resolution, backbone.resolution, 3), np.uint8)
    return _to_uint8(backbone.decode(x0, vae=decoder))


# --------------------------------------------------------------------------- the decoder VAE


def _resolve_decoder_path(vae_path: str) -> str:
    """``vae_path`` as a local ``AutoencoderKL`` directory (``diffusion``'s resolution of
    ``finetune.vae_path``: a local path as given, a Hugging Face id from the hub or, with
    ``HF_HUB_OFFLINE=1``, the cache only; a cache snapshot missing on this node is fetched at
    its commit)."""
    try:
        path = _resolve_dir(vae_path, "decoder VAE", ("",))
    except diffusion.MissingBackboneError as exc:
        msg = str(exc).replace(_LAYOUT_HELP, _DECODER_HELP)
        raise diffusion.MissingBackboneError(f"synthesize.vae_path {vae_path!r}: {msg}") from None
    if not (Path(path).expanduser() / "config.json").is_file():
        raise diffusion.MissingBackboneError(f"synthesize.vae_path {vae_path!r}: no "
                                             f"{Path(path) / 'config.json'}. {_DECODER_HELP}")  # fmt: skip
    return path


def resolve_decoder(cfg: SynthConfig, backbone_kind: str) -> SynthConfig:
    """``cfg`` with ``vae_path`` (the decoder VAE) as a local directory, checked; call it once on
    the driver (downloads a Hugging Face id, or finds it in the cache offline) and hand the
    result to the sampling actors. A ``cfg`` without ``vae_path`` is returned unchanged.

    Args:
        cfg: the synthesis settings.
        backbone_kind: ``"dit"`` or ``"unet"`` (``FinetuneConfig.resolved_backbone``, or the
            ``kind`` of the fine-tuned model).

    Raises:
        ValueError: ``vae_path`` set for the ``unet`` backbone (pixel space: nothing to decode).
        diffusion.MissingBackboneError: the id cannot be resolved, or the directory has no
            ``config.json`` (naming ``synthesize.vae_path`` and the expected layout).
    """
    if cfg.vae_path is None:
        return cfg
    if backbone_kind != "dit":
        raise ValueError(f"synthesize.vae_path {cfg.vae_path!r} needs the dit backbone: the "
                         f"{backbone_kind} backbone samples pixels, there is no latent to decode")  # fmt: skip
    path = _resolve_decoder_path(cfg.vae_path)
    return cfg if path == cfg.vae_path else cfg.model_copy(update={"vae_path": path})


def load_decoder_vae(vae_path: str, backbone: diffusion.Backbone) -> nn.Module:
    """The ``AutoencoderKL`` at ``vae_path`` (local directory or Hugging Face id, resolved as
    ``resolve_decoder`` does) to decode ``backbone``'s samples with, float32, in eval mode, on
    the device of ``backbone.model``.

    Raises:
        ValueError: ``backbone`` is ``unet``, or the VAE's latents do not fit the training
            VAE's (latent channels, downsampling factor).
        diffusion.MissingBackboneError: as ``resolve_decoder``.
    """
    from diffusers import AutoencoderKL

    if backbone.vae is None:
        raise ValueError(f"synthesize.vae_path {vae_path!r} needs the dit backbone: the "
                         f"{backbone.kind} backbone samples pixels, there is no latent to decode")  # fmt: skip
    path = _resolve_decoder_path(vae_path)
    vae = AutoencoderKL.from_pretrained(Path(path).expanduser(), local_files_only=True)
    mine, theirs = vae.config, backbone.vae.config
    got = (mine.latent_channels, len(mine.block_out_channels))
    want = (theirs.latent_channels, len(theirs.block_out_channels))
    if got != want:
        raise ValueError(f"synthesize.vae_path {vae_path!r}: {got[0]} latent channels at 1/{2 ** (got[1] - 1)} "
                         f"scale, but the model samples the training VAE's {want[0]} at "
                         f"1/{2 ** (want[1] - 1)}")  # fmt: skip
    return vae.float().eval().requires_grad_(False).to(_model_device(backbone))


# --------------------------------------------------------------------------- planning


def image_seed(seed: int, cluster: int, index: int) -> int:
    """The noise seed of image ``index`` of ``cluster`` in a run seeded ``seed``: the first
    32-bit word of ``numpy.random.SeedSequence([seed, cluster, index])``, an int in
    ``[0, 2**32)`` (well mixed: neighbouring images get unrelated noise).

    Raises:
        ValueError: a negative argument.
    """
    parts = [int(seed), int(cluster), int(index)]
    if min(parts) < 0:
        raise ValueError(f"image_seed needs non-negative (seed, cluster, index), got {tuple(parts)}")
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def per_cluster_counts(n_total: int, k: int) -> dict[int, int]:
    """Split ``n_total`` images over clusters ``0..k-1`` as evenly as possible; the remainder
    goes one each to the lowest cluster ids. Returns ``{cluster: count}`` for every cluster.

    Raises:
        ValueError: ``n_total`` < 0 or ``k`` < 1.
    """
    if k < 1:
        raise ValueError(f"need at least one cluster, got k={k}")
    if n_total < 0:
        raise ValueError(f"n_total must be >= 0, got {n_total}")
    base, rem = divmod(int(n_total), int(k))
    return {c: base + (1 if c < rem else 0) for c in range(k)}


def plan_jobs(counts: dict[int, int], seed: int) -> list[dict]:
    """One job ``{"cluster", "index", "seed"}`` per image: indices ``0..counts[c]-1`` of every
    cluster, seeds from ``image_seed``, ordered by (cluster, index).

    Raises:
        ValueError: a negative count or cluster id.
    """
    jobs = []
    for c in sorted(int(c) for c in counts):
        n = int(counts[c])
        if n < 0:
            raise ValueError(f"cluster {c}: negative image count {n}")
        jobs += [{"cluster": c, "index": i, "seed": image_seed(seed, c, i)} for i in range(n)]
    return jobs


def image_name(cluster: int, index: int) -> str:
    """File name of image ``index`` of ``cluster``: ``c{cluster:03d}_i{index:04d}.png``."""
    return f"c{int(cluster):03d}_i{int(index):04d}.png"


def _jobs_to_columns(jobs: list[dict]) -> dict[str, np.ndarray]:
    return {key: np.array([j[key] for j in jobs], dtype=np.int64) for key in ("cluster", "index", "seed")}


# --------------------------------------------------------------------------- per-batch actor


class Synthesizer:
    """Samples and writes a batch of jobs: the per-batch callable of the synthesis stage.

    A Ray Data actor class (``map_batches(Synthesizer, fn_constructor_kwargs=...,
    batch_format="numpy")``): the constructor loads the model once per actor, its kwargs are
    picklable (paths and a ``SynthConfig``); this module imports no Ray.

    Args:
        model_dir: a ``diffusion.save_finetuned`` directory.
        cfg: sampler, steps, guidance scale and channels, decoder VAE, batch size and device
            (``"auto"``: CUDA if available). ``guidance_scale`` 1 is sampled unguided (the same
            images up to float rounding, at half the cost). ``vae_path`` is best resolved
            already (``resolve_decoder``), else each actor resolves it.
        out_dir: where the PNGs go (created if missing).
        num_threads: torch intra-op threads of this process, if given.

    Raises:
        FileNotFoundError, diffusion.MissingBackboneError, ValueError: from
            ``diffusion.load_finetuned`` and ``load_decoder_vae``; ``guidance_channels`` more
            than the model's noise channels, ``steps`` too many for ``ddpm``.
        RuntimeError: ``cfg.device`` is ``"cuda"`` without CUDA.
    """

    def __init__(self, model_dir: str | Path, cfg: SynthConfig, out_dir: str | Path, *,
                 num_threads: int | None = None) -> None:  # fmt: skip
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        self.backbone = diffusion.load_finetuned(model_dir, self.device)
        model_timesteps(cfg.sampler, self.backbone.schedule, cfg.steps)  # fail early
        _check_guidance_channels(cfg.guidance_channels, self.backbone.sample_shape[0], self.backbone.kind)
        self.decoder = load_decoder_vae(cfg.vae_path, self.backbone) if cfg.vae_path else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Sample the jobs of ``batch`` whose PNG is not in ``out_dir`` yet, in chunks of
        ``cfg.batch_size``, and write each as ``out_dir/image_name(cluster, index)``
        (``(res, res, 3)`` uint8 RGB, atomically: temporary name, then rename).

        Args:
            batch: columns ``cluster``, ``index``, ``seed`` (1-D integer arrays of one length).

        Returns:
            Columns, one row per job in ``batch`` order: ``file`` (name), ``cluster``,
            ``index``, ``seed`` (int64), ``sampler`` (str), ``steps`` (int64),
            ``guidance_scale`` (float64), ``seconds`` (float64: wall time per image of its
            chunk, sampling + decoding + writing; 0 for a PNG that already existed).

        Raises:
            ValueError: a column is missing, or a cluster id is outside ``[0, k)``.
        """
        missing = [c for c in ("cluster", "index", "seed") if c not in batch]
        if missing:
            raise ValueError(f"synthesis batch lacks column(s) {missing}")
        clusters = np.asarray(batch["cluster"]).astype(np.int64)
        indices = np.asarray(batch["index"]).astype(np.int64)
        seeds = np.asarray(batch["seed"]).astype(np.int64)
        names = [image_name(c, i) for c, i in zip(clusters, indices)]
        seconds = np.zeros(len(names), np.float64)
        todo = [j for j, name in enumerate(names) if not (self.out_dir / name).is_file()]
        cfg = self.cfg
        guidance = None if cfg.guidance_scale == 1.0 else float(cfg.guidance_scale)
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start : start + cfg.batch_size]
            t0 = time.perf_counter()
            images = sample(self.backbone, torch.from_numpy(clusters[chunk]),
                            [int(s) for s in seeds[chunk]], sampler=cfg.sampler, steps=cfg.steps,
                            guidance_scale=guidance, guidance_channels=cfg.guidance_channels,
                            decoder=self.decoder, device=self.device)  # fmt: skip
            for j, img in zip(chunk, images):
                _write_atomic(self.out_dir / names[j], _png_bytes(img))
            seconds[chunk] = (time.perf_counter() - t0) / len(chunk)
        n = len(names)
        return {
            "file": np.array(names, dtype=object),
            "cluster": clusters,
            "index": indices,
            "seed": seeds,
            "sampler": np.array([cfg.sampler] * n, dtype=object),
            "steps": np.full(n, cfg.steps, np.int64),
            "guidance_scale": np.full(n, cfg.guidance_scale, np.float64),
            "seconds": seconds,
        }


# --------------------------------------------------------------------------- the stage


def _read_meta(model_dir: Path) -> dict:
    path = Path(model_dir) / diffusion.MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} is not a fine-tuned model: no {diffusion.MODEL_FILE}")
    return json.loads(path.read_text())


def _denoiser_channels(meta: dict) -> tuple[int, int] | None:
    """(input, output) channels of a saved model's denoiser, from ``backbone.json`` (``unet``)
    or the DiT's ``transformer/config.json``; ``None`` when that is not readable here."""
    if meta["kind"] == "unet":
        conf = meta.get("unet_config", {})
    else:
        path = Path(meta.get("source", {}).get("dit_path", "")).expanduser() / "transformer" / "config.json"
        conf = json.loads(path.read_text()) if path.is_file() else {}
    if "in_channels" not in conf:
        return None
    return int(conf["in_channels"]), int(conf.get("out_channels") or conf["in_channels"])


def _variance_kind(sampler: str, channels: tuple[int, int] | None) -> str | None:
    if sampler != "ddpm":
        return None
    if channels is None:
        return "unknown"
    return "learned-range" if channels[1] == 2 * channels[0] else "fixed-small"


def _decoder_record(meta: dict, vae_path: str | None) -> dict | None:
    """``synthesis.json``'s ``decoder``: the VAE that decodes the samples (``None`` for ``unet``)."""
    if meta["kind"] != "dit":
        return None
    path = vae_path or meta.get("source", {}).get("vae_path")
    record = {"vae_path": str(Path(path).expanduser().resolve()) if path else None, "separate": vae_path is not None}
    ref = snapshot_ref(path)
    if ref:
        record["repo"], record["revision"] = ref
    return record


def _normalize_row(row: dict) -> dict:
    """A result row with plain Python values (Ray/pandas hand back numpy scalars)."""
    return {"file": str(row["file"]), "cluster": int(row["cluster"]), "index": int(row["index"]),
            "seed": int(row["seed"]), "sampler": str(row["sampler"]), "steps": int(row["steps"]),
            "guidance_scale": float(row["guidance_scale"]),
            "seconds": float(row["seconds"])}  # fmt: skip


def synthesize(model_dir: str | Path, cfg: SynthConfig, out_dir: str | Path,
               counts: dict[int, int], *,
               map_fn: Callable[[dict[str, np.ndarray]], list[dict]] | None = None) -> list[dict]:  # fmt: skip
    """The synthesis stage (SRDD §3.4): ``counts[c]`` images of every cluster ``c``.

    Plans the jobs (``plan_jobs(counts, cfg.seed)``), removes PNGs of this naming pattern that
    are not in the plan and temporary files left by a killed run (so ``out_dir`` holds exactly
    the synthetic set), and samples the rest: in this process through one ``Synthesizer``
    (``map_fn`` ``None``) or through ``map_fn`` (e.g. ``runner.synthesize_ray``: Ray Data
    actors), which gets the jobs as columns ``cluster``, ``index``, ``seed`` (int64 arrays)
    and returns ``Synthesizer`` rows. PNGs already present are kept (resume). Then writes

    * ``provenance.csv``: ``file, cluster, index, seed, sampler, steps, guidance_scale``, one
      row per PNG, sorted by file;
    * ``synthesis.json``: ``model_dir``, ``backbone`` (kind), ``num_clusters``,
      ``resolution``, ``sampler``, ``steps``, ``timesteps`` (the model timesteps of the steps,
      noisiest first: ``model_timesteps``), ``variance`` (``ddpm``: ``"learned-range"``,
      ``"fixed-small"``, or ``"unknown"`` where the DiT's config is not readable here; else
      ``null``), ``guidance_scale``, ``guidance_channels`` (``null`` =
      all), ``decoder`` (``dit``: ``vae_path`` of the decoding VAE, ``separate`` (``true`` for
      ``cfg.vae_path``, ``false`` for the training VAE), and ``repo`` + ``revision`` for a
      Hugging Face snapshot; ``null`` for ``unet``), ``seed``, ``counts``, ``images``,
      ``generated`` (sampled by this call), ``seconds`` (their summed sampling time).

    Args:
        model_dir: a ``diffusion.save_finetuned`` directory.
        cfg: the synthesis settings; a ``vae_path`` id is resolved here (``resolve_decoder``)
            for the in-process sampler, but ``map_fn`` runs with the settings it was built
            with (resolve before building it).
        out_dir: created if missing.
        counts: ``{cluster: number of images}`` (``per_cluster_counts`` or ``cfg.ipc`` each).
        map_fn: runs the jobs elsewhere; ``None`` = in-process.

    Returns:
        The rows (``Synthesizer`` columns as dicts of Python values), sorted by file.

    Raises:
        ValueError: a cluster id in ``counts`` outside ``[0, k)``, a negative count or seed, an
            unknown sampler (named in the message), ``steps`` too many for ``ddpm``,
            ``guidance_channels`` more than the model's noise channels, ``vae_path`` with the
            ``unet`` backbone.
        FileNotFoundError: ``model_dir`` has no ``backbone.json``.
        diffusion.MissingBackboneError: ``vae_path`` cannot be resolved.
        RuntimeError: ``map_fn`` did not return exactly one row per job, or a PNG is missing.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    meta = _read_meta(model_dir)
    k = int(meta["num_clusters"])
    bad = sorted(int(c) for c in counts if not 0 <= int(c) < k)
    if bad:
        raise ValueError(f"synthesize: cluster id(s) {bad} outside [0, {k}) of the model")
    timesteps = model_timesteps(cfg.sampler, meta.get("schedule", {}), cfg.steps)
    channels = _denoiser_channels(meta)
    if channels is not None:
        _check_guidance_channels(cfg.guidance_channels, channels[0], meta["kind"])
    cfg = resolve_decoder(cfg, meta["kind"])
    jobs = plan_jobs(counts, cfg.seed)
    names = {image_name(j["cluster"], j["index"]) for j in jobs}
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in out_dir.iterdir():
        stale_png = _PNG_NAME.match(path.name) and path.name not in names
        if stale_png or (path.name.startswith(".") and ".tmp" in path.name):
            path.unlink()
    if not jobs:
        rows: list[dict] = []
    elif map_fn is None:
        result = Synthesizer(model_dir, cfg, out_dir)(_jobs_to_columns(jobs))
        rows = [dict(zip(result, values)) for values in zip(*result.values())]
    else:
        rows = list(map_fn(_jobs_to_columns(jobs)))
    rows = sorted((_normalize_row(r) for r in rows), key=lambda r: r["file"])
    got = [r["file"] for r in rows]
    if len(got) != len(jobs) or set(got) != names:
        lost = sorted(names - set(got))
        raise RuntimeError(f"synthesize: {len(got)} result rows for {len(jobs)} jobs "
                           f"(missing e.g. {lost[:3]})")  # fmt: skip
    absent = [f for f in got if not (out_dir / f).is_file()]
    if absent:
        raise RuntimeError(f"synthesize: {len(absent)} PNG(s) not written, e.g. {absent[:3]}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PROVENANCE_COLUMNS)
    for r in rows:
        writer.writerow([r[c] for c in PROVENANCE_COLUMNS])
    _write_atomic(out_dir / "provenance.csv", buf.getvalue().encode())
    summary = {
        "model_dir": str(model_dir.resolve()),
        "backbone": meta["kind"],
        "num_clusters": k,
        "resolution": int(meta["resolution"]),
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "timesteps": timesteps,
        "variance": _variance_kind(cfg.sampler, channels),
        "guidance_scale": cfg.guidance_scale,
        "guidance_channels": cfg.guidance_channels,
        "decoder": _decoder_record(meta, cfg.vae_path),
        "seed": cfg.seed,
        "counts": {str(c): int(counts[c]) for c in sorted(counts, key=int)},
        "images": len(rows),
        "generated": sum(1 for r in rows if r["seconds"] > 0),
        "seconds": round(sum(r["seconds"] for r in rows), 3),
    }
    _write_atomic(out_dir / "synthesis.json", (json.dumps(summary, indent=2) + "\n").encode())
    return rows

