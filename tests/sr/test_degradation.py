from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.io

from srdistill.sr.degradation import (
    anisotropic_gaussian,
    blur,
    degrade,
    degrade_float,
    isotropic_gaussian,
    kernel_covariance,
    load_kernel,
    random_kernel,
    random_kernel_params,
)
from srdistill.sr.imaging import imresize, modcrop, read_image

from conftest import data_path

SET5 = ["baby", "bird", "butterfly", "head", "woman"]


def _sigma(theta: float, l1: float, l2: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    r = np.array([[c, -s], [s, c]])
    return r @ np.diag([l1, l2]) @ r.T


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("size", [1, 2, 4, 15, 21, 31])
def test_gaussian_kernels_normalised_nonnegative_centred(size):
    rng = np.random.default_rng(size)
    for _ in range(20):
        k = anisotropic_gaussian(size, *random_kernel_params(rng, 4))
        assert k.shape == (size, size) and k.dtype == np.float64
        assert k.sum() == pytest.approx(1.0, abs=1e-12)
        assert k.min() >= 0
        assert np.array_equal(k, k[::-1, ::-1])  # centrally symmetric: correlate == convolve
        ys, xs = np.indices(k.shape)
        assert (k * xs).sum() == pytest.approx((size - 1) / 2, abs=1e-9)  # centred on the grid
        assert (k * ys).sum() == pytest.approx((size - 1) / 2, abs=1e-9)
    iso = isotropic_gaussian(size, 3.0)
    assert iso.sum() == pytest.approx(1.0, abs=1e-12) and iso.min() >= 0


def test_anisotropic_covariance_matches_sigma():
    # On a 31x31 grid the second moments of the sampled Gaussian equal Σ up to (a) the grid
    # sampling term, ~exp(-2π²λ) (2e-7 relative at λ = 1), and (b) the tails cut at 15 px,
    # >= 4.7 standard deviations for λ <= 2.5 * 4 = 10 (measured < 2e-5 relative).
    # 1e-4 * λ1 leaves a 5x margin while still catching any convention error (a std used as
    # a variance, θ of the wrong sign, x/y swapped are all O(1) errors).
    rng = np.random.default_rng(0)
    for scale in (2, 3, 4):
        for _ in range(50):
            theta, l1, l2 = random_kernel_params(rng, scale)
            cov = kernel_covariance(anisotropic_gaussian(31, theta, l1, l2))
            np.testing.assert_allclose(cov, _sigma(theta, l1, l2), atol=1e-4 * l1, rtol=0)
    # orientation, (x, y) = (column, row): θ = 0 spreads along columns, θ = π/2 along rows,
    # θ = π/4 along the main diagonal (down-right)
    cov = kernel_covariance(anisotropic_gaussian(31, 0.0, 6.0, 1.0))
    assert np.allclose(cov, np.diag([6.0, 1.0]), atol=1e-4)
    cov = kernel_covariance(anisotropic_gaussian(31, np.pi / 2, 6.0, 1.0))
    assert np.allclose(cov, np.diag([1.0, 6.0]), atol=1e-4)
    k = anisotropic_gaussian(31, np.pi / 4, 6.0, 1.0)
    assert kernel_covariance(k)[0, 1] == pytest.approx(2.5, abs=1e-4)
    assert k[20, 20] > k[20, 10]  # more weight down-right than down-left of the centre (15, 15)


def test_isotropic_is_anisotropic_with_equal_lambdas():
    for theta in (0.0, 0.3, 1.2, np.pi):
        np.testing.assert_allclose(
            anisotropic_gaussian(15, theta, 2.5, 2.5), isotropic_gaussian(15, 2.5), rtol=0, atol=1e-15
        )


def test_g20_kernel_matches_mzsr_kernel_mat():
    mine = isotropic_gaussian(21, 2.0)
    for path in (data_path("Set5/LR_g20_x2_MZSR/kernel.mat"), data_path("kernels/MZSR_g20/kernel.mat")):
        theirs = scipy.io.loadmat(str(path))["kernel"]
        assert theirs.shape == (21, 21)
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-15)  # measured: 5e-29
        np.testing.assert_allclose(anisotropic_gaussian(21, 0.7, 2.0, 2.0), theirs, rtol=1e-12, atol=1e-15)


