"""The report's sections, each a markdown string (header, stages, skipped inputs, PSNR/SSIM and
the per-set crops, training, patch scores, clusters, selection or synthesis), and
``write_report``, which writes them with their figures as ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from srdistill.config import LOWER_IS_HARDER, RunConfig
from srdistill.run.report.artifacts import (_Tables, _atomic_write_text, _is_synth, _read_json, _read_log,
                                            _read_provenance, _selected_rows)
from srdistill.run.report.figures import (CROP, _atomic_savefig, _crops_figure, _curves_plot, _grid, _histogram,
                                          _loss_plot, _real_thumbs, _synth_thumb)
from srdistill.run.report.html_page import markdown_to_html
from srdistill.run.rundir import STAGES, SYNTH_ONLY, stage_chain
from srdistill.sr import imaging

__all__ = [
    "write_report",
]


#: Random members, and selected patches, per cluster row of ``clusters.png``.
SELECTION_PER_SIDE = 4
#: Clusters shown in ``synthesis.png`` at most, and in ``clusters.png`` (taller rows, with
#: captions) at most (the rest are listed only in the tables).
MONTAGE_MAX_ROWS = 64
SELECTION_MAX_ROWS = 16
#: Real patches, and synthesized images, per cluster row of ``synthesis.png``.
SYNTH_PER_SIDE = 4
#: Images per evaluation set in its crops figure (its crops: ``figures.CROP``, ``CROP_MARGIN``).
CROPS_PER_SET = 3
#: Packages whose versions the header lists (keys of ``manifest["versions"]``).
KEY_PACKAGES = ("torch", "ray", "diffusers", "transformers", "faiss", "numpy")

_SKIPPED_STATUSES = {"skipped", "up-to-date", "up_to_date", "cached"}


def write_report(run_dir: Path, run_uri: str | None = None) -> Path:
    """Write ``run_dir/report/report.md``, its figures and ``report.html`` from the run's artifacts.

    Sections: header (input, run dir, dates, srdistill version, git commit, key package
    versions, preset, ``config.yaml``; a warning when CLIP or the ViT was randomly initialised),
    stages, skipped inputs, PSNR/SSIM (mean per set: PSNR in dB, SSIM in [0, 1], both on Y, as
    ``evaluate`` computed them), per evaluation set the crops figure and the per-image table,
    SR training (``curves.png``), score histograms (``scores.png``), then for a coreset run the
    cluster montage (``clusters.png``) and selection summary, for a synth run the synthesis
    summary (``synthesis.png``, ``finetune_loss.png``). A section whose artifact is missing is
    replaced by one line naming the stage not run; a synth run (``config.distill == "synth"``,
    or ``synthesize/provenance.csv`` present) says in its clusters section that it has no
    ``select`` stage. ``report.html`` holds the same text with every figure inlined
    (``markdown_to_html``). Files are written atomically (temp file, then ``os.replace``).

    Args:
        run_dir: a run directory holding at least ``manifest.json`` (the local mirror of the
            run: manifest, ``select/``, ``synthesize/``, ``finetune/``, ``train/``,
            ``evaluate/``, ...).
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
    results = _read_json(run_dir / "evaluate" / "results.json")
    sections = [
        _header(manifest, run_dir),
        _stages_section(manifest, synth),
        _skipped_section(manifest),
        _psnr_section(run_dir, results),
        *_results_sections(run_dir, manifest, results, out_dir),
        _training_section(run_dir, manifest, results, out_dir),
        _scores_section(tables, manifest, out_dir),
        _clusters_section(run_dir, manifest, out_dir, synth, tables),
    ]
    if synth:
        sections.append(_synthesis_section(run_dir, manifest, out_dir, tables))
    else:
        sections.append(_selection_section(run_dir, manifest, tables))
    text = "\n\n".join(s.rstrip() for s in sections) + "\n"
    path = out_dir / "report.md"
    _atomic_write_text(path, text)
    _atomic_write_text(out_dir / "report.html", markdown_to_html(text, out_dir, title="srdistill run report"))
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
    if "git_commit" in manifest:
        commit = manifest["git_commit"]
        if commit:
            dirty = {True: " (with uncommitted changes)", False: ""}.get(manifest.get("git_dirty"), "")
            lines.append(f"- git commit: `{commit}`{dirty}")
        else:
            lines.append("- git commit: none (srdistill did not run from a git checkout)")
    versions = manifest.get("versions") or {}
    shown = [f"{name} {versions[name]}" for name in KEY_PACKAGES if name in versions]
    if shown:
        lines.append(f"- versions: {', '.join(shown)} (all in `manifest.json`)")
    if manifest.get("preset"):
        lines.append(f"- config preset: `{manifest['preset']}`")
    if (run_dir / "config.yaml").is_file():
        lines.append("- resolved config: `config.yaml` in the run dir (`srdistill run --config config.yaml`)")
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


