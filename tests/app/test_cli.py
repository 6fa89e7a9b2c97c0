"""One CLI vocabulary and clean output (issue 18).

The command tree is walked from ``srdistill.cli.app``, so a new command or subcommand is checked
without being listed here: one spelling per shared concept, fixed-value options as ``Literal``
choices that ``--help`` lists and the parser checks (one-line errors, exit code 2), ``--config``
with ``--set``, repeatable list options, the old spellings as hidden aliases that warn. The last
test runs the pipeline in a subprocess (a Ray of its own) and looks at its stdout, stderr and
``run.log``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import pytest
import typer
import yaml
from typer.testing import CliRunner

from conftest import T91, copy_t91, kill_ray_processes
from srdistill import __version__
from srdistill.cli import app
from srdistill.cli.common import MODEL_NAMES
from srdistill.config import MZSRConfig, RunConfig, parse_override

ROOT = typer.main.get_command(app)


def _walk(group, path: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _walk(cmd, (*path, name))
        else:
            yield (*path, name), cmd


#: Every command as ``(("mzsr", "train"), click command)``.
COMMANDS = dict(_walk(ROOT))
#: Spellings that must not be visible options anywhere -> the one spelling of that concept.
FORBIDDEN = {
    "--data": "--input", "--lr-image": "--input", "--in": "--input", "--images": "--input",
    "--output": "--out", "--out-dir": "--out", "--dest": "--out",
    "--zssr-iterations": "--iterations", "--iters": "--iterations", "--num-iterations": "--iterations",
    "--use-gpu": "--gpus", "--gpu": "--gpus", "--num-gpus": "--gpus",
    "--actors": "--workers", "--num-workers": "--workers", "--num-actors": "--workers",
    "--datasets": "--dataset", "--override": "--set", "--config-file": "--config",
}  # fmt: skip
#: Spellings allowed only where their concept differs: a diffusion sampler's denoising steps.
ONLY_IN = {"--steps": {("synthesize",)}}
#: Options that always have fixed values: typed ``Literal`` wherever they appear.
CHOICE_OPTIONS = {"--until", "--distill", "--sampler", "--device", "--scale", "--preset", "--stage", "--subsample"}
#: Options that are lists: repeatable wherever they appear.
LIST_OPTIONS = {"--dataset", "--arms", "--budgets", "--seeds", "--corpus", "--clusters", "--set"}
#: Commands configured by a config file (RunConfig, MZSRConfig or SynthConfig).
CONFIG_COMMANDS = {("run",), ("finetune",), ("train",), ("synthesize",), ("bench", "quality"), ("mzsr", "train"),
                   ("mzsr", "import-tf"), ("zssr", "adapt"), ("k8s", "render")}  # fmt: skip
#: Those whose config is a RunConfig: a bundled preset applies.
PRESET_COMMANDS = {("run",), ("finetune",), ("train",), ("bench", "quality"), ("k8s", "render")}
#: Commands whose --model is a network name or a checkpoint path.
NAMED_MODEL = {("eval",), ("upscale",)}


def _options(cmd, *, hidden: bool = False) -> dict[str, object]:
    """``{"--name": param}`` of a command's options (visible only, or also hidden)."""
    return {opt: p for p in cmd.params if p.param_type_name == "option" and (hidden or not p.hidden)
            for opt in [*p.opts, *p.secondary_opts]}  # fmt: skip


def _choices(param) -> tuple | None:
    """The ``Literal`` values of an option's type (``Optional`` unwrapped), else None."""
    annotation = param.type_descriptor.annotation
    if get_origin(annotation) is Union:
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return get_args(annotation) if get_origin(annotation) is Literal else None


