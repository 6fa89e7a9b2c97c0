"""The distillation benchmark: how well does a budgeted training set train an SR network?

One corpus (by default the classic "291": T91 + BSD200), one network, the same number of
training steps for every arm, evaluation on Set5/Set14/B100 with the standard protocol. Arms:

* ``full``: every corpus image (no selection): the reference the others are measured against;
* ``random``: patches drawn uniformly from every mined patch (no thinning, no ranking);
  ``random-thinned``: the same after overlap thinning (``select.max_overlap``, which ranks
  overlapping windows by ``psnr_bic`` and so is not uniform);
* ``psnr_bic-topk`` / ``grad-topk`` / ``proxy-topk``: the globally hardest patches by one score
  (``proxy_error``: a small SR network's error, ``srdistill.distill.proxy_error``);
* ``clip-kmeans``: the pipeline's coreset (CLIP k-means groups, hardest first in each);
* ``kcenter``: the k-center greedy coreset on pixel descriptors (``srdistill.distill.kcenter``);
  ``typiclust``: the most typical patch of each of the budget's k-means clusters of those
  descriptors, drawn from every mined patch as ``random`` (``srdistill.distill.typiclust``);
* ``stratified``: coverage-centric selection over ``proxy_error`` strata
  (``srdistill.distill.stratified``); ``hard-mix``: half the budget the highest-``grad`` patches, half
  uniform from the rest;
* ``tripled``: TripleD's complexity-aware selection (ViT complexity strata, kernel herding on
  ViT features; ``cfg.complexity``, ``select.strata``) from every patch; ``tripled+align``: the
  same patches transformed by the alignment CNN (``cfg.align``); ``tripled+curriculum`` and
  ``tripled+align+curriculum``: those sets trained with the two-stage curriculum
  (``cfg.train.curriculum``, enabled for these arms only);
* ``synth``: SRDD's synthetic set: images sampled from the cluster-conditioned diffusion model
  fine-tuned on the kept patches (``cfg.finetune``, ``cfg.synthesize``), the same budget spent
  on ``finetune.resolution``-sided images.

**Draws and seeds.** A stochastic arm's set is drawn ``draws`` times per budget (draw ``d``
adds ``d`` to the seed of its randomness: ``select.seed`` for the selectors, ``cluster.seed``
for ``clip-kmeans``' k-means, ``synthesize.seed`` for ``synth``); deterministic arms (``full``
and the ``-topk`` arms) have one set. Every set is trained once per training seed (the same
``seeds`` for all), so differences between arms are paired by training seed
(``paired_differences``), and their uncertainty covers the sets' randomness as well.

Budgets: a fraction of the corpus' HR pixels (``"1%"``, ``"5%"``) or SRDD's images per
cluster (``"ipc10"``: 10 x ``cluster.k`` patches). Every run is saved as it finishes, under a
key that hashes the training configuration, the evaluation sets, the seed and the training
set's content (file names and bytes, ``set_fingerprint``): a killed benchmark resumes, and
anything upstream that changes a set (mining, the CLIP weights, clustering, selection,
synthesis) or the training changes the key, so no stale result is ever reused. Each run
also records the PSNR on ``curve_dataset`` every ``curve_every`` steps (``curves``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from srdistill import storage
from srdistill.config import RunConfig, SelectConfig
from srdistill.distill.mining import read_patches
from srdistill.distill.selection import budget_patches, export_distilled, select_patches
from srdistill.distill.synthesis import image_name, per_cluster_counts, synthesize
from srdistill.run.pipeline import run_pipeline
from srdistill.run.rundir import stage_config
from srdistill.sr.device import resolve_device
from srdistill.sr.evaluation import evaluate, list_images, resolve_dataset
from srdistill.sr.training import load_checkpoint, train_sr

ARMS = ("full", "random", "random-thinned", "psnr_bic-topk", "grad-topk", "proxy-topk", "clip-kmeans",
        "kcenter", "typiclust", "stratified", "hard-mix", "tripled", "tripled+align", "tripled+curriculum",
        "tripled+align+curriculum", "synth")  # fmt: skip
TRIPLED_ARMS = tuple(a for a in ARMS if a.startswith("tripled"))
#: Selection arms: the ``SelectConfig`` fields each sets (the budget and seed are added per draw).
_SELECT: dict[str, dict] = {
    "random": dict(method="random", max_overlap=1.0),
    "random-thinned": dict(method="random"),
    "psnr_bic-topk": dict(method="score-topk", score="psnr_bic"),
    "grad-topk": dict(method="score-topk", score="grad"),
    "proxy-topk": dict(method="score-topk", score="proxy_error"),
    "clip-kmeans": dict(method="clip-kmeans", score="psnr_bic"),
    "kcenter": dict(method="kcenter", features="descriptor"),
    "typiclust": dict(method="typiclust", features="descriptor", max_overlap=1.0),  # from all patches, as random
    "stratified": dict(method="stratified", score="proxy_error"),
    "hard-mix": dict(method="hard-mix", score="grad", hard_fraction=0.5),
}
#: Arms with one set per budget (no randomness in how it is made).
DETERMINISTIC = ("full", "psnr_bic-topk", "grad-topk", "proxy-topk")


@dataclass(frozen=True)
class QualityBench:
    """What to run. ``cfg`` supplies mining, embedding, clustering and training settings
    (``cfg.train.iterations`` is the step budget of every arm, ``cfg.scale`` the scale).

    ``draws``: sets per stochastic arm and budget (>= 1); ``seeds``: training seeds of every
    set; ``curve_every``: steps between PSNR measurements on ``curve_dataset`` during training
    (a multiple of ``cfg.train.log_every``; ``None``: no curve).
    """

    cfg: RunConfig
    corpus: tuple[str, ...] = ("T91", "BSD200")
    arms: tuple[str, ...] = ARMS
    budgets: tuple[str, ...] = ("1%", "5%", "ipc10")
    seeds: tuple[int, ...] = (0, 1)
    draws: int = 5
    datasets: tuple[str, ...] = ("Set5", "Set14", "B100")
    curve_every: int | None = None
    curve_dataset: str = "Set5"

    def __post_init__(self):
        bad = sorted(set(self.arms) - set(ARMS))
        if bad:
            raise ValueError(f"arms {bad} are not among {list(ARMS)}")
        for b in self.budgets:
            _parse_budget(b)
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        if self.curve_every is not None and (self.curve_every < 1 or self.curve_every % self.cfg.train.log_every):
            raise ValueError(f"curve_every {self.curve_every} must be a positive multiple of train.log_every "
                             f"({self.cfg.train.log_every})")  # fmt: skip

    def train_cfg(self) -> RunConfig:
        """``cfg`` with the curve measurement switched on in its training settings."""
        if self.curve_every is None:
            return self.cfg
        train = self.cfg.train.model_copy(update={"val_every": self.curve_every, "val_dataset": self.curve_dataset})
        return self.cfg.model_copy(update={"train": train})


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


def set_fingerprint(images: list[Path]) -> str:
    """SHA-256 (hex, 64 characters) of a training set's content: every file's name and bytes, in
    name order. Two sets with the same fingerprint train the same network (same config and seed).

    Raises:
        OSError: a file cannot be read.
    """
    h = hashlib.sha256()
    for p in sorted(map(Path, images), key=lambda p: p.name):
        h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _draw_cfg(cfg: RunConfig, draw: int) -> RunConfig:
    """``cfg`` with ``draw`` added to the seeds of the sets' randomness."""
    return cfg.model_copy(update={
        "select": cfg.select.model_copy(update={"seed": cfg.select.seed + draw}),
        "cluster": cfg.cluster.model_copy(update={"seed": cfg.cluster.seed + draw}),
        "synthesize": cfg.synthesize.model_copy(update={"seed": cfg.synthesize.seed + draw}),
    })  # fmt: skip