def _chain(manifest: dict, synth: bool) -> list[str]:
    """The stages the run's config executes (``rundir.stage_chain``); for a config this
    version cannot read, every stage of its mode (coreset or synth)."""
    try:
        return stage_chain(RunConfig.model_validate(manifest.get("config") or {}))
    except ValueError:
        other = {"select", "align", "complexity"} if synth else set(SYNTH_ONLY)
        return [s for s in STAGES if s not in other]


def _stage_state(name: str, entry: dict | None, chain: list[str]) -> str:
    """The state of stage ``name`` in the report: ``disabled`` (the config runs no such stage),
    ``not reached`` (it does, but the run stopped before it: ``--until`` or a failure),
    ``skipped (up to date)``, ``done``, or ``not finished`` (it started and did not end)."""
    if name not in chain and (name in STAGES or entry is None):
        return "disabled"
    if entry is None:
        return "not reached"
    status = str(entry.get("status", "unknown"))
    if entry.get("skipped") or status in _SKIPPED_STATUSES:
        return "skipped (up to date)"
    return "not finished" if status == "running" else status


def _stages_section(manifest: dict, synth: bool) -> str:
    recorded = manifest.get("stages", {})
    chain = _chain(manifest, synth)
    # every stage but the report itself (this document), in pipeline order
    names = [s for s in STAGES if s != "report"] + [s for s in recorded if s not in STAGES]
    rows = []
    for name in names:
        entry = recorded.get(name)
        state = _stage_state(name, entry, chain)
        seconds = (entry or {}).get("seconds")
        cells = _stage_cells(name, (entry or {}).get("counts") or {}) if state != "disabled" else ("", "", "")
        rows.append([name, state, f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "", *cells])
    return ("## Stages\n\n" + _table(["stage", "state", "seconds", "input", "output", "notes"], rows)
            + "\n\nThe full counts of every stage are in `manifest.json`.")  # fmt: skip


