"""srdistill.datasets and `srdistill data`: a loopback HTTP server serves zip/tar archives of
generated PNGs (Range support, an interruption mode, corrupted bytes); the sets are laid out as
DEST/NAME/HR/*.png and found by evaluation.resolve_dataset in the documented order."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from srdistill import datasets
from srdistill.cli import app
from srdistill.datasets import DatasetSpec, RemoteFile
from srdistill.sr.evaluation import resolve_dataset

# ------------------------------------------------------------------------------------------
# archives and the server


def _image(seed: int, h: int = 12, w: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


HR = {"a": _image(0), "b": _image(1), "c": _image(2, 20, 10)}


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # stored: large enough to interrupt
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _tar(entries: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


#: a zip with the HR folder under a top-level folder, one image stored as BMP (converted to PNG)
ZIP = _zip({"Tiny/Tiny_HR/a.png": _encode(HR["a"]), "Tiny/Tiny_HR/b.bmp": _encode(HR["b"], "BMP"),
            "Tiny/Tiny_HR/c.png": _encode(HR["c"]), "Tiny/readme.txt": b"hello"})  # fmt: skip
#: an EDSR-style benchmark tar: HR and LR folders of two sets
TAR = _tar({
    "bench/SetA/HR/a.png": _encode(HR["a"]), "bench/SetA/HR/b.png": _encode(HR["b"]),
    "bench/SetA/LR_bicubic/X2/ax2.png": _encode(HR["a"][::2, ::2]),
    "bench/SetB/HR/c.png": _encode(HR["c"]),
})  # fmt: skip


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """Loopback HTTP server of ``files`` (path -> bytes) honouring ``Range: bytes=N-``.

    ``drop_after``: send only that many body bytes then close the connection (an interruption);
    ``ignore_range``: answer 200 with the whole file to a Range request; ``override``: path ->
    bytes served instead (corruption). ``log``: ``(path, Range header, body bytes sent, status)``.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.override: dict[str, bytes] = {}
        self.drop_after: int | None = None
        self.ignore_range = False
        self.log: list[tuple[str, str | None, int, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                data = server.override.get(self.path, server.files.get(self.path))
                rng = self.headers.get("Range")
                if data is None:
                    self.send_error(404)
                    server.log.append((self.path, rng, 0, 404))
                    return
                start, status = 0, 200
                if rng and not server.ignore_range:
                    start, status = int(rng.removeprefix("bytes=").split("-")[0]), 206
                    if start >= len(data):  # nothing left to send
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        server.log.append((self.path, rng, 0, 416))
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.drop_after is not None:
                    body = body[: server.drop_after]
                    self.close_connection = True
                self.wfile.write(body)
                self.wfile.flush()
                server.log.append((self.path, rng, len(body), status))

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    s.files = {"/tiny.zip": ZIP, "/bench.tar.gz": TAR}
    yield s
    s.close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An isolated cache, no $SRDISTILL_DATA, no vendored data."""
    monkeypatch.setenv("SRDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SRDISTILL_DATA", raising=False)
    monkeypatch.setattr(datasets, "VENDORED", tmp_path / "no-vendored-data")
    return tmp_path


def _tiny(server, known_hash="zip-sha256") -> DatasetSpec:
    if known_hash == "zip-sha256":
        known_hash = f"sha256:{_sha256(ZIP)}"
    return DatasetSpec(name="Tiny", description="three images", archive="zip", hr_subdir="Tiny_HR",
                       files=(RemoteFile(server.url("/tiny.zip"), known_hash),), n_images=3,
                       licence="test", source="generated by the test")  # fmt: skip


def _bench(server, name: str, n: int) -> DatasetSpec:
    md5 = hashlib.md5(TAR).hexdigest()
    return DatasetSpec(name=name, description="", archive="tar", hr_subdir=f"bench/{name}/HR",
                       members=(f"bench/{name}/HR",), n_images=n, licence="test", source="test",
                       files=(RemoteFile(server.url("/bench.tar.gz"), f"md5:{md5}"),))  # fmt: skip


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _downloads(tmp_path: Path) -> list[str]:
    d = tmp_path / "cache" / "downloads"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# ------------------------------------------------------------------------------------------
# download and layout


def test_good_download_lays_out_hr_pngs_and_is_idempotent(server, env, tmp_path):
    lines: list[str] = []
    hr = datasets.get("Tiny", tmp_path / "data", spec=_tiny(server), progress=False, log=lines.append)
    assert hr == tmp_path / "data" / "Tiny" / "HR"
    assert sorted(p.name for p in hr.iterdir()) == ["a.png", "b.png", "c.png"]  # BMP converted
    for name, arr in HR.items():
        assert np.array_equal(_read(hr / f"{name}.png"), arr)
    record = json.loads((hr.parent / datasets.RECORD).read_text())
    assert record["files"][0]["sha256"] == _sha256(ZIP) and record["n_images"] == 3
    assert record["checksum"] == "sha256"
    assert not any("warning" in line for line in lines)
    assert _downloads(tmp_path) == []  # archive removed after extraction, no .part left
    assert not (tmp_path / "data" / ".Tiny.tmp").exists()
    # a second get does nothing and says so
    n_requests = len(server.log)
    lines.clear()
    assert datasets.get("Tiny", tmp_path / "data", spec=_tiny(server), progress=False, log=lines.append) == hr
    assert len(server.log) == n_requests
    assert any("already present" in line for line in lines)


def test_tar_with_lr_folders_keeps_only_hr_and_shares_the_archive(server, env, tmp_path):
    catalog = {"SetA": _bench(server, "SetA", 2), "SetB": _bench(server, "SetB", 1)}
    a, b = datasets.get_many(["SetA", "setb"], tmp_path / "d", catalog=catalog, progress=False, log=lambda s: None)
    assert sorted(p.name for p in a.iterdir()) == ["a.png", "b.png"]  # no LR_bicubic
    assert [p.name for p in a.parent.iterdir() if p.is_dir()] == ["HR"]
    assert sorted(p.name for p in b.iterdir()) == ["c.png"]
    assert np.array_equal(_read(b / "c.png"), HR["c"])
    assert len([r for r in server.log if r[0] == "/bench.tar.gz"]) == 1  # one download for both sets
    assert _downloads(tmp_path) == []  # removed after the last set that needs it


def test_interrupted_download_resumes_with_range(server, env, tmp_path):
    spec = _tiny(server)
    server.drop_after = 1000
    with pytest.raises(datasets.DownloadInterrupted, match="run the same command again"):
        datasets.get("Tiny", tmp_path / "d", spec=spec, progress=False, log=lambda s: None)
    part = tmp_path / "cache" / "downloads" / "tiny.zip.part"
    assert part.is_file() and part.stat().st_size == 1000
    assert not (tmp_path / "d" / "Tiny").exists()

    server.drop_after = None
    lines: list[str] = []
    hr = datasets.get("Tiny", tmp_path / "d", spec=spec, progress=False, log=lines.append)
    _, rng, sent, status = server.log[-1]
    assert (rng, status, sent) == ("bytes=1000-", 206, len(ZIP) - 1000)  # only the remainder
    assert any("resuming from 1000 bytes" in line for line in lines)
    assert json.loads((hr.parent / datasets.RECORD).read_text())["files"][0]["sha256"] == _sha256(ZIP)
    assert sorted(p.name for p in hr.iterdir()) == ["a.png", "b.png", "c.png"]
    assert not part.exists()


def test_resume_restarts_when_the_server_ignores_range(server, env, tmp_path):
    spec = _tiny(server)
    server.drop_after = 700
    with pytest.raises(datasets.DownloadInterrupted):
        datasets.get("Tiny", tmp_path / "d", spec=spec, progress=False, log=lambda s: None)
    server.drop_after, server.ignore_range = None, True
    hr = datasets.get("Tiny", tmp_path / "d", spec=spec, progress=False, log=lambda s: None)
    assert server.log[-1][1:] == ("bytes=700-", len(ZIP), 200)  # asked to resume, got it all
    assert all(np.array_equal(_read(hr / f"{k}.png"), v) for k, v in HR.items())


def test_complete_or_oversized_part_file(server, env, tmp_path):
    part = tmp_path / "cache" / "downloads" / "tiny.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(ZIP)  # every byte arrived before the process stopped
    hr = datasets.get("Tiny", tmp_path / "d", spec=_tiny(server), progress=False, log=lambda s: None)
    assert server.log[-1][1:] == (f"bytes={len(ZIP)}-", 0, 416) and len(list(hr.iterdir())) == 3
    part.write_bytes(ZIP + b"stale tail")  # not this file: start again
    datasets.get("Tiny2", tmp_path / "d", spec=replace(_tiny(server), name="Tiny2"), progress=False,
                 log=lambda s: None)  # fmt: skip
    assert [r[1:] for r in server.log[-2:]] == [(f"bytes={len(ZIP) + 10}-", 0, 416), (None, len(ZIP), 200)]
    assert len(list((tmp_path / "d" / "Tiny2" / "HR").iterdir())) == 3 and not part.exists()


def test_sharded_set_keeps_finished_archives_across_a_failure(server, env, tmp_path):
    shard2 = _zip({"Tiny/Tiny_HR/d.png": _encode(_image(3))})
    spec = replace(_tiny(server, None), n_images=4,
                   files=(RemoteFile(server.url("/tiny.zip")), RemoteFile(server.url("/shard2.zip"))))  # fmt: skip
    with pytest.raises(Exception, match="404"):  # the second shard is not there yet
        datasets.get("Tiny", tmp_path / "d", spec=spec, progress=False, log=lambda s: None)
    staging = tmp_path / "d" / ".Tiny.tmp"
    assert sorted(p.name for p in (staging / "HR").iterdir()) == ["a.png", "b.png", "c.png"]
    assert not (tmp_path / "d" / "Tiny").exists()
    server.files["/shard2.zip"] = shard2
    lines: list[str] = []
    hr = datasets.get("Tiny", tmp_path / "d", spec=spec, progress=False, log=lines.append)
    assert [r[0] for r in server.log] == ["/tiny.zip", "/shard2.zip", "/shard2.zip"]  # shard 1 not again
    assert any("1 of 2 archives already laid out" in line for line in lines)
    assert sorted(p.name for p in hr.iterdir()) == ["a.png", "b.png", "c.png", "d.png"]
    record = json.loads((hr.parent / datasets.RECORD).read_text())
    assert [f["sha256"] for f in record["files"]] == [_sha256(ZIP), _sha256(shard2)]
    assert not staging.exists() and not (hr.parent / "archives-done.json").exists()


def test_corrupted_archive_is_rejected_and_removed(server, env, tmp_path):
    bad = bytearray(ZIP)
    bad[len(bad) // 2] ^= 0xFF
    server.override["/tiny.zip"] = bytes(bad)
    spec = _tiny(server)
    with pytest.raises(datasets.ChecksumMismatch) as err:
        datasets.get("Tiny", tmp_path / "d", spec=spec, progress=False, log=lambda s: None)
    msg = str(err.value)
    assert "'Tiny'" in msg and server.url("/tiny.zip") in msg
    assert _sha256(ZIP) in msg and _sha256(bytes(bad)) in msg and "removed" in msg
    assert not (tmp_path / "d" / "Tiny").exists() and not (tmp_path / "d" / ".Tiny.tmp").exists()
    assert _downloads(tmp_path) == []  # no archive, no .part, no temporary file
    # the md5 form of a known hash is checked the same way
    md5_spec = replace(spec, files=(RemoteFile(spec.files[0].url, f"md5:{hashlib.md5(ZIP).hexdigest()}"),))
    with pytest.raises(datasets.ChecksumMismatch, match=hashlib.md5(bytes(bad)).hexdigest()):
        datasets.get("Tiny", tmp_path / "d", spec=md5_spec, progress=False, log=lambda s: None)


def test_unconfirmed_checksum_warns_and_records_sha256(server, env, tmp_path):
    lines: list[str] = []
    hr = datasets.get("Tiny", tmp_path / "d", spec=_tiny(server, None), progress=False, log=lines.append)
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1 and "checksum unconfirmed" in warning[0] and _sha256(ZIP) in warning[0]
    record = json.loads((hr.parent / datasets.RECORD).read_text())
    assert record["checksum"] == "unconfirmed"
    assert record["files"][0] == {"url": server.url("/tiny.zip"), "expected": None, "sha256": _sha256(ZIP),
                                  "bytes": len(ZIP)}  # fmt: skip


def test_unsafe_tar_member_is_refused(server, env, tmp_path):
    server.files["/evil.tar"] = _tar({"../escape.png": _encode(HR["a"])}, mode="w")
    spec = replace(_tiny(server, None), archive="tar", hr_subdir=".",
                   files=(RemoteFile(server.url("/evil.tar")),))  # fmt: skip
    with pytest.raises(datasets.DatasetError, match="unsafe archive member"):
        datasets.get("Tiny", tmp_path / "d", spec=spec, progress=False, log=lambda s: None)
    assert not (tmp_path / "d" / "escape.png").exists() and not (tmp_path / "escape.png").exists()


def test_http_error_and_unknown_name(server, env, tmp_path):
    import requests

    spec = replace(_tiny(server), files=(RemoteFile(server.url("/missing.zip")),))
    with pytest.raises(requests.HTTPError, match="404"):
        datasets.get("Tiny", tmp_path / "d", spec=spec, progress=False, log=lambda s: None)
    assert not (tmp_path / "d" / "Tiny").exists()
    with pytest.raises(datasets.UnknownDataset, match="unknown dataset 'Set6'.*Set5"):
        datasets.get("Set6", tmp_path / "d")


def test_licence_gated_set_refuses_with_instructions(env, tmp_path):
    spec = datasets.lookup("manga109")
    assert spec.name == "Manga109" and spec.checksum_status == "gated" and not spec.files
    with pytest.raises(datasets.LicenceRequired, match=r"manga109\.org/en/download\.html") as err:
        datasets.get("Manga109", tmp_path / "d")
    assert "Manga109/HR" in str(err.value)
    assert not (tmp_path / "d").exists() and not (tmp_path / "cache").exists()


def test_catalogue_entries_are_complete():
    assert {"Set5", "Set14", "B100", "Urban100", "T91", "BSD200", "DIV2K_train", "DIV2K_valid", "Flickr2K",
            "LSDIR", "Manga109"} <= set(datasets.CATALOG)  # fmt: skip
    assert datasets.lookup("BSD100").name == "B100"
    for spec in datasets.CATALOG.values():
        assert spec.description and spec.licence and spec.source, spec.name
        assert spec.gated or spec.files, spec.name
        for f in spec.files:
            assert f.url.startswith(("http://", "https://")) and f.name, f.url
            if f.known_hash is not None:
                alg, _, hexdigest = f.known_hash.partition(":")
                assert {"md5": 32, "sha256": 64}[alg] == len(hexdigest), f.known_hash
                int(hexdigest, 16)
        if spec.checksum_status == "unconfirmed":
            assert "checksum" in spec.source or spec.note, spec.name  # says why / what to do
    assert datasets.CATALOG["DIV2K_valid"].checksum_status == "sha256"
    assert datasets.CATALOG["Set5"].checksum_status == "md5"


# ------------------------------------------------------------------------------------------
# where datasets live


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SRDISTILL_CACHE", str(tmp_path / "c"))
    assert datasets.cache_root() == tmp_path / "c"
    monkeypatch.delenv("SRDISTILL_CACHE")
    assert datasets.cache_root() == Path.home() / ".cache" / "srdistill"
    from srdistill.run.rundir import local_mirror

    monkeypatch.setenv("SRDISTILL_CACHE", str(tmp_path / "c"))
    assert local_mirror("s3://bucket/run").parent == tmp_path / "c" / "runs"


def _make_set(root: Path, name: str) -> Path:
    hr = root / name / "HR"
    hr.mkdir(parents=True)
    (hr / "x.png").write_bytes(_encode(HR["a"]))
    return hr


def test_resolve_dataset_order(env, tmp_path, monkeypatch):
    env_a, env_b, vendored = tmp_path / "env-a", tmp_path / "env-b", tmp_path / "vendored"
    cache = tmp_path / "cache" / "datasets"
    vendored.mkdir()
    monkeypatch.setattr(datasets, "VENDORED", vendored)
    monkeypatch.setenv("SRDISTILL_DATA", f"{env_a}{os.pathsep}{os.pathsep}{env_b}")
    assert datasets.data_roots() == [env_a, env_b, cache, vendored]

    in_vendored = _make_set(vendored, "Dup")
    assert resolve_dataset("Dup") == in_vendored
    in_cache = _make_set(cache, "Dup")
    assert resolve_dataset("Dup") == in_cache  # the cache before the vendored data
    in_b = _make_set(env_b, "Dup")
    assert resolve_dataset("Dup") == in_b  # $SRDISTILL_DATA before the cache
    assert resolve_dataset("Dup") == datasets.locate("Dup")
    in_a = _make_set(env_a, "Dup")
    assert resolve_dataset("Dup") == in_a  # entries of $SRDISTILL_DATA in order

    monkeypatch.setattr(datasets, "VENDORED", tmp_path / "absent")
    assert datasets.data_roots() == [env_a, env_b, cache]  # a missing vendored data/ is skipped


def test_resolve_dataset_error_lists_places_and_hint(env, tmp_path, monkeypatch):
    monkeypatch.setenv("SRDISTILL_DATA", str(tmp_path / "mine"))
    with pytest.raises(FileNotFoundError) as err:
        resolve_dataset("Urban100")
    msg = str(err.value)
    assert str(tmp_path / "mine" / "Urban100" / "HR") in msg
    assert str(tmp_path / "cache" / "datasets" / "Urban100" / "HR") in msg
    assert msg.endswith("run: srdistill data get Urban100") and "shared" not in msg
    with pytest.raises(FileNotFoundError) as err:
        resolve_dataset("Urban999")
    assert "Urban999" in str(err.value) and "data get" not in str(err.value)


# ------------------------------------------------------------------------------------------
# the CLI


def test_cli_data_list(env, tmp_path, monkeypatch):
    hr = _make_set(tmp_path / "mine", "Set5")
    monkeypatch.setenv("SRDISTILL_DATA", str(tmp_path / "mine"))
    result = CliRunner().invoke(app, ["data", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["name", "images", "size", "licence", "checksum", "present"]
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    for name in datasets.CATALOG:
        assert name in rows
    assert rows["Set5"].endswith(str(hr)) and "md5" in rows["Set5"]
    assert rows["Urban100"].endswith("-")
    assert "gated" in rows["Manga109"] and "unconfirmed" in rows["T91"] and "3.5 GB" in rows["DIV2K_train"]


def test_cli_data_get(server, env, tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.CATALOG, "Tiny", _tiny(server))
    runner = CliRunner()
    result = runner.invoke(app, ["data", "get", "Tiny", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "3 images in" in result.output and "not searched by default" in result.output
    assert len(list((tmp_path / "d" / "Tiny" / "HR").glob("*.png"))) == 3
    result = runner.invoke(app, ["data", "get", "Tiny"])  # default: the cache, which eval searches
    assert result.exit_code == 0, result.output
    assert resolve_dataset("Tiny") == tmp_path / "cache" / "datasets" / "Tiny" / "HR"
    result = runner.invoke(app, ["data", "get", "Tiny"])
    assert result.exit_code == 0 and "already present" in result.output

    result = runner.invoke(app, ["data", "get", "Manga109"])
    assert result.exit_code == 2 and "manga109.org" in result.output
    server.override["/tiny.zip"] = b"not the archive"
    result = runner.invoke(app, ["data", "get", "Tiny", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "checksum mismatch" in result.output
    assert "error:" in result.output and len([x for x in result.output.splitlines() if "error" in x]) == 1
