"""Shared fixtures: the data folders, one local Ray for the whole session, and S3 (a local moto
server, plus a fault-injecting proxy in front of it)."""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
VENDORED = REPO / "data"
T91 = VENDORED / "T91" / "HR"  # vendored: always present

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Set by .ci/run: a test that would skip for missing data fails instead, so CI runs every test.
REQUIRE_DATA = os.environ.get("SRDISTILL_TESTS_REQUIRE_DATA") == "1"


def missing(what: str, fix: str) -> None:
    """Skip the calling test for absent data (fail under ``SRDISTILL_TESTS_REQUIRE_DATA=1``)."""
    message = f"{what} absent: {fix}"
    if REQUIRE_DATA:
        pytest.fail(f"{message} (SRDISTILL_TESTS_REQUIRE_DATA=1: every test must run)")
    pytest.skip(message)


def data_path(relative: str) -> Path:
    """``<root>/<relative>`` for the first data root holding it (``srdistill.datasets.data_roots``:
    ``$SRDISTILL_DATA``, the user cache, the vendored ``data/``), or a skip naming the set."""
    from srdistill.datasets import CATALOG, data_roots

    for root in data_roots():
        if (root / relative).exists():
            return root / relative
    name = relative.split("/")[0]
    how = f"`srdistill data get {name}`, or " if name in CATALOG and "/HR" in relative else ""
    missing(f"{relative}", f"{how}set SRDISTILL_DATA to a folder that holds it")


def need_dataset(name: str) -> Path:
    """The HR folder of benchmark ``name`` as the product finds it, or a skip naming the set."""
    return data_path(f"{name}/HR")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a loaded 2-core machine
    (OpenMP threads spin against other processes)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, started once and shared by the pipeline tests."""
    from srdistill.config import RayConfig
    from srdistill.run import runner

    runner.init_ray(RayConfig(num_cpus=2))
    yield
    runner.shutdown_ray()


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory) -> Path:
    """A tiny random-init DiT in the layout of ``facebook/DiT-XL-2-512`` (``transformer/``,
    ``vae/``, ``scheduler/``): 2 blocks of width 16 on 8x8x4 latents of a 2-level VAE, so
    ``finetune.resolution`` 16. Built offline in well under a second."""
    import torch
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    root = tmp_path_factory.mktemp("tiny_dit")
    torch.manual_seed(0)
    DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).save_pretrained(root / "transformer")  # fmt: skip
    tiny_vae(root / "vae", seed=None)
    DDIMScheduler(beta_schedule="linear").save_pretrained(root / "scheduler")
    return root


def tiny_vae(path: Path, seed: int | None, latent_channels: int = 4) -> Path:
    """Save a tiny random-init ``AutoencoderKL`` of ``tiny_dit_dir``'s VAE architecture (2
    levels, 16x16 pixels <-> 8x8 latents) to ``path``; ``seed`` (None: the global RNG as it is)
    gives it its own weights, e.g. a decoder VAE other than the training one."""
    import torch
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(path)  # fmt: skip
    return path


# --- S3: a real moto server on loopback, and a fault-injecting proxy in front of it ---------------

#: Fake credentials in the shape of real ones (AWS's documentation examples), so that the
#: redaction of key ids and secrets is exercised too. They open nothing but the local moto.
FAKE_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@dataclass(frozen=True)
class S3Endpoint:
    """A bucket reachable at ``endpoint`` (``AWS_ENDPOINT_URL`` points there while in use)."""

    endpoint: str
    bucket: str
    client: Any  # a boto3 S3 client talking to moto directly (not through any proxy)
    proxy: Any = None  # the FaultyProxy of ``faulty_s3``

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 in server mode on 127.0.0.1 (a free port), with fake credentials, region and
    ``AWS_ENDPOINT_URL`` set in the environment for the session (restored at its end; the
    user's ``~/.aws`` files and profile are masked), and one bucket created with boto3."""
    pytest.importorskip("moto.server", reason="S3 tests need the dev extra (moto[server])")
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    nowhere = str(tmp_path_factory.mktemp("aws") / "absent")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                    "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS",
                    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):  # fmt: skip
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        mp.setenv("AWS_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", nowhere)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="srdistill-test")
        yield S3Endpoint(endpoint=endpoint, bucket="srdistill-test", client=client)
    server.stop()


@pytest.fixture
def faulty_s3(s3_server, monkeypatch):
    """The moto bucket behind a ``FaultyProxy`` (``tests/faulty_proxy.py``): ``AWS_ENDPOINT_URL``
    points at the proxy for the test; ``.proxy.fail_next(n, "503" | "reset" | "drop")`` arms faults."""
    from faulty_proxy import FaultyProxy

    host, port = s3_server.endpoint.rsplit("//", 1)[1].split(":")
    with FaultyProxy((host, int(port))) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield S3Endpoint(endpoint=proxy.endpoint, bucket=s3_server.bucket, client=s3_server.client, proxy=proxy)


# --- Ray clusters started by tests with the `ray` CLI -------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_ray_processes(sessions: set[int], temp_dir: Path) -> None:
    """SIGKILL the processes of ``sessions`` and those whose command line names ``temp_dir``."""
    import psutil

    mine = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(proc.pid) in sessions or str(temp_dir) in " ".join(proc.info["cmdline"] or ()):
                mine.add(proc)
                mine.update(proc.children(recursive=True))
        except (psutil.Error, OSError):
            pass
    for proc in mine:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(list(mine), timeout=10)


def ray_pids(title: bytes) -> list[int]:
    """Processes whose title (``/proc/PID/cmdline``) starts with ``title``: Ray names a worker
    ``ray::<task or actor>`` while it runs one (e.g. ``b"ray::MapBatches"``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(title):
                pids.append(int(proc.name))
    return pids


def copy_t91(root: Path, n: int) -> Path:
    """The first ``n`` vendored T91 images copied into folder ``root`` (a small real corpus)."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    for f in sorted(T91.glob("*.png"))[:n]:
        shutil.copy(f, root / f.name)
    return root


def encoded_set(tmp_path: Path, vae=None, resolution: int = 16, n: int = 6, size: int = 24, k: int = 3):
    """``n`` random ``size``x``size`` patches in ``k`` clusters, encoded (``vae`` latents, or
    pixels without one) and written as ``tmp_path/enc/part-0.parquet``: a ``diffusion.EncodedSet``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from srdistill.distill import diffusion as D

    rng = np.random.default_rng(0)
    patches = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    samples = D.encode_patches(vae, resolution, patches)
    table = pa.table({"patch_id": [f"p{i}" for i in range(n)],
                      "cluster": pa.array([i % k for i in range(n)], pa.int32()),
                      "sample": [s.tobytes() for s in samples]})  # fmt: skip
    (tmp_path / "enc").mkdir(exist_ok=True)
    pq.write_table(table, tmp_path / "enc" / "part-0.parquet")
    return D.load_encoded(tmp_path / "enc", shape=samples.shape[1:], dtype=samples.dtype.name)