def _num(value: Any) -> str:
    """A count or measure, short: ints with thousands separators, floats to 4 significant digits."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _count(value: int, noun: str) -> str:
    """``"1 shard"``, ``"3 shards"``."""
    return f"{_num(value)} {noun}{'' if value == 1 else 's'}"


def _stage_cells(name: str, c: dict) -> tuple[str, str, str]:
    """``(input, output, notes)`` of a stage's counts, each a few words; "" where not recorded."""

    def has(*keys: str) -> bool:
        return all(c.get(k) is not None for k in keys)

    def join(*parts: str | None) -> str:
        return "; ".join(p for p in parts if p)

    n = _num
    if name == "plan":
        return (f"{n(c['images_listed'])} image files" if has("images_listed") else "",
                _count(c["shards"], "shard") if has("shards") else "",
                f"{n(c['other_files_ignored'])} other files ignored" if c.get("other_files_ignored") else "")
    if name == "mine":
        kept = f", {n(c['patches_kept'])} kept" if has("patches_kept") else ""
        return (f"{n(c['images_mined'])} images" if has("images_mined") else "",
                f"{n(c['patches'])} patches{kept}" if has("patches") else "",
                join(_count(c["images_skipped"], "image") + " skipped" if c.get("images_skipped") else None,
                     _count(c["images_duplicate"], "duplicate") if c.get("images_duplicate") else None,
                     f"{n(c['megapixels_per_s'])} MP/s" if has("megapixels_per_s") else None))
    if name in ("embed", "complexity"):
        what = "embeddings" if name == "embed" else "ViT features"
        random_init = c.get("pretrained") is False or c.get("semantic") is False
        return (f"{n(c['patches'])} patches" if has("patches") else "",
                f"{n(c['dim'])}-d {what}" if has("dim") else "",
                "random-init weights" if random_init else "")
    if name == "cluster":
        return (f"{n(c['patches'])} patches" if has("patches") else "",
                f"{n(c['k_used'])} clusters" if has("k_used") else "",
                join(f"k={c['k']}" if has("k") else None,
                     f"trained on {n(c['n_train'])}" if has("n_train") else None))
    if name == "select":
        return (f"{n(c['available'])} patches" if has("available") else "",
                f"{n(c['selected'])} selected" if has("selected") else "",
                join(f"`{c['method']}`" if has("method") else None,
                     f"pixel fraction {n(c['pixel_fraction'])}" if has("pixel_fraction") else None,
                     f"feature MMD {n(c['feature_mmd'])}" if has("feature_mmd") else None))
    if name == "align":
        return (f"{n(c['images'])} images" if has("images") else "",
                f"{n(c['images'])} aligned" if has("images") else "",
                f"MMD {n(c['mmd_before'])} -> {n(c['mmd_after'])}" if has("mmd_before", "mmd_after") else "")
    if name == "encode":
        shape = "x".join(str(d) for d in c["sample_shape"]) if has("sample_shape") else None
        return (f"{n(c['patches'])} patches" if has("patches") else "",
                f"{shape} {c.get('dtype', '')} samples".strip() if shape else "",
                f"`{c['backbone']}`" if has("backbone") else "")
    if name == "finetune":
        return (f"{n(c['patches'])} patches" if has("patches") else "",
                f"{n(c['iterations'])} iterations" if has("iterations") else "",
                join(f"`{c['backbone']}` ({c.get('trainable')})" if has("backbone") else None,
                     f"final loss {n(c['final_loss'])}" if has("final_loss") else None,
                     f"resumed at {c['resumed_from']}" if c.get("resumed_from") else None))
    if name == "synthesize":
        return ("",
                f"{n(c['images'])} images" if has("images") else "",
                join(f"`{c['sampler']}`, {c.get('steps')} steps" if has("sampler") else None,
                     f"guidance {c['guidance_scale']}" if has("guidance_scale") else None))
    if name == "train":
        return (f"{n(c['train_images'])} images" if has("train_images") else "",
                f"`{c['model']}` x{c.get('scale')}" if has("model") else "",
                join(f"{n(c['iterations'])} iterations" if has("iterations") else None,
                     f"resumed at {c['resumed_from']}" if c.get("resumed_from") else None))
    if name == "evaluate":
        bic = {k[len("bicubic "):]: v for k, v in c.items() if k.startswith("bicubic ") and isinstance(v, (int, float))}
        gains = []
        for key, value in c.items():
            label, _, ds = key.rpartition(" ")
            if label and label != "bicubic" and ds in bic and isinstance(value, (int, float)):
                gains.append(f"{ds} {value - bic[ds]:+.2f} dB")
        return (", ".join(bic) if bic else "", "PSNR / SSIM tables" if c else "",
                "vs bicubic: " + ", ".join(gains) if gains else "")
    return ("", "", ", ".join(f"{k}={_num(v)}" for k, v in list(c.items())[:3] if not isinstance(v, (dict, list))))


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


def _psnr_section(run_dir: Path, results: dict) -> str:
    title = "## PSNR / SSIM (Y channel)\n\n"
    if not (run_dir / "evaluate" / "results.json").is_file():
        return title + "Not available: the `evaluate` stage has not run."
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


def _model_label(results: dict) -> str | None:
    """The label of the trained model's rows in ``results.json`` (the first that is not bicubic)."""
    return next((label for label in results.get("rows", {}) if label != "bicubic"), None)


