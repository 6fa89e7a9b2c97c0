"""How the complexity scores of a run relate: Spearman rank correlations between the ViT
token-diversity complexity, the cheap statistics (entropy, gradient energy) and the mining
scores (``psnr_bic``, ``grad``) over every patch of a run with a ``complexity`` stage.

    python bench/bench_complexity.py --run runs/bench_quality/pipeline

Prints a markdown table (and writes it to ``--out`` if given).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from srdistill.distill.complexity import attach_scores, read_scores
from srdistill.distill.mining import read_patches

COLUMNS = ("vit_complexity", "entropy", "grad_energy", "grad", "psnr_bic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="run directory with mine/ and complexity/")
    ap.add_argument("--out", type=Path, help="markdown file to write")
    args = ap.parse_args()
    patches = read_patches(str(args.run / "mine"), ["patch_id", "psnr_bic", "grad"])
    scores = read_scores(str(args.run / "complexity" / "parts"), ["patch_id", *COLUMNS[:3]])
    table = attach_scores(patches, scores, columns=COLUMNS[:3])
    x = np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in COLUMNS], axis=1)
    rho = spearmanr(x).statistic  # (5, 5)
    lines = [f"{len(x)} patches; Spearman rank correlation", "",
             "| | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]  # fmt: skip
    lines += [f"| {a} | " + " | ".join(f"{rho[i, j]:+.2f}" for j in range(len(COLUMNS))) + " |"
              for i, a in enumerate(COLUMNS)]  # fmt: skip
    q = np.quantile(x[:, 0], [0.0, 0.1, 0.5, 0.9, 1.0])
    lines += ["", "vit_complexity quantiles (0, 10, 50, 90, 100%): " + ", ".join(f"{v:.4f}" for v in q)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
