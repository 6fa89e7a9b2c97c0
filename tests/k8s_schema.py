"""Offline validation of Kubernetes manifests (a test helper; ``from k8s_schema import ...``).

Custom resources (``ray.io``, ``srdistill.io``) are validated against the ``openAPIV3Schema`` of
their CustomResourceDefinition: KubeRay's from the folder named by ``$SRDISTILL_KUBERAY_CRDS``
(KubeRay's ``ray.io`` CRD YAMLs; ``.ci/run`` sets it; without it a test that validates a
``ray.io`` object is skipped) and ours from ``charts/srdistill/crds/``. The check is stricter than the API server's: where the server would
silently prune an unknown field (a typo), it is reported. Built-in kinds are validated by
kubernetes-validate against the strict schemas of a Kubernetes release.

Errors are ``AssertionError``s that name each bad field by its path
(``RayCluster/x: spec.headGroupSpec.template.spec.containers[0].securityContext.runAsUser: ...``).
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
#: KubeRay's CRDs (ray.io/v1 RayCluster, RayJob): a folder of their YAML files, or None.
KUBERAY_CRDS = Path(os.environ["SRDISTILL_KUBERAY_CRDS"]) if os.environ.get("SRDISTILL_KUBERAY_CRDS") else None
#: This project's CRDs (SRDistillation).
CHART_CRDS = REPO / "charts" / "srdistill" / "crds"
#: API groups validated against a CRD; every other group is a built-in kind.
CUSTOM_GROUPS = frozenset({"ray.io", "srdistill.io", "kopf.dev"})

#: libyaml's loader where PyYAML has it: KubeRay's CRDs are large (seconds with pure Python).
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A label/annotation key: an optional DNS-subdomain prefix and "/", then a name of at most 63
# characters (alphanumerics, '-', '_', '.'; alphanumeric at both ends).
_QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

#: ``metadata`` of a top-level object: what the API server checks of an ObjectMeta, in short.
#: Read-only fields the server sets are allowed (a manifest fetched from a cluster has them).
OBJECT_META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
        "generateName": {"type": "string", "maxLength": 253},
        "namespace": {"type": "string", "maxLength": 63, "pattern": _DNS_LABEL},
        "labels": {
            "type": "object",
            "propertyNames": {"pattern": _QUALIFIED_NAME, "maxLength": 317},
            "additionalProperties": {"type": "string", "maxLength": 63, "pattern": _LABEL_VALUE},
        },
        "annotations": {
            "type": "object",
            "propertyNames": {"pattern": _QUALIFIED_NAME, "maxLength": 317},
            "additionalProperties": {"type": "string"},
        },
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": "string"},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
        "selfLink": {"type": "string"},
    },
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    "additionalProperties": False,
}


# --------------------------------------------------------------------------- CRD schemas


def _kuberay_files() -> list[Path]:
    """KubeRay's CRD files, or a ``pytest.skip`` naming ``$SRDISTILL_KUBERAY_CRDS``."""
    files = sorted(KUBERAY_CRDS.glob("*.yaml")) if KUBERAY_CRDS is not None and KUBERAY_CRDS.is_dir() else []
    if not files:
        import pytest

        where = f"no CRD YAML in {KUBERAY_CRDS}" if KUBERAY_CRDS is not None else "SRDISTILL_KUBERAY_CRDS is unset"
        pytest.skip(f"KubeRay CRD schemas absent ({where}): point SRDISTILL_KUBERAY_CRDS at KubeRay's "
                    "config/crd/bases folder")
    return files


