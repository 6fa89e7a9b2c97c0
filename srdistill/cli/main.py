"""srdistill: dataset distillation for super-resolution. Run the main job, train, evaluate.

    srdistill run --input data/T91 --out runs/demo --preset demo --allow-random-init
    srdistill run --input data/T91 --out runs/synth --preset demo --distill synth --allow-random-init
    srdistill synthesize --model runs/synth/finetune/model --out runs/more --ipc 20
    srdistill eval --model bicubic --dataset Set5 --scale 2 --json
    srdistill train --input runs/demo/distilled --out runs/espcn --preset demo

One vocabulary across the commands: ``--input`` (what a command reads), ``--out`` (what it
writes), ``--iterations`` (steps of its training loop), ``--gpus``/``--workers`` (Ray),
``--config``/``--set`` (its config), ``--dataset`` (repeatable; ``Set5,Set14`` works too).
Options with fixed values list them in ``--help`` and are checked by the parser. A user
error is one line ``error: ...`` with exit code 2 (``--debug``: with its traceback). The old
spellings (``--data``, ``--datasets``, ``--zssr-iterations``, ...) still work for one
release, with a warning on stderr (``_aliases``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from srdistill.cli.bench import bench_app
from srdistill.cli.common import (_ADDRESS_HELP, _DEVICES, _GPUS_HELP, _INPUT_HELP, _MODEL_HELP, _OUT_HELP,
                                  _PRESET_HELP, _SET_HELP, _TENSORBOARD_HELP, _TRAIN_GPUS_HELP, Device, Distill,
                                  Preset, Sampler, Scale, Stage, _Group, _aliases, _check_model, _check_scale,
                                  _config, _fail, _items, _kernel, _main, _model_config, _ray_overrides, _run_log,
                                  _stage_line, _training_overrides)
from srdistill.cli.data import data_app
from srdistill.cli.kubernetes import k8s_app
from srdistill.cli.zero_shot import mzsr_app, zssr_app
from srdistill.config import Arch, SynthConfig, describe_error
from srdistill.run.rundir import STAGES

app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
app.callback()(_main)  # --version, --debug and the logging set-up of every command


@app.command()
def run(
    input: str = typer.Option(..., "--input", help=_INPUT_HELP),
    out: str = typer.Option(..., "--out", help=_OUT_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file"),
    config_json: Optional[str] = typer.Option(
        None, "--config-json", help="config as a JSON object, merged after --config (what the "
        "RayJobs of `srdistill k8s render` and the operator pass)"),  # fmt: skip
    preset: Optional[Preset] = typer.Option(None, "--preset", help=_PRESET_HELP),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
    allow_random_init: bool = typer.Option(
        False, "--allow-random-init",
        help="run with randomly initialised CLIP / ViT when no weights are found (clusters, "
        "complexity scores and ViT features are then NOT semantic/learned)",
    ),  # fmt: skip
    until: Optional[Stage] = typer.Option(None, "--until", metavar="STAGE",
                                          help="stop after this stage: " + ", ".join(STAGES)),
    distill: Optional[Distill] = typer.Option(
        None, "--distill", help="coreset: train on selected real patches; synth: on images "
        "synthesized by the cluster-conditioned diffusion model (SRDD)"),  # fmt: skip
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help=_GPUS_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", min=0,
                                          help="Ray Train workers of train and finetune (0: in-process)"),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
    tensorboard: bool = typer.Option(False, "--tensorboard", help=_TENSORBOARD_HELP),
) -> None:
    """Run mine -> embed -> cluster -> select (coreset) or encode -> finetune -> synthesize
    (synth) -> train -> evaluate -> report. Every stage runs on GPUs where the Ray cluster has
    them (``device: auto``), unless ``--gpus 0`` or its ``device: cpu``. Progress lines,
    warnings and Ray's own log lines are appended to OUT/run.log."""
    extra = _ray_overrides(gpus, address)
    extra += [f"{s}.workers={workers}" for s in ("train", "finetune")] * (workers is not None)
    extra += ["train.tensorboard=true", "finetune.tensorboard=true"] * tensorboard
    _pipeline("run", input, out, config, preset, [*overrides, *extra], allow_random_init, until, distill,
              config_json)  # fmt: skip


