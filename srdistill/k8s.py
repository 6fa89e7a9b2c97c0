"""Kubernetes: the ``SRDistillation`` resource and the KubeRay ``RayJob`` it becomes.

    srdistill k8s render --input s3://corpora/DIV2K/ --out s3://runs/div2k --preset demo > rayjob.yaml
    kubectl apply -f rayjob.yaml        # KubeRay starts a RayCluster, runs the job, shuts it down

Pure functions over plain dicts: no Kubernetes client and no Ray here. ``srdistill k8s render``
prints what ``rayjob`` builds; the operator (``operators/srdistill_operator.py``) validates each
resource with ``parse_spec``, owns one ``rayjob`` per spec and mirrors ``distillation_status``
into the resource's ``.status``. The CRD that declares the same schema for the API server is
``charts/srdistill/crds/srdistill.io_srdistillations.yaml`` (a test keeps the two in step).

By default every pod follows the Pod Security Standard "restricted": non-root (uid 1000, the Ray
image's ``ray`` user), no privilege escalation, all capabilities dropped, the runtime's seccomp
profile (``RESTRICTED_POD_SECURITY_CONTEXT``, ``RESTRICTED_SECURITY_CONTEXT``); ``rayjob`` takes
other contexts (e.g. without ``runAsUser`` where OpenShift assigns the UID).

srdistill reaches the Ray pods in one of two ways (``Install``): inside the image (``image``, the
default: ``docker/Dockerfile``, built and pushed by the user) or installed by Ray at job start from
the RayJob's ``runtimeEnvYAML`` on the stock ``rayproject/ray`` image (``runtimeEnv``).
The operator takes these settings from its environment (``render_defaults``), ``srdistill k8s
render`` from its options, so both build the same RayJob.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from srdistill import __version__
from srdistill.config import RunConfig, load_config, preset_names

GROUP = "srdistill.io"
VERSION = "v1alpha1"
KIND = "SRDistillation"
PLURAL = "srdistillations"
#: The KubeRay API the RayJob is written for (KubeRay >= 1.3).
RAYJOB_API = "ray.io/v1"
#: Ray inside the image (``pyproject.toml`` pins it; KubeRay needs it for the autoscaler).
RAY_VERSION = "2.60.0"
#: The image a resource runs when it names none (``docker/Dockerfile``; the chart sets the operator's).
DEFAULT_IMAGE = "ghcr.io/srdistill/srdistill:0.1.0-cpu"
#: Tag suffixes of the image's two variants (``docker/README.md``).
CPU_SUFFIX, GPU_SUFFIX = "-cpu", "-gpu"
#: The image of the ``runtimeEnv`` install mode: Ray's own, without srdistill (``-gpu`` for GPU pods).
STOCK_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-cpu"
#: torch of the image (``.ci/constraints.txt``), installed by the ``runtimeEnv`` mode too.
TORCH_VERSION = "2.13.0"
#: The index of CPU-only torch wheels (PyPI's Linux wheel is the CUDA build).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

#: Pod-level securityContext of the Pod Security Standard "restricted": the Ray image's ``ray``
#: user (uid 1000) and ``users`` group (gid 100), the runtime's seccomp profile.
RESTRICTED_POD_SECURITY_CONTEXT: Mapping[str, Any] = {
    "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
    "seccompProfile": {"type": "RuntimeDefault"},
}  # fmt: skip
#: Container-level securityContext of the "restricted" standard (Ray writes under $HOME: the
#: root filesystem stays writable).
RESTRICTED_SECURITY_CONTEXT: Mapping[str, Any] = {
    "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}  # fmt: skip

#: Label on every object made for a distillation: the ``SRDistillation``'s name.
LABEL = f"{GROUP}/distillation"
#: Annotation on the RayJob: the hash of its spec (a changed spec gets a new RayJob).
SPEC_HASH = f"{GROUP}/spec-hash"
#: Phases of ``.status.phase``; the last two are terminal.
PHASES = ("Invalid", "Pending", "Initializing", "Running", "Retrying", "Suspended", "Succeeded", "Failed")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


class InvalidSpec(ValueError):
    """An ``SRDistillation`` spec that cannot become a RayJob; the message names each bad field
    by its path (``spec.cluster.workerGroups[0].maxReplicas: ...``)."""


class _Spec(BaseModel):
    # camelCase in YAML (the Kubernetes convention), snake_case in Python; unknown keys are errors
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)


Quantity = Union[int, float, str]


def _quantity(value: Quantity, what: str) -> str:
    text = str(value)
    if not _QUANTITY.match(text):
        raise ValueError(f"{what} {text!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
    return text


class Resources(_Spec):
    """Requests (= limits) of one Ray pod: ``cpu`` cores ("4", "500m"), ``memory`` bytes
    ("16Gi"), ``gpu`` NVIDIA GPUs (``nvidia.com/gpu``)."""

    cpu: Quantity = "2"
    memory: Quantity = "8Gi"
    gpu: int = Field(0, ge=0)

    @field_validator("cpu", "memory")
    @classmethod
    def _check_quantity(cls, value, info):
        return _quantity(value, info.field_name)


class WorkerGroup(Resources):
    """One Ray worker group: ``replicas`` pods at the start, autoscaled within
    ``[min_replicas, max_replicas]`` (equal bounds: a fixed size)."""

    name: str = Field(..., max_length=30)
    replicas: int = Field(1, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: Optional[int] = Field(None, ge=1, description="None: replicas (no scaling up)")
    image: Optional[str] = Field(None, description="None: the cluster's image")
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []

    @field_validator("name")
    @classmethod
    def _check_name(cls, value):
        if not _DNS_LABEL.match(value):
            raise ValueError(f"worker group name {value!r} must be a DNS label (a-z, 0-9, '-')")
        return value

    @model_validator(mode="after")
    def _check_bounds(self) -> "WorkerGroup":
        top = self.max_replicas if self.max_replicas is not None else max(self.replicas, 1)
        if not self.min_replicas <= self.replicas <= top:
            raise ValueError(f"worker group {self.name!r}: need minReplicas {self.min_replicas} <= "
                             f"replicas {self.replicas} <= maxReplicas {top}")  # fmt: skip
        return self

    @property
    def upper(self) -> int:
        """``max_replicas`` resolved (at least 1)."""
        return self.max_replicas if self.max_replicas is not None else max(self.replicas, 1)


class EnvVar(_Spec):
    """An extra environment variable of every Ray pod (e.g. ``AWS_ENDPOINT_URL`` for MinIO)."""

    name: str = Field(..., min_length=1)
    value: str


class ClusterSpec(_Spec):
    """The RayCluster a distillation runs on: made for the job and shut down after it, or an
    ``existing_cluster`` (a standing RayCluster's name) that the job is submitted to.

    ``s3_secret`` names a Secret whose keys become environment variables of every Ray pod
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optionally ``AWS_ENDPOINT_URL``,
    ``AWS_REGION``): the only way credentials reach the job. ``volumes`` (Kubernetes ``Volume``
    objects; no ``hostPath`` under the restricted Pod Security Standard) are added to every Ray
    pod and mounted by ``volume_mounts``, e.g. a read-only PVC of model weights at ``/models``.
    """

    image: Optional[str] = Field(None, description="None: the operator's default image")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account_name: Optional[str] = None
    s3_secret: Optional[str] = None
    env: list[EnvVar] = []
    volumes: list[dict[str, Any]] = Field([], description="pod volumes, e.g. a PVC of model weights")
    volume_mounts: list[dict[str, Any]] = Field([], description="their mounts in every Ray container")
    existing_cluster: Optional[str] = None
    head: Resources = Resources()
    worker_groups: list[WorkerGroup] = Field(default_factory=lambda: [WorkerGroup(name="cpu")])

    @model_validator(mode="after")
    def _check_groups(self) -> "ClusterSpec":
        names = [g.name for g in self.worker_groups]
        if len(set(names)) != len(names):
            raise ValueError(f"worker group names must be unique, got {names}")
        if not self.worker_groups and self.existing_cluster is None:
            raise ValueError("workerGroups is empty: the job needs at least one worker group")
        declared = [v.get("name") for v in self.volumes]
        if any("hostPath" in v for v in self.volumes):
            raise ValueError("hostPath volumes are not allowed (Pod Security Standard 'restricted')")
        missing = [m.get("name") for m in self.volume_mounts if m.get("name") not in declared]
        if missing:
            raise ValueError(f"volumeMounts {missing} name no volume of {declared}")
        return self

    def max_gpus(self) -> int:
        """The most GPUs a cluster made for the job can have (head + every group at
        ``maxReplicas``); 0 for an ``existing_cluster`` (its own resources decide)."""
        if self.existing_cluster:
            return 0
        return self.head.gpu + sum(g.gpu * g.upper for g in self.worker_groups)


class JobSpec(_Spec):
    """The RayJob's lifecycle: retries of the whole job (``backoff_limit``; a retry resumes the
    run from its output URI), cleanup ``ttl_seconds_after_finished`` s after the end, and an
    optional deadline ``active_deadline_seconds``."""

    ttl_seconds_after_finished: int = Field(3600, ge=0)
    backoff_limit: int = Field(2, ge=0)
    active_deadline_seconds: Optional[int] = Field(None, ge=1)


class DistillationSpec(_Spec):
    """``SRDistillation.spec``: the same inputs as ``srdistill run`` plus the cluster shape.

    ``config`` has the schema of the CLI's ``--config`` YAML (``srdistill.config.RunConfig``),
    merged over ``preset``. ``output`` is an ``s3://`` URI or an absolute path on a
    PersistentVolumeClaim that ``cluster.volumes``/``volumeMounts`` mount read-write in every Ray
    pod (pod disks vanish with the RayCluster, every Ray pod writes to the run directory, and a
    RayJob retry resumes from what the output holds). With ``cluster.existing_cluster`` a path
    is taken as is: the standing cluster's own volumes must hold it.
    ``run_id`` (any string or integer) is the explicit request to run a spec again: the operator
    never reruns a spec whose RayJob it created once, so a finished or failed run is rerun by
    setting a new ``runId`` (it resumes from ``output``: stages already done there are skipped).
    """

    input: str = Field(..., min_length=1, description="HR corpus: folder/prefix or manifest file")
    preset: Optional[str] = None
    distill: Optional[Literal["coreset", "synth"]] = None
    allow_random_init: bool = False
    config: dict[str, Any] = Field({}, validate_default=True)
    cluster: ClusterSpec = ClusterSpec()
    job: JobSpec = JobSpec()
    # after cluster: its check reads the mounts
    output: str = Field(..., min_length=1, description="run directory: s3://bucket/prefix or a path on a PVC")
    run_id: Optional[Union[int, str]] = Field(None, description="a new value reruns a finished spec")

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, value):
        if value is not None and value not in preset_names():
            raise ValueError(f"preset {value!r} is not one of {preset_names()}")
        return value

    @field_validator("output")
    @classmethod
    def _check_output(cls, value, info):
        if value.startswith("s3://"):
            if len(value) <= len("s3://"):
                raise ValueError(f"output {value!r} names no bucket")
            return value
        cluster = info.data.get("cluster")  # None: cluster itself is invalid (reported there)
        if not value.startswith("/"):
            raise ValueError(f"output {value!r} must be an s3:// URI or an absolute path on a mounted PVC")
        if cluster is None or cluster.existing_cluster:
            return value
        claims = {v.get("name") for v in cluster.volumes
                  if "persistentVolumeClaim" in v and not v["persistentVolumeClaim"].get("readOnly")}  # fmt: skip
        for mount in cluster.volume_mounts:
            root = str(mount.get("mountPath", "")).rstrip("/") + "/"
            writable = mount.get("name") in claims and not mount.get("readOnly")
            if writable and (value.rstrip("/") + "/").startswith(root):
                return value
        shown = [f"{m.get('name')}:{m.get('mountPath')}" for m in cluster.volume_mounts] or "none"
        raise ValueError(f"output {value!r} is not under a read-write persistentVolumeClaim mount of "
                         f"cluster.volumeMounts ({shown}): pod disks vanish with the cluster")  # fmt: skip

    @field_validator("config")
    @classmethod
    def _check_config(cls, value, info):
        fields = info.data  # the fields declared before config, where valid
        try:
            _run_config(fields.get("preset"), fields.get("distill"), fields.get("allow_random_init"), value)
        except ValidationError as exc:
            raise ValueError(_errors(exc)) from None
        return value

    def run_config(self) -> RunConfig:
        """The resolved pipeline config (``preset`` + ``config`` + ``distill``/``allow_random_init``)."""
        return _run_config(self.preset, self.distill, self.allow_random_init, self.config)

    def entrypoint(self) -> str:
        """The shell command the RayJob runs on the head: ``srdistill run`` with this spec, plus
        ``--gpus N`` when the cluster made for the job has GPUs (N: the most its groups can
        bring up), so stages ask for GPUs even while autoscaled GPU groups are at zero."""
        args = ["srdistill", "run", "--input", self.input, "--out", self.output]
        args += ["--preset", self.preset] * bool(self.preset)
        args += ["--distill", self.distill] * bool(self.distill)
        args += ["--allow-random-init"] * self.allow_random_init
        gpus = self.cluster.max_gpus()
        args += ["--gpus", str(gpus)] * bool(gpus)
        if self.config:
            args += ["--config-json", json.dumps(self.config, sort_keys=True, separators=(",", ":"))]
        return shlex.join(args)


def _run_config(preset: str | None, distill: str | None, allow_random_init: bool | None, config: dict) -> RunConfig:
    overrides = [f"distill={distill}"] * bool(distill)
    overrides += ["embed.allow_random_init=true", "complexity.allow_random_init=true"] * bool(allow_random_init)
    return load_config(preset, None, overrides, data=config)


def parse_spec(spec: dict | None) -> DistillationSpec:
    """Validate an ``SRDistillation.spec`` (camelCase dict, as stored by the API server), its
    pipeline config included (``spec.config`` merged over ``spec.preset`` into a ``RunConfig``).

    Raises:
        InvalidSpec: one line per problem, each naming the field by its path in the resource.
    """
    try:
        return DistillationSpec.model_validate(spec or {})
    except ValidationError as exc:
        raise InvalidSpec(_errors(exc, "spec")) from None


def _errors(exc: ValidationError, root: str = "") -> str:
    """``root.a.b[0].c: message; ...`` for each error of ``exc``."""
    lines = []
    for err in exc.errors():
        path = (root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])).lstrip(".")
        lines.append(f"{path}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


# --------------------------------------------------------------------------- rendering settings


class Install(_Spec):
    """How srdistill reaches the Ray pods of a RayJob.

    ``image``: it is in the image (``docker/Dockerfile``; the default image is
    ``DEFAULT_IMAGE``, which the user builds and pushes). ``runtimeEnv``: the image is Ray's own
    (default ``STOCK_IMAGE``) and Ray installs ``package`` with pip from the RayJob's
    ``runtimeEnvYAML`` at job start, with ``torch==TORCH_VERSION``: the CPU build from
    ``torch_cpu_index`` when the job's own cluster has no GPU, else PyPI's (CUDA) wheel, which
    also runs on CPU-only pods (a standing ``existingCluster`` gets it too: its GPUs are unknown).
    The entrypoint first downloads the evaluation sets (``srdistill data get``) on the head, as
    the image's vendored ``/app/data`` is absent.

    ``package``: a pinned pip requirement of srdistill, ``srdistill[cpu,synth]==<version>`` (the
    default: this version, from PyPI) or a direct reference such as
    ``srdistill[cpu,synth] @ git+https://github.com/srdistill/srdistill@v0.1.0``.
    """

    mode: Literal["image", "runtimeEnv"] = "image"
    package: str = Field(default_factory=lambda: f"srdistill[cpu,synth]=={__version__}")
    torch_cpu_index: str = Field(TORCH_CPU_INDEX, min_length=1)

    @field_validator("package")
    @classmethod
    def _check_package(cls, value):
        name, at, url = (part.strip() for part in value.partition("@"))
        pinned = re.fullmatch(r"srdistill(\[[\w,\s-]*\])?\s*==\s*[\w.+!-]+", value.strip()) or (
            at and re.fullmatch(r"srdistill(\[[\w,\s-]*\])?", name)
            and (not url.startswith("git+") or "@" in url.rsplit("/", 1)[-1]))  # fmt: skip
        if not pinned:
            raise ValueError(f"package {value!r} is not a pinned requirement of srdistill: give 'srdistill"
                             "[cpu,synth]==<version>' or 'srdistill[cpu,synth] @ git+<repo URL>@<tag or commit>'")  # fmt: skip
        return value


def _json_object(text: str, what: str) -> dict:
    """A JSON (or YAML flow) object from a setting; ValueError naming ``what`` otherwise."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} is not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {text!r}")
    return value


