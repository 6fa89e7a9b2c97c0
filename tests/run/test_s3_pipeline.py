"""The pipeline against a real S3 server on loopback (moto's server mode): a whole run with input
and run directory in S3, injected faults, a Ray worker killed while mining, a driver killed
between stages, credentials kept out of every artifact, and a 10^5-URI manifest planned without
listing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_KEY_ID, FAKE_SECRET, T91, ray_pids

from srdistill import storage
from srdistill.config import MineConfig, RayConfig, load_config
from srdistill.corpus import plan_corpus, read_shard
from srdistill.distill.mining import mine_images, mine_shard, read_patches
from srdistill.run import runner
from srdistill.run.pipeline import run_pipeline

pytestmark = pytest.mark.slow
N_IMAGES = 6


def _tiny(**over):
    sets = {"embed.allow_random_init": "true", "mine.images_per_shard": "2", "ray.num_cpus": "2", **over}
    return load_config("tiny", overrides=[f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="module")
def ray_s3(s3_server):
    """A local Ray started after the S3 environment is set (workers inherit the credentials)."""
    runner.shutdown_ray()
    runner.init_ray(RayConfig(num_cpus=2))
    yield
    runner.shutdown_ray()


@pytest.fixture(scope="module")
def s3_corpus(s3_server) -> str:
    """Six T91 images and a truncated PNG under ``s3://bucket/corpus/`` (one in a sub-prefix)."""
    files = sorted(T91.glob("*.png"))[:N_IMAGES]
    for i, f in enumerate(files):
        key = f"corpus/{'sub/' if i == 0 else ''}{f.name}"
        s3_server.client.put_object(Bucket=s3_server.bucket, Key=key, Body=f.read_bytes())
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="corpus/corrupt.png",
                                Body=files[1].read_bytes()[:500])  # fmt: skip
    return s3_server.uri("corpus")


