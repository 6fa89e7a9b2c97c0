"""The ``SRDistillation`` resource: its group, kind and constants, and the spec (pydantic models
of the cluster, the job and the run's config) that ``parse_spec`` validates, with one-line errors
(``InvalidSpec``).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

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
