"""Diffusion fine-tuning throughput: Ray Train + DeepSpeed vs the same loop in plain PyTorch,
and sampling throughput per sampler.

    python bench/bench_finetune.py --backbone unet --iterations 60            # CPU, demo UNet
    python bench/bench_finetune.py --backbone dit-s --iterations 30           # CPU, DiT-S/2 at 256
    python bench/bench_finetune.py --backbone dit-xl --resolution 512 --device cuda --workers 1

One run, arms side by side on the same encoded patches and settings (global batch
``--batch-size``, SRDD's loss and EMA):
  * ``plain``: ``diffusion.finetune`` in this process (torch's default threads, AdamW);
  * ``ray train + deepspeed xN``: ``runner.finetune_ray`` with N workers (ZeRO ``--zero``,
    gloo on CPU / NCCL on GPU; bf16 on GPU), each ``batch_size / N`` samples a step.
Fine-tuning images/s is the steady state (images between the first and last log line over
the time they took, from ``log.jsonl``). Sampling: images/s of ``synthesis.sample`` per
sampler (``--steps`` steps, classifier-free guidance, so 2 network evaluations per step) on
the fine-tuned model, batch ``--sample-batch``.

Backbones are random-init models of the real sizes (no weights are needed to time them):
``unet`` is the demo preset's pixel-space UNet; ``dit-s``/``dit-xl`` are DiT-S/2 / DiT-XL/2
(Peebles & Xie, arXiv 2212.09748, Table 1) with an SD-sized VAE (sd-vae-ft-ema's config),
written once in the facebook/DiT-XL-2-512 layout to a temporary folder; DiffFit trains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from srdistill import storage
from srdistill.config import FinetuneConfig, RayConfig
from srdistill.distill import diffusion, synthesis
from srdistill.run import runner
from srdistill.sr.imaging import image_size

REPO = Path(__file__).resolve().parents[1]
DIT = {"dit-s": dict(num_layers=12, attention_head_dim=64, num_attention_heads=6),
       "dit-xl": dict(num_layers=28, attention_head_dim=72, num_attention_heads=16)}  # fmt: skip
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip


def _write_dit(kind: str, resolution: int, root: Path) -> Path:
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel(**DIT[kind], in_channels=4, out_channels=8, sample_size=resolution // 8,
                          patch_size=2, num_embeds_ada_norm=1000).save_pretrained(root / "transformer")  # fmt: skip
    AutoencoderKL(**SD_VAE, sample_size=resolution).save_pretrained(root / "vae")
    return root


def _steady(out: Path, batch: int) -> float:
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    first, last = log[0], log[-1]
    return (last["step"] - first["step"]) * batch / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", choices=["unet", *DIT], default="unet")
    ap.add_argument("--resolution", type=int, default=None, help="64 (unet) / 256 (dit)")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--patches", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25, help="sampling steps")
    ap.add_argument("--sample-batch", type=int, default=8)
    ap.add_argument("--data", default=str(REPO / "data" / "T91" / "HR"))
    args = ap.parse_args()

    res = args.resolution or (64 if args.backbone == "unet" else 256)
    tmp = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    common = dict(resolution=res, iterations=args.iterations, batch_size=args.batch_size,
                  log_every=max(1, args.iterations // 6), checkpoint_every=args.iterations,
                  device=args.device, use_gpu=args.device == "cuda", zero_stage=args.zero)  # fmt: skip
    if args.backbone == "unet":
        cfg = FinetuneConfig(**common, crop="random", unet_channels=(32, 64, 128), lr=5e-4)
    else:
        cfg = FinetuneConfig(**common, dit_path=str(_write_dit(args.backbone, res, tmp / "dit")))
    k = 7
    # encoded patches of the vendored images (in process: this benchmark times training)
    paths = storage.list_files(args.data, (".png",))
    if not paths:
        ap.error(f"no .png images under {args.data!r}")
    rng = np.random.default_rng(0)
    rows = []
    for p in paths:
        w, h = image_size(p)
        if min(w, h) >= res:
            rows.append((p, int(rng.integers(0, w - res + 1)), int(rng.integers(0, h - res + 1))))
    rows = [rows[i % len(rows)] for i in range(args.patches)]
    encoder = diffusion.PatchEncoder(cfg)
    batch = {"patch_id": np.array([f"p{i:05d}" for i in range(len(rows))]), "source": np.array([r[0] for r in rows]),
             "x": np.array([r[1] for r in rows]), "y": np.array([r[2] for r in rows]),
             "size": np.full(len(rows), res), "cluster": np.arange(len(rows)) % k}  # fmt: skip
    t0 = time.perf_counter()
    enc = {key: [] for key in ("patch_id", "cluster", "sample")}
    for s in range(0, len(rows), 8):
        part = encoder({c: v[s : s + 8] for c, v in batch.items()})
        for key in enc:
            enc[key] += list(part[key])
    encode_s = time.perf_counter() - t0
    (tmp / "enc").mkdir()
    pq.write_table(pa.table({"patch_id": enc["patch_id"], "cluster": pa.array(enc["cluster"], pa.int32()),
                             "sample": pa.array(enc["sample"], pa.binary())}), tmp / "enc" / "part-0.parquet")  # fmt: skip
    shape, dtype = diffusion.encoded_spec(cfg, res)

    results = []
    device = torch.device(args.device)
    t0 = time.perf_counter()
    backbone = diffusion.build_backbone(cfg, k)
    data = diffusion.load_encoded(tmp / "enc", shape=shape, dtype=dtype)
    diffusion.finetune(cfg.model_copy(update={"device": args.device}), backbone, data, tmp / "plain", progress=False)
    results.append({"arm": "plain pytorch", "images_per_s": _steady(tmp / "plain", args.batch_size),
                    "wall_s": time.perf_counter() - t0})  # fmt: skip
    runner.init_ray(RayConfig(num_cpus=os.cpu_count()))
    ds_cfg = cfg.model_copy(update={"workers": args.workers})
    t0 = time.perf_counter()
    runner.finetune_ray(ds_cfg, tmp / "enc", tmp / "ds", num_clusters=k, shape=shape, dtype=dtype)
    results.append({"arm": f"ray train + deepspeed zero{args.zero} x{args.workers}",
                    "images_per_s": _steady(tmp / "ds", args.batch_size),
                    "wall_s": time.perf_counter() - t0})  # fmt: skip

    model = diffusion.load_finetuned(tmp / "plain" / "model", device=device)
    sampling = []
    for sampler in synthesis.SAMPLERS:
        labels = torch.arange(args.sample_batch) % k
        seeds = list(range(args.sample_batch))
        synthesis.sample(model, labels[:1], seeds[:1], sampler=sampler, steps=2, device=device)  # warm-up
        t0 = time.perf_counter()
        synthesis.sample(model, labels, seeds, sampler=sampler, steps=args.steps, guidance_scale=4.0, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sampling.append({"sampler": sampler, "steps": args.steps,
                         "images_per_s": args.sample_batch / (time.perf_counter() - t0)})  # fmt: skip
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        + (torch.cuda.get_device_name() if device.type == "cuda" else "no GPU"),
        "backbone": args.backbone, "resolution": res, "params": backbone.source,
        "batch_size": args.batch_size, "iterations": args.iterations, "patches": args.patches,
        "encode_s": round(encode_s, 2), "finetune": results, "sampling": sampling,
        "ratio_ds_over_plain": results[1]["images_per_s"] / results[0]["images_per_s"],
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
