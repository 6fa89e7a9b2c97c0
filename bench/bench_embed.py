"""The embed path against the forward floor, in one process (no Ray): is the device kept busy?

    python bench/bench_embed.py                                  # CPU, 2 torch threads (the demo's actor)
    python bench/bench_embed.py --device cuda --patches 20000    # a GPU: batches of 256

Arms, over the same patches (every 96/48 window of ``--input``'s images, repeated up to
``--patches``), the same random-init CLIP ViT-B/32 and the same batches (``--batch-size``,
default ``embedding.AUTO_BATCH`` of the device), interleaved, median of ``--repeats``:

* ``raw forward``: only ``model(pixel_values=batch)``, every batch already decoded, cropped,
  resized and normalised on the device beforehand (the floor);
* ``embed, prefetched``: what an embed actor does per shard (``mining.map_patch_part``):
  ``ClipEmbedder.prepare`` (decode, crop) of the next batch in a second thread while
  ``ClipEmbedder.forward`` (uint8 to the device, resize, normalise, forward) runs;
* ``embed, in turn``: the same without the second thread.

Prints patches/s and each arm's speed as a fraction of the raw forward's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def batches_of(input_dir: Path, n: int, size: int, stride: int, batch: int) -> list[dict[str, np.ndarray]]:
    from srdistill import storage
    from srdistill.distill.mining import patch_positions
    from srdistill.sr.imaging import image_size

    rows = []
    paths = storage.list_files(str(input_dir), (".png",))
    while len(rows) < n:
        for p in paths:
            w, h = image_size(p)
            rows += [(f"{p}|{x}|{y}", p, x, y, size) for x, y in patch_positions(w, h, size, stride)]
    rows = rows[:n]
    cols = [np.array(c) for c in zip(*rows)]
    names = ("patch_id", "source", "x", "y", "size")
    return [{k: v[i : i + batch] for k, v in zip(names, cols)} for i in range(0, n, batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, default=REPO / "data" / "T91" / "HR")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--patches", type=int, default=512)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from srdistill.config import EmbedConfig
    from srdistill.distill.embedding import ClipEmbedder, resolve_clip
    from srdistill.distill.mining import prefetched

    torch.set_num_threads(args.threads)
    cfg = EmbedConfig(model="not/downloaded", allow_random_init=True, device=args.device, batch_size=args.batch_size)
    embedder = ClipEmbedder(cfg, resolve_clip(cfg))
    batches = batches_of(args.input, args.patches, 96, 48, embedder.batch_size)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with torch.inference_mode():
        pixels = [embedder._preprocess(embedder.prepare(b)[1]) for b in batches]  # on the device

        def raw():
            for x in pixels:
                embedder.model(pixel_values=x)

        def pipelined():
            for prepared in prefetched(embedder.prepare, batches):
                embedder.forward(prepared)

        def in_turn():
            for b in batches:
                embedder(b)

        arms = {"raw forward": raw, "embed, prefetched": pipelined, "embed, in turn": in_turn}
        raw()  # warm-up (kernels, allocator)
        sync()
        times: dict[str, list[float]] = {k: [] for k in arms}
        for _ in range(args.repeats):
            for name, fn in arms.items():
                embedder._last = None
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} torch threads"
    print(f"{args.patches} patches of 96x96 -> 224, batches of {embedder.batch_size}, random-init ViT-B/32 "
          f"(fp32), {device}; {os.cpu_count()} cores, load {os.getloadavg()}; median of {args.repeats}\n")  # fmt: skip
    print("| arm | patches/s | vs raw forward |\n|---|---|---|")
    base = statistics.median(times["raw forward"])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {args.patches / m:.1f} | {base / m:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
