"""srdistill side by side with the scripts it replaces: SRDD's released ``src/1_select_patches.py``
and ``src/2_cluster_clip.py``, run from a checkout you supply, on the same corpus and machine.

    git clone https://github.com/sunwoocho/SRDD /tmp/srdd   # not vendored here
    python bench/bench_vs_srdd.py --srdd /tmp/srdd                 # every part, 3 interleaved repeats
    python bench/bench_vs_srdd.py --srdd /tmp/srdd --part scaling  # one part

Parts (each prints a markdown table; ratios > 1: srdistill faster):

* ``select``: SRDD's ``extract_patches_with_gradient_threshold`` (imported from the checkout and
  called with this run's folders: the script itself holds placeholder paths) against
  ``srdistill run --until mine`` with the same criterion (``--preset srdd``'s ``mine``: 512/256
  windows scored per patch by OpenCV's x4 bicubic PSNR, 23 dB) and with srdistill's default
  criterion, on ``--images`` DIV2K-sized images (``--div2k DIR``, else BSD200 tiled 4x4 as in
  bench_mining.py), and with 96/48 windows on the "291" corpus (T91 + BSD200). Wall times of
  whole processes, and scoring alone: SRDD's function with a threshold no patch passes (it
  then writes nothing) against srdistill's ``mining.mine_images`` in one process, both on one
  thread (OpenCV, BLAS) and without srdistill's prefetch thread: MP/s of image per core; and
  ``mine_images`` as it runs (the next image decoded in a second thread), next to decode only.
* ``embed``: SRDD's ``2_cluster_clip.py`` on the demo's kept patches (T91, 96/48 windows, top
  60%), written as PNGs in SRDD's layout, against ``srdistill run --until cluster`` resuming
  the same mined run with SRDD's clustering (raw features, sklearn k-means k=7, n_init 10,
  seed 42); both with a random-init CLIP ViT-B/32 (no weights offline; same architecture).
  srdistill's embed stage twice: in the driver (``embed.num_actors=0``) and in one Ray Data
  actor (``embed.num_actors=1``), its weights loaded from a directory (``save_random_clip``: the
  same random-init model, saved once) as a user's would be. Plus the floor: a raw batched forward (batch 32) of srdistill's embedder model on the same,
  already preprocessed patches, against the embed stage's own seconds.
* ``scaling``: ``srdistill run --until mine`` (default criterion) on a local Ray cluster
  (``ray.cluster_utils.Cluster``) of one node and of two nodes of one CPU each, every node's
  processes pinned to a core of its own (``sched_setaffinity``, inherited), on ``--scale-images``
  DIV2K-sized images, after an untimed run that starts the workers: the mine stage's seconds,
  1 node / 2 nodes.
* ``tax``: the README's demo (``--preset demo``, ``--demo-iterations`` training steps; the
  figure does not depend on them): wall time of the command minus the stages' own seconds.

The patches applied to ``2_cluster_clip.py`` (in a temporary copy; the checkout is not touched)
are: its two placeholder folders; ``CLIPModel.from_pretrained`` -> a random-init ``CLIPModel``
with ViT-B/32's vision config; ``CLIPProcessor.from_pretrained`` -> openai/clip-vit-base-patch32's
image processor (its tokenizer files are not available offline and its text side is unused);
``get_image_features`` returning the projected features as a tensor (transformers 5 returns a
``BaseModelOutputWithPooling``; the released code expects transformers 4's tensor).
Each line notes ``uptime``'s load: the machine may be shared; compare ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_mining import make_tiled  # noqa: E402

from srdistill import storage  # noqa: E402
from srdistill.config import MineConfig  # noqa: E402
from srdistill.sr.evaluation import resolve_dataset  # noqa: E402
from srdistill.sr.imaging import read_image, write_png  # noqa: E402

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-m", "srdistill.cli"]
SRDD_SELECT = ["--set", "mine.patch_preset=srdd", "--set", "mine.psnr_bic_window=patch",
               "--set", "mine.psnr_bic_resize=opencv"]  # fmt: skip
SRDD_CLUSTER = ["--set", "embed.normalize=false", "--set", "cluster.method=kmeans", "--set", "cluster.k=7",
                "--set", "cluster.nredo=10", "--set", "cluster.niter=300", "--set", "cluster.seed=42",
                "--set", "cluster.max_train_points=1000000"]  # fmt: skip

#: Prepended to the temporary copy of 2_cluster_clip.py (see the module docstring).
CLUSTER_PRELUDE = '''
import transformers as _tf
class _RandomClip:
    @staticmethod
    def from_pretrained(name):
        import torch
        torch.manual_seed(0)
        model = _tf.CLIPModel(_tf.CLIPConfig(projection_dim=512, vision_config=dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=32, image_size=224,
            intermediate_size=3072)))
        features = model.get_image_features
        model.get_image_features = lambda **kw: features(**kw).pooler_output
        return model
class _ImageProcessor:
    @staticmethod
    def from_pretrained(name):
        ip = _tf.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        return lambda images, return_tensors, padding=None: ip(images=images, return_tensors=return_tensors)
'''


def uptime() -> str:
    return os.getloadavg().__repr__()


def run_cli(args: list[str]) -> tuple[float, dict]:
    """``srdistill`` in a fresh process: (wall seconds, the run's manifest)."""
    t0 = time.perf_counter()
    done = subprocess.run(CLI + args, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"srdistill {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    out = Path(args[args.index("--out") + 1])
    return wall, json.loads((out / "manifest.json").read_text())


def stage_seconds(manifest: dict, *names: str) -> float:
    return sum(manifest["stages"][n].get("seconds") or 0.0 for n in names)


def load_srdd_select(srdd: Path):
    spec = importlib.util.spec_from_file_location("srdd_select", srdd / "src" / "1_select_patches.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its __main__ block (placeholder paths) does not run
    return module


def srdd_select(srdd: Path, images: Path, out: Path, size: int, stride: int, threshold: float) -> float:
    """SRDD's patch selection in a fresh process (as the released script runs): wall seconds."""
    script = str(srdd / "src" / "1_select_patches.py")
    code = (f"import importlib.util as u; s = u.spec_from_file_location('m', {script!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); "
            f"m.extract_patches_with_gradient_threshold({str(images)!r}, {str(out)!r}, ({size}, {size}), {stride}, "
            f"{threshold})")  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, capture_output=True)
    return time.perf_counter() - t0


def div2k_like(args, work: Path) -> Path:
    """``--images`` DIV2K-sized PNGs in one folder: ``--div2k`` files, else BSD200 tiled 4x4
    (1284x1924), repeated under new names until there are enough."""
    folder = work / "div2k"
    folder.mkdir(exist_ok=True)
    if args.div2k:
        src = storage.list_files(args.div2k, (".png",))
    else:
        src = make_tiled(storage.list_files(str(resolve_dataset("BSD200")), (".png",)), 4, work)
    for i in range(args.images):
        shutil.copy(src[i % len(src)], folder / f"img_{i:03d}.png")
    return folder


def megapixels(folder: Path) -> float:
    return sum(int(np.prod(read_image(str(p)).shape[:2])) for p in sorted(folder.glob("*.png"))) / 1e6


def per_core_scoring(srdd: Path, folder: Path, size: int, stride: int, repeats: int) -> dict[str, float]:
    """MP/s of one process on one thread: SRDD's selection with nothing passing (scoring only)
    against srdistill's mine_images (released criterion; and the default), no prefetch."""
    import cv2

    from srdistill.distill.mining import mine_images, one_core

    module = load_srdd_select(srdd)
    paths = [str(p) for p in sorted(folder.glob("*.png"))]
    mp = megapixels(folder)
    cfg = MineConfig(patch_size=size, stride=stride, psnr_bic_window="patch", psnr_bic_resize="opencv")
    arms = {
        "SRDD scoring (OpenCV, per patch)": lambda: module.extract_patches_with_gradient_threshold(
            str(folder), tempfile.mkdtemp(), (size, size), stride, -np.inf),
        "srdistill mine, released criterion": lambda: mine_images(paths, cfg, prefetch=False),
        "srdistill mine, default (MATLAB, image window)": lambda: mine_images(
            paths, MineConfig(patch_size=size, stride=stride), prefetch=False),
        "srdistill mine, default, next image decoded in a 2nd thread": lambda: mine_images(
            paths, MineConfig(patch_size=size, stride=stride)),
        "decode only": lambda: [read_image(p) for p in paths],
    }  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in arms}
    threads = cv2.getNumThreads()
    with one_core():  # OpenCV and BLAS on one thread, for SRDD's function too
        for _ in range(repeats):
            for name, fn in arms.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    cv2.setNumThreads(threads)
    return {k: mp / statistics.median(v) for k, v in times.items()}


def part_select(args, work: Path) -> None:
    print(f"\n## select (load {uptime()})\n")
    corpora = {"DIV2K-sized": div2k_like(args, work)}
    t291 = work / "291"
    t291.mkdir(exist_ok=True)
    for name in ("T91", "BSD200"):
        for p in storage.list_files(str(resolve_dataset(name)), (".png",)):
            shutil.copy(p, t291 / f"{name}_{Path(p).name}")
    corpora["291"] = t291
    print("| corpus, windows | SRDD wall (s) | srdistill wall, released criterion (s) | its mine stage (s) | "
          "srdistill wall, default (s) | its mine stage (s) | wall ratio (released) | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, folder in corpora.items():
        size, stride = (512, 256) if name == "DIV2K-sized" else (96, 48)
        geometry = ["--set", f"mine.patch_size={size}", "--set", f"mine.stride={stride}", "--set",
                    "mine.keep_rule=threshold", "--set", "mine.threshold=23"]  # fmt: skip
        released = [*SRDD_SELECT[2:], *geometry]
        walls: dict[str, list[float]] = {"srdd": [], "ours": [], "ours_stage": [], "default": [], "default_stage": []}
        for r in range(args.repeats):
            walls["srdd"].append(srdd_select(args.srdd, folder, work / f"srdd_out_{name}_{r}", size, stride, 23))
            wall, manifest = run_cli(["run", "--input", str(folder), "--out", str(work / f"ours_{name}_{r}"),
                                      "--until", "mine", *released])  # fmt: skip
            walls["ours"].append(wall)
            walls["ours_stage"].append(stage_seconds(manifest, "mine"))
            wall, manifest = run_cli(["run", "--input", str(folder), "--out", str(work / f"default_{name}_{r}"),
                                      "--until", "mine", *geometry])  # fmt: skip
            walls["default"].append(wall)
            walls["default_stage"].append(stage_seconds(manifest, "mine"))
        med = {k: statistics.median(v) for k, v in walls.items()}
        print(f"| {name} ({len(list(folder.glob('*.png')))} images), {size}/{stride} | {med['srdd']:.1f} | "
              f"{med['ours']:.1f} | {med['ours_stage']:.1f} | {med['default']:.1f} | {med['default_stage']:.1f} | "
              f"{med['srdd'] / med['ours']:.2f} | {uptime()} |")  # fmt: skip
    print(f"\nScoring per core, one process, one thread, {args.repeats} interleaved repeats (load {uptime()}):\n")
    for name, folder in corpora.items():
        size, stride = (512, 256) if name == "DIV2K-sized" else (96, 48)
        mps = per_core_scoring(args.srdd, folder, size, stride, args.repeats)
        base = mps["SRDD scoring (OpenCV, per patch)"]
        print(f"| {name}, {size}/{stride} | MP/s | vs SRDD | vs decode only |\n|---|---|---|---|")
        for arm, v in mps.items():
            print(f"| {arm} | {v:.1f} | {v / base:.2f} | {v / mps['decode only']:.2f} |")
        print()


def export_patches(run_dir: Path, dest: Path) -> int:
    """The kept patches of a mined run as PNGs, in SRDD's layout (``dest/<class>/*.png``)."""
    from srdistill.distill.mining import read_patches

    table = read_patches(str(run_dir / "mine"), ["source", "x", "y", "size"], kept_only=True)
    (dest / "x2").mkdir(parents=True, exist_ok=True)
    images: dict[str, np.ndarray] = {}
    for i, row in enumerate(table.to_pylist()):
        img = images.setdefault(row["source"], read_image(row["source"]))
        s = row["size"]
        write_png(dest / "x2" / f"patch_{i:05d}.png", img[row["y"] : row["y"] + s, row["x"] : row["x"] + s])
    return table.num_rows


def srdd_cluster(srdd: Path, patches: Path, out: Path, work: Path) -> float:
    text = (srdd / "src" / "2_cluster_clip.py").read_text()
    for old, new in (('"/path/to/input_directory"', repr(str(patches))),
                     ('"/path/to/output_directory"', repr(str(out))),
                     ("CLIPModel.from_pretrained(", "_RandomClip.from_pretrained("),
                     ("CLIPProcessor.from_pretrained(", "_ImageProcessor.from_pretrained(")):  # fmt: skip
        if old not in text:
            raise SystemExit(f"{srdd}/src/2_cluster_clip.py: {old!r} not found; not the released script?")
        text = text.replace(old, new)
    script = work / "2_cluster_clip_patched.py"
    script.write_text(CLUSTER_PRELUDE + text)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(script)], env=ENV, check=True, capture_output=True)
    return time.perf_counter() - t0


