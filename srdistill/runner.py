"""The thin Ray layer: every Ray call in srdistill lives in this module.

The algorithms (``mining``, ``embedding``, ``training``, ...) are plain functions over
numpy/pyarrow/torch; this module runs them on Ray: Ray Data streams mining and embedding over a
corpus, Ray Train runs the SR training loop data-parallel, and plain Ray tasks run independent
benchmark trainings side by side. Ray's API moves between releases, so keeping it here keeps
the rest of the code stable (pinned: ray==2.60).

Embedded default: ``init_ray`` starts a local Ray in-process. Under ``ray job submit`` (or with
``RayConfig.address``) it joins the running cluster instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .config import (ComplexityConfig, EmbedConfig, FinetuneConfig, MineConfig, MZSRConfig, RayConfig,
                     SynthConfig, TrainConfig)  # fmt: skip

if TYPE_CHECKING:  # torch/transformers are imported only by the embedding and scoring actors
    from .complexity import VitSource
    from .embedding import ClipSource

__all__ = ["init_ray", "shutdown_ray", "map_images", "map_shards", "mine_plan", "embed_parts_ray",
           "complexity_parts_ray", "train_ray",
           "map_tasks", "encode_patches_ray", "finetune_ray", "synthesize_ray"]


def init_ray(cfg: RayConfig) -> None:
    """Start (or join) Ray once per process.

    A local Ray gets ``cfg.num_cpus`` CPUs (all by default). With ``cfg.address`` or
    ``$RAY_ADDRESS`` set (as ``ray job submit`` does), it connects to that cluster.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runs need no token file
    joining = cfg.address is not None or "RAY_ADDRESS" in os.environ
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": False}
    if joining:
        kwargs["address"] = cfg.address
    else:
        kwargs.update(num_cpus=cfg.num_cpus, include_dashboard=False)
    ray.init(**kwargs)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar per stage of our own (``_progress``) instead
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _progress(total: int, desc: str, unit: str) -> tqdm:
    """A stage progress bar on stderr: live on a terminal, a line every 30 s in a log file."""
    return tqdm(total=total, desc=desc, unit=unit, mininterval=0.5 if sys.stderr.isatty() else 30)


