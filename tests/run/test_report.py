"""``report.write_report`` on small hand-built run directories (real T91 images as sources)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from srdistill import storage
from srdistill.config import MineConfig, RunConfig
from srdistill.distill.mining import MINED_SCHEMA, keep_rule, part_name
from srdistill.run.report import write_report

from conftest import T91
SOURCES = [T91 / "t1.png", T91 / "t10.png", T91 / "t11.png"]
SIZE = 32
#: The keep rule of the fake runs: the default ``psnr_bic < 23`` threshold.
KEEP = keep_rule(MineConfig(patch_size=SIZE, stride=SIZE, threshold=23.0))


def _patch_id(source: str, x: int, y: int, size: int) -> str:
    return hashlib.sha1(f"{source}|{x}|{y}|{size}".encode()).hexdigest()[:16]


def _stage(seconds: float, **counts) -> dict:
    return {"status": "done", "fingerprint": "f" * 16, "seconds": seconds, "counts": counts,
            "finished_at": "2025-01-01T00:00:00+00:00"}


def _write_patch_parts(run_dir: Path, rows: list[dict]) -> None:
    """The ``mine`` stage's layout: ``mine/patches/part-*.parquet`` (``MINED_SCHEMA``, one part
    per source, a skip row in the first), ``mine/keep.json`` and ``mine/skipped.parquet``."""
    mine = run_dir / "mine"
    if (mine / "patches").exists():
        storage.delete(str(mine / "patches"))
    (mine / "patches").mkdir(parents=True)
    skip = {"patch_id": "", "source": str(T91 / "broken.png"), "x": -1, "y": -1, "size": 0,
            "img_w": 0, "img_h": 0, "psnr_bic": None, "grad": None, "error": "not an image file"}
    for shard, src in enumerate(dict.fromkeys(r["source"] for r in rows)):
        part = [{k: v for k, v in r.items() if k != "kept"} | {"error": ""}
                for r in rows if r["source"] == src]
        if shard == 0:
            part.insert(1, skip)
        pq.write_table(pa.Table.from_pylist(part, schema=MINED_SCHEMA), mine / "patches" / part_name(shard))
    (mine / "keep.json").write_text(json.dumps(KEEP))
    pq.write_table(pa.table({"source": [skip["source"]], "error": [skip["error"]]}),
                   mine / "skipped.parquet")


def _write_mine(run_dir: Path) -> list[dict]:
    """Patch table: a 32x32 grid over each source, fake scores, kept = psnr_bic < 23."""
    rng = np.random.default_rng(0)
    rows = []
    for src in SOURCES:
        w, h = Image.open(src).size
        for y in range(0, h - SIZE + 1, SIZE):
            for x in range(0, w - SIZE + 1, SIZE):
                psnr = float(np.float32(rng.uniform(18, 35)))  # as stored (float32)
                rows.append({"patch_id": _patch_id(str(src), x, y, SIZE), "source": str(src),
                             "x": x, "y": y, "size": SIZE, "img_w": w, "img_h": h,
                             "psnr_bic": psnr, "grad": float(rng.uniform(0, 60)),
                             "kept": psnr < 23.0})
    _write_patch_parts(run_dir, rows)
    return rows


def _write_assignments(run_dir: Path, patch_ids: list[str], clusters: list[int],
                       cos_sim: list[float]) -> None:
    """``cluster/assignments/part-*.parquet``: the rows split over two parts."""
    table = pa.table({"patch_id": pa.array(patch_ids, pa.string()),
                      "cluster": pa.array(clusters, pa.int32()),
                      "cos_sim": pa.array(cos_sim, pa.float32())})
    out = run_dir / "cluster" / "assignments"
    out.mkdir(parents=True)
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), out / part_name(0))
    pq.write_table(table.slice(half), out / part_name(1))


def _manifest(run_dir: Path, *, semantic: bool, stages: dict) -> None:
    clip = {"backend": "transformers", "model": "openai/clip-vit-base-patch32",
            "pretrained": semantic, "semantic": semantic,
            "note": "" if semantic else "random-init CLIP: clusters are NOT semantic"}
    manifest = {
        "srdistill_version": "0.1.0",
        "created": "2025-01-01T00:00:00+00:00",
        "input": str(T91),
        "run_dir": str(run_dir),
        "preset": "tiny",
        "config": RunConfig().model_dump(mode="json"),
        "versions": {"numpy": np.__version__},
        "clip": clip,
        "stages": stages,
        "skipped_inputs": [{"file": str(T91 / "broken.png"), "reason": "not an image file"}],
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def _full_run(run_dir: Path, *, semantic: bool) -> None:
    patches = _write_mine(run_dir)
    kept = [p for p in patches if p["kept"]]
    k = 3
    clusters = [i % k for i in range(len(kept))]
    _write_assignments(run_dir, [p["patch_id"] for p in kept], clusters, [0.9] * len(kept))
    selected = []
    for c in range(k):
        members = [p for p, cl in zip(kept, clusters) if cl == c][:10]
        for rank, p in enumerate(members):
            selected.append({**p, "cluster": c, "score": p["psnr_bic"], "rank": rank})
    (run_dir / "select").mkdir()
    pq.write_table(pa.Table.from_pylist(selected), run_dir / "select" / "selected.parquet")
    (run_dir / "evaluate").mkdir()
    results = {"scale": 2, "rows": {
        "bicubic": [{"dataset": "Set5", "psnr_y": 33.66, "ssim_y": 0.92993, "n_images": 5},
                    {"dataset": "Set14", "psnr_y": 30.24, "ssim_y": 0.86881, "n_images": 14}],
        "espcn (distilled)": [
            {"dataset": "Set5", "psnr_y": 35.12, "ssim_y": 0.94012, "n_images": 5},
            {"dataset": "Set14", "psnr_y": 31.10, "ssim_y": 0.88123, "n_images": 14}],
    }}
    (run_dir / "evaluate" / "results.json").write_text(json.dumps(results))
    stages = {"mine": _stage(1.5, images_mined=3, patches=len(patches), patches_kept=len(kept)),
              "embed": _stage(2.0, patches=len(kept), dim=512),
              "cluster": _stage(0.3, k=k),
              "select": {**_stage(0.1, selected=len(selected), ipc=10), "status": "skipped"},
              "evaluate": _stage(4.0, datasets=2)}
    _manifest(run_dir, semantic=semantic, stages=stages)


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def test_full_report(tmp_path):
    _full_run(tmp_path, semantic=False)
    path = write_report(tmp_path)
    assert path == tmp_path / "report" / "report.md"
    md = path.read_text()
    for heading in ("# srdistill run report", "## Stages", "## Skipped inputs",
                    "## Patch scores", "## Clusters", "## Selection", "## PSNR / SSIM"):
        assert heading in md
    assert "not semantic" in md.lower()
    assert "config preset: `tiny`" in md
    # stages table: done, skipped, not reached, disabled, and counts in short columns
    n_patches = json.loads((tmp_path / "manifest.json").read_text())["stages"]["mine"]["counts"]["patches"]
    assert f"| mine | done | 1.5 | 3 images | {n_patches} patches, 18 kept |  |" in md
    assert "| embed | done | 2.0 | 18 patches | 512-d embeddings |" in md
    assert "| select | skipped (up to date) | 0.1 |  | 18 selected |" in md
    assert "| train | not reached |  |  |  |  |" in md
    assert "| complexity | disabled |" in md and "| finetune | disabled |" in md
    assert "broken.png" in md and "not an image file" in md
    # PSNR table: cells with 2 / 4 decimals and the mean gain over bicubic
    assert "| bicubic | 33.66 / 0.9299 | 30.24 / 0.8688 | +0.00 |" in md
    gain = ((35.12 - 33.66) + (31.10 - 30.24)) / 2
    assert f"| espcn (distilled) | 35.12 / 0.9401 | 31.10 / 0.8812 | +{gain:.2f} |" in md
    assert "method: `clip-kmeans`" in md
    assert "![patch scores](scores.png)" in md and "(clusters.png)" in md
    _assert_png(tmp_path / "report" / "scores.png")
    _assert_png(tmp_path / "report" / "clusters.png")
    assert not list((tmp_path / "report").glob(".*tmp"))


def test_no_warning_when_semantic(tmp_path):
    _full_run(tmp_path, semantic=True)
    md = write_report(tmp_path).read_text()
    assert "not semantic" not in md.lower()


def test_report_after_mine_only(tmp_path):
    patches = _write_mine(tmp_path)
    _manifest(tmp_path, semantic=True, stages={"mine": _stage(1.0, patches=len(patches))})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["clip"]
    manifest["skipped_inputs"] = []
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    md = write_report(tmp_path).read_text()
    assert "## Skipped inputs\n\nnone" in md
    assert "| embed | not reached |" in md
    assert "the `select` stage has not run" in md
    assert "the `evaluate` stage has not run" in md
    _assert_png(tmp_path / "report" / "scores.png")
    assert not (tmp_path / "report" / "clusters.png").exists()


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        write_report(tmp_path)


def test_selection_without_cluster_or_geometry(tmp_path):
    """A baseline selection (patch_id, score, rank only) gets geometry and clusters by lookup."""
    _full_run(tmp_path, semantic=True)
    path = tmp_path / "select" / "selected.parquet"
    pq.write_table(pq.read_table(path, columns=["patch_id", "score", "rank"]), path)
    md = write_report(tmp_path).read_text()
    assert "| total | 18 | 18 |" in md
    _assert_png(tmp_path / "report" / "clusters.png")


# --------------------------------------------------------------------------- synth runs

from srdistill.run.report.figures import (GRID_HEADER, GRID_LEFT, GRID_PAD, GRID_TOP, THUMB,  # noqa: E402
                                          _grid_size)
from srdistill.run.report.sections import SYNTH_PER_SIDE, _top_patches  # noqa: E402
from srdistill.sr import imaging  # noqa: E402

#: Synthesized images per cluster in the fake synth run, and each cluster's solid colour.
SYNTH_COUNTS = {0: 5, 1: 2, 2: 4}
SYNTH_COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}
MISSING = str(T91 / "gone.png")


def _synth_run(run_dir: Path, *, kind: str = "dit", synthesized: bool = True,
               log: bool = True) -> list[dict]:
    """A hand-built ``distill: synth`` run: mine, cluster (cos_sim varying), encode, finetune
    (backbone.json, log.jsonl) and, if ``synthesized``, synthesize (solid-colour PNGs per
    cluster, provenance.csv, synthesis.json). Cluster 2's two best patches come from a missing
    source. Returns the assignment rows."""
    patches = _write_mine(run_dir)
    kept = [p for p in patches if p["kept"]]
    k = 3
    rng = np.random.default_rng(1)
    assign = [{"patch_id": p["patch_id"], "cluster": i % k, "cos_sim": float(rng.uniform(0, 0.8))}
              for i, p in enumerate(kept)]
    for c in range(k):  # two clear winners per cluster
        members = [a for a in assign if a["cluster"] == c]
        members[-1]["cos_sim"], members[-2]["cos_sim"] = 0.99, 0.95
    if synthesized:
        best2 = {a["patch_id"] for a in assign if a["cluster"] == 2 and a["cos_sim"] > 0.9}
        _write_patch_parts(run_dir, [{**p, "source": MISSING} if p["patch_id"] in best2 else p
                                     for p in patches])
    _write_assignments(run_dir, [a["patch_id"] for a in assign], [a["cluster"] for a in assign],
                       [a["cos_sim"] for a in assign])

    if kind == "dit":
        source = {"dit_path": "/models/DiT-XL-2-256", "vae_path": "/models/DiT-XL-2-256/vae",
                  "parameters": 675_129_632, "trainable": 1_234_567}
        trainable, workers = "difffit", 2
    else:
        source = {"init": "random (trained from scratch)", "parameters": 1_500_000,
                  "trainable": 1_500_000}
        trainable, workers = "full", 0
    model_dir = run_dir / "finetune" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "backbone.json").write_text(json.dumps(
        {"kind": kind, "num_clusters": k, "resolution": SIZE, "trainable": trainable,
         "source": source}))
    if log:
        (run_dir / "finetune" / "log.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 1.0 / s, "simple": 0.8 / s, "pos": 0.1, "neg": 0.1,
                        "images_per_s": 100.0, "elapsed_s": s / 10}) + "\n"
            for s in (10, 20, 30, 40)))
    stages = {"mine": _stage(1.5, images=3, patches=len(patches), kept=len(kept),
                             corpus_pixels=100_000),
              "embed": _stage(2.0, embedded=len(kept)),
              "cluster": _stage(0.3, k=k, k_used=k),
              "encode": _stage(0.5, backbone=kind, patches=len(kept)),
              "finetune": _stage(9.0, backbone=kind, trainable=trainable,
                                 parameters=source["parameters"],
                                 trainable_parameters=source["trainable"], num_clusters=k,
                                 patches=len(kept), iterations=40, workers=workers,
                                 deepspeed=bool(workers), final_loss=0.025, source=source)}
    if synthesized:
        sdir = run_dir / "synthesize"
        sdir.mkdir()
        lines = ["file,cluster,index,seed,sampler,steps,guidance_scale"]
        for c, n in SYNTH_COUNTS.items():
            for i in range(n):
                name = f"c{c:03d}_i{i:04d}.png"
                Image.new("RGB", (SIZE, SIZE), SYNTH_COLOURS[c]).save(sdir / name)
                lines.append(f"{name},{c},{i},{1000 * c + i},ddim,50,4.0")
        (sdir / "provenance.csv").write_text("\n".join(lines) + "\n")
        n_images = sum(SYNTH_COUNTS.values())
        (sdir / "synthesis.json").write_text(json.dumps(
            {"backbone": kind, "num_clusters": k, "resolution": SIZE, "sampler": "ddim",
             "steps": 50, "guidance_scale": 4.0, "images": n_images}))
        stages["synthesize"] = _stage(3.0, images=n_images, resolution=SIZE, sampler="ddim",
                                      steps=50, guidance_scale=4.0, pixel_fraction=0.11264)
    _manifest(run_dir, semantic=True, stages=stages)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["config"]["distill"] = "synth"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return assign


def _cell_centre(row: int, col: int) -> tuple[int, int]:
    """(x, y) in synthesis.png of the centre of thumbnail (row, col)."""
    cell = THUMB + GRID_PAD
    x = GRID_LEFT + GRID_PAD + col * cell + (THUMB // 2 if col >= SYNTH_PER_SIDE else 0)
    y = GRID_TOP + GRID_HEADER + GRID_PAD + row * cell
    return x + THUMB // 2, y + THUMB // 2


def test_synth_report(tmp_path):
    _synth_run(tmp_path)
    md = write_report(tmp_path).read_text()
    assert "## Synthesis" in md and "## Selection" not in md
    assert "the `select` stage has not run" not in md
    assert "A `synth` run has no `select` stage" in md
    assert "| select | disabled |" in md and "| finetune | done | 9.0 |" in md
    assert ("- backbone: `dit` (pretrained DiT from `/models/DiT-XL-2-256`, VAE "
            "`/models/DiT-XL-2-256/vae`), trainable `difffit`: 1,234,567 of 675,129,632 "
            "parameters trainable (0.18%)") in md
    assert "- fine-tuning: 40 iterations on" in md
    assert "2 Ray Train worker(s), DeepSpeed; final loss 0.0250" in md
    assert "- sampler: `ddim`, 50 steps, guidance scale 4.0" in md
    assert f"- synthesized: 11 images of {SIZE}x{SIZE}, pixel fraction 0.11264" in md
    assert "![real patches | synthesized, per cluster](synthesis.png)" in md
    assert "| 0 | " in md and "| total | " in md and "| 11 |" in md
    assert "![fine-tuning loss](finetune_loss.png)" in md
    assert not (tmp_path / "report" / "clusters.png").exists()
    _assert_png(tmp_path / "report" / "finetune_loss.png")

    path = tmp_path / "report" / "synthesis.png"
    _assert_png(path)
    with Image.open(path) as im:
        assert im.size == _grid_size(3, 2 * SYNTH_PER_SIDE, gap_after=SYNTH_PER_SIDE, headers=True)
        px = np.asarray(im.convert("RGB"))
    for row, (c, n) in enumerate(SYNTH_COUNTS.items()):
        for j in range(SYNTH_PER_SIDE):  # synthesized half: the cluster's colour, then blank
            x, y = _cell_centre(row, SYNTH_PER_SIDE + j)
            want = SYNTH_COLOURS[c] if j < n else (255, 255, 255)
            assert tuple(px[y, x]) == want, (row, j)
    # the gap between the halves is blank but for a grey rule
    x_gap = _cell_centre(0, SYNTH_PER_SIDE)[0] - THUMB // 2 - GRID_PAD - THUMB // 4
    assert tuple(px[_cell_centre(0, 0)[1], x_gap]) == (255, 255, 255)
    # real half: cluster 0's best patch, cropped from its source; cluster 2's two best grey
    top = _top_patches(tmp_path, [0, 1, 2], SYNTH_PER_SIDE)
    best = top[0][0]
    patch = imaging.crop(imaging.read_image(best["source"]), best["x"], best["y"], best["size"])
    thumb = np.asarray(Image.fromarray(patch).resize((THUMB, THUMB), Image.Resampling.BICUBIC))
    x, y = _cell_centre(0, 0)
    x0, y0 = x - THUMB // 2, y - THUMB // 2
    assert np.array_equal(px[y0 : y0 + THUMB, x0 : x0 + THUMB], thumb)
    for col in range(SYNTH_PER_SIDE):
        x, y = _cell_centre(2, col)
        assert (tuple(px[y, x]) == (200, 200, 200)) == (col < 2), col


def test_top_patches_by_cos_sim(tmp_path):
    assign = _synth_run(tmp_path)
    top = _top_patches(tmp_path, [0, 2], 3)
    assert sorted(top) == [0, 2]
    for c in (0, 2):
        want = sorted((a for a in assign if a["cluster"] == c), key=lambda a: -a["cos_sim"])[:3]
        assert [r["patch_id"] for r in top[c]] == [a["patch_id"] for a in want]
        assert all({"source", "x", "y", "size"} <= set(r) for r in top[c])


def test_synth_report_unet_no_log(tmp_path):
    _synth_run(tmp_path, kind="unet", log=False)
    md = write_report(tmp_path).read_text()
    assert "- backbone: `unet` (UNet trained from scratch), trainable `full`" in md
    assert "in-process PyTorch (no DeepSpeed)" in md
    assert "finetune_loss.png" not in md
    assert not (tmp_path / "report" / "finetune_loss.png").exists()
    _assert_png(tmp_path / "report" / "synthesis.png")


def test_synth_report_before_synthesize(tmp_path):
    _synth_run(tmp_path, synthesized=False)
    md = write_report(tmp_path).read_text()
    assert "## Synthesis\n\nNot available: the `synthesize` stage has not run.\n" in md
    assert "| synthesize | not reached |" in md
    assert "## Selection" not in md and "the `select` stage has not run" not in md
    assert "once `synthesize` has run" in md
    assert not (tmp_path / "report" / "synthesis.png").exists()
    assert not (tmp_path / "report" / "clusters.png").exists()


def test_coreset_report_has_no_synthesis(tmp_path):
    _full_run(tmp_path, semantic=True)
    md = write_report(tmp_path).read_text()
    assert "## Synthesis" not in md and "synthesize` stage" not in md
    assert "## Selection" in md and "![random members | selected patches, per cluster](clusters.png)" in md
    assert "| encode | disabled |" in md
    assert not (tmp_path / "report" / "synthesis.png").exists()
    assert not (tmp_path / "report" / "finetune_loss.png").exists()
    with Image.open(tmp_path / "report" / "clusters.png") as im:  # 4 random members | 4 selected
        assert im.size == _grid_size(3, 8, gap_after=4, headers=True, captions=True)


def test_skipped_inputs_beyond_the_manifest_list(tmp_path):
    """The manifest lists the first skipped inputs only; the total comes from the mine counts."""
    _full_run(tmp_path, semantic=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["stages"]["mine"]["counts"]["images_skipped"] = 1234
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    md = write_report(tmp_path).read_text()
    assert "## Skipped inputs (1234)\n\n1234 skipped (first 1 listed; all in mine/skipped.parquet)" in md
    assert "broken.png" in md

    manifest["stages"]["mine"]["counts"]["images_skipped"] = 1  # all listed: no note
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    md = write_report(tmp_path).read_text()
    assert "## Skipped inputs (1)\n\n| file | reason |" in md and "first 1 listed" not in md


def _without_date(md: str) -> str:
    return "\n".join(line for line in md.splitlines() if not line.startswith(("- report date:", "- run dir:")))


def _move_tables(run_dir: Path, dest: str) -> None:
    """Move the partitioned tables (``mine/``, ``cluster/``) of ``run_dir`` to ``dest``."""
    for sub in ("mine", "cluster"):
        storage.copy_dir(str(run_dir / sub), storage.join(dest, sub))
        storage.delete(str(run_dir / sub))


@pytest.mark.parametrize("synth", [False, True])
def test_tables_at_run_uri(tmp_path, synth):
    """The big tables may live only at ``run_uri``: the same report as with them in ``run_dir``."""
    here, there = tmp_path / "here", tmp_path / "there"
    for d in (here, there):
        d.mkdir()
        _synth_run(d) if synth else _full_run(d, semantic=True)
    want = _without_date(write_report(here).read_text())
    _move_tables(there, str(tmp_path / "remote"))
    assert not (there / "mine").exists()
    assert "the `mine` stage has not run" in write_report(there).read_text()
    assert _without_date(write_report(there, str(tmp_path / "remote")).read_text()) == want
    for png in ("scores.png", "synthesis.png" if synth else "clusters.png"):
        assert np.array_equal(np.asarray(Image.open(here / "report" / png)),
                              np.asarray(Image.open(there / "report" / png)))


def test_tables_on_s3(tmp_path, s3_server):
    import uuid

    _synth_run(tmp_path)
    want = _without_date(write_report(tmp_path).read_text())
    uri = s3_server.uri(f"run-{uuid.uuid4().hex[:8]}")
    _move_tables(tmp_path, uri)
    assert _without_date(write_report(tmp_path, uri).read_text()) == want


def test_mine_without_parts_is_an_empty_table(tmp_path):
    """A finished ``mine`` stage over a corpus without a single shard: keep.json, no parts."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.json").write_text(json.dumps(KEEP))
    _manifest(tmp_path, semantic=True, stages={"mine": _stage(0.1, patches=0)})
    md = write_report(tmp_path).read_text()
    assert "The patch table is empty" in md


