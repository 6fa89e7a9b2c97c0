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
