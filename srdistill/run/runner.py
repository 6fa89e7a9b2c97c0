"""The thin Ray layer: every Ray call in srdistill lives in this module.

The algorithms (``mining``, ``embedding``, ``training``, ...) are plain functions over
numpy/pyarrow/torch; this module runs them on Ray: Ray Data streams mining and embedding over a
corpus, Ray Train runs the SR training loop data-parallel, and plain Ray tasks run independent
benchmark trainings side by side. Ray's API moves between releases, so keeping it here keeps
the rest of the code stable (pinned: ray==2.60).

Embedded default: ``init_ray`` starts a local Ray in-process (``address="local"``), whatever
clusters a ``ray start`` left on the machine. Under ``ray job submit`` (``$RAY_ADDRESS``) or with
``RayConfig.address`` it joins that cluster instead. The pipeline only names the config
(``use_ray``): Ray starts when the first stage that needs it runs (a run of stages that are done
or run in the driver starts none), and placement and shard planning read the resources a local
Ray will have without starting it (``cluster_resources``).

Placement (``plan_placement``): with ``device: auto`` every stage goes on GPUs when the cluster
has them (Ray Data actors and the evaluation task ask for ``num_gpus``, Ray Train runs with
``use_gpu``), else on CPUs; ``device: cpu`` never asks for a GPU; ``device: cuda`` (or
``use_gpu: true``) on a cluster without GPUs is a ``ValueError`` before any work. A stage placed
on CPUs gets ``device: cpu`` (Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for zero-GPU tasks, so
``auto`` could otherwise pick up a GPU it did not ask for); one placed on a GPU sees it as
``cuda:0`` and keeps its ``device`` (``auto`` resolves by ``torch.cuda.is_available()``).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from srdistill.config import (ComplexityConfig, EmbedConfig, FinetuneConfig, MineConfig, MZSRConfig, RayConfig, RunConfig,
                              SynthConfig, TrainConfig)  # fmt: skip

if TYPE_CHECKING:  # torch/transformers are imported only by the embedding and scoring actors
    from srdistill.distill.complexity import VitSource
    from srdistill.distill.embedding import ClipSource

__all__ = ["init_ray", "use_ray", "ray_is_up", "cluster_resources", "route_ray_logs", "shutdown_ray", "ray_info",
           "cluster_gpus", "actor_gpus", "resolve_use_gpu", "plan_placement", "run_task", "map_images",
           "map_shards", "mine_plan", "embed_parts_ray", "complexity_parts_ray", "train_ray", "meta_train_ray",
           "map_tasks", "encode_patches_ray", "finetune_ray", "synthesize_ray"]

#: Whether this process's Ray was joined (an address) rather than started here; None: not by us.
_JOINED: bool | None = None
#: What ``_ensure_ray`` starts Ray with when a stage first needs it (``use_ray``).
_PENDING: RayConfig | None = None
#: Seconds ``ray.init`` took in ``init_ray`` (starting a local Ray, or joining), for the manifest.
_START_SECONDS: float | None = None


def use_ray(cfg: RayConfig) -> None:
    """Use ``cfg`` for this process's Ray, started only when first needed: every Ray call of this
    module goes through ``_ensure_ray``, which then calls ``init_ray(cfg)``. A run whose stages
    need no Ray (all done, or run in the driver) never starts it."""
    global _PENDING
    _PENDING = cfg


def _joins(cfg: RayConfig | None) -> bool:
    return bool((cfg is not None and cfg.address) or os.environ.get("RAY_ADDRESS"))


def init_ray(cfg: RayConfig) -> None:
    """Start (or join) Ray once per process; a no-op when Ray is already initialised.

    Without ``cfg.address`` and ``$RAY_ADDRESS``: a new local Ray (``address="local"``, never a
    cluster found through a ``ray_current_cluster`` file) with ``cfg.num_cpus`` CPUs and
    ``cfg.num_gpus`` GPUs (None: all it detects). With either, it joins that cluster, passing
    no resource counts (a cluster's resources are its own).

    Ray's output stays off the console: the workers' stdout/stderr are not forwarded
    (``log_to_driver=False``; they stay in the session's log files) and the driver's Ray log
    records go to the root logger (``route_ray_logs``).

    Raises:
        ConnectionError: the address given cannot be reached (from ``ray.init``).
    """
    global _JOINED, _START_SECONDS
    import ray
    import ray.data  # configures the "ray.data" logger on import: routed below with "ray"

    if ray.is_initialized():
        return
    route_ray_logs()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runs need no token file
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": False}
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False)
    t0 = time.perf_counter()
    ray.init(**kwargs)
    _JOINED, _START_SECONDS = bool(address), round(time.perf_counter() - t0, 3)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar per stage of our own (``_progress``) instead


#: The driver-side loggers Ray gives console handlers of its own (``ray`` at import,
#: ``ray.data`` when ``ray.data`` is imported); ``ray.train`` and the others propagate to ``ray``.
RAY_LOGGERS = ("ray", "ray.data")


def route_ray_logs() -> None:
    """Send the driver's Ray log records ("Started a local Ray instance", Ray Data's "Progress
    bars disabled" and execution plans, Ray Train's status) to the root logger like any
    library's, instead of Ray's own console handlers: the CLI writes them to the run's
    ``run.log`` and shows only errors (``cli``). Ray's file handlers (the session's
    ``ray-data.log``) are kept. Idempotent.

    Not covered (no Python logging): the C++ core worker of the driver, which writes its
    ERROR lines to the process's stderr itself (e.g. ``core_worker.cc ... has constructor
    arguments in the object store``, logged for every Ray Data actor, ray-project/ray#57733).
    """
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def _progress(total: int, desc: str, unit: str) -> tqdm:
    """A stage progress bar on stderr: live on a terminal, a line every 30 s in a log file."""
    return tqdm(total=total, desc=desc, unit=unit, mininterval=0.5 if sys.stderr.isatty() else 30)


def shutdown_ray() -> None:
    """Stop the Ray started by ``init_ray`` (no-op if none), and forget ``use_ray``'s config.
    Called by a command when it is done: at interpreter exit Ray's own hook sleeps 0.5 s first."""
    global _JOINED, _PENDING, _START_SECONDS
    if ray_is_up():
        sys.modules["ray"].shutdown()
    _JOINED = _PENDING = _START_SECONDS = None


def ray_info() -> dict:
    """What this process runs on, for the manifest: ``{"mode": "local" | "joined" | "external",
    "gcs_address", "resources": {"CPU", "GPU"}, "start_seconds"}`` (``external``: Ray was
    initialised by someone other than ``init_ray``; ``start_seconds``: what ``ray.init`` took, in
    the first stage that needed Ray), or ``{"mode": "none"}`` when Ray was not started."""
    if not ray_is_up():
        return {"mode": "none"}
    import ray

    res = ray.cluster_resources()
    mode = "external" if _JOINED is None else "joined" if _JOINED else "local"
    return {"mode": mode, "gcs_address": ray.get_runtime_context().gcs_address,
            "resources": {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))},
            "start_seconds": _START_SECONDS}  # fmt: skip


