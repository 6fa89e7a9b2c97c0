"""One storage layer for local paths and ``s3://bucket/prefix`` URIs.

Every function takes a *URI*: a local path (``str`` or ``os.PathLike``, relative or absolute, or
``file://...``) or ``s3://bucket/key``. Everything goes through ``pyarrow.fs`` (``LocalFileSystem``
or ``S3FileSystem``), the filesystem layer that Ray Data and parquet I/O take as well:
``filesystem(uri)`` hands out the filesystem and the path inside it for such callers.

S3 configuration (``S3Settings``) is endpoint, region, retries and timeouts only; credentials
never pass through here: pyarrow's AWS SDK client takes them from the standard chain (the
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` variables, the shared
profile files, IRSA web identity, instance metadata). Pickled filesystems (Ray ships them to
workers) carry the settings, not the credentials; each worker resolves its own.

Writes are atomic, visible only once complete. Local: a temp file in the destination directory,
then ``os.replace``. S3: the object is assembled in memory and uploaded through one
``open_output_stream`` (a single PUT up to ~10 MB, else a multipart upload completed only at
``close``), so an exception while producing the data uploads nothing. (Streaming the bytes
straight into an S3 output stream would not be safe: pyarrow exposes no abort, and the C++
stream *completes* a half-written upload when it is garbage-collected.) The price: an S3 object
is held in memory once while written, which suits manifests, shards and checkpoints, not
multi-GB blobs.

Retries: the AWS SDK retries each request (``S3Settings.max_attempts``, its default strategy:
exponential backoff from 25 ms, no retry quota); on top of it every idempotent operation is
re-issued a few times (``retry``) when the SDK gives up or a response body breaks off.

Errors: a missing object raises ``FileNotFoundError`` naming the URI; any other failure (on S3:
after the retries of ``S3Settings.max_attempts``) raises ``OSError`` naming the operation and the
URI, with the message passed through ``redact``.

This module imports no Ray.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Union
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["S3Settings", "is_s3", "join", "filesystem", "write_bytes", "write_text", "write_json",
           "write_parquet", "atomic_writer", "errors", "retry", "parent", "read_bytes", "read_once", "read_dataset", "read_text", "read_json", "read_parquet", "exists",
           "delete", "list_files", "walk_local", "LocalListing", "size", "copy_dir", "redact"]

URI = Union[str, "os.PathLike[str]"]
_S3 = "s3://"


def _env(*names: str) -> str | None:
    """The first of the environment variables ``names`` that is set and non-empty."""
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3 (or an S3-compatible store such as MinIO). Never credentials.

    Attributes:
        endpoint_url: ``http(s)://host[:port]`` of an S3-compatible endpoint; ``None`` is AWS.
            The scheme (http or https) follows this URL; ``https`` when it has none. Default:
            ``$AWS_ENDPOINT_URL_S3``, else ``$AWS_ENDPOINT_URL`` (the service-specific variable
            wins, as in the AWS SDKs).
        region: AWS region; default ``$AWS_REGION``, else ``$AWS_DEFAULT_REGION``, else the AWS
            SDK's own resolution (profile files; instance metadata on EC2).
        max_attempts: attempts per request of the AWS SDK "default" retry strategy (default
            ``$AWS_MAX_ATTEMPTS``, else 10), with exponential backoff and jitter, for throttling (503 SlowDown), 5xx and network errors (connection
            refused/reset, empty reply, stalled transfer).
        connect_timeout_s: TCP/TLS connect timeout in seconds.
        request_timeout_s: stall timeout in seconds: on Linux the AWS SDK (curl) aborts a request
            (retryably) that moves less than 1 byte/s for this long; on Windows/macOS a socket
            read timeout.
    """

    endpoint_url: str | None = field(default_factory=lambda: _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"))
    region: str | None = field(default_factory=lambda: _env("AWS_REGION", "AWS_DEFAULT_REGION"))
    max_attempts: int = field(default_factory=lambda: int(_env("AWS_MAX_ATTEMPTS") or 10))
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"S3Settings.max_attempts must be >= 1, got {self.max_attempts}")
        if self.connect_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("S3Settings timeouts must be > 0 seconds")
        if self.endpoint_url and urlsplit(self.endpoint_url).scheme not in ("", "http", "https"):
            raise ValueError(f"S3Settings.endpoint_url must be http(s)://host[:port], got {self.endpoint_url!r}")


