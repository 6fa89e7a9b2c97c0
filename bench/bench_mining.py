"""Mining throughput vs decode-only, and the Ray Data pipeline vs a plain loop, side by side.

    python bench/bench_mining.py --input BSD200 --repeats 3

Arms (each over the same images, interleaved per repeat, median reported):
  * ``decode``: ``imaging.read_image`` of every image (the floor any miner pays);
  * ``mine`` (``psnr_bic_window`` image | patch): decode + patch scores (``mining.mine_images``);
  both as a plain single-process loop and as the Ray Data pipeline of ``runner.map_images``
  (one CPU per task, ``images_per_task`` images per batch) on a local Ray with ``--cpus`` CPUs.
Throughput is HR megapixels decoded per second of wall time. Prints a markdown table and
writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from srdistill import storage
from srdistill.config import MineConfig, RayConfig
from srdistill.distill.mining import MINED_SCHEMA, mine_images
from srdistill.run import runner
from srdistill.sr.evaluation import resolve_dataset
from srdistill.sr.imaging import read_image, write_png

DECODED = pa.schema([("source", pa.string()), ("pixels", pa.int64())])


def decode_images(paths, **_) -> pa.Table:
    """Decode-only arm: read each image fully, return its pixel count."""
    rows = [{"source": str(p), "pixels": int(np.prod(read_image(str(p)).shape[:2]))} for p in paths]
    return pa.Table.from_pylist(rows, schema=DECODED)


def make_tiled(paths: list[str], k: int, out_dir: Path) -> list[str]:
    """Compose k x k images (cropped to the smallest common size) into each large PNG, so the
    benchmark can also run on DIV2K-sized inputs (k = 4 on BSD200 gives 1284x1924 images)."""
    imgs = [read_image(p) for p in paths]
    h = min(i.shape[0] for i in imgs if i.shape[0] <= i.shape[1])
    w = min(i.shape[1] for i in imgs if i.shape[0] <= i.shape[1])
    landscape = [i[:h, :w] for i in imgs if i.shape[0] <= i.shape[1]]
    out = []
    for n, start in enumerate(range(0, len(landscape) - k * k + 1, k * k)):
        tiles = landscape[start : start + k * k]
        rows = [np.concatenate(tiles[r * k : (r + 1) * k], axis=1) for r in range(k)]
        path = out_dir / f"tiled_{n:03d}.png"
        write_png(path, np.concatenate(rows, axis=0))
        out.append(str(path))
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", default="BSD200", help="HR folder or benchmark name (srdistill data get BSD200)")
    ap.add_argument("--patch-size", type=int, default=192)
    ap.add_argument("--stride", type=int, default=96)
    ap.add_argument("--images-per-task", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=1, help="compose KxK images into each input")
    ap.add_argument("--copies", type=int, default=1,
                    help="repeat the image list N times, so fixed start-up costs are amortised")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    # every image below --input (recursive, the corpus' default extensions), sorted
    paths = storage.list_files(str(resolve_dataset(args.input)), MineConfig().extensions)
    if not paths:
        ap.error(f"no images ({', '.join(MineConfig().extensions)}) under {args.input!r}")
    if args.tile > 1:
        tmp = Path(tempfile.mkdtemp(prefix="bench_tiled_"))
        paths = make_tiled(paths, args.tile, tmp)
    paths = paths * args.copies
    megapixels = args.copies * sum(int(np.prod(read_image(p).shape[:2])) for p in set(paths)) / 1e6
    cfgs = {w: MineConfig(patch_size=args.patch_size, stride=args.stride, psnr_bic_window=w,
                          images_per_task=args.images_per_task) for w in ("image", "patch")}  # fmt: skip
    runner.init_ray(RayConfig(num_cpus=args.cpus))
    ipt = args.images_per_task
    arms = {
        "loop decode": lambda: decode_images(paths),
        "loop mine (image window)": lambda: mine_images(paths, cfgs["image"]),
        "loop mine (patch window)": lambda: mine_images(paths, cfgs["patch"]),
        "ray decode": lambda: runner.map_images(paths, decode_images, images_per_task=ipt, schema=DECODED),
        "ray mine (image window)": lambda: runner.map_images(paths, mine_images, images_per_task=ipt,
                                                             schema=MINED_SCHEMA, cfg=cfgs["image"]),
        "ray mine (patch window)": lambda: runner.map_images(paths, mine_images, images_per_task=ipt,
                                                             schema=MINED_SCHEMA, cfg=cfgs["patch"]),
    }  # fmt: skip
    arms["ray decode"]()  # warm-up: worker start-up is not throughput
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.repeats):
        for name, fn in arms.items():
            times[name].append(_timed(fn))
    mps = {k: megapixels / statistics.median(v) for k, v in times.items()}
    print(f"{len(paths)} images ({args.tile}x{args.tile} tiles, {args.copies} copies), {megapixels:.1f} MP, patch {args.patch_size}/{args.stride}, "
          f"{args.cpus} Ray CPUs, median of {args.repeats}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores\n")  # fmt: skip
    print("| arm | MP/s | vs decode of same runner |")
    print("|---|---|---|")
    for name, v in mps.items():
        base = mps["loop decode" if name.startswith("loop") else "ray decode"]
        print(f"| {name} | {v:.2f} | {v / base:.2f}x |")
    print(f"\nRay Data vs plain loop: decode {mps['ray decode'] / mps['loop decode']:.2f}x, "
          f"mine (image) {mps['ray mine (image window)'] / mps['loop mine (image window)']:.2f}x, "
          f"mine (patch) {mps['ray mine (patch window)'] / mps['loop mine (patch window)']:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"megapixels": megapixels, "seconds": times, "mp_per_s": mps}, indent=2))
    runner.shutdown_ray()


if __name__ == "__main__":
    main()