# --------------------------------------------------------------------------- a real tiny run

import base64  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from conftest import copy_t91, encoded_set  # noqa: E402
from srdistill.config import FinetuneConfig, TrainConfig, load_config  # noqa: E402
from srdistill.distill import diffusion as D  # noqa: E402
from srdistill.run.pipeline import run_pipeline  # noqa: E402
from srdistill.run.report import markdown_to_html  # noqa: E402
from srdistill.run.report.figures import CROP_MARGIN, _busiest_window  # noqa: E402
from srdistill.run.report.sections import CROPS_PER_SET  # noqa: E402
from srdistill.sr.training import train_sr  # noqa: E402

TINY = ["embed.allow_random_init=true", "train.val_every=10"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_local):
    """A whole ``tiny`` pipeline run (clip-kmeans, ESPCN 20 steps validated every 10, Set5) on
    five real T91 images: ``(run_dir, cfg, manifest)``."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config("tiny", overrides=TINY)
    manifest = run_pipeline(copy_t91(root / "in", 5), root / "run", cfg, preset="tiny", log=lambda s: None)
    return root / "run", cfg, manifest


def _md_table_rows(md: str, heading: str) -> list[str]:
    """The table lines of the section that starts with ``heading``."""
    section = md.split(heading, 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")]


@pytest.mark.slow
def test_report_of_a_real_run(tiny_run):
    run_dir, cfg, manifest = tiny_run
    report = run_dir / "report"
    md = (report / "report.md").read_text()
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    label = "espcn (clip-kmeans)"
    (bic,), (model,) = results["rows"]["bicubic"], results["rows"][label]

    # stage states: every stage of a clip-kmeans run done, the others disabled; short cells
    for stage in ("plan", "mine", "embed", "cluster", "select", "train", "evaluate"):
        assert re.search(rf"^\| {stage} \| done \| \d+\.\d \|", md, re.M), stage
    for stage in ("complexity", "align", "encode", "finetune", "synthesize"):
        assert f"| {stage} | disabled |  |  |  |  |" in md
    n_sel = manifest["stages"]["select"]["counts"]["selected"]
    assert f"| {n_sel} selected | `clip-kmeans`; pixel fraction" in md
    assert all(len(line) < 160 for line in _md_table_rows(md, "## Stages"))

    # per-image PSNR / SSIM: exactly the rows of results.json, in its order
    base = {r["name"]: r for r in bic["per_image"]}
    want = [f"| {r['name']} | {base[r['name']]['psnr_y']:.2f} / {base[r['name']]['ssim_y']:.4f} | "
            f"{r['psnr_y']:.2f} / {r['ssim_y']:.4f} | {r['psnr_y'] - base[r['name']]['psnr_y']:+.2f} |"
            for r in model["per_image"]]
    assert _md_table_rows(md, "## Set5: bicubic vs")[1:] == want  # after the header

    # crops of the images where the model differs most from bicubic, one row each
    assert "![Set5: HR / bicubic / model crops](crops_Set5.png)" in md
    _assert_png(report / "crops_Set5.png")
    gains = sorted(model["per_image"], key=lambda r: -abs(r["psnr_y"] - base[r["name"]]["psnr_y"]))
    where = re.search(r"top-left corner: (.*?)\)\. ", md).group(1) + ")"
    shown = re.findall(r"(\w+) \((\d+), (\d+)\)", where)
    assert [name for name, _, _ in shown] == [r["name"] for r in gains[:CROPS_PER_SET]]
    for _, x, y in shown:  # clear of the image edge
        assert int(x) >= CROP_MARGIN and int(y) >= CROP_MARGIN
    with Image.open(report / "crops_Set5.png") as im:
        w, h = im.size
    assert w > 800 and CROPS_PER_SET * 200 < h < CROPS_PER_SET * 300

    # training curves: loss and validation PSNR from train/log.jsonl
    log = [json.loads(x) for x in (run_dir / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20]
    assert "![training loss and validation PSNR](curves.png)" in md
    assert (f"validation PSNR on Set5 (Y): {log[-1]['val_psnr_y']:.2f} dB at step 20") in md
    assert f"bicubic {bic['psnr_y']:.2f} dB" in md
    _assert_png(report / "curves.png")
    with Image.open(report / "curves.png") as im:
        assert im.size == (1100, 360)  # two panels: loss | validation PSNR
    assert not (run_dir / "train" / "tensorboard").exists()  # train.tensorboard is off

    # the selection: random members | selected, with captions
    assert "![random members | selected patches, per cluster](clusters.png)" in md
    _assert_png(report / "clusters.png")


@pytest.mark.slow
def test_html_report_is_self_contained(tiny_run):
    run_dir, _, _ = tiny_run
    page = (run_dir / "report" / "report.html").read_text()
    md = (run_dir / "report" / "report.md").read_text()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert "<h2>Stages</h2>" in page and "<td>disabled</td>" in page and "<th>state</th>" in page
    assert not re.search(r"""(?:href|src)\s*=\s*["'](?!data:)""", page), "a link to another file"
    assert "<link" not in page and "<script" not in page and "url(" not in page
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    files = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == len(files) == page.count("<img ") >= 4
    for (_, data), name in zip(images, files):
        assert base64.b64decode(data) == (run_dir / "report" / name).read_bytes(), name


