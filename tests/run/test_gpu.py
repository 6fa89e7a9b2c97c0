"""Every CUDA path, on a real GPU: ``pytest -m gpu`` (``bench/gpu_check.sh`` runs them with
timings). Each test is skipped where torch sees no CUDA device, so the module collects and
skips cleanly on CPU machines.

Paths: CLIP embedding on the GPU (real ViT-B/32 weights if they are in the HF cache, else random
init) agreeing with the CPU; bf16-autocast SR training; DeepSpeed (ZeRO-2, bf16) fine-tuning of a
random-init DiT-S/2 on one Ray Train GPU worker, then DDIM sampling on Ray Data GPU actors; the
whole ``device: auto`` pipeline on a local Ray that detects the GPU (every model stage placed on
it, the evaluation as a GPU task); faiss k-means on the GPU when faiss-gpu is installed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from conftest import T91

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]  # fmt: skip


@pytest.fixture(scope="module")
def ray_gpu():
    """A local Ray that detects this machine's GPUs (the session's ``ray_local`` is stopped)."""
    from srdistill.config import RayConfig
    from srdistill.run import runner

    runner.shutdown_ray()
    runner.init_ray(RayConfig(num_cpus=4))
    yield
    runner.shutdown_ray()


def _patch_table(n: int = 8, size: int = 64) -> pa.Table:
    files = sorted(T91.glob("*.png"))[:n]
    return pa.Table.from_pylist([dict(patch_id=f.name, source=str(f), x=0, y=0, size=size) for f in files])


def test_clip_embeds_on_the_gpu_as_on_the_cpu():
    from srdistill.config import EmbedConfig
    from srdistill.distill.embedding import embed_patches, resolve_clip

    cfg = EmbedConfig(allow_random_init=True, batch_size=8)  # real weights if cached, else random ViT-B/32
    source = resolve_clip(cfg)
    table = _patch_table()
    gpu = embed_patches(table, cfg.model_copy(update={"device": "cuda"}), source)
    cpu = embed_patches(table, cfg.model_copy(update={"device": "cpu"}), source)
    assert gpu.shape == cpu.shape == (table.num_rows, gpu.shape[1])
    assert np.allclose(np.linalg.norm(gpu, axis=1), 1.0, atol=1e-4)
    assert (gpu * cpu).sum(axis=1).min() > 0.999, "GPU and CPU embeddings disagree"
    print(f"clip: {source.note}")


def test_bf16_autocast_sr_training(tmp_path):
    from srdistill.config import TrainConfig
    from srdistill.sr.training import load_checkpoint, train_sr

    cfg = TrainConfig(model="edsr-baseline", iterations=200, batch_size=16, lr_patch=32, lr=2e-4, amp="bf16",
                      device="cuda", log_every=50, checkpoint_every=100)  # fmt: skip
    path = train_sr(cfg, 2, sorted(T91.glob("*.png"))[:16], tmp_path, progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    model, meta = load_checkpoint(path)
    assert meta["arch"] == "edsr-baseline" and all(p.dtype == torch.float32 for p in model.parameters())


def _dit_s_dir(root):
    """A random-init DiT-S/2 (12 blocks, width 384, 6 heads) on 32x32x4 latents of a small
    8x-downsampling VAE, in the layout of ``facebook/DiT-XL-2-512``: ``finetune.resolution`` 256."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                          num_layers=12, sample_size=32, patch_size=2,
                          num_embeds_ada_norm=1000).save_pretrained(root / "transformer")  # fmt: skip
    AutoencoderKL(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                  sample_size=256).save_pretrained(root / "vae")  # fmt: skip
    DDIMScheduler(beta_schedule="linear").save_pretrained(root / "scheduler")
    return root