def shutdown_ray() -> None:
    """Stop the Ray started by ``init_ray`` (no-op if none)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _apply_to_paths(batch: dict[str, np.ndarray], fn: Callable, kwargs: dict) -> pa.Table:
    return fn(batch["path"], **kwargs)


def map_images(paths: list[str], fn: Callable[..., pa.Table], *, images_per_task: int,
               schema: pa.Schema, desc: str = "images", **kwargs) -> pa.Table:  # fmt: skip
    """Stream ``fn(paths_of_one_batch, **kwargs) -> pyarrow.Table`` over image paths with Ray
    Data (one CPU per task, ``images_per_task`` images per batch) and concatenate the results.
    Only the returned rows travel back; pixels never leave the task that decoded them.
    ``fn``'s table must have a ``source`` column (the image path) for the progress count.
    """
    import ray.data

    if not paths:
        return schema.empty_table()
    ctx = ray.data.DataContext.get_current()
    # A single map operator needs no per-operator reservation; with it on, a 2-CPU Ray runs
    # one task at a time (measured: 2.2x slower, docs/BENCHMARKS.md).
    reservation, ctx.op_resource_reservation_enabled = ctx.op_resource_reservation_enabled, False
    try:
        blocks = max(1, len(paths) // images_per_task)
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
        ds = ds.map_batches(_apply_to_paths, fn_kwargs={"fn": fn, "kwargs": kwargs},
                            batch_size=images_per_task, batch_format="numpy", num_cpus=1)  # fmt: skip
        parts = []
        with _progress(len(paths), desc, "img") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                parts.append(batch.cast(schema))
                bar.update(pc.count_distinct(batch.column("source")).as_py())
    finally:
        ctx.op_resource_reservation_enabled = reservation
    return pa.concat_tables(parts) if parts else schema.empty_table()


class _ShardWorker:
    """Ray Data callable: ``fn(state, shard, **kwargs)`` for each shard id of a batch, with
    ``state = make_state()`` built once per actor (``None`` without ``make_state``)."""

    def __init__(self, fn: Callable, kwargs: dict, make_state: Callable | None = None):
        self.fn, self.kwargs = fn, kwargs
        self.state = make_state() if make_state is not None else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [self.fn(self.state, int(s), **self.kwargs) for s in batch["shard"]]
        return {"shard": batch["shard"], "rows": np.asarray(done, dtype=np.int64)}


#: Storage settings (never credentials) a driver passes on to the workers it starts, so they
#: reach the same S3 endpoint; credentials come from each worker's own AWS chain.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS")


def _storage_env() -> dict | None:
    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    return {"env_vars": env} if env else None


def _call_worker(batch: dict[str, np.ndarray], worker: _ShardWorker) -> dict[str, np.ndarray]:
    return worker(batch)


def map_shards(shards: list[int], fn: Callable, *, desc: str, make_state: Callable | None = None,
               num_actors: int = 0, num_cpus: float = 1, num_gpus: float = 0, **kwargs) -> int:  # fmt: skip
    """Run ``fn(state, shard, **kwargs) -> rows`` once per shard id with Ray Data, streaming.

    ``fn`` writes its own output (one atomic part per shard, skipped when it exists: it then
    returns -1), so only shard ids and counts travel back and memory stays flat whatever the
    corpus size. Without ``num_actors``: one Ray task of ``num_cpus`` CPUs per shard, retried
    by Ray when its worker dies (3 times, Ray's default). With ``num_actors``: an actor pool,
    each actor building ``make_state()`` once (e.g. a CLIP model); Ray Data restarts dead
    actors and retries their shards. Transient S3 errors are retried inside ``storage``.

    Returns:
        The shards processed now (the others were already done).
    """
    import ray.data

    if not shards:
        return 0
    ctx = ray.data.DataContext.get_current()
    # A single map operator needs no per-operator reservation; with it on, a 2-CPU Ray runs
    # one task at a time (measured: 2.2x slower, docs/BENCHMARKS.md).
    reservation, ctx.op_resource_reservation_enabled = ctx.op_resource_reservation_enabled, False
    worker_kwargs = {"fn": fn, "kwargs": kwargs, "make_state": make_state}
    if num_actors:
        call, extra = _ShardWorker, {"compute": ray.data.ActorPoolStrategy(size=num_actors),
                                     "fn_constructor_kwargs": worker_kwargs}  # fmt: skip
    else:
        call, extra = _call_worker, {"fn_kwargs": {"worker": _ShardWorker(**worker_kwargs)}}
    try:
        ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
        ds = ds.map_batches(call, batch_size=1, batch_format="numpy", num_cpus=num_cpus, num_gpus=num_gpus,
                            runtime_env=_storage_env(), **extra)  # fmt: skip
        now = 0
        with _progress(len(shards), desc, "shard") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                now += int((batch["rows"] >= 0).sum())
                bar.update(len(batch["shard"]))
    finally:
        ctx.op_resource_reservation_enabled = reservation
    return now


def _mine_one(state, shard: int, **kwargs) -> int:
    from .mining import mine_shard

    return mine_shard(kwargs["plan_uri"], shard, kwargs["parts_uri"], kwargs["cfg"])


def mine_plan(plan_uri: str, parts_uri: str, cfg: MineConfig, shards: list[int]) -> int:
    """Mine the given shards of a corpus plan (``mining.mine_shard``), one Ray task each, each
    writing ``parts_uri/part-<shard>.parquet``. Returns the shards mined now (not already done)."""
    return map_shards(shards, _mine_one, desc="mine", plan_uri=plan_uri, parts_uri=parts_uri, cfg=cfg)


def _write_part(state, shard: int, *, shard_fn: Callable, **kwargs) -> int:
    return shard_fn(state, shard, **kwargs)


def _patch_parts_ray(make: Callable, shard_fn: Callable, cfg: "EmbedConfig | ComplexityConfig", desc: str,
                     shards: list[int], **kwargs) -> int:  # fmt: skip
    """``shard_fn(make(), shard, **kwargs, batch_size=cfg.batch_size)`` for every shard on a pool of
    ``cfg.num_actors`` Ray Data actors (``cfg.actor_num_cpus`` CPUs each, fractional so a small
    machine cannot deadlock; one GPU each when ``cfg.device == "cuda"``)."""
    return map_shards(shards, _write_part, desc=desc, make_state=make, num_actors=cfg.num_actors,
                      num_cpus=cfg.actor_num_cpus, num_gpus=1 if cfg.device == "cuda" else 0,
                      shard_fn=shard_fn, batch_size=cfg.batch_size, **kwargs)  # fmt: skip


def embed_parts_ray(mine_uri: str, out_uri: str, shards: list[int], cfg: EmbedConfig,
                    source: "ClipSource") -> int:  # fmt: skip
    """CLIP embeddings of the kept patches, shard by shard (``embedding.embed_shard``: mine part
    in, embedding part out, atomically, skipped when done) on Ray Data actors
    (``_patch_parts_ray``). Returns the shards embedded now."""
    from functools import partial

    from .embedding import ClipEmbedder, embed_shard

    make = partial(ClipEmbedder, cfg, source, num_threads=cfg.num_threads)
    return _patch_parts_ray(make, embed_shard, cfg, "embed", shards, mine_uri=mine_uri, out_uri=out_uri)


def complexity_parts_ray(mine_uri: str, out_uri: str, shards: list[int], cfg: ComplexityConfig,
                         source: "VitSource") -> int:  # fmt: skip
    """ViT complexity scores of every mined patch, shard by shard (``complexity.score_shard``:
    mine part in, score part out, atomically, skipped when done) on Ray Data actors
    (``_patch_parts_ray``). Returns the shards scored now."""
    from functools import partial

    from .complexity import ComplexityScorer, score_shard

    make = partial(ComplexityScorer, cfg, source, num_threads=cfg.num_threads)
    return _patch_parts_ray(make, score_shard, cfg, "complexity", shards, mine_uri=mine_uri, out_uri=out_uri)


def _train_worker(config: dict) -> None:
    """Ray Train's per-worker loop: ``training.train_sr``, or ``mzsr.meta_train`` when
    ``config["meta"]``, with this worker's rank, device, DDP wrapper (``meta_train`` all-reduces
    its meta-gradients itself), checkpoint reporting and restored checkpoint."""
    import ray.train
    import ray.train.torch

    from .training import DataParallel, train_sr

    ctx = ray.train.get_context()
    restored = ray.train.get_checkpoint()
    resume = Path(restored.to_directory()) / "last.safetensors" if restored else None

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    dp = DataParallel(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        prepare_model=ray.train.torch.prepare_model,
        report=report,
        resume_from=resume,
    )
    local = Path(tempfile.mkdtemp(prefix=f"srdistill-train-rank{dp.rank}-"))
    if resume is not None and dp.rank == 0 and (resume.parent / "log.jsonl").is_file():
        shutil.copy2(resume.parent / "log.jsonl", local / "log.jsonl")  # keep the whole history
    if config.get("meta"):
        from .mzsr import meta_train

        meta_train(config["cfg"], config["images"], local, init=config["init"], progress=False, dp=dp)
    else:
        train_sr(config["cfg"], config["scale"], config["images"], local, progress=False, dp=dp)


def _fit(worker: Callable, config: dict, name: str, out_dir: Path, workers: int, use_gpu: bool,
         max_failures: int, checkpoint_uri: str | None = None):  # fmt: skip
    """``TorchTrainer(worker).fit()``: ``workers`` workers of one CPU (and one GPU with
    ``use_gpu``), checkpoints kept under ``checkpoint_uri/name`` (default
    ``out_dir/ray_train``; an ``s3://`` URI goes through ``storage.filesystem``, so a driver on
    another machine resumes from it), a rerun resuming from them, the group restarted up to
    ``max_failures`` times (``FailureConfig``). Returns the Ray Train result."""
    from . import storage
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir.mkdir(parents=True, exist_ok=True)
    fs, fs_path = storage.filesystem(checkpoint_uri or out_dir / "ray_train")
    trainer = TorchTrainer(
        worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=name,
            storage_path=fs_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def train_ray(cfg: TrainConfig, scale: int, hr_images: list[str], out_dir: Path, *,
              max_failures: int = 2, checkpoint_uri: str | None = None) -> Path:  # fmt: skip
    """Data-parallel ``train_sr`` on Ray Train: ``cfg.workers`` workers (gloo on CPU, NCCL with
    ``cfg.use_gpu``), each sampling from its shard of ``hr_images`` with ``batch_size //
    workers`` crops a step; gradients are all-reduced by DDP. Rank 0's checkpoints are
    reported to Ray Train (kept under ``out_dir/ray_train``); a failed worker restarts the
    group from the last one (up to ``max_failures`` times), and rerunning the same call resumes
    from it. The final ``model.safetensors``, ``last.safetensors`` and ``log.jsonl`` are
    copied into ``out_dir``.

    Returns:
        ``out_dir / "model.safetensors"``.

    Raises:
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    out_dir = Path(out_dir).resolve()
    config = {"cfg": cfg, "scale": scale, "images": [str(p) for p in hr_images]}
    result = _fit(_train_worker, config, "train", out_dir, cfg.workers, cfg.use_gpu, max_failures, checkpoint_uri)
    return _copy_final(result, out_dir)


