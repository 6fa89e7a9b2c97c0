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

from conftest import T91

REPO = Path(__file__).resolve().parents[1]


def _run(corpus: Path, out: Path, *sets: str) -> dict:
    args = [sys.executable, "-m", "srdistill.cli", "run", "--input", str(corpus), "--out", str(out), "--preset",
            "tiny", "--until", "plan", *(a for s in sets for a in ("--set", s))]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "manifest.json").read_text())


def test_plan_needs_no_ray_and_resumes_on_another_cluster_size(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(T91.glob("*.png"))[:5]:
        shutil.copy(path, corpus / path.name)
    out = tmp_path / "run"
    first = _run(corpus, out, "ray.num_cpus=2", "mine.images_per_shard=32")
    assert first["ray"] == {"mode": "none"}  # planning alone starts no Ray
    plan = first["stages"]["plan"]
    assert plan["counts"]["shards"] == 4 and plan["counts"]["min_shards"] == 4  # two per CPU, not one of 32
    again = _run(corpus, out, "ray.num_cpus=1", "mine.images_per_shard=32")  # would plan 2 shards afresh
    assert again["stages"]["plan"]["skipped"] is True
    assert again["stages"]["plan"]["counts"]["shards"] == 4  # the recorded plan is kept
