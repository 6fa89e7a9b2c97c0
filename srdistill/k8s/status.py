"""The resource's ``.status``: stage progress from the run manifest, the phase from the RayJob's
status, and conditions.
"""

from __future__ import annotations


from pydantic import ValidationError

from srdistill.config import RunConfig


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
