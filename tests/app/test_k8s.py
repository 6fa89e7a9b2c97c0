"""srdistill.k8s: spec validation, the rendered RayJob (checked against KubeRay's CRD schema),
the CRD kept in step with the pydantic spec, status helpers and ``srdistill k8s render``."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from k8s_schema import validate_custom
from pydantic import BaseModel
from typer.testing import CliRunner

import srdistill
from srdistill import k8s
from srdistill.cli import app
from srdistill.config import RunConfig, load_config, preset_names
from srdistill.run.rundir import Run

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "charts" / "srdistill" / "crds" / "srdistill.io_srdistillations.yaml"

FULL = {
    "input": "s3://corpora/DIV2K/",
    "output": "s3://runs/div2k",
    "preset": "demo",
    "distill": "synth",
    "config": {"train": {"iterations": 50, "model": "edsr-baseline"}, "cluster": {"k": 5}},
    "cluster": {
        "image": "registry.example/srdistill:1-cpu",
        "s3Secret": "s3-credentials",
        "env": [{"name": "AWS_ENDPOINT_URL", "value": "http://minio.minio:9000"}],
        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}],
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        "head": {"cpu": 2, "memory": "8Gi"},
        "workerGroups": [
            {"name": "cpu", "replicas": 2, "minReplicas": 0, "maxReplicas": 4, "cpu": "4", "memory": "16Gi"},
            {"name": "gpu", "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "cpu": "8", "memory": "64Gi",
             "gpu": 1, "image": "registry.example/srdistill:1-gpu", "nodeSelector": {"gpu": "h200"},
             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        ],
    },
    "job": {"ttlSecondsAfterFinished": 600, "backoffLimit": 3, "activeDeadlineSeconds": 86400},
}  # fmt: skip


def _pods(job: dict) -> list[dict]:
    spec = job["spec"]
    pods = [spec["submitterPodTemplate"]]
    if "rayClusterSpec" in spec:
        pods.append(spec["rayClusterSpec"]["headGroupSpec"]["template"])
        pods += [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    return pods


def test_rayjob_validates_against_kuberay_and_carries_the_spec():
    spec = k8s.parse_spec(FULL)
    job = k8s.rayjob(spec, "div2k-1234abcd", namespace="ml")
    validate_custom(job)
    body = job["spec"]
    assert (body["shutdownAfterJobFinishes"], body["ttlSecondsAfterFinished"], body["backoffLimit"],
            body["activeDeadlineSeconds"]) == (True, 600, 3, 86400)  # fmt: skip
    cluster = body["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True  # the cpu group scales 0..4
    assert [(g["groupName"], g["replicas"], g["minReplicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]] == [
        ("cpu", 2, 0, 4), ("gpu", 1, 1, 1)]  # fmt: skip
    gpu = cluster["workerGroupSpecs"][1]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 1}
    assert gpu["containers"][0]["image"] == "registry.example/srdistill:1-gpu"
    assert gpu["nodeSelector"] == {"gpu": "h200"} and gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    for pod in _pods(job)[1:]:  # Ray pods: the secret as env, the model volume mounted
        ctr = pod["spec"]["containers"][0]
        assert ctr["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio.minio:9000"} in ctr["env"]
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in ctr["volumeMounts"]
    # the entrypoint is `srdistill run` with exactly this spec
    args = shlex.split(body["entrypoint"])
    assert args[:2] == ["srdistill", "run"]
    opts = dict(zip(args[2::2], args[3::2]))
    assert opts["--input"] == FULL["input"] and opts["--out"] == FULL["output"] and opts["--distill"] == "synth"
    assert opts["--gpus"] == "1"  # the gpu group's one GPU: stages are placed on it
    assert json.loads(opts["--config-json"]) == FULL["config"]
    assert load_config("demo", None, ["distill=synth"], data=json.loads(opts["--config-json"])) == spec.run_config()


def test_every_pod_is_restricted():
    for job in (k8s.rayjob(k8s.parse_spec(FULL), "a"),
                k8s.rayjob(k8s.parse_spec({**FULL, "cluster": {"existingCluster": "standing"}}), "b")):  # fmt: skip
        for pod in _pods(job):
            spec = pod["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert not spec.get("hostNetwork") and not any("hostPath" in v for v in spec.get("volumes", []))
            for ctr in spec["containers"]:
                sc = ctr["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
                assert not sc.get("privileged")
        if "rayClusterSpec" in job["spec"]:
            assert job["spec"]["rayClusterSpec"]["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False


def test_existing_cluster_submits_there_and_keeps_it():
    job = k8s.rayjob(k8s.parse_spec({**FULL, "cluster": {"existingCluster": "standing"}}), "x")
    validate_custom(job)
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "standing"}
    assert "rayClusterSpec" not in job["spec"] and "shutdownAfterJobFinishes" not in job["spec"]


def test_fixed_size_groups_do_not_autoscale_and_the_default_image_applies():
    spec = k8s.parse_spec({"input": "s3://a/", "output": "s3://b/c",
                           "cluster": {"workerGroups": [{"name": "cpu", "replicas": 2, "minReplicas": 2, "maxReplicas": 2}]}})
    job = k8s.rayjob(spec, "x", default_image="img:1")
    validate_custom(job)
    assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in job["spec"]["rayClusterSpec"]
    assert {p["spec"]["containers"][0]["image"] for p in _pods(job)} == {"img:1"}


def test_gpu_pods_get_the_gpu_variant_of_the_image():
    """A GPU group without its own image runs the cluster image's ``-gpu`` variant; the head and
    CPU groups keep the ``-cpu`` one unless the head has a GPU; an explicit group image wins."""
    groups = [{"name": "cpu", "replicas": 1}, {"name": "gpu", "replicas": 1, "maxReplicas": 3, "gpu": 2},
              {"name": "own", "replicas": 1, "gpu": 1, "image": "mine:7"}]  # fmt: skip
    spec = k8s.parse_spec({"input": "s3://a/", "output": "s3://b/c", "cluster": {"workerGroups": groups}})
    job = k8s.rayjob(spec, "x", default_image="reg.example/srdistill:0.2.0-cpu")
    validate_custom(job)
    cluster = job["spec"]["rayClusterSpec"]
    image = {g["groupName"]: g["template"]["spec"]["containers"][0]["image"] for g in cluster["workerGroupSpecs"]}
    assert image == {"cpu": "reg.example/srdistill:0.2.0-cpu", "gpu": "reg.example/srdistill:0.2.0-gpu", "own": "mine:7"}
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/srdistill:0.2.0-cpu"
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == "reg.example/srdistill:0.2.0-cpu"
    # the driver counts on the GPUs the groups can bring up (2 x 3 + 1), even while scaled to zero
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[args.index("--gpus") + 1] == "7"

    head_gpu = k8s.parse_spec({"input": "s3://a/", "output": "s3://b/c",
                               "cluster": {"head": {"gpu": 1}, "workerGroups": [{"name": "cpu"}]}})  # fmt: skip
    job = k8s.rayjob(head_gpu, "y", default_image="reg.example/srdistill:0.2.0-cpu")
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    assert "--gpus 1" in job["spec"]["entrypoint"]
    # CPU-only clusters and standing clusters: no --gpus (the cluster's own resources decide)
    cpu_only = k8s.parse_spec({"input": "s3://a/", "output": "s3://b/c"})
    assert "--gpus" not in k8s.rayjob(cpu_only, "z")["spec"]["entrypoint"]
    standing = k8s.parse_spec({"input": "s3://a/", "output": "s3://b/c",
                               "cluster": {"existingCluster": "s", "workerGroups": groups}})  # fmt: skip
    assert "--gpus" not in k8s.rayjob(standing, "w")["spec"]["entrypoint"]


@pytest.mark.parametrize("image, expected", [
    ("ghcr.io/srdistill/srdistill:0.1.0-cpu", "ghcr.io/srdistill/srdistill:0.1.0-gpu"),
    ("localhost:5000/srdistill:1-cpu", "localhost:5000/srdistill:1-gpu"),
    ("img:2", "img:2"), ("localhost:5000/srdistill-cpu", "localhost:5000/srdistill-cpu"),
    ("repo/x:1-gpu", "repo/x:1-gpu"),
])  # fmt: skip
def test_gpu_image(image, expected):
    assert k8s.gpu_image(image) == expected


@pytest.mark.parametrize("patch, expected", [
    ({"output": "/data/run"}, "spec.output: output '/data/run' is not under a read-write persistentVolumeClaim mount"),
    ({"output": "runs/x"}, "spec.output: output 'runs/x' must be an s3:// URI or an absolute path on a mounted PVC"),
    ({"output": "s3://"}, "spec.output: output 's3://' names no bucket"),
    ({"input": ""}, "spec.input: String should have at least 1 character"),
    ({"preset": "huge"}, "spec.preset: preset 'huge' is not one of"),
    ({"distill": "gan"}, "spec.distill: Input should be 'coreset' or 'synth'"),
    ({"config": {"train": {"iterationz": 5}}}, "spec.config: train.iterationz: Extra inputs are not permitted"),
    ({"config": {"train": {"model": "srgan"}}}, "spec.config: train.model: Input should be"),
    ({"colour": "red"}, "spec.colour: Extra inputs are not permitted"),
    ({"cluster": {"workerGroups": [{"name": "GPU"}]}}, "spec.cluster.workerGroups[0].name: worker group name 'GPU'"),
    ({"cluster": {"workerGroups": [{"name": "cpu", "replicas": 5, "maxReplicas": 2}]}},
     "spec.cluster.workerGroups[0]: worker group 'cpu': need minReplicas 0 <= replicas 5 <= maxReplicas 2"),
    ({"cluster": {"workerGroups": [{"name": "a"}, {"name": "a"}]}}, "worker group names must be unique"),
    ({"cluster": {"head": {"memory": "lots"}}}, "spec.cluster.head.memory: memory 'lots' is not a Kubernetes quantity"),
    ({"cluster": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}, "hostPath volumes are not allowed"),
    ({"cluster": {"volumeMounts": [{"name": "w", "mountPath": "/w"}]}}, "volumeMounts ['w'] name no volume"),
    ({"job": {"backoffLimit": -1}}, "spec.job.backoffLimit: Input should be greater than or equal to 0"),
])  # fmt: skip
def test_invalid_specs_name_the_field(patch, expected):
    with pytest.raises(k8s.InvalidSpec) as err:
        k8s.parse_spec({"input": "s3://a/", "output": "s3://b/c", **patch})
    assert expected in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(k8s.InvalidSpec) as err:
        k8s.parse_spec({"input": "x", "output": "/tmp/x", "config": {"scale": 99}})
    assert "spec.output" in str(err.value) and "spec.config: scale" in str(err.value)


def _crd_spec_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _compare(model: type[BaseModel], schema: dict, where: str) -> None:
    """The CRD schema has exactly the model's fields (by alias), recursively into sub-models."""
    props = schema["properties"]
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    assert set(props) == set(fields), f"{where}: CRD {sorted(props)} vs model {sorted(fields)}"
    required = {alias for alias, f in fields.items() if f.is_required()}
    assert set(schema.get("required", [])) == required, where
    for alias, field in fields.items():
        sub = field.annotation
        item = getattr(sub, "__args__", (None,))[0] if getattr(sub, "__origin__", None) is list else None
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            _compare(sub, props[alias], f"{where}.{alias}")
        elif isinstance(item, type) and issubclass(item, BaseModel):
            _compare(item, props[alias]["items"], f"{where}.{alias}[]")