def _pipeline(command, input, out, config, preset, overrides, allow_random_init, until, distill,
              config_json=None) -> None:  # fmt: skip
    from srdistill.distill.embedding import MissingWeightsError
    from srdistill.run.pipeline import run_pipeline

    if allow_random_init:
        overrides = [*overrides, "embed.allow_random_init=true", "complexity.allow_random_init=true"]
    if distill is not None:
        overrides = [*overrides, f"distill={distill}"]
    try:
        data = json.loads(config_json) if config_json is not None else None
    except json.JSONDecodeError as exc:
        _fail(f"--config-json is not valid JSON: {exc}")
    from srdistill.run import runner

    cfg = _config(preset, config, overrides, data=data)
    ours = not runner.ray_is_up()  # a Ray this command starts, it stops (a caller's it leaves)
    try:
        with _run_log(command, input, out):
            run_pipeline(input, out, cfg, preset=preset, until=until, log=_stage_line)
    except (MissingWeightsError, OSError, ValueError, RuntimeError, ImportError) as exc:  # FileNotFoundError is an OSError
        _fail(str(exc))
    finally:
        if ours:
            runner.shutdown_ray()  # now: at exit Ray's own hook would wait 0.5 s more


@app.command()
def finetune(
    input: str = typer.Option(..., "--input", help=_INPUT_HELP),
    out: str = typer.Option(..., "--out", help=_OUT_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file"),
    preset: Optional[Preset] = typer.Option(None, "--preset", help=_PRESET_HELP),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1,
                                             help="fine-tuning steps (finetune.iterations)"),
    allow_random_init: bool = typer.Option(False, "--allow-random-init",
                                           help="random-init CLIP when no weights are found"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0,
                                          help="Ray Train workers (DeepSpeed); 0: in-process"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help=_TRAIN_GPUS_HELP + " (0: every stage on CPU)"),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
    tensorboard: bool = typer.Option(False, "--tensorboard", help=_TENSORBOARD_HELP),
) -> None:
    """Fine-tune the cluster-conditioned diffusion model of a run (mine -> embed -> cluster ->
    encode -> finetune); writes OUT/finetune/model and appends to OUT/run.log. It is `run
    --distill synth --until finetune`, so it takes no --until or --distill."""
    extra = _training_overrides("finetune", workers, gpus) + _ray_overrides(0 if gpus == 0 else None, address)
    extra += [f"finetune.iterations={iterations}"] * (iterations is not None)
    extra += ["finetune.tensorboard=true"] * tensorboard
    _pipeline("finetune", input, out, config, preset, [*overrides, *extra], allow_random_init, "finetune", "synth")


