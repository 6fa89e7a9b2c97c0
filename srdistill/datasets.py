"""Standard SR datasets: a catalogue, where they live on disk, and a verified, resumable download.

Every benchmark name (``"Set5"``, ``"DIV2K_valid"``, ...) is an HR folder ``<root>/<NAME>/HR``
of PNG images. Roots are searched in the order of ``data_roots()``: each entry of
``$SRDISTILL_DATA`` (``os.pathsep``-separated), then ``cache_root()/"datasets"`` (where
``srdistill data get`` puts sets by default), then the repository's vendored ``data/``.

``get(name)`` downloads the set's archive(s) with pooch into ``cache_root()/"downloads"``
(resuming an interrupted download from its ``.part`` file with an HTTP ``Range`` request),
checks the checksum from the catalogue, extracts with ``pooch.Untar``/``pooch.Unzip`` and lays
out ``DEST/NAME/HR/*.png`` (the archive's HR folder, flattened; LR folders are left out)::

    from srdistill import datasets
    hr = datasets.get("Set5")           # ~/.cache/srdistill/datasets/Set5/HR
    datasets.get("DIV2K_valid", "/data")  # /data/DIV2K_valid/HR, 100 PNGs

Every catalogue entry cites where its URL and checksum come from (``DatasetSpec.source``). An
entry whose checksum could not be confirmed from a citable source has ``known_hash=None``:
``get`` then warns and records the SHA-256 it computed (``DEST/NAME/srdistill-dataset.json``)
so that it can be pinned. Licence-gated sets (Manga109) are listed with how to obtain them and
never downloaded.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlparse

import srdistill

__all__ = [
    "RemoteFile",
    "DatasetSpec",
    "CATALOG",
    "DatasetError",
    "ChecksumMismatch",
    "DownloadInterrupted",
    "LicenceRequired",
    "UnknownDataset",
    "ResumableDownloader",
    "cache_root",
    "data_roots",
    "lookup",
    "resolve_dataset",
    "locate",
    "get",
    "get_many",
    "catalog_rows",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: The repository's vendored sample sets (Set5, Set14, T91); absent from an installed wheel.
VENDORED = Path(srdistill.__file__).resolve().parents[1] / "data"
#: Written into ``DEST/NAME/`` by ``get``: where the set came from and the hashes computed.
RECORD = "srdistill-dataset.json"


# --------------------------------------------------------------------------------------------
# where datasets live


def cache_root() -> Path:
    """The user cache: ``$SRDISTILL_CACHE`` or ``~/.cache/srdistill`` (``~`` expanded).

    Holds ``datasets/`` (the default destination of ``srdistill data get``), ``downloads/``
    (archives and ``.part`` files) and ``runs/`` (local mirrors of S3 runs).
    """
    value = os.environ.get("SRDISTILL_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "srdistill"


def data_roots() -> list[Path]:
    """Roots searched, in order, for a benchmark name ``NAME`` as ``<root>/NAME/HR``.

    Each entry of ``$SRDISTILL_DATA`` (``os.pathsep``-separated, empty entries ignored), then
    ``cache_root()/"datasets"``, then the repository's vendored ``data/`` if it exists. Roots
    need not exist.
    """
    env = [Path(p).expanduser() for p in os.environ.get("SRDISTILL_DATA", "").split(os.pathsep) if p]
    roots = [*env, cache_root() / "datasets"]
    if VENDORED.is_dir():
        roots.append(VENDORED)
    return roots


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files (by extension) in ``folder`` (recursively if asked), sorted by path."""
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def locate(name: str, roots: Iterable[Path] | None = None) -> Path | None:
    """The first ``<root>/<name>/HR`` holding at least one image (roots: ``data_roots()``), or None."""
    for root in data_roots() if roots is None else roots:
        hr = Path(root) / name / "HR"
        if _images(hr):
            return hr
    return None


# --------------------------------------------------------------------------------------------
# the catalogue


