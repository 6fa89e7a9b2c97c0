"""What the report reads from a run directory: the partitioned patch table and cluster
assignments at the run URI, column by column and rows on demand (``_Tables``), the selected
patches, JSON, logs and provenance CSVs; and atomic writes of its text files.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from srdistill import storage
from srdistill.distill.mining import PATCH_SCHEMA, read_patches


def _selected_rows(run_dir: Path, tables: _Tables) -> list[dict]:
    """Rows of ``selected.parquet`` with ``source, x, y, size, cluster, rank``.

    Patch geometry missing from the selection table is looked up in the patch table by
    ``patch_id``; a missing ``cluster`` (baselines ``random``/``score-topk`` may not carry
    it) in the cluster assignments, and is -1 where no assignment exists. Only the rows of the
    selected patches are read from either table.

    Raises:
        FileNotFoundError: geometry is needed but the patch table does not exist.
    """
    table = pq.read_table(run_dir / "select" / "selected.parquet")
    rows = table.to_pylist()
    if rows and not all(k in table.column_names for k in _GEOMETRY):
        if not tables.has_patches():
            raise FileNotFoundError(
                f"{storage.join(tables.uri, 'mine')}: no patch table to look up the geometry of "
                "the selected patches"
            )
        lookup = tables.geometry(sorted({r["patch_id"] for r in rows}))
        rows = [{**lookup[r["patch_id"]], **r} for r in rows]
    if rows and "cluster" not in table.column_names:
        assigned = {}
        ids = pa.array(sorted({r["patch_id"] for r in rows}), pa.string())
        t = tables.assignments(["patch_id", "cluster"], filter=pads.field("patch_id").isin(ids))
        if t is not None:
            assigned = dict(zip(t.column("patch_id").to_pylist(), t.column("cluster").to_pylist()))
        rows = [{**r, "cluster": assigned.get(r["patch_id"], -1)} for r in rows]
    return rows


_GEOMETRY = ("source", "x", "y", "size")
_PATCH_COLUMNS = PATCH_SCHEMA.append(pa.field("kept", pa.bool_()))


class _Tables:
    """The run's partitioned tables at ``uri`` (local path or ``s3://``), read on demand.

    ``mine/patches/`` + ``mine/keep.json`` through ``mining.read_patches``, and
    ``cluster/assignments/`` through ``storage.read_dataset``; whether each exists is asked
    once, and the cluster sizes are computed once.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.mine_uri = storage.join(uri, "mine")
        self.assign_uri = storage.join(uri, "cluster", "assignments")
        self._exists: dict[str, bool] = {}
        self._sizes: dict[int, int] | None = None

    def _has(self, uri: str) -> bool:
        if uri not in self._exists:
            self._exists[uri] = storage.exists(uri)
        return self._exists[uri]

    def has_patches(self) -> bool:
        """Whether the ``mine`` stage finished: its keep rule ``keep.json`` is written once
        every part is (a corpus without a single shard has no ``patches/`` folder)."""
        return self._has(storage.join(self.mine_uri, "keep.json"))

    def patches(self, columns: list[str], filter: Any = None) -> pa.Table | None:
        """``columns`` (``kept`` computed) of the patch rows; None without a patch table."""
        if not self.has_patches():
            return None
        if not self._has(storage.join(self.mine_uri, "patches")):
            return _PATCH_COLUMNS.empty_table().select(columns)
        return read_patches(self.mine_uri, columns, filter=filter)

    def geometry(self, ids: list[str]) -> dict[str, dict]:
        """``patch_id`` -> ``{patch_id, source, x, y, size}`` for those of ``ids`` in the patch
        table ({} without one)."""
        return self.rows(ids, [])

    def rows(self, ids: list[str], extra: list[str]) -> dict[str, dict]:
        """``patch_id`` -> ``{patch_id, source, x, y, size, *extra}`` for those of ``ids`` in the
        patch table ({} without one); ``extra`` names not in the patch table are left out."""
        if not ids:
            return {}
        extra = [c for c in extra if c in _PATCH_COLUMNS.names and c not in ("patch_id", *_GEOMETRY)]
        table = self.patches(["patch_id", *_GEOMETRY, *extra],
                             filter=pads.field("patch_id").isin(pa.array(ids, pa.string())))  # fmt: skip
        return {} if table is None else {r["patch_id"]: r for r in table.to_pylist()}

    def assignments(self, columns: list[str] | None = None, filter: Any = None) -> pa.Table | None:
        """The cluster assignments (``columns``, rows matching ``filter``); None if absent."""
        if not self._has(self.assign_uri):
            return None
        return storage.read_dataset(self.assign_uri, columns=columns, filter=filter)

    def cluster_sizes(self) -> dict[int, int]:
        """Cluster id -> number of assigned patches ({} without assignments)."""
        if self._sizes is None:
            table = self.assignments(["cluster"])
            self._sizes = {}
            if table is not None and table.num_rows:
                counts = table.column("cluster").drop_null().value_counts()
                pairs = zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())
                self._sizes = {int(c): int(n) for c, n in sorted(pairs)}
        return self._sizes


def _is_synth(run_dir: Path, manifest: dict) -> bool:
    """A ``distill: synth`` run: so configured, or it has synthesized images."""
    return (manifest.get("config", {}).get("distill") == "synth"
            or (run_dir / "synthesize" / "provenance.csv").is_file())  # fmt: skip


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; {} if it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_log(path: Path) -> list[dict]:
    """Rows of a JSON-lines log (blank or malformed lines skipped); [] if missing."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_provenance(path: Path) -> list[dict]:
    """Rows of ``synthesize/provenance.csv`` in file order (rows without ``file``/``cluster``
    skipped)."""
    with open(path, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            try:
                rows.append({**row, "cluster": int(row["cluster"])})
            except (KeyError, TypeError, ValueError):
                continue
    return [r for r in rows if r.get("file")]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
