"""The main job: plan -> mine -> embed -> cluster -> select -> train -> evaluate -> report
(``distill: coreset``; ``select.method: tripled`` scores complexity instead of embedding and
clustering: plan -> mine -> complexity -> select -> ..., and ``align.enabled`` adds the
complexity stage to any coreset method), or plan -> mine -> embed -> cluster -> encode -> finetune -> synthesize
-> train -> evaluate -> report (``distill: synth``, SRDD's synthetic distilled set).

Input and run directory are local paths or ``s3://`` URIs (``storage``). Each stage reads and
writes the run directory (layout in docs/ARCHITECTURE.md). The large, partitioned outputs
(``mine/patches/``, ``embed/parts/``, ``cluster/assignments/``) are written straight to the
run URI, one atomic part per shard, by the Ray workers that produce them. The other stages
work in a local mirror of the run directory (the run directory itself when it is local; under
``$SRDISTILL_CACHE`` or ``~/.cache/srdistill/runs`` for S3) and upload their stage folder when
they finish; a driver that starts on a fresh machine downloads what it needs from the run URI.

The run directory's bookkeeping (fingerprints that make a rerun resume, verified parts, the
manifest) is ``rundir.Run``; this module runs the stages through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from srdistill import storage
from srdistill.config import FEATURE_METHODS, RunConfig
from srdistill.run.rundir import STAGES, SYNTH_ONLY, Run, needs_clip, needs_vit, short_sha, stage_chain, utc_now

#: Skipped inputs listed in the manifest (all of them are in ``mine/skipped.parquet``).
MAX_SKIPPED_LISTED = 1000
NOT_SEMANTIC = "CLIP is randomly initialised (--allow-random-init): the clusters are NOT semantic"
NOT_LEARNED = ("the ViT is randomly initialised (--allow-random-init): complexity scores and ViT "
               "features are NOT learned")  # fmt: skip
#: Corpus features sampled as the reference of the select stage's ``feature_mmd``.
FEATURE_MMD_SAMPLE = 4096


@contextlib.contextmanager
def _written_now(parts_uri: str):
    """``[n]``, set on leaving to the parts below ``parts_uri`` that were not there on entry: the
    shards done by this run of a stage, whether or not the task that wrote one was retried
    after (a retry finds its part and skips it)."""
    before, now = set(storage.part_files(parts_uri)), [0]
    yield now
    now[0] = len(set(storage.part_files(parts_uri)) - before)


@contextlib.contextmanager
def _named_unreadable():
    """Re-raise a Ray worker's failure on an unreadable part (``storage.UnreadableFileError``,
    wrapped by Ray in a multi-line ``RayTaskError``) as that error's one line."""
    try:
        yield
    except storage.UnreadableFileError:
        raise
    except Exception as exc:
        found = re.search(r"UnreadableFileError: (.+ cannot be read as parquet .+)", str(exc))
        if found is None:
            raise
        raise storage.UnreadableFileError(found.group(1)) from None


def _model_parts(run: Run, stage: str, cfg, source, shards: list[int], load: Callable, on_ray: Callable) -> None:
    """One part per shard of an actor stage (embed, complexity) where ``run.placement[stage]``
    puts it: ``on_ray(mine_uri, parts_uri, shards, cfg, source, num_gpus=, placement=)`` on Ray
    Data actors, or, with ``num_actors`` 0, in this process: ``model_cls, shard_fn = load()``
    (imported only here), one ``model_cls(cfg on the placed device, source)`` and
    ``shard_fn(model, shard, batch_size=cfg.batch_size, mine_uri=, out_uri=)`` per shard, with a
    progress bar. The torch thread count the model may set (``cfg.num_threads``) is put back
    afterwards, for the stages after it."""
    place, mine_uri, parts_uri = run.placement[stage], run.at("mine"), run.at(stage, "parts")
    if place["on"] != "driver":
        on_ray(mine_uri, parts_uri, shards, cfg, source, num_gpus=place["num_gpus"], placement=place)
        return
    import torch
    from tqdm import tqdm

    model_cls, shard_fn = load()
    threads = torch.get_num_threads()
    try:
        model = model_cls(cfg.model_copy(update={"device": place["device"]}), source, num_threads=cfg.num_threads)
        for shard in tqdm(shards, desc=stage, unit="shard", mininterval=0.5 if sys.stderr.isatty() else 30):
            shard_fn(model, shard, batch_size=cfg.batch_size, mine_uri=mine_uri, out_uri=parts_uri)
    finally:
        torch.set_num_threads(threads)


def _clip_embedder() -> tuple[type, Callable]:
    from srdistill.distill.embedding import ClipEmbedder, embed_shard

    return ClipEmbedder, embed_shard


def _vit_scorer() -> tuple[type, Callable]:
    from srdistill.distill.complexity import ComplexityScorer, score_shard

    return ComplexityScorer, score_shard


# --------------------------------------------------------------------------- stages


