"""srdistill.storage on local paths and on S3: a real moto server on loopback (``s3_server``) and
a fault-injecting proxy in front of it (``faulty_s3``, see ``tests/faulty_proxy.py``)."""

from __future__ import annotations

import os
import pickle
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from srdistill import storage


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> str:
    """A fresh, empty directory URI: local, or a unique prefix in the moto bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_server").uri(f"t-{uuid.uuid4().hex[:8]}")


def _s3_keys(s3, prefix: str) -> list[str]:
    """Keys under ``prefix`` and open multipart uploads, asked of moto with boto3 (not pyarrow)."""
    objs = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])
    return [o["Key"] for o in objs] + [u["Key"] for u in uploads]


def test_is_s3_and_join():
    assert storage.is_s3("s3://b/k") and storage.is_s3("S3://b") and not storage.is_s3("/tmp/s3://x")
    assert storage.join("s3://b/runs/", "/x/", "", "y.json") == "s3://b/runs/x/y.json"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("/data/in/", "a", "/b.png") == "/data/in/a/b.png"
    assert storage.join("rel", "a") == os.path.join("rel", "a")


def test_settings_from_env(monkeypatch):
    for v in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(v, raising=False)
    assert storage.S3Settings() == storage.S3Settings(endpoint_url=None, region=None, max_attempts=10)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://global:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    s = storage.S3Settings()
    assert (s.endpoint_url, s.region, s.max_attempts) == ("http://global:9000", "eu-west-1", 4)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:9000")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert storage.S3Settings().endpoint_url == "http://s3only:9000"
    assert storage.S3Settings().region == "us-west-2"
    with pytest.raises(ValueError):
        storage.S3Settings(max_attempts=0)
    with pytest.raises(ValueError, match="bucket"):
        storage.filesystem("s3://")


def test_filesystem(s3_server, tmp_path):
    key_id, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    fs, path = storage.filesystem(s3_server.uri("a/b.txt"))
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_server.bucket}/a/b.txt"
    assert storage.filesystem(s3_server.uri("x"))[0] is fs  # cached per settings
    lfs, lpath = storage.filesystem(tmp_path / "x")
    assert isinstance(lfs, pafs.LocalFileSystem) and lpath == str(tmp_path / "x")
    assert storage.filesystem(f"file://{tmp_path}/y")[1] == str(tmp_path / "y")
    # what Ray ships to workers: settings, never credentials
    blob = pickle.dumps(fs)
    assert secret.encode() not in blob and key_id.encode() not in blob


def test_round_trip(base):
    data = os.urandom(3000)
    storage.write_bytes(storage.join(base, "a.bin"), data)
    storage.write_text(storage.join(base, "notes.txt"), "héllo\n")
    storage.write_json(storage.join(base, "m.json"), {"k": [1, 2.5, None], "s": "ü"})
    table = pa.table({"id": pa.array(range(100), pa.int64()), "name": [f"p{i}" for i in range(100)]})
    storage.write_parquet(storage.join(base, "t.parquet"), table)

    assert storage.read_bytes(storage.join(base, "a.bin")) == data
    assert storage.read_text(storage.join(base, "notes.txt")) == "héllo\n"
    assert storage.read_json(storage.join(base, "m.json")) == {"k": [1, 2.5, None], "s": "ü"}
    assert storage.read_parquet(storage.join(base, "t.parquet")).equals(table)
    assert storage.read_parquet(storage.join(base, "t.parquet"), columns=["id"]).column_names == ["id"]
    storage.write_bytes(storage.join(base, "a.bin"), b"new")  # overwrite
    assert storage.read_bytes(storage.join(base, "a.bin")) == b"new"
    assert storage.size(storage.join(base, "a.bin")) == 3
    assert storage.size(storage.join(base, "notes.txt")) == len("héllo\n".encode())


def test_list_exists_size_delete(base):
    names = ["img/a.png", "img/sub/b.PNG", "img/sub/deep/c.jpg", "img/d.txt", "other/e.png"]
    for i, name in enumerate(names):
        storage.write_bytes(storage.join(base, name), b"x" * (i + 1))
    img = storage.join(base, "img")
    assert storage.list_files(img) == sorted(storage.join(img, n[4:]) for n in names[:4])
    assert storage.list_files(img, extensions=[".png", "JPG"]) == [
        storage.join(img, "a.png"), storage.join(img, "sub/b.PNG"), storage.join(img, "sub/deep/c.jpg")]  # fmt: skip
    assert storage.list_files(base, extensions=["png"])[-1] == storage.join(base, "other/e.png")
    assert storage.list_files(storage.join(img, "a.png")) == [storage.join(img, "a.png")]
    assert storage.list_files(storage.join(base, "nothing")) == []

    assert storage.exists(img) and storage.exists(storage.join(img, "sub/b.PNG"))
    assert not storage.exists(storage.join(base, "nothing")) and not storage.exists(storage.join(img, "a"))
    assert storage.size(img) == 1 + 2 + 3 + 4

    storage.delete(storage.join(img, "a.png"))
    assert not storage.exists(storage.join(img, "a.png")) and storage.exists(img)
    storage.delete(storage.join(img, "sub"))
    assert storage.list_files(base) == [storage.join(img, "d.txt"), storage.join(base, "other/e.png")]
    storage.delete(storage.join(base, "nothing"))  # no-op
    storage.delete(base)
    assert not storage.exists(base) and storage.list_files(base) == []


def test_copy_dir_both_ways(s3_server, tmp_path):
    src = tmp_path / "ckpt"
    files = {"model.safetensors": os.urandom(70_000), "meta/state.json": b'{"step": 3}', "meta/x/y.bin": b""}
    for name, data in files.items():
        storage.write_bytes(src / name, data)
    remote = s3_server.uri(f"ckpt-{uuid.uuid4().hex[:8]}")
    storage.copy_dir(src, remote)
    assert storage.list_files(remote) == sorted(storage.join(remote, n) for n in files)
    prefix = remote.split("/", 3)[3] + "/"
    assert sorted(_s3_keys(s3_server, prefix)) == sorted(prefix + n for n in files)  # no dir markers
    back = tmp_path / "back"
    storage.copy_dir(remote, back)
    assert {os.path.relpath(p, back): storage.read_bytes(p) for p in storage.list_files(back)} == files
    remote2 = remote + "-copy"
    storage.copy_dir(remote, remote2)  # S3 -> S3
    assert storage.read_bytes(storage.join(remote2, "meta/state.json")) == b'{"step": 3}'
    storage.copy_dir(storage.join(remote, "meta/state.json"), tmp_path / "one.json")  # a single file
    assert (tmp_path / "one.json").read_bytes() == b'{"step": 3}'
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.copy_dir(s3_server.uri("nope"), tmp_path / "x")


class Boom(RuntimeError):
    pass


def _chunks_then_boom():
    yield b"first chunk " * 1000
    yield b"second chunk"
    raise Boom("producer failed midway")


@pytest.mark.parametrize("existing", [None, b"old content"])
def test_failed_write_leaves_nothing(base, existing, request):
    uri = storage.join(base, "dir/obj.bin")
    if existing is not None:
        storage.write_bytes(uri, existing)
    with pytest.raises(Boom):
        storage.write_bytes(uri, _chunks_then_boom())
    with pytest.raises(TypeError):
        storage.write_json(storage.join(base, "dir/m.json"), {"ok": 1, "bad": object()})

    if existing is None:
        assert not storage.exists(uri)
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(uri)
    else:
        assert storage.read_bytes(uri) == existing
    assert not storage.exists(storage.join(base, "dir/m.json"))
    if storage.is_s3(base):  # no object and no pending multipart upload, asked of moto directly
        s3 = request.getfixturevalue("s3_server")
        prefix = base.split("/", 3)[3] + "/"
        assert _s3_keys(s3, prefix) == ([] if existing is None else [prefix + "dir/obj.bin"])
    else:  # no temp file left behind
        d = os.path.join(base, "dir")
        assert sorted(os.listdir(d)) == ([] if existing is None else ["obj.bin"])


def test_missing_raises_file_not_found(base):
    uri = storage.join(base, "no/such.parquet")
    for op in (storage.read_bytes, storage.read_json, storage.read_parquet, storage.size):
        with pytest.raises(FileNotFoundError, match="no/such.parquet") as ei:
            op(uri)
        assert ei.value.filename == uri


def test_missing_bucket(s3_server):
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-x/k"):
        storage.read_bytes("s3://no-such-bucket-x/k")


@pytest.mark.parametrize("mode", ["503", "reset", "drop"])
def test_retries_survive_transient_faults(faulty_s3, mode):
    uri = faulty_s3.uri(f"retry-{mode}/blob.bin")
    data = os.urandom(200_000)
    faulty_s3.proxy.fail_next(3, mode)
    storage.write_bytes(uri, data)
    assert len(faulty_s3.proxy.faults()) == 3
    faulty_s3.proxy.fail_next(3, mode)
    assert storage.read_bytes(uri) == data
    assert len(faulty_s3.proxy.faults()) == 3
    # independent check, straight from moto: the object is whole
    assert faulty_s3.client.get_object(Bucket=faulty_s3.bucket, Key=f"retry-{mode}/blob.bin")["Body"].read() == data


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_gives_up_after_max_attempts(faulty_s3, mode, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setattr(storage, "RETRIES", 1)  # one outer re-issue, without the real waits
    monkeypatch.setattr(storage, "RETRY_WAIT_S", 0.01)
    uri = faulty_s3.uri(f"giveup-{mode}/x.json")
    faulty_s3.proxy.fail_next(100, mode)
    with pytest.raises(OSError) as ei:
        storage.write_json(uri, {"a": 1})
    assert not isinstance(ei.value, FileNotFoundError)
    msg = str(ei.value)
    assert "S3 write failed" in msg and uri in msg
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in msg and os.environ["AWS_ACCESS_KEY_ID"] not in msg
    # AWS_MAX_ATTEMPTS = SDK attempts in all (not retries), each operation issued 1 + RETRIES times
    assert len(faulty_s3.proxy.faults()) == 2 * 2
    with pytest.raises(OSError, match="S3 read failed for " + uri):
        storage.read_json(uri)
    faulty_s3.proxy.fail_next(0, mode)
    assert not storage.exists(uri)


def test_read_once_makes_one_attempt(faulty_s3):
    """``read_once`` with ``max_attempts=1`` (the operator's manifest read) gives up at the first
    fault; ``read_bytes`` keeps retrying."""
    uri = faulty_s3.uri("once/manifest.json")
    storage.write_text(uri, "{}")
    one = storage.S3Settings(max_attempts=1)
    assert storage.read_once(uri, one) == b"{}"
    faulty_s3.proxy.fail_next(1, "503")
    with pytest.raises(OSError, match="S3 read failed for " + uri):
        storage.read_once(uri, one)
    assert len(faulty_s3.proxy.faults()) == 1
    faulty_s3.proxy.fail_next(1, "503")
    assert storage.read_bytes(uri) == b"{}"
    assert len(faulty_s3.proxy.faults()) == 1


FAKE_KEY_ID = "AKIAIOSFODNN7EXAMPLE"  # AWS's documentation examples
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEFakeSessionToken123")
    text = (
        f"key={FAKE_KEY_ID} temp ASIAY34FZKBOKMUTVV7A secret {FAKE_SECRET} "
        "token FwoGZXIvYXdzEFakeSessionToken123\n"
        "aws_secret_access_key = abcdEFGH1234/other+secret; AWS_SESSION_TOKEN: 'tok123456789'\n"
        '{"SecretAccessKey": "jsonsecret987654"} url?X-Amz-Signature=deadbeef00&x=1'
    )
    out = storage.redact(text)
    for leaked in (FAKE_KEY_ID, "ASIAY34FZKBOKMUTVV7A", FAKE_SECRET, "FwoGZXIvYXdzEFakeSessionToken123",
                   "abcdEFGH1234", "tok123456789", "jsonsecret987654", "deadbeef00"):  # fmt: skip
        assert leaked not in out
    assert "aws_secret_access_key = [REDACTED]" in out and "&x=1" in out
    assert storage.redact("s3://bucket/AKIA-not-a-key/AKIAshort") == "s3://bucket/AKIA-not-a-key/AKIAshort"