def _objects(s3, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = s3.client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read()
    return out


def _tables(run_uri: str) -> dict[str, pa.Table]:
    """The run's partitioned tables, sorted by patch id."""
    return {
        "patches": read_patches(storage.join(run_uri, "mine")).sort_by("patch_id"),
        "embeddings": storage.read_dataset(storage.join(run_uri, "embed", "parts")).sort_by("patch_id"),
        "assignments": storage.read_dataset(storage.join(run_uri, "cluster", "assignments")).sort_by("patch_id"),
    }


@pytest.fixture(scope="module")
def clean_run(s3_server, s3_corpus, ray_s3, tmp_path_factory) -> str:
    """One whole tiny run with input and run directory in S3, with a fresh local mirror."""
    os.environ["SRDISTILL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        run_pipeline(s3_corpus, s3_server.uri("runs/clean"), _tiny(), preset="tiny", log=lambda s: None)
    finally:
        os.environ.pop("SRDISTILL_CACHE")
    return s3_server.uri("runs/clean")


def test_whole_run_with_input_and_output_in_s3(s3_server, clean_run):
    manifest = storage.read_json(storage.join(clean_run, "manifest.json"))
    assert all(manifest["stages"][s]["status"] == "done"
               for s in ("plan", "mine", "embed", "cluster", "select", "train", "evaluate", "report"))  # fmt: skip
    assert manifest["input"] == s3_server.uri("corpus").rstrip("/")
    mine = manifest["stages"]["mine"]["counts"]
    assert mine["images_listed"] == N_IMAGES + 1 and mine["images_skipped"] == 1 and mine["shards"] == 4
    assert [s["file"] for s in manifest["skipped_inputs"]] == [s3_server.uri("corpus/corrupt.png")]
    keys = set(_objects(s3_server, "runs/clean/"))
    for want in ("manifest.json", "plan/files.parquet", "mine/keep.json", "mine/skipped.parquet",
                 "embed/meta.json", "cluster/centroids.npy", "select/selected.parquet", "distilled/provenance.csv",
                 "train/model.safetensors", "evaluate/results.json", "report/report.md"):  # fmt: skip
        assert f"runs/clean/{want}" in keys, want
    assert sum(k.startswith("runs/clean/mine/patches/part-") for k in keys) == 4
    assert not any("/." in k and not k.endswith("/.fingerprint") for k in keys), "temp objects left behind"
    # the patch ids are those of the same images mined from local disk (keys relative to the root)
    local = mine_images([str(p) for p in sorted(T91.glob("*.png"))[:N_IMAGES]], MineConfig(patch_size=64, stride=64))
    assert set(_tables(clean_run)["patches"].column("patch_id").to_pylist()) != set()
    mined = _tables(clean_run)["patches"]
    assert mined.num_rows == local.num_rows
    assert np.allclose(np.sort(mined.column("psnr_bic").to_numpy()), np.sort(local.column("psnr_bic").to_numpy()))


def test_credentials_absent_from_every_artifact(s3_server, clean_run, tmp_path):
    blobs = _objects(s3_server, "runs/clean/")
    assert blobs
    for key, data in blobs.items():
        for secret in (FAKE_SECRET, FAKE_KEY_ID):
            assert secret.encode() not in data, f"{secret[:4]}... found in s3://{s3_server.bucket}/{key}"


def test_injected_faults_leave_identical_outputs(faulty_s3, s3_corpus, clean_run, ray_s3, tmp_path, monkeypatch):
    """Every second, the next two connections get a 503, a reset or a drop (and live connections
    are cut) while the run works through the proxy; the SDK's retries absorb them and the
    outputs equal the clean run's. (A storm several times denser drains the AWS SDK's standard
    retry quota, by design, and the run then stops with an OSError naming the object; rerunning
    resumes.)"""
    monkeypatch.setenv("SRDISTILL_CACHE", str(tmp_path / "cache"))
    stop = threading.Event()
    injected = []

    def storm():
        kinds = ("503", "reset", "drop")
        while not stop.wait(1.0):
            injected.append(len(faulty_s3.proxy.faults()))
            faulty_s3.proxy.fail_next(2, kinds[len(injected) % 3])

    thread = threading.Thread(target=storm, daemon=True)
    thread.start()
    try:
        run_uri = faulty_s3.uri("runs/faulty")
        run_pipeline(faulty_s3.uri("corpus"), run_uri, _tiny(), until="cluster", log=lambda s: None)
    finally:
        stop.set()
        thread.join()
    assert sum(injected) >= 5, injected
    got, want = _tables(run_uri), _tables(clean_run)
    for name in want:
        assert got[name].equals(want[name]), name


def test_worker_killed_during_mining_loses_and_duplicates_nothing(tmp_path, ray_s3):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = sorted(T91.glob("*.png"))[:24]
    for f in files:
        shutil.copy(f, corpus / f.name)
    run_dir = tmp_path / "run"
    parts = run_dir / "mine" / "patches"
    killed: list[int] = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if parts.is_dir() and any(parts.glob("part-*.parquet")):
                for pid in ray_pids(b"ray::MapBatches"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    cfg = _tiny(**{"mine.images_per_shard": "1", "mine.psnr_bic_window": "patch"})  # slower shards
    manifest = run_pipeline(corpus, run_dir, cfg, until="mine", log=lambda s: None)
    thread.join()
    assert killed, "no mining worker was found to kill"
    table = read_patches(str(run_dir / "mine"))
    ids = table.column("patch_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate patches"
    want = mine_images([str(corpus / f.name) for f in files], cfg.mine, root=str(corpus))
    assert sorted(ids) == sorted(want.column("patch_id").to_pylist())
    assert manifest["stages"]["mine"]["counts"]["shards"] == len(files) == len(list(parts.glob("part-*.parquet")))


def test_driver_killed_between_stages_resumes_from_the_run_uri(s3_server, s3_corpus, ray_s3, tmp_path):
    run_uri = s3_server.uri("runs/killed")
    env = {**os.environ, "SRDISTILL_CACHE": str(tmp_path / "cache-a")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "srdistill.cli", "run", "--input", s3_corpus, "--out", run_uri, "--preset", "tiny",
         "--allow-random-init", "--set", "mine.images_per_shard=2", "--set", "ray.num_cpus=1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    manifest_uri = storage.join(run_uri, "manifest.json")
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                stages = storage.read_json(manifest_uri)["stages"]
            except (FileNotFoundError, ValueError):  # not yet; moto may serve a PUT in progress
                stages = {}
            if stages.get("mine", {}).get("status") == "done":
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("mining did not finish in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    parts_before = {k: v for k, v in _objects(s3_server, "runs/killed/mine/patches/").items()}
    lines: list[str] = []
    os.environ["SRDISTILL_CACHE"] = str(tmp_path / "cache-b")  # another machine: an empty local mirror
    try:
        manifest = run_pipeline(s3_corpus, run_uri, _tiny(**{"ray.num_cpus": "1"}), preset="tiny", log=lines.append)
    finally:
        os.environ.pop("SRDISTILL_CACHE")
    assert manifest["stages"]["mine"]["skipped"] is True
    assert any(line.startswith("[mine] up to date") for line in lines)
    assert manifest["stages"]["evaluate"]["status"] == "done"
    assert _objects(s3_server, "runs/killed/mine/patches/") == parts_before


def test_manifest_of_1e5_uris_is_planned_without_listing(s3_server, tmp_path, monkeypatch):
    """The plan reads the manifest only: with the S3 endpoint unreachable it still completes.
    Three of the URIs point at real images, which then mine; the others are recorded as missing."""
    real = sorted(T91.glob("*.png"))[:3]
    for f in real:
        s3_server.client.put_object(Bucket=s3_server.bucket, Key=f"big/{f.name}", Body=f.read_bytes())
    uris = [s3_server.uri(f"big/{f.name}") for f in real] + [s3_server.uri(f"big/missing/{i:06d}.png")
                                                              for i in range(100_000 - 3)]  # fmt: skip
    manifest = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"uri": uris}), manifest)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing answers
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    plan = plan_corpus(str(manifest), str(tmp_path / "plan.parquet"), extensions=(".png",), images_per_shard=1000)
    assert (plan.images, plan.shards, plan.source) == (100_000, 100, "manifest")
    assert read_shard(str(tmp_path / "plan.parquet"), 99).column("uri")[-1].as_py() == uris[-1]
    # S3 is unreachable (one attempt): a listing or a stat per object would have raised
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    cfg = MineConfig(patch_size=64, stride=64)
    plan_uri = str(tmp_path / "plan.parquet")
    small = tmp_path / "small.parquet"  # the first shard only, so the test stays fast
    pq.write_table(read_shard(plan_uri, 0).slice(0, 10), small, row_group_size=10)
    mine_shard(str(small), 0, str(tmp_path / "parts"), cfg)
    part = pq.read_table(tmp_path / "parts" / "part-000000.parquet")
    errors = part.column("error").to_pylist()
    assert set(part.filter(pa.compute.equal(part.column("error"), "")).column("source").to_pylist()) == set(uris[:3])
    assert errors.count("file not found") == 7


def test_ray_train_checkpoints_in_s3_resume_on_another_machine(s3_server, ray_s3, tmp_path):
    """``train_ray`` with its checkpoints at an S3 URI: a second call from an empty local folder
    (another driver machine) continues from the checkpoint in S3 (steps 7..9 only)."""
    from srdistill.config import TrainConfig
    from srdistill.sr.training import load_checkpoint

    images = sorted(T91.glob("*.png"))[:4]
    cfg = dict(model="espcn", batch_size=8, lr_patch=16, lr=1e-3, workers=2, log_every=1, checkpoint_every=3)
    ckpt = s3_server.uri("runs/ray-train/train/ray_train")
    runner.train_ray(TrainConfig(iterations=6, **cfg), 2, images, tmp_path / "a", checkpoint_uri=ckpt)
    assert any(k.endswith("last.safetensors") for k in _objects(s3_server, "runs/ray-train/train/ray_train/"))
    runner.train_ray(TrainConfig(iterations=9, **cfg), 2, images, tmp_path / "b", checkpoint_uri=ckpt)
    assert load_checkpoint(tmp_path / "b" / "model.safetensors")[1]["step"] == 9
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "resumed_from_step" not in r] == list(range(1, 10))  # the history came back
    assert [r["resumed_from_step"] for r in log if "resumed_from_step" in r] == [6]
