"""``srdistill run --preset srdd``, shrunk to tiny models, does each released step (docs/FIDELITY.md).

The srdd preset's own settings are kept; only sizes change (patch grid, tiny random-init CLIP,
the tiny DiT of conftest, one epoch, a few SR steps), so the run exercises, in one pipeline:
the OpenCV psnr_bic criterion, raw CLIP features clustered by sklearn's k-means, DiffFit on the
release's blocks with tied embedders and ImageNet-row initialisation, the hybrid loss with the
release's memory terms, epochs, EMA without warm-up, and ancestral DDPM with learned variance,
guidance on three channels and a separate decoder VAE. Each step's own behaviour is pinned from
its definition in test_mining_opencv, test_clustering_kmeans, test_diffusion_release and
test_synthesis; here they must hold together.
"""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from srdistill.config import load_config
from srdistill.run.pipeline import run_pipeline

from conftest import T91, tiny_vae

pytestmark = pytest.mark.slow


def test_srdd_preset_runs_the_released_steps(tmp_path, ray_local, tiny_dit_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(T91.glob("*.png"))[:6]:
        shutil.copy(f, corpus / f.name)
    decoder = tiny_vae(tmp_path / "decoder", seed=321)  # the release decodes with another VAE (mse)
    sizes = {
        "mine.patch_preset": "null", "mine.patch_size": 64, "mine.stride": 32,
        "embed.allow_random_init": "true", "embed.random_init": "tiny", "cluster.k": 3,
        "finetune.dit_path": str(tiny_dit_dir), "finetune.vae_path": str(tiny_dit_dir / "vae"),
        "finetune.resolution": 16, "finetune.epochs": 1, "finetune.batch_size": 4,
        "finetune.checkpoint_every": 1000, "synthesize.vae_path": str(decoder), "select.ipc": 2,
        "train.model": "espcn", "train.iterations": 4, "train.batch_size": 2, "train.lr_patch": 4,
        "evaluate.datasets": "[Set5]", "ray.num_cpus": 2,
    }  # fmt: skip
    cfg = load_config("srdd", overrides=[f"{k}={v}" for k, v in sizes.items()])
    assert (cfg.mine.psnr_bic_resize, cfg.embed.normalize, cfg.cluster.method) == ("opencv", False, "kmeans")
    assert (cfg.finetune.loss, cfg.finetune.class_init, cfg.finetune.ema_warmup) == ("hybrid", "imagenet-rows", False)
    assert (cfg.synthesize.sampler, cfg.synthesize.steps, cfg.synthesize.guidance_channels) == ("ddpm", 50, 3)
    run = tmp_path / "run"
    stages = run_pipeline(corpus, run, cfg, preset="srdd", log=lambda s: None)["stages"]
    assert all(stages[s]["status"] == "done" for s in ("mine", "embed", "cluster", "finetune", "synthesize"))

    # mining: the release's criterion, 20 log10(255 / rmse) of cv2 INTER_CUBIC down-up of the L image
    mined = pq.read_table(run / "mine" / "patches").to_pylist()
    row = next(r for r in mined if not r["error"])
    gray = np.asarray(Image.open(row["source"]).convert("RGB").convert("L"), np.float32)
    patch = gray[row["y"] : row["y"] + 64, row["x"] : row["x"] + 64]
    down = cv2.resize(patch, (16, 16), interpolation=cv2.INTER_CUBIC)
    up = cv2.resize(down, (64, 64), interpolation=cv2.INTER_CUBIC)
    expected = 20 * np.log10(255.0 / np.sqrt(np.mean((patch - up) ** 2)))
    assert row["psnr_bic"] == pytest.approx(expected, abs=1e-3)
    kept = [r for r in mined if not r["error"] and r["psnr_bic"] < 23.0]
    assert stages["embed"]["counts"]["patches"] == len(kept) > 0

    # embedding and clustering: raw (not unit) CLIP features; labels are sklearn's KMeans on them
    emb = pq.read_table(run / "embed" / "parts")  # part order: the rows k-means is fitted on
    x = np.stack(emb.column("embedding").to_pylist()).astype(np.float32)
    assert np.abs(np.linalg.norm(x, axis=1) - 1).max() > 1e-2
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=3, n_init=10, max_iter=300, random_state=42).fit(x).predict(x)
    got = dict(zip(*pq.read_table(run / "cluster" / "assignments").select(["patch_id", "cluster"]).to_pydict().values()))
    pairs = set(zip(labels.tolist(), (got[p] for p in emb.column("patch_id").to_pylist())))
    assert len(pairs) == len(set(labels.tolist())) == len(set(got.values()))  # the same partition

    # fine-tuning: DiffFit on the first half of the blocks, tied embedders, epochs, hybrid loss
    model = json.loads((run / "finetune" / "model" / "backbone.json").read_text())
    assert model["trainable"] == "difffit" and model["difffit"] == "first-half" and model["tied"]
    assert model["source"]["class_init"] == "imagenet-rows"
    n = stages["finetune"]["counts"]["patches"]
    assert stages["finetune"]["counts"]["iterations"] == max(1, n // 4)  # 1 epoch, drop_last
    log = [json.loads(s) for s in (run / "finetune" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("vb", 0) > 0 for r in log)  # L_vb trained the variance channels

    # sampling: ancestral DDPM on 50 respaced steps, learned variance, 3 guided channels, mse-VAE role
    syn = json.loads((run / "synthesize" / "synthesis.json").read_text())
    assert syn["sampler"] == "ddpm" and len(syn["timesteps"]) == 50 and syn["timesteps"][0] == 999
    assert syn["timesteps"][-1] == 0 and syn["variance"] == "learned-range"
    assert syn["guidance_channels"] == 3 and syn["guidance_scale"] == 4.0
    assert syn["decoder"]["separate"] and syn["decoder"]["vae_path"] == str(decoder.resolve())
    assert stages["synthesize"]["counts"]["images"] == 2 * stages["cluster"]["counts"]["k_used"]
