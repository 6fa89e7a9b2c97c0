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

import difflib
import json
import logging
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Literal, Optional, Union, get_args

import typer
from typer.core import TyperCommand, TyperGroup

try:  # a recent typer has its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - a typer built on the click package
    from click.exceptions import NoArgsIsHelpError, UsageError

from srdistill.config import (Arch, MZSRConfig, RayConfig, RunConfig, SynthConfig, describe_error, load_config,
                              preset_names, read_yaml_mapping)  # fmt: skip
from srdistill.run.rundir import STAGES

#: Options with fixed values (``Literal``: typer lists them in --help and rejects others).
Device = Literal["auto", "cpu", "cuda"]
#: The scales every network here builds (EDSR and RCAN: 2, 3, 4, 8); a checkpoint's own must match.
Scale = Literal[2, 3, 4, 8]
Distill = Literal[get_args(RunConfig.model_fields["distill"].annotation)]
Sampler = SynthConfig.model_fields["sampler"].annotation
Stage = Literal[STAGES]
Preset = Literal[tuple(preset_names())]
Subsample = MZSRConfig.model_fields["subsample"].annotation
#: ``eval``/``upscale --model`` names (any other value must be an existing checkpoint file).
MODEL_NAMES = ("bicubic", "zssr", *get_args(Arch))


def _usage_message(exc: UsageError) -> str:
    """Click's message of a usage error, a wrong choice as ``--device 'tpu' is not one of:
    auto, cpu, cuda; did you mean ...?``."""
    message = exc.format_message().replace("Value error, ", "")
    m = re.fullmatch(r"Invalid value for '([^']+)': '(.*)' is not one of (.*?)\.?", message, re.S)
    if m is None:
        return message
    choices = [c.strip().strip("'") for c in m.group(3).split(",")]
    close = difflib.get_close_matches(m.group(2), choices, n=1)
    return f"{m.group(1)} {m.group(2)!r} is not one of: {', '.join(choices)}" + (
        f"; did you mean {close[0]!r}?" if close else "")  # fmt: skip


