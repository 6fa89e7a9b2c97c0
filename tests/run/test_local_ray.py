"""Local means local: ``srdistill run`` starts its own Ray unless given ``--address`` /
``$RAY_ADDRESS``, whatever Ray cluster a ``ray start --head`` left on the machine.

A plain ``ray.init()`` joins the cluster named in ``<ray temp dir>/ray_current_cluster`` (written
by ``ray start``) and then refuses ``num_cpus`` ("When connecting to an existing cluster,
num_cpus and num_gpus must not be provided"). The fixture starts such a head with its temp dir
under a private ``RAY_TMPDIR`` (so no other Ray on this machine sees its address file) and the
runs below share that ``RAY_TMPDIR``: exactly the situation of a user after ``ray start --head``.
Teardown kills only the head's processes (its own session, and any process naming its temp
dir); ``ray stop`` would kill every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import T91, free_port, kill_ray_processes

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
if not (BIN / "ray").is_file() or not (BIN / "srdistill").is_file():
    pytest.skip(f"the ray and srdistill commands are not installed beside {sys.executable}", allow_module_level=True)


@pytest.fixture(scope="module")
def head():
    """``ray start --head`` (1 CPU) with ``RAY_TMPDIR`` private: yields ``(port, env)``, the
    environment every command of the test runs in (the same ``RAY_TMPDIR``)."""
    tmp = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # short: unix socket paths <= 107
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    port = free_port()
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "1",
                             "--include-dashboard", "false", "--disable-usage-stats",
                             "--object-store-memory", str(100 * 2**20), "--dashboard-agent-listen-port",
                             str(free_port()), "--ray-client-server-port", str(free_port())],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        assert (tmp / "ray" / "ray_current_cluster").read_text().strip().endswith(f":{port}")
        yield port, env
    finally:
        kill_ray_processes({proc.pid}, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for f in sorted(T91.glob("*.png"))[:3]:
        shutil.copy(f, root / f.name)
    return root


def _run(env: dict, corpus: Path, out: Path, *extra: str) -> dict:
    """``srdistill run --until mine`` in a subprocess; its manifest."""
    cmd = [str(BIN / "srdistill"), "run", "--input", str(corpus), "--out", str(out), "--preset", "tiny",
           "--allow-random-init", "--until", "mine", *extra]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads((out / "manifest.json").read_text())


def test_a_run_starts_its_own_ray_beside_a_running_head(head, corpus, tmp_path):
    port, env = head
    ray_info = _run(env, corpus, tmp_path / "local")["ray"]
    assert ray_info["mode"] == "local"
    assert not ray_info["gcs_address"].endswith(f":{port}")  # not the head's GCS
    assert ray_info["resources"]["CPU"] == 2.0  # the tiny preset's ray.num_cpus, not the head's 1


def test_address_joins_the_head(head, corpus, tmp_path):
    port, env = head
    ray_info = _run(env, corpus, tmp_path / "joined", "--address", f"127.0.0.1:{port}")["ray"]
    assert ray_info["mode"] == "joined" and ray_info["gcs_address"].endswith(f":{port}")
    assert ray_info["resources"]["CPU"] == 1.0  # the head's CPU; num_cpus was not passed
    ray_info = _run({**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, corpus, tmp_path / "env")["ray"]
    assert ray_info["mode"] == "joined" and ray_info["gcs_address"].endswith(f":{port}")
