"""The main job: mine -> embed -> cluster -> select -> train -> evaluate -> report
(``distill: coreset``), or mine -> embed -> cluster -> encode -> finetune -> synthesize ->
train -> evaluate -> report (``distill: synth``, SRDD's synthetic distilled set).

Each stage reads and writes the run directory (layout in docs/ARCHITECTURE.md). A stage's
fingerprint hashes its config (minus execution-only fields such as batch sizes and actor
counts) with the fingerprints of the stages it reads, and ``mine``'s also hashes the input
listing (path, size, mtime). A stage whose recorded fingerprint matches and whose outputs
exist is skipped, so a killed or repeated run resumes where it stopped; a stage that reruns
changes its fingerprint and so reruns everything downstream. A stage directory left by an
interrupted attempt with another fingerprint is cleared before the stage runs; the same
fingerprint is kept, so training resumes from its last checkpoint.

The manifest (``manifest.json``) records the resolved config, package versions, per-stage
fingerprint/counts/timings, every skipped input with its reason, and the CLIP provenance.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import RunConfig

STAGES = ("mine", "embed", "cluster", "select", "encode", "finetune", "synthesize", "train",
          "evaluate", "report")  # fmt: skip
SYNTH_ONLY = ("encode", "finetune", "synthesize")
#: Config fields that change how a stage runs but not what it produces (not fingerprinted).
EXECUTION_ONLY = {
    "mine": {"images_per_task"},
    "embed": {"batch_size", "num_actors", "actor_num_cpus", "num_threads", "device"},
    "train": {"device", "log_every", "checkpoint_every", "val_every", "val_dataset", "workers", "use_gpu"},
    "evaluate": {"device"},
    "encode": {"encode_batch_size", "device", "use_gpu"},
    "finetune": {"device", "log_every", "checkpoint_every", "encode_batch_size", "use_gpu", "workers",
                 "zero_stage"},
    "synthesize": {"batch_size", "num_actors", "actor_num_cpus", "device"},
}
_PACKAGES = ("srdistill", "torch", "ray", "faiss-cpu", "transformers", "diffusers", "deepspeed", "numpy",
             "pyarrow", "pillow")
NOT_SEMANTIC = "CLIP is randomly initialised (--allow-random-init): the clusters are NOT semantic"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


def write_parquet(path: Path, table: pa.Table) -> None:
    """Write a parquet file atomically (temp file then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class Run:
    """A run directory: its manifest, stage fingerprints and stage bookkeeping.

    Args:
        input_dir: the HR corpus (folder of images, searched recursively).
        run_dir: where artifacts go; created if missing.
        cfg: the resolved config.
        preset: preset name, recorded in the manifest.
        log: where progress lines go (``print`` by default).
    """

    def __init__(self, input_dir: str | Path, run_dir: str | Path, cfg: RunConfig, *,
                 preset: str | None = None, log: Callable[[str], None] = print):  # fmt: skip
        self.input = Path(input_dir).resolve()
        self.dir = Path(run_dir).resolve()
        self.cfg = cfg
        self.log = log
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "manifest.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        self.manifest = {
            "srdistill_version": package_versions()["srdistill"],
            "created": old.get("created", _now()),
            "updated": _now(),
            "input": str(self.input),
            "run_dir": str(self.dir),
            "preset": preset,
            "config": cfg.model_dump(mode="json"),
            "versions": package_versions(),
            "stages": old.get("stages", {}),
            "skipped_inputs": old.get("skipped_inputs", []),
        }
        if "clip" in old:
            self.manifest["clip"] = old["clip"]
        self.save()

    def save(self) -> None:
        write_json(self.dir / "manifest.json", self.manifest)

    def config_part(self, stage: str) -> str:
        part = json.loads(self.cfg.stage_json(stage))
        for key in EXECUTION_ONLY.get(stage, ()):
            part.pop(key, None)
        return json.dumps(part, sort_keys=True)

    def fingerprint(self, stage: str, *extra: str) -> str:
        return _sha(stage, self.config_part(stage), *extra)

    def is_done(self, stage: str, fingerprint: str, outputs: list[Path]) -> bool:
        entry = self.manifest["stages"].get(stage, {})
        return (
            entry.get("status") == "done"
            and entry.get("fingerprint") == fingerprint
            and all(p.exists() for p in outputs)
        )

    def run_stage(self, stage: str, fingerprint: str, outputs: list[Path],
                  fn: Callable[[Path], dict]) -> dict:  # fmt: skip
        """Run ``fn(stage_dir) -> counts`` unless the stage is done for ``fingerprint``."""
        if self.is_done(stage, fingerprint, outputs):
            entry = self.manifest["stages"][stage]
            entry["skipped"] = True
            self.log(f"[{stage}] up to date, skipped ({entry['fingerprint']})")
            self.save()
            return entry["counts"]
        sdir = self.dir / stage
        marker = sdir / ".fingerprint"
        if sdir.exists() and (not marker.is_file() or marker.read_text() != fingerprint):
            shutil.rmtree(sdir)  # leftovers of another config: never mix them in
        sdir.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint)
        self.manifest["stages"][stage] = {"status": "running", "fingerprint": fingerprint,
                                          "started_at": _now()}  # fmt: skip
        self.save()
        self.log(f"[{stage}] running")
        t0 = time.perf_counter()
        counts = fn(sdir)
        seconds = time.perf_counter() - t0
        self.manifest["stages"][stage] = {
            "status": "done", "fingerprint": fingerprint, "seconds": round(seconds, 3),
            "counts": counts, "finished_at": _now(), "skipped": False,
        }  # fmt: skip
        self.save()
        self.log(f"[{stage}] done in {seconds:.1f}s: {_short(counts)}")
        return counts


