"""Issue 16 (item 3): everything that can be checked is checked before the first stage runs, and
user errors are one or two lines (exit code 2, no traceback unless ``--debug``).

Each failing case asserts exit code 2, the message, no "Traceback", that no stage ran (no
``manifest.json``: the run directory is only written after the preflight) and that the run
never got to Ray (``runner.use_ray``, which the pipeline calls right after its preflight, is
replaced by a sentinel). The cases that must *pass* the preflight stop at that sentinel
instead, so none of them runs a stage.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from srdistill.cli import app
from srdistill.config import MineConfig, describe_error, load_config
from srdistill.run import runner

T91 = Path(__file__).resolve().parents[2] / "data" / "T91" / "HR"
NO_WEIGHTS = "/nonexistent/no-such-weights"


class ReachedRay(Exception):
    """Raised by the patched ``runner.use_ray``: the preflight passed."""


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    src = tmp_path / "corpus"
    src.mkdir()
    for path in sorted(T91.iterdir())[:3]:
        shutil.copy(path, src / path.name)
    return src


@pytest.fixture
def ray_sentinel(monkeypatch):
    calls = []

    def use_ray(cfg):
        calls.append(cfg)
        raise ReachedRay

    monkeypatch.setattr(runner, "use_ray", use_ray)
    return calls


def _run(corpus: Path, out: Path, *args: str, global_args: tuple[str, ...] = ()):
    return CliRunner().invoke(app, [*global_args, "run", "--input", str(corpus), "--out", str(out), *args])


def _assert_user_error(result, out: Path, *needles: str, max_lines: int = 2) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    assert "Traceback" not in result.output
    assert "errors.pydantic.dev" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert 1 <= len(lines) <= max_lines, result.output
    assert not (out / "manifest.json").exists()  # no stage ran


# --------------------------------------------------------------------------- 1. preflight


def test_unknown_evaluation_dataset_fails_before_any_stage(corpus, tmp_path, ray_sentinel):
    out = tmp_path / "run"
    result = _run(corpus, out, "--preset", "tiny", "--allow-random-init", "--set", "evaluate.datasets=[Set55]")
    _assert_user_error(result, out, "Set55", "not found")
    assert not ray_sentinel


def test_evaluation_datasets_are_only_checked_when_evaluate_runs(corpus, tmp_path, ray_sentinel):
    out = tmp_path / "run"
    result = _run(corpus, out, "--preset", "tiny", "--allow-random-init", "--until", "train",
                     "--set", "evaluate.datasets=[Set55]")  # fmt: skip
    assert isinstance(result.exception, ReachedRay), result.output


def test_until_mine_needs_no_clip_weights(corpus, tmp_path, ray_sentinel):
    out = tmp_path / "run"
    args = ("--preset", "tiny", "--set", f"embed.model={NO_WEIGHTS}")
    result = _run(corpus, out, *args)  # the whole run: CLIP is needed, and missing
    assert result.exit_code == 2 and "Traceback" not in result.output and not ray_sentinel
    assert not (out / "manifest.json").exists()
    result = _run(corpus, out, *args, "--until", "mine")
    assert isinstance(result.exception, ReachedRay), result.output


def test_srdd_until_mine_needs_no_dit_and_no_clip(corpus, tmp_path, ray_sentinel, monkeypatch):
    monkeypatch.chdir(tmp_path)  # srdd's finetune.dit_path models/DiT-XL-2-512 is not here
    out = tmp_path / "run"
    result = _run(corpus, out, "--preset", "srdd", "--set", f"embed.model={NO_WEIGHTS}",
                     "--set", "evaluate.datasets=[Set5]")  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output and not ray_sentinel
    result = _run(corpus, out, "--preset", "srdd", "--until", "mine", "--set", f"embed.model={NO_WEIGHTS}")
    assert isinstance(result.exception, ReachedRay), result.output
    assert not (out / "manifest.json").exists()


def test_out_naming_an_existing_file_is_one_clear_line(corpus, tmp_path, ray_sentinel):
    out = tmp_path / "a-file"
    out.write_text("not a run directory")
    result = _run(corpus, out, "--preset", "tiny", "--allow-random-init")
    _assert_user_error(result, tmp_path / "nothing", str(out), "existing file", max_lines=1)
    assert out.read_text() == "not a run directory" and not ray_sentinel
    result = _run(corpus, out / "sub", "--preset", "tiny", "--allow-random-init")
    _assert_user_error(result, tmp_path / "nothing", "under the file", max_lines=1)


def test_unknown_until_gets_a_close_match(corpus, tmp_path, ray_sentinel):
    out = tmp_path / "run"
    result = _run(corpus, out, "--preset", "tiny", "--allow-random-init", "--until", "mien")
    _assert_user_error(result, out, "'mien'", "did you mean 'mine'?")


@pytest.mark.parametrize("args, needle", [
    (["--device", "gpu"], "--device 'gpu' is not one of: auto, cpu, cuda"),
    (["--scale", "1"], "--scale '1' is not one of: 2, 3, 4, 8"),
    (["--scale", "5"], "--scale '5' is not one of: 2, 3, 4, 8"),
])  # fmt: skip
def test_eval_scale_and_device_choices(args, needle):
    base = {"--device": ["--scale", "2"], "--scale": []}[args[0]]
    result = CliRunner().invoke(app, ["eval", "--dataset", "Set5", *base, *args])
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output


def test_train_scale_zero_is_not_ignored(tmp_path):
    result = CliRunner().invoke(app, ["train", "--input", str(T91), "--out", str(tmp_path / "o"), "--scale", "0"])
    assert result.exit_code == 2 and "--scale '0'" in result.output
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- 2. user wins


def test_user_patch_size_wins_over_the_presets_patch_preset():
    cfg = load_config("srdd", overrides=["mine.patch_size=96"])
    assert (cfg.mine.patch_size, cfg.mine.stride, cfg.mine.patch_preset) == (96, 256, None)
    cfg = load_config("srdd")
    assert (cfg.mine.patch_size, cfg.mine.stride, cfg.mine.patch_preset) == (512, 256, "srdd")
    cfg = load_config("tiny", overrides=["mine.patch_preset=div2k"])  # a user's preset over the preset's size
    assert (cfg.mine.patch_size, cfg.mine.stride) == (192, 96)
    cfg = load_config("srdd", overrides=["mine.patch_size=512"])  # the same value: no conflict
    assert cfg.mine.patch_preset == "srdd"


def test_conflict_inside_one_source_is_an_error_naming_both(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mine:\n  patch_preset: srdd\n  patch_size: 96\n")
    with pytest.raises(ValueError, match=r"c\.yaml: mine\.patch_size 96 conflicts with mine\.patch_preset 'srdd'"):
        load_config("tiny", f)
    with pytest.raises(ValueError, match="patch_size 96 conflicts with mine.patch_preset 'srdd'"):
        MineConfig(patch_preset="srdd", patch_size=96)
    assert MineConfig(patch_preset="srdd", patch_size=512, stride=256).patch_size == 512  # a dump re-validates


def test_srdd_with_user_patch_size_mines_it(corpus, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("srdistill.run.pipeline.run_pipeline", lambda input_dir, run_dir, cfg, **kw: seen.append(cfg))
    result = _run(corpus, tmp_path / "run", "--preset", "srdd", "--until", "mine", "--set", "mine.patch_size=96")
    assert result.exit_code == 0, result.output
    assert (seen[0].mine.patch_size, seen[0].mine.stride, seen[0].mine.patch_preset) == (96, 256, None)


# --------------------------------------------------------------------------- 3. messages


def test_malformed_yaml_config_names_the_file_and_line(corpus, tmp_path, ray_sentinel):
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  iterations: 5\n  lr: [1,\n")
    out = tmp_path / "run"
    result = _run(corpus, out, "--preset", "tiny", "--config", str(f))
    _assert_user_error(result, out, "broken.yaml", "invalid YAML", "line 4", max_lines=1)


def test_malformed_yaml_set_names_the_item(corpus, tmp_path, ray_sentinel):
    out = tmp_path / "run"
    result = _run(corpus, out, "--preset", "tiny", "--set", "train.iterations=[1,")
    _assert_user_error(result, out, "--set 'train.iterations=[1,'", "not valid YAML", "column", max_lines=2)


def test_misspelt_key_is_condensed_with_a_suggestion(corpus, tmp_path, ray_sentinel):
    out = tmp_path / "run"
    result = _run(corpus, out, "--preset", "tiny", "--set", "train.iteratons=5")
    _assert_user_error(result, out, "train.iteratons: unknown key; did you mean 'iterations'?", max_lines=1)
    result = _run(corpus, out, "--preset", "tiny", "--set", "distill=sinth")
    _assert_user_error(result, out, "distill: Input should be 'coreset' or 'synth' (got 'sinth')", max_lines=1)


def test_debug_prints_the_traceback(corpus, tmp_path, ray_sentinel):
    out = tmp_path / "run"
    result = _run(corpus, out, "--preset", "tiny", "--set", "evaluate.datasets=[Set55]", "--allow-random-init",
                     global_args=("--debug",))  # fmt: skip
    assert result.exit_code == 2 and "Traceback" in result.output and "Set55" in result.output
    result = _run(corpus, out, "--preset", "tiny", "--set", "evaluate.datasets=[Set55]", "--allow-random-init")
    assert result.exit_code == 2 and "Traceback" not in result.output  # the flag does not stick


def test_describe_error_passes_other_errors_through():
    assert describe_error(ValueError("plain")) == "plain"
