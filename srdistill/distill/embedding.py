"""CLIP image embeddings of patches (SRDD's class-agnostic grouping, step 2).

SRDD (Cho, Jung, Cho, Soh; arXiv 2509.14777) embeds its mined patches with CLIP ViT-B/32
(``openai/clip-vit-base-patch32``) and clusters the embeddings with k-means. This module holds
that embedding step, with two backends:

* ``transformers`` (default): ``CLIPVisionModelWithProjection``, the exact model SRDD uses;
  ``image_embeds`` is the 512-d projection output.
* ``open_clip``: an open_clip architecture (``ViT-B-32``) with a local weights file; used only
  where ``open_clip`` imports (it needs torchvision, which has no CPU build here).

``resolve_clip`` finds the weights in a local directory or by Hugging Face id
(``weights.resolve_hf_weights``: downloaded into the Hugging Face cache, or, with
``HF_HUB_OFFLINE=1``, looked up there only) and otherwise raises ``MissingWeightsError``,
unless random initialisation is explicitly allowed, in which case the resulting clusters are
NOT semantic and ``ClipSource.note`` says so. It runs once, on the driver; the actors load the
resolved local directory, or, on a node where that directory does not exist (its own Hugging
Face cache), the same Hub id at the same commit (``weights.local_dir``).

Differences from SRDD's code: patches are cropped from their source image and resized to the
model's input size with antialiased bicubic in torch (not PIL's, rounded to uint8), which for
square patches is CLIP's "resize shortest side + centre crop"; embeddings are L2-normalised
here unless ``embed.normalize`` is false (SRDD's ``2_cluster_clip.py`` clusters the raw
``get_image_features`` output).

No Ray import: ``ClipEmbedder`` is a plain callable that ``runner.py`` hands to Ray Data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from srdistill.config import EmbedConfig
from srdistill.sr import imaging
from srdistill.weights import (
    TRANSFORMERS_BIN_PATTERNS,
    TRANSFORMERS_PATTERNS,
    MissingWeightsError,
    hub_hint,
    is_repo_id,
    local_dir,
    resolve_hf_weights,
)


if TYPE_CHECKING:  # torch is imported where a model is built: resolving weights needs none
    import torch

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipEmbedder",
    "ClipSource",
    "embed_shard",
    "MissingWeightsError",
    "embed_patches",
    "find_transformers_weights",
    "load_clip",
    "resolve_clip",
    "transformers_dir",
]

#: CLIP's normalisation (OpenAI's preprocessing), per RGB channel on [0, 1] input.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: ``EmbedConfig.random_init`` -> ``CLIPVisionConfig`` kwargs of the random-init architecture.
RANDOM_INIT_CONFIGS: dict[str, dict[str, int]] = {
    # the real openai/clip-vit-base-patch32 vision tower
    "vit-b-32": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=32,
        image_size=224,
        projection_dim=512,
        intermediate_size=3072,
    ),
    # for tests and smoke runs
    "tiny": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=16,
        image_size=64,
        projection_dim=16,
        intermediate_size=64,
    ),
}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_RANDOM_NOTE = "random-init CLIP: clusters are NOT semantic"


@dataclass(frozen=True)
class ClipSource:
    """Where the CLIP weights come from; recorded in the run manifest.

    Attributes:
        backend: ``"transformers"`` or ``"open_clip"``.
        model: ``EmbedConfig.model`` as given (directory, HF id or open_clip arch name).
        path: resolved local directory (transformers) or weights file (open_clip); ``None``
            for random init.
        pretrained: whether real weights are loaded.
        semantic: whether the embeddings (and thus clusters) carry semantic meaning; false for
            random init.
        note: one human-readable line for logs and the manifest.
        repo_id: the Hugging Face id the weights were downloaded or taken from the cache by;
            ``None`` for a local directory (or file) given as such, and random init.
        revision: the commit of that snapshot (``path``'s last component): ``load_clip`` on a
            node without ``path`` fetches exactly this commit.
    """

    backend: str
    model: str
    path: str | None
    pretrained: bool
    semantic: bool
    note: str
    repo_id: str | None = None
    revision: str | None = None


# --------------------------------------------------------------------------- resolution


def _has_weights(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(
        (directory / name).is_file() for name in _WEIGHT_FILES
    )


def transformers_dir(path: str, repo_id: str | None, revision: str | None) -> Path:
    """The resolved transformers checkpoint ``path`` on this node (``weights.local_dir``: on a
    node without it, the Hub id ``repo_id`` at commit ``revision``, fetched with the patterns
    of ``find_transformers_weights``). Shared by ``load_clip`` and ``complexity.load_vit``."""
    return local_dir(path, repo_id, revision, what="transformers checkpoint",
                     allow_patterns=TRANSFORMERS_PATTERNS, fallback_patterns=TRANSFORMERS_BIN_PATTERNS,
                     complete=_has_weights)


def _missing(cfg: EmbedConfig, looked: list[str], how: str) -> MissingWeightsError:
    places = "\n".join(f"  - {p}" for p in looked)
    return MissingWeightsError(
        f"CLIP weights for {cfg.model!r} (backend {cfg.backend}) were not found; looked in:\n"
        f"{places}\n"
        f"Provide them: {how}.\n"
        "Or pass --allow-random-init (embed.allow_random_init=true) to run with a randomly "
        "initialised CLIP, whose clusters are NOT semantic."
    )


def _random_source(cfg: EmbedConfig) -> ClipSource:
    return ClipSource(cfg.backend, cfg.model, None, pretrained=False, semantic=False,
                      note=_RANDOM_NOTE)


def find_transformers_weights(model: str) -> tuple[Path | None, bool, list[str]]:
    """Find a transformers checkpoint: a local directory, else a Hugging Face id resolved by
    ``weights.resolve_hf_weights`` (downloaded into the HF cache when the network is allowed,
    looked up in the cache only with ``HF_HUB_OFFLINE=1``; configs, ``preprocessor_config.json``
    and safetensors weights, ``.bin`` weights only when the repository has no safetensors).

    A place counts only if it holds ``config.json`` and model weights (safetensors or
    ``pytorch_model.bin``, single file or sharded index). Shared by ``resolve_clip`` and
    ``complexity.resolve_vit``; call it once, on the driver.

    Args:
        model: a directory path (``~`` expanded) or a Hugging Face repo id.

    Returns:
        ``(path, from_cache, looked)``: the resolved directory (``None`` when not found),
        whether it came from the HF cache, and one human-readable line per place searched
        (for ``MissingWeightsError`` messages; a failed download says why there).
    """
    local = Path(model).expanduser()
    looked = [f"local directory {str(local.resolve())!r}"
              + (" (exists but lacks config.json or model weights)" if local.is_dir()
                 else " (does not exist)")]
    if _has_weights(local):
        return local.resolve(), False, looked
    if local.exists():
        return None, False, looked
    if not is_repo_id(model):
        looked.append(f"Hugging Face: {model!r} is not a repo id (org/name)")
        return None, False, looked
    try:
        snap = resolve_hf_weights(model, what="transformers checkpoint", allow_patterns=TRANSFORMERS_PATTERNS,
                                  fallback_patterns=TRANSFORMERS_BIN_PATTERNS, complete=_has_weights)
    except MissingWeightsError as exc:
        looked.append(exc.place)
        return None, False, looked
    return snap, True, looked


def _resolve_transformers(cfg: EmbedConfig) -> ClipSource:
    path, from_cache, looked = find_transformers_weights(cfg.model)
    if path is not None:
        note = (f"pretrained CLIP {cfg.model} from the HF cache ({path})" if from_cache
                else f"pretrained CLIP from {path}")
        hub = (cfg.model, path.name) if from_cache else (None, None)  # snapshots/<commit>
        return ClipSource("transformers", cfg.model, str(path), True, True, note, *hub)
    if cfg.allow_random_init:
        return _random_source(cfg)
    how = (
        "set embed.model to a local directory holding config.json and model.safetensors "
        "(e.g. a copy of openai/clip-vit-base-patch32, or model.save_pretrained(dir)), or to a "
        f"Hugging Face id: {hub_hint(cfg.model)}"
    )
    raise _missing(cfg, looked, how)


def _import_open_clip() -> Any:
    try:
        import open_clip
    except Exception as exc:  # a broken torchvision raises RuntimeError/OSError, not ImportError
        raise RuntimeError(
            "embed.backend='open_clip' needs the open_clip package, which does not import "
            f"here ({exc.__class__.__name__}: {exc}). open_clip imports torchvision, which has "
            "no CPU build for this torch; use embed.backend='transformers' instead."
        ) from exc
    return open_clip


def _resolve_open_clip(cfg: EmbedConfig) -> ClipSource:
    open_clip = _import_open_clip()
    if cfg.model not in open_clip.list_models():
        raise ValueError(
            f"embed.model {cfg.model!r} is not an open_clip architecture; e.g. 'ViT-B-32' "
            f"(see open_clip.list_models())"
        )
    looked = []
    if cfg.pretrained is not None:
        weights = Path(cfg.pretrained).expanduser()
        looked.append(f"weights file {str(weights.resolve())!r} (embed.pretrained)")
        if weights.is_file():
            path = str(weights.resolve())
            return ClipSource("open_clip", cfg.model, path, True, True,
                              f"pretrained open_clip {cfg.model} from {path}")
    else:
        looked.append("embed.pretrained is not set")
    if cfg.allow_random_init:
        return _random_source(cfg)
    how = ("set embed.pretrained to a local open_clip weights file (.bin/.pt/.safetensors) "
           f"for architecture {cfg.model!r} (open_clip weights are not downloaded)")
    raise _missing(cfg, looked, how)


def resolve_clip(cfg: EmbedConfig) -> ClipSource:
    """Find the CLIP weights for ``cfg``, downloading them by Hugging Face id if needed.

    transformers backend: ``cfg.model`` is a local directory holding ``config.json`` and the
    weights, or a Hugging Face id (``find_transformers_weights``: downloaded into the HF cache
    when the network is allowed, the cache only with ``HF_HUB_OFFLINE=1``). open_clip backend:
    ``cfg.model`` is an open_clip architecture name and ``cfg.pretrained`` a local weights file.
    Call it once, on the driver: ``ClipSource.path`` is then a local directory for the actors.

    Returns:
        ``ClipSource`` with ``pretrained=semantic=True`` when weights were found, or, if they
        were not and ``cfg.allow_random_init`` is set, ``pretrained=semantic=False`` with the
        note ``"random-init CLIP: clusters are NOT semantic"``.

    Raises:
        MissingWeightsError: weights not found (not a local directory, not in the HF cache
            offline, or the download failed: unknown repository, network error) and random init
            not allowed; the message names the model, the places searched (with the endpoint or
            cache and the reason), how to provide weights (a local directory, ``HF_HUB_OFFLINE``
            and pre-fetching) and ``--allow-random-init``.
        RuntimeError: open_clip backend requested but ``open_clip`` does not import.
        ValueError: unknown open_clip architecture name.
    """
    if cfg.backend == "transformers":
        return _resolve_transformers(cfg)
    if cfg.backend == "open_clip":
        return _resolve_open_clip(cfg)
    raise ValueError(f"embed.backend {cfg.backend!r} is not one of ['open_clip', 'transformers']")


# --------------------------------------------------------------------------- loading


def _norm_from_preprocessor(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    file = directory / "preprocessor_config.json"
    if file.is_file():
        conf = json.loads(file.read_text())
        mean, std = conf.get("image_mean"), conf.get("image_std")
        if mean is not None and std is not None and len(mean) == len(std) == 3:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return CLIP_MEAN, CLIP_STD


def _vision_config(directory: Path) -> Any:
    """The vision config of a checkpoint directory; for a full CLIP checkpoint (text + vision,
    ``model_type == "clip"``) its ``vision_config`` with the top-level ``projection_dim``."""
    from transformers import CLIPConfig, CLIPVisionConfig

    raw = json.loads((directory / "config.json").read_text())
    if raw.get("model_type") != "clip":
        return CLIPVisionConfig.from_pretrained(directory, local_files_only=True)
    full = CLIPConfig.from_pretrained(directory, local_files_only=True)
    vision = full.vision_config
    vision.projection_dim = full.projection_dim
    return vision


def load_clip(
    source: ClipSource, cfg: EmbedConfig
) -> tuple[torch.nn.Module, int, tuple[float, ...], tuple[float, ...]]:
    """Build the CLIP image tower described by ``source`` (on CPU, eval mode).

    Pretrained weights load from ``source.path``, the local directory ``resolve_clip`` resolved
    (``local_files_only=True``). On a node where it does not exist (a Ray actor on another
    node than the driver), weights from the Hub are resolved again there at the same commit
    (``source.repo_id``/``source.revision``; ``weights.local_dir``): downloaded, or from that
    node's Hugging Face cache with ``HF_HUB_OFFLINE=1``, else ``MissingWeightsError``.
    Random init builds the ``cfg.random_init`` architecture (``RANDOM_INIT_CONFIGS``; open_clip: the ``cfg.model``
    architecture) under ``torch.manual_seed(cfg.seed)`` in a forked RNG, so random-init
    embeddings are deterministic and the caller's RNG state is untouched.

    Returns:
        ``(model, image_size, mean, std)``: the module, its square input side in pixels, and
        the per-channel RGB normalisation for ``[0, 1]`` input (from
        ``preprocessor_config.json`` when the weights directory has one, else CLIP's).
    """
    import torch

    mean, std = CLIP_MEAN, CLIP_STD
    if source.backend == "transformers":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if source.pretrained:
            from transformers.utils import logging as hf_logging

            directory = transformers_dir(source.path, source.repo_id, source.revision)  # on this node
            # The load report lists every text-tower key of a full CLIP checkpoint as
            # "unexpected"; silence it and check the keys that matter (missing ones) here.
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                model, info = CLIPVisionModelWithProjection.from_pretrained(
                    directory, config=_vision_config(directory),
                    local_files_only=True, dtype=torch.float32, output_loading_info=True,
                )
            finally:
                hf_logging.set_verbosity(verbosity)
            if info["missing_keys"]:
                missing = sorted(info["missing_keys"])
                raise MissingWeightsError(
                    f"CLIP checkpoint {directory} lacks {len(missing)} vision weights "
                    f"(e.g. {missing[:3]}); it is not a CLIP vision checkpoint"
                )
            mean, std = _norm_from_preprocessor(directory)
        else:
            config = CLIPVisionConfig(**RANDOM_INIT_CONFIGS[cfg.random_init])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = CLIPVisionModelWithProjection(config)
        image_size = int(model.config.image_size)
    elif source.backend == "open_clip":
        open_clip = _import_open_clip()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = open_clip.create_model(source.model, pretrained=source.path, device="cpu")
        size = model.visual.image_size
        image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        pre = getattr(model.visual, "preprocess_cfg", None) or {}
        mean = tuple(pre.get("mean", CLIP_MEAN))
        std = tuple(pre.get("std", CLIP_STD))
    else:
        raise ValueError(f"unknown CLIP backend {source.backend!r}")
    return model.eval(), image_size, mean, std


def _device(name: str, field: str = "embed.device") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{field}='cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


# --------------------------------------------------------------------------- embedding


#: Patches per forward pass when ``embed.batch_size`` is not set, by device type: enough to keep
#: the device busy (on a CPU ViT-B/32's throughput is flat from about 16 patches on).
AUTO_BATCH = {"cpu": 32, "cuda": 256}


class ClipEmbedder:
    """Batch embedder of patches: one model per instance (one per Ray Data actor).

    Args:
        cfg: embedding config (``device``, ``seed``, ``random_init``, ...).
        source: the resolved weights (``resolve_clip(cfg)``), resolved once on the driver so
            every actor loads the same thing.
        num_threads: if given, ``torch.set_num_threads`` for this process (a Ray actor holding
            a fraction of the CPUs should use 1: torch otherwise starts one thread per core in
            every actor, and oversubscribed cores slow small models down up to 30x).

    Call with a numpy batch (Ray Data ``batch_format="numpy"``) with columns ``patch_id``
    (str), ``source`` (str, image path), ``x``, ``y``, ``size`` (int, HR pixels; x = column);
    returns ``{"patch_id": (N,), "embedding": (N, D) float32}`` in input order (D = 512 for
    ViT-B/32): unit-L2 rows, or the raw projection output when ``cfg.normalize`` is false.
    The call is ``forward(prepare(batch))``: ``prepare`` (decode, crop; CPU only, no model)
    can run in another thread for the next batch while ``forward`` runs (``mining.map_patch_part``
    does), and each distinct source image is decoded once per batch (the last one is kept for
    the next batch: a shard's patches come image by image).

    Raises (from ``__call__``/``prepare``):
        imaging.ImageReadError: a source image cannot be read.
        ValueError: a patch lies outside its source image.
    """

    def __init__(self, cfg: EmbedConfig, source: ClipSource, *, num_threads: int | None = None):
        import torch

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.cfg = cfg
        self.source = source
        self.device = _device(cfg.device)
        model, self.image_size, mean, std = load_clip(source, cfg)
        self.model = model.to(self.device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        if source.backend == "transformers":
            self.dim = int(model.config.projection_dim)
        else:
            self.dim = int(model.visual.output_dim)
        #: Patches per forward pass: ``cfg.batch_size``, else ``AUTO_BATCH`` of the device.
        self.batch_size = cfg.batch_size or AUTO_BATCH.get(self.device.type, AUTO_BATCH["cpu"])
        self._last: tuple[str, np.ndarray] | None = None  # (source, decoded image) of the last batch

    def _preprocess(self, crops: list[np.ndarray]) -> torch.Tensor:
        """``crops``: same-size ``(s, s, 3) uint8`` -> ``(n, 3, S, S) float32`` normalised: the
        uint8 pixels go to the device as they are, then ``/255``, antialiased bicubic to ``S``
        (clamped to [0, 1]) and CLIP's per-channel normalisation, there."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.stack(crops)).to(self.device)  # (n, s, s, 3) uint8
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (n, 3, s, s) in [0, 1]
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=True).clamp_(0.0, 1.0)
        return x.sub_(self.mean).div_(self.std)

    def prepare(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(patch_id, crops)``: the batch's patches cut from their decoded sources, ``(s, s, 3)``
        uint8 each, in input order (no model involved: safe in another thread)."""
        pids = np.asarray(batch["patch_id"])
        sources = [str(s) for s in np.asarray(batch["source"])]
        xs, ys, sizes = (np.asarray(batch[c]).astype(np.int64) for c in ("x", "y", "size"))
        images = dict([self._last]) if self._last is not None else {}
        crops = []
        for src, x, y, size in zip(sources, xs, ys, sizes):
            if src not in images:
                images[src] = imaging.read_image(src)
            try:
                crops.append(imaging.crop(images[src], int(x), int(y), int(size)))
            except ValueError as exc:
                raise ValueError(f"{src}: {exc}") from None
        if sources:
            self._last = (sources[-1], images[sources[-1]])
        return pids, crops

    def forward(self, prepared: tuple[np.ndarray, list[np.ndarray]]) -> dict[str, np.ndarray]:
        """The embeddings of what ``prepare`` returned: one forward pass for the batch."""
        import torch
        import torch.nn.functional as F

        pids, crops = prepared
        n = len(pids)
        if n == 0:
            return {"patch_id": pids, "embedding": np.empty((0, self.dim), dtype=np.float32)}
        by_size: dict[int, list[int]] = {}
        for i, patch in enumerate(crops):
            by_size.setdefault(patch.shape[0], []).append(i)
        side = self.image_size
        with torch.inference_mode():
            if len(by_size) == 1:
                pixels = self._preprocess(crops)
            else:
                pixels = torch.empty((n, 3, side, side), dtype=torch.float32, device=self.device)
                for idx in by_size.values():
                    pixels[idx] = self._preprocess([crops[i] for i in idx])
            if self.source.backend == "transformers":
                emb = self.model(pixel_values=pixels).image_embeds.float()  # (n, D)
            else:
                emb = self.model.encode_image(pixels).float()  # (n, D)
            if self.cfg.normalize:
                emb = F.normalize(emb, dim=-1)
        return {"patch_id": pids, "embedding": emb.cpu().numpy()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.forward(self.prepare(batch))


def embed_patches(table: pa.Table, cfg: EmbedConfig, source: ClipSource) -> np.ndarray:
    """Embed every row of a patch table in one process (tests, benchmarks, small runs).

    Args:
        table: ``pyarrow.Table`` with columns ``patch_id``, ``source``, ``x``, ``y``, ``size``.
        cfg: embedding config; batches of ``ClipEmbedder.batch_size`` rows.
        source: resolved weights (``resolve_clip(cfg)``).

    Returns:
        ``(N, D)`` float32 in table row order (unit-L2 rows when ``cfg.normalize``).
    """
    embedder = ClipEmbedder(cfg, source)
    cols = {c: table.column(c).to_numpy(zero_copy_only=False)
            for c in ("patch_id", "source", "x", "y", "size")}
    n, size = table.num_rows, embedder.batch_size
    parts = [np.empty((0, embedder.dim), dtype=np.float32)]
    for start in range(0, n, size):
        batch = {c: v[start : start + size] for c, v in cols.items()}
        parts.append(embedder(batch)["embedding"])
    return np.concatenate(parts, axis=0)


def embed_shard(embedder: ClipEmbedder, shard: int, *, mine_uri: str, out_uri: str,
                batch_size: int | None = None) -> int:  # fmt: skip
    """Embed the kept patches of one mined shard into ``out_uri/part-<shard>.parquet``.

    Reads ``mine_uri/patches/part-<shard>.parquet`` and the keep rule ``mine_uri/keep.json``
    (``mining.read_patches``' layout); writes columns ``patch_id`` (string) and ``embedding``
    (fixed-size list of ``embedder.dim`` float32, unit L2 when ``normalize``), rows in part
    order, atomically.
    Idempotent: a shard whose output exists is skipped, so a retried or resumed shard neither
    loses nor duplicates embeddings. Batches of ``batch_size`` (None: ``embedder.batch_size``),
    the next one decoded while this one runs (``mining.map_patch_part``).

    Returns:
        Rows written, or -1 when the part already existed.

    Raises:
        imaging.ImageReadError: a source image cannot be read (it was readable when mined).
        OSError: storage failed after retries.
    """
    from srdistill.distill.mining import map_patch_part

    return map_patch_part(embedder, shard, mine_uri=mine_uri, out_uri=out_uri,
                          batch_size=batch_size or embedder.batch_size, kept_only=True)  # fmt: skip