def _ensure_ray() -> None:
    """``init_ray`` of the ``use_ray`` config (default ``RayConfig()``) unless Ray is up: a library
    call into this module starts a local Ray (or joins ``$RAY_ADDRESS``), never what Ray's own
    auto-init would join."""
    import ray

    if not ray.is_initialized():
        init_ray(_PENDING or RayConfig())


def ray_is_up() -> bool:
    """Whether this process is connected to a Ray (started or joined), without importing Ray."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def cluster_resources(cfg: RayConfig | None = None) -> dict[str, float]:
    """``{"CPU": n, "GPU": n}`` of the cluster this process runs on, without starting a local Ray
    for it: those of the live Ray when it is up; for a local Ray still to start (no
    ``cfg.address``, no ``$RAY_ADDRESS``), what it will have (``cfg.num_cpus``/``num_gpus``, else
    what Ray detects on this machine); a cluster to join is joined and asked."""
    cfg = cfg or _PENDING
    local = None if ray_is_up() or _joins(cfg) else _local_resources(cfg or RayConfig())
    if local is not None:
        return local
    import ray

    _ensure_ray()
    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}


#: Device files of the GPUs Ray counts (NVIDIA's, AMD's ROCm): without any, a local Ray has none.
_GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd")


def _local_resources(cfg: RayConfig) -> dict[str, float] | None:
    """What ``init_ray(cfg)``'s local Ray will detect: on a machine without GPU device files,
    ``cfg``'s counts or this process's CPUs and no GPU (Ray is not even imported); else by
    Ray's own code (private, so it may move: None then, and the caller starts the Ray and asks it)."""
    if cfg.num_gpus is not None or not any(glob.glob(p) for p in _GPU_DEVICE_FILES):
        return {"CPU": float(cfg.num_cpus or len(os.sched_getaffinity(0))), "GPU": float(cfg.num_gpus or 0)}
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        spec = ResourceAndLabelSpec(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus).resolve(is_head=True)
    except (ImportError, AttributeError, TypeError):
        return None
    return {"CPU": float(spec.num_cpus), "GPU": float(spec.num_gpus or 0)}


def cluster_gpus(cfg: RayConfig | None = None) -> float:
    """The GPUs placement counts on: ``cfg.num_gpus`` when given (0: CPU only; for a joined,
    autoscaled cluster the GPUs its worker groups can bring up), else the cluster's
    (``cluster_resources``: a local Ray is not started for it)."""
    if cfg is not None and cfg.num_gpus is not None:
        return float(cfg.num_gpus)
    return cluster_resources(cfg)["GPU"]


