"""ViT complexity scoring (TripleD step 1): cheap statistics, the frozen ViT's features and
token diversity, offline weight resolution, per-shard parts and the pipeline stage."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from srdistill import storage
from srdistill.config import ComplexityConfig, MineConfig, load_config
from srdistill.distill.complexity import (
    IMAGENET_MEAN,
    RANDOM_INIT_CONFIGS,
    ComplexityScorer,
    MissingWeightsError,
    ViTFeatures,
    attach_scores,
    feature_matrix,
    load_vit,
    read_scores,
    resolve_vit,
    score_shard,
)
from srdistill.sr.image_stats import image_statistics
from srdistill.sr.imaging import crop, read_image

from conftest import T91

TINY = dict(model="srdistill-test/no-such-vit", allow_random_init=True, random_init="tiny", device="cpu",
            batch_size=8)  # fmt: skip
T91_NAMES = ("t1.png", "t2.png", "t3.png", "t5.png")


def _tiny_cfg(**over) -> ComplexityConfig:
    return ComplexityConfig(**{**TINY, **over})


def _batch(size: int = 32) -> dict[str, np.ndarray]:
    """Crops at a few positions of four T91 images, sources interleaved."""
    rows = [(os.path.join(T91, name), x, y) for x, y in ((0, 0), (40, 16), (64, 48)) for name in T91_NAMES]
    return {"patch_id": np.array([f"p{i}" for i in range(len(rows))]),
            "source": np.array([r[0] for r in rows]), "x": np.array([r[1] for r in rows]),
            "y": np.array([r[2] for r in rows]), "size": np.full(len(rows), size)}  # fmt: skip


def _images(arrays: list[np.ndarray]) -> torch.Tensor:
    """``(H, W, 3)`` uint8 images -> ``(N, 3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


# --------------------------------------------------------------------------- statistics


def test_image_statistics_flat_noise_and_step_edge():
    flat = image_statistics(np.full((16, 16, 3), 77, np.uint8))
    assert flat == {"entropy": 0.0, "grad_energy": 0.0}
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)  # uniform grey levels
    assert 7.99 < image_statistics(noise)["entropy"] <= 8.0
    # A vertical step 0 -> 80 between columns 1 and 2 of a 4x4 grey image. Edge-replicated
    # Sobel: gx = (1 + 2 + 1) * 80 = 320 at columns 1 and 2, 0 elsewhere, gy = 0; /8 -> 40.
    # grad_energy = mean of squares = 2 * 4 * 40^2 / 16 = 800; half the pixels each level: 1 bit.
    step = np.zeros((4, 4), np.uint8)
    step[:, 2:] = 80
    assert image_statistics(step) == {"entropy": 1.0, "grad_energy": 800.0}
    # the same step in RGB (grey 80 is luma 80)
    assert image_statistics(np.repeat(step[..., None], 3, axis=2)) == {"entropy": 1.0, "grad_energy": 800.0}
    with pytest.raises(ValueError, match="uint8"):
        image_statistics(step.astype(np.float32))


# --------------------------------------------------------------------------- the ViT


