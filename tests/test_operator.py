"""The operator (operators/srdistill_operator.py), run for real (``kopf run`` in a subprocess)
against kmock's Kubernetes API emulator on loopback, with the run manifest in moto's S3.

The emulator stands in for the API server (objects, watches, merge/JSON patches, finalizers);
a test plays KubeRay by writing the RayJob's status. What it lacks is stamped on by ``ApiServer``
below (uid, resourceVersion, creationTimestamp, generation on create); it has no garbage
collector, so deletion relies on the operator's own cleanup, which is what is tested.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

kmock = pytest.importorskip("kmock", reason="operator tests need the dev extra (kmock)")
kubernetes = pytest.importorskip("kubernetes", reason="operator tests need the k8s extra")
pytest.importorskip("kopf", reason="operator tests need the k8s extra")

from k8s_schema import validate_custom  # noqa: E402

from srdistill import k8s  # noqa: E402
from srdistill.config import load_config  # noqa: E402
from srdistill.pipeline import Run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPERATOR = REPO / "operators" / "srdistill_operator.py"
INTERVAL_S = 0.3


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus what a real API server does on create: set uid, resourceVersion,
    generation and creationTimestamp, and answer 201 Created (the kubernetes client reads the
    created object only from a 201)."""

    async def _handle(self, request):
        create = request.action == kmock.action.CREATE and isinstance(request.data, dict)
        if create:
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("resourceVersion", "1")
            meta.setdefault("generation", 1)
            meta.setdefault("creationTimestamp", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        response = await super()._handle(request)
        if create and response.status == 200 and not response.prepared:
            response.set_status(201)
        return response


def _declare(emu) -> None:
    verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
    emu.resources[f"{k8s.GROUP}/{k8s.VERSION}/{k8s.PLURAL}"] = kmock.ResourceInfo(
        kind=k8s.KIND, namespaced=True, subresources={"status"}, verbs=verbs)  # fmt: skip
    emu.resources["ray.io/v1/rayjobs"] = kmock.ResourceInfo(
        kind="RayJob", namespaced=True, subresources={"status"}, verbs=verbs)  # fmt: skip
    emu.resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create", "patch"})
    emu.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"get", "list"})


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    """The emulator on a free loopback port, in its own event loop thread; yields the path of a
    kubeconfig that points at it."""
    box: dict = {}
    ready = threading.Event()

    async def serve():
        async with ApiServer() as emu, kmock.Server(emu) as server:
            _declare(emu)
            box["url"], box["stop"], box["loop"] = str(server.url).rstrip("/"), asyncio.Event(), asyncio.get_running_loop()
            ready.set()
            await box["stop"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(30), "the API emulator did not start"
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        f"clusters: [{{name: emu, cluster: {{server: '{box['url']}'}}}}]\n"
        "users: [{name: test, user: {token: test-token}}]\n"
        "contexts: [{name: test, context: {cluster: emu, user: test}}]\n"
    )  # fmt: skip
    yield kubeconfig
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(10)


@pytest.fixture
def api(api_server):
    """A kubernetes CustomObjectsApi on the emulator, and a fresh namespace name for the test."""
    client = kubernetes.config.new_client_from_config(str(api_server))
    return kubernetes.client.CustomObjectsApi(client), f"ns-{uuid.uuid4().hex[:8]}"