def _short(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, (dict, list)))


def _listing_digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------- stages


def _mine(run: Run) -> str:
    from . import mining, runner

    cfg = run.cfg.mine
    paths, ignored = mining.list_images(run.input, cfg.extensions)
    fp = run.fingerprint("mine", str(run.input), _listing_digest(paths))
    out = run.dir / "mine" / "patches.parquet"

    def stage(sdir: Path) -> dict:
        if not paths:
            raise FileNotFoundError(
                f"input {str(run.input)!r} holds no files with extensions {list(cfg.extensions)}"
            )
        t0 = time.perf_counter()
        mined = runner.mine_corpus(paths, cfg, root=str(run.input))
        seconds = time.perf_counter() - t0
        patches, skipped = mining.split_mined(mined)
        patches = mining.apply_keep_rule(patches, cfg)
        write_parquet(out, patches)
        run.manifest["skipped_inputs"] = skipped
        for s in skipped:
            run.log(f"[mine] skipped {s['file']}: {s['reason']}")
        pixels = mining.corpus_pixels(patches)
        return {
            "images_listed": len(paths),
            "other_files_ignored": ignored,
            "images_skipped": len(skipped),
            "images_mined": len(paths) - len(skipped),
            "patches": patches.num_rows,
            "patches_kept": int(pc.sum(patches.column("kept")).as_py() or 0),
            "corpus_pixels": pixels,
            "megapixels_per_s": round(pixels / 1e6 / max(seconds, 1e-9), 2),
        }

    run.run_stage("mine", fp, [out], stage)
    return fp


def _kept(run: Run) -> pa.Table:
    table = pq.read_table(run.dir / "mine" / "patches.parquet")
    return table.filter(table.column("kept"))


def _embed(run: Run, mine_fp: str, source) -> str:
    from . import runner

    cfg = run.cfg.embed
    run.manifest["clip"] = {
        "backend": source.backend, "model": source.model, "path": source.path,
        "pretrained": source.pretrained, "semantic": source.semantic, "note": source.note,
    }  # fmt: skip
    if not source.semantic:
        run.log(f"WARNING: {NOT_SEMANTIC}")
    fp = run.fingerprint("embed", mine_fp, str(source.path), str(source.pretrained))
    out = run.dir / "embed" / "embeddings.parquet"

    def stage(sdir: Path) -> dict:
        kept = _kept(run)
        if kept.num_rows == 0:
            raise RuntimeError("no patch passed the keep rule: loosen mine.threshold or use "
                               "mine.keep_rule=top_fraction")  # fmt: skip
        table = runner.embed_patches_ray(kept, cfg, source)
        write_parquet(out, table.sort_by("patch_id"))
        return {"patches": table.num_rows, "dim": table.schema.field("embedding").type.list_size,
                "pretrained": source.pretrained, "semantic": source.semantic}  # fmt: skip

    run.run_stage("embed", fp, [out], stage)
    return fp