def render_settings(*, default_image: str | None = None, pod_security_context: str | None = None,
                    security_context: str | None = None, install: str | None = None,
                    where: Mapping[str, str] | None = None) -> dict:  # fmt: skip
    """``rayjob``'s keyword arguments from their text forms (each None: ``rayjob``'s default).

    Args:
        default_image: the image of specs that name none.
        pod_security_context, security_context: JSON objects (Kubernetes ``PodSecurityContext``
            and ``SecurityContext``), e.g. ``{"runAsNonRoot": true}``.
        install: a JSON object of ``Install`` (camelCase: ``{"mode": "runtimeEnv", "package": ...}``).
        where: the name of each setting's source for errors (an environment variable, an option).

    Raises:
        ValueError: a setting is not a JSON object or not a valid ``Install``, naming its source.
    """
    names = {"pod_security_context": "pod securityContext", "security_context": "securityContext",
             "install": "install settings", **(where or {})}  # fmt: skip
    out: dict[str, Any] = {}
    if default_image:
        out["default_image"] = default_image
    for key, text in (("pod_security_context", pod_security_context), ("security_context", security_context)):
        if text:
            out[key] = _json_object(text, names[key])
    if install:
        try:
            out["install"] = Install.model_validate(_json_object(install, names["install"]))
        except ValidationError as exc:
            raise ValueError(f"{names['install']}: {_errors(exc)}") from None
    return out


