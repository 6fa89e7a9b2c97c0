"""Packaging users can live with: ranges (no pins) in the dependencies, the coreset path without
diffusers/DeepSpeed, one faiss build per extra, a version, a licence and a citation."""

from __future__ import annotations

import re

import pytest
import yaml
from typer.testing import CliRunner

import srdistill
from srdistill.cli import app

from conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


def test_dependencies_are_ranges_and_the_pins_live_in_the_ci_constraints():
    pinned = [d for d in PROJECT["dependencies"] if "==" in d]
    assert not pinned, f"exact pins in [project.dependencies]: {pinned} (pins go to .ci/constraints.txt)"
    constraints = (REPO / ".ci" / "constraints.txt").read_text()
    assert re.search(r"^torch==[\d.]+$", constraints, re.M) and re.search(r"^ray==[\d.]+$", constraints, re.M)


def test_extras_split_the_heavy_parts_off_the_coreset_path():
    core = {_name(d) for d in PROJECT["dependencies"]}
    extras = {k: {_name(d) for d in v} for k, v in PROJECT["optional-dependencies"].items()}
    assert not core & {"diffusers", "deepspeed", "accelerate", "faiss-cpu", "faiss-gpu", "kopf"}
    assert {"diffusers", "deepspeed", "accelerate"} <= extras["synth"]
    assert extras["cpu"] == {"faiss-cpu"} and extras["gpu"] == {"faiss-gpu"}  # one build each
    assert "kopf" in extras["k8s"]
    assert any(d.startswith("srdistill[") and "cpu" in d and "synth" in d for d in PROJECT["optional-dependencies"]["dev"])


def test_version_licence_and_citation():
    assert srdistill.__version__ == PROJECT["version"]
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"srdistill {PROJECT['version']}"
    assert PROJECT["license"] == "Apache-2.0" and "Apache License" in (REPO / "LICENSE").read_text()[:200]
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["license"] == PROJECT["license"] and cff["version"] == PROJECT["version"]
    titles = " ".join(ref["title"] for ref in cff["references"])
    for paper in ("Super-Resolution without Class Labels", "Zero-Shot Super-Resolution", "Distribution-aware"):
        assert paper in titles  # SRDD, MZSR, TripleD