def _cluster(run: Run, embed_fp: str) -> str:
    from .clustering import spherical_kmeans

    fp = run.fingerprint("cluster", embed_fp)
    out = run.dir / "cluster" / "assignments.parquet"

    def stage(sdir: Path) -> dict:
        table = pq.read_table(run.dir / "embed" / "embeddings.parquet")
        emb = table.column("embedding").combine_chunks()
        x = emb.values.to_numpy().reshape(len(emb), -1).astype(np.float32)
        res = spherical_kmeans(x, run.cfg.cluster)
        np.save(sdir / "centroids.npy", res.centroids)
        write_parquet(out, pa.table({"patch_id": table.column("patch_id"),
                                     "cluster": pa.array(res.assign, pa.int32()),
                                     "cos_sim": pa.array(res.cos_sim, pa.float32())}))  # fmt: skip
        sizes = np.bincount(res.assign, minlength=res.k_used)
        return {"k": run.cfg.cluster.k, "k_used": res.k_used, "n_train": res.n_train,
                "patches": len(x), "cluster_sizes": sizes.tolist()}  # fmt: skip

    run.run_stage("cluster", fp, [out], stage)
    return fp


def _select(run: Run, upstream_fp: str) -> str:
    from .selection import budget_patches, export_distilled, select_patches

    cfg = run.cfg.select
    fp = run.fingerprint("select", upstream_fp)
    out = run.dir / "select" / "selected.parquet"
    distilled = run.dir / "distilled"

    def stage(sdir: Path) -> dict:
        kept = _kept(run)
        if cfg.method == "clip-kmeans":
            assign = pq.read_table(run.dir / "cluster" / "assignments.parquet")
            kept = kept.join(assign.select(["patch_id", "cluster"]), "patch_id")
            n_clusters = run.manifest["stages"]["cluster"]["counts"]["k_used"]
        else:
            kept = kept.append_column("cluster", pa.array(np.full(kept.num_rows, -1, np.int32)))
            n_clusters = run.cfg.cluster.k  # IPC baselines take the same budget as clip-kmeans
        corpus = run.manifest["stages"]["mine"]["counts"]["corpus_pixels"]
        n_total = budget_patches(cfg, n_clusters=n_clusters, corpus_pixels=corpus,
                                 patch_size=run.cfg.mine.patch_size)  # fmt: skip
        selected = select_patches(kept, cfg, n_total=n_total)
        write_parquet(out, selected)
        if distilled.exists():
            shutil.rmtree(distilled)
        files = export_distilled(selected, distilled)
        size = run.cfg.mine.patch_size
        per_cluster = pc.value_counts(selected.column("cluster")).to_pylist()
        return {
            "method": cfg.method, "budget_patches": n_total, "selected": selected.num_rows,
            "available": kept.num_rows, "images_written": len(files),
            "pixel_fraction": round(selected.num_rows * size * size / max(corpus, 1), 6),
            "per_cluster": {str(d["values"]): d["counts"] for d in per_cluster},
        }  # fmt: skip

    run.run_stage("select", fp, [out, distilled / "provenance.csv"], stage)
    return fp


def _n_clusters(run: Run) -> int:
    return run.manifest["stages"]["cluster"]["counts"]["k_used"]


def _encode(run: Run, cluster_fp: str) -> str:
    from . import runner
    from .diffusion import encoded_spec

    cfg = run.cfg.finetune
    fp = run.fingerprint("encode", cluster_fp)
    meta_file = run.dir / "encode" / "meta.json"

    def stage(sdir: Path) -> dict:
        kept = _kept(run)
        assign = pq.read_table(run.dir / "cluster" / "assignments.parquet")
        table = kept.join(assign.select(["patch_id", "cluster"]), "patch_id").sort_by("patch_id")
        if cfg.max_patches is not None and table.num_rows > cfg.max_patches:
            rng = np.random.default_rng(cfg.seed)
            table = table.take(np.sort(rng.choice(table.num_rows, cfg.max_patches, replace=False)))
        shape, dtype = encoded_spec(cfg, run.cfg.mine.patch_size)
        # by source: the patches of one batch share their images (each decoded once per batch)
        table = table.sort_by([("source", "ascending"), ("y", "ascending"), ("x", "ascending")])
        n = runner.encode_patches_ray(table, cfg, sdir / "parts")
        write_json(meta_file, {"shape": list(shape), "dtype": dtype, "rows": n,
                               "num_clusters": _n_clusters(run), "backbone": cfg.resolved_backbone})
        return {"backbone": cfg.resolved_backbone, "patches": n, "sample_shape": list(shape),
                "dtype": dtype}  # fmt: skip

    run.run_stage("encode", fp, [meta_file], stage)
    return fp


