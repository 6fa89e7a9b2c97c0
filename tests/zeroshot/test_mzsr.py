"""MZSR meta-transfer learning, test-time adaptation and the ZSSR baseline (srdistill.zeroshot.mzsr), on
tiny networks and patches so the whole file runs in seconds on a CPU."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import T91, data_path

from srdistill.config import MZSRConfig
from srdistill.sr import degradation, imaging, metrics
from srdistill.sr.models.mzsr import MZSRNet
from srdistill.sr.training import load_checkpoint, save_checkpoint
from srdistill.zeroshot import mzsr
from srdistill.zeroshot.mzsr import zssr_baseline

FILES = [T91 / f"t{i}.png" for i in (1, 2, 3)]
TINY = dict(n_feats=4, n_layers=3, hr_patch=16, support=2, query=2, tasks_per_batch=2,
            inner_steps=2, kernel_size=7, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def images():
    return [imaging.read_image(f) for f in FILES]


@pytest.fixture(scope="module")
def g20():
    """Set5 'butterfly' degraded by MZSR's g20 kernel (x2, direct subsampling), and the kernel."""
    folder = data_path("Set5/LR_g20_x2_MZSR")
    kernel = degradation.load_kernel(folder / "kernel.mat")
    return imaging.read_image(folder / "butterfly.png"), kernel


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_config_defaults_are_mzsr_and_zssr_settings():
    cfg = MZSRConfig()
    assert (cfg.tasks_per_batch, cfg.support, cfg.query, cfg.hr_patch) == (5, 8, 8, 64)
    assert (cfg.inner_steps, cfg.inner_lr, cfg.meta_lr) == (5, 1e-2, 1e-4)
    assert (cfg.meta_iterations, cfg.first_order, cfg.adapt_lr[0]) == (100_000, False, 2e-2)
    assert (cfg.zssr_iterations, cfg.zssr_lr, cfg.zssr_min_lr) == (3000, 1e-3, 9e-6)
    assert cfg.loss_weights == "uniform"  # what the released train.py trains with
    with pytest.raises(ValueError, match="hr_patch 63 must be a multiple of scale 2"):
        MZSRConfig(hr_patch=63)
    with pytest.raises(ValueError, match="adapt_lr"):
        MZSRConfig(adapt_lr=())
    with pytest.raises(ValueError, match="workers 2"):
        MZSRConfig(workers=2)  # 5 tasks cannot be split evenly
    with pytest.raises(ValueError, match="extra"):
        MZSRConfig(inner_step=3)


def test_released_loss_weights_are_uniform_at_every_step():
    """MZSR's train.py anneals from a global_step that never advances: 1/5 each, always."""
    cfg = MZSRConfig()
    for step in (0, 1, 1000, 3234, 10**6):
        np.testing.assert_array_equal(mzsr.loss_weights(step, cfg), np.full(5, 0.2))
    three = MZSRConfig(inner_steps=3, msl_anneal_iterations=0.0)  # the MAML++ knobs do not apply
    np.testing.assert_allclose(mzsr.loss_weights(50, three), np.full(3, 1 / 3))
    with pytest.raises(ValueError, match="loss_weights"):
        MZSRConfig(loss_weights="linear")


def test_uniform_meta_loss_is_the_mean_query_loss_over_inner_steps(images):
    """With uniform weights the task's meta loss is the mean of the query L1 after each of the T
    inner SGD steps (computed here by plain SGD on a copy of the network)."""
    cfg = MZSRConfig(**{**TINY, "inner_steps": 3, "inner_lr": 0.1})
    torch.manual_seed(0)
    net = MZSRNet(2, n_feats=4, n_layers=3).double()
    (task,) = _tiny_tasks(images, cfg, n=1)
    s_in, s_hr, q_in, q_hr = task
    copy_ = copy.deepcopy(net)
    query = []
    for _ in range(3):
        loss = torch.nn.functional.l1_loss(copy_.forward_upsampled(s_in), s_hr)
        grads = torch.autograd.grad(loss, list(copy_.parameters()))
        with torch.no_grad():
            for p, g in zip(copy_.parameters(), grads):
                p -= 0.1 * g
            query.append(torch.nn.functional.l1_loss(copy_.forward_upsampled(q_in), q_hr).item())
    assert query[-1] != pytest.approx(query[0], rel=1e-6)  # the inner loop moves the query loss
    meta = mzsr.meta_backward(net, [task], cfg, step=10**6)["meta_loss"]
    assert meta == pytest.approx(np.mean(query), rel=1e-10)
    annealed = mzsr.meta_backward(copy.deepcopy(net), [task], cfg.model_copy(update={"loss_weights": "annealed"}),
                                  step=10**6)["meta_loss"]  # fmt: skip
    assert annealed == pytest.approx(0.01 * query[0] + 0.01 * query[1] + 0.98 * query[2], rel=1e-10)