def test_markdown_to_html_escapes_and_inlines(tmp_path):
    Image.new("RGB", (4, 3), (255, 0, 0)).save(tmp_path / "a.png")
    md = ("# T <x>\n\n- a `b|c` **d**\n- e\n\n> **W** & z\n\n| h1 | h2 |\n|---|---|\n| a \\| b | `c` |\n\n"
          "![pic](a.png)\n\n![gone](nope.png) and ![up](../a.png)")
    page = markdown_to_html(md, tmp_path, title="t")
    assert "<h1>T &lt;x&gt;</h1>" in page
    assert "<ul><li>a <code>b|c</code> <strong>d</strong></li><li>e</li></ul>" in page
    assert "<blockquote><strong>W</strong> &amp; z</blockquote>" in page
    assert "<tr><td>a | b</td><td><code>c</code></td></tr>" in page and "<th>h1</th>" in page
    data = base64.b64encode((tmp_path / "a.png").read_bytes()).decode()
    assert f'<img alt="pic" src="data:image/png;base64,{data}">' in page
    assert "nope.png missing" in page and "../a.png missing" in page and page.count("<img") == 1


@pytest.mark.slow
def test_run_dir_provenance(tiny_run):
    run_dir, cfg, manifest = tiny_run
    assert load_config(config_file=run_dir / "config.yaml") == cfg  # the resolved config round-trips
    on_disk = json.loads((run_dir / "manifest.json").read_text())
    assert on_disk["config"] == cfg.model_dump(mode="json")
    for name in ("srdistill", "torch", "ray", "diffusers", "transformers", "faiss", "numpy"):
        assert on_disk["versions"][name] not in ("", None), name
    assert on_disk["versions"]["numpy"] == np.__version__
    package = Path(__import__("srdistill").__file__).resolve().parent
    try:
        top, head = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"],
                                   capture_output=True, text=True, check=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        top = head = None
    if top is not None and (Path(top) / "srdistill").resolve() == package:
        assert on_disk["git_commit"] == head and isinstance(on_disk["git_dirty"], bool)
    else:
        assert on_disk["git_commit"] is None
    md = (run_dir / "report" / "report.md").read_text()
    assert "- versions: torch " in md and "resolved config: `config.yaml`" in md
    assert ("- git commit: `" in md) == bool(on_disk["git_commit"])


