"""Storage benchmark: mining and embedding from S3 vs local disk, and memory over large manifests.

    python bench/bench_storage.py --images 120 --repeats 2 --sizes 10000 100000 1000000
    python bench/bench_storage.py --part memory --sizes 100000 --images-per-shard 100
    python bench/bench_storage.py --part plan --sizes 1000000

Part ``memory`` (run first, before any S3 server exists in this process): a synthetic manifest
(parquet, one ``uri`` column) of N URIs for each of ``--sizes``, cycling over ``--tiles``
distinct small PNGs (48x48 random crops of T91) on local disk, so URI i names tile
``i % tiles``: the images repeat, which changes nothing for memory (every URI is fetched,
decoded and scored like a distinct image). For each N, on a freshly started local Ray (its
workers warmed up by an untimed mining of a few tiles): ``corpus.plan_corpus`` ->
``runner.mine_plan`` (``images_per_shard`` 1000) -> ``mining.summarize_parts``, with a
thread sampling every 0.2 s the RSS of the driver, of each Ray worker process (``ray::*``)
and of Ray's own daemons (raylet, GCS, agents). The kernel's own peaks (``VmHWM``) are read
too: the driver's is reset before each N (``/proc/self/clear_refs``); the workers' are fresh,
since Ray is restarted per N.

Part ``throughput``: a corpus of real images (T91, then BSD200, ``--images`` in all) copied
to a local temp dir and uploaded to moto's S3 server running in this process on 127.0.0.1
(fake credentials; ``AWS_ENDPOINT_URL`` is set before Ray starts so the workers reach it).
Upload time is not counted. First, one process reads the corpus object by object
(``storage.read_bytes``, no Ray) from each source. Then, on one local Ray, warmed by an
untimed mining pass per source, it times for each source (disk, s3) in ABBA order, with the
run outputs on the same kind of storage as the input (a fresh run dir / prefix each time):
``--mine-repeats`` runs of plan (listing) + mining (``runner.mine_plan`` over all shards +
``mining.summarize_parts`` + ``keep.json``), then ``--repeats`` full runs adding embedding
(``runner.embed_parts_ray``; random-init CLIP ViT-B/32 unless weights are in the HF cache),
with the demo preset's mine and embed settings. Each stage starts once every Ray CPU is free.

Part ``plan`` (only with ``--part plan``): ``corpus.plan_corpus`` alone over the same kind of
manifest, no Ray: seconds, plan size, and the driver's RSS before and its ``VmHWM`` (give
one size per process, so that memory freed by a smaller N cannot hide a larger N's peak).

Prints markdown tables (medians) and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from srdistill import storage
from srdistill.config import MineConfig, RayConfig, load_config
from srdistill.corpus import plan_corpus
from srdistill.distill.mining import summarize_parts
from srdistill.run import runner
from srdistill.sr.evaluation import resolve_dataset
from srdistill.sr.imaging import read_image, write_png

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MiB = 1 << 20


# --------------------------------------------------------------------------- memory sampling


def _hwm_bytes(pid: int) -> int:
    """The kernel's peak RSS (``VmHWM``) of process ``pid``, 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_own_hwm() -> bool:
    """Reset this process' ``VmHWM`` to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Background thread: every ``interval`` s, the RSS of this process and of every process
    below it (Ray's daemons, and the workers below the raylet), keeping peaks per phase.

    A process counts as a Ray worker when its command line starts with ``ray::`` (Ray sets
    ``ray::IDLE``, ``ray::MapBatches(...)``, ``ray::_StatsActor``, ...) or runs
    ``default_worker.py``; any other descendant (raylet, gcs_server, agents, log monitor) is a
    Ray daemon. A worker that ever ran a ``MapBatches`` task is a *task worker* (the miners);
    the others are idle workers and Ray Data's helper actors.
    """

    KEYS = ("driver", "worker_max", "worker_sum", "daemons_sum")

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.me = psutil.Process()
        self.phase = "start"
        self.peak: dict[str, dict[str, int]] = {}
        self.worker_hwm: dict[int, int] = {}
        self.task_workers: set[int] = set()
        self.samples = 0
        self.first: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def _kind(self, p: psutil.Process) -> str:
        cmd = p.cmdline()
        head = cmd[0] if cmd else ""
        if head.startswith("ray::") or any("default_worker.py" in c for c in cmd):
            if "MapBatches" in head:
                self.task_workers.add(p.pid)
            return "worker"
        return "daemon"

    def sample(self) -> None:
        driver = self.me.memory_info().rss
        workers, daemons = [], 0
        for p in self.me.children(recursive=True):
            try:
                kind = self._kind(p)
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if kind == "worker":
                workers.append(rss)
                self.worker_hwm[p.pid] = max(self.worker_hwm.get(p.pid, 0), _hwm_bytes(p.pid))
            else:
                daemons += rss
        now = {"driver": driver, "worker_max": max(workers, default=0), "worker_sum": sum(workers),
               "daemons_sum": daemons}  # fmt: skip
        with self._lock:
            for phase in (self.phase, "all"):
                pk = self.peak.setdefault(phase, dict.fromkeys(self.KEYS, 0))
                for k in self.KEYS:
                    pk[k] = max(pk[k], now[k])
            if not self.samples:
                self.first = now
            self.samples += 1

    def set_phase(self, name: str) -> None:
        self.sample()  # the end of the previous phase
        with self._lock:
            self.phase = name
        self.sample()

    def hwm(self, task_workers: bool) -> int:
        """The largest kernel peak RSS of the task workers (or of the other workers)."""
        return max((v for pid, v in self.worker_hwm.items() if (pid in self.task_workers) == task_workers), default=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # a last look, before Ray is shut down


# --------------------------------------------------------------------------- part: memory


def make_tiles(n: int, side: int, out_dir: Path, seed: int = 0) -> list[str]:
    """``n`` distinct ``side`` x ``side`` PNGs: random crops of T91's images."""
    vendored = Path(__file__).resolve().parents[1] / "data" / "T91" / "HR"
    sources = sorted(resolve_dataset("T91").glob("*.png")) or sorted(vendored.glob("*.png"))
    images = [read_image(str(p)) for p in sources]
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = images[i % len(images)]
        y = int(rng.integers(0, img.shape[0] - side + 1))
        x = int(rng.integers(0, img.shape[1] - side + 1))
        path = out_dir / f"tile_{i:05d}.png"
        write_png(path, img[y : y + side, x : x + side])
        paths.append(str(path))
    return paths


def write_manifest(path: Path, n: int, tiles: list[str], chunk: int = 65_536) -> None:
    """A parquet manifest of ``n`` URIs, entry i = ``tiles[i % len(tiles)]``, written in
    chunks (the driver never holds it whole)."""
    schema = pa.schema([("uri", pa.string())])
    pool = np.asarray(tiles, dtype=object)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, chunk):
            idx = np.arange(start, min(n, start + chunk)) % len(pool)
            writer.write_table(pa.table({"uri": pa.array(pool[idx].tolist(), pa.string())}, schema=schema))


