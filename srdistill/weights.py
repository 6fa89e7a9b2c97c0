"""Model weights by name: Hugging Face ids (downloaded, or from the cache offline), local
directories, and released weight files by URL.

* ``resolve_hf_weights``: one resolver for every pretrained model of the project (CLIP of
  ``embedding``, the ViT of ``complexity``, the DiT and VAE of ``diffusion``). A local
  directory is used as it is. A Hugging Face id (``org/name``) is fetched with
  ``huggingface_hub.snapshot_download``, restricted to the files the loader needs (configs,
  ``preprocessor_config.json``, safetensors weights; ``.bin`` weights only where the repository
  has no safetensors), into the Hugging Face cache (``$HF_HUB_CACHE``, default
  ``~/.cache/huggingface/hub``). With ``HF_HUB_OFFLINE=1`` nothing is requested: the id is
  looked up in that cache only. Either way the result is a local directory, so
  ``from_pretrained`` always loads from disk, and a Ray job resolves once on the driver and
  hands the directory to its actors.
* ``local_dir``: that directory on the machine that loads it. A Ray actor on another node
  (each node has its own Hugging Face cache) gets a driver's snapshot path that does not exist
  there; ``local_dir`` then resolves the same repository at the same commit
  (``resolve_hf_weights(repo_id, revision=commit)``: downloaded, or from this node's cache
  offline), so every node loads the exact weights the driver resolved.
* ``fetch_weights``: a released weights file (``srdistill eval --weights``) given as a local
  path or an ``http(s)`` URL, optionally pinned as ``URL#sha256=HEX``; URLs are downloaded once
  with ``pooch`` into ``$SRDISTILL_CACHE/weights`` (default ``~/.cache/srdistill/weights``).

Environment read at call time: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``; also honoured
when ``huggingface_hub.constants.HF_HUB_OFFLINE`` is set), ``HF_ENDPOINT`` (a mirror; default
``huggingface_hub.constants.ENDPOINT``) and ``SRDISTILL_CACHE``. The cache directory is
``huggingface_hub.constants.HF_HUB_CACHE``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urldefrag, urlsplit

__all__ = [
    "MissingWeightsError",
    "TRANSFORMERS_BIN_PATTERNS",
    "TRANSFORMERS_PATTERNS",
    "cache_root",
    "diffusers_patterns",
    "fetch_weights",
    "hub_cache",
    "hub_endpoint",
    "hub_hint",
    "hub_offline",
    "is_repo_id",
    "is_url",
    "local_dir",
    "resolve_hf_weights",
    "snapshot_ref",
]

#: A transformers checkpoint (CLIP, ViT): config, preprocessing, safetensors (single or sharded).
TRANSFORMERS_PATTERNS = ("config.json", "preprocessor_config.json", "model.safetensors",
                         "model.safetensors.index.json", "model-*-of-*.safetensors")
#: Its PyTorch-pickle weights, fetched only when a repository has no safetensors.
TRANSFORMERS_BIN_PATTERNS = ("pytorch_model.bin", "pytorch_model.bin.index.json",
                             "pytorch_model-*-of-*.bin")

_TRUE = {"1", "ON", "YES", "TRUE"}
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
#: A Hugging Face cache snapshot: ``.../models--org--name/snapshots/<commit>``.
_SNAPSHOT = re.compile(r"models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


class MissingWeightsError(RuntimeError):
    """Model weights (CLIP, the ViT of ``srdistill.distill.complexity``, a DiT or VAE) were not found:
    not a local directory, not in the Hugging Face cache (offline), or not downloadable
    (unknown repository, network error).

    Attributes:
        place: one line saying where the weights were looked for and why they were not there
            (for the "looked in" lists of callers' messages).
    """

    def __init__(self, message: str, *, place: str | None = None):
        super().__init__(message)
        self.place = place or message.splitlines()[0]


# --------------------------------------------------------------------------- Hugging Face


def hub_offline() -> bool:
    """Whether Hugging Face downloads are disabled: ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``) set to 1/on/yes/true in the environment now, or
    ``huggingface_hub.constants.HF_HUB_OFFLINE`` (read by huggingface_hub at import)."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return True
    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The Hub endpoint downloads go to: ``$HF_ENDPOINT`` now, else huggingface_hub's."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache() -> Path:
    """The Hugging Face cache directory (``huggingface_hub.constants.HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid Hugging Face repo id (``org/name`` or ``name``) rather than
    a path (absolute, ``~``/``.``-relative or more than one ``/``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or name.startswith(("/", "~", ".")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_hint(model: str, include: Sequence[str] = ("*.json", "*.safetensors")) -> str:
    """How to provide Hugging Face weights for ``model`` in the current mode (one sentence,
    for error messages): online, what to check and the offline alternative; offline, how to
    download or pre-fetch (``hf download MODEL --include PATTERN ...``)."""
    endpoint = hub_endpoint()
    if not is_repo_id(model):
        return (f"a repo id (org/name), downloaded from {endpoint} "
                "(or, with HF_HUB_OFFLINE=1, taken from the Hugging Face cache)")
    if hub_offline():
        patterns = " ".join(f"--include '{p}'" for p in include)
        return (
            f"HF_HUB_OFFLINE=1 is set, so nothing is downloaded: unset it to download {model!r} from "
            f"{endpoint}, or pre-fetch it on a machine with network (`hf download {model} {patterns}`) "
            f"and copy the Hugging Face cache to this machine's $HF_HUB_CACHE ({hub_cache()})"
        )
    return (
        f"check the id and the network ({endpoint}; HF_ENDPOINT selects a mirror, HF_TOKEN a token "
        "for gated repositories), or pre-fetch the weights and set HF_HUB_OFFLINE=1 to use the "
        "Hugging Face cache only"
    )


def diffusers_patterns(folder: str = "") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(safetensors patterns, .bin patterns)`` of one diffusers model folder (``""`` for a
    repository root, else e.g. ``"vae/"``): its ``config.json`` and weights, single or sharded."""
    base = f"{folder}diffusion_pytorch_model"
    return ((f"{folder}config.json", f"{base}.safetensors", f"{base}.safetensors.index.json",
             f"{base}-*-of-*.safetensors"),
            (f"{base}.bin", f"{base}.bin.index.json", f"{base}-*-of-*.bin"))