def test_random_init_scores_are_deterministic_normalised_and_bounded():
    cfg = _tiny_cfg()
    source = resolve_vit(cfg)
    assert not source.pretrained and source.path is None and "NOT learned" in source.note
    batch = _batch()
    first = ComplexityScorer(cfg, source)(batch)
    torch.manual_seed(1234)
    torch.rand(100)  # the global RNG moved on: the scorer's ViT must not depend on it
    state = torch.random.get_rng_state()
    second = ComplexityScorer(cfg, source)(batch)
    assert torch.equal(torch.random.get_rng_state(), state)  # building it left the RNG alone
    n = len(batch["patch_id"])
    assert list(first["patch_id"]) == list(batch["patch_id"])
    assert first["feature"].shape == (n, 32) and first["feature"].dtype == np.float32
    for key in ("vit_complexity", "entropy", "grad_energy"):
        assert first[key].shape == (n,) and first[key].dtype == np.float32
        np.testing.assert_allclose(first[key], second[key], atol=1e-6)
    np.testing.assert_allclose(first["feature"], second["feature"], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(first["feature"], axis=1), 1.0, atol=1e-5)
    assert ((first["vit_complexity"] >= 0) & (first["vit_complexity"] <= 1)).all()
    assert np.ptp(first["vit_complexity"]) > 1e-3  # different patches, different scores
    # the statistics are image_statistics of each crop
    img = read_image(batch["source"][4])
    want = image_statistics(crop(img, int(batch["x"][4]), int(batch["y"][4]), 32))
    assert first["entropy"][4] == pytest.approx(want["entropy"], rel=1e-6)
    assert first["grad_energy"][4] == pytest.approx(want["grad_energy"], rel=1e-6)
    # another seed is another random ViT
    other = ComplexityScorer(_tiny_cfg(seed=1), source)(batch)
    assert np.abs(other["feature"] - first["feature"]).max() > 1e-3


def test_scorer_keeps_row_order_and_mixed_sizes():
    cfg = _tiny_cfg()
    scorer = ComplexityScorer(cfg, resolve_vit(cfg))
    batch = _batch()
    batch["size"] = np.where(np.arange(len(batch["size"])) % 2 == 0, 32, 48)  # two sizes, two forwards
    out = scorer(batch)
    perm = np.random.default_rng(0).permutation(len(batch["patch_id"]))
    shuffled = scorer({c: v[perm] for c, v in batch.items()})
    assert list(shuffled["patch_id"]) == list(batch["patch_id"][perm])
    np.testing.assert_allclose(shuffled["feature"], out["feature"][perm], atol=1e-5)
    np.testing.assert_allclose(shuffled["vit_complexity"], out["vit_complexity"][perm], atol=1e-5)
    bad = {c: v[:1] for c, v in batch.items()} | {"x": np.array([10_000])}
    with pytest.raises(ValueError, match="t1.png"):
        scorer(bad)
    empty = scorer({c: v[:0] for c, v in batch.items()})
    assert empty["feature"].shape == (0, 32) and empty["vit_complexity"].shape == (0,)


def test_flat_patches_score_lower_than_textured_t91_patches():
    cfg = _tiny_cfg(image_size=64)  # 8x8 tokens of 8x8 pixels
    vit = load_vit(resolve_vit(cfg), cfg)
    crops = [crop(read_image(os.path.join(T91, name)), x, y, 64)
             for name in T91_NAMES for x, y in ((0, 0), (40, 40))]  # fmt: skip
    energy = np.array([image_statistics(c)["grad_energy"] for c in crops])
    textured = [crops[i] for i in np.argsort(energy)[-4:]]  # the 4 busiest crops
    flats = [np.full((64, 64, 3), v, np.uint8) for v in (0, 90, 200, 255)]
    flats.append(np.broadcast_to(np.array([30, 120, 200], np.uint8), (64, 64, 3)).copy())
    with torch.inference_mode():
        _, c_tex = vit(_images(textured))
        _, c_flat = vit(_images(flats))
    assert c_flat.max() * 3 < c_tex.min(), (c_flat, c_tex)


def test_identical_tokens_give_zero_complexity():
    """Without position embeddings a constant image's patch tokens are all equal: diversity 0."""
    cfg = _tiny_cfg()
    vit = load_vit(resolve_vit(cfg), cfg)
    with torch.no_grad():
        vit.model.embeddings.position_embeddings.zero_()
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        features, complexity = vit(_images([np.full((32, 32, 3), 140, np.uint8), noise]))
    assert complexity[0].item() == pytest.approx(0.0, abs=1e-5)
    assert complexity[1].item() > 0.01
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2))


def test_gradients_flow_to_the_input_not_the_vit():
    cfg = _tiny_cfg(image_size=48)  # a resize and interpolated position embeddings on the way
    vit = load_vit(resolve_vit(cfg), cfg)
    assert vit.image_size == 48 and vit.num_patches == 36 and vit.dim == 32
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    features, complexity = vit(x)
    assert features.shape == (2, 32) and complexity.shape == (2,)
    (features.sum() + complexity.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in vit.parameters())
    vit.train()  # a parent module's train() does not switch the frozen ViT out of eval
    assert not vit.training and not vit.model.training


