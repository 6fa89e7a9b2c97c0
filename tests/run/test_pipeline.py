"""Whole-pipeline tests on real images with a real local Ray and a tiny random-init CLIP."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from srdistill import storage
from srdistill.cli import app
from srdistill.config import load_config
from srdistill.distill.embedding import MissingWeightsError
from srdistill.distill.mining import read_patches
from srdistill.run.pipeline import NOT_SEMANTIC, run_pipeline

from conftest import T91

pytestmark = pytest.mark.slow

BAD = {  # file -> words its skip reason must contain
    "corrupt.png": "truncated",
    "text.png": "not an image",
    "one_pixel.png": "too small",
    "huge.png": "too large",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Five real T91 images, a 16-bit and a grayscale copy, and the bad inputs of BAD."""
    root = tmp_path_factory.mktemp("corpus")
    t91 = sorted(T91.glob("*.png"))
    for f in t91[:5]:
        shutil.copy(f, root / f.name)
    rgb = np.asarray(Image.open(t91[5]).convert("RGB"))
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(root / "sixteen_bit.png")
    Image.fromarray(rgb[..., 0]).save(root / "grayscale.png")
    good = (root / t91[0].name).read_bytes()
    (root / "corrupt.png").write_bytes(good[: len(good) // 3])
    (root / "text.png").write_text("this is not an image\n")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(root / "one_pixel.png")
    Image.fromarray(np.zeros((16, 10_001), np.uint8)).save(root / "huge.png")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


def _tiny(**over):
    return load_config("tiny", overrides=[f"{k}={v}" for k, v in {"embed.allow_random_init": "true", **over}.items()])


def test_whole_pipeline_on_real_images_with_bad_inputs(corpus, tmp_path, ray_local):
    run_dir = tmp_path / "run"
    manifest = run_pipeline(corpus, run_dir, _tiny(), preset="tiny", log=lambda s: None)

    skipped = {p["file"].rsplit("/", 1)[-1]: p["reason"] for p in manifest["skipped_inputs"]}
    assert set(skipped) == set(BAD)
    for name, words in BAD.items():
        assert words in skipped[name], (name, skipped[name])
    mine = manifest["stages"]["mine"]["counts"]
    assert mine["images_listed"] == 11 and mine["other_files_ignored"] == 1
    assert mine["images_mined"] == 7 and mine["images_skipped"] == 4

    patches = read_patches(str(run_dir / "mine"))
    sources = {s.rsplit("/", 1)[-1] for s in patches.column("source").to_pylist()}
    assert {"sixteen_bit.png", "grayscale.png"} <= sources  # read, not skipped
    assert len(set(patches.column("patch_id").to_pylist())) == patches.num_rows

    emb = storage.read_dataset(run_dir / "embed" / "parts")
    vec = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    assert np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    assert emb.num_rows == int(np.sum(patches.column("kept").to_numpy(zero_copy_only=False)))

    selected = pq.read_table(run_dir / "select" / "selected.parquet")
    k_used = manifest["stages"]["cluster"]["counts"]["k_used"]
    assert selected.num_rows == 2 * k_used  # IPC 2
    pngs = sorted((run_dir / "distilled").glob("*.png"))
    assert len(pngs) == selected.num_rows
    assert Image.open(pngs[0]).size == (64, 64)
    provenance = (run_dir / "distilled" / "provenance.csv").read_text()
    assert "source" in provenance.splitlines()[0] and str(corpus) in provenance

    assert (run_dir / "train" / "model.safetensors").is_file()
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    assert results["rows"]["bicubic"][0]["psnr_y"] == pytest.approx(33.67, abs=0.01)
    model_row = results["rows"]["espcn (clip-kmeans)"][0]
    assert 20 < model_row["psnr_y"] < 45 and model_row["n_images"] == 5

    assert manifest["clip"]["semantic"] is False
    assert manifest["versions"]["torch"].startswith("2.13")
    assert manifest["config"]["cluster"]["k"] == 3
    assert all(manifest["stages"][s]["status"] == "done" for s in ("plan", "mine", "embed", "cluster", "select", "train", "evaluate"))
    report = (run_dir / "report" / "report.md").read_text()
    assert "not semantic" in report.lower()


def test_resume_after_mining_mines_nothing_twice(corpus, tmp_path, ray_local):
    run_dir = tmp_path / "run"
    cfg = _tiny()
    first = run_pipeline(corpus, run_dir, cfg, until="mine", log=lambda s: None)
    assert set(first["stages"]) == {"plan", "mine", "report"}
    before = read_patches(str(run_dir / "mine"))
    parts = sorted((run_dir / "mine" / "patches").glob("part-*.parquet"))
    mtimes = [p.stat().st_mtime_ns for p in parts]

    lines: list[str] = []
    second = run_pipeline(corpus, run_dir, cfg, log=lines.append)
    assert "[mine] up to date, skipped" in "\n".join(lines[:3])
    assert second["stages"]["mine"]["skipped"] is True
    assert [p.stat().st_mtime_ns for p in parts] == mtimes
    after = read_patches(str(run_dir / "mine"))
    assert after.equals(before)
    ids = after.column("patch_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert second["stages"]["evaluate"]["status"] == "done"

    # a third run redoes nothing; a changed selection budget reruns select and what follows
    third = run_pipeline(corpus, run_dir, cfg, log=lambda s: None)
    assert all(third["stages"][s]["skipped"] for s in ("mine", "embed", "cluster", "select", "train", "evaluate"))
    fourth = run_pipeline(corpus, run_dir, _tiny(**{"select.ipc": 1}), log=lambda s: None)
    assert fourth["stages"]["cluster"]["skipped"] is True
    assert fourth["stages"]["select"]["skipped"] is False and fourth["stages"]["train"]["skipped"] is False
    assert len(list((run_dir / "distilled").glob("*.png"))) == fourth["stages"]["cluster"]["counts"]["k_used"]


def test_random_baseline_skips_clip(corpus, tmp_path, ray_local):
    cfg = load_config("tiny", overrides=["select.method=random"])  # no CLIP weights needed
    manifest = run_pipeline(corpus, tmp_path / "run", cfg, log=lambda s: None)
    assert "embed" not in manifest["stages"] and "clip" not in manifest
    assert manifest["stages"]["select"]["counts"]["selected"] == 2 * 3


def test_missing_clip_weights_stop_with_clear_message(corpus, tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    with pytest.raises(MissingWeightsError, match="allow-random-init"):
        run_pipeline(corpus, tmp_path / "run", load_config("tiny"), log=lambda s: None)
    assert not (tmp_path / "run").exists()  # stopped before mining anything
    result = CliRunner().invoke(app, ["run", "--input", str(corpus), "--out", str(tmp_path / "r2"), "--preset", "tiny"])
    assert result.exit_code == 2
    assert "allow-random-init" in result.output


def test_cli_run_prints_table_and_warning(corpus, tmp_path, ray_local):
    result = CliRunner().invoke(app, ["run", "--input", str(corpus), "--out", str(tmp_path / "run"),
                                      "--preset", "tiny", "--allow-random-init"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| bicubic | 33.67" in result.output
    assert NOT_SEMANTIC in result.output
    ckpt = tmp_path / "run" / "train" / "model.safetensors"
    ev = CliRunner().invoke(app, ["eval", "--model", str(ckpt), "--dataset", "Set5", "--scale", "2", "--json"])
    assert ev.exit_code == 0, ev.output
    row = json.loads(ev.output.strip().splitlines()[-1])
    assert row["dataset"] == "Set5" and 20 < row["psnr_y"] < 45 and 0 < row["ssim_y"] <= 1


def test_cli_errors_name_the_bad_input(tmp_path):
    r = CliRunner().invoke(app, ["eval", "--dataset", str(tmp_path / "nowhere"), "--scale", "2"])
    assert r.exit_code == 2 and "nowhere" in r.output
    r = CliRunner().invoke(app, ["run", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "nope"])
    assert r.exit_code == 2 and "nope" in r.output


def test_ray_jobs_entrypoint_runs_the_pipeline(corpus, tmp_path):
    """``python ray_jobs/distill.py`` (what ``ray job submit`` runs) on the embedded default."""
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "ray_jobs" / "distill.py"), "--input", str(corpus), "--out", str(out),
         "--preset", "tiny", "--allow-random-init", "--until", "select"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["select"]["status"] == "done" and "train" not in manifest["stages"]
    assert "mine: 100%" in proc.stderr  # the stage progress bar


def test_cli_train_then_eval(tmp_path):
    """``srdistill train`` on a folder of HR images writes a checkpoint that ``eval`` reads."""
    from conftest import T91

    data = tmp_path / "hr"
    data.mkdir()
    for f in sorted(T91.glob("*.png"))[:3]:
        shutil.copy(f, data / f.name)
    out = tmp_path / "model"
    r = CliRunner().invoke(app, ["train", "--input", str(data), "--out", str(out), "--preset", "tiny",
                                 "--iterations", "5", "--scale", "3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file() and len((out / "log.jsonl").read_text().splitlines()) >= 1
    ev = CliRunner().invoke(app, ["eval", "--model", str(out / "model.safetensors"), "--dataset", "Set5", "--scale", "2"])
    assert ev.exit_code == 2 and "x3" in ev.output  # a x3 model is refused for x2
    ev = CliRunner().invoke(app, ["eval", "--model", str(out / "model.safetensors"), "--dataset", "Set5", "--scale", "3"])
    assert ev.exit_code == 0 and "| espcn (model.safetensors) |" in ev.output


def test_cli_eval_loads_official_release_layouts(tmp_path):
    """Official EDSR checkpoints are plain state dicts, SwinIR's sit under "params"."""
    import torch

    from srdistill.sr.models import build_model

    edsr = build_model("edsr-baseline", 2)
    torch.save(edsr.state_dict(), tmp_path / "EDSR_x2.pt")
    swin = build_model("swinir-light", 2)
    torch.save({"params": swin.state_dict()}, tmp_path / "SwinIR-S_x2.pth")
    for name, f in [("edsr-baseline", "EDSR_x2.pt"), ("swinir-light", "SwinIR-S_x2.pth")]:
        r = CliRunner().invoke(app, ["eval", "--model", name, "--weights", str(tmp_path / f),
                                     "--dataset", "Set5", "--scale", "2", "--json"])  # fmt: skip
        assert r.exit_code == 0, r.output
        row = json.loads(r.output.strip().splitlines()[0])
        assert row["model"] == f"{name} ({f})" and 0 < row["psnr_y"] < 40
    r = CliRunner().invoke(app, ["eval", "--model", "edsr-baseline", "--weights", str(tmp_path / "SwinIR-S_x2.pth"),
                                 "--dataset", "Set5", "--scale", "2"])  # fmt: skip
    assert r.exit_code == 2 and "does not match edsr-baseline" in r.output


def test_synth_pipeline_finetunes_synthesizes_trains_and_resumes(corpus, tmp_path, ray_local, tiny_dit_dir):
    run_dir = tmp_path / "run"
    cfg = _tiny(distill="synth")
    manifest = run_pipeline(corpus, run_dir, cfg, preset="tiny", log=lambda s: None)
    stages = manifest["stages"]
    assert "select" not in stages and all(stages[s]["status"] == "done" for s in
                                          ("encode", "finetune", "synthesize", "train", "evaluate"))  # fmt: skip
    k = stages["cluster"]["counts"]["k_used"]
    assert stages["encode"]["counts"]["patches"] == stages["embed"]["counts"]["patches"]
    ft = stages["finetune"]["counts"]
    assert ft["backbone"] == "unet" and ft["trainable"] == "full" and ft["num_clusters"] == k
    pngs = sorted((run_dir / "synthesize").glob("*.png"))
    assert len(pngs) == 2 * k == stages["synthesize"]["counts"]["images"]  # tiny: select.ipc 2
    assert Image.open(pngs[0]).size == (32, 32)
    prov = (run_dir / "synthesize" / "provenance.csv").read_text().splitlines()
    assert prov[0].startswith("file,cluster,index,seed,sampler,steps,guidance_scale") and len(prov) == 1 + 2 * k
    assert stages["train"]["counts"]["train_images"] == 2 * k
    assert "espcn (synthetic)" in json.loads((run_dir / "evaluate" / "results.json").read_text())["rows"]
    assert "Synthesis" in (run_dir / "report" / "report.md").read_text()

    # `srdistill finetune` is the same pipeline up to finetune: all done here, so all skipped
    r = CliRunner().invoke(app, ["finetune", "--input", str(corpus), "--out", str(run_dir), "--preset", "tiny",
                                 "--allow-random-init"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "[finetune] up to date, skipped" in r.output and "[synthesize]" not in r.output

    # a rerun skips every stage; more synthesis steps rerun only synthesize and what follows
    lines: list[str] = []
    run_pipeline(corpus, run_dir, cfg, log=lines.append)
    assert sum("up to date, skipped" in line for line in lines) == 9  # plan .. evaluate
    lines.clear()
    run_pipeline(corpus, run_dir, _tiny(distill="synth", **{"synthesize.steps": 3}), log=lines.append)
    ran = [line.split("]")[0][1:] for line in lines if line.endswith("running")]
    assert ran == ["synthesize", "train", "evaluate"]

    # a DiT backbone that is not on disk stops before any work, naming what is missing
    with pytest.raises(FileNotFoundError, match="facebook/DiT-XL-2-512"):
        run_pipeline(corpus, tmp_path / "dit", _tiny(distill="synth", **{"finetune.dit_path": str(tmp_path / "no"),
                                                            "finetune.crop": "center"}),
                     log=lambda s: None)  # fmt: skip
    assert not (tmp_path / "dit").exists()

    # the DiT path of the same pipeline: DiffFit on the tiny DiT-XL-2-512-layout model
    dit = _tiny(distill="synth", **{"finetune.dit_path": str(tiny_dit_dir), "finetune.resolution": 16,
                                    "finetune.crop": "center", "train.lr_patch": 8})  # fmt: skip
    manifest = run_pipeline(corpus, tmp_path / "dit", dit, log=lambda s: None)
    ft = manifest["stages"]["finetune"]["counts"]
    assert ft["backbone"] == "dit" and ft["trainable"] == "difffit"
    assert ft["source"]["dit_path"] == str(tiny_dit_dir.resolve())
    assert Image.open(next((tmp_path / "dit" / "synthesize").glob("*.png"))).size == (16, 16)


def test_cli_synthesize_from_a_finetuned_model(tmp_path, ray_local):
    from srdistill.config import FinetuneConfig
    from srdistill.distill import diffusion

    bb = diffusion.build_backbone(FinetuneConfig(resolution=16, unet_channels=(16, 32)), 3)
    diffusion.save_finetuned(bb, tmp_path / "model", bb.model.state_dict())
    r = CliRunner().invoke(app, ["synthesize", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                                 "--ipc", "2", "--clusters", "0,2", "--steps", "2", "--sampler", "dpm-solver++"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "c000_i0000.png", "c000_i0001.png", "c002_i0000.png", "c002_i0001.png"]
    r = CliRunner().invoke(app, ["synthesize", "--model", str(tmp_path), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not a fine-tuned model" in r.output
    r = CliRunner().invoke(app, ["synthesize", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "x"),
                                 "--sampler", "euler"])  # fmt: skip
    assert r.exit_code == 2 and "sampler" in r.output