def test_crd_schema_matches_the_pydantic_spec():
    _compare(k8s.DistillationSpec, _crd_spec_schema(), "spec")
    crd = yaml.safe_load(CRD.read_text())
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"], crd["spec"]["names"]["plural"]) == (
        k8s.GROUP, k8s.KIND, k8s.PLURAL)  # fmt: skip
    phases = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["phase"]
    assert tuple(phases["enum"]) == k8s.PHASES


def test_spec_hash_and_rayjob_name():
    a = k8s.rayjob(k8s.parse_spec(FULL), "x")
    b = k8s.rayjob(k8s.parse_spec({**FULL, "config": {"train": {"iterations": 51}}}), "x")
    assert a["metadata"]["annotations"][k8s.SPEC_HASH] == k8s.rayjob(k8s.parse_spec(FULL), "y")["metadata"]["annotations"][k8s.SPEC_HASH]
    assert a["metadata"]["annotations"][k8s.SPEC_HASH] != b["metadata"]["annotations"][k8s.SPEC_HASH]
    name = k8s.rayjob_name("a-very-long-distillation-name-of-many-words-indeed", "0123456789")
    assert len(name) <= 39 and name.endswith("-01234567") and "--" not in name


def test_spec_identity_is_what_the_spec_computes():
    """The operator's RayJob identity: lifecycle fields, values equal to their defaults and the
    key order change nothing; whatever changes the computation (or runId) does."""
    base = k8s.spec_identity(k8s.parse_spec(FULL))
    same = [
        {**FULL, "job": {"ttlSecondsAfterFinished": 5, "backoffLimit": 0}},  # lifecycle: patched, not rerun
        {**FULL, "job": {}},
        {**FULL, "cluster": {**FULL["cluster"], "imagePullPolicy": "Always"}},  # next run
        {**FULL, "allowRandomInit": False, "cluster": {**FULL["cluster"], "existingCluster": None}},  # defaults
        dict(reversed(list(FULL.items()))),
    ]
    for spec in same:
        assert k8s.spec_identity(k8s.parse_spec(spec)) == base, spec
    other = [
        {**FULL, "config": {**FULL["config"], "train": {"iterations": 51, "model": "edsr-baseline"}}},
        {**FULL, "runId": 1},
        {**FULL, "runId": "1"},
        {**FULL, "output": "s3://runs/div2k-2"},
        {**FULL, "cluster": {**FULL["cluster"], "image": "registry.example/srdistill:2-cpu"}},
    ]
    digests = {k8s.spec_identity(k8s.parse_spec(spec)) for spec in other}
    assert len(digests) == len(other) and base not in digests
    assert len(base) == 10 and int(base, 16) >= 0
    # lifecycle fields are exactly what the RayJob's live fields render from
    job = k8s.rayjob(k8s.parse_spec(FULL), "x")["spec"]
    assert [job[f] for f in k8s.LIVE_FIELDS] == [600, 3, 86400]


