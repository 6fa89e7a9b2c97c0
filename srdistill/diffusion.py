"""SRDD's cluster-conditioned diffusion fine-tuning (Cho et al., arXiv 2509.14777, §3.3).

The "classes" of a class-conditional diffusion model are the CLIP k-means clusters of the
mined patches. Two backbones, both diffusers classes:

* ``dit``: ``DiTTransformer2DModel`` (Peebles & Xie, arXiv 2212.09748) in the latent space of
  an ``AutoencoderKL`` (latents x 0.18215), loaded from a local directory or a Hugging Face id
  in the layout of ``facebook/DiT-XL-2-512`` (and optionally a VAE such as
  ``stabilityai/sd-vae-ft-ema``); ids are downloaded into the Hugging Face cache, or with
  ``HF_HUB_OFFLINE=1`` looked up there only (``resolve_backbone``, once on the driver: actors
  get the local directories); its class-embedding tables are resized to ``k`` clusters (+ the
  null class of classifier-free guidance) and it is fine-tuned with DiffFit (Xie et al., arXiv
  2304.06648): only biases, norm parameters, a per-channel scale ``gamma`` on every attention
  and MLP branch (initialised to 1, so the model starts unchanged) and the class embeddings
  train; every other weight stays bit-identical.
* ``unet``: a class-conditional pixel-space ``UNet2DModel`` trained from scratch (all
  parameters): the backbone without pretrained weights, so the whole SRDD path runs on a CPU
  with no download.

The loss is SRDD's: the DDPM noise-prediction loss L_simple (Ho et al. 2020, Eq. 14) plus two
memory-bank terms on the predicted clean sample x0_hat = (x_t - sqrt(1 - a_t) eps_hat) /
sqrt(a_t), with a FIFO memory of ``memory_size`` real samples and of as many (detached)
predictions per cluster::

    L = L_simple + lambda_pos * (1 - min_j cos(x0_hat, real_j)) + lambda_neg * max_j cos(x0_hat, pred_j)

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

from .config import FinetuneConfig
from .training import _publish, announce, resolve_device
from .weights import (MissingWeightsError, diffusers_patterns, is_repo_id, local_dir, resolve_hf_weights,
                      snapshot_ref)

__all__ = [
    "Backbone",
    "DiffusionParallel",
    "EncodedSet",
    "MissingBackboneError",
    "apply_difffit",
    "build_backbone",
    "build_unet",
    "check_backbone",
    "encode_patches",
    "encoded_spec",
    "PatchEncoder",
    "load_vae",
    "finetune",
    "load_dit",
    "make_dit_backbone",
    "load_encoded",
    "load_finetuned",
    "resize_class_embedding",
    "resolve_backbone",
    "save_finetuned",
    "srdd_loss",
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

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Noise prediction eps_hat, ``(B, C, h, w)`` float, for noisy samples ``x`` of
        ``sample_shape``, integer timesteps ``t`` ``(B,)`` and class ids ``labels`` ``(B,)``
        (``null_class`` = unconditional). DiT's learned-variance channels are dropped."""
        if self.kind == "dit":
            out = self.model(x, timestep=t, class_labels=labels).sample
            return out[:, : x.shape[1]]
        return self.model(x, t, class_labels=labels).sample

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Samples ``(B, C, h, w)`` -> images ``(B, 3, res, res)`` float in [-1, 1] (clamped)."""
        if self.vae is not None:
            z = self.vae.decode(z / self.latent_scale).sample
        return z.clamp(-1, 1)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that train (name -> parameter), in a fixed order."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- backbones


def _label_embeddings(model: nn.Module) -> list[nn.Module]:
    """The class-embedding modules of a DiT (one per block in diffusers' layout)."""
    from diffusers.models.embeddings import LabelEmbedding

    return [m for m in model.modules() if isinstance(m, LabelEmbedding)]


def resize_class_embedding(model: nn.Module, num_clusters: int) -> None:
    """Resize every DiT class-embedding table to ``num_clusters`` + 1 rows, in place.

    Row ``c < k`` starts at the mean of the pretrained class rows (no ImageNet class is
    preferred); row ``k`` (null class) keeps the pretrained null embedding. The model's config
    ``num_embeds_ada_norm`` is updated so ``save_pretrained`` round-trips. Class dropout inside
    the tables is switched off: ``finetune`` drops labels itself, the same for every block.

    Raises:
        ValueError: ``num_clusters`` < 1 or the model has no class-embedding table.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    tables = _label_embeddings(model)
    if not tables:
        raise ValueError(f"{type(model).__name__} has no class-embedding table to resize")
    for emb in tables:
        old = emb.embedding_table.weight.data
        n_old = emb.num_classes
        new = torch.empty(num_clusters + 1, old.shape[1], dtype=old.dtype, device=old.device)
        new[:num_clusters] = old[:n_old].mean(0, keepdim=True)
        new[num_clusters] = old[n_old] if old.shape[0] > n_old else old.mean(0)
        emb.embedding_table = nn.Embedding.from_pretrained(new, freeze=False)
        emb.num_classes = num_clusters
        emb.dropout_prob = 0.0
    model.register_to_config(num_embeds_ada_norm=num_clusters)


def _scale_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output * module.difffit_gamma


def apply_difffit(model: nn.Module) -> list[str]:
    """DiffFit (arXiv 2304.06648 §3.2) on a DiT: freeze everything, then let train only biases,
    norm weights (LayerNorm/GroupNorm), class-embedding tables and a new per-channel scale
    ``difffit_gamma`` (ones, so the output is unchanged at start) on each block's attention and
    MLP output. Idempotent. Returns the names of the trainable parameters."""
    model.requires_grad_(False)
    for block in getattr(model, "transformer_blocks", []):
        for branch in (block.attn1, block.ff):
            if not hasattr(branch, "difffit_gamma"):
                dim = block.attn1.to_out[0].out_features
                branch.register_parameter("difffit_gamma", nn.Parameter(torch.ones(dim)))
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
               attention: bool = True) -> nn.Module:  # fmt: skip
    """A class-conditional pixel-space ``UNet2DModel`` (Ho et al. 2020 layout): one ResNet
    block per level, self-attention at the lowest level if ``attention``, ``num_clusters`` + 1
    class embeddings (the last is the null class).

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
        sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
        down_block_types=tuple(down), up_block_types=tuple(up), layers_per_block=1,
        norm_num_groups=min(32, min(channels)), num_class_embeds=num_clusters + 1,
    )  # fmt: skip


