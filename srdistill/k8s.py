"""Kubernetes: the ``SRDistillation`` resource and the KubeRay ``RayJob`` it becomes.

    srdistill k8s render --input s3://corpora/DIV2K/ --out s3://runs/div2k --preset demo > rayjob.yaml
    kubectl apply -f rayjob.yaml        # KubeRay starts a RayCluster, runs the job, shuts it down

Pure functions over plain dicts: no Kubernetes client and no Ray here. ``srdistill k8s render``
prints what ``rayjob`` builds; the operator (``operators/srdistill_operator.py``) validates each
resource with ``parse_spec``, owns one ``rayjob`` per spec and mirrors ``distillation_status``
into the resource's ``.status``. The CRD that declares the same schema for the API server is
``charts/srdistill/crds/srdistill.io_srdistillations.yaml`` (a test keeps the two in step).

Every pod follows the Pod Security Standard "restricted": non-root (uid 1000, the Ray image's
``ray`` user), no privilege escalation, all capabilities dropped, the runtime's seccomp profile.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .config import RunConfig, load_config, preset_names

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

#: Label on every object made for a distillation: the ``SRDistillation``'s name.
LABEL = f"{GROUP}/distillation"
#: Annotation on the RayJob: the hash of its spec (a changed spec gets a new RayJob).
SPEC_HASH = f"{GROUP}/spec-hash"
#: Phases of ``.status.phase``; the last two are terminal.
PHASES = ("Invalid", "Pending", "Initializing", "Running", "Retrying", "Suspended", "Succeeded", "Failed")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_UID, _GID = 1000, 100  # the Ray image's ``ray`` user and ``users`` group


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
    merged over ``preset``. ``output`` must be an ``s3://`` URI: pod disks vanish with the
    RayCluster, and a RayJob retry resumes from what the output holds. ``run_id`` (any string or
    integer) is the explicit request to run a spec again: the operator never reruns a spec whose
    RayJob it created once, so a finished or failed run is rerun by setting a new ``runId``
    (it resumes from ``output``: stages already done there are skipped).
    """

    input: str = Field(..., min_length=1, description="HR corpus: folder/prefix or manifest file")
    output: str = Field(..., min_length=1, description="run directory, s3://bucket/prefix")
    preset: Optional[str] = None
    distill: Optional[Literal["coreset", "synth"]] = None
    allow_random_init: bool = False
    config: dict[str, Any] = Field({}, validate_default=True)
    cluster: ClusterSpec = ClusterSpec()
    job: JobSpec = JobSpec()
    run_id: Optional[Union[int, str]] = Field(None, description="a new value reruns a finished spec")

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, value):
        if value is not None and value not in preset_names():
            raise ValueError(f"preset {value!r} is not one of {preset_names()}")
        return value

    @field_validator("output")
    @classmethod
    def _check_output(cls, value):
        if not value.startswith("s3://") or len(value) <= len("s3://"):
            raise ValueError(f"output {value!r} must be an s3:// URI (pod disks vanish with the cluster)")
        return value

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


# --------------------------------------------------------------------------- the RayJob


def _restricted_container() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


def _restricted_pod() -> dict:
    return {"runAsNonRoot": True, "runAsUser": _UID, "runAsGroup": _GID, "fsGroup": _GID,
            "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


def gpu_image(image: str) -> str:
    """The GPU variant of an image: a tag ending in ``-cpu`` gets ``-gpu`` instead
    (``repo:0.1.0-cpu`` -> ``repo:0.1.0-gpu``); any other image is returned as it is (it is the
    user's choice for every pod)."""
    repo, sep, tag = image.rpartition(":")
    if sep and "/" not in tag and tag.endswith(CPU_SUFFIX):
        return f"{repo}:{tag[: -len(CPU_SUFFIX)]}{GPU_SUFFIX}"
    return image


def _pod(spec: DistillationSpec, container: str, res: Resources, *, image: str, labels: dict,
         ports: list | None = None, group: WorkerGroup | None = None) -> dict:  # fmt: skip
    """A Ray pod template: one container with requests = limits, the S3 secret as env, a
    memory-backed /dev/shm for Ray's object store and a scratch cache. A pod with GPUs runs
    the GPU variant of ``image`` (``gpu_image``) unless its group names an image."""
    cluster = spec.cluster
    amounts = {"cpu": res.cpu, "memory": res.memory}
    limits = {**amounts, **({"nvidia.com/gpu": res.gpu} if res.gpu else {})}
    ctr: dict[str, Any] = {
        "name": container,
        "image": group.image if group and group.image else gpu_image(image) if res.gpu else image,
        "imagePullPolicy": cluster.image_pull_policy,
        "resources": {"requests": dict(amounts), "limits": limits},
        "env": [{"name": "SRDISTILL_CACHE", "value": "/home/ray/.cache/srdistill"},
                *({"name": e.name, "value": e.value} for e in cluster.env)],  # fmt: skip
        "securityContext": _restricted_container(),
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "cache", "mountPath": "/home/ray/.cache"},
                         *(dict(m) for m in cluster.volume_mounts)],  # fmt: skip
    }
    if cluster.s3_secret:
        ctr["envFrom"] = [{"secretRef": {"name": cluster.s3_secret}}]
    if ports:
        ctr["ports"] = ports
    pod: dict[str, Any] = {
        "securityContext": _restricted_pod(),
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
    return {"metadata": {"labels": dict(labels)}, "spec": pod}


def _ray_cluster_spec(spec: DistillationSpec, image: str, labels: dict) -> dict:
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
            "template": _pod(spec, "ray-head", spec.cluster.head, image=image, labels=labels, ports=head_ports),
        },
        "workerGroupSpecs": [
            {
                "groupName": g.name,
                "replicas": g.replicas,
                "minReplicas": g.min_replicas,
                "maxReplicas": g.upper,
                "rayStartParams": {},
                "template": _pod(spec, "ray-worker", g, image=image, labels=labels, group=g),
            }
            for g in groups
        ],
    }
    if autoscale:
        out["autoscalerOptions"] = {"securityContext": _restricted_container(),
                                    "imagePullPolicy": spec.cluster.image_pull_policy}  # fmt: skip
    return out


