"""SRDD's cluster-conditioned diffusion fine-tuning (Cho et al., arXiv 2509.14777, §3.3).

The "classes" of a class-conditional diffusion model are the CLIP k-means clusters of the
mined patches. Two backbones, both diffusers classes:

* ``dit``: ``DiTTransformer2DModel`` (Peebles & Xie, arXiv 2212.09748) in the latent space of
  an ``AutoencoderKL`` (latents x 0.18215), loaded from a local directory or a Hugging Face id
  in the layout of ``facebook/DiT-XL-2-512`` (and optionally a VAE such as
  ``stabilityai/sd-vae-ft-ema``); ids are downloaded into the Hugging Face cache, or with
  ``HF_HUB_OFFLINE=1`` looked up there only (``resolve_backbone``, once on the driver: actors
  get the local directories). diffusers gives every block its own copy of the class table and
  timestep embedder (the original DiT has one of each); with ``tie_embeddings`` all blocks
  share block 0's, as in the original (``tie_block_embeddings``). The class table is resized to
  ``k`` clusters + the null class of classifier-free guidance (``resize_class_embedding``:
  cluster rows from the mean of the pretrained rows, or from pretrained rows 0..k-1 as SRDD's
  release, which keeps the 1000-class table and labels clusters 0..k-1). It is fine-tuned with
  DiffFit (Xie et al., arXiv 2304.06648; ``apply_difffit``): only biases, norm parameters, the
  class table and per-channel scales ``gamma`` (initialised to 1, so the model starts
  unchanged) train; every other weight stays bit-identical. ``first-half`` places gamma as
  SRDD's released DiT (MinimaxDiffusion ``models.py``): on the q, k, v projections, twice on
  the attention output and on the MLP branch of the first half of the blocks;
  ``all-blocks`` on the attention and MLP branch of every block.
* ``unet``: a class-conditional pixel-space ``UNet2DModel`` trained from scratch (all
  parameters): the backbone without pretrained weights, so the whole SRDD path runs on a CPU
  with no download. With ``loss: hybrid`` it gets learned-variance output channels like DiT.

The loss (``srdd_loss``) is the diffusion loss plus SRDD's two memory-bank terms on the
predicted clean sample x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t), with a FIFO memory
of ``memory_size`` real samples and of as many (detached) predictions per cluster::

    L = L_diff + lambda_pos * (1 - min_j cos(x0_hat, real_j)) + lambda_neg * max_j cos(x0_hat, pred_j)

L_diff is the DDPM noise-prediction loss L_simple (Ho et al. 2020, Eq. 14; ``loss: simple``),
or, as SRDD's released code (improved-DDPM's ``GaussianDiffusion`` with DiT's learned
variance), the hybrid loss of Nichol & Dhariwal (arXiv 2102.09672, Eq. 16; ``loss: hybrid``):
L_simple + L_t, where L_t is the variational-bound term of the sampled timestep: the KL
between the true posterior q(x_{t-1} | x_t, x_0) and the model's p(x_{t-1} | x_t), whose log
variance interpolates between log beta_t and log beta~_t (Eq. 15), averaged over dimensions
in bits, with the predicted mean held fixed (stop-gradient: it trains only the variance
channels); at t = 0 the discretised Gaussian decoder NLL (``vb_bits``). Weight 1 on L_t is
the paper's lambda = 0.001 on L_vb = T E_t[L_t] at T = 1000. The memory terms reduce per sample (``memory_reduce: sample``) or, as the
release, per cluster of the batch (``cluster``: min/max over all its (sample, memory)
pairs, averaged over the clusters in the batch). The release also subtracts an MSE between
the latents and their bicubic round trip; it does not depend on the model (no gradient), so
it is left out.

``finetune`` is the whole loop, in plain PyTorch or under DeepSpeed (ZeRO 0-3) when the runner
(Ray Train) hands it a data-parallel context; ``encode_patches`` is the per-batch function of
the one-time encoding stage (VAE latent moments of the centre crop and of its mirror image).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from srdistill.config import FinetuneConfig
from srdistill.sr.device import resolve_device
from srdistill.sr.training import ScalarLog, _publish, announce
from srdistill.weights import (MissingWeightsError, diffusers_patterns, is_repo_id, local_dir, resolve_hf_weights,
                               snapshot_ref)

__all__ = [
    "Backbone",
    "DiffusionParallel",
    "EncodedSet",
    "MissingBackboneError",
    "apply_difffit",
    "approx_standard_normal_cdf",
    "build_backbone",
    "build_unet",
    "check_backbone",
    "discretized_gaussian_log_likelihood",
    "ema_decay",
    "encode_patches",
    "encoded_spec",
    "PatchEncoder",
    "load_vae",
    "finetune",
    "load_dit",
    "make_dit_backbone",
    "load_encoded",
    "load_finetuned",
    "normal_kl",
    "posterior_tables",
    "q_posterior",
    "resize_class_embedding",
    "resolve_backbone",
    "save_finetuned",
    "srdd_loss",
    "tie_block_embeddings",
    "total_iterations",
    "vb_bits",
    "MemoryBank",
]

log = logging.getLogger(__name__)

#: DDPM schedule of DiT and SRDD: 1000 steps, betas linear in [1e-4, 0.02].
DEFAULT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                    "beta_schedule": "linear", "prediction_type": "epsilon"}  # fmt: skip
MODEL_FILE = "backbone.json"
WEIGHTS_FILE = "weights.safetensors"


class MissingBackboneError(FileNotFoundError):
    """A DiT/VAE directory is missing or not in the expected diffusers layout, or its Hugging
    Face id could not be resolved (not cached offline, unknown repository, network error)."""


_LAYOUT_HELP = (
    "finetune.dit_path must be a local directory or Hugging Face id in the layout of "
    "facebook/DiT-XL-2-512 (transformer/, vae/, scheduler/) and finetune.vae_path, if set, one "
    "in the layout of stabilityai/sd-vae-ft-ema; without them use finetune.backbone=unet "
    "(trained from scratch)"
)


def _has_diffusers_weights(folder: Path) -> bool:
    """A diffusers model folder with its config and weights (safetensors or .bin, sharded or not)."""
    weights = (*folder.glob("diffusion_pytorch_model*.safetensors"), *folder.glob("diffusion_pytorch_model*.bin"))
    return (folder / "config.json").is_file() and bool(weights)


def _resolve_dir(name: str, what: str, folders: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    """``name`` as a local directory: unchanged if it exists or is neither a repo id nor a
    Hugging Face cache snapshot (the layout check reports it), else the snapshot of the Hugging
    Face id holding ``folders``. A snapshot path missing on this node (resolved on the driver,
    read by a Ray actor or worker on another node) is the same id at the same commit
    (``weights.local_dir``)."""
    if Path(name).expanduser().exists() or not (is_repo_id(name) or snapshot_ref(name)):
        return name
    patterns = [diffusers_patterns(f) for f in folders]
    spec = dict(what=what, allow_patterns=[*extra, *(p for st, _ in patterns for p in st)],
                fallback_patterns=[p for _, b in patterns for p in b],
                complete=lambda d: all(_has_diffusers_weights(d / f) for f in folders))
    try:
        path = resolve_hf_weights(name, **spec) if is_repo_id(name) else local_dir(name, **spec)
    except MissingWeightsError as exc:
        raise MissingBackboneError(f"{exc}\n{_LAYOUT_HELP}") from None
    return str(path)


def resolve_backbone(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with ``dit_path``/``vae_path`` as local directories, checked.

    Hugging Face ids are resolved with ``weights.resolve_hf_weights`` (downloaded into the HF
    cache when the network is allowed, from the cache only with ``HF_HUB_OFFLINE=1``): for
    ``dit_path`` ``transformer/``, ``scheduler/scheduler_config.json`` and, without
    ``vae_path``, ``vae/`` (configs and safetensors weights, ``.bin`` only where there are no
    safetensors); for ``vae_path`` the repository root. Local paths are kept as given. Call it
    once on the driver and hand the result to actors and workers, which then read local
    files only; on a node where a resolved snapshot path
    (``$HF_HUB_CACHE/models--org--name/snapshots/<commit>``) does not exist, it is resolved
    again there by its id at that commit (downloaded, or this node's cache offline). A
    ``unet`` config is returned unchanged.

    Raises:
        MissingBackboneError: an id cannot be resolved (message: the id, the endpoint or cache,
            the reason and the alternatives), or a directory or its ``config.json`` is missing
            (naming which, and the expected layout).
    """
    if cfg.resolved_backbone != "dit":
        return cfg
    folders = ("transformer/",) if cfg.vae_path else ("transformer/", "vae/")
    dit = _resolve_dir(cfg.dit_path, "DiT", folders, extra=("scheduler/scheduler_config.json",))
    vae = _resolve_dir(cfg.vae_path, "VAE", ("",)) if cfg.vae_path else None
    if (dit, vae) != (cfg.dit_path, cfg.vae_path):
        cfg = cfg.model_copy(update={"dit_path": dit, "vae_path": vae})
    for what, d in (("DiT transformer", Path(cfg.dit_path).expanduser() / "transformer"),
                    ("VAE", cfg.vae_dir.expanduser())):  # fmt: skip
        if not (d / "config.json").is_file():
            raise MissingBackboneError(f"{what}: no {d / 'config.json'}. {_LAYOUT_HELP}")
    return cfg


