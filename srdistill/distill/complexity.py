"""Image complexity of patches (TripleD step 1): ViT-feature complexity and cheap statistics.

TripleD ("Distribution-aware Dataset Distillation for Efficient Image Restoration", 2025)
scores image complexity with a pre-trained ViT; only its abstract is public, so the score
here is this project's design (docs/RESULTS.md, "TripleD: what is ours"):

* ``vit_complexity``: the *token diversity* of the ViT's final-layer patch tokens,
  ``1 - ||mean_t(z_t / ||z_t||)||^2``, i.e. the mean squared distance of the unit tokens from
  their centroid, in [0, 1]. A flat patch's tokens are alike (low), a textured one's differ
  (high).
* ``feature``: the L2-normalised mean of those patch tokens: the "ViT features" whose
  distributions selection and alignment match (MMD).
* ``entropy`` and ``grad_energy`` (``image_stats.image_statistics``): cheap statistics of the pixels.

The ViT is any transformers checkpoint of a ViT-style model (``ViTModel``, DeiT, DINO,
DINOv2) in a local directory or by Hugging Face id (``embedding.find_transformers_weights``:
downloaded into the Hugging Face cache, or, with ``HF_HUB_OFFLINE=1``, looked up there only);
without one, ``resolve_vit`` raises ``MissingWeightsError`` unless random initialisation is
explicitly allowed (``complexity.allow_random_init``), in which case the scores are NOT learned
and ``VitSource.note`` says so. ``resolve_vit`` runs once, on the driver; the actors load the
resolved local directory (on another node, the same Hub id at the same commit).

No Ray import: ``ComplexityScorer`` is a plain callable that ``runner.py`` hands to Ray Data;
``score_shard`` writes one part per mined shard.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from srdistill.config import ComplexityConfig
from srdistill.distill.embedding import MissingWeightsError, _device, find_transformers_weights, transformers_dir
from srdistill.sr import imaging
from srdistill.sr.image_stats import image_statistics
from srdistill.weights import hub_hint

__all__ = [
    "image_features",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDOM_INIT_CONFIGS",
    "SCORE_COLUMNS",
    "ComplexityScorer",
    "MissingWeightsError",
    "ViTFeatures",
    "VitSource",
    "attach_scores",
    "feature_matrix",
    "load_vit",
    "read_scores",
    "resolve_vit",
    "score_shard",
]

#: ImageNet's normalisation, per RGB channel on [0, 1] input (ViT/DeiT/DINO's default).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``ComplexityConfig.random_init`` -> ``ViTConfig`` kwargs of the random-init architecture.
RANDOM_INIT_CONFIGS: dict[str, dict[str, int]] = {
    # ViT-S/16 (DeiT-S / DINO ViT-S/16 shape)
    "vit-s-16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=16,
                     image_size=224, intermediate_size=1536),
    # ViT-Ti/16 (DeiT-Ti shape): a quarter of ViT-S/16's compute, for CPU benchmarks
    "vit-ti-16": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, patch_size=16,
                      image_size=224, intermediate_size=768),
    # for tests and smoke runs
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                 image_size=32, intermediate_size=64),
}

#: Columns of a complexity part besides ``patch_id`` (``score_shard``).
SCORE_COLUMNS = ("vit_complexity", "entropy", "grad_energy", "feature")

_RANDOM_NOTE = "random-init ViT: complexity scores and features are NOT learned"


# --------------------------------------------------------------------------- statistics


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class VitSource:
    """Where the ViT weights come from; recorded in the run manifest (``vit``).

    Attributes:
        model: ``ComplexityConfig.model`` as given (directory or HF id).
        path: resolved local directory; ``None`` for random init.
        pretrained: whether real weights are loaded.
        note: one human-readable line for logs and the manifest.
        repo_id: the Hugging Face id the weights came by; ``None`` for a local directory given
            as such, and random init.
        revision: the commit of that snapshot: ``load_vit`` on a node without ``path`` fetches
            exactly this commit.
    """

    model: str
    path: str | None
    pretrained: bool
    note: str
    repo_id: str | None = None
    revision: str | None = None


def resolve_vit(cfg: ComplexityConfig) -> VitSource:
    """Find the ViT weights for ``cfg``, downloading them by Hugging Face id if needed.

    ``cfg.model`` is a local directory holding ``config.json`` and the weights, or a Hugging
    Face id (downloaded into the HF cache when the network is allowed, the cache only with
    ``HF_HUB_OFFLINE=1``), as ``embedding.resolve_clip``. Call it once, on the driver:
    ``VitSource.path`` is then a local directory for the actors.

    Returns:
        ``VitSource`` with ``pretrained=True`` when weights were found, or, if they were not
        and ``cfg.allow_random_init`` is set, ``pretrained=False``, ``path=None`` and the note
        ``"random-init ViT: complexity scores and features are NOT learned"``.

    Raises:
        MissingWeightsError: weights not found (not a local directory, not in the HF cache
            offline, or the download failed: unknown repository, network error) and random init
            not allowed; the message names the model, the places searched (with the endpoint or
            cache and the reason), how to provide weights and ``--allow-random-init`` /
            ``complexity.allow_random_init=true``.
    """
    path, from_cache, looked = find_transformers_weights(cfg.model)
    if path is not None:
        note = (f"pretrained ViT {cfg.model} from the HF cache ({path})" if from_cache
                else f"pretrained ViT from {path}")
        hub = (cfg.model, path.name) if from_cache else (None, None)  # snapshots/<commit>
        return VitSource(cfg.model, str(path), True, note, *hub)
    if cfg.allow_random_init:
        return VitSource(cfg.model, None, False, _RANDOM_NOTE)
    places = "\n".join(f"  - {p}" for p in looked)
    raise MissingWeightsError(
        f"ViT weights for {cfg.model!r} (complexity.model) were not found; looked in:\n{places}\n"
        "Provide them: set complexity.model to a local directory holding config.json and "
        "model.safetensors (a transformers ViT, DeiT, DINO or DINOv2 checkpoint, e.g. a copy of "
        "google/vit-base-patch16-224 or facebook/dino-vits16, or model.save_pretrained(dir)), or to "
        f"a Hugging Face id: {hub_hint(cfg.model)}."
        "\n"
        "Or pass --allow-random-init (complexity.allow_random_init=true) to score with a randomly "
        "initialised ViT, whose complexity scores and features are NOT learned."
    )


# --------------------------------------------------------------------------- the model


def _norm_from_preprocessor(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    file = directory / "preprocessor_config.json"
    if file.is_file():
        conf = json.loads(file.read_text())
        mean, std = conf.get("image_mean"), conf.get("image_std")
        if mean is not None and std is not None and len(mean) == len(std) == 3:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return IMAGENET_MEAN, IMAGENET_STD


def _side(value: Any, what: str) -> int:
    """A square side from a config value (int or (h, w) pair)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"only square {what} are supported, got {value}")
        value = value[0]
    return int(value)