def test_pinned_defaults_render_alike_through_json():
    """What the operator records in ``.status.defaults``: every default explicit, JSON as the API
    server stores it, and rendering as the defaults it came from."""
    plain = k8s.parse_spec({"input": "s3://a/", "output": "s3://b/c"})
    for env in ({}, {"SRDISTILL_INSTALL": '{"mode": "runtimeEnv"}'},
                {"SRDISTILL_DEFAULT_IMAGE": "reg.example/x:1-cpu", "SRDISTILL_SECURITY_CONTEXT": '{"runAsNonRoot": true}'}):
        defaults = k8s.render_defaults(env)
        pinned = k8s.pinned_defaults(defaults)
        assert set(pinned) == set(k8s.RENDER_ENV)
        recorded = json.loads(json.dumps(pinned))
        assert k8s.rayjob(plain, "x", **k8s.defaults_from_status(recorded)) == k8s.rayjob(plain, "x", **defaults)
    assert k8s.pinned_defaults({})["default_image"] == k8s.DEFAULT_IMAGE
    stock = k8s.pinned_defaults(k8s.render_defaults({"SRDISTILL_INSTALL": '{"mode": "runtimeEnv"}'}))
    assert stock["default_image"] == k8s.STOCK_IMAGE and stock["install"]["mode"] == "runtimeEnv"
    assert k8s.defaults_from_status({"default_image": "a"}) == {"default_image": "a"}  # an older, shorter record
    with pytest.raises(ValueError, match="status.defaults.install: mode"):
        k8s.defaults_from_status({"install": {"mode": "pip"}})


