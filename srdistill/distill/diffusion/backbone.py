"""The backbones of SRDD's fine-tuning (the method: ``srdistill.distill.diffusion``): a DiT/VAE
resolved by path or Hugging Face id and loaded with its class table resized to the clusters and
DiffFit's trainable set (``apply_difffit``), or the from-scratch UNet (``build_backbone``);
saving and loading the fine-tuned model (``save_finetuned``, ``load_finetuned``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from srdistill.config import FinetuneConfig
from srdistill.sr.training import _publish
from srdistill.weights import (MissingWeightsError, diffusers_patterns, is_repo_id, local_dir, resolve_hf_weights,
                               snapshot_ref)

__all__ = [
    "Backbone",
    "MissingBackboneError",
    "apply_difffit",
    "build_backbone",
    "build_unet",
    "check_backbone",
    "load_vae",
    "load_dit",
    "make_dit_backbone",
    "load_finetuned",
    "resize_class_embedding",
    "resolve_backbone",
    "save_finetuned",
    "tie_block_embeddings",
]


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
