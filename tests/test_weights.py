"""Weights by name, online or offline: CLIP, ViT, DiT and VAE Hugging Face ids against a
Hub-compatible server on loopback (``hub_server.HubServer``), and ``--weights URL#sha256=...``
against a plain loopback file server."""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from conftest import T91
from hub_server import FileServer, HubServer
from srdistill import weights as W
from srdistill.cli import app
from srdistill.config import ComplexityConfig, EmbedConfig, FinetuneConfig
from srdistill.distill.complexity import load_vit, resolve_vit
from srdistill.distill.diffusion import (
    MissingBackboneError,
    build_backbone,
    check_backbone,
    load_dit,
    load_vae,
    resolve_backbone,
)
from srdistill.distill.embedding import MissingWeightsError, embed_patches, load_clip, resolve_clip

CLIP_ID = "srdistill-test/tiny-clip"
VIT_BIN_ID = "srdistill-test/tiny-vit-bin"
DIT_ID = "srdistill-test/tiny-dit"
VAE_ID = "srdistill-test/tiny-vae"
CLIP_FILES = {"config.json", "preprocessor_config.json", "model.safetensors"}


# --------------------------------------------------------------------------- fixtures


def _tiny_clip(directory) -> None:
    """A tiny text+vision ``CLIPModel`` saved like openai/clip-vit-base-patch32, plus files a
    CLIP repository holds that the image tower does not need."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
                           image_size=64, intermediate_size=64),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(5)
    CLIPModel(config).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}')
    # not needed by the image tower, so never downloaded
    (directory / "pytorch_model.bin").write_bytes(b"\0" * 256)  # safetensors win over .bin
    (directory / "flax_model.msgpack").write_bytes(b"\0" * 64)
    (directory / "tokenizer.txt").write_text("not a tokenizer")
    (directory / "README.md").write_text("# tiny clip")


def _tiny_vit_bin(directory) -> torch.nn.Module:
    """A tiny ``ViTModel`` whose repository has only PyTorch-pickle weights."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(6)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                               image_size=32, intermediate_size=64), add_pooling_layer=False)  # fmt: skip
    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return model