def _results_sections(run_dir: Path, manifest: dict, results: dict, out_dir: Path) -> list[str]:
    """Per evaluation set: ``crops_<set>.png`` (``_crops_figure``) and the per-image table."""
    rows = results.get("rows", {})
    label = _model_label(results)
    if not rows or label is None:
        return []
    bicubic = {e["dataset"]: e for e in rows.get("bicubic", [])}
    model_rows = rows[label]
    configured = list(manifest.get("config", {}).get("evaluate", {}).get("datasets") or [])
    model, why_not = _load_model(run_dir)
    scale = int(results.get("scale") or manifest.get("config", {}).get("scale", 2))
    sections = []
    for i, entry in enumerate(model_rows):
        ds = entry["dataset"]
        base = {r["name"]: r for r in bicubic.get(ds, {}).get("per_image", [])}
        per_image = [(r, base.get(r["name"])) for r in entry.get("per_image", [])]
        parts = [f"## {ds}: bicubic vs {label}"]
        # the images where the model differs most from bicubic, either way
        ranked = sorted((p for p in per_image if p[1] is not None),
                        key=lambda p: -abs(p[0]["psnr_y"] - p[1]["psnr_y"]))[:CROPS_PER_SET]  # fmt: skip
        name = configured[i] if i < len(configured) and len(configured) == len(model_rows) else ds
        png = f"crops_{_safe_name(ds)}.png"
        if model is None:
            parts.append(f"No crops: {why_not}.")
        elif ranked:
            try:
                windows = _crops_figure(model, name, scale, ranked, label, out_dir / png)
            except (OSError, ValueError, imaging.ImageReadError) as exc:
                parts.append(f"No crops: {_cell(exc)}.")
            else:
                where = ", ".join(f"{r['name']} ({x}, {y})" for (r, _), (x, y, _) in zip(ranked, windows))
                side = windows[0][2] if windows else CROP
                parts.append(
                    f"The {len(ranked)} images whose PSNR differs most from bicubic's (gain or loss), each "
                    f"the whole HR image with the crop marked, then HR, bicubic and {label} over the "
                    f"{side}x{side} HR-pixel window (shown enlarged, nearest neighbour) where the model "
                    f"differs most from bicubic (largest mean |model - bicubic|; top-left corner: {where}). "
                    "The PSNR in the titles is the whole image's, from `evaluate/results.json`.\n\n"
                    f"![{ds}: HR / bicubic / model crops]({png})"
                )
        table = [[r["name"], f"{b['psnr_y']:.2f} / {b['ssim_y']:.4f}" if b else "",
                  f"{r['psnr_y']:.2f} / {r['ssim_y']:.4f}", f"{r['psnr_y'] - b['psnr_y']:+.2f}" if b else ""]
                 for r, b in per_image]  # fmt: skip
        if table:
            parts.append(f"Per image (PSNR dB / SSIM on Y, border {scale}):\n\n"
                         + _table(["image", "bicubic", label, "gain (dB)"], table))  # fmt: skip
        sections.append("\n\n".join(parts))
    return sections


def _load_model(run_dir: Path) -> tuple[Any, str]:
    """The trained network of ``train/model.safetensors`` (CPU, eval mode), or ``(None, why)``."""
    path = run_dir / "train" / "model.safetensors"
    if not path.is_file():
        return None, "`train/model.safetensors` is not in the run directory"
    from srdistill.sr.training import load_checkpoint

    try:
        model, _ = load_checkpoint(path)
    except (OSError, ValueError) as exc:
        return None, _cell(exc)
    return model, ""