class _Sets:
    """Makes each arm's training set for a (budget, draw); shared state of one benchmark run."""

    def __init__(self, bench: QualityBench, out: Path, log: Callable[[str], None], synth_map: Callable | None):
        self.bench, self.cfg, self.out, self.log, self.synth_map = bench, bench.cfg, out, log, synth_map
        cfg = self.cfg
        # CLIP clusters only where an arm or an IPC budget needs them
        clusters = {"clip-kmeans", "synth"} & set(bench.arms) or any("ipc" in b for b in bench.budgets)
        manifest = run_pipeline(out / "corpus", out / "pipeline", cfg, until="cluster" if clusters else "mine", log=log)
        self.semantic = manifest.get("clip", {}).get("semantic")
        self.corpus_pixels = manifest["stages"]["mine"]["counts"]["corpus_pixels"]
        self.k_used = manifest["stages"]["cluster"]["counts"]["k_used"] if clusters else 1
        self.run_uri = str(out / "pipeline")
        patches = read_patches(storage.join(self.run_uri, "mine"))  # every patch, with its kept flag
        self.kept = patches.filter(patches.column("kept"))
        self.every = patches.append_column("cluster", pa.array(np.full(patches.num_rows, -1, np.int32)))
        if {"proxy-topk", "stratified"} & set(bench.arms):
            self.every = self._with_proxy_error(self.every)
        self._embeddings = None
        tripled = set(bench.arms) & set(TRIPLED_ARMS)
        self._tripled = TripledSets(cfg, out, self.run_uri, self.every, log) if tripled else None
        #: whether the ViT of the tripled arms has learned weights (None: no tripled arm)
        self.vit_pretrained = self._tripled.source.pretrained if tripled else None
        self._synth_model = None

    def _with_proxy_error(self, table: pa.Table) -> pa.Table:
        """``table`` with the ``proxy_error`` column, computed once per mining and proxy setting."""
        from srdistill.distill.proxy_error import attach_proxy_error, proxy_error_scores

        cfg = self.cfg
        key = hashlib.sha256(json.dumps([stage_config(cfg, "mine"), cfg.scale, cfg.select.proxy.model_dump(
            mode="json", exclude={"device"})], sort_keys=True).encode()).hexdigest()[:12]  # fmt: skip
        path = self.out / "scores" / f"proxy_error_{key}.parquet"
        if path.is_file():
            scores = storage.read_parquet(str(path))
        else:
            self.log(f"[bench] proxy error of {table.num_rows} patches")
            values = proxy_error_scores(table, cfg.scale, cfg.select.proxy)
            scores = pa.table({"patch_id": table.column("patch_id"), "proxy_error": pa.array(values, pa.float32())})
            storage.write_parquet(str(path), scores)
        by_id = dict(zip(scores.column("patch_id").to_pylist(), scores.column("proxy_error").to_pylist()))
        return attach_proxy_error(table, np.array([by_id[p] for p in table.column("patch_id").to_pylist()],
                                                  np.float32))  # fmt: skip

    def _clusters(self, cfg: RunConfig) -> pa.Table:
        """Cluster assignments of the kept patches with ``cfg.cluster`` (its seed per draw)."""
        from srdistill.distill.clustering import cluster_embeddings

        if self._embeddings is None:
            uri = storage.join(self.run_uri, "embed", "parts")
            table = storage.read_dataset(uri, columns=["patch_id", "embedding"])
            emb = table.column("embedding").combine_chunks()
            x = emb.values.to_numpy().reshape(len(emb), emb.type.list_size).astype(np.float32)
            self._embeddings = (table.column("patch_id"), x)
        ids, x = self._embeddings
        result = cluster_embeddings(x, cfg.cluster)
        return pa.table({"patch_id": ids, "cluster": pa.array(result.assign, pa.int32())})

    def images(self, arm: str, budget: str, draw: int) -> tuple[list[Path], str]:
        """The training images of ``arm`` at ``budget``, draw ``draw``, and the set's name."""
        cfg, name = _draw_cfg(self.cfg, draw), f"{arm}_{budget}_d{draw}"
        if arm == "full":
            return sorted((self.out / "corpus").iterdir()), "full"
        if arm == "synth":
            return self._synth(cfg, budget), name
        if arm in TRIPLED_ARMS:
            return self._tripled.images(cfg, budget, self.k_used, self.corpus_pixels, align="align" in arm), name
        sel_cfg = SelectConfig.model_validate({**cfg.select.model_dump(), "ipc": None, "pixel_fraction": None,
                                               **_SELECT[arm], **_parse_budget(budget)})  # fmt: skip
        n_total = budget_patches(sel_cfg, n_clusters=self.k_used, corpus_pixels=self.corpus_pixels,
                                 patch_size=cfg.mine.patch_size)  # fmt: skip
        table = self.kept.join(self._clusters(cfg), "patch_id") if arm == "clip-kmeans" else self.every
        return export_distilled(select_patches(table, sel_cfg, n_total=n_total), self.out / "sets" / name), name

    def _synth(self, cfg: RunConfig, budget: str) -> list[Path]:
        """SRDD's synthetic set: the model is fine-tuned once; each draw samples with its own seed
        the largest budget, and a budget takes its first n images per cluster (image i of
        cluster c depends only on (seed, c, i))."""
        if self._synth_model is None:
            run_pipeline(self.out / "corpus", self.out / "pipeline", self.cfg.model_copy(update={"distill": "synth"}),
                         until="finetune", log=self.log)  # fmt: skip
            self._synth_model = self.out / "pipeline" / "finetune" / "model"
        counts = {b: per_cluster_counts(budget_patches(
            SelectConfig(**_parse_budget(b)), n_clusters=self.k_used, corpus_pixels=self.corpus_pixels,
            patch_size=cfg.finetune.resolution), self.k_used) for b in self.bench.budgets}  # fmt: skip
        most = {c: max(n[c] for n in counts.values()) for c in range(self.k_used)}
        pool = self.out / "sets" / f"synth_{_synth_tag(cfg)}"
        sampler = self.synth_map(self._synth_model, cfg.synthesize, pool) if self.synth_map else None
        synthesize(self._synth_model, cfg.synthesize, pool, most, map_fn=sampler)
        return [pool / image_name(c, i) for c, n in counts[budget].items() for i in range(n)]