class ViTFeatures(torch.nn.Module):
    """A frozen ViT-style model as a differentiable map from images to (features, complexity).

    ``forward(x)``: ``x`` ``(N, 3, H, W)`` float32 RGB in [0, 1] (N >= 1). Images whose side
    is not ``image_size`` are resized to ``image_size x image_size`` (antialiased bicubic,
    ``F.interpolate``; non-square images are stretched), normalised with ``mean``/``std`` and
    run through the ViT (position embeddings interpolated when ``image_size`` differs from
    the checkpoint's). The final-layer patch tokens (the last ``(image_size // patch)^2``
    tokens, so CLS, DeiT's distillation token and DINOv2's registers are excluded) give:

    * ``features``: ``(N, D)`` float32, the mean patch token, L2-normalised (unit rows).
    * ``complexity``: ``(N,)`` float32 in [0, 1], the token diversity
      ``1 - ||mean_t(z_t / ||z_t||)||^2`` (mean squared distance of the unit tokens from their
      centroid). Our design: TripleD's paper only says that a pre-trained ViT scores
      complexity.

    Both are differentiable w.r.t. ``x`` (the alignment CNN backpropagates through them);
    the ViT's parameters are frozen (``requires_grad`` False) and the module stays in eval
    mode whatever ``train()`` is called with.

    Attributes:
        dim: D, the ViT's hidden size.
        image_size: the side images are resized to, pixels.
        patch_size: the ViT's patch side, pixels.
        num_patches: patch tokens per image.

    Raises (from ``forward``):
        ValueError: ``x`` is not ``(N, 3, H, W)``, or the model's output has no
            ``last_hidden_state`` of shape ``(N, T, D)`` with ``T > num_patches`` (not a ViT
            with a leading CLS token).
    """

    def __init__(self, model: torch.nn.Module, *, image_size: int | None = None,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):  # fmt: skip
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not all(hasattr(config, a) for a in ("patch_size", "image_size", "hidden_size")):
            raise ValueError(f"{type(model).__name__} is not a ViT-style model: its config needs "
                             "patch_size, image_size and hidden_size")  # fmt: skip
        self.model = model
        self.patch_size = _side(config.patch_size, "patches")
        self.native_size = _side(config.image_size, "images")
        self.image_size = int(image_size or self.native_size)
        self.dim = int(config.hidden_size)
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than the ViT's patch ({self.patch_size})")
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # ViT/DeiT take interpolate_pos_encoding; DINOv2 always interpolates (no such argument)
        takes = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self._kwargs = {"interpolate_pos_encoding": True} if takes and self.image_size != self.native_size else {}
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ViTFeatures":
        """Always eval mode: a frozen feature extractor (no dropout) inside a trained module."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3 or not len(x):
            raise ValueError(f"expected (N, 3, H, W) images with N >= 1, got {tuple(x.shape)}")
        x = x.float()
        side = self.image_size
        if tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
        out = self.model(pixel_values=(x - self.mean) / self.std, **self._kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None or hidden.ndim != 3 or hidden.shape[1] <= self.num_patches or hidden.shape[2] != self.dim:
            got = None if hidden is None else tuple(hidden.shape)
            raise ValueError(
                f"{type(self.model).__name__} is not a ViT with a leading CLS token: expected "
                f"last_hidden_state (N, 1+{self.num_patches}+, {self.dim}), got {got}"
            )
        tokens = hidden[:, -self.num_patches:].float()  # (N, P, D), patch tokens only
        features = F.normalize(tokens.mean(dim=1), dim=-1)
        centroid = F.normalize(tokens, dim=-1).mean(dim=1)  # (N, D), norm <= 1
        complexity = (1.0 - centroid.pow(2).sum(dim=-1)).clamp(0.0, 1.0)
        return features, complexity


def load_vit(source: VitSource, cfg: ComplexityConfig) -> ViTFeatures:
    """Build the frozen ViT described by ``source`` (on CPU, eval mode, no parameter grads).

    Pretrained: ``transformers.AutoModel.from_pretrained(path, local_files_only=True)`` on the
    local directory ``resolve_vit`` resolved (on a node without it, a Ray actor's, the Hub id
    at the same commit: ``source.repo_id``/``source.revision``, ``weights.local_dir``)
    (float32), normalisation from the directory's ``preprocessor_config.json``
    (``image_mean``/``image_std``), else ImageNet's. Random init: ``transformers.ViTModel``
    (no pooler) of ``RANDOM_INIT_CONFIGS[cfg.random_init]``, built under
    ``torch.manual_seed(cfg.seed)`` in a forked RNG, so it is deterministic and the caller's
    RNG state is untouched; ImageNet normalisation.

    Returns:
        ``ViTFeatures`` fed ``cfg.image_size`` (``None``: the checkpoint's image size).

    Raises:
        MissingWeightsError: the checkpoint lacks encoder weights (not this architecture), or
            the Hub weights are neither downloadable nor cached on this node.
        ValueError: not a ViT-style model (no patch_size/image_size/hidden_size config).
        OSError: the checkpoint cannot be read.
    """
    from transformers import AutoModel, ViTConfig, ViTModel

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if source.pretrained:
        from transformers.utils import logging as hf_logging

        # A classification checkpoint's head keys are "unexpected" and a base model saved
        # without a pooler misses it: silence the load report and check the keys here.
        directory = transformers_dir(source.path, source.repo_id, source.revision)  # on this node
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = AutoModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32,
                                                    output_loading_info=True)  # fmt: skip
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
        if missing:
            raise MissingWeightsError(
                f"ViT checkpoint {directory} lacks {len(missing)} weights of "
                f"{type(model).__name__} (e.g. {missing[:3]})"
            )
        mean, std = _norm_from_preprocessor(directory)
    else:
        config = ViTConfig(**RANDOM_INIT_CONFIGS[cfg.random_init])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = ViTModel(config, add_pooling_layer=False)
    return ViTFeatures(model.float(), image_size=cfg.image_size, mean=mean, std=std)


# --------------------------------------------------------------------------- scoring


class ComplexityScorer:
    """Batch scorer of patches: one ViT per instance (one per Ray Data actor).

    Args:
        cfg: complexity config (``device``, ``seed``, ``random_init``, ``image_size``).
        source: the resolved weights (``resolve_vit(cfg)``), resolved once on the driver so
            every actor loads the same thing.
        num_threads: if given, ``torch.set_num_threads`` for this process (1 for an actor
            holding a fraction of the CPUs, as ``embedding.ClipEmbedder``).

    Call with a numpy batch with columns ``patch_id`` (str), ``source`` (str, image path or
    URI), ``x``, ``y``, ``size`` (int, HR pixels; x = column); returns, in input order,
    ``{"patch_id": (N,), "vit_complexity": (N,) float32 in [0, 1], "entropy": (N,) float32
    bits in [0, 8], "grad_energy": (N,) float32 >= 0, "feature": (N, D) float32 unit rows}``
    (``ViTFeatures`` and ``image_statistics`` on each crop). Each distinct source image is
    read once per batch; the ViT runs under ``torch.inference_mode`` once per patch size.

    Raises (from ``__call__``):
        imaging.ImageReadError: a source image cannot be read.
        ValueError: a patch lies outside its source image.
    """

    def __init__(self, cfg: ComplexityConfig, source: VitSource, *, num_threads: int | None = None):
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.cfg = cfg
        self.source = source
        self.device = _device(cfg.device, "complexity.device")
        self.vit = load_vit(source, cfg).to(self.device)
        self.dim = self.vit.dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pids = np.asarray(batch["patch_id"])
        sources = np.asarray(batch["source"])
        xs, ys, sizes = (np.asarray(batch[c]).astype(np.int64) for c in ("x", "y", "size"))
        n = len(pids)
        out = {"patch_id": pids, "vit_complexity": np.empty(n, np.float32), "entropy": np.empty(n, np.float32),
               "grad_energy": np.empty(n, np.float32), "feature": np.empty((n, self.dim), np.float32)}  # fmt: skip
        crops = imaging.read_crops(sources, xs, ys, sizes)  # each source decoded once
        for i, patch in enumerate(crops):
            stats = image_statistics(patch)
            out["entropy"][i], out["grad_energy"][i] = stats["entropy"], stats["grad_energy"]
        by_size: dict[int, list[int]] = {}
        for i in range(n):
            by_size.setdefault(int(sizes[i]), []).append(i)
        with torch.inference_mode():
            for idx in by_size.values():
                x = torch.from_numpy(np.stack([crops[i] for i in idx])).to(self.device)  # (n, s, s, 3) uint8
                features, complexity = self.vit(x.permute(0, 3, 1, 2).float().div_(255.0))
                out["feature"][idx] = features.cpu().numpy()
                out["vit_complexity"][idx] = complexity.cpu().numpy()
        return out


def score_shard(scorer: ComplexityScorer, shard: int, *, mine_uri: str, out_uri: str, batch_size: int) -> int:
    """Score every patch (kept or not) of one mined shard into ``out_uri/part-<shard>.parquet``.

    Reads ``mine_uri/patches/part-<shard>.parquet`` (``mining.read_patches(...,
    kept_only=False, shard=shard)``: all patches, the corpus distribution); writes, in part
    order and atomically, columns ``patch_id`` (string), ``vit_complexity``, ``entropy``,
    ``grad_energy`` (float32) and ``feature`` (``fixed_size_list<float32>[D]``, unit L2).
    Idempotent: a shard whose output exists is skipped, so a retried or resumed shard neither
    loses nor duplicates rows.

    Returns:
        Rows written, or -1 when the part already existed.

    Raises:
        imaging.ImageReadError: a source image cannot be read (it was readable when mined).
        OSError: storage failed after retries.
    """
    from srdistill.distill.mining import map_patch_part

    return map_patch_part(scorer, shard, mine_uri=mine_uri, out_uri=out_uri, batch_size=batch_size, kept_only=False)


def read_scores(uri: str, columns: list[str] | None = None) -> pa.Table:
    """All complexity parts below ``uri`` (``score_shard``'s output folder) as one table, in
    part order (``storage.read_dataset``); ``columns`` of ``patch_id`` and ``SCORE_COLUMNS``
    (default: all).

    Raises:
        FileNotFoundError: nothing at ``uri``.
        OSError: storage failed.
    """
    from srdistill import storage

    return storage.read_dataset(uri, columns=columns)


def feature_matrix(table: pa.Table, column: str = "feature") -> np.ndarray:
    """The ``fixed_size_list<float32>[D]`` column ``column`` of ``table`` as ``(N, D)`` float32
    (a copy; sliced and chunked columns are handled).

    Raises:
        KeyError: no such column.
        TypeError: the column is not a fixed-size list.
    """
    col = table.column(column)
    if not pa.types.is_fixed_size_list(col.type):
        raise TypeError(f"column {column!r} is {col.type}, not a fixed_size_list")
    dim = col.type.list_size
    parts = [chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) for chunk in col.chunks]
    return np.concatenate([np.empty((0, dim), np.float32), *parts]).astype(np.float32, copy=False)


def attach_scores(table: pa.Table, scores: pa.Table, columns: tuple[str, ...] = SCORE_COLUMNS) -> pa.Table:
    """``table`` with the ``columns`` of ``scores`` appended, matched by ``patch_id``, rows in
    ``table``'s order (a deterministic lookup, not a hash join, so list columns are kept).

    Args:
        table: any table with a ``patch_id`` column (e.g. ``mining.read_patches``).
        scores: ``read_scores`` output (unique ``patch_id``).
        columns: score columns to append; names already in ``table`` are replaced.

    Raises:
        ValueError: a patch of ``table`` has no score (the complexity stage is stale).
    """
    idx = pc.index_in(table.column("patch_id"), value_set=scores.column("patch_id"))
    if idx.null_count:
        missing = table.column("patch_id").filter(pc.is_null(idx))
        raise ValueError(f"{idx.null_count} patches have no complexity score (e.g. {missing[0]}); "
                         "rerun the complexity stage")  # fmt: skip
    picked = scores.select(list(columns)).take(idx)
    for name in columns:
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, picked.column(name))
    return table


def image_features(vit: ViTFeatures, paths: list[str | Path]) -> np.ndarray:
    """ViT features of whole image files (a distilled, aligned or synthetic set), one image per
    forward pass, resized by ``vit`` as patches are.

    Args:
        vit: ``load_vit`` output, on any device.
        paths: image files (local or ``s3://``), >= 1.

    Returns:
        ``(len(paths), D)`` float32, unit-L2 rows, in ``paths`` order.

    Raises:
        imaging.ImageReadError: an image cannot be read.
    """
    device = next(vit.parameters()).device
    rows = []
    with torch.inference_mode():
        for p in paths:
            x = torch.from_numpy(imaging.read_image(p)).permute(2, 0, 1)[None].float().div(255.0)
            rows.append(vit(x.to(device))[0].float().cpu().numpy())
    return np.concatenate(rows) if rows else np.empty((0, vit.dim), np.float32)