def actor_gpus(device: str, per_actor: float, gpus: float, field: str) -> float:
    """The GPUs each actor or task of a stage asks for: ``per_actor`` when the cluster has
    GPUs and ``device`` is ``auto`` or ``cuda``; 0 for ``cpu`` or a cluster without GPUs.

    Raises:
        ValueError: ``device`` is ``cuda`` and ``gpus`` is 0 (names ``field``).
    """
    if device == "cpu":
        return 0.0
    if gpus <= 0:
        if device == "cuda":
            raise ValueError(f"{field} is 'cuda' but the Ray cluster has no GPUs (ray.cluster_resources() "
                             "shows none, or --gpus 0); use 'auto' or 'cpu', or give the cluster GPUs")
        return 0.0
    return float(per_actor)


def resolve_use_gpu(use_gpu: bool | None, device: str, gpus: float, section: str) -> bool:
    """Whether a Ray Train run uses GPUs: ``use_gpu`` when set, else (auto) ``device != "cpu"``
    and the cluster has GPUs.

    Raises:
        ValueError: GPUs required (``use_gpu`` true or ``device`` cuda) but ``gpus`` is 0.
    """
    if use_gpu is False or device == "cpu":
        return False
    if gpus <= 0:
        if use_gpu or device == "cuda":
            why = f"{section}.use_gpu is true" if use_gpu else f"{section}.device is 'cuda'"
            raise ValueError(f"{why} but the Ray cluster has no GPUs (ray.cluster_resources() shows none, "
                             "or --gpus 0)")  # fmt: skip
        return False
    return True


def _driver_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _training_place(workers: int, use_gpu: bool, device: str, driver_cuda: bool) -> dict:
    """Where a training stage runs: Ray Train with ``workers`` workers; in the driver when
    ``workers`` is 0, unless it should use a GPU that the driver lacks (a GPU-less head): then
    one Ray Train worker with a GPU."""
    if workers:
        return {"on": "ray-train", "workers": workers, "use_gpu": use_gpu, "num_gpus": float(workers * use_gpu)}
    if use_gpu and not driver_cuda:
        return {"on": "ray-train", "workers": 1, "use_gpu": True, "num_gpus": 1.0,
                "note": "the driver sees no CUDA device: one Ray Train worker with a GPU"}  # fmt: skip
    return {"on": "driver", "workers": 0, "use_gpu": False, "num_gpus": 0.0,
            "device": ("cuda" if device == "auto" else device) if use_gpu else "cpu"}  # fmt: skip


