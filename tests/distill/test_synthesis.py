"""Synthesis of the distilled set from the cluster-conditioned diffusion model (SRDD §3.4)."""

from __future__ import annotations

import csv
import json
import math
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn

from srdistill.config import FinetuneConfig, SynthConfig
from srdistill.distill import diffusion, synthesis

from conftest import tiny_vae

# diffusers' DPM-Solver builds its sigmas with np.array(tensor, copy=False) (numpy 2 warns)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

K = 3  # clusters
RES = 16
STEPS = 4
COUNTS = {0: 2, 1: 1, 2: 2}


def _synth_cfg(**kw) -> SynthConfig:
    return SynthConfig(**{"steps": STEPS, "batch_size": 2, "device": "cpu", "seed": 5, **kw})


def _saved_model(kind: str, tiny_dit_dir: Path | None, tmp_path_factory) -> Path:
    """A saved 'fine-tuned' model of backbone ``kind`` (random init; the DiT's class rows are
    perturbed so the clusters differ, as fine-tuning would make them)."""
    if kind == "dit":
        cfg = FinetuneConfig(dit_path=str(tiny_dit_dir), resolution=RES)
    else:
        cfg = FinetuneConfig(resolution=RES, unet_channels=(16, 32))
    bb = diffusion.build_backbone(cfg, K)
    assert bb.kind == kind
    if bb.kind == "dit":
        gen = torch.Generator().manual_seed(1)
        weights = {n: p.detach().clone() for n, p in bb.trainable_parameters().items()}
        for name, w in weights.items():
            if "embedding_table" in name:
                w += torch.randn(w.shape, generator=gen)
    else:
        weights = dict(bb.model.state_dict())
    return diffusion.save_finetuned(bb, tmp_path_factory.mktemp(f"model_{bb.kind}"), weights)