def run_quality_bench(
    bench: QualityBench,
    out: Path,
    *,
    map_fn: Callable[[Callable[[dict], dict], list[dict]], object] = lambda f, jobs: [f(j) for j in jobs],
    synth_map: Callable | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Run every (arm, budget, draw, seed) not yet in ``out/results`` and return all results.

    ``map_fn(fn, jobs)`` runs ``train_and_evaluate`` over the pending jobs: in this process by
    default, in parallel Ray tasks with ``runner.map_tasks``. ``synth_map(model_dir, cfg,
    out_dir)`` makes the ``map_fn`` of ``synthesis.synthesize`` for the ``synth`` arm
    (``runner.synthesize_ray``: Ray Data actors); ``None`` samples in this process.

    Returns:
        One dict per run: ``arm``, ``budget``, ``draw``, ``seed``, ``patches`` (training
        images), ``pixel_fraction`` (of the corpus), ``set`` (``set_fingerprint``),
        ``psnr_y``/``ssim_y`` per dataset, ``curve`` (``[[step, PSNR], ...]`` on the curve
        set), ``train_s`` (training wall time), ``clip_semantic``, ``vit_pretrained``.
    """
    out = Path(out).resolve()
    n_images = _link_corpus(bench.corpus, out / "corpus")
    log(f"corpus: {n_images} images from {', '.join(bench.corpus)}")
    sets = _Sets(bench, out, log, synth_map)
    cfg = bench.train_cfg()
    jobs = []
    for budget in bench.budgets:
        for arm in bench.arms:
            if arm == "full" and budget != bench.budgets[0]:
                continue
            run_cfg = cfg
            if "curriculum" in arm:
                curriculum = cfg.train.curriculum.model_copy(update={"enabled": True})
                run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"curriculum": curriculum})})
            # execution-only fields such as the device do not change the key
            train_part = json.dumps([stage_config(run_cfg, "train"), list(bench.datasets)], sort_keys=True)
            for draw in range(1 if arm in DETERMINISTIC else bench.draws):
                images, name = sets.images(arm, budget, draw)
                size = cfg.finetune.resolution if arm == "synth" else cfg.mine.patch_size
                fingerprint = set_fingerprint(images)
                frac = 1.0 if arm == "full" else len(images) * size**2 / sets.corpus_pixels
                for seed in bench.seeds:
                    key = hashlib.sha256(f"{train_part}|{fingerprint}|{seed}".encode()).hexdigest()[:16]
                    row = {"arm": arm, "budget": "all" if arm == "full" else budget, "draw": draw, "seed": seed,
                           "patches": len(images), "pixel_fraction": frac, "set": fingerprint,
                           "clip_semantic": sets.semantic, "model": cfg.train.model, "iterations": cfg.train.iterations,
                           "scale": cfg.scale}  # fmt: skip
                    jobs.append({"row": row, "images": [str(p) for p in images], "cfg": run_cfg,
                                 "datasets": bench.datasets, "out": str(out / "results" / f"{name}_s{seed}_{key}.json"),
                                 "model_dir": str(out / "models" / f"{name}_s{seed}_{key}")})  # fmt: skip
    pending = [j for j in jobs if not Path(j["out"]).is_file()]
    log(f"[bench] {len(jobs)} runs, {len(pending)} to do")
    map_fn(train_and_evaluate, pending)
    results = [json.loads(Path(j["out"]).read_text()) for j in jobs]
    return [{**r, "vit_pretrained": sets.vit_pretrained} for r in results]


class TripledSets:
    """The ``tripled`` arms' sets: scores every patch with the ViT (the pipeline's
    ``complexity`` stage, run once), selects with ``select.method = tripled`` per budget and
    draw, and aligns the selection with ``cfg.align`` on request."""

    def __init__(self, cfg: RunConfig, out: Path, run_uri: str, every: pa.Table, log: Callable[[str], None]):
        from srdistill.distill.complexity import attach_scores, feature_matrix, read_scores, resolve_vit

        self.cfg = cfg.model_copy(update={"select": cfg.select.model_copy(update={"method": "tripled"})})
        self.out = out
        run_pipeline(out / "corpus", out / "pipeline", self.cfg, until="complexity", log=log)
        self.table = attach_scores(every, read_scores(storage.join(run_uri, "complexity", "parts")))
        self.features = feature_matrix(self.table)  # (N, D) float32, rows of self.table
        self.source = resolve_vit(cfg.complexity)
        self._vit = None

    def images(self, cfg: RunConfig, budget: str, k_used: int, corpus_pixels: int, *, align: bool) -> list[Path]:
        """The tripled set of ``budget`` with ``cfg.select.seed`` (aligned with ``cfg.align`` if
        ``align``); the curriculum arms train on the same sets."""
        from srdistill.distill.alignment import align_folder
        from srdistill.distill.clustering import sample_rows

        sel_cfg = self.cfg.select.model_copy(update={"ipc": None, "pixel_fraction": None, "seed": cfg.select.seed,
                                                     **_parse_budget(budget)})  # fmt: skip
        # the same number of patches as every other arm: an IPC budget is ipc x the CLIP clusters
        n_total = budget_patches(sel_cfg, n_clusters=k_used, corpus_pixels=corpus_pixels,
                                 patch_size=self.cfg.mine.patch_size)  # fmt: skip
        folder = self.out / "sets" / f"tripled_{budget}_s{sel_cfg.seed}"
        images = export_distilled(select_patches(self.table, sel_cfg, n_total=n_total), folder)
        if not align:
            return images
        aligned = self.out / "sets" / f"{self.tag(self.cfg)}_tripled+align_{budget}_s{sel_cfg.seed}"
        if not (aligned / "align.json").is_file():
            if self._vit is None:
                from srdistill.distill.complexity import load_vit

                self._vit = load_vit(self.source, self.cfg.complexity).to(resolve_device(self.cfg.align.device))
            target = sample_rows([self.features], len(self.features), self.cfg.align.corpus_features,
                                 self.cfg.align.seed)  # the pipeline's align stage takes the same sample
            align_folder(folder, aligned, target, lambda x: self._vit(x)[0], self.cfg.align)
        return [aligned / p.name for p in images]

    @staticmethod
    def tag(cfg: RunConfig) -> str:
        """Hash of what an aligned set depends on besides the selection (complexity scoring and
        the alignment settings)."""
        parts = [stage_config(cfg, "complexity"), cfg.align.model_dump(mode="json", exclude={"device"})]
        return "t" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


def _synth_tag(cfg: RunConfig) -> str:
    """Hash of what the synthetic set depends on (fine-tuning and sampling settings, minus
    execution-only fields such as actor counts)."""
    parts = [stage_config(cfg, stage) for stage in ("finetune", "synthesize")]
    return "s" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


def train_and_evaluate(job: dict) -> dict:
    """One benchmark run: train ``job["cfg"].train`` (seeded) on ``job["images"]``, evaluate on
    ``job["datasets"]``, write the result row to ``job["out"]`` (atomically) and return it.
    The row gains ``psnr_y``/``ssim_y`` per dataset, ``curve`` (the ``val_psnr_y`` of the
    training log, ``[[step, dB], ...]``) and ``train_s`` (seconds of training)."""
    cfg: RunConfig = job["cfg"]
    train_cfg = cfg.train.model_copy(update={"seed": job["row"]["seed"]})
    start = time.perf_counter()
    model_path = train_sr(train_cfg, cfg.scale, job["images"], Path(job["model_dir"]), progress=False)
    seconds = time.perf_counter() - start
    model, _ = load_checkpoint(model_path)
    evals = {d: evaluate(model, d, cfg.scale, device=cfg.evaluate.device) for d in job["datasets"]}
    log_rows = [json.loads(line) for line in (Path(job["model_dir"]) / "log.jsonl").read_text().splitlines()]
    curve = [[r["step"], r["val_psnr_y"]] for r in log_rows if "val_psnr_y" in r]
    row = {**job["row"], "psnr_y": {d: e["psnr_y"] for d, e in evals.items()},
           "ssim_y": {d: e["ssim_y"] for d, e in evals.items()}, "curve": curve,
           "train_s": round(seconds, 1)}  # fmt: skip
    storage.write_json(job["out"], row)
    return row


# --------------------------------------------------------------------------- statistics


def _t_interval(diffs: list[float], level: float = 0.95) -> dict:
    """Mean, ``level`` Student-t confidence interval and two-sided p-value (H0: mean 0) of
    ``diffs``; interval and p are None for fewer than 2 values."""
    from scipy import stats

    n, mean = len(diffs), statistics.mean(diffs)
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "p": None, "n": n}
    sd = statistics.stdev(diffs)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else (0.0 if mean else 1.0)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "p": p, "n": n}


def _score(r: dict, datasets: tuple[str, ...]) -> float:
    return statistics.mean(r["psnr_y"][d] for d in datasets)


def paired_differences(arm_runs: list[dict], ref_runs: list[dict], datasets: tuple[str, ...]) -> list[float]:
    """Differences of the mean PSNR over ``datasets`` (dB), ``arm - reference``, paired by
    training seed: one value per independent unit.

    Each run is one (draw, seed). Per draw, the runs' scores are averaged over the seeds both
    sides have. Both stochastic: draw i of the arm is paired with draw i of the reference
    (independent sets, same seeds); one side deterministic (one set): its seed-paired
    difference to each draw of the other; both deterministic: one value per seed.

    Raises:
        ValueError: the two sides share no training seed.
    """
    seeds = sorted({r["seed"] for r in arm_runs} & {r["seed"] for r in ref_runs})
    if not seeds:
        raise ValueError("the arm and its reference share no training seed")

    def by_draw(runs: list[dict]) -> list[dict[int, float]]:
        draws: dict[int, dict[int, float]] = {}
        for r in runs:
            if r["seed"] in seeds:
                draws.setdefault(r["draw"], {})[r["seed"]] = _score(r, datasets)
        return [draws[d] for d in sorted(draws) if len(draws[d]) == len(seeds)]

    a, b = by_draw(arm_runs), by_draw(ref_runs)
    if len(a) == 1 and len(b) == 1:
        return [a[0][s] - b[0][s] for s in seeds]
    if len(a) == 1 or len(b) == 1:
        pairs = [(a[0], x) for x in b] if len(a) == 1 else [(x, b[0]) for x in a]
    else:
        pairs = list(zip(a, b))
    return [statistics.mean(x[s] - y[s] for s in seeds) for x, y in pairs]


def _holm(ps: list[float | None], alpha: float = 0.05) -> list[bool]:
    """Holm-Bonferroni: which of the p-values are significant at family-wise ``alpha``."""
    valid = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    significant = [False] * len(ps)
    for rank, (p, i) in enumerate(valid):
        if p > alpha / (len(valid) - rank):
            break
        significant[i] = True
    return significant


def summarize(results: list[dict], datasets: tuple[str, ...]) -> list[dict]:
    """One row per (arm, budget): ``draws``, ``seeds``, ``runs``, ``patches``,
    ``pixel_fraction``, ``psnr_y[dataset] = (mean, std)`` and ``ssim_y`` over all runs,
    ``mean_psnr`` (mean over datasets), and the paired differences ``vs_full`` and
    ``vs_random`` (same budget) as ``{"mean", "lo", "hi", "p", "n", "significant"}`` (dB, 95%
    t-interval; ``significant``: Holm-corrected over the arms of a budget at 5%)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["arm"], r["budget"]), []).append(r)
    rows = []
    for (arm, budget), rs in groups.items():
        row = {"arm": arm, "budget": budget, "draws": len({r["draw"] for r in rs}),
               "seeds": len({r["seed"] for r in rs}), "runs": len(rs), "patches": rs[0]["patches"],
               "pixel_fraction": rs[0]["pixel_fraction"], "psnr_y": {}, "ssim_y": {}}  # fmt: skip
        for d in datasets:
            for metric in ("psnr_y", "ssim_y"):
                v = [r[metric][d] for r in rs]
                row[metric][d] = (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
        row["mean_psnr"] = statistics.mean(row["psnr_y"][d][0] for d in datasets)
        for ref, ref_key in (("full", ("full", "all")), ("random", ("random", budget))):
            if ref_key in groups and (arm, budget) != ref_key:
                row[f"vs_{ref}"] = _t_interval(paired_differences(rs, groups[ref_key], datasets))
            else:
                row[f"vs_{ref}"] = None
        rows.append(row)
    for ref in ("full", "random"):
        for budget in {r["budget"] for r in rows}:
            same = [r for r in rows if r["budget"] == budget and r[f"vs_{ref}"]]
            for r, sig in zip(same, _holm([r[f"vs_{ref}"]["p"] for r in same])):
                r[f"vs_{ref}"]["significant"] = sig
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(rows, key=lambda r: (r["budget"] != "all", r["budget"], order[r["arm"]]))


def _fmt_diff(d: dict | None) -> str:
    if d is None:
        return ""
    if d["lo"] is None:
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" + (" *" if d.get("significant") else "")


def markdown_table(rows: list[dict], datasets: tuple[str, ...]) -> str:
    """The summary as a markdown table: PSNR mean +- std over all runs (dB) / SSIM mean per
    dataset, and the paired differences to ``full`` and ``random`` with their 95% intervals
    (``*``: significant, Holm-corrected)."""
    head = ["arm", "budget", "patches", "% pixels", "sets x seeds", *datasets,
            "vs full (dB) [95% CI]", "vs random (dB) [95% CI]"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["arm"], r["budget"], str(r["patches"]), f"{100 * r['pixel_fraction']:.2f}",
                 f"{r['draws']} x {r['seeds']}"]  # fmt: skip
        cells += [f"{r['psnr_y'][d][0]:.2f} ± {r['psnr_y'][d][1]:.2f} / {r['ssim_y'][d][0]:.4f}" for d in datasets]
        cells += [_fmt_diff(r["vs_full"]), _fmt_diff(r["vs_random"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- training curves


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    """The mean over runs of their ``curve`` (``[[step, PSNR dB], ...]``) at the steps every
    run measured, as ``[(step, mean PSNR dB), ...]`` in step order; ``[]`` for no runs."""
    steps = sorted(set.intersection(*(set(s for s, _ in r["curve"]) for r in runs))) if runs else []
    return [(s, statistics.mean(dict(map(tuple, r["curve"]))[s] for r in runs)) for s in steps]


def curves(results: list[dict], budget: str, bicubic: float, *, share: float = 0.95) -> list[dict]:
    """Training-time view at ``budget``: for ``full``, ``random`` and the selection arm with the
    highest mean PSNR, the mean curve and the first measured step at which it reaches
    ``bicubic + share * (full's final - bicubic)`` on the curve set (``None``: never).

    Args:
        bicubic: the curve set's bicubic PSNR (dB).

    Raises:
        ValueError: ``full`` has no curve.
    """
    full = [r for r in results if r["arm"] == "full" and r.get("curve")]
    if not full:
        raise ValueError("the full arm has no training curve (run with curve_every)")
    target = bicubic + share * (mean_curve(full)[-1][1] - bicubic)
    at = [r for r in results if r["budget"] == budget and r.get("curve")]
    means = {a: statistics.mean(r["curve"][-1][1] for r in at if r["arm"] == a) for a in {r["arm"] for r in at}}
    best = max((a for a in means if a != "random"), key=means.get, default=None)
    out = []
    for arm, runs in (("full", full), *((a, [r for r in at if r["arm"] == a]) for a in ("random", best) if a)):
        curve = mean_curve(runs)
        reach = next((s for s, v in curve if v >= target), None)
        out.append({"arm": arm, "budget": "all" if arm == "full" else budget, "curve": curve,
                    "steps_to_target": reach, "target": target})  # fmt: skip
    return out


def plot(rows: list[dict], datasets: tuple[str, ...], path: Path, curve_rows: list[dict] | None = None) -> None:
    """PSNR vs budget (% of corpus pixels, log axis) per arm, one panel per dataset, ``full``
    as a horizontal line, error bars the std over runs; with ``curve_rows`` (``curves``) a last
    panel of PSNR vs training step and the 95% target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(datasets) + bool(curve_rows)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
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
    axes[0][0].legend(fontsize=7)
    if curve_rows:
        ax = axes[0][-1]
        for c in curve_rows:
            steps, psnr = zip(*c["curve"])
            ax.plot(steps, psnr, marker=".", label=f"{c['arm']} ({c['budget']})")
        ax.axhline(curve_rows[0]["target"], color="gray", ls=":", label="95% of full's gain")
        ax.set_xlabel("training step")
        ax.set_ylabel("PSNR on Y (dB), curve set")
        ax.set_title("training time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