def test_allow_list_from_the_environment():
    assert k8s.AllowList.from_environ({}) == k8s.AllowList()  # unset: no limit
    allow = k8s.AllowList.from_environ({"SRDISTILL_ALLOWED_IMAGES": "rayproject/ray:*, ghcr.io/x/*",
                                        "SRDISTILL_ALLOWED_SERVICE_ACCOUNTS": "default",
                                        "SRDISTILL_ALLOWED_SECRETS": ""})  # fmt: skip
    assert allow == k8s.AllowList(images=("rayproject/ray:*", "ghcr.io/x/*"), service_accounts=("default",), secrets=())


def test_allow_list_names_each_field_outside_it():
    allow = k8s.AllowList(images=("registry.example/srdistill:*",), service_accounts=("default", "ray-*"),
                          secrets=("s3-credentials",))  # fmt: skip
    allow.check(k8s.parse_spec(FULL))  # every image, account and secret of FULL is allowed
    k8s.AllowList().check(k8s.parse_spec(FULL))
    volumes = [
        {"name": "a", "secret": {"secretName": "db-password"}},
        {"name": "b", "projected": {"sources": [{"secret": {"name": "tls"}}, {"configMap": {"name": "cm"}}]}},
        {"name": "c", "csi": {"driver": "x", "nodePublishSecretRef": {"name": "csi-key"}}},
        {"name": "d", "configMap": {"name": "secret-looking-but-a-configmap"}},
    ]
    cluster = {**FULL["cluster"], "image": "evil.example/x:1", "serviceAccountName": "admin", "volumes": volumes,
               "volumeMounts": [], "s3Secret": "s3-credentials"}  # fmt: skip
    with pytest.raises(k8s.InvalidSpec) as err:
        allow.check(k8s.parse_spec({**FULL, "cluster": cluster}))
    message = str(err.value)
    assert [p.split(":")[0] for p in message.split("; ")] == [
        "spec.cluster.image", "spec.cluster.serviceAccountName", "spec.cluster.volumes[0].secret.secretName",
        "spec.cluster.volumes[1].projected.sources[0].secret.name",
        "spec.cluster.volumes[2].csi.nodePublishSecretRef.name"]  # fmt: skip
    assert "'evil.example/x:1' is not in the operator's allow-list of images [registry.example/srdistill:*]" in message
    assert "allowList.serviceAccounts" in message and "'tls'" in message and "cm" not in message
    with pytest.raises(k8s.InvalidSpec, match=r"spec.cluster.s3Secret: 's3-credentials' .* \[\] \(chart value allowList.secrets\)$"):
        k8s.AllowList(secrets=()).check(k8s.parse_spec(FULL))