@pytest.fixture(scope="module", params=["dit", "unet"])
def model_dir(request, tmp_path_factory) -> Path:
    """A saved model of each backbone (``_saved_model``)."""
    dit_dir = request.getfixturevalue("tiny_dit_dir") if request.param == "dit" else None
    return _saved_model(request.param, dit_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def backbone(model_dir) -> diffusion.Backbone:
    return diffusion.load_finetuned(model_dir)


@pytest.fixture(scope="module")
def dit_dir(tiny_dit_dir, tmp_path_factory) -> Path:
    """A saved DiT model (4 latent channels + 4 learned-variance channels)."""
    return _saved_model("dit", tiny_dit_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    return _saved_model("unet", None, tmp_path_factory)


@pytest.fixture(scope="module")
def dit_backbone(dit_dir) -> diffusion.Backbone:
    return diffusion.load_finetuned(dit_dir)


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


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++", "ddpm"])
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


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_image_whatever_the_batch(backbone, sampler):
    """ddpm also draws a fresh noise per step: from the image's own generator, not the batch's."""
    labels, seeds = torch.tensor([0, 1, 2, 0]), [10, 11, 12, 13]
    batch = synthesis.sample(backbone, labels, seeds, steps=STEPS, sampler=sampler)
    assert batch.shape == (4, RES, RES, 3) and batch.dtype == np.uint8
    again = synthesis.sample(backbone, labels, seeds, steps=STEPS, sampler=sampler)
    np.testing.assert_array_equal(batch, again)
    singles = np.concatenate([synthesis.sample(backbone, labels[i : i + 1], seeds[i : i + 1], steps=STEPS,
                                               sampler=sampler) for i in range(4)])  # fmt: skip
    assert np.abs(singles.astype(int) - batch).max() <= 1
    shuffled = synthesis.sample(backbone, labels[[3, 1, 0]], [13, 11, 10], steps=STEPS, sampler=sampler)
    assert np.abs(shuffled.astype(int) - batch[[3, 1, 0]]).max() <= 1
    # the seed and the cluster both matter
    assert np.abs(batch[0].astype(int) - batch[3]).max() > 1  # same cluster, other seed
    other = synthesis.sample(backbone, torch.tensor([1]), [10], steps=STEPS, sampler=sampler)[0]
    assert np.abs(batch[0].astype(int) - other).max() > 1  # same seed, other cluster


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++", "ddpm"])
def test_every_sampler_runs(backbone, sampler):
    imgs = synthesis.sample(backbone, torch.tensor([0, 2]), [1, 2], sampler=sampler, steps=STEPS)
    assert imgs.shape == (2, RES, RES, 3) and imgs.dtype == np.uint8
    assert imgs.std() > 0


def test_samplers_differ(backbone):
    a, b, c = (synthesis.sample(backbone, torch.tensor([0]), [1], sampler=s, steps=STEPS)
               for s in ("ddim", "dpm-solver++", "ddpm"))  # fmt: skip
    assert not np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(b, c)


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


# --------------------------------------------------------------------------- SRDD's released sampler (ddpm)


def _evenly_rounded(T: int, n: int) -> list[int]:
    """n timesteps evenly spaced from 0 to T - 1, each rounded to the nearest integer (exact
    rational arithmetic; only used for pairs without half-integer ties)."""
    if n == 1:
        return [0]
    return [round(Fraction(i * (T - 1), n - 1)) for i in range(n)]


@pytest.mark.parametrize("T, n", [(1000, 50), (1000, 25), (1000, 250), (1000, 1000), (1000, 2), (1000, 1),
                                  (100, 10), (10, 10), (4000, 50)])  # fmt: skip
def test_space_timesteps_is_improved_ddpm_respacing(T, n):
    got = synthesis.space_timesteps(T, n)
    assert got == _evenly_rounded(T, n)
    assert len(set(got)) == n and got == sorted(got)
    if n >= 2:
        assert got[0] == 0 and got[-1] == T - 1


def test_space_timesteps_ties_follow_the_float_sum():
    """improved-DDPM sums the stride (T - 1) / (N - 1) in floats and rounds each partial sum:
    for T = 1000, N = 21 the 10th position is 10 x 49.95, which sums to just below 499.5, so
    it rounds to 499 (exact arithmetic would give 499.5 -> 500)."""
    got = synthesis.space_timesteps(1000, 21)
    position = 0.0
    for _ in range(10):
        position += 999 / 20
    assert position < 499.5 and got[10] == 499 == round(position)
    assert _evenly_rounded(1000, 21)[10] == 500
    assert got[:3] == [0, 50, 100] and got[-1] == 999 and len(set(got)) == 21
    with pytest.raises(ValueError, match="1001"):
        synthesis.space_timesteps(1000, 1001)
    with pytest.raises(ValueError):
        synthesis.space_timesteps(1000, 0)


class _ConstDenoiser(nn.Module):
    """A denoiser whose output is the fixed per-class row ``table[label]`` (``(k + 1, out)``)
    broadcast over space, whatever x and t; it records the timesteps it is called with."""

    def __init__(self, table: torch.Tensor, in_channels: int):
        super().__init__()
        self.register_buffer("table", table.float())
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.config = SimpleNamespace(in_channels=in_channels, out_channels=table.shape[1])
        self.calls: list[list[int]] = []

    def forward(self, x, t=None, class_labels=None, timestep=None):
        t = t if timestep is None else timestep
        self.calls.append(t.tolist())
        out = self.table[class_labels][:, :, None, None].expand(-1, -1, *x.shape[2:])
        return SimpleNamespace(sample=out.clone())


def _const_backbone(kind: str, learned: bool, k: int = 2, res: int = 4) -> diffusion.Backbone:
    """``kind`` ``dit``: 4 latent channels (a stand-in VAE config: no downsampling); ``unet``: 3
    pixel channels. Eps rows differ per class; variance rows v in (-1, 1)."""
    c = 4 if kind == "dit" else 3
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn((k + 1, c), generator=gen)
    table = torch.cat([eps, torch.rand((k + 1, c), generator=gen) * 1.8 - 0.9], 1) if learned else eps
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(8,), latent_channels=4)) if kind == "dit" else None
    model = _ConstDenoiser(table, c)
    return diffusion.Backbone(kind, model, vae, dict(diffusion.DEFAULT_SCHEDULE), res, k)