@pytest.mark.slow
def test_stages_not_reached_with_until(tmp_path, ray_local):
    cfg = load_config("tiny", overrides=TINY)
    run_pipeline(copy_t91(tmp_path / "in", 3), tmp_path / "run", cfg, until="mine", log=lambda s: None)
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert re.search(r"^\| mine \| done \| [\d.]+ \| 3 images \| \d+ patches, \d+ kept \|", md, re.M)
    for stage in ("embed", "cluster", "select", "train", "evaluate"):
        assert f"| {stage} | not reached |  |  |  |  |" in md
    for stage in ("complexity", "align", "encode", "finetune", "synthesize"):
        assert f"| {stage} | disabled |" in md
    assert "the `train` stage has not run" in md and "the `evaluate` stage has not run" in md
    assert (tmp_path / "run" / "report" / "report.html").is_file()
    assert not list((tmp_path / "run" / "report").glob("crops_*.png"))


def test_busiest_window():
    diff = np.zeros((100, 120), np.float32)
    diff[40:60, 70:90] = 1.0  # the hot spot
    diff[:, :3] = 50.0  # the border, which PSNR ignores
    x, y, side = _busiest_window(diff, 20, border=4, step=1)
    assert (x, y, side) == (70, 40, 20)
    assert _busiest_window(diff, 500, border=4)[2] == 92  # at most the image inside the border
    assert _busiest_window(np.ones((5, 5)), 96, border=0) == (0, 0, 5)


