"""The corpus plan: which images a run mines, fixed once, in shards.

A corpus is given either as a directory / S3 prefix (listed recursively, once) or as a
*manifest file* of image URIs (parquet, CSV or plain text), which is read in batches and never
listed or stat'ed object by object, so a corpus of millions of objects is planned in one
streaming pass. The plan (``plan/files.parquet``) holds one row per image:

* ``uri``: where to read it (local path or ``s3://bucket/key``);
* ``key``: the name the patch ids are derived from (``mining.patch_id``): the path relative to
  the corpus root for a directory, the entry as written for a manifest (relative entries are
  resolved against the manifest's folder but keep their relative key), so ids survive moving
  the corpus;
* ``skip``: ``""`` for an image to mine, else why the entry is not mined: a local directory is
  walked by ``storage.walk_local`` (symlinks followed, each real file once, a directory loop
  not descended twice) and what it could not list (a directory loop, a dangling or looping
  link, an unreadable entry, a directory named like an image, a second name of a file) is
  planned as such a row, so mining records it in ``mine/skipped.parquet`` with the images it
  could not decode.

Each parquet row group of the plan is one *shard* of at most ``images_per_shard`` images (fewer
for a small corpus, so that it still makes ``min_shards``: two per CPU of the cluster, in the
pipeline), the unit of work of mining: a shard's output is one part file named after the shard, written atomically,
so a retried or resumed shard replaces nothing and duplicates nothing.

Memory: planning a manifest holds one shard and one read batch; planning a directory holds the
listing (``storage.walk_local`` locally, pyarrow's ``get_file_info`` on S3), which is why
manifests are the way to give ~10^6 files.

No Ray here.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from srdistill import storage

__all__ = ["PLAN_SCHEMA", "MANIFEST_SUFFIXES", "CorpusPlan", "is_manifest", "input_signature", "plan_corpus",
           "read_shard", "num_shards"]  # fmt: skip

PLAN_SCHEMA = pa.schema([("uri", pa.string()), ("key", pa.string()), ("skip", pa.string())])
#: File names taken as a manifest of URIs rather than a single image.
MANIFEST_SUFFIXES = (".parquet", ".csv", ".txt")
#: Column names looked for in a manifest, in order (else its only column).
_URI_COLUMNS = ("uri", "url", "path", "file")
_READ_ROWS = 65_536


@dataclass(frozen=True)
class CorpusPlan:
    """What ``plan_corpus`` wrote.

    Attributes:
        images: rows of the plan to mine (``skip == ""``).
        shards: row groups of the plan.
        other_files_ignored: listed files or manifest entries without an image extension.
        source: ``"listing"`` (a directory or prefix) or ``"manifest"``.
        digest: 20 hex digits identifying the planned content (URIs, and sizes and mtimes for a
            listing), for stage fingerprints.
        skipped: rows planned as skipped (``skip != ""``): what a local listing could not list.
        images_per_shard: the most rows a shard holds, as ``plan_corpus`` chose it.
    """

    images: int
    shards: int
    other_files_ignored: int
    source: str
    digest: str
    skipped: int = 0
    images_per_shard: int = 0


def is_manifest(uri: str) -> bool:
    """Whether ``uri`` names a manifest file (suffix ``.parquet``, ``.csv`` or ``.txt``)."""
    return os.fspath(uri).lower().endswith(MANIFEST_SUFFIXES)


def _has_extension(name: str, exts: tuple[str, ...]) -> bool:
    return name.lower().endswith(exts)


Batch = tuple[list[str], list[str], list[str], str, int]


def _local_listing(root: str, exts: tuple[str, ...]) -> Iterator[Batch]:
    """``_listing`` of a local directory (``storage.walk_local``): the image files and, as rows
    with a ``skip`` reason, the problems worth recording: directories (loops, unreadable,
    listed elsewhere) always, other entries when named like an image."""
    found = storage.walk_local(root)
    rows = [(rel, "", f"{rel}\x1f{n}\x1f{t}\n") for rel, n, t in found.files if _has_extension(rel, exts)]
    ignored = len(found.files) - len(rows)
    for rel, reason, is_dir in found.problems:
        if is_dir or _has_extension(rel, exts):
            rows.append((rel, reason, f"{rel}\x1f!{reason}\n"))
        else:
            ignored += 1
    rows += [(rel, "a directory, not an image file", f"{rel}\x1f!dir\n")
             for rel in found.dirs if rel != "." and _has_extension(rel, exts)]  # fmt: skip
    rows.sort()
    yield ([storage.join(root, r[0]) for r in rows], [r[0] for r in rows], [r[1] for r in rows],
           "".join(r[2] for r in rows), ignored)  # fmt: skip


def _listing(root: str, exts: tuple[str, ...]) -> Iterator[Batch]:
    """``(uris, keys, skips, digest text, files ignored)`` of the image files under ``root``,
    sorted, as a single batch (the listing is held in memory)."""
    fs, path = storage.filesystem(root)
    with storage.errors("list", root):
        kind = fs.get_file_info(path).type
    if kind != pafs.FileType.Directory:
        raise FileNotFoundError(f"input {root!r} is not a directory, S3 prefix or manifest file "
                                f"({', '.join(MANIFEST_SUFFIXES)})")  # fmt: skip
    if not storage.is_s3(root):
        yield from _local_listing(root, exts)
        return
    with storage.errors("list", root):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    uris, keys, lines = [], [], []
    for i in files:
        rel = posixpath.relpath(i.path.replace(os.sep, "/"), path.replace(os.sep, "/"))
        if _has_extension(rel, exts):
            uris.append(storage.join(root, rel))
            keys.append(rel)
            lines.append(f"{rel}\x1f{i.size}\x1f{i.mtime_ns}\n")
    yield uris, keys, [""] * len(uris), "".join(lines), len(files) - len(uris)


def _manifest_column(names: list[str], uri: str) -> str:
    lowered = {n.lower(): n for n in names}
    for want in _URI_COLUMNS:
        if want in lowered:
            return lowered[want]
    if len(names) == 1:
        return names[0]
    raise ValueError(f"manifest {uri!r} has columns {names}: name one of them {list(_URI_COLUMNS)} "
                     f"or give a single column")  # fmt: skip


def _manifest_batches(uri: str) -> Iterator[pa.Array]:
    """The URI column of a manifest, in batches (never the whole file in memory)."""
    fs, path = storage.filesystem(uri)
    lower = uri.lower()
    with storage.errors("read", uri), fs.open_input_file(path) as f:
        if lower.endswith(".parquet"):
            pf = pq.ParquetFile(f)
            col = _manifest_column(pf.schema_arrow.names, uri)
            for batch in pf.iter_batches(batch_size=_READ_ROWS, columns=[col]):
                yield batch.column(0)
            return
        if lower.endswith(".txt"):
            opts = pacsv.ReadOptions(column_names=["uri"], block_size=1 << 22)
            parse = pacsv.ParseOptions(delimiter="\x1f", quote_char=False)  # one entry per line
        else:
            opts, parse = pacsv.ReadOptions(block_size=1 << 22), pacsv.ParseOptions()
        conv = pacsv.ConvertOptions(strings_can_be_null=False)
        reader = pacsv.open_csv(f, read_options=opts, parse_options=parse, convert_options=conv)
        col = _manifest_column(reader.schema.names, uri)
        for batch in reader:
            yield batch.column(col)


def _manifest(uri: str, exts: tuple[str, ...]) -> Iterator[Batch]:
    base = storage.parent(uri)
    row = 0
    for column in _manifest_batches(uri):
        entries = [("" if v is None else str(v)).strip() for v in column.to_pylist()]
        uris, keys, ignored = [], [], 0
        for i, entry in enumerate(entries):
            if not entry:
                raise ValueError(f"manifest {uri!r}: entry {row + i} (0-based, header excluded) is empty")
            if not _has_extension(entry, exts):
                ignored += 1
                continue
            absolute = storage.is_s3(entry) or entry.startswith(("/", "file://"))
            uris.append(entry if absolute else storage.join(base, entry))
            keys.append(entry)
        row += len(entries)
        yield uris, keys, [""] * len(uris), "\n".join(keys) + "\n", ignored


@storage.retry
def plan_corpus(input_uri: str, plan_uri: str, *, extensions: tuple[str, ...],
                images_per_shard: int, min_shards: int = 1) -> CorpusPlan:  # fmt: skip
    """Write the plan of the corpus ``input_uri`` to ``plan_uri`` (parquet, atomically).

    Args:
        input_uri: a directory or S3 prefix of images (listed recursively), or a manifest file
            (``.parquet``: a column ``uri``/``url``/``path``/``file`` or a single column;
            ``.csv``: the same with a header row; ``.txt``: one entry per line).
        plan_uri: where the plan goes (local path or ``s3://``).
        extensions: image suffixes kept (case-insensitive, with the dot).
        images_per_shard: images per row group (shard), >= 1: the most a shard holds.
        min_shards: cut at least this many shards when the corpus has as many rows (e.g. two
            per CPU of the cluster, so that a small corpus keeps every core busy): a corpus of
            ``n < images_per_shard * min_shards`` rows is cut into ``min(n, min_shards)``
            shards whose sizes differ by at most one. Decided after reading at most
            ``images_per_shard * min_shards`` rows, so a large manifest is still planned in one
            streaming pass.

    Returns:
        ``CorpusPlan``.

    Raises:
        FileNotFoundError: the input is neither an existing directory/prefix nor a manifest.
        ValueError: a manifest without a usable column or with an empty entry; images_per_shard or
            min_shards below 1.
        OSError: reading the input or writing the plan failed.
    """
    if images_per_shard < 1 or min_shards < 1:
        raise ValueError(f"images_per_shard and min_shards must be >= 1, got {images_per_shard}, {min_shards}")
    exts = tuple(e.lower() for e in extensions)
    manifest = is_manifest(input_uri)
    if manifest and not storage.exists(input_uri):
        raise FileNotFoundError(f"manifest {input_uri!r} does not exist")
    batches = _manifest(input_uri, exts) if manifest else _listing(input_uri, exts)
    digest = hashlib.sha256()
    pending: list[pa.Table] = []
    n_pending = images = ignored = skipped = written = 0
    per_shard = None  # images_per_shard once the corpus has filled min_shards of them
    with storage.atomic_writer(plan_uri) as sink, pq.ParquetWriter(sink, PLAN_SCHEMA) as writer:
        for uris, keys, skips, lines, n_ignored in batches:
            digest.update(lines.encode())
            ignored += n_ignored
            n_skipped = sum(1 for s in skips if s)
            images += len(uris) - n_skipped
            skipped += n_skipped
            pending.append(pa.table({"uri": uris, "key": keys, "skip": skips}, schema=PLAN_SCHEMA))
            n_pending += len(uris)
            if per_shard is None and images + skipped >= images_per_shard * min_shards:
                per_shard = images_per_shard
            while per_shard is not None and n_pending >= per_shard:  # write whole shards as row groups
                table = pa.concat_tables(pending)
                writer.write_table(table.slice(0, per_shard), row_group_size=per_shard)
                written += 1
                rest = table.slice(per_shard)
                pending, n_pending = [rest], rest.num_rows
        table = pa.concat_tables(pending) if pending else PLAN_SCHEMA.empty_table()
        if per_shard is None:  # a small corpus, all still pending: min(n, min_shards) shards, sizes within 1
            k = min(n_pending, min_shards)
            sizes = [n_pending // k + (i < n_pending % k) for i in range(k)]
        else:  # fewer than per_shard left
            sizes = [n_pending] * bool(n_pending)
        start = 0
        for size in sizes:
            writer.write_table(table.slice(start, size), row_group_size=size)
            start += size
        shards = written + len(sizes)
    return CorpusPlan(images=images, shards=shards, other_files_ignored=ignored,
                      source="manifest" if manifest else "listing", digest=digest.hexdigest()[:20],
                      skipped=skipped, images_per_shard=per_shard or max(sizes, default=1))  # fmt: skip


@storage.retry
def input_signature(input_uri: str, extensions: tuple[str, ...]) -> str:
    """What decides whether a corpus must be planned again, cheaply: for a local directory, the
    digest of its listing (paths, sizes, mtimes; local listing is cheap); for a manifest file,
    its size and mtime (one stat); for an S3 prefix, nothing: it is listed once per run
    directory (start a new run directory to pick up new objects)."""
    if is_manifest(input_uri):
        fs, path = storage.filesystem(input_uri)
        with storage.errors("stat", input_uri):
            info = fs.get_file_info(path)
        return f"{info.size}:{info.mtime_ns}"
    if storage.is_s3(input_uri):
        return ""
    _, _, _, text, _ = next(_listing(input_uri, tuple(e.lower() for e in extensions)))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@storage.retry
def num_shards(plan_uri: str) -> int:
    """Shards (row groups) of the plan at ``plan_uri``."""
    fs, path = storage.filesystem(plan_uri)
    with storage.errors("read", plan_uri), fs.open_input_file(path) as f:
        return pq.ParquetFile(f).num_row_groups


@storage.retry
def read_shard(plan_uri: str, shard: int) -> pa.Table:
    """Shard ``shard`` of the plan: a ``PLAN_SCHEMA`` table (one ranged read on S3).

    Raises:
        IndexError: no such shard.
        OSError: the read failed.
    """
    fs, path = storage.filesystem(plan_uri)
    with storage.errors("read", plan_uri), fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        if not 0 <= shard < pf.num_row_groups:
            raise IndexError(f"plan {plan_uri!r} has {pf.num_row_groups} shards, no shard {shard}")
        return pf.read_row_group(shard)