def meta_train_ray(cfg: MZSRConfig, hr_images: list[str], out_dir: Path, *, init: str | None = None,
                   max_failures: int = 2, checkpoint_uri: str | None = None) -> Path:  # fmt: skip
    """Data-parallel ``mzsr.meta_train`` (MZSR's meta-transfer learning) on Ray Train:
    ``cfg.workers`` workers (gloo on CPU, NCCL with ``cfg.use_gpu``) each take
    ``tasks_per_batch // workers`` tasks of every meta-batch, and their meta-gradients are
    all-reduced before the Adam step. Checkpoints, failures and resumption as ``train_ray``.

    Returns:
        ``out_dir / "model.safetensors"``.

    Raises:
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    out_dir = Path(out_dir).resolve()
    config = {"meta": True, "cfg": cfg, "init": init, "images": [str(p) for p in hr_images]}
    result = _fit(_train_worker, config, "meta_train", out_dir, cfg.workers, cfg.use_gpu, max_failures,
                  checkpoint_uri)  # fmt: skip
    return _copy_final(result, out_dir)


def _copy_final(result, out_dir: Path) -> Path:
    """Copy the final model, its resumable state and the log from a Ray Train result."""
    with result.checkpoint.as_directory() as ckpt:
        for name in ("model.safetensors", "last.safetensors", "log.jsonl"):
            shutil.copy2(Path(ckpt) / name, out_dir / name)
    return out_dir / "model.safetensors"


def encode_patches_ray(table: pa.Table, cfg: FinetuneConfig, out_dir: Path, *,
                       num_actors: int = 1) -> int:  # fmt: skip
    """The one-time encoding of the fine-tuning patches (``diffusion.PatchEncoder``: VAE
    latent moments for ``dit``, the pixels for ``unet``) by ``num_actors`` Ray Data actors (one
    GPU each with ``cfg.use_gpu``), streamed to parquet files in ``out_dir`` (one per block), so
    training never re-encodes.

    Args:
        table: columns ``patch_id``, ``source``, ``x``, ``y``, ``size``, ``cluster``.

    Returns:
        The number of rows written.
    """
    import ray.data

    from .diffusion import PatchEncoder

    cols = table.select(["patch_id", "source", "x", "y", "size", "cluster"])
    blocks = max(1, min(cols.num_rows // cfg.encode_batch_size, 8 * num_actors))
    ds = ray.data.from_arrow(cols).repartition(blocks)
    ds = ds.map_batches(
        PatchEncoder,
        fn_constructor_kwargs={"cfg": cfg, "num_threads": 1},
        batch_size=cfg.encode_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=0.5,
        num_gpus=1 if cfg.use_gpu else 0,
        runtime_env=_storage_env(),  # the patches' source images may be in S3
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with _progress(cols.num_rows, "encode", "patch") as bar:
        for i, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
            pq.write_table(batch, out_dir / f"part-{i:05d}.parquet")
            n += batch.num_rows
            bar.update(batch.num_rows)
    return n


def _finetune_worker(config: dict) -> None:
    """Ray Train's per-worker loop: ``diffusion.finetune`` on this worker's shard, under
    DeepSpeed, with every rank reporting its checkpoint files to the same checkpoint."""
    import ray.train
    import ray.train.torch

    from .diffusion import DiffusionParallel, build_backbone, finetune, load_encoded

    cfg: FinetuneConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    restored = ray.train.get_checkpoint()
    resume = Path(restored.to_directory()) if restored else None
    local = Path(tempfile.mkdtemp(prefix=f"srdistill-finetune-rank{rank}-"))
    if resume is not None and rank == 0 and (resume / "log.jsonl").is_file():
        shutil.copy2(resume / "log.jsonl", local / "log.jsonl")  # keep the whole history

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        if rank == 0 and checkpoint_dir is not None and (local / "log.jsonl").is_file():
            shutil.copy2(local / "log.jsonl", checkpoint_dir / "log.jsonl")
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    dp = DiffusionParallel(rank=rank, world_size=world, device=ray.train.torch.get_device(),
                           report=report, resume_from=resume)  # fmt: skip
    data = load_encoded(config["encoded"], shape=config["shape"], dtype=config["dtype"],
                        rank=rank, world_size=world)  # fmt: skip
    finetune(cfg, build_backbone(cfg, config["num_clusters"]), data, local, progress=False, dp=dp)


def finetune_ray(cfg: FinetuneConfig, encoded_dir: Path, out_dir: Path, *, num_clusters: int,
                 shape: tuple[int, ...], dtype: str, max_failures: int = 2,
                 checkpoint_uri: str | None = None) -> Path:  # fmt: skip
    """Data-parallel ``diffusion.finetune`` on Ray Train: ``cfg.workers`` workers (gloo on
    CPU, NCCL with ``cfg.use_gpu``) under DeepSpeed ZeRO ``cfg.zero_stage``.
    Each worker trains on its shard of the encoded set with ``batch_size // workers`` samples
    a step. All ranks report their checkpoint files (DeepSpeed's per-rank shards, EMA, RNG,
    memory banks) into one Ray Train checkpoint under ``out_dir/ray_train``; a failed worker
    restarts the group from it (up to ``max_failures`` times) and rerunning the same call
    resumes from it at its step. The fine-tuned ``model/`` and ``log.jsonl`` are copied into
    ``out_dir``.

    Returns:
        ``out_dir / "model"`` (``diffusion.load_finetuned`` reads it).

    Raises:
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    out_dir = Path(out_dir).resolve()
    config = {"cfg": cfg, "encoded": str(Path(encoded_dir).resolve()), "num_clusters": num_clusters,
              "shape": tuple(shape), "dtype": dtype}  # fmt: skip
    result = _fit(_finetune_worker, config, "finetune", out_dir, cfg.workers, cfg.use_gpu, max_failures,
                  checkpoint_uri)
    with result.checkpoint.as_directory() as ckpt:
        if (out_dir / "model").exists():
            shutil.rmtree(out_dir / "model")
        shutil.copytree(Path(ckpt) / "model", out_dir / "model")
        if (Path(ckpt) / "log.jsonl").is_file():
            shutil.copy2(Path(ckpt) / "log.jsonl", out_dir / "log.jsonl")
    return out_dir / "model"


