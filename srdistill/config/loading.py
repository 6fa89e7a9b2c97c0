"""Where a config comes from: the bundled presets (``srdistill/presets/*.yaml``), YAML files and
``--set key=value`` overrides, deep-merged in that order (``load_config``); ``describe_error``
turns a validation error into ``field.path: message`` lines.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from srdistill.config.schema import PATCH_PRESETS, RECIPES, RunConfig, _expand_patch_preset


PRESET_DIR = Path(__file__).parents[1] / "presets"  # srdistill/presets (package data)


def preset_names() -> list[str]:
    """Names of the bundled presets (``srdistill/presets/*.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str, model: type[BaseModel] | None = None) -> dict:
    """``"train.iterations=500"`` -> ``{"train": {"iterations": 500}}`` (value parsed as YAML).

    With ``model`` (the config class the key belongs to, e.g. ``RunConfig``), a list field also
    takes comma-separated items: ``evaluate.datasets=Set5,Set14`` is ``[Set5, Set14]`` (each item
    parsed as YAML), and a single item is a one-item list; YAML's ``[Set5, Set14]`` works for
    every field.

    Raises:
        ValueError: if ``item`` has no ``=``, or its value is not valid YAML (the message names
            the item and the column).
    """
    if "=" not in item:
        raise ValueError(f"--set {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value: Any = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"--set {item!r}: the value is not valid YAML{_yaml_where(exc, len(key) + 1)}"
                         f"{_yaml_problem(exc)} (fix it, or quote a string value)") from None  # fmt: skip
    parts = key.strip().split(".")
    scalar = value is not None and not isinstance(value, (list, dict))
    if model is not None and scalar and _is_list_field(model, parts):
        items = value.split(",") if isinstance(value, str) else [value]
        value = [yaml.safe_load(v.strip()) if isinstance(v, str) else v for v in items if str(v).strip()]
    for part in reversed(parts):
        value = {part: value}
    return value


def _is_list_field(model: type[BaseModel], path: list[str]) -> bool:
    """Whether the field at ``path`` (walked from ``model`` through nested models) is a tuple or
    list (optionally ``| None``); ``False`` for an unknown path (validation then names it)."""
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return any(get_origin(a) in (tuple, list) for a in options)


def _yaml_where(exc: yaml.YAMLError, column_offset: int | None = None) -> str:
    """`` at line L, column C`` of a YAML error (1-based), or with ``column_offset`` (the value
    of a ``--set`` item) `` at column C`` of the item; ``""`` when the error has no position."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return ""
    if column_offset is None:
        return f" at line {mark.line + 1}, column {mark.column + 1}"
    return f" at column {mark.column + 1 + column_offset}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    return f": {problem}" if problem else ""


def read_yaml_mapping(path: str | Path) -> dict:
    """The YAML mapping in file ``path`` (an empty file is ``{}``).

    Raises:
        ValueError: the file does not exist, is not valid YAML (the message names the file,
            line and column), or holds something other than a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML{_yaml_where(exc)}{_yaml_problem(exc)}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"file {str(path)!r} must hold a YAML mapping, not a {type(loaded).__name__}")
    return loaded


def _merge_layer(merged: dict, layer: dict, where: str) -> dict:
    """``layer`` deep-merged over ``merged``; ``where`` names the layer in errors.

    A ``mine.patch_preset`` expands into ``patch_size``/``stride`` in the layer that sets it
    (a differing ``patch_size``/``stride`` next to it in the same layer is an error). A later
    layer's ``patch_size``/``stride`` then win over those derived values, and the merged
    ``patch_preset`` is cleared, so that the recorded config says what is mined.
    """
    mine = layer.get("mine")
    if isinstance(mine, dict) and mine.get("patch_preset"):
        layer = {**layer, "mine": _expand_patch_preset(mine, where)}
    out = _deep_merge(merged, layer)
    m = out.get("mine")
    if isinstance(m, dict) and m.get("patch_preset") in PATCH_PRESETS:
        if (m.get("patch_size"), m.get("stride")) != PATCH_PRESETS[m["patch_preset"]]:
            out["mine"] = {**m, "patch_preset": None}
    return out


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    recipe: bool = False,
    data: dict | None = None,
) -> RunConfig:
    """Build a ``RunConfig`` from a preset, a YAML file, a mapping ``data`` (the same schema as
    the file; ``srdistill run --config-json``, an ``SRDistillation``'s ``spec.config``) and
    ``key=value`` overrides, in that order.

    With ``recipe``, the published training settings of the chosen network (``RECIPES``) are
    applied after the preset and before the file, data and overrides.

    What the user sets wins over what a preset derives: each layer is merged over the ones
    before it, and a value derived from a setting (``mine.patch_preset`` -> ``patch_size``,
    ``stride``) is derived in the layer of that setting, so ``--preset srdd --set
    mine.patch_size=96`` mines 96-pixel windows (stride 256 from ``srdd``; ``patch_preset``
    recorded as null). A real conflict inside one layer (``patch_preset: srdd`` next to
    ``patch_size: 96`` in the same file) is an error naming both, never silently resolved.

    Raises:
        ValueError: unknown preset name, unreadable/invalid YAML (file or ``--set`` item named,
            with line/column), a conflict inside one layer, or a pydantic validation error
            naming the offending key (``describe_error`` condenses it).
    """
    layers: list[tuple[str, dict]] = []
    if preset is not None:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ValueError(f"preset {preset!r} is not one of {preset_names()}")
        layers.append((f"preset {preset!r}", read_yaml_mapping(path)))
    if recipe:
        model = load_config(preset, config_file, overrides, data=data).train.model
        layers.append(("--recipe", {"train": RECIPES[model]}))
    if config_file is not None:
        layers.append((str(config_file), read_yaml_mapping(config_file)))
    if data is not None:
        if not isinstance(data, dict):
            raise ValueError(f"config data must be a mapping, got {type(data).__name__}")
        layers.append(("config data", data))
    for item in overrides:
        layers.append((f"--set {item!r}", parse_override(item, RunConfig)))
    merged: dict = {}
    for where, layer in layers:
        merged = _merge_layer(merged, layer, where)
    return RunConfig.model_validate(merged)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (``loc[:-1]`` walked from ``model``)."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def describe_error(exc: Exception, model: type[BaseModel] = None) -> str:  # type: ignore[assignment]
    """A user-facing message for a config error: a pydantic ``ValidationError`` condensed to one
    ``field.path: message`` line per error (no pydantic URL; an unknown key gets the closest
    field names of ``model``, default ``RunConfig``: "did you mean 'iterations'?"), any other
    exception as ``str(exc)``."""
    import difflib

    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    model = model or RunConfig
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "config"
        if err["type"] == "extra_forbidden":
            holder = _model_at(model, loc)
            fields = list(holder.model_fields) if holder is not None else []
            close = difflib.get_close_matches(str(loc[-1]), fields, n=1) if loc else []
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}" if fields else ""
            lines.append(f"{path}: unknown key" + (f"; {hint}" if hint else ""))
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("value_error", "assertion_error") and "input" in err and not isinstance(
            err["input"], (dict, list)
        ):
            message += f" (got {err['input']!r})"
        lines.append(f"{path}: {message}")
    return "\n".join(lines)