def is_s3(uri: URI) -> bool:
    """Whether ``uri`` is an ``s3://`` URI (scheme case-insensitive)."""
    return os.fspath(uri)[:5].lower() == _S3


def join(uri: URI, *parts: str) -> str:
    """``uri`` with ``parts`` appended, one ``/`` between segments.

    Works on local paths and S3 URIs alike; leading/trailing slashes of ``parts`` are dropped
    (so a part never resets the path to the root) and empty parts are skipped.
    ``join("s3://b/runs/", "/x/", "y.json") == "s3://b/runs/x/y.json"``.
    """
    base = os.fspath(uri)
    segs = [s for s in (os.fspath(p).strip("/") for p in parts) if s]
    if is_s3(base):
        head = base.rstrip("/")
        return "/".join([head, *segs]) if len(head) > len(_S3) else _S3 + "/".join(segs)
    return os.path.join(base, *segs)


def parent(uri: URI) -> str:
    """The folder/prefix holding ``uri`` (``parent("s3://b/x/m.csv") == "s3://b/x"``)."""
    s = os.fspath(uri).rstrip("/")
    if is_s3(s):
        return s.rsplit("/", 1)[0] if s.count("/") > 2 else s
    return os.path.dirname(os.path.abspath(s))


def _s3_path(uri: str) -> str:
    """``s3://bucket/key/`` -> ``bucket/key``; ``ValueError`` without a bucket."""
    path = uri[len(_S3):].strip("/")
    if not path:
        raise ValueError(f"S3 URI without a bucket: {uri!r}")
    return path


@functools.lru_cache(maxsize=None)
def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    scheme, endpoint = "https", None
    if settings.endpoint_url:
        parts = urlsplit(settings.endpoint_url if "//" in settings.endpoint_url else "//" + settings.endpoint_url)
        scheme, endpoint = parts.scheme or "https", parts.netloc
    return pafs.S3FileSystem(
        region=settings.region, endpoint_override=endpoint, scheme=scheme,
        # delayed open: an object under the part size (~10 MB) goes out as one PUT at close
        # (1 request instead of create + part + complete); errors then surface at close
        allow_delayed_open=True,
        connect_timeout=settings.connect_timeout_s, request_timeout=settings.request_timeout_s,
        # the SDK's "default" strategy: exponential backoff from 25 ms, no retry quota (the
        # "standard" one stops retrying for a while once a burst of errors drains its quota)
        # (its max_attempts argument counts retries after the first attempt)
        retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=settings.max_attempts - 1),
    )  # fmt: skip


# pyarrow finalizes its AWS SDK at exit (an atexit hook registered when pyarrow.fs is imported);
# hooks run last-in first-out, so this one drops the cached S3 clients just before that.
atexit.register(_s3_filesystem.cache_clear)
_LOCAL = pafs.LocalFileSystem()