def _reference_ddpm(predict, x_T: torch.Tensor, noises: list[torch.Tensor], timesteps: list[int],
                    guidance: float | None, channels: int | None, clip: bool) -> torch.Tensor:  # fmt: skip
    """Ancestral sampling on the respaced DDPM from the closed forms (Ho et al. 2020 Eq. 7;
    Nichol & Dhariwal 2021 Eq. 15), float64. ``predict(x, t, conditional) -> (eps, v | None)``;
    ``timesteps`` descending; ``noises[i]`` the N(0, 1) of step ``i`` (none at the last)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    x = x_T.double()
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        ab, ab_prev = abar[t], (1.0 if last else abar[timesteps[i + 1]])
        beta = 1.0 - ab / ab_prev  # the respaced beta
        beta_tilde = beta * (1.0 - ab_prev) / (1.0 - ab)
        eps, v = predict(x, t, True)
        if guidance is not None:
            eps_u, _ = predict(x, t, False)
            n = eps.shape[1] if channels is None else channels
            eps = eps.clone()
            eps[:, :n] = eps_u[:, :n] + guidance * (eps[:, :n] - eps_u[:, :n])
        x0 = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        if clip:
            x0 = x0.clamp(-1, 1)
        coef_x0 = math.sqrt(ab_prev) * beta / (1.0 - ab)  # q-posterior mean coefficients
        coef_xt = math.sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab)
        mean = coef_x0 * x0 + coef_xt * x
        if last:
            return mean
        if v is None:
            log_var = torch.full_like(x, math.log(beta_tilde))
        else:
            frac = (v + 1.0) / 2.0
            log_var = frac * math.log(beta) + (1.0 - frac) * math.log(beta_tilde)
        x = mean + torch.exp(0.5 * log_var) * noises[i].double()
    return x


def _noise_stream(shape: tuple[int, ...], seeds: list[int], draws: int) -> list[torch.Tensor]:
    """The per-image random stream: ``draws`` successive N(0, 1) tensors ``(B, *shape)``, image
    ``i``'s all from ``torch.Generator().manual_seed(seeds[i])``."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return [torch.stack([torch.randn(shape, generator=g) for g in gens]) for _ in range(draws)]


@pytest.mark.parametrize("kind, learned, channels", [("dit", True, 3), ("dit", False, 3), ("dit", True, None),
                                                     ("unet", False, None), ("unet", True, 2)])  # fmt: skip
def test_ddpm_steps_are_the_respaced_posterior(kind, learned, channels):
    """A known (constant) model output: each step must be the q-posterior mean of the respaced
    schedule plus exp(log_var / 2) z with the learned-range (or beta~) variance, the model called
    at the original timesteps, z the image's next draw; pixel space clips x0_hat."""
    bb = _const_backbone(kind, learned)
    steps, scale, seeds, labels = 4, 4.0, [3, 4], torch.tensor([0, 1])
    bb.model.calls.clear()
    got = synthesis.denoise_loop(bb, labels, seeds, sampler="ddpm", steps=steps, guidance_scale=scale,
                                 guidance_channels=channels)  # fmt: skip
    timesteps = _evenly_rounded(1000, steps)[::-1]  # [999, 666, 333, 0]
    assert bb.model.calls == [[t] * 4 for t in timesteps]  # the original timesteps, doubled CFG batch
    c = bb.sample_shape[0]
    table = bb.model.table.double()

    def predict(x, t, conditional):
        rows = table[labels] if conditional else table[[bb.null_class] * len(labels)]
        rows = rows[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return rows[:, :c], (rows[:, c:] if learned else None)

    stream = _noise_stream(bb.sample_shape, seeds, steps)
    want = _reference_ddpm(predict, stream[0], stream[1:], timesteps, scale, channels, clip=kind == "unet")
    err = float((got.double() - want).abs().max())
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), err
    # the check can fail: the other variance (beta~ <-> learned range with v = 0) is far off
    other = _reference_ddpm(lambda x, t, cond: (predict(x, t, cond)[0], None if learned else torch.zeros_like(x)),
                            stream[0], stream[1:], timesteps, scale, channels, clip=kind == "unet")  # fmt: skip
    assert float((other - want).abs().max()) > 100 * max(err, 1e-6)


def test_ddpm_single_step_is_the_x0_prediction():
    """N = 1 respaces to the single timestep 0: one deterministic step to x0_hat."""
    bb = _const_backbone("dit", True)
    got = synthesis.denoise_loop(bb, torch.tensor([1]), [9], sampler="ddpm", steps=1, guidance_scale=None)
    abar0 = 1.0 - 1e-4
    eps = bb.model.table[1, :4].double()[None, :, None, None]
    x_T = synthesis.initial_noise(bb.sample_shape, [9]).double()
    assert torch.allclose(got.double(), (x_T - math.sqrt(1 - abar0) * eps) / math.sqrt(abar0), atol=1e-5)