def memory_part(args, work: Path) -> list[dict]:
    tiles = make_tiles(args.tiles, args.tile_side, work / "tiles")
    cfg = MineConfig(patch_size=args.tile_patch, stride=args.tile_stride, images_per_shard=args.images_per_shard)
    rows = []
    for n in args.sizes:
        manifest = work / f"manifest_{n}.parquet"
        write_manifest(manifest, n, tiles)
        run = work / f"mem_{n}"
        runner.init_ray(RayConfig(num_cpus=args.cpus))  # a fresh Ray (and fresh workers) per N
        warm = work / "warmup"  # untimed: start the workers and their imports
        write_manifest(work / "warmup.parquet", 4 * args.cpus, tiles)
        plan_corpus(str(work / "warmup.parquet"), str(warm / "plan.parquet"), extensions=cfg.extensions, images_per_shard=2)
        runner.mine_plan(str(warm / "plan.parquet"), str(warm / "patches"), cfg, list(range(2 * args.cpus)))
        shutil.rmtree(warm)
        time.sleep(1.0)
        driver_base = psutil.Process().memory_info().rss
        hwm_reset = reset_own_hwm()
        with RssSampler(args.interval) as sampler:
            sampler.set_phase("plan")
            t0 = time.perf_counter()
            plan = plan_corpus(str(manifest), str(run / "plan" / "files.parquet"),
                               extensions=cfg.extensions, images_per_shard=cfg.images_per_shard)  # fmt: skip
            t_plan = time.perf_counter() - t0
            sampler.set_phase("mine")
            t0 = time.perf_counter()
            runner.mine_plan(str(run / "plan" / "files.parquet"), str(run / "mine" / "patches"), cfg,
                             list(range(plan.shards)))  # fmt: skip
            t_mine = time.perf_counter() - t0
            sampler.set_phase("summarize")
            driver_after_mine = psutil.Process().memory_info().rss
            t0 = time.perf_counter()
            rule, counts = summarize_parts(str(run / "mine" / "patches"), cfg, str(run / "mine" / "skipped.parquet"))
            t_sum = time.perf_counter() - t0
        driver_hwm = _hwm_bytes(os.getpid()) if hwm_reset else 0
        runner.shutdown_ray()
        pk = sampler.peak
        row = {
            "n": n, "shards": plan.shards, "plan_s": t_plan, "plan_bytes": (run / "plan" / "files.parquet").stat().st_size,
            "manifest_bytes": manifest.stat().st_size, "mine_s": t_mine, "summarize_s": t_sum,
            "images_per_s": n / (t_mine + t_sum), "patches": counts["patches"], "skipped": counts["images_skipped"],
            "driver_base": driver_base, "driver_peak": pk["all"]["driver"], "driver_hwm": driver_hwm,
            "driver_peak_by_phase": {ph: pk[ph]["driver"] for ph in ("plan", "mine", "summarize")},
            "driver_after_mine": driver_after_mine,
            "worker_max": pk["all"]["worker_max"], "worker_sum": pk["all"]["worker_sum"],
            "task_worker_hwm_max": sampler.hwm(True), "other_worker_hwm_max": sampler.hwm(False),
            "task_workers": len(sampler.task_workers), "workers": len(sampler.worker_hwm),
            "daemons_sum": pk["all"]["daemons_sum"], "samples": sampler.samples,
            "worker_sum_start": sampler.first.get("worker_sum", 0),
        }  # fmt: skip
        rows.append(row)
        print(f"[memory] N={n}: {json.dumps(row)}", flush=True)
        shutil.rmtree(run, ignore_errors=True)
        manifest.unlink()
    return rows