def filesystem(uri: URI, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """The ``pyarrow.fs`` filesystem holding ``uri`` and the path inside it.

    Args:
        uri: local path, ``file://`` URI or ``s3://bucket/key``.
        settings: S3 settings; ``None`` reads them from the environment (``S3Settings()``).
    Returns:
        ``(S3FileSystem, "bucket/key")`` for S3 (one cached filesystem per distinct settings), else
        ``(LocalFileSystem, absolute path)``.
    Raises:
        ValueError: an S3 URI without a bucket, or invalid settings.
    """
    s = os.fspath(uri)
    if is_s3(s):
        return _s3_filesystem(settings or S3Settings()), _s3_path(s)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return _LOCAL, os.path.abspath(os.path.expanduser(s))


def _to_uri(uri: str, path: str) -> str:
    """The path ``path`` of ``uri``'s filesystem as a URI of the same kind."""
    return _S3 + path if is_s3(uri) else path


#: Extra attempts at an idempotent S3 operation once the SDK has given up, and the first wait.
RETRIES, RETRY_WAIT_S = 4, 0.5


def retry(fn):
    """Decorator for a function whose first argument is a URI: re-issue an S3 operation that failed with ``OSError`` (not ``FileNotFoundError``) up to
    ``RETRIES`` more times, waiting 0.5, 1, 2, 4 s. Within one attempt the AWS SDK already retries
    (``S3Settings.max_attempts``); this outer loop covers longer bursts of errors and failures
    while a body streams, which the SDK does not retry. Local paths are not retried."""

    @functools.wraps(fn)
    def wrapper(uri, *args, **kwargs):
        if not is_s3(uri):
            return fn(uri, *args, **kwargs)
        for attempt in range(RETRIES + 1):
            try:
                return fn(uri, *args, **kwargs)
            except FileNotFoundError:
                raise
            except OSError:
                if attempt == RETRIES:
                    raise
                time.sleep(RETRY_WAIT_S * 2**attempt)

    return wrapper


@contextlib.contextmanager
def errors(op: str, uri: URI) -> Iterator[None]:
    """Context manager: re-raise filesystem errors as ``FileNotFoundError``/``OSError`` naming
    ``op`` and ``uri`` (message passed through ``redact``)."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{op}: no such file or object", os.fspath(uri)) from None
    except OSError as e:  # pyarrow raises OSError (ArrowIOError) for S3 errors after its retries
        where = "S3" if _S3 in os.fspath(uri).lower() else "local"
        raise OSError(f"{where} {op} failed for {os.fspath(uri)}: {redact(str(e))}") from None


@contextlib.contextmanager
def atomic_writer(uri: URI) -> Iterator[IO[bytes]]:
    """Context manager: a binary file whose content becomes ``uri`` only when the block exits
    cleanly (see the module docstring); any exception inside writes nothing."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        buf = pa.BufferOutputStream()
        yield buf
        _put(uri, buf.getvalue())
        return
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    with errors("write", uri):
        os.makedirs(parent, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with errors("write", uri):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@retry
def _put(uri: URI, data: pa.Buffer) -> None:
    fs, path = filesystem(uri)
    with errors("write", uri), fs.open_output_stream(path) as out:
        out.write(data)


def write_bytes(uri: URI, data: bytes | bytearray | memoryview | Iterable[bytes]) -> None:
    """Write ``data`` (bytes, or an iterable of byte chunks) to ``uri`` atomically.

    Missing local parent directories are created. If the iterable raises, the exception
    propagates and nothing is written (no object, no file, no temp file).

    Raises:
        OSError: the write failed (S3: after retries), naming the URI.
    """
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    with atomic_writer(uri) as f:
        for chunk in chunks:
            f.write(chunk)


def write_text(uri: URI, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``uri`` atomically (see ``write_bytes``)."""
    write_bytes(uri, text.encode(encoding))


def write_json(uri: URI, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (UTF-8, keys in given order) to ``uri`` atomically.

    Raises:
        TypeError/ValueError: ``obj`` is not JSON-serialisable (nothing is written).
        OSError: the write failed.
    """
    write_text(uri, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_parquet(uri: URI, table: pa.Table, **kwargs: Any) -> None:
    """Write ``table`` as a parquet file to ``uri`` atomically; ``kwargs`` go to
    ``pyarrow.parquet.write_table`` (e.g. ``compression``, ``row_group_size``)."""
    with atomic_writer(uri) as f:
        pq.write_table(table, f, **kwargs)


@retry
def read_bytes(uri: URI) -> bytes:
    """The content of the file/object ``uri``.

    Raises:
        FileNotFoundError: no such file or object (naming the URI).
        OSError: the read failed (S3: after retries).
    """
    return read_once(uri)


def read_once(uri: URI, settings: S3Settings | None = None) -> bytes:
    """The content of ``uri`` in one attempt: no re-issue (``retry``) on top of the AWS SDK's
    own retries, which ``settings`` bound. For callers that must answer quickly rather than
    surely, e.g. ``read_once(uri, S3Settings(max_attempts=1, connect_timeout_s=2,
    request_timeout_s=3))`` gives up on an endpoint that accepts but never answers after about
    3 s per request (the operator's status pass reads the run manifest this way).

    Raises:
        FileNotFoundError: no such file or object (naming the URI).
        OSError: the read failed or timed out.
    """
    fs, path = filesystem(uri, settings)
    with errors("read", uri), fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: URI, encoding: str = "utf-8") -> str:
    """The content of ``uri`` decoded as text (see ``read_bytes``)."""
    return read_bytes(uri).decode(encoding)


def read_json(uri: URI) -> Any:
    """The JSON document at ``uri`` (see ``read_bytes``; ``ValueError`` on invalid JSON)."""
    return json.loads(read_bytes(uri))


class UnreadableFileError(ValueError):
    """A file exists but cannot be parsed (e.g. a truncated parquet part); the message is one line
    naming its URI and what to do."""


#: pyarrow's errors for data that cannot be parsed (not I/O errors, which are ``OSError``).
_PARSE_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


def _unreadable(uri: URI, exc: BaseException) -> UnreadableFileError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UnreadableFileError(f"{os.fspath(uri)} cannot be read as parquet (truncated or corrupt: {redact(reason)}); "
                               "a part of a run is redone when the run is rerun, otherwise delete it and rerun")


@retry
def read_parquet(uri: URI, columns: list[str] | None = None) -> pa.Table:
    """The parquet file ``uri`` as a table (ranged reads: only the needed ``columns`` are fetched).

    Raises:
        FileNotFoundError: no such file or object.
        UnreadableFileError: the file is not valid parquet (e.g. truncated), naming ``uri``.
        OSError: the read failed.
    """
    fs, path = filesystem(uri)
    with errors("read", uri), fs.open_input_file(path) as f:
        try:
            return pq.read_table(f, columns=columns)
        except _PARSE_ERRORS as exc:
            raise _unreadable(uri, exc) from None


@retry
def parquet_footer(uri: URI) -> dict[str, int]:
    """``{"rows": N, "bytes": B}`` of the parquet file ``uri``, from its footer only.

    Raises:
        FileNotFoundError: no such file or object.
        UnreadableFileError: the footer cannot be read (truncated or corrupt file), naming ``uri``.
        OSError: the read failed.
    """
    fs, path = filesystem(uri)
    with errors("read", uri), fs.open_input_file(path) as f:
        size = f.size()
        try:
            meta = pq.read_metadata(f)
        except _PARSE_ERRORS as exc:
            raise _unreadable(uri, exc) from None
    return {"rows": meta.num_rows, "bytes": size}


def parquet_parts(uri: URI) -> dict[str, dict[str, int]]:
    """``{name: parquet_footer(part)}`` for the parquet parts below the folder/prefix ``uri``
    (names relative to it; names starting with ``.`` or ``_``, e.g. in-flight temp files, left
    out, as ``read_dataset`` does); ``{}`` when nothing is there. Reads footers only.

    Raises:
        UnreadableFileError: a part's footer cannot be read.
        OSError: listing or reading failed.
    """
    return {name: parquet_footer(u) for name, u in part_files(uri).items()}


def part_files(uri: URI) -> dict[str, str]:
    """``{name relative to uri: URI}`` of the parquet parts below ``uri`` (as ``parquet_parts``)."""
    root = os.fspath(uri).rstrip("/").rstrip(os.sep)
    out = {}
    for u in list_files(uri, [".parquet"]):
        name = u[len(root) :].lstrip("/").lstrip(os.sep) if u.startswith(root) else u.rsplit("/", 1)[-1]
        if not any(p.startswith((".", "_")) for p in re.split(r"[/\\]", name)):
            out[name.replace(os.sep, "/")] = u
    return out


@retry
def read_dataset(uri: URI, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
    """All parquet files below the directory/prefix ``uri`` as one table (``pyarrow.dataset``:
    files in path order, names starting with ``.`` or ``_`` ignored, so in-flight temp files
    never show; only ``columns`` are fetched, row groups pruned by the ``filter`` expression).

    Raises:
        FileNotFoundError: nothing at ``uri``.
        UnreadableFileError: a part is not valid parquet (e.g. truncated), naming it.
        OSError: listing or reading failed.
    """
    import pyarrow.dataset as pads

    fs, path = filesystem(uri)
    with errors("read", uri):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        try:
            return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns, filter=filter)
        except _PARSE_ERRORS as exc:
            error = exc
    for part in part_files(uri).values():  # name the part that cannot be read
        parquet_footer(part)
    raise _unreadable(uri, error)


@retry
def _info(uri: URI, op: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    with errors(op, uri):
        return fs.get_file_info(path)


def exists(uri: URI) -> bool:
    """Whether ``uri`` is an existing file/object or directory/prefix (a prefix exists when
    objects lie below it). Raises ``OSError`` if S3 cannot be asked."""
    return _info(uri, "stat").type != pafs.FileType.NotFound


def size(uri: URI) -> int:
    """Size in bytes of the file ``uri``; for a directory/prefix, the total of the files below it.

    Raises:
        FileNotFoundError: nothing at ``uri``.
    """
    info = _info(uri, "stat")
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(errno.ENOENT, "stat: no such file or object", os.fspath(uri))
    if info.type == pafs.FileType.File:
        return info.size
    fs, path = filesystem(uri)
    with errors("list", uri):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(i.size for i in infos if i.type == pafs.FileType.File)


def delete(uri: URI) -> None:
    """Delete the file ``uri``, or the directory/prefix ``uri`` with everything below it.

    Nothing at ``uri`` is not an error. An S3 bucket root (``s3://bucket``) is emptied, not removed.

    Raises:
        OSError: the deletion failed.
    """
    fs, path = filesystem(uri)
    kind = _info(uri, "stat").type
    with errors("delete", uri):
        if kind == pafs.FileType.File:
            fs.delete_file(path)
        elif kind == pafs.FileType.Directory:
            if is_s3(uri) and "/" not in path:
                fs.delete_dir_contents(path)
            else:
                fs.delete_dir(path)


@dataclass
class LocalListing:
    """What ``walk_local`` found below a local directory.

    Attributes:
        files: ``(rel, size, mtime_ns)`` of every real file once, sorted by ``rel`` (the path
            relative to the root, POSIX separators, through the links it was reached by).
        problems: ``(rel, reason, is_dir)`` of every entry not listed, sorted by ``rel``: a
            directory link back into an ancestor (a loop) or to a directory listed elsewhere, a
            dangling or looping link, an entry that cannot be read, something that is neither a
            file nor a directory, a second name of a file already listed. ``is_dir``: the entry
            is a directory (its name says nothing about what it holds).
        dirs: ``(rel, ...)`` of the directories listed, for callers that flag directories named
            like files (``"."`` is the root).
    """

    files: list[tuple[str, int, int]] = field(default_factory=list)
    problems: list[tuple[str, str, bool]] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)


def walk_local(root: URI) -> LocalListing:
    """Walk the local directory ``root`` recursively, following symlinks, with cycle detection.

    Every directory is descended once (by its ``(st_dev, st_ino)``): a link back into an
    ancestor is a loop, a second link to a directory already walked is not walked again (both
    are recorded in ``problems``); names are visited in sorted order, depth first, so which name
    a directory is walked under is deterministic. Every real file is listed once, under its
    smallest relative path; its other names (symlinks, hard links) are recorded in
    ``problems`` as ``duplicate of <path> (same file)``. Nothing raises for a bad entry.

    Raises:
        FileNotFoundError / OSError: ``root`` itself is missing or cannot be read.
    """
    base = filesystem(root)[1]
    out = LocalListing()
    with errors("list", root):
        st = os.stat(base)
    visited: dict[tuple[int, int], str] = {(st.st_dev, st.st_ino): "."}
    found: list[tuple[str, tuple[int, int], int, int]] = []
    stack = ["."]
    while stack:
        rel_dir = stack.pop()
        out.dirs.append(rel_dir)
        here = base if rel_dir == "." else os.path.join(base, *rel_dir.split("/"))
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if rel_dir == ".":
                with errors("list", root):
                    raise
            out.problems.append((rel_dir, f"unreadable directory: {exc.strerror or exc}", True))
            continue
        subdirs = []
        for entry in entries:
            rel = entry.name if rel_dir == "." else f"{rel_dir}/{entry.name}"
            link = entry.is_symlink()
            try:
                est = os.stat(entry.path)
            except OSError as exc:
                target = _readlink(entry.path) if link else None
                if exc.errno == errno.ELOOP:
                    reason = f"symlink loop: {rel} -> {target} never resolves"
                elif link and isinstance(exc, FileNotFoundError):
                    reason = f"dangling symlink: {rel} -> {target}"
                else:
                    reason = f"unreadable: {exc.strerror or exc}"
                out.problems.append((rel, reason, False))
                continue
            key = (est.st_dev, est.st_ino)
            if stat.S_ISDIR(est.st_mode):
                seen = visited.get(key)
                if seen is None:
                    visited[key] = rel
                    subdirs.append(rel)
                    continue
                arrow = f" -> {_readlink(entry.path)}" if link else ""
                if seen == "." or rel.startswith(seen + "/"):
                    where = "the corpus root" if seen == "." else seen
                    reason = f"symlink loop: {rel}{arrow} leads back to {where}, not descended again"
                else:
                    reason = f"same directory as {seen}{arrow}, listed there once"
                out.problems.append((rel, reason, True))
            elif stat.S_ISREG(est.st_mode):
                found.append((rel, key, est.st_size, est.st_mtime_ns))
            else:
                out.problems.append((rel, "not a regular file or directory", False))
        stack.extend(reversed(subdirs))
    first: dict[tuple[int, int], str] = {}
    for rel, key, fsize, mtime in sorted(found):
        if key in first:
            out.problems.append((rel, f"duplicate of {os.path.join(os.fspath(root), first[key])} (same file)", False))
        else:
            first[key] = rel
            out.files.append((rel, fsize, mtime))
    out.problems.sort()
    return out


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


@retry
def list_files(uri: URI, extensions: Iterable[str] | None = None) -> list[str]:
    """All files below the directory/prefix ``uri`` (recursive), as full URIs, sorted.

    A local directory is walked by ``walk_local``: symlinks are followed, a directory loop is
    not descended twice and each real file is listed once (dangling and looping links, and the
    other names of a file, are left out; ``walk_local`` says which and why).

    Args:
        uri: directory or prefix (a single file gives ``[uri]``; nothing there gives ``[]``).
        extensions: keep only names ending with one of these (case-insensitive; ``"png"`` and
            ``".png"`` are the same; ``".tar.gz"`` works).
    Returns:
        ``s3://bucket/key`` URIs for S3, absolute paths for local directories.
    Raises:
        OSError: the listing failed.
    """
    fs, path = filesystem(uri)
    info = _info(uri, "list")
    if info.type == pafs.FileType.File:
        paths = [path]
    elif info.type == pafs.FileType.Directory and not is_s3(uri):
        paths = [os.path.join(path, *rel.split("/")) for rel, _, _ in walk_local(uri).files]
    else:
        with errors("list", uri):
            sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
            paths = [i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File]
    if extensions is not None:
        exts = tuple("." + e.lower().lstrip(".") for e in extensions)
        paths = [p for p in paths if p.lower().endswith(exts)]
    return sorted(_to_uri(os.fspath(uri), p) for p in paths)


def copy_dir(src_uri: URI, dst_uri: URI, max_workers: int = 8, *, skip_existing: bool = False) -> None:
    """Copy the directory/prefix ``src_uri`` recursively to ``dst_uri`` (local<->S3 either way,
    or S3->S3; a single file ``src_uri`` is copied to the file ``dst_uri``).

    Every file is written like ``write_bytes``, atomically: to a local destination it streams
    into a temp file; to S3 it is read whole into memory first (up to ``max_workers`` files at a
    time), then uploaded. ``pyarrow.fs.copy_files`` is avoided on purpose: it leaves a
    half-copied object *committed* on S3 when the source fails midway (its output stream is
    completed by its destructor) and writes empty ``dir/`` marker objects. The copy as a whole
    is not atomic: after an error some files may be copied, none partially; write a marker file
    last if readers need that. Existing files are overwritten (with ``skip_existing``: kept when
    their size matches), others are left alone.

    Raises:
        FileNotFoundError: nothing at ``src_uri``.
        OSError: a copy failed (naming the file).
    """
    files = list_files(src_uri)
    if not files:
        if not exists(src_uri):
            raise FileNotFoundError(errno.ENOENT, "copy: no such directory or prefix", os.fspath(src_uri))
        return
    root = filesystem(src_uri)[1]

    def copy_one(uri: str) -> None:
        fs, path = filesystem(uri)
        dst = join(dst_uri, path[len(root):])
        if skip_existing and exists(dst) and size(dst) == size(uri):
            return
        with errors("copy", uri), fs.open_input_stream(path) as src:
            write_bytes(dst, src.read() if is_s3(dst) else iter(lambda: src.read(1 << 20), b""))

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for _ in pool.map(copy_one, files):  # re-raises the first error
            pass


_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b")
_SECRET_FIELD = re.compile(
    r"""(?P<k>aws_secret_access_key|aws_session_token|aws_security_token|secret_access_key|secretaccesskey"""
    r"""|secret_key|session_token|sessiontoken|x-amz-security-token|x-amz-signature)"""
    r"""(?P<sep>["']?\s*[=:]\s*["']?)[^\s"'&,;]+""",
    re.IGNORECASE,
)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    """``text`` with anything that looks like AWS credentials replaced by ``[REDACTED]``.

    Removes access key ids (``AKIA...``/``ASIA...``), the values of ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN`` (and ``AWS_SECURITY_TOKEN``) from the environment wherever they occur
    (values of 8+ characters), and the values of ``aws_secret_access_key=...``-like fields
    (``=``/``:``, quoted or not; also session tokens and presigned-URL signatures). Use it before
    writing logs, manifests or error messages.
    """
    for name in _SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, REDACTED)
    text = _KEY_ID.sub(REDACTED, text)
    return _SECRET_FIELD.sub(lambda m: m["k"] + m["sep"] + REDACTED, text)
