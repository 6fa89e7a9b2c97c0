"""SRDD's released fine-tuning as options of ``srdistill.distill.diffusion`` (issue 17), each pinned from
its definition: improved DDPM's L_vb (closed-form Gaussian KL, exact normal CDF), DiffFit's
trainable set counted from the rule, tied block embeddings, ImageNet-row class init, the EMA
without warm-up, epochs, and the per-cluster memory terms. Tiny random-init diffusers models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch.optim.optimizer import register_optimizer_step_post_hook

from conftest import encoded_set
from srdistill.config import FinetuneConfig
from srdistill.distill import diffusion as D
from srdistill.distill.diffusion import finetuning

LN2 = math.log(2.0)


def _dit_cfg(tiny_dit_dir, **kw) -> FinetuneConfig:
    return FinetuneConfig(dit_path=str(tiny_dit_dir), resolution=16, **kw)


def _betas(T: int = 1000) -> np.ndarray:
    return np.linspace(1e-4, 0.02, T, dtype=np.float64)


# --------------------------------------------------------------------------- L_vb


def test_normal_kl_is_the_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))  # fmt: skip
    torch.testing.assert_close(D.normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10, atol=1e-12)
    assert float(D.normal_kl(m1, lv1, m1, lv1).abs().max()) < 1e-12  # KL(p || p) = 0


def test_approx_cdf_is_within_2e_4_of_the_normal_cdf():
    x = np.linspace(-6, 6, 2001)
    approx = D.approx_standard_normal_cdf(torch.from_numpy(x)).numpy()
    assert np.abs(approx - norm.cdf(x)).max() < 2e-4
    assert np.abs(approx - norm.cdf(x)).max() > 1e-6  # an approximation, not the exact CDF


def test_discretized_likelihood_is_the_bin_mass_with_open_edge_bins():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0, 0.998])
    means = torch.tensor([-0.99, -0.49, 0.01, 0.3, 0.98, 0.995])
    log_scales = torch.log(torch.tensor([0.01, 0.02, 0.005, 0.03, 0.02, 0.01]))
    got = D.discretized_gaussian_log_likelihood(x, means, log_scales).double().numpy()
    xs, mu, sd = x.double().numpy(), means.double().numpy(), log_scales.double().exp().numpy()
    upper, lower = norm.cdf((xs - mu + 1 / 255) / sd), norm.cdf((xs - mu - 1 / 255) / sd)
    # first bin open below, last open above, 0.998 an inner bin
    mass = np.where(xs < -0.999, upper, np.where(xs > 0.999, 1 - lower, upper - lower))
    bound = 2 * 2e-4 / mass  # |log a - log b| <= |a - b| / min(a, b), the CDF approximation's error
    assert np.all(np.abs(got - np.log(mass)) <= bound + 1e-6), (got, np.log(mass))
    with pytest.raises(ValueError, match="one shape"):
        D.discretized_gaussian_log_likelihood(x, means[:2], log_scales)


def _posterior_np(betas: np.ndarray, x0: np.ndarray, x_t: np.ndarray, t: int):
    """q(x_{t-1} | x_t, x_0) from Ho et al. 2020 Eq. 6-7, with log beta~_0 := log beta~_1."""
    a = np.cumprod(1 - betas)
    a_prev = np.append(1.0, a[:-1])
    mean = betas[t] * np.sqrt(a_prev[t]) / (1 - a[t]) * x0 + (1 - a_prev[t]) * np.sqrt(1 - betas[t]) / (1 - a[t]) * x_t
    var = betas * (1 - a_prev) / (1 - a)
    return mean, np.log(var[max(t, 1)])


def test_vb_bits_is_the_posterior_kl_in_bits_and_the_decoder_nll_at_t0():
    betas = _betas()
    tables = D.posterior_tables(torch.from_numpy(betas))
    a = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 10, 500, 999])
    x0 = (torch.rand(5, 2, 3, 3, generator=g) * 2 - 1).clamp(-0.95, 0.95)
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # the open edge bins at t = 0
    noise = torch.randn(x0.shape, generator=g)
    ab = torch.from_numpy(a[t.numpy()]).float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    eps_hat = noise + 0.05 * torch.randn(x0.shape, generator=g)
    v = torch.rand(x0.shape, generator=g) * 2 - 1
    got = D.vb_bits(tables, eps_hat, v, x0, x_t, t).double().numpy()
    for i, ti in enumerate(t.tolist()):
        xt, x0i, e, vi = (z[i].double().numpy() for z in (x_t, x0, eps_hat, v))
        x0_hat = np.sqrt(1 / a[ti]) * xt - np.sqrt(1 / a[ti] - 1) * e
        mu_model, log_min = _posterior_np(betas, x0_hat, xt, ti)
        logvar = (vi + 1) / 2 * np.log(betas[ti]) + (1 - (vi + 1) / 2) * log_min  # Eq. 15
        if ti > 0:
            mu_true, logvar_true = _posterior_np(betas, x0i, xt, ti)
            kl = 0.5 * (logvar - logvar_true + (np.exp(logvar_true) + (mu_true - mu_model) ** 2) / np.exp(logvar) - 1)
            assert got[i] == pytest.approx(kl.mean() / LN2, rel=2e-4, abs=1e-6), ti
        else:
            sd = np.exp(0.5 * logvar)
            upper, lower = norm.cdf((x0i - mu_model + 1 / 255) / sd), norm.cdf((x0i - mu_model - 1 / 255) / sd)
            mass = np.where(x0i < -0.999, upper, np.where(x0i > 0.999, 1 - lower, upper - lower))
            tol = (4e-4 / mass).mean() / LN2
            assert abs(got[0] - (-np.log(mass)).mean() / LN2) <= tol, (got[0], tol)


def test_vb_trains_only_the_variance_channels_and_hybrid_adds_its_mean():
    tables = D.posterior_tables(torch.from_numpy(_betas()))
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 5, 700])
    a = tables["alphas_cumprod"][t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps = (noise + 0.1 * torch.randn(x0.shape, generator=g)).requires_grad_(True)
    v = torch.zeros(x0.shape).requires_grad_(True)
    vb = D.vb_bits(tables, eps, v, x0, x_t, t)
    vb.sum().backward()
    assert eps.grad is None and v.grad is not None and float(v.grad.abs().sum()) > 0  # frozen mean
    loss, parts = D.srdd_loss(eps, noise, x_t, x0, a.flatten(), torch.tensor([0, 1, 0]), None, 0.0, 0.0, vb=vb)
    simple = torch.nn.functional.mse_loss(eps, noise)
    assert float(loss.detach()) == pytest.approx(float(simple.detach() + vb.detach().mean()), rel=1e-6)
    assert parts["vb"] == pytest.approx(float(vb.detach().mean()), rel=1e-6)


# --------------------------------------------------------------------------- DiffFit


def _dit(num_layers: int, tiny_dit_dir):
    """A random-init 4-channel-latent DiT with ``num_layers`` blocks of width 16, over the
    tiny fixture's VAE and schedule."""
    from diffusers import DiTTransformer2DModel

    _, vae, schedule = D.load_dit(tiny_dit_dir)
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=num_layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10)  # fmt: skip
    return dit, vae, schedule


