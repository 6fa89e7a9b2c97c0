"""The report's figures, drawn with matplotlib (Agg): the crops of each evaluation set where the
model differs most from bicubic (``_crops_figure``), the training curves, the score histograms'
panels, the thumbnail grids of the cluster and synthesis views (``_grid``), the fine-tuning loss.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from srdistill.sr import imaging


#: Thumbnail side in pixels in ``clusters.png`` / ``synthesis.png``.
THUMB = 96
#: Grid geometry in pixels: padding between thumbnails, the gap between the two halves of a
#: grid, and the figure margins around the thumbnail canvas (left holds the row labels;
#: ``GRID_HEADER`` is added on top when columns have headers); ``CAPTION`` is the band under
#: each thumbnail that holds its caption (two lines), in grids with captions.
GRID_PAD = 4
GRID_GAP = THUMB // 2
GRID_LEFT, GRID_RIGHT, GRID_TOP, GRID_BOTTOM, GRID_HEADER = 130, 10, 10, 10, 22
CAPTION = 24
#: The crop side in HR pixels of the crops figure, and the margin the crop keeps from the image
#: edge (where zero padding makes any network differ from bicubic most; at least the border PSNR
#: ignores, the scale).
CROP = 96
CROP_MARGIN = 16


def _crops_figure(model: Any, dataset: str, scale: int, ranked: list[tuple[dict, dict]], label: str,
                  path: Path) -> list[tuple[int, int, int]]:  # fmt: skip
    """Write the crops figure of ``dataset`` and return each image's window ``(x, y, side)``.

    For each ``(model row, bicubic row)`` of ``ranked`` (per-image rows of ``results.json``,
    PSNR on Y in dB), the HR image is read, ``modcrop``-ed to ``scale``, downscaled by MATLAB
    bicubic, and upscaled by bicubic and by ``model`` (whole image, float32, rounded to uint8;
    on CUDA where available), as ``evaluation.evaluate`` does. The window is the ``CROP`` x ``CROP`` one (smaller for a
    smaller image), ``CROP_MARGIN`` (at least ``scale``) pixels clear of the image edge, of
    largest mean absolute difference between the model and bicubic over the three channels
    (windows on a 4-pixel grid).

    Raises:
        FileNotFoundError: the dataset or an image of it is not found.
        imaging.ImageReadError: an image cannot be read.
    """
    import torch

    from srdistill.sr.device import resolve_device, to_tensor
    from srdistill.sr.evaluation import list_images, resolve_dataset, upscale_bicubic

    files = {f.stem: f for f in list_images(resolve_dataset(dataset))}
    device = resolve_device("auto")
    model = model.to(device)
    fig, axes = plt.subplots(len(ranked), 4, figsize=(4 * 2.3, len(ranked) * 2.55), squeeze=False)
    windows = []
    for row, (r, b) in zip(axes, ranked):
        if r["name"] not in files:
            raise FileNotFoundError(f"image {r['name']!r} of {dataset!r} not found")
        hr = imaging.modcrop(imaging.read_image(files[r["name"]]), scale)  # (H, W, 3) uint8
        lr = imaging.imresize(hr, 1 / scale)
        bic = upscale_bicubic(lr, scale)
        with torch.no_grad():
            sr = model(to_tensor(lr, device)).clamp(0, 1)  # (1, 3, H, W) float32 in [0, 1]
        sr = (sr[0] * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        x, y, side = _busiest_window(np.abs(sr.astype(np.float32) - bic.astype(np.float32)).mean(axis=2),
                                     CROP, border=max(scale, CROP_MARGIN))  # fmt: skip
        windows.append((x, y, side))
        gain = r["psnr_y"] - b["psnr_y"]
        panels = [(hr, f"{r['name']} (HR)"), (hr[y : y + side, x : x + side], "HR"),
                  (bic[y : y + side, x : x + side], f"bicubic {b['psnr_y']:.2f} dB"),
                  (sr[y : y + side, x : x + side], f"{label}\n{r['psnr_y']:.2f} dB ({gain:+.2f})")]  # fmt: skip
        for k, (ax, (img, title)) in enumerate(zip(row, panels)):
            ax.imshow(img, interpolation="nearest" if k else "antialiased")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.add_patch(matplotlib.patches.Rectangle((x - 0.5, y - 0.5), side, side, fill=False,
                                                          edgecolor="red", linewidth=1.2))  # fmt: skip
    fig.tight_layout()
    _atomic_savefig(fig, path, dpi=100)
    return windows


def _busiest_window(diff: np.ndarray, size: int, *, border: int = 0, step: int = 4) -> tuple[int, int, int]:
    """``(x, y, side)`` of the square window of side ``min(size, ...)`` inside ``border`` with the
    largest sum of ``diff`` ``(H, W)``; windows start on a ``step``-pixel grid (ties: first in
    row-major order)."""
    h, w = diff.shape
    inner = diff[border : h - border, border : w - border] if min(h, w) > 2 * border + 1 else diff
    off = border if inner is not diff else 0
    side = max(1, min(size, *inner.shape))
    sat = np.pad(inner.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table
    ys = np.arange(0, inner.shape[0] - side + 1, step)
    xs = np.arange(0, inner.shape[1] - side + 1, step)
    sums = (sat[ys[:, None] + side, xs[None] + side] - sat[ys[:, None], xs[None] + side]
            - sat[ys[:, None] + side, xs[None]] + sat[ys[:, None], xs[None]])  # fmt: skip
    i, j = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(xs[j]) + off, int(ys[i]) + off, int(side)


def _curves_plot(loss: list[tuple[int, float]], val: list[tuple[int, float]], val_set: str | None,
                 bicubic: float | None, resumed: list[int], switch: list[int], path: Path) -> None:  # fmt: skip
    """``curves.png``: the loss against the step and, with ``val`` rows, the validation PSNR
    (with the ``bicubic`` PSNR of the set as a dashed line); ``resumed`` steps as dotted lines,
    the curriculum ``switch`` as a dash-dotted one."""
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(11 if val else 6, 3.6), squeeze=False)
    panels = [(axes[0][0], loss, "L1 loss (on [0, 1] pixels)", "training loss")]
    if val:
        panels.append((axes[0][1], val, "PSNR on Y (dB)", f"validation PSNR on {val_set}"))
    for ax, points, ylabel, title in panels:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None, color="tab:blue", label=title)
        for s in resumed:
            ax.axvline(s, color="grey", linestyle=":", linewidth=1)
        for s in switch:
            ax.axvline(s, color="tab:green", linestyle="-.", linewidth=1, label="curriculum switch")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if val and bicubic is not None:
        axes[0][1].axhline(bicubic, color="crimson", linestyle="--", label=f"bicubic {bicubic:.2f} dB")
        axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    _atomic_savefig(fig, path)


def _histogram(ax: Any, values: np.ndarray, kept: np.ndarray, xlabel: str) -> None:
    finite = np.isfinite(values)
    values, kept = values[finite], kept[finite]
    if values.size == 0:
        ax.set_xlabel(xlabel)
        return
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 51)
    clipped = np.clip(values, lo, hi)
    ax.hist(clipped, bins=bins, histtype="step", color="grey", label=f"all ({values.size})")
    ax.hist(clipped[kept], bins=bins, alpha=0.6, color="tab:blue", label=f"kept ({kept.sum()})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("patches")


def _real_thumbs(shown: dict[Any, list[dict]]) -> dict[Any, list[np.ndarray]]:
    """``THUMB`` x ``THUMB`` RGB thumbnails of patch rows (``source, x, y, size``), per key.

    Each source image is read once; a patch whose source cannot be read, or which lies outside
    it (the source changed since mining), gets a grey thumbnail.
    """
    out: dict[Any, list[np.ndarray]] = {key: [None] * len(rows) for key, rows in shown.items()}
    by_source: dict[str, list[tuple[Any, int, dict]]] = {}
    for key, rows in shown.items():
        for i, row in enumerate(rows):
            by_source.setdefault(str(row["source"]), []).append((key, i, row))
    for source, items in by_source.items():
        try:
            img = imaging.read_image(source)
        except imaging.ImageReadError:
            img = None
        for key, i, row in items:
            thumb = _grey_thumb()
            if img is not None:
                try:
                    patch = imaging.crop(img, int(row["x"]), int(row["y"]), int(row["size"]))
                    thumb = _thumb(patch)
                except ValueError:
                    pass  # patch outside the image (source changed since mining)
            out[key][i] = thumb
    return out


def _grey_thumb() -> np.ndarray:
    return np.full((THUMB, THUMB, 3), 200, np.uint8)


def _thumb(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((THUMB, THUMB), Image.Resampling.BICUBIC))


def _grid_size(n_rows: int, columns: int, *, gap_after: int | None = None, headers: bool = False,
               captions: bool = False) -> tuple[int, int]:  # fmt: skip
    """``(width, height)`` in pixels of the figure ``_grid`` writes for these arguments."""
    cell = THUMB + GRID_PAD
    w = columns * cell + GRID_PAD + (GRID_GAP if gap_after is not None else 0)
    h = n_rows * (cell + (CAPTION if captions else 0)) + GRID_PAD
    return (GRID_LEFT + w + GRID_RIGHT,
            GRID_TOP + (GRID_HEADER if headers else 0) + h + GRID_BOTTOM)  # fmt: skip


def _grid(rows: list[list[np.ndarray | None]], labels: list[str], path: Path, *, columns: int,
          gap_after: int | None = None, headers: tuple[str, str] | None = None,
          captions: list[list[str]] | None = None) -> None:  # fmt: skip
    """Write a PNG grid of ``THUMB`` x ``THUMB`` thumbnails, one row per entry of ``rows``.

    Args:
        rows: per row, up to ``columns`` ``(THUMB, THUMB, 3)`` uint8 arrays, left to right;
            ``None`` leaves its cell blank (white).
        labels: one label per row, on the left.
        path: the PNG (written atomically).
        columns: thumbnail columns.
        gap_after: insert a ``GRID_GAP`` pixel blank band, with a thin grey rule in its middle,
            after this many columns.
        headers: texts above the columns before / after the gap (``gap_after`` required).
        captions: per row, a text per thumbnail (up to two short lines), written in a
            ``CAPTION`` pixel band under it; without them rows have no band.

    The figure is ``_grid_size(len(rows), columns, ...)`` pixels, one canvas pixel per figure
    pixel.
    """
    cell = THUMB + GRID_PAD
    row_h = cell + (CAPTION if captions is not None else 0)
    gap = GRID_GAP if gap_after is not None else 0
    canvas_w = columns * cell + GRID_PAD + gap
    canvas_h = len(rows) * row_h + GRID_PAD
    canvas = np.full((canvas_h, canvas_w, 3), 255, np.uint8)

    def x_of(col: int) -> int:
        return GRID_PAD + col * cell + (gap if gap_after is not None and col >= gap_after else 0)

    for r, thumbs in enumerate(rows):
        for col, thumb in enumerate(thumbs[:columns]):
            if thumb is None:
                continue
            y0, x0 = GRID_PAD + r * row_h, x_of(col)
            canvas[y0 : y0 + THUMB, x0 : x0 + THUMB] = thumb
    if gap_after is not None:
        mid = x_of(gap_after) - GRID_PAD // 2 - gap // 2
        canvas[:, mid - 1 : mid + 1] = 160

    dpi = 100
    fig_w, fig_h = _grid_size(len(rows), columns, gap_after=gap_after, headers=headers is not None,
                              captions=captions is not None)  # fmt: skip
    fig = plt.figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    ax = fig.add_axes((GRID_LEFT / fig_w, GRID_BOTTOM / fig_h, canvas_w / fig_w, canvas_h / fig_h))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([GRID_PAD + r * row_h + THUMB / 2 for r in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    for r, texts in enumerate(captions or []):
        for col, text in enumerate(texts[:columns]):
            if text:
                ax.text(x_of(col) + THUMB / 2, GRID_PAD + r * row_h + THUMB + 1, text, ha="center", va="top",
                        fontsize=6.5, linespacing=1.1, color="#222222")  # fmt: skip
    if headers is not None and gap_after is not None:
        left = (x_of(0) + x_of(gap_after - 1) + THUMB) / 2
        right = (x_of(gap_after) + x_of(columns - 1) + THUMB) / 2
        for x, text in ((left, headers[0]), (right, headers[1])):
            ax.text(x, -GRID_PAD, text, ha="center", va="bottom", fontsize=10, fontweight="bold")
    _atomic_savefig(fig, path, dpi=dpi)


def _synth_thumb(path: Path) -> np.ndarray:
    """Thumbnail of a synthesized PNG; grey when it cannot be read."""
    try:
        return _thumb(imaging.read_image(path))
    except imaging.ImageReadError:
        return _grey_thumb()


def _loss_plot(log: list[dict], path: Path) -> bool:
    """``loss`` and ``simple`` against ``step``; False (nothing written) without such rows."""
    series = {}
    for key in ("loss", "simple"):
        pts = [(r["step"], r[key]) for r in log
               if isinstance(r.get("step"), (int, float)) and isinstance(r.get(key), (int, float))]
        if pts:
            series[key] = pts
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = {"loss": "loss (total)", "simple": "simple (noise MSE)"}
    for key, pts in series.items():
        steps, values = zip(*pts)
        ax.plot(steps, values, marker="." if len(pts) < 50 else None, label=labels[key])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("diffusion fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_savefig(fig, path)
    return True


def _atomic_savefig(fig: Any, path: Path, **kwargs: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", **kwargs)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