@app.command(cls=_aliases({"--actors": "--workers"}))
def synthesize(
    model: Path = typer.Option(..., "--model", help="fine-tuned model folder (RUN/finetune/model)"),
    out: Path = typer.Option(..., "--out", help="output folder (existing images are kept)"),
    ipc: Optional[int] = typer.Option(None, "--ipc", help="images per cluster (default: 10)"),
    clusters: Optional[list[str]] = typer.Option(None, "--clusters", help="cluster ids, repeatable or "
                                                 "comma-separated (default: all)"),  # fmt: skip
    sampler: Optional[Sampler] = typer.Option(None, "--sampler", help="default: ddim; ddpm: SRDD's release"),
    steps: Optional[int] = typer.Option(None, "--steps", help="sampling steps of the sampler (default: 50)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="classifier-free guidance scale (default: 4)"),
    guidance_channels: Optional[int] = typer.Option(
        None, "--guidance-channels", help="guide the first N noise channels only (all; 3: SRDD's release)"),
    vae: Optional[str] = typer.Option(None, "--vae", help="decoder VAE, a folder or Hugging Face id "
                                      "(the training VAE; SRDD's release: stabilityai/sd-vae-ft-mse)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="default: 0"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of SynthConfig fields (a run "
                                          "config's synthesize: section)"),  # fmt: skip
    overrides: list[str] = typer.Option([], "--set", help="override a SynthConfig value, e.g. --set "
                                        "batch_size=4 (repeatable); the options above win"),  # fmt: skip
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Ray Data sampling actors, a GPU each "
                                          "where the cluster has GPUs (default: 1)"),  # fmt: skip
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help=_GPUS_HELP),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
) -> None:
    """Synthesize IPC images per cluster from a fine-tuned model (PNGs + provenance.csv)."""
    from pydantic import ValidationError

    from srdistill.config import RayConfig
    from srdistill.distill.synthesis import resolve_decoder
    from srdistill.distill.synthesis import synthesize as run_synthesis
    from srdistill.run import runner

    cfg = _model_config(SynthConfig, config, overrides, sampler=sampler, steps=steps, guidance_scale=guidance,
                        guidance_channels=guidance_channels, vae_path=vae, ipc=ipc, seed=seed, num_actors=workers,
                        device="cpu" if gpus == 0 else None)  # fmt: skip
    ipc = cfg.ipc or 10
    cfg = cfg.model_copy(update={"ipc": ipc})
    try:
        ray_cfg = RayConfig(address=address, num_gpus=gpus)
    except ValidationError as exc:
        _fail(describe_error(exc, RayConfig))
    meta_file = model / "backbone.json"
    if not meta_file.is_file():
        _fail(f"--model {str(model)!r} is not a fine-tuned model (no backbone.json)")
    meta = json.loads(meta_file.read_text())
    k = meta["num_clusters"]
    try:
        ids = [int(c) for c in _items(clusters)] or list(range(k))
    except ValueError:
        _fail(f"--clusters {','.join(clusters)!r}: give cluster ids, integers 0 to {k - 1}")
    try:
        cfg = resolve_decoder(cfg, meta["kind"])  # on the driver: the actors read a local folder
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    runner.init_ray(ray_cfg)
    try:
        num_gpus = runner.actor_gpus(cfg.device, cfg.actor_num_gpus, runner.cluster_gpus(ray_cfg), "synthesize.device")
        rows = run_synthesis(model, cfg, out, dict.fromkeys(ids, ipc),
                             map_fn=runner.synthesize_ray(model, cfg, out, num_gpus=num_gpus))  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"{len(rows)} images in {out}")


@app.command(cls=_aliases({"--data": "--input"}))
def train(
    data: Path = typer.Option(..., "--input", help="folder of HR training images (e.g. a run's distilled/)"),
    out: Path = typer.Option(..., "--out", help="output folder (resumes from last.safetensors)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file"),
    preset: Optional[Preset] = typer.Option(None, "--preset", help=_PRESET_HELP),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
    model: Optional[Arch] = typer.Option(None, "--model", help="the network (train.model)"),
    scale: Optional[Scale] = typer.Option(None, "--scale", help="SR scale"),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="training steps (train.iterations)"),
    recipe: bool = typer.Option(False, "--recipe", help="the network's published settings "
                                "(config.RECIPES), under --config/--set/--iterations"),  # fmt: skip
    workers: Optional[int] = typer.Option(None, "--workers", min=0,
                                          help="Ray Train data-parallel workers (0: in-process)"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help=_TRAIN_GPUS_HELP + " (NCCL)"),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
    tensorboard: bool = typer.Option(False, "--tensorboard", help=_TENSORBOARD_HELP),
) -> None:
    """Train an SR network on a folder of HR images; writes OUT/model.safetensors. In-process
    (``device: auto``: the local GPU if any) or, with ``--workers``/``--gpus N``, on Ray Train."""
    from srdistill.sr.evaluation import list_images
    from srdistill.sr.training import train_sr

    _check_scale(scale)
    extra = [f"train.model={model}"] * bool(model) + [f"scale={scale}"] * (scale is not None)
    extra += [f"train.iterations={iterations}"] * (iterations is not None)
    extra += _training_overrides("train", workers, gpus) + _ray_overrides(None, address)
    extra += ["train.tensorboard=true"] * tensorboard
    cfg = _config(preset, config, [*overrides, *extra], recipe=recipe)
    if not data.is_dir():
        _fail(f"--input {str(data)!r} is not a directory")
    images = list_images(data)
    try:
        if cfg.train.tensorboard:  # before anything is written
            from srdistill.sr.training import require_tensorboard

            require_tensorboard("train.tensorboard")
        if cfg.train.workers:
            from srdistill.run import runner

            runner.init_ray(cfg.ray)
            path = runner.train_ray(cfg.train, cfg.scale, images, out)
        else:
            path = train_sr(cfg.train, cfg.scale, images, out)
    except (ValueError, ImportError) as exc:  # ImportError: --tensorboard without the package
        _fail(str(exc))
    typer.echo(f"model: {path}")


