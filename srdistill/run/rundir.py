"""The run directory: the stage table, stage fingerprints, the manifest and ``Run``, which does
the bookkeeping of each stage (``pipeline`` runs the stages through it).

A stage's fingerprint hashes its config (minus execution-only fields such as batch sizes and
actor counts) with the fingerprints of the stages it reads; ``plan``'s hashes the input's
signature (``corpus.input_signature``). A stage whose recorded fingerprint matches and whose
outputs exist is skipped, so a killed or repeated run resumes where it stopped (and inside
``mine`` and ``embed``, at the shard: finished parts are kept); a stage that reruns changes
its fingerprint and so reruns everything downstream. A stage folder left by an attempt with
another fingerprint is deleted before the stage runs.

Verified parts: a partitioned stage (``PARTS``) records in its manifest entry the parts it wrote
(``parts``: name -> rows and bytes, from the parquet footers) and an ``outputs_id``, new each
time it runs, that the fingerprint handed downstream includes. On resume ``Run.is_done``
checks the recorded parts: one missing, of another size or row count, unreadable, or not
recorded makes the stage not done and is deleted (one log line each), so the shard writers,
which keep the parts that exist, redo exactly those shards, and the stages downstream rerun.
Before a stage runs, the partitioned outputs it may read must hold exactly the recorded parts;
a part that cannot be read mid-stage is one ``storage.UnreadableFileError`` line naming it.

The manifest (``manifest.json``) records the resolved config (also written as ``config.yaml``,
which ``srdistill run --config`` reads back), the package versions, the git commit of the source
tree when srdistill runs from a git checkout (``git_commit``, ``git_dirty``), per-stage
fingerprint/counts/timings, the first skipped inputs with their reasons, the CLIP and ViT
provenance, the Ray it ran on (``ray``: local or joined, GCS address, CPUs/GPUs; ``none`` when no stage
needed Ray) and where each
stage ran (``placement``, decided by ``runner.plan_placement`` before any work; each stage's
entry in ``stages`` keeps the placement it ran with, including the GPU ids Ray gave its
workers); it is passed through ``storage.redact`` before it is written.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Callable

import yaml

from srdistill import storage
from srdistill.config import FEATURE_METHODS, RunConfig, SelectConfig

STAGES = ("plan", "mine", "embed", "cluster", "complexity", "select", "align", "encode", "finetune", "synthesize",
          "train", "evaluate", "report")  # fmt: skip
SYNTH_ONLY = ("encode", "finetune", "synthesize")
_ACTOR_EXECUTION = {"batch_size", "num_actors", "actor_num_cpus", "actor_num_gpus", "num_threads", "device"}
#: Config fields that change how a stage runs but not what it produces (not fingerprinted).
EXECUTION_ONLY = {
    "mine": {"images_per_task", "images_per_shard"},
    "embed": _ACTOR_EXECUTION,
    "complexity": _ACTOR_EXECUTION,
    "align": {"device"},
    "train": {"device", "log_every", "checkpoint_every", "val_every", "val_dataset", "workers", "use_gpu",
              "tensorboard"},
    "evaluate": {"device"},
    "encode": {"encode_batch_size", "device", "use_gpu"},
    "finetune": {"device", "log_every", "checkpoint_every", "encode_batch_size", "use_gpu", "workers",
                 "zero_stage", "tensorboard"},
    "synthesize": {"batch_size", "num_actors", "actor_num_cpus", "actor_num_gpus", "device"},
}
#: Partitioned outputs written straight to the run URI (never mirrored locally), by stage. A
#: stage's manifest entry records its parts (``parts``: name -> rows, bytes) and an
#: ``outputs_id`` that changes whenever the stage runs; ``is_done`` verifies the parts on resume.
PARTS = {"mine": "mine/patches", "embed": "embed/parts", "cluster": "cluster/assignments",
         "complexity": "complexity/parts"}  # fmt: skip
_PARTITIONED = tuple(PARTS.values())
_PACKAGES = ("srdistill", "torch", "ray", "faiss-cpu", "transformers", "diffusers", "deepspeed", "numpy",
             "pyarrow", "pillow", "opencv-python-headless", "scikit-learn")
#: The distributions of faiss (one is installed); its version is recorded as ``faiss``.
_FAISS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11")
#: Seconds each ``git`` call of ``git_commit`` may take.
GIT_TIMEOUT_S = 5.0


def stage_config(cfg: RunConfig, stage: str) -> dict:
    """The settings of ``cfg`` that ``stage``'s output depends on: ``cfg.stage_json(stage)``
    without the ``EXECUTION_ONLY`` fields (the part of the stage's fingerprint that is config)."""
    part = json.loads(cfg.stage_json(stage))
    return {k: v for k, v in part.items() if k not in EXECUTION_ONLY.get(stage, ())}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def short_sha(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on (``"not installed"`` for those
    missing); ``faiss`` is the version of whichever faiss distribution is installed."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["faiss"] = next((v for v in map(_version_or_none, _FAISS) if v), "not installed")
    return out


def _version_or_none(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_commit() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout srdistill runs from: the ``HEAD`` commit (40 hex
    digits) and whether tracked files differ from it; ``(None, None)`` when the package does not
    lie in a git work tree of its own (an installed wheel, a Ray job's working_dir copy), git is
    missing, or a call takes over ``GIT_TIMEOUT_S`` seconds. A work tree that merely encloses
    the package (a virtual environment inside a repository) does not count: its top level must
    hold this very ``srdistill`` package."""
    package = Path(__file__).resolve().parents[1]  # the srdistill package (this module is in srdistill/run)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True,
                                  timeout=GIT_TIMEOUT_S, check=False)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    out = git("rev-parse", "--show-toplevel", "HEAD")
    lines = out.split() if out else []
    if len(lines) != 2 or (Path(lines[0]) / "srdistill").resolve() != package:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return lines[1], (bool(status.strip()) if status is not None else None)


def config_yaml(cfg: RunConfig) -> str:
    """``cfg`` as YAML (every field, resolved), the form ``config.load_config(config_file=...)``
    reads back to an equal config. Sections are block mappings, lists are written inline."""

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=Dumper, sort_keys=False, width=100)


def stage_chain(cfg: RunConfig) -> list[str]:
    """The stages a full run of ``cfg`` executes, in order (``STAGES`` minus those its
    ``distill``, ``select.method`` and ``align.enabled`` leave out), ``report`` last."""
    synth = cfg.distill == "synth"
    clusters = synth or needs_clip(cfg.select)
    scored = not synth and (needs_vit(cfg.select) or cfg.align.enabled)
    return ["plan", "mine", *(["embed", "cluster"] if clusters else []), *(["complexity"] if scored else []),
            *(["encode", "finetune", "synthesize"] if synth else ["select", *(["align"] if cfg.align.enabled else [])]),
            "train", "evaluate", "report"]  # fmt: skip


def _absolute(uri: str | Path) -> str:
    s = os.fspath(uri)
    return s.rstrip("/") if storage.is_s3(s) else str(Path(s).expanduser().resolve())


def local_mirror(run_uri: str) -> Path:
    """The local working copy of a run directory: the directory itself when local; for S3,
    ``$SRDISTILL_CACHE/runs/<sha of the URI>`` (default ``~/.cache/srdistill``)."""
    from srdistill.datasets import cache_root

    if not storage.is_s3(run_uri):
        return Path(run_uri)
    return cache_root() / "runs" / short_sha(run_uri)


class Run:
    """A run directory: its manifest, stage fingerprints and stage bookkeeping.

    Args:
        input_uri: the HR corpus: a folder or S3 prefix (searched recursively) or a manifest
            file of image URIs (``corpus.plan_corpus``).
        run_uri: where artifacts go (local path or ``s3://``); an existing run is resumed.
        cfg: the resolved config.
        preset: preset name, recorded in the manifest.
        log: where progress lines go (``print`` by default).

    Attributes:
        uri: the run directory as an absolute path or ``s3://`` URI.
        dir: its local mirror (``local_mirror``); equal to ``uri`` for a local run.
    """

    def __init__(self, input_uri: str | Path, run_uri: str | Path, cfg: RunConfig, *,
                 preset: str | None = None, log: Callable[[str], None] = print):  # fmt: skip
        self.input = _absolute(input_uri)
        self.uri = _absolute(run_uri)
        self.remote = storage.is_s3(self.uri)
        self.dir = local_mirror(self.uri)
        self.cfg = cfg
        self.log = log
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.at("manifest.json")
        old = storage.read_json(path) if storage.exists(path) else {}
        commit, dirty = git_commit()
        self.manifest = {
            "srdistill_version": package_versions()["srdistill"],
            "git_commit": commit,
            "git_dirty": dirty,
            "created": old.get("created", utc_now()),
            "updated": utc_now(),
            "input": self.input,
            "run_dir": self.uri,
            "preset": preset,
            "config": cfg.model_dump(mode="json"),
            "versions": package_versions(),
            "stages": old.get("stages", {}),
            "skipped_inputs": old.get("skipped_inputs", []),
        }
        for key in ("clip", "vit"):
            if key in old:
                self.manifest[key] = old[key]
        self.write_config()
        #: Where each stage of this invocation runs (``runner.plan_placement``); a stage that runs
        #: updates its entry (e.g. with the GPU ids its workers got) and records it in ``stages``.
        self.placement: dict[str, dict] = {}
        #: The stages of this invocation in order (set by ``run_pipeline``): before a stage runs,
        #: the parts of the partitioned stages before it must be the recorded ones.
        self.chain: list[str] = []
        self.save()

    def at(self, *parts: str) -> str:
        """The URI of ``parts`` inside the run directory."""
        return storage.join(self.uri, *parts)

    def write_config(self) -> None:
        """Write the resolved config (redacted) as ``config.yaml`` to the run URI, and to the
        local mirror for S3 (``config_yaml``: ``srdistill run --config`` reads it back)."""
        text = storage.redact("# The resolved config of this run (every field): `srdistill run --config config.yaml` "
                              "runs it again.\n" + config_yaml(self.cfg))  # fmt: skip
        storage.write_text(self.at("config.yaml"), text)
        if self.remote:
            storage.write_text(self.dir / "config.yaml", text)

    def save(self) -> None:
        """Write the manifest (redacted) to the run URI, and to the local mirror for S3."""
        text = storage.redact(json.dumps(self.manifest, indent=2, default=str))
        storage.write_text(self.at("manifest.json"), text)
        if self.remote:
            storage.write_text(self.dir / "manifest.json", text)

    def pull(self, *paths: str) -> None:
        """Download ``paths`` (folders or files, relative to the run directory) of an S3 run into
        the local mirror (files already there with the same size are kept); a no-op for a
        local run."""
        for rel in paths:
            if self.remote and storage.exists(self.at(rel)):
                storage.copy_dir(self.at(rel), self.dir / rel, skip_existing=True)

    def config_part(self, stage: str) -> str:
        return json.dumps(stage_config(self.cfg, stage), sort_keys=True)

    def fingerprint(self, stage: str, *extra: str) -> str:
        return short_sha(stage, self.config_part(stage), *extra)

    def is_done(self, stage: str, fingerprint: str, outputs: list[str]) -> bool:
        """Whether ``stage`` finished with ``fingerprint``, its ``outputs`` (paths relative to
        the run directory) exist at the run URI and its recorded parts (``PARTS``) are intact.

        A recorded part that is missing, of another size or row count, or whose parquet footer
        cannot be read, and a part that was not recorded, make the stage not done: they are
        deleted (one log line each), so that rerunning the stage redoes exactly those shards.
        (An entry without a ``parts`` record, from an older version, is checked for unreadable
        parts only.)
        """
        entry = self.manifest["stages"].get(stage, {})
        done = (
            entry.get("status") == "done"
            and entry.get("fingerprint") == fingerprint
            and all(storage.exists(self.at(p)) for p in outputs)
        )
        return done and not self.drop_bad_parts(stage, entry.get("parts"))

    def drop_bad_parts(self, stage: str, recorded: dict | None) -> dict[str, str]:
        """Delete the parts of ``stage`` (``PARTS``; none for other stages) that ``bad_parts``
        finds, logging one line each; returns them."""
        if stage not in PARTS:
            return {}
        bad = self.bad_parts(stage, recorded)
        for name, why in bad.items():
            self.log(f"[{stage}] {self.at(PARTS[stage], name)} {why}: deleted, its shard is redone")
            storage.delete(self.at(PARTS[stage], name))
        return bad

    def bad_parts(self, stage: str, recorded: dict | None) -> dict[str, str]:
        """``{part name: what is wrong}`` for the parts of ``stage`` (``PARTS``) whose parquet
        footer cannot be read and, given its ``recorded`` parts, that differ from the record
        (missing, other size or row count, not recorded)."""
        present = storage.part_files(self.at(PARTS[stage]))
        bad = {} if recorded is None else {name: "was not written by this stage"
                                           for name in sorted(set(present) - set(recorded))}  # fmt: skip
        for name in sorted(set(present) | set(recorded or ())):
            if name in bad:
                continue
            if name not in present:
                bad[name] = "is missing"
                continue
            try:
                got = storage.parquet_footer(present[name])
            except storage.UnreadableFileError:
                bad[name] = "cannot be read (truncated or corrupt)"
                continue
            want = got if recorded is None else recorded[name]
            if got != want:
                bad[name] = (f"has {got['rows']} rows, {got['bytes']} bytes, not the recorded "
                             f"{want['rows']} rows, {want['bytes']} bytes")  # fmt: skip
        return bad

    def check_parts(self, stage: str) -> None:
        """Raise ``ValueError`` unless the parts of ``stage`` at the run URI are exactly the set
        its manifest entry records (a stage never consumes a partial set of parts)."""
        recorded = set(self.manifest["stages"].get(stage, {}).get("parts", {}) or ())
        if not recorded:
            return
        present = set(storage.part_files(self.at(PARTS[stage])))
        if present != recorded:
            missing, extra = sorted(recorded - present), sorted(present - recorded)
            raise ValueError(f"{self.at(PARTS[stage])} does not hold the parts the {stage} stage recorded "
                             f"(missing: {missing[:5] or 'none'}, unrecorded: {extra[:5] or 'none'}): "
                             "rerun to redo them")  # fmt: skip

    def output_fingerprint(self, stage: str, fingerprint: str) -> str:
        """The fingerprint that stages reading ``stage``'s parts chain: ``fingerprint`` with the
        stage's ``outputs_id`` (new each time it runs), so that redoing parts reruns them."""
        oid = self.manifest["stages"].get(stage, {}).get("outputs_id")
        return short_sha(fingerprint, oid) if oid else fingerprint

    def run_stage(self, stage: str, fingerprint: str, outputs: list[str], fn: Callable[[Path], dict], *,
                  also: tuple[str, ...] = ()) -> dict:  # fmt: skip
        """Run ``fn(local_stage_dir) -> counts`` unless the stage is done for ``fingerprint``.

        ``outputs`` are paths relative to the run directory; ``also`` names other top-level
        folders the stage writes locally (e.g. ``distilled``), uploaded with the stage folder.
        """
        if self.is_done(stage, fingerprint, outputs):
            entry = self.manifest["stages"][stage]
            entry["skipped"] = True
            self.log(f"[{stage}] up to date, skipped ({entry['fingerprint']})")
            self.save()
            return entry["counts"]
        marker = self.at(stage, ".fingerprint")
        if storage.exists(self.at(stage)) and (not storage.exists(marker) or storage.read_text(marker) != fingerprint):
            for folder in (stage, *also):  # leftovers of another config: never mix them in
                storage.delete(self.at(folder))
                shutil.rmtree(self.dir / folder, ignore_errors=True)
        else:  # resuming this stage: its shard writers keep the parts there, so only readable ones
            self.drop_bad_parts(stage, None)
        sdir = self.dir / stage
        sdir.mkdir(parents=True, exist_ok=True)
        storage.write_text(marker, fingerprint)
        self.manifest["stages"][stage] = {"status": "running", "fingerprint": fingerprint,
                                          "started_at": utc_now()}  # fmt: skip
        self.save()
        self.log(f"[{stage}] running")
        for up in self.chain[: self.chain.index(stage)] if stage in self.chain else ():
            if up in PARTS:
                self.check_parts(up)
        t0 = time.perf_counter()
        counts = fn(sdir)
        if self.remote:
            for folder in (stage, *also):
                if (self.dir / folder).exists():
                    storage.copy_dir(self.dir / folder, self.at(folder))
        seconds = time.perf_counter() - t0
        self.manifest["stages"][stage] = {
            "status": "done", "fingerprint": fingerprint, "seconds": round(seconds, 3),
            "counts": counts, "finished_at": utc_now(), "skipped": False,
            **({"placement": self.placement[stage]} if stage in self.placement else {}),
        }  # fmt: skip
        if stage in PARTS:
            self.manifest["stages"][stage].update(parts=storage.parquet_parts(self.at(PARTS[stage])),
                                                  outputs_id=uuid.uuid4().hex[:20])  # fmt: skip
        self.save()
        self.log(f"[{stage}] done in {seconds:.1f}s: {_short(counts)}")
        return counts


def needs_clip(cfg: SelectConfig) -> bool:
    """Whether the selection reads the CLIP embeddings or their clusters (embed, cluster)."""
    return cfg.method == "clip-kmeans" or (cfg.method in FEATURE_METHODS and cfg.features == "clip")


def needs_vit(cfg: SelectConfig) -> bool:
    """Whether the selection reads the complexity stage's ViT scores or features."""
    return cfg.method == "tripled" or (cfg.method in FEATURE_METHODS and cfg.features == "vit")


def _short(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, (dict, list)))
