"""``srdistill bench quality``: every arm end to end at toy size, resuming, result keys that
follow the training set's content, and the statistics (paired differences, t-intervals, Holm,
training curves) on hand-made results."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import T91
from srdistill.cli import app
from srdistill.config import load_config
from srdistill.run.benchmark import (
    ARMS, DETERMINISTIC, QualityBench, _holm, _parse_budget, _t_interval, curves, paired_differences,
    run_quality_bench, summarize,
)  # fmt: skip

TINY = ["embed.allow_random_init=true", "complexity.allow_random_init=true", "train.iterations=20"]


def test_budget_parsing():
    assert _parse_budget("5%") == {"pixel_fraction": 0.05}
    assert _parse_budget("0.5%") == {"pixel_fraction": 0.005}
    assert _parse_budget("ipc10") == {"ipc": 10}
    with pytest.raises(ValueError, match="neither"):
        _parse_budget("10")
    with pytest.raises(ValueError, match="arms"):
        QualityBench(load_config("tiny"), arms=("full", "magic"))
    with pytest.raises(ValueError, match="draws"):
        QualityBench(load_config("tiny"), draws=0)
    with pytest.raises(ValueError, match="multiple of train.log_every"):
        QualityBench(load_config("tiny"), curve_every=15)  # log_every 10


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "Tiny"
    folder.mkdir()
    for f in sorted(T91.glob("*.png"))[:6]:
        shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.slow
def test_quality_bench_runs_every_arm_draws_and_resumes(tmp_path, corpus, ray_local):
    cfg = load_config("tiny", overrides=TINY)
    bench = QualityBench(cfg, corpus=(str(corpus),), budgets=("ipc1",), seeds=(0,), draws=2, datasets=("Set5",),
                         curve_every=10)  # fmt: skip
    results = run_quality_bench(bench, tmp_path / "bench", log=lambda s: None)
    stochastic = [a for a in ARMS if a not in DETERMINISTIC]
    assert len(results) == len(DETERMINISTIC) + 2 * len(stochastic)
    assert {(r["arm"], r["draw"]) for r in results} == {(a, 0) for a in DETERMINISTIC} | {
        (a, d) for a in stochastic for d in (0, 1)}  # fmt: skip
    assert len({r["patches"] for r in results if r["arm"] not in ("full", "synth")}) == 1  # one budget
    assert all(20 < r["psnr_y"]["Set5"] < 45 and r["clip_semantic"] is False for r in results)
    assert all([s for s, _ in r["curve"]] == [10, 20] for r in results)  # Set5 every 10 steps
    assert all(r["curve"][-1][1] == pytest.approx(r["psnr_y"]["Set5"], abs=1e-6) for r in results)
    sets = {(r["arm"], r["draw"]): r["set"] for r in results}
    # draws of a stochastic arm are different sets; an aligned set differs from its source
    for arm in ("random", "random-thinned", "clip-kmeans", "kcenter", "stratified", "hard-mix", "tripled", "synth"):
        assert sets[arm, 0] != sets[arm, 1], arm
    assert sets["tripled", 0] == sets["tripled+curriculum", 0] != sets["tripled+align", 0]
    cur = next((tmp_path / "bench" / "models").glob("tripled+curriculum_ipc1_d0_s0_*"))
    assert '"curriculum_stage": 2' in (cur / "log.jsonl").read_text()

    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bench" / "results").glob("*.json")}
    again = run_quality_bench(bench, tmp_path / "bench", log=lambda s: None)  # resumes: trains nothing
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bench" / "results").glob("*.json")} == stamp
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)

    # another clustering (as another CLIP would give) changes the clip-kmeans sets, and only
    # those are trained again: results are keyed by the sets' content
    other = QualityBench(load_config("tiny", overrides=[*TINY, "cluster.seed=7"]), corpus=(str(corpus),),
                         arms=("random", "clip-kmeans"), budgets=("ipc1",), seeds=(0,), draws=2, datasets=("Set5",),
                         curve_every=10)  # fmt: skip
    lines = []
    fresh = run_quality_bench(other, tmp_path / "bench", log=lines.append)
    assert "[bench] 4 runs, 2 to do" in lines
    old = {(r["arm"], r["draw"]): r["set"] for r in results}
    assert all((old[r["arm"], r["draw"]] == r["set"]) == (r["arm"] == "random") for r in fresh)


@pytest.mark.slow
def test_bench_quality_cli_writes_intervals_and_curves(tmp_path, corpus, ray_local):
    out = tmp_path / "bench"
    r = CliRunner().invoke(app, ["bench", "quality", "--out", str(out), "--preset", "tiny", "--allow-random-init",
                                 "--iterations", "20", "--corpus", str(corpus), "--arms", "full,random,grad-topk",
                                 "--budgets", "20%", "--seeds", "0,1", "--draws", "3", "--dataset", "Set5"])  # fmt: skip
    assert r.exit_code == 0, r.output
    text = (out / "results.md").read_text()
    assert "vs random (dB) [95% CI]" in text and "| random | 20% |" in text and "| 3 x 2 |" in text
    assert "steps to 95%" in text and (out / "quality.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    rnd = next(row for row in summary["rows"] if row["arm"] == "random")
    assert rnd["vs_full"]["n"] == 3 and rnd["vs_full"]["lo"] <= rnd["vs_full"]["mean"] <= rnd["vs_full"]["hi"]
    assert [c["arm"] for c in summary["curves"]] == ["full", "random", "grad-topk"]
    assert len(list((out / "results").glob("*.json"))) == 1 * 2 + 3 * 2 + 1 * 2


def _run(arm, draw, seed, psnr, budget="1%"):
    return {"arm": arm, "budget": budget, "draw": draw, "seed": seed, "patches": 10, "pixel_fraction": 0.01,
            "psnr_y": {"A": psnr, "B": psnr + 1.0}, "ssim_y": {"A": 0.9, "B": 0.9}}  # fmt: skip


def test_paired_differences_pair_by_seed_and_draw():
    # seed effects (+0 / +0.5) are shared by both arms and cancel in the pairing
    rnd = [_run("random", d, s, 30.0 + 0.1 * d + 0.5 * s) for d in range(3) for s in (0, 1)]
    arm = [_run("kcenter", d, s, 30.2 + 0.1 * d + 0.5 * s) for d in range(3) for s in (0, 1)]
    assert paired_differences(arm, rnd, ("A", "B")) == pytest.approx([0.2, 0.2, 0.2])
    topk = [_run("grad-topk", 0, s, 30.4 + 0.5 * s) for s in (0, 1)]  # one set: paired with each draw
    assert paired_differences(topk, rnd, ("A", "B")) == pytest.approx([0.4, 0.3, 0.2])
    full = [_run("full", 0, s, 31.0 + 0.5 * s, "all") for s in (0, 1)]  # both deterministic: per seed
    assert paired_differences(topk, full, ("A",)) == pytest.approx([-0.6, -0.6])
    with pytest.raises(ValueError, match="share no training seed"):
        paired_differences(arm, [_run("random", 0, 5, 30.0)], ("A",))


def test_t_interval_and_holm():
    d = _t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert d["mean"] == pytest.approx(2.0)
    assert (d["lo"], d["hi"]) == pytest.approx((2 - 4.3027 / 3**0.5, 2 + 4.3027 / 3**0.5), abs=1e-3)
    assert d["p"] == pytest.approx(0.0741, abs=1e-3) and d["n"] == 3
    assert _t_interval([0.5])["lo"] is None
    # Holm at 5%: 0.01 <= 0.05/3 passes, 0.03 > 0.05/2 stops; None (no test) is never significant
    assert _holm([0.01, 0.04, 0.03, None]) == [True, False, False, False]
    assert _holm([0.001, 0.02, 0.04]) == [True, True, True]


def test_summarize_marks_significance_and_curves_find_the_steps():
    runs = [_run("full", 0, s, 32.0 + 0.01 * s, "all") for s in (0, 1)]
    runs += [_run("random", d, s, 31.0 + 0.01 * d + 0.02 * s) for d in range(5) for s in (0, 1)]
    runs += [_run("kcenter", d, s, 31.3 + 0.02 * d + 0.02 * s) for d in range(5) for s in (0, 1)]
    runs += [_run("stratified", d, s, 31.0 + (0.3 if d % 2 else -0.3) + 0.02 * s) for d in range(5) for s in (0, 1)]
    rows = {r["arm"]: r for r in summarize(runs, ("A", "B"))}
    assert rows["kcenter"]["vs_random"]["mean"] == pytest.approx(0.3 + 0.01 * 2)
    assert rows["kcenter"]["vs_random"]["significant"] and not rows["stratified"]["vs_random"]["significant"]
    assert rows["random"]["vs_full"]["significant"] and rows["random"]["vs_random"] is None
    assert rows["random"]["draws"] == 5 and rows["random"]["seeds"] == 2 and rows["full"]["vs_full"] is None

    for r in runs:  # curves: full reaches 32 at step 300; bicubic 30, so the 95% target is 31.9
        final = r["psnr_y"]["A"]
        r["curve"] = [[100, 30.5], [200, final - 0.05], [300, final]]
    view = {c["arm"]: c for c in curves(runs, "1%", bicubic=30.0)}
    assert list(view) == ["full", "random", "kcenter"]  # the best selection arm by final PSNR
    assert view["full"]["target"] == pytest.approx(30.0 + 0.95 * (32.005 - 30.0))
    assert view["full"]["steps_to_target"] == 200 and view["random"]["steps_to_target"] is None
    with pytest.raises(ValueError, match="no training curve"):
        curves([r for r in runs if r["arm"] != "full"], "1%", bicubic=30.0)
