"""Synthesis of the distilled set from the cluster-conditioned diffusion model (SRDD §3.4)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srdistill import diffusion, synthesis
from srdistill.config import FinetuneConfig, SynthConfig

# diffusers' DPM-Solver builds its sigmas with np.array(tensor, copy=False) (numpy 2 warns)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

K = 3  # clusters
RES = 16
STEPS = 4
COUNTS = {0: 2, 1: 1, 2: 2}


def _synth_cfg(**kw) -> SynthConfig:
    return SynthConfig(**{"steps": STEPS, "batch_size": 2, "device": "cpu", "seed": 5, **kw})


@pytest.fixture(scope="module", params=["dit", "unet"])
def model_dir(request, tmp_path_factory) -> Path:
    """A saved 'fine-tuned' model of each backbone (random init; the DiT's class rows are
    perturbed so the clusters differ, as fine-tuning would make them)."""
    if request.param == "dit":
        cfg = FinetuneConfig(dit_path=str(request.getfixturevalue("tiny_dit_dir")), resolution=RES)
    else:
        cfg = FinetuneConfig(resolution=RES, unet_channels=(16, 32))
    bb = diffusion.build_backbone(cfg, K)
    assert bb.kind == request.param
    if bb.kind == "dit":
        gen = torch.Generator().manual_seed(1)
        weights = {n: p.detach().clone() for n, p in bb.trainable_parameters().items()}
        for name, w in weights.items():
            if "embedding_table" in name:
                w += torch.randn(w.shape, generator=gen)
    else:
        weights = dict(bb.model.state_dict())
    return diffusion.save_finetuned(bb, tmp_path_factory.mktemp(f"model_{bb.kind}"), weights)


@pytest.fixture(scope="module")
def backbone(model_dir) -> diffusion.Backbone:
    return diffusion.load_finetuned(model_dir)


def _read_provenance(out: Path) -> list[dict]:
    with open(out / "provenance.csv", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- planning


def test_per_cluster_counts_and_plan():
    assert synthesis.per_cluster_counts(10, 3) == {0: 4, 1: 3, 2: 3}
    assert synthesis.per_cluster_counts(2, 3) == {0: 1, 1: 1, 2: 0}
    assert synthesis.per_cluster_counts(0, 2) == {0: 0, 1: 0}
    with pytest.raises(ValueError):
        synthesis.per_cluster_counts(5, 0)
    jobs = synthesis.plan_jobs({1: 1, 0: 2}, seed=7)
    assert [(j["cluster"], j["index"]) for j in jobs] == [(0, 0), (0, 1), (1, 0)]
    assert [j["seed"] for j in jobs] == [synthesis.image_seed(7, c, i) for c, i in [(0, 0), (0, 1), (1, 0)]]
    assert synthesis.plan_jobs({1: 1, 0: 2}, seed=7) == jobs  # deterministic
    assert len({j["seed"] for j in synthesis.plan_jobs({0: 50, 1: 50}, seed=0)}) == 100
    assert synthesis.image_seed(7, 0, 0) != synthesis.image_seed(8, 0, 0)
    assert 0 <= synthesis.image_seed(7, 0, 0) < 2**32
    assert synthesis.image_name(2, 13) == "c002_i0013.png"


def test_initial_noise_is_per_image():
    a = synthesis.initial_noise((4, 8, 8), [11, 12, 13])
    b = synthesis.initial_noise((4, 8, 8), [13])
    assert a.shape == (3, 4, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])


def test_bad_sampler_raises_naming_it(backbone):
    with pytest.raises(ValueError, match="euler"):
        synthesis.make_scheduler("euler", backbone.schedule, pixel_space=False)
    with pytest.raises(ValueError, match="euler"):
        synthesis.sample(backbone, torch.tensor([0]), [1], sampler="euler", steps=2)


def test_bad_labels_and_seeds_raise(backbone, model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"\[3\]"):
        synthesis.sample(backbone, torch.tensor([0, 3]), [1, 2], steps=2)
    with pytest.raises(ValueError, match="seed"):
        synthesis.sample(backbone, torch.tensor([0, 1]), [1], steps=2)
    with pytest.raises(ValueError, match=r"\[3\]"):
        synthesis.synthesize(model_dir, _synth_cfg(), tmp_path / "out", {0: 1, 3: 1})
    bad = SynthConfig.model_construct(**{**_synth_cfg().model_dump(), "sampler": "heun"})
    with pytest.raises(ValueError, match="heun"):
        synthesis.synthesize(model_dir, bad, tmp_path / "out", {0: 1})
    assert not (tmp_path / "out").exists()  # rejected before anything is written


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_guidance_one_equals_unguided(backbone, sampler):
    """s = 1 runs the doubled CFG batch; eps_u + 1 (eps_c - eps_u) must equal eps_c."""
    labels, seeds = torch.tensor([0, 1, 2]), [3, 4, 5]
    kw = {"sampler": sampler, "steps": STEPS}
    guided1 = synthesis.denoise_loop(backbone, labels, seeds, guidance_scale=1.0, **kw)
    plain = synthesis.denoise_loop(backbone, labels, seeds, guidance_scale=None, **kw)
    assert guided1.shape == (3, *backbone.sample_shape)
    assert torch.isfinite(plain).all()
    scale = float(plain.abs().max())
    assert torch.allclose(guided1, plain, rtol=1e-4, atol=1e-4 * max(scale, 1.0))
    img1 = synthesis.sample(backbone, labels, seeds, guidance_scale=1.0, **kw)
    img_plain = synthesis.sample(backbone, labels, seeds, guidance_scale=None, **kw)
    assert np.abs(img1.astype(int) - img_plain).max() <= 1
    # and the guidance does something: s = 4 is not the conditional prediction
    img4 = synthesis.sample(backbone, labels, seeds, guidance_scale=4.0, **kw)
    assert np.abs(img4.astype(int) - img_plain).max() > 1


def test_same_seed_same_image_whatever_the_batch(backbone):
    labels, seeds = torch.tensor([0, 1, 2, 0]), [10, 11, 12, 13]
    batch = synthesis.sample(backbone, labels, seeds, steps=STEPS)
    assert batch.shape == (4, RES, RES, 3) and batch.dtype == np.uint8
    again = synthesis.sample(backbone, labels, seeds, steps=STEPS)
    np.testing.assert_array_equal(batch, again)
    singles = np.concatenate([synthesis.sample(backbone, labels[i : i + 1], seeds[i : i + 1], steps=STEPS)
                              for i in range(4)])  # fmt: skip
    assert np.abs(singles.astype(int) - batch).max() <= 1
    shuffled = synthesis.sample(backbone, labels[[3, 1, 0]], [13, 11, 10], steps=STEPS)
    assert np.abs(shuffled.astype(int) - batch[[3, 1, 0]]).max() <= 1
    # the seed and the cluster both matter
    assert np.abs(batch[0].astype(int) - batch[3]).max() > 1  # same cluster, other seed
    other = synthesis.sample(backbone, torch.tensor([1]), [10], steps=STEPS)[0]
    assert np.abs(batch[0].astype(int) - other).max() > 1  # same seed, other cluster


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_both_samplers_run(backbone, sampler):
    imgs = synthesis.sample(backbone, torch.tensor([0, 2]), [1, 2], sampler=sampler, steps=STEPS)
    assert imgs.shape == (2, RES, RES, 3) and imgs.dtype == np.uint8
    assert imgs.std() > 0


def test_samplers_differ(backbone):
    a = synthesis.sample(backbone, torch.tensor([0]), [1], sampler="ddim", steps=STEPS)
    b = synthesis.sample(backbone, torch.tensor([0]), [1], sampler="dpm-solver++", steps=STEPS)
    assert not np.array_equal(a, b)


# --------------------------------------------------------------------------- the stage


def test_synthesize_writes_pngs_and_provenance(model_dir, backbone, tmp_path):
    out = tmp_path / "synth"
    cfg = _synth_cfg()
    rows = synthesis.synthesize(model_dir, cfg, out, COUNTS)
    pngs = sorted(p.name for p in out.glob("*.png"))
    plan = synthesis.plan_jobs(COUNTS, cfg.seed)
    expected = sorted(synthesis.image_name(j["cluster"], j["index"]) for j in plan)
    assert pngs == expected and len(pngs) == sum(COUNTS.values())
    for name in pngs:
        with Image.open(out / name) as im:
            assert im.mode == "RGB" and im.size == (RES, RES)
    prov = _read_provenance(out)
    assert [r["file"] for r in prov] == expected
    by_file = {synthesis.image_name(j["cluster"], j["index"]): j for j in plan}
    for r in prov:
        job = by_file[r["file"]]
        assert (int(r["cluster"]), int(r["index"]), int(r["seed"])) == (job["cluster"], job["index"], job["seed"])
        assert (r["sampler"], int(r["steps"]), float(r["guidance_scale"])) == ("ddim", STEPS, 4.0)
    assert [r["file"] for r in rows] == expected
    assert all(r["seconds"] > 0 for r in rows)
    meta = json.loads((out / "synthesis.json").read_text())
    assert meta["backbone"] == backbone.kind and meta["num_clusters"] == K
    assert meta["resolution"] == RES and meta["images"] == 5 and meta["generated"] == 5
    assert meta["counts"] == {"0": 2, "1": 1, "2": 2} and meta["sampler"] == "ddim"
    # the PNG is the image `sample` makes for that (cluster, seed)
    j = plan[3]
    ref = synthesis.sample(backbone, torch.tensor([j["cluster"]]), [j["seed"]], steps=STEPS, guidance_scale=4.0)[0]
    got = np.asarray(Image.open(out / synthesis.image_name(j["cluster"], j["index"])))
    assert np.abs(got.astype(int) - ref).max() <= 1


def test_rerun_skips_existing_and_removes_stale(model_dir, tmp_path):
    out = tmp_path / "synth"
    cfg = _synth_cfg(sampler="dpm-solver++", guidance_scale=2.0)
    synthesis.synthesize(model_dir, cfg, out, COUNTS)
    original = {p.name: p.read_bytes() for p in out.glob("*.png")}
    kept, redo = "c000_i0000.png", "c002_i0001.png"
    marker = np.full((RES, RES, 3), 7, np.uint8)
    Image.fromarray(marker).save(out / kept)  # a rerun must not touch an existing PNG
    (out / redo).unlink()  # ... and must make a missing one again, identically
    (out / ".c001_i0000.png.tmp-123").write_bytes(b"half")  # left by a killed run
    rows = synthesis.synthesize(model_dir, cfg, out, {0: 2, 1: 1, 2: 1})  # c002_i0001 now stale
    np.testing.assert_array_equal(np.asarray(Image.open(out / kept)), marker)
    assert not (out / redo).exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert {r["file"]: r["seconds"] for r in rows}[kept] == 0.0
    assert json.loads((out / "synthesis.json").read_text())["generated"] == 0
    assert len(_read_provenance(out)) == 4
    rows = synthesis.synthesize(model_dir, cfg, out, COUNTS)
    assert (out / redo).read_bytes() == original[redo]
    assert [r["file"] for r in rows if r["seconds"] > 0] == [redo]
    assert all(r["sampler"] == "dpm-solver++" and r["guidance_scale"] == 2.0 for r in rows)


def test_synthesize_through_map_fn(model_dir, tmp_path):
    """The runner's path: jobs as columns, split into batches, each sampled by a separately
    constructed Synthesizer (as Ray Data actors are), rows back with numpy scalars."""
    cfg = _synth_cfg(batch_size=3)
    calls = []

    def map_fn(jobs: dict[str, np.ndarray]) -> list[dict]:
        calls.append({k: v.copy() for k, v in jobs.items()})
        rows = []
        for start in (0, 2):  # two batches of a different split than cfg.batch_size
            part = {k: v[start : start + 2] if start == 0 else v[start:] for k, v in jobs.items()}
            result = synthesis.Synthesizer(str(model_dir), cfg, str(tmp_path / "ray"))(part)
            rows += [dict(zip(result, vals)) for vals in zip(*result.values())]
        return rows[::-1]

    rows = synthesis.synthesize(model_dir, cfg, tmp_path / "ray", COUNTS, map_fn=map_fn)
    assert len(calls) == 1 and set(calls[0]) == {"cluster", "index", "seed"}
    assert [r["file"] for r in rows] == sorted(r["file"] for r in rows)
    assert all(type(r["cluster"]) is int and type(r["file"]) is str for r in rows)
    local = synthesis.synthesize(model_dir, cfg, tmp_path / "local", COUNTS)
    assert [r["file"] for r in local] == [r["file"] for r in rows]
    for r in rows:
        a = np.asarray(Image.open(tmp_path / "ray" / r["file"])).astype(int)
        b = np.asarray(Image.open(tmp_path / "local" / r["file"]))
        assert np.abs(a - b).max() <= 1
    assert (tmp_path / "ray" / "provenance.csv").read_text() == (tmp_path / "local" / "provenance.csv").read_text()

    with pytest.raises(RuntimeError, match="rows"):
        synthesis.synthesize(model_dir, cfg, tmp_path / "short", COUNTS, map_fn=lambda jobs: [])
