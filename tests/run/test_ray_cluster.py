"""``ray job submit --working-dir . -- python ray_jobs/distill.py ...`` against a running cluster.

The module fixture starts a real multi-node Ray cluster on this machine with the venv's ``ray``
CLI: a head node (GCS, dashboard and job server) with ``--num-cpus 0``, so it runs only the
job's driver, and two worker nodes (``ray start --address HEAD --num-cpus 1``). The job's tasks
therefore get exactly 2 worker processes, one per worker node. The nodes are started with the
venv's ``bin`` first on ``PATH``: that is the "cluster image with srdistill installed" option of
the README (the job's ``python`` has srdistill's dependencies; the submitted ``--working-dir``
supplies the code).

Teardown: ``ray stop`` would kill every Ray process on the machine (it matches process names),
including the session's ``ray_local`` of ``conftest.py``. Instead each ``ray start`` runs in a
new session (``setsid``) and teardown SIGKILLs (what ``ray stop --force`` sends) only the
processes of those sessions and any process naming the cluster's temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, T91, free_port, kill_ray_processes

pytestmark = pytest.mark.slow

RAY_CLI = Path(sys.executable).with_name("ray")
if not RAY_CLI.is_file():
    pytest.skip(f"the ray CLI is not installed beside {sys.executable}", allow_module_level=True)

#: What the job needs on every node. ``SRDISTILL_DATA``: the evaluation sets, since the upload
#: excludes ``data/`` (see ``EXCLUDES``).
JOB_ENV = {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "SRDISTILL_DATA": str(REPO / "data")}
EXCLUDES = ["/data/"]  # 15 MB of images the job does not read from the package; the rest is code


@dataclass(frozen=True)
class Cluster:
    gcs_port: int
    dashboard: str  # http://127.0.0.1:PORT, the job server
    temp_dir: Path
    env: dict  # environment for the ray CLI


def _ray(env: dict, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY_CLI), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def ray_cluster():
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: unix socket paths <= 107
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{RAY_CLI.parent}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    gcs, dash = free_port(), free_port()
    common = ["--disable-usage-stats", "--object-store-memory", str(100 * 2**20),
              "--dashboard-agent-listen-port"]  # fmt: skip
    sessions: set[int] = set()

    def start(*args: str) -> None:
        proc = subprocess.Popen([str(RAY_CLI), "start", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        sessions.add(proc.pid)  # the session id of everything it spawns
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]

    try:
        start("--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
              "--include-dashboard", "true", "--num-cpus", "0", "--temp-dir", str(temp_dir),
              "--ray-client-server-port", str(free_port()), *common, str(free_port()))  # fmt: skip
        for i in (1, 2):  # a temp dir per node, as on separate machines: each node's runtime-env
            # agent deletes the working_dir copies it no longer uses, the driver's cwd included
            start("--address", f"127.0.0.1:{gcs}", "--num-cpus", "1", "--temp-dir", str(temp_dir / f"w{i}"),
                  *common, str(free_port()))  # fmt: skip
        yield Cluster(gcs, f"http://127.0.0.1:{dash}", temp_dir, env)
    finally:
        kill_ray_processes(sessions, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _alive_nodes(cluster: Cluster) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=cluster.dashboard, raise_on_missing_output=False)
            if n.state == "ALIVE"]  # fmt: skip


def test_ray_job_submit_runs_the_pipeline_on_the_cluster(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_tasks

    nodes = _alive_nodes(ray_cluster)
    assert len(nodes) == 3, nodes
    head = [n.node_id for n in nodes if n.is_head_node]
    workers = {n.node_id for n in nodes if not n.is_head_node}
    assert len(head) == 1 and len(workers) == 2
    assert sum(n.resources_total.get("CPU", 0) for n in nodes) == 2

    images = tmp_path / "in"
    images.mkdir()
    for f in sorted(T91.glob("*.png"))[:3]:
        shutil.copy(f, images / f.name)
    config = tmp_path / "cfg.yaml"  # merged over --preset tiny
    config.write_text("cluster:\n  k: 2\ntrain:\n  iterations: 4\n  checkpoint_every: 4\n")
    out = tmp_path / "run"
    sub_id = f"srdistill-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": EXCLUDES, "env_vars": JOB_ENV}
    started = time.monotonic()
    proc = _ray(
        ray_cluster.env, "job", "submit", "--address", ray_cluster.dashboard, "--submission-id", sub_id,
        "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "ray_jobs/distill.py", "--input", str(images), "--out", str(out), "--preset", "tiny",
        "--config", str(config), "--allow-random-init",
        cwd=REPO, timeout=300,
    )  # fmt: skip
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    print(f"job {sub_id}: {time.monotonic() - started:.1f} s")

    client = JobSubmissionClient(ray_cluster.dashboard)
    info = client.get_job_info(sub_id)
    assert info.status == JobStatus.SUCCEEDED, info.message

    # The run: every stage done, the --config values applied over the preset.
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["stages"]
    assert {"mine", "embed", "cluster", "select", "train", "evaluate", "report"} <= set(stages)
    assert all(s["status"] == "done" for s in stages.values()), stages
    assert manifest["preset"] == "tiny" and manifest["config"]["train"]["iterations"] == 4
    assert manifest["config"]["cluster"]["k"] == 2
    assert (out / "evaluate" / "results.json").is_file()

    # It ran on this cluster: the driver joined it (no local Ray of its own); Ray's own log
    # lines go to the run's run.log, not to the console (the job's driver log)
    ray_log = (out / "run.log").read_text()
    assert "Connecting to existing Ray cluster at address: " in ray_log, ray_log[-3000:]
    assert f":{ray_cluster.gcs_port}" in ray_log
    assert "Started a local Ray instance" not in ray_log
    assert "Connecting to existing Ray cluster" not in client.get_job_logs(sub_id)
    assert info.driver_node_id == head[0]
    # ... and its tasks ran on the worker nodes (the head has no CPU).
    tasks = list_tasks(address=ray_cluster.dashboard, filters=[("job_id", "=", info.job_id)],
                       limit=10_000, raise_on_missing_output=False)  # fmt: skip
    ran_on = {t.node_id for t in tasks if t.type == "NORMAL_TASK" and t.state == "FINISHED"}
    assert ran_on and ran_on <= workers, (ran_on, workers)

    # The upload: code only (.gitignore drops .venv/ and runs/, EXCLUDES drops data/).
    pkg = _packages(ray_cluster.temp_dir)
    assert len(pkg) == 1, pkg
    names = {p.name for p in pkg[0].iterdir()}
    assert {"srdistill", "ray_jobs", "pyproject.toml"} <= names
    assert not names & {".venv", "runs", "data", ".git"}, names
    size = sum(f.stat().st_size for f in pkg[0].rglob("*") if f.is_file())
    print(f"working_dir package: {size / 2**20:.2f} MiB unpacked")
    assert size < 5 * 2**20, f"{size / 2**20:.1f} MiB uploaded: .gitignore or exclude what the job does not need"


def _packages(temp_dir: Path) -> list[Path]:
    """The unpacked ``working_dir`` packages of the cluster (one per distinct upload)."""
    root = temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    return [p for p in root.glob("_ray_pkg_*") if p.is_dir()]
