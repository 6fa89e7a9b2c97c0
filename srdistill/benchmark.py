"""The distillation benchmark: how well does a budgeted training set train an SR network?

One corpus (by default the classic "291": T91 + BSD200), one network, the same number of
training steps for every arm, several seeds, evaluation on Set5/Set14/B100 with the standard
protocol. Arms:

* ``full``: every corpus image (no selection): the reference the others are measured against;
* ``random``: uniformly random patches;
* ``psnr_bic-topk`` / ``grad-topk``: the globally hardest patches by one score;
* ``clip-kmeans``: the pipeline's coreset (CLIP k-means groups, hardest first in each);
* ``synth``: SRDD's synthetic set: images sampled from the cluster-conditioned diffusion model
  fine-tuned on the kept patches (``cfg.finetune``, ``cfg.synthesize``), the same budget spent
  on ``finetune.resolution``-sided images;
* ``tripled``: TripleD's complexity-aware selection (ViT complexity strata, kernel herding on
  ViT features; ``cfg.complexity``, ``select.strata``) from every patch; ``tripled+align``: the
  same patches transformed by the alignment CNN (``cfg.align``); ``tripled+curriculum`` and
  ``tripled+align+curriculum``: those sets trained with the two-stage curriculum
  (``cfg.train.curriculum``, enabled for these arms only).

Every arm's set is also measured by its feature distance to the corpus: the squared MMD
between the ViT features of its images and of a sample of all patches
(``selection.subset_mmd``), when any ``tripled`` arm runs (the ViT scores every patch).

Budgets: a fraction of the corpus' HR pixels (``"1%"``, ``"5%"``) or SRDD's images per
cluster (``"ipc10"``: 10 x ``cluster.k`` patches). The selection arms draw from the same patch
table (mined once); ``clip-kmeans`` from the patches its keep rule kept. Every (arm, budget,
seed) result is saved as it finishes (``results/<training-config hash>/*.json``), so a killed
benchmark resumes, and a changed training setting never reuses old results.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from . import storage
from .config import RunConfig, SelectConfig
from .evaluation import evaluate, list_images, resolve_dataset
from .mining import read_patches
from .pipeline import run_pipeline, stage_config
from .selection import budget_patches, export_distilled, select_patches, subset_mmd
from .synthesis import image_name, per_cluster_counts, synthesize
from .training import load_checkpoint, resolve_device, train_sr

ARMS = ("full", "random", "psnr_bic-topk", "grad-topk", "clip-kmeans", "tripled", "tripled+align",
        "tripled+curriculum", "tripled+align+curriculum", "synth")  # fmt: skip
TRIPLED_ARMS = tuple(a for a in ARMS if a.startswith("tripled"))
_SELECT = {  # arm -> (selection method, score)
    "random": ("random", "psnr_bic"),
    "psnr_bic-topk": ("score-topk", "psnr_bic"),
    "grad-topk": ("score-topk", "grad"),
    "clip-kmeans": ("clip-kmeans", "psnr_bic"),
    "tripled": ("tripled", "psnr_bic"),
}


@dataclass(frozen=True)
class QualityBench:
    """What to run. ``cfg`` supplies mining, embedding, clustering and training settings
    (``cfg.train.iterations`` is the step budget of every arm, ``cfg.scale`` the scale)."""

    cfg: RunConfig
    corpus: tuple[str, ...] = ("T91", "BSD200")
    arms: tuple[str, ...] = ARMS
    budgets: tuple[str, ...] = ("1%", "5%", "ipc10")
    seeds: tuple[int, ...] = (0, 1, 2)
    datasets: tuple[str, ...] = ("Set5", "Set14", "B100")

    def __post_init__(self):
        bad = sorted(set(self.arms) - set(ARMS))
        if bad:
            raise ValueError(f"arms {bad} are not among {list(ARMS)}")
        for b in self.budgets:
            _parse_budget(b)


def _parse_budget(budget: str) -> dict:
    """``"5%"`` -> ``{"pixel_fraction": 0.05}``; ``"ipc10"`` -> ``{"ipc": 10}``.

    Raises:
        ValueError: anything else.
    """
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", budget):
        return {"pixel_fraction": float(m.group(1)) / 100}
    if m := re.fullmatch(r"ipc(\d+)", budget):
        return {"ipc": int(m.group(1))}
    raise ValueError(f"budget {budget!r} is neither a percentage of pixels ('5%') nor 'ipcN'")


def _link_corpus(names: tuple[str, ...], dest: Path) -> int:
    """Symlink every image of the named datasets (names or folders) into one folder ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in names:
        folder = resolve_dataset(name)
        prefix = folder.parent.name if folder.name == "HR" else folder.name
        for f in list_images(folder):
            link = dest / f"{prefix}_{f.name}"
            if not link.exists():
                link.symlink_to(f.resolve())
            n += 1
    return n


