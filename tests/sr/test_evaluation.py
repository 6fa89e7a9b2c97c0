"""Evaluation protocol: bicubic reproduces the measured reference figures (DESIGN §3)."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srdistill.sr import imaging, metrics
from srdistill.sr.evaluation import evaluate, evaluate_many, format_table, resolve_dataset
from srdistill.sr.models import ESPCN

from conftest import data_path, need_dataset


# MATLAB-bicubic upscaling measured on the standard HR files (DESIGN.md §3, data/SOURCES.md).
@pytest.mark.parametrize(
    "dataset, scale, psnr, n_images",
    [
        ("Set5", 2, 33.67, 5),
        ("Set5", 4, 28.43, 5),
        ("Set14", 2, 30.32, 14),
        ("Set14", 4, 26.09, 14),
        ("B100", 2, 29.56, 100),
        ("B100", 4, 25.96, 100),
    ],
)
def test_bicubic_reproduces_reference_psnr(dataset, scale, psnr, n_images):
    need_dataset(dataset)
    r = evaluate("bicubic", dataset, scale)
    assert r["dataset"] == dataset and r["scale"] == scale and r["n_images"] == n_images
    assert abs(r["psnr_y"] - psnr) <= 0.01, r["psnr_y"]
    assert 0.6 < r["ssim_y"] < 1.0
    assert len(r["per_image"]) == n_images
    assert r["psnr_y"] == pytest.approx(np.mean([p["psnr_y"] for p in r["per_image"]]))


def test_bicubic_per_image_set5_x2_sorted():
    r = evaluate("bicubic", need_dataset("Set5").parent, 2)  # a folder with an HR subfolder
    assert r["dataset"] == "Set5"
    assert [p["name"] for p in r["per_image"]] == ["baby", "bird", "butterfly", "head", "woman"]
    by_name = {p["name"]: p["psnr_y"] for p in r["per_image"]}
    assert by_name["bird"] > by_name["butterfly"] + 5  # butterfly is the hard one


def test_model_evaluation_matches_manual_pipeline():
    model = ESPCN(2).train()
    r = evaluate(model, "Set5", 2, device="cpu")
    assert model.training  # mode restored
    hr = imaging.modcrop(imaging.read_image(need_dataset("Set5") / "baby.png"), 2)
    lr = imaging.imresize(hr, 1 / 2)
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255
    # untrained ESPCN = torch bicubic (a = -0.75, no antialias): close to, not equal to, MATLAB's
    up = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    sr = (up[0] * 255).round().byte().permute(1, 2, 0).numpy()
    assert r["per_image"][0]["name"] == "baby"
    assert r["per_image"][0]["psnr_y"] == pytest.approx(metrics.psnr_y(sr, hr, 2), abs=1e-6)
    assert abs(r["psnr_y"] - 33.67) < 1.0 and r["psnr_y"] != pytest.approx(33.6734, abs=1e-3)


def test_model_scale_mismatch_and_bad_model():
    with pytest.raises(ValueError, match="x3"):
        evaluate(ESPCN(3), "Set5", 2)
    with pytest.raises(ValueError, match="bicubic"):
        evaluate("lanczos", "Set5", 2)


def test_resolve_dataset(tmp_path, monkeypatch):
    found = resolve_dataset("Set5")  # $SRDISTILL_DATA/Set5/HR, the cache, or the vendored data/Set5/HR
    assert found.name == "HR" and found.parent.name == "Set5" and (found / "baby.png").is_file()
    # an existing directory without HR/ is used as is; with HR/ its subfolder
    assert resolve_dataset(tmp_path) == tmp_path
    (tmp_path / "Mine" / "HR").mkdir(parents=True)
    assert resolve_dataset(tmp_path / "Mine") == tmp_path / "Mine" / "HR"
    # names are looked up under $SRDISTILL_DATA first
    monkeypatch.setenv("SRDISTILL_DATA", f"/nonexistent{os.pathsep}{tmp_path}")
    assert resolve_dataset("Mine") == tmp_path / "Mine" / "HR"
    with pytest.raises(
        FileNotFoundError, match=r"Urban999.*nonexistent/Urban999/HR.*datasets/Urban999/HR"
    ):
        resolve_dataset("Urban999")


def test_evaluate_many_and_format_table():
    rows = {"bicubic": evaluate_many("bicubic", ["Set5", "Set14"], 2)}
    rows["partial"] = [dict(rows["bicubic"][1], psnr_y=31.234, ssim_y=0.9)]
    table = format_table(rows).splitlines()
    assert table[0] == "| model | Set5 | Set14 |"
    assert table[1] == "|---|---|---|"
    b = rows["bicubic"]
    assert table[2] == f"| bicubic | 33.67 / {b[0]['ssim_y']:.4f} | 30.32 / {b[1]['ssim_y']:.4f} |"
    assert table[3] == "| partial | - | 31.23 / 0.9000 |"


# MZSR's Table (arXiv 2002.12213): bicubic on the g^d_2.0 (g20) kernel-degraded inputs, x2.
@pytest.mark.parametrize("dataset, paper", [("Set5", 28.73), ("B100", 26.51)])
def test_kernel_mode_bicubic_matches_mzsr_paper(dataset, paper):
    from srdistill.sr import degradation

    need_dataset(dataset)
    kernel = degradation.load_kernel(data_path("Set5/LR_g20_x2_MZSR/kernel.mat"))
    r = evaluate("bicubic", dataset, 2, kernel=kernel)
    assert abs(r["psnr_y"] - paper) < 0.03  # measured 28.74 and 26.52
    assert r["seconds_per_image"] > 0 and all("seconds" in p for p in r["per_image"])


def test_upscaler_function_and_its_shape_check():
    bicubic = evaluate("bicubic", "Set5", 2)
    same = evaluate(lambda lr: imaging.imresize(lr, 2), "Set5", 2)
    assert same["psnr_y"] == bicubic["psnr_y"]
    with pytest.raises(ValueError, match="the upscaler returned"):
        evaluate(lambda lr: lr, "Set5", 2)
