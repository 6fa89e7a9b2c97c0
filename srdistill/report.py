"""Markdown report of a run directory, with plots.

``write_report(run_dir)`` reads what the pipeline left in ``run_dir`` (see
``docs/ARCHITECTURE.md``: ``manifest.json``, ``mine/patches.parquet``,
``cluster/assignments.parquet``, ``select/selected.parquet``, ``evaluate/results.json``) and
writes ``run_dir/report/report.md`` with two figures beside it:

* ``scores.png``: histograms of ``psnr_bic`` and ``grad``, all patches vs kept patches, with
  the keep threshold when the keep rule is ``threshold``;
* ``clusters.png``: one row per cluster, up to 8 of its selected patches in rank order.

Every section after the header is optional: a run stopped after mining still gets a report
with the sections whose artifacts exist, and a line saying which stage is missing for the
others. Nothing here imports Ray; plots use matplotlib's Agg backend (no display).
"""

from __future__ import annotations

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
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from srdistill import imaging  # noqa: E402
from srdistill.config import LOWER_IS_HARDER  # noqa: E402
from srdistill.pipeline import STAGES  # noqa: E402

__all__ = ["write_report"]

#: Pipeline stages in run order, as recorded in ``manifest["stages"]``.

#: Thumbnails per cluster row and their side in pixels in ``clusters.png``.
MONTAGE_COLUMNS = 8
THUMB = 96
#: Clusters shown in ``clusters.png`` at most (the rest are listed only in the table).
MONTAGE_MAX_ROWS = 64

