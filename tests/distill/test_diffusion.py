"""SRDD fine-tuning (``srdistill.distill.diffusion``): tiny random-init diffusers DiT, VAE and UNet."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import T91, encoded_set
from srdistill.config import FinetuneConfig
from srdistill.distill import diffusion as D


def _dit_cfg(tiny_dit_dir, **kw) -> FinetuneConfig:
    return FinetuneConfig(dit_path=str(tiny_dit_dir), resolution=16, **kw)


UNET = dict(resolution=16, unet_channels=(16, 32))


def test_class_table_resized_to_clusters_plus_null(tiny_dit_dir):
    dit, vae, schedule = D.load_dit(tiny_dit_dir)
    old = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.detach().clone()
    bb = D.make_dit_backbone(dit, vae, schedule, num_clusters=3, resolution=16)
    for block in bb.model.transformer_blocks:
        emb = block.norm1.emb.class_embedder
        table = emb.embedding_table.weight
        assert table.shape == (4, old.shape[1]) and emb.num_classes == 3
    table = bb.model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert torch.equal(table[3], old[10])  # the null row is the pretrained null row
    assert torch.allclose(table[0], old[:10].mean(0))
    assert bb.model.config.num_embeds_ada_norm == 3 and bb.null_class == 3
    assert bb.sample_shape == (4, 8, 8)


def test_difffit_trains_only_bias_norm_gamma_and_class_embeddings(tiny_dit_dir):
    bb = D.build_backbone(_dit_cfg(tiny_dit_dir), 3)
    names = list(bb.trainable_parameters())
    assert all(n.endswith((".bias", "difffit_gamma", "embedding_table.weight")) for n in names)
    assert any(n.endswith("difffit_gamma") for n in names)
    assert not any(n.endswith("to_q.weight") or n.endswith("norm1.linear.weight") for n in names)
    assert bb.source["trainable"] < bb.source["parameters"] / 5


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(kind, tiny_dit_dir):
    cfg = _dit_cfg(tiny_dit_dir) if kind == "dit" else FinetuneConfig(**UNET)
    bb = D.build_backbone(cfg, 3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, *bb.sample_shape, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([50, 300, 600, 900])
    labels = torch.tensor([0, 1, 2, 3])  # 3 = null class
    from diffusers import DDPMScheduler

    x_t = DDPMScheduler(**bb.schedule).add_noise(x0, noise, t)
    opt = torch.optim.AdamW(list(bb.trainable_parameters().values()), lr=1e-2 if kind == "dit" else 2e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(bb.denoise(x_t, t, labels), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_finetune_keeps_frozen_parameters_bit_identical_and_saves_a_loadable_model(tmp_path, tiny_dit_dir):
    cfg = _dit_cfg(tiny_dit_dir, iterations=6, batch_size=4, log_every=2, checkpoint_every=3)
    bb = D.build_backbone(cfg, 3)
    frozen = {n: p.detach().clone() for n, p in bb.model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in bb.trainable_parameters().items()}
    data = encoded_set(tmp_path, bb.vae, 16)
    model_dir = D.finetune(cfg, bb, data, tmp_path / "ft", progress=False)
    after = dict(bb.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in trainable.items())
    log = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in log)
    # the saved model is the EMA of the trainable parameters over the frozen base
    loaded = D.load_finetuned(model_dir)
    assert loaded.kind == "dit" and loaded.num_clusters == 3
    state = dict(loaded.model.named_parameters())
    assert all(torch.equal(state[n], v) for n, v in frozen.items())
    assert all(not torch.equal(state[n], after[n]) and not torch.equal(state[n], v)
               for n, v in trainable.items() if n.endswith("difffit_gamma"))  # EMA: between the two
    meta = json.loads((model_dir / "backbone.json").read_text())
    assert meta["trainable"] == "difffit" and meta["source"]["dit_path"] == str(tiny_dit_dir.resolve())


def test_encode_stores_latent_moments_of_the_crop_and_its_mirror(tiny_dit_dir):
    vae = D.load_vae(_dit_cfg(tiny_dit_dir))
    patch = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    out = D.encode_patches(vae, 16, [patch, patch[:, ::-1]])
    assert out.shape == (2, 2, 8, 8, 8) and out.dtype == np.float16
    assert D.encoded_spec(_dit_cfg(tiny_dit_dir), 24) == ((2, 8, 8, 8), "float16")
    # the mirror view of the mirrored patch is the original's centre crop (24 - 16 is even)
    np.testing.assert_array_equal(out[1, 1], out[0, 0])
    assert (out[:, :, 4:] > 0).all()  # std half
    assert D.encoded_spec(FinetuneConfig(**UNET), 24) == ((24, 24, 3), "uint8")
    with pytest.raises(ValueError, match="patch_size 12 < finetune.resolution 16"):
        D.encoded_spec(FinetuneConfig(**UNET), 12)


def test_patch_encoder_reads_the_patches_of_a_batch():
    files = sorted(T91.glob("*.png"))[:2]
    batch = {"patch_id": np.array(["a", "b", "c"]), "source": np.array([str(files[0])] * 2 + [str(files[1])]),
             "x": np.array([0, 8, 0]), "y": np.array([0, 0, 4]), "size": np.array([24, 24, 24]),
             "cluster": np.array([0, 1, 2])}  # fmt: skip
    out = D.PatchEncoder(FinetuneConfig(**UNET))(batch)
    assert list(out["patch_id"]) == ["a", "b", "c"] and list(out["cluster"]) == [0, 1, 2]
    assert len(out["sample"][0]) == 24 * 24 * 3


def test_plain_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    base = dict(**UNET, batch_size=4, log_every=1, checkpoint_every=3, crop="random", lr=1e-3)
    data = encoded_set(tmp_path, None, 16)
    D.finetune(FinetuneConfig(iterations=3, **base), D.build_backbone(FinetuneConfig(**UNET), 3), data,
               tmp_path / "a", progress=False)  # fmt: skip
    D.finetune(FinetuneConfig(iterations=6, **base), D.build_backbone(FinetuneConfig(**UNET), 3), data,
               tmp_path / "a", progress=False)  # fmt: skip
    D.finetune(FinetuneConfig(iterations=6, **base), D.build_backbone(FinetuneConfig(**UNET), 3), data,
               tmp_path / "b", progress=False)  # fmt: skip
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["resumed_from_step"] for r in log if "resumed_from_step" in r] == [3]
    a = D.load_finetuned(tmp_path / "a" / "model").model.state_dict()
    b = D.load_finetuned(tmp_path / "b" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_srdd_loss_memory_terms():
    torch.manual_seed(0)
    mem = D.MemoryBank(2, size=3)
    x0, noise, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    labels, a = torch.tensor([0, 0, 2]), torch.full((3,), 0.5)
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    loss, parts = D.srdd_loss(eps, noise, x_t, x0, a, labels, mem, 0.002, 0.008)
    assert parts["pos"] == parts["neg"] == 0.0  # empty memories: L_simple only
    assert torch.isclose(loss, torch.nn.functional.mse_loss(eps, noise))
    assert mem.real[0].shape == (2, 16) and mem.real[1] is None  # the null class 2 is not stored
    # a perfect prediction gives x0_hat = x0; the real memory holds x0[0], x0[1], so the least
    # similar real sample of each is the other one
    pred_mem = torch.nn.functional.normalize(mem.pred[0], dim=1)
    loss, parts = D.srdd_loss(noise, noise, x_t, x0, a, labels, mem, 0.002, 0.008)
    flat = torch.nn.functional.normalize(x0[:2].flatten(1), dim=1)
    assert parts["simple"] == 0.0
    assert parts["pos"] == pytest.approx(float(1 - flat[0] @ flat[1]), abs=1e-5)
    assert parts["neg"] == pytest.approx(float((flat @ pred_mem.T).max(1).values.mean()), abs=1e-5)
    assert loss.item() == pytest.approx(0.002 * parts["pos"] + 0.008 * parts["neg"], rel=1e-5)
    for _ in range(3):
        D.srdd_loss(eps, noise, x_t, x0, a, labels, mem, 0.002, 0.008)
    assert mem.real[0].shape[0] == 3 and mem.pred[0].shape[0] == 3  # FIFO of size 3


def test_missing_dit_directory_is_named(tmp_path):
    with pytest.raises(D.MissingBackboneError, match="facebook/DiT-XL-2-512"):
        D.check_backbone(FinetuneConfig(dit_path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="needs finetune.dit_path"):
        FinetuneConfig(backbone="dit")
    with pytest.raises(ValueError, match="difffit"):
        D.build_backbone(FinetuneConfig(trainable="difffit", **UNET), 3)


@pytest.mark.slow
def test_deepspeed_zero2_two_ray_train_workers_complete_and_resume(tmp_path, ray_local, tiny_dit_dir):
    from srdistill.run import runner

    files = sorted(T91.glob("*.png"))[:4]
    table = pa.Table.from_pylist([dict(patch_id=f"{f.name}:{x}", source=str(f), x=x, y=0, size=24,
                                       cluster=i % 3) for i, f in enumerate(files) for x in (0, 24)])  # fmt: skip
    base = dict(batch_size=4, workers=2, zero_stage=2, log_every=1, checkpoint_every=2, encode_batch_size=4)
    cfg = _dit_cfg(tiny_dit_dir, iterations=4, **base)
    assert runner.encode_patches_ray(table, cfg, tmp_path / "enc") == 8
    shape, dtype = D.encoded_spec(cfg, 24)
    data = D.load_encoded(tmp_path / "enc", shape=shape, dtype=dtype)
    assert tuple(data.samples.shape) == (8, *shape) and sorted(data.clusters.tolist()) == [0, 0, 0, 0, 1, 1, 2, 2]
    kw = dict(num_clusters=3, shape=shape, dtype=dtype)
    model_dir = runner.finetune_ray(cfg, tmp_path / "enc", tmp_path / "ft", **kw)
    log = [json.loads(x)["step"] for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    first = D.load_finetuned(model_dir).model.state_dict()
    # the same call with more iterations continues from the reported checkpoint (step 4)
    runner.finetune_ray(_dit_cfg(tiny_dit_dir, iterations=6, **base), tmp_path / "enc", tmp_path / "ft", **kw)
    log = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["resumed_from_step"] for r in log if "resumed_from_step" in r] == [4]
    assert json.loads((model_dir / "backbone.json").read_text())["finetune"]["resumed_from"] == [4]
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {str(f): oct(f.stat().st_mode & 0o777) for f in (tmp_path / "ft").rglob("*") if f.is_file()}
    assert modes and set(modes.values()) == {oct(0o666 & ~mask)}, modes  # safetensors' 0600 included
    second = D.load_finetuned(model_dir).model.state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_deepspeed_zero3_completes_and_saves_the_ema_model(tmp_path, ray_local, tiny_dit_dir):
    from srdistill.run import runner

    bb = D.build_backbone(_dit_cfg(tiny_dit_dir), 3)
    data = encoded_set(tmp_path, bb.vae, 16)
    shape, dtype = tuple(data.samples.shape[1:]), "float16"
    cfg = _dit_cfg(tiny_dit_dir, iterations=3, batch_size=4, workers=2, zero_stage=3, log_every=1,
                   checkpoint_every=3)  # fmt: skip
    model_dir = runner.finetune_ray(cfg, tmp_path / "enc", tmp_path / "ft", num_clusters=3, shape=shape, dtype=dtype)
    loaded = D.load_finetuned(model_dir).model.state_dict()
    base = bb.model.state_dict()
    changed = [n for n in bb.trainable_parameters() if not torch.equal(loaded[n], base[n])]
    # every name of a trained tensor (a tied embedding has one per block)
    trained = {n for n, p in bb.model.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert changed and all(torch.equal(loaded[n], base[n]) for n in base if n not in trained)