# --------------------------------------------------------------------------- TensorBoard

def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _train_cfg(**kw) -> TrainConfig:
    return TrainConfig(model="espcn", iterations=4, batch_size=2, lr_patch=8, log_every=2, checkpoint_every=2, **kw)


def test_train_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train_sr(_train_cfg(tensorboard=True, val_every=4), 2, SOURCES[:2], tmp_path, progress=False)
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    got = _scalars(tmp_path / "tensorboard", "train/loss")
    assert [s for s, _ in got] == [2, 4]
    assert np.allclose([v for _, v in got], [r["loss"] for r in log], rtol=1e-6)
    (val,) = _scalars(tmp_path / "tensorboard", "train/val_psnr_y")
    assert val[0] == 4 and val[1] == pytest.approx(log[-1]["val_psnr_y"], rel=1e-6)


def test_finetune_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = FinetuneConfig(resolution=16, unet_channels=(16, 32), iterations=3, batch_size=2, log_every=1,
                         checkpoint_every=3, tensorboard=True)  # fmt: skip
    D.finetune(cfg, D.build_backbone(cfg, 3), encoded_set(tmp_path), tmp_path / "ft", progress=False)
    log = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    for tag in ("loss", "simple", "images_per_s"):
        got = _scalars(tmp_path / "ft" / "tensorboard", f"finetune/{tag}")
        assert [s for s, _ in got] == [1, 2, 3]
        assert np.allclose([v for _, v in got], [r[tag] for r in log], rtol=1e-6)