@dataclass(frozen=True)
class RemoteFile:
    """One archive to download.

    Attributes:
        url: public HTTP(S) URL.
        known_hash: ``"sha256:<hex>"`` or ``"md5:<hex>"`` from a citable source, or None
            (unconfirmed: ``get`` warns and records the SHA-256 it computed).
        size: bytes, if known.
        fname: file name in the download cache (default: the URL's last path segment).
    """

    url: str
    known_hash: str | None = None
    size: int | None = None
    fname: str | None = None

    @property
    def name(self) -> str:
        """The file name in ``<cache>/downloads``."""
        return self.fname or PurePosixPath(urlparse(self.url).path).name


@dataclass(frozen=True)
class DatasetSpec:
    """A catalogue entry: what a set is, where to get it and how its archive is laid out.

    Attributes:
        name: the benchmark name (the folder ``<root>/<name>/HR``).
        description: one line.
        files: the archive(s); several for sharded sets (LSDIR), empty for a licence-gated set.
        archive: ``"zip"`` (``pooch.Unzip``) or ``"tar"`` (``pooch.Untar``, any compression).
        hr_subdir: folder inside each extracted archive holding the HR images (POSIX path,
            ``"."`` for the archive root). If absent, a unique folder whose path ends with it is
            used (archives that add a top-level folder).
        members: extract only these archive members (e.g. the HR folder of a tar that also
            holds LR folders); None extracts everything.
        recursive: take images from subfolders of ``hr_subdir`` too (flattened; names must be
            unique).
        n_images: expected number of HR images, if known (a mismatch is a warning).
        licence: short licence / terms text.
        source: where the URL(s) and checksum(s) come from.
        gated: for a licence-gated set, how to obtain it; ``get`` refuses with this text.
        note: printed by ``get`` before downloading (e.g. a token is needed).
        aliases: other names accepted by ``lookup``.
    """

    name: str
    description: str
    files: tuple[RemoteFile, ...]
    archive: Literal["zip", "tar"]
    hr_subdir: str
    licence: str
    source: str
    members: tuple[str, ...] | None = None
    recursive: bool = False
    n_images: int | None = None
    gated: str | None = None
    note: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def checksum_status(self) -> str:
        """``"sha256"``/``"md5"`` (confirmed, all files), ``"unconfirmed"`` or ``"gated"``."""
        if self.gated:
            return "gated"
        algs = {f.known_hash.split(":")[0] if f.known_hash else None for f in self.files}
        if None in algs or not algs:
            return "unconfirmed"
        return "/".join(sorted(algs))

    @property
    def size(self) -> int | None:
        """Total download size in bytes, if every file's size is known."""
        sizes = [f.size for f in self.files]
        return sum(sizes) if sizes and None not in sizes else None  # type: ignore[arg-type]


_EDSR_BENCHMARK = "https://cv.snu.ac.kr/research/EDSR/benchmark.tar"
_EDSR_BENCHMARK_MD5 = "md5:4ace41d33c2384b97e6b320cd0afd6ba"
_EDSR_SOURCE = ("URL and md5 of EDSR's benchmark.tar (HR + MATLAB-bicubic LR of Set5, Set14, B100, "
                "Urban100) from Coloquinte/torchSR torchsr/datasets/benchmarks.py")  # fmt: skip


def _edsr_benchmark(name: str, description: str, n: int, licence: str, aliases=()) -> DatasetSpec:
    return DatasetSpec(
        name=name, description=description, n_images=n, licence=licence, aliases=aliases,
        files=(RemoteFile(_EDSR_BENCHMARK, _EDSR_BENCHMARK_MD5),), archive="tar",
        hr_subdir=f"benchmark/{name}/HR", members=(f"benchmark/{name}/HR",), source=_EDSR_SOURCE,
    )  # fmt: skip


_LSDIR_NOTE = ("LSDIR is gated on Hugging Face: accept its terms at https://huggingface.co/ofsoundof/LSDIR "
               "and export HF_TOKEN=<a read token> before `get`")  # fmt: skip
_LSDIR_SOURCE = ("file names from deepinv/deepinv deepinv/datasets/lsdir.py (shard-00..16.tar.gz, "
                 "val1.tar.gz; originally https://data.vision.ee.ethz.ch/yawli/, which deepinv reports "
                 "offline) and the Hugging Face repo ofsoundof/LSDIR it now downloads from; no archive "
                 "checksum published")  # fmt: skip
_LSDIR_LICENCE = "research; gated (HF terms)"
_HF_LSDIR = "https://huggingface.co/ofsoundof/LSDIR/resolve/main/"