def plan_only_part(args, work: Path) -> list[dict]:
    """``plan_corpus`` alone (no Ray) over the same synthetic manifests: seconds, plan size,
    and the driver's peak RSS over its RSS before (``VmHWM`` reset first)."""
    tiles = [str(work / "tiles" / f"tile_{i:05d}.png") for i in range(args.tiles)]  # never opened
    rows = []
    for n in args.sizes:
        manifest = work / f"manifest_{n}.parquet"
        write_manifest(manifest, n, tiles)
        base = psutil.Process().memory_info().rss
        hwm_reset = reset_own_hwm()
        t0 = time.perf_counter()
        plan = plan_corpus(str(manifest), str(work / "plan.parquet"), extensions=MineConfig().extensions,
                           images_per_shard=args.images_per_shard)  # fmt: skip
        row = {"n": n, "shards": plan.shards, "plan_s": time.perf_counter() - t0, "driver_base": base,
               "driver_hwm": _hwm_bytes(os.getpid()) if hwm_reset else 0,
               "plan_bytes": (work / "plan.parquet").stat().st_size}  # fmt: skip
        rows.append(row)
        print(f"[plan] N={n}: {json.dumps(row)}", flush=True)
        manifest.unlink()
    return rows


# --------------------------------------------------------------------------- part: throughput


def start_s3(work: Path, bucket: str):
    """moto's S3 server on 127.0.0.1 (free port) in this process, the environment pointed at it
    with fake credentials (the user's AWS profile files masked), and ``bucket`` created."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3",
                "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):  # fmt: skip
        os.environ.pop(var, None)
    nowhere = str(work / "no-aws-config")
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",  # fake, AWS's documentation example
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere,
        "AWS_ENDPOINT_URL": endpoint,
    })  # fmt: skip
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return server, endpoint


def make_corpus(n: int, out_dir: Path) -> list[Path]:
    """The first ``n`` images of T91 then BSD200 (sorted by name), copied to ``out_dir``."""
    files = [p for d in ("T91", "BSD200") for p in sorted(resolve_dataset(d).glob("*.png"))][:n]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for p in files:
        dst = out_dir / f"{p.parent.parent.name}_{p.name}"
        shutil.copyfile(p, dst)
        out.append(dst)
    return out


def wait_for_free_cpus(timeout: float = 60.0) -> None:
    """Wait until every CPU of the local Ray is free (the embedding actor of the previous arm
    may still be going away), so that no arm starts with fewer CPUs than the other."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    t0 = time.perf_counter()
    while ray.available_resources().get("CPU", 0) < total and time.perf_counter() - t0 < timeout:
        time.sleep(0.2)
    time.sleep(1.0)  # and its process a moment to exit


