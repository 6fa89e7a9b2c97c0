"""``srdistill bench quality`` end to end at toy size: every arm, two budgets, two seeds."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import T91
from srdistill.benchmark import QualityBench, _parse_budget, run_quality_bench, summarize
from srdistill.cli import app
from srdistill.config import load_config

pytestmark = pytest.mark.slow


def test_budget_parsing():
    assert _parse_budget("5%") == {"pixel_fraction": 0.05}
    assert _parse_budget("0.5%") == {"pixel_fraction": 0.005}
    assert _parse_budget("ipc10") == {"ipc": 10}
    with pytest.raises(ValueError, match="neither"):
        _parse_budget("10")
    with pytest.raises(ValueError, match="arms"):
        QualityBench(load_config("tiny"), arms=("full", "magic"))


def test_quality_bench_runs_every_arm_and_resumes(tmp_path, ray_local):
    corpus = tmp_path / "Tiny"
    corpus.mkdir()
    for f in sorted(T91.glob("*.png"))[:6]:
        shutil.copy(f, corpus / f.name)
    cfg = load_config("tiny", overrides=["embed.allow_random_init=true", "complexity.allow_random_init=true",
                                         "train.iterations=3"])  # fmt: skip
    bench = QualityBench(cfg, corpus=(str(corpus),), budgets=("20%", "ipc1"), seeds=(0, 1), datasets=("Set5",))
    results = run_quality_bench(bench, tmp_path / "bench", log=lambda s: None)
    assert len(results) == 2 + 9 * 2 * 2  # full once per seed; 9 arms x 2 budgets x 2 seeds
    by_arm = {(r["arm"], r["budget"]) for r in results}
    assert ("full", "all") in by_arm and ("clip-kmeans", "ipc1") in by_arm and ("grad-topk", "20%") in by_arm
    assert ("synth", "20%") in by_arm and (tmp_path / "bench" / "pipeline" / "finetune" / "model").is_dir()
    synth = [r for r in results if r["arm"] == "synth"]
    assert all(r["patches"] > 0 and r["pixel_fraction"] > 0 for r in synth)
    ipc = [r for r in results if r["budget"] == "ipc1"]
    assert len({r["patches"] for r in ipc}) == 1  # every arm gets the same budget
    assert all(20 < r["psnr_y"]["Set5"] < 45 for r in results)
    assert all(r["clip_semantic"] is False for r in results)
    # every set but the corpus itself is measured by its ViT feature distance to the corpus
    assert all((r["feature_mmd"] is None) == (r["arm"] == "full") for r in results)
    assert all(r["vit_pretrained"] is False for r in results)
    tri = {r["arm"]: r for r in results if r["arm"].startswith("tripled") and r["budget"] == "ipc1" and r["seed"] == 0}
    assert len(tri) == 4 and len({r["patches"] for r in tri.values()}) == 1
    assert tri["tripled"]["feature_mmd"] == tri["tripled+curriculum"]["feature_mmd"]  # the same set
    assert tri["tripled"]["feature_mmd"] != tri["tripled+align"]["feature_mmd"]  # transformed by the CNN
    aligned = next((tmp_path / "bench" / "sets").glob("*_tripled+align_ipc1"))
    assert (aligned / "align.json").is_file()
    assert len(list(aligned.glob("*.png"))) == tri["tripled+align"]["patches"]
    cur = next((tmp_path / "bench" / "models").rglob("*_tripled+curriculum_ipc1_seed0"))
    assert '"curriculum_stage": 2' in (cur / "log.jsonl").read_text()

    rows = summarize(results, ("Set5",))
    full = next(r for r in rows if r["arm"] == "full")
    assert full["gap_to_full"] == 0 and full["seeds"] == 2
    rnd = next(r for r in rows if r["arm"] == "random" and r["budget"] == "20%")
    assert rnd["gain_over_random"] == 0

    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bench" / "results").rglob("*.json")}
    again = run_quality_bench(bench, tmp_path / "bench", log=lambda s: None)  # resumes: trains nothing
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bench" / "results").rglob("*.json")} == stamp
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)

    r = CliRunner().invoke(app, ["bench", "quality", "--out", str(tmp_path / "bench"), "--preset", "tiny",
                                 "--allow-random-init", "--iterations", "3", "--corpus", str(corpus),
                                 "--budgets", "20%,ipc1", "--seeds", "0,1", "--dataset", "Set5"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "bench" / "quality.png").is_file()
    text = (tmp_path / "bench" / "results.md").read_text()
    assert "NOT semantic" in text and "| clip-kmeans | ipc1 |" in text
    assert "NOT learned" in text and "MMD² to corpus" in text and "| tripled+align+curriculum | ipc1 |" in text
    assert len(list((tmp_path / "bench" / "results").rglob("*.json"))) == len(results)  # reused

    other = QualityBench(cfg.model_copy(update={"train": cfg.train.model_copy(update={"iterations": 4})}),
                         corpus=(str(corpus),), arms=("full",), budgets=("ipc1",), seeds=(0,), datasets=("Set5",))
    fresh = run_quality_bench(other, tmp_path / "bench", log=lambda s: None)
    assert fresh[0]["iterations"] == 4  # another step budget: trained anew, not the 3-step result
