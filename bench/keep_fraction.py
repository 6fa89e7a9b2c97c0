"""Fraction of sliding windows a psnr_bic threshold keeps, under the MATLAB and the OpenCV bicubic.

    SRDISTILL_DATA=/work/shared/data python bench/keep_fraction.py --inputs T91 BSD200

SRDD's released patch selection scores a window by the PSNR of its grayscale crop against an
OpenCV ``INTER_CUBIC`` x4 down-then-up (``mine.psnr_bic_resize = opencv``); srdistill's default
is MATLAB's bicubic (``matlab``), which restores a patch better, so a fixed threshold keeps
fewer windows. This mines every image below ``--inputs`` (benchmark names resolved like
``srdistill.sr.evaluation.resolve_dataset``, or folders) with ``mining.mine_images`` once per
criterion and applies the threshold keep rule (``mining.apply_keep_rule``), then prints a
markdown table (criterion, windows, kept, fraction) and the paired score difference.
Defaults: 192/96 windows, x4, per-window scoring (``psnr_bic_window = patch``, as SRDD), 23 dB.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from srdistill import storage
from srdistill.config import MineConfig
from srdistill.distill.mining import apply_keep_rule, mine_images
from srdistill.sr.evaluation import resolve_dataset

CRITERIA = ("matlab", "opencv")


def keep_fractions(paths: list[str], cfg: MineConfig, criteria=CRITERIA) -> dict[str, dict]:
    """Mine ``paths`` under each ``psnr_bic_resize`` of ``criteria`` with ``cfg`` otherwise.

    Returns:
        ``{criterion: {"windows", "kept", "fraction", "images", "skipped", "seconds",
        "psnr_bic" ((windows,) float32 dB, in mining order)}}``.
    """
    out = {}
    for name in criteria:
        c = cfg.model_copy(update={"psnr_bic_resize": name})
        start = time.perf_counter()
        table = mine_images(paths, c)
        seconds = time.perf_counter() - start
        ok = pc.equal(table.column("error"), "")
        patches = apply_keep_rule(table.filter(ok), c)
        kept = int(pc.sum(patches.column("kept")).as_py() or 0)
        out[name] = {"windows": patches.num_rows, "kept": kept, "fraction": kept / max(patches.num_rows, 1),
                     "images": pc.count_distinct(patches.column("source")).as_py(),
                     "skipped": table.num_rows - int(pc.sum(ok).as_py() or 0), "seconds": seconds,
                     "psnr_bic": patches.column("psnr_bic").to_numpy()}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", nargs="+", default=["T91", "BSD200"], help="benchmark names or folders")
    ap.add_argument("--patch-size", type=int, default=192)
    ap.add_argument("--stride", type=int, default=96)
    ap.add_argument("--bic-scale", type=int, default=4)
    ap.add_argument("--window", choices=["patch", "image"], default="patch", help="mine.psnr_bic_window")
    ap.add_argument("--threshold", type=float, default=23.0, help="keep psnr_bic < this (dB)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    exts = MineConfig().extensions
    paths = [p for name in args.inputs for p in storage.list_files(str(resolve_dataset(name)), exts)]
    if not paths:
        ap.error(f"no images under {args.inputs}")
    cfg = MineConfig(patch_size=args.patch_size, stride=args.stride, bic_scale=args.bic_scale,
                     psnr_bic_window=args.window, keep_score="psnr_bic", keep_rule="threshold",
                     threshold=args.threshold)  # fmt: skip
    res = keep_fractions(paths, cfg)
    print(f"{len(paths)} images ({' + '.join(args.inputs)}), windows {args.patch_size}/{args.stride}, "
          f"x{args.bic_scale}, psnr_bic_window {args.window}, keep psnr_bic < {args.threshold:g} dB\n")  # fmt: skip
    print("| criterion | windows | kept | fraction | images with windows | images skipped | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['windows']} | {r['kept']} | {r['fraction']:.4f} | {r['images']} | {r['skipped']} "
              f"| {r['seconds']:.1f} |")  # fmt: skip
    diff = res["matlab"]["psnr_bic"].astype(np.float64) - res["opencv"]["psnr_bic"]
    finite = (res["matlab"]["psnr_bic"] < 99) & (res["opencv"]["psnr_bic"] < 99)
    print(f"\npsnr_bic matlab - opencv over the same windows: mean {diff[finite].mean():.3f} dB, "
          f"median {np.median(diff[finite]):.3f}, min {diff[finite].min():.3f}, max {diff[finite].max():.3f}")  # fmt: skip
    if args.json:
        summary = {k: {f: v for f, v in r.items() if f != "psnr_bic"} for k, r in res.items()}
        args.json.write_text(json.dumps({"inputs": args.inputs, "config": cfg.model_dump(), "results": summary,
                                         "mean_diff_db": float(diff[finite].mean())}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