@contextmanager
def _one_line_usage_errors():
    """A usage error (unknown or missing option, bad value or choice) as one line on stderr,
    exit code 2, like ``_fail``; ``srdistill GROUP`` alone still prints the group's help."""
    try:
        yield
    except NoArgsIsHelpError:
        raise
    except UsageError as exc:
        typer.secho(f"error: {_usage_message(exc)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


class _Group(TyperGroup):
    """The root command group: usage errors of every command below it in one line."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


def _aliases(renames: dict[str, Union[str, Callable[[list[str]], str]]]) -> type[TyperCommand]:
    """A command class (``@app.command(cls=...)``) that still takes the old option spellings
    ``renames`` (old -> new, or a function of the arguments giving the new one) for one
    release: rewritten before parsing (``--old V`` and ``--old=V``), with a deprecation
    warning on stderr; they are not in ``--help``."""

    class Aliased(TyperCommand):
        aliases = renames

        def parse_args(self, ctx, args):
            out = []
            for i, arg in enumerate(args):
                if arg == "--":
                    out += args[i:]
                    break
                name, eq, value = arg.partition("=")
                if name in renames:
                    new = renames[name] if isinstance(renames[name], str) else renames[name](args)
                    typer.secho(f"warning: {name} is deprecated and goes in the next release: use {new}",
                                fg=typer.colors.YELLOW, err=True)  # fmt: skip
                    arg = new + eq + value
                out.append(arg)
            return super().parse_args(ctx, out)

    return Aliased


def _items(values: Optional[list[str]]) -> list[str]:
    """A repeatable list option's values, each also split at commas (``--dataset Set5,Set14``);
    a value naming an existing file or folder is kept whole."""
    out: list[str] = []
    for value in values or []:
        out += [value] if Path(value).exists() else [v.strip() for v in value.split(",") if v.strip()]
    return out


class _Stderr(logging.StreamHandler):
    """A handler writing to ``sys.stderr`` as it is at each record (a test runner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _is_ray(record: logging.LogRecord) -> bool:
    return record.name == "ray" or record.name.startswith("ray.")


def _setup_logging() -> None:
    """Console logging of a command: warnings of any library on stderr as ``WARNING: ...``,
    Ray's records only from ERROR (``runner.route_ray_logs`` sends them to the root logger;
    a run's ``run.log`` keeps them all, ``_run_log``); our own loggers record INFO (for run.log)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(handler)
    handler = _Stderr()
    handler.setLevel(logging.WARNING)
    handler.addFilter(lambda record: record.levelno >= logging.ERROR or not _is_ray(record))
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(handler)
    logging.getLogger("srdistill").setLevel(logging.INFO)


class _RunLog(logging.Handler):
    """Appends records to ``path`` (a run's ``run.log``) once its folder exists (the pipeline
    makes it after its preflight checks, so a rejected run leaves nothing); records before
    that are held until then. Ours and Ray's from INFO, any other library's from WARNING."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.path, self.held, self.file = path, [], None
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.addFilter(lambda r: r.levelno >= logging.WARNING or _is_ray(r) or r.name.startswith("srdistill"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.held.append(self.format(record) + "\n")
            if self.file is None and self.path.parent.is_dir():
                self.file = open(self.path, "a", encoding="utf-8")
            if self.file is not None:
                self.file.writelines(self.held)
                self.file.flush()
                self.held.clear()
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


#: The pipeline's progress lines (``_stage_line``) in ``run.log``.
_RUN = logging.getLogger("srdistill.run")


@contextmanager
def _run_log(command: str, input: str, out: str):
    """``OUT/run.log`` while a pipeline command runs: its stage lines, warnings and Ray's
    driver log lines, appended per invocation (an ``s3://`` run: in its local mirror, uploaded
    at the end)."""
    from srdistill import __version__, storage
    from srdistill.run.rundir import local_mirror

    path = local_mirror(out) / "run.log"
    handler = _RunLog(path)
    root = logging.getLogger()
    root.addHandler(handler)
    _RUN.info("srdistill %s %s --input %s --out %s", __version__, command, input, out)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        if storage.is_s3(out) and path.is_file():
            try:
                storage.write_text(storage.join(out, "run.log"), path.read_text())
            except OSError as exc:
                typer.secho(f"WARNING: run.log not uploaded to {out}: {exc}", err=True)


def _stage_line(line: str) -> None:
    """A progress line of a command (the pipeline's ``log``): on stdout, a warning (``WARNING:``,
    ``warning:``) on stderr; and in ``run.log`` when the command writes one."""
    typer.echo(line, err=line.lower().startswith("warning"))
    _RUN.info(line)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])


def _print_version(value: bool) -> None:
    if value:
        from srdistill import __version__

        typer.echo(f"srdistill {__version__}")
        raise typer.Exit()


#: ``--debug``: errors that end a command also print their traceback.
_DEBUG = False


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print the version and exit"),  # fmt: skip
    debug: bool = typer.Option(False, "--debug", help="print the traceback of an error (user errors "
                               "are otherwise one or two lines, exit code 2)"),  # fmt: skip
) -> None:
    """srdistill: dataset distillation for super-resolution."""
    global _DEBUG
    _DEBUG = debug
    _setup_logging()

_INPUT_HELP = ("HR corpus: a folder or s3:// prefix of images (searched recursively), or a manifest file of "
               "image URIs (.parquet/.csv/.txt)")
_OUT_HELP = "run directory, local or s3:// (an existing one is resumed)"
_PRESET_HELP = "bundled preset: " + ", ".join(preset_names())
_SET_HELP = "override a config value, e.g. --set train.iterations=500 (repeatable)"
#: The same spelling on every command that starts Ray (docs/USAGE.md, "Commands").
_GPUS_HELP = ("GPUs Ray may use: a local Ray gets N, a joined cluster is counted on having N (e.g. while "
              "its GPU nodes are scaled to zero); 0 = CPU only; default: the GPUs the cluster has")
_TRAIN_GPUS_HELP = ("GPUs to train on, one per Ray Train worker (--workers defaults to N and must equal it); "
                    "0 = CPU only; default: GPUs when the Ray cluster has them")
_ADDRESS_HELP = ("join the Ray cluster at this address (ray.address; default $RAY_ADDRESS, else a new local "
                 "Ray, never a cluster that a `ray start` left on this machine)")


_DEVICES = get_args(Device)
_MODEL_HELP = (f"a srdistill .safetensors checkpoint, or one of: bicubic (MATLAB's), zssr (with --kernel), "
               f"{', '.join(get_args(Arch))} (with --weights)")


def _check_scale(scale: Optional[int]) -> None:
    """``--scale`` of a command: one of ``Scale``, else exit 2 (the parser checks a ``Scale`` option)."""
    if scale is not None and scale not in get_args(Scale):
        _fail(f"--scale {scale} is not one of: {', '.join(map(str, get_args(Scale)))}")


def _check_model(model: str) -> None:
    """``--model`` of eval/upscale: one of ``MODEL_NAMES`` or an existing checkpoint file
    (``s3://`` ones are checked on reading), else exit 2."""
    if model not in MODEL_NAMES and not model.startswith("s3://") and not Path(model).is_file():
        close = difflib.get_close_matches(model, MODEL_NAMES, n=1)
        _fail(f"--model {model!r} is neither a checkpoint file nor one of: {', '.join(MODEL_NAMES)}"
              + (f"; did you mean {close[0]!r}?" if close else ""))  # fmt: skip


def _fail(message: str) -> None:
    """Exit 2 with ``error: message`` on stderr; with ``--debug``, after the traceback of the
    exception being handled (if any)."""
    if _DEBUG and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _config(preset, config, overrides, *, recipe: bool = False, data: dict | None = None):
    try:
        return load_config(preset, config, overrides, recipe=recipe, data=data)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        _fail(describe_error(exc))


_TENSORBOARD_HELP = "also write TensorBoard event files (STAGE/tensorboard/; needs the tensorboard extra)"


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


def _ray_overrides(gpus: Optional[int], address: Optional[str]) -> list[str]:
    """``--gpus``/``--address`` as ``ray.*`` overrides (``RayConfig``)."""
    return [f"ray.num_gpus={gpus}"] * (gpus is not None) + [f"ray.address={json.dumps(address)}"] * bool(address)


def _training_overrides(section: str, workers: Optional[int], gpus: Optional[int]) -> list[str]:
    """``--workers``/``--gpus`` of a training command as overrides of ``section`` (``train``,
    ``finetune``, or MZSR's top level ``""``): ``--gpus 0`` is CPU only (``use_gpu`` false,
    ``device`` cpu); ``--gpus N`` is N Ray Train workers with a GPU each (``--workers``, if
    given, must be N); no ``--gpus`` leaves ``use_gpu`` to its config (auto by default)."""
    key = f"{section}." if section else ""
    if gpus is not None and gpus > 0:
        if workers is not None and workers != gpus:
            _fail(f"--gpus {gpus} trains on {gpus} GPUs, one per Ray Train worker: leave out --workers "
                  f"or give --workers {gpus} (got {workers})")  # fmt: skip
        return [f"{key}workers={gpus}", f"{key}use_gpu=true"]
    out = [f"{key}workers={workers}"] * (workers is not None)
    if gpus == 0:
        out += [f"{key}use_gpu=false", f"{key}device=cpu"]
    return out


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


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write their results to a folder.")
app.add_typer(bench_app, name="bench")


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


mzsr_app = typer.Typer(no_args_is_help=True, help="MZSR: meta-transfer learning for zero-shot SR.")
app.add_typer(mzsr_app, name="mzsr")
zssr_app = typer.Typer(no_args_is_help=True, help="Zero-shot SR of one image: MZSR adaptation or ZSSR.")
app.add_typer(zssr_app, name="zssr")
_MZSR_SET_HELP = "override an MZSRConfig value, e.g. --set meta_iterations=2000 (repeatable)"


def _model_config(model, config: Optional[Path], overrides: list[str], base: Optional[dict] = None, **fixed):
    """A config ``model`` (``MZSRConfig``, ``SynthConfig``) from ``base`` (e.g. a checkpoint's),
    a YAML file of its fields, ``--set`` overrides and the CLI options given (not None), each
    over the one before; a bad value is exit 2 naming the field."""
    from srdistill.config import _deep_merge, parse_override

    try:
        data = dict(base or {})
        if config is not None:
            data = _deep_merge(data, read_yaml_mapping(config))
        for item in overrides:
            data = _deep_merge(data, parse_override(item, model))
        data.update({k: v for k, v in fixed.items() if v is not None})
        return model.model_validate(data)
    except ValueError as exc:
        _fail(describe_error(exc, model))


def _mzsr_config(config: Optional[Path], overrides: list[str], base: Optional[dict] = None, **fixed):
    """``_model_config`` of ``MZSRConfig``."""
    return _model_config(MZSRConfig, config, overrides, base, **fixed)


def _kernel(path: Path):
    from srdistill.sr.degradation import load_kernel

    try:
        return load_kernel(path)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        _fail(str(exc))


@mzsr_app.command("train", cls=_aliases({"--data": "--input"}))
def mzsr_train(
    inputs: list[str] = typer.Option(..., "--input", help="folder of HR training images (a corpus or "
                                     "a run's distilled/ set); repeatable, or comma-separated"),  # fmt: skip
    out: Path = typer.Option(..., "--out", help="work folder (an existing one is resumed)"),
    scale: Optional[Scale] = typer.Option(None, "--scale", help="SR scale (MZSRConfig.scale, default 2)"),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="bicubic-pretrained mzsr "
                                              "checkpoint; without it one is trained first"),  # fmt: skip
    pretrain_iterations: int = typer.Option(20_000, "--pretrain-iterations", min=1,
                                            help="steps of the bicubic pretraining (RECIPES['mzsr'])"),  # fmt: skip
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="meta-training steps "
                                             "(MZSRConfig.meta_iterations)"),  # fmt: skip
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of MZSRConfig fields"),
    overrides: list[str] = typer.Option([], "--set", help=_MZSR_SET_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", min=0,
                                          help="Ray Train data-parallel workers; 0 = in-process"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help=_TRAIN_GPUS_HELP),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
) -> None:
    """Bicubic pretraining (L1, Adam 4e-4), then meta-transfer learning over random anisotropic
    Gaussian kernels (MZSR, arXiv 2002.12213). Writes OUT/pretrain/ and OUT/meta/; the result
    is OUT/mzsr.safetensors. Its settings are MZSRConfig's (--config, --set), which the run
    presets do not carry: there is no --preset here."""
    import shutil

    from srdistill.config import RECIPES, TrainConfig
    from srdistill.sr.evaluation import list_images

    cfg = _mzsr_config(config, [*overrides, *_training_overrides("", workers, gpus)], scale=scale,
                       meta_iterations=iterations)  # fmt: skip
    scale = cfg.scale
    data = [Path(d) for d in _items(inputs)]
    images = [str(p) for d in data for p in (list_images(d) if d.is_dir() else [])]
    missing = [str(d) for d in data if not d.is_dir()]
    if missing or not images:
        _fail(f"no HR images in {missing or [str(d) for d in data]}")
    from srdistill.run import runner
    from srdistill.sr.training import train_sr
    from srdistill.zeroshot.mzsr import meta_train

    workers = cfg.workers
    if workers:
        runner.init_ray(RayConfig(address=address))
    try:
        if pretrained is None:
            pre = TrainConfig(**{**RECIPES["mzsr"], "model": "mzsr", "iterations": pretrain_iterations,
                                 "workers": workers, "use_gpu": cfg.use_gpu, "device": cfg.device})  # fmt: skip
            train = runner.train_ray if workers else train_sr
            pretrained = train(pre, scale, images, out / "pretrain")
        meta = runner.meta_train_ray if workers else meta_train
        model = meta(cfg, images, out / "meta", init=str(pretrained))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    shutil.copy2(model, out / "mzsr.safetensors")
    typer.echo(f"wrote {out / 'mzsr.safetensors'} (pretrained: {pretrained})")