@pytest.fixture(scope="module")
def repos(tmp_path_factory, tiny_dit_dir):
    """Folders of the served repositories (built once)."""
    root = tmp_path_factory.mktemp("repos")
    _tiny_clip(root / "clip")
    _tiny_vit_bin(root / "vit")
    shutil.copytree(tiny_dit_dir, root / "dit")
    (root / "dit" / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    (root / "dit" / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\0" * 128)  # not fetched
    shutil.copytree(tiny_dit_dir / "vae", root / "vae")
    return root


@pytest.fixture(scope="module")
def hub(repos):
    with HubServer() as server:
        server.add_repo(CLIP_ID, repos / "clip")
        server.add_repo(VIT_BIN_ID, repos / "vit")
        server.add_repo(DIT_ID, repos / "dit")
        server.add_repo(VAE_ID, repos / "vae")
        yield server


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """Network allowed, the Hub at the loopback server, an empty HF cache in tmp_path."""
    from huggingface_hub import constants

    _go_online(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # no user-agent look-ups
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.reset()
    return tmp_path / "hf-cache"


def _go_offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _go_online(monkeypatch) -> None:
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _patches() -> pa.Table:
    rows = [{"patch_id": f"p{i}", "source": str(T91 / name), "x": x, "y": 8, "size": 48}
            for i, (name, x) in enumerate([("t1.png", 0), ("t2.png", 16), ("t3.png", 32)])]
    return pa.Table.from_pylist(rows).cast(pa.schema([
        ("patch_id", pa.string()), ("source", pa.string()),
        ("x", pa.int32()), ("y", pa.int32()), ("size", pa.int32()),
    ]))  # fmt: skip


# --------------------------------------------------------------------------- Hugging Face ids


def test_clip_id_downloads_once_then_loads_offline_from_cache(online, hub, repos, monkeypatch):
    cfg = EmbedConfig(model=CLIP_ID, device="cpu", batch_size=4)
    source = resolve_clip(cfg)
    assert source.pretrained and source.semantic
    assert source.path.startswith(str(online)) and "HF cache" in source.note
    # only what the image tower needs, safetensors rather than .bin, each file once
    assert hub.file_gets(CLIP_ID) == dict.fromkeys(CLIP_FILES, 1)
    emb = embed_patches(_patches(), cfg, source)
    local = embed_patches(_patches(), cfg, resolve_clip(EmbedConfig(model=str(repos / "clip"), device="cpu")))
    assert torch.allclose(torch.from_numpy(emb), torch.from_numpy(local), atol=1e-6)  # the served weights
    # resolved again online: one revision request, no file downloaded twice
    hub.reset()
    assert resolve_clip(cfg).path == source.path
    assert hub.file_gets(CLIP_ID) == {} and hub.count("GET", "/api/models/") == 1
    # offline: from the cache with zero requests, the same embeddings
    _go_offline(monkeypatch)
    hub.reset()
    again = resolve_clip(cfg)
    assert hub.total() == 0
    assert again.path == source.path and again.pretrained
    emb2 = embed_patches(_patches(), cfg, again)
    assert hub.total() == 0
    assert torch.allclose(torch.from_numpy(emb), torch.from_numpy(emb2), atol=1e-6)


def test_offline_with_empty_cache_keeps_the_missing_weights_message(online, hub, monkeypatch):
    _go_offline(monkeypatch)
    with pytest.raises(MissingWeightsError) as info:
        resolve_clip(EmbedConfig(model=CLIP_ID))
    msg = str(info.value)
    assert f"CLIP weights for {CLIP_ID!r}" in msg and "looked in" in msg
    assert "local directory" in msg and "Hugging Face cache" in msg and str(online) in msg
    assert "HF_HUB_OFFLINE=1" in msg and f"hf download {CLIP_ID}" in msg
    assert "--allow-random-init" in msg
    with pytest.raises(MissingWeightsError, match="complexity.allow_random_init"):
        resolve_vit(ComplexityConfig(model=VIT_BIN_ID))
    # random init is still the explicit way out, and still says so
    source = resolve_clip(EmbedConfig(model=CLIP_ID, allow_random_init=True))
    assert not source.pretrained and "NOT semantic" in source.note
    assert hub.total() == 0


def test_unknown_repo_or_unreachable_hub_online_is_a_clear_error(online, hub, monkeypatch):
    with pytest.raises(MissingWeightsError) as info:
        resolve_clip(EmbedConfig(model="srdistill-test/no-such-model"))
    msg = str(info.value)
    assert "srdistill-test/no-such-model" in msg and hub.url in msg
    assert "no such repository" in msg and "HF_HUB_OFFLINE=1" in msg and "local directory" in msg
    assert hub.count("GET", "/api/models/srdistill-test/no-such-model") == 1
    with pytest.raises(MissingWeightsError, match="no such repository") as info:
        W.resolve_hf_weights("srdistill-test/no-such-model", what="VAE", allow_patterns=["config.json"])
    assert "VAE 'srdistill-test/no-such-model'" in str(info.value)
    # nothing listens on that port: a network error, named as such
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    with pytest.raises(MissingWeightsError) as info:
        resolve_vit(ComplexityConfig(model=VIT_BIN_ID))
    msg = str(info.value)
    assert f"{dead} could not be reached" in msg and VIT_BIN_ID in msg and "HF_HUB_OFFLINE=1" in msg
    # a path that does not exist is not sent to the Hub
    hub.reset()
    with pytest.raises(MissingWeightsError, match="not a Hugging Face repo id"):
        W.resolve_hf_weights("/no/such/dir", what="DiT", allow_patterns=["config.json"])
    assert hub.total() == 0


def test_vit_repo_without_safetensors_falls_back_to_bin(online, hub, repos, monkeypatch):
    cfg = ComplexityConfig(model=VIT_BIN_ID, device="cpu")
    source = resolve_vit(cfg)
    assert source.pretrained and source.path.startswith(str(online))
    assert hub.file_gets(VIT_BIN_ID) == {"config.json": 1, "pytorch_model.bin": 1}
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        features, complexity = load_vit(source, cfg)(x)
    _go_offline(monkeypatch)
    hub.reset()
    again = resolve_vit(cfg)
    assert again.path == source.path and hub.total() == 0
    with torch.inference_mode():
        features2, complexity2 = load_vit(again, cfg)(x)
    assert torch.allclose(features, features2, atol=1e-6) and torch.allclose(complexity, complexity2, atol=1e-6)


def test_dit_and_vae_ids_download_once_then_resolve_offline(online, hub, tiny_dit_dir, monkeypatch):
    cfg = FinetuneConfig(dit_path=DIT_ID, vae_path=VAE_ID, resolution=16)
    assert check_backbone(cfg) == "dit"  # the pipeline's early check downloads the ids
    assert hub.file_gets(DIT_ID) == {"transformer/config.json": 1, "transformer/diffusion_pytorch_model.safetensors": 1,
                                     "scheduler/scheduler_config.json": 1}  # no vae/ (vae_path), no .bin
    assert hub.file_gets(VAE_ID) == {"config.json": 1, "diffusion_pytorch_model.safetensors": 1}
    resolved = resolve_backbone(cfg)
    assert resolved.dit_path.startswith(str(online)) and resolved.vae_path.startswith(str(online))
    assert resolve_backbone(resolved) == resolved  # local directories: what actors receive
    backbone = build_backbone(resolved, num_clusters=3)
    assert backbone.kind == "dit" and backbone.source["dit_path"] == resolved.dit_path
    _go_offline(monkeypatch)
    hub.reset()
    assert resolve_backbone(cfg) == resolved and hub.total() == 0
    vae = load_vae(cfg)
    ref = load_vae(FinetuneConfig(dit_path=str(tiny_dit_dir), resolution=16))
    for a, b in zip(vae.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    assert hub.total() == 0
    # the DiT id alone brings its own vae/ (network back on, same cache)
    _go_online(monkeypatch)
    dit, _, schedule = load_dit(DIT_ID)
    assert "vae/diffusion_pytorch_model.safetensors" in hub.file_gets(DIT_ID)
    ref_dit, _, ref_schedule = load_dit(tiny_dit_dir)
    assert schedule == ref_schedule
    for a, b in zip(dit.state_dict().values(), ref_dit.state_dict().values()):
        assert torch.equal(a, b)


def test_dit_id_offline_not_cached_names_the_id_and_layout(online, hub, tmp_path, monkeypatch):
    _go_offline(monkeypatch)
    with pytest.raises(MissingBackboneError) as info:
        check_backbone(FinetuneConfig(dit_path=DIT_ID, resolution=16))
    msg = str(info.value)
    assert DIT_ID in msg and "Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "facebook/DiT-XL-2-512" in msg and "finetune.backbone=unet" in msg
    assert hub.total() == 0
    # a missing local directory keeps its message
    with pytest.raises(MissingBackboneError, match="no .*transformer/config.json"):
        check_backbone(FinetuneConfig(dit_path=str(tmp_path / "nope")))


# --------------------------------------------------------------------------- another node


def _other_node(monkeypatch, driver_cache, name: str):
    """Simulate a Ray actor on another node: the driver's Hugging Face cache is not there
    (moved away) and this node has its own, empty, cache."""
    from huggingface_hub import constants

    shutil.move(str(driver_cache), str(driver_cache) + "-driver")
    node = driver_cache.parent / name
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(node))
    return node


def test_snapshot_ref_reads_id_and_commit_back():
    commit = "a" * 40
    assert W.snapshot_ref(f"/c/hub/models--org--name/snapshots/{commit}") == ("org/name", commit)
    assert W.snapshot_ref(f"/c/models--gpt2/snapshots/{commit}/") == ("gpt2", commit)
    for path in (None, "", "/models/clip", f"/c/models--o--n/snapshots/{commit}/vae", "org/name"):
        assert W.snapshot_ref(path) is None
    assert W.local_dir("/no/such/local/dir", what="CLIP", allow_patterns=["config.json"]) == Path("/no/such/local/dir")


def test_clip_source_on_another_node_downloads_the_same_commit(online, hub, monkeypatch, tmp_path):
    cfg = EmbedConfig(model=CLIP_ID, device="cpu", batch_size=4)
    source = resolve_clip(cfg)  # on the driver
    commit = hub.repos[CLIP_ID][0]
    assert (source.repo_id, source.revision) == (CLIP_ID, commit) and source.path.endswith(commit)
    emb = embed_patches(_patches(), cfg, source)
    node = _other_node(monkeypatch, online, "node2-cache")
    assert not Path(source.path).exists()
    hub.reset()
    emb2 = embed_patches(_patches(), cfg, source)  # the actor's load: the id at the driver's commit
    assert torch.allclose(torch.from_numpy(emb), torch.from_numpy(emb2), atol=1e-6)
    assert hub.file_gets(CLIP_ID) == dict.fromkeys(CLIP_FILES, 1)
    assert hub.count("GET", f"/{CLIP_ID}/resolve/{commit}/") == len(CLIP_FILES)
    assert hub.count("GET", f"/api/models/{CLIP_ID}/tree/{commit}") == 1  # the pinned listing
    assert hub.count(None, "/main") == 0 and hub.count("GET", f"/api/models/{CLIP_ID}/revision/") == 0
    assert (node / "models--srdistill-test--tiny-clip" / "snapshots" / commit / "model.safetensors").is_file()
    # offline with this node's cache: no request; offline on a third, empty node: a clear error
    _go_offline(monkeypatch)
    hub.reset()
    assert load_clip(source, cfg)[1] == 64 and hub.total() == 0
    _other_node(monkeypatch, node, "node3-cache")
    with pytest.raises(MissingWeightsError) as info:
        load_clip(source, cfg)
    msg = str(info.value)
    assert CLIP_ID in msg and commit in msg and "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert hub.total() == 0
    # a local directory given as such stays as is
    local = resolve_clip(EmbedConfig(model=str(tmp_path / "node2-cache-driver" / "models--srdistill-test--tiny-clip"
                                               / "snapshots" / commit)))
    assert local.repo_id is None and local.revision is None


def test_vit_source_on_another_node_downloads_the_same_commit(online, hub, monkeypatch):
    cfg = ComplexityConfig(model=VIT_BIN_ID, device="cpu")
    source = resolve_vit(cfg)
    commit = hub.repos[VIT_BIN_ID][0]
    assert (source.repo_id, source.revision) == (VIT_BIN_ID, commit)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        features, _ = load_vit(source, cfg)(x)
    _other_node(monkeypatch, online, "node2-cache")
    hub.reset()
    with torch.inference_mode():
        features2, _ = load_vit(source, cfg)(x)
    assert torch.allclose(features, features2, atol=1e-6)
    assert hub.file_gets(VIT_BIN_ID) == {"config.json": 1, "pytorch_model.bin": 1}
    assert hub.count(None, "/main") == 0


def test_dit_and_vae_on_another_node_download_the_same_commit(online, hub, tiny_dit_dir, monkeypatch):
    cfg = FinetuneConfig(dit_path=DIT_ID, vae_path=VAE_ID, resolution=16)
    resolved = resolve_backbone(cfg)  # on the driver: what the actors and workers receive
    dit_commit, vae_commit = hub.repos[DIT_ID][0], hub.repos[VAE_ID][0]
    assert W.snapshot_ref(resolved.dit_path) == (DIT_ID, dit_commit)
    backbone = build_backbone(resolved, num_clusters=3)
    assert (backbone.source["dit_repo"], backbone.source["dit_revision"]) == (DIT_ID, dit_commit)
    assert (backbone.source["vae_repo"], backbone.source["vae_revision"]) == (VAE_ID, vae_commit)
    node = _other_node(monkeypatch, online, "node2-cache")
    assert not Path(resolved.dit_path).exists()
    hub.reset()
    vae = load_vae(resolved)  # PatchEncoder's load
    dit, vae2, schedule = load_dit(resolved.dit_path, resolved.vae_path)  # build_backbone's load
    assert hub.count("GET", f"/{DIT_ID}/resolve/{dit_commit}/") == 3  # transformer/ (2), scheduler/
    assert hub.count("GET", f"/{VAE_ID}/resolve/{vae_commit}/") == 2
    assert hub.count(None, "/main") == 0 and set(hub.file_gets(VAE_ID).values()) == {1}
    ref_dit, ref_vae, ref_schedule = load_dit(tiny_dit_dir)
    assert schedule == ref_schedule
    for model, ref in ((dit, ref_dit), (vae, ref_vae), (vae2, ref_vae)):
        for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-6)
    moved = resolve_backbone(resolved)
    assert moved.dit_path.startswith(str(node)) and W.snapshot_ref(moved.dit_path) == (DIT_ID, dit_commit)
    # offline on a node whose cache lacks them: the ids, named
    _go_offline(monkeypatch)
    _other_node(monkeypatch, node, "node3-cache")
    hub.reset()
    with pytest.raises(MissingBackboneError) as info:
        load_vae(resolved)
    msg = str(info.value)
    assert DIT_ID in msg and dit_commit in msg and "not in the Hugging Face cache" in msg
    assert hub.total() == 0


@pytest.mark.slow
def test_synth_pipeline_by_ids_resolves_on_the_driver_once(online, hub, tmp_path, ray_local, monkeypatch):
    """CLIP, DiT and VAE by id through the whole ``distill: synth`` pipeline: each file is
    downloaded once (the Ray actors and Train workers get local directories), and the rerun
    with ``HF_HUB_OFFLINE=1`` resumes from the cache without a request."""
    from srdistill.config import load_config
    from srdistill.run.pipeline import run_pipeline

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(T91.glob("*.png"))[:4]:
        shutil.copy(f, corpus / f.name)
    cfg = load_config("tiny", overrides=[
        "distill=synth", f"embed.model={CLIP_ID}", f"finetune.dit_path={DIT_ID}", f"finetune.vae_path={VAE_ID}",
        "finetune.resolution=16", "finetune.crop=center", "train.lr_patch=8"])  # fmt: skip
    manifest = run_pipeline(corpus, tmp_path / "run", cfg, log=lambda s: None)
    assert manifest["clip"]["pretrained"] and manifest["clip"]["path"].startswith(str(online))
    assert manifest["stages"]["finetune"]["counts"]["source"]["dit_path"].startswith(str(online))
    assert hub.file_gets(CLIP_ID) == dict.fromkeys(CLIP_FILES, 1)
    assert set(hub.file_gets(DIT_ID).values()) == {1} and set(hub.file_gets(VAE_ID).values()) == {1}
    _go_offline(monkeypatch)
    hub.reset()
    lines: list[str] = []
    run_pipeline(corpus, tmp_path / "run", cfg, log=lines.append)
    assert hub.total() == 0 and not any(line.endswith("running") for line in lines)


# --------------------------------------------------------------------------- --weights URL


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A loopback file server with an ESPCN x2 release file; $SRDISTILL_CACHE in tmp_path."""
    from srdistill.sr.models import build_model

    torch.manual_seed(0)
    path = tmp_path / "espcn_x2.pth"
    torch.save(build_model("espcn", 2).state_dict(), path)
    data = path.read_bytes()
    monkeypatch.setenv("SRDISTILL_CACHE", str(tmp_path / "cache"))
    with FileServer() as server:
        url = server.add("/releases/v1/espcn_x2.pth", data)
        yield server, url, hashlib.sha256(data).hexdigest(), data


def test_weights_url_downloads_once_into_the_cache_and_checks_sha256(release, tmp_path):
    server, url, sha, data = release
    path = W.fetch_weights(f"{url}#sha256={sha}")
    assert path.read_bytes() == data and path.suffix == ".pth"
    assert path.parent == tmp_path / "cache" / "weights"
    assert W.fetch_weights(f"{url}#sha256={sha.upper()}") == path
    assert W.fetch_weights(url) == path  # no hash: the cached copy as it is
    assert server.count("GET", "/releases/v1/espcn_x2.pth") == 1
    wrong = "0" * 64
    with pytest.raises(ValueError) as info:
        W.fetch_weights(f"{url}#sha256={wrong}")
    msg = str(info.value)
    assert url in msg and f"expected {wrong}" in msg and sha in msg
    with pytest.raises(ValueError, match="sha256=<64 hex digits>"):
        W.fetch_weights(f"{url}#md5=abc")
    with pytest.raises(OSError, match="download failed"):
        W.fetch_weights(server.url + "/releases/missing.pth")
    local = tmp_path / "espcn_x2.pth"
    assert W.fetch_weights(str(local)) == local  # paths stay paths


def test_cli_eval_weights_url(release, tmp_path):
    server, url, sha, _ = release
    hr = tmp_path / "hr"
    hr.mkdir()
    for name in ("t1.png", "t2.png"):
        shutil.copy(T91 / name, hr / name)
    args = ["eval", "--model", "espcn", "--dataset", str(hr), "--scale", "2", "--json"]
    for _ in range(2):
        r = CliRunner().invoke(app, [*args, "--weights", f"{url}#sha256={sha}"])
        assert r.exit_code == 0, r.output
        assert '"model": "espcn (espcn_x2.pth)"' in r.output
    assert server.count("GET", "/releases/") == 1
    r = CliRunner().invoke(app, [*args, "--weights", f"{url}#sha256={'f' * 64}"])
    assert r.exit_code == 2 and "sha256 mismatch" in r.output
    r = CliRunner().invoke(app, [*args, "--weights", server.url + "/releases/none.pth"])
    assert r.exit_code == 2 and "download failed" in r.output


def test_repo_id_and_hint_helpers(monkeypatch):
    assert W.is_repo_id("openai/clip-vit-base-patch32") and W.is_repo_id("gpt2")
    for path in ("/models/clip", "./clip", "~/clip", "a/b/c", ""):
        assert not W.is_repo_id(path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert W.hub_offline() and "hf download org/m --include '*.json'" in W.hub_hint("org/m")
    assert W.is_url("https://x.org/w.pth#sha256=00") and not W.is_url("/tmp/w.pth")
