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

from srdistill.config import RunConfig
from srdistill.report import write_report

from conftest import T91
SOURCES = [T91 / "t1.png", T91 / "t10.png", T91 / "t11.png"]
SIZE = 32



def _patch_id(source: str, x: int, y: int, size: int) -> str:
    return hashlib.sha1(f"{source}|{x}|{y}|{size}".encode()).hexdigest()[:16]


def _stage(seconds: float, **counts) -> dict:
    return {"status": "done", "fingerprint": "f" * 16, "seconds": seconds, "counts": counts,
            "finished_at": "2025-01-01T00:00:00+00:00"}


def _write_mine(run_dir: Path) -> list[dict]:
    """Patch table: a 32x32 grid over each source, fake scores, kept = psnr_bic < 23."""
    rng = np.random.default_rng(0)
    rows = []
    for src in SOURCES:
        w, h = Image.open(src).size
        for y in range(0, h - SIZE + 1, SIZE):
            for x in range(0, w - SIZE + 1, SIZE):
                psnr = float(rng.uniform(18, 35))
                rows.append({"patch_id": _patch_id(str(src), x, y, SIZE), "source": str(src),
                             "x": x, "y": y, "size": SIZE, "img_w": w, "img_h": h,
                             "psnr_bic": psnr, "grad": float(rng.uniform(0, 60)),
                             "kept": psnr < 23.0})
    schema = pa.schema([("patch_id", pa.string()), ("source", pa.string()),
                        ("x", pa.int32()), ("y", pa.int32()), ("size", pa.int32()),
                        ("img_w", pa.int32()), ("img_h", pa.int32()),
                        ("psnr_bic", pa.float32()), ("grad", pa.float32()), ("kept", pa.bool_())])
    (run_dir / "mine").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), run_dir / "mine" / "patches.parquet")
    return rows


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
    (run_dir / "cluster").mkdir()
    clusters = [i % k for i in range(len(kept))]
    pq.write_table(pa.table({"patch_id": [p["patch_id"] for p in kept],
                             "cluster": pa.array(clusters, pa.int32()),
                             "cos_sim": pa.array(np.full(len(kept), 0.9), pa.float32())}),
                   run_dir / "cluster" / "assignments.parquet")
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
    stages = {"mine": _stage(1.5, images=3, patches=len(patches), kept=len(kept)),
              "embed": _stage(2.0, embedded=len(kept)),
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
    # stages table: done, skipped, not run, and flattened counts
    assert "| mine | done | 1.5 | images=3, patches=" in md
    assert "| select | skipped (up to date) |" in md
    assert "| train | not run |" in md
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
    assert "| embed | not run |" in md
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