def test_random_kernel_parameters_in_mzsr_ranges():
    for scale in (2, 3, 4):
        rng = np.random.default_rng(scale)
        p = np.array([random_kernel_params(rng, scale) for _ in range(3000)])
        theta, l1, l2 = p.T
        assert theta.min() >= 0 and theta.max() < np.pi
        assert l1.min() >= 1 and l1.max() < 2.5 * scale
        assert np.all(l2 >= 1) and np.all(l2 <= l1)
        # the ranges are covered (uniform draws: 3000 samples reach within 1% of each end)
        assert theta.min() < 0.01 * np.pi and theta.max() > 0.99 * np.pi
        assert l1.max() > 1 + 0.99 * (2.5 * scale - 1)
        assert np.mean(theta) == pytest.approx(np.pi / 2, rel=0.05)
        assert np.mean(l1) == pytest.approx((1 + 2.5 * scale) / 2, rel=0.05)
        # λ2 = 1 + (λ1 - 1) U: E[λ2] = 1 + (E[λ1] - 1) / 2
        assert np.mean(l2) == pytest.approx(1 + (np.mean(l1) - 1) / 2, rel=0.05)
    a, b = random_kernel(np.random.default_rng(7), 2), random_kernel(np.random.default_rng(7), 2)
    assert a.shape == (15, 15) and np.array_equal(a, b)
    assert random_kernel(np.random.default_rng(7), 2, size=21).shape == (21, 21)
    with pytest.raises(ValueError, match="scale"):
        random_kernel_params(np.random.default_rng(0), 0)


def test_kernel_argument_errors():
    with pytest.raises(ValueError, match="size"):
        isotropic_gaussian(0, 1.0)
    with pytest.raises(ValueError, match="size"):
        isotropic_gaussian(2.5, 1.0)
    with pytest.raises(ValueError, match="variance"):
        isotropic_gaussian(5, 0.0)
    with pytest.raises(ValueError, match="lambda2"):
        anisotropic_gaussian(5, 0.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="theta"):
        anisotropic_gaussian(5, float("nan"), 1.0, 1.0)
    with pytest.raises(ValueError, match="positive sum"):
        kernel_covariance(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="2-D"):
        kernel_covariance(np.ones(3))
    delta = np.zeros((3, 3))
    delta[1, 1] = 5.0
    assert np.array_equal(kernel_covariance(delta), np.zeros((2, 2)))


# --------------------------------------------------------------------------- degradation


def test_degrade_reproduces_mzsr_g20_set5_exactly():
    kernel = load_kernel(data_path("kernels/MZSR_g20/kernel.mat"))
    for name in SET5:
        hr = modcrop(read_image(data_path(f"Set5/HR/{name}.png")), 2)
        ref = read_image(data_path(f"Set5/LR_g20_x2_MZSR/{name}.png"))
        for k in (kernel, isotropic_gaussian(21, 2.0)):
            lr = degrade(hr, k, 2)
            assert lr.dtype == np.uint8 and lr.shape == ref.shape
            assert np.array_equal(lr, ref), f"{name}: {(lr != ref).sum()} values differ"


def test_direct_subsampling_and_correlation_orientation():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    assert np.array_equal(degrade(hr, np.ones((1, 1)), 3), hr[::3, ::3])  # top-left of each block
    assert np.array_equal(degrade(hr, np.ones((1, 1)), 1), hr)
    # a correlation (MZSR's filters.correlate): weight at kernel [0, 0] reads the pixel up-left
    k = np.zeros((3, 3))
    k[0, 0] = 1.0
    out = degrade(hr, k, 1)
    assert np.array_equal(out[1:, 1:], hr[:-1, :-1])
    assert np.array_equal(out[0, 1:], hr[0, :-1])  # half-sample symmetric ('reflect') border
    # 'reflect' pads d c b a | a b c d: a 1-D check of the border handling
    img = np.array([[10, 20, 30, 40]], np.uint8)
    k = np.zeros((1, 5))
    k[0, 0] = 1.0  # reads x[j - 2]
    assert degrade(img, k, 1).tolist() == [[20, 10, 10, 20]]


