"""Zero-shot SR under a known blur kernel: bicubic, the bicubic-pretrained network, MZSR with
0 / 1 / 10 adaptation steps and ZSSR, PSNR/SSIM on Y (border = scale) and seconds per image.

    python bench/bench_zero_shot.py --pretrained runs/mzsr_cpu/pretrain/model.safetensors \
        --meta runs/mzsr_cpu/meta/model.safetensors --datasets Set5 B100 --slow-datasets Set5 \
        --out runs/mzsr_cpu/results

The LR images are ``degradation.degrade(modcrop(HR), kernel, 2)`` with MZSR's g20 kernel
(21x21 isotropic Gaussian, variance 2, direct subsampling), which reproduces MZSR's own
``Set5/LR_g20_x2_MZSR`` inputs bit for bit; the paper's figures (arXiv 2002.12213, Table 2,
g^d_2.0) are printed beside ours. Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from srdistill.config import MZSRConfig
from srdistill.sr import degradation
from srdistill.sr.evaluation import evaluate
from srdistill.sr.training import load_checkpoint
from srdistill.zeroshot import mzsr

REPO = Path(__file__).resolve().parents[1]
#: MZSR's Table 2, x2, g^d_2.0 (PSNR on Y, dB).
PAPER = {
    "bicubic": {"Set5": 28.73, "B100": 26.51},
    "MZSR(1)": {"Set5": 35.20, "B100": 30.58},
    "MZSR(10)": {"Set5": 36.05, "B100": 31.09},
    "ZSSR": {"Set5": 34.90, "B100": 30.57},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrained", type=Path, required=True, help="bicubic-pretrained mzsr checkpoint")
    ap.add_argument("--meta", type=Path, required=True, help="meta-trained checkpoint (mzsr train)")
    ap.add_argument("--datasets", nargs="+", default=["Set5", "B100"])
    ap.add_argument("--slow-datasets", nargs="*", default=["Set5"],
                    help="where MZSR(10) and ZSSR run (seconds to minutes per image on a CPU)")
    ap.add_argument("--zssr-iterations", type=int, default=3000)
    ap.add_argument("--kernel", type=Path, required=True,
                    help="MZSR's g20 kernel.mat (e.g. $SRDISTILL_DATA/Set5/LR_g20_x2_MZSR/kernel.mat)")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    kernel = degradation.load_kernel(args.kernel)
    pre, _ = load_checkpoint(args.pretrained)
    meta_net, meta = load_checkpoint(args.meta)
    cfg = MZSRConfig.model_validate(meta["mzsr_config"])
    s = args.scale

    def mzsr_upscaler(steps: int):
        return lambda lr: mzsr.zero_shot(meta_net, lr, kernel, s, steps=steps, lr=cfg.adapt_lr)

    zcfg = MZSRConfig(scale=s, zssr_iterations=args.zssr_iterations)
    methods = {
        "bicubic": "bicubic",
        "pretrained (no adaptation)": pre,
        "MZSR(0)": mzsr_upscaler(0),
        "MZSR(1)": mzsr_upscaler(1),
        "MZSR(10)": mzsr_upscaler(10),
        "ZSSR": lambda lr: mzsr.zssr(lr, kernel, s, zcfg, seed=0)[0],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, method in methods.items():
        for ds in args.datasets:
            if name in ("MZSR(10)", "ZSSR") and ds not in args.slow_datasets:
                continue
            t0 = time.perf_counter()
            r = evaluate(method, ds, s, kernel=kernel, device="cpu")
            r.update(method=name, wall_s=time.perf_counter() - t0, requested=ds)  # ds: a name or a folder
            results.append(r)
            print(f"{name:28s} {ds:6s} {r['psnr_y']:.2f} / {r['ssim_y']:.4f}  {r['seconds_per_image']:.2f} s/image",
                  flush=True)  # fmt: skip
            (args.out / "results.json").write_text(json.dumps(results, indent=1))

    lines = ["| method | " + " | ".join(f"{d} (ours) | {d} (paper) | s/image" for d in args.datasets) + " |",
             "|---|" + "---|---|---|" * len(args.datasets)]  # fmt: skip
    for name in methods:
        cells = []
        for ds in args.datasets:
            r = next((x for x in results if x["method"] == name and x["requested"] == ds), None)
            paper = PAPER.get(name, {}).get(ds)
            cells += [f"{r['psnr_y']:.2f} / {r['ssim_y']:.4f}" if r else "not run",
                      f"{paper:.2f}" if paper else "", f"{r['seconds_per_image']:.2f}" if r else ""]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