def synthesize_ray(model_dir: Path, cfg: SynthConfig, out_dir: Path):
    """A ``map_fn`` for ``synthesis.synthesize`` that spreads the sampling jobs over
    ``cfg.num_actors`` Ray Data actors (``synthesis.Synthesizer``; one GPU each on CUDA,
    ``cfg.actor_num_cpus`` CPUs each otherwise)."""
    import ray.data

    from .synthesis import Synthesizer

    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and _cluster_has_gpus())

    def map_fn(jobs: dict[str, np.ndarray]) -> list[dict]:
        n = len(jobs["cluster"])
        blocks = max(1, min(n // cfg.batch_size, 4 * cfg.num_actors))
        ds = ray.data.from_items([{k: v[i] for k, v in jobs.items()} for i in range(n)],
                                 override_num_blocks=blocks)  # fmt: skip
        ds = ds.map_batches(
            Synthesizer,
            fn_constructor_kwargs={"model_dir": str(model_dir), "cfg": cfg, "out_dir": str(out_dir)},
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=cfg.actor_num_cpus,
            num_gpus=1 if use_gpu else 0,
        )
        rows = []
        with _progress(n, "synthesize", "img") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
                rows += batch.to_dict("records")
                bar.update(len(batch))
        return rows

    return map_fn


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _single_threaded(fn: Callable, item):
    import torch

    torch.set_num_threads(1)  # one task per CPU: small models run faster single-threaded
    return fn(item)


def map_tasks(fn: Callable, items: list, *, num_cpus: float = 1, num_gpus: float = 0) -> list:
    """``[fn(x) for x in items]`` as Ray tasks of ``num_cpus`` CPUs (one torch thread) and
    ``num_gpus`` GPUs each (a fraction lets several small trainings share a GPU), as many at
    once as the cluster holds; results in input order. ``fn`` must be importable (a
    module-level function)."""
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_single_threaded)
    refs = [task.remote(fn, x) for x in items]
    out = []
    with _progress(len(refs), "tasks", "task") as bar:
        for ref in refs:
            out.append(ray.get(ref))
            bar.update(1)
    return out