def _safe_name(name: str) -> str:
    """``name`` reduced to characters safe in a file name (``[A-Za-z0-9_.-]``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "set"


def _training_section(run_dir: Path, manifest: dict, results: dict, out_dir: Path) -> str:
    title = "## SR training\n\n"
    log = _read_log(run_dir / "train" / "log.jsonl")
    if not log:
        return title + "Not available: the `train` stage has not run (no `train/log.jsonl`)."
    cfg = manifest.get("config", {}).get("train", {})
    counts = (manifest.get("stages", {}).get("train") or {}).get("counts") or {}
    rows = _last_per_step(log)
    loss = [(r["step"], r["loss"]) for r in rows if _is_num(r.get("loss"))]
    val = [(r["step"], r["val_psnr_y"]) for r in rows if _is_num(r.get("val_psnr_y"))]
    resumed = sorted({r["resumed_from_step"] for r in log if _is_num(r.get("resumed_from_step"))})
    switch = [r["step"] for r in log if r.get("curriculum_stage") == 2 and _is_num(r.get("step"))]
    val_set = cfg.get("val_dataset")
    bic = next((e["psnr_y"] for e in results.get("rows", {}).get("bicubic", []) if e["dataset"] == val_set), None)

    what = [f"`{counts.get('model', cfg.get('model', '?'))}` x{manifest.get('config', {}).get('scale', '?')}"]
    if counts.get("train_images") is not None:
        what.append(f"on {counts['train_images']} images")
    lines = [f"- model: {' '.join(what)}, {_num(cfg.get('iterations'))} iterations, batch {cfg.get('batch_size')}, "
             f"L1 loss on [0, 1] pixels, lr {cfg.get('lr')} (`{cfg.get('schedule')}` schedule)"]  # fmt: skip
    if loss:
        lines.append(f"- loss (mean over each {cfg.get('log_every', '?')}-step interval): "
                     f"{loss[0][1]:.4f} at step {loss[0][0]} -> {loss[-1][1]:.4f} at step {loss[-1][0]}")  # fmt: skip
    if val:
        best = max(val, key=lambda p: p[1])
        lines.append(f"- validation PSNR on {val_set} (Y): {val[-1][1]:.2f} dB at step {val[-1][0]} "
                     f"(best {best[1]:.2f} at step {best[0]})"
                     + (f"; bicubic {bic:.2f} dB" if bic is not None else ""))  # fmt: skip
    else:
        lines.append("- no validation PSNR: set `train.val_every` to measure it during training")
    if resumed:
        lines.append(f"- resumed at step(s) {', '.join(str(s) for s in resumed)} (dotted lines)")
    if not loss:
        return title + "\n".join(lines)
    _curves_plot(loss, val, val_set, bic, resumed, switch, out_dir / "curves.png")
    return title + "\n".join(lines) + "\n\n![training loss and validation PSNR](curves.png)"


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _last_per_step(log: list[dict]) -> list[dict]:
    """The metric rows (with ``loss``) of a training log, the last one of each step, by step: a
    run resumed from a checkpoint logs again the steps after it."""
    by_step: dict[int, dict] = {}
    for row in log:
        if _is_num(row.get("step")) and "loss" in row:
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


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


def _clusters_section(run_dir: Path, manifest: dict, out_dir: Path, synth: bool, tables: _Tables) -> str:
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
    select_cfg = manifest.get("config", {}).get("select", {})
    method = select_cfg.get("method", "clip-kmeans")
    score = select_cfg.get("score") or "psnr_bic"
    selected = _selected_rows(run_dir, tables)
    sizes = tables.cluster_sizes()
    by_cluster: dict[int, list[dict]] = {}
    for row in sorted(selected, key=lambda r: r["rank"]):
        by_cluster.setdefault(int(row["cluster"]), []).append(row)
    if not by_cluster:
        return title + "No patch was selected."
    clusters = sorted(by_cluster)[:SELECTION_MAX_ROWS]
    n_sel = min(SELECTION_PER_SIDE, max(len(by_cluster[c]) for c in clusters))
    members = method == "clip-kmeans" and bool(sizes)  # random members of each cluster, else of the pool
    pool = "all" if method == "tripled" else "kept"
    randoms = (_random_members(tables, clusters, SELECTION_PER_SIDE, score) if members
               else _random_pool(tables, clusters, SELECTION_PER_SIDE, score, kept_only=pool == "kept"))  # fmt: skip
    shown = {(c, side): rows for c in clusters
             for side, rows in (("random", randoms.get(c, [])), ("selected", by_cluster[c][:n_sel]))}  # fmt: skip
    thumbs = _real_thumbs(shown)

    def caption(row: dict) -> str:
        value = row.get(score, row.get("score"))
        return f"{_score_text(score, value)}\n{_source_name(row['source'])}"

    rows, captions = [], []
    for c in clusters:
        left, right = thumbs[(c, "random")], thumbs[(c, "selected")]
        rows.append((left + [None] * SELECTION_PER_SIDE)[:SELECTION_PER_SIDE] + right)
        caps = [caption(r) for r in shown[(c, "random")]]
        captions.append((caps + [""] * SELECTION_PER_SIDE)[:SELECTION_PER_SIDE]
                        + [caption(r) for r in shown[(c, "selected")]])  # fmt: skip
    unit = "stratum" if method == "tripled" else "cluster"
    labels = [("all patches" if c < 0 else f"{unit} {c}") + (f"\n(n={sizes[c]})" if members and c in sizes else "")
              for c in clusters]  # fmt: skip
    left_head = "random members" if members else f"random {pool} patches"
    _grid(rows, labels, out_dir / "clusters.png", columns=SELECTION_PER_SIDE + n_sel, gap_after=SELECTION_PER_SIDE,
          headers=(left_head, "selected (rank order)"), captions=captions)  # fmt: skip
    note = ""
    if len(by_cluster) > len(clusters):
        note = f" Only the first {len(clusters)} of {len(by_cluster)} {unit}s are shown."
    harder = "lower" if LOWER_IS_HARDER.get(score, True) else "higher"
    drawn = (f"{SELECTION_PER_SIDE} members of the cluster drawn at random (seeded)" if members
             else f"{SELECTION_PER_SIDE} of the {pool} patches drawn at random (seeded)")  # fmt: skip
    grouped = clusters != [-1]  # a baseline selection (random, score-topk) has no groups
    label = f" the row label gives the {unit}" + (" and its number of assigned patches" if members else "") + "."
    return title + (
        (f"Per {unit}: left, {drawn}; right, its first" if grouped else f"Left, {drawn}; right, the first")
        + f" {n_sel} selected patches in rank order. Each patch is captioned with its `{score}` ({harder} = "
        f"harder) and its source image" + (f";{label}" if grouped else ".") + f"{note}\n\n"
        "![random members | selected patches, per cluster](clusters.png)"
    )


def _score_text(name: str, value: Any) -> str:
    """A patch score, short: ``psnr_bic`` in dB, other scores by name."""
    if not _is_num(value):
        return ""
    return f"{value:.1f} dB" if name == "psnr_bic" else f"{name} {value:.3g}"


def _source_name(source: str) -> str:
    """The file name of a patch's source (no folder, no extension), at most 16 characters."""
    stem = Path(str(source).rsplit("/", 1)[-1]).stem
    return stem if len(stem) <= 16 else stem[:15] + "…"