def test_stage_progress_from_a_real_run_manifest(tmp_path):
    run = Run(tmp_path / "corpus", tmp_path / "run", load_config("tiny"), log=lambda _: None)
    run.run_stage("plan", "fp", [], lambda _d: {"images": 3})
    assert k8s.stage_progress(run.manifest) == {"stages": {"plan": "done"}, "stagesDone": 1, "stagesTotal": 8,
                                                "currentStage": None}  # fmt: skip
    seen = {}
    run.run_stage("mine", "fp", [], lambda _d: seen.update(k8s.stage_progress(json.loads((tmp_path / "run" / "manifest.json").read_text()))) or {})
    assert seen["currentStage"] == "mine" and seen["stages"] == {"plan": "done", "mine": "running"}
    synth = Run(tmp_path / "corpus", tmp_path / "synth", load_config("tiny", overrides=["distill=synth"]), log=lambda _: None)
    assert k8s.stage_progress(synth.manifest)["stagesTotal"] == 10  # + encode, finetune, synthesize; - select
    assert k8s.stage_progress(None) == {}


@pytest.mark.parametrize("status, phase", [
    (None, "Pending"), ({}, "Pending"), ({"jobDeploymentStatus": "Initializing"}, "Initializing"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running"),
    ({"jobDeploymentStatus": "Retrying"}, "Retrying"), ({"jobDeploymentStatus": "Suspended"}, "Suspended"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "Succeeded"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, "Failed"),
    ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}, "Failed"),
    ({"jobDeploymentStatus": "ValidationFailed"}, "Failed"),
])  # fmt: skip
def test_phase_of_rayjob_status(status, phase):
    assert k8s.phase_of(status) == phase and phase in k8s.PHASES