def run_once(input_uri: str, run_uri: str, mine_cfg: MineConfig, embed_cfg, source, embed: bool = True) -> dict:
    """plan -> mine (+ summarize, keep.json) -> embed, as ``pipeline._plan/_mine/_embed`` do,
    with every output under ``run_uri``. Returns seconds per stage and the counts."""
    at = lambda *parts: storage.join(run_uri, *parts)  # noqa: E731
    wait_for_free_cpus()
    t0 = time.perf_counter()
    plan = plan_corpus(input_uri, at("plan", "files.parquet"), extensions=mine_cfg.extensions,
                       images_per_shard=mine_cfg.images_per_shard)  # fmt: skip
    t_plan = time.perf_counter() - t0
    shards = list(range(plan.shards))
    t0 = time.perf_counter()
    runner.mine_plan(at("plan", "files.parquet"), at("mine", "patches"), mine_cfg, shards)
    rule, counts = summarize_parts(at("mine", "patches"), mine_cfg, at("mine", "skipped.parquet"))
    storage.write_json(at("mine", "keep.json"), rule)
    t_mine = time.perf_counter() - t0
    out = {"plan_s": t_plan, "mine_s": t_mine, "images": plan.images, "shards": plan.shards, **counts}
    if embed:
        wait_for_free_cpus()
        t0 = time.perf_counter()
        runner.embed_parts_ray(at("mine"), at("embed", "parts"), shards, embed_cfg, source)
        out["embed_s"] = time.perf_counter() - t0
        out["embedded"] = storage.read_dataset(at("embed", "parts"), columns=["patch_id"]).num_rows
    return out


def read_pass(uris: list[str]) -> tuple[float, list[float]]:
    """``storage.read_bytes`` of every URI in turn: (total seconds, seconds per read)."""
    each = []
    t_all = time.perf_counter()
    for u in uris:
        t0 = time.perf_counter()
        storage.read_bytes(u)
        each.append(time.perf_counter() - t0)
    return time.perf_counter() - t_all, each


def throughput_part(args, work: Path) -> dict:
    from srdistill.distill.embedding import resolve_clip

    bucket = "srdistill-bench"
    server, endpoint = start_s3(work, bucket)
    try:
        files = make_corpus(args.images, work / "corpus")
        megapixels = sum(int(np.prod(read_image(str(p)).shape[:2])) for p in files) / 1e6
        nbytes = sum(p.stat().st_size for p in files)
        t0 = time.perf_counter()
        storage.copy_dir(str(work / "corpus"), f"s3://{bucket}/corpus")
        upload_s = time.perf_counter() - t0
        inputs = {"disk": str(work / "corpus"), "s3": f"s3://{bucket}/corpus"}
        reads: dict[str, list] = {"disk": [], "s3": []}
        for _ in range(3):  # one process reading the corpus object by object, no Ray
            for name in ("disk", "s3"):
                reads[name].append(read_pass(storage.list_files(inputs[name])))
        demo = load_config("demo", overrides=["embed.allow_random_init=true"])
        mine_cfg, embed_cfg = demo.mine, demo.embed
        source = resolve_clip(embed_cfg)
        runs = {"disk": str(work / "runs"), "s3": f"s3://{bucket}/runs"}
        runner.init_ray(RayConfig(num_cpus=args.cpus))  # after the S3 environment: workers inherit it
        for name in ("disk", "s3"):  # untimed warm-up: worker start-up and imports
            run_once(inputs[name], storage.join(runs[name], "warmup"), mine_cfg, embed_cfg, source, embed=False)
        results: dict[str, list[dict]] = {"disk": [], "s3": []}
        mine_only: dict[str, list[dict]] = {"disk": [], "s3": []}
        for r in range(args.mine_repeats):  # plan + mine only: short, so repeated more
            for name in (("disk", "s3") if r % 2 == 0 else ("s3", "disk")):
                res = run_once(inputs[name], storage.join(runs[name], f"m{r}"), mine_cfg, embed_cfg, source, embed=False)
                mine_only[name].append(res)
                print(f"[throughput] mine-only repeat {r} {name}: {json.dumps(res)}", flush=True)
        for r in range(args.repeats):
            for name in (("disk", "s3") if r % 2 == 0 else ("s3", "disk")):
                res = run_once(inputs[name], storage.join(runs[name], f"r{r}"), mine_cfg, embed_cfg, source)
                results[name].append(res)
                print(f"[throughput] repeat {r} {name}: {json.dumps(res)}", flush=True)
        runner.shutdown_ray()
    finally:
        server.stop()
    read_stats = {
        name: {"mb_per_s": nbytes / 1e6 / statistics.median(t for t, _ in passes),
               "ms_per_object": 1e3 * statistics.median(x for _, each in passes for x in each)}
        for name, passes in reads.items()
    }  # fmt: skip
    return {"images": len(files), "megapixels": megapixels, "megabytes": nbytes / 1e6, "upload_s": upload_s,
            "endpoint": endpoint, "reads": read_stats, "mine": mine_cfg.model_dump(), "embed": embed_cfg.model_dump(),
            "clip": source.note, "results": results, "mine_only": mine_only}  # fmt: skip


