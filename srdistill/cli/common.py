"""What every command of the CLI shares: the option types and help texts, one-line user errors
(``_fail``; ``--debug`` for the traceback), the old option spellings (``_aliases``), console and
``run.log`` logging, and the config helpers (``_config``, ``_model_config``, the Ray and training
overrides).
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

from srdistill.config import (Arch, MZSRConfig, RunConfig, SynthConfig, describe_error, load_config,
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


def _print_version(value: bool) -> None:
    if value:
        from srdistill import __version__

        typer.echo(f"srdistill {__version__}")
        raise typer.Exit()


#: ``--debug``: errors that end a command also print their traceback.
_DEBUG = False


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


def _model_config(model, config: Optional[Path], overrides: list[str], base: Optional[dict] = None, **fixed):
    """A config ``model`` (``MZSRConfig``, ``SynthConfig``) from ``base`` (e.g. a checkpoint's),
    a YAML file of its fields, ``--set`` overrides and the CLI options given (not None), each
    over the one before; a bad value is exit 2 naming the field."""
    from srdistill.config import parse_override
    from srdistill.config.loading import _deep_merge

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


def _kernel(path: Path):
    from srdistill.sr.degradation import load_kernel

    try:
        return load_kernel(path)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        _fail(str(exc))
