"""Megatron-LM's indexed dataset format (MMIDIDX version 1): one `.bin` of token ids, one `.idx`.

`.idx` layout (little endian): magic ``MMIDIDX\\x00\\x00``, u64 version (1), u8 dtype code,
u64 sequence count, u64 document count, int32 sequence lengths, int64 byte pointers into the
`.bin`, int64 document indices (``[0, 1, ..., n]`` here: every sequence is one document).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kolm.errors import KolmError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_BLOCK = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits with Megatron's margin, else int32 (Megatron's rule)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def write_index(idx_path: str | os.PathLike, sizes_path: str | os.PathLike, dtype: np.dtype) -> None:
    """Write an `.idx` from a raw int32 file of document lengths, streaming in blocks.

    Memory stays bounded by the block size, whatever the number of documents.
    """
    dtype = np.dtype(dtype)
    count = os.path.getsize(sizes_path) // 4
    with open(idx_path, "wb") as out, open(sizes_path, "rb") as sizes:
        out.write(MAGIC)
        out.write(struct.pack("<Q", VERSION))
        out.write(struct.pack("<B", CODE_OF_DTYPE[dtype]))
        out.write(struct.pack("<Q", count))
        out.write(struct.pack("<Q", count + 1))
        for block in _int32_blocks(sizes):
            out.write(block.tobytes())
        sizes.seek(0)
        offset = 0
        for block in _int32_blocks(sizes):
            ends = np.cumsum(block, dtype=np.int64) * dtype.itemsize + offset
            starts = np.empty_like(ends)
            starts[0] = offset
            starts[1:] = ends[:-1]
            out.write(starts.tobytes())
            offset = int(ends[-1])
        for start in range(0, count + 1, _BLOCK):
            out.write(np.arange(start, min(count + 1, start + _BLOCK), dtype=np.int64).tobytes())
        out.flush()
        os.fsync(out.fileno())


def _int32_blocks(f):
    while True:
        data = f.read(_BLOCK * 4)
        if not data:
            return
        yield np.frombuffer(data, dtype=np.int32)


@dataclass
class Index:
    """A parsed `.idx`: dtype, per-document lengths and byte pointers (memory-mapped)."""

    path: Path
    dtype: np.dtype
    sizes: np.ndarray
    pointers: np.ndarray
    doc_idx: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))


def read_index(idx_path: str | os.PathLike) -> Index:
    """Parse and sanity-check an `.idx`; a malformed file raises KolmError naming it."""
    path = Path(idx_path)
    if not path.is_file():
        raise KolmError(f"{path}: index file is missing; re-run `kolm shard` to rebuild the shard")
    length = path.stat().st_size
    if length < HEADER_BYTES:
        raise KolmError(f"{path}: index is truncated ({length} bytes); re-run `kolm shard`")
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[: len(MAGIC)] != MAGIC:
        raise KolmError(f"{path}: not an MMIDIDX index (bad magic)")
    version, code, seq_count, doc_count = struct.unpack_from("<QBQQ", head, len(MAGIC))
    if version != VERSION or code not in DTYPE_CODES:
        raise KolmError(f"{path}: unsupported index version {version} or dtype code {code}")
    expected = HEADER_BYTES + seq_count * 4 + seq_count * 8 + doc_count * 8
    if length != expected:
        raise KolmError(
            f"{path}: index size {length} does not match its header (expected {expected}); "
            "the file is truncated or corrupt, re-run `kolm shard`"
        )
    mm = np.memmap(path, mode="r", dtype=np.uint8)
    off = HEADER_BYTES
    sizes = mm[off : off + seq_count * 4].view(np.int32)
    off += seq_count * 4
    pointers = mm[off : off + seq_count * 8].view(np.int64)
    off += seq_count * 8
    doc_idx = mm[off : off + doc_count * 8].view(np.int64)
    return Index(path, np.dtype(DTYPE_CODES[code]), sizes, pointers, doc_idx)


def open_tokens(bin_path: str | os.PathLike, dtype: np.dtype) -> np.ndarray:
    """Memory-map a `.bin` as a flat token array (an empty file maps to an empty array)."""
    path = Path(bin_path)
    if not path.is_file():
        raise KolmError(f"{path}: token file is missing; re-run `kolm shard` to rebuild the shard")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, mode="r", dtype=dtype)
