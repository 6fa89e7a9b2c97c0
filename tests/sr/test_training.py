"""SR training loop, checkpoints, resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from srdistill.config import TrainConfig
from srdistill.sr import imaging
from srdistill.sr.models import build_model
from srdistill.sr.training import load_checkpoint, sample_batch, save_checkpoint, train_sr

from conftest import T91
FILES = [T91 / f"t{i}.png" for i in (1, 2, 3, 4)]  # 197x176 .. 227x188
SMALL = T91 / "t20.png"  # 78x78



def _tiny_cfg(**kw) -> TrainConfig:
    base = dict(
        model="espcn",
        iterations=4,
        batch_size=4,
        lr_patch=16,
        lr=1e-3,
        log_every=1,
        checkpoint_every=2,
        device="cpu",
        seed=3,
    )
    return TrainConfig(**{**base, **kw})


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_sample_batch_pairs_are_matlab_bicubic_and_seeded():
    images = [imaging.read_image(f) for f in FILES]
    lr, hr = sample_batch(images, np.random.default_rng(0), batch_size=6, hr_size=48, scale=3)
    assert lr.shape == (6, 16, 16, 3) and hr.shape == (6, 48, 48, 3)
    assert lr.dtype == hr.dtype == np.uint8
    for i in range(6):
        np.testing.assert_array_equal(lr[i], imaging.imresize(hr[i], 1 / 3))
    lr2, hr2 = sample_batch(images, np.random.default_rng(0), batch_size=6, hr_size=48, scale=3)
    np.testing.assert_array_equal(hr, hr2)
    _, hr3 = sample_batch(images, np.random.default_rng(1), batch_size=6, hr_size=48, scale=3)
    assert not np.array_equal(hr, hr3)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("edsr-baseline", 3, n_resblocks=2, n_feats=8)
    for p in model.parameters():  # move off the init so the check is not trivially satisfied
        p.data.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "m.safetensors"
    save_checkpoint(
        model,
        path,
        arch="edsr-baseline",
        scale=3,
        model_kwargs={"n_resblocks": 2, "n_feats": 8},
        extra={"step": 7, "note": ["a", 1]},
    )
    loaded, meta = load_checkpoint(path)
    assert meta["arch"] == "edsr-baseline" and meta["scale"] == 3 and meta["step"] == 7
    assert meta["model_kwargs"] == {"n_resblocks": 2, "n_feats": 8} and meta["note"] == ["a", 1]
    assert not loaded.training
    x = torch.rand(1, 3, 11, 13)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(ValueError, match=r"bare\.safetensors.*metadata"):
        load_checkpoint(bare)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_checkpoint(junk)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(
            build_model("espcn", 2),
            tmp_path / "x.safetensors",
            arch="espcn",
            scale=2,
            model_kwargs={},
            extra={"scale": 3},
        )


def test_train_sr_writes_model_and_log(tmp_path):
    out = train_sr(
        _tiny_cfg(iterations=3), 2, [*FILES[:2], SMALL], tmp_path / "run", progress=False
    )
    assert out == tmp_path / "run" / "model.safetensors"
    model, meta = load_checkpoint(out)
    assert meta["step"] == 3 and meta["n_train_images"] == 3 and meta["skipped_images"] == []
    assert meta["train_config"]["model"] == "espcn"
    # training moved the weights away from the (bicubic-equivalent) initialisation
    assert model.body[4].weight.abs().sum() > 0
    assert [r["step"] for r in _log(tmp_path / "run")] == [1, 2, 3]


def test_train_sr_skips_images_smaller_than_hr_crop(tmp_path):
    cfg = _tiny_cfg(iterations=1, lr_patch=48)  # HR crop 96 > 78
    out = train_sr(cfg, 2, [FILES[0], SMALL], tmp_path, progress=False)
    _, meta = load_checkpoint(out)
    assert meta["n_train_images"] == 1
    assert meta["skipped_images"][0]["file"] == str(SMALL)
    with pytest.raises(ValueError, match="no training image"):
        train_sr(cfg, 2, [SMALL], tmp_path / "none", progress=False)


def test_resume_continues_from_saved_step_and_matches_uninterrupted(tmp_path):
    interrupted, straight = tmp_path / "a", tmp_path / "b"
    train_sr(_tiny_cfg(iterations=4), 2, FILES, interrupted, progress=False)
    _, last = load_checkpoint(interrupted / "last.safetensors")
    assert last["step"] == 4
    out = train_sr(_tiny_cfg(iterations=7), 2, FILES, interrupted, progress=False)
    steps = [r["step"] for r in _log(interrupted) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # continued at 5, no step redone
    assert [r["resumed_from_step"] for r in _log(interrupted) if "resumed_from_step" in r] == [4]
    resumed, meta = load_checkpoint(out)
    assert meta["step"] == 7

    train_sr(_tiny_cfg(iterations=7), 2, FILES, straight, progress=False)
    reference, _ = load_checkpoint(straight / "model.safetensors")
    assert [r["loss"] for r in _log(straight)] == [r["loss"] for r in _log(interrupted) if "loss" in r]
    for (k, a), b in zip(
        resumed.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)

    # a finished run called again does no step
    train_sr(_tiny_cfg(iterations=7), 2, FILES, interrupted, progress=False)
    assert len(_log(interrupted)) == 8  # 7 steps + the resume record


def test_resume_refuses_other_arch(tmp_path):
    train_sr(_tiny_cfg(iterations=2), 2, FILES, tmp_path, progress=False)
    with pytest.raises(ValueError, match="espcn x2 checkpoint"):
        train_sr(_tiny_cfg(iterations=3), 3, FILES, tmp_path, progress=False)


def test_lr_step_decay_is_logged(tmp_path):
    train_sr(_tiny_cfg(iterations=5, lr=1e-3, lr_decay_every=2), 2, FILES, tmp_path, progress=False)
    assert [r["lr"] for r in _log(tmp_path)] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]


def test_lr_schedules():
    from srdistill.sr.training import lr_at

    cos = _tiny_cfg(iterations=100, lr=1e-3, schedule="cosine", lr_min=1e-5)
    assert lr_at(cos, 0) == pytest.approx(1e-3) and lr_at(cos, 50) == pytest.approx(5.05e-4)
    assert lr_at(cos, 100) == pytest.approx(1e-5)
    multi = _tiny_cfg(iterations=100, lr=2e-4, schedule="multistep", lr_milestones=(10, 20))
    assert [lr_at(multi, s) for s in (9, 10, 19, 20, 99)] == [2e-4, 1e-4, 1e-4, 5e-5, 5e-5]
    floor = _tiny_cfg(lr=4e-4, lr_decay_every=10, lr_min=1e-4)
    assert [lr_at(floor, s) for s in (0, 10, 20, 30)] == [4e-4, 2e-4, 1e-4, 1e-4]
    with pytest.raises(ValueError, match="increasing"):
        _tiny_cfg(schedule="multistep", lr_milestones=(20, 10))


def test_recipes_cover_every_network():
    from srdistill.config import RECIPES, load_config
    from srdistill.sr.models import ARCHS

    assert set(RECIPES) == set(ARCHS)
    for name in ARCHS:
        cfg = load_config(overrides=[f"train.model={name}", "train.iterations=5"], recipe=True).train
        assert cfg.iterations == 5  # explicit options win over the recipe
        assert {k: getattr(cfg, k) for k in RECIPES[name] if k != "iterations"} == {
            k: v for k, v in RECIPES[name].items() if k != "iterations"
        }
    assert load_config(overrides=["train.model=swinir-light"], recipe=True).train.lr_patch == 64


def test_ema_is_the_saved_model_and_resumes_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_sr(_tiny_cfg(iterations=6, ema_decay=0.5), 2, FILES, a, progress=False)
    train_sr(_tiny_cfg(iterations=3, ema_decay=0.5), 2, FILES, b, progress=False)
    train_sr(_tiny_cfg(iterations=6, ema_decay=0.5), 2, FILES, b, progress=False)
    straight, meta = load_checkpoint(a / "model.safetensors")
    resumed, _ = load_checkpoint(b / "model.safetensors")
    raw, _ = load_checkpoint(a / "last.safetensors")  # the raw weights of the last step
    assert meta["ema"] is True
    for (k, x), y, z in zip(straight.state_dict().items(), resumed.state_dict().values(), raw.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(x, z) for x, z in zip(straight.state_dict().values(), raw.state_dict().values()))
    train_sr(_tiny_cfg(iterations=2), 2, FILES, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="without EMA"):
        train_sr(_tiny_cfg(iterations=4, ema_decay=0.5), 2, FILES, tmp_path / "c", progress=False)


def test_grad_clip_and_cpu_amp_fallback(tmp_path, caplog):
    plain = load_checkpoint(train_sr(_tiny_cfg(iterations=3), 2, FILES, tmp_path / "p", progress=False))[0]
    clipped = load_checkpoint(train_sr(_tiny_cfg(iterations=3, grad_clip=1e-9), 2, FILES, tmp_path / "c",
                                       progress=False))[0]  # fmt: skip
    assert any(not torch.equal(x, y) for x, y in zip(plain.state_dict().values(), clipped.state_dict().values()))
    with caplog.at_level("WARNING"):
        amp = load_checkpoint(train_sr(_tiny_cfg(iterations=3, amp="bf16"), 2, FILES, tmp_path / "a",
                                       progress=False))[0]  # fmt: skip
    assert "CUDA only" in caplog.text
    for x, y in zip(plain.state_dict().values(), amp.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # float32 on the CPU, as without amp


def test_periodic_validation_on_set5(tmp_path):
    train_sr(_tiny_cfg(iterations=2, val_every=2, log_every=1), 2, FILES, tmp_path, progress=False)
    log = _log(tmp_path)
    assert "val_psnr_y" not in log[0]
    assert 30.0 < log[1]["val_psnr_y"] < 40.0  # ESPCN starts as (torch) bicubic: about 33 dB