_SKIPPED_STATUSES = {"skipped", "up-to-date", "up_to_date", "cached"}


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report/report.md`` and its figures from the run's artifacts.

    Sections: header (input, run dir, date, versions, preset; a warning when CLIP was randomly
    initialised and the clusters are therefore not semantic), stages, skipped inputs, score
    histograms (``scores.png``), cluster montage (``clusters.png``), selection summary, and
    the PSNR/SSIM table (PSNR in dB, SSIM in [0, 1], both on Y, as ``evaluate`` computed them).
    A section whose artifact is missing is replaced by one line naming the stage not run.
    Files are written atomically (temp file, then ``os.replace``).

    Args:
        run_dir: a run directory holding at least ``manifest.json``.

    Returns:
        Path of the written ``report.md``.

    Raises:
        FileNotFoundError: ``run_dir/manifest.json`` does not exist.
    """
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} does not exist: not a run directory")
    manifest = json.loads(manifest_path.read_text())
    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)

    sections = [
        _header(manifest, run_dir),
        _stages_section(manifest),
        _skipped_section(manifest),
        _scores_section(run_dir, manifest, out_dir),
        _clusters_section(run_dir, out_dir),
        _selection_section(run_dir, manifest),
        _psnr_section(run_dir),
    ]
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
    return "\n".join(lines)


def _stages_section(manifest: dict) -> str:
    recorded = manifest.get("stages", {})
    # every stage but the report itself (this document), in pipeline order
    names = [s for s in STAGES if s != "report"] + [s for s in recorded if s not in STAGES]
    rows = []
    for name in names:
        entry = recorded.get(name)
        if entry is None:
            rows.append([name, "not run", "", ""])
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
    skipped = manifest.get("skipped_inputs") or []
    if not skipped:
        return "## Skipped inputs\n\nnone"
    rows = [[f"`{s.get('file', '')}`", s.get("reason", "")] for s in skipped]
    return f"## Skipped inputs ({len(skipped)})\n\n" + _table(["file", "reason"], rows)


def _scores_section(run_dir: Path, manifest: dict, out_dir: Path) -> str:
    title = "## Patch scores\n\n"
    path = run_dir / "mine" / "patches.parquet"
    if not path.is_file():
        return title + "Not available: the `mine` stage has not run."
    table = pq.read_table(path, columns=["psnr_bic", "grad", "kept"])
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


def _clusters_section(run_dir: Path, out_dir: Path) -> str:
    title = "## Clusters\n\n"
    selected_path = run_dir / "select" / "selected.parquet"
    if not selected_path.is_file():
        return title + "Not available: the `select` stage has not run."
    selected = _selected_rows(run_dir)
    sizes = _cluster_sizes(run_dir)
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
    _montage(shown, clusters, labels, out_dir / "clusters.png")
    note = ""
    if len(by_cluster) > len(clusters):
        note = f" Only the first {len(clusters)} of {len(by_cluster)} clusters are shown."
    return title + (
        f"Up to {MONTAGE_COLUMNS} selected patches per cluster, in rank order; the row label "
        f"gives the cluster id and its number of assigned patches.{note}\n\n"
        "![selected patches per cluster](clusters.png)"
    )


def _montage(shown: dict[int, list[dict]], clusters: list[int], labels: list[str],
             path: Path) -> None:
    """Grid of ``THUMB`` x ``THUMB`` thumbnails, one row per cluster, each source read once."""
    pad = 4
    cell = THUMB + pad
    canvas = np.full((len(clusters) * cell + pad, MONTAGE_COLUMNS * cell + pad, 3), 255, np.uint8)
    by_source: dict[str, list[tuple[int, int, dict]]] = {}
    for r, c in enumerate(clusters):
        for col, row in enumerate(shown[c]):
            by_source.setdefault(row["source"], []).append((r, col, row))
    for source, items in by_source.items():
        try:
            img = imaging.read_image(source)
        except imaging.ImageReadError:
            img = None
        for r, col, row in items:
            thumb = np.full((THUMB, THUMB, 3), 200, np.uint8)  # grey: source unreadable
            if img is not None:
                try:
                    patch = imaging.crop(img, int(row["x"]), int(row["y"]), int(row["size"]))
                    thumb = np.asarray(
                        Image.fromarray(patch).resize((THUMB, THUMB), Image.Resampling.BICUBIC)
                    )
                except ValueError:
                    pass  # patch outside the image (source changed since mining)
            y0, x0 = pad + r * cell, pad + col * cell
            canvas[y0 : y0 + THUMB, x0 : x0 + THUMB] = thumb

    dpi = 100
    h, w = canvas.shape[:2]
    fig = plt.figure(figsize=(w / dpi + 1.4, h / dpi + 0.2), dpi=dpi)
    ax = fig.add_axes((1.3 / (w / dpi + 1.4), 0.1 / (h / dpi + 0.2),
                       (w / dpi) / (w / dpi + 1.4), (h / dpi) / (h / dpi + 0.2)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([pad + r * cell + THUMB / 2 for r in range(len(clusters))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    _atomic_savefig(fig, path, dpi=dpi)


def _selection_section(run_dir: Path, manifest: dict) -> str:
    title = "## Selection\n\n"
    if not (run_dir / "select" / "selected.parquet").is_file():
        return title + "Not available: the `select` stage has not run."
    select_cfg = manifest.get("config", {}).get("select", {})
    counts = manifest.get("stages", {}).get("select", {}).get("counts") or {}
    budget = ", ".join(f"{k}={v}" for k, v in _flatten(counts)) or "not recorded"
    cfg_budget = (f"ipc={select_cfg['ipc']}" if select_cfg.get("ipc") is not None
                  else f"pixel_fraction={select_cfg.get('pixel_fraction')}")
    selected = _selected_rows(run_dir)
    sizes = _cluster_sizes(run_dir)
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


def _selected_rows(run_dir: Path) -> list[dict]:
    """Rows of ``selected.parquet`` with ``source, x, y, size, cluster, rank``.

    Patch geometry missing from the selection table is looked up in the patch table by
    ``patch_id``; a missing ``cluster`` (baselines ``random``/``score-topk`` may not carry
    it) in ``cluster/assignments.parquet``, and is -1 where no assignment exists.
    """
    table = pq.read_table(run_dir / "select" / "selected.parquet")
    rows = table.to_pylist()
    geometry = ("source", "x", "y", "size")
    if rows and not all(k in table.column_names for k in geometry):
        patches = pq.read_table(run_dir / "mine" / "patches.parquet",
                                columns=["patch_id", *geometry]).to_pylist()
        lookup = {p["patch_id"]: p for p in patches}
        rows = [{**lookup[r["patch_id"]], **r} for r in rows]
    if rows and "cluster" not in table.column_names:
        path = run_dir / "cluster" / "assignments.parquet"
        assigned = {}
        if path.is_file():
            t = pq.read_table(path, columns=["patch_id", "cluster"])
            assigned = dict(zip(t.column("patch_id").to_pylist(), t.column("cluster").to_pylist()))
        rows = [{**r, "cluster": assigned.get(r["patch_id"], -1)} for r in rows]
    return rows


def _cluster_sizes(run_dir: Path) -> dict[int, int]:
    """Cluster id -> number of assigned patches, from ``cluster/assignments.parquet`` ({} if absent)."""
    path = run_dir / "cluster" / "assignments.parquet"
    if not path.is_file():
        return {}
    cluster = pq.read_table(path, columns=["cluster"]).column("cluster").to_numpy()
    ids, counts = np.unique(cluster, return_counts=True)
    return {int(i): int(n) for i, n in zip(ids, counts)}


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