def test_degrade_layouts_and_bicubic_shape():
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (3, 24, 30, 3), dtype=np.uint8)
    k = random_kernel(rng, 2)
    out = degrade(batch, k, 2)
    assert out.shape == (3, 12, 15, 3)
    for i in range(3):
        assert np.array_equal(out[i], degrade(batch[i], k, 2))
    gray = batch[0, :, :, 0]
    assert np.array_equal(degrade(gray, k, 2), out[0, :, :, 0])
    for scale in (2, 3, 4):
        img = modcrop(batch[0], scale)
        lr = degrade(img, k, scale, subsample="bicubic")
        assert lr.shape == (img.shape[0] // scale, img.shape[1] // scale, 3) and lr.dtype == np.uint8
        ref = np.clip(np.round(imresize(blur(img, k), 1 / scale)), 0, 255)
        assert np.array_equal(lr, ref)
        cropped = batch[:, : img.shape[0], : img.shape[1]]
        assert np.array_equal(degrade(cropped, k, scale, subsample="bicubic")[0], lr)
    odd = rng.integers(0, 256, (25, 31, 3), dtype=np.uint8)
    assert degrade(odd, k, 2).shape == (13, 16, 3)  # ceil(H/s) without modcrop
    assert degrade(odd, k, 2, subsample="bicubic").shape == (13, 16, 3)


def test_noise_has_the_requested_std():
    flat = np.full((128, 128, 3), 128, np.uint8)
    k = isotropic_gaussian(15, 2.0)
    assert np.array_equal(degrade(flat, k, 2), flat[::2, ::2])
    sigma = 5.0
    noisy = degrade(flat, k, 2, noise_sigma=sigma, rng=np.random.default_rng(0))
    d = noisy.astype(np.float64) - 128
    # rounding the continuous noise adds ~1/12 of variance; 64*64*3 = 12288 samples give the
    # sample std a relative standard error of 1/sqrt(2 n) ≈ 0.6%: 3% is 5 standard errors
    assert d.std() == pytest.approx(np.sqrt(sigma**2 + 1 / 12), rel=0.03)
    assert abs(d.mean()) < 4 * sigma / np.sqrt(d.size)
    again = degrade(flat, k, 2, noise_sigma=sigma, rng=np.random.default_rng(0))
    assert np.array_equal(noisy, again)
    assert not np.array_equal(noisy, degrade(flat, k, 2, noise_sigma=sigma, rng=np.random.default_rng(1)))
    assert degrade(flat, k, 2, noise_sigma=sigma).shape == (64, 64, 3)  # rng=None: unseeded
    # saturation instead of wrap-around
    bright = np.full((8, 8), 250, np.uint8)
    assert degrade(bright, k, 2, noise_sigma=50.0, rng=np.random.default_rng(0)).max() == 255


def test_degrade_float_is_degrade_without_rounding():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (2, 20, 18, 3), dtype=np.uint8)
    k = anisotropic_gaussian(9, 0.7, 3.0, 1.2)
    for subsample in ("direct", "bicubic"):
        out = degrade_float(img / 255.0, k, 2, subsample=subsample)
        assert out.dtype == np.float64 and out.min() >= 0 and out.max() <= 1
        assert np.array_equal(np.round(out * 255).astype(np.uint8), degrade(img, k, 2, subsample=subsample))
    with pytest.raises(TypeError, match="float"):
        degrade_float(img, k, 2)