def test_condition_keeps_its_transition_time_while_unchanged():
    first = k8s.condition("Complete", False, "Running", now="2026-01-01T00:00:00Z")
    same = k8s.condition("Complete", False, "Running", now="2026-01-01T00:05:00Z", previous=[first])
    flipped = k8s.condition("Complete", True, "JobSucceeded", now="2026-01-01T00:09:00Z", previous=[same])
    assert same["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert flipped["lastTransitionTime"] == "2026-01-01T00:09:00Z" and flipped["status"] == "True"


def test_cli_render_prints_a_valid_rayjob(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("train: {iterations: 30}\nselect: {ipc: 2, pixel_fraction: null}\n")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"workerGroups": [{"name": "gpu", "gpu": 1, "replicas": 1}], "s3Secret": "creds"}))
    result = CliRunner().invoke(app, ["k8s", "render", "--input", "s3://c/HR/", "--out", "s3://r/run1", "--config", str(config),
                                      "--preset", "demo", "--cluster", str(cluster), "--image", "img:2", "--name", "run1",
                                      "--namespace", "ml"])  # fmt: skip
    assert result.exit_code == 0, result.output
    job = yaml.safe_load(result.stdout)
    validate_custom(job)
    assert job["metadata"]["name"] == "run1" and job["metadata"]["namespace"] == "ml"
    assert "--config-json" in job["spec"]["entrypoint"] and '"iterations":30' in job["spec"]["entrypoint"]
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["image"] == "img:2" and worker["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_cli_render_rejects_bad_input_with_the_reason(tmp_path):
    result = CliRunner().invoke(app, ["k8s", "render", "--input", "s3://c/", "--out", "runs/local"])
    assert result.exit_code == 2 and "must be an s3:// URI or an absolute path" in result.output
    result = CliRunner().invoke(app, ["k8s", "render", "--input", "s3://c/", "--out", "s3://r/x",
                                      "--pod-security-context", "[1, 2]"])  # fmt: skip
    assert result.exit_code == 2 and "--pod-security-context must be a JSON object" in result.output
    result = CliRunner().invoke(app, ["k8s", "render", "--input", "s3://c/", "--out", "s3://r/x",
                                      "--install", "runtimeEnv", "--package", "srdistill>=0.1"])  # fmt: skip
    assert result.exit_code == 2 and "--install/--package: package: package 'srdistill>=0.1' is not a pinned" in result.output
    result = CliRunner().invoke(app, ["k8s", "render", "--input", "s3://c/", "--out", "s3://r/x", "--cluster",
                                      str(tmp_path / "absent.yaml")])  # fmt: skip
    assert result.exit_code == 2 and "absent.yaml' does not exist" in result.output


def test_run_config_json_is_validated(tmp_path):
    result = CliRunner().invoke(app, ["run", "--input", str(tmp_path), "--out", str(tmp_path / "o"),
                                      "--config-json", '{"train": {"iterationz": 1}}'])  # fmt: skip
    assert result.exit_code == 2 and "iterationz" in result.output
    result = CliRunner().invoke(app, ["run", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--config-json", "{"])
    assert result.exit_code == 2 and "--config-json is not valid JSON" in result.output


# --------------------------------------------------------------------------- output on a PVC

PVC = {"volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": "srdistill-runs"}},
                   {"name": "ro", "persistentVolumeClaim": {"claimName": "corpus", "readOnly": True}},
                   {"name": "scratch", "emptyDir": {}}],
       "volumeMounts": [{"name": "runs", "mountPath": "/runs"}, {"name": "ro", "mountPath": "/corpus"},
                        {"name": "models", "mountPath": "/models", "readOnly": True}, {"name": "scratch", "mountPath": "/scratch"}]}  # fmt: skip
PVC["volumes"].append({"name": "models", "persistentVolumeClaim": {"claimName": "models"}})


@pytest.mark.parametrize("output", ["/runs/a", "/runs", "/runs/deep/er/"])
def test_output_on_a_mounted_pvc(output):
    """A run directory on a read-write PVC mount of every Ray pod: the RayJob passes the path
    to ``srdistill run --out`` and mounts the claim in every Ray pod."""
    spec = k8s.parse_spec({"input": "/app/data/T91/HR", "output": output, "cluster": PVC})
    job = k8s.rayjob(spec, "x")
    validate_custom(job)
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[args.index("--out") + 1] == output
    for pod in _pods(job)[1:]:
        assert {"name": "runs", "mountPath": "/runs"} in pod["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "runs", "persistentVolumeClaim": {"claimName": "srdistill-runs"}} in pod["spec"]["volumes"]


@pytest.mark.parametrize("output", ["/corpus/run", "/models/run", "/scratch/run", "/runsx/run", "/data/run"])
def test_output_off_a_writable_pvc_is_rejected(output):
    """A read-only claim or mount, an emptyDir (one per pod), or no mount at all: the error names
    the mounts there are."""
    with pytest.raises(k8s.InvalidSpec) as err:
        k8s.parse_spec({"input": "s3://a/", "output": output, "cluster": PVC})
    assert f"spec.output: output '{output}' is not under a read-write persistentVolumeClaim mount" in str(err.value)
    assert "runs:/runs" in str(err.value)


def test_output_path_on_a_standing_cluster_is_taken_as_is():
    spec = k8s.parse_spec({"input": "s3://a/", "output": "/shared/run", "cluster": {"existingCluster": "standing"}})
    assert "--out /shared/run" in k8s.rayjob(spec, "x")["spec"]["entrypoint"]


# --------------------------------------------------------------------------- rendering settings


def test_security_contexts_reach_every_pod_and_container():
    pod_sc = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    ctr_sc = {**k8s.RESTRICTED_SECURITY_CONTEXT, "readOnlyRootFilesystem": True}
    job = k8s.rayjob(k8s.parse_spec(FULL), "x", pod_security_context=pod_sc, security_context=ctr_sc)
    validate_custom(job)
    for pod in _pods(job):
        assert pod["spec"]["securityContext"] == pod_sc
        assert pod["spec"]["containers"][0]["securityContext"] == ctr_sc
    assert job["spec"]["rayClusterSpec"]["autoscalerOptions"]["securityContext"] == ctr_sc
    default = k8s.rayjob(k8s.parse_spec(FULL), "x")
    for pod in _pods(default):
        assert pod["spec"]["securityContext"] == k8s.RESTRICTED_POD_SECURITY_CONTEXT
        assert pod["spec"]["containers"][0]["securityContext"] == k8s.RESTRICTED_SECURITY_CONTEXT
    assert default["metadata"]["annotations"] != job["metadata"]["annotations"]


def test_render_defaults_from_the_operator_environment():
    env = {"SRDISTILL_DEFAULT_IMAGE": "reg.example/srdistill:2-cpu", "SRDISTILL_POD_SECURITY_CONTEXT": '{"runAsNonRoot": true}',
           "SRDISTILL_SECURITY_CONTEXT": "", "SRDISTILL_INSTALL": '{"mode": "runtimeEnv", "package": "srdistill==2"}',
           "HOME": "/home/ray"}  # fmt: skip
    defaults = k8s.render_defaults(env)
    assert defaults == {"default_image": "reg.example/srdistill:2-cpu", "pod_security_context": {"runAsNonRoot": True},
                        "install": k8s.Install(mode="runtimeEnv", package="srdistill==2")}  # fmt: skip
    assert k8s.render_defaults({}) == {}
    job = k8s.rayjob(k8s.parse_spec({"input": "s3://a/", "output": "s3://b/c"}), "x", **defaults)
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["pip"]["packages"][0] == "srdistill==2"
    with pytest.raises(ValueError, match="SRDISTILL_SECURITY_CONTEXT is not valid JSON"):
        k8s.render_defaults({"SRDISTILL_SECURITY_CONTEXT": "{runAsUser: [}"})
    with pytest.raises(ValueError, match="SRDISTILL_POD_SECURITY_CONTEXT must be a JSON object"):
        k8s.render_defaults({"SRDISTILL_POD_SECURITY_CONTEXT": '"restricted"'})
    with pytest.raises(ValueError, match="SRDISTILL_INSTALL: mode: Input should be 'image' or 'runtimeEnv'"):
        k8s.render_defaults({"SRDISTILL_INSTALL": '{"mode": "pip"}'})


@pytest.mark.parametrize("package, ok", [
    ("srdistill[cpu,synth]==0.1.0", True), ("srdistill==0.2.0rc1", True),
    ("srdistill[cpu,synth] @ git+https://github.com/srdistill/srdistill@v0.1.0", True),
    ("srdistill[cpu] @ https://example.org/srdistill-0.1.0.tar.gz", True),
    ("srdistill", False), ("srdistill>=0.1", False), ("torch==2.13.0", False),
    ("srdistill[cpu,synth] @ git+https://github.com/srdistill/srdistill", False),
])  # fmt: skip
def test_install_package_must_be_pinned(package, ok):
    if ok:
        assert k8s.Install(mode="runtimeEnv", package=package).package == package
    else:
        with pytest.raises(ValueError, match="is not a pinned requirement of srdistill"):
            k8s.Install(mode="runtimeEnv", package=package)


def test_runtime_env_mode_installs_srdistill_on_the_stock_image():
    """Ray's stock image (-gpu for GPU pods); pip installs the pinned srdistill and torch, the
    CPU build only where the job's own cluster has no GPU; the evaluation sets are fetched
    before the run (the stock image vendors none)."""
    install = k8s.Install(mode="runtimeEnv")
    cpu = k8s.parse_spec({"input": "s3://a/", "output": "s3://b/c", "config": {"evaluate": {"datasets": ["Set5", "Set14"]}}})
    job = k8s.rayjob(cpu, "x", install=install)
    validate_custom(job)
    assert {p["spec"]["containers"][0]["image"] for p in _pods(job)} == {k8s.STOCK_IMAGE}
    pip = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["pip"]
    assert pip["packages"] == [install.package, f"torch=={k8s.TORCH_VERSION}"]
    assert install.package == f"srdistill[cpu,synth]=={srdistill.__version__}"
    assert pip["pip_install_options"] == ["--no-cache-dir", "--disable-pip-version-check",
                                          "--extra-index-url", k8s.TORCH_CPU_INDEX]  # fmt: skip
    first, _, rest = job["spec"]["entrypoint"].partition(" && ")
    assert shlex.split(first) == ["srdistill", "data", "get", "Set5", "Set14"] and rest == cpu.entrypoint()

    gpu = k8s.rayjob(k8s.parse_spec(FULL), "y", install=install, default_image=None)
    assert "--extra-index-url" not in yaml.safe_load(gpu["spec"]["runtimeEnvYAML"])["pip"]["pip_install_options"]
    standing = k8s.rayjob(k8s.parse_spec({**FULL, "cluster": {"existingCluster": "s"}}), "z", install=install)
    assert "--extra-index-url" not in yaml.safe_load(standing["spec"]["runtimeEnvYAML"])["pip"]["pip_install_options"]
    groups = [{"name": "gpu", "gpu": 1, "replicas": 1}]
    own = k8s.rayjob(k8s.parse_spec({"input": "s3://a/", "output": "s3://b/c", "cluster": {"workerGroups": groups}}),
                     "w", install=install)  # fmt: skip
    worker = own["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["image"] == k8s.gpu_image(k8s.STOCK_IMAGE) == f"rayproject/ray:{k8s.RAY_VERSION}-py311-gpu"
    # the image mode carries no runtime env and runs the srdistill image
    plain = k8s.rayjob(cpu, "x")
    assert "runtimeEnvYAML" not in plain["spec"] and plain["spec"]["entrypoint"] == cpu.entrypoint()
    assert {p["spec"]["containers"][0]["image"] for p in _pods(plain)} == {k8s.DEFAULT_IMAGE}


def test_cli_render_takes_the_charts_settings():
    result = CliRunner().invoke(app, ["k8s", "render", "--input", "s3://c/HR/", "--out", "s3://r/run1", "--install",
                                      "runtimeEnv", "--pod-security-context", '{"runAsNonRoot": true}',
                                      "--security-context", '{"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}'])  # fmt: skip
    assert result.exit_code == 0, result.output
    job = yaml.safe_load(result.stdout)
    validate_custom(job)
    expected = k8s.rayjob(k8s.parse_spec({"input": "s3://c/HR/", "output": "s3://r/run1"}), "srdistill",
                          **k8s.render_defaults({"SRDISTILL_POD_SECURITY_CONTEXT": '{"runAsNonRoot": true}',
                                                 "SRDISTILL_SECURITY_CONTEXT": '{"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}',
                                                 "SRDISTILL_INSTALL": '{"mode": "runtimeEnv"}'}))  # fmt: skip
    assert job == expected  # what the operator makes with the same settings


# --------------------------------------------------------------------------- spec.config's schema in the CRD


def test_crd_config_schema_is_generated_from_run_config(tmp_path):
    """The committed CRD's spec.config is what ``srdistill k8s crd`` generates; the command
    notices and repairs a stale one."""
    text = CRD.read_text()
    assert k8s.crd_with_config_schema(text) == text, "stale spec.config schema: run srdistill k8s crd " + str(CRD)
    assert _crd_spec_schema()["properties"]["config"] == k8s.config_schema()
    stale = tmp_path / "crd.yaml"
    stale.write_text(text.replace("description: SR scale of train/evaluate", "description: old"))
    result = CliRunner().invoke(app, ["k8s", "crd", str(stale), "--check"])
    assert result.exit_code == 1 and "out of date" in result.output
    result = CliRunner().invoke(app, ["k8s", "crd", str(stale)])
    assert result.exit_code == 0 and stale.read_text() == text


def _nodes(node: dict, path: str = "config"):
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _nodes(node[key], f"{path}.{key}")


def test_crd_config_schema_is_structural_and_closed():
    """Kubernetes' structural-schema rules: every node typed, no $ref, no anyOf/oneOf/allOf, no
    properties next to additionalProperties; no default (it would override the preset), nothing
    required (config is merged over the preset), no unknown field kept; each model's fields."""
    schema = _crd_spec_schema()["properties"]["config"]
    for path, node in _nodes(schema):
        assert "type" in node, path
        assert not {"$ref", "anyOf", "oneOf", "allOf", "not", "default", "required", "x-kubernetes-preserve-unknown-fields"} & set(node), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("nullable") and "enum" in node:
            assert None in node["enum"], path
    assert set(schema["properties"]) == set(RunConfig.model_fields)
    assert set(schema["properties"]["train"]["properties"]["curriculum"]["properties"]) == set(
        RunConfig.model_fields["train"].annotation.model_fields["curriculum"].annotation.model_fields)  # fmt: skip
    assert schema["properties"]["mine"]["properties"]["top_fraction"] == {
        "type": "number", "maximum": 1.0, "minimum": 0.0, "exclusiveMinimum": True}  # fmt: skip


def _resource(config: dict) -> dict:
    return {"apiVersion": "srdistill.io/v1alpha1", "kind": "SRDistillation", "metadata": {"name": "x", "namespace": "ml"},
            "spec": {"input": "s3://a/", "output": "s3://b/c", "preset": "tiny", "config": config}}  # fmt: skip


@pytest.mark.parametrize("config, error", [
    ({"train": {"iterationz": 5}}, "spec.config.train: Additional properties are not allowed ('iterationz' was unexpected)"),
    ({"trian": {"iterations": 5}}, "spec.config: Additional properties are not allowed ('trian' was unexpected)"),
    ({"train": {"model": "srgan"}}, "spec.config.train.model: 'srgan' is not one of"),
    ({"train": {"iterations": "lots"}}, "spec.config.train.iterations: 'lots' is not of type 'integer'"),
    ({"mine": {"top_fraction": 0}}, "spec.config.mine.top_fraction: 0 is less than or equal to the minimum of 0"),
    ({"select": {"ipc": 0}}, "spec.config.select.ipc: 0 is less than the minimum of 1"),
])  # fmt: skip
def test_crd_rejects_a_misspelt_or_bad_config_key(config, error):
    """What the API server does with kubectl's strict field validation: an unknown key in
    spec.config is an error (k8s_schema reports what the server would prune), as is a bad value."""
    with pytest.raises(AssertionError) as err:
        validate_custom(_resource(config))
    assert error in str(err.value)


def test_crd_accepts_every_valid_config():
    """The schema is not stricter than the models: partial configs, nulls where a field is
    Optional, and each preset's fields validate."""
    validate_custom(_resource({"train": {"iterations": 5, "ema_decay": None}, "mine": {"patch_preset": None},
                               "evaluate": {"datasets": ["Set5"]}, "ray": {"num_gpus": 2}}))  # fmt: skip
    for preset in preset_names():
        full = load_config(preset).model_dump(mode="json")
        validate_custom(_resource(full))