def _network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client errors huggingface_hub lets through: httpx2 (2.x), httpx (1.x) or
    requests (0.x), whichever import."""
    import importlib

    found = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _snapshot(model: str, patterns: Sequence[str], *, offline: bool, endpoint: str,
              revision: str | None = None) -> Path:
    from huggingface_hub import errors, snapshot_download

    incomplete = getattr(errors, "IncompleteSnapshotError", None)  # huggingface_hub >= 2
    try:
        return Path(snapshot_download(model, allow_patterns=list(patterns), local_files_only=offline,
                                      endpoint=endpoint, revision=revision))
    except Exception as exc:
        # Offline and the cached listing has more matching files than were fetched (e.g. a
        # pre-fetch that skipped an optional file): the caller's completeness check decides.
        if incomplete is None or not isinstance(exc, incomplete) or exc.snapshot_path is None:
            raise
        return Path(exc.snapshot_path)


def _failure(model: str, what: str, reason: str, place: str, patterns: Sequence[str]) -> MissingWeightsError:
    include = [p for p in patterns if "index.json" not in p and "-*-of-*" not in p]
    return MissingWeightsError(
        f"{what} {model!r} could not be resolved: {reason}.\n"
        f"Looked in: {place}.\n"
        f"Provide it: give a local directory holding the files, or {hub_hint(model, include)}.",
        place=f"{place}: {reason}",
    )


def resolve_hf_weights(
    model_id_or_dir: str | Path,
    *,
    what: str,
    allow_patterns: Sequence[str],
    fallback_patterns: Sequence[str] = (),
    complete: Callable[[Path], bool] | None = None,
    revision: str | None = None,
) -> Path:
    """A local directory holding the weights ``model_id_or_dir`` names.

    An existing path is returned as it is (``~`` expanded; the caller checks its content). A
    Hugging Face repo id is resolved with ``snapshot_download(allow_patterns=...)``: online
    (the default) the files are downloaded into the Hugging Face cache (only missing or
    changed ones; one revision request when all are cached); with ``HF_HUB_OFFLINE=1`` the
    cache is searched and nothing is requested. When ``complete`` says the snapshot lacks
    something (typically: no safetensors weights), ``fallback_patterns`` (the ``.bin``
    weights) are fetched too.

    Args:
        model_id_or_dir: a directory, or a Hugging Face repo id (``org/name``).
        what: what is being resolved, for messages (e.g. ``"CLIP weights"``).
        allow_patterns: the repository files to fetch (``fnmatch`` patterns on repo paths).
        fallback_patterns: more patterns, fetched only when ``complete`` fails after the first.
        complete: whether a snapshot directory holds everything the loader needs.
        revision: the branch, tag or commit of a repo id (default: ``main``); a commit pins the
            exact files (``local_dir`` passes the one the driver resolved).

    Returns:
        The directory: the given one, or the cached snapshot
        (``$HF_HUB_CACHE/models--org--name/snapshots/<commit>``; ``snapshot_ref`` reads the id
        and commit back from it).

    Raises:
        MissingWeightsError: neither an existing path nor a repo id; offline and not (fully) in
            the cache; online and the repository is unknown, gated, unreachable (and not
            cached) or holds no matching weights. The message names the id, the endpoint or
            cache, and the alternatives (a local directory, ``HF_HUB_OFFLINE``); its ``place``
            attribute is one line for a "looked in" list.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = str(model_id_or_dir)
    local = Path(name).expanduser()
    if local.exists():
        return local
    if not is_repo_id(name):
        raise MissingWeightsError(
            f"{what} {name!r}: no such local directory, and not a Hugging Face repo id (org/name)",
            place=f"local directory {str(local.resolve())!r} (does not exist)",
        )
    offline, endpoint, cache = hub_offline(), hub_endpoint(), hub_cache()
    at = f", revision {revision!r}" if revision else ""
    if offline:
        place = (f"Hugging Face cache {str(cache)!r} (repo id {name!r}{at}; HF_HUB_OFFLINE=1, nothing "
                 "downloaded)")
    else:
        place = f"Hugging Face Hub {endpoint} (repo id {name!r}{at}), cached in {str(cache)!r}"
    try:
        path = _snapshot(name, allow_patterns, offline=offline, endpoint=endpoint, revision=revision)
        if complete is not None and not complete(path) and fallback_patterns:
            path = _snapshot(name, [*allow_patterns, *fallback_patterns], offline=offline, endpoint=endpoint,
                             revision=revision)
    except GatedRepoError as exc:
        raise _failure(name, what, "the repository is gated: accept its terms on the Hub and log in "
                       "(`hf auth login` or HF_TOKEN)", place, allow_patterns) from exc
    except RepositoryNotFoundError as exc:
        raise _failure(name, what, f"no such repository on {endpoint} (or it is private)", place,
                       allow_patterns) from exc
    except RevisionNotFoundError as exc:
        raise _failure(name, what, f"revision not found on {endpoint}", place, allow_patterns) from exc
    except LocalEntryNotFoundError as exc:
        if offline:
            reason = "not in the Hugging Face cache"
        else:
            cause = exc.__cause__ or exc
            reason = (f"{endpoint} could not be reached ({cause.__class__.__name__}) and it is not in "
                      "the Hugging Face cache")
        raise _failure(name, what, reason, place, allow_patterns) from exc
    except (HfHubHTTPError, OSError, *_network_errors()) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _failure(name, what, f"{exc.__class__.__name__}: {first}", place, allow_patterns) from exc
    if complete is not None and not complete(path):
        raise _failure(name, what, f"the snapshot {str(path)!r} lacks files the loader needs "
                       f"({', '.join([*allow_patterns, *fallback_patterns])})", place, allow_patterns)
    return path


