"""Two-stage (easy, then complex/uncertain) training schedule: TripleD step 4.

TripleD ("Distribution-aware Dataset Distillation for Efficient Image Restoration", 2025)
trains "in two stages, simple samples first, complex/uncertain later"; only its abstract is
public, so the rules below are this project's design (``config.CurriculumConfig``):

* every usable training image gets a complexity score (``image_complexity``);
* stage 1 (steps ``0 .. switch_step - 1``) draws crops only from the ``easy_fraction`` of the
  images with the lowest score (``split_easy``);
* at ``switch_step`` the current network's L1 loss is measured on every image
  (``per_image_loss``); stage 2 draws from all the hard images plus the
  ``uncertain_fraction`` of the easy images with the highest loss (``stage2_pool``).

``Schedule`` holds that plan for ``training.train_sr``: which images a step draws from, and
the stage-2 pool once it is known (stored in the checkpoint, so a resumed run keeps it).
Everything is deterministic: ties are broken by image index, and the loss is measured on a
fixed centre crop.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from srdistill import storage
from srdistill.config import TrainConfig
from srdistill.sr import imaging
from srdistill.sr.image_stats import image_statistics

__all__ = [
    "Schedule",
    "image_complexity",
    "per_image_loss",
    "split_easy",
    "stage2_pool",
    "switch_step",
]

#: Scores ``image_complexity`` may compute from the pixels (``image_stats.image_statistics``).
_COMPUTABLE = ("entropy", "grad_energy")


def _round_half_up(x: float) -> int:
    """``floor(x + 0.5)``, with a 1e-9 slack so that e.g. ``0.7 * 5`` (3.4999...) gives 4."""
    return int(math.floor(x + 0.5 + 1e-9))


def _name(path: str | Path) -> str:
    """File name of a local path or an ``s3://`` URI."""
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1] if storage.is_s3(path) else Path(path).name


def _provenance_column(folder: str, column: str) -> tuple[str, dict[str, str] | None]:
    """``(csv location, {file name: raw value})`` of ``folder/provenance.csv``; the mapping is
    None when the file or the column is absent (rows with an empty value are left out)."""
    where = storage.join(folder, "provenance.csv")
    try:
        text = storage.read_text(where)
    except FileNotFoundError:
        return where, None
    reader = csv.DictReader(io.StringIO(text))
    if column not in (reader.fieldnames or ()) or "file" not in (reader.fieldnames or ()):
        return where, None
    return where, {row["file"]: row[column] for row in reader if row.get(column) not in (None, "")}


def image_complexity(
    paths: list[str | Path], score: str, *, images: list[np.ndarray] | None = None
) -> np.ndarray:
    """Complexity score of each training image (higher = more complex).

    Images are grouped by folder. If a folder holds a ``provenance.csv`` (``selection.
    export_distilled``) with a column named ``score``, each image's value is read from the row
    whose ``file`` column is its file name. Otherwise (and for a file without a value there),
    ``entropy`` and ``grad_energy`` are computed on the whole image with
    ``image_stats.image_statistics``; ``vit_complexity`` cannot be computed here and must be in
    the CSV.

    Args:
        paths: N image files (local paths or ``s3://`` URIs).
        score: ``"vit_complexity"``, ``"entropy"`` (bits, [0, 8]) or ``"grad_energy"`` (grey
            levels^2 per pixel^2, >= 0).
        images: optional ``(H, W, 3)`` uint8 arrays already decoded, aligned with ``paths``
            (saves reading the files again when a score must be computed).

    Returns:
        ``(N,)`` float64 scores, in ``paths`` order.

    Raises:
        ValueError: unknown ``score``; ``images`` not aligned with ``paths``; a CSV value that
            is not a number; ``vit_complexity`` missing for a file (the message names the
            folder and file: that column is written by the ``tripled`` selection,
            ``select.method=tripled``).
        imaging.ImageReadError: an image to score cannot be read.
    """
    if score not in ("vit_complexity", *_COMPUTABLE):
        raise ValueError(f"complexity score {score!r} is not one of ['vit_complexity', 'entropy', 'grad_energy']")
    if images is not None and len(images) != len(paths):
        raise ValueError(f"{len(images)} images given for {len(paths)} paths")
    by_folder: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_folder.setdefault(storage.parent(p), []).append(i)
    out = np.empty(len(paths), dtype=np.float64)
    for folder, idx in by_folder.items():
        where, values = _provenance_column(folder, score)
        for i in idx:
            name = _name(paths[i])
            if values is not None and name in values:
                try:
                    out[i] = float(values[name])
                except ValueError:
                    raise ValueError(f"{where}: {score} of {name!r} is not a number: {values[name]!r}") from None
            elif score in _COMPUTABLE:
                img = images[i] if images is not None else imaging.read_image(paths[i])
                out[i] = image_statistics(img)[score]
            else:
                why = "has no value for it" if values is not None else "is missing or has no vit_complexity column"
                raise ValueError(
                    f"no vit_complexity for {name!r}: {where} {why}. vit_complexity is written by "
                    "the tripled selection (select.method=tripled); or set "
                    "train.curriculum.score to entropy or grad_energy (computed from the images)"
                )
    return out