_SPECS = (
    _edsr_benchmark("Set5", "5 test images (Bevilacqua et al. 2012)", 5,
                    "no stated licence; research use"),  # fmt: skip
    _edsr_benchmark("Set14", "14 test images (Zeyde et al. 2010)", 14,
                    "no stated licence; mixed provenance"),  # fmt: skip
    _edsr_benchmark("B100", "BSD100: the 100 BSDS300 test images (Martin et al. 2001)", 100,
                    "BSDS: non-commercial research only", aliases=("BSD100",)),  # fmt: skip
    _edsr_benchmark("Urban100", "100 urban scenes with regular structure (Huang et al. 2015)", 100,
                    "no stated licence; research use"),  # fmt: skip
    DatasetSpec(
        name="T91",
        description="91 training images (Yang et al. 2010)",
        files=(RemoteFile("http://vllab.ucmerced.edu/wlai24/LapSRN/results/SR_training_datasets.zip"),),
        archive="zip", hr_subdir="T91", n_images=91,
        licence="no stated licence; research use",
        source="URL from the LapSRN project page, cited in many SR repos' READMEs as holding T91, "
        "General100 and BSDS200; checksum unconfirmed",
    ),  # fmt: skip
    DatasetSpec(
        name="BSD200",
        description="the 200 BSDS300 train images (with T91: the '291' SR training corpus)",
        files=(RemoteFile("https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/bsds/BSDS300-images.tgz"),),
        archive="tar", hr_subdir="BSDS300/images/train", n_images=200,
        licence="BSDS: non-commercial research only",
        source="URL from the BSDS300 page (Berkeley), as used by pytorch/examples super_resolution; "
        "JPEG originals, converted losslessly to PNG; checksum unconfirmed",
    ),  # fmt: skip
    DatasetSpec(
        name="DIV2K_train",
        description="DIV2K train HR: 800 2K images (NTIRE 2017)",
        files=(RemoteFile("https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip",
                          "sha256:9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335",
                          3530603713),),  # fmt: skip
        archive="zip", hr_subdir="DIV2K_train_HR", n_images=800,
        licence="academic research only",
        source="URL, size and sha256 from tensorflow/datasets tensorflow_datasets/url_checksums/div2k.txt "
        "(md5 bdc2d9338d4e574fe81bf7d158758658 also in Coloquinte/torchSR torchsr/datasets/div2k.py)",
        aliases=("DIV2K",),
    ),  # fmt: skip
    DatasetSpec(
        name="DIV2K_valid",
        description="DIV2K validation HR: 100 2K images (0801-0900)",
        files=(RemoteFile("https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip",
                          "sha256:20dd31fd84d777bc1cf5d6b7654a3f569c0aec74458ae094122ad1d0489900fc",
                          448993893),),  # fmt: skip
        archive="zip", hr_subdir="DIV2K_valid_HR", n_images=100,
        licence="academic research only",
        source="URL, size and sha256 from tensorflow/datasets tensorflow_datasets/url_checksums/div2k.txt "
        "(md5 9fcdda83005c5e5997799b69f955ff88 also in Coloquinte/torchSR torchsr/datasets/div2k.py)",
    ),  # fmt: skip
    DatasetSpec(
        name="Flickr2K",
        description="2650 2K Flickr images (Lim et al. 2017, EDSR)",
        files=(RemoteFile("https://cv.snu.ac.kr/research/EDSR/Flickr2K.tar",
                          "md5:5d3f39443d5e9489bff8963f8f26cb03"),),  # fmt: skip
        archive="tar", hr_subdir="Flickr2K/Flickr2K_HR", members=("Flickr2K/Flickr2K_HR",),
        n_images=2650, licence="research use; Flickr owners' licences",
        source="URL, md5 and layout from Coloquinte/torchSR torchsr/datasets/flickr2k.py "
        "(the tar also holds LR images; only Flickr2K_HR is extracted)",
    ),  # fmt: skip
    DatasetSpec(
        name="LSDIR",
        description="LSDIR train HR: 84,991 high-quality images in 17 shards (Li et al. 2023)",
        files=tuple(RemoteFile(f"{_HF_LSDIR}shard-{i:02d}.tar.gz") for i in range(17)),
        archive="tar", hr_subdir=".", recursive=True, n_images=84991,
        licence=_LSDIR_LICENCE, source=_LSDIR_SOURCE, note=_LSDIR_NOTE,
    ),  # fmt: skip
    DatasetSpec(
        name="LSDIR_val",
        description="LSDIR validation HR: 250 images",
        files=(RemoteFile(f"{_HF_LSDIR}val1.tar.gz"),),
        archive="tar", hr_subdir="val1/HR/val", n_images=250,
        licence=_LSDIR_LICENCE, source=_LSDIR_SOURCE, note=_LSDIR_NOTE,
    ),  # fmt: skip
    DatasetSpec(
        name="Manga109",
        description="109 images, one per Japanese manga volume (Matsui et al. 2017)",
        files=(), archive="zip", hr_subdir=".", n_images=109,
        licence="academic only, by agreement",
        source="terms and request form at http://www.manga109.org/en/download.html",
        gated="Manga109 is licence-gated and is not downloaded by srdistill: request it at "
        "http://www.manga109.org/en/download.html (academic research only, after agreeing to the "
        "terms; no redistribution), then put its 109 HR images as PNGs in <root>/Manga109/HR, "
        "<root> being an entry of $SRDISTILL_DATA",
    ),  # fmt: skip
)