def snapshot_ref(path: str | Path | None) -> tuple[str, str] | None:
    """``(repo_id, commit)`` of a Hugging Face cache snapshot directory
    (``.../models--org--name/snapshots/<commit>``, any cache root), else ``None``. Repo ids
    hold no ``--``, so the folder name maps back to one id."""
    if not path:
        return None
    m = _SNAPSHOT.search(Path(path).as_posix())
    return (m["repo"].replace("--", "/"), m["commit"]) if m else None


def local_dir(
    path: str | Path,
    repo_id: str | None = None,
    revision: str | None = None,
    *,
    what: str,
    allow_patterns: Sequence[str],
    fallback_patterns: Sequence[str] = (),
    complete: Callable[[Path], bool] | None = None,
) -> Path:
    """The directory of weights resolved elsewhere (``resolve_hf_weights`` on the Ray driver)
    on this machine, for ``from_pretrained(..., local_files_only=True)``.

    ``path`` (``~`` expanded) when it exists here. Otherwise, when the weights came from the
    Hub (``repo_id`` and ``revision``, or, without them, read from ``path`` itself when it is
    a cache snapshot: ``snapshot_ref``), the same repository at the same commit is resolved
    on this machine with ``resolve_hf_weights(repo_id, revision=revision, ...)`` (the same
    patterns as on the driver): downloaded into this machine's Hugging Face cache, or found
    there with ``HF_HUB_OFFLINE=1``. A missing local directory of the user's is returned
    unchanged (the caller's check reports it).

    Raises:
        MissingWeightsError: the Hub weights are neither downloadable nor cached here (the
            message names the id and the commit).
    """
    local = Path(path).expanduser()
    if local.exists():
        return local
    if repo_id is None:
        ref = snapshot_ref(path)
        if ref is None:
            return local
        repo_id, revision = ref
    return resolve_hf_weights(repo_id, what=what, allow_patterns=allow_patterns, revision=revision,
                              fallback_patterns=fallback_patterns, complete=complete)