@app.command("eval", cls=_aliases({"--zssr-iterations": "--iterations"}))
def eval_(
    model: str = typer.Option("bicubic", "--model", help=_MODEL_HELP),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="official released weights of --model: a file, or an http(s) URL, "
        "optionally pinned as URL#sha256=HEX (downloaded once into $SRDISTILL_CACHE/weights)"),  # fmt: skip
    datasets: list[str] = typer.Option(
        ..., "--dataset", help="HR folder or benchmark name (Set5, Set14, B100); repeatable, or comma-separated"
    ),
    scale: Scale = typer.Option(..., "--scale", help="SR scale (a checkpoint's own)"),
    kernel: Optional[Path] = typer.Option(None, "--kernel", help="blur kernel file: LR = blur + direct "
                                          "subsampling (MZSR's protocol) instead of bicubic"),  # fmt: skip
    adapt_steps: int = typer.Option(0, "--adapt-steps", min=0, help="MZSR test-time adaptation steps per "
                                    "image (a meta-trained MZSR checkpoint, i.e. one with its MZSR config, "
                                    "and --kernel)"),  # fmt: skip
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="--model zssr: at most this many "
                                             "training steps per image (default: 3000)"),  # fmt: skip
    as_json: bool = typer.Option(False, "--json", help="one JSON object per dataset on stdout"),
    device: Device = typer.Option("auto", "--device", help="where the model runs"),
    save_images: Optional[Path] = typer.Option(None, "--save-images", help="write the SR images it scores "
                                               "as DIR/DATASET/NAME.png"),  # fmt: skip
) -> None:
    """PSNR/SSIM on Y (border = scale) of bicubic, a trained checkpoint, MZSR with per-image
    adaptation or ZSSR, on bicubic or kernel-degraded LR images; seconds per image."""
    from srdistill.sr.evaluation import evaluate, format_table

    if iterations is not None and model != "zssr":
        _fail(f"--iterations caps ZSSR's training (--model zssr), not --model {model!r}")
    k = _kernel(kernel) if kernel is not None else None
    net, label = _upscaler(model, scale, weights=weights, kernel=k, adapt_steps=adapt_steps,
                           zssr_iterations=iterations or 3000, device=device)  # fmt: skip
    rows = []
    for ds in _items(datasets):
        try:
            rows.append(evaluate(net, ds, scale, device=device, kernel=k, save_dir=save_images))
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
    if as_json:
        for r in rows:
            summary = {k: v for k, v in r.items() if k != "per_image"}
            print(json.dumps({"model": label, **summary, "per_image": r.get("per_image", [])}))
    else:
        degraded = f", LR = {kernel.name} blur + direct subsampling" if kernel is not None else ""
        typer.echo(f"PSNR / SSIM on Y, x{scale}, border = scale{degraded}")
        typer.echo(format_table({label: rows}))
        timing = ", ".join(f"{r['dataset']} {r['seconds_per_image']:.2f}" for r in rows)
        typer.echo(f"seconds per image: {timing}")