#: Every known set by name.
CATALOG: dict[str, DatasetSpec] = {s.name: s for s in _SPECS}


# --------------------------------------------------------------------------------------------
# errors


class DatasetError(RuntimeError):
    """A dataset could not be obtained (base class)."""


class UnknownDataset(DatasetError, KeyError):
    """A name that is not in the catalogue."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class LicenceRequired(DatasetError):
    """A licence-gated set: the message says how to obtain it."""


class ChecksumMismatch(DatasetError):
    """The downloaded archive's hash differs from the catalogue's; the file was removed."""


class DownloadInterrupted(DatasetError):
    """The connection dropped; the bytes so far are kept in a ``.part`` file to resume from."""


def lookup(name: str, catalog: Mapping[str, DatasetSpec] | None = None) -> DatasetSpec:
    """The catalogue entry of ``name`` (case-insensitive; aliases such as ``BSD100`` accepted).

    Raises:
        UnknownDataset: not in the catalogue (the message lists the known names).
    """
    catalog = CATALOG if catalog is None else catalog
    if name in catalog:
        return catalog[name]
    for spec in catalog.values():
        if name.lower() in {spec.name.lower(), *(a.lower() for a in spec.aliases)}:
            return spec
    raise UnknownDataset(f"unknown dataset {name!r}; known: {', '.join(catalog)}")


# --------------------------------------------------------------------------------------------
# download


def _auth_headers(url: str) -> dict[str, str]:
    """``Authorization: Bearer $HF_TOKEN`` for huggingface.co URLs when the variable is set
    (gated repos); requests drops it on the redirect to the CDN host."""
    host = urlparse(url).hostname or ""
    token = os.environ.get("HF_TOKEN")
    if token and (host == "huggingface.co" or host.endswith(".huggingface.co")):
        return {"Authorization": f"Bearer {token}"}
    return {}


class ResumableDownloader:
    """A pooch downloader that resumes from ``part`` with an HTTP ``Range`` request.

    Bytes are appended to the stable file ``part``; if it exists when called, the request asks
    for ``Range: bytes=<size>-``. A 206 reply is appended; a 200 reply (the server ignores
    ranges) restarts from zero. When the body is complete, ``part`` is moved to pooch's output
    file (pooch then checks the hash and moves it into place, or deletes it).

    Args:
        part: the partial file, e.g. ``<cache>/downloads/<file>.part``.
        algorithms: hashes computed while writing (``hashlib`` names), read back from
            ``digests`` after the call (pooch deletes a mismatching file).
        progressbar: show a tqdm bar (bytes).
        chunk_size: bytes per read.
        timeout: requests' ``(connect, read)`` timeout in seconds.

    Raises (from ``__call__``):
        DownloadInterrupted: the connection dropped or the body was short; ``part`` is kept.
        requests.HTTPError: an HTTP error status (the message has the URL).
    """

    def __init__(self, part: Path, *, algorithms: Iterable[str] = ("sha256",), progressbar: bool = True,
                 chunk_size: int = 1 << 20, timeout: tuple[float, float] = (15.0, 60.0)):  # fmt: skip
        self.part = Path(part)
        self.algorithms = tuple(dict.fromkeys(algorithms))
        self.progressbar = progressbar
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.digests: dict[str, str] = {}
        self.resumed_from = 0

    def _hashers(self, offset: int) -> dict:
        hashers = {alg: hashlib.new(alg) for alg in self.algorithms}
        if offset:
            with open(self.part, "rb") as f:
                while block := f.read(self.chunk_size):
                    for h in hashers.values():
                        h.update(block)
        return hashers

    def __call__(self, url: str, output_file, pooch=None, check_only: bool = False) -> bool | None:
        import requests
        import urllib3
        from tqdm.auto import tqdm

        if check_only:  # pooch asks whether the file is available
            with requests.head(url, headers=_auth_headers(url), allow_redirects=True, timeout=self.timeout) as r:
                return r.status_code == 200
        self.part.parent.mkdir(parents=True, exist_ok=True)
        offset = self.part.stat().st_size if self.part.is_file() else 0
        headers = {"Accept-Encoding": "identity", **_auth_headers(url)}  # ranges count raw bytes
        if offset:
            headers["Range"] = f"bytes={offset}-"
        response = requests.get(url, headers=headers, stream=True, timeout=self.timeout)
        with response:
            if offset and response.status_code == 416:  # nothing left: the part may be complete
                total = _content_range_total(response.headers.get("Content-Range", ""))
                if total != offset:
                    self.part.unlink()
                    return self(url, output_file, pooch)
            else:
                if offset and (response.status_code != 206 or not response.headers.get(
                        "Content-Range", "").startswith(f"bytes {offset}-")):  # fmt: skip
                    offset = 0  # the server sent the whole file: start again
                response.raise_for_status()
                self.resumed_from = offset
                length = response.headers.get("Content-Length")
                total = offset + int(length) if length is not None else None
                hashers = self._hashers(offset)
                bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                           desc=PurePosixPath(urlparse(url).path).name, disable=not self.progressbar,
                           leave=False)  # fmt: skip
                written = offset
                try:
                    with open(self.part, "ab" if offset else "wb") as out:
                        for chunk in _chunks(response, self.chunk_size):
                            out.write(chunk)
                            out.flush()  # what arrived survives an interruption
                            for h in hashers.values():
                                h.update(chunk)
                            written += len(chunk)
                            bar.update(len(chunk))
                except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                    raise DownloadInterrupted(
                        f"download of {url} interrupted after {written} bytes ({exc.__class__.__name__}); "
                        f"the bytes so far are in {self.part}: run the same command again to resume"
                    ) from exc
                finally:
                    bar.close()
                if total is not None and written != total:
                    raise DownloadInterrupted(
                        f"download of {url} stopped at {written} of {total} bytes; the bytes so far are "
                        f"in {self.part}: run the same command again to resume"
                    )
                self.digests = {alg: h.hexdigest() for alg, h in hashers.items()}
        if not self.digests:  # the 416 path: hash the complete part
            self.digests = {alg: h.hexdigest() for alg, h in self._hashers(offset).items()}
        shutil.move(str(self.part), str(output_file))
        return None


def _chunks(response, size: int):
    """The body in chunks of at most ``size`` bytes, each yielded as soon as it arrives
    (urllib3's ``read1``), so that an interruption loses nothing already received; older
    urllib3 without ``read1``: requests' ``iter_content`` (may lose up to one chunk)."""
    raw = response.raw
    if not hasattr(raw, "read1"):  # pragma: no cover - urllib3 < 2.3
        yield from response.iter_content(size)
        return
    while chunk := raw.read1(size, decode_content=True):
        yield chunk


def _content_range_total(value: str) -> int | None:
    """``N`` of a ``Content-Range: bytes */N`` (or ``a-b/N``) header, else None."""
    _, _, total = value.rpartition("/")
    return int(total) if total.strip().isdigit() else None


def _fetch(spec: DatasetSpec, remote: RemoteFile, downloads: Path, *, progress: bool,
           log: Callable[[str], None]) -> tuple[Path, str]:  # fmt: skip
    """Download (or find in the cache) one archive, verified: ``(path, sha256 hex)``."""
    import pooch

    alg = remote.known_hash.split(":")[0] if remote.known_hash else "sha256"
    downloader = ResumableDownloader(downloads / f"{remote.name}.part", algorithms=("sha256", alg),
                                     progressbar=progress)  # fmt: skip
    target, part = downloads / remote.name, downloader.part
    if target.exists():
        log(f"{spec.name}: using the cached {target}" + (" (verifying)" if remote.known_hash else ""))
    else:
        resume = f", resuming from {part.stat().st_size} bytes" if part.is_file() else ""
        size = f" ({_human(remote.size)})" if remote.size else ""
        log(f"{spec.name}: downloading {remote.url}{size}{resume}")
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")  # our own lines say what happens
    try:
        path = pooch.retrieve(remote.url, remote.known_hash, fname=remote.name, path=downloads,
                              downloader=downloader)  # fmt: skip
    except ValueError as exc:  # pooch's hash mismatch; it deleted the file
        if "hash" not in str(exc):
            raise
        actual = downloader.digests.get(alg, "?")
        raise ChecksumMismatch(
            f"checksum mismatch for dataset {spec.name!r} from {remote.url}: expected {remote.known_hash}, "
            f"got {alg}:{actual}; the bad file was removed (a corrupted transfer, or the archive "
            "changed upstream)"
        ) from exc
    finally:
        logger.setLevel(level)
    sha256 = downloader.digests.get("sha256") or pooch.file_hash(path, alg="sha256")
    return Path(path), sha256


def _check_tar_members(path: Path) -> None:
    """Refuse a tar whose members would land outside the extraction folder."""
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            name = PurePosixPath(m.name)
            bad = name.is_absolute() or ".." in name.parts
            if m.issym() or m.islnk():
                link = PurePosixPath(m.linkname)
                bad = bad or link.is_absolute() or ".." in link.parts
            if bad or m.isdev():
                raise DatasetError(f"{path.name}: unsafe archive member {m.name!r}; not extracted")


def _extract(spec: DatasetSpec, archive: Path, into: Path) -> None:
    """Extract with pooch's Unzip/Untar (only ``spec.members`` if given) into ``into``."""
    import pooch

    members = list(spec.members) if spec.members else None
    if spec.archive == "tar":
        _check_tar_members(archive)
        processor = pooch.Untar(members=members, extract_dir=str(into))
    else:
        processor = pooch.Unzip(members=members, extract_dir=str(into))
    processor(str(archive), "download", None)


def _hr_folder(spec: DatasetSpec, root: Path, archive: str) -> Path:
    """The folder of HR images in an extracted archive (``spec.hr_subdir``, see DatasetSpec)."""
    exact = root / spec.hr_subdir
    if exact.is_dir():
        return exact
    tail = PurePosixPath(spec.hr_subdir).parts
    found = [d for d in root.rglob(tail[-1]) if d.is_dir() and d.relative_to(root).parts[-len(tail):] == tail]
    if len(found) == 1:
        return found[0]
    top = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise DatasetError(f"{spec.name}: no single folder {spec.hr_subdir!r} in {archive} "
                       f"(found {len(found)}); its top level holds {top[:10]}")  # fmt: skip


def _lay_out(spec: DatasetSpec, folder: Path, hr: Path) -> int:
    """Move (PNG) or convert to PNG (other formats) the images of ``folder`` into ``hr`` (created)."""
    from PIL import Image, ImageOps

    hr.mkdir(parents=True, exist_ok=True)
    n = 0
    for src in _images(folder, spec.recursive):
        dst = hr / f"{src.stem}.png"
        if dst.exists():
            raise DatasetError(f"{spec.name}: two images named {dst.name} in the archive(s)")
        if src.suffix.lower() == ".png":
            shutil.move(str(src), str(dst))
        else:  # lossless: the decoded pixels, stored as PNG
            with Image.open(src) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "I;16"):
                    im = im.convert("RGB")
                im.save(dst, format="PNG")
        n += 1
    return n