def _crd_files(group: str) -> list[Path]:
    return _kuberay_files() if group == "ray.io" else sorted(CHART_CRDS.glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def load_crd_schemas(group: str) -> dict[tuple[str, str], dict]:
    """The ``openAPIV3Schema`` of every served version of every CRD of an API group.

    Reads KubeRay's CRDs (``ray.io``) from ``KUBERAY_CRDS`` and this project's from ``CHART_CRDS``.

    Returns:
        ``{(apiVersion, kind): schema}``, e.g. ``{("ray.io/v1", "RayCluster"): {...}}``; the
        schemas are as written in the CRDs (see ``strict_schema`` for the converted form).
        Cached: treat the result as read-only.

    A ``ray.io`` lookup without KubeRay's CRDs skips the calling test (``pytest.skip``).
    """
    schemas: dict[tuple[str, str], dict] = {}
    for path in _crd_files(group):
        for doc in yaml.load_all(path.read_text(), Loader=_Loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                schema = (version.get("schema") or {}).get("openAPIV3Schema")
                if schema is None:
                    raise ValueError(f"{path.name}: version {version['name']} has no openAPIV3Schema")
                schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = schema
    return schemas


def strict_schema(schema: dict, *, root: bool = True) -> dict:
    """A CRD's structural OpenAPI v3 schema as a strict draft-7 JSON Schema.

    - an object schema with ``properties`` and without ``x-kubernetes-preserve-unknown-fields``
      gets ``additionalProperties: false`` (the API server would prune the unknown field);
    - ``x-kubernetes-int-or-string`` becomes "integer or string";
    - ``nullable: true`` admits ``null``; elsewhere a ``null`` is an error (the server would
      prune it);
    - ``x-kubernetes-embedded-resource`` objects admit ``apiVersion``, ``kind``, ``metadata``;
    - ``x-kubernetes-list-type: set`` means unique items (``map``: unique keys, checked by the
      validator of ``validate_custom``);
    - OpenAPI's boolean ``exclusiveMinimum``/``exclusiveMaximum`` become draft-7 numbers;
    - at the root, ``metadata`` gets ``OBJECT_META_SCHEMA``.

    CEL rules (``x-kubernetes-validations``) and formats are not checked.
    """
    out = _convert(schema)
    if root:
        out.setdefault("properties", {})["metadata"] = copy.deepcopy(OBJECT_META_SCHEMA)
        out.setdefault("required", [])
        for key in ("apiVersion", "kind", "metadata"):
            if key not in out["required"]:
                out["required"].append(key)
    return out


def _convert(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _convert(value) if isinstance(value, dict) else value
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_convert(sub) for sub in value]
        elif key in ("description", "default", "example", "externalDocs", "x-kubernetes-validations",
                     "format"):  # fmt: skip
            continue  # documentation, defaulting, CEL and formats: not checked here
        else:
            out[key] = value
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    for bound in ("Minimum", "Maximum"):
        flag = out.get(f"exclusive{bound}")
        if isinstance(flag, bool):
            del out[f"exclusive{bound}"]
            if flag and bound.lower() in out:
                out[f"exclusive{bound}"] = out.pop(bound.lower())
    if out.get("nullable") is True and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("nullable") is True and "anyOf" in out:
        out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    return out


def _list_map_keys(validator, keys, instance, schema):
    """``x-kubernetes-list-map-keys``: the items of a ``map`` list are unique by these keys."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        ident = tuple(item.get(k) for k in keys)
        if ident in seen:
            shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, ident))
            yield jsonschema.ValidationError(f"items {seen[ident]} and {i} have the same key ({shown})")
        seen[ident] = i


#: draft 7 plus the list-map uniqueness of Kubernetes.
_StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


@functools.lru_cache(maxsize=None)
def _validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schemas = load_crd_schemas(api_version.split("/", 1)[0])
    if (api_version, kind) not in schemas:
        known = ", ".join(f"{k} ({v})" for v, k in sorted(schemas))
        raise AssertionError(f"no CRD serves {kind} in {api_version}; known: {known}")
    schema = strict_schema(schemas[(api_version, kind)])
    _StrictValidator.check_schema(schema)
    return _StrictValidator(schema)


# --------------------------------------------------------------------------- validation


def _path(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _describe(obj: dict) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    return f"{obj.get('kind', '?')}/{meta.get('name', '?')}"


def _leaf_errors(errors: Iterable[jsonschema.ValidationError]) -> Iterator[jsonschema.ValidationError]:
    """The innermost errors: an ``anyOf`` failure is reported by the branches' own errors when
    they all fail at a deeper path than the ``anyOf`` itself."""
    for error in errors:
        if error.context and all(len(c.absolute_path) > len(error.absolute_path) for c in error.context):
            yield from _leaf_errors(error.context)
        else:
            yield error


def _message(error: jsonschema.ValidationError) -> str:
    if error.context:  # an anyOf/oneOf whose branches failed right here: say how
        reasons = sorted({c.message for c in error.context})
        return f"{error.message} ({'; '.join(reasons)})"
    return error.message


def validate_custom(obj: dict) -> None:
    """Validate a custom resource strictly against its CRD's ``openAPIV3Schema``.

    See ``strict_schema`` for what is stricter than the API server; ``metadata`` is checked
    against ``OBJECT_META_SCHEMA`` (name a DNS-1123 subdomain of at most 253 characters, labels
    and annotations maps of strings with valid keys).

    Raises:
        AssertionError: no CRD serves the object's apiVersion and kind, or the object does not
            validate; the message names every bad field by its path, one per line.
    """
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        raise AssertionError(f"not a Kubernetes object (apiVersion and kind are required): {obj!r:.200}")
    validator = _validator(obj["apiVersion"], obj["kind"])
    errors = sorted(_leaf_errors(validator.iter_errors(obj)), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{_path(e)}: {_message(e)}" for e in errors[:20]]
        if len(errors) > 20:
            lines.append(f"... and {len(errors) - 20} more")
        raise AssertionError(f"{_describe(obj)} ({obj['apiVersion']}) is invalid:\n  " + "\n  ".join(lines))


def validate_builtin(obj: dict, k8s_version: str = "1.30.0") -> None:
    """Validate a built-in Kubernetes object with kubernetes-validate, in strict mode (unknown
    fields are errors), against the schemas of Kubernetes ``k8s_version``.

    Raises:
        AssertionError: the object does not validate (the message names the field by its path),
            or kubernetes-validate has no schema for its kind and apiVersion in that release.
    """
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(
            f"{_describe(obj)} ({obj.get('apiVersion')}) is invalid for Kubernetes {exc.version}:\n"
            f"  {_path(exc)}: {exc.message}"
        ) from None
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
        raise AssertionError(f"{_describe(obj)}: {exc.message}") from None


def api_group(obj: dict) -> str:
    """The API group of an object ("" for the core group: ``apiVersion: v1``)."""
    api_version = str(obj.get("apiVersion", ""))
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def validate_any(obj: dict, k8s_version: str = "1.30.0") -> None:
    """Validate one object: custom resources of ``CUSTOM_GROUPS`` with ``validate_custom``,
    everything else with ``validate_builtin``.

    Raises:
        AssertionError: as ``validate_custom`` / ``validate_builtin``.
    """
    if api_group(obj) in CUSTOM_GROUPS:
        validate_custom(obj)
    else:
        validate_builtin(obj, k8s_version)


def load_manifests(text: str) -> list[dict]:
    """The non-empty YAML documents of a multi-document manifest (``helm template`` output)."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """The pod specs an object makes, as ``(where, podSpec)``: a workload's template, a
    RayCluster's head and worker groups, a RayJob's cluster and submitter; ``[]`` otherwise."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    name = _describe(obj)
    if kind == "Pod":
        return [(name, spec)]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [(name, spec["template"]["spec"])]
    if kind == "CronJob":
        return [(name, spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "RayCluster":
        return _ray_cluster_pods(name, spec)
    if kind == "RayJob":
        out = _ray_cluster_pods(f"{name} rayClusterSpec", spec.get("rayClusterSpec") or {})
        if spec.get("submitterPodTemplate"):
            out.append((f"{name} submitter", spec["submitterPodTemplate"]["spec"]))
        return out
    return []


def _ray_cluster_pods(name: str, spec: dict) -> list[tuple[str, dict]]:
    out = []
    if spec.get("headGroupSpec"):
        out.append((f"{name} head", spec["headGroupSpec"]["template"]["spec"]))
    for group in spec.get("workerGroupSpecs") or []:
        out.append((f"{name} worker group {group.get('groupName')}", group["template"]["spec"]))
    return out


def restricted_violations(pod_spec: dict, *, extra_containers: Iterable[dict] = ()) -> list[str]:
    """What in a pod spec breaks the Pod Security Standard "restricted" (``[]``: nothing).

    Checked: non-root (pod or every container), the RuntimeDefault/Localhost seccomp profile
    (pod or every container), per container no privilege escalation, all capabilities dropped
    (only NET_BIND_SERVICE may be added), not privileged, no root uid; no host namespaces,
    hostPath volumes or host ports. ``extra_containers`` are checked as containers of the pod
    (e.g. a RayCluster's autoscaler sidecar, ``{"name": ..., "securityContext": ...}``).
    """
    problems = []
    pod_sc = pod_spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            problems.append(f"{field} is set")
    for volume in pod_spec.get("volumes") or []:
        if "hostPath" in volume:
            problems.append(f"volume {volume.get('name')} is a hostPath")
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod runAsUser is 0")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"pod seccompProfile is {pod_seccomp!r}")
    containers = [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or []),
                  *(pod_spec.get("ephemeralContainers") or []), *extra_containers]  # fmt: skip
    if not containers:
        problems.append("no containers")
    for ctr in containers:
        sc, where = ctr.get("securityContext") or {}, f"container {ctr.get('name')}"
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile is {seccomp!r}, not RuntimeDefault")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: adds capabilities {caps['add']}")
        for port in ctr.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{where}: hostPort {port['hostPort']}")
    return problems


__all__ = [
    "CHART_CRDS", "CUSTOM_GROUPS", "KUBERAY_CRDS", "OBJECT_META_SCHEMA", "api_group",
    "load_crd_schemas", "load_manifests", "pod_specs", "restricted_violations",
    "strict_schema", "validate_any", "validate_builtin", "validate_custom",
]  # fmt: skip
