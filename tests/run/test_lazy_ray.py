"""Issue 21: no fixed tax and every core busy. A run starts Ray only when a stage needs it, and
its shard plan comes from the corpus size and the cluster's CPUs; the plan is recorded, so a
run resumed on a cluster of another size keeps it (and the parts mined by it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import copy_t91

REPO = Path(__file__).resolve().parents[2]


def _run(corpus: Path, out: Path, *sets: str, until: str = "plan") -> dict:
    args = [sys.executable, "-m", "srdistill.cli", "run", "--input", str(corpus), "--out", str(out), "--preset",
            "tiny", "--until", until, *(a for s in sets for a in ("--set", s))]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "manifest.json").read_text())


def test_plan_needs_no_ray_and_resumes_on_another_cluster_size(tmp_path):
    corpus = copy_t91(tmp_path / "corpus", 5)
    out = tmp_path / "run"
    first = _run(corpus, out, "ray.num_cpus=2", "mine.images_per_shard=32")
    assert first["ray"] == {"mode": "none"}  # planning alone starts no Ray
    plan = first["stages"]["plan"]
    assert plan["counts"]["shards"] == 4 and plan["counts"]["min_shards"] == 4  # two per CPU, not one of 32
    again = _run(corpus, out, "ray.num_cpus=1", "mine.images_per_shard=32")  # would plan 2 shards afresh
    assert again["stages"]["plan"]["skipped"] is True
    assert again["stages"]["plan"]["counts"]["shards"] == 4  # the recorded plan is kept


def test_the_first_stage_that_needs_ray_starts_it_and_it_is_released_after(tmp_path):
    corpus = copy_t91(tmp_path / "corpus", 3)
    manifest = _run(corpus, tmp_path / "run", "ray.num_cpus=2", until="mine")
    ray = manifest["ray"]
    assert ray["mode"] == "local" and ray["resources"]["CPU"] == 2.0 and ray["start_seconds"] > 0
    assert manifest["stages"]["mine"]["counts"]["shards_mined_now"] == 3  # 3 images, 3 shards for 2 CPUs


def _embeddings(run: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(run / "embed" / "parts").sort_by("patch_id")
    emb = table.column("embedding").combine_chunks()
    return table.column("patch_id").to_pylist(), emb.values.to_numpy().reshape(len(emb), -1)


def test_embed_and_complexity_in_the_driver_need_no_ray_and_match_the_actors(tmp_path):
    import numpy as np

    corpus = copy_t91(tmp_path / "corpus", 4)
    mined = tmp_path / "mined"
    _run(corpus, mined, "ray.num_cpus=2", until="mine")
    runs = {}
    for actors in (0, 1):
        out = runs[actors] = tmp_path / f"actors_{actors}"
        shutil.copytree(mined, out)
        manifest = _run(corpus, out, f"embed.num_actors={actors}", "embed.allow_random_init=true", "ray.num_cpus=2",
                        until="cluster")
        assert manifest["placement"]["embed"]["on"] == ("driver" if actors == 0 else "ray-data-actors")
        assert manifest["stages"]["embed"]["counts"]["shards_embedded_now"] == 4
        if actors == 0:  # mine resumed, embed and cluster in this process: Ray never started
            assert manifest["ray"] == {"mode": "none"}
    scored = _run(corpus, runs[0], "complexity.num_actors=0", "select.method=tripled",
                  "complexity.allow_random_init=true", "ray.num_cpus=2", until="complexity")  # fmt: skip
    assert scored["placement"]["complexity"]["on"] == "driver" and scored["ray"] == {"mode": "none"}
    assert scored["stages"]["complexity"]["counts"]["shards_scored_now"] == 4
    ids0, emb0 = _embeddings(runs[0])
    ids1, emb1 = _embeddings(runs[1])
    assert ids0 == ids1 and len(ids0) > 0
    np.testing.assert_allclose(emb0, emb1, atol=1e-5)  # same code, same batches, another process
