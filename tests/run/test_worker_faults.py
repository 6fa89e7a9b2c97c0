"""Faults beyond the driver: a Ray worker process SIGKILLed in the middle of mining (a Ray Data
map task), of embedding (a Ray Data actor) and of a 2-worker Ray Train run; each run completes,
with outputs equal to an uninterrupted run's.

How the workers are killed: from outside, by a thread of the test that polls ``/proc`` for a
``ray::`` process whose title (Ray sets it per task/actor: ``ray::MapBatches(_call_worker)``
while a mining task runs, ``ray::MapWorker(MapBatches(_ShardWorker))...`` for an embedding actor,
``ray::RayTrainWorker...`` for a train worker) names the stage, once the stage's first output
exists (so the stage is under way and not finished), and SIGKILLs one of them once. No test hook
is needed in the product code. Ray recovers by itself: the task is retried (Ray Data's map
tasks), the actor restarted and its shard resubmitted (Ray Data's actor pool), the worker group
restarted from the last reported checkpoint (Ray Train's ``FailureConfig``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from conftest import T91, ray_pids

from srdistill import storage
from srdistill.config import RayConfig, TrainConfig, load_config
from srdistill.distill.mining import read_patches
from srdistill.run import runner
from srdistill.run.pipeline import run_pipeline

pytestmark = pytest.mark.slow
N_IMAGES = 12


def _tiny():
    sets = {"embed.allow_random_init": "true", "mine.images_per_shard": "1", "ray.num_cpus": "2"}
    return load_config("tiny", overrides=[f"{k}={v}" for k, v in sets.items()])


class _KillOnce:
    """A thread that, once ``ready()`` is true, SIGKILLs one process titled ``title...`` and
    records ``(pid, what_done())`` at that moment."""

    def __init__(self, title: bytes, ready: Callable[[], bool], done: Callable[[], object]):
        self.title, self.ready, self.done = title, ready, done
        self.killed: list[tuple[int, object]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.time() + 150
        while not self.stop.is_set() and time.time() < deadline and not self.killed:
            if self.ready():
                for pid in ray_pids(self.title):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.killed.append((pid, self.done()))
                    break
            time.sleep(0.01)

    def __enter__(self) -> "_KillOnce":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _parts(d: Path) -> int:
    return len(list(d.glob("part-*.parquet"))) if d.is_dir() else 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for f in sorted(T91.glob("*.png"))[:N_IMAGES]:
        shutil.copy(f, root / f.name)
    return root


@pytest.fixture(scope="module")
def clean_run(corpus, ray_local, tmp_path_factory) -> Path:
    """An uninterrupted run up to embedding: the reference."""
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    run_pipeline(corpus, run_dir, _tiny(), until="embed", log=lambda s: None)
    return run_dir


def _embeddings(run_dir: Path):
    return storage.read_dataset(str(run_dir / "embed" / "parts")).sort_by("patch_id")


def test_mining_worker_killed_mid_task_is_retried(corpus, clean_run, tmp_path):
    run_dir = tmp_path / "run"
    parts = run_dir / "mine" / "patches"
    with _KillOnce(b"ray::MapBatches(_call_worker)", lambda: _parts(parts) > 0, lambda: _parts(parts)) as k:
        manifest = run_pipeline(corpus, run_dir, _tiny(), until="mine", log=lambda s: None)
    assert k.killed, "no mining task was found running to kill"
    (pid, parts_then), = k.killed
    print(f"killed mining task pid {pid} with {parts_then}/{N_IMAGES} parts written")
    assert parts_then < N_IMAGES, "the kill came after mining had finished"
    # the killed task's shard was retried by Ray: every shard mined once, in this one call
    counts = manifest["stages"]["mine"]["counts"]
    assert counts["shards"] == counts["shards_mined_now"] == N_IMAGES == _parts(parts)
    got, want = read_patches(str(run_dir / "mine")), read_patches(str(clean_run / "mine"))
    ids = got.column("patch_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate patches"
    assert got.sort_by("patch_id").equals(want.sort_by("patch_id"))


def test_embedding_actor_killed_mid_stage_is_restarted(corpus, clean_run, tmp_path):
    run_dir = tmp_path / "run"
    parts = run_dir / "embed" / "parts"
    with _KillOnce(b"ray::MapWorker(MapBatches(_ShardWorker))", lambda: _parts(parts) > 0,
                   lambda: _parts(parts)) as k:  # fmt: skip
        manifest = run_pipeline(corpus, run_dir, _tiny(), until="embed", log=lambda s: None)
    assert k.killed, "no embedding actor was found to kill"
    (pid, parts_then), = k.killed
    print(f"killed embedding actor pid {pid} with {parts_then}/{N_IMAGES} parts written")
    assert parts_then < N_IMAGES, "the kill came after embedding had finished"
    assert _parts(parts) == N_IMAGES
    # the killed actor may have written its part just before dying: the retry then finds it done
    # (not counted as embedded now); every shard is there either way, and the outputs equal below
    assert manifest["stages"]["embed"]["counts"]["shards_embedded_now"] in (N_IMAGES - 1, N_IMAGES)
    got, want = _embeddings(run_dir), _embeddings(clean_run)
    ids = got.column("patch_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate embeddings"
    assert got.equals(want)  # the same random-init tiny CLIP on the same crops: bitwise equal


def _losses(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def _latest_checkpoint_step(storage_dir: Path) -> int:
    """The step of the latest checkpoint Ray Train's controller has registered (from its
    snapshot file), 0 before any."""
    try:
        snap = json.loads((storage_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@pytest.fixture
def own_ray(ray_local):
    """A local Ray of this test's own (2 CPUs): an actor that Ray Data restarted after a kill
    above, or a leftover of an earlier module, may still hold some of the shared Ray's CPUs,
    and the 2 Ray Train workers need both."""
    runner.shutdown_ray()
    runner.init_ray(RayConfig(num_cpus=2))
    yield


def test_ray_train_worker_killed_after_a_checkpoint_restarts_the_group(tmp_path, own_ray):
    """One of the 2 Ray Train workers SIGKILLed once the first checkpoint (step 4 of 8) is
    registered: the group restarts (``FailureConfig``) from it and finishes at step 8.

    Bitwise equality with an uninterrupted 8-step run cannot hold: on restart every rank
    reseeds its crop sampler from the restored step (``training.train_sr``: only rank 0's
    sampler state is saved), so steps 5-8 draw other crops than an uninterrupted run's. The
    guarantee asserted instead: same final step, the same checkpoint lineage, i.e. the run is
    bitwise the run stopped at step 4 and resumed by a rerun (same losses at every step, same
    final weights), and no step lost or repeated in the log."""
    import torch

    from srdistill.sr.training import load_checkpoint

    images = sorted(T91.glob("*.png"))[:6]
    cfg = dict(model="espcn", batch_size=8, lr_patch=16, lr=1e-3, workers=2, log_every=1, checkpoint_every=4)
    n, first = 8, 4
    # the reference: stopped at the first checkpoint, then resumed by a rerun
    ref = tmp_path / "reference"
    runner.train_ray(TrainConfig(iterations=first, **cfg), 2, images, ref)
    runner.train_ray(TrainConfig(iterations=n, **cfg), 2, images, ref)

    out = tmp_path / "killed"
    store = out / "ray_train" / "train"
    with _KillOnce(b"ray::RayTrainWorker", lambda: _latest_checkpoint_step(store) > 0,
                   lambda: _latest_checkpoint_step(store)) as k:  # fmt: skip
        path = runner.train_ray(TrainConfig(iterations=n, **cfg), 2, images, out)
    assert k.killed, "no Ray Train worker was found to kill"
    (pid, at_step), = k.killed
    print(f"killed Ray Train worker pid {pid}; latest registered checkpoint: step {at_step}")
    assert at_step == first, "the kill came after the second checkpoint"
    model, meta = load_checkpoint(path)
    ref_model, ref_meta = load_checkpoint(ref / "model.safetensors")
    assert meta["step"] == ref_meta["step"] == n
    got, want = _losses(out), _losses(ref)
    assert [step for step, _ in got] == list(range(1, n + 1))  # no step lost or repeated in the log
    assert got == want  # steps 1-4 from the first attempt, 5-8 resumed from step 4
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), name  # deterministic gloo on CPU: bitwise