def test_degrade_errors():
    img = np.zeros((8, 8, 3), np.uint8)
    k = isotropic_gaussian(5, 1.0)
    with pytest.raises(TypeError, match="uint8"):
        degrade(img.astype(np.float32), k, 2)
    with pytest.raises(ValueError, match="subsample"):
        degrade(img, k, 2, subsample="nearest")
    with pytest.raises(ValueError, match="scale"):
        degrade(img, k, 0)
    with pytest.raises(ValueError, match="noise_sigma"):
        degrade(img, k, 2, noise_sigma=-1.0)
    with pytest.raises(ValueError, match="shape"):
        degrade(np.zeros((1, 2, 8, 8, 3), np.uint8), k, 2)
    with pytest.raises(ValueError, match="smaller than scale"):
        degrade(img[:2], k, 4)
    with pytest.raises(ValueError, match="kernel"):
        degrade(img, np.ones(5), 2)
    with pytest.raises(ValueError, match="NaN"):
        degrade(img, np.full((3, 3), np.nan), 2)


# --------------------------------------------------------------------------- kernel files


def test_load_real_kernel_files():
    kdir = data_path("kernels")

    def ok(k, shape):
        assert k.shape == shape and k.dtype == np.float64
        assert k.sum() == pytest.approx(1.0, abs=1e-12)

    # KAIR: a 1x12 cell array of 25x25 float32 kernels; the first 8 are Gaussians
    kair = kdir / "KAIR_cszn/kernels_12.mat"
    raw = scipy.io.loadmat(str(kair))["kernels"]
    for i in range(12):
        k = load_kernel(kair, index=i)
        ok(k, (25, 25))
        np.testing.assert_allclose(k, raw[0, i] / raw[0, i].astype(np.float64).sum(), rtol=1e-6)
    assert np.allclose(kernel_covariance(load_kernel(kair, index=4)), np.diag([7.0, 2.0]), atol=0.01)
    with pytest.raises(ValueError, match="index 12 out of range.*12 kernels"):
        load_kernel(kair, index=12)
    assert np.array_equal(load_kernel(kair, index=-1), load_kernel(kair, index=11))
    # bicubic-equivalent kernels have negative lobes: allowed, the sum is what is normalised
    k = load_kernel(kdir / "KAIR_cszn/kernels_bicubicx234.mat", index=1)
    ok(k, (25, 25))
    assert k.min() < 0
    # an image kernel
    k = load_kernel(kdir / "KAIR_cszn/k_large_1.png")
    ok(k, (67, 67))
    assert k.min() >= 0
    from PIL import Image

    px = np.asarray(Image.open(kdir / "KAIR_cszn/k_large_1.png"), dtype=np.float64)
    np.testing.assert_allclose(k, px / px.sum(), rtol=1e-12)
    # BSRDM: an 11x11x6 numeric stack, kernels along the last axis
    raw = scipy.io.loadmat(str(kdir / "BSRDM_synthetic/kernels_x2.mat"))["kernels"]
    assert raw.shape == (11, 11, 6)
    for i in range(6):
        k = load_kernel(kdir / "BSRDM_synthetic/kernels_x2.mat", index=i)
        ok(k, (11, 11))
        np.testing.assert_allclose(k, raw[:, :, i] / raw[:, :, i].sum(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"index 6 out of range.*\(11, 11, 6\).*axis 2"):
        load_kernel(kdir / "BSRDM_synthetic/kernels_x2.mat", index=6)
    # ZSSR: one 9x9 kernel under key 'Kernel'
    zssr = kdir / "ZSSR_example/BSD100_100_lr_rand_ker_c_X2_0.mat"
    k = load_kernel(zssr)
    ok(k, (9, 9))
    assert np.array_equal(k, load_kernel(zssr, key="Kernel"))
    with pytest.raises(ValueError, match="index 1 out of range.*single 2-D kernel"):
        load_kernel(zssr, index=1)
    # MZSR g20
    ok(load_kernel(kdir / "MZSR_g20/kernel.mat"), (21, 21))
    # Levin et al. 2009 motion kernels: MATLAB v7.3 (HDF5), a 1x8 cell of square kernels
    sizes = [load_kernel(kdir / "KAIR_cszn/Levin09.mat", index=i).shape for i in range(8)]
    assert sizes == [(19, 19), (17, 17), (15, 15), (27, 27), (13, 13), (21, 21), (23, 23), (23, 23)]
    with pytest.raises(ValueError, match="index 8 out of range"):
        load_kernel(kdir / "KAIR_cszn/Levin09.mat", index=8)


def test_load_kernel_v73_transposes_back_to_matlab_layout():
    h5py = pytest.importorskip("h5py")
    path = data_path("kernels/KAIR_cszn/Levin09.mat")
    with h5py.File(path, "r") as f:
        stored = np.asarray(f[f["kernels"][()].ravel()[3]][()])  # HDF5 holds the transpose
    k = load_kernel(path, index=3)
    np.testing.assert_allclose(k, stored.T / stored.sum(), rtol=1e-12)


def test_load_kernel_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.mat"):
        load_kernel(tmp_path / "nope.mat")
    g = isotropic_gaussian(5, 1.0)
    # ambiguous variables are listed; a variable named kernel wins; unknown keys list the variables
    scipy.io.savemat(tmp_path / "two.mat", {"a": g, "b": g})
    with pytest.raises(ValueError, match=r"two\.mat.*ambiguous.*a, b"):
        load_kernel(tmp_path / "two.mat")
    np.testing.assert_allclose(load_kernel(tmp_path / "two.mat", key="b"), g)
    with pytest.raises(ValueError, match=r"no variable 'c'; variables: a, b"):
        load_kernel(tmp_path / "two.mat", key="c")
    scipy.io.savemat(tmp_path / "named.mat", {"kernel": g, "other": np.ones((3, 3))})
    np.testing.assert_allclose(load_kernel(tmp_path / "named.mat"), g)
    scipy.io.savemat(tmp_path / "none.mat", {"s": "text", "t": "more"})
    with pytest.raises(ValueError, match="no 2-D or 3-D numeric array.*variables: s, t"):
        load_kernel(tmp_path / "none.mat")
    # negative and zero sums
    np.save(tmp_path / "neg.npy", -g)
    with pytest.raises(ValueError, match=r"neg\.npy.*sums to -1.*positive sum"):
        load_kernel(tmp_path / "neg.npy")
    np.save(tmp_path / "zero.npy", np.zeros((3, 3)))
    with pytest.raises(ValueError, match="positive sum"):
        load_kernel(tmp_path / "zero.npy")
    # wrong number of dimensions
    np.save(tmp_path / "vec.npy", np.ones(5))
    with pytest.raises(ValueError, match=r"vec\.npy.*shape \(5,\)"):
        load_kernel(tmp_path / "vec.npy")
    np.save(tmp_path / "four.npy", np.ones((2, 3, 5, 5)))
    with pytest.raises(ValueError, match="expected a 2-D kernel or a 3-D stack"):
        load_kernel(tmp_path / "four.npy")
    np.save(tmp_path / "nan.npy", np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        load_kernel(tmp_path / "nan.npy")
    # NumPy stacks (n, h, w) along the first axis; npz keys like .mat
    stack = np.stack([g, isotropic_gaussian(5, 2.0), isotropic_gaussian(5, 3.0)])
    np.save(tmp_path / "stack.npy", stack)
    np.testing.assert_allclose(load_kernel(tmp_path / "stack.npy", index=2), stack[2])
    np.save(tmp_path / "cube.npy", np.stack([g] * 5))  # 5x5x5: the NumPy convention decides
    np.testing.assert_allclose(load_kernel(tmp_path / "cube.npy", index=4), g)
    np.savez(tmp_path / "k.npz", kernels=stack)
    np.testing.assert_allclose(load_kernel(tmp_path / "k.npz", index=1), stack[1])
    with pytest.raises(ValueError, match="single array"):
        load_kernel(tmp_path / "stack.npy", key="x")
    # not a kernel file at all
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"junk\.png.*unsupported kernel file"):
        load_kernel(tmp_path / "junk.png")
    (tmp_path / "junk.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 10)
    with pytest.raises(ValueError, match=r"junk\.mat.*not a readable MATLAB"):
        load_kernel(tmp_path / "junk.mat")
    # v7.3 without h5py: a clear error naming the file and the fix
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"Levin09\.mat.*v7\.3.*pip install h5py"):
        load_kernel(data_path("kernels/KAIR_cszn/Levin09.mat"))
