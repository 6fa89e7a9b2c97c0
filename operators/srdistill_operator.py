"""srdistill operator: ``SRDistillation`` resources (srdistill.io/v1alpha1) -> KubeRay RayJobs.

    kopf run --standalone --all-namespaces operators/srdistill_operator.py
    kopf run --standalone --namespace ml --namespace research operators/srdistill_operator.py

Level-based: every ``SRDISTILL_OPERATOR_INTERVAL`` seconds (default 10; also at once for a new
resource and after an operator restart) one pass per resource compares what should exist with
what does:

* the spec is validated (``srdistill.k8s.parse_spec``, the pipeline config included); an invalid
  spec gets phase ``Invalid`` and a ``Valid=False`` condition naming the bad field, and no RayJob;
* the desired RayJob (``srdistill.k8s.rayjob``) is named after the resource and the hash of its
  spec. The RayJobs labelled for the resource are listed: a missing desired one is created
  (owned through an ownerReference, so Kubernetes deletes it with the resource) unless that spec
  already ran to the end; RayJobs of an older spec are deleted (a changed spec reruns the
  pipeline, which resumes the stages it finished at ``spec.output``);
* ``.status`` mirrors the RayJob's status (phase, RayCluster, dashboard URL, job status) and the
  per-stage progress of the run manifest at ``spec.output`` (read with the operator's own S3
  credentials), with ``Valid``, ``RayJobCreated``, ``ProgressAvailable``, ``Complete`` and
  ``Failed`` conditions.

Deleting a resource deletes its RayJobs (a finalizer; Kubernetes' garbage collector would too).
Environment: ``SRDISTILL_OPERATOR_INTERVAL``, ``SRDISTILL_DEFAULT_IMAGE`` (the image of resources
that name none), ``AWS_*`` for reading manifests. Installed by ``charts/srdistill``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os

import kopf
import kubernetes

from srdistill import k8s, storage

INTERVAL_S = float(os.environ.get("SRDISTILL_OPERATOR_INTERVAL", "10"))
DEFAULT_IMAGE = os.environ.get("SRDISTILL_DEFAULT_IMAGE", k8s.DEFAULT_IMAGE)
RESOURCE = (k8s.GROUP, k8s.VERSION, k8s.PLURAL)
RAYJOBS = ("ray.io", "v1", "rayjobs")
TERMINAL = ("Succeeded", "Failed")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    """Kubernetes client from the pod's service account (else ``$KUBECONFIG``); no cluster-wide
    scans of CRDs or namespaces (the chart installs the CRD first and names the namespaces), so
    the operator needs no cluster-wide read access."""
    settings.scanning.disabled = True
    settings.persistence.finalizer = f"{k8s.GROUP}/cleanup"
    settings.posting.level = logging.INFO
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


def _api() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi()


def owned_rayjobs(namespace: str, name: str) -> list[dict]:
    """The RayJobs labelled for distillation ``name`` in ``namespace``."""
    found = _api().list_namespaced_custom_object(*RAYJOBS[:2], namespace, RAYJOBS[2],
                                                  label_selector=f"{k8s.LABEL}={name}")  # fmt: skip
    return [j for j in found.get("items", []) if j["metadata"].get("labels", {}).get(k8s.LABEL) == name]


def _delete_rayjob(namespace: str, name: str) -> None:
    try:
        _api().delete_namespaced_custom_object(*RAYJOBS[:2], namespace, RAYJOBS[2], name,
                                               propagation_policy="Background")  # fmt: skip
    except kubernetes.client.ApiException as exc:
        if exc.status != 404:
            raise


#: Fields of a RayJob's status copied into ``.status``, and those of ``k8s.stage_progress``.
MIRRORED = ("rayClusterName", "dashboardURL", "jobId", "jobStatus", "jobDeploymentStatus", "startTime", "endTime")
PROGRESS = ("stages", "stagesDone", "stagesTotal", "currentStage")


def _read_manifest(output: str) -> tuple[dict | None, str, str]:
    """The run manifest at ``output``, and a condition reason and message about reading it."""
    uri = storage.join(output, "manifest.json")
    try:
        return json.loads(storage.read_text(uri)), "ManifestRead", uri
    except FileNotFoundError:
        return None, "NoManifest", f"no manifest at {uri} yet"
    except (OSError, ValueError) as exc:
        return None, "ManifestUnreadable", f"cannot read {uri}: {exc}"


def _apply(patch: kopf.Patch, status: kopf.Status, new: dict) -> None:
    """Patch only the status fields that change (None removes a field)."""
    for key, value in new.items():
        if status.get(key) != value:
            patch.status[key] = value


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.timer(*RESOURCE, interval=INTERVAL_S)
def reconcile(name: str, namespace: str, body: kopf.Body, spec: kopf.Spec, status: kopf.Status,
              meta: kopf.Meta, patch: kopf.Patch, logger: logging.Logger, **_) -> None:  # fmt: skip
    """One level-based pass for one resource (see the module docstring)."""
    now, before = _now(), list(status.get("conditions", []))
    old_phase = status.get("phase")

    def cond(type_: str, ok: bool, reason: str, message: str = "") -> dict:
        return k8s.condition(type_, ok, reason, message, now=now, previous=before)

    try:
        parsed = k8s.parse_spec(dict(spec))
    except k8s.InvalidSpec as exc:
        # a RayJob of an earlier valid spec is left alone: fix the spec to supersede it
        _apply(patch, status, {"phase": "Invalid", "message": str(exc), "observedGeneration": meta.get("generation"),
                               "conditions": [cond("Valid", False, "InvalidSpec", str(exc))]})  # fmt: skip
        if old_phase != "Invalid":
            kopf.warn(body, reason="InvalidSpec", message=str(exc))
        return

    desired = k8s.rayjob(parsed, "", namespace=namespace, default_image=DEFAULT_IMAGE, labels={k8s.LABEL: name})
    digest = desired["metadata"]["annotations"][k8s.SPEC_HASH]
    desired["metadata"]["name"] = job_name = k8s.rayjob_name(name, digest)
    kopf.adopt(desired, owner=body)

    current = None
    for job in owned_rayjobs(namespace, name):
        if job["metadata"]["name"] == job_name:
            current = job
        else:
            logger.info(f"deleting RayJob {job['metadata']['name']}: superseded by a changed spec")
            _delete_rayjob(namespace, job["metadata"]["name"])

    conditions = [cond("Valid", True, "SpecValid")]
    finished = status.get("specHash") == digest and old_phase in TERMINAL
    if current is None and finished:  # e.g. KubeRay removed the finished job after its TTL
        phase = old_phase
        conditions.append(cond("RayJobCreated", True, "Finished", f"RayJob {job_name} ran to the end"))
    else:
        if current is None:
            try:
                current = _api().create_namespaced_custom_object(*RAYJOBS[:2], namespace, RAYJOBS[2], desired)
                kopf.info(body, reason="RayJobCreated", message=f"created RayJob {job_name}")
            except kubernetes.client.ApiException as exc:
                if exc.status != 409:  # 409: it exists already (another pass won the race)
                    message = f"creating RayJob {job_name} failed: {exc.status} {exc.reason}"
                    _apply(patch, status, {"phase": "Pending", "message": message, "conditions": [
                        *conditions, cond("RayJobCreated", False, "CreateFailed", message)]})  # fmt: skip
                    raise kopf.TemporaryError(message, delay=INTERVAL_S) from None
                current = _api().get_namespaced_custom_object(*RAYJOBS[:2], namespace, RAYJOBS[2], job_name)
        conditions.append(cond("RayJobCreated", True, "Created", f"RayJob {job_name}"))
        phase = k8s.phase_of(current.get("status"))

    job_status = (current or {}).get("status") or {}
    message = job_status.get("message") or job_status.get("reason") or ""
    manifest, reason, why = _read_manifest(parsed.output)
    progress = k8s.stage_progress(manifest)
    conditions += [
        cond("ProgressAvailable", manifest is not None, reason, why),
        cond("Complete", phase == "Succeeded", "JobSucceeded" if phase == "Succeeded" else phase),
        cond("Failed", phase == "Failed", "JobFailed" if phase == "Failed" else phase,
             message if phase == "Failed" else ""),
    ]  # fmt: skip
    new = {"phase": phase, "observedGeneration": meta.get("generation"), "specHash": digest, "rayJobName": job_name,
           "message": message, "conditions": conditions}  # fmt: skip
    if current is not None:  # a finished job deleted after its TTL keeps its last figures
        new.update({key: job_status.get(key) for key in MIRRORED})
    new.update({key: progress.get(key) for key in PROGRESS} if manifest is not None else {})
    _apply(patch, status, new)
    if phase != old_phase:
        event = kopf.warn if phase == "Failed" else kopf.info
        event(body, reason=phase, message=f"RayJob {job_name}: {phase}" + (f": {message}" if message else ""))


@kopf.on.delete(*RESOURCE)
def cleanup(name: str, namespace: str, logger: logging.Logger, **_) -> None:
    """Delete the resource's RayJobs (their RayClusters go with them)."""
    for job in owned_rayjobs(namespace, name):
        logger.info(f"deleting RayJob {job['metadata']['name']}")
        _delete_rayjob(namespace, job["metadata"]["name"])