def _expected_trainable(L: int, dim: int, k: int, out: int, p: int, difffit: str, tied: bool) -> dict[str, int]:
    """DiffFit's trainable set from its rule: every bias, the class table(s) and the gammas of
    the placement (no DiT LayerNorm has affine parameters)."""
    names = {"pos_embed.proj.bias": dim, "proj_out_1.bias": 2 * dim, "proj_out_2.bias": p * p * out}
    for i in range(L):
        b = f"transformer_blocks.{i}."
        names.update({b + "norm1.linear.bias": 6 * dim, b + "attn1.to_q.bias": dim, b + "attn1.to_k.bias": dim,
                      b + "attn1.to_v.bias": dim, b + "attn1.to_out.0.bias": dim,
                      b + "ff.net.0.proj.bias": 4 * dim, b + "ff.net.2.bias": dim})  # fmt: skip
        if i == 0 or not tied:
            e = b + "norm1.emb."
            names.update({e + "timestep_embedder.linear_1.bias": dim, e + "timestep_embedder.linear_2.bias": dim,
                          e + "class_embedder.embedding_table.weight": (k + 1) * dim})  # fmt: skip
        if difffit == "first-half" and i < L // 2:  # release: qkv (3 dim), proj, branch, MLP
            for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn1", "ff"):
                names[b + m + ".difffit_gamma"] = dim
        if difffit == "all-blocks":
            names[b + "attn1.difffit_gamma"] = names[b + "ff.difffit_gamma"] = dim
    return names