def _upscaler(model: str, scale: int, **kwargs):
    """``upscale.load_upscaler`` (``(model, label)``), its errors as exit 2."""
    from srdistill.run.upscale import load_upscaler

    _check_model(model)

    try:
        return load_upscaler(model, scale, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:  # FileNotFoundError and download failures are OSErrors
        _fail(str(exc))


@app.command()
def upscale(
    inputs: list[str] = typer.Argument(..., help="images: files, folders or s3:// prefixes (searched "
                                       "recursively)", metavar="INPUT"),  # fmt: skip
    model: str = typer.Option(..., "--model", help=_MODEL_HELP),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="official released weights of --model: a file, or an http(s) URL, "
        "optionally pinned as URL#sha256=HEX (downloaded once into $SRDISTILL_CACHE/weights)"),  # fmt: skip
    scale: Scale = typer.Option(..., "--scale", help="SR scale (a checkpoint's own)"),
    out: Path = typer.Option(..., "--out", help="output folder: OUT/NAME.png per image (SUB/NAME.png below a "
                             "folder input); never an input's own file"),  # fmt: skip
    tile: int = typer.Option(256, "--tile", min=0, help="LR tile side in pixels (bounded memory); 0 = whole image"),
    tile_overlap: Optional[int] = typer.Option(
        None, "--tile-overlap", min=0, help="LR pixels of context around each tile; default: the network's "
        "receptive-field radius, so tiles equal whole-image output (EDSR-baseline 36, ESPCN 4, MZSR x2 6); "
        "32 for RCAN and SwinIR, where tiles approximate it"),  # fmt: skip
    tile_batch: int = typer.Option(4, "--tile-batch", min=1, help="tiles per forward pass"),
    device: Device = typer.Option("auto", "--device", help="where the model runs"),
    half: bool = typer.Option(False, "--half", help="float16 autocast (CUDA only)"),
    kernel: Optional[Path] = typer.Option(None, "--kernel", help="blur kernel of the LR images (.mat, .npy or "
                                          "image), for MZSR's adaptation and ZSSR"),  # fmt: skip
    adapt_steps: int = typer.Option(0, "--adapt-steps", min=0, help="MZSR test-time adaptation steps per image "
                                    "(a meta-trained MZSR checkpoint and --kernel)"),  # fmt: skip
    iterations: int = typer.Option(3000, "--iterations", min=1, help="ZSSR: at most this many steps per image"),
) -> None:
    """Super-resolve images with a checkpoint, released weights or bicubic; PNGs named after the
    inputs. Large images go in overlapping tiles; an unreadable image is skipped and reported
    (exit code 1 when any was)."""
    from srdistill.run.upscale import upscale_files

    if device not in _DEVICES:
        _fail(f"--device {device!r} is not one of {', '.join(_DEVICES)}")
    _check_scale(scale)
    if half:
        from srdistill.sr.device import resolve_device

        try:
            resolved = resolve_device(device)
        except RuntimeError as exc:
            _fail(str(exc))
        if resolved.type != "cuda":
            _fail(f"--half needs CUDA (float16 autocast); --device {device} is the CPU here")
    if kernel is not None and model != "zssr" and not adapt_steps:
        _fail("--kernel is used by MZSR's adaptation (with --adapt-steps) and --model zssr only")
    k = _kernel(kernel) if kernel is not None else None
    net, label = _upscaler(model, scale, weights=weights, kernel=k, adapt_steps=adapt_steps,
                           zssr_iterations=iterations, device=device, subsample=None)  # fmt: skip
    try:
        report = upscale_files(net, inputs, out, scale, tile=tile, overlap=tile_overlap, batch=tile_batch, half=half)
    except (OSError, ValueError) as exc:  # FileNotFoundError is an OSError
        _fail(str(exc))
    n = len(report.written)
    typer.echo(f"{label} x{scale}: wrote {n} image{'s' * (n != 1)} to {out}")
    if report.skipped:
        typer.secho(f"skipped {len(report.skipped)} unreadable: "
                    + "; ".join(f"{uri} ({why})" for uri, why in report.skipped), err=True)  # fmt: skip
        raise typer.Exit(1)


app.add_typer(bench_app, name="bench")
app.add_typer(mzsr_app, name="mzsr")
app.add_typer(zssr_app, name="zssr")
app.add_typer(k8s_app, name="k8s")
app.add_typer(data_app, name="data")


def main() -> None:  # pragma: no cover - console entry
    app()
