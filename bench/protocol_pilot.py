"""Which benchmark protocol can tell training sets apart? (issue 19, docs/RESULTS.md)

For each candidate setting (network, scale, steps), trains ``full`` (the whole corpus) and
``random`` at 1% of the corpus pixels (``--draws`` uniform draws), every set with the same
training seeds, and reports the paired gap ``random - full`` with its 95% t-interval, the
gap in units of its standard error, and the training time. The protocol whose gap is largest
and clearly significant leaves the most room for a selector to show; it must also fit a
working session.

    python bench/protocol_pilot.py --out runs/pilot --allow-random-init

All settings share one corpus and one mining (``--out``); results are cached per run like
``srdistill bench quality`` (a killed pilot resumes). Trainings run as single-threaded Ray
tasks, as many at once as the machine has cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from srdistill.config import load_config
from srdistill.run import runner
from srdistill.run.benchmark import QualityBench, run_quality_bench, summarize

EDSR_SLIM = {"n_resblocks": 4, "n_feats": 32}
#: name -> (scale, network, its constructor arguments, steps, LR crop side, learning rate)
SETTINGS = {
    "espcn-x2-4k": (2, "espcn", {}, 4000, 32, 1e-3),
    "espcn-x4-4k": (4, "espcn", {}, 4000, 24, 1e-3),
    "espcn-x4-12k": (4, "espcn", {}, 12000, 24, 1e-3),
    "edsr-slim-x2-4k": (2, "edsr-baseline", EDSR_SLIM, 4000, 32, 5e-4),
    "edsr-slim-x4-4k": (4, "edsr-baseline", EDSR_SLIM, 4000, 24, 5e-4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--budget", default="1%")
    ap.add_argument("--datasets", default="Set5,Set14,B100")
    ap.add_argument("--allow-random-init", action="store_true", help="(unused: full and random need no CLIP)")
    args = ap.parse_args()
    datasets = tuple(args.datasets.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    runner.init_ray(load_config("bench").ray)
    lines = ["| setting | params | steps | full (dB) | random - full (dB) [95% CI] | gap / s.e. | train min/run |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    report = {}
    for name in args.settings.split(","):
        scale, model, kwargs, steps, lr_patch, lr = SETTINGS[name]
        cfg = load_config("bench", overrides=[
            f"scale={scale}", f"train.model={model}", f"train.iterations={steps}", f"train.lr_patch={lr_patch}",
            f"train.lr={lr}", "train.schedule=cosine", "train.device=cpu", "evaluate.device=cpu",
            f"train.model_kwargs={json.dumps(kwargs)}"])  # fmt: skip
        bench = QualityBench(cfg, arms=("full", "random"), budgets=(args.budget,), seeds=seeds, draws=args.draws,
                             datasets=datasets)  # fmt: skip
        start = time.time()
        results = run_quality_bench(bench, args.out, map_fn=lambda f, jobs: runner.map_tasks(f, jobs),
                                    log=lambda s: print(s, flush=True))  # fmt: skip
        rows = {r["arm"]: r for r in summarize(results, datasets)}
        gap = rows["random"]["vs_full"]
        se = (gap["hi"] - gap["mean"]) / _t975(gap["n"]) if gap["lo"] is not None else float("nan")
        minutes = statistics.mean(r["train_s"] for r in results) / 60
        from srdistill.sr.models import build_model

        params = sum(p.numel() for p in build_model(model, scale, **kwargs).parameters())
        lines.append(f"| {name} | {params:,} | {steps} | {rows['full']['mean_psnr']:.2f} | "
                     f"{gap['mean']:+.3f} [{gap['lo']:+.3f}, {gap['hi']:+.3f}] | {gap['mean'] / se:+.1f} | "
                     f"{minutes:.1f} |")  # fmt: skip
        report[name] = {"rows": rows, "train_min": minutes, "wall_s": time.time() - start}
        print("\n".join(lines), flush=True)
    (args.out / "pilot.md").write_text("\n".join(lines) + "\n")
    (args.out / "pilot.json").write_text(json.dumps(report, indent=2, default=str))


def _t975(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


if __name__ == "__main__":
    main()