def plan_placement(cfg: RunConfig, stages: list[str] | tuple[str, ...], gpus: float, *,
                   driver_cuda: bool | None = None) -> dict[str, dict]:  # fmt: skip
    """Where each of ``stages`` runs and what it asks Ray for, decided before any work.

    Args:
        cfg: the run's config (``device``, ``use_gpu``, ``workers``, actor settings per stage).
        stages: pipeline stage names (``rundir.STAGES``); others are ignored.
        gpus: the GPUs of the cluster (``cluster_gpus``).
        driver_cuda: whether this process sees a CUDA device (default: ``torch.cuda``).

    Returns:
        ``{stage: {"on": "ray-tasks" | "ray-data-actors" | "ray-train" | "ray-task" |
        "driver", "num_gpus": GPUs asked for (per actor/task; in all for Ray Train),
        "device": what the stage's torch code is given, ...}}`` (``actors``, ``workers``,
        ``use_gpu`` where they apply). Recorded in the manifest as ``placement``.

    Raises:
        ValueError: a stage's ``device`` is ``cuda`` or its ``use_gpu`` is true and the cluster
            has no GPUs; ``align.device`` ``cuda`` while the driver (where align runs) has no
            CUDA device. (Embed and complexity with ``num_actors`` 0 run in the driver, on its
            GPU when they get one, or, like training with ``workers`` 0, in one actor with a
            GPU when the driver has none.)
    """
    if driver_cuda is None:
        driver_cuda = _driver_has_cuda() if gpus > 0 else False
    out: dict[str, dict] = {}
    for stage in stages:
        if stage == "mine":
            out[stage] = {"on": "ray-tasks", "num_gpus": 0.0, "device": "cpu"}
        elif stage in ("embed", "complexity"):
            c = getattr(cfg, stage)
            g = actor_gpus(c.device, c.actor_num_gpus, gpus, f"{stage}.device")
            if c.num_actors == 0 and (driver_cuda or not g):  # in the driver, on its GPU if the stage gets one
                out[stage] = {"on": "driver", "num_gpus": 0.0, "device": "cuda" if g else "cpu"}
            else:
                out[stage] = {"on": "ray-data-actors", "actors": max(c.num_actors, 1), "num_gpus": g,
                              "device": c.device if g else "cpu"}  # fmt: skip
                if c.num_actors == 0:
                    out[stage]["note"] = "the driver sees no CUDA device: one actor with a GPU"
        elif stage in ("cluster", "select"):
            out[stage] = {"on": "driver", "num_gpus": 0.0, "device": "cpu"}
        elif stage == "align":
            c = cfg.align
            if c.device == "cuda" and not driver_cuda:
                actor_gpus("cuda", 1, gpus, "align.device")  # the clearer error first
                raise ValueError("align.device is 'cuda' but align runs in the driver, which sees no CUDA "
                                 "device; use 'auto' or 'cpu'")  # fmt: skip
            dev = "cpu" if gpus <= 0 or c.device == "cpu" or not driver_cuda else "cuda"
            out[stage] = {"on": "driver", "num_gpus": 0.0, "device": dev}
        elif stage == "encode":  # an actor stage: finetune.device decides, use_gpu is Ray Train's
            c = cfg.finetune
            g = actor_gpus(c.device, 1, gpus, "finetune.device")
            out[stage] = {"on": "ray-data-actors", "actors": 1, "num_gpus": g, "device": c.device if g else "cpu"}
        elif stage in ("finetune", "train"):
            c = getattr(cfg, stage)
            use = resolve_use_gpu(c.use_gpu, c.device, gpus, stage)
            out[stage] = _training_place(c.workers, use, c.device, driver_cuda)
        elif stage == "synthesize":
            c = cfg.synthesize
            g = actor_gpus(c.device, c.actor_num_gpus, gpus, "synthesize.device")
            out[stage] = {"on": "ray-data-actors", "actors": c.num_actors, "num_gpus": g,
                          "device": c.device if g else "cpu"}  # fmt: skip
        elif stage == "evaluate":
            g = actor_gpus(cfg.evaluate.device, 1, gpus, "evaluate.device")
            out[stage] = ({"on": "ray-task", "num_gpus": g, "device": cfg.evaluate.device} if g
                          else {"on": "driver", "num_gpus": 0.0, "device": "cpu"})  # fmt: skip
    return out


def _gpu_ids() -> list[str]:
    """The GPU ids Ray assigned to the calling task or actor (``[]`` for none)."""
    import ray

    return [str(i) for i in ray.get_gpu_ids()]


def _placed_call(fn: Callable, args: tuple, kwargs: dict):
    return fn(*args, **kwargs), _gpu_ids()


def run_task(fn: Callable, *args, num_cpus: float = 1, num_gpus: float = 0, **kwargs) -> tuple[object, list[str]]:
    """``fn(*args, **kwargs)`` as one Ray task of ``num_cpus`` CPUs and ``num_gpus`` GPUs (inside,
    torch sees its GPU as ``cuda:0``), waited for. ``fn`` must be importable (module level);
    the arguments travel pickled (a model is sent, not read from the driver's disk).

    Returns:
        ``(fn's result, the GPU ids Ray assigned to the task)``.

    Raises:
        ray.exceptions.RayTaskError: ``fn`` raised (its exception is the cause).
    """
    import ray

    _ensure_ray()
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)(_placed_call)
    return tuple(ray.get(task.remote(fn, args, kwargs)))


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
    _ensure_ray()
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
        gpus = ",".join(_gpu_ids())  # what Ray gave this worker: recorded as the stage's placement
        return {"shard": batch["shard"], "rows": np.asarray(done, dtype=np.int64),
                "gpu_ids": np.array([gpus] * len(done), dtype=object)}  # fmt: skip


#: Storage settings (never credentials) a driver passes on to the workers it starts, so they
#: reach the same S3 endpoint; credentials come from each worker's own AWS chain.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS")


def _storage_env() -> dict | None:
    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    return {"env_vars": env} if env else None


def _call_worker(batch: dict[str, np.ndarray], worker: _ShardWorker) -> dict[str, np.ndarray]:
    return worker(batch)


def _seen_gpus(column) -> set[str]:
    """GPU ids out of a ``gpu_ids`` column of comma-joined strings."""
    return {i for v in column for i in str(v).split(",") if i}


