"""The one-time encode stage of SRDD's fine-tuning: the VAE latent moments of each patch's centre
crop and of its mirror image (``encode_patches``, ``PatchEncoder``; pixels for the UNet), and
the encoded set the fine-tuning loop reads (``load_encoded``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from srdistill.config import FinetuneConfig
from srdistill.distill.diffusion.backbone import load_vae, resolve_backbone
from srdistill.sr.device import resolve_device

__all__ = [
    "EncodedSet",
    "encode_patches",
    "encoded_spec",
    "PatchEncoder",
    "load_encoded",
]


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
