"""Feature-level distribution alignment (TripleD step 3, ``srdistill.distill.alignment``).

The feature extractor is a real, frozen, differentiable function built here: a fixed random
two-layer conv net with global mean/std pooling and L2 normalisation. The target distribution
is the features of T91 crops whose colours were changed (red x1.2, blue x0.8), so aligning
the selected (unchanged) crops means learning a colour shift the fidelity term resists.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import T91
from srdistill.config import AlignConfig
from srdistill.distill.alignment import AlignNet, align_folder, align_images, moment_loss
from srdistill.sr import imaging
from srdistill.sr.device import to_tensor
from srdistill.sr.metrics import feature_mmd2

GAIN = np.array([1.2, 1.0, 0.8])  # RGB colour change of the target images


def make_feature_fn():
    """``(N, 3, h, w)`` [0, 1] -> ``(N, 64)``: fixed random convs, mean+std pooling, norm 4."""
    g = torch.Generator().manual_seed(1)
    w1, b1 = torch.randn(16, 3, 3, 3, generator=g) * 0.3, torch.randn(16, generator=g) * 0.1
    w2, b2 = torch.randn(32, 16, 3, 3, generator=g) * 0.1, torch.randn(32, generator=g) * 0.1

    def fn(x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.conv2d(x, w1, b1, stride=2, padding=1))
        h = torch.relu(F.conv2d(h, w2, b2, stride=2, padding=1))
        f = torch.cat([h.mean((2, 3)), h.std((2, 3))], 1)
        return f / (f.norm(dim=1, keepdim=True) + 1e-6) * 4

    return fn


def random_crops(paths, per_image: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for p in paths:
        img = imaging.read_image(p)
        for _ in range(per_image):
            y, x = rng.integers(img.shape[0] - size + 1), rng.integers(img.shape[1] - size + 1)
            out.append(img[y : y + size, x : x + size])
    return out


@pytest.fixture(scope="module")
def data():
    """12 selected 32x32 T91 crops, 64 colour-changed target crops and their (64, 64) features."""
    paths = sorted(T91.glob("*.png"))
    rng = np.random.default_rng(0)
    selected = random_crops(paths[:12], 1, 32, rng)
    target_imgs = [
        np.clip(np.round(c * GAIN), 0, 255).astype(np.uint8) for c in random_crops(paths[:16], 4, 32, rng)
    ]
    fn = make_feature_fn()
    with torch.no_grad():
        target = fn(to_tensor(np.stack(target_imgs))).numpy()
    return selected, target_imgs, target, fn


def cfg(**kw) -> AlignConfig:
    base = dict(channels=16, blocks=3, iterations=100, batch_size=12, lr=2e-3, fidelity_weight=1.0, device="cpu")
    return AlignConfig(**{**base, **kw})


def red_blue_ratio(images) -> float:
    m = np.stack(images).reshape(-1, 3).astype(np.float64).mean(0)
    return float(m[0] / m[2])


# --------------------------------------------------------------------------- AlignNet


@pytest.mark.parametrize("hw", [(1, 1), (7, 5), (33, 18)])
def test_alignnet_starts_as_identity_any_size(hw):
    torch.manual_seed(0)
    net = AlignNet(channels=8, blocks=4)
    x = torch.rand(2, 3, *hw)
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = 0.0, 1.0  # the range's ends too
    y = net(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(y, x)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 8), (8, 8), (8, 3)]


def test_alignnet_output_clamped_and_rejects_bad_sizes():
    net = AlignNet(channels=4, blocks=2)
    with torch.no_grad():
        net.body[-1].bias.fill_(0.7)
    y = net(torch.full((1, 3, 5, 5), 0.5))
    assert torch.equal(y, torch.ones_like(y))
    with pytest.raises(ValueError, match="blocks"):
        AlignNet(channels=4, blocks=1)


# --------------------------------------------------------------------------- moment_loss


def test_moment_loss_values_and_gradient():
    y = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # mean (1, 2), std (1, 1)
    assert float(moment_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    x = torch.tensor([[3.0, 2.0]], requires_grad=True)  # mean (3, 2), std (0, 0)
    loss = moment_loss(x, y)
    assert float(loss.detach()) == pytest.approx(4.0 + 0.0 + 1.0 + 1.0, abs=1e-3)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        moment_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------- align_images


@pytest.mark.parametrize("loss", ["mmd", "moments"])
def test_alignment_lowers_feature_mmd(data, loss):
    selected, target_imgs, target, fn = data
    aligned, rep = align_images(selected, target, fn, cfg(loss=loss))
    assert [a.shape for a in aligned] == [s.shape for s in selected]
    assert all(a.dtype == np.uint8 for a in aligned)
    assert set(rep) >= {"iterations", "loss", "mmd_before", "mmd_after", "fidelity_l1",
                        "psnr_to_original", "seconds"}  # fmt: skip
    assert rep["iterations"] == 100 and np.isfinite(rep["loss"])
    # measured: mmd 0.177 -> 0.040 (mmd), 0.060 (moments); PSNR 25.5 / 26.1 dB
    assert rep["mmd_after"] < 0.5 * rep["mmd_before"]
    assert rep["psnr_to_original"] > 23.0
    # the report's numbers are those of the returned images
    mmd_after = feature_mmd2(fn(to_tensor(np.stack(aligned))), torch.from_numpy(target),
                             bandwidth=rep["bandwidth"])  # fmt: skip
    assert float(mmd_after) == pytest.approx(rep["mmd_after"], rel=1e-4, abs=1e-6)
    diff = np.abs(np.stack(aligned).astype(np.float64) - np.stack(selected)).mean() / 255
    assert rep["fidelity_l1"] == pytest.approx(diff)
    # and it moved the colours the way the target was changed (R up, B down)
    assert red_blue_ratio(aligned) > red_blue_ratio(selected) + 0.2
    assert red_blue_ratio(target_imgs) > red_blue_ratio(aligned)


def test_fidelity_weight_keeps_images_close(data):
    selected, _, target, fn = data
    _, loose = align_images(selected, target, fn, cfg(fidelity_weight=0.1))
    _, tight = align_images(selected, target, fn, cfg(fidelity_weight=10.0))
    # measured: 20.7 dB / L1 0.072 / mmd 0.025 vs 38.1 dB / L1 0.003 / mmd 0.135
    assert tight["psnr_to_original"] > 30.0
    assert tight["psnr_to_original"] > loose["psnr_to_original"] + 10.0
    assert tight["fidelity_l1"] < loose["fidelity_l1"]
    assert loose["mmd_after"] < tight["mmd_after"] < tight["mmd_before"]


def test_deterministic_for_a_seed_and_caller_rng_untouched(data):
    selected, _, target, fn = data
    c = cfg(iterations=30, crop=16, batch_size=8)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, ra = align_images(selected, target, fn, c)
    assert torch.equal(torch.rand(3), expected)  # the init used a forked RNG
    b, rb = align_images(selected, target, fn, c)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and ra["loss"] == rb["loss"]
    other, _ = align_images(selected, target, fn, cfg(iterations=30, crop=16, batch_size=8, seed=1))
    assert not all(np.array_equal(x, y) for x, y in zip(a, other))


def test_rejects_mixed_sizes_small_images_and_bad_targets(data):
    selected, _, target, fn = data
    mixed = [selected[0], selected[1][:20, :24]]
    with pytest.raises(ValueError, match="share one size"):
        align_images(mixed, target, fn, cfg(crop=None))
    with pytest.raises(ValueError, match="image 1 .*smaller than align.crop=24"):
        align_images(mixed, target, fn, cfg(crop=24))
    with pytest.raises(ValueError, match="uint8"):
        align_images([selected[0].astype(np.float32)], target, fn, cfg())
    with pytest.raises(ValueError, match="64-d"):
        align_images(selected[:2], target[:, :10], fn, cfg())
    with pytest.raises(ValueError, match="M >= 2"):
        align_images(selected[:2], target[:1], fn, cfg())


# --------------------------------------------------------------------------- align_folder


def test_align_folder_writes_same_named_pngs(data, tmp_path):
    selected, _, target, fn = data
    src, out = tmp_path / "selected", tmp_path / "aligned"
    src.mkdir()
    out.mkdir()
    (out / "stale.png").write_bytes(b"old")
    images = [selected[0], selected[1][:20, :28], selected[2][5:, :]]  # three sizes
    names = ["c000_r0000_a.png", "c000_r0001_b.png", "c001_r0000_c.png"]
    for name, img in zip(names, images):
        imaging.write_png(src / name, img)
    (src / "provenance.csv").write_text("file,patch_id\nc000_r0000_a.png,a\n")
    rep = align_folder(src, out, target, fn, cfg(crop=16, batch_size=8, iterations=40))
    assert sorted(p.name for p in out.glob("*.png")) == names
    for name, img in zip(names, images):
        assert imaging.read_image(out / name).shape == img.shape
    assert (out / "provenance.csv").read_bytes() == (src / "provenance.csv").read_bytes()
    assert list(csv.reader((out / "provenance.csv").open()))[1] == ["c000_r0000_a.png", "a"]
    saved = json.loads((out / "align.json").read_text())
    assert saved["mmd_after"] == pytest.approx(rep["mmd_after"])
    assert saved["config"]["crop"] == 16 and saved["config"]["loss"] == "mmd"
    assert rep["images"] == 3 and rep["mmd_after"] < rep["mmd_before"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    with pytest.raises(ValueError, match="differ"):
        align_folder(src, src, target, fn, cfg(crop=16))