def _finetune(run: Run, encode_fp: str) -> str:
    from . import runner
    from .diffusion import build_backbone, finetune, load_encoded

    cfg = run.cfg.finetune
    fp = run.fingerprint("finetune", encode_fp)
    model_dir = run.dir / "finetune" / "model"

    def stage(sdir: Path) -> dict:
        meta = json.loads((run.dir / "encode" / "meta.json").read_text())
        shape, k, parts = tuple(meta["shape"]), meta["num_clusters"], run.dir / "encode" / "parts"
        if cfg.workers:
            runner.finetune_ray(cfg, parts, sdir, num_clusters=k, shape=shape, dtype=meta["dtype"])
        else:
            data = load_encoded(parts, shape=shape, dtype=meta["dtype"])
            finetune(cfg, build_backbone(cfg, k), data, sdir)
        model = json.loads((model_dir / "backbone.json").read_text())
        log = [json.loads(x) for x in (sdir / "log.jsonl").read_text().splitlines()]
        return {"backbone": model["kind"], "trainable": model["trainable"],
                "parameters": model["source"]["parameters"],
                "trainable_parameters": model["source"]["trainable"],
                "num_clusters": k, "patches": meta["rows"], "iterations": cfg.iterations,
                "workers": cfg.workers, "deepspeed": cfg.workers > 0,
                "final_loss": log[-1]["loss"] if log else None, "source": model["source"]}  # fmt: skip

    run.run_stage("finetune", fp, [model_dir / "weights.safetensors"], stage)
    return fp


def _synthesize(run: Run, finetune_fp: str) -> str:
    from . import runner
    from .selection import budget_patches
    from .synthesis import per_cluster_counts, synthesize

    cfg = run.cfg.synthesize
    budget = run.cfg.select.model_dump(include={"ipc", "pixel_fraction"}) if cfg.ipc is None else {}
    fp = run.fingerprint("synthesize", finetune_fp, json.dumps(budget, sort_keys=True))
    out = run.dir / "synthesize" / "provenance.csv"

    def stage(sdir: Path) -> dict:
        k = _n_clusters(run)
        res = run.cfg.finetune.resolution
        corpus = run.manifest["stages"]["mine"]["counts"]["corpus_pixels"]
        if cfg.ipc is not None:
            counts = dict.fromkeys(range(k), cfg.ipc)
        else:
            n_total = budget_patches(run.cfg.select, n_clusters=k, corpus_pixels=corpus, patch_size=res)
            counts = per_cluster_counts(n_total, k)
        model_dir = run.dir / "finetune" / "model"
        rows = synthesize(model_dir, cfg, sdir, counts,
                          map_fn=runner.synthesize_ray(model_dir, cfg, sdir))  # fmt: skip
        return {"images": len(rows), "per_cluster": {str(c): n for c, n in counts.items()},
                "resolution": res, "sampler": cfg.sampler, "steps": cfg.steps,
                "guidance_scale": cfg.guidance_scale,
                "pixel_fraction": round(len(rows) * res * res / max(corpus, 1), 6)}  # fmt: skip

    run.run_stage("synthesize", fp, [out], stage)
    return fp


def _train_images(run: Run) -> list[Path]:
    folder = run.dir / ("synthesize" if run.cfg.distill == "synth" else "distilled")
    return sorted(folder.glob("*.png"))


def _train(run: Run, select_fp: str) -> str:
    from . import runner
    from .training import train_sr

    fp = run.fingerprint("train", select_fp)
    out = run.dir / "train" / "model.safetensors"

    def stage(sdir: Path) -> dict:
        images = _train_images(run)
        if run.cfg.train.workers:
            runner.train_ray(run.cfg.train, run.cfg.scale, images, sdir)
        else:
            train_sr(run.cfg.train, run.cfg.scale, images, sdir)
        return {"model": run.cfg.train.model, "scale": run.cfg.scale,
                "iterations": run.cfg.train.iterations, "train_images": len(images)}  # fmt: skip

    run.run_stage("train", fp, [out], stage)
    return fp


