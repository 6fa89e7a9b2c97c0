"""``srdistill k8s``: the KubeRay RayJob a distillation becomes (``render``) and the CRD with its
config schema (``crd``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import typer

from srdistill.cli.common import _INPUT_HELP, _PRESET_HELP, _SET_HELP, Distill, Preset, _fail
from srdistill.config import RunConfig, read_yaml_mapping  # fmt: skip


k8s_app = typer.Typer(no_args_is_help=True, help="Kubernetes: the KubeRay RayJob a distillation becomes.")


@k8s_app.command("render")
def k8s_render(
    input: str = typer.Option(..., "--input", help=_INPUT_HELP),
    out: str = typer.Option(..., "--out", help="run directory: an s3:// URI, or a path on a PVC that --cluster mounts"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file (the schema of `run --config`)"),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP + "; merged into spec.config"),
    preset: Optional[Preset] = typer.Option(None, "--preset", help=_PRESET_HELP),
    distill: Optional[Distill] = typer.Option(None, "--distill", help="what the run trains on (`run --distill`)"),
    allow_random_init: bool = typer.Option(False, "--allow-random-init", help="random-init CLIP (NOT semantic)"),
    cluster: Optional[Path] = typer.Option(
        None, "--cluster", help="YAML of the cluster shape: an SRDistillation's spec.cluster "
        "(image, s3Secret, env, volumes, volumeMounts, head, workerGroups, existingCluster)"),  # fmt: skip
    image: Optional[str] = typer.Option(None, "--image", help="Ray image (overrides --cluster); default: "
                                        "the srdistill image, or Ray's own with --install runtimeEnv"),  # fmt: skip
    s3_secret: Optional[str] = typer.Option(None, "--s3-secret", help="Secret holding AWS_* env vars"),
    name: str = typer.Option("srdistill", "--name", help="metadata.name of the RayJob"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="metadata.namespace (default: none)"),
    pod_security_context: Optional[str] = typer.Option(
        None, "--pod-security-context", help="every pod's securityContext, a JSON object (default: the "
        "restricted standard, uid 1000); the chart's ray.podSecurityContext"),  # fmt: skip
    security_context: Optional[str] = typer.Option(
        None, "--security-context", help="every container's securityContext, a JSON object (default: the "
        "restricted standard); the chart's ray.securityContext"),  # fmt: skip
    install: Literal["image", "runtimeEnv"] = typer.Option(
        "image", "--install", help="image: srdistill is in the image; runtimeEnv: Ray's stock image, "
        "Ray pip-installs srdistill at job start (runtimeEnvYAML)"),  # fmt: skip
    package: Optional[str] = typer.Option(
        None, "--package", help="--install runtimeEnv: pinned pip requirement of srdistill (default "
        "srdistill[cpu,synth]==<this version>; or 'srdistill[cpu,synth] @ git+<repo>@<tag>')"),  # fmt: skip
) -> None:
    """Print the RayJob (YAML) for `kubectl apply -f -`: what the operator would create for an
    SRDistillation with this spec (and the chart's settings given by the last four options)."""
    import yaml

    from srdistill import k8s
    from srdistill.config import parse_override
    from srdistill.config.loading import _deep_merge

    spec: dict = {"input": input, "output": out, "allowRandomInit": allow_random_init}
    spec.update({k: v for k, v in {"preset": preset, "distill": distill}.items() if v is not None})
    settings = {"mode": install, **({"package": package} if package is not None else {})}
    try:
        if config is not None:
            spec["config"] = read_yaml_mapping(config)
        for item in overrides:
            spec["config"] = _deep_merge(spec.get("config", {}), parse_override(item, RunConfig))
        shape = read_yaml_mapping(cluster) if cluster is not None else {}
        where = {"pod_security_context": "--pod-security-context", "security_context": "--security-context",
                 "install": "--install/--package"}  # fmt: skip
        defaults = k8s.render_settings(pod_security_context=pod_security_context, security_context=security_context,
                                       install=json.dumps(settings), where=where)  # fmt: skip
    except ValueError as exc:
        _fail(str(exc))
    shape.update({k: v for k, v in {"image": image, "s3Secret": s3_secret}.items() if v is not None})
    spec["cluster"] = shape
    try:
        parsed = k8s.parse_spec(spec)
    except k8s.InvalidSpec as exc:
        _fail(str(exc))
    typer.echo(yaml.safe_dump(k8s.rayjob(parsed, name, namespace=namespace, **defaults), sort_keys=False), nl=False)


@k8s_app.command("crd")
def k8s_crd(
    path: Path = typer.Argument(..., help="the CRD file, charts/srdistill/crds/srdistill.io_srdistillations.yaml"),
    check: bool = typer.Option(False, "--check", help="change nothing; exit 1 if the file is out of date"),
) -> None:
    """Regenerate spec.config's schema in the SRDistillation CRD from srdistill.config.RunConfig
    (the rest of the file is kept). Run it after changing the config models."""
    from srdistill import k8s

    try:
        text = path.read_text()
        new = k8s.crd_with_config_schema(text)
    except (OSError, ValueError) as exc:
        _fail(f"{path}: {exc}")
    if check:
        if new != text:
            typer.echo(f"{path}: spec.config is out of date; run: srdistill k8s crd {path}", err=True)
            raise typer.Exit(1)
        typer.echo(f"{path}: up to date")
    elif new != text:
        path.write_text(new)
        typer.echo(f"{path}: spec.config regenerated")
    else:
        typer.echo(f"{path}: up to date")