@mzsr_app.command("import-tf")
def mzsr_import_tf(
    prefix: Path = typer.Argument(..., help="TensorFlow checkpoint prefix, e.g. MZSR/Model/Directx2 (for "
                                  "Directx2.index + Directx2.data-00000-of-00001), one of its files, or its "
                                  "folder"),  # fmt: skip
    out: Path = typer.Option(..., "--out", help="the .safetensors file to write"),
    scale: Optional[Scale] = typer.Option(None, "--scale", help="SR factor; known for the released Directx2, "
                                          "Bicubicx2, Pretrained (2) and Directx4 (4); needed otherwise"),  # fmt: skip
    stage: Literal["auto", "meta", "pretrained"] = typer.Option(
        "auto", "--stage", help="meta (meta-trained: adapts per image), pretrained (the bicubic pretraining: an "
        "init for `mzsr train --pretrained`) or auto (from the released name)"),  # fmt: skip
    subsample: Optional[Subsample] = typer.Option(None, "--subsample", help="the subsampling the model was "
                                                  "meta-trained for (known for the released models)"),  # fmt: skip
    scope: str = typer.Option("MODEL", "--scope", help="variable scope of the conv{k}/kernel|bias variables"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of MZSRConfig fields"),
    overrides: list[str] = typer.Option([], "--set", help=_MZSR_SET_HELP + "; e.g. adapt_lr=[0.01,0.005]"),
) -> None:
    """Convert a TensorFlow checkpoint of JWSoh/MZSR (Model/Directx2, Directx4, Bicubicx2,
    Multi-scale; Pretrained/Pretrained) into an srdistill mzsr checkpoint, without TensorFlow.
    The settings each released model was published with (scale, subsampling, test-time
    learning rates) are recorded with it; options, --config and --set override them."""
    from srdistill.zeroshot import mzsr, tfbundle

    try:
        resolved = tfbundle.resolve_prefix(prefix)
    except FileNotFoundError as exc:
        _fail(str(exc))
    known = dict(mzsr.RELEASED_TF.get(resolved.name, {}))
    if stage == "auto" and not known:
        _fail(f"{resolved.name!r} is not a released MZSR model ({', '.join(mzsr.RELEASED_TF)}): "
              "give --stage meta or --stage pretrained")  # fmt: skip
    released_meta = known.pop("meta_trained", True)
    meta_trained = released_meta if stage == "auto" else stage == "meta"
    scale = scale if scale is not None else known.pop("scale", None)
    if scale is None:
        _fail(f"give --scale: the scale of {resolved.name!r} is not known from its name")
    base = {k: v for k, v in known.items() if k != "scale"}
    if 64 % scale:  # hr_patch/zssr_crop (meta-training/ZSSR only) must be multiples of the scale
        base.update(hr_patch=scale * (64 // scale), zssr_crop=scale * (128 // scale))
    cfg = _mzsr_config(config, overrides, base=base, scale=scale, subsample=subsample)
    try:
        path = mzsr.import_tf(resolved, out, cfg, meta_trained=meta_trained, scope=scope)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        _fail(str(exc).strip('"'))
    crc = "checksums verified" if tfbundle.CRC32C_AVAILABLE else "checksums NOT verified (pip install google-crc32c)"
    what = (f"meta-trained, {cfg.subsample} subsampling, adapt_lr {list(cfg.adapt_lr)}" if meta_trained
            else "pretrained (no MZSR config: an init for `mzsr train --pretrained`)")  # fmt: skip
    typer.echo(f"wrote {path}: mzsr x{cfg.scale} from {resolved} ({what}; {crc})")


def _steps_alias(args: list[str]) -> str:
    """The old ``zssr adapt --steps``: MZSR's adaptation steps with ``--model``, else ZSSR's cap."""
    return "--adapt-steps" if any(a == "--model" or a.startswith("--model=") for a in args) else "--iterations"


@zssr_app.command("adapt", cls=_aliases({"--lr-image": "--input", "--steps": _steps_alias}))
def zssr_adapt(
    lr_image: Path = typer.Option(..., "--input", help="the LR test image"),
    kernel: Path = typer.Option(..., "--kernel", help="its blur kernel (.mat, .npy or image)"),
    scale: Scale = typer.Option(2, "--scale", help="SR scale"),
    adapt_steps: Optional[int] = typer.Option(None, "--adapt-steps", min=0, help="MZSR (--model): test-time "
                                              "adaptation steps (default: the checkpoint's; 1 or 10)"),  # fmt: skip
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="ZSSR (no --model): at most this "
                                             "many training steps (default: 3000)"),  # fmt: skip
    out: Path = typer.Option(..., "--out", help="the SR image (.png)"),
    model: Optional[Path] = typer.Option(None, "--model", help="meta-trained mzsr.safetensors; "
                                         "without it: ZSSR, a network trained from scratch on the image"),  # fmt: skip
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of MZSRConfig fields"),
    overrides: list[str] = typer.Option([], "--set", help=_MZSR_SET_HELP),
    seed: int = typer.Option(0, "--seed", help="ZSSR's initialisation and crops"),
) -> None:
    """Super-resolve one image of a known (or estimated) blur kernel: MZSR's test-time
    adaptation of a meta-trained model (with the settings stored in it: adapt_lr, subsample,
    adapt_steps; --config/--set override them), or the ZSSR baseline."""
    import time

    from srdistill.sr import imaging
    from srdistill.zeroshot import mzsr

    if model is None and adapt_steps is not None:
        _fail("--adapt-steps adapts a meta-trained MZSR checkpoint: give --model (or --iterations for ZSSR)")
    if model is not None and iterations is not None:
        _fail("--iterations caps ZSSR (no --model); MZSR's adaptation takes --adapt-steps")
    net, meta = _load_mzsr(model, scale) if model is not None else (None, {})
    cfg = _mzsr_config(config, overrides, base=meta.get("mzsr_config"), scale=scale, zssr_iterations=iterations)
    k = _kernel(kernel)
    try:
        lr = imaging.read_image(lr_image)
        t0 = time.perf_counter()
        if net is not None:  # the checkpoint's adapt_lr/subsample unless --config/--set change them
            steps = cfg.adapt_steps if adapt_steps is None else adapt_steps
            sr = mzsr.zero_shot(net, lr, k, scale, steps=steps, lr=cfg.adapt_lr, subsample=cfg.subsample)
            what = f"MZSR({steps})"
        else:
            sr, info = mzsr.zssr(lr, k, scale, cfg, seed=seed, progress=True)
            what = f"ZSSR ({info['iterations']} steps)"
    except (FileNotFoundError, ValueError) as exc:  # ImageReadError is a ValueError
        _fail(str(exc))
    imaging.write_png(out, sr)
    typer.echo(f"{what}: {lr.shape[1]}x{lr.shape[0]} -> {sr.shape[1]}x{sr.shape[0]} in "
               f"{time.perf_counter() - t0:.1f} s, wrote {out}")  # fmt: skip


def _load_mzsr(path: Path, scale: int):
    """A meta-trained MZSR checkpoint (``mzsr.meta_train`` or ``mzsr.import_tf``), checked:
    ``(net, meta)``."""
    from srdistill.sr.training import load_checkpoint

    try:
        net, meta = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if meta["arch"] != "mzsr" or "mzsr_config" not in meta:
        _fail(f"{str(path)!r} is not a meta-trained MZSR checkpoint (arch {meta['arch']!r}); "
              "train one with `srdistill mzsr train` or convert a released one with "
              "`srdistill mzsr import-tf`")  # fmt: skip
    if meta["scale"] != scale:
        _fail(f"{str(path)!r} is for x{meta['scale']}, not --scale {scale}")
    return net, meta


k8s_app = typer.Typer(no_args_is_help=True, help="Kubernetes: the KubeRay RayJob a distillation becomes.")
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render(
    input: str = typer.Option(..., "--input", help=_INPUT_HELP),
    out: str = typer.Option(..., "--out", help="run directory: an s3:// URI, or a path on a PVC that --cluster mounts"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file (the schema of `run --config`)"),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP + "; merged into spec.config"),
    preset: Optional[Preset] = typer.Option(None, "--preset", help=_PRESET_HELP),
    distill: Optional[Distill] = typer.Option(None, "--distill", help="what the run trains on (`run --distill`)"),
    allow_random_init: bool = typer.Option(False, "--allow-random-init", help="random-init CLIP (NOT semantic)"),
    cluster: Optional[Path] = typer.Option(
        None, "--cluster", help="YAML of the cluster shape: an SRDistillation's spec.cluster "
        "(image, s3Secret, env, volumes, volumeMounts, head, workerGroups, existingCluster)"),  # fmt: skip
    image: Optional[str] = typer.Option(None, "--image", help="Ray image (overrides --cluster); default: "
                                        "the srdistill image, or Ray's own with --install runtimeEnv"),  # fmt: skip
    s3_secret: Optional[str] = typer.Option(None, "--s3-secret", help="Secret holding AWS_* env vars"),
    name: str = typer.Option("srdistill", "--name", help="metadata.name of the RayJob"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="metadata.namespace (default: none)"),
    pod_security_context: Optional[str] = typer.Option(
        None, "--pod-security-context", help="every pod's securityContext, a JSON object (default: the "
        "restricted standard, uid 1000); the chart's ray.podSecurityContext"),  # fmt: skip
    security_context: Optional[str] = typer.Option(
        None, "--security-context", help="every container's securityContext, a JSON object (default: the "
        "restricted standard); the chart's ray.securityContext"),  # fmt: skip
    install: Literal["image", "runtimeEnv"] = typer.Option(
        "image", "--install", help="image: srdistill is in the image; runtimeEnv: Ray's stock image, "
        "Ray pip-installs srdistill at job start (runtimeEnvYAML)"),  # fmt: skip
    package: Optional[str] = typer.Option(
        None, "--package", help="--install runtimeEnv: pinned pip requirement of srdistill (default "
        "srdistill[cpu,synth]==<this version>; or 'srdistill[cpu,synth] @ git+<repo>@<tag>')"),  # fmt: skip
) -> None:
    """Print the RayJob (YAML) for `kubectl apply -f -`: what the operator would create for an
    SRDistillation with this spec (and the chart's settings given by the last four options)."""
    import yaml

    from srdistill import k8s
    from srdistill.config import _deep_merge, parse_override

    spec: dict = {"input": input, "output": out, "allowRandomInit": allow_random_init}
    spec.update({k: v for k, v in {"preset": preset, "distill": distill}.items() if v is not None})
    settings = {"mode": install, **({"package": package} if package is not None else {})}
    try:
        if config is not None:
            spec["config"] = read_yaml_mapping(config)
        for item in overrides:
            spec["config"] = _deep_merge(spec.get("config", {}), parse_override(item, RunConfig))
        shape = read_yaml_mapping(cluster) if cluster is not None else {}
        where = {"pod_security_context": "--pod-security-context", "security_context": "--security-context",
                 "install": "--install/--package"}  # fmt: skip
        defaults = k8s.render_settings(pod_security_context=pod_security_context, security_context=security_context,
                                       install=json.dumps(settings), where=where)  # fmt: skip
    except ValueError as exc:
        _fail(str(exc))
    shape.update({k: v for k, v in {"image": image, "s3Secret": s3_secret}.items() if v is not None})
    spec["cluster"] = shape
    try:
        parsed = k8s.parse_spec(spec)
    except k8s.InvalidSpec as exc:
        _fail(str(exc))
    typer.echo(yaml.safe_dump(k8s.rayjob(parsed, name, namespace=namespace, **defaults), sort_keys=False), nl=False)


@k8s_app.command("crd")
def k8s_crd(
    path: Path = typer.Argument(..., help="the CRD file, charts/srdistill/crds/srdistill.io_srdistillations.yaml"),
    check: bool = typer.Option(False, "--check", help="change nothing; exit 1 if the file is out of date"),
) -> None:
    """Regenerate spec.config's schema in the SRDistillation CRD from srdistill.config.RunConfig
    (the rest of the file is kept). Run it after changing the config models."""
    from srdistill import k8s

    try:
        text = path.read_text()
        new = k8s.crd_with_config_schema(text)
    except (OSError, ValueError) as exc:
        _fail(f"{path}: {exc}")
    if check:
        if new != text:
            typer.echo(f"{path}: spec.config is out of date; run: srdistill k8s crd {path}", err=True)
            raise typer.Exit(1)
        typer.echo(f"{path}: up to date")
    elif new != text:
        path.write_text(new)
        typer.echo(f"{path}: spec.config regenerated")
    else:
        typer.echo(f"{path}: up to date")


data_app = typer.Typer(no_args_is_help=True, help="Standard SR datasets: list the catalogue, download sets.")
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list() -> None:
    """The catalogue: images, size, licence, checksum status, where each set is present.

    Presence is looked up as eval does: $SRDISTILL_DATA, then the cache, then the vendored data/.
    Sources of the URLs and checksums: docs/DATASETS.md."""
    from srdistill import datasets

    header = ["name", "images", "size", "licence", "checksum", "present"]
    rows = [[r["name"], "?" if r["images"] is None else f"{r['images']:,}", r["size"], r["licence"],
             r["checksum"], str(r["present"]) if r["present"] else "-"] for r in datasets.catalog_rows()]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    typer.echo(f"\nsrdistill data get NAME... [--out DIR] (default DIR: {datasets.cache_root() / 'datasets'}); "
               "checksum 'unconfirmed': get records the sha256 it computed")  # fmt: skip


@data_app.command("get", cls=_aliases({"--dest": "--out"}))
def data_get(
    names: list[str] = typer.Argument(..., help="catalogue names (see `srdistill data list`)"),
    dest: Optional[Path] = typer.Option(None, "--out", help="data root to lay out OUT/NAME/HR/*.png in "
                                        "(default: <cache>/datasets, which eval searches)"),  # fmt: skip
    keep_archives: bool = typer.Option(False, "--keep-archives", help="keep the archives in <cache>/downloads"),
) -> None:
    """Download, verify and lay out sets as OUT/NAME/HR/*.png.

    An interrupted download resumes from its .part file; a set already present is left alone;
    a set whose checksum is unconfirmed gets a warning and its computed sha256 recorded."""
    from srdistill import datasets

    try:
        datasets.get_many(names, dest, keep_archives=keep_archives, log=_stage_line)
    except (datasets.DatasetError, OSError) as exc:  # requests' errors are OSErrors
        _fail(str(exc))
    if dest is not None and dest.expanduser().resolve() not in {r.resolve() for r in datasets.data_roots()}:
        typer.echo(f"note: {dest} is not searched by default; export SRDISTILL_DATA={dest} for eval to find it")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
