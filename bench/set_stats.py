"""What each benchmark arm's training sets hold: the median hardness of their patches against the
corpus' (issue 19's reading of why a selector wins or loses).

For every set under ``OUT/sets/<arm>_<budget>_d<draw>/`` of a ``srdistill bench quality --out
OUT`` run, the patches named in its ``provenance.csv`` are looked up in the run's mined table
(``OUT/pipeline/mine``): the median ``psnr_bic`` (dB, lower = harder to upscale), its interquartile range (the
set's spread of hardness) and the median ``grad`` (mean Sobel magnitude / 8, grey levels per
pixel) of each set, and the squared MMD between the set and the corpus in the standardised
(``psnr_bic``, ``grad``) plane (``selection.subset_mmd``: 0 = the set's hardness is distributed as
the corpus'; a space that no selector optimises an MMD in, unlike ``tripled``'s ViT features),
averaged over the draws of an arm, next to the same medians over every mined patch. Prints a
markdown table.

    python bench/set_stats.py --out runs/bq_edsr_x4 [--budget 1%] [--arms random,kcenter]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv

from srdistill.distill.mining import read_patches
from srdistill.distill.selection import subset_mmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the --out of a bench quality run")
    ap.add_argument("--budget", default="1%", help="the budget whose sets are read")
    ap.add_argument("--arms", default="", help="comma-separated arms to list (default: every set found)")
    args = ap.parse_args()
    table = read_patches(str(args.out / "pipeline" / "mine"), ["patch_id", "psnr_bic", "grad"])
    scores = dict(zip(table.column("patch_id").to_pylist(),
                      zip(table.column("psnr_bic").to_pylist(), table.column("grad").to_pylist())))  # fmt: skip
    corpus = np.array(list(scores.values()))
    mean, std = corpus.mean(axis=0), corpus.std(axis=0)
    corpus_z = (corpus - mean) / std  # the standardised plane of the MMD
    per_arm: dict[str, list[tuple[float, float, float, float]]] = collections.defaultdict(list)
    for prov in sorted(args.out.glob(f"sets/*_{args.budget}_d*/provenance.csv")):
        arm = prov.parent.name.rsplit(f"_{args.budget}_d", 1)[0]
        if args.arms and arm not in args.arms.split(","):
            continue
        ids = pacsv.read_csv(prov).column("patch_id").to_pylist()
        values = np.array([scores[i] for i in ids])
        mmd = subset_mmd((values - mean) / std, corpus_z)
        per_arm[arm].append((*_stats(values), mmd))
    print("| set | sets | median psnr_bic (dB) | its interquartile range (dB) | median grad | MMD² to the corpus |")
    print("|---|---|---|---|---|---|")
    print("| every mined patch ({}) | | {:.1f} | {:.1f} | {:.1f} | |".format(len(corpus), *_stats(corpus)))
    for arm, stats in sorted(per_arm.items(), key=lambda kv: -np.mean([s[0] for s in kv[1]])):
        print("| {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.3f} |".format(arm, len(stats), *np.mean(stats, axis=0)))


def _stats(values: np.ndarray) -> tuple[float, float, float]:
    """``(N, 2)`` rows of (psnr_bic, grad) -> median psnr_bic, its interquartile range, median grad."""
    q1, med, q3 = np.percentile(values[:, 0], [25, 50, 75])
    return float(med), float(q3 - q1), float(np.median(values[:, 1]))


if __name__ == "__main__":
    main()