#: The operator's environment variables read by ``render_defaults`` (the chart sets them).
RENDER_ENV = {"default_image": "SRDISTILL_DEFAULT_IMAGE", "pod_security_context": "SRDISTILL_POD_SECURITY_CONTEXT",
              "security_context": "SRDISTILL_SECURITY_CONTEXT", "install": "SRDISTILL_INSTALL"}  # fmt: skip


def render_defaults(environ: Mapping[str, str]) -> dict:
    """The operator's rendering defaults: ``rayjob``'s keyword arguments from ``RENDER_ENV``
    variables of ``environ`` (unset or empty: ``rayjob``'s own default).

    ``SRDISTILL_DEFAULT_IMAGE`` (an image), ``SRDISTILL_POD_SECURITY_CONTEXT`` and
    ``SRDISTILL_SECURITY_CONTEXT`` (JSON objects), ``SRDISTILL_INSTALL`` (a JSON ``Install``).

    Raises:
        ValueError: a variable does not parse, naming it.
    """
    return render_settings(**{key: environ.get(var) or None for key, var in RENDER_ENV.items()}, where=RENDER_ENV)


def runtime_env(spec: DistillationSpec, install: Install) -> dict | None:
    """The Ray runtime env of ``spec``'s job (``runtimeEnvYAML``): None in ``image`` mode, else pip
    installs ``install.package`` and ``torch==TORCH_VERSION`` (the CPU build when the job's own
    cluster has no GPU; see ``Install``)."""
    if install.mode == "image":
        return None
    cpu_only = not spec.cluster.existing_cluster and not spec.cluster.max_gpus()
    options = ["--no-cache-dir", "--disable-pip-version-check"]
    options += ["--extra-index-url", install.torch_cpu_index] * cpu_only
    return {"pip": {"packages": [install.package, f"torch=={TORCH_VERSION}"], "pip_install_options": options}}


