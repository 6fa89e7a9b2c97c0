"""The synthesis options of SRDD's released sampler from the command line and the pipeline:
``--sampler ddpm``, ``--guidance-channels``, ``--vae`` (a separate decoder VAE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import copy_t91, tiny_vae
from typer.testing import CliRunner

from srdistill.cli import app
from srdistill.config import FinetuneConfig, load_config
from srdistill.distill import diffusion
from srdistill.run.pipeline import run_pipeline


def _saved(kind: str, out: Path, tiny_dit_dir: Path | None = None) -> Path:
    if kind == "dit":
        cfg = FinetuneConfig(dit_path=str(tiny_dit_dir), resolution=16)
    else:
        cfg = FinetuneConfig(resolution=16, unet_channels=(16, 32))
    bb = diffusion.build_backbone(cfg, 3)
    weights = bb.trainable_parameters() if kind == "dit" else bb.model.state_dict()
    return diffusion.save_finetuned(bb, out, {n: w.detach() for n, w in weights.items()})


def test_cli_vae_with_the_unet_backbone_fails_before_sampling(tmp_path):
    model = _saved("unet", tmp_path / "model")
    r = CliRunner().invoke(app, ["synthesize", "--model", str(model), "--out", str(tmp_path / "out"),
                                 "--vae", str(tiny_vae(tmp_path / "vae", seed=7))])  # fmt: skip
    assert r.exit_code == 2 and "vae_path" in r.output and "unet" in r.output, r.output
    assert not (tmp_path / "out").exists()
    r = CliRunner().invoke(app, ["synthesize", "--model", str(model), "--out", str(tmp_path / "out"),
                                 "--guidance-channels", "0"])  # fmt: skip
    assert r.exit_code == 2 and "guidance_channels" in r.output, r.output


def test_cli_synthesizes_with_the_released_settings(tmp_path, tiny_dit_dir, ray_local):
    model = _saved("dit", tmp_path / "model", tiny_dit_dir)
    vae = tiny_vae(tmp_path / "mse", seed=7)
    r = CliRunner().invoke(app, ["synthesize", "--model", str(model), "--out", str(tmp_path / "out"), "--ipc", "1",
                                 "--clusters", "1", "--steps", "3", "--sampler", "ddpm", "--guidance-channels", "3",
                                 "--vae", str(vae)])  # fmt: skip
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "out" / "synthesis.json").read_text())
    assert (meta["sampler"], meta["steps"], meta["guidance_channels"], meta["variance"]) == ("ddpm", 3, 3,
                                                                                              "learned-range")
    assert meta["timesteps"] == [999, 500, 0]  # improved-DDPM's respacing of 1000 steps into 3
    assert meta["decoder"] == {"vae_path": str(vae.resolve()), "separate": True}
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["c001_i0000.png"]


def test_pipeline_preflight_rejects_a_decoder_vae_for_the_unet(tmp_path):
    corpus = copy_t91(tmp_path / "corpus", 2)
    cfg = load_config("tiny", overrides=["distill=synth", "embed.allow_random_init=true",
                                         f"synthesize.vae_path={tmp_path / 'vae'}"])
    assert cfg.finetune.resolved_backbone == "unet"
    with pytest.raises(ValueError, match="vae_path.*unet"):
        run_pipeline(corpus, tmp_path / "run", cfg, log=lambda s: None)
    assert not (tmp_path / "run").exists()  # stopped before any stage