def _random_members(tables: _Tables, clusters: list[int], n: int, score: str) -> dict[int, list[dict]]:
    """Per cluster of ``clusters``, ``n`` of its assigned patches drawn at random (seeded by the
    cluster id, from the members in ``patch_id`` order), as patch rows with geometry and
    ``score``; members missing from the patch table are left out."""
    table = tables.assignments(["patch_id", "cluster"],
                               filter=pads.field("cluster").isin(pa.array(clusters, pa.int64())))  # fmt: skip
    if table is None:
        return {}
    cluster = table.column("cluster").to_numpy(zero_copy_only=False).astype(np.int64)
    ids = np.asarray(table.column("patch_id").to_pylist(), dtype=str)
    picked = {}
    for c in clusters:
        members = np.sort(ids[cluster == c])
        rng = np.random.default_rng([0, c])
        picked[c] = list(members[rng.choice(len(members), min(n, len(members)), replace=False)])
    lookup = tables.rows(sorted({i for rows in picked.values() for i in rows}), [score])
    return {c: [lookup[i] for i in rows if i in lookup] for c, rows in picked.items()}


def _random_pool(tables: _Tables, keys: list[int], n: int, score: str, *, kept_only: bool) -> dict[int, list[dict]]:
    """Per key (stratum, or -1), ``n`` patches drawn at random (seeded by the key) from the kept
    patches (``kept_only``) or all mined patches, as in ``_random_members``."""
    table = tables.patches(["patch_id", "kept"])
    if table is None:
        return {}
    ids = np.asarray(table.column("patch_id").to_pylist(), dtype=str)
    if kept_only:
        ids = ids[table.column("kept").to_numpy(zero_copy_only=False).astype(bool)]
    ids = np.sort(ids)
    picked = {}
    for key in keys:
        rng = np.random.default_rng([0, abs(key), key < 0])
        picked[key] = list(ids[rng.choice(len(ids), min(n, len(ids)), replace=False)])
    lookup = tables.rows(sorted({i for rows in picked.values() for i in rows}), [score])
    return {k: [lookup[i] for i in rows if i in lookup] for k, rows in picked.items()}


def _selection_section(run_dir: Path, manifest: dict, tables: _Tables) -> str:
    title = "## Selection\n\n"
    if not (run_dir / "select" / "selected.parquet").is_file():
        return title + "Not available: the `select` stage has not run."
    select_cfg = manifest.get("config", {}).get("select", {})
    counts = manifest.get("stages", {}).get("select", {}).get("counts") or {}
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
    got = []
    if counts.get("selected") is not None:
        of = f" of {_num(counts['available'])} available" if counts.get("available") is not None else ""
        budget = f" (budget {_num(counts['budget_patches'])})" if counts.get("budget_patches") is not None else ""
        got.append(f"{_num(counts['selected'])} patches selected{of}{budget}")
    if counts.get("pixel_fraction") is not None:
        got.append(f"pixel fraction of the corpus {counts['pixel_fraction']}")
    if counts.get("feature_mmd") is not None:
        got.append(f"feature MMD to the corpus {counts['feature_mmd']}")
    return title + (
        f"- method: `{select_cfg.get('method', 'unknown')}` (score `{select_cfg.get('score')}`)\n"
        f"- budget: {cfg_budget}\n"
        f"- result: {', '.join(got) or 'not recorded'}\n\n"
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
