"""Read TensorFlow checkpoints (the V2 "tensor bundle" format) without TensorFlow.

A checkpoint saved by ``tf.compat.v1.train.Saver`` (the default V2 format) or
``tf.train.Checkpoint`` is a prefix ``PREFIX`` and the files

* ``PREFIX.index``: an SSTable (LevelDB's table format) mapping each variable name to a
  ``BundleEntryProto`` (dtype, shape, data shard, byte offset and size, masked CRC32C of the
  bytes); its entry ``""`` is the ``BundleHeaderProto`` (number of shards, endianness);
* ``PREFIX.data-0000S-of-0000N``: the tensors' raw bytes, one file per shard.

Only what these few messages need is decoded (protobuf varints and length-delimited fields by
hand; see TensorFlow's ``tensor_bundle.proto``, ``tensor_shape.proto``, ``types.proto`` and
LevelDB's ``doc/table_format.md``). Used by ``mzsr.import_tf`` to convert JWSoh/MZSR's released
TensorFlow 1 checkpoints.

Integrity: every block of the index carries a masked CRC32C, and so does every tensor. They
are verified when the ``google-crc32c`` package is installed (``CRC32C_AVAILABLE``); without it
only the structure, the sizes and the shapes are checked. TensorFlow writes index blocks
uncompressed; a compressed (snappy) block is refused with a clear error, as are partitioned
(sliced) variables and non-numeric dtypes (strings, resources, variants, bfloat16).

Example::

    bundle = TensorBundle("MZSR/Model/Directx2")
    bundle.names()                                   # ['MODEL/conv1/bias', ...]
    kernel = bundle.read("MODEL/conv1/kernel")       # (3, 3, 3, 64) float32, HWIO
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # optional: verifies the checksums
    import google_crc32c
except ImportError:  # pragma: no cover - depends on the environment
    google_crc32c = None

__all__ = ["CRC32C_AVAILABLE", "TensorBundle", "TensorEntry", "read_bundle", "resolve_prefix"]

#: True when ``google-crc32c`` is installed and checksums are verified.
CRC32C_AVAILABLE = google_crc32c is not None

#: LevelDB's table magic number, the last 8 bytes of an SSTable (little-endian).
TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_BYTES = 48
BLOCK_TRAILER_BYTES = 5  # compression type (1 byte) + masked crc32c (4 bytes)
_COMPRESSION = {0: "none", 1: "snappy", 2: "zstd"}
_LFS = b"version https://git-lfs"

#: TensorFlow ``DataType`` enum (types.proto) -> little-endian numpy dtype, for fixed-width types.
NUMPY_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "|u1", 5: "<i2", 6: "|i1", 8: "<c8", 9: "<i8",
                10: "|b1", 17: "<u2", 18: "<c16", 19: "<f2", 22: "<u4", 23: "<u8"}  # fmt: skip
DTYPE_NAMES = {1: "DT_FLOAT", 2: "DT_DOUBLE", 3: "DT_INT32", 4: "DT_UINT8", 5: "DT_INT16", 6: "DT_INT8",
               7: "DT_STRING", 8: "DT_COMPLEX64", 9: "DT_INT64", 10: "DT_BOOL", 11: "DT_QINT8",
               12: "DT_QUINT8", 13: "DT_QINT32", 14: "DT_BFLOAT16", 15: "DT_QINT16", 16: "DT_QUINT16",
               17: "DT_UINT16", 18: "DT_COMPLEX128", 19: "DT_HALF", 20: "DT_RESOURCE", 21: "DT_VARIANT",
               22: "DT_UINT32", 23: "DT_UINT64"}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """One variable of the bundle (a decoded ``BundleEntryProto``).

    ``dtype`` is TensorFlow's ``DataType`` number (1 = float32); ``shape`` is the tensor's shape
    (``()`` for a scalar); ``offset``/``size`` locate its bytes in data shard ``shard_id``;
    ``crc32c`` is the masked CRC32C of those bytes; ``sliced`` marks a partitioned variable.
    """

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int
    sliced: bool

    @property
    def dtype_name(self) -> str:
        """TensorFlow's name of the entry's ``DataType`` enum (e.g. ``"float32"``), or
        ``"DataType N"`` for a code this reader does not know."""
        return DTYPE_NAMES.get(self.dtype, f"DataType {self.dtype}")


# --------------------------------------------------------------------------- encodings


def _varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    """A base-128 varint (at most 10 bytes) at ``pos``: ``(value, next position)``."""
    value = shift = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise ValueError(f"{what}: truncated varint at byte {pos}")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos + i + 1
        shift += 7
    raise ValueError(f"{what}: varint longer than 10 bytes at byte {pos}")


def _int64(v: int) -> int:
    """A varint read as a two's-complement int64 (protobuf's encoding of negative int64)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf: bytes, what: str) -> list[tuple[int, int | bytes]]:
    """The ``(field number, value)`` pairs of a serialized protobuf message: varint (0),
    fixed64 (1), fixed32 (5) as ints, length-delimited (2) as bytes."""
    out, pos = [], 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, what)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, what)
        elif wire == 1 or wire == 5:
            n = 8 if wire == 1 else 4
            if pos + n > len(buf):
                raise ValueError(f"{what}: truncated fixed{8 * n} field {field}")
            value, pos = int.from_bytes(buf[pos : pos + n], "little"), pos + n
        elif wire == 2:
            n, pos = _varint(buf, pos, what)
            if pos + n > len(buf):
                raise ValueError(f"{what}: field {field} runs past the end of the message")
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise ValueError(f"{what}: unsupported protobuf wire type {wire} (field {field})")
        out.append((field, value))
    return out