def map_shards(shards: list[int], fn: Callable, *, desc: str, make_state: Callable | None = None,
               num_actors: int = 0, num_cpus: float = 1, num_gpus: float = 0, placement: dict | None = None,
               **kwargs) -> int:  # fmt: skip
    """Run ``fn(state, shard, **kwargs) -> rows`` once per shard id with Ray Data, streaming.

    ``fn`` writes its own output (one atomic part per shard, skipped when it exists: it then
    returns -1), so only shard ids and counts travel back and memory stays flat whatever the
    corpus size. Without ``num_actors``: one Ray task of ``num_cpus`` CPUs per shard, retried
    by Ray when its worker dies (3 times, Ray's default). With ``num_actors``: an actor pool,
    each actor building ``make_state()`` once (e.g. a CLIP model); Ray Data restarts dead
    actors and retries their shards. Transient S3 errors are retried inside ``storage``.
    ``placement``, when given, is updated with ``num_gpus`` (asked per task/actor) and
    ``gpu_ids`` (the GPU ids Ray assigned to the workers that ran, as strings).

    Returns:
        The shards processed now (the others were already done).
    """
    import ray.data

    if not shards:
        return 0
    _ensure_ray()
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
        now, seen = 0, set()
        with _progress(len(shards), desc, "shard") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                now += int((batch["rows"] >= 0).sum())
                seen |= _seen_gpus(batch["gpu_ids"])
                bar.update(len(batch["shard"]))
    finally:
        ctx.op_resource_reservation_enabled = reservation
    if placement is not None:
        placement.update(num_gpus=float(num_gpus), gpu_ids=sorted(seen))
    return now


def _mine_one(state, shard: int, **kwargs) -> int:
    from srdistill.distill.mining import mine_shard

    return mine_shard(kwargs["plan_uri"], shard, kwargs["parts_uri"], kwargs["cfg"])


def mine_plan(plan_uri: str, parts_uri: str, cfg: MineConfig, shards: list[int], *,
              placement: dict | None = None) -> int:  # fmt: skip
    """Mine the given shards of a corpus plan (``mining.mine_shard``), one CPU Ray task each, each
    writing ``parts_uri/part-<shard>.parquet`` (``placement``: as ``map_shards``). Returns the
    shards mined now (not already done)."""
    return map_shards(shards, _mine_one, desc="mine", placement=placement, plan_uri=plan_uri,
                      parts_uri=parts_uri, cfg=cfg)  # fmt: skip


def _write_part(state, shard: int, *, shard_fn: Callable, **kwargs) -> int:
    return shard_fn(state, shard, **kwargs)


def _actor_cfg(cfg, num_gpus: float | None, field: str):
    """``(cfg for the actors, GPUs per actor)``: ``num_gpus`` None is decided here
    (``actor_gpus`` on the live cluster); actors without a GPU get ``device: cpu``."""
    if num_gpus is None:
        num_gpus = actor_gpus(cfg.device, cfg.actor_num_gpus, cluster_gpus(), field)
    return (cfg if num_gpus else cfg.model_copy(update={"device": "cpu"})), float(num_gpus)


def _patch_parts_ray(make: Callable, shard_fn: Callable, cfg: "EmbedConfig | ComplexityConfig", desc: str,
                     shards: list[int], num_gpus: float, placement: dict | None, **kwargs) -> int:  # fmt: skip
    """``shard_fn(make(), shard, **kwargs, batch_size=cfg.batch_size)`` for every shard on a pool of
    ``cfg.num_actors`` Ray Data actors (``cfg.actor_num_cpus`` CPUs each, fractional so a small
    machine cannot deadlock; ``num_gpus`` GPUs each). A ``batch_size`` of None is the actor's to
    choose (by its device)."""
    return map_shards(shards, _write_part, desc=desc, make_state=make, num_actors=max(cfg.num_actors, 1),
                      num_cpus=cfg.actor_num_cpus, num_gpus=num_gpus, placement=placement,
                      shard_fn=shard_fn, batch_size=cfg.batch_size, **kwargs)  # fmt: skip


def embed_parts_ray(mine_uri: str, out_uri: str, shards: list[int], cfg: EmbedConfig,
                    source: "ClipSource", *, num_gpus: float | None = None,
                    placement: dict | None = None) -> int:  # fmt: skip
    """CLIP embeddings of the kept patches, shard by shard (``embedding.embed_shard``: mine part
    in, embedding part out, atomically, skipped when done) on Ray Data actors
    (``_patch_parts_ray``) of ``num_gpus`` GPUs each (None: ``cfg.actor_num_gpus`` when the
    cluster has GPUs and ``cfg.device`` allows, else 0; see ``actor_gpus``). ``placement``: as
    ``map_shards``. Returns the shards embedded now.

    Raises:
        ValueError: ``cfg.device`` is ``cuda`` on a cluster without GPUs (``num_gpus`` None).
    """
    from functools import partial

    from srdistill.distill.embedding import ClipEmbedder, embed_shard

    cfg, num_gpus = _actor_cfg(cfg, num_gpus, "embed.device")
    make = partial(ClipEmbedder, cfg, source, num_threads=cfg.num_threads)
    return _patch_parts_ray(make, embed_shard, cfg, "embed", shards, num_gpus, placement,
                            mine_uri=mine_uri, out_uri=out_uri)  # fmt: skip


