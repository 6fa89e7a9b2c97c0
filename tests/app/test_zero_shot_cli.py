"""The zero-shot SR commands end to end, at tiny settings: `srdistill mzsr train` (bicubic
pretraining + meta-transfer), `srdistill mzsr import-tf` (MZSR's released TensorFlow models, on
the tiny checkpoint of tests/fixtures/mzsr_tf), `srdistill zssr adapt` (MZSR and ZSSR) and
`srdistill eval --kernel` with per-image adaptation, on a real Set5 g20 image and its kernel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from srdistill.cli import app
from srdistill.sr import degradation, imaging
from srdistill.sr.training import load_checkpoint
from srdistill.zeroshot import mzsr

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
    result = _run("mzsr", "train", "--input", str(data), "--out", str(root / "run"), "--pretrain-iterations", "2",
                  *TINY)  # fmt: skip
    assert result.exit_code == 0, result.output
    return root / "run" / "mzsr.safetensors"


def test_mzsr_train_pretrains_then_meta_trains(meta_model):
    net, meta = load_checkpoint(meta_model)
    assert meta["arch"] == "mzsr" and meta["scale"] == 2 and meta["step"] == 2
    assert meta["mzsr_config"]["hr_patch"] == 32 and meta["init"].endswith("pretrain/model.safetensors")
    pre, pre_meta = load_checkpoint(meta_model.parent / "pretrain" / "model.safetensors")
    # the bicubic pretraining feeds MATLAB-bicubic upsampled LR, as MZSR's Large-Scale_Training
    assert pre.config["upsample"] == "matlab" and pre_meta["model_kwargs"]["upsample"] == "matlab"


def test_zssr_adapt_writes_an_image_of_the_right_size_with_either_method(meta_model, tmp_path):
    G20 = data_path("Set5/LR_g20_x2_MZSR")
    lr = imaging.read_image(G20 / "butterfly.png")[:40, :48]  # a real g20 LR crop
    imaging.write_png(tmp_path / "lr.png", lr)
    common = ["zssr", "adapt", "--input", str(tmp_path / "lr.png"), "--kernel", str(G20 / "kernel.mat"), "--scale", "2"]
    result = _run(*common, "--adapt-steps", "1", "--model", str(meta_model), "--out", str(tmp_path / "mzsr.png"))
    assert result.exit_code == 0, result.output
    assert "MZSR(1)" in result.output and imaging.read_image(tmp_path / "mzsr.png").shape == (80, 96, 3)
    result = _run(*common, "--iterations", "5", "--out", str(tmp_path / "zssr.png"))
    assert result.exit_code == 0, result.output
    assert "ZSSR (5 steps)" in result.output and imaging.read_image(tmp_path / "zssr.png").shape == (80, 96, 3)


def _g20_butterfly_eval(tmp_path):
    """``srdistill eval`` arguments for Set5's butterfly under MZSR's g20 kernel at x2."""
    g20 = data_path("Set5/LR_g20_x2_MZSR")
    ds = tmp_path / "ds"
    ds.mkdir()
    shutil.copy(g20.parent / "HR" / "butterfly.png", ds / "butterfly.png")
    return ["eval", "--dataset", str(ds), "--scale", "2", "--kernel", str(g20 / "kernel.mat"), "--json"]


def test_eval_kernel_mode_adapts_per_image(meta_model, tmp_path):
    args = _g20_butterfly_eval(tmp_path)
    rows = {}
    for label, extra in {"bicubic": [], "mzsr1": ["--model", str(meta_model), "--adapt-steps", "1"]}.items():
        result = _run(*args, *extra)
        assert result.exit_code == 0, result.output
        rows[label] = json.loads(result.stdout.strip().splitlines()[-1])
    g20 = data_path("Set5/LR_g20_x2_MZSR")
    assert rows["bicubic"]["psnr_y"] == pytest.approx(imaging_bicubic_g20_butterfly(g20), abs=1e-9)
    assert rows["mzsr1"]["model"].startswith("MZSR(1)") and rows["mzsr1"]["seconds_per_image"] > 0


def imaging_bicubic_g20_butterfly(G20: Path) -> float:
    """Bicubic x2 of the shipped g20 LR butterfly against its HR: what kernel mode must measure."""
    from srdistill.sr import metrics

    hr = imaging.modcrop(imaging.read_image(G20.parent / "HR" / "butterfly.png"), 2)
    return metrics.psnr_y(imaging.imresize(imaging.read_image(G20 / "butterfly.png"), 2), hr, 2)


def test_zero_shot_errors_are_clear(meta_model, tmp_path):
    G20 = data_path("Set5/LR_g20_x2_MZSR")
    result = _run("eval", "--model", "zssr", "--dataset", "Set5", "--scale", "2")
    assert result.exit_code == 2 and "--model zssr needs --kernel" in result.output
    result = _run("eval", "--model", str(meta_model), "--adapt-steps", "3", "--dataset", "Set5", "--scale", "2")
    assert result.exit_code == 2 and "--adapt-steps needs --kernel" in result.output
    result = _run("zssr", "adapt", "--input", str(G20 / "baby.png"), "--kernel", str(tmp_path / "none.mat"),
                  "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert result.exit_code == 2 and "none.mat" in result.output
    result = _run("zssr", "adapt", "--input", str(G20 / "baby.png"), "--kernel", str(G20 / "kernel.mat"),
                  "--model", str(meta_model), "--scale", "4", "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert result.exit_code == 2 and "is for x2, not --scale 4" in result.output
    result = _run("mzsr", "train", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "no HR images" in result.output
    result = _run("mzsr", "train", "--input", str(T91), "--out", str(tmp_path / "o"), "--set", "inner_stepz=2")
    assert result.exit_code == 2 and "inner_stepz" in result.output


TF_FIXTURE = Path(__file__).parents[1] / "fixtures" / "mzsr_tf"


def _tf_checkpoint(folder: Path, name: str) -> Path:
    """The fixture checkpoint under the prefix ``folder/name`` (a released model's name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("index", "data-00000-of-00001"):
        shutil.copy(TF_FIXTURE / f"Directx2.{part}", folder / f"{name}.{part}")
    return folder / name


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """srdistill checkpoints converted by `mzsr import-tf` under released names."""
    root = tmp_path_factory.mktemp("import_tf")
    out = {}
    for name in ("Directx2", "Bicubicx2", "Pretrained"):
        prefix = _tf_checkpoint(root / "tf", name)
        out[name] = root / f"{name}.safetensors"
        result = _run("mzsr", "import-tf", str(prefix), "--out", str(out[name]))
        assert result.exit_code == 0, result.output
        assert "checksums" in result.output and f"mzsr x2 from {prefix}" in result.output
    return out


def test_import_tf_records_each_released_models_settings(imported, tmp_path):
    meta = load_checkpoint(imported["Directx2"])[1]
    assert meta["mzsr_config"]["subsample"] == "direct" and meta["scale"] == 2
    assert meta["mzsr_config"]["adapt_lr"] == [2e-2, 1e-2, 1e-2, 1e-2, 5e-3]  # test.py, model 0
    meta = load_checkpoint(imported["Bicubicx2"])[1]
    assert meta["mzsr_config"]["subsample"] == "bicubic"
    assert meta["mzsr_config"]["adapt_lr"] == [1e-2, 1e-2, 1e-2, 1e-3]  # test.py, model 2
    assert "mzsr_config" not in load_checkpoint(imported["Pretrained"])[1]  # bicubic pretraining only
    x4 = _tf_checkpoint(tmp_path, "Directx4")
    assert _run("mzsr", "import-tf", str(x4), "--out", str(tmp_path / "x4.safetensors")).exit_code == 0
    meta = load_checkpoint(tmp_path / "x4.safetensors")[1]
    assert meta["scale"] == 4 and meta["mzsr_config"]["adapt_lr"] == [1e-2, 5e-3, 5e-3, 5e-3, 5e-3, 1e-3]
    multi = _tf_checkpoint(tmp_path, "Multi-scale")
    result = _run("mzsr", "import-tf", str(multi), "--out", str(tmp_path / "m.safetensors"))
    assert result.exit_code == 2 and "give --scale" in result.output
    result = _run("mzsr", "import-tf", str(multi) + ".index", "--out", str(tmp_path / "m.safetensors"),
                  "--scale", "3", "--set", "adapt_lr=[0.05]")  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(tmp_path / "m.safetensors")[1]
    assert meta["scale"] == 3 and meta["mzsr_config"]["adapt_lr"] == [0.05]
    own = _tf_checkpoint(tmp_path, "model-100000")
    result = _run("mzsr", "import-tf", str(own), "--out", str(tmp_path / "o.safetensors"), "--scale", "2")
    assert result.exit_code == 2 and "give --stage meta or --stage pretrained" in result.output
    result = _run("mzsr", "import-tf", str(own), "--out", str(tmp_path / "o.safetensors"), "--scale", "2",
                  "--stage", "meta", "--subsample", "bicubic")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "o.safetensors")[1]["mzsr_config"]["subsample"] == "bicubic"
    result = _run("mzsr", "import-tf", str(tmp_path / "none"), "--out", str(tmp_path / "n.safetensors"))
    assert result.exit_code == 2 and "none.index does not exist" in result.output
    result = _run("mzsr", "import-tf", str(own), "--out", str(tmp_path / "n.safetensors"), "--scale", "2",
                  "--stage", "meta", "--scope", "NET")  # fmt: skip
    assert result.exit_code == 2 and "lacks MZSR variables ['NET/conv1/kernel'" in result.output