# --------------------------------------------------------------------------- the RayJob


class _PodDefaults(NamedTuple):
    """What every pod of one RayJob shares (each pod gets its own copies: YAML would otherwise
    write anchors and aliases for the shared dicts)."""

    image: str
    labels: dict
    pod_sc: dict  # pod securityContext
    ctr_sc: dict  # container securityContext


def gpu_image(image: str) -> str:
    """The GPU variant of an image: a tag ending in ``-cpu`` gets ``-gpu`` instead
    (``repo:0.1.0-cpu`` -> ``repo:0.1.0-gpu``, ``rayproject/ray:2.60.0-py311-cpu`` ->
    ``...-py311-gpu``); any other image is returned as it is (it is the user's choice for every
    pod)."""
    repo, sep, tag = image.rpartition(":")
    if sep and "/" not in tag and tag.endswith(CPU_SUFFIX):
        return f"{repo}:{tag[: -len(CPU_SUFFIX)]}{GPU_SUFFIX}"
    return image


def _pod(spec: DistillationSpec, container: str, res: Resources, pods: _PodDefaults, *,
         ports: list | None = None, group: WorkerGroup | None = None) -> dict:  # fmt: skip
    """A Ray pod template: one container with requests = limits, the S3 secret as env, a
    memory-backed /dev/shm for Ray's object store and a scratch cache. A pod with GPUs runs
    the GPU variant of the image (``gpu_image``) unless its group names an image."""
    cluster = spec.cluster
    amounts = {"cpu": res.cpu, "memory": res.memory}
    limits = {**amounts, **({"nvidia.com/gpu": res.gpu} if res.gpu else {})}
    ctr: dict[str, Any] = {
        "name": container,
        "image": group.image if group and group.image else gpu_image(pods.image) if res.gpu else pods.image,
        "imagePullPolicy": cluster.image_pull_policy,
        "resources": {"requests": dict(amounts), "limits": limits},
        "env": [{"name": "SRDISTILL_CACHE", "value": "/home/ray/.cache/srdistill"},
                *({"name": e.name, "value": e.value} for e in cluster.env)],  # fmt: skip
        "securityContext": copy.deepcopy(pods.ctr_sc),
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "cache", "mountPath": "/home/ray/.cache"},
                         *(dict(m) for m in cluster.volume_mounts)],  # fmt: skip
    }
    if cluster.s3_secret:
        ctr["envFrom"] = [{"secretRef": {"name": cluster.s3_secret}}]
    if ports:
        ctr["ports"] = ports
    pod: dict[str, Any] = {
        "securityContext": copy.deepcopy(pods.pod_sc),
        "containers": [ctr],
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}, {"name": "cache", "emptyDir": {}},
                    *(dict(v) for v in cluster.volumes)],  # fmt: skip
    }
    if cluster.service_account_name:
        pod["serviceAccountName"] = cluster.service_account_name
    if group and group.node_selector:
        pod["nodeSelector"] = dict(group.node_selector)
    if group and group.tolerations:
        pod["tolerations"] = [dict(t) for t in group.tolerations]
    return {"metadata": {"labels": dict(pods.labels)}, "spec": pod}