def complexity_parts_ray(mine_uri: str, out_uri: str, shards: list[int], cfg: ComplexityConfig,
                         source: "VitSource", *, num_gpus: float | None = None,
                         placement: dict | None = None) -> int:  # fmt: skip
    """ViT complexity scores of every mined patch, shard by shard (``complexity.score_shard``:
    mine part in, score part out, atomically, skipped when done) on Ray Data actors
    (``_patch_parts_ray``); ``num_gpus`` and ``placement`` as ``embed_parts_ray``. Returns the
    shards scored now.

    Raises:
        ValueError: ``cfg.device`` is ``cuda`` on a cluster without GPUs (``num_gpus`` None).
    """
    from functools import partial

    from srdistill.distill.complexity import ComplexityScorer, score_shard

    cfg, num_gpus = _actor_cfg(cfg, num_gpus, "complexity.device")
    make = partial(ComplexityScorer, cfg, source, num_threads=cfg.num_threads)
    return _patch_parts_ray(make, score_shard, cfg, "complexity", shards, num_gpus, placement,
                            mine_uri=mine_uri, out_uri=out_uri)  # fmt: skip


def _train_worker(config: dict) -> None:
    """Ray Train's per-worker loop: ``training.train_sr``, or ``mzsr.meta_train`` when
    ``config["meta"]``, with this worker's rank, device, DDP wrapper (``meta_train`` all-reduces
    its meta-gradients itself), checkpoint reporting and restored checkpoint."""
    import ray.train
    import ray.train.torch

    from srdistill.sr.training import DataParallel, train_sr

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
    if resume is not None and dp.rank == 0:
        _keep_history(resume.parent, local)
    if config.get("meta"):
        from srdistill.zeroshot.mzsr import meta_train

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
    from srdistill import storage
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir.mkdir(parents=True, exist_ok=True)
    _ensure_ray()
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


def _train_gpu(cfg, use_gpu: bool | None, section: str) -> bool:
    return resolve_use_gpu(cfg.use_gpu, cfg.device, cluster_gpus(), section) if use_gpu is None else use_gpu


def train_ray(cfg: TrainConfig, scale: int, hr_images: list[str], out_dir: Path, *,
              max_failures: int = 2, checkpoint_uri: str | None = None,
              use_gpu: bool | None = None) -> Path:  # fmt: skip
    """Data-parallel ``train_sr`` on Ray Train: ``max(cfg.workers, 1)`` workers (gloo on CPU,
    NCCL on GPUs: ``use_gpu``, None = ``resolve_use_gpu`` of ``cfg.use_gpu``/``cfg.device`` on
    the live cluster), each sampling from its shard of ``hr_images`` with ``batch_size //
    workers`` crops a step; gradients are all-reduced by DDP. Rank 0's checkpoints are
    reported to Ray Train (kept under ``out_dir/ray_train``); a failed worker restarts the
    group from the last one (up to ``max_failures`` times), and rerunning the same call resumes
    from it. The final ``model.safetensors``, ``last.safetensors`` and ``log.jsonl`` are
    copied into ``out_dir``.

    Returns:
        ``out_dir / "model.safetensors"``.

    Raises:
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
        ValueError: GPUs required (``cfg.use_gpu`` true or ``cfg.device`` cuda) on a cluster
            without GPUs.
    """
    out_dir = Path(out_dir).resolve()
    gpu = _train_gpu(cfg, use_gpu, "train")
    config = {"cfg": cfg, "scale": scale, "images": [str(p) for p in hr_images]}
    result = _fit(_train_worker, config, "train", out_dir, max(cfg.workers, 1), gpu, max_failures, checkpoint_uri)
    return _copy_final(result, out_dir)


def meta_train_ray(cfg: MZSRConfig, hr_images: list[str], out_dir: Path, *, init: str | None = None,
                   max_failures: int = 2, checkpoint_uri: str | None = None,
                   use_gpu: bool | None = None) -> Path:  # fmt: skip
    """Data-parallel ``mzsr.meta_train`` (MZSR's meta-transfer learning) on Ray Train:
    ``max(cfg.workers, 1)`` workers (gloo on CPU, NCCL on GPUs: ``use_gpu`` as ``train_ray``) each take
    ``tasks_per_batch // workers`` tasks of every meta-batch, and their meta-gradients are
    all-reduced before the Adam step. Checkpoints, failures and resumption as ``train_ray``.

    Returns:
        ``out_dir / "model.safetensors"``.

    Raises:
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
        ValueError: GPUs required on a cluster without GPUs (as ``train_ray``).
    """
    out_dir = Path(out_dir).resolve()
    gpu = _train_gpu(cfg, use_gpu, "mzsr")
    config = {"meta": True, "cfg": cfg, "init": init, "images": [str(p) for p in hr_images]}
    result = _fit(_train_worker, config, "meta_train", out_dir, max(cfg.workers, 1), gpu, max_failures,
                  checkpoint_uri)  # fmt: skip
    return _copy_final(result, out_dir)


