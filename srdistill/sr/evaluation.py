"""PSNR/SSIM of bicubic or a trained network on benchmark sets (DESIGN §3 protocol).

For every HR image: ``hr = modcrop(hr, s)``; ``lr = imresize(hr, 1/s)`` (MATLAB bicubic, uint8),
or with a blur ``kernel`` ``lr = degradation.degrade(hr, kernel, s)`` (blur + direct
subsampling: MZSR's protocol, which reproduces its ``Set5/LR_g20_x2_MZSR`` inputs bit for bit);
``sr`` = bicubic ``imresize(lr, s)``, the network's output rounded to uint8, or any per-image
upscaler (e.g. MZSR's test-time adaptation, ZSSR); PSNR and SSIM on Y (BT.601) with
``border = s`` (``srdistill.sr.metrics``). Bicubic reproduces the published figures (Set5 x2
33.67 dB on the standard Set5 HR images)::

    from srdistill.sr.evaluation import evaluate_many, format_table
    rows = {"bicubic": evaluate_many("bicubic", ["Set5", "Set14"], 2)}
    print(format_table(rows))
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Literal, Union

import numpy as np
import torch
from torch import nn

from srdistill.datasets import resolve_dataset
from srdistill.sr import imaging, metrics
from srdistill.sr.device import resolve_device, to_tensor

__all__ = [
    "resolve_dataset",
    "list_images",
    "upscale_bicubic",
    "evaluate",
    "evaluate_many",
    "format_table",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _dataset_name(name_or_path: str | Path, hr_dir: Path) -> str:
    """``"Set5"`` for ``"Set5"``, ``.../Set5`` or ``.../Set5/HR``."""
    if not Path(name_or_path).is_dir():
        return str(name_or_path)
    return hr_dir.parent.name if hr_dir.name == "HR" else hr_dir.name


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by extension, case-insensitive) directly in ``folder``, sorted by name."""
    return sorted(
        p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def upscale_bicubic(lr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB-bicubic upscaling: ``(h, w, 3)`` uint8 -> ``(scale*h, scale*w, 3)`` uint8."""
    return imaging.imresize(lr, scale)


@torch.no_grad()
def _upscale_model(model: nn.Module, lr: np.ndarray, device: torch.device) -> np.ndarray:
    """Run ``model`` on one whole image: ``(h, w, 3)`` uint8 -> ``(s*h, s*w, 3)`` uint8."""
    sr = model(to_tensor(lr, device)).clamp(0, 1)  # (1, 3, s*h, s*w) float32 in [0, 1]
    return (sr[0] * 255).round().byte().permute(1, 2, 0).cpu().numpy()


#: An upscaler run per image: ``(h, w, 3)`` uint8 LR -> ``(s*h, s*w, 3)`` uint8 SR.
Upscaler = Callable[[np.ndarray], np.ndarray]


def evaluate(
    model: Union[Literal["bicubic"], nn.Module, Upscaler],
    dataset: str | Path,
    scale: int,
    *,
    device: str = "auto",
    kernel: np.ndarray | None = None,
    save_dir: str | Path | None = None,
) -> dict:
    """PSNR/SSIM on Y (border = ``scale``) of ``model`` on every HR image of ``dataset``.

    Args:
        model: ``"bicubic"``; a network mapping ``(1, 3, h, w)`` float32 [0, 1] to
            ``(1, 3, scale*h, scale*w)``, moved to ``device`` and run in eval mode under
            ``no_grad`` on whole images (its train/eval mode is restored afterwards); or an
            ``Upscaler`` function, called once per LR image (e.g. test-time adaptation).
        dataset: benchmark name or folder (see ``resolve_dataset``).
        scale: SR factor.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (for a network).
        kernel: ``(k, k)`` blur kernel summing to 1: the LR images are
            ``degradation.degrade(hr, kernel, scale)`` instead of MATLAB bicubic downscaling.
        save_dir: write every SR image scored, ``(H, W, 3)`` uint8 as PNG, to
            ``save_dir/<dataset>/<HR image's stem>.png`` (folders made as needed).

    Returns:
        ``{"dataset", "scale", "n_images", "psnr_y" (mean dB), "ssim_y" (mean),
        "seconds_per_image" (mean wall time of the upscaling), "per_image": [{"name",
        "psnr_y", "ssim_y", "seconds"}, ...]}``, images sorted by file name.

    Raises:
        FileNotFoundError: dataset not found.
        ValueError: no images in it, ``model`` is another string, or the model's ``scale``
            attribute differs from ``scale``.
        imaging.ImageReadError: an image cannot be read.
    """
    if isinstance(model, str) and model != "bicubic":
        raise ValueError(f"model must be 'bicubic', an nn.Module or a function, got {model!r}")
    if isinstance(model, nn.Module) and getattr(model, "scale", scale) != scale:
        raise ValueError(f"model is x{model.scale} but scale={scale} was requested")
    hr_dir = resolve_dataset(dataset)
    files = list_images(hr_dir)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(hr_dir)!r}")

    if isinstance(model, nn.Module):
        dev = resolve_device(device)
        was_training = model.training
        model.to(dev).eval()
    if kernel is not None:
        from srdistill.sr import degradation
    per_image = []
    try:
        for f in files:
            hr = imaging.modcrop(imaging.read_image(f), scale)  # (H, W, 3) uint8
            if kernel is None:
                lr = imaging.imresize(hr, 1 / scale)  # (H/s, W/s, 3) uint8
            else:
                lr = degradation.degrade(hr, kernel, scale)  # (H/s, W/s, 3) uint8
            t0 = time.perf_counter()
            if isinstance(model, str):
                sr = upscale_bicubic(lr, scale)
            elif isinstance(model, nn.Module):
                sr = _upscale_model(model, lr, dev)
            else:
                sr = model(lr)
            seconds = time.perf_counter() - t0
            if sr.shape != hr.shape:
                raise ValueError(f"{f.name}: the upscaler returned {sr.shape}, expected {hr.shape}")
            if save_dir is not None:
                out = Path(save_dir) / _dataset_name(dataset, hr_dir)
                out.mkdir(parents=True, exist_ok=True)
                imaging.write_png(out / f"{f.stem}.png", sr)
            per_image.append(
                {
                    "name": f.stem,
                    "psnr_y": metrics.psnr_y(sr, hr, scale),
                    "ssim_y": metrics.ssim_y(sr, hr, scale),
                    "seconds": seconds,
                }
            )
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return {
        "dataset": _dataset_name(dataset, hr_dir),
        "scale": scale,
        "n_images": len(per_image),
        "psnr_y": float(np.mean([r["psnr_y"] for r in per_image])),
        "ssim_y": float(np.mean([r["ssim_y"] for r in per_image])),
        "seconds_per_image": float(np.mean([r["seconds"] for r in per_image])),
        "per_image": per_image,
    }


def evaluate_many(
    model: Union[Literal["bicubic"], nn.Module, Upscaler],
    datasets: list[str | Path] | tuple[str | Path, ...],
    scale: int,
    *,
    device: str = "auto",
    kernel: np.ndarray | None = None,
    save_dir: str | Path | None = None,
) -> list[dict]:
    """``evaluate`` on each dataset in order; one result dict per dataset (SR images written
    to ``save_dir/<dataset>/`` with ``save_dir``)."""
    return [evaluate(model, d, scale, device=device, kernel=kernel, save_dir=save_dir) for d in datasets]


def format_table(rows: dict[str, list[dict]]) -> str:
    """Markdown table of mean PSNR (dB) / SSIM on Y: a row per model label, a column per dataset.

    Args:
        rows: model label -> results of ``evaluate_many``. Columns are the datasets in order of
            first appearance; a dataset a model was not evaluated on shows ``-``.

    Returns:
        e.g. ``| model | Set5 | Set14 |`` ... ``| bicubic | 33.67 / 0.9299 | 30.32 / 0.8688 |``.
    """
    datasets: list[str] = []
    for results in rows.values():
        for r in results:
            if r["dataset"] not in datasets:
                datasets.append(r["dataset"])
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for label, results in rows.items():
        by_name = {r["dataset"]: r for r in results}
        cells = [
            f"{by_name[d]['psnr_y']:.2f} / {by_name[d]['ssim_y']:.4f}" if d in by_name else "-"
            for d in datasets
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