@pytest.mark.parametrize(("difffit", "tied"), [("first-half", True), ("all-blocks", False), ("first-half", False)])
def test_difffit_trainable_set_and_count_follow_the_rule(difffit, tied, tiny_dit_dir):
    dit, vae, schedule = _dit(4, tiny_dit_dir)
    bb = D.make_dit_backbone(dit, vae, schedule, num_clusters=3, resolution=16, difffit=difffit, tie=tied)
    got = {n: p.numel() for n, p in bb.trainable_parameters().items()}
    expected = _expected_trainable(4, 16, 3, 8, 2, difffit, tied)
    assert got == expected
    assert bb.source["trainable"] == sum(expected.values())
    if difffit == "first-half":  # 2 blocks x 6 x 16 gammas = 2 x (3 dim + dim + dim + dim)
        assert sum(v for n, v in got.items() if n.endswith("difffit_gamma")) == 2 * 6 * 16
        assert not hasattr(bb.model.transformer_blocks[2].attn1.to_q, "difffit_gamma")


def test_qkv_gamma_scales_the_projection_after_its_bias(tiny_dit_dir):
    """The release's gamma1 multiplies the fused qkv output (bias included): scaling gamma on
    to_v by s equals scaling to_v's weight and bias by s."""
    dit, vae, schedule = _dit(2, tiny_dit_dir)
    bb = D.make_dit_backbone(dit, vae, schedule, num_clusters=3, resolution=16)
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.tensor([0, 3])
    to_v = bb.model.transformer_blocks[0].attn1.to_v
    with torch.no_grad():
        scale = torch.rand(16, generator=g) + 0.5
        to_v.difffit_gamma.copy_(scale)
        by_gamma = bb.denoise(x, t, y)
        to_v.difffit_gamma.fill_(1.0)
        to_v.weight.mul_(scale[:, None])
        to_v.bias.mul_(scale)
        by_weights = bb.denoise(x, t, y)
    torch.testing.assert_close(by_gamma, by_weights, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- embeddings


def test_tying_shares_block_zeros_embeddings(tiny_dit_dir):
    dit, _, _ = _dit(3, tiny_dit_dir)
    t_bias = dit.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1.bias.detach().clone()
    assert not torch.equal(dit.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias, t_bias)
    assert D.tie_block_embeddings(dit) == 2 and D.tie_block_embeddings(dit) == 0
    assert all(b.norm1.emb is dit.transformer_blocks[0].norm1.emb for b in dit.transformer_blocks)
    names = [n for n, _ in dit.named_parameters()]
    assert not any(n.startswith(("transformer_blocks.1.norm1.emb", "transformer_blocks.2.norm1.emb")) for n in names)
    assert "transformer_blocks.2.norm1.emb.class_embedder.embedding_table.weight" in dit.state_dict()


def test_tied_tables_stay_one_module_through_finetune_and_reload(tmp_path, tiny_dit_dir):
    cfg = _dit_cfg(tiny_dit_dir, iterations=4, batch_size=4, log_every=2, checkpoint_every=2, lr=1e-2,
                   tie_embeddings=True)  # fmt: skip
    bb = D.build_backbone(cfg, 3)
    emb0 = bb.model.transformer_blocks[0].norm1.emb
    before = emb0.class_embedder.embedding_table.weight.detach().clone()
    model_dir = D.finetune(cfg, bb, encoded_set(tmp_path, bb.vae, 16), tmp_path / "ft", progress=False)
    blocks = bb.model.transformer_blocks
    assert all(b.norm1.emb is emb0 for b in blocks)
    after = emb0.class_embedder.embedding_table.weight
    assert not torch.equal(after, before)
    state = bb.model.state_dict()
    key = "norm1.emb.class_embedder.embedding_table.weight"
    assert torch.equal(state[f"transformer_blocks.0.{key}"], state[f"transformer_blocks.1.{key}"])
    # saved once, under block 0's name; reloaded tied, with the saved (EMA) values
    from safetensors.torch import load_file

    saved = load_file(str(model_dir / "weights.safetensors"))
    assert f"transformer_blocks.0.{key}" in saved and f"transformer_blocks.1.{key}" not in saved
    assert json.loads((model_dir / "backbone.json").read_text())["tied"] is True
    loaded = D.load_finetuned(model_dir)
    lblocks = loaded.model.transformer_blocks
    assert lblocks[1].norm1.emb is lblocks[0].norm1.emb and loaded.tied and loaded.difffit == "first-half"
    torch.testing.assert_close(lblocks[1].norm1.emb.class_embedder.embedding_table.weight,
                               saved[f"transformer_blocks.0.{key}"], rtol=0, atol=0)  # fmt: skip
    for name, value in saved.items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value, rtol=0, atol=0)


