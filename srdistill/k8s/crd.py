"""The CRD's ``spec.config`` schema, generated from ``srdistill.config.RunConfig``
(``config_schema``; ``crd_with_config_schema`` writes it into the CRD, as ``srdistill k8s crd``).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from srdistill.config import RunConfig


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
