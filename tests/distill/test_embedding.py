"""CLIP embedding: offline weight resolution and deterministic, normalised embeddings."""

from __future__ import annotations

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pytest
import torch

from srdistill.config import EmbedConfig
from srdistill.distill.embedding import (
    CLIP_MEAN,
    CLIP_STD,
    ClipEmbedder,
    MissingWeightsError,
    embed_patches,
    load_clip,
    resolve_clip,
)

from conftest import T91


def patch_table(size: int = 48) -> pa.Table:
    rows = []
    for name in ("t1.png", "t2.png", "t3.png"):
        src = os.path.join(T91, name)
        for x, y in ((0, 0), (40, 16), (64, 64)):
            pid = hashlib.sha1(f"{src}|{x}|{y}|{size}".encode()).hexdigest()[:16]
            rows.append({"patch_id": pid, "source": src, "x": x, "y": y, "size": size})
    return pa.Table.from_pylist(rows).cast(pa.schema([
        ("patch_id", pa.string()), ("source", pa.string()),
        ("x", pa.int32()), ("y", pa.int32()), ("size", pa.int32()),
    ]))


TINY = dict(model="srdistill-test/not-in-any-cache", allow_random_init=True,
            random_init="tiny", device="cpu", batch_size=4)


def test_random_init_tiny_is_normalised_and_deterministic():
    cfg = EmbedConfig(**TINY)
    source = resolve_clip(cfg)
    assert not source.pretrained and not source.semantic
    assert "NOT semantic" in source.note
    table = patch_table()
    emb = embed_patches(table, cfg, source)
    assert emb.shape == (table.num_rows, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(emb).all()
    # A fresh model from the same seed gives the same embeddings, whatever the global RNG.
    torch.manual_seed(123)
    again = embed_patches(table, cfg, source)
    np.testing.assert_allclose(emb, again, atol=1e-6)
    # Different patches give different embeddings.
    assert np.abs(emb[0] - emb[1]).max() > 1e-4


def test_raw_features_are_the_projection_output_unnormalised():
    """embed.normalize false stores the model's image_embeds as they come (SRDD's released
    clustering runs on raw get_image_features); the default is those rows scaled to unit L2."""
    table = patch_table()
    cfg = EmbedConfig(**TINY)
    source = resolve_clip(cfg)
    unit = embed_patches(table, cfg, source)
    raw = embed_patches(table, EmbedConfig(**TINY, normalize=False), source)
    norms = np.linalg.norm(raw, axis=1)
    assert np.abs(norms - 1.0).max() > 1e-2  # really not normalised
    np.testing.assert_allclose(raw / norms[:, None], unit, atol=1e-5)
    embedder = ClipEmbedder(EmbedConfig(**TINY, normalize=False), source)
    crops = [np.asarray(c) for c in __import__("srdistill.sr.imaging", fromlist=["x"]).read_crops(
        table.column("source").to_numpy(zero_copy_only=False)[:2], np.array([0, 40]), np.array([0, 16]),
        np.array([48, 48]))]
    with torch.inference_mode():
        direct = embedder.model(pixel_values=embedder._preprocess(crops)).image_embeds.numpy()
    np.testing.assert_allclose(raw[:2], direct, rtol=1e-5, atol=1e-6)


def test_embedder_keeps_row_order_across_interleaved_sources():
    cfg = EmbedConfig(**TINY)
    source = resolve_clip(cfg)
    embedder = ClipEmbedder(cfg, source)
    table = patch_table()
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    perm = np.array([8, 0, 4, 1, 7, 2, 3, 6, 5])
    out = embedder(cols)
    shuffled = embedder({c: v[perm] for c, v in cols.items()})
    assert list(shuffled["patch_id"]) == list(cols["patch_id"][perm])
    np.testing.assert_allclose(shuffled["embedding"], out["embedding"][perm], atol=1e-5)


def test_patch_outside_image_is_reported():
    cfg = EmbedConfig(**TINY)
    embedder = ClipEmbedder(cfg, resolve_clip(cfg))
    batch = {"patch_id": np.array(["p"]), "source": np.array([os.path.join(T91, "t1.png")]),
             "x": np.array([10_000]), "y": np.array([0]), "size": np.array([48])}
    with pytest.raises(ValueError, match="t1.png"):
        embedder(batch)


def test_missing_weights_raise_helpful_error(tmp_path):
    cfg = EmbedConfig(model="srdistill-test/not-in-any-cache", allow_random_init=False)
    with pytest.raises(MissingWeightsError) as info:
        resolve_clip(cfg)
    msg = str(info.value)
    assert "srdistill-test/not-in-any-cache" in msg
    assert "Hugging Face cache" in msg and "--allow-random-init" in msg
    assert "local directory" in msg
    # An existing directory without weights is also "missing".
    empty = tmp_path / "clip"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="lacks config.json"):
        resolve_clip(EmbedConfig(model=str(empty)))


def test_local_directory_is_pretrained_and_loads(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from srdistill.distill.embedding import RANDOM_INIT_CONFIGS

    torch.manual_seed(7)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**RANDOM_INIT_CONFIGS["tiny"]))
    model.save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}'
    )
    cfg = EmbedConfig(model=str(tmp_path / "clip"), device="cpu", batch_size=4)
    source = resolve_clip(cfg)
    assert source.pretrained and source.semantic and source.path is not None
    loaded, image_size, mean, std = load_clip(source, cfg)
    assert image_size == 64 and mean == (0.5, 0.5, 0.5) and std == (0.25, 0.25, 0.25)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)
    emb = embed_patches(patch_table(), cfg, source)
    assert emb.shape == (9, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_open_clip_backend_is_guarded():
    try:
        import open_clip  # noqa: F401
    except Exception:
        with pytest.raises(RuntimeError, match="open_clip"):
            resolve_clip(EmbedConfig(backend="open_clip", model="ViT-B-32"))
    else:
        pytest.skip("open_clip imports here; the guard is not exercised")


def _tiny_full_clip(directory) -> "torch.nn.Module":
    """A tiny text+vision ``CLIPModel`` saved like openai/clip-vit-base-patch32."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=16, image_size=64, intermediate_size=64),
        projection_dim=16,
    )
    torch.manual_seed(3)
    model = CLIPModel(config)
    model.save_pretrained(directory)
    return model


def test_hf_cache_snapshot_of_full_clip_resolves_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someorg--tiny-clip"
    commit = "0" * 40
    full = _tiny_full_clip(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = EmbedConfig(model="someorg/tiny-clip", device="cpu")
    source = resolve_clip(cfg)
    assert source.pretrained and source.semantic
    assert source.path.endswith(commit)
    model, image_size, mean, std = load_clip(source, cfg)
    assert image_size == 64 and model.config.projection_dim == 16
    assert (mean, std) == (CLIP_MEAN, CLIP_STD)  # no preprocessor_config.json
    torch.testing.assert_close(model.visual_projection.weight, full.visual_projection.weight)
