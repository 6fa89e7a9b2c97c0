"""Operator latency (issue 20): seconds from creating an SRDistillation to its first status, and
from deleting it to its release, with S3 answering (moto on loopback) and with an S3 endpoint
that accepts connections but never answers; this operator side by side with an older one.

    python bench/bench_operator.py --repeats 5 --old 9803845

Each operator runs as ``kopf run`` (in a subprocess, interval ``--interval`` s, one namespace)
against kmock's Kubernetes API emulator, the one ``tests/app/test_operator.py`` uses; ``--old REV``
runs ``operators/srdistill_operator.py`` of that commit with ``--standalone`` (it knows no
peering), with this checkout's ``srdistill`` package. Per repeat: create a resource, wait for
its first ``.status.phase``, wait a random fraction of an interval (so that deletes land at
arbitrary moments of the passes), delete it, wait until it is gone. Waits are capped
(``--cap`` s); a capped figure is shown as ``>cap``. Prints a markdown table (median and max).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import test_operator as emu  # noqa: E402  (the emulator, the hanging endpoint, the helpers)


def _operator(variant: str, cluster, namespace: str, folder: Path, old: str | None, **env) -> emu.Operator:
    op = emu.Operator(cluster, namespace, folder / f"{variant}-{namespace}.log", **env)
    if variant == "old":
        path = folder / "old_operator.py"
        path.write_text(subprocess.run(["git", "show", f"{old}:operators/srdistill_operator.py"], cwd=REPO,
                                       capture_output=True, text=True, check=True).stdout)  # fmt: skip
        op.args = [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", namespace, str(path)]
    return op.start()


def _timed(fn, cap: float) -> float:
    """Seconds until ``fn()`` is truthy (polled every 50 ms), or ``inf`` past ``cap``."""
    start = time.monotonic()
    while time.monotonic() - start < cap:
        if fn():
            return time.monotonic() - start
        time.sleep(0.05)
    return float("inf")


def run(variant: str, s3: str, args, cluster, moto_url: str, hanging, folder: Path) -> dict[str, list[float]]:
    namespace = f"{variant}-{s3}-{random.randrange(10**6)}"
    api = (emu._client(cluster), namespace)
    emu._peering(cluster, namespace)
    op = _operator(variant, cluster, namespace, folder, args.old, SRDISTILL_OPERATOR_INTERVAL=str(args.interval),
                   AWS_ENDPOINT_URL=moto_url if s3 == "moto" else hanging.url)  # fmt: skip
    out: dict[str, list[float]] = {"first status": [], "delete": []}
    spec = {"input": "s3://bench/corpus/", "preset": "tiny", "allowRandomInit": True}
    try:
        for i in range(args.repeats):
            name = f"r{i}"
            emu._create(api, name, {**spec, "output": f"s3://bench/runs/{namespace}-{i}"})
            out["first status"].append(_timed(lambda name=name: emu._status(api, name).get("phase"), args.cap))
            time.sleep(random.uniform(0, args.interval))
            api[0].delete_namespaced_custom_object(emu.k8s.GROUP, emu.k8s.VERSION, namespace, emu.k8s.PLURAL, name)
            out["delete"].append(_timed(lambda name=name: emu._get(api, name) is None, args.cap))
            if out["delete"][-1] == float("inf"):
                break  # the operator is stuck: the next resource would wait behind it
    finally:
        op.stop()
    return out


def _fmt(values: list[float], cap: float) -> str:
    def show(v: float) -> str:
        return f">{cap:.0f}" if v == float("inf") else f"{v:.1f}"

    return f"{show(statistics.median(values))} / {show(max(values))} (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1.0, help="SRDISTILL_OPERATOR_INTERVAL of both")
    parser.add_argument("--cap", type=float, default=90.0, help="seconds before a wait gives up")
    parser.add_argument("--old", default=None, help="a commit whose operator to run beside this one")
    args = parser.parse_args()

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    for var, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
        os.environ[var] = value
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    moto_url = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket="bench")
    hanging = emu.HangingEndpoint()
    variants = ["new"] + ["old"] * bool(args.old)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, emu._serve(Path(tmp)) as cluster:
        for s3 in ("moto", "hanging"):
            for variant in variants:
                got = run(variant, s3, args, cluster, moto_url, hanging, Path(tmp))
                rows.append((s3, variant, _fmt(got["first status"], args.cap), _fmt(got["delete"], args.cap)))
                print(rows[-1], flush=True)
    hanging.close()
    moto.stop()
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, interval {args.interval} s, cap {args.cap:.0f} s, "
          f"old = {args.old or '-'}\n")  # fmt: skip
    print("| S3 | operator | first status: median / max s | delete: median / max s |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