# --------------------------------------------------------------------------- report


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _range(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def print_throughput(t: dict, args) -> None:
    res, mine_only = t["results"], t["mine_only"]
    first = res["disk"][0]
    m = t["mine"]
    print(f"\n### Throughput: {t['images']} images, {t['megapixels']:.2f} MP, {t['megabytes']:.1f} MB of PNG, "
          f"{first['shards']} shards of {m['images_per_shard']}; mine {m['patch_size']}/{m['stride']} {m['keep_rule']}; "
          f"{first['patches']} patches, {first['patches_kept']} kept and embedded ({t['clip']}); upload (untimed) "
          f"{t['upload_s']:.1f} s. Plan and mine: median (min-max) of {args.mine_repeats} mine-only + {args.repeats} "
          f"full runs per source; embed: of {args.repeats}; ABBA order\n")  # fmt: skip
    print("| source | plan (s) | mine (s) | images/s | MP/s | embed (s) | patches/s |")
    print("|---|---|---|---|---|---|---|")
    derived = {}
    for name in ("disk", "s3"):
        rows = mine_only[name] + res[name]
        plan, mine = [r["plan_s"] for r in rows], [r["mine_s"] for r in rows]
        emb = [r["embed_s"] for r in res[name]]
        images, mp, kept = rows[0]["images"], rows[0]["corpus_pixels"] / 1e6, res[name][0]["embedded"]
        med_mine, med_emb = statistics.median(mine), statistics.median(emb)
        derived[name] = {"plan": statistics.median(plan), "ips": images / med_mine, "mps": mp / med_mine,
                         "pps": kept / med_emb}  # fmt: skip
        print(f"| {name} | {_range(plan, '.3f')} | {_range(mine, '.2f')} | {images / med_mine:.1f} | {mp / med_mine:.2f} "
              f"| {_range(emb, '.1f')} | {kept / med_emb:.1f} |")  # fmt: skip
    d, s = derived["disk"], derived["s3"]
    print(f"| S3/disk | {s['plan'] / d['plan']:.1f}x the time | | {s['ips'] / d['ips']:.2f}x | {s['mps'] / d['mps']:.2f}x "
          f"| | {s['pps'] / d['pps']:.2f}x |")  # fmt: skip
    same = all(r["patches"] == first["patches"] and r["patches_kept"] == first["patches_kept"]
               for group in (res, mine_only) for rows in group.values() for r in rows)  # fmt: skip
    print(f"\nSame patches and kept counts from both sources in every run: {same}")
    rd = t["reads"]
    print(f"Reading the corpus object by object in one process (no Ray), median of 3 passes: disk "
          f"{rd['disk']['mb_per_s']:.0f} MB/s ({rd['disk']['ms_per_object']:.2f} ms per object), S3 "
          f"{rd['s3']['mb_per_s']:.1f} MB/s ({rd['s3']['ms_per_object']:.1f} ms per object)")  # fmt: skip


def print_memory(rows: list[dict], args) -> None:
    print(f"\n### Memory: manifests of N URIs over {args.tiles} distinct {args.tile_side}x{args.tile_side} PNGs, "
          f"patch {args.tile_patch}/{args.tile_stride}, {args.images_per_shard} images per shard, Ray restarted per N\n")  # fmt: skip
    print("| N | shards | manifest (MiB) | plan (s) | plan file (MiB) | mine (s) | summarize (s) | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['shards']} | {r['manifest_bytes'] / MiB:.2f} | {r['plan_s']:.2f} "
              f"| {r['plan_bytes'] / MiB:.2f} | {r['mine_s']:.1f} | {r['summarize_s']:.2f} | {r['images_per_s']:.0f} |")  # fmt: skip
    print("\nMiB; peaks of the 0.2 s samples unless VmHWM (the kernel's peak)\n")
    print("| N | driver RSS before | driver peak in plan / mine / summarize | driver VmHWM | driver after mine "
          "| mining worker VmHWM, max | other Ray workers VmHWM, max | all workers' RSS, start / peak sum "
          "| Ray daemons, peak sum |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ph = r["driver_peak_by_phase"]
        print(f"| {r['n']:,} | {r['driver_base'] / MiB:.0f} "
              f"| {ph['plan'] / MiB:.0f} / {ph['mine'] / MiB:.0f} / {ph['summarize'] / MiB:.0f} "
              f"| {r['driver_hwm'] / MiB:.0f} | {r['driver_after_mine'] / MiB:.0f} "
              f"| {r['task_worker_hwm_max'] / MiB:.0f} ({r['task_workers']} workers) "
              f"| {r['other_worker_hwm_max'] / MiB:.0f} ({r['workers'] - r['task_workers']}) "
              f"| {r['worker_sum_start'] / MiB:.0f} / {r['worker_sum'] / MiB:.0f} | {r['daemons_sum'] / MiB:.0f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "memory", "throughput", "plan"), default="all",
                    help="plan: plan_corpus alone over the --sizes manifests (not part of all)")
    ap.add_argument("--images", type=int, default=120, help="throughput corpus: first N of T91 then BSD200")
    ap.add_argument("--repeats", type=int, default=2, help="full runs (plan, mine, embed) per source")
    ap.add_argument("--mine-repeats", type=int, default=6, help="extra plan + mine runs per source")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="manifest sizes N")
    ap.add_argument("--tiles", type=int, default=1000, help="distinct PNGs the manifests cycle over")
    ap.add_argument("--tile-side", type=int, default=48)
    ap.add_argument("--tile-patch", type=int, default=32, help="patch size mined from the tiles")
    ap.add_argument("--tile-stride", type=int, default=16)
    ap.add_argument("--images-per-shard", type=int, default=1000, help="memory part's shard size")
    ap.add_argument("--interval", type=float, default=0.2, help="RSS sampling period (s)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_storage_"))
    out: dict = {"cpus": args.cpus, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    try:
        if args.part in ("all", "memory"):  # first: no moto server holding objects in this process yet
            out["memory"] = memory_part(args, work)
        if args.part in ("all", "throughput"):
            out["throughput"] = throughput_part(args, work)
        if args.part == "plan":
            out["plan"] = plan_only_part(args, work)
    finally:
        runner.shutdown_ray()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{out['machine']}, {args.cpus} Ray CPUs")
    if "throughput" in out:
        print_throughput(out["throughput"], args)
    if "memory" in out:
        print_memory(out["memory"], args)
    if "plan" in out:
        print("\n| N | shards | plan (s) | plan file (MiB) | driver RSS before (MiB) | driver VmHWM (MiB) |")
        print("|---|---|---|---|---|---|")
        for r in out["plan"]:
            print(f"| {r['n']:,} | {r['shards']} | {r['plan_s']:.2f} | {r['plan_bytes'] / MiB:.2f} "
                  f"| {r['driver_base'] / MiB:.0f} | {r['driver_hwm'] / MiB:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
