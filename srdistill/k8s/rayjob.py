"""The KubeRay ``RayJob`` a spec becomes (``rayjob``): how srdistill reaches the Ray pods
(``Install``: in the image or by the runtime env, ``render_settings``, ``render_defaults``), the
pods with their security contexts, the spec hash that names the RayJob, and the allow list of
images and secrets (``AllowList``).
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
from typing import Any, ClassVar, Literal, NamedTuple

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from srdistill import __version__
from srdistill.k8s.spec import (CPU_SUFFIX, DEFAULT_IMAGE, GPU_SUFFIX, RAYJOB_API, RAY_VERSION,
                                RESTRICTED_POD_SECURITY_CONTEXT, RESTRICTED_SECURITY_CONTEXT, SPEC_HASH, STOCK_IMAGE,
                                TORCH_CPU_INDEX, TORCH_VERSION, DistillationSpec, InvalidSpec, Resources, WorkerGroup,
                                _Spec, _errors)


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
