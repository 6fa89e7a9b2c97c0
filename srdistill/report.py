"""Markdown report of a run directory, with plots.

``write_report(run_dir, run_uri)`` reads what the pipeline left in ``run_dir`` (see
``docs/ARCHITECTURE.md``: ``manifest.json``, ``select/selected.parquet``,
``evaluate/results.json``; for a ``distill: synth`` run ``finetune/model/backbone.json``,
``finetune/log.jsonl`` and ``synthesize/``) and the partitioned tables at ``run_uri`` (a local
path or ``s3://`` URI, by default ``run_dir`` itself): the patch table ``mine/patches/`` with
its keep rule ``mine/keep.json`` (read through ``mining.read_patches``) and the cluster
assignments ``cluster/assignments/`` (``storage.read_dataset``), of which only the columns (and
for lookups the rows) needed are read. It writes ``run_dir/report/report.md`` with its figures
beside it:

* ``scores.png``: histograms of ``psnr_bic`` and ``grad``, all patches vs kept patches, with
  the keep threshold when the keep rule is ``threshold``;
* ``clusters.png`` (coreset runs): one row per cluster, up to 8 of its selected patches in
  rank order;
* ``synthesis.png`` (synth runs): one row per cluster, its 4 real patches closest to the
  centroid (highest ``cos_sim``), a gap, then its first 4 synthesized images;
* ``finetune_loss.png`` (synth runs): the diffusion fine-tuning loss against the step.

Every section after the header is optional: a run stopped after mining still gets a report
with the sections whose artifacts exist, and a line saying which stage is missing for the
others. Nothing here imports Ray; plots use matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from srdistill import imaging, storage  # noqa: E402
from srdistill.config import LOWER_IS_HARDER  # noqa: E402
from srdistill.mining import PATCH_SCHEMA, read_patches  # noqa: E402
from srdistill.pipeline import STAGES, SYNTH_ONLY  # noqa: E402

__all__ = ["write_report"]

#: Pipeline stages in run order, as recorded in ``manifest["stages"]``.

#: Thumbnails per cluster row and their side in pixels in ``clusters.png``.
MONTAGE_COLUMNS = 8
THUMB = 96
#: Clusters shown in ``clusters.png`` / ``synthesis.png`` at most (the rest are listed only in
#: the tables).
MONTAGE_MAX_ROWS = 64
#: Real patches, and synthesized images, per cluster row of ``synthesis.png``.
SYNTH_PER_SIDE = 4
#: Grid geometry in pixels: padding between thumbnails, the gap between the real and the
#: synthesized half of ``synthesis.png``, and the figure margins around the thumbnail canvas
#: (left holds the row labels; ``GRID_HEADER`` is added on top when columns have headers).
GRID_PAD = 4
GRID_GAP = THUMB // 2
GRID_LEFT, GRID_RIGHT, GRID_TOP, GRID_BOTTOM, GRID_HEADER = 130, 10, 10, 10, 22

_SKIPPED_STATUSES = {"skipped", "up-to-date", "up_to_date", "cached"}


def write_report(run_dir: Path, run_uri: str | None = None) -> Path:
    """Write ``run_dir/report/report.md`` and its figures from the run's artifacts.

    Sections: header (input, run dir, date, versions, preset; a warning when CLIP was randomly
    initialised and the clusters are therefore not semantic), stages, skipped inputs, score
    histograms (``scores.png``), cluster montage (``clusters.png``) and selection summary
    (coreset runs) or the synthesis summary (synth runs: backbone, fine-tuning, sampler, budget,
    ``synthesis.png`` and ``finetune_loss.png``), and the PSNR/SSIM table (PSNR in dB, SSIM in
    [0, 1], both on Y, as ``evaluate`` computed them). A section whose artifact is missing is
    replaced by one line naming the stage not run; a coreset run has no synthesis section, and
    a synth run (``config.distill == "synth"``, or ``synthesize/provenance.csv`` present) says
    in its clusters section that it has no ``select`` stage and has no selection section.
    Files are written atomically (temp file, then ``os.replace``).

    Args:
        run_dir: a run directory holding at least ``manifest.json`` (the local mirror of the
            run: manifest, ``select/``, ``synthesize/``, ``finetune/``, ``evaluate/``, ...).
        run_uri: where the run's partitioned tables live (``mine/patches/``, ``mine/keep.json``,
            ``cluster/assignments/``): a local path or ``s3://`` URI; default ``run_dir``.

    Returns:
        Path of the written ``report.md``.

    Raises:
        FileNotFoundError: ``run_dir/manifest.json`` does not exist.
        OSError: reading a table at an ``s3://`` ``run_uri`` failed (after retries).
    """
    run_dir = Path(run_dir)
    tables = _Tables(str(run_dir) if run_uri is None else str(run_uri))
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} does not exist: not a run directory")
    manifest = json.loads(manifest_path.read_text())
    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)

    synth = _is_synth(run_dir, manifest)
    sections = [
        _header(manifest, run_dir),
        _stages_section(manifest, synth),
        _skipped_section(manifest),
        _scores_section(tables, manifest, out_dir),
        _clusters_section(run_dir, out_dir, synth, tables),
    ]
    if synth:
        sections.append(_synthesis_section(run_dir, manifest, out_dir, tables))
    else:
        sections.append(_selection_section(run_dir, manifest, tables))
    sections.append(_psnr_section(run_dir))
    path = out_dir / "report.md"
    _atomic_write_text(path, "\n\n".join(s.rstrip() for s in sections) + "\n")
    return path


# --------------------------------------------------------------------------- sections


def _header(manifest: dict, run_dir: Path) -> str:
    version = manifest.get("srdistill_version") or _installed_version()
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# srdistill run report",
        "",
        f"- input: `{manifest.get('input', 'unknown')}`",
        f"- run dir: `{manifest.get('run_dir', str(run_dir))}`",
        f"- run created: {manifest.get('created', 'unknown')}",
        f"- report date: {now}",
        f"- srdistill version: {version}",
    ]
    if manifest.get("preset"):
        lines.append(f"- config preset: `{manifest['preset']}`")
    if "scale" in manifest.get("config", {}):
        lines.append(f"- SR scale: x{manifest['config']['scale']}")
    clip = manifest.get("clip")
    if clip:
        lines.append(
            f"- CLIP: backend `{clip.get('backend')}`, model `{clip.get('model')}`, "
            f"pretrained {clip.get('pretrained')}"
        )
        if clip.get("semantic") is False:
            lines += [
                "",
                "> **WARNING: CLIP was randomly initialised: the clusters are NOT semantic.**",
                "> Cluster-based selection here is no better than an arbitrary partition;",
                "> use this run to test the pipeline, not to judge the method.",
            ]
            if clip.get("note"):
                lines.append(f"> (recorded note: {_cell(clip['note'])})")
    vit = manifest.get("vit")
    if vit:
        lines.append(f"- ViT (complexity): model `{vit.get('model')}`, pretrained {vit.get('pretrained')}")
        if vit.get("pretrained") is False:
            lines += ["", "> **WARNING: the ViT was randomly initialised: complexity scores and feature "
                      "distances are NOT learned.**"]  # fmt: skip
    return "\n".join(lines)


def _stages_section(manifest: dict, synth: bool) -> str:
    recorded = manifest.get("stages", {})
    # every stage but the report itself (this document), in pipeline order
    names = [s for s in STAGES if s != "report"] + [s for s in recorded if s not in STAGES]
    other_mode = {"select"} if synth else set(SYNTH_ONLY)
    rows = []
    for name in names:
        entry = recorded.get(name)
        if entry is None:
            mode = "synth" if synth else "coreset"
            status = f"n/a ({mode} run)" if name in other_mode else "not run"
            rows.append([name, status, "", ""])
            continue
        seconds = entry.get("seconds")
        rows.append([
            name,
            _status(entry),
            f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "",
            ", ".join(f"{k}={v}" for k, v in _flatten(entry.get("counts") or {})),
        ])
    return "## Stages\n\n" + _table(["stage", "status", "seconds", "counts"], rows)


def _skipped_section(manifest: dict) -> str:
    # the manifest lists the first SKIPPED_LISTED; the mine stage's counts have the total
    skipped = manifest.get("skipped_inputs") or []
    counts = (manifest.get("stages", {}).get("mine") or {}).get("counts") or {}
    total = counts.get("images_skipped")
    total = max(total, len(skipped)) if isinstance(total, int) else len(skipped)
    if not total:
        return "## Skipped inputs\n\nnone"
    note = ""
    if total > len(skipped):
        note = (f"{total} skipped (first {len(skipped)} listed; all in "
                "mine/skipped.parquet)\n\n")  # fmt: skip
    if not skipped:
        return f"## Skipped inputs ({total})\n\n" + note.rstrip()
    rows = [[f"`{s.get('file', '')}`", s.get("reason", "")] for s in skipped]
    return f"## Skipped inputs ({total})\n\n" + note + _table(["file", "reason"], rows)


def _scores_section(tables: _Tables, manifest: dict, out_dir: Path) -> str:
    title = "## Patch scores\n\n"
    table = tables.patches(["psnr_bic", "grad", "kept"])
    if table is None:
        return title + "Not available: the `mine` stage has not run."
    kept = table.column("kept").to_numpy(zero_copy_only=False).astype(bool)
    n, n_kept = len(kept), int(kept.sum())
    if n == 0:
        return title + "The patch table is empty (no image gave a full patch)."
    mine_cfg = manifest.get("config", {}).get("mine", {})
    threshold = mine_cfg.get("threshold") if mine_cfg.get("keep_rule") == "threshold" else None

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [("psnr_bic", "psnr_bic (dB), lower = harder"), ("grad", "grad (grey levels / px)")]
    for ax, (col, xlabel) in zip(axes, panels):
        values = table.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
        _histogram(ax, values, kept, xlabel)
        if threshold is not None and mine_cfg.get("keep_score") == col:
            ax.axvline(threshold, color="crimson", linestyle="--", label=f"threshold {threshold:g}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{n} patches, {n_kept} kept ({100 * n_kept / n:.1f}%)")
    fig.tight_layout()
    _atomic_savefig(fig, out_dir / "scores.png")

    rule = mine_cfg.get("keep_rule", "unknown")
    score = mine_cfg.get("keep_score")
    sign = "<" if LOWER_IS_HARDER.get(score, True) else ">"
    detail = {"threshold": f": `{score}` {sign} {threshold}",
              "top_fraction": f": hardest {mine_cfg.get('top_fraction')} by `{score}`"}
    return title + (
        f"{n} patches mined, {n_kept} kept (keep rule `{rule}`{detail.get(rule, '')}). "
        "Values outside the 0.5-99.5 percentile range are counted in the edge bins.\n\n"
        "![patch scores](scores.png)"
    )


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


def _clusters_section(run_dir: Path, out_dir: Path, synth: bool, tables: _Tables) -> str:
    title = "## Clusters\n\n"
    if synth:
        where = ("in the Synthesis section" if (run_dir / "synthesize" / "provenance.csv").is_file()
                 else "in the Synthesis section once `synthesize` has run")  # fmt: skip
        return title + (
            "A `synth` run has no `select` stage: each cluster's real patches (closest to its "
            f"centroid) are shown beside its synthesized images {where}."
        )
    selected_path = run_dir / "select" / "selected.parquet"
    if not selected_path.is_file():
        return title + "Not available: the `select` stage has not run."
    selected = _selected_rows(run_dir, tables)
    sizes = tables.cluster_sizes()
    by_cluster: dict[int, list[dict]] = {}
    for row in sorted(selected, key=lambda r: r["rank"]):
        by_cluster.setdefault(int(row["cluster"]), []).append(row)
    if not by_cluster:
        return title + "No patch was selected."
    clusters = sorted(by_cluster)[:MONTAGE_MAX_ROWS]
    shown = {c: by_cluster[c][:MONTAGE_COLUMNS] for c in clusters}
    labels = [
        f"cluster {c}" + (f"\n(n={sizes[c]})" if c in sizes else "") for c in clusters
    ]
    thumbs = _real_thumbs(shown)
    _grid([thumbs[c] for c in clusters], labels, out_dir / "clusters.png", columns=MONTAGE_COLUMNS)
    note = ""
    if len(by_cluster) > len(clusters):
        note = f" Only the first {len(clusters)} of {len(by_cluster)} clusters are shown."
    return title + (
        f"Up to {MONTAGE_COLUMNS} selected patches per cluster, in rank order; the row label "
        f"gives the cluster id and its number of assigned patches.{note}\n\n"
        "![selected patches per cluster](clusters.png)"
    )


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


def _grid_size(n_rows: int, columns: int, *, gap_after: int | None = None,
               headers: bool = False) -> tuple[int, int]:  # fmt: skip
    """``(width, height)`` in pixels of the figure ``_grid`` writes for these arguments."""
    cell = THUMB + GRID_PAD
    w = columns * cell + GRID_PAD + (GRID_GAP if gap_after is not None else 0)
    h = n_rows * cell + GRID_PAD
    return (GRID_LEFT + w + GRID_RIGHT,
            GRID_TOP + (GRID_HEADER if headers else 0) + h + GRID_BOTTOM)  # fmt: skip


def _grid(rows: list[list[np.ndarray | None]], labels: list[str], path: Path, *, columns: int,
          gap_after: int | None = None, headers: tuple[str, str] | None = None) -> None:  # fmt: skip
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

    The figure is ``_grid_size(len(rows), columns, ...)`` pixels, one canvas pixel per figure
    pixel.
    """
    cell = THUMB + GRID_PAD
    gap = GRID_GAP if gap_after is not None else 0
    canvas_w = columns * cell + GRID_PAD + gap
    canvas_h = len(rows) * cell + GRID_PAD
    canvas = np.full((canvas_h, canvas_w, 3), 255, np.uint8)

    def x_of(col: int) -> int:
        return GRID_PAD + col * cell + (gap if gap_after is not None and col >= gap_after else 0)

    for r, thumbs in enumerate(rows):
        for col, thumb in enumerate(thumbs[:columns]):
            if thumb is None:
                continue
            y0, x0 = GRID_PAD + r * cell, x_of(col)
            canvas[y0 : y0 + THUMB, x0 : x0 + THUMB] = thumb
    if gap_after is not None:
        mid = x_of(gap_after) - GRID_PAD // 2 - gap // 2
        canvas[:, mid - 1 : mid + 1] = 160

    dpi = 100
    fig_w, fig_h = _grid_size(len(rows), columns, gap_after=gap_after, headers=headers is not None)
    fig = plt.figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    ax = fig.add_axes((GRID_LEFT / fig_w, GRID_BOTTOM / fig_h, canvas_w / fig_w, canvas_h / fig_h))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([GRID_PAD + r * cell + THUMB / 2 for r in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if headers is not None and gap_after is not None:
        left = (x_of(0) + x_of(gap_after - 1) + THUMB) / 2
        right = (x_of(gap_after) + x_of(columns - 1) + THUMB) / 2
        for x, text in ((left, headers[0]), (right, headers[1])):
            ax.text(x, -GRID_PAD, text, ha="center", va="bottom", fontsize=10, fontweight="bold")
    _atomic_savefig(fig, path, dpi=dpi)


def _selection_section(run_dir: Path, manifest: dict, tables: _Tables) -> str:
    title = "## Selection\n\n"
    if not (run_dir / "select" / "selected.parquet").is_file():
        return title + "Not available: the `select` stage has not run."
    select_cfg = manifest.get("config", {}).get("select", {})
    counts = manifest.get("stages", {}).get("select", {}).get("counts") or {}
    budget = ", ".join(f"{k}={v}" for k, v in _flatten(counts)) or "not recorded"
    cfg_budget = (f"ipc={select_cfg['ipc']}" if select_cfg.get("ipc") is not None
                  else f"pixel_fraction={select_cfg.get('pixel_fraction')}")
    selected = _selected_rows(run_dir, tables)
    sizes = tables.cluster_sizes()
    picked: dict[int, int] = {}
    for row in selected:
        picked[int(row["cluster"])] = picked.get(int(row["cluster"]), 0) + 1
    rows = [
        [str(c), str(sizes[c]) if c in sizes else "", str(picked.get(c, 0))]
        for c in sorted(set(sizes) | set(picked))
    ]
    rows.append(["total", str(sum(sizes.values())) if sizes else "", str(len(selected))])
    return title + (
        f"- method: `{select_cfg.get('method', 'unknown')}` (score `{select_cfg.get('score')}`)\n"
        f"- budget: {cfg_budget}\n"
        f"- counts: {budget}\n\n"
        + _table(["cluster", "assigned patches", "selected"], rows)
    )


def _synthesis_section(run_dir: Path, manifest: dict, out_dir: Path, tables: _Tables) -> str:
    title = "## Synthesis\n\n"
    prov_path = run_dir / "synthesize" / "provenance.csv"
    if not prov_path.is_file():
        return title + "Not available: the `synthesize` stage has not run."
    stages = manifest.get("stages", {})
    ft = stages.get("finetune", {}).get("counts") or {}
    syn = stages.get("synthesize", {}).get("counts") or {}
    model = _read_json(run_dir / "finetune" / "model" / "backbone.json")
    summary = _read_json(run_dir / "synthesize" / "synthesis.json")
    provenance = _read_provenance(prov_path)
    log = _read_log(run_dir / "finetune" / "log.jsonl")

    kind = ft.get("backbone") or model.get("kind") or summary.get("backbone") or "unknown"
    trainable = ft.get("trainable") or model.get("trainable") or "unknown"
    source = ft.get("source") or model.get("source") or {}
    total = ft.get("parameters", source.get("parameters"))
    n_train = ft.get("trainable_parameters", source.get("trainable"))
    if source.get("dit_path"):
        origin = f"pretrained DiT from `{source['dit_path']}`"
        if source.get("vae_path"):
            origin += f", VAE `{source['vae_path']}`"
    elif kind == "unet" or source.get("init"):
        origin = "UNet trained from scratch"
    else:
        origin = "origin not recorded"
    params = "parameters not recorded"
    if isinstance(total, int) and isinstance(n_train, int):
        share = 100 * n_train / max(total, 1)
        params = f"{n_train:,} of {total:,} parameters trainable ({share:.2f}%)"

    iterations = ft.get("iterations")
    if iterations is None and log:
        iterations = log[-1].get("step")
    workers = ft.get("workers")
    if workers:
        engine = "DeepSpeed" if ft.get("deepspeed") else "plain PyTorch, no DeepSpeed"
        where = f"{workers} Ray Train worker(s), {engine}"
    elif workers == 0:
        where = "in-process PyTorch (no DeepSpeed)"
    else:
        where = "workers not recorded"
    final_loss = ft.get("final_loss")
    if final_loss is None and log:
        final_loss = log[-1].get("loss")
    patches = ft.get("patches")

    first = provenance[0] if provenance else {}
    sampler = syn.get("sampler", summary.get("sampler", first.get("sampler", "unknown")))
    steps = syn.get("steps", summary.get("steps", first.get("steps", "?")))
    guidance = syn.get("guidance_scale",
                       summary.get("guidance_scale", first.get("guidance_scale", "?")))  # fmt: skip
    images = syn.get("images", summary.get("images", len(provenance)))
    resolution = syn.get("resolution", summary.get("resolution", model.get("resolution")))
    fraction = syn.get("pixel_fraction")

    lines = [
        f"- backbone: `{kind}` ({origin}), trainable `{trainable}`: {params}",
        f"- fine-tuning: {iterations if iterations is not None else '?'} iterations"
        + (f" on {patches} patches" if patches is not None else "")
        + f", {where}; final loss "
        + (f"{final_loss:.4f}" if isinstance(final_loss, (int, float)) else "not recorded"),
        f"- sampler: `{sampler}`, {steps} steps, guidance scale {guidance}",
        f"- synthesized: {images} images"
        + (f" of {resolution}x{resolution}" if resolution else "")
        + (f", pixel fraction {fraction} of the mined corpus" if fraction is not None else ""),
    ]

    sizes = tables.cluster_sizes()
    synth_by_cluster: dict[int, list[str]] = {}
    for row in provenance:
        synth_by_cluster.setdefault(int(row["cluster"]), []).append(row["file"])
    all_clusters = sorted(set(sizes) | set(synth_by_cluster))
    clusters = all_clusters[:MONTAGE_MAX_ROWS]
    parts = [title + "\n".join(lines)]
    if clusters:
        real = _real_thumbs(_top_patches(tables.uri, clusters, SYNTH_PER_SIDE))
        rows = []
        for c in clusters:
            left = (real.get(c, []) + [None] * SYNTH_PER_SIDE)[:SYNTH_PER_SIDE]
            right = [_synth_thumb(run_dir / "synthesize" / f)
                     for f in synth_by_cluster.get(c, [])[:SYNTH_PER_SIDE]]  # fmt: skip
            rows.append(left + right)
        labels = [f"cluster {c}" + (f"\n(n={sizes[c]})" if c in sizes else "") for c in clusters]
        _grid(rows, labels, out_dir / "synthesis.png", columns=2 * SYNTH_PER_SIDE,
              gap_after=SYNTH_PER_SIDE, headers=("real patches", "synthesized"))  # fmt: skip
        note = ""
        if len(all_clusters) > len(clusters):
            note = f" Only the first {len(clusters)} of {len(all_clusters)} clusters are shown."
        parts.append(
            f"Per cluster: left, up to {SYNTH_PER_SIDE} real patches closest to its centroid "
            f"(highest `cos_sim`); right, its first {SYNTH_PER_SIDE} synthesized images "
            f"(real patches | synthesized). The row label gives the cluster id and its number "
            f"of assigned patches.{note}\n\n"
            "![real patches | synthesized, per cluster](synthesis.png)"
        )
        table = [[str(c), str(sizes[c]) if c in sizes else "", str(len(synth_by_cluster.get(c, [])))]
                 for c in all_clusters]  # fmt: skip
        table.append(["total", str(sum(sizes.values())) if sizes else "", str(len(provenance))])
        parts.append(_table(["cluster", "assigned patches", "synthesized"], table))
    if log and _loss_plot(log, out_dir / "finetune_loss.png"):
        parts.append("Fine-tuning loss (mean over each logging interval):\n\n"
                     "![fine-tuning loss](finetune_loss.png)")  # fmt: skip
    return "\n\n".join(parts)


def _top_patches(run_uri: str | Path, clusters: list[int], n: int) -> dict[int, list[dict]]:
    """Per cluster of ``clusters``, its ``n`` patch rows (``patch_id, source, x, y, size,
    cos_sim``) with the highest ``cos_sim`` (ties: by ``patch_id``), best first.

    ``run_uri`` holds the partitioned tables (``mine/``, ``cluster/assignments/``). Only the
    assignments of ``clusters`` and the geometry of the picked patches are read. Patches
    without geometry in the patch table are left out; {} when either table is missing. Without
    a ``cos_sim`` column the order is by ``patch_id``.
    """
    tables = _Tables(str(run_uri))
    if not tables.has_patches():
        return {}
    table = tables.assignments(filter=pads.field("cluster").isin(pa.array(clusters, pa.int64())))
    if table is None:
        return {}
    cluster = table.column("cluster").to_numpy(zero_copy_only=False).astype(np.int64)
    ids = np.asarray(table.column("patch_id").to_pylist(), dtype=str)
    if "cos_sim" in table.column_names:
        sim = table.column("cos_sim").to_numpy(zero_copy_only=False).astype(np.float64)
        sim = np.where(np.isfinite(sim), sim, -np.inf)
    else:
        sim = np.zeros(len(cluster))
    order = np.lexsort((ids, -sim, cluster))  # by cluster, then cos_sim descending, then id
    sorted_c = cluster[order]
    starts = np.flatnonzero(np.r_[True, sorted_c[1:] != sorted_c[:-1]]) if len(order) else []
    picked = {}
    for a in starts:
        head = order[a : a + n][sorted_c[a : a + n] == sorted_c[a]]  # stop at the next cluster
        picked[int(sorted_c[a])] = [int(i) for i in head]
    need = sorted({ids[i] for rows in picked.values() for i in rows})
    lookup = tables.geometry(need)
    return {c: [{**lookup[ids[i]], "cos_sim": float(sim[i])} for i in rows if ids[i] in lookup]
            for c, rows in picked.items()}  # fmt: skip


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


def _psnr_section(run_dir: Path) -> str:
    title = "## PSNR / SSIM (Y channel)\n\n"
    path = run_dir / "evaluate" / "results.json"
    if not path.is_file():
        return title + "Not available: the `evaluate` stage has not run."
    results = json.loads(path.read_text())
    rows_by_label: dict[str, list[dict]] = results.get("rows", {})
    datasets: list[str] = []
    for entries in rows_by_label.values():
        for e in entries:
            if e["dataset"] not in datasets:
                datasets.append(e["dataset"])
    n_images = {}
    for entries in rows_by_label.values():
        for e in entries:
            n_images.setdefault(e["dataset"], e.get("n_images"))
    base = {e["dataset"]: e["psnr_y"] for e in rows_by_label.get("bicubic", [])}

    rows = []
    for label, entries in rows_by_label.items():
        by_ds = {e["dataset"]: e for e in entries}
        cells = [
            f"{by_ds[d]['psnr_y']:.2f} / {by_ds[d]['ssim_y']:.4f}" if d in by_ds else ""
            for d in datasets
        ]
        gains = [by_ds[d]["psnr_y"] - base[d] for d in datasets if d in by_ds and d in base]
        rows.append([label, *cells, f"{np.mean(gains):+.2f}" if gains else "n/a"])
    headers = ["method"] + [
        f"{d} (n={n_images[d]})" if n_images.get(d) else d for d in datasets
    ] + ["mean gain vs bicubic (dB)"]
    scale = results.get("scale")
    return title + (
        f"Scale x{scale}; cells are PSNR (dB) / SSIM, the gain column is the PSNR gain over "
        "bicubic averaged over the datasets both were evaluated on.\n\n"
        + _table(headers, rows)
    )


# --------------------------------------------------------------------------- helpers


def _selected_rows(run_dir: Path, tables: _Tables) -> list[dict]:
    """Rows of ``selected.parquet`` with ``source, x, y, size, cluster, rank``.

    Patch geometry missing from the selection table is looked up in the patch table by
    ``patch_id``; a missing ``cluster`` (baselines ``random``/``score-topk`` may not carry
    it) in the cluster assignments, and is -1 where no assignment exists. Only the rows of the
    selected patches are read from either table.

    Raises:
        FileNotFoundError: geometry is needed but the patch table does not exist.
    """
    table = pq.read_table(run_dir / "select" / "selected.parquet")
    rows = table.to_pylist()
    if rows and not all(k in table.column_names for k in _GEOMETRY):
        if not tables.has_patches():
            raise FileNotFoundError(
                f"{storage.join(tables.uri, 'mine')}: no patch table to look up the geometry of "
                "the selected patches"
            )
        lookup = tables.geometry(sorted({r["patch_id"] for r in rows}))
        rows = [{**lookup[r["patch_id"]], **r} for r in rows]
    if rows and "cluster" not in table.column_names:
        assigned = {}
        ids = pa.array(sorted({r["patch_id"] for r in rows}), pa.string())
        t = tables.assignments(["patch_id", "cluster"], filter=pads.field("patch_id").isin(ids))
        if t is not None:
            assigned = dict(zip(t.column("patch_id").to_pylist(), t.column("cluster").to_pylist()))
        rows = [{**r, "cluster": assigned.get(r["patch_id"], -1)} for r in rows]
    return rows


_GEOMETRY = ("source", "x", "y", "size")
_PATCH_COLUMNS = PATCH_SCHEMA.append(pa.field("kept", pa.bool_()))


class _Tables:
    """The run's partitioned tables at ``uri`` (local path or ``s3://``), read on demand.

    ``mine/patches/`` + ``mine/keep.json`` through ``mining.read_patches``, and
    ``cluster/assignments/`` through ``storage.read_dataset``; whether each exists is asked
    once, and the cluster sizes are computed once.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.mine_uri = storage.join(uri, "mine")
        self.assign_uri = storage.join(uri, "cluster", "assignments")
        self._exists: dict[str, bool] = {}
        self._sizes: dict[int, int] | None = None

    def _has(self, uri: str) -> bool:
        if uri not in self._exists:
            self._exists[uri] = storage.exists(uri)
        return self._exists[uri]

    def has_patches(self) -> bool:
        """Whether the ``mine`` stage finished: its keep rule ``keep.json`` is written once
        every part is (a corpus without a single shard has no ``patches/`` folder)."""
        return self._has(storage.join(self.mine_uri, "keep.json"))

    def patches(self, columns: list[str], filter: Any = None) -> pa.Table | None:
        """``columns`` (``kept`` computed) of the patch rows; None without a patch table."""
        if not self.has_patches():
            return None
        if not self._has(storage.join(self.mine_uri, "patches")):
            return _PATCH_COLUMNS.empty_table().select(columns)
        return read_patches(self.mine_uri, columns, filter=filter)

    def geometry(self, ids: list[str]) -> dict[str, dict]:
        """``patch_id`` -> ``{patch_id, source, x, y, size}`` for those of ``ids`` in the patch
        table ({} without one)."""
        if not ids:
            return {}
        table = self.patches(["patch_id", *_GEOMETRY],
                             filter=pads.field("patch_id").isin(pa.array(ids, pa.string())))  # fmt: skip
        return {} if table is None else {r["patch_id"]: r for r in table.to_pylist()}

    def assignments(self, columns: list[str] | None = None, filter: Any = None) -> pa.Table | None:
        """The cluster assignments (``columns``, rows matching ``filter``); None if absent."""
        if not self._has(self.assign_uri):
            return None
        return storage.read_dataset(self.assign_uri, columns=columns, filter=filter)

    def cluster_sizes(self) -> dict[int, int]:
        """Cluster id -> number of assigned patches ({} without assignments)."""
        if self._sizes is None:
            table = self.assignments(["cluster"])
            self._sizes = {}
            if table is not None and table.num_rows:
                counts = table.column("cluster").drop_null().value_counts()
                pairs = zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())
                self._sizes = {int(c): int(n) for c, n in sorted(pairs)}
        return self._sizes


def _is_synth(run_dir: Path, manifest: dict) -> bool:
    """A ``distill: synth`` run: so configured, or it has synthesized images."""
    return (manifest.get("config", {}).get("distill") == "synth"
            or (run_dir / "synthesize" / "provenance.csv").is_file())  # fmt: skip


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; {} if it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_log(path: Path) -> list[dict]:
    """Rows of a JSON-lines log (blank or malformed lines skipped); [] if missing."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_provenance(path: Path) -> list[dict]:
    """Rows of ``synthesize/provenance.csv`` in file order (rows without ``file``/``cluster``
    skipped)."""
    with open(path, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            try:
                rows.append({**row, "cluster": int(row["cluster"])})
            except (KeyError, TypeError, ValueError):
                continue
    return [r for r in rows if r.get("file")]


def _status(entry: dict) -> str:
    status = str(entry.get("status", "unknown"))
    if entry.get("skipped") or status in _SKIPPED_STATUSES:
        return "skipped (up to date)"
    return status


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dict -> ``[("a.b", value), ...]`` in insertion order."""
    out: list[tuple[str, Any]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flatten(value, name + ".")
        else:
            out.append((name, value))
    return out


def _cell(value: Any) -> str:
    """Text safe inside a markdown table cell: no pipes, no line breaks."""
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
             "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _installed_version() -> str:
    try:
        return importlib.metadata.version("srdistill")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_savefig(fig: Any, path: Path, **kwargs: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", **kwargs)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