def _param_count(model: nn.Module) -> dict[str, int]:
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip


def make_dit_backbone(dit: nn.Module, vae: nn.Module, schedule: dict, *, num_clusters: int,
                      resolution: int, trainable: str = "difffit", latent_scale: float = 0.18215,
                      source: dict | None = None) -> Backbone:  # fmt: skip
    """Wrap a loaded DiT + VAE: resize its class tables to ``num_clusters`` and set what trains.

    Raises:
        ValueError: ``resolution`` does not give the DiT's latent size (``sample_size``).
    """
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution // f != dit.config.sample_size:
        raise ValueError(
            f"finetune.resolution {resolution} gives {resolution // f}x{resolution // f} latents, "
            f"but the DiT was built for {dit.config.sample_size}x{dit.config.sample_size} "
            f"(resolution {dit.config.sample_size * f})"
        )
    resize_class_embedding(dit, num_clusters)
    if trainable == "difffit":
        apply_difffit(dit)
    else:
        dit.requires_grad_(True)
    return Backbone("dit", dit, vae, schedule, resolution, num_clusters, latent_scale, trainable,
                    {**(source or {}), **_param_count(dit)})  # fmt: skip


def build_backbone(cfg: FinetuneConfig, num_clusters: int) -> Backbone:
    """The backbone ``cfg`` asks for, ready to train (``cfg.resolved_backbone``).

    Raises:
        MissingBackboneError: ``dit`` requested and its directories are missing or its ids
            cannot be resolved.
        ValueError: resolution incompatible with the backbone.
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
        return make_dit_backbone(dit, vae, schedule, num_clusters=num_clusters,
                                 resolution=cfg.resolution, trainable=trainable,
                                 latent_scale=cfg.latent_scale, source=source)  # fmt: skip
    if trainable == "difffit":
        raise ValueError("finetune.trainable 'difffit' needs a pretrained DiT; the unet backbone "
                         "trains from scratch (trainable: full)")  # fmt: skip
    unet = build_unet(cfg.resolution, num_clusters, cfg.unet_channels, cfg.unet_attention)
    schedule = {**DEFAULT_SCHEDULE}
    return Backbone("unet", unet, None, schedule, cfg.resolution, num_clusters, 1.0, "full",
                    {"init": "random (trained from scratch)", **_param_count(unet)})  # fmt: skip


# --------------------------------------------------------------------------- saving


def save_finetuned(backbone: Backbone, out_dir: Path, weights: dict[str, torch.Tensor],
                   extra: dict | None = None) -> Path:  # fmt: skip
    """Write ``out_dir/backbone.json`` + ``out_dir/weights.safetensors`` (mode 0644 under umask 022).

    ``weights`` are the trained tensors (name -> tensor, usually the EMA): for DiffFit only the
    trainable ones (kB to MB; the frozen rest is re-read from ``source.dit_path``), for a
    UNet the whole state dict. ``extra`` keys (``finetune``: ``step``, ``elapsed_s``,
    ``resumed_from``) are added to ``backbone.json``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": backbone.kind, "num_clusters": backbone.num_clusters,
        "resolution": backbone.resolution, "latent_scale": backbone.latent_scale,
        "trainable": backbone.trainable, "schedule": backbone.schedule, "source": backbone.source,
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
        backbone = make_dit_backbone(dit, vae, meta["schedule"], num_clusters=meta["num_clusters"],
                                     resolution=meta["resolution"], trainable=meta["trainable"],
                                     latent_scale=meta["latent_scale"], source=meta["source"])  # fmt: skip
        state = backbone.model.state_dict()
        unknown = sorted(set(weights) - set(state))
        missing = sorted(set(backbone.trainable_parameters()) - set(weights))
        if unknown or missing:
            raise ValueError(f"{str(model_dir)!r} does not fit the DiT: unknown weights "
                             f"{unknown[:3]}, missing trained weights {missing[:3]}")  # fmt: skip
        state.update(weights)
        backbone.model.load_state_dict(state)
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
    """
    import importlib.util

    needed = ["diffusers"] + ["deepspeed"] * bool(cfg.workers)
    absent = [m for m in needed if importlib.util.find_spec(m) is None]
    if absent:
        raise ImportError(f"the synthetic path needs {', '.join(absent)}: pip install 'srdistill[synth]'")
    kind = cfg.resolved_backbone
    if kind == "dit":
        resolve_backbone(cfg)
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
        from . import imaging

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
    ``clusters`` ``(N,)`` int64 in ``[0, k)``."""

    samples: torch.Tensor
    clusters: torch.Tensor