def _keep_history(src: Path, dst: Path) -> None:
    """Copy ``log.jsonl`` and the ``tensorboard/`` event files, where ``src`` has them, into
    ``dst``: a restored worker keeps the whole history."""
    if (src / "log.jsonl").is_file():
        shutil.copy2(src / "log.jsonl", dst / "log.jsonl")
    if (src / "tensorboard").is_dir():
        shutil.copytree(src / "tensorboard", dst / "tensorboard", dirs_exist_ok=True)


def _copy_final(result, out_dir: Path) -> Path:
    """Copy the final model, its resumable state, the log and the TensorBoard event files (if
    any) from a Ray Train result."""
    with result.checkpoint.as_directory() as ckpt:
        for name in ("model.safetensors", "last.safetensors", "log.jsonl"):
            shutil.copy2(Path(ckpt) / name, out_dir / name)
        if (Path(ckpt) / "tensorboard").is_dir():
            shutil.copytree(Path(ckpt) / "tensorboard", out_dir / "tensorboard", dirs_exist_ok=True)
    return out_dir / "model.safetensors"


class _GpuTagged:
    """Ray Data callable class: ``cls(**kwargs)`` built once per actor, each output batch with a
    ``_gpu_ids`` column (the GPU ids Ray gave the actor, comma-joined) that the driver records
    as the stage's placement and drops."""

    def __init__(self, cls: type, kwargs: dict):
        self.inner = cls(**kwargs)
        self.gpus = ",".join(_gpu_ids())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(self.inner(batch))
        n = len(next(iter(out.values()))) if out else 0
        out["_gpu_ids"] = np.array([self.gpus] * n, dtype=object)
        return out