def _plan(run: Run, min_shards: int = 1) -> str:
    """The plan stage: ``corpus.plan_corpus`` with shards of at most ``mine.images_per_shard``
    images, and at least ``min_shards`` of them when the corpus has that many images (two per
    CPU of the cluster: every core mines). ``min_shards`` is not part of the fingerprint: a run
    resumed on a cluster of another size keeps the plan (and the parts) it has."""
    from srdistill.corpus import input_signature, plan_corpus

    cfg = run.cfg.mine
    fp = short_sha("plan", run.input, json.dumps(cfg.extensions), str(cfg.images_per_shard),
              input_signature(run.input, cfg.extensions))  # fmt: skip

    def stage(sdir: Path) -> dict:
        plan = plan_corpus(run.input, run.at("plan", "files.parquet"), extensions=cfg.extensions,
                           images_per_shard=cfg.images_per_shard, min_shards=min_shards)  # fmt: skip
        if not plan.images:
            raise FileNotFoundError(f"input {run.input!r} holds no files with extensions {list(cfg.extensions)}")
        return {"images_listed": plan.images, "other_files_ignored": plan.other_files_ignored,
                "shards": plan.shards, "images_per_shard": plan.images_per_shard, "min_shards": min_shards,
                "source": plan.source, "digest": plan.digest}  # fmt: skip

    counts = run.run_stage("plan", fp, ["plan/files.parquet"], stage)
    return short_sha(fp, counts["digest"])


def _mine(run: Run, plan_fp: str) -> str:
    from srdistill.distill import mining
    from srdistill.run import runner

    cfg = run.cfg.mine
    fp = run.fingerprint("mine", plan_fp)

    def stage(sdir: Path) -> dict:
        plan = run.manifest["stages"]["plan"]["counts"]
        t0 = time.perf_counter()
        with _written_now(run.at("mine", "patches")) as mined_now, _named_unreadable():
            runner.mine_plan(run.at("plan", "files.parquet"), run.at("mine", "patches"), cfg,
                             list(range(plan["shards"])), placement=run.placement.get("mine"))  # fmt: skip
        seconds = time.perf_counter() - t0
        rule, counts = mining.summarize_parts(run.at("mine", "patches"), cfg, run.at("mine", "skipped.parquet"))
        storage.write_json(run.at("mine", "keep.json"), rule)
        skipped = storage.read_parquet(run.at("mine", "skipped.parquet")).slice(0, MAX_SKIPPED_LISTED)
        run.manifest["skipped_inputs"] = [{"file": r["source"], "reason": r["error"]} for r in skipped.to_pylist()]
        for s in run.manifest["skipped_inputs"]:
            run.log(f"[mine] skipped {s['file']}: {s['reason']}")
        return {"images_listed": plan["images_listed"], "other_files_ignored": plan["other_files_ignored"],
                **counts, "shards": plan["shards"], "shards_mined_now": mined_now[0],
                "megapixels_per_s": round(counts["corpus_pixels"] / 1e6 / max(seconds, 1e-9), 2)}  # fmt: skip

    run.run_stage("mine", fp, ["mine/keep.json"], stage)
    return run.output_fingerprint("mine", fp)


def _kept(run: Run, columns: list[str] | None = None) -> pa.Table:
    from srdistill.distill.mining import read_patches

    return read_patches(run.at("mine"), columns, kept_only=True)


def _assignments(run: Run) -> pa.Table:
    return storage.read_dataset(run.at("cluster", "assignments"), columns=["patch_id", "cluster"])


def _embed(run: Run, mine_fp: str, source) -> str:
    from srdistill.run import runner

    cfg = run.cfg.embed
    run.manifest["clip"] = {
        "backend": source.backend, "model": source.model, "path": source.path,
        "pretrained": source.pretrained, "semantic": source.semantic, "note": source.note,
        "repo_id": source.repo_id, "revision": source.revision,  # Hub id and commit, or None
    }  # fmt: skip
    if not source.semantic:
        run.log(f"WARNING: {NOT_SEMANTIC}")
    fp = run.fingerprint("embed", mine_fp, str(source.path), str(source.pretrained))

    def stage(sdir: Path) -> dict:
        if run.manifest["stages"]["mine"]["counts"]["patches_kept"] == 0:
            raise RuntimeError("no patch passed the keep rule: loosen mine.threshold or use "
                               "mine.keep_rule=top_fraction")  # fmt: skip
        shards = list(range(run.manifest["stages"]["plan"]["counts"]["shards"]))
        with _written_now(run.at("embed", "parts")) as now, _named_unreadable():  # an unreadable mine part: one line
            _model_parts(run, "embed", cfg, source, shards, _clip_embedder, runner.embed_parts_ray)
        ids = storage.read_dataset(run.at("embed", "parts"), columns=["patch_id"])
        first = storage.read_parquet(run.at("embed", "parts", "part-000000.parquet"), columns=["embedding"])
        counts = {"patches": ids.num_rows, "dim": first.schema.field("embedding").type.list_size,
                  "shards_embedded_now": now[0],
                  "pretrained": source.pretrained, "semantic": source.semantic}  # fmt: skip
        storage.write_json(run.at("embed", "meta.json"), counts)
        return counts

    run.run_stage("embed", fp, ["embed/meta.json"], stage)
    return run.output_fingerprint("embed", fp)


