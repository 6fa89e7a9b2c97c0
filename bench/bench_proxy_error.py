"""Wall time of the label-free selectors' per-patch work: ``proxy_error`` scores (proxy ESPCNs
trained on the patches, then every patch scored) and ``kcenter`` pixel descriptors plus one
k-center greedy pass, on the patches mined from a folder, and how ``proxy_error`` ranks against
the mining scores.

    OMP_NUM_THREADS=2 python bench/bench_proxy_error.py --input $SRDISTILL_DATA/BSD200/HR \\
        --patch-size 96 --stride 40 --scale 2

Prints a markdown table of wall and CPU seconds (and writes it to ``--out`` if given), and the
load average before and after. Threads: torch's default (``torch.get_num_threads()``), printed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from srdistill.config import MineConfig, ProxyConfig
from srdistill.distill.kcenter import kcenter_greedy, patch_descriptors
from srdistill.distill.mining import mine_images, split_mined
from srdistill.distill.proxy_error import proxy_error_scores


def timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and its (wall, process CPU) seconds: on a shared machine the CPU
    time shows the work, the wall time what the load left of it."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - wall, time.process_time() - cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, required=True, help="folder of HR images")
    ap.add_argument("--patch-size", type=int, default=96)
    ap.add_argument("--stride", type=int, default=40)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--kcenter-m", type=int, default=100, help="k-center picks to time")
    ap.add_argument("--out", type=Path, help="markdown file to write")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    files = sorted(str(p) for p in args.input.iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp"))
    mine_cfg = MineConfig(patch_size=args.patch_size, stride=args.stride, keep_rule="all")
    table, _ = split_mined(mine_images(files, mine_cfg))
    cfg = ProxyConfig(device="cpu")
    scores, t_proxy = timed(proxy_error_scores, table, args.scale, cfg)
    desc, t_desc = timed(patch_descriptors, table)
    _, t_kc = timed(kcenter_greedy, desc, args.kcenter_m, seed=0)
    mined = {c: table.column(c).to_numpy().astype(np.float64) for c in ("psnr_bic", "grad")}
    rho = {c: spearmanr(scores, v).statistic for c, v in mined.items()}
    head = (f"{table.num_rows} patches of {args.patch_size}x{args.patch_size} from {len(files)} images "
            f"({args.input.parent.name}/{args.input.name}), x{args.scale}, {torch.get_num_threads()} torch "
            "threads, CPU")  # fmt: skip
    proxy = (f"proxy_error_scores ({cfg.steps} steps x {len(cfg.seeds)} seeds, batch {cfg.batch_size}, "
             f"crop {cfg.crop}, n_feats {cfg.n_feats})")  # fmt: skip
    lines = [
        head, "", "| step | wall s | CPU s (all threads) |", "|---|---|---|",
        f"| {proxy} | {t_proxy[0]:.1f} | {t_proxy[1]:.1f} |",
        f"| patch_descriptors | {t_desc[0]:.1f} | {t_desc[1]:.1f} |",
        f"| kcenter_greedy, m = {args.kcenter_m} | {t_kc[0]:.2f} | {t_kc[1]:.2f} |", "",
        f"Spearman of proxy_error with psnr_bic {rho['psnr_bic']:+.2f}, with grad {rho['grad']:+.2f}",
        f"1-minute load average: {load:.1f} before, {os.getloadavg()[0]:.1f} after",
    ]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
