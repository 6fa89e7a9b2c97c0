"""Two-stage curriculum (TripleD step 4): the split, the stage-2 pool, the scores, and train_sr."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from srdistill.config import CurriculumConfig, TrainConfig
from srdistill.sr import imaging
from srdistill.sr.curriculum import Schedule, image_complexity, per_image_loss, split_easy, stage2_pool, switch_step
from srdistill.sr.image_stats import image_statistics
from srdistill.sr.models import build_model
from srdistill.sr.training import DataParallel, load_checkpoint, sample_batch, train_sr

#: Texture amplitude of each synthetic image (grad_energy grows with it): easy = the 4 lowest.
AMPS = [40, 0, 80, 5, 60, 10, 20]
EASY = [1, 3, 5, 6]


PLAIN = dict(model="espcn", iterations=12, batch_size=2, lr_patch=8, lr=1e-3, log_every=1,
             checkpoint_every=2, device="cpu", seed=5)  # fmt: skip


def _cfg(**kw) -> TrainConfig:
    """12 steps of ESPCN x2 on 16-pixel HR crops, the switch after step 6."""
    cur = dict(enabled=True, switch=0.5, easy_fraction=0.5, uncertain_fraction=0.25)
    return TrainConfig(**{**PLAIN, "curriculum": cur, **kw})


def _image(i: int, amp: int, side: int = 24) -> np.ndarray:
    """(side, side, 3) uint8: red = 20 + 30 i (identifies the image), green/blue = grey 128
    plus uniform noise of amplitude ``amp``."""
    rng = np.random.default_rng(i)
    img = np.full((side, side, 3), 128, dtype=np.int64)
    img[..., 0] = 20 + 30 * i
    img[..., 1:] += rng.integers(-amp, amp + 1, size=(side, side, 2))
    return img.astype(np.uint8)


@pytest.fixture
def files(tmp_path) -> list[Path]:
    """The 7 ``AMPS`` images as PNGs, with a 10x10 one (smaller than the 16-pixel HR crop: skipped)
    in 4th place, so the indices of the usable images differ from those of the list."""
    folder = tmp_path / "images"
    folder.mkdir()
    out = []
    for i, amp in enumerate(AMPS):
        out.append(folder / f"img{i}.png")
        imaging.write_png(out[-1], _image(i, amp))
    imaging.write_png(folder / "small.png", _image(9, 50, side=10))
    return [*out[:3], folder / "small.png", *out[3:]]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _weights(path: Path) -> list[torch.Tensor]:
    return list(load_checkpoint(path)[0].state_dict().values())


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# --------------------------------------------------------------------------- the rules


def test_split_easy_takes_the_lowest_scores_rounded_half_up():
    easy = split_easy(np.array([5.0, 1.0, 3.0, 1.0, 9.0, 7.0]), 0.5)  # 3 easy: 1, 1 (ties by index), 3
    assert easy.tolist() == [False, True, True, True, False, False]
    assert split_easy(np.full(4, 2.0), 0.5).tolist() == [True, True, False, False]
    assert split_easy(np.arange(5.0), 0.5).sum() == 3  # 2.5 -> 3
    assert split_easy(np.arange(5.0), 0.7).sum() == 4  # 3.5 -> 4 (0.7 * 5 is 3.4999... in floats)
    assert split_easy(np.arange(5.0), 0.3).sum() == 2  # 1.5 -> 2
    assert split_easy(np.arange(5.0), 0.01).tolist() == [True, False, False, False, False]  # >= 1 easy
    assert split_easy(np.arange(5.0)[::-1], 0.99).tolist() == [False, True, True, True, True]  # >= 1 hard
    assert split_easy(np.array([3.0]), 0.5).tolist() == [True]  # a single image is easy ...
    assert stage2_pool(np.array([True]), np.array([0.0]), 0.0).tolist() == [0]  # ... and in stage 2
    for bad in (np.array([]), np.array([1.0, np.nan])):
        with pytest.raises(ValueError, match="finite"):
            split_easy(bad, 0.5)
    with pytest.raises(ValueError, match="easy_fraction"):
        split_easy(np.arange(3.0), 1.0)


def test_stage2_pool_keeps_the_hard_and_the_worst_fitted_easy_images():
    easy = np.array([True, True, True, True, False, False])
    losses = np.array([0.1, 0.5, 0.3, 0.5, 0.0, 9.0])  # hard losses play no part
    assert stage2_pool(easy, losses, 0.5).tolist() == [1, 3, 4, 5]  # k = 2: the two 0.5
    assert stage2_pool(easy, losses, 0.25).tolist() == [1, 4, 5]  # k = 1: tie -> lower index
    assert stage2_pool(easy, losses, 0.6).tolist() == [1, 3, 4, 5]  # k = 2.4 -> 2
    assert stage2_pool(easy, losses, 0.625).tolist() == [1, 2, 3, 4, 5]  # k = 2.5 -> 3
    assert stage2_pool(easy, losses, 0.0).tolist() == [4, 5]
    assert stage2_pool(easy, losses, 1.0).tolist() == [0, 1, 2, 3, 4, 5]
    nan_first = np.array([np.nan, 0.5, 0.3, 0.5, 0.0, 0.0])
    assert stage2_pool(easy, nan_first, 0.25).tolist() == [0, 4, 5]  # NaN counts as the highest
    assert stage2_pool(easy, losses, 0.5).dtype == np.int64
    with pytest.raises(ValueError, match="shapes"):
        stage2_pool(easy, losses[:3], 0.5)
    with pytest.raises(ValueError, match="uncertain_fraction"):
        stage2_pool(easy, losses, 1.5)


def test_switch_step_rounds_and_leaves_both_stages_a_step():
    def at(iterations, switch):
        return switch_step(_cfg(iterations=iterations, curriculum=dict(enabled=True, switch=switch)))

    assert at(10, 0.5) == 5 and at(5, 0.5) == 3 and at(2, 0.5) == 1
    assert at(10, 0.01) == 1 and at(10, 0.99) == 9 and at(1, 0.5) == 1


def test_schedule_draws_easy_images_then_the_pool(files):
    paths = [f for f in files if f.name != "small.png"]
    images = [imaging.read_image(f) for f in paths]
    schedule = Schedule.plan(_cfg(), paths, images)
    assert schedule.switch_step == 6 and np.flatnonzero(schedule.easy).tolist() == EASY
    rng = np.random.default_rng(0)
    for step in range(6):  # every crop of stage 1 comes from an easy image (red identifies it)
        _, hr = sample_batch([images[i] for i in schedule.indices_at(step)], rng, batch_size=4, hr_size=16, scale=2)
        assert {(int(c[0, 0, 0]) - 20) // 30 for c in hr} <= set(EASY)
    with pytest.raises(RuntimeError, match="not built"):
        schedule.indices_at(6)
    assert schedule.needs_pool(6) and not schedule.needs_pool(5)
    losses = np.array([0.0, 0.1, 0.0, 0.4, 0.0, 0.2, 0.3])
    assert schedule.build_pool(losses).tolist() == [0, 2, 3, 4]  # hard + easy image 3 (loss 0.4)
    assert schedule.indices_at(11).tolist() == [0, 2, 3, 4] and not schedule.needs_pool(6)
    assert schedule.summary() == {"switch_step": 6, "easy": EASY, "pool": [0, 2, 3, 4]}
    with pytest.raises(ValueError, match="does not fit"):
        schedule.restore_pool([3, 7])


# --------------------------------------------------------------------------- scores and losses


def _provenance(folder: Path, rows: list[dict]) -> None:
    with open(folder / "provenance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_image_complexity_reads_provenance_else_computes(tmp_path, files):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i in range(3):
        imaging.write_png(a / f"p{i}.png", _image(i, AMPS[i]))
        imaging.write_png(b / f"q{i}.png", _image(i, AMPS[i]))
    # values that no image would give, rows out of order, one file without a value
    _provenance(a, [{"file": "p2.png", "patch_id": "x2", "grad_energy": "7.5", "vit_complexity": "0.25"},
                    {"file": "p0.png", "patch_id": "x0", "grad_energy": "-1", "vit_complexity": "0.5"},
                    {"file": "p1.png", "patch_id": "x1", "grad_energy": "", "vit_complexity": "1e-3"}])  # fmt: skip
    paths = [a / "p0.png", b / "q1.png", a / "p2.png", a / "p1.png"]
    computed = [image_statistics(imaging.read_image(p)) for p in paths]
    got = image_complexity(paths, "grad_energy")
    assert got.dtype == np.float64 and got.shape == (4,)
    assert got.tolist() == [-1.0, computed[1]["grad_energy"], 7.5, computed[3]["grad_energy"]]
    assert image_complexity(paths, "entropy").tolist() == [c["entropy"] for c in computed]  # no such column
    assert image_complexity([a / "p1.png", a / "p0.png"], "vit_complexity").tolist() == [1e-3, 0.5]
    images = [np.zeros((4, 4, 3), np.uint8)] * 4  # given arrays are scored instead of the files
    assert image_complexity(paths, "grad_energy", images=images).tolist() == [-1.0, 0.0, 7.5, 0.0]

    with pytest.raises(ValueError, match=r"q1\.png.*b/provenance\.csv is missing.*select\.method=tripled"):
        image_complexity(paths, "vit_complexity")
    _provenance(b, [{"file": "q0.png", "vit_complexity": "0.1"}])
    with pytest.raises(ValueError, match=r"q1\.png.*b/provenance\.csv has no value.*tripled"):
        image_complexity(paths, "vit_complexity")
    _provenance(b, [{"file": "q1.png", "vit_complexity": "high"}])
    with pytest.raises(ValueError, match="not a number"):
        image_complexity(paths, "vit_complexity")
    with pytest.raises(ValueError, match="not one of"):
        image_complexity(paths, "psnr_bic")
    # train_sr fails before training when vit_complexity is not there
    cfg = _cfg(curriculum=dict(enabled=True, score="vit_complexity"))
    with pytest.raises(ValueError, match="tripled"):
        train_sr(cfg, 2, files, tmp_path / "run", progress=False)


def test_per_image_loss_is_the_l1_of_a_centre_crop_and_restores_the_mode():
    torch.manual_seed(0)
    net = build_model("espcn", 2)
    for p in net.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    images = [_image(0, 0, side=21), _image(1, 60, side=30), _image(2, 5, side=16)]
    losses = per_image_loss(net, images, 2, "cpu", crop=16, batch_size=2)
    assert losses.dtype == np.float64 and losses.shape == (3,) and net.training
    hr = images[1][7:23, 7:23]  # centre of 30: offset 7
    lr = imaging.imresize(hr, 1 / 2)
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255
    y = torch.from_numpy(np.ascontiguousarray(hr)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = F.l1_loss(net.eval()(x), y).item()
    assert not net.training  # stays in eval mode after a call made in eval mode
    np.testing.assert_allclose(losses[1], expected, rtol=1e-5)
    # another batch size is another summation order: equal to float32 rounding, not bitwise
    np.testing.assert_allclose(per_image_loss(net, images, 2, "cpu", crop=16), losses, rtol=1e-5)
    assert losses[1] > 2 * max(losses[0], losses[2])  # the noisy image is fitted worst
    with pytest.raises(ValueError, match="multiple of scale"):
        per_image_loss(net, images, 2, "cpu", crop=15)
    with pytest.raises(ValueError, match=r"\[2\] are smaller"):
        per_image_loss(net, images, 2, "cpu", crop=18)


# --------------------------------------------------------------------------- in train_sr


def test_train_sr_trains_on_the_easy_images_then_on_the_pool(tmp_path, files):
    run = tmp_path / "curriculum"
    _, meta = load_checkpoint(train_sr(_cfg(), 2, files, run, progress=False))
    usable = [f for f in files if f.name != "small.png"]
    cur = meta["curriculum"]
    assert cur["switch_step"] == 6 and cur["easy"] == EASY and meta["n_train_images"] == 7
    pool = cur["pool"]
    log = _log(run)
    assert log[0] == {"step": 0, "curriculum_stage": 1, "images": 7, "easy": 4, "switch_step": 6}
    switch = [r for r in log if r.get("curriculum_stage") == 2]
    assert len(switch) == 1 and log.index(switch[0]) == 7  # after the metrics of step 6
    assert {k: switch[0][k] for k in ("step", "pool", "easy", "uncertain")} == {
        "step": 6, "pool": len(pool), "easy": 4, "uncertain": 1}  # fmt: skip

    # The same training done by hand: 6 steps on the easy files only, then (resuming, so the
    # sampler continues) 6 on the pool files only. Bit-identical weights and losses show that
    # train_sr drew every crop of stage 1 from the easy images and of stage 2 from the pool.
    by_hand = tmp_path / "by_hand"
    plain = dict(curriculum=CurriculumConfig())
    train_sr(_cfg(iterations=6, **plain), 2, [usable[i] for i in EASY], by_hand, progress=False)
    at_switch, _ = load_checkpoint(by_hand / "model.safetensors")
    losses = per_image_loss(at_switch, [imaging.read_image(f) for f in usable], 2, "cpu", crop=16)
    easy = np.isin(np.arange(7), EASY)
    assert pool == stage2_pool(easy, losses, 0.25).tolist()
    assert set(pool) - set(EASY) == {0, 2, 4}  # every hard image ...
    assert set(pool) & set(EASY) == {EASY[int(np.argmax(losses[EASY]))]}  # ... + the worst-fitted easy one
    train_sr(_cfg(iterations=12, **plain), 2, [usable[i] for i in pool], by_hand, progress=False)
    _assert_same(_weights(run / "model.safetensors"), _weights(by_hand / "model.safetensors"))
    assert [r["loss"] for r in log if "loss" in r] == [r["loss"] for r in _log(by_hand) if "loss" in r]
    np.testing.assert_allclose(switch[0]["easy_loss"], losses[easy].mean(), rtol=1e-12)


class _Stop(Exception):
    """Raised by the report hook to interrupt a run right after a checkpoint."""


def _stop_at(step: int) -> DataParallel:
    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        if metrics["step"] == step:
            raise _Stop(step)

    return DataParallel(report=report)


def test_resume_before_and_after_the_switch_matches_an_uninterrupted_run(tmp_path, files):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_sr(_cfg(), 2, files, straight, progress=False)
    for stop in (4, 8):  # killed before the switch (6), then after it
        with pytest.raises(_Stop):
            train_sr(_cfg(), 2, files, interrupted, progress=False, dp=_stop_at(stop))
    with safe_open(str(interrupted / "last.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta["step"]) == 8
    pool = json.loads(meta["curriculum_pool"])
    train_sr(_cfg(), 2, files, interrupted, progress=False)
    _assert_same(_weights(straight / "model.safetensors"), _weights(interrupted / "model.safetensors"))
    log = _log(interrupted)
    assert [r["loss"] for r in log if "loss" in r] == [r["loss"] for r in _log(straight) if "loss" in r]
    assert [r["curriculum_stage"] for r in log if "curriculum_stage" in r] == [1, 2]  # each stage once
    assert load_checkpoint(interrupted / "model.safetensors")[1]["curriculum"]["pool"] == pool

    # A run resumed past the switch takes the saved pool as it is (here: altered), not a new one.
    other = tmp_path / "other"
    other.mkdir()
    altered = [i for i in range(7) if i not in pool]
    save_file(tensors, str(other / "last.safetensors"), metadata={**meta, "curriculum_pool": json.dumps(altered)})
    _, final = load_checkpoint(train_sr(_cfg(), 2, files, other, progress=False))
    assert final["curriculum"]["pool"] == altered
    assert not [r for r in _log(other) if "curriculum_stage" in r]
    assert any(not torch.equal(x, y) for x, y in zip(_weights(other / "model.safetensors"),
                                                     _weights(straight / "model.safetensors")))  # fmt: skip


def test_disabled_curriculum_trains_as_without_it(tmp_path, files):
    off = CurriculumConfig(enabled=False, switch=0.2, score="vit_complexity")  # not read when off
    a = train_sr(_cfg(curriculum=off), 2, files, tmp_path / "off", progress=False)
    b = train_sr(TrainConfig(**PLAIN), 2, files, tmp_path / "plain", progress=False)  # field not set
    _assert_same(_weights(a), _weights(b))
    assert not [r for r in _log(tmp_path / "off") if "curriculum_stage" in r]
    assert "curriculum" not in load_checkpoint(a)[1]
    with safe_open(str(tmp_path / "off" / "last.safetensors"), framework="pt") as f:
        assert "curriculum_pool" not in f.metadata()