def _cluster(run: Run, embed_fp: str) -> str:
    from srdistill.distill.clustering import CentroidIndex, sample_rows, train_centroids

    cfg = run.cfg.cluster
    fp = run.fingerprint("cluster", embed_fp)
    parts_uri = run.at("embed", "parts")

    def embeddings(uri: str) -> tuple[pa.Array, np.ndarray]:
        table = storage.read_parquet(uri)
        emb = table.column("embedding").combine_chunks()
        dim = emb.type.list_size
        return table.column("patch_id"), emb.values.to_numpy().reshape(len(emb), dim).astype(np.float32)

    def stage(sdir: Path) -> dict:
        parts = list(storage.part_files(parts_uri).values())  # the recorded set (Run.check_parts)
        n = run.manifest["stages"]["embed"]["counts"]["patches"]
        sample = sample_rows((embeddings(p)[1] for p in parts), n, cfg.max_train_points, cfg.seed)
        centroids, k_used = train_centroids(sample, cfg)
        index = CentroidIndex(centroids, cfg)
        np.save(sdir / "centroids.npy", centroids)
        sizes = np.zeros(k_used, np.int64)
        for p in parts:  # one part in memory at a time
            ids, x = embeddings(p)
            assign, cos_sim = index.search(x)
            sizes += np.bincount(assign, minlength=k_used)
            storage.write_parquet(run.at("cluster", "assignments", p.rsplit("/", 1)[-1]),
                                  pa.table({"patch_id": ids, "cluster": pa.array(assign, pa.int32()),
                                            "cos_sim": pa.array(cos_sim, pa.float32())}))  # fmt: skip
        return {"k": cfg.k, "k_used": k_used, "n_train": len(sample), "patches": n,
                "cluster_sizes": sizes.tolist()}  # fmt: skip

    run.run_stage("cluster", fp, ["cluster/centroids.npy"], stage)
    return run.output_fingerprint("cluster", fp)


def _complexity(run: Run, upstream_fp: str, mine_fp: str, source) -> str:
    """The ViT complexity scores of every mined patch (``complexity/parts``, one part per
    shard). Its fingerprint depends on the mined patches and the ViT only (not on embed or
    cluster); the returned one chains ``upstream_fp`` too, for the stages after it."""
    from srdistill.run import runner

    cfg = run.cfg.complexity
    run.manifest["vit"] = {"model": source.model, "path": source.path, "pretrained": source.pretrained,
                           "note": source.note, "repo_id": source.repo_id, "revision": source.revision}  # fmt: skip
    if not source.pretrained:
        run.log(f"WARNING: {NOT_LEARNED}")
    fp = run.fingerprint("complexity", mine_fp, str(source.path), str(source.pretrained))

    def stage(sdir: Path) -> dict:
        shards = list(range(run.manifest["stages"]["plan"]["counts"]["shards"]))
        with _written_now(run.at("complexity", "parts")) as now, _named_unreadable():
            _model_parts(run, "complexity", cfg, source, shards, _vit_scorer, runner.complexity_parts_ray)
        ids = storage.read_dataset(run.at("complexity", "parts"), columns=["patch_id"])
        first = storage.read_parquet(run.at("complexity", "parts", "part-000000.parquet"), columns=["feature"])
        counts = {"patches": ids.num_rows, "dim": first.schema.field("feature").type.list_size,
                  "pretrained": source.pretrained, "shards_scored_now": now[0]}  # fmt: skip
        storage.write_json(run.at("complexity", "meta.json"), counts)
        return counts

    run.run_stage("complexity", fp, ["complexity/meta.json"], stage)
    return short_sha(upstream_fp, run.output_fingerprint("complexity", fp))


