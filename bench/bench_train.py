"""SR training throughput: Ray Train data-parallel (gloo, CPU workers) vs the in-process loop.

    python bench/bench_train.py --model espcn --iterations 300
    python bench/bench_train.py --model edsr-baseline --iterations 40

One run, arms side by side on the same images and settings (global batch ``--batch-size``):
  * ``in-process``: ``training.train_sr`` in this process, torch's default threads;
  * ``in-process, 1 thread``: the same with ``torch.set_num_threads(1)``;
  * ``ray train xN``: ``runner.train_ray`` with N workers of one CPU each (each takes
    ``batch_size / N`` crops a step; DDP all-reduces gradients over gloo).
Reports steady-state iterations/s (steps after the first ``log_every`` over the time they
took, from each run's ``log.jsonl``) and wall time including start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from srdistill.config import RayConfig, TrainConfig
from srdistill.run import runner
from srdistill.sr.evaluation import list_images
from srdistill.sr.training import train_sr

REPO = Path(__file__).resolve().parents[1]


def _steady_its(out: Path) -> float:
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    first, last = log[0], log[-1]
    return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="espcn")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr-patch", type=int, default=48)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", default=str(REPO / "data" / "T91" / "HR"))
    args = ap.parse_args()

    images = list_images(args.data)
    log_every = max(1, args.iterations // 10)
    cfg = TrainConfig(model=args.model, iterations=args.iterations, batch_size=args.batch_size,
                      lr_patch=args.lr_patch, log_every=log_every, checkpoint_every=args.iterations,
                      device="cpu")  # fmt: skip
    runner.init_ray(RayConfig(num_cpus=os.cpu_count()))
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    rows = []
    threads = torch.get_num_threads()
    for name, fn in [
        ("in-process", lambda out: train_sr(cfg, args.scale, images, out, progress=False)),
        ("in-process, 1 thread", lambda out: (torch.set_num_threads(1),
                                              train_sr(cfg, args.scale, images, out, progress=False),
                                              torch.set_num_threads(threads))),
        (f"ray train x{args.workers}", lambda out: runner.train_ray(
            cfg.model_copy(update={"workers": args.workers}), args.scale, images, out)),
    ]:  # fmt: skip
        out = tmp / name.replace(" ", "_").replace(",", "")
        t0 = time.perf_counter()
        fn(out)
        rows.append((name, _steady_its(out), time.perf_counter() - t0))
    base = rows[0][1]
    print(f"{args.model} x{args.scale}, batch {args.batch_size}, LR patch {args.lr_patch}, "
          f"{args.iterations} steps, {len(images)} images; {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({threads} threads by default)\n")  # fmt: skip
    print("| arm | steady it/s | vs in-process | wall incl. start-up (s) |")
    print("|---|---|---|---|")
    for name, its, wall in rows:
        print(f"| {name} | {its:.2f} | {its / base:.2f}x | {wall:.1f} |")
    runner.shutdown_ray()


if __name__ == "__main__":
    main()