def test_untied_all_blocks_model_saved_without_the_new_keys_still_loads(tmp_path, tiny_dit_dir):
    cfg = _dit_cfg(tiny_dit_dir, iterations=2, batch_size=2, difffit="all-blocks", tie_embeddings=False)
    bb = D.build_backbone(cfg, 3)
    model_dir = D.finetune(cfg, bb, encoded_set(tmp_path, bb.vae, 16), tmp_path / "ft", progress=False)
    meta = json.loads((model_dir / "backbone.json").read_text())
    del meta["difffit"], meta["tied"]  # as written before these options
    (model_dir / "backbone.json").write_text(json.dumps(meta))
    loaded = D.load_finetuned(model_dir)
    blocks = loaded.model.transformer_blocks
    assert blocks[1].norm1.emb is not blocks[0].norm1.emb and hasattr(blocks[1].ff, "difffit_gamma")
    assert not hasattr(blocks[0].attn1.to_q, "difffit_gamma")


def test_imagenet_rows_init_copies_pretrained_rows_and_keeps_the_null_row(tiny_dit_dir):
    dit, vae, schedule = D.load_dit(tiny_dit_dir)
    old = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.detach().clone()  # (11, 16)
    bb = D.make_dit_backbone(dit, vae, schedule, num_clusters=4, resolution=16, class_init="imagenet-rows")
    table = bb.model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape == (5, 16)
    assert torch.equal(table[:4], old[:4]) and torch.equal(table[4], old[10])
    assert bb.source["class_init"] == "imagenet-rows"
    dit, vae, schedule = D.load_dit(tiny_dit_dir)
    with pytest.raises(ValueError, match="k <= 10"):
        D.make_dit_backbone(dit, vae, schedule, num_clusters=11, resolution=16, class_init="imagenet-rows")


# --------------------------------------------------------------------------- EMA, length


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_is_the_closed_form_of_the_parameter_sequence(warmup, tmp_path, tiny_dit_dir):
    """e_0 = p_0, e_s = d_s e_{s-1} + (1 - d_s) p_s with d_s = ema_decay (release) or
    min(ema_decay, (s) / (9 + s)) for the update after step s (1-based): recorded through an
    optimizer hook, compared with the saved model."""
    cfg = _dit_cfg(tiny_dit_dir, iterations=5, batch_size=2, lr=5e-2, ema_decay=0.5, ema_warmup=warmup)
    bb = D.build_backbone(cfg, 3)
    name = "transformer_blocks.0.attn1.to_q.difffit_gamma"
    param = bb.trainable_parameters()[name]
    seq = [param.detach().clone()]
    handle = register_optimizer_step_post_hook(lambda *a: seq.append(param.detach().clone()))
    try:
        model_dir = D.finetune(cfg, bb, encoded_set(tmp_path, bb.vae, 16), tmp_path / "ft", progress=False)
    finally:
        handle.remove()
    assert len(seq) == 6 and not torch.equal(seq[-1], seq[0])
    decays = [min(0.5, s / (9 + s)) if warmup else 0.5 for s in range(1, 6)]
    expected = seq[0].double() * math.prod(decays)
    for s in range(1, 6):
        expected += (1 - decays[s - 1]) * math.prod(decays[s:]) * seq[s].double()
    got = D.load_finetuned(model_dir).model.get_parameter(name).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert [D.ema_decay(cfg, s) for s in range(5)] == pytest.approx(decays)