def _mask(crc: int) -> int:
    """LevelDB/TensorFlow's masked CRC: rotate right by 15 bits and add a constant."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc_ok(data: bytes, masked: int) -> bool | None:
    """Whether ``data`` has the masked CRC32C ``masked``; None when it cannot be checked."""
    if google_crc32c is None:
        return None
    return _mask(google_crc32c.value(bytes(data))) == masked


# --------------------------------------------------------------------------- SSTable


def _block(table: bytes, offset: int, size: int, path: Path) -> bytes:
    """The contents of the block at ``offset`` (``size`` bytes, then its 5-byte trailer)."""
    end = offset + size + BLOCK_TRAILER_BYTES
    if end > len(table) - FOOTER_BYTES:
        raise ValueError(f"{path}: block at byte {offset} (+{size} bytes) runs past the end of the "
                         f"file ({len(table)} bytes): the index is truncated or corrupted")  # fmt: skip
    contents = table[offset : offset + size]
    kind = table[offset + size]
    if kind != 0:
        name = _COMPRESSION.get(kind, f"unknown type {kind}")
        raise ValueError(f"{path}: block at byte {offset} is compressed ({name}); TensorFlow writes "
                         "bundle indexes uncompressed and only those are read here (or the file is "
                         "corrupted)")  # fmt: skip
    stored = int.from_bytes(table[offset + size + 1 : end], "little")
    if _crc_ok(table[offset : offset + size + 1], stored) is False:
        raise ValueError(f"{path}: checksum mismatch in the block at byte {offset}: the index is corrupted")
    return contents


def _entries(block: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """The key/value pairs of one block: prefix-compressed entries, then the restart array
    (uint32 offsets) and its length (uint32)."""
    if len(block) < 4:
        raise ValueError(f"{what}: block of {len(block)} bytes is too short")
    n_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 * (n_restarts + 1)
    if limit < 0:
        raise ValueError(f"{what}: {n_restarts} restart points do not fit in a {len(block)}-byte block")
    out, key, pos = [], b"", 0
    while pos < limit:
        shared, pos = _varint(block, pos, what)
        unshared, pos = _varint(block, pos, what)
        size, pos = _varint(block, pos, what)
        if shared > len(key) or pos + unshared + size > limit:
            raise ValueError(f"{what}: malformed entry at byte {pos} of a block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        out.append((key, block[pos : pos + size]))
        pos += size
    return out


def _read_table(path: Path) -> list[tuple[bytes, bytes]]:
    """Every key/value pair of an SSTable file, in key order."""
    table = path.read_bytes()
    if table.startswith(_LFS):
        raise ValueError(f"{path} is a Git LFS pointer, not the file: fetch it with `git lfs pull`")
    if len(table) < FOOTER_BYTES or int.from_bytes(table[-8:], "little") != TABLE_MAGIC:
        raise ValueError(f"{path} is not a TensorFlow checkpoint index (no SSTable footer; a V1 "
                         "checkpoint or another file?)")  # fmt: skip
    footer = table[-FOOTER_BYTES:]
    what = f"{path} (footer)"
    _, pos = _varint(footer, 0, what)  # metaindex handle: unused
    _, pos = _varint(footer, pos, what)
    index_offset, pos = _varint(footer, pos, what)
    index_size, pos = _varint(footer, pos, what)
    out = []
    for _, handle in _entries(_block(table, index_offset, index_size, path), f"{path} (index block)"):
        offset, p = _varint(handle, 0, f"{path} (block handle)")
        size, _ = _varint(handle, p, f"{path} (block handle)")
        out += _entries(_block(table, offset, size, path), f"{path} (data block at byte {offset})")
    return out


# --------------------------------------------------------------------------- the bundle


def _decode_shape(buf: bytes, what: str) -> tuple[int, ...]:
    """``TensorShapeProto``: repeated ``dim`` (2) with ``size`` (1); ``unknown_rank`` (3)."""
    dims = []
    for field, value in _fields(buf, what):
        if field == 2:
            size = next((_int64(v) for f, v in _fields(value, what) if f == 1), 0)
            if size < 0:
                raise ValueError(f"{what}: dimension of unknown size")
            dims.append(size)
        elif field == 3 and value:
            raise ValueError(f"{what}: shape of unknown rank")
    return tuple(dims)


def _decode_entry(name: str, buf: bytes, what: str) -> TensorEntry:
    """``BundleEntryProto``: dtype 1, shape 2, shard_id 3, offset 4, size 5, crc32c 6, slices 7."""
    f = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": 0, "sliced": False}
    for field, value in _fields(buf, what):
        if field == 1:
            f["dtype"] = value
        elif field == 2:
            f["shape"] = _decode_shape(value, what)
        elif field in (3, 4, 5):
            f[{3: "shard_id", 4: "offset", 5: "size"}[field]] = _int64(value)
        elif field == 6:
            f["crc32c"] = value
        elif field == 7:
            f["sliced"] = True
    return TensorEntry(name=name, **f)


def resolve_prefix(path: str | Path) -> Path:
    """The checkpoint prefix of ``path``.

    Accepts the prefix itself (``Model/Directx2``), one of its files (``Directx2.index``,
    ``Directx2.data-00000-of-00001``, ``Directx2.meta``), or a folder holding a TensorFlow
    ``checkpoint`` file (its ``model_checkpoint_path``) or exactly one ``*.index``.

    Raises:
        FileNotFoundError: no ``PREFIX.index`` there (the message names what was looked for).
    """
    p = Path(path)
    if p.is_dir():
        state = p / "checkpoint"
        text = state.read_text() if state.is_file() else ""
        found = re.search(r'^model_checkpoint_path:\s*"(.*)"', text, re.MULTILINE)
        if found:
            p = p / found.group(1) if not Path(found.group(1)).is_absolute() else Path(found.group(1))
        else:
            indexes = sorted(p.glob("*.index"))
            if len(indexes) != 1:
                raise FileNotFoundError(f"{str(path)!r} is a folder with {len(indexes)} *.index files and no "
                                        "TensorFlow 'checkpoint' file: give the checkpoint prefix")  # fmt: skip
            p = indexes[0]
    p = Path(re.sub(r"\.(index|meta|data-\d{5}-of-\d{5})$", "", str(p)))
    index = p.with_name(p.name + ".index")
    if not index.is_file():
        raise FileNotFoundError(f"no TensorFlow checkpoint at {str(path)!r}: {index} does not exist "
                                "(give the prefix, e.g. Model/Directx2 for Model/Directx2.index)")  # fmt: skip
    return p


class TensorBundle:
    """A TensorFlow V2 checkpoint opened for reading: its index is read at construction.

    Args:
        prefix: the checkpoint prefix, one of its files, or its folder (``resolve_prefix``).

    Attributes:
        prefix: the resolved prefix (``Path``).
        num_shards: data files of the checkpoint.
        entries: ``{name: TensorEntry}`` of every saved variable (Adam slots, step counters...).

    Raises:
        FileNotFoundError: no ``PREFIX.index``.
        ValueError: the index is not an uncompressed SSTable of bundle entries, fails its
            checksum (with ``google-crc32c``), or has no bundle header.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = resolve_prefix(prefix)
        index = self.prefix.with_name(self.prefix.name + ".index")
        pairs = _read_table(index)
        header = dict(pairs).get(b"")
        if header is None:
            raise ValueError(f"{index} has no bundle header (entry ''): not a TensorFlow tensor bundle")
        head = dict(_fields(header, f"{index} (header)"))
        self.num_shards = int(head.get(1, 1))
        self.big_endian = head.get(2, 0) == 1
        self.entries: dict[str, TensorEntry] = {}
        for key, value in pairs:
            if key:
                name = key.decode("utf-8", errors="replace")
                self.entries[name] = _decode_entry(name, value, f"{index} (entry {name!r})")

    def names(self) -> list[str]:
        """The variable names, sorted."""
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def data_file(self, shard: int) -> Path:
        """``PREFIX.data-0000S-of-0000N`` of shard ``shard``."""
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard:05d}-of-{self.num_shards:05d}")

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a native-endian numpy array of its shape and dtype.

        Raises:
            KeyError: no such variable (the message lists a few that exist).
            FileNotFoundError: its data file is missing.
            ValueError: a non-numeric dtype, a partitioned variable, a size that does not match
                shape x dtype, a truncated data file, or (with ``google-crc32c``) a checksum
                mismatch.
        """
        if name not in self.entries:
            near = ", ".join(self.names()[:8])
            raise KeyError(f"{name!r} is not in checkpoint {self.prefix} (it holds {len(self.entries)} "
                           f"variables: {near}{', ...' if len(self.entries) > 8 else ''})")  # fmt: skip
        e = self.entries[name]
        if e.dtype not in NUMPY_DTYPES:
            raise ValueError(f"{name} in {self.prefix}: dtype {e.dtype_name} is not supported (numeric "
                             "tensors only)")  # fmt: skip
        if e.sliced:
            raise ValueError(f"{name} in {self.prefix} is a partitioned variable (saved in slices): not supported")
        dtype = np.dtype(NUMPY_DTYPES[e.dtype])
        if self.big_endian:
            dtype = dtype.newbyteorder(">")
        expected = int(np.prod(e.shape, dtype=np.int64)) * dtype.itemsize
        if e.size != expected:
            raise ValueError(f"{name} in {self.prefix}: the index records {e.size} bytes but shape "
                             f"{e.shape} of {e.dtype_name} needs {expected}")  # fmt: skip
        path = self.data_file(e.shard_id)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} of checkpoint {self.prefix} does not exist")
        with open(path, "rb") as f:
            if f.read(len(_LFS)) == _LFS:
                raise ValueError(f"{path} is a Git LFS pointer, not the data: fetch it with `git lfs pull`")
            f.seek(e.offset)
            buf = f.read(e.size)
        if len(buf) != e.size:
            raise ValueError(f"{path} is truncated: {name} needs bytes {e.offset}..{e.offset + e.size} "
                             f"but the file has {path.stat().st_size}")  # fmt: skip
        if _crc_ok(buf, e.crc32c) is False:
            raise ValueError(f"{name} in {path}: checksum mismatch, the data file is corrupted")
        return np.frombuffer(buf, dtype=dtype).reshape(e.shape).astype(dtype.newbyteorder("="))


def read_bundle(prefix: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """``{name: array}`` of the variables ``names`` (all by default) of a TensorFlow checkpoint.

    Errors as ``TensorBundle`` and ``TensorBundle.read``; a missing name raises ``KeyError``.
    """
    bundle = TensorBundle(prefix)
    return {n: bundle.read(n) for n in (bundle.names() if names is None else names)}