def _ray_cluster_spec(spec: DistillationSpec, pods: _PodDefaults) -> dict:
    head_ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}]  # fmt: skip
    groups = spec.cluster.worker_groups
    autoscale = any(g.min_replicas != g.upper for g in groups)
    out: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": autoscale,
        # the head schedules no tasks: all work lands on the worker groups
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": _pod(spec, "ray-head", spec.cluster.head, pods, ports=head_ports),
        },
        "workerGroupSpecs": [
            {
                "groupName": g.name,
                "replicas": g.replicas,
                "minReplicas": g.min_replicas,
                "maxReplicas": g.upper,
                "rayStartParams": {},
                "template": _pod(spec, "ray-worker", g, pods, group=g),
            }
            for g in groups
        ],
    }
    if autoscale:
        out["autoscalerOptions"] = {"securityContext": copy.deepcopy(pods.ctr_sc),
                                    "imagePullPolicy": spec.cluster.image_pull_policy}  # fmt: skip
    return out


def _submitter(spec: DistillationSpec, pods: _PodDefaults) -> dict:
    """The pod of the K8s Job that runs ``ray job submit`` (KubeRay fills in its command)."""
    ctr = {
        "name": "ray-job-submitter",
        "image": pods.image,
        "imagePullPolicy": spec.cluster.image_pull_policy,
        "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": copy.deepcopy(pods.ctr_sc),
    }
    pod = {"restartPolicy": "Never", "securityContext": copy.deepcopy(pods.pod_sc), "containers": [ctr]}
    return {"metadata": {"labels": dict(pods.labels)}, "spec": pod}


