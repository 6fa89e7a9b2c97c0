"""A resumed training is announced, logged and keeps counting time; every output is 0644."""

import json
import os
import stat
from pathlib import Path

import pytest

from srdistill.config import FinetuneConfig, TrainConfig
from srdistill.distill import diffusion as D
from srdistill.sr import training
from srdistill.sr.training import load_checkpoint, save_checkpoint, train_sr

from conftest import T91, encoded_set

FILES = [T91 / f"t{i}.png" for i in (1, 2, 3, 4)]
UNET = dict(resolution=16, unet_channels=(16, 32))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _modes(root: Path) -> dict[str, int]:
    """Mode of every file and directory under ``root`` (``root`` itself included)."""
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root)): stat.S_IMODE(os.stat(p).st_mode) for p in paths}


def _assert_public(root: Path) -> None:
    modes = _modes(root)
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o755 if (root / p).is_dir() else 0o644)}
    assert not wrong, wrong


def _tiny_cfg(**kw) -> TrainConfig:
    base = dict(model="espcn", batch_size=4, lr_patch=16, lr=1e-3, log_every=1, checkpoint_every=2,
                device="cpu", seed=3)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_train_resume_is_announced_logged_and_times_carry_on(tmp_path, capsys, umask_022):
    out = tmp_path / "run"
    train_sr(_tiny_cfg(iterations=4), 2, FILES, out, progress=False)
    assert "resuming" not in capsys.readouterr().err
    first = _log(out)
    _, last = load_checkpoint(out / "last.safetensors")
    assert last["step"] == 4 and last["resumed_from"] == []
    assert last["elapsed_s"] >= first[-1]["elapsed_s"] > 0

    final = train_sr(_tiny_cfg(iterations=8), 2, FILES, out, progress=False)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "resuming" in x]
    assert lines == [f"resuming {out / 'last.safetensors'} from step 4 of 8 "
                     f"(elapsed {last['elapsed_s']:.1f} s carried on)"]  # fmt: skip

    log = _log(out)
    records = [r for r in log if "resumed_from_step" in r]
    assert records == [{"step": 4, "resumed_from_step": 4, "iterations": 8,
                        "elapsed_s": last["elapsed_s"], "checkpoint": str(out / "last.safetensors")}]  # fmt: skip
    rows = [r for r in log if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    times = [r["elapsed_s"] for r in rows]
    assert times == sorted(times) and times[4] > first[-1]["elapsed_s"]
    assert times[4] > last["elapsed_s"]  # counted on from the checkpoint, not from 0

    _, meta = load_checkpoint(final)
    assert meta["resumed_from"] == [4] and meta["step"] == 8
    assert meta["elapsed_s"] >= times[-1]
    _, last = load_checkpoint(out / "last.safetensors")
    assert last["resumed_from"] == [4]

    # a finished run called again trains nothing: no announcement, no record
    train_sr(_tiny_cfg(iterations=8), 2, FILES, out, progress=False)
    assert "resuming" not in capsys.readouterr().err
    assert len(_log(out)) == len(log)

    # resumed twice: both steps recorded
    final = train_sr(_tiny_cfg(iterations=10), 2, FILES, out, progress=False)
    assert load_checkpoint(final)[1]["resumed_from"] == [4, 8]
    _assert_public(out)


def test_checkpoint_modes_follow_the_umask(tmp_path):
    net = training.build_model("espcn", 2)
    old = os.umask(0o022)
    try:
        save_checkpoint(net, tmp_path / "a.safetensors", arch="espcn", scale=2, model_kwargs={})
        os.umask(0o027)
        save_checkpoint(net, tmp_path / "b.safetensors", arch="espcn", scale=2, model_kwargs={})
        assert training._umask() == 0o027
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.safetensors").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b.safetensors").st_mode) == 0o640
    assert not list(tmp_path.glob(".*.tmp"))


def test_finetune_resume_is_announced_logged_and_times_carry_on(tmp_path, capsys, umask_022):
    base = dict(**UNET, batch_size=4, log_every=1, checkpoint_every=3, crop="random", lr=1e-3)
    data = encoded_set(tmp_path)
    out = tmp_path / "ft"
    D.finetune(FinetuneConfig(iterations=3, **base), D.build_backbone(FinetuneConfig(**UNET), 3), data,
               out, progress=False)  # fmt: skip
    assert "resuming" not in capsys.readouterr().err
    first = _log(out)
    meta = json.loads((out / "model" / "backbone.json").read_text())
    assert meta["finetune"]["resumed_from"] == [] and meta["finetune"]["step"] == 3

    model = D.finetune(FinetuneConfig(iterations=6, **base), D.build_backbone(FinetuneConfig(**UNET), 3),
                       data, out, progress=False)  # fmt: skip
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "resuming" in x]
    assert len(lines) == 1 and lines[0].startswith(f"resuming {out / 'checkpoint'} from step 3 of 6 (elapsed ")
    assert lines[0].endswith(" s carried on)")

    log = _log(out)
    records = [r for r in log if "resumed_from_step" in r]
    assert len(records) == 1 and records[0]["step"] == 3 and records[0]["iterations"] == 6
    assert records[0]["elapsed_s"] >= first[-1]["elapsed_s"]
    rows = [r for r in log if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    times = [r["elapsed_s"] for r in rows]
    assert times == sorted(times) and times[3] >= records[0]["elapsed_s"] > 0

    meta = json.loads((model / "backbone.json").read_text())
    assert meta["finetune"]["resumed_from"] == [3] and meta["finetune"]["step"] == 6
    assert meta["finetune"]["elapsed_s"] >= times[-1]
    D.load_finetuned(model)  # the extra key does not disturb loading
    _assert_public(out)
