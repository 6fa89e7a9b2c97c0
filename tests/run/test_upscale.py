"""`srdistill upscale` and `eval --save-images`: tiled inference equals whole-image inference
(EDSR-baseline, ESPCN, MZSR at tiny random-init configs, on a real T91 image), bicubic is
MATLAB's imresize, folders with a corrupt file, s3:// prefixes through moto, one-line CLI errors,
and saved eval images that score what eval prints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from srdistill.cli import app
from srdistill.config import MZSRConfig
from srdistill.run.upscale import load_upscaler, receptive_radius, upscale_image
from srdistill.sr import degradation, imaging, metrics
from srdistill.sr.models import build_model
from srdistill.sr.training import save_checkpoint

from conftest import copy_t91, data_path

#: Tiny configs: the network kinds of the brief, seconds on a CPU.
TINY = {
    "edsr-baseline": {"n_resblocks": 2, "n_feats": 8},
    "espcn": {"n_feats": 8},
    "mzsr": {"n_feats": 8, "n_layers": 4},
}


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _tiny(arch: str, scale: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model(arch, scale, **TINY[arch]).eval()
    if arch == "espcn":  # its last layer starts at zero (= bicubic): give it a detail branch to tile
        torch.nn.init.normal_(net.body[4].weight, std=0.05)
    return net


def _lr() -> np.ndarray:
    """A real image, 197x176 (divisible by none of the tiles below)."""
    return imaging.read_image(data_path("T91/HR") / "t1.png")


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal after rounding to uint8, up to float32 noise: at most 1 apart, in under 0.1% of values."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(int) - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def _checkpoint(path, arch: str, scale: int, **extra):
    net = _tiny(arch, scale)
    kwargs = {k: v for k, v in net.config.items() if k != "scale"}
    save_checkpoint(net, path, arch=arch, scale=scale, model_kwargs=kwargs, extra=extra or None)
    return path


@pytest.mark.parametrize("arch, scale", [("edsr-baseline", 2), ("espcn", 3), ("mzsr", 2)])
def test_tiles_equal_the_whole_image(arch, scale):
    net, lr = _tiny(arch, scale), _lr()
    whole = upscale_image(net, lr, scale, tile=0)
    assert whole.shape == (scale * 176, scale * 197, 3)
    for tile, batch in ((48, 3), (37, 1), (500, 4)):  # not dividing the image; larger than it
        _close(upscale_image(net, lr, scale, tile=tile, batch=batch), whole)
    # what the default overlap buys: without context, the seams show
    seams = upscale_image(net, lr, scale, tile=48, overlap=0)
    assert np.abs(seams.astype(int) - whole).max() > 10


def test_receptive_radius_of_the_shipped_networks():
    assert receptive_radius(build_model("edsr-baseline", 2)) == 36  # 1 + 32 + 1 + 1 + 1/2
    assert receptive_radius(build_model("espcn", 2)) == 4
    assert receptive_radius(build_model("mzsr", 2)) == 6  # bicubic 2 + 8 convolutions at x2
    assert receptive_radius(build_model("mzsr", 4)) == 4
    assert receptive_radius("bicubic") == 2
    rcan = build_model("rcan", 2, n_resgroups=1, n_resblocks=1, n_feats=16, reduction=4)
    assert receptive_radius(rcan) is None and receptive_radius(build_model("swinir-light", 2)) is None


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_in_tiles_is_matlab_imresize(scale):
    lr = _lr()
    want = imaging.imresize(lr, scale)
    assert np.array_equal(upscale_image("bicubic", lr, scale, tile=0), want)
    assert np.array_equal(upscale_image("bicubic", lr, scale, tile=37), want)


def test_mzsr_adaptation_then_tiles_equals_what_eval_scores(tmp_path):
    ckpt = _checkpoint(tmp_path / "mzsr.safetensors", "mzsr", 2,
                       mzsr_config=MZSRConfig(scale=2, adapt_lr=[0.01]).model_dump(mode="json"))  # fmt: skip
    kernel = degradation.random_kernel(np.random.default_rng(0), 2)
    up, label = load_upscaler(str(ckpt), 2, kernel=kernel, adapt_steps=1, device="cpu")
    assert label == "MZSR(1) (mzsr.safetensors)"
    lr = _lr()[:90, :100]
    whole = up(lr)  # eval's per-image path: adapt, then mzsr.super_resolve on the whole image
    _close(upscale_image(up, lr, 2, tile=32), whole)
    assert not np.array_equal(whole, upscale_image(up.net, lr, 2, tile=0))  # the adaptation did something


def test_folder_with_a_corrupt_image_is_upscaled_around_it(tmp_path):
    src = copy_t91(tmp_path / "in", 2)
    copy_t91(src / "sub", 1)
    (src / "broken.png").write_bytes((src / "t1.png").read_bytes()[:300])  # truncated PNG
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    result = _run("upscale", src, "--model", "bicubic", "--scale", 2, "--out", out, "--tile", 64)
    assert result.exit_code == 1, result.output
    assert "skipped" in result.stderr and "broken.png" in result.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["sub/t1.png", "t1.png", "t10.png"]
    for name in ("t1", "t10"):
        want = imaging.imresize(imaging.read_image(src / f"{name}.png"), 2)
        assert np.array_equal(imaging.read_image(out / f"{name}.png"), want)


def test_s3_prefix_and_object_inputs(s3_server, tmp_path):
    for f in sorted(data_path("T91/HR").glob("*.png"))[:2]:
        s3_server.client.put_object(Bucket=s3_server.bucket, Key=f"upscale/lr/{f.name}", Body=f.read_bytes())
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="upscale/lr/bad.jpg", Body=b"\xff\xd8 not a jpeg")
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="upscale/one.png",
                                Body=(data_path("T91/HR") / "t12.png").read_bytes())  # fmt: skip
    out = tmp_path / "out"
    result = _run("upscale", s3_server.uri("upscale/lr/"), s3_server.uri("upscale/one.png"), "--model", "bicubic",
                  "--scale", 3, "--out", out)  # fmt: skip
    assert result.exit_code == 1, result.output
    assert s3_server.uri("upscale/lr/bad.jpg") in result.stderr and "wrote 3 images" in result.stdout
    for name, written in (("t1", "t1"), ("t10", "t10"), ("t12", "one")):  # an object: its own name
        want = imaging.imresize(imaging.read_image(data_path("T91/HR") / f"{name}.png"), 3)
        assert np.array_equal(imaging.read_image(out / f"{written}.png"), want)


def test_cli_checkpoint_in_tiles(tmp_path):
    ckpt = _checkpoint(tmp_path / "edsr.safetensors", "edsr-baseline", 2)
    src = tmp_path / "t1.png"
    shutil.copy(data_path("T91/HR") / "t1.png", src)
    result = _run("upscale", src, "--model", ckpt, "--scale", 2, "--out", tmp_path / "out", "--tile", 40,
                  "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "edsr-baseline (edsr.safetensors) x2: wrote 1 image to" in result.stdout
    _close(imaging.read_image(tmp_path / "out" / "t1.png"), upscale_image(_tiny("edsr-baseline", 2), _lr(), 2, tile=0))


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    ckpt = _checkpoint(tmp_path / "espcn.safetensors", "espcn", 2)
    img = tmp_path / "t1.png"
    shutil.copy(data_path("T91/HR") / "t1.png", img)
    out = tmp_path / "out"
    cases = {
        "is for x2, not --scale 3": ["--model", ckpt, "--scale", 3],
        "does not exist": ["--model", "bicubic", "--scale", 2, "--input-typo"],
        "--half needs CUDA": ["--model", ckpt, "--scale", 2, "--device", "cpu", "--half"],
        "--model 'nosuch'": ["--model", "nosuch", "--scale", 2],
        "is a network name": ["--model", "espcn", "--scale", 2],
        "--scale": ["--model", "bicubic", "--scale", 9],
        "--kernel is used by": ["--model", ckpt, "--scale", 2, "--kernel", img],
    }
    for message, args in cases.items():
        inputs = [tmp_path / "missing.png"] if "--input-typo" in args else [img]
        args = [a for a in args if a != "--input-typo"]
        result = _run("upscale", *inputs, *args, "--out", out)
        assert result.exit_code == 2 and message in result.output, (message, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    result = _run("upscale", img, "--model", "bicubic", "--scale", 2, "--out", tmp_path)  # t1.png over t1.png
    assert result.exit_code == 2 and "would overwrite an input" in result.output
    assert imaging.read_image(img).shape == (176, 197, 3) and not out.exists()


@pytest.mark.parametrize("model", ["bicubic", "espcn"])
def test_eval_save_images_writes_what_it_scores(model, tmp_path):
    ds = copy_t91(tmp_path / "mini", 2)
    if model != "bicubic":
        model = str(_checkpoint(tmp_path / "espcn.safetensors", "espcn", 2))
    saved = tmp_path / "saved"
    result = _run("eval", "--model", model, "--dataset", ds, "--scale", 2, "--json", "--save-images", saved,
                  "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert [p["name"] for p in row["per_image"]] == ["t1", "t10"]
    for p in row["per_image"]:
        hr = imaging.modcrop(imaging.read_image(ds / f"{p['name']}.png"), 2)
        sr = imaging.read_image(saved / "mini" / f"{p['name']}.png")
        assert sr.shape == hr.shape and metrics.psnr_y(sr, hr, 2) == pytest.approx(p["psnr_y"], abs=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tiles_and_half_precision(tmp_path):
    """EDSR-baseline (random init) on a 720x576 Set14 image on the GPU: cuDNN tiles equal the
    whole image; float16 autocast stays within float16's error of float32; the CLI's --half."""
    torch.manual_seed(0)
    net = build_model("edsr-baseline", 2).cuda().eval()
    lr = imaging.read_image(data_path("Set14/HR") / "barbara.png")
    whole = upscale_image(net, lr, 2, tile=0)
    _close(upscale_image(net, lr, 2, tile=128, batch=8), whole)
    half = upscale_image(net, lr, 2, tile=128, batch=8, half=True)
    assert metrics.psnr_y(half, whole, 2) > 40
    ckpt = tmp_path / "edsr.safetensors"
    save_checkpoint(net.cpu(), ckpt, arch="edsr-baseline", scale=2,
                    model_kwargs={k: v for k, v in net.config.items() if k != "scale"})  # fmt: skip
    src = tmp_path / "barbara.png"
    shutil.copy(data_path("Set14/HR") / "barbara.png", src)
    result = _run("upscale", src, "--model", ckpt, "--scale", 2, "--out", tmp_path / "out", "--half")
    assert result.exit_code == 0, result.output
    assert metrics.psnr_y(imaging.read_image(tmp_path / "out" / "barbara.png"), whole, 2) > 40