def test_annealed_loss_weights_go_from_uniform_to_the_last_step():
    cfg = MZSRConfig(loss_weights="annealed")  # 5 inner steps, MAML++'s schedule as MZSR writes it
    np.testing.assert_allclose(mzsr.loss_weights(0, cfg), np.full(5, 0.2))
    for step in (0, 1, 500, 1000, 3000, 3233, 3234, 10_000, 10**6):
        w = mzsr.loss_weights(step, cfg)
        assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    mid = mzsr.loss_weights(1000, cfg)
    assert mid[-1] > 0.2 > mid[0] == mid[3]
    np.testing.assert_allclose(mzsr.loss_weights(10_000, cfg), [0.006] * 4 + [0.976])
    plain = cfg.model_copy(update={"msl_min_weight": 0.0})  # weights end all on the last step
    np.testing.assert_allclose(mzsr.loss_weights(10_000, plain), [0, 0, 0, 0, 1])
    now = plain.model_copy(update={"msl_anneal_iterations": 0.0})
    np.testing.assert_allclose(mzsr.loss_weights(0, now), [0, 0, 0, 0, 1])


def test_sample_task_shapes_range_and_seed(images):
    cfg = MZSRConfig(**{**TINY, "query": 3})
    s_in, s_hr, q_in, q_hr = mzsr.sample_task(images, np.random.default_rng(0), cfg)
    assert s_in.shape == s_hr.shape == (2, 3, 16, 16) and q_in.shape == q_hr.shape == (3, 3, 16, 16)
    assert all(t.dtype == torch.float32 for t in (s_in, s_hr, q_in, q_hr))
    assert 0 <= s_hr.min() and s_hr.max() <= 1 and -0.1 < s_in.min() and s_in.max() < 1.1
    assert (s_in - s_hr).abs().mean() < 0.2  # the input is the blurred, upsampled target
    again = mzsr.sample_task(images, np.random.default_rng(0), cfg)
    assert torch.equal(again[0], s_in) and torch.equal(again[3], q_hr)
    with pytest.raises(ValueError, match="smaller than hr_patch 64"):
        mzsr.sample_task([images[0][:40, :40]], np.random.default_rng(0), MZSRConfig())


def _tiny_tasks(images, cfg, n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(t.double() for t in mzsr.sample_task(images, rng, cfg)) for _ in range(n)]


def test_meta_gradient_is_second_order_and_matches_finite_differences(images):
    cfg = MZSRConfig(**{**TINY, "inner_lr": 0.5})  # a large inner lr: a large 2nd-order term
    torch.manual_seed(0)
    net = MZSRNet(2, n_feats=4, n_layers=3).double()
    tasks = _tiny_tasks(images, cfg)

    def grad(c):
        model = copy.deepcopy(net)
        losses = mzsr.meta_backward(model, tasks, c, step=0)
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), losses["meta_loss"]

    g2, loss = grad(cfg)
    g1, loss1 = grad(cfg.model_copy(update={"first_order": True}))
    assert loss == pytest.approx(loss1, rel=1e-12)  # same forward, different gradient
    assert (g2 - g1).norm() > 1e-3 * g2.norm()

    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    gen = torch.Generator().manual_seed(1)
    # L1's sign makes the inner gradients, hence the fast weights, jump wherever a support
    # residual crosses 0: a tiny step (float64) keeps the differences off those jumps
    eps = 1e-8
    for _ in range(3):
        v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        values = []
        for sign in (1, -1):
            model = copy.deepcopy(net)
            torch.nn.utils.vector_to_parameters(theta + sign * eps * v, model.parameters())
            values.append(mzsr.meta_backward(model, tasks, cfg, step=0)["meta_loss"])
        fd = (values[0] - values[1]) / (2 * eps)
        assert fd == pytest.approx(float(g2 @ v), rel=1e-4, abs=1e-8)
        assert fd != pytest.approx(float(g1 @ v), rel=1e-2)  # first order is measurably off


def test_meta_step_updates_only_through_the_outer_step(images):
    cfg = MZSRConfig(**TINY)
    torch.manual_seed(0)
    net = MZSRNet(2, n_feats=4, n_layers=3)
    before = _params(net)
    tasks = [mzsr.sample_task(images, np.random.default_rng(1), cfg)]
    opt = torch.optim.Adam(net.parameters(), lr=cfg.meta_lr)
    losses = mzsr.meta_backward(net, tasks, cfg, step=0)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(net)))  # fast weights only
    assert set(losses) == {"support_loss", "support_loss_after", "query_loss", "meta_loss"}
    assert losses["support_loss_after"] < losses["support_loss"]  # the inner loop learns
    losses = mzsr.meta_step(net, tasks, cfg, opt, step=0)
    assert all(np.isfinite(v) for v in losses.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, _params(net)))