def load_encoded(directory: str | Path, *, shape: tuple[int, ...], dtype: str, rank: int = 0,
                 world_size: int = 1) -> EncodedSet:  # fmt: skip
    """Read the encoded-set parquet files of ``directory`` (sorted by patch id); keep rows
    ``rank::world_size``, the shard of this data-parallel worker (all rows if the shard would
    be empty).

    Raises:
        FileNotFoundError: no parquet file in ``directory``.
    """
    files = sorted(Path(directory).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no encoded patches (*.parquet) in {str(directory)!r}")
    table = pa.concat_tables([pq.read_table(f, schema=ENCODED_SCHEMA) for f in files]).sort_by("patch_id")
    idx = np.arange(table.num_rows)
    shard = idx[rank::world_size] if len(idx[rank::world_size]) else idx
    table = table.take(pa.array(shard))
    blob = b"".join(table.column("sample").to_pylist())
    arr = np.frombuffer(blob, dtype=np.dtype(dtype)).reshape(table.num_rows, *shape)
    return EncodedSet(torch.from_numpy(arr.copy()),
                      torch.from_numpy(table.column("cluster").to_numpy().astype(np.int64)))  # fmt: skip


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


def srdd_loss(eps_hat: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
              alpha_bar: torch.Tensor, labels: torch.Tensor, memory: MemoryBank | None,
              lambda_pos: float, lambda_neg: float) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """SRDD's fine-tuning loss (see the module docstring) for one batch; updates ``memory``.

    Args:
        eps_hat, noise, x_t, x0: ``(B, C, h, w)`` float: prediction, true noise, noisy and
            clean samples.
        alpha_bar: ``(B,)`` cumulative alpha of each sample's timestep.
        labels: ``(B,)`` class ids; the null class (>= number of banks) gets no memory term.
        memory: the banks, or ``None`` for L_simple only.

    Returns:
        (loss scalar, {"simple", "pos", "neg"} floats).
    """
    simple = F.mse_loss(eps_hat.float(), noise.float())
    parts = {"simple": float(simple.detach()), "pos": 0.0, "neg": 0.0}
    if memory is None or (lambda_pos == 0 and lambda_neg == 0):
        return simple, parts
    a = alpha_bar.view(-1, 1, 1, 1).float()
    x0_hat = ((x_t.float() - (1 - a).sqrt() * eps_hat.float()) / a.sqrt()).flatten(1)
    pos_terms, neg_terms = [], []
    for c in labels.unique().tolist():
        if c >= len(memory.real):
            continue
        rows = labels == c
        pred = F.normalize(x0_hat[rows], dim=1)
        if memory.real[c] is not None:
            sim = pred @ F.normalize(memory.real[c], dim=1).T
            pos_terms.append(1 - sim.min(1).values)
        if memory.pred[c] is not None:
            sim = pred @ F.normalize(memory.pred[c], dim=1).T
            neg_terms.append(sim.max(1).values)
        memory.push(memory.real, c, x0[rows].flatten(1))
        memory.push(memory.pred, c, x0_hat[rows])
    loss = simple
    if pos_terms:
        pos = torch.cat(pos_terms).mean()
        loss = loss + lambda_pos * pos
        parts["pos"] = float(pos.detach())
    if neg_terms:
        neg = torch.cat(neg_terms).mean()
        loss = loss + lambda_neg * neg
        parts["neg"] = float(neg.detach())
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

    Each step draws ``cfg.batch_size // world_size`` samples uniformly (``_draw``), a timestep
    t ~ U{0..T-1} and Gaussian noise, replaces each label by the null class with probability
    ``cfg.class_dropout`` (so classifier-free guidance works), and takes an AdamW step on
    ``srdd_loss`` over the trainable parameters; an EMA (decay ``cfg.ema_decay``) of them is
    the saved model. Under a data-parallel ``dp`` (Ray Train) the step runs in a DeepSpeed engine
    (ZeRO ``cfg.zero_stage``); otherwise in plain PyTorch. On CUDA the forward pass runs under
    bf16 autocast (DeepSpeed's bf16 mode too) unless ``cfg.precision == "fp32"``. Every
    ``cfg.checkpoint_every`` steps and at the end a checkpoint (engine
    state, EMA, step, RNG, memory banks; one file set per rank) goes to
    ``out_dir/checkpoint`` and to ``dp.report``; a later call (or ``dp.resume_from``) resumes
    from it at its step, announced on stderr and logged as ``{"step": S, "resumed_from_step":
    S, ...}``; ``elapsed_s`` carries on from the checkpoint's, and ``backbone.json`` records
    ``finetune: {step, elapsed_s, resumed_from}`` (the steps resumed at).

    Args:
        cfg: fine-tuning settings.
        backbone: from ``build_backbone``; its trainable parameters are updated.
        data: this worker's shard (``load_encoded``).
        out_dir: created if missing; ``model/`` (``save_finetuned``, rank 0), ``checkpoint/``,
            ``log.jsonl`` (rank 0: step, loss terms, images/s).

    Returns:
        ``out_dir / "model"``.

    Raises:
        ValueError: empty data, labels outside ``[0, k)``, or a checkpoint of another run.
    """
    from diffusers import DDPMScheduler

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(data.clusters) == 0:
        raise ValueError("finetune: no encoded patch to train on")
    if int(data.clusters.min()) < 0 or int(data.clusters.max()) >= backbone.num_clusters:
        raise ValueError(f"finetune: cluster ids must lie in [0, {backbone.num_clusters})")
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
        resumed = step < cfg.iterations  # else nothing is left to train
        if resumed:
            resumed_from.append(step)

    def elapsed() -> float:
        return elapsed0 + time.perf_counter() - t0

    def history() -> dict:
        return {"step": step, "elapsed_s": round(elapsed(), 2), "resumed_from": resumed_from}

    def save_checkpoint() -> None:
        ckpt.mkdir(parents=True, exist_ok=True)
        engine.save(ckpt, dp.rank)
        tmp = ckpt / f".state_rank{dp.rank}.tmp"
        torch.save({"step": step, "names": names, "ema": [t.cpu() for t in ema],
                    "rng": rng.bit_generator.state, "memory": memory.state_dict(),
                    "elapsed_s": elapsed(), "resumed_from": resumed_from}, tmp)  # fmt: skip
        os.replace(tmp, ckpt / f"state_rank{dp.rank}.pt")
        if lead and step >= cfg.iterations:
            save_finetuned(backbone, ckpt / "model", _final_weights(backbone, names, ema), {"finetune": history()})

    start = step
    log_file = out_dir / "log.jsonl"
    bar = tqdm(total=cfg.iterations, initial=step, desc="finetune", disable=not (progress and lead),
               mininterval=0.5 if sys.stderr.isatty() else 30)  # a line per 30 s in a log file
    t0, seen, sums, n = time.perf_counter(), 0, {"loss": 0.0, "simple": 0.0, "pos": 0.0, "neg": 0.0}, 0
    if lead and resumed:
        announce(f"resuming {resume} from step {step} of {cfg.iterations} "
                 f"(elapsed {elapsed0:.1f} s carried on)")  # fmt: skip
        with open(log_file, "a") as f:
            f.write(json.dumps({"step": step, "resumed_from_step": step, "iterations": cfg.iterations,
                                "elapsed_s": round(elapsed0, 2), "checkpoint": str(resume)}) + "\n")  # fmt: skip
    while step < cfg.iterations:
        idx = rng.integers(0, len(data.clusters), micro)
        x0 = _draw(data, backbone, cfg, idx, rng, device)
        labels = data.clusters[idx].to(device)
        drop = torch.from_numpy(rng.random(micro) < cfg.class_dropout).to(device)
        labels = torch.where(drop, torch.full_like(labels, backbone.null_class), labels)
        t = torch.from_numpy(rng.integers(0, sched.config.num_train_timesteps, micro)).to(device)
        noise = torch.from_numpy(rng.standard_normal(x0.shape, dtype=np.float32)).to(device)
        x_t = sched.add_noise(x0, noise, t)
        parts: dict[str, float] = {}

        def loss_fn() -> torch.Tensor:
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                eps = backbone.denoise(x_t, t, labels)
            loss, p = srdd_loss(eps, noise, x_t, x0, alphas[t], labels, memory,
                                cfg.lambda_pos, cfg.lambda_neg)  # fmt: skip
            parts.update(p)
            return loss

        loss = engine(loss_fn)
        with torch.no_grad(), gathered(params):
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # warm-up (as diffusers' EMA)
            for e, p in zip(ema, params):
                e.lerp_(p.detach().float(), 1 - decay)
        step += 1
        seen += micro
        n += 1
        sums["loss"] += float(loss.detach())
        for k in ("simple", "pos", "neg"):
            sums[k] += parts[k]
        bar.update(1)
        if lead and (step % cfg.log_every == 0 or step == cfg.iterations):
            secs = time.perf_counter() - t0  # this call's
            row = {"step": step, **{k: round(v / n, 6) for k, v in sums.items()},
                   "images_per_s": round(seen * dp.world_size / max(secs, 1e-9), 3),
                   "elapsed_s": round(elapsed0 + secs, 2)}  # fmt: skip
            with open(log_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            sums, n = dict.fromkeys(sums, 0.0), 0
        if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
            save_checkpoint()
            if dp.report is not None:
                dp.report({"step": step, "loss": float(loss.detach())}, ckpt)
    bar.close()
    model.eval()
    final = out_dir / "model"
    if start == step:  # resumed at or past cfg.iterations: nothing to train, hand the model out
        save_checkpoint()
        if dp.report is not None:
            dp.report({"step": step}, ckpt)
    if lead:
        save_finetuned(backbone, final, _final_weights(backbone, names, ema), {"finetune": history()})
    return final


def _final_weights(backbone: Backbone, names: list[str], ema: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors ``save_finetuned`` writes: the EMA of the trainable parameters, plus (for a
    UNet trained in full) every other state entry."""
    weights = dict(zip(names, ema))
    if backbone.trainable == "full":
        for key, value in backbone.model.state_dict().items():
            weights.setdefault(key, value.float())
    return {k: v.float() for k, v in weights.items()}
