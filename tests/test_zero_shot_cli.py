"""The zero-shot SR commands end to end, at tiny settings: `srdistill mzsr train` (bicubic
pretraining + meta-transfer), `srdistill zssr adapt` (MZSR and ZSSR) and `srdistill eval
--kernel` with per-image adaptation, on a real Set5 g20 image and its kernel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from srdistill import imaging
from srdistill.cli import app
from srdistill.training import load_checkpoint

from conftest import T91, data_path

TINY = ["--set", "hr_patch=32", "--set", "tasks_per_batch=1", "--set", "support=2", "--set", "query=2",
        "--set", "inner_steps=1", "--set", "meta_iterations=2"]  # fmt: skip


def _run(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


@pytest.fixture(scope="module")
def meta_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("mzsr")
    data = root / "hr"
    data.mkdir()
    for name in ("t1.png", "t2.png"):
        shutil.copy(T91 / name, data / name)
    result = _run("mzsr", "train", "--data", str(data), "--out", str(root / "run"), "--pretrain-iterations", "2", *TINY)
    assert result.exit_code == 0, result.output
    return root / "run" / "mzsr.safetensors"


def test_mzsr_train_pretrains_then_meta_trains(meta_model):
    net, meta = load_checkpoint(meta_model)
    assert meta["arch"] == "mzsr" and meta["scale"] == 2 and meta["step"] == 2
    assert meta["mzsr_config"]["hr_patch"] == 32 and meta["init"].endswith("pretrain/model.safetensors")
    assert (meta_model.parent / "pretrain" / "model.safetensors").is_file()


def test_zssr_adapt_writes_an_image_of_the_right_size_with_either_method(meta_model, tmp_path):
    G20 = data_path("Set5/LR_g20_x2_MZSR")
    lr = imaging.read_image(G20 / "butterfly.png")[:40, :48]  # a real g20 LR crop
    imaging.write_png(tmp_path / "lr.png", lr)
    common = ["zssr", "adapt", "--lr-image", str(tmp_path / "lr.png"), "--kernel", str(G20 / "kernel.mat"), "--scale", "2"]
    result = _run(*common, "--steps", "1", "--model", str(meta_model), "--out", str(tmp_path / "mzsr.png"))
    assert result.exit_code == 0, result.output
    assert "MZSR(1)" in result.output and imaging.read_image(tmp_path / "mzsr.png").shape == (80, 96, 3)
    result = _run(*common, "--steps", "5", "--out", str(tmp_path / "zssr.png"))
    assert result.exit_code == 0, result.output
    assert "ZSSR (5 steps)" in result.output and imaging.read_image(tmp_path / "zssr.png").shape == (80, 96, 3)


def test_eval_kernel_mode_adapts_per_image(meta_model, tmp_path):
    G20 = data_path("Set5/LR_g20_x2_MZSR")
    ds = tmp_path / "ds"
    ds.mkdir()
    shutil.copy(G20.parent / "HR" / "butterfly.png", ds / "butterfly.png")
    args = ["eval", "--dataset", str(ds), "--scale", "2", "--kernel", str(G20 / "kernel.mat"), "--json"]
    rows = {}
    for label, extra in {"bicubic": [], "mzsr1": ["--model", str(meta_model), "--adapt-steps", "1"]}.items():
        result = _run(*args, *extra)
        assert result.exit_code == 0, result.output
        rows[label] = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows["bicubic"]["psnr_y"] == pytest.approx(imaging_bicubic_g20_butterfly(G20), abs=1e-9)
    assert rows["mzsr1"]["model"].startswith("MZSR(1)") and rows["mzsr1"]["seconds_per_image"] > 0


def imaging_bicubic_g20_butterfly(G20: Path) -> float:
    """Bicubic x2 of the shipped g20 LR butterfly against its HR: what kernel mode must measure."""
    from srdistill import metrics

    hr = imaging.modcrop(imaging.read_image(G20.parent / "HR" / "butterfly.png"), 2)
    return metrics.psnr_y(imaging.imresize(imaging.read_image(G20 / "butterfly.png"), 2), hr, 2)


def test_zero_shot_errors_are_clear(meta_model, tmp_path):
    G20 = data_path("Set5/LR_g20_x2_MZSR")
    result = _run("eval", "--model", "zssr", "--dataset", "Set5", "--scale", "2")
    assert result.exit_code == 2 and "--model zssr needs --kernel" in result.output
    result = _run("eval", "--model", str(meta_model), "--adapt-steps", "3", "--dataset", "Set5", "--scale", "2")
    assert result.exit_code == 2 and "--adapt-steps needs --kernel" in result.output
    result = _run("zssr", "adapt", "--lr-image", str(G20 / "baby.png"), "--kernel", str(tmp_path / "none.mat"),
                  "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert result.exit_code == 2 and "none.mat" in result.output
    result = _run("zssr", "adapt", "--lr-image", str(G20 / "baby.png"), "--kernel", str(G20 / "kernel.mat"),
                  "--model", str(meta_model), "--scale", "4", "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert result.exit_code == 2 and "is for x2, not --scale 4" in result.output
    result = _run("mzsr", "train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "no HR images" in result.output
    result = _run("mzsr", "train", "--data", str(T91), "--out", str(tmp_path / "o"), "--set", "inner_stepz=2")
    assert result.exit_code == 2 and "inner_stepz" in result.output