def _dp_worker(rank: int, tmp: str) -> None:
    """One of 2 gloo workers: its own task, a meta step with the gradients all-reduced."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        tasks, cfg = torch.load(f"{tmp}/tasks.pt", weights_only=False)
        torch.manual_seed(0)
        net = MZSRNet(2, n_feats=4, n_layers=3)
        opt = torch.optim.SGD(net.parameters(), lr=1.0)  # the update is the gradient itself
        losses = mzsr.meta_step(net, [tasks[rank]], cfg, opt, step=0, world_size=2)
        torch.save((_params(net), losses), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_meta_step_data_parallel_equals_one_process(images, tmp_path):
    """2 workers with one task each take the same meta-step as one process with both tasks."""
    cfg = MZSRConfig(**TINY)
    rng = np.random.default_rng(0)
    tasks = [mzsr.sample_task(images, rng, cfg) for _ in range(2)]
    torch.save((tasks, cfg), tmp_path / "tasks.pt")
    torch.multiprocessing.spawn(_dp_worker, args=(str(tmp_path),), nprocs=2)
    torch.manual_seed(0)
    net = MZSRNet(2, n_feats=4, n_layers=3)
    losses = mzsr.meta_step(net, tasks, cfg, torch.optim.SGD(net.parameters(), lr=1.0), step=0)
    for rank in (0, 1):
        params, dp_losses = torch.load(tmp_path / f"rank{rank}.pt")
        for p, q in zip(params, net.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
        assert dp_losses == pytest.approx(losses, rel=1e-5)


def test_meta_train_resumes_to_the_uninterrupted_weights(images, tmp_path):
    torch.manual_seed(3)
    init = tmp_path / "pre.safetensors"
    save_checkpoint(MZSRNet(2, n_feats=4, n_layers=3), init, arch="mzsr", scale=2,
                    model_kwargs={"n_feats": 4, "n_layers": 3})  # fmt: skip
    cfg4 = MZSRConfig(**TINY, meta_iterations=4, checkpoint_every=2, log_every=1)
    full = mzsr.meta_train(cfg4, FILES, tmp_path / "a", init=init, progress=False)
    cfg2 = cfg4.model_copy(update={"meta_iterations": 2})
    mzsr.meta_train(cfg2, FILES, tmp_path / "b", init=init, progress=False)
    split = mzsr.meta_train(cfg4, FILES, tmp_path / "b", init=init, progress=False)
    (a, meta_a), (b, _) = load_checkpoint(full), load_checkpoint(split)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    pre, _ = load_checkpoint(init)
    assert not torch.equal(a.body[0].weight, pre.body[0].weight)
    assert meta_a["step"] == 4 and meta_a["mzsr_config"]["meta_iterations"] == 4
    assert meta_a["model_kwargs"] == {"n_feats": 4, "n_layers": 3, "upsample": "matlab"}
    lines = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "query_loss" in x] == [1, 2, 3, 4] and "query_loss" in lines[0]
    assert [x["resumed_from_step"] for x in lines if "resumed_from_step" in x] == [2]
    assert load_checkpoint(split)[1]["resumed_from"] == [2] and meta_a["resumed_from"] == []
    with pytest.raises(ValueError, match="n_feats=4"):
        mzsr.meta_train(MZSRConfig(**{**TINY, "n_feats": 8}), FILES, tmp_path / "c", init=init)


def test_float_degradation_and_input_convention_match_mzsr_g20():
    """The float son path rounds to MZSR's own g20 inputs, and with a zero residual the network
    is MATLAB bicubic: Set5 g20 x2 gives the paper's bicubic baseline (28.73 dB)."""
    folder = data_path("Set5/LR_g20_x2_MZSR").parent  # its HR/ beside it
    kernel = degradation.load_kernel(folder / "LR_g20_x2_MZSR" / "kernel.mat")
    net = MZSRNet(2, n_feats=4, n_layers=3)
    torch.nn.init.zeros_(net.body[-1].weight)
    torch.nn.init.zeros_(net.body[-1].bias)
    psnrs = []
    for name in ("baby", "bird", "butterfly", "head", "woman"):
        lr_img = imaging.read_image(folder / "LR_g20_x2_MZSR" / f"{name}.png")
        hr = imaging.modcrop(imaging.read_image(folder / "HR" / f"{name}.png"), 2)
        if name in ("bird", "woman"):
            down = degradation.degrade_float(hr / 255.0, kernel, 2)
            assert np.array_equal(np.round(down * 255).astype(np.uint8), lr_img)
        psnrs.append(metrics.psnr_y(mzsr.super_resolve(net, lr_img, 2), hr, border=2))
    assert np.mean(psnrs) == pytest.approx(28.74, abs=0.02)