def get(name: str, dest: str | Path | None = None, *, catalog: Mapping[str, DatasetSpec] | None = None,
        spec: DatasetSpec | None = None, cache: str | Path | None = None, keep_archives: bool = False,
        progress: bool = True, log: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Download, verify and lay out a catalogue set as ``DEST/NAME/HR/*.png``.

    Idempotent: if ``DEST/NAME/HR`` already holds images nothing is downloaded. Otherwise each
    archive is fetched with pooch into ``<cache>/downloads`` (resuming a ``.part`` file left by
    an interrupted download), its checksum checked, extracted, and the images of its HR folder
    moved (converted to PNG when stored otherwise) into ``DEST/NAME/HR``; the result appears
    atomically (built in ``DEST/.NAME.tmp`` and renamed). For a set of several archives (LSDIR)
    the archives already laid out are kept there when a later one fails, and skipped by the
    rerun. ``DEST/NAME/srdistill-dataset.json`` records the URLs, expected hashes and the
    SHA-256 computed for each archive.

    Args:
        name: catalogue name (case-insensitive; aliases accepted).
        dest: the data root (default ``cache_root()/"datasets"``, the second lookup root).
        catalog: the catalogue to look ``name`` up in (default ``CATALOG``).
        spec: use this entry instead of looking ``name`` up.
        cache: where ``downloads/`` lives (default ``cache_root()``).
        keep_archives: keep the archives in ``<cache>/downloads`` after extraction.
        progress: tqdm progress bars.
        log: where progress lines and warnings go.

    Returns:
        The HR folder ``DEST/NAME/HR``.

    Raises:
        UnknownDataset: ``name`` is not in the catalogue.
        LicenceRequired: a licence-gated set (the message says how to obtain it).
        ChecksumMismatch: an archive's hash differs (the file is removed, nothing laid out).
        DownloadInterrupted: the connection dropped (run again to resume).
        DatasetError: unexpected archive layout or unsafe member.
        requests.HTTPError / OSError: the server refused, or a disk error.
    """
    spec = spec or lookup(name, catalog)
    if spec.gated:
        raise LicenceRequired(spec.gated)
    dest = Path(dest).expanduser() if dest is not None else cache_root() / "datasets"
    downloads = (Path(cache).expanduser() if cache is not None else cache_root()) / "downloads"
    target = dest / spec.name
    hr = target / "HR"
    present = _images(hr)
    if present:
        log(f"{spec.name}: already present in {hr} ({len(present)} images); nothing to do")
        return hr
    if spec.note:
        log(f"{spec.name}: note: {spec.note}")
    staging = dest / f".{spec.name}.tmp"
    progress_file = staging / "archives-done.json"  # archives laid out so far (sharded sets)
    done: list[dict] = json.loads(progress_file.read_text()) if progress_file.is_file() else []
    if not done:
        shutil.rmtree(staging, ignore_errors=True)
    else:
        log(f"{spec.name}: {len(done)} of {len(spec.files)} archives already laid out in {staging}")
    (staging / "HR").mkdir(parents=True, exist_ok=True)
    n = len(_images(staging / "HR"))
    try:
        for i, remote in enumerate(spec.files):
            if any(d["url"] == remote.url for d in done):
                continue
            archive, sha256 = _fetch(spec, remote, downloads, progress=progress, log=log)
            if remote.known_hash is None:
                log(f"warning: {spec.name}: checksum unconfirmed for {remote.url}; its sha256 is {sha256} "
                    f"(recorded in {target / RECORD}; pin it as known_hash='sha256:{sha256}')")  # fmt: skip
            extracted = staging / "extract" / str(i)
            shutil.rmtree(extracted, ignore_errors=True)
            _extract(spec, archive, extracted)
            laid_out = staging / "extract" / f"{i}-HR"
            _lay_out(spec, _hr_folder(spec, extracted, remote.name), laid_out)
            clash = sorted({p.name for p in laid_out.iterdir()} & {p.name for p in (staging / "HR").iterdir()})
            if clash:
                raise DatasetError(f"{spec.name}: {remote.name} has images named as in an earlier archive: "
                                   f"{', '.join(clash[:5])}")  # fmt: skip
            for f in laid_out.iterdir():
                os.replace(f, staging / "HR" / f.name)
            n = len(_images(staging / "HR"))
            shutil.rmtree(staging / "extract" / str(i))
            shutil.rmtree(laid_out)
            done.append({"url": remote.url, "expected": remote.known_hash, "sha256": sha256,
                         "bytes": archive.stat().st_size})  # fmt: skip
            progress_file.write_text(json.dumps(done, indent=2))
            if not keep_archives:
                archive.unlink()
        shutil.rmtree(staging / "extract", ignore_errors=True)
        if n == 0:
            raise DatasetError(f"{spec.name}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {spec.hr_subdir!r}")
        if spec.n_images is not None and n != spec.n_images:
            log(f"warning: {spec.name}: {n} images, expected {spec.n_images}")
        record = {"name": spec.name, "description": spec.description, "licence": spec.licence,
                  "source": spec.source, "checksum": spec.checksum_status, "n_images": n, "files": done,
                  "retrieved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():  # e.g. an empty HR folder or other files of the user's: keep them
            shutil.rmtree(hr, ignore_errors=True)
            os.replace(staging / "HR", hr)
            os.replace(staging / RECORD, target / RECORD)
        else:
            progress_file.unlink()
            os.replace(staging, target)
    except BaseException:
        if done and len(done) < len(spec.files):  # keep the archives laid out so far for a rerun
            shutil.rmtree(staging / "extract", ignore_errors=True)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    log(f"{spec.name}: {n} images in {hr}")
    return hr


def get_many(names: Iterable[str], dest: str | Path | None = None, *,
             catalog: Mapping[str, DatasetSpec] | None = None, keep_archives: bool = False,
             **kwargs) -> list[Path]:  # fmt: skip
    """``get`` each name in order; an archive shared by several requested sets (EDSR's
    benchmark.tar: Set5, Set14, B100, Urban100) is downloaded once and removed after the last
    (unless ``keep_archives``). All names are checked first (``UnknownDataset``); other errors as
    ``get``."""
    specs = [lookup(n, catalog) for n in names]
    out = []
    for i, spec in enumerate(specs):
        later = {f.url for s in specs[i + 1:] for f in s.files}
        keep = keep_archives or any(f.url in later for f in spec.files)
        out.append(get(spec.name, dest, spec=spec, keep_archives=keep, **kwargs))
    return out


# --------------------------------------------------------------------------------------------
# listing


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


def catalog_rows(catalog: Mapping[str, DatasetSpec] | None = None) -> list[dict]:
    """One row per set for ``srdistill data list``: ``{"name", "images", "size", "licence",
    "checksum", "present"}`` (``present``: the HR folder found by ``locate``, or None)."""
    catalog = CATALOG if catalog is None else catalog
    return [
        {"name": s.name, "images": s.n_images, "size": _human(s.size) if s.files else "-",
         "licence": s.licence, "checksum": s.checksum_status, "present": locate(s.name)}
        for s in catalog.values()
    ]  # fmt: skip


def resolve_dataset(name_or_path: str | Path) -> Path:
    """The folder of HR images of a benchmark name (``"Set5"``) or a directory.

    An existing directory is used as is, or its ``HR`` subfolder if it has one. Otherwise the
    name is looked up as ``<root>/<name>/HR`` for each root of ``datasets.data_roots()``:
    ``$SRDISTILL_DATA`` (``os.pathsep``-separated), the user cache
    (``$SRDISTILL_CACHE/datasets``, default ``~/.cache/srdistill/datasets``, where
    ``srdistill data get`` puts sets) and the repository's vendored ``data/``; first hit wins.

    Raises:
        FileNotFoundError: nothing found; the message lists every place tried and, for a set
            of the catalogue (``CATALOG``), ends with ``run: srdistill data get NAME``.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path / "HR" if (path / "HR").is_dir() else path
    tried = [str(path)]
    for root in data_roots():
        candidate = root / str(name_or_path) / "HR"
        if candidate.is_dir():
            return candidate
        tried.append(str(candidate))
    message = f"dataset {str(name_or_path)!r} not found; tried: {', '.join(tried)}"
    try:
        spec = lookup(str(name_or_path))
    except UnknownDataset:
        raise FileNotFoundError(message) from None
    also = f" and use the name {spec.name!r}" if spec.name != str(name_or_path) else ""
    raise FileNotFoundError(f"{message}; run: srdistill data get {spec.name}{also}")