def rayjob(spec: DistillationSpec, name: str, *, namespace: str | None = None, default_image: str | None = None,
           labels: dict[str, str] | None = None, pod_security_context: Mapping[str, Any] | None = None,
           security_context: Mapping[str, Any] | None = None, install: Install | None = None) -> dict:  # fmt: skip
    """The KubeRay ``RayJob`` (``ray.io/v1``) that runs ``spec`` as one ``srdistill run``.

    Without ``cluster.existing_cluster`` the job gets its own RayCluster (head + the worker
    groups, in-tree autoscaling when a group's bounds differ), shut down when the job finishes
    and deleted ``job.ttl_seconds_after_finished`` s later; with it, the job is submitted to
    that standing cluster (``clusterSelector``). The job runs in K8s-Job submission mode and is
    retried ``job.backoff_limit`` times; a retry resumes from the run directory at ``output``.
    Pods with GPUs (a group's or the head's ``gpu``) run the image's GPU variant
    (``gpu_image``: ``-cpu`` -> ``-gpu``) unless their group names an image; the others, the
    submitter included, run the image as given.

    Args:
        spec: a validated spec (``parse_spec``).
        name: ``metadata.name`` of the RayJob (a DNS label; KubeRay caps it near 47 chars).
        namespace: ``metadata.namespace``; None leaves it out (``kubectl apply -n``).
        default_image: the image when ``spec.cluster.image`` is None; None: ``DEFAULT_IMAGE``,
            or ``STOCK_IMAGE`` in the ``runtimeEnv`` install mode.
        labels: extra labels for the RayJob and its pods.
        pod_security_context: every pod's ``securityContext``; None:
            ``RESTRICTED_POD_SECURITY_CONTEXT``.
        security_context: every container's (and the autoscaler's) ``securityContext``; None:
            ``RESTRICTED_SECURITY_CONTEXT``.
        install: how srdistill reaches the pods; None: ``Install()`` (in the image).

    Returns:
        The manifest as a dict, annotated with ``SPEC_HASH`` (a hash of its ``spec``).
    """
    install = install or Install()
    default = default_image or (STOCK_IMAGE if install.mode == "runtimeEnv" else DEFAULT_IMAGE)
    labels = {"app.kubernetes.io/name": "srdistill", "app.kubernetes.io/component": "distillation",
              **(labels or {})}  # fmt: skip
    pod_sc = RESTRICTED_POD_SECURITY_CONTEXT if pod_security_context is None else pod_security_context
    ctr_sc = RESTRICTED_SECURITY_CONTEXT if security_context is None else security_context
    pods = _PodDefaults(spec.cluster.image or default, labels, dict(pod_sc), dict(ctr_sc))
    entrypoint = spec.entrypoint()
    env = runtime_env(spec, install)
    if env is not None:  # no vendored /app/data: fetch the evaluation sets first (on the head)
        sets = [name for name in spec.run_config().evaluate.datasets if "/" not in name]  # names, not folders
        entrypoint = f"{shlex.join(['srdistill', 'data', 'get', *sets])} && {entrypoint}" if sets else entrypoint
    body: dict[str, Any] = {
        "entrypoint": entrypoint,
        "submissionMode": "K8sJobMode",
        "backoffLimit": spec.job.backoff_limit,
        "submitterPodTemplate": _submitter(spec, pods),
    }
    if env is not None:
        body["runtimeEnvYAML"] = yaml.safe_dump(env, sort_keys=False)
    if spec.cluster.existing_cluster:
        body["clusterSelector"] = {"ray.io/cluster": spec.cluster.existing_cluster}
    else:
        body["shutdownAfterJobFinishes"] = True
        body["ttlSecondsAfterFinished"] = spec.job.ttl_seconds_after_finished
        body["rayClusterSpec"] = _ray_cluster_spec(spec, pods)
    if spec.job.active_deadline_seconds is not None:
        body["activeDeadlineSeconds"] = spec.job.active_deadline_seconds
    metadata: dict[str, Any] = {"name": name, "labels": labels, "annotations": {SPEC_HASH: spec_hash(body)}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": RAYJOB_API, "kind": "RayJob", "metadata": metadata, "spec": body}


def spec_hash(rayjob_spec: dict) -> str:
    """10 hex digits of SHA-256 over the canonical JSON of a RayJob's ``spec``."""
    return hashlib.sha256(json.dumps(rayjob_spec, sort_keys=True).encode()).hexdigest()[:10]


def rayjob_name(distillation: str, digest: str) -> str:
    """The owned RayJob's name: ``<distillation>-<digest[:8]>``, at most 39 characters (KubeRay
    derives the RayCluster's and pods' names from it)."""
    return f"{distillation[:30].rstrip('-')}-{digest[:8]}"


#: Fields of the spec that say how the RayJob is kept and retried, not what the pipeline computes
#: (``model_dump`` exclude form): they are left out of ``spec_identity``, so changing one never
#: reruns anything. The operator patches the ``job`` ones into a live RayJob (``LIVE_FIELDS``);
#: ``cluster.imagePullPolicy`` applies from the next run on.
LIFECYCLE_FIELDS: dict[str, set[str]] = {
    "job": {"ttl_seconds_after_finished", "backoff_limit", "active_deadline_seconds"},
    "cluster": {"image_pull_policy"},
}
#: The RayJob ``spec`` fields the ``job`` lifecycle fields render to (KubeRay reads them on
#: every reconcile, so a patch takes effect in the running job).
LIVE_FIELDS = ("ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds")


def spec_identity(spec: DistillationSpec) -> str:
    """What ``spec`` computes, as 10 hex digits: SHA-256 over the canonical JSON of the fields the
    user set (values equal to a default count as unset, so a default the API server or a newer
    srdistill fills in changes nothing), without ``LIFECYCLE_FIELDS``; ``run_id`` is part of it.
    The operator's defaults (image, ...) are not: they are resolved once per resource and
    recorded in its status, so an operator upgrade never changes an identity."""
    data = spec.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude=LIFECYCLE_FIELDS)
    data = {key: value for key, value in data.items() if not (key in LIFECYCLE_FIELDS and value == {})}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def pinned_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``render_defaults``' result with every default that ``rayjob`` would fill in made explicit,
    in JSON form (``install`` as its camelCase object): what the operator records in a resource's
    ``.status.defaults`` at its first RayJob, so that any later operator, whose own defaults may
    differ, renders its RayJobs alike. ``rayjob(..., **defaults_from_status(pinned))`` renders
    as ``rayjob(..., **defaults)`` does."""
    install = defaults.get("install") or Install()
    pod_sc, ctr_sc = defaults.get("pod_security_context"), defaults.get("security_context")
    return {
        "default_image": defaults.get("default_image") or (STOCK_IMAGE if install.mode == "runtimeEnv" else DEFAULT_IMAGE),
        "pod_security_context": copy.deepcopy(dict(RESTRICTED_POD_SECURITY_CONTEXT if pod_sc is None else pod_sc)),
        "security_context": copy.deepcopy(dict(RESTRICTED_SECURITY_CONTEXT if ctr_sc is None else ctr_sc)),
        "install": install.model_dump(mode="json", by_alias=True),
    }  # fmt: skip


def defaults_from_status(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """``rayjob``'s keyword arguments from ``pinned_defaults``' form (a record that lacks a key,
    e.g. one written by an older operator, leaves it to ``rayjob``'s default).

    Raises:
        ValueError: a recorded ``install`` is not a valid ``Install``.
    """
    out = {key: recorded[key] for key in RENDER_ENV if key in recorded}
    if "install" in out:
        try:
            out["install"] = Install.model_validate(out["install"])
        except ValidationError as exc:
            raise ValueError(f"status.defaults.install: {_errors(exc)}") from None
    return out


@dataclass(frozen=True)
class AllowList:
    """What an ``SRDistillation`` may name: image, ServiceAccount and Secret name patterns
    (``fnmatch`` globs: ``rayproject/ray:*``; ``*`` allows any). ``None`` allows anything, an
    empty tuple nothing. Images the spec leaves to the operator (its default image) are always
    allowed: only what the spec names is checked."""

    images: tuple[str, ...] | None = None
    service_accounts: tuple[str, ...] | None = None
    secrets: tuple[str, ...] | None = None

    #: The operator's environment variables of each list (comma- or space-separated globs;
    #: unset: no limit; set but empty: nothing allowed). The chart always sets them.
    ENV: ClassVar[dict[str, str]] = {"images": "SRDISTILL_ALLOWED_IMAGES", "secrets": "SRDISTILL_ALLOWED_SECRETS",
                                     "service_accounts": "SRDISTILL_ALLOWED_SERVICE_ACCOUNTS"}  # fmt: skip

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> AllowList:
        """The allow-list of ``ENV``'s variables in ``environ``."""

        def globs(var: str) -> tuple[str, ...] | None:
            value = environ.get(var)
            return None if value is None else tuple(p for p in re.split(r"[,\s]+", value) if p)

        return cls(**{field: globs(var) for field, var in cls.ENV.items()})

    def check(self, spec: DistillationSpec) -> None:
        """Raise ``InvalidSpec`` naming each image, ServiceAccount or Secret of ``spec`` (by its
        path) that the lists do not allow; the Secrets are ``cluster.s3Secret`` and those of
        ``cluster.volumes`` (``secret``, projected ``secret`` sources, ``*SecretRef``)."""
        cluster = spec.cluster
        named = {
            "images": [("spec.cluster.image", cluster.image)]
            + [(f"spec.cluster.workerGroups[{i}].image", g.image) for i, g in enumerate(cluster.worker_groups)],
            "service_accounts": [("spec.cluster.serviceAccountName", cluster.service_account_name)],
            "secrets": [("spec.cluster.s3Secret", cluster.s3_secret),
                        *_secret_refs(list(cluster.volumes), "spec.cluster.volumes")],
        }  # fmt: skip
        problems = []
        for field, items in named.items():
            allowed = getattr(self, field)
            if allowed is None:
                continue
            for path, value in items:
                if value is not None and not any(fnmatch.fnmatchcase(value, p) for p in allowed):
                    problems.append(f"{path}: {value!r} is not in the operator's allow-list of {field.replace('_', ' ')} "
                                    f"[{', '.join(allowed)}] (chart value allowList.{to_camel(field)})")  # fmt: skip
        if problems:
            raise InvalidSpec("; ".join(problems))


def _secret_refs(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """``(path, name)`` of each Secret named in Kubernetes volume objects: ``secret.secretName``,
    a projected source's ``secret.name``, and ``<anything>SecretRef.name`` (e.g. CSI's
    ``nodePublishSecretRef``)."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _secret_refs(item, f"{path}[{i}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, dict) and (key == "secret" or key.endswith(("SecretRef", "secretRef"))):
                field = "secretName" if "secretName" in value else "name"
                if isinstance(value.get(field), str):
                    yield f"{path}.{key}.{field}", value[field]
            yield from _secret_refs(value, f"{path}.{key}")

# --------------------------------------------------------------------------- the CRD's spec.config

#: JSON-schema keywords of pydantic's schema copied into the CRD as they are (OpenAPI v3.0 has them).
_KEPT = ("type", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems")
#: Keywords left out: documentation the CRD does not need, and defaults (the API server would
#: write them into the stored spec, where they would override the preset's values).
_DROPPED = ("title", "default", "examples")
#: The marker line opening the generated block in the CRD file.
CONFIG_MARKER = "# generated from srdistill.config.RunConfig by `srdistill k8s crd`: do not edit"


def _summary(text: str) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join(text.strip().split("\n\n")[0].split())


def _openapi(node: dict, defs: dict, path: str) -> dict:
    """One node of pydantic's JSON schema as a structural OpenAPI v3.0 schema (see ``config_schema``)."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        own = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **own, "description": own.get("description") or _summary(target.get("description", ""))}
    if "anyOf" in node and sorted(b.get("type") for b in node["anyOf"]) == ["integer", "number"]:
        node = {**{k: v for k, v in node.items() if k != "anyOf"}, "type": "number"}  # int | float
    if "anyOf" in node:  # Optional[X]: X, nullable
        branches = [b for b in node["anyOf"] if b != {"type": "null"}]
        if len(branches) != 1 or len(branches) == len(node["anyOf"]):
            raise ValueError(f"{path}: a union other than Optional[X] has no structural schema: {node['anyOf']}")
        out = _openapi({**branches[0], **{k: v for k, v in node.items() if k != "anyOf"}}, defs, path)
        out["nullable"] = True
        if "enum" in out:
            out["enum"] = [*out["enum"], None]  # the API server checks null against the enum too
        return out
    unknown = set(node) - {*_KEPT, *_DROPPED, "description", "const", "properties", "additionalProperties",
                           "items", "exclusiveMinimum", "exclusiveMaximum", "required"}  # fmt: skip
    if unknown:
        raise ValueError(f"{path}: no OpenAPI conversion for {sorted(unknown)}")
    out: dict[str, Any] = {k: node[k] for k in _KEPT if k in node}
    if node.get("description"):
        out["description"] = _summary(node["description"])
    if "const" in node:
        out["enum"] = [node["const"]]
    for bound, key in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if key in node:  # JSON schema's number -> OpenAPI v3.0's boolean
            out[bound], out[key] = node[key], True
    if "properties" in node:  # no `required`: spec.config is merged over the preset
        out["properties"] = {k: _openapi(v, defs, f"{path}.{k}") for k, v in node["properties"].items()}
    elif isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _openapi(node["additionalProperties"], defs, f"{path}.*")
    if "items" in node:
        out["items"] = _openapi(node["items"], defs, f"{path}[]")
    if "type" not in out:
        raise ValueError(f"{path}: a structural schema needs a type: {node}")
    return out


def config_schema() -> dict:
    """The OpenAPI v3.0 schema of ``SRDistillation.spec.config``, from ``RunConfig``.

    Structural (every node typed, no ``$ref``, no type-bearing ``anyOf``): ``Optional[X]`` is
    ``X`` with ``nullable: true``. Every object lists its fields and keeps no unknown ones (no
    ``x-kubernetes-preserve-unknown-fields``), as the models forbid extras; no field is
    ``required`` and no ``default`` is given, as ``config`` is merged over the preset. What the
    models check across fields (e.g. ``patch_size`` divisible by ``bic_scale``) is left to
    ``parse_spec``.

    Raises:
        ValueError: a field has no structural equivalent (a union other than ``Optional``).
    """
    schema = RunConfig.model_json_schema()
    out = _openapi({k: v for k, v in schema.items() if k != "$defs"}, schema.get("$defs", {}), "config")
    out["description"] = ("Pipeline config, the schema of the CLI's --config YAML (srdistill.config.RunConfig), merged "
                          "over the preset. An unknown key fails kubectl apply (strict field validation).")  # fmt: skip
    return out


def crd_with_config_schema(text: str) -> str:
    """The CRD file ``text`` with its ``spec.config`` schema replaced by ``config_schema()`` (the
    rest of the file, comments included, is kept as it is).

    Raises:
        ValueError: the text has no single ``config:`` key of the spec's properties.
    """
    lines = text.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if re.fullmatch(r" +config:\s*", line)]
    if len(found) != 1:
        raise ValueError(f"expected one 'config:' line in the CRD, found {len(found)}")
    start = found[0]
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    pad = " " * (indent + 2)
    body = yaml.safe_dump(config_schema(), sort_keys=False, width=110, allow_unicode=True)
    block = [pad + CONFIG_MARKER + "\n", *(pad + line + "\n" for line in body.splitlines())]
    return "".join([*lines[: start + 1], *block, *lines[end:]])


# --------------------------------------------------------------------------- status


def stage_progress(manifest: dict | None) -> dict:
    """Per-stage progress from a run manifest (``<output>/manifest.json``).

    Returns:
        ``{"stages": {stage: "done"|"running"|..., in pipeline order}, "stagesDone": int,
        "stagesTotal": int, "currentStage": str | None}``; the total counts the stages this
        run's config executes (``rundir.stage_chain``), and ``{}`` without a manifest.
    """
    from srdistill.run.rundir import STAGES, stage_chain

    if not manifest:
        return {}
    stages = manifest.get("stages") or {}
    try:
        planned = stage_chain(RunConfig.model_validate(manifest.get("config") or {}))
    except ValidationError:  # a run of another srdistill version: count what it recorded
        planned = list(stages)
    status = {s: str(stages[s].get("status", "unknown")) for s in STAGES if s in stages}
    running = [s for s, v in status.items() if v == "running"]
    return {
        "stages": status,
        "stagesDone": sum(v == "done" for v in status.values()),
        "stagesTotal": len(planned),
        "currentStage": running[-1] if running else None,
    }


def phase_of(rayjob_status: dict | None) -> str:
    """``.status.phase`` from a RayJob's status (``jobDeploymentStatus``, ``jobStatus``)."""
    st = rayjob_status or {}
    deploy, job = st.get("jobDeploymentStatus", ""), st.get("jobStatus", "")
    if deploy == "Complete":
        return "Succeeded" if job == "SUCCEEDED" else "Failed"
    if deploy in ("Failed", "ValidationFailed"):
        return "Failed"
    return {"Running": "Running", "Retrying": "Retrying", "Suspended": "Suspended",
            "Suspending": "Suspended", "Initializing": "Initializing"}.get(deploy, "Pending")  # fmt: skip


def condition(type_: str, status: bool, reason: str, message: str = "", *, now: str,
              previous: list[dict] | None = None) -> dict:  # fmt: skip
    """A Kubernetes condition; ``lastTransitionTime`` kept from ``previous`` if the status is the
    same (``now``: RFC 3339 UTC)."""
    value = "True" if status else "False"
    since = next((c.get("lastTransitionTime") for c in previous or ()
                  if c.get("type") == type_ and c.get("status") == value), None)  # fmt: skip
    return {"type": type_, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": since or now}  # fmt: skip
