"""Shared fixtures: the data folders and one local Ray for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # CI clones the repo with ../shared beside it
VENDORED = REPO / "data"
T91 = VENDORED / "T91" / "HR"  # vendored: always present

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED.is_dir(), f"the shared data folder {SHARED} is missing (CI puts it beside the repo)"
    return SHARED


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a loaded 2-core machine
    (OpenMP threads spin against other processes)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, started once and shared by the pipeline tests."""
    from srdistill import runner
    from srdistill.config import RayConfig

    runner.init_ray(RayConfig(num_cpus=2))
    yield
    runner.shutdown_ray()


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory) -> Path:
    """A tiny random-init DiT in the layout of ``facebook/DiT-XL-2-512`` (``transformer/``,
    ``vae/``, ``scheduler/``): 2 blocks of width 16 on 8x8x4 latents of a 2-level VAE, so
    ``finetune.resolution`` 16. Built offline in well under a second."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    root = tmp_path_factory.mktemp("tiny_dit")
    torch.manual_seed(0)
    DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).save_pretrained(root / "transformer")  # fmt: skip
    AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(root / "vae")  # fmt: skip
    DDIMScheduler(beta_schedule="linear").save_pretrained(root / "scheduler")
    return root
