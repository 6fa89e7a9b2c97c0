"""srdistill operator: ``SRDistillation`` resources (srdistill.io/v1alpha1) -> KubeRay RayJobs.

    kopf run --peering srdistill --all-namespaces operators/srdistill_operator.py
    kopf run --peering srdistill --namespace ml --namespace research operators/srdistill_operator.py

Level-based: every ``SRDISTILL_OPERATOR_INTERVAL`` seconds (default 10; also at once for a new
resource and after an operator restart) one pass per resource compares what should exist with
what does:

* the spec is validated (``srdistill.k8s.parse_spec``, the pipeline config included) and checked
  against the allow-list of images, ServiceAccounts and Secrets (``srdistill.k8s.AllowList``,
  ``SRDISTILL_ALLOWED_*``); an invalid spec gets phase ``Invalid`` and a ``Valid=False``
  condition naming the bad field, and no RayJob (a RayJob of an earlier valid spec is left
  running, and its status is still mirrored);
* the RayJob is named after the resource and the spec's identity (``srdistill.k8s.spec_identity``:
  the user's spec only, without the lifecycle fields ``spec.job.*`` and
  ``spec.cluster.imagePullPolicy``). It is rendered with the operator's defaults (default image,
  ...) recorded in ``.status.defaults`` before the resource's first RayJob and reused ever after,
  so an operator upgrade or a change of its settings never restarts or reruns anything;
* a spec's RayJob is created at most once: a spec whose RayJob ran to the end, or disappeared
  (deleted after its TTL, or by hand), is not run again until ``spec.runId`` gets a new value.
  A RayJob gone before the operator saw it end (e.g. while the operator was down) is judged by
  the run manifest: ``Succeeded`` if every stage is done there, else ``Failed``;
* RayJobs of an older spec identity are deleted (a changed spec reruns the pipeline, which
  resumes the stages it finished at ``spec.output``); a changed lifecycle field
  (``spec.job.ttlSecondsAfterFinished``, ``backoffLimit``, ``activeDeadlineSeconds``) is patched
  into the live RayJob instead;
* ``.status`` mirrors the RayJob's status (phase, RayCluster, dashboard URL, job status; the last
  ones are kept once the RayJob is gone) and is written *before* the run manifest at
  ``spec.output`` is read (one attempt, a few seconds at most: a hanging S3 endpoint delays only
  the per-stage progress), with ``Valid``, ``RayJobCreated``, ``ProgressAvailable``, ``Complete``
  and ``Failed`` conditions.

Deleting a resource deletes its RayJobs: the operator puts the finalizer ``srdistill.io/cleanup``
on every SRDistillation and removes it once the RayJobs are deleted (a pass in progress finishes
first: a few seconds). The finalizer needs a running operator: **delete the SRDistillations
before uninstalling the operator**. Without an operator, ``kubectl delete srd NAME`` waits for
ever; to release such a resource (its RayJobs then go through Kubernetes' garbage collection, as
they are owned by it):

    kubectl -n NS patch srd NAME --type=merge -p '{"metadata":{"finalizers":null}}'

Several replicas are safe: kopf peering (``--peering NAME`` needs kopf's peering CRDs,
``charts/srdistill/crds/kopf.dev_peerings.yaml``, and a ``ClusterKopfPeering`` NAME, or a
``KopfPeering`` NAME in each watched namespace; the chart makes them) lets one operator work and
keeps the others paused. The oldest process has the highest priority (``kopf run --dev``'s 666
beats them all); when it exits, the next takes over: at once on a clean exit or when a crashed
container restarts (the same peer: ``POD_ID``, the pod's name), after the peering lifetime
(60 s) when a pod is lost.

Prometheus metrics on ``SRDISTILL_METRICS_PORT`` (unset or 0: none):
``srdistill_operator_reconciles_total``, ``srdistill_operator_reconcile_errors_total`` and
``srdistill_distillations{phase=...}`` (the resources this replica reconciled lately: a paused
replica reports zeros). Environment also: the rendering defaults of ``srdistill.k8s.RENDER_ENV``
(``SRDISTILL_DEFAULT_IMAGE``, the image of resources that name none, the pods' security
contexts, the install mode), ``AWS_*`` for reading manifests. Installed by ``charts/srdistill``.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import os
import random
import threading
import time

import kopf
import kubernetes
import prometheus_client
from prometheus_client.core import GaugeMetricFamily

from srdistill import k8s, storage

INTERVAL_S = float(os.environ.get("SRDISTILL_OPERATOR_INTERVAL", "10"))
METRICS_PORT = int(os.environ.get("SRDISTILL_METRICS_PORT") or 0)
ALLOW = k8s.AllowList.from_environ(os.environ)
#: The rendering defaults of this operator (image, security contexts, install mode: the chart's
#: SRDISTILL_* variables), every one explicit: recorded in a resource's status at its first RayJob.
DEFAULTS = k8s.pinned_defaults(k8s.render_defaults(os.environ))
RESOURCE = (k8s.GROUP, k8s.VERSION, k8s.PLURAL)
RAYJOBS = ("ray.io", "v1", "rayjobs")
TERMINAL = ("Succeeded", "Failed")
#: The manifest read of a pass: one attempt with short timeouts, so a hanging S3 endpoint costs
#: a pass a few seconds (a HEAD and a GET at most) and never delays the status or a delete.
MANIFEST_S3 = {"max_attempts": 1, "connect_timeout_s": 3.0, "request_timeout_s": 3.0}


class PhaseGauge:
    """``srdistill_distillations{phase}``: the resources this replica reconciled within the last
    ``fresh_s`` seconds, by phase; a replica paused by peering stops reconciling, so its counts
    fall to 0 and the active replica's are the cluster's."""

    def __init__(self, fresh_s: float):
        self.fresh_s, self.lock, self.seen = fresh_s, threading.Lock(), {}

    def set(self, key: tuple[str, str], phase: str | None) -> None:
        """Record ``phase`` of resource ``key`` (namespace, name); None forgets it."""
        with self.lock:
            if phase is None:
                self.seen.pop(key, None)
            else:
                self.seen[key] = (phase, time.monotonic())

    def collect(self):
        now = time.monotonic()
        with self.lock:
            counts = collections.Counter(p for p, t in self.seen.values() if now - t < self.fresh_s)
        family = GaugeMetricFamily("srdistill_distillations", "SRDistillations by phase", labels=["phase"])
        for phase in k8s.PHASES:
            family.add_metric([phase], counts[phase])
        yield family


RECONCILES = prometheus_client.Counter("srdistill_operator_reconciles", "Reconcile passes of SRDistillations")
ERRORS = prometheus_client.Counter("srdistill_operator_reconcile_errors", "Reconcile passes that raised (retried)")
BY_PHASE = PhaseGauge(fresh_s=3 * INTERVAL_S + 60)
prometheus_client.REGISTRY.register(BY_PHASE)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_) -> None:
    """Kubernetes client from the pod's service account (else ``$KUBECONFIG``); no cluster-wide
    scans of CRDs or namespaces (the chart installs the CRD first and names the namespaces), so
    the operator needs no cluster-wide read access; a delete waits for a running pass, then at
    most ``cancellation_polling`` s (kopf's default: 60); peering priority: the oldest wins."""
    settings.scanning.disabled = True
    settings.persistence.finalizer = f"{k8s.GROUP}/cleanup"
    settings.posting.level = logging.INFO
    settings.background.cancellation_polling = 0.5
    if settings.peering.priority == 0:  # not set by --priority/--dev: older processes rank higher
        settings.peering.priority = -(time.time_ns() // 1_000_000 * 1000 + random.randrange(1000))
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    if METRICS_PORT:
        prometheus_client.start_http_server(METRICS_PORT)
        logger.info(f"Prometheus metrics on :{METRICS_PORT}/metrics")


def _api() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi()


def owned_rayjobs(namespace: str, name: str) -> dict[str, dict]:
    """The RayJobs labelled for distillation ``name`` in ``namespace``, by name."""
    found = _api().list_namespaced_custom_object(*RAYJOBS[:2], namespace, RAYJOBS[2],
                                                  label_selector=f"{k8s.LABEL}={name}")  # fmt: skip
    return {j["metadata"]["name"]: j for j in found.get("items", [])
            if j["metadata"].get("labels", {}).get(k8s.LABEL) == name}  # fmt: skip


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
    """The run manifest at ``output`` (one short attempt, ``MANIFEST_S3``), and a condition
    reason and message about reading it."""
    if not storage.is_s3(output):  # a path on the Ray pods' volume, not mounted here
        return None, "OutputOnVolume", f"{output} is on the Ray pods' volume: the operator cannot read its manifest"
    uri = storage.join(output, "manifest.json")
    try:
        return json.loads(storage.read_once(uri, storage.S3Settings(**MANIFEST_S3))), "ManifestRead", uri
    except FileNotFoundError:
        return None, "NoManifest", f"no manifest at {uri} yet"
    except (OSError, ValueError) as exc:
        return None, "ManifestUnreadable", f"cannot read {uri}: {exc}"


def _changes(status: dict, new: dict) -> dict:
    """The fields of ``new`` that differ from ``status`` (None removes a field)."""
    return {key: value for key, value in new.items() if status.get(key) != value}


def _write_status(namespace: str, name: str, status: dict, new: dict) -> None:
    """Patch the changed fields of ``new`` into the resource's status now (not at the end of the
    pass, as kopf's ``patch`` would), and into ``status``."""
    changes = _changes(status, new)
    if changes:
        _api().patch_namespaced_custom_object_status(*RESOURCE[:2], namespace, RESOURCE[2], name, {"status": changes})
        status.update(changes)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.timer(*RESOURCE, interval=INTERVAL_S)
def reconcile(name: str, namespace: str, **kwargs) -> None:
    """One level-based pass for one resource (see the module docstring), counted in the metrics."""
    RECONCILES.inc()
    try:
        BY_PHASE.set((namespace, name), _reconcile(name=name, namespace=namespace, **kwargs))
    except Exception:
        ERRORS.inc()
        raise


def _reconcile(name: str, namespace: str, body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
               patch: kopf.Patch, logger: logging.Logger, stopped: kopf.DaemonStopped, **_) -> str:  # fmt: skip
    """The pass; returns the phase written."""
    now, before, old = _now(), list(status.get("conditions", [])), dict(status)
    old_phase, generation = old.get("phase"), meta.get("generation")

    def cond(type_: str, ok: bool, reason: str, message: str = "") -> dict:
        return k8s.condition(type_, ok, reason, message, now=now, previous=before)

    def outcome(phase: str, message: str) -> list[dict]:
        return [cond("Complete", phase == "Succeeded", "JobSucceeded" if phase == "Succeeded" else phase),
                cond("Failed", phase == "Failed", "JobFailed" if phase == "Failed" else phase,
                     message if phase == "Failed" else "")]  # fmt: skip

    def mirror(job: dict | None) -> dict:  # the job's status fields; none (keep the last) once it is gone
        return {key: (job.get("status") or {}).get(key) for key in MIRRORED} if job is not None else {}

    jobs = owned_rayjobs(namespace, name)
    try:
        parsed = k8s.parse_spec(dict(spec))
        ALLOW.check(parsed)
    except k8s.InvalidSpec as exc:
        # a RayJob of an earlier valid spec is left alone (fix the spec to supersede it), and mirrored
        _write_status(namespace, name, old, {"phase": "Invalid", "message": str(exc), "observedGeneration": generation,
                                             "conditions": [cond("Valid", False, "InvalidSpec", str(exc))],
                                             **mirror(jobs.get(old.get("rayJobName")))})  # fmt: skip
        if old_phase != "Invalid":
            kopf.warn(body, reason="InvalidSpec", message=str(exc))
        return "Invalid"

    digest = k8s.spec_identity(parsed)
    # a resource of an operator from before recorded defaults: its RayJob is this spec's run
    legacy = "defaults" not in old and old.get("specHash") and old.get("observedGeneration") == generation
    started = bool(old.get("rayJobName")) and (old.get("specHash") == digest or legacy)  # its RayJob was made
    job_name = old["rayJobName"] if started else k8s.rayjob_name(name, digest)
    recorded = old.get("defaults") or DEFAULTS
    for other in set(jobs) - {job_name}:
        logger.info(f"deleting RayJob {other}: superseded by a changed spec")
        _delete_rayjob(namespace, other)
    desired = k8s.rayjob(parsed, job_name, namespace=namespace, labels={k8s.LABEL: name},
                         **k8s.defaults_from_status(recorded))  # fmt: skip
    desired["metadata"]["annotations"][k8s.SPEC_HASH] = digest
    kopf.adopt(desired, owner=body)
    conditions = [cond("Valid", True, "SpecValid")]

    current, lost = jobs.get(job_name), False
    if current is None and not started:
        _write_status(namespace, name, old, {"defaults": recorded})  # first: a restart renders the same
        try:
            current = _api().create_namespaced_custom_object(*RAYJOBS[:2], namespace, RAYJOBS[2], desired)
            kopf.info(body, reason="RayJobCreated", message=f"created RayJob {job_name}")
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:  # 409: it exists already (another pass won the race): next pass mirrors it
                message = f"creating RayJob {job_name} failed: {exc.status} {exc.reason}"
                _write_status(namespace, name, old, {"phase": "Pending", "message": message, "conditions": [
                    *conditions, cond("RayJobCreated", False, "CreateFailed", message)]})  # fmt: skip
                raise kopf.TemporaryError(message, delay=INTERVAL_S) from None
            current = {}
    elif current is not None:
        live = {key: desired["spec"].get(key) for key in k8s.LIVE_FIELDS
                if desired["spec"].get(key) != current.get("spec", {}).get(key)}  # fmt: skip
        if live:
            logger.info(f"patching RayJob {job_name}: {live}")
            _api().patch_namespaced_custom_object(*RAYJOBS[:2], namespace, RAYJOBS[2], job_name, {"spec": live})

    if current is not None:
        job_status = current.get("status") or {}
        phase, message = k8s.phase_of(job_status), job_status.get("message") or job_status.get("reason") or ""
        conditions.append(cond("RayJobCreated", True, "Created", f"RayJob {job_name}"))
    else:  # made once and gone: the last status seen stays; a run whose end was not seen is judged below
        phase, message = k8s.phase_of(old), old.get("message", "")
        lost = phase not in TERMINAL
        if lost and old_phase != "Invalid":
            phase = old_phase  # until the verdict after the manifest read (no flapping)
        conditions.append(cond("RayJobCreated", True, "Gone", f"RayJob {job_name} ran and is gone"))
    progress_cond = [c for c in before if c.get("type") == "ProgressAvailable"]
    _write_status(namespace, name, old, {
        "phase": phase, "observedGeneration": generation, "specHash": digest, "rayJobName": job_name,
        "defaults": recorded, "message": message, "conditions": [*conditions, *progress_cond, *outcome(phase, message)],
        **mirror(current)})  # fmt: skip

    if not stopped:  # stopped: the resource is being deleted or the operator exits
        manifest, reason, why = _read_manifest(parsed.output)
        progress = k8s.stage_progress(manifest)
        if lost:
            done = bool(progress) and progress["stagesDone"] == progress["stagesTotal"]
            phase = "Succeeded" if done else "Failed"
            seen = old.get("jobDeploymentStatus") or "not started"
            shows = f"{progress['stagesDone']} of {progress['stagesTotal']} stages done" if progress else why
            message = (f"RayJob {job_name} is gone and its end was not seen (last seen: {seen}); the run manifest "
                       f"shows {shows}; set spec.runId to a new value to run it again")  # fmt: skip
        new = {"phase": phase, "message": message,
               "conditions": [*conditions, cond("ProgressAvailable", manifest is not None, reason, why),
                              *outcome(phase, message)]}  # fmt: skip
        new.update({key: progress.get(key) for key in PROGRESS} if manifest is not None else {})
        for key, value in _changes(old, new).items():
            patch.status[key] = value
    if phase != old_phase:
        event = kopf.warn if phase == "Failed" else kopf.info
        event(body, reason=phase, message=f"RayJob {job_name}: {phase}" + (f": {message}" if message else ""))
    return phase


@kopf.on.delete(*RESOURCE)
def cleanup(name: str, namespace: str, logger: logging.Logger, **_) -> None:
    """Delete the resource's RayJobs (their RayClusters go with them)."""
    for job in owned_rayjobs(namespace, name):
        logger.info(f"deleting RayJob {job}")
        _delete_rayjob(namespace, job)
    BY_PHASE.set((namespace, name), None)