def split_easy(scores: np.ndarray, easy_fraction: float) -> np.ndarray:
    """Stage-1 mask: the ``easy_fraction`` share of the images with the lowest scores.

    The easy count is ``round(easy_fraction * N)`` rounded half up, clamped to ``[1, N - 1]``
    when N >= 2 (at least one easy and one hard image); ties are broken by index (the lower
    index is easier). With N == 1 the only image is easy (and ``stage2_pool`` puts it in
    stage 2 as well: it is trained on in both stages).

    Args:
        scores: ``(N,)`` finite complexity scores, N >= 1; higher = more complex.
        easy_fraction: in ``(0, 1)``.

    Returns:
        ``(N,)`` bool, True for the easy images.

    Raises:
        ValueError: empty or non-finite ``scores``, or ``easy_fraction`` outside ``(0, 1)``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0] if scores.ndim == 1 else 0
    if n == 0 or not np.isfinite(scores).all():
        raise ValueError(f"need a non-empty 1-D array of finite scores, got {scores!r}")
    if not 0.0 < easy_fraction < 1.0:
        raise ValueError(f"easy_fraction must be in (0, 1), got {easy_fraction}")
    n_easy = 1 if n == 1 else min(max(_round_half_up(easy_fraction * n), 1), n - 1)
    easy = np.zeros(n, dtype=bool)
    easy[np.lexsort((np.arange(n), scores))[:n_easy]] = True
    return easy


def stage2_pool(easy_mask: np.ndarray, losses: np.ndarray, uncertain_fraction: float) -> np.ndarray:
    """Stage-2 images: every hard image plus the easy images the network fits worst.

    ``k = round(uncertain_fraction * n_easy)`` (rounded half up) easy images with the highest
    loss are kept, ties broken by index (the lower index first); a NaN loss counts as the
    highest. The pool is never empty: with no hard image (N == 1) every image is in it.

    Args:
        easy_mask: ``(N,)`` bool from ``split_easy``.
        losses: ``(N,)`` per-image losses (``per_image_loss``); only the easy entries are used.
        uncertain_fraction: in ``[0, 1]``.

    Returns:
        Sorted ``(M,)`` int64 indices into the N images, ``1 <= M <= N``.

    Raises:
        ValueError: shapes differ, or ``uncertain_fraction`` outside ``[0, 1]``.
    """
    easy_mask = np.asarray(easy_mask, dtype=bool)
    losses = np.asarray(losses, dtype=np.float64)
    if easy_mask.ndim != 1 or losses.shape != easy_mask.shape:
        raise ValueError(f"easy_mask {easy_mask.shape} and losses {losses.shape} must be equal 1-D shapes")
    if not 0.0 <= uncertain_fraction <= 1.0:
        raise ValueError(f"uncertain_fraction must be in [0, 1], got {uncertain_fraction}")
    easy = np.flatnonzero(easy_mask)
    hard = np.flatnonzero(~easy_mask)
    if hard.size == 0:
        return np.arange(easy_mask.size, dtype=np.int64)
    k = _round_half_up(uncertain_fraction * easy.size)
    key = np.where(np.isnan(losses[easy]), -np.inf, -losses[easy])  # ascending: highest loss first
    uncertain = easy[np.lexsort((easy, key))[:k]]
    return np.sort(np.concatenate([hard, uncertain])).astype(np.int64)


@torch.no_grad()
def per_image_loss(
    model: nn.Module,
    images: list[np.ndarray],
    scale: int,
    device: torch.device | str,
    *,
    crop: int,
    batch_size: int = 16,
) -> np.ndarray:
    """L1 loss of ``model`` on a fixed centre crop of each image, as in training.

    Each image's centre ``crop x crop`` HR crop (offset ``(H - crop) // 2``, ``(W - crop) // 2``)
    is downscaled by MATLAB bicubic (``imaging.imresize``, uint8 rounding), super-resolved in
    float32 and compared with the crop: mean absolute error over pixels and channels, both in
    [0, 1]. The model is put in eval mode for the measurement and its previous mode restored;
    no gradient, no random number is used.

    Args:
        model: an SR network mapping ``(B, 3, h, w)`` to ``(B, 3, scale*h, scale*w)`` float
            in [0, 1] (the bare module, not a DDP wrapper).
        images: N ``(H, W, 3)`` uint8 HR images, each at least ``crop`` on both sides.
        scale: SR factor.
        device: where ``model`` lives.
        crop: HR crop side in pixels, a positive multiple of ``scale``.
        batch_size: crops per forward pass.

    Returns:
        ``(N,)`` float64 losses, >= 0.

    Raises:
        ValueError: ``crop`` not a positive multiple of ``scale``, or an image smaller than it.
    """
    if crop < scale or crop % scale:
        raise ValueError(f"crop {crop} must be a positive multiple of scale {scale}")
    small = [i for i, img in enumerate(images) if min(img.shape[:2]) < crop]
    if small:
        raise ValueError(f"images {small} are smaller than the {crop}x{crop} crop")
    was_training = model.training
    model.eval()
    losses = []
    try:
        for start in range(0, len(images), batch_size):
            hr = np.stack([imaging.crop(img, (img.shape[1] - crop) // 2, (img.shape[0] - crop) // 2, crop)
                           for img in images[start : start + batch_size]])  # (B, crop, crop, 3) uint8
            lr = imaging.imresize(hr, 1 / scale, spatial_axes=(1, 2))
            lr_t, hr_t = (torch.from_numpy(a).to(device).permute(0, 3, 1, 2).float() / 255.0 for a in (lr, hr))
            sr = model(lr_t).float()
            losses.append((sr - hr_t).abs().mean(dim=(1, 2, 3)).double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(losses) if losses else np.zeros(0, dtype=np.float64)


def switch_step(cfg: TrainConfig) -> int:
    """First step of stage 2: ``round(curriculum.switch * iterations)`` (half up), clamped to
    ``[1, iterations - 1]`` so both stages get a step; with ``iterations == 1`` it is 1 (the
    single step is in stage 1)."""
    if cfg.iterations < 2:
        return 1
    return min(max(_round_half_up(cfg.curriculum.switch * cfg.iterations), 1), cfg.iterations - 1)


@dataclass
class Schedule:
    """The curriculum of one training run over N usable images.

    Attributes:
        switch_step: first step of stage 2 (``switch_step``).
        easy: ``(N,)`` bool, the stage-1 images (``split_easy``).
        uncertain_fraction: share of the easy images kept in stage 2.
        pool: sorted int64 indices of the stage-2 images once built (``build_pool``) or
            restored from a checkpoint; None before.
    """

    switch_step: int
    easy: np.ndarray
    uncertain_fraction: float
    pool: np.ndarray | None = None

    @classmethod
    def plan(
        cls, cfg: TrainConfig, paths: list[str | Path], images: list[np.ndarray] | None = None
    ) -> "Schedule":
        """The schedule of ``cfg.curriculum`` for these images (scores by ``image_complexity``;
        ``images``, if given, are the decoded ``paths``). Raises as ``image_complexity`` and
        ``split_easy``."""
        cur = cfg.curriculum
        scores = image_complexity(paths, cur.score, images=images)
        return cls(switch_step(cfg), split_easy(scores, cur.easy_fraction), cur.uncertain_fraction)

    def needs_pool(self, step: int) -> bool:
        """Whether ``step`` is in stage 2 and the pool is not known yet."""
        return step >= self.switch_step and self.pool is None

    def build_pool(self, losses: np.ndarray) -> np.ndarray:
        """Set and return the stage-2 pool from the per-image losses at the switch."""
        self.pool = stage2_pool(self.easy, losses, self.uncertain_fraction)
        return self.pool

    def restore_pool(self, indices: list[int]) -> None:
        """Set the pool saved in a checkpoint.

        Raises:
            ValueError: empty, unsorted/duplicated or out-of-range indices (the checkpoint was
                written for other images).
        """
        pool = np.asarray(indices, dtype=np.int64)
        n = self.easy.size
        if pool.ndim != 1 or not pool.size or pool.min() < 0 or pool.max() >= n or np.any(np.diff(pool) <= 0):
            raise ValueError(f"the checkpoint's curriculum pool {indices} does not fit these {n} training images")
        self.pool = pool

    def indices_at(self, step: int) -> np.ndarray:
        """Sorted int64 indices of the images step ``step`` (0-based) draws from.

        Raises:
            RuntimeError: ``step`` is in stage 2 and the pool is not built yet.
        """
        if step < self.switch_step:
            return np.flatnonzero(self.easy)
        if self.pool is None:
            raise RuntimeError(f"step {step} is in stage 2 but the stage-2 pool is not built yet")
        return self.pool

    def summary(self) -> dict:
        """JSON-ready ``{"switch_step", "easy", "pool"}`` (indices; ``pool`` None if unknown)."""
        return {"switch_step": self.switch_step, "easy": np.flatnonzero(self.easy).tolist(),
                "pool": None if self.pool is None else self.pool.tolist()}  # fmt: skip