def run_quality_bench(
    bench: QualityBench,
    out: Path,
    *,
    map_fn: Callable[[Callable[[dict], dict], list[dict]], object] = lambda f, jobs: [f(j) for j in jobs],
    synth_map: Callable | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Run every (arm, budget, seed) not yet in ``out/results`` and return all results.

    ``map_fn(fn, jobs)`` runs ``train_and_evaluate`` over the pending jobs: in this process by
    default, in parallel Ray tasks with ``runner.map_tasks``. ``synth_map(model_dir, cfg,
    out_dir)`` makes the ``map_fn`` of ``synthesis.synthesize`` for the ``synth`` arm
    (``runner.synthesize_ray``: Ray Data actors); ``None`` samples in this process.

    Returns:
        One dict per run: ``arm``, ``budget``, ``seed``, ``patches`` (training images),
        ``pixel_fraction`` (of the corpus), ``psnr_y``/``ssim_y`` per dataset, ``clip_semantic``.
    """
    out = Path(out).resolve()
    n_images = _link_corpus(bench.corpus, out / "corpus")
    log(f"corpus: {n_images} images from {', '.join(bench.corpus)}")
    cfg = bench.cfg
    manifest = run_pipeline(out / "corpus", out / "pipeline", cfg, until="cluster", log=log)
    semantic = manifest.get("clip", {}).get("semantic")
    corpus_pixels = manifest["stages"]["mine"]["counts"]["corpus_pixels"]
    run_uri = str(out / "pipeline")
    patches = read_patches(storage.join(run_uri, "mine"))  # every patch, with its kept flag
    clusters = storage.read_dataset(storage.join(run_uri, "cluster", "assignments"), columns=["patch_id", "cluster"])
    kept = patches.filter(patches.column("kept")).join(clusters, "patch_id")
    every = patches.append_column("cluster", pa.array(np.full(patches.num_rows, -1, np.int32)))
    k_used = manifest["stages"]["cluster"]["counts"]["k_used"]
    if "synth" in bench.arms:  # fine-tune once on the same clusters; every budget samples from it
        synth_cfg = cfg.model_copy(update={"distill": "synth"})
        run_pipeline(out / "corpus", out / "pipeline", synth_cfg, until="finetune", log=log)
        # image i of cluster c depends only on (seed, c, i): sample the largest budget once and
        # give every budget its first n images per cluster
        synth_counts = {b: per_cluster_counts(budget_patches(
            SelectConfig(**_parse_budget(b)), n_clusters=k_used, corpus_pixels=corpus_pixels,
            patch_size=cfg.finetune.resolution), k_used) for b in bench.budgets}  # fmt: skip
        most = {c: max(counts[c] for counts in synth_counts.values()) for c in range(k_used)}
        pool = out / "sets" / f"synth_{_synth_tag(cfg)}"
        model_dir = out / "pipeline" / "finetune" / "model"
        sampler = synth_map(model_dir, cfg.synthesize, pool) if synth_map else None
        synthesize(model_dir, cfg.synthesize, pool, most, map_fn=sampler)

    tripled = TripledSets(cfg, out, run_uri, every, log) if set(bench.arms) & set(TRIPLED_ARMS) else None

    # results are kept per training setting: another step budget or network never reuses them
    # (execution-only fields such as the device or GPU use do not change the tag)
    train_part = json.dumps(stage_config(cfg, "train"), sort_keys=True)
    tag = hashlib.sha256(f"{train_part}|{bench.datasets}".encode()).hexdigest()[:10]
    (out / "results" / tag).mkdir(parents=True, exist_ok=True)
    jobs, set_mmd = [], {}
    for budget in bench.budgets:
        for arm in bench.arms:
            run_cfg, name = cfg, f"{arm}_{'all' if arm == 'full' else budget}"
            if arm == "full":
                if budget != bench.budgets[0]:
                    continue
                images, frac = sorted((out / "corpus").iterdir()), 1.0
            elif arm == "synth":
                counts = synth_counts[budget]
                images = [pool / image_name(c, i) for c, n in counts.items() for i in range(n)]
                frac = len(images) * cfg.finetune.resolution**2 / corpus_pixels
                name = f"{_synth_tag(cfg)}_{name}"  # another diffusion setting is another synthetic set
            elif arm in TRIPLED_ARMS:
                images, mmd = tripled.images(budget, k_used, corpus_pixels, align="align" in arm)
                frac = len(images) * cfg.mine.patch_size**2 / corpus_pixels
                if "curriculum" in arm:
                    curriculum = cfg.train.curriculum.model_copy(update={"enabled": True})
                    run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"curriculum": curriculum})})
                name = f"{tripled.tag(run_cfg, align='align' in arm)}_{name}"
                set_mmd[(arm, budget)] = mmd
            else:
                method, score = _SELECT[arm]
                sel_cfg = SelectConfig(method=method, score=score, seed=cfg.select.seed,
                                       max_overlap=cfg.select.max_overlap, **_parse_budget(budget))  # fmt: skip
                n_total = budget_patches(sel_cfg, n_clusters=k_used, corpus_pixels=corpus_pixels,
                                         patch_size=cfg.mine.patch_size)  # fmt: skip
                chosen = select_patches(kept if arm == "clip-kmeans" else every, sel_cfg, n_total=n_total)
                images = export_distilled(chosen, out / "sets" / f"{arm}_{budget}")
                frac = len(images) * cfg.mine.patch_size**2 / corpus_pixels
                if tripled is not None:
                    set_mmd[(arm, budget)] = tripled.mmd_of_patches(chosen.column("patch_id"))
            if arm == "synth" and tripled is not None:
                set_mmd[(arm, budget)] = tripled.mmd_of_images(images)
            for seed in bench.seeds:
                row = {"arm": arm, "budget": "all" if arm == "full" else budget, "seed": seed,
                       "patches": len(images), "pixel_fraction": frac, "clip_semantic": semantic,
                       "model": cfg.train.model, "iterations": cfg.train.iterations, "scale": cfg.scale}  # fmt: skip
                jobs.append({"row": row, "images": [str(p) for p in images], "cfg": run_cfg,
                             "datasets": bench.datasets, "out": str(out / "results" / tag / f"{name}_seed{seed}.json"),
                             "model_dir": str(out / "models" / tag / f"{name}_seed{seed}")})  # fmt: skip
    pending = [j for j in jobs if not Path(j["out"]).is_file()]
    log(f"[bench] {len(jobs)} runs, {len(pending)} to do")
    map_fn(train_and_evaluate, pending)
    results = [json.loads(Path(j["out"]).read_text()) for j in jobs]
    for r in results:  # properties of the set, measured in this run (older results lack them)
        r["feature_mmd"] = set_mmd.get((r["arm"], r["budget"]))
        r["vit_pretrained"] = tripled.source.pretrained if tripled else None
    return results


class TripledSets:
    """The ``tripled`` arms' sets and every set's feature distance to the corpus.

    Scores every patch with the ViT (the pipeline's ``complexity`` stage, run once), selects
    with ``select.method = tripled`` per budget, aligns the selection with ``cfg.align`` on
    request, and measures sets by ``selection.subset_mmd`` against the same corpus sample.
    """

    def __init__(self, cfg: RunConfig, out: Path, run_uri: str, every: pa.Table, log: Callable[[str], None]):
        from .complexity import attach_scores, feature_matrix, load_vit, read_scores, resolve_vit

        self.cfg = cfg.model_copy(update={"select": cfg.select.model_copy(update={"method": "tripled"})})
        self.out = out
        run_pipeline(out / "corpus", out / "pipeline", self.cfg, until="complexity", log=log)
        scores = read_scores(storage.join(run_uri, "complexity", "parts"))
        self.table = attach_scores(every, scores)
        self.features = feature_matrix(self.table)  # (N, D) float32, rows of self.table
        self.row_of = {pid: i for i, pid in enumerate(self.table.column("patch_id").to_pylist())}
        self.source = resolve_vit(cfg.complexity)
        self.vit = load_vit(self.source, cfg.complexity).to(resolve_device(cfg.align.device))
        self._sets: dict[tuple[str, bool], tuple[list[Path], float]] = {}

    def mmd_of_patches(self, patch_ids: pa.ChunkedArray) -> float:
        """``subset_mmd`` of the given patches' stored features."""
        rows = [self.row_of[p] for p in patch_ids.to_pylist()]
        return subset_mmd(self.features[rows], self.features, seed=self.cfg.select.seed)

    def mmd_of_images(self, images: list[Path]) -> float:
        """``subset_mmd`` of image files (aligned or synthetic sets), features from the ViT."""
        from .complexity import image_features

        return subset_mmd(image_features(self.vit, images), self.features, seed=self.cfg.select.seed)

    def images(self, budget: str, k_used: int, corpus_pixels: int, *, align: bool) -> tuple[list[Path], float]:
        """The tripled set of ``budget`` (aligned with ``cfg.align`` if ``align``) and its MMD,
        made once per run (the curriculum arms train on the same sets)."""
        if (budget, align) not in self._sets:
            self._sets[budget, align] = self._make(budget, k_used, corpus_pixels, align)
        return self._sets[budget, align]

    def _make(self, budget: str, k_used: int, corpus_pixels: int, align: bool) -> tuple[list[Path], float]:
        from .alignment import align_folder
        from .clustering import sample_rows

        sel_cfg = self.cfg.select.model_copy(update={"ipc": None, "pixel_fraction": None, **_parse_budget(budget)})
        # the same number of patches as every other arm: an IPC budget is ipc x the CLIP clusters
        n_total = budget_patches(sel_cfg, n_clusters=k_used, corpus_pixels=corpus_pixels,
                                 patch_size=self.cfg.mine.patch_size)  # fmt: skip
        chosen = select_patches(self.table, sel_cfg, n_total=n_total)
        folder = self.out / "sets" / f"tripled_{budget}"
        images = export_distilled(chosen, folder)
        if not align:
            return images, self.mmd_of_patches(chosen.column("patch_id"))
        aligned = self.out / "sets" / f"{self.tag(self.cfg, align=True)}_tripled+align_{budget}"
        if not (aligned / "align.json").is_file():
            target = sample_rows([self.features], len(self.features), self.cfg.align.corpus_features,
                                 self.cfg.align.seed)  # the pipeline's align stage takes the same sample
            align_folder(folder, aligned, target, lambda x: self.vit(x)[0], self.cfg.align)
        images = [aligned / p.name for p in images]
        return images, self.mmd_of_images(images)

    @staticmethod
    def tag(cfg: RunConfig, *, align: bool) -> str:
        """Hash of what a tripled arm's set and schedule depend on (complexity scoring, the
        tripled selection, the alignment if ``align``, the curriculum if enabled)."""
        parts = [stage_config(cfg, "complexity"),
                 cfg.select.model_dump(mode="json", include={"complexity_score", "strata", "max_overlap", "seed"})]
        if align:
            parts.append(cfg.align.model_dump(mode="json", exclude={"device"}))
        if cfg.train.curriculum.enabled:
            parts.append(cfg.train.curriculum.model_dump(mode="json"))
        return "t" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


def _synth_tag(cfg: RunConfig) -> str:
    """Hash of what the synthetic set depends on (fine-tuning and sampling settings, minus
    execution-only fields such as actor counts)."""
    parts = [stage_config(cfg, stage) for stage in ("finetune", "synthesize")]
    return "s" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


def train_and_evaluate(job: dict) -> dict:
    """One benchmark run: train ``job["cfg"].train`` (seeded) on ``job["images"]``, evaluate on
    ``job["datasets"]``, write the result row to ``job["out"]`` (atomically) and return it."""
    cfg: RunConfig = job["cfg"]
    train_cfg = cfg.train.model_copy(update={"seed": job["row"]["seed"]})
    model_path = train_sr(train_cfg, cfg.scale, job["images"], Path(job["model_dir"]), progress=False)
    model, _ = load_checkpoint(model_path)
    evals = {d: evaluate(model, d, cfg.scale, device=cfg.evaluate.device) for d in job["datasets"]}
    row = {**job["row"], "psnr_y": {d: e["psnr_y"] for d, e in evals.items()},
           "ssim_y": {d: e["ssim_y"] for d, e in evals.items()}}  # fmt: skip
    storage.write_json(job["out"], row)
    return row


def summarize(results: list[dict], datasets: tuple[str, ...]) -> list[dict]:
    """Mean and std over seeds per (arm, budget): ``psnr_y[dataset] = (mean, std)``, plus the
    gap to ``full`` and the gain over ``random`` at the same budget (dB, mean over datasets)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["arm"], r["budget"]), []).append(r)
    rows = []
    for (arm, budget), rs in groups.items():
        row = {"arm": arm, "budget": budget, "seeds": len(rs), "patches": rs[0]["patches"],
               "pixel_fraction": rs[0]["pixel_fraction"], "psnr_y": {}, "ssim_y": {}}  # fmt: skip
        for d in datasets:
            p = [r["psnr_y"][d] for r in rs]
            s = [r["ssim_y"][d] for r in rs]
            row["psnr_y"][d] = (statistics.mean(p), statistics.stdev(p) if len(p) > 1 else 0.0)
            row["ssim_y"][d] = (statistics.mean(s), statistics.stdev(s) if len(s) > 1 else 0.0)
        row["mean_psnr"] = statistics.mean(row["psnr_y"][d][0] for d in datasets)
        row["feature_mmd"] = rs[0].get("feature_mmd")
        rows.append(row)
    full = next((r["mean_psnr"] for r in rows if r["arm"] == "full"), None)
    random = {r["budget"]: r["mean_psnr"] for r in rows if r["arm"] == "random"}
    for r in rows:
        r["gap_to_full"] = r["mean_psnr"] - full if full is not None else None
        r["gain_over_random"] = r["mean_psnr"] - random[r["budget"]] if r["budget"] in random else None
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(rows, key=lambda r: (r["budget"] != "all", r["budget"], order[r["arm"]]))


def markdown_table(rows: list[dict], datasets: tuple[str, ...]) -> str:
    """The summary as a markdown table: PSNR mean +- std (dB) / SSIM mean per dataset, and the
    set's squared feature MMD to the corpus where measured."""
    mmd = any(r.get("feature_mmd") is not None for r in rows)
    head = ["arm", "budget", "patches", "% pixels", *datasets, "gap to full (dB)", "vs random (dB)"]
    head += ["MMD² to corpus"] * mmd
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["arm"], r["budget"], str(r["patches"]), f"{100 * r['pixel_fraction']:.2f}"]
        cells += [f"{r['psnr_y'][d][0]:.2f} ± {r['psnr_y'][d][1]:.2f} / {r['ssim_y'][d][0]:.4f}" for d in datasets]
        cells += [f"{v:+.2f}" if v is not None else "" for v in (r["gap_to_full"], r["gain_over_random"])]
        if mmd:
            cells.append(f"{r['feature_mmd']:.4f}" if r.get("feature_mmd") is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], datasets: tuple[str, ...], path: Path) -> None:
    """PSNR vs budget (% of corpus pixels, log axis) per arm, one panel per dataset; ``full``
    as a horizontal line. Error bars: std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for arm in ARMS:
            pts = sorted((100 * r["pixel_fraction"], *r["psnr_y"][d]) for r in rows if r["arm"] == arm)
            if not pts:
                continue
            if arm == "full":
                ax.axhline(pts[0][1], color="k", ls="--", label="full (100%)")
                continue
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=arm)
        ax.set_xscale("log")
        ticks = sorted({100 * r["pixel_fraction"] for r in rows if r["arm"] != "full"})
        ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training set, % of corpus pixels")
        ax.set_ylabel("PSNR on Y (dB)")
        ax.set_title(d)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
