"""Loopback HTTP servers for download tests: a Hugging Face Hub-compatible model server and a
plain static file server. Both are real ``http.server`` servers on 127.0.0.1 (an ephemeral
port) in a daemon thread, and count the requests they answer.

``HubServer`` serves folders as model repositories ``org/name`` with the endpoints
``huggingface_hub`` 2.x uses to download a snapshot (read from its ``_snapshot_download.py``,
``file_download.py`` and ``hf_api.py``):

* ``GET /api/models/{repo}[/revision/{rev}]``: model info, JSON with ``id``, ``sha`` (the
  commit) and ``siblings`` (``[{"rfilename": ...}]``);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...``: the file listing, JSON
  entries ``{"type": "file"|"directory", "path", "oid", "size", "lfs"?}`` in one page (no
  ``Link`` header); ``*.safetensors``/``*.bin``/``*.msgpack`` are "LFS" files (``lfs.oid`` is
  their sha256);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: the file, with ``X-Repo-Commit``, ``ETag``
  (the git blob sha1, or the sha256 of an LFS file) and ``Content-Length``; no Xet headers,
  so the client downloads over plain HTTP.

``rev`` is ``main`` or the commit sha. Errors follow the Hub: ``404`` with ``X-Error-Code``
``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_LFS = (".safetensors", ".bin", ".msgpack", ".h5", ".pt", ".pth")


class _Loopback:
    """A threaded HTTP server on 127.0.0.1 whose handler calls ``self.handle(request)``;
    ``requests`` counts ``(method, path)`` pairs (path without the query string)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _dispatch(self) -> None:
                path = urlsplit(self.path).path
                with owner._lock:
                    owner.requests[(self.command, path)] += 1
                status, headers, body = owner.handle(self.command, path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _dispatch

            def log_message(self, *args) -> None:  # quiet
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "_Loopback":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def total(self) -> int:
        """All requests answered so far."""
        with self._lock:
            return sum(self.requests.values())

    def count(self, method: str | None = None, contains: str = "") -> int:
        """Requests with this method (any if None) whose path contains ``contains``."""
        with self._lock:
            return sum(n for (m, p), n in self.requests.items()
                       if (method is None or m == method) and contains in p)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def handle(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients closing keep-alive sockets
            super().handle_error(request, client_address)


def _json(status: int, obj, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(obj).encode()


class HubServer(_Loopback):
    """A Hub-compatible server of model repositories (``add_repo``); see the module doc."""

    def __init__(self) -> None:
        super().__init__()
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}

    def add_repo(self, repo_id: str, folder: str | Path) -> str:
        """Serve every file under ``folder`` as repo ``repo_id`` (``org/name``); returns its
        commit sha (a hash of the contents)."""
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        digest = hashlib.sha1()
        for name, data in files.items():
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        commit = digest.hexdigest()
        self.repos[repo_id] = (commit, files)
        return commit

    def file_gets(self, repo_id: str) -> dict[str, int]:
        """How often each file of ``repo_id`` was downloaded (``GET .../resolve/...``)."""
        prefix = f"/{repo_id}/resolve/"
        with self._lock:
            out: dict[str, int] = {}
            for (m, p), n in self.requests.items():
                if m == "GET" and p.startswith(prefix):
                    name = p[len(prefix):].split("/", 1)[1]
                    out[name] = out.get(name, 0) + n
            return out

    @staticmethod
    def _entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(data),
                 "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if name.endswith(_LFS):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _repo(self, repo_id: str, rev: str):
        if repo_id not in self.repos:
            return None, _json(404, {"error": "Repository not found"}, **{"X-Error-Code": "RepoNotFound"})
        commit, files = self.repos[repo_id]
        if rev not in ("main", commit):
            return None, _json(404, {"error": f"Invalid rev id: {rev}"}, **{"X-Error-Code": "RevisionNotFound"})
        return (commit, files), None

    def handle(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        path = unquote(path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m and method == "GET":
            repo, err = self._repo(m.group(1), m.group(2) or "main")
            if err:
                return err
            commit, files = repo
            return _json(200, {"id": m.group(1), "modelId": m.group(1), "sha": commit, "private": False,
                               "siblings": [{"rfilename": f} for f in files]})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m and method == "GET":
            repo, err = self._repo(m.group(1), m.group(2))
            if err:
                return err
            _, files = repo
            sub = (m.group(3) or "").strip("/")
            names = [f for f in files if not sub or f.startswith(sub + "/")]
            dirs = sorted({"/".join(f.split("/")[:i]) for f in names for i in range(1, f.count("/") + 1)})
            dirs = [d for d in dirs if not sub or d.startswith(sub + "/")]
            entries = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                       for d in dirs] + [self._entry(f, files[f]) for f in names]
            return _json(200, entries)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo, err = self._repo(m.group(1), m.group(2))
            if err:
                return err
            commit, files = repo
            name = m.group(3)
            if name not in files:
                return _json(404, {"error": "Entry not found"},
                             **{"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            data = files[name]
            entry = self._entry(name, data)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            return 200, {"X-Repo-Commit": commit, "ETag": f'"{etag}"',
                         "Content-Type": "application/octet-stream"}, data
        return _json(404, {"error": f"no route {method} {path}"})


class FileServer(_Loopback):
    """Static files by path (``add``), e.g. released weights for ``--weights URL``."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}

    def add(self, path: str, data: bytes) -> str:
        """Serve ``data`` at ``path`` (leading ``/``); returns its URL."""
        self.files[path] = data
        return self.url + path

    def handle(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        if path not in self.files:
            return 404, {"Content-Type": "text/plain"}, b"not found"
        return 200, {"Content-Type": "application/octet-stream"}, self.files[path]