def encode_patches_ray(table: pa.Table, cfg: FinetuneConfig, out_dir: Path, *, num_actors: int = 1,
                       num_gpus: float | None = None, placement: dict | None = None) -> int:  # fmt: skip
    """The one-time encoding of the fine-tuning patches (``diffusion.PatchEncoder``: VAE
    latent moments for ``dit``, the pixels for ``unet``) by ``num_actors`` Ray Data actors of
    ``num_gpus`` GPUs each (None: one when the live cluster has GPUs and ``cfg.device`` allows,
    see ``actor_gpus``; actors without a GPU get ``device: cpu``), streamed to parquet files in
    ``out_dir`` (one per block), so training never re-encodes.

    Args:
        table: columns ``patch_id``, ``source``, ``x``, ``y``, ``size``, ``cluster``.
        placement: updated with ``num_gpus`` and the ``gpu_ids`` the actors were given.

    Returns:
        The number of rows written.

    Raises:
        ValueError: ``cfg.device`` is ``cuda`` on a cluster without GPUs (``num_gpus`` None).
    """
    import ray.data

    from srdistill.distill.diffusion import PatchEncoder

    _ensure_ray()
    if num_gpus is None:
        num_gpus = actor_gpus(cfg.device, 1, cluster_gpus(), "finetune.device")
    if not num_gpus:
        cfg = cfg.model_copy(update={"device": "cpu"})
    cols = table.select(["patch_id", "source", "x", "y", "size", "cluster"])
    blocks = max(1, min(cols.num_rows // cfg.encode_batch_size, 8 * num_actors))
    ds = ray.data.from_arrow(cols).repartition(blocks)
    ds = ds.map_batches(
        _GpuTagged,
        fn_constructor_kwargs={"cls": PatchEncoder, "kwargs": {"cfg": cfg, "num_threads": 1}},
        batch_size=cfg.encode_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=0.5,
        num_gpus=num_gpus,
        runtime_env=_storage_env(),  # the patches' source images may be in S3
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, seen = 0, set()
    with _progress(cols.num_rows, "encode", "patch") as bar:
        for i, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
            seen |= _seen_gpus(batch.column("_gpu_ids").to_pylist())
            batch = batch.drop_columns(["_gpu_ids"])
            pq.write_table(batch, out_dir / f"part-{i:05d}.parquet")
            n += batch.num_rows
            bar.update(batch.num_rows)
    if placement is not None:
        placement.update(num_gpus=float(num_gpus), gpu_ids=sorted(seen))
    return n


def _finetune_worker(config: dict) -> None:
    """Ray Train's per-worker loop: ``diffusion.finetune`` on this worker's shard, under
    DeepSpeed, with every rank reporting its checkpoint files to the same checkpoint."""
    import ray.train
    import ray.train.torch

    from srdistill.distill.diffusion import DiffusionParallel, build_backbone, finetune, load_encoded

    cfg: FinetuneConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    restored = ray.train.get_checkpoint()
    resume = Path(restored.to_directory()) if restored else None
    local = Path(tempfile.mkdtemp(prefix=f"srdistill-finetune-rank{rank}-"))
    if resume is not None and rank == 0:
        _keep_history(resume, local)

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        if rank == 0 and checkpoint_dir is not None:
            _keep_history(local, checkpoint_dir)
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    dp = DiffusionParallel(rank=rank, world_size=world, device=ray.train.torch.get_device(),
                           report=report, resume_from=resume)  # fmt: skip
    data = load_encoded(config["encoded"], shape=config["shape"], dtype=config["dtype"],
                        rank=rank, world_size=world)  # fmt: skip
    finetune(cfg, build_backbone(cfg, config["num_clusters"]), data, local, progress=False, dp=dp)


def finetune_ray(cfg: FinetuneConfig, encoded_dir: Path, out_dir: Path, *, num_clusters: int,
                 shape: tuple[int, ...], dtype: str, max_failures: int = 2,
                 checkpoint_uri: str | None = None, use_gpu: bool | None = None) -> Path:  # fmt: skip
    """Data-parallel ``diffusion.finetune`` on Ray Train: ``max(cfg.workers, 1)`` workers (gloo
    on CPU, NCCL on GPUs: ``use_gpu`` as ``train_ray``) under DeepSpeed ZeRO ``cfg.zero_stage``.
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
        ValueError: GPUs required on a cluster without GPUs (as ``train_ray``).
    """
    out_dir = Path(out_dir).resolve()
    gpu = _train_gpu(cfg, use_gpu, "finetune")
    config = {"cfg": cfg, "encoded": str(Path(encoded_dir).resolve()), "num_clusters": num_clusters,
              "shape": tuple(shape), "dtype": dtype}  # fmt: skip
    result = _fit(_finetune_worker, config, "finetune", out_dir, max(cfg.workers, 1), gpu, max_failures,
                  checkpoint_uri)
    with result.checkpoint.as_directory() as ckpt:
        if (out_dir / "model").exists():
            shutil.rmtree(out_dir / "model")
        shutil.copytree(Path(ckpt) / "model", out_dir / "model")
        _keep_history(Path(ckpt), out_dir)
    return out_dir / "model"


def synthesize_ray(model_dir: Path, cfg: SynthConfig, out_dir: Path, *, num_gpus: float | None = None,
                   placement: dict | None = None):  # fmt: skip
    """A ``map_fn`` for ``synthesis.synthesize`` that spreads the sampling jobs over
    ``cfg.num_actors`` Ray Data actors (``synthesis.Synthesizer``, ``cfg.actor_num_cpus`` CPUs
    and ``num_gpus`` GPUs each; None: ``cfg.actor_num_gpus`` when the cluster has GPUs and
    ``cfg.device`` allows, see ``actor_gpus``; actors without a GPU sample with ``device:
    cpu``). ``placement`` is updated with ``num_gpus`` and the ``gpu_ids`` the actors got.

    Raises:
        ValueError: ``cfg.device`` is ``cuda`` on a cluster without GPUs (``num_gpus`` None).
    """
    import ray.data

    from srdistill.distill.synthesis import Synthesizer

    cfg, num_gpus = _actor_cfg(cfg, num_gpus, "synthesize.device")

    def map_fn(jobs: dict[str, np.ndarray]) -> list[dict]:
        _ensure_ray()
        n = len(jobs["cluster"])
        blocks = max(1, min(n // cfg.batch_size, 4 * cfg.num_actors))
        ds = ray.data.from_items([{k: v[i] for k, v in jobs.items()} for i in range(n)],
                                 override_num_blocks=blocks)  # fmt: skip
        ds = ds.map_batches(
            _GpuTagged,
            fn_constructor_kwargs={"cls": Synthesizer,
                                   "kwargs": {"model_dir": str(model_dir), "cfg": cfg, "out_dir": str(out_dir)}},
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=cfg.actor_num_cpus,
            num_gpus=num_gpus,
        )
        rows, seen = [], set()
        with _progress(n, "synthesize", "img") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
                seen |= _seen_gpus(batch.pop("_gpu_ids"))
                rows += batch.to_dict("records")
                bar.update(len(batch))
        if placement is not None:
            placement.update(num_gpus=num_gpus, gpu_ids=sorted(seen))
        return rows

    return map_fn


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

    _ensure_ray()
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_single_threaded)
    refs = [task.remote(fn, x) for x in items]
    out = []
    with _progress(len(refs), "tasks", "task") as bar:
        for ref in refs:
            out.append(ray.get(ref))
            bar.update(1)
    return out