def test_deepspeed_finetunes_a_dit_s_on_the_gpu_and_gpu_actors_sample_it(tmp_path, ray_gpu):
    from srdistill.config import FinetuneConfig, SynthConfig
    from srdistill.distill import diffusion as D
    from srdistill.distill.synthesis import synthesize
    from srdistill.run import runner

    rng = np.random.default_rng(0)
    files = []
    for i in range(6):  # smooth 288x288 images: noise upsampled
        small = rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(small).resize((288, 288), Image.BICUBIC).save(files[-1])
    table = pa.Table.from_pylist([dict(patch_id=f"{f.name}:{x}", source=str(f), x=x, y=0, size=256, cluster=i % 3)
                                  for i, f in enumerate(files) for x in (0, 32)])  # fmt: skip
    cfg = FinetuneConfig(dit_path=str(_dit_s_dir(tmp_path / "dit")), resolution=256, iterations=20, batch_size=4,
                         workers=1, use_gpu=True, zero_stage=2, precision="bf16", log_every=5,
                         checkpoint_every=10, encode_batch_size=4)  # fmt: skip
    placement: dict = {}
    assert runner.encode_patches_ray(table, cfg, tmp_path / "enc", num_gpus=None, placement=placement) == 12
    assert placement["num_gpus"] == 1.0 and placement["gpu_ids"], placement
    shape, dtype = D.encoded_spec(cfg, 256)
    model_dir = runner.finetune_ray(cfg, tmp_path / "enc", tmp_path / "ft", num_clusters=3, shape=shape, dtype=dtype)
    log = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log][-1] == 20 and all(math.isfinite(r["loss"]) for r in log)

    scfg = SynthConfig(steps=10, batch_size=3, ipc=1)
    placement = {}
    rows = synthesize(model_dir, scfg, tmp_path / "syn", {0: 1, 1: 1, 2: 1},
                      map_fn=runner.synthesize_ray(model_dir, scfg, tmp_path / "syn", placement=placement))  # fmt: skip
    assert len(rows) == 3 and placement["num_gpus"] == 1.0 and placement["gpu_ids"], placement
    assert Image.open(tmp_path / "syn" / rows[0]["file"]).size == (256, 256)


def test_auto_places_every_model_stage_on_the_gpu(tmp_path, ray_gpu):
    import shutil

    from srdistill.config import load_config
    from srdistill.run import runner
    from srdistill.run.pipeline import run_pipeline

    ok, ids = runner.run_task(torch.cuda.is_available, num_gpus=1)
    assert ok is True and ids, "a task given a GPU must see it as cuda:0"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(T91.glob("*.png"))[:4]:
        shutil.copy(f, corpus / f.name)
    cfg = load_config("tiny", overrides=["distill=synth", "embed.allow_random_init=true"])
    manifest = run_pipeline(corpus, tmp_path / "run", cfg, log=lambda s: None)
    assert manifest["ray"]["resources"]["GPU"] >= 1
    for stage in ("embed", "encode", "synthesize", "evaluate"):
        ran = manifest["stages"][stage]["placement"]
        assert ran["num_gpus"] == 1.0 and ran["gpu_ids"], (stage, ran)
    for stage in ("train", "finetune"):  # the driver sees the GPU: in-process on CUDA
        ran = manifest["stages"][stage]["placement"]
        assert ran["on"] == "driver" and ran["device"] == "cuda", (stage, ran)


def test_faiss_kmeans_on_the_gpu():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        pytest.skip("faiss has no GPU support here (install faiss-gpu: pip install 'srdistill[gpu]')")
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((8, 64)).astype(np.float32) * 4
    x = (centers[rng.integers(0, 8, 20_000)] + rng.standard_normal((20_000, 64))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    gpu = faiss.Kmeans(64, 8, niter=20, nredo=3, spherical=True, seed=0, gpu=True)
    cpu = faiss.Kmeans(64, 8, niter=20, nredo=3, spherical=True, seed=0)
    gpu.train(x)
    cpu.train(x)
    assert gpu.obj[-1] == pytest.approx(cpu.obj[-1], rel=1e-2)