# --------------------------------------------------------------------------- files by URL


def cache_root() -> Path:
    """srdistill's download cache: ``srdistill.datasets.cache_root()`` where that exists, else
    ``$SRDISTILL_CACHE`` (default ``~/.cache/srdistill``)."""
    try:
        from srdistill.datasets import cache_root as datasets_cache_root
    except ImportError:
        return Path(os.environ.get("SRDISTILL_CACHE") or "~/.cache/srdistill").expanduser()
    return Path(datasets_cache_root())


def is_url(spec: str) -> bool:
    """Whether ``spec`` is an ``http(s)``/``ftp`` URL (else a local path)."""
    return urlsplit(str(spec)).scheme.lower() in ("http", "https", "ftp")


def fetch_weights(spec: str | Path) -> Path:
    """A local file for a weights spec: a path, or a URL optionally pinned with
    ``#sha256=HEX``.

    URLs are downloaded once with ``pooch.retrieve`` into ``cache_root()/weights`` (file name:
    the MD5 of the URL + its last path segment, so the suffix is kept) and reused afterwards;
    with a sha256 the download, and a cached copy, are checked against it (a cached copy that
    does not match is downloaded again). Paths are returned as they are (``~`` expanded).

    Raises:
        ValueError: a fragment other than ``sha256=<64 hex digits>``, or the downloaded file's
            sha256 differs from the given one (the message names the URL, expected and actual;
            the download is deleted).
        OSError: the download failed (network error, HTTP error status).
    """
    spec = str(spec)
    if not is_url(spec):
        return Path(spec).expanduser()
    import pooch
    import requests

    url, fragment = urldefrag(spec)
    known = None
    if fragment:
        key, _, value = fragment.partition("=")
        if key.lower() != "sha256" or not _SHA256.fullmatch(value):
            raise ValueError(f"--weights {spec!r}: the URL fragment must be '#sha256=<64 hex digits>', "
                             f"got '#{fragment}'")
        known = value.lower()
    folder = cache_root() / "weights"
    try:
        path = pooch.retrieve(url, known_hash=f"sha256:{known}" if known else None, path=folder,
                              progressbar=False)
    except ValueError as exc:
        if known is None or "hash" not in str(exc):
            raise
        got = re.search(r"but got ([0-9a-fA-F]+)", str(exc))
        raise ValueError(f"weights {url}: sha256 mismatch: expected {known}, downloaded file has "
                         f"{got.group(1) if got else 'another hash'} (download deleted)") from None
    except requests.RequestException as exc:
        raise OSError(f"weights {url}: download failed ({exc.__class__.__name__}: {exc})") from exc
    return Path(path)