def save_random_clip(out: Path) -> Path:
    """The demo's random-init CLIP vision tower saved as a transformers checkpoint in ``out``:
    srdistill's arms load it from there (``embed.model``), as a user's downloaded weights, so
    the stage's seconds include a weights load (~0.1 s) and not a random initialisation
    (~3 s for ViT-B/32 here, a cost only an offline test pays)."""
    from srdistill.config import load_config
    from srdistill.distill.embedding import ClipEmbedder, resolve_clip

    cfg = load_config("demo", overrides=["embed.allow_random_init=true"]).embed
    ClipEmbedder(cfg, resolve_clip(cfg)).model.save_pretrained(out)
    return out


def raw_forward(run_dir: Path, repeats: int) -> float:
    """Seconds of a raw batched forward (batch 32, 2 torch threads as the demo's actor) of the
    demo's embedder model over the run's kept patches, preprocessed beforehand: the median."""
    import torch

    from srdistill.config import load_config
    from srdistill.distill.embedding import ClipEmbedder, resolve_clip
    from srdistill.distill.mining import read_patches
    from srdistill.sr.imaging import read_crops

    cfg = load_config("demo", overrides=["embed.allow_random_init=true"]).embed
    torch.set_num_threads(cfg.num_threads or 2)
    embedder = ClipEmbedder(cfg, resolve_clip(cfg))
    t = read_patches(str(run_dir / "mine"), ["source", "x", "y", "size"], kept_only=True)
    crops = read_crops(*(t.column(c).to_numpy(zero_copy_only=False) for c in ("source", "x", "y", "size")))
    with torch.inference_mode():
        batches = [embedder._preprocess(crops[i : i + 32]) for i in range(0, len(crops), 32)]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches:
                embedder.model(pixel_values=b)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_embed(args, work: Path) -> None:
    print(f"\n## embed + k-means (load {uptime()})\n")
    mined = work / "demo_mined"
    run_cli(["run", "--input", str(REPO / "data" / "T91"), "--out", str(mined), "--preset", "demo",
             "--allow-random-init", "--until", "mine"])  # fmt: skip
    patches = work / "demo_patches"
    n = export_patches(mined, patches)
    weights = save_random_clip(work / "clip_vit_b32_random")  # loaded from a path, as a user's weights are
    rows = []
    arms = {"driver": ["--set", "embed.num_actors=0"], "actor": ["--set", "embed.num_actors=1"]}
    for r in range(args.repeats):
        srdd = srdd_cluster(args.srdd, patches, work / f"srdd_clusters_{r}", work)
        row = [srdd]
        for arm, extra in arms.items():  # the demo's embed in the driver, then in one Ray Data actor
            ours_dir = work / f"ours_embed_{arm}_{r}"
            shutil.copytree(mined, ours_dir)
            wall, manifest = run_cli(["run", "--input", str(REPO / "data" / "T91"), "--out", str(ours_dir),
                                      "--preset", "demo", "--allow-random-init", "--until", "cluster",
                                      *SRDD_CLUSTER, *extra, "--set", f"embed.model={weights}"])  # fmt: skip
            row += [wall, stage_seconds(manifest, "embed"), stage_seconds(manifest, "cluster")]
        row.append(raw_forward(mined, 1))
        rows.append(row)
        print(f"repeat {r}: SRDD {srdd:.1f} s; srdistill wall / embed / cluster, in the driver "
              f"{row[1]:.1f} / {row[2]:.1f} / {row[3]:.1f} s, in an actor {row[4]:.1f} / {row[5]:.1f} / "
              f"{row[6]:.1f} s; raw forward {row[7]:.1f} s; load {uptime()}", file=sys.stderr)  # fmt: skip
    med = [statistics.median(c) for c in zip(*rows)]
    srdd, floor = med[0], med[7]
    print(f"{n} patches, random-init ViT-B/32, median of {args.repeats}\n")
    print("| embed stage runs | SRDD 2_cluster_clip.py (s) | srdistill run, embed + cluster (s) | embed stage (s) | "
          "cluster stage (s) | raw forward (s) | wall ratio | embed stage vs raw forward |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for i, arm in enumerate(arms):
        wall, embed, cluster = med[1 + 3 * i:4 + 3 * i]
        print(f"| {arm} | {srdd:.1f} | {wall:.1f} | {embed:.1f} | {cluster:.1f} | {floor:.1f} | {srdd / wall:.2f} | "
              f"{floor / embed:.2f} |")  # fmt: skip


def part_scaling(args, work: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from srdistill.config import load_config
    from srdistill.run import runner
    from srdistill.run.pipeline import run_pipeline

    print(f"\n## scaling: local Ray cluster, 1 CPU per node (load {uptime()})\n")
    base = sorted(div2k_like(args, work).glob("*.png"))
    folder, warm = work / "scaling", work / "scaling_warm"
    folder.mkdir(exist_ok=True)
    warm.mkdir(exist_ok=True)
    for i in range(args.scale_images):
        shutil.copy(base[i % len(base)], folder / f"s_{i:04d}.png")
    for p in base[:2]:
        shutil.copy(p, warm / p.name)
    cores = sorted(os.sched_getaffinity(0))
    mine: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.repeats):
        for nodes in (1, 2):
            mask = os.sched_getaffinity(0)
            cluster = Cluster()
            try:
                for k in range(nodes):
                    os.sched_setaffinity(0, {cores[k % len(cores)]})  # the node's processes inherit it
                    cluster.add_node(num_cpus=1, **({"include_dashboard": False} if k == 0 else {}))
                os.sched_setaffinity(0, mask)
                cluster.wait_for_nodes()
                cfg = load_config(overrides=["mine.keep_rule=all", f"ray.address={cluster.address}",
                                             f"mine.images_per_shard={args.scale_images_per_shard}"])  # fmt: skip
                for corpus, out in ((warm, f"warm_{nodes}_{r}"), (folder, f"scale_{nodes}_{r}")):  # warm: workers up
                    manifest = run_pipeline(str(corpus), str(work / out), cfg, until="mine", log=lambda line: None)
                mine[nodes].append(stage_seconds(manifest, "mine"))
                shards = manifest["stages"]["plan"]["counts"]["shards"]
            finally:
                os.sched_setaffinity(0, mask)
                runner.shutdown_ray()
                if ray.is_initialized():
                    ray.shutdown()
                cluster.shutdown()
            print(f"repeat {r}, {nodes} node(s): mine {mine[nodes][-1]:.1f} s, {shards} shards; load {uptime()}",
                  file=sys.stderr)  # fmt: skip
    one, two = statistics.median(mine[1]), statistics.median(mine[2])
    mp = args.scale_images * megapixels(base[0].parent) / len(base)
    print(f"{args.scale_images} DIV2K-sized images ({mp:.0f} MP) in shards of {args.scale_images_per_shard}, default "
          f"criterion, workers warmed by an untimed run, median of {args.repeats}\n")  # fmt: skip
    print("| nodes (1 CPU each, own core) | mine stage (s) | MP/s | speed-up |\n|---|---|---|---|")
    print(f"| 1 | {one:.1f} | {mp / one:.1f} | 1.00 |\n| 2 | {two:.1f} | {mp / two:.1f} | {one / two:.2f} |")


def part_tax(args, work: Path) -> None:
    print(f"\n## fixed tax of the demo (load {uptime()})\n")
    print(f"train.iterations={args.demo_iterations}\n")
    print("| wall (s) | stages' own (s) | beyond the stages (s) | of the stages: Ray's start (s) | stages (s) "
          "| load |\n|---|---|---|---|---|---|")  # fmt: skip
    for r in range(args.repeats):
        wall, manifest = run_cli(["run", "--input", str(REPO / "data" / "T91"), "--out", str(work / f"demo_{r}"),
                                  "--preset", "demo", "--allow-random-init", "--set",
                                  f"train.iterations={args.demo_iterations}"])  # fmt: skip
        own = sum(s.get("seconds") or 0.0 for s in manifest["stages"].values())
        stages = ", ".join(f"{k} {v['seconds']:.1f}" for k, v in manifest["stages"].items() if v.get("seconds"))
        print(f"| {wall:.1f} | {own:.1f} | {wall - own:.1f} | {manifest['ray'].get('start_seconds')} | {stages} | "
              f"{uptime()} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--srdd", type=Path, help="a checkout of github.com/sunwoocho/SRDD (select and embed parts)")
    ap.add_argument("--part", choices=["select", "embed", "scaling", "tax", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=16, help="DIV2K-sized images of the select part")
    ap.add_argument("--scale-images", type=int, default=128, help="DIV2K-sized images of the scaling part")
    ap.add_argument("--scale-images-per-shard", type=int, default=8,
                    help="mine.images_per_shard of the scaling part (finer shards balance the nodes better)")
    ap.add_argument("--div2k", help="a folder of DIV2K HR PNGs (default: BSD200 tiled 4x4)")
    ap.add_argument("--demo-iterations", type=int, default=1500, help="train.iterations of the tax part's demo")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, deleted)")
    args = ap.parse_args()
    parts = ["select", "embed", "scaling", "tax"] if args.part == "all" else [args.part]
    if {"select", "embed"} & set(parts) and (args.srdd is None or not (args.srdd / "src").is_dir()):
        ap.error("--srdd: give a checkout of SRDD (its src/1_select_patches.py and src/2_cluster_clip.py)")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"# srdistill vs SRDD's released scripts\n\n{model}, {os.cpu_count()} cores; {args.repeats} repeats")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_vs_srdd_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for part in parts:
            globals()[f"part_{part}"](args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