def test_tensorboard_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the package
    with pytest.raises(ImportError, match=r"train\.tensorboard: true needs the tensorboard package.*pip install"):
        train_sr(_train_cfg(tensorboard=True), 2, SOURCES[:2], tmp_path / "a", progress=False)
    train_sr(_train_cfg(), 2, SOURCES[:2], tmp_path / "b", progress=False)  # off: no tensorboard needed
    assert (tmp_path / "b" / "model.safetensors").is_file() and not (tmp_path / "b" / "tensorboard").exists()
    cfg = FinetuneConfig(resolution=16, unet_channels=(16, 32), iterations=1, batch_size=2, tensorboard=True)
    with pytest.raises(ImportError, match=r"finetune\.tensorboard: true .*pip install tensorboard"):
        D.finetune(cfg, D.build_backbone(cfg, 3), encoded_set(tmp_path), tmp_path / "ft", progress=False)
    # the pipeline says so before it starts Ray or writes the run directory
    cfg = load_config("tiny", overrides=[*TINY, "train.tensorboard=true"])
    with pytest.raises(ImportError, match=r"train\.tensorboard: true .*pip install tensorboard"):
        run_pipeline(copy_t91(tmp_path / "in", 1), tmp_path / "run", cfg, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_tensorboard_does_not_change_the_fingerprints():
    """``tensorboard`` only adds event files: switching it on retrains nothing."""
    from srdistill.run.rundir import stage_config

    on = load_config("tiny", overrides=["train.tensorboard=true", "finetune.tensorboard=true"])
    for stage in ("train", "finetune"):
        assert stage_config(on, stage) == stage_config(load_config("tiny"), stage)


@pytest.mark.slow
def test_ray_train_tensorboard_event_files_survive_resume(tmp_path, ray_local):
    """Under Ray Train (2 workers) rank 0's event files travel in the checkpoint: the stage
    folder gets them, and a resumed run keeps the steps before the resume."""
    pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from srdistill.run import runner

    cfg = dict(model="espcn", batch_size=4, lr_patch=8, workers=2, log_every=1, checkpoint_every=2, tensorboard=True)
    runner.train_ray(TrainConfig(iterations=2, **cfg), 2, SOURCES, tmp_path)
    runner.train_ray(TrainConfig(iterations=4, **cfg), 2, SOURCES, tmp_path)  # resumes at step 2
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if "loss" in x]
    got = _scalars(tmp_path / "tensorboard", "train/loss")
    assert [s for s, _ in got] == [1, 2, 3, 4] == [r["step"] for r in log]
    assert np.allclose([v for _, v in got], [r["loss"] for r in log], rtol=1e-6)