def test_guidance_on_three_channels_over_a_real_dit(dit_backbone):
    """DiT's ``forward_with_cfg`` (SRDD's release): the first 3 eps channels guided, the 4th and
    the variance channels from the conditional output. Reference: the closed-form DDPM over the
    tiny DiT's own ``predict`` outputs."""
    bb = dit_backbone
    assert bb.learned_variance and bb.sample_shape[0] == 4
    labels, seeds, steps, scale = torch.tensor([0, 2]), [5, 6], 3, 4.0
    got = synthesis.denoise_loop(bb, labels, seeds, sampler="ddpm", steps=steps, guidance_scale=scale,
                                 guidance_channels=3)  # fmt: skip
    timesteps = _evenly_rounded(1000, steps)[::-1]
    null = torch.full_like(labels, bb.null_class)

    def predict(x, t, conditional, *, v_from=None):
        eps, v = bb.predict(x.float(), torch.full((len(labels),), t), labels if conditional else null)
        if v_from is not None:  # the variance of the other half (a wrong reference)
            v = bb.predict(x.float(), torch.full((len(labels),), t), null)[1]
        return eps.double(), v.double()

    stream = _noise_stream(bb.sample_shape, seeds, steps)
    want = _reference_ddpm(predict, stream[0], stream[1:], timesteps, scale, 3, clip=False)
    tol = 1e-4 * max(float(want.abs().max()), 1.0)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=tol), float((got - want).abs().max())
    # channel 4 guided too (our default) or the null half's variance: both give other samples
    all4 = _reference_ddpm(predict, stream[0], stream[1:], timesteps, scale, None, clip=False)
    uncond_v = _reference_ddpm(lambda x, t, c: predict(x, t, c, v_from="null"), stream[0], stream[1:],
                               timesteps, scale, 3, clip=False)  # fmt: skip
    assert (got.double() - all4).abs().max() > 100 * tol
    assert (got.double() - uncond_v).abs().max() > 100 * tol


def test_apply_guidance_channels():
    gen = torch.Generator().manual_seed(0)
    c, u = torch.randn((2, 4, 3, 3), generator=gen), torch.randn((2, 4, 3, 3), generator=gen)
    g3 = synthesis.apply_guidance(c, u, 4.0, 3)
    assert torch.allclose(g3[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]))
    assert torch.equal(g3[:, 3], c[:, 3])
    assert torch.allclose(synthesis.apply_guidance(c, u, 4.0), u + 4.0 * (c - u))
    assert torch.allclose(synthesis.apply_guidance(c, u, 4.0, 4), synthesis.apply_guidance(c, u, 4.0))
    with pytest.raises(ValueError, match="guidance_channels 5"):
        synthesis.apply_guidance(c, u, 4.0, 5)


def test_bad_guidance_channels_raise(backbone, model_dir, tmp_path):
    c = backbone.sample_shape[0]
    with pytest.raises(ValueError, match=f"guidance_channels {c + 1}.*{c}"):
        synthesis.sample(backbone, torch.tensor([0]), [1], steps=2, guidance_channels=c + 1)
    with pytest.raises(ValueError, match=f"guidance_channels {c + 1}"):
        synthesis.synthesize(model_dir, _synth_cfg(guidance_channels=c + 1), tmp_path / "out", {0: 1})
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValidationError):
        SynthConfig(guidance_channels=0)
    with pytest.raises(ValueError, match="1001"):
        synthesis.synthesize(model_dir, _synth_cfg(sampler="ddpm", steps=1001), tmp_path / "out", {0: 1})