def _submitter(spec: DistillationSpec, image: str, labels: dict) -> dict:
    """The pod of the K8s Job that runs ``ray job submit`` (KubeRay fills in its command)."""
    ctr = {
        "name": "ray-job-submitter",
        "image": image,
        "imagePullPolicy": spec.cluster.image_pull_policy,
        "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": _restricted_container(),
    }
    pod = {"restartPolicy": "Never", "securityContext": _restricted_pod(), "containers": [ctr]}
    return {"metadata": {"labels": dict(labels)}, "spec": pod}


def rayjob(spec: DistillationSpec, name: str, *, namespace: str | None = None,
           default_image: str = DEFAULT_IMAGE, labels: dict[str, str] | None = None) -> dict:  # fmt: skip
    """The KubeRay ``RayJob`` (``ray.io/v1``) that runs ``spec`` as one ``srdistill run``.

    Without ``cluster.existing_cluster`` the job gets its own RayCluster (head + the worker
    groups, in-tree autoscaling when a group's bounds differ), shut down when the job finishes
    and deleted ``job.ttl_seconds_after_finished`` s later; with it, the job is submitted to
    that standing cluster (``clusterSelector``). The job runs in K8s-Job submission mode and is
    retried ``job.backoff_limit`` times; a retry resumes from the run directory at ``output``.
    Pods with GPUs (a group's or the head's ``gpu``) run the image's GPU variant
    (``gpu_image``: ``-cpu`` -> ``-gpu``) unless their group names an image; the others, the
    submitter included, run ``image`` as given.

    Args:
        spec: a validated spec (``parse_spec``).
        name: ``metadata.name`` of the RayJob (a DNS label; KubeRay caps it near 47 chars).
        namespace: ``metadata.namespace``; None leaves it out (``kubectl apply -n``).
        default_image: the image when ``spec.cluster.image`` is None.
        labels: extra labels for the RayJob and its pods.

    Returns:
        The manifest as a dict, annotated with ``SPEC_HASH`` (a hash of its ``spec``).
    """
    image = spec.cluster.image or default_image
    labels = {"app.kubernetes.io/name": "srdistill", "app.kubernetes.io/component": "distillation",
              **(labels or {})}  # fmt: skip
    body: dict[str, Any] = {
        "entrypoint": spec.entrypoint(),
        "submissionMode": "K8sJobMode",
        "backoffLimit": spec.job.backoff_limit,
        "submitterPodTemplate": _submitter(spec, image, labels),
    }
    if spec.cluster.existing_cluster:
        body["clusterSelector"] = {"ray.io/cluster": spec.cluster.existing_cluster}
    else:
        body["shutdownAfterJobFinishes"] = True
        body["ttlSecondsAfterFinished"] = spec.job.ttl_seconds_after_finished
        body["rayClusterSpec"] = _ray_cluster_spec(spec, image, labels)
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


def render_defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    """The operator's rendering defaults from its environment: keyword arguments of ``rayjob``
    (``default_image``: ``$SRDISTILL_DEFAULT_IMAGE``, else ``DEFAULT_IMAGE``). The operator
    records them in a resource's ``.status.defaults`` once and renders with those afterwards."""
    return {"default_image": environ.get("SRDISTILL_DEFAULT_IMAGE") or DEFAULT_IMAGE}


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
    ENV: ClassVar[dict[str, str]] = {"images": "SRDISTILL_ALLOWED_IMAGES", "service_accounts": "SRDISTILL_ALLOWED_SERVICE_ACCOUNTS",
           "secrets": "SRDISTILL_ALLOWED_SECRETS"}  # fmt: skip

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


# --------------------------------------------------------------------------- status


def stage_progress(manifest: dict | None) -> dict:
    """Per-stage progress from a run manifest (``<output>/manifest.json``).

    Returns:
        ``{"stages": {stage: "done"|"running"|..., in pipeline order}, "stagesDone": int,
        "stagesTotal": int, "currentStage": str | None}``; the total counts the stages this
        run's config executes (``distill: synth`` adds encode/finetune/synthesize, ``select``
        is coreset-only, embed/cluster run for ``clip-kmeans`` and synth, ``complexity`` for
        a coreset with ``select.method: tripled`` or ``align.enabled``, ``align`` with
        ``align.enabled``), and ``{}`` without a
        manifest.
    """
    from .pipeline import STAGES, SYNTH_ONLY

    if not manifest:
        return {}
    stages = manifest.get("stages") or {}
    config = manifest.get("config") or {}
    synth = config.get("distill") == "synth"
    method = (config.get("select") or {}).get("method", "clip-kmeans")
    skip = set() if synth or method == "clip-kmeans" else {"embed", "cluster"}
    align = bool((config.get("align") or {}).get("enabled"))
    if synth or not (method == "tripled" or align):
        skip.add("complexity")
    if synth or not align:
        skip.add("align")
    planned = [s for s in STAGES if s not in skip
               and ((s in SYNTH_ONLY) == synth or s not in (*SYNTH_ONLY, "select"))]  # fmt: skip
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
