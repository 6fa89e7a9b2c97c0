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

The parts: ``spec`` (the resource and its validation), ``rayjob`` (rendering the RayJob),
``crd`` (the CRD's config schema) and ``status``; their public names are re-exported here.
"""

from srdistill.k8s.crd import CONFIG_MARKER, config_schema, crd_with_config_schema
from srdistill.k8s.rayjob import (LIFECYCLE_FIELDS, LIVE_FIELDS, RENDER_ENV, AllowList, Install, defaults_from_status,
                                  gpu_image, pinned_defaults, rayjob, rayjob_name, render_defaults, render_settings,
                                  runtime_env, spec_hash, spec_identity)
from srdistill.k8s.spec import (CPU_SUFFIX, DEFAULT_IMAGE, GPU_SUFFIX, GROUP, KIND, LABEL, PHASES, PLURAL, RAYJOB_API,
                                RAY_VERSION, RESTRICTED_POD_SECURITY_CONTEXT, RESTRICTED_SECURITY_CONTEXT, SPEC_HASH,
                                STOCK_IMAGE, TORCH_CPU_INDEX, TORCH_VERSION, VERSION, ClusterSpec, DistillationSpec,
                                EnvVar, InvalidSpec, JobSpec, Quantity, Resources, WorkerGroup, parse_spec)
from srdistill.k8s.status import condition, phase_of, stage_progress

__all__ = [
    "GROUP",
    "VERSION",
    "KIND",
    "PLURAL",
    "RAYJOB_API",
    "RAY_VERSION",
    "DEFAULT_IMAGE",
    "CPU_SUFFIX",
    "GPU_SUFFIX",
    "STOCK_IMAGE",
    "TORCH_VERSION",
    "TORCH_CPU_INDEX",
    "RESTRICTED_POD_SECURITY_CONTEXT",
    "RESTRICTED_SECURITY_CONTEXT",
    "LABEL",
    "SPEC_HASH",
    "PHASES",
    "InvalidSpec",
    "Quantity",
    "Resources",
    "WorkerGroup",
    "EnvVar",
    "ClusterSpec",
    "JobSpec",
    "DistillationSpec",
    "parse_spec",
    "Install",
    "render_settings",
    "RENDER_ENV",
    "render_defaults",
    "runtime_env",
    "gpu_image",
    "rayjob",
    "spec_hash",
    "rayjob_name",
    "LIFECYCLE_FIELDS",
    "LIVE_FIELDS",
    "spec_identity",
    "pinned_defaults",
    "defaults_from_status",
    "AllowList",
    "CONFIG_MARKER",
    "config_schema",
    "crd_with_config_schema",
    "stage_progress",
    "phase_of",
    "condition",
]