def test_imported_models_run_in_eval_zssr_adapt_and_mzsr_train(imported, tmp_path):
    args = _g20_butterfly_eval(tmp_path)
    result = _run(*args, "--model", str(imported["Directx2"]), "--adapt-steps", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["model"].startswith("MZSR(1)")

    # zssr adapt takes the checkpoint's settings: Bicubicx2's bicubic sons and its lr
    G20 = data_path("Set5/LR_g20_x2_MZSR")
    lr = imaging.read_image(G20 / "butterfly.png")[:32, :40]
    imaging.write_png(tmp_path / "lr.png", lr)
    result = _run("zssr", "adapt", "--input", str(tmp_path / "lr.png"), "--kernel", str(G20 / "kernel.mat"),
                  "--model", str(imported["Bicubicx2"]), "--adapt-steps", "2",
                  "--out", str(tmp_path / "sr.png"))  # fmt: skip
    assert result.exit_code == 0, result.output
    net, _ = load_checkpoint(imported["Bicubicx2"])
    kernel = degradation.load_kernel(G20 / "kernel.mat")
    want = mzsr.zero_shot(net, lr, kernel, 2, steps=2, lr=(1e-2, 1e-2, 1e-2, 1e-3), subsample="bicubic")
    direct = mzsr.zero_shot(net, lr, kernel, 2, steps=2, lr=(1e-2, 1e-2, 1e-2, 1e-3), subsample="direct")
    assert not np.array_equal(want, direct)  # the son's subsampling shows in the result
    assert np.array_equal(imaging.read_image(tmp_path / "sr.png"), want)

    # the imported pretraining is an init for the meta-transfer learning
    data = tmp_path / "hr"
    data.mkdir()
    shutil.copy(T91 / "t1.png", data / "t1.png")
    result = _run("mzsr", "train", "--input", str(data), "--out", str(tmp_path / "run"), "--pretrained",
                  str(imported["Pretrained"]), "--set", "n_feats=4", *TINY)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "run" / "mzsr.safetensors")[1]["init"] == str(imported["Pretrained"])


def test_adapt_steps_without_an_mzsr_config_is_an_error(imported, meta_model):
    G20 = data_path("Set5/LR_g20_x2_MZSR")
    args = ["eval", "--dataset", "Set5", "--scale", "2", "--kernel", str(G20 / "kernel.mat"), "--adapt-steps", "1"]
    result = _run(*args, "--model", str(imported["Pretrained"]))
    assert result.exit_code == 2 and "--adapt-steps needs a meta-trained MZSR checkpoint" in result.output
    assert "without an MZSR config" in result.output
    pre = meta_model.parent / "pretrain" / "model.safetensors"  # our own bicubic pretraining
    result = _run(*args, "--model", str(pre))
    assert result.exit_code == 2 and "without an MZSR config" in result.output
    for model in ("bicubic", "zssr"):
        result = _run(*args, "--model", model)
        assert result.exit_code == 2 and f"not {model!r}" in result.output
    result = _run(*args[:-1], "-1", "--model", str(meta_model))
    assert result.exit_code == 2 and "--adapt-steps" in result.output