class Operator:
    """``kopf run`` of the operator in a subprocess, watching one namespace."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path):
        self.args = [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", namespace, str(OPERATOR)]
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "SRDISTILL_OPERATOR_INTERVAL": str(INTERVAL_S),
                    "SRDISTILL_DEFAULT_IMAGE": "registry.test/srdistill:test-cpu"}  # fmt: skip
        self.log = log
        self.proc = None

    def start(self) -> "Operator":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def operator(api_server, api, s3_server, tmp_path):
    op = Operator(api_server, api[1], tmp_path / "operator.log").start()
    yield op
    op.stop()
    if os.environ.get("SRDISTILL_SHOW_OPERATOR_LOG"):
        print(op.log.read_text())


def _wait(what: str, fn, operator=None, timeout: float = 45.0):
    """Poll ``fn()`` until it returns a truthy value; fail naming ``what`` (and the operator's log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    tail = operator.log.read_text()[-3000:] if operator else ""
    pytest.fail(f"timed out waiting for {what}\n--- operator log ---\n{tail}")


def _spec(s3_server, run: str, **over) -> dict:
    spec = {
        "input": s3_server.uri("corpus/"),
        "output": s3_server.uri(f"runs/{run}"),
        "preset": "tiny",
        "allowRandomInit": True,
        "config": {"train": {"iterations": 20}},
        "cluster": {"s3Secret": "s3-credentials",
                    "workerGroups": [{"name": "cpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 2}]},
    }  # fmt: skip
    spec.update(over)
    return spec


def _create(api, name: str, spec: dict) -> dict:
    client, ns = api
    body = {"apiVersion": f"{k8s.GROUP}/{k8s.VERSION}", "kind": k8s.KIND,
            "metadata": {"name": name, "namespace": ns}, "spec": spec}  # fmt: skip
    validate_custom(body)  # what a real API server would check against the CRD first
    client.create_namespaced_custom_object(k8s.GROUP, k8s.VERSION, ns, k8s.PLURAL, body)
    return _get(api, name)


def _get(api, name: str) -> dict | None:
    client, ns = api
    try:
        return client.get_namespaced_custom_object(k8s.GROUP, k8s.VERSION, ns, k8s.PLURAL, name)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _rayjobs(api) -> list[dict]:
    client, ns = api
    return client.list_namespaced_custom_object("ray.io", "v1", ns, "rayjobs")["items"]


def _status(api, name: str) -> dict:
    return (_get(api, name) or {}).get("status") or {}


def _conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions", [])}


def _set_rayjob_status(api, job: str, **status) -> None:
    """Play KubeRay: write the RayJob's status."""
    client, ns = api
    client.patch_namespaced_custom_object_status("ray.io", "v1", ns, "rayjobs", job, {"status": status})


@pytest.mark.slow
def test_create_owns_one_rayjob_and_mirrors_its_status_and_the_run_manifest(api, operator, s3_server):
    owner = _create(api, "div2k", _spec(s3_server, "div2k"))
    jobs = _wait("the RayJob", lambda: _rayjobs(api), operator)
    assert len(jobs) == 1
    job = jobs[0]
    validate_custom(job)
    refs = job["metadata"]["ownerReferences"]
    assert [(r["kind"], r["name"], r["uid"], r.get("controller")) for r in refs] == [
        (k8s.KIND, "div2k", owner["metadata"]["uid"], True)]  # fmt: skip
    assert job["metadata"]["labels"][k8s.LABEL] == "div2k"
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["backoffLimit"] == 2
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.test/srdistill:test-cpu")  # the operator's default image  # fmt: skip
    status = _wait("status Pending", lambda: (s := _status(api, "div2k")).get("phase") == "Pending" and s, operator)
    assert status["rayJobName"] == job["metadata"]["name"]
    conds = _conditions(status)
    assert conds["Valid"]["status"] == "True" and conds["RayJobCreated"]["status"] == "True"
    assert conds["ProgressAvailable"]["reason"] == "NoManifest"

    # KubeRay starts the cluster and the job; the pipeline writes its manifest and runs stages
    _set_rayjob_status(api, job["metadata"]["name"], jobDeploymentStatus="Running", jobStatus="RUNNING",
                       rayClusterName="div2k-raycluster-x1", jobId="div2k-job",
                       dashboardURL="div2k-raycluster-x1-head-svc.ns.svc.cluster.local:8265")  # fmt: skip
    run = Run(s3_server.uri("corpus/"), s3_server.uri("runs/div2k"), load_config("tiny"), log=lambda _: None)
    for stage in ("plan", "mine"):
        run.run_stage(stage, "fp", [], lambda _dir: {"n": 1})
    release, started = threading.Event(), threading.Event()
    embed = threading.Thread(target=run.run_stage, args=("embed", "fp", [], lambda _d: started.set() or release.wait(30) and {}))
    embed.start()
    try:
        started.wait(30)
        status = _wait("stage progress", lambda: (s := _status(api, "div2k")).get("currentStage") == "embed" and s, operator)
        assert status["phase"] == "Running" and status["jobStatus"] == "RUNNING"
        assert status["dashboardURL"].endswith(":8265") and status["rayClusterName"] == "div2k-raycluster-x1"
        assert status["stages"] == {"plan": "done", "mine": "done", "embed": "running"}
        assert status["stagesDone"] == 2 and status["stagesTotal"] == 8  # coreset: plan..report minus synth stages
        assert _conditions(status)["ProgressAvailable"]["status"] == "True"
    finally:
        release.set()
        embed.join(30)
    _wait("embed done", lambda: _status(api, "div2k").get("stagesDone") == 3, operator)

    _set_rayjob_status(api, job["metadata"]["name"], jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    status = _wait("phase Succeeded", lambda: (s := _status(api, "div2k")).get("phase") == "Succeeded" and s, operator)
    assert _conditions(status)["Complete"]["status"] == "True" and _conditions(status)["Failed"]["status"] == "False"

    # KubeRay deletes the finished job after its TTL: the operator must not run it again
    api[0].delete_namespaced_custom_object("ray.io", "v1", api[1], "rayjobs", job["metadata"]["name"])
    time.sleep(8 * INTERVAL_S)
    assert _rayjobs(api) == [] and _status(api, "div2k")["phase"] == "Succeeded"


@pytest.mark.slow
def test_failed_rayjob_gives_failed_phase_with_kuberays_message(api, operator, s3_server):
    _create(api, "bad-run", _spec(s3_server, "bad-run"))
    job = _wait("the RayJob", lambda: _rayjobs(api), operator)[0]
    _set_rayjob_status(api, job["metadata"]["name"], jobDeploymentStatus="Failed", jobStatus="FAILED",
                       reason="AppFailed", message="Job entrypoint command failed with exit code 2")  # fmt: skip
    status = _wait("phase Failed", lambda: (s := _status(api, "bad-run")).get("phase") == "Failed" and s, operator)
    failed = _conditions(status)["Failed"]
    assert failed["status"] == "True" and "exit code 2" in failed["message"]


@pytest.mark.slow
def test_invalid_spec_gets_a_condition_and_no_rayjob(api, operator, s3_server):
    spec = _spec(s3_server, "x", output="/data/runs/x", config={"train": {"iterationz": 5}})
    body = {"apiVersion": f"{k8s.GROUP}/{k8s.VERSION}", "kind": k8s.KIND,
            "metadata": {"name": "typo", "namespace": api[1]}, "spec": spec}  # fmt: skip
    api[0].create_namespaced_custom_object(k8s.GROUP, k8s.VERSION, api[1], k8s.PLURAL, body)  # no CRD check here
    status = _wait("phase Invalid", lambda: (s := _status(api, "typo")).get("phase") == "Invalid" and s, operator)
    valid = _conditions(status)["Valid"]
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "spec.output" in valid["message"] and "spec.config: train.iterationz" in valid["message"]
    time.sleep(5 * INTERVAL_S)
    assert _rayjobs(api) == []


@pytest.mark.slow
def test_delete_removes_the_rayjob_and_releases_the_resource(api, operator, s3_server):
    _create(api, "gone", _spec(s3_server, "gone"))
    _wait("the RayJob", lambda: _rayjobs(api), operator)
    assert f"{k8s.GROUP}/cleanup" in _get(api, "gone")["metadata"]["finalizers"]
    api[0].delete_namespaced_custom_object(k8s.GROUP, k8s.VERSION, api[1], k8s.PLURAL, "gone")
    _wait("the resource released", lambda: _get(api, "gone") is None, operator)
    assert _rayjobs(api) == []


@pytest.mark.slow
def test_operator_restart_makes_no_duplicate_and_a_spec_change_supersedes(api, operator, s3_server):
    _create(api, "steady", _spec(s3_server, "steady"))
    first = _wait("the RayJob", lambda: _rayjobs(api), operator)[0]
    operator.stop()
    _set_rayjob_status(api, first["metadata"]["name"], jobDeploymentStatus="Running", jobStatus="RUNNING",
                       rayClusterName="steady-raycluster-a")  # fmt: skip
    operator.start()  # a new process: nothing in memory, only what the API server holds
    _wait("a pass after the restart", lambda: _status(api, "steady").get("phase") == "Running", operator)
    time.sleep(5 * INTERVAL_S)
    jobs = _rayjobs(api)
    assert [j["metadata"]["uid"] for j in jobs] == [first["metadata"]["uid"]]

    # level-based: a changed spec gets a new RayJob and the old one goes
    client, ns = api
    client.patch_namespaced_custom_object(k8s.GROUP, k8s.VERSION, ns, k8s.PLURAL, "steady",
                                          {"spec": {"config": {"train": {"iterations": 40}}}})  # fmt: skip
    new = _wait("the superseding RayJob",
                lambda: [j for j in _rayjobs(api) if j["metadata"]["name"] != first["metadata"]["name"]], operator)
    _wait("the old RayJob deleted", lambda: len(_rayjobs(api)) == 1, operator)
    assert '"iterations":40' in new[0]["spec"]["entrypoint"]
    status = _wait("status on the new RayJob",
                   lambda: (s := _status(api, "steady")).get("rayJobName") == new[0]["metadata"]["name"] and s, operator)
    assert status["phase"] == "Pending" and "rayClusterName" not in status  # nothing left of the old job