def _corpus_features(run: Run, k: int, seed: int, patch_ids: pa.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
    """In one pass over the complexity parts (one in memory at a time): a ``seed``-seeded
    sample of at most ``k`` rows of every patch's ViT features (``clustering.sample_rows``),
    and the features of ``patch_ids`` (empty without them). Both ``(n, D)`` float32."""
    from srdistill.distill.clustering import sample_rows
    from srdistill.distill.complexity import feature_matrix

    parts = list(storage.part_files(run.at("complexity", "parts")).values())
    n = run.manifest["stages"]["complexity"]["counts"]["patches"]
    chosen: list[np.ndarray] = []

    def features():
        for uri in parts:
            table = storage.read_parquet(uri, columns=["patch_id", "feature"])
            x = feature_matrix(table)
            if patch_ids is not None:
                chosen.append(x[pc.is_in(table.column("patch_id"), value_set=patch_ids).to_numpy(zero_copy_only=False)])
            yield x

    sample = sample_rows(features(), n, k, seed)
    return sample, np.concatenate(chosen) if chosen else np.empty((0, sample.shape[1]), np.float32)


def _feature_mmd(run: Run, patch_ids: pa.Array, seed: int) -> float | None:
    """``selection.subset_mmd`` of the ViT features of ``patch_ids`` against a seeded sample of
    at most ``FEATURE_MMD_SAMPLE`` features of all patches; ``None`` for no patch.

    Raises:
        ValueError: a patch has no complexity score (stale complexity stage).
    """
    from srdistill.distill.selection import subset_mmd

    reference, subset = _corpus_features(run, FEATURE_MMD_SAMPLE, seed, patch_ids)
    if len(subset) != len(patch_ids):
        raise ValueError(f"{len(patch_ids) - len(subset)} selected patches have no ViT features; "
                         "rerun the complexity stage")  # fmt: skip
    if not len(subset):
        return None
    return round(subset_mmd(subset, reference, max_corpus=FEATURE_MMD_SAMPLE, seed=seed), 6)


def _align(run: Run, select_fp: str, source) -> str:
    """The distilled set transformed by the alignment CNN (``alignment.align_folder``) towards
    the corpus' ViT feature distribution: ``align/*.png``, ``align/align.json``."""
    from srdistill.distill.alignment import align_folder
    from srdistill.distill.complexity import image_features, load_vit
    from srdistill.distill.selection import subset_mmd
    from srdistill.sr.device import resolve_device

    cfg = run.cfg.align
    fp = run.fingerprint("align", select_fp)
    if "align" in run.placement:  # in the driver: on its GPU only where the placement allows
        cfg = cfg.model_copy(update={"device": run.placement["align"]["device"]})

    def stage(sdir: Path) -> dict:
        run.pull("distilled")
        target, _ = _corpus_features(run, cfg.corpus_features, cfg.seed)
        vit = load_vit(source, run.cfg.complexity).to(resolve_device(cfg.device))
        report = align_folder(run.dir / "distilled", sdir, target, lambda x: vit(x)[0], cfg)
        reference, _ = _corpus_features(run, FEATURE_MMD_SAMPLE, run.cfg.select.seed)
        aligned = image_features(vit, sorted(sdir.glob("*.png")))
        return {**{k: report[k] for k in ("images", "iterations", "mmd_before", "mmd_after", "fidelity_l1",
                                          "psnr_to_original", "seconds")},
                "feature_mmd": round(subset_mmd(aligned, reference, max_corpus=FEATURE_MMD_SAMPLE,
                                                seed=run.cfg.select.seed), 6)}  # fmt: skip

    run.run_stage("align", fp, ["align/align.json"], stage)
    return fp


def _select(run: Run, upstream_fp: str, *, scored: bool = False) -> str:
    from srdistill.distill.selection import budget_patches, export_distilled, select_patches

    cfg = run.cfg.select
    fp = run.fingerprint("select", upstream_fp)
    distilled = run.dir / "distilled"

    def stage(sdir: Path) -> dict:
        if cfg.method == "tripled":  # every patch (the corpus distribution), with its scores
            from srdistill.distill.complexity import attach_scores, read_scores
            from srdistill.distill.mining import read_patches

            kept = attach_scores(read_patches(run.at("mine"), kept_only=False),
                                 read_scores(run.at("complexity", "parts")))  # fmt: skip
            kept = kept.append_column("cluster", pa.array(np.full(kept.num_rows, -1, np.int32)))
            n_clusters = cfg.strata  # the selector writes the stratum into "cluster"
        elif cfg.method == "clip-kmeans":
            kept = _kept(run).join(_assignments(run), "patch_id")
            n_clusters = _n_clusters(run)
        else:
            kept = _kept(run)
            kept = kept.append_column("cluster", pa.array(np.full(kept.num_rows, -1, np.int32)))
            n_clusters = run.cfg.cluster.k  # IPC baselines take the same budget as clip-kmeans
            if cfg.method in FEATURE_METHODS and cfg.features == "clip":
                emb = storage.read_dataset(run.at("embed", "parts"), columns=["patch_id", "embedding"])
                rows = pc.index_in(kept.column("patch_id"), value_set=emb.column("patch_id"))
                kept = kept.append_column("embedding", emb.column("embedding").take(rows))  # a list column: no join
            elif cfg.method in FEATURE_METHODS and cfg.features == "vit":
                from srdistill.distill.complexity import attach_scores, read_scores

                kept = attach_scores(kept, read_scores(run.at("complexity", "parts")))
        if cfg.score == "proxy_error":  # a small SR network's error on each candidate (EL2N-like)
            from srdistill.distill.proxy_error import attach_proxy_error, proxy_error_scores

            kept = attach_proxy_error(kept, proxy_error_scores(kept, run.cfg.scale, cfg.proxy))
        corpus = run.manifest["stages"]["mine"]["counts"]["corpus_pixels"]
        n_total = budget_patches(cfg, n_clusters=n_clusters, corpus_pixels=corpus,
                                 patch_size=run.cfg.mine.patch_size)  # fmt: skip
        selected = select_patches(kept, cfg, n_total=n_total)
        storage.write_parquet(sdir / "selected.parquet", selected)
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
            **({"feature_mmd": _feature_mmd(run, selected.column("patch_id").combine_chunks(), cfg.seed)}
               if scored else {}),
        }  # fmt: skip

    run.run_stage("select", fp, ["select/selected.parquet", "distilled/provenance.csv"], stage, also=("distilled",))
    return fp