def test_epochs_give_the_released_step_count():
    cfg = FinetuneConfig(batch_size=4, epochs=2.5, iterations=7)
    assert D.total_iterations(cfg, 10) == 5  # 10 // 4 = 2 steps an epoch (drop_last), x 2.5
    assert D.total_iterations(cfg, 3) == 3  # fewer patches than a batch: one step an epoch
    assert D.total_iterations(FinetuneConfig(batch_size=4, epochs=700), 10_324) == 700 * 2581
    assert D.total_iterations(FinetuneConfig(batch_size=4, iterations=7), 10) == 7
    with pytest.raises(ValueError):
        FinetuneConfig(epochs=0)


def test_an_epoch_visits_each_row_once_without_the_last_partial_batch():
    rows = np.concatenate([finetuning._epoch_batch(10, 3, 3, s, 0, 0) for s in range(3)])
    assert len(set(rows.tolist())) == 9 and set(rows.tolist()) <= set(range(10))
    nxt = np.concatenate([finetuning._epoch_batch(10, 3, 3, s, 0, 0) for s in range(3, 6)])
    assert len(set(nxt.tolist())) == 9 and not np.array_equal(rows, nxt)  # a new permutation
    assert np.array_equal(finetuning._epoch_batch(10, 3, 3, 4, 0, 0), nxt[3:6])  # a function of the step


def test_finetune_in_epochs_counts_all_shards_and_records_the_length(tmp_path, tiny_dit_dir):
    bb = D.build_backbone(_dit_cfg(tiny_dit_dir), 3)
    encoded_set(tmp_path, bb.vae, 16, n=10)
    shape, dtype = D.encoded_spec(_dit_cfg(tiny_dit_dir), 24)
    shard = D.load_encoded(tmp_path / "enc", shape=shape, dtype=dtype, rank=1, world_size=2)
    assert len(shard.clusters) == 5 and shard.num_total == 10
    cfg = _dit_cfg(tiny_dit_dir, epochs=1.5, batch_size=4, log_every=1)
    model_dir = D.finetune(cfg, bb, D.load_encoded(tmp_path / "enc", shape=shape, dtype=dtype), tmp_path / "ft",
                           progress=False)  # fmt: skip
    log = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert log[0] == {"step": 0, "iterations": 3, "epochs": 1.5, "patches": 10, "steps_per_epoch": 2,
                      "batch_size": 4}  # fmt: skip
    assert [r["step"] for r in log[1:]] == [1, 2, 3]
    ft = json.loads((model_dir / "backbone.json").read_text())["finetune"]
    assert (ft["iterations"], ft["epochs"], ft["patches"], ft["step"]) == (3, 1.5, 10, 3)


# --------------------------------------------------------------------------- hybrid loss in the loop


def test_hybrid_needs_learned_variance(tmp_path, tiny_dit_dir):
    from diffusers import DiTTransformer2DModel

    root = tmp_path / "dit4"
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10).save_pretrained(root / "transformer")
    import shutil

    shutil.copytree(tiny_dit_dir / "vae", root / "vae")
    cfg = FinetuneConfig(dit_path=str(root), resolution=16, loss="hybrid")
    with pytest.raises(ValueError, match="learned variance"):
        D.check_backbone(cfg)
    with pytest.raises(ValueError, match="learned variance"):
        D.build_backbone(cfg, 3)
    D.build_backbone(cfg.model_copy(update={"loss": "simple"}), 3)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_hybrid_loss_runs_in_finetune_and_logs_vb(kind, tmp_path, tiny_dit_dir):
    base = {"iterations": 3, "batch_size": 4, "log_every": 1, "loss": "hybrid"}
    cfg = _dit_cfg(tiny_dit_dir, **base) if kind == "dit" else FinetuneConfig(resolution=16, unet_channels=(16, 32),
                                                                                **base)  # fmt: skip
    bb = D.build_backbone(cfg, 3)
    assert bb.learned_variance
    model_dir = D.finetune(cfg, bb, encoded_set(tmp_path, bb.vae, 16), tmp_path / "ft", progress=False)
    log = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert all(r["vb"] > 0 for r in log), log  # KL and decoder NLL are positive
    assert all(r["loss"] == pytest.approx(r["simple"] + r["vb"] + 0.002 * r["pos"] + 0.008 * r["neg"], abs=2e-6)
               for r in log), log  # fmt: skip
    loaded = D.load_finetuned(model_dir)
    eps, v = loaded.predict(torch.zeros(1, *loaded.sample_shape), torch.tensor([5]), torch.tensor([0]))
    assert v is not None and v.shape == eps.shape
    if kind == "unet":
        assert FinetuneConfig(resolution=16).loss == "simple" and not D.build_backbone(
            FinetuneConfig(resolution=16, unet_channels=(16, 32)), 3).learned_variance  # fmt: skip


