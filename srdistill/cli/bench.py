"""``srdistill bench``: benchmarks that write their results to a folder (``bench quality``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from srdistill.cli.common import (_ADDRESS_HELP, _GPUS_HELP, _PRESET_HELP, _SET_HELP, Preset, Scale, _aliases,
                                  _check_scale, _config, _fail, _items, _ray_overrides, _stage_line)
from srdistill.config import Arch  # fmt: skip


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write their results to a folder.")


@bench_app.command("quality", cls=_aliases({"--datasets": "--dataset"}))
def bench_quality(
    out: Path = typer.Option(..., "--out", help="work folder (an existing one is resumed)"),
    preset: Optional[Preset] = typer.Option("bench", "--preset", help=_PRESET_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file"),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
    model: Optional[Arch] = typer.Option(None, "--model", help="the network every arm trains"),
    scale: Optional[Scale] = typer.Option(None, "--scale", help="SR scale (the preset's by default)"),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="training steps of every arm"),
    recipe: bool = typer.Option(False, "--recipe", help="the network's published training settings"),
    arms: Optional[list[str]] = typer.Option(None, "--arms", help="arms to run, repeatable or comma-separated "
                                             "(default: all)"),  # fmt: skip
    budgets: Optional[list[str]] = typer.Option(None, "--budgets", help="pixel % and/or ipcN, repeatable or "
                                                "comma-separated (1%,5%,ipc10)"),  # fmt: skip
    seeds: Optional[list[str]] = typer.Option(None, "--seeds", help="training seeds of every set, repeatable "
                                              "or comma-separated (0,1)"),  # fmt: skip
    draws: int = typer.Option(5, "--draws", min=1, help="sets drawn per stochastic arm and budget"),
    curve_every: Optional[int] = typer.Option(
        None, "--curve-every", min=1, help="PSNR on the curve set (Set5) every N training steps (a multiple of "
        "train.log_every); default: iterations/20 rounded to log_every"),  # fmt: skip
    corpus: Optional[list[str]] = typer.Option(None, "--corpus", help="datasets forming the corpus, names or "
                                               "folders, repeatable or comma-separated (T91,BSD200)"),  # fmt: skip
    datasets: Optional[list[str]] = typer.Option(None, "--dataset", help="evaluation sets, repeatable or "
                                                 "comma-separated (Set5,Set14,B100)"),  # fmt: skip
    allow_random_init: bool = typer.Option(False, "--allow-random-init",
                                           help="random-init CLIP for clip-kmeans (NOT semantic)"),  # fmt: skip
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help=_GPUS_HELP),
    gpus_per_run: Optional[float] = typer.Option(
        None, "--gpus-per-run", min=0.0, help="GPUs per training run (e.g. 0.25: four share a GPU); "
        "default: 1 when the cluster has GPUs, else 0"),  # fmt: skip
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
) -> None:
    """Distillation benchmark: arms x budgets x draws x seeds, same step budget; PSNR/SSIM with
    paired 95% intervals against full and random, training curves, plot."""
    from srdistill.run import runner
    from srdistill.run.benchmark import QualityBench, curves, markdown_table, plot, run_quality_bench, summarize
    from srdistill.sr.evaluation import evaluate

    _check_scale(scale)
    extra = [f"train.model={model}"] * bool(model) + [f"scale={scale}"] * (scale is not None)
    extra += [f"train.iterations={iterations}"] * (iterations is not None)
    extra += ["embed.allow_random_init=true", "complexity.allow_random_init=true"] * allow_random_init
    extra += _ray_overrides(gpus, address)
    if gpus == 0 or gpus_per_run == 0:  # runs without a GPU must not pick up one Ray does not hide
        extra += ["train.device=cpu", "evaluate.device=cpu"]
    cfg = _config(preset, config, [*overrides, *extra], recipe=recipe)
    given = {"corpus": corpus, "arms": arms, "budgets": budgets, "datasets": datasets}
    options = {k: tuple(_items(v)) for k, v in given.items() if v}
    if seeds:
        try:
            options["seeds"] = tuple(int(s) for s in _items(seeds))
        except ValueError:
            _fail(f"--seeds {','.join(seeds)!r}: give integers, e.g. 0,1,2")
    if curve_every is None:
        every = cfg.train.log_every
        curve_every = max(every, round(cfg.train.iterations / 20 / every) * every)
    options.update(draws=draws, curve_every=curve_every)
    try:
        bench = QualityBench(cfg, **options)
        runner.init_ray(cfg.ray)
        if gpus_per_run is None:
            gpus_per_run = 1.0 if runner.cluster_gpus(cfg.ray) > 0 else 0.0
            if not gpus_per_run:
                cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cpu"}),
                                             "evaluate": cfg.evaluate.model_copy(update={"device": "cpu"})})
                bench = QualityBench(cfg, **options)
        results = run_quality_bench(
            bench, out, map_fn=lambda f, jobs: runner.map_tasks(f, jobs, num_gpus=gpus_per_run),
            synth_map=runner.synthesize_ray, log=_stage_line,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    rows = summarize(results, bench.datasets)
    table = markdown_table(rows, bench.datasets)
    bicubic = evaluate("bicubic", bench.curve_dataset, cfg.scale)["psnr_y"]
    curve_budget = bench.budgets[0]
    curve_rows = curves(results, curve_budget, bicubic) if any(r["arm"] == "full" for r in results) else []
    plot(rows, bench.datasets, out / "quality.png", curve_rows)
    semantic = {r["clip_semantic"] for r in results if r["arm"] == "clip-kmeans"}
    notes = ["random-init CLIP: the clip-kmeans clusters are NOT semantic"] * (False in semantic)
    if any(r.get("vit_pretrained") is False for r in results):
        notes.append("random-init ViT: the tripled complexity scores and features are NOT learned")
    note = "; ".join(notes)
    command = "srdistill " + " ".join(sys.argv[1:])
    timing = ""
    if curve_rows:
        lines = [f"| {c['arm']} | {c['budget']} | {c['curve'][-1][1]:.2f} | {c['steps_to_target'] or 'not reached'} |"
                 for c in curve_rows]  # fmt: skip
        timing = (f"\n\nTraining time on {bench.curve_dataset} (bicubic {bicubic:.2f} dB): steps to reach "
                  f"{curve_rows[0]['target']:.2f} dB, 95% of full's final gain over bicubic (measured every "
                  f"{bench.curve_every} steps; mean curve over runs).\n\n| arm | budget | final (dB) | steps to 95% |\n"
                  "|---|---|---|---|\n" + "\n".join(lines))  # fmt: skip
    text = (f"Command: `{command}`\n\n{cfg.train.model} x{cfg.scale}, {cfg.train.iterations} steps per "
            f"arm; {bench.draws} sets per stochastic arm, each trained with seeds {list(bench.seeds)}; PSNR (dB, "
            "mean ± std over runs) / SSIM on Y; differences of the mean PSNR over the sets, paired by training "
            "seed, with 95% t-intervals over the independent sets (* significant, Holm-corrected per budget).\n"
            f"{note and '**' + note + '**'}\n\n{table}{timing}\n\n![PSNR vs budget](quality.png)\n")  # fmt: skip
    (out / "results.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"rows": rows, "curves": curve_rows, "bicubic": bicubic}, indent=2))
    typer.echo(text)