@dataclass
class Backbone:
    """A class-conditional noise predictor with everything needed to train and sample it.

    Attributes:
        kind: ``"dit"`` (latent space) or ``"unet"`` (pixel space).
        model: the denoiser; ``denoise`` returns its noise prediction.
        vae: the ``AutoencoderKL`` of ``dit``; ``None`` for ``unet``.
        schedule: DDPM training-schedule config (diffusers ``DDPMScheduler`` kwargs).
        resolution: HR side in pixels of a training crop and of a synthesized image.
        num_clusters: k; class ids are ``0..k-1`` and ``k`` is the null (unconditional) class.
        latent_scale: multiplies VAE latents (0.18215 for SD's VAE); 1 for ``unet``.
        trainable: ``"difffit"`` or ``"full"``.
        source: provenance for manifests (paths, "random-init", parameter counts).
        difffit: DiffFit's gamma placement (``apply_difffit``) of a ``difffit`` DiT, else ``None``.
        tied: a DiT whose blocks share one class table and timestep embedder
            (``tie_block_embeddings``).
    """

    kind: str
    model: nn.Module
    vae: nn.Module | None
    schedule: dict
    resolution: int
    num_clusters: int
    latent_scale: float = 1.0
    trainable: str = "full"
    source: dict = field(default_factory=dict)
    difffit: str | None = None
    tied: bool = False

    @property
    def null_class(self) -> int:
        """Class id of the unconditional branch of classifier-free guidance (= k)."""
        return self.num_clusters

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of what the denoiser sees: latents (4, res/8, res/8) or pixels (3, res, res)."""
        if self.vae is None:
            return (3, self.resolution, self.resolution)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.latent_channels, self.resolution // f, self.resolution // f)

    @property
    def learned_variance(self) -> bool:
        """The denoiser also outputs, per channel, the interpolation v in [-1, 1] between log beta_t
        and log beta~_t of the reverse-step variance (Nichol & Dhariwal, arXiv 2102.09672, Eq. 15):
        DiT's ``out_channels`` = 2 x ``in_channels``."""
        return self.model.config.out_channels == 2 * self.model.config.in_channels

    def predict(self, x: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """The denoiser's raw output split in two: noise prediction eps_hat ``(B, C, h, w)`` and,
        when ``learned_variance``, the variance channels v ``(B, C, h, w)`` (else ``None``), for
        noisy samples ``x`` of ``sample_shape``, integer timesteps ``t`` ``(B,)`` and class ids
        ``labels`` ``(B,)`` (``null_class`` = unconditional)."""
        if self.kind == "dit":
            out = self.model(x, timestep=t, class_labels=labels).sample
        else:
            out = self.model(x, t, class_labels=labels).sample
        c = x.shape[1]
        return (out[:, :c], out[:, c:]) if out.shape[1] == 2 * c else (out, None)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Noise prediction eps_hat, ``(B, C, h, w)`` float (``predict`` without the variance
        channels)."""
        return self.predict(x, t, labels)[0]

    @torch.no_grad()
    def decode(self, z: torch.Tensor, vae: nn.Module | None = None) -> torch.Tensor:
        """Samples ``(B, C, h, w)`` -> images ``(B, 3, res, res)`` float in [-1, 1] (clamped).
        ``vae``: decode with this ``AutoencoderKL`` instead of the training one (SRDD decodes
        with ``stabilityai/sd-vae-ft-mse``; ``synthesis.load_decoder_vae``); ``dit`` only."""
        if vae is not None and self.vae is None:
            raise ValueError("a decoder VAE needs the dit backbone: the unet backbone samples pixels")
        if self.vae is not None:
            z = (vae or self.vae).decode(z / self.latent_scale).sample
        return z.clamp(-1, 1)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that train (name -> parameter), in a fixed order."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- backbones


def _label_embeddings(model: nn.Module) -> list[nn.Module]:
    """The class-embedding modules of a DiT (one per block in diffusers' layout, one in all if
    tied: ``modules()`` lists a shared module once)."""
    from diffusers.models.embeddings import LabelEmbedding

    return [m for m in model.modules() if isinstance(m, LabelEmbedding)]


def tie_block_embeddings(model: nn.Module) -> int:
    """Make every DiT block use block 0's ``norm1.emb`` (``CombinedTimestepLabelEmbeddings``:
    timestep MLP + class table), in place, as the original DiT's single ``t_embedder`` and
    ``y_embedder``; diffusers' conversion gives each block an equal copy, which fine-tuning
    would otherwise train apart (the final layer reads block 0's). After tying, the shared
    parameters appear once in ``named_parameters()`` (under block 0's names) and under every
    block's name in ``state_dict()``. Idempotent. Returns the number of blocks re-pointed.

    Raises:
        ValueError: the model has no ``transformer_blocks`` with ``norm1.emb``.
    """
    blocks = list(getattr(model, "transformer_blocks", []))
    if not blocks or not all(hasattr(getattr(b, "norm1", None), "emb") for b in blocks):
        raise ValueError(f"{type(model).__name__} has no per-block class/timestep embedding to tie")
    shared, n = blocks[0].norm1.emb, 0
    for block in blocks[1:]:
        if block.norm1.emb is not shared:
            block.norm1.emb = shared
            n += 1
    return n


def resize_class_embedding(model: nn.Module, num_clusters: int, init: str = "mean") -> None:
    """Resize every DiT class-embedding table to ``num_clusters`` + 1 rows, in place.

    Row ``c < k`` starts at the mean of the pretrained class rows (``init="mean"``: no ImageNet
    class is preferred) or at pretrained row ``c`` (``init="imagenet-rows"``: SRDD's release,
    which keeps DiT's 1000-class table and labels its clusters 0..k-1; rows it never uses get
    no gradient, so the two are the same model); row ``k`` (null class) keeps the pretrained
    null embedding. The model's config ``num_embeds_ada_norm`` is updated so
    ``save_pretrained`` round-trips. Class dropout inside the tables is switched off:
    ``finetune`` drops labels itself, the same for every block.

    Raises:
        ValueError: ``num_clusters`` < 1, ``init`` unknown, the model has no class-embedding
            table, or ``imagenet-rows`` with more clusters than pretrained classes.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if init not in ("mean", "imagenet-rows"):
        raise ValueError(f"finetune.class_init must be 'mean' or 'imagenet-rows', got {init!r}")
    tables = _label_embeddings(model)
    if not tables:
        raise ValueError(f"{type(model).__name__} has no class-embedding table to resize")
    for emb in tables:
        old = emb.embedding_table.weight.data
        n_old = emb.num_classes
        if init == "imagenet-rows" and num_clusters > n_old:
            raise ValueError(f"finetune.class_init 'imagenet-rows' needs k <= {n_old} pretrained classes, "
                             f"got k = {num_clusters}; use class_init 'mean'")  # fmt: skip
        new = torch.empty(num_clusters + 1, old.shape[1], dtype=old.dtype, device=old.device)
        new[:num_clusters] = old[:num_clusters] if init == "imagenet-rows" else old[:n_old].mean(0, keepdim=True)
        new[num_clusters] = old[n_old] if old.shape[0] > n_old else old.mean(0)
        emb.embedding_table = nn.Embedding.from_pretrained(new, freeze=False)
        emb.num_classes = num_clusters
        emb.dropout_prob = 0.0
    model.register_to_config(num_embeds_ada_norm=num_clusters)


def _scale_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output * module.difffit_gamma


#: DiffFit placements: which modules of a diffusers DiT block get an output scale gamma, in
#: which blocks. ``first-half`` is SRDD's released DiT (MinimaxDiffusion ``models.py``, blocks
#: 0-13 of 28): ``Attention.gamma1`` (3 x dim) on the fused qkv output = to_q, to_k, to_v here;
#: ``Attention.gamma2`` on the output projection = ``attn1.to_out[0]``; ``DiTBlock.gamma1`` on
#: the attention branch = ``attn1``; ``DiTBlock.gamma2`` on the MLP branch = ``ff``.
DIFFFIT_PLACEMENTS = {
    "first-half": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn1", "ff"),
    "all-blocks": ("attn1", "ff"),
}


def difffit_blocks(num_blocks: int, placement: str) -> range:
    """Indices of the blocks that get gamma: the first ``num_blocks // 2`` (``first-half``:
    14 of DiT-XL/2's 28 as the release, which hard-codes 14) or all (``all-blocks``)."""
    return range(num_blocks // 2 if placement == "first-half" else num_blocks)


def apply_difffit(model: nn.Module, placement: str = "first-half") -> list[str]:
    """DiffFit (arXiv 2304.06648 §3.2) on a DiT: freeze everything, then let train only biases,
    norm weights (LayerNorm/GroupNorm; DiT's have none), class-embedding tables and new
    per-channel scales ``difffit_gamma`` (ones, so the output is unchanged at start) on the
    outputs of ``DIFFFIT_PLACEMENTS[placement]`` in the blocks of ``difffit_blocks``. The
    timestep MLP's and final layer's weights stay frozen (their biases train), as in the
    release, whose trainable set is every parameter named ``bias``, ``gamma`` or ``y_embed``.
    Idempotent for one placement. Returns the names of the trainable parameters.

    Raises:
        ValueError: unknown ``placement``.
    """
    if placement not in DIFFFIT_PLACEMENTS:
        raise ValueError(f"finetune.difffit must be one of {sorted(DIFFFIT_PLACEMENTS)}, got {placement!r}")
    model.requires_grad_(False)
    blocks = list(getattr(model, "transformer_blocks", []))
    for i in difffit_blocks(len(blocks), placement):
        dim = blocks[i].attn1.to_out[0].out_features
        for name in DIFFFIT_PLACEMENTS[placement]:
            branch = blocks[i].get_submodule(name)
            if not hasattr(branch, "difffit_gamma"):
                out = branch.out_features if isinstance(branch, nn.Linear) else dim
                branch.register_parameter("difffit_gamma", nn.Parameter(torch.ones(out)))
                branch.register_forward_hook(_scale_output)
            branch.difffit_gamma.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            module.requires_grad_(True)
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
    for emb in _label_embeddings(model):
        emb.embedding_table.weight.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_dit(dit_path: str | Path, vae_path: str | Path | None = None) -> tuple[nn.Module, nn.Module, dict]:
    """Load ``DiTTransformer2DModel`` (``dit_path/transformer``), ``AutoencoderKL``
    (``vae_path``, else ``dit_path/vae``) and the DDPM schedule (``dit_path/scheduler``, else
    DiT's), in float32. Each path is a local directory or a Hugging Face id
    (``resolve_backbone``); loading itself reads local files only.

    Raises:
        MissingBackboneError: an id cannot be resolved, or a directory or its ``config.json``
            is missing, naming which.
    """
    from diffusers import DiTTransformer2DModel

    cfg = resolve_backbone(FinetuneConfig(dit_path=str(dit_path), vae_path=str(vae_path) if vae_path else None))
    root = Path(cfg.dit_path).expanduser()
    vae = load_vae(cfg)
    dit = DiTTransformer2DModel.from_pretrained(root / "transformer", local_files_only=True)
    schedule = dict(DEFAULT_SCHEDULE)
    sched_file = root / "scheduler" / "scheduler_config.json"
    if sched_file.is_file():
        raw = json.loads(sched_file.read_text())
        schedule.update({k: raw[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                             "beta_schedule") if k in raw})  # fmt: skip
    return dit.float(), vae, schedule


def build_unet(resolution: int, num_clusters: int, channels: tuple[int, ...] = (64, 128, 256),
               attention: bool = True, learned_variance: bool = False) -> nn.Module:  # fmt: skip
    """A class-conditional pixel-space ``UNet2DModel`` (Ho et al. 2020 layout): one ResNet
    block per level, self-attention at the lowest level if ``attention``, ``num_clusters`` + 1
    class embeddings (the last is the null class); 6 output channels (noise, then the
    variance interpolation v of improved DDPM, as DiT's) if ``learned_variance``, else 3.

    Raises:
        ValueError: ``resolution`` not divisible by 2^(levels-1).
    """
    from diffusers import UNet2DModel

    levels = len(channels)
    if resolution % 2 ** (levels - 1):
        raise ValueError(f"finetune.resolution {resolution} must be divisible by {2 ** (levels - 1)}")
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=resolution, in_channels=3, out_channels=6 if learned_variance else 3,
        block_out_channels=tuple(channels),
        down_block_types=tuple(down), up_block_types=tuple(up), layers_per_block=1,
        norm_num_groups=min(32, min(channels)), num_class_embeds=num_clusters + 1,
    )  # fmt: skip


def _param_count(model: nn.Module) -> dict[str, int]:
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip


def make_dit_backbone(dit: nn.Module, vae: nn.Module, schedule: dict, *, num_clusters: int,
                      resolution: int, trainable: str = "difffit", latent_scale: float = 0.18215,
                      source: dict | None = None, difffit: str = "first-half", tie: bool = True,
                      class_init: str = "mean") -> Backbone:  # fmt: skip
    """Wrap a loaded DiT + VAE: tie its per-block class/timestep embeddings if ``tie``
    (``tie_block_embeddings``), resize the class table(s) to ``num_clusters`` from
    ``class_init`` (``resize_class_embedding``) and set what trains (``difffit``: the DiffFit
    placement of ``apply_difffit``; ``trainable="full"``: everything).

    Raises:
        ValueError: ``resolution`` does not give the DiT's latent size (``sample_size``), or
            from ``resize_class_embedding`` / ``apply_difffit``.
    """
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution // f != dit.config.sample_size:
        raise ValueError(
            f"finetune.resolution {resolution} gives {resolution // f}x{resolution // f} latents, "
            f"but the DiT was built for {dit.config.sample_size}x{dit.config.sample_size} "
            f"(resolution {dit.config.sample_size * f})"
        )
    if tie:
        tie_block_embeddings(dit)
    resize_class_embedding(dit, num_clusters, class_init)
    if trainable == "difffit":
        apply_difffit(dit, difffit)
    else:
        dit.requires_grad_(True)
    return Backbone("dit", dit, vae, schedule, resolution, num_clusters, latent_scale, trainable,
                    {**(source or {}), "class_init": class_init, **_param_count(dit)},
                    difffit if trainable == "difffit" else None, tie)  # fmt: skip


def build_backbone(cfg: FinetuneConfig, num_clusters: int) -> Backbone:
    """The backbone ``cfg`` asks for, ready to train (``cfg.resolved_backbone``).

    Raises:
        MissingBackboneError: ``dit`` requested and its directories are missing or its ids
            cannot be resolved.
        ValueError: resolution incompatible with the backbone, ``loss: hybrid`` with a DiT
            without learned variance, or from ``make_dit_backbone``.
    """
    kind = cfg.resolved_backbone
    trainable = cfg.trainable if cfg.trainable != "auto" else ("difffit" if kind == "dit" else "full")
    if kind == "dit":
        cfg = resolve_backbone(cfg)  # a no-op when the driver resolved it already
    torch.manual_seed(cfg.seed)
    if kind == "dit":
        dit, vae, schedule = load_dit(cfg.dit_path, cfg.vae_path)
        source = {"dit_path": str(Path(cfg.dit_path).expanduser().resolve()),
                  "vae_path": str(cfg.vae_dir.expanduser().resolve())}  # fmt: skip
        for key, path in (("dit", cfg.dit_path), ("vae", cfg.vae_path)):  # Hub id and commit
            ref = snapshot_ref(path)
            if ref:
                source[f"{key}_repo"], source[f"{key}_revision"] = ref
        backbone = make_dit_backbone(dit, vae, schedule, num_clusters=num_clusters, resolution=cfg.resolution,
                                     trainable=trainable, latent_scale=cfg.latent_scale, source=source,
                                     difffit=cfg.difffit, tie=cfg.tie_embeddings, class_init=cfg.class_init)
        _check_loss(cfg, backbone)
        return backbone
    if trainable == "difffit":
        raise ValueError("finetune.trainable 'difffit' needs a pretrained DiT; the unet backbone "
                         "trains from scratch (trainable: full)")  # fmt: skip
    unet = build_unet(cfg.resolution, num_clusters, cfg.unet_channels, cfg.unet_attention,
                      learned_variance=cfg.loss == "hybrid")
    schedule = {**DEFAULT_SCHEDULE}
    return Backbone("unet", unet, None, schedule, cfg.resolution, num_clusters, 1.0, "full",
                    {"init": "random (trained from scratch)", **_param_count(unet)})  # fmt: skip


def _check_loss(cfg: FinetuneConfig, backbone: Backbone) -> None:
    if cfg.loss == "hybrid" and not backbone.learned_variance:
        raise ValueError(f"finetune.loss 'hybrid' needs a denoiser with learned variance (out_channels = 2 x "
                         f"in_channels); this {backbone.kind} has out_channels "
                         f"{backbone.model.config.out_channels}: use finetune.loss 'simple'")  # fmt: skip


# --------------------------------------------------------------------------- saving


def save_finetuned(backbone: Backbone, out_dir: Path, weights: dict[str, torch.Tensor],
                   extra: dict | None = None) -> Path:  # fmt: skip
    """Write ``out_dir/backbone.json`` + ``out_dir/weights.safetensors`` (mode 0644 under umask 022).

    ``weights`` are the trained tensors (name -> tensor, usually the EMA): for DiffFit only the
    trainable ones (kB to MB; the frozen rest is re-read from ``source.dit_path``; a tied
    embedding under block 0's name only), for a UNet the whole state dict. ``backbone.json``
    records the DiffFit placement and the tying, which ``load_finetuned`` re-applies before
    loading. ``extra`` keys (``finetune``: ``step``, ``iterations``, ``elapsed_s``,
    ``resumed_from``, ...) are added to it. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": backbone.kind, "num_clusters": backbone.num_clusters,
        "resolution": backbone.resolution, "latent_scale": backbone.latent_scale,
        "trainable": backbone.trainable, "schedule": backbone.schedule, "source": backbone.source,
        "difffit": backbone.difffit, "tied": backbone.tied,
    }  # fmt: skip
    if backbone.kind == "unet":
        meta["unet_config"] = {k: v for k, v in backbone.model.config.items() if not k.startswith("_")}
    meta.update(extra or {})
    tmp = out_dir / f".{WEIGHTS_FILE}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp))
    _publish(tmp, out_dir / WEIGHTS_FILE)  # 0644, not safetensors' 0600
    tmp = out_dir / f".{MODEL_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=list))
    os.replace(tmp, out_dir / MODEL_FILE)
    return out_dir


def load_finetuned(model_dir: str | Path, device: str | torch.device = "cpu") -> Backbone:
    """Load a ``save_finetuned`` directory, in eval mode on ``device``.

    Raises:
        FileNotFoundError: ``backbone.json`` or ``weights.safetensors`` is missing.
        MissingBackboneError: the DiT/VAE directories it was fine-tuned from are gone.
        ValueError: the weights do not fit the backbone.
    """
    from diffusers import UNet2DModel

    model_dir = Path(model_dir)
    for name in (MODEL_FILE, WEIGHTS_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{str(model_dir)!r} is not a fine-tuned model: no {name}")
    meta = json.loads((model_dir / MODEL_FILE).read_text())
    weights = load_file(str(model_dir / WEIGHTS_FILE))
    if meta["kind"] == "dit":
        dit, vae, _ = load_dit(meta["source"]["dit_path"], meta["source"]["vae_path"])
        # saved before the options existed: DiffFit on every block, untied copies
        difffit = meta.get("difffit", "all-blocks") or "all-blocks"
        backbone = make_dit_backbone(dit, vae, meta["schedule"], num_clusters=meta["num_clusters"],
                                     resolution=meta["resolution"], trainable=meta["trainable"],
                                     latent_scale=meta["latent_scale"], source=meta["source"], difffit=difffit,
                                     tie=meta.get("tied", False),
                                     class_init=meta["source"].get("class_init", "mean"))  # fmt: skip
        state = backbone.model.state_dict(keep_vars=True)  # the live tensors, a tied one under every name
        unknown = sorted(set(weights) - set(state))
        missing = sorted(set(backbone.trainable_parameters()) - set(weights))
        if unknown or missing:
            raise ValueError(f"{str(model_dir)!r} does not fit the DiT: unknown weights "
                             f"{unknown[:3]}, missing trained weights {missing[:3]}")  # fmt: skip
        with torch.no_grad():
            for name, value in weights.items():
                target = state[name]
                if target.shape != value.shape:
                    raise ValueError(f"{str(model_dir)!r}: {name} has shape {tuple(value.shape)}, "
                                     f"the DiT's is {tuple(target.shape)}")  # fmt: skip
                target.copy_(value)
    else:
        cfg = dict(meta["unet_config"])
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            cfg[key] = tuple(cfg[key])
        unet = UNet2DModel(**cfg)
        try:
            unet.load_state_dict(weights)
        except RuntimeError as exc:
            raise ValueError(f"{str(model_dir)!r}: weights do not fit the UNet: {exc}") from None
        backbone = Backbone("unet", unet, None, meta["schedule"], meta["resolution"],
                            meta["num_clusters"], 1.0, "full", meta["source"])  # fmt: skip
    backbone.model.to(device).eval().requires_grad_(False)
    if backbone.vae is not None:
        backbone.vae.to(device)
    return backbone


# --------------------------------------------------------------------------- encoding


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"patch {h}x{w} is smaller than finetune.resolution {size}")
    y, x = (h - size) // 2, (w - size) // 2
    return img[y : y + size, x : x + size]


def _to_signed(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def check_backbone(cfg: FinetuneConfig) -> str:
    """Fail fast, before any work, when the DiT/VAE of a ``dit`` config cannot be had:
    resolves (downloads, or finds in the HF cache) Hugging Face ids and checks the
    directories (``resolve_backbone``). Returns the backbone kind (``dit`` or ``unet``).

    Raises:
        ImportError: the ``synth`` extra (diffusers; DeepSpeed with ``workers``) is not installed.
        MissingBackboneError: naming the missing directory or the unresolvable id, and the
            expected layout.
        ValueError: ``loss: hybrid`` with a DiT without learned variance.
    """
    import importlib.util

    needed = ["diffusers"] + ["deepspeed"] * bool(cfg.workers)
    absent = [m for m in needed if importlib.util.find_spec(m) is None]
    if absent:
        raise ImportError(f"the synthetic path needs {', '.join(absent)}: pip install 'srdistill[synth]'")
    kind = cfg.resolved_backbone
    if kind == "dit":
        cfg = resolve_backbone(cfg)
        conf = json.loads((Path(cfg.dit_path).expanduser() / "transformer" / "config.json").read_text())
        out, inp = conf.get("out_channels"), conf.get("in_channels", 4)
        if cfg.loss == "hybrid" and out != 2 * inp:
            raise ValueError(f"finetune.loss 'hybrid' needs a DiT with learned variance (out_channels = 2 x "
                             f"in_channels = {2 * inp}); {cfg.dit_path} has out_channels {out}: use "
                             "finetune.loss 'simple'")  # fmt: skip
    return kind


def load_vae(cfg: FinetuneConfig) -> nn.Module | None:
    """The ``AutoencoderKL`` of a ``dit`` config (``vae_path``, else ``dit_path/vae``), in
    eval mode, float32; ``None`` for ``unet`` (pixel space).

    Raises:
        MissingBackboneError: the VAE directory or its config.json is missing, or an id cannot
            be resolved (``resolve_backbone``; pass a resolved config to read local files only).
    """
    from diffusers import AutoencoderKL

    if cfg.resolved_backbone != "dit":
        return None
    cfg = resolve_backbone(cfg)
    vae = AutoencoderKL.from_pretrained(cfg.vae_dir.expanduser(), local_files_only=True)
    return vae.float().eval().requires_grad_(False)


def encoded_spec(cfg: FinetuneConfig, patch_size: int) -> tuple[tuple[int, ...], str]:
    """Shape and dtype of one stored sample (see ``encode_patches``) for patches of
    ``patch_size`` pixels: ``((2, 2C, res/f, res/f), "float16")`` for ``dit`` (f the VAE's
    downsampling factor), ``((patch_size, patch_size, 3), "uint8")`` for ``unet``.

    Raises:
        ValueError: ``patch_size`` < ``cfg.resolution``.
    """
    if patch_size < cfg.resolution:
        raise ValueError(f"mine.patch_size {patch_size} < finetune.resolution {cfg.resolution}: "
                         "the training crops must fit in a patch")  # fmt: skip
    if cfg.resolved_backbone != "dit":
        return (patch_size, patch_size, 3), "uint8"
    cfg = resolve_backbone(cfg)
    conf = json.loads((cfg.vae_dir.expanduser() / "config.json").read_text())
    f = 2 ** (len(conf["block_out_channels"]) - 1)
    c = conf.get("latent_channels", 4)
    return (2, 2 * c, cfg.resolution // f, cfg.resolution // f), "float16"


@torch.no_grad()
def encode_patches(vae: nn.Module | None, resolution: int, patches: list[np.ndarray]) -> np.ndarray:
    """What the fine-tuning stage stores per patch, computed once.

    Args:
        vae: the backbone's VAE, or ``None`` (pixel space).
        resolution: training crop side in pixels.
        patches: HR patches ``(H, W, 3)`` uint8, each at least ``resolution`` a side.

    Returns:
        with a VAE: float16 ``(B, 2, 2C, h, w)``: latent moments (mean ‖ std, unscaled) of the
        centre crop ``[:, 0]`` and of its mirror image ``[:, 1]`` (flips need no re-encode).
        Without: uint8 ``(B, H, W, 3)``, the patches themselves (cropped at each step).

    Raises:
        ValueError: a patch is smaller than ``resolution``, or (pixel space) sizes differ.
    """
    if vae is None:
        if len({p.shape for p in patches}) > 1:
            raise ValueError("patches of one batch must share a size")
        return np.stack(patches)
    device = next(vae.parameters()).device
    x = _to_signed(np.stack([_center_crop(p, resolution) for p in patches]), device)
    out = []
    for view in (x, x.flip(-1)):
        dist = vae.encode(view).latent_dist
        out.append(torch.cat([dist.mean, dist.std], 1))
    return torch.stack(out, 1).cpu().numpy().astype(np.float16)


class PatchEncoder:
    """Ray Data actor class (Ray-free itself) of the encoding stage: reads the patches of a
    batch of patch rows (``patch_id``, ``source``, ``x``, ``y``, ``size``, ``cluster``; each
    source image decoded once) and returns ``patch_id``, ``cluster``, ``sample`` (raw bytes of
    ``encode_patches``' output, see ``encoded_spec``).

    Raises:
        imaging.ImageReadError: a source image cannot be read any more.
    """

    def __init__(self, cfg: FinetuneConfig, *, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.resolution = cfg.resolution
        self.vae = load_vae(cfg)
        if self.vae is not None:
            self.vae.to(resolve_device(cfg.device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from srdistill.sr import imaging

        patches = imaging.read_crops(batch["source"], batch["x"], batch["y"], batch["size"])
        samples = encode_patches(self.vae, self.resolution, patches) if patches else []
        return {"patch_id": np.asarray(batch["patch_id"]),
                "cluster": np.asarray(batch["cluster"], np.int32),
                "sample": np.array([s.tobytes() for s in samples], dtype=object)}  # fmt: skip


#: Columns of the encoded-set parquet files (``PatchEncoder`` rows; ``sample`` holds the raw
#: bytes of one ``encode_patches`` entry, shape and dtype from ``encoded_spec``).
ENCODED_SCHEMA = pa.schema([("patch_id", pa.string()), ("cluster", pa.int32()), ("sample", pa.binary())])


@dataclass
class EncodedSet:
    """The fine-tuning data of one worker: ``samples`` ``(N, ...)`` (see ``encode_patches``),
    ``clusters`` ``(N,)`` int64 in ``[0, k)``; ``total``: the rows of the whole encoded set,
    over all workers (``None``: this set is all of it), what ``finetune.epochs`` counts."""

    samples: torch.Tensor
    clusters: torch.Tensor
    total: int | None = None

    @property
    def num_total(self) -> int:
        """Rows of the whole encoded set (all workers' shards)."""
        return len(self.clusters) if self.total is None else self.total


def load_encoded(directory: str | Path, *, shape: tuple[int, ...], dtype: str, rank: int = 0,
                 world_size: int = 1) -> EncodedSet:  # fmt: skip
    """Read the encoded-set parquet files of ``directory`` (sorted by patch id); keep rows
    ``rank::world_size``, the shard of this data-parallel worker (all rows if the shard would
    be empty). ``total`` of the result is the number of rows of all shards.

    Raises:
        FileNotFoundError: no parquet file in ``directory``.
    """
    files = sorted(Path(directory).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no encoded patches (*.parquet) in {str(directory)!r}")
    table = pa.concat_tables([pq.read_table(f, schema=ENCODED_SCHEMA) for f in files]).sort_by("patch_id")
    total = table.num_rows
    idx = np.arange(table.num_rows)
    shard = idx[rank::world_size] if len(idx[rank::world_size]) else idx
    table = table.take(pa.array(shard))
    blob = b"".join(table.column("sample").to_pylist())
    arr = np.frombuffer(blob, dtype=np.dtype(dtype)).reshape(table.num_rows, *shape)
    return EncodedSet(torch.from_numpy(arr.copy()),
                      torch.from_numpy(table.column("cluster").to_numpy().astype(np.int64)), total)  # fmt: skip


# --------------------------------------------------------------------------- loss


class MemoryBank:
    """Per-cluster FIFO memories of SRDD's loss: ``size`` flattened real samples and ``size``
    detached predictions per cluster, float32 on the device of the samples."""

    def __init__(self, num_clusters: int, size: int):
        self.size = size
        self.real: list[torch.Tensor | None] = [None] * num_clusters
        self.pred: list[torch.Tensor | None] = [None] * num_clusters

    def push(self, bank: list, cluster: int, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        old = bank[cluster]
        bank[cluster] = rows[-self.size :] if old is None else torch.cat([old, rows])[-self.size :]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in ("real", "pred"):
            for c, t in enumerate(getattr(self, name)):
                if t is not None:
                    out[f"{name}.{c}"] = t.cpu()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        for key, t in state.items():
            name, c = key.split(".")
            getattr(self, name)[int(c)] = t.to(device)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats:
    0.5 (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1).
    Tensors broadcast; float in, float out."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~= 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), the approximation
    improved DDPM's decoder likelihood uses (absolute error < 2e-4). Elementwise, in [0, 1]."""
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) per element, in nats, of N(means, exp(log_scales)^2) discretised to 256 bins of
    width 2/255 centred on data ``x`` in [-1, 1] (Ho et al. 2020, Eq. 13; the decoder L_0 of
    improved DDPM): log(Phi(z+) - Phi(z-)) with z+- = (x - mean +- 1/255) / scale, and the
    edge bins open (x < -0.999: log Phi(z+); x > 0.999: log(1 - Phi(z-))); Phi is
    ``approx_standard_normal_cdf``, probabilities clamped at 1e-12. Shapes must match.

    Raises:
        ValueError: the shapes differ.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"x {tuple(x.shape)}, means {tuple(means.shape)} and log_scales "
                         f"{tuple(log_scales.shape)} must have one shape")  # fmt: skip
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - means + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - means - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def posterior_tables(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 ``(T,)`` tables of the DDPM forward process with ``betas`` (``(T,)``, in (0, 1]),
    for ``q_posterior`` and ``vb_bits`` (Ho et al. 2020, Eq. 6-7):

    ``alphas_cumprod`` a_t, ``posterior_variance`` beta~_t = beta_t (1 - a_{t-1}) / (1 - a_t),
    ``posterior_log_variance_clipped`` (log beta~_t, with beta~_1 in place of beta~_0 = 0, as
    improved DDPM), ``posterior_mean_coef1`` beta_t sqrt(a_{t-1}) / (1 - a_t),
    ``posterior_mean_coef2`` (1 - a_{t-1}) sqrt(1 - beta_t) / (1 - a_t) and ``log_betas``.

    Raises:
        ValueError: ``betas`` not 1-D with at least 2 entries in (0, 1].
    """
    betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
    if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError("betas must be 1-D, at least 2 steps, each in (0, 1]")
    a = torch.cumprod(1.0 - betas, 0)
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    var = betas * (1.0 - a_prev) / (1.0 - a)
    return {"alphas_cumprod": a, "posterior_variance": var,
            "posterior_log_variance_clipped": torch.log(torch.cat([var[1:2], var[1:]])),
            "posterior_mean_coef1": betas * a_prev.sqrt() / (1.0 - a),
            "posterior_mean_coef2": (1.0 - a_prev) * (1.0 - betas).sqrt() / (1.0 - a),
            "log_betas": torch.log(betas)}  # fmt: skip


def _at(tables: dict[str, torch.Tensor], name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tables[name][t]`` as float32 on ``like``'s device, shaped to broadcast over ``like``."""
    return tables[name].to(like.device)[t].float().view(-1, *[1] * (like.ndim - 1))


def q_posterior(tables: dict[str, torch.Tensor], x0: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020,
    Eq. 6-7): mean = coef1_t x0 + coef2_t x_t, variance beta~_t (``posterior_tables``).
    ``x0``, ``x_t``: ``(B, ...)`` float; ``t``: ``(B,)`` int64 in [0, T). The variances are
    ``(B, 1, ...)`` (broadcast over the sample)."""
    mean = _at(tables, "posterior_mean_coef1", t, x_t) * x0 + _at(tables, "posterior_mean_coef2", t, x_t) * x_t
    return (mean, _at(tables, "posterior_variance", t, x_t),
            _at(tables, "posterior_log_variance_clipped", t, x_t))  # fmt: skip


def vb_bits(tables: dict[str, torch.Tensor], eps_hat: torch.Tensor, v: torch.Tensor, x0: torch.Tensor,
            x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Improved DDPM's variational-bound term L_t of each sample, in bits per dimension
    (Nichol & Dhariwal, arXiv 2102.09672, §3.1), with learned variance and a frozen mean.

    The model's p(x_{t-1} | x_t) has mean mu(x_t, x0_hat), the posterior mean at
    x0_hat = sqrt(1/a_t) x_t - sqrt(1/a_t - 1) eps_hat (not clipped), with ``eps_hat``
    detached (so L_t trains only ``v``), and log variance
    frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2 (Eq. 15). L_t is the KL from
    the true posterior (``q_posterior``) for t > 0 and the discretised decoder NLL of ``x0``
    (``discretized_gaussian_log_likelihood``) at t = 0, averaged over all non-batch dimensions
    and divided by ln 2.

    Args:
        tables: ``posterior_tables`` of the training schedule.
        eps_hat, v: ``(B, C, ...)`` float: noise prediction and variance channels of the model.
        x0, x_t: ``(B, C, ...)`` float: clean and noisy samples.
        t: ``(B,)`` int64 timesteps in [0, T).

    Returns:
        ``(B,)`` float32, bits per dimension.
    """
    eps_hat, v, x0, x_t = eps_hat.detach().float(), v.float(), x0.float(), x_t.float()
    a = _at(tables, "alphas_cumprod", t, x_t)
    x0_hat = (1.0 / a).sqrt() * x_t - (1.0 / a - 1.0).sqrt() * eps_hat
    model_mean, _, _ = q_posterior(tables, x0_hat, x_t, t)
    frac = (v + 1.0) / 2.0
    min_log = _at(tables, "posterior_log_variance_clipped", t, x_t)
    max_log = _at(tables, "log_betas", t, x_t)
    model_logvar = frac * max_log + (1.0 - frac) * min_log
    true_mean, _, true_logvar = q_posterior(tables, x0, x_t, t)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1) / np.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1) / np.log(2.0)
    return torch.where(t.to(x_t.device) == 0, nll, kl)


def srdd_loss(eps_hat: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
              alpha_bar: torch.Tensor, labels: torch.Tensor, memory: MemoryBank | None,
              lambda_pos: float, lambda_neg: float, *, vb: torch.Tensor | None = None,
              reduce: str = "sample") -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """SRDD's fine-tuning loss (see the module docstring) for one batch; updates ``memory``.

    Args:
        eps_hat, noise, x_t, x0: ``(B, C, h, w)`` float: prediction, true noise, noisy and
            clean samples.
        alpha_bar: ``(B,)`` cumulative alpha of each sample's timestep.
        labels: ``(B,)`` cluster ids of the memory terms; ids >= the number of banks (the null
            class) get none.
        memory: the banks, or ``None`` for the diffusion loss only.
        vb: ``(B,)`` per-sample L_t in bits (``vb_bits``) of the hybrid loss, added as its
            batch mean; ``None`` for L_simple alone.
        reduce: ``"sample"``: each sample's 1 - min / max cosine similarity to its cluster's
            memory, averaged over the samples with memory; ``"cluster"`` (SRDD's release): per
            cluster in the batch the 1 - min / max over all its (sample, memory) pairs, summed
            and divided by the number of clusters in the batch (those without memory yet
            count, adding 0).

    Returns:
        (loss scalar, {"simple", "vb", "pos", "neg"} floats).

    Raises:
        ValueError: unknown ``reduce``.
    """
    if reduce not in ("sample", "cluster"):
        raise ValueError(f"finetune.memory_reduce must be 'sample' or 'cluster', got {reduce!r}")
    simple = F.mse_loss(eps_hat.float(), noise.float())
    parts = {"simple": float(simple.detach()), "vb": 0.0, "pos": 0.0, "neg": 0.0}
    loss = simple
    if vb is not None:
        vb_mean = vb.float().mean()
        loss = loss + vb_mean
        parts["vb"] = float(vb_mean.detach())
    if memory is None or (lambda_pos == 0 and lambda_neg == 0):
        return loss, parts
    a = alpha_bar.view(-1, 1, 1, 1).float()
    x0_hat = ((x_t.float() - (1 - a).sqrt() * eps_hat.float()) / a.sqrt()).flatten(1)
    pos_terms, neg_terms = [], []
    clusters = [c for c in labels.unique().tolist() if c < len(memory.real)]
    for c in clusters:
        rows = labels == c
        pred = F.normalize(x0_hat[rows], dim=1)
        if memory.real[c] is not None:
            sim = pred @ F.normalize(memory.real[c], dim=1).T
            pos_terms.append(1 - (sim.min(1).values if reduce == "sample" else sim.min().view(1)))
        if memory.pred[c] is not None:
            sim = pred @ F.normalize(memory.pred[c], dim=1).T
            neg_terms.append(sim.max(1).values if reduce == "sample" else sim.max().view(1))
        memory.push(memory.real, c, x0[rows].flatten(1))
        memory.push(memory.pred, c, x0_hat[rows])
    for name, terms, weight in (("pos", pos_terms, lambda_pos), ("neg", neg_terms, lambda_neg)):
        if terms:
            term = torch.cat(terms).mean() if reduce == "sample" else torch.cat(terms).sum() / len(clusters)
            loss = loss + weight * term
            parts[name] = float(term.detach())
    return loss, parts


# --------------------------------------------------------------------------- training


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