def _invoke(*args: str, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def _one_error_line(result) -> str:
    """The single ``error: ...`` line of a user error (exit code 2, no traceback)."""
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning:")]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_the_tree_has_every_command():
    names = {" ".join(path) for path in COMMANDS}
    assert {"run", "finetune", "synthesize", "train", "eval", "upscale", "bench quality", "mzsr train",
            "mzsr import-tf", "zssr adapt", "k8s render", "data list", "data get"} <= names  # fmt: skip


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_shared_concepts_have_one_spelling(path):
    cmd = COMMANDS[path]
    visible = _options(cmd)
    wrong = {opt: FORBIDDEN[opt] for opt in visible if opt in FORBIDDEN}
    assert not wrong, f"{' '.join(path)}: use {wrong}"
    for opt, where in ONLY_IN.items():
        assert opt not in visible or path in where, f"{' '.join(path)} {opt}"
    for opt in CHOICE_OPTIONS & set(visible):
        assert _choices(visible[opt]) is not None, f"{' '.join(path)} {opt} is not a Literal choice"
    for opt in LIST_OPTIONS & set(visible):
        assert visible[opt].multiple, f"{' '.join(path)} {opt} is not repeatable"
    assert ("--config" in visible) == ("--set" in visible), f"{' '.join(path)}: --config and --set go together"
    if path in CONFIG_COMMANDS:
        assert {"--config", "--set"} <= set(visible), " ".join(path)
    if path in PRESET_COMMANDS:
        assert "--preset" in visible, " ".join(path)


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_lists_the_choices_and_the_parser_checks_them(path):
    cmd = COMMANDS[path]
    result = _invoke(*path, "--help", env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = result.output
    for opt, param in _options(cmd).items():
        assert opt in text, (path, opt)
        choices = _choices(param)
        if choices is None:
            continue
        names = [str(c) for c in choices]
        assert "|".join(names) in text or ", ".join(names) in text, (path, opt, names)
        line = _one_error_line(_invoke(*path, opt, "bogus"))
        assert f"{opt} 'bogus' is not one of: {', '.join(names)}" in line, line
    if path in NAMED_MODEL:  # a path or one of the names: every name is in the help
        assert all(name in text for name in MODEL_NAMES), text


def test_version_on_every_entry():
    result = _invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"srdistill {__version__}"
    proc = subprocess.run([sys.executable, "-m", "srdistill.cli", "--version"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == f"srdistill {__version__}", proc.stderr
    script = Path(sys.executable).parent / "srdistill"
    if script.is_file():
        proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip().startswith("srdistill "), proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["eval", "--device", "tpu", "--dataset", "Set5", "--scale", "2"],
     "--device 'tpu' is not one of: auto, cpu, cuda; did you mean 'cpu'?"),
    (["eval", "--dataset", "Set5", "--scale", "5"], "--scale '5' is not one of: 2, 3, 4, 8"),
    (["eval", "--dataset", "Set5", "--scale", "2", "--model", "edsr"],
     "--model 'edsr' is neither a checkpoint file nor one of: bicubic, zssr, edsr-baseline"),
    (["eval", "--dataset", "Set5", "--scale", "2", "--iterations", "5"], "--iterations caps ZSSR's training"),
    (["run", "--input", "x", "--out", "y", "--until", "mien"], "did you mean 'mine'?"),
    (["run", "--input", "x", "--out", "y", "--distill", "synthetic"], "--distill 'synthetic' is not one of"),
    (["run", "--input", "x"], "Missing option '--out'"),
    (["train", "--input", "x", "--out", "y", "--model", "vdsr"], "--model 'vdsr' is not one of: edsr-baseline"),
    (["synthesize", "--model", "x", "--out", "y", "--sampler", "euler"], "is not one of: ddim, dpm-solver++, ddpm"),
    (["mzsr", "import-tf", "x", "--out", "y", "--stage", "final"], "is not one of: auto, meta, pretrained"),
    (["zssr", "adapt", "--input", "x", "--kernel", "k", "--out", "y", "--adapt-steps", "2"],
     "--adapt-steps adapts a meta-trained MZSR checkpoint"),
    (["eval", "--dataset", "Set5", "--scale", "2", "--bogus"], "No such option: --bogus"),
])  # fmt: skip
def test_user_errors_are_one_line_with_exit_code_2(args, needle):
    line = _one_error_line(_invoke(*args))
    assert needle in line, line


def test_debug_prints_the_traceback_of_an_error(tmp_path):
    args = ["eval", "--dataset", str(tmp_path / "nowhere"), "--scale", "2"]
    assert "nowhere" in _one_error_line(_invoke(*args))
    result = _invoke("--debug", *args)
    assert result.exit_code == 2 and "Traceback" in result.output and "nowhere" in result.output


def test_lists_take_repeats_and_commas():
    assert parse_override("evaluate.datasets=Set5,Set14", RunConfig) == {"evaluate": {"datasets": ["Set5", "Set14"]}}
    assert parse_override("evaluate.datasets=Set5", RunConfig) == {"evaluate": {"datasets": ["Set5"]}}
    assert parse_override("evaluate.datasets=[Set5, B100]", RunConfig) == {"evaluate": {"datasets": ["Set5", "B100"]}}
    assert parse_override("train.lr_milestones=100,200", RunConfig) == {"train": {"lr_milestones": [100, 200]}}
    assert parse_override("adapt_lr=0.01,0.005", MZSRConfig) == {"adapt_lr": [0.01, 0.005]}
    assert parse_override("train.model=espcn", RunConfig) == {"train": {"model": "espcn"}}  # not a list
    assert parse_override("evaluate.datasets=a,b") == {"evaluate": {"datasets": "a,b"}}  # no model: as YAML says
    # through a command: k8s render --set, the comma form of a list field
    result = _invoke("k8s", "render", "--input", "s3://c/HR/", "--out", "s3://r/run1", "--preset", "tiny",
                     "--set", "evaluate.datasets=Set5,Set14", "--set", "train.iterations=7")  # fmt: skip
    assert result.exit_code == 0, result.output
    args = shlex.split(yaml.safe_load(result.output)["spec"]["entrypoint"])
    config = json.loads(args[args.index("--config-json") + 1])
    assert config == {"evaluate": {"datasets": ["Set5", "Set14"]}, "train": {"iterations": 7}}
    # eval: --dataset repeated and comma-separated is the same list
    line = _one_error_line(_invoke("eval", "--dataset", "Set5,NoSuchSet", "--dataset", "Set14", "--scale", "2"))
    assert "NoSuchSet" in line


def test_old_spellings_still_work_and_warn(tmp_path):
    nowhere = str(tmp_path / "nowhere")
    cases = [  # (arguments with an old spelling, the new one, what shows it was parsed as the new one)
        (["train", "--data", nowhere, "--out", tmp_path / "o"], "--input", f"--input {nowhere!r} is not a directory"),
        (["train", f"--data={nowhere}", "--out", tmp_path / "o"], "--input", "is not a directory"),
        (["mzsr", "train", "--data", nowhere, "--out", tmp_path / "o"], "--input", "no HR images"),
        (["eval", "--zssr-iterations", "5", "--dataset", "Set5", "--scale", "2"], "--iterations",
         "--iterations caps ZSSR's training"),
        (["synthesize", "--actors", "2", "--model", nowhere, "--out", tmp_path / "o"], "--workers",
         "is not a fine-tuned model"),
        (["bench", "quality", "--out", tmp_path / "b", "--datasets", "Set5", "--scale", "5"], "--dataset",
         "--scale '5'"),
        (["zssr", "adapt", "--lr-image", nowhere, "--kernel", tmp_path / "k.mat", "--out", tmp_path / "x.png"],
         "--input", "k.mat"),
        (["zssr", "adapt", "--input", nowhere, "--kernel", tmp_path / "k.mat", "--out", tmp_path / "x.png",
          "--steps", "3"], "--iterations", "k.mat"),
        (["zssr", "adapt", "--input", nowhere, "--kernel", tmp_path / "k.mat", "--out", tmp_path / "x.png",
          "--steps", "3", "--model", tmp_path / "m.safetensors"], "--adapt-steps", "m.safetensors"),
        (["data", "get", "NoSuchSet", "--dest", tmp_path / "d"], "--out", "NoSuchSet"),
    ]  # fmt: skip
    for args, new, parsed in cases:
        result = _invoke(*args)
        old = next(a.split("=")[0] for a in map(str, args) if a.split("=")[0] in _all_aliases())
        assert f"warning: {old} is deprecated and goes in the next release: use {new}" in result.output, result.output
        assert "No such option" not in result.output
        assert parsed in _one_error_line(result), (args, result.output)


def _all_aliases() -> dict[str, object]:
    return {old: new for cmd in COMMANDS.values() for old, new in getattr(cmd, "aliases", {}).items()}


@pytest.mark.parametrize("path", sorted(p for p, c in COMMANDS.items() if getattr(c, "aliases", None)), ids=" ".join)
def test_every_alias_is_hidden_and_names_a_visible_option(path):
    cmd = COMMANDS[path]
    visible = _options(cmd)
    for old, new in cmd.aliases.items():
        assert old not in _options(cmd, hidden=True), old
        targets = [new] if isinstance(new, str) else [new([]), new(["--model", "m"])]
        assert all(t in visible for t in targets), (path, old, targets)
        help_text = _invoke(*path, "--help", env={"COLUMNS": "250"}).output
        assert re.search(rf"{re.escape(old)}\b", help_text) is None, (path, old)


@pytest.mark.slow
def test_console_output_is_ours_and_ray_lines_go_to_run_log(tmp_path):
    """A real run (a Ray of its own, in a subprocess): stage lines on stdout, warnings on
    stderr, Ray's driver log lines only in OUT/run.log; the one Ray line left on the console is
    the C++ core worker's (``core_worker.cc``, not Python logging: ``runner.route_ray_logs``)."""
    corpus = copy_t91(tmp_path / "corpus", 3)
    out = tmp_path / "run"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: unix socket paths <= 107
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "srdistill.cli", "run", "--input", str(corpus), "--out", str(out), "--preset",
           "tiny", "--allow-random-init", "--until", "embed", "--set", "ray.num_cpus=2"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        kill_ray_processes({proc.pid}, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, (stdout + stderr)[-3000:]
    lines = stdout.splitlines()
    assert "[mine] running" in lines and any(line.startswith("[embed] done") for line in lines), stdout
    assert all(line.startswith("[") or line.startswith("report:") or not line.strip() for line in lines), stdout
    assert "WARNING: CLIP is randomly initialised" in stderr and "WARNING" not in stdout
    for line in re.split(r"[\r\n]+", stderr):  # tqdm bars, our warnings and the C++ core worker's lines
        bar = re.match(r"^[\w ]+:\s+\d+%\|", line)
        assert not line.strip() or bar or line.startswith("WARNING: ") or "core_worker.cc" in line, line
    for ray_line in ("Started a local Ray instance", "Progress bars disabled", "worker.py"):
        assert ray_line not in stdout + stderr
    log = (out / "run.log").read_text()
    assert "run --input" in log and "[mine] running" in log and "[embed] done" in log
    assert "WARNING: CLIP is randomly initialised" in log
    assert "INFO ray._private.worker: Started a local Ray instance" in log
    assert "ray.data" in log  # Ray Data's execution lines
    # a run that a preflight check rejects leaves no run directory (nor run.log)
    result = _invoke("run", "--input", str(corpus), "--out", str(tmp_path / "rejected"), "--preset", "tiny",
                     "--set", "evaluate.datasets=[NoSuchSet]")  # fmt: skip
    assert "NoSuchSet" in _one_error_line(result) and not (tmp_path / "rejected").exists()


def test_main_command_of_the_readme_keeps_its_spelling():
    visible = _options(COMMANDS[("run",)])  # srdistill run --input DIR --out DIR --preset demo
    assert visible["--input"].required and visible["--out"].required and "demo" in _choices(visible["--preset"])


@pytest.mark.parametrize("command", [
    ["train", "--input", "{t91}", "--out", "{tmp}/m", "--preset", "tiny"],
    ["run", "--input", "{t91}", "--out", "{tmp}/r", "--preset", "tiny", "--allow-random-init"],
    ["finetune", "--input", "{t91}", "--out", "{tmp}/f", "--preset", "tiny", "--allow-random-init"],
])  # fmt: skip
def test_tensorboard_flag_sets_the_config_and_a_missing_package_is_one_line(command, tmp_path, monkeypatch):
    """--tensorboard turns on train.tensorboard / finetune.tensorboard; without the package the
    command stops at once with one line naming the option and the install (nothing written)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the package
    args = [a.format(t91=T91, tmp=tmp_path) for a in command]
    line = _one_error_line(_invoke(*args, "--tensorboard"))
    option = "finetune" if command[0] == "finetune" else "train"
    assert f"{option}.tensorboard: true needs the tensorboard package" in line and "pip install" in line, line
    assert not any(tmp_path.iterdir())