def _n_clusters(run: Run) -> int:
    return run.manifest["stages"]["cluster"]["counts"]["k_used"]


def _encode(run: Run, cluster_fp: str) -> str:
    from srdistill.distill.diffusion import encoded_spec, resolve_backbone
    from srdistill.run import runner

    fp = run.fingerprint("encode", cluster_fp)

    def stage(sdir: Path) -> dict:
        cfg = resolve_backbone(run.cfg.finetune)  # HF ids -> local dirs, on the driver: actors read files
        kept = _kept(run, ["patch_id", "source", "x", "y", "size"])
        table = kept.join(_assignments(run), "patch_id").sort_by("patch_id")
        if cfg.max_patches is not None and table.num_rows > cfg.max_patches:
            rng = np.random.default_rng(cfg.seed)
            table = table.take(np.sort(rng.choice(table.num_rows, cfg.max_patches, replace=False)))
        shape, dtype = encoded_spec(cfg, run.cfg.mine.patch_size)
        # by source: the patches of one batch share their images (each decoded once per batch)
        table = table.sort_by([("source", "ascending"), ("y", "ascending"), ("x", "ascending")])
        place = run.placement["encode"]
        n = runner.encode_patches_ray(table, cfg, sdir / "parts", num_gpus=place["num_gpus"], placement=place)
        storage.write_json(sdir / "meta.json", {"shape": list(shape), "dtype": dtype, "rows": n,
                                        "num_clusters": _n_clusters(run), "backbone": cfg.resolved_backbone})
        return {"backbone": cfg.resolved_backbone, "patches": n, "sample_shape": list(shape),
                "dtype": dtype}  # fmt: skip

    run.run_stage("encode", fp, ["encode/meta.json"], stage)
    return fp


def _checkpoints(run: Run, stage: str) -> str | None:
    """Where Ray Train keeps a stage's checkpoints: the run URI for S3 runs (so a driver on
    another machine resumes from them), else the stage folder (``None``)."""
    return run.at(stage, "ray_train") if run.remote else None


def _finetune(run: Run, encode_fp: str) -> str:
    from srdistill.distill.diffusion import build_backbone, finetune, load_encoded, resolve_backbone
    from srdistill.run import runner

    fp = run.fingerprint("finetune", encode_fp)
    model_dir = run.dir / "finetune" / "model"

    def stage(sdir: Path) -> dict:
        cfg = resolve_backbone(run.cfg.finetune)  # HF ids -> local dirs, on the driver: workers read files
        run.pull("encode")
        meta = json.loads((run.dir / "encode" / "meta.json").read_text())
        shape, k, parts = tuple(meta["shape"]), meta["num_clusters"], run.dir / "encode" / "parts"
        place = run.placement["finetune"]
        if place["on"] == "ray-train":
            runner.finetune_ray(cfg.model_copy(update={"workers": place["workers"]}), parts, sdir, num_clusters=k,
                                shape=shape, dtype=meta["dtype"], checkpoint_uri=_checkpoints(run, "finetune"),
                                use_gpu=place["use_gpu"])  # fmt: skip
        else:
            data = load_encoded(parts, shape=shape, dtype=meta["dtype"])
            finetune(cfg.model_copy(update={"device": place["device"]}), build_backbone(cfg, k), data, sdir)
        model = json.loads((model_dir / "backbone.json").read_text())
        log = [json.loads(x) for x in (sdir / "log.jsonl").read_text().splitlines()]
        return {"backbone": model["kind"], "trainable": model["trainable"],
                "parameters": model["source"]["parameters"],
                "trainable_parameters": model["source"]["trainable"],
                "num_clusters": k, "patches": meta["rows"],
                "iterations": model.get("finetune", {}).get("iterations", cfg.iterations), "epochs": cfg.epochs,
                "workers": place["workers"], "deepspeed": place["on"] == "ray-train",
                "final_loss": log[-1]["loss"] if log else None, "source": model["source"],
                "resumed_from": model.get("finetune", {}).get("resumed_from", [])}  # fmt: skip

    run.run_stage("finetune", fp, ["finetune/model/weights.safetensors"], stage)
    return fp