# --------------------------------------------------------------------------- memory terms


def test_cluster_reduction_is_the_released_min_max_over_each_clusters_pairs():
    torch.manual_seed(4)
    mem = D.MemoryBank(3, size=8)
    x0, noise = torch.randn(5, 2, 2, 2), torch.randn(5, 2, 2, 2)
    labels, a = torch.tensor([0, 0, 1, 2, 0]), torch.full((5,), 0.6)
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    D.srdd_loss(torch.randn(5, 2, 2, 2), noise, x_t, x0, a[:5], torch.tensor([0, 0, 1, 1, 1]), mem, 1.0, 1.0)
    real = {c: mem.real[c].clone() for c in (0, 1)}
    pred = {c: mem.pred[c].clone() for c in (0, 1)}  # cluster 2 has no memory yet
    eps = torch.randn(5, 2, 2, 2)
    loss, parts = D.srdd_loss(eps, noise, x_t, x0, a, labels, mem, 0.002, 0.008, reduce="cluster")
    x0_hat = ((x_t - (1 - a).sqrt().view(-1, 1, 1, 1) * eps) / a.sqrt().view(-1, 1, 1, 1)).flatten(1)

    def cos(u, w):
        return (u @ w.T) / (u.norm(dim=1)[:, None] * w.norm(dim=1)[None, :])

    # three clusters in the batch (2 without memory counts, adding 0): sum over clusters / 3
    pos = sum(1 - cos(x0_hat[labels == c], real[c]).min() for c in (0, 1)) / 3
    neg = sum(cos(x0_hat[labels == c], pred[c]).max() for c in (0, 1)) / 3
    assert parts["pos"] == pytest.approx(float(pos), rel=1e-5)
    assert parts["neg"] == pytest.approx(float(neg), rel=1e-5)
    simple = torch.nn.functional.mse_loss(eps, noise)
    assert float(loss) == pytest.approx(float(simple + 0.002 * pos + 0.008 * neg), rel=1e-6)
    with pytest.raises(ValueError, match="memory_reduce"):
        D.srdd_loss(eps, noise, x_t, x0, a, labels, mem, 0.002, 0.008, reduce="batch")


@pytest.mark.parametrize("memory_labels", ["conditioning", "cluster"])
def test_memory_terms_use_the_cluster_or_the_conditioning_label(memory_labels, tmp_path, monkeypatch, tiny_dit_dir):
    seen = []
    real_loss = D.srdd_loss

    def spy(eps, noise, x_t, x0, a, labels, *args, **kw):
        seen.append(labels.clone())
        return real_loss(eps, noise, x_t, x0, a, labels, *args, **kw)

    monkeypatch.setattr(finetuning, "srdd_loss", spy)  # where finetune looks it up
    cfg = _dit_cfg(tiny_dit_dir, iterations=4, batch_size=4, class_dropout=0.9, memory_labels=memory_labels)
    bb = D.build_backbone(cfg, 3)
    D.finetune(cfg, bb, encoded_set(tmp_path, bb.vae, 16), tmp_path / "ft", progress=False)
    labels = torch.cat(seen)
    assert (labels == bb.null_class).any() == (memory_labels == "conditioning")