def _evaluate(run: Run, train_fp: str) -> dict:
    from .evaluation import evaluate, format_table
    from .training import load_checkpoint

    fp = run.fingerprint("evaluate", train_fp)
    out = run.dir / "evaluate" / "results.json"

    def stage(sdir: Path) -> dict:
        model, _ = load_checkpoint(run.dir / "train" / "model.safetensors")
        scale, device = run.cfg.scale, run.cfg.evaluate.device
        how = "synthetic" if run.cfg.distill == "synth" else run.cfg.select.method
        label = f"{run.cfg.train.model} ({how})"
        rows: dict[str, list[dict]] = {"bicubic": [], label: []}
        for ds in run.cfg.evaluate.datasets:
            rows["bicubic"].append(evaluate("bicubic", ds, scale))
            rows[label].append(evaluate(model, ds, scale, device=device))
        write_json(out, {"scale": scale, "rows": rows})
        return {f"{name} {r['dataset']}": round(r["psnr_y"], 3) for name, rs in rows.items() for r in rs}

    run.run_stage("evaluate", fp, [out], stage)
    rows = json.loads(out.read_text())["rows"]
    run.log(f"\nPSNR / SSIM on Y, x{run.cfg.scale}, border = scale\n" + format_table(rows))
    return rows


def run_pipeline(input_dir: str | Path, run_dir: str | Path, cfg: RunConfig, *,
                 preset: str | None = None, until: str | None = None,
                 log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Run the main job on the embedded default (local Ray) or the Ray cluster joined.

    Args:
        input_dir: folder of HR images (searched recursively).
        run_dir: run directory; an existing one is resumed.
        cfg: resolved config.
        preset: preset name, for the manifest.
        until: stop after this stage (one of ``STAGES``).

    Returns:
        The manifest (also in ``run_dir/manifest.json``).

    Raises:
        ValueError: unknown ``until``.
        FileNotFoundError: the input is not a folder or holds no images.
        embedding.MissingWeightsError: no CLIP weights and random init not allowed.
        diffusion.MissingBackboneError: ``distill: synth`` with a ``dit`` backbone whose
            directories are missing.
    """
    from . import runner
    from .report import write_report

    if until is not None and until not in STAGES:
        raise ValueError(f"until={until!r} is not one of {STAGES}")
    synth = cfg.distill == "synth"
    clusters = synth or cfg.select.method == "clip-kmeans"
    if until in ("embed", "cluster") and not clusters:
        raise ValueError(f"until={until!r}: select.method {cfg.select.method!r} runs no {until} stage")
    if (until in SYNTH_ONLY and not synth) or (until == "select" and synth):
        raise ValueError(f"until={until!r}: distill {cfg.distill!r} runs no {until} stage")
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"input {str(input_dir)!r} is not a directory")
    clip_source = None
    if clusters:
        from .embedding import resolve_clip

        clip_source = resolve_clip(cfg.embed)  # before any work: MissingWeightsError, with help
    if synth:
        from .diffusion import check_backbone

        check_backbone(cfg.finetune)  # before any work: MissingBackboneError, with help
    run = Run(input_dir, run_dir, cfg, preset=preset, log=log)
    steps: list[tuple[str, Callable[[str], str]]] = []
    if clip_source is not None:
        steps += [("embed", lambda f: _embed(run, f, clip_source)), ("cluster", lambda f: _cluster(run, f))]
    if synth:
        steps += [("encode", lambda f: _encode(run, f)), ("finetune", lambda f: _finetune(run, f)),
                  ("synthesize", lambda f: _synthesize(run, f))]  # fmt: skip
    else:
        steps.append(("select", lambda f: _select(run, f)))
    steps.append(("train", lambda f: _train(run, f)))
    runner.init_ray(cfg.ray)
    fp = _mine(run)
    done = ["mine"]
    for name, step in steps:
        if until in done:
            break
        fp = step(fp)
        done.append(name)
    if until not in done:
        _evaluate(run, fp)
    report = write_report(run.dir)
    run.manifest["stages"]["report"] = {"status": "done", "finished_at": _now(),
                                        "counts": {"path": str(report)}, "skipped": False}  # fmt: skip
    run.save()
    log(f"report: {report}")
    if "clip" in run.manifest and not run.manifest["clip"]["semantic"]:
        print(f"WARNING: {NOT_SEMANTIC}", file=sys.stderr)
    return run.manifest