def _synthesize(run: Run, finetune_fp: str) -> str:
    from srdistill.distill.selection import budget_patches
    from srdistill.distill.synthesis import per_cluster_counts, resolve_decoder, synthesize
    from srdistill.run import runner

    cfg = run.cfg.synthesize
    budget = run.cfg.select.model_dump(include={"ipc", "pixel_fraction"}) if cfg.ipc is None else {}
    fp = run.fingerprint("synthesize", finetune_fp, json.dumps(budget, sort_keys=True))

    def stage(sdir: Path) -> dict:
        run.pull("finetune/model")
        k = _n_clusters(run)
        res = run.cfg.finetune.resolution
        corpus = run.manifest["stages"]["mine"]["counts"]["corpus_pixels"]
        if cfg.ipc is not None:
            counts = dict.fromkeys(range(k), cfg.ipc)
        else:
            n_total = budget_patches(run.cfg.select, n_clusters=k, corpus_pixels=corpus, patch_size=res)
            counts = per_cluster_counts(n_total, k)
        model_dir = run.dir / "finetune" / "model"
        place = run.placement["synthesize"]
        local = resolve_decoder(cfg, run.cfg.finetune.resolved_backbone)  # HF id -> dir, on the driver
        rows = synthesize(model_dir, local, sdir, counts,
                          map_fn=runner.synthesize_ray(model_dir, local, sdir, num_gpus=place["num_gpus"],
                                                       placement=place))  # fmt: skip
        return {"images": len(rows), "per_cluster": {str(c): n for c, n in counts.items()},
                "resolution": res, "sampler": cfg.sampler, "steps": cfg.steps,
                "guidance_scale": cfg.guidance_scale, "guidance_channels": cfg.guidance_channels,
                "vae_path": local.vae_path,
                "pixel_fraction": round(len(rows) * res * res / max(corpus, 1), 6)}  # fmt: skip

    run.run_stage("synthesize", fp, ["synthesize/provenance.csv"], stage)
    return fp


def _train_images(run: Run) -> list[Path]:
    folder = "synthesize" if run.cfg.distill == "synth" else "align" if run.cfg.align.enabled else "distilled"
    run.pull(folder)
    return sorted((run.dir / folder).glob("*.png"))


def _train(run: Run, select_fp: str) -> str:
    from srdistill.run import runner

    fp = run.fingerprint("train", select_fp)

    def stage(sdir: Path) -> dict:
        from srdistill.sr.training import load_checkpoint, train_sr  # torch: the stage's own time

        images = _train_images(run)
        place, cfg = run.placement["train"], run.cfg.train
        if place["on"] == "ray-train":
            runner.train_ray(cfg.model_copy(update={"workers": place["workers"]}), run.cfg.scale, images, sdir,
                             checkpoint_uri=_checkpoints(run, "train"), use_gpu=place["use_gpu"])  # fmt: skip
        else:
            train_sr(cfg.model_copy(update={"device": place["device"]}), run.cfg.scale, images, sdir)
        _, meta = load_checkpoint(sdir / "model.safetensors")
        return {"model": run.cfg.train.model, "scale": run.cfg.scale, "iterations": run.cfg.train.iterations,
                "train_images": len(images), "resumed_from": meta.get("resumed_from", [])}  # fmt: skip

    run.run_stage("train", fp, ["train/model.safetensors"], stage)
    return fp


def evaluation_rows(model, datasets: list[str] | tuple[str, ...], scale: int, device: str,
                    label: str) -> dict[str, list[dict]]:  # fmt: skip
    """The evaluate stage's table: ``{"bicubic": [...], label: [...]}``, one ``evaluation.evaluate``
    result per dataset, ``model`` on ``device``. Importable, so it runs as a Ray task as well.

    Raises:
        FileNotFoundError, ValueError: from ``evaluation.evaluate`` (dataset not found, empty).
        RuntimeError: ``device`` is ``cuda`` where torch sees no CUDA device.
    """
    from srdistill.sr.evaluation import evaluate

    rows: dict[str, list[dict]] = {"bicubic": [], label: []}
    for ds in datasets:
        rows["bicubic"].append(evaluate("bicubic", ds, scale))
        rows[label].append(evaluate(model, ds, scale, device=device))
    return rows


def _evaluate(run: Run, train_fp: str) -> dict:
    from srdistill.run import runner

    fp = run.fingerprint("evaluate", train_fp)
    out = run.dir / "evaluate" / "results.json"

    def stage(sdir: Path) -> dict:
        from srdistill.sr.training import load_checkpoint  # torch: the stage's own time

        run.pull("train/model.safetensors")
        model, _ = load_checkpoint(run.dir / "train" / "model.safetensors")
        scale = run.cfg.scale
        how = "synthetic" if run.cfg.distill == "synth" else run.cfg.select.method
        label = f"{run.cfg.train.model} ({how})"
        args = (model, tuple(run.cfg.evaluate.datasets), scale)
        place = run.placement.setdefault("evaluate", {"on": "driver", "num_gpus": 0.0, "device": "cpu"})
        if place["on"] == "ray-task":  # on a GPU of the cluster: the head may have none
            rows, ids = runner.run_task(evaluation_rows, *args, place["device"], label, num_gpus=place["num_gpus"])
            place["gpu_ids"] = ids
        else:
            rows = evaluation_rows(*args, place["device"], label)
        storage.write_json(out, {"scale": scale, "rows": rows})
        return {f"{name} {r['dataset']}": round(r["psnr_y"], 3) for name, rs in rows.items() for r in rs}

    run.run_stage("evaluate", fp, ["evaluate/results.json"], stage)
    from srdistill.sr.evaluation import format_table

    run.pull("evaluate")
    rows = json.loads(out.read_text())["rows"]
    run.log(f"\nPSNR / SSIM on Y, x{run.cfg.scale}, border = scale\n" + format_table(rows))
    return rows