def test_ddpm_provenance_records_the_release_settings(model_dir, tmp_path):
    cfg = _synth_cfg(sampler="ddpm", guidance_channels=3)
    synthesis.synthesize(model_dir, cfg, tmp_path / "s", {0: 1, 1: 1})
    meta = json.loads((tmp_path / "s" / "synthesis.json").read_text())
    assert meta["sampler"] == "ddpm" and meta["steps"] == STEPS and meta["guidance_channels"] == 3
    assert meta["timesteps"] == _evenly_rounded(1000, STEPS)[::-1]
    kind = json.loads((model_dir / "backbone.json").read_text())["kind"]
    if kind == "dit":
        assert meta["variance"] == "learned-range"
        assert meta["decoder"]["separate"] is False and meta["decoder"]["vae_path"].endswith("vae")
    else:
        assert meta["variance"] == "fixed-small" and meta["decoder"] is None
    assert all(r["sampler"] == "ddpm" for r in _read_provenance(tmp_path / "s"))
    ddim = _synth_cfg()
    synthesis.synthesize(model_dir, ddim, tmp_path / "d", {0: 1})
    meta = json.loads((tmp_path / "d" / "synthesis.json").read_text())
    assert meta["variance"] is None and meta["guidance_channels"] is None and len(meta["timesteps"]) == STEPS
    assert meta["timesteps"][0] == 999  # trailing


# --------------------------------------------------------------------------- the decoder VAE


def test_decoder_vae_is_the_one_used(dit_dir, dit_backbone, tmp_path):
    bb = dit_backbone
    decoder_dir = tiny_vae(tmp_path / "mse", seed=123)
    decoder = synthesis.load_decoder_vae(str(decoder_dir), bb)
    labels, seeds = torch.tensor([0, 1]), [7, 8]
    z = synthesis.denoise_loop(bb, labels, seeds, sampler="ddpm", steps=STEPS, guidance_channels=3)
    with torch.no_grad():
        by_hand = decoder.decode(z / bb.latent_scale).sample.clamp(-1, 1)
    by_hand = (by_hand.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    got = synthesis.sample(bb, labels, seeds, sampler="ddpm", steps=STEPS, guidance_channels=3, decoder=decoder)
    assert np.abs(got.astype(int) - by_hand).max() <= 1
    training = synthesis.sample(bb, labels, seeds, sampler="ddpm", steps=STEPS, guidance_channels=3)
    assert np.abs(got.astype(int) - training).max() > 10  # another decoder, other pixels

    cfg = _synth_cfg(sampler="ddpm", guidance_channels=3, vae_path=str(decoder_dir))
    synthesis.synthesize(dit_dir, cfg, tmp_path / "out", {0: 1})
    meta = json.loads((tmp_path / "out" / "synthesis.json").read_text())
    assert meta["decoder"] == {"vae_path": str(decoder_dir.resolve()), "separate": True}
    j = synthesis.plan_jobs({0: 1}, cfg.seed)[0]
    png = np.asarray(Image.open(tmp_path / "out" / synthesis.image_name(0, 0))).astype(int)
    ref = synthesis.sample(bb, torch.tensor([0]), [j["seed"]], sampler="ddpm", steps=STEPS, guidance_channels=3,
                           decoder=decoder)[0]  # fmt: skip
    assert np.abs(png - ref).max() <= 1


def test_decoder_vae_errors(dit_backbone, unet_dir, tmp_path):
    odd = tiny_vae(tmp_path / "odd", seed=1, latent_channels=3)
    with pytest.raises(ValueError, match="vae_path.*3 latent channels"):
        synthesis.load_decoder_vae(str(odd), dit_backbone)
    good = tiny_vae(tmp_path / "good", seed=2)
    with pytest.raises(ValueError, match="vae_path.*unet"):
        synthesis.synthesize(unet_dir, _synth_cfg(vae_path=str(good)), tmp_path / "out", {0: 1})
    assert not (tmp_path / "out").exists()  # rejected before anything is written
    with pytest.raises(ValueError, match="vae_path.*unet"):
        synthesis.resolve_decoder(SynthConfig(vae_path=str(good)), "unet")
    assert synthesis.resolve_decoder(SynthConfig(vae_path=str(good)), "dit").vae_path == str(good)
    assert synthesis.resolve_decoder(SynthConfig(), "unet").vae_path is None
    with pytest.raises(diffusion.MissingBackboneError, match="synthesize.vae_path"):
        synthesis.resolve_decoder(SynthConfig(vae_path=str(tmp_path / "absent")), "dit")
    # a Hugging Face id absent from the cache, offline (conftest sets HF_HUB_OFFLINE=1)
    with pytest.raises(diffusion.MissingBackboneError, match="synthesize.vae_path 'srdistill-test/absent-vae'"):
        synthesis.resolve_decoder(SynthConfig(vae_path="srdistill-test/absent-vae"), "dit")