def test_adapt_lowers_the_loss_on_the_image_and_copies(g20):
    lr_img, kernel = g20
    torch.manual_seed(0)
    net = MZSRNet(2, n_feats=8, n_layers=4)
    before = _params(net)
    inp, target = mzsr.son_pair(lr_img, kernel, 2)
    assert inp.shape == target.shape == (1, 3, *lr_img.shape[:2])

    def loss(model):
        with torch.no_grad():
            return torch.nn.functional.l1_loss(model.forward_upsampled(inp), target).item()

    adapted = mzsr.adapt(net, lr_img, kernel, 2, steps=1, lr=1e-2)
    assert loss(adapted) < loss(net)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(net)))  # the input is untouched
    assert not adapted.training
    again = mzsr.adapt(net, lr_img, kernel, 2, steps=3, lr=(2e-2, 1e-2))
    assert loss(again) < loss(net)
    sr = mzsr.super_resolve(adapted, lr_img, 2)
    assert sr.shape == (256, 256, 3) and sr.dtype == np.uint8
    sr8 = mzsr.super_resolve(adapted, lr_img[:30, :40], 2, ensemble="median")
    assert sr8.shape == (60, 80, 3)


def test_zssr_trains_on_the_image_alone(g20):
    lr_img, kernel = g20
    small = lr_img[40:76, 20:60]  # 36x40
    cfg = MZSRConfig(n_feats=8, n_layers=4, zssr_crop=32, zssr_iterations=100,
                     zssr_back_projection=1, device="cpu")  # fmt: skip
    sr, info = mzsr.zssr(small, kernel, 2, cfg, seed=0)
    assert sr.shape == (72, 80, 3) and sr.dtype == np.uint8
    assert info["iterations"] == 100 and len(info["train_loss"]) == 100 and info["seconds"] > 0
    assert np.isfinite(info["train_loss"]).all()  # per random crop: too noisy to compare
    # the whole-image loss on (I_son, LR) falls (measured after steps 1 and 51, and at the end)
    assert [s for s, _ in info["rec_mse"]] == [0, 50, 100]
    assert info["rec_mse"][-1][1] < 0.9 * info["rec_mse"][0][1]
    sr2, _ = mzsr.zssr(small, kernel, 2, cfg, seed=0)
    assert np.array_equal(sr, sr2)  # seeded


def test_zssr_lr_policy_drops_on_a_plateau_only():
    steps = np.arange(0, 250, 50)
    falling = np.column_stack([steps, 1.0 - 1e-3 * steps + 1e-3 * np.array([1, -1, 1, -1, 1])])
    flat = np.column_stack([steps, 0.5 + 1e-3 * np.array([1, -1, 1, -1, 1])])
    assert not zssr_baseline._zssr_plateau(falling)
    assert zssr_baseline._zssr_plateau(flat)
    assert not zssr_baseline._zssr_plateau(flat[:3])  # too few points to fit with a covariance


def test_bad_inputs_raise_clear_errors(g20):
    lr_img, kernel = g20
    net = MZSRNet(2, n_feats=4, n_layers=3)
    with pytest.raises(ValueError, match="2-D"):
        mzsr.adapt(net, lr_img, kernel[None], 2, steps=1, lr=1e-2)
    with pytest.raises(ValueError, match="2-D"):
        mzsr.zssr(lr_img, kernel.ravel(), 2, MZSRConfig(zssr_iterations=1))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        mzsr.son_pair(lr_img[..., 0], kernel, 2)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        mzsr.super_resolve(net, lr_img.astype(np.float32), 2)
    with pytest.raises(ValueError, match="smaller than"):
        mzsr.son_pair(lr_img[:3], kernel, 2)
    with pytest.raises(ValueError, match="scale 3"):
        mzsr.adapt(net, lr_img, kernel, 3, steps=1, lr=1e-2)
    with pytest.raises(ValueError, match="lr must be positive"):
        mzsr.adapt(net, lr_img, kernel, 2, steps=1, lr=())


def test_zero_shot_is_adapt_then_super_resolve(g20):
    lr_img, kernel = g20
    lr_img = lr_img[:32, :40]
    torch.manual_seed(0)
    net = MZSRNet(2, n_feats=8, n_layers=4)
    assert np.array_equal(mzsr.zero_shot(net, lr_img, kernel, 2, steps=0, lr=1e-2), mzsr.super_resolve(net, lr_img, 2))
    adapted = mzsr.adapt(net, lr_img, kernel, 2, steps=2, lr=(2e-2, 1e-2))
    out = mzsr.zero_shot(net, lr_img, kernel, 2, steps=2, lr=(2e-2, 1e-2))
    assert out.shape == (64, 80, 3) and np.array_equal(out, mzsr.super_resolve(adapted, lr_img, 2))