#: What the report reads from the local mirror (a resumed S3 run downloads it first).
_REPORT_INPUTS = ("select", "distilled", "encode/meta.json", "finetune/log.jsonl", "finetune/model/backbone.json",
                  "synthesize", "train/log.jsonl", "train/model.safetensors", "evaluate")


def check_run_dir(run_dir: str | Path) -> None:
    """A local run directory can be created or written: not an existing file, nor under one,
    and its nearest existing folder writable. S3 run directories are not checked here.

    Raises:
        ValueError: one line naming ``run_dir`` and what to give instead.
    """
    if storage.is_s3(os.fspath(run_dir)):
        return
    path = Path(run_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} (--out) is an existing file, not a folder: "
                         "give a new or existing folder")  # fmt: skip
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} (--out) is under the file {str(parent)!r}: give a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"run directory {str(run_dir)!r} (--out): {str(parent)!r} is not writable")


def run_pipeline(input_dir: str | Path, run_dir: str | Path, cfg: RunConfig, *,
                 preset: str | None = None, until: str | None = None,
                 log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Run the main job on the embedded default (local Ray) or the Ray cluster joined
    (``cfg.ray``), each stage placed by ``runner.plan_placement`` (GPUs where the cluster has
    them, unless a stage's ``device`` is ``cpu``).

    Args:
        input_dir: the HR corpus: a folder or ``s3://`` prefix of images (searched
            recursively) or a manifest file of image URIs (``.parquet``/``.csv``/``.txt``).
        run_dir: run directory, a local path or ``s3://`` URI; an existing one is resumed.
        cfg: resolved config.
        preset: preset name, for the manifest.
        until: stop after this stage (one of ``STAGES``).

    Returns:
        The manifest (also in ``run_dir/manifest.json``).

    Raises:
        ValueError: unknown ``until`` (with a close match), or a local ``run_dir`` that is an
            existing file or not writable (``check_run_dir``).
        FileNotFoundError: the input does not exist or holds no images; an evaluation dataset
            is not found (checked only when the run reaches ``evaluate``).
        embedding.MissingWeightsError: no CLIP weights (clip-kmeans, synth) or no ViT weights
            (tripled, align): not local, not downloadable, not cached with ``HF_HUB_OFFLINE=1``,
            and random init not allowed.
        diffusion.MissingBackboneError: ``distill: synth`` with a ``dit`` backbone whose
            directories are missing or whose Hugging Face ids cannot be resolved.
        OSError: storage failed after its retries (rerunning resumes).
        ValueError: a stage's ``device`` is ``cuda`` (or its ``use_gpu`` true) and the Ray
            cluster has no GPUs (``runner.plan_placement``), raised before any stage runs.
        ImportError: ``train.tensorboard`` or ``finetune.tensorboard`` (for a stage the run
            reaches) without the tensorboard package (``training.require_tensorboard``).

    Preflight: everything above except "holds no images", the GPU placement and storage
    failures is raised before Ray starts and before the run directory is written; weights are
    checked only for the stages up to ``until`` (``until='mine'`` needs no CLIP, ViT or DiT).
    """
    from srdistill.corpus import is_manifest
    from srdistill.run import runner

    if until is not None and until not in STAGES:
        import difflib

        close = difflib.get_close_matches(until, STAGES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"until={until!r} is not one of {', '.join(STAGES)}{hint}")
    synth = cfg.distill == "synth"
    clusters = synth or needs_clip(cfg.select)
    if until in ("embed", "cluster") and not clusters:
        raise ValueError(f"until={until!r}: select.method {cfg.select.method!r} runs no {until} stage")
    if until == "align" and (synth or not cfg.align.enabled):
        raise ValueError("until='align': the align stage runs only with align.enabled and distill 'coreset'")
    if (until in SYNTH_ONLY and not synth) or (until == "select" and synth):
        raise ValueError(f"until={until!r}: distill {cfg.distill!r} runs no {until} stage")
    scored = not synth and (needs_vit(cfg.select) or cfg.align.enabled)
    if until == "complexity" and not scored:
        raise ValueError("until='complexity': the complexity stage runs only for distill 'coreset' with "
                         "select.method 'tripled' or align.enabled")  # fmt: skip
    # the stages this invocation runs (up to ``until``): preflight checks only what they need
    order = stage_chain(cfg)[:-2]  # up to train
    order = order[: order.index(until) + 1] if until in order else [*order, "evaluate"]
    # ---- preflight: every check that can fail before the first stage runs (nor Ray starts)
    if not storage.exists(input_dir):
        raise FileNotFoundError(f"input {str(input_dir)!r} does not exist")
    if not storage.is_s3(input_dir) and not is_manifest(str(input_dir)) and not Path(input_dir).is_dir():
        raise FileNotFoundError(f"input {str(input_dir)!r} is not a directory or a manifest file")
    check_run_dir(run_dir)
    if "evaluate" in order:
        from srdistill.datasets import resolve_dataset

        for name in cfg.evaluate.datasets:  # FileNotFoundError naming the places tried (and the fix)
            resolve_dataset(name)
    clip_source = None
    if "embed" in order:
        from srdistill.distill.embedding import resolve_clip

        clip_source = resolve_clip(cfg.embed)  # MissingWeightsError, with help
    if "cluster" in order:
        from srdistill.distill import clustering  # noqa: F401  (ImportError naming the faiss extras)
    vit_source = None
    if "complexity" in order:
        from srdistill.distill.complexity import resolve_vit

        vit_source = resolve_vit(cfg.complexity)  # MissingWeightsError, with help
    if "encode" in order:
        from srdistill.distill.diffusion import check_backbone

        check_backbone(cfg.finetune)  # (downloads HF ids): MissingBackboneError, with help
    if "synthesize" in order:
        from srdistill.distill.synthesis import resolve_decoder

        resolve_decoder(cfg.synthesize, cfg.finetune.resolved_backbone)  # decoder VAE: ValueError for unet
    for stage, section in (("train", cfg.train), ("finetune", cfg.finetune)):
        if stage in order and section.tensorboard:
            from srdistill.sr.training import require_tensorboard

            require_tensorboard(f"{stage}.tensorboard")  # ImportError naming pip install tensorboard
    fps: dict[str, str] = {}

    def mine(f: str) -> str:
        fps["mine"] = _mine(run, f)
        return fps["mine"]

    steps: list[tuple[str, Callable[[str], str]]] = [("mine", mine)]
    if clusters:
        steps += [("embed", lambda f: _embed(run, f, clip_source)), ("cluster", lambda f: _cluster(run, f))]
    if scored:
        steps.append(("complexity", lambda f: _complexity(run, f, fps["mine"], vit_source)))
    if synth:
        steps += [("encode", lambda f: _encode(run, f)), ("finetune", lambda f: _finetune(run, f)),
                  ("synthesize", lambda f: _synthesize(run, f))]  # fmt: skip
    else:
        steps.append(("select", lambda f: _select(run, f, scored=scored)))
        if cfg.align.enabled:
            steps.append(("align", lambda f: _align(run, f, vit_source)))
    steps.append(("train", lambda f: _train(run, f)))
    assert ["plan", *(name for name, _ in steps), "evaluate"][: len(order)] == order, order
    runner.use_ray(cfg.ray)  # started by the first stage that needs it, if any does
    resources = runner.cluster_resources(cfg.ray)  # a local Ray's without starting it
    gpus = float(cfg.ray.num_gpus) if cfg.ray.num_gpus is not None else resources["GPU"]
    # before any work: ValueError for a device 'cuda' / use_gpu true without GPUs in the cluster
    placement = runner.plan_placement(cfg, order, gpus)
    run = Run(input_dir, run_dir, cfg, preset=preset, log=log)
    run.placement = placement
    run.chain = order
    run.manifest.update(ray=runner.ray_info(), placement=placement)
    run.save()
    fp = _plan(run, min_shards=2 * max(1, int(resources["CPU"])))
    done = ["plan"]
    for name, step in steps:
        if until in done:
            break
        fp = step(fp)
        done.append(name)
        if runner.ray_is_up():
            run.manifest["ray"] = runner.ray_info()  # what the stage that started Ray ran on
    if until not in done:
        _evaluate(run, fp)
    t0 = time.perf_counter()
    from srdistill.run.report import write_report

    run.pull(*_REPORT_INPUTS)
    write_report(run.dir, run_uri=run.uri)
    if run.remote:
        storage.copy_dir(run.dir / "report", run.at("report"))
    run.manifest["stages"]["report"] = {"status": "done", "finished_at": utc_now(), "skipped": False,
                                        "seconds": round(time.perf_counter() - t0, 3),
                                        "counts": {"path": run.at("report", "report.md"),
                                                   "html": run.at("report", "report.html")}}  # fmt: skip
    run.save()
    log(f"report: {run.at('report', 'report.md')} (one file with the figures: {run.at('report', 'report.html')})")
    if "clip" in run.manifest and not run.manifest["clip"]["semantic"]:
        print(f"WARNING: {NOT_SEMANTIC}", file=sys.stderr)
    if "vit" in run.manifest and not run.manifest["vit"]["pretrained"]:
        print(f"WARNING: {NOT_LEARNED}", file=sys.stderr)
    return run.manifest