def test_not_a_vit_is_rejected():
    from transformers import ResNetConfig, ResNetModel

    resnet = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic"))
    with pytest.raises(ValueError, match="not a ViT-style model"):
        ViTFeatures(resnet)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        load_vit(resolve_vit(_tiny_cfg()), _tiny_cfg())(torch.rand(3, 32, 32))


# --------------------------------------------------------------------------- weights


def test_missing_weights_raise_helpful_error(tmp_path):
    cfg = ComplexityConfig(model="srdistill-test/no-such-vit")
    with pytest.raises(MissingWeightsError) as info:
        resolve_vit(cfg)
    msg = str(info.value)
    assert "srdistill-test/no-such-vit" in msg and "Hugging Face cache" in msg and "local directory" in msg
    assert "--allow-random-init" in msg and "complexity.allow_random_init" in msg
    empty = tmp_path / "vit"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="lacks config.json"):
        resolve_vit(ComplexityConfig(model=str(empty)))


def _tiny_vit(directory, seed: int = 5, classifier: bool = False) -> torch.nn.Module:
    """A tiny ViT saved to ``directory``: a base ``ViTModel``, or with ``classifier`` a
    ``ViTForImageClassification`` (the layout of google/vit-base-patch16-224)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(**RANDOM_INIT_CONFIGS["tiny"], num_labels=5)
    model = (ViTForImageClassification(config) if classifier else ViTModel(config, add_pooling_layer=False)).eval()
    model.save_pretrained(directory)
    return model


def test_local_directory_is_pretrained_and_matches_its_model(tmp_path):
    model = _tiny_vit(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}')
    cfg = ComplexityConfig(model=str(tmp_path / "vit"), device="cpu")
    source = resolve_vit(cfg)
    assert source.pretrained and source.path == str((tmp_path / "vit").resolve())
    vit = load_vit(source, cfg)
    assert vit.image_size == 32 and vit.dim == 32
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        features, complexity = vit(x)
        tokens = model(pixel_values=(x - 0.5) / 0.25).last_hidden_state[:, 1:]  # the source model, by hand
    torch.testing.assert_close(features, torch.nn.functional.normalize(tokens.mean(1), dim=-1), atol=1e-5, rtol=0)
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    torch.testing.assert_close(complexity, 1 - unit.mean(1).pow(2).sum(-1), atol=1e-5, rtol=0)


def test_hf_cache_snapshot_resolves_offline_with_imagenet_normalisation(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someorg--tiny-vit"
    commit = "1" * 40
    classifier = _tiny_vit(repo / "snapshots" / commit, classifier=True)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = ComplexityConfig(model="someorg/tiny-vit", device="cpu")
    source = resolve_vit(cfg)
    assert source.pretrained and source.path.endswith(commit) and "HF cache" in source.note
    vit = load_vit(source, cfg)  # the classifier's ViT body, its head ignored
    torch.testing.assert_close(vit.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        features, _ = vit(x)
        tokens = classifier.vit(pixel_values=(x - vit.mean) / vit.std).last_hidden_state[:, 1:]
    torch.testing.assert_close(features, torch.nn.functional.normalize(tokens.mean(1), dim=-1), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- shards and tables


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """A mined run without Ray: 3 T91 images and a non-image in 2 shards, 32px patches."""
    from srdistill.corpus import plan_corpus
    from srdistill.distill.mining import mine_shard, summarize_parts

    root = tmp_path_factory.mktemp("mined")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in T91_NAMES[:3]:
        shutil.copy(os.path.join(T91, name), corpus / name)
    (corpus / "zz_broken.png").write_text("not an image")
    cfg = MineConfig(patch_size=32, stride=32, keep_rule="top_fraction", top_fraction=0.5)
    plan = plan_corpus(str(corpus), str(root / "plan.parquet"), extensions=(".png",), images_per_shard=2)
    assert plan.shards == 2
    mine = root / "mine"
    for shard in range(plan.shards):
        mine_shard(str(root / "plan.parquet"), shard, str(mine / "patches"), cfg)
    rule, _ = summarize_parts(str(mine / "patches"), cfg, str(mine / "skipped.parquet"))
    storage.write_json(str(mine / "keep.json"), rule)
    return mine


def test_score_shard_writes_every_patch_once(mined, tmp_path):
    from srdistill.distill.mining import read_patches

    cfg = _tiny_cfg()
    scorer = ComplexityScorer(cfg, resolve_vit(cfg))
    out = tmp_path / "parts"
    rows = [score_shard(scorer, s, mine_uri=str(mined), out_uri=str(out), batch_size=7) for s in (0, 1)]
    patches = read_patches(str(mined), ["patch_id", "kept"])
    assert sum(rows) == patches.num_rows and not patches.column("kept").to_numpy(zero_copy_only=False).all()
    part = out / "part-000000.parquet"
    mtime = part.stat().st_mtime_ns
    assert score_shard(scorer, 0, mine_uri=str(mined), out_uri=str(out), batch_size=7) == -1  # idempotent
    assert part.stat().st_mtime_ns == mtime
    schema = pq.read_schema(part)
    assert schema.names == ["patch_id", "vit_complexity", "entropy", "grad_energy", "feature"]
    assert schema.field("patch_id").type == pa.string()
    assert all(schema.field(c).type == pa.float32() for c in ("vit_complexity", "entropy", "grad_energy"))
    assert schema.field("feature").type == pa.list_(pa.float32(), 32)

    scores = read_scores(str(out))
    assert scores.column("patch_id").to_pylist() == patches.column("patch_id").to_pylist()  # all, in order
    x = feature_matrix(scores)
    assert x.shape == (patches.num_rows, 32) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # the same rows scored in one batch give the same numbers (batching does not matter)
    direct = scorer({c: v for c, v in read_patches(str(mined), ["patch_id", "source", "x", "y", "size"], shard=1)
                     .to_pydict().items()})  # fmt: skip
    last = scores.slice(scores.num_rows - len(direct["patch_id"]))
    np.testing.assert_allclose(feature_matrix(last), direct["feature"], atol=1e-5)

    # attach_scores: looked up by patch_id in the table's own order, list column included
    shuffled = patches.take(np.random.default_rng(0).permutation(patches.num_rows))
    joined = attach_scores(shuffled, scores)
    assert joined.column_names == ["patch_id", "kept", "vit_complexity", "entropy", "grad_energy", "feature"]
    row = {pid: i for i, pid in enumerate(scores.column("patch_id").to_pylist())}
    order = [row[p] for p in shuffled.column("patch_id").to_pylist()]
    np.testing.assert_array_equal(feature_matrix(joined), x[order])
    unknown = pa.table({"patch_id": ["nope"]})
    with pytest.raises(ValueError, match="no complexity score"):
        attach_scores(unknown, scores)


def test_score_shard_of_a_shard_without_patches(tmp_path):
    """A shard whose only image was skipped writes an empty part with the full schema."""
    from srdistill.corpus import plan_corpus
    from srdistill.distill.mining import mine_shard, summarize_parts

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "broken.png").write_text("not an image")
    cfg = MineConfig(patch_size=32, stride=32, keep_rule="all")
    plan_corpus(str(corpus), str(tmp_path / "plan.parquet"), extensions=(".png",), images_per_shard=1)
    mine_shard(str(tmp_path / "plan.parquet"), 0, str(tmp_path / "mine" / "patches"), cfg)
    rule, _ = summarize_parts(str(tmp_path / "mine" / "patches"), cfg, str(tmp_path / "mine" / "skipped.parquet"))
    storage.write_json(str(tmp_path / "mine" / "keep.json"), rule)
    scorer = ComplexityScorer(_tiny_cfg(), resolve_vit(_tiny_cfg()))
    assert score_shard(scorer, 0, mine_uri=str(tmp_path / "mine"), out_uri=str(tmp_path / "out"), batch_size=4) == 0
    table = read_scores(str(tmp_path / "out"))
    assert table.num_rows == 0 and table.schema.field("feature").type == pa.list_(pa.float32(), 32)
    assert feature_matrix(table).shape == (0, 32)


# --------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("complexity_corpus")
    for name in T91_NAMES:
        shutil.copy(os.path.join(T91, name), root / name)
    return root


@pytest.mark.slow
def test_pipeline_scores_every_patch_then_selects_tripled(small_corpus, tmp_path, ray_local):
    from typer.testing import CliRunner

    from srdistill.cli import app
    from srdistill.distill.mining import read_patches
    from srdistill.run.pipeline import NOT_LEARNED, run_pipeline

    run_dir = tmp_path / "run"
    # the CLI's --allow-random-init covers the ViT too; --until complexity stops after it
    result = CliRunner().invoke(app, ["run", "--input", str(small_corpus), "--out", str(run_dir), "--preset", "tiny",
                                      "--set", "select.method=tripled", "--set", "select.strata=3", "--allow-random-init",
                                      "--until", "complexity"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert NOT_LEARNED in result.output
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "embed" not in manifest["stages"] and "select" not in manifest["stages"]
    assert manifest["vit"]["pretrained"] is False and manifest["vit"]["path"] is None
    assert "NOT learned" in manifest["vit"]["note"]
    patches = read_patches(str(run_dir / "mine"), ["patch_id", "kept"])
    assert not patches.column("kept").to_numpy(zero_copy_only=False).all()  # scored: kept and not kept
    scores = read_scores(str(run_dir / "complexity" / "parts"))
    assert sorted(scores.column("patch_id").to_pylist()) == sorted(patches.column("patch_id").to_pylist())
    meta = json.loads((run_dir / "complexity" / "meta.json").read_text())
    shards = manifest["stages"]["plan"]["counts"]["shards"]  # the small corpus cut for the 2 CPUs (issue 21)
    assert meta == {"patches": patches.num_rows, "dim": 32, "pretrained": False, "shards_scored_now": shards}
    assert manifest["stages"]["complexity"]["counts"] == meta

    cfg = load_config("tiny", overrides=["select.method=tripled", "select.strata=3", "complexity.allow_random_init=true"])
    lines: list[str] = []
    manifest = run_pipeline(small_corpus, run_dir, cfg, until="select", log=lines.append)
    assert manifest["stages"]["complexity"]["skipped"] is True  # resumed: not scored twice
    assert any(NOT_LEARNED in line for line in lines)
    counts = manifest["stages"]["select"]["counts"]
    assert counts["available"] == patches.num_rows  # tripled chooses among all patches
    assert counts["selected"] == 2 * cfg.select.strata  # IPC 2 per stratum
    assert 0.0 <= counts["feature_mmd"] < 6.0

    # the whole TripleD path: alignment CNN, then curriculum training by ViT complexity
    full = load_config("tiny", overrides=["select.method=tripled", "select.strata=3", "complexity.allow_random_init=true",
                                          "align.enabled=true", "train.curriculum.enabled=true",
                                          "train.curriculum.score=vit_complexity"])  # fmt: skip
    manifest = run_pipeline(small_corpus, run_dir, full, log=lambda s: None)
    assert manifest["stages"]["select"]["skipped"] is True
    align = manifest["stages"]["align"]["counts"]
    assert align["images"] == counts["selected"] and align["iterations"] == full.align.iterations
    assert 0.0 <= align["feature_mmd"] < 6.0 and align["psnr_to_original"] > 20
    aligned = sorted(p.name for p in (run_dir / "align").glob("*.png"))
    assert aligned == sorted(p.name for p in (run_dir / "distilled").glob("*.png"))
    assert "vit_complexity" in (run_dir / "align" / "provenance.csv").read_text().splitlines()[0]
    assert manifest["stages"]["train"]["counts"]["train_images"] == len(aligned)
    log = [json.loads(x) for x in (run_dir / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["curriculum_stage"] for r in log if "curriculum_stage" in r] == [1, 2]
    assert "evaluate" in manifest["stages"]
    report = (run_dir / "report" / "report.md").read_text()
    assert "NOT learned" in report and "feature MMD" in report


@pytest.mark.slow
def test_pipeline_feature_mmd_for_a_baseline_with_alignment(small_corpus, tmp_path, ray_local):
    from srdistill.run.pipeline import run_pipeline

    cfg = load_config("tiny", overrides=["select.method=random", "align.enabled=true",
                                         "complexity.allow_random_init=true"])  # fmt: skip
    manifest = run_pipeline(small_corpus, tmp_path / "run", cfg, until="select", log=lambda s: None)
    assert "embed" not in manifest["stages"] and manifest["stages"]["complexity"]["status"] == "done"
    counts = manifest["stages"]["select"]["counts"]
    assert counts["selected"] == 2 * 3 and 0.0 < counts["feature_mmd"] < 6.0
    with pytest.raises(ValueError, match="complexity"):
        run_pipeline(small_corpus, tmp_path / "other", load_config("tiny"), until="complexity", log=lambda s: None)
    missing = load_config("tiny", overrides=["select.method=tripled"])  # no ViT weights, no flag
    with pytest.raises(MissingWeightsError, match="allow_random_init"):
        run_pipeline(small_corpus, tmp_path / "none", missing, log=lambda s: None)
    assert not (tmp_path / "none").exists()  # stopped before any work


def test_stage_progress_counts_the_complexity_stage():
    from srdistill import k8s

    def total(*overrides: str) -> int:
        cfg = load_config("tiny", overrides=list(overrides))
        return k8s.stage_progress({"config": cfg.model_dump(mode="json"), "stages": {}})["stagesTotal"]

    assert total() == 8  # plan mine embed cluster select train evaluate report
    assert total("select.method=tripled") == 7  # plan mine complexity select train evaluate report
    assert total("align.enabled=true") == 10  # clip-kmeans + complexity + align
    assert total("select.method=random") == 6
    assert total("select.method=kcenter", "select.features=clip") == 8  # reads the CLIP embeddings
    assert total("select.method=kcenter", "select.features=vit") == 7  # reads the ViT features
    assert k8s.stage_progress({"config": {"no_such_field": 1}, "stages": {"plan": {"status": "done"}}}) == {
        "stages": {"plan": "done"}, "stagesDone": 1, "stagesTotal": 1, "currentStage": None}  # another version


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["select.method=kcenter", "select.features=clip", "embed.allow_random_init=true"],
    ["select.method=kcenter", "select.features=vit", "complexity.allow_random_init=true"],
    ["select.method=stratified", "select.score=proxy_error", "select.strata=2", "select.proxy.steps=5",
     "select.proxy.seeds=[0]"],
])  # fmt: skip
def test_pipeline_selects_with_the_label_free_selectors(small_corpus, tmp_path, ray_local, overrides):
    """The select stage joins what each selector reads: CLIP embeddings, ViT features, or the
    proxy network's error."""
    from srdistill.run.pipeline import run_pipeline

    cfg = load_config("tiny", overrides=overrides)
    manifest = run_pipeline(small_corpus, tmp_path / "run", cfg, until="select", log=lambda s: None)
    assert ("embed" in manifest["stages"]) == ("select.features=clip" in overrides)
    assert ("complexity" in manifest["stages"]) == ("select.features=vit" in overrides)
    counts = manifest["stages"]["select"]["counts"]
    assert counts["selected"] == counts["budget_patches"] == 2 * 3 == len(list((tmp_path / "run" / "distilled").glob("*.png")))
    selected = storage.read_parquet(str(tmp_path / "run" / "select" / "selected.parquet"))
    if cfg.select.score == "proxy_error":
        assert "proxy_error" in selected.column_names and (np.asarray(selected.column("score")) > 0).all()
