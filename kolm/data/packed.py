"""PackedDataset: a split's tokens as one stream, cut into ``seq_len + 1`` windows.

Window ``i`` is tokens ``[i*seq_len, i*seq_len + seq_len + 1)``: inputs are its first
``seq_len`` tokens and labels its last ``seq_len``, so no token is padding and only the final
partial window is dropped. The global sample order is a permutation of the windows drawn from
``(seed, epoch)`` alone; a data-parallel rank takes a contiguous slice of every global batch.
Hence the samples behind each optimizer step do not depend on the world size, and a run
resumed from ``consumed_samples`` sees exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator

import numpy as np

from kolm.data.indexed import open_tokens
from kolm.data.manifest import load_shard_dir
from kolm.errors import KolmError


class PackedDataset:
    def __init__(self, shard_dir: str | os.PathLike, split: str, seq_len: int, seed: int = 1234):
        if seq_len < 1:
            raise KolmError(f"seq_len must be positive, got {seq_len}")
        self.shard_dir = load_shard_dir(shard_dir)
        self.split, self.seq_len, self.seed = split, seq_len, seed
        entries = self.shard_dir.shards(split)
        dtype = self.shard_dir.dtype
        self._tokens, self._paths = [], []
        self.vocab_size = int(self.shard_dir.tokenizer["vocab_size"])
        for e in entries:
            index = self.shard_dir.shard_path(e, ".idx")
            if not index.is_file():
                raise KolmError(f"{index}: missing (every shard is a .bin and an .idx); restore it or rebuild with "
                                f"`kolm shard --overwrite`; `kolm shard verify {self.shard_dir.path}` checks the rest")
            path = self.shard_dir.shard_path(e, ".bin")
            if not path.is_file() or path.stat().st_size != e["bin_bytes"]:
                raise KolmError(
                    f"{path}: missing or not the size the manifest records; "
                    f"run `kolm shard verify {self.shard_dir.path}`"
                )
            self._tokens.append(open_tokens(path, dtype))
            self._paths.append(path)
        self._offsets = np.cumsum([0] + [len(t) for t in self._tokens], dtype=np.int64)
        self.total_tokens = int(self._offsets[-1])
        self.num_samples = max(0, (self.total_tokens - 1) // seq_len)
        if self.num_samples == 0:
            hint = " (raise --valid-fraction when sharding)" if split == "valid" else ""
            raise KolmError(
                f"{self.shard_dir.path}: split {split!r} has {self.total_tokens} tokens, "
                f"not enough for one window of seq_len {seq_len} + 1{hint}"
            )
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    @property
    def fingerprint(self) -> dict:
        """What a checkpoint records to detect a resume on different data."""
        manifest = self.shard_dir.path / "manifest.json"
        return {
            "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def __len__(self) -> int:
        return self.num_samples

    def window(self, i: int) -> np.ndarray:
        """Window ``i`` in stream order, as int64 of length ``seq_len + 1``."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"window {i} out of range [0, {self.num_samples})")
        return self._read(i * self.seq_len, self.seq_len + 1)

    def _read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self._offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            local = start + filled - int(self._offsets[k])
            piece = self._tokens[k][local : local + length - filled]
            self._check_ids(piece, k, local)
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            k += 1
        return out

    def _check_ids(self, piece: np.ndarray, k: int, local: int) -> None:
        """A corrupt byte must stop the run naming its file, not crash the embedding (or a GPU
        kernel) later. Opening checks sizes only: scanning billions of tokens would take minutes."""
        if len(piece) and int(piece.max()) >= self.vocab_size:
            first = int(np.argmax(piece >= self.vocab_size))
            raise KolmError(
                f"{self._paths[k]}: token {local + first} has id {int(piece[first])}, outside the vocabulary "
                f"({self.vocab_size}); the shard is corrupt. Run `kolm shard verify {self.shard_dir.path}`, then "
                "restore it or rebuild with `kolm shard --overwrite`; checkpoints so far are intact"
            )

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of windows in ``epoch``; depends only on (seed, epoch, num_samples)."""
        if self._perm_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm = rng.permutation(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def sample_index(self, g: int) -> int:
        """The window behind global sample ``g`` (epochs follow one another)."""
        epoch, pos = divmod(g, self.num_samples)
        return int(self.permutation(epoch)[pos])

    def samples(self, start: int, count: int) -> np.ndarray:
        """Global samples ``[start, start + count)`` stacked as ``(count, seq_len + 1)``."""
        return np.stack([self.window(self.sample_index(g)) for g in range(start, start + count)])

    def rank_batches(
        self, consumed_samples: int, global_batch: int, micro_batch: int, dp_rank: int, dp_world: int,
        batch_at: Callable[[int], int] | None = None,
    ) -> Iterator[np.ndarray]:
        return rank_batches(self.samples, consumed_samples, global_batch, micro_batch, dp_rank, dp_world, batch_at)

    def eval_batches(
        self, micro_batch: int, dp_rank: int, dp_world: int, max_samples: int | None = None
    ) -> Iterator[tuple[np.ndarray, bool]]:
        """``(windows, scored)`` for this rank: the windows of :func:`eval_split` in stream order (no
        shuffle); a padding batch (``scored`` False) holds window 0, to be run but not counted."""
        n = self.num_samples if max_samples is None else min(max(max_samples, 0), self.num_samples)
        for windows in eval_split(n, micro_batch, dp_rank, dp_world):
            if windows:
                yield np.stack([self.window(i) for i in windows]), True
            else:
                yield self.window(0)[None], False


def eval_split(windows: int, micro_batch: int, dp_rank: int, dp_world: int) -> list[range]:
    """The windows behind each of rank ``dp_rank``'s evaluation batches: rank ``r`` takes every
    ``dp_world``-th batch of ``micro_batch`` windows, and every rank gets the same number of
    batches, a rank short of one an empty range (a padding batch). Under ZeRO-3 each forward gathers
    the parameters from all ranks, so a rank with one forward more would wait for the others forever."""
    if min(micro_batch, dp_world) < 1 or not 0 <= dp_rank < dp_world:
        raise KolmError(f"no evaluation layout for micro batch {micro_batch}, rank {dp_rank} of {dp_world}")
    stride = micro_batch * dp_world
    rounds = -(-max(windows, 0) // stride)
    starts = (k * stride + dp_rank * micro_batch for k in range(rounds))
    return [range(min(s, windows), min(s + micro_batch, windows)) for s in starts]


def rank_batches(samples: Callable[[int, int], np.ndarray], consumed_samples: int, global_batch: int,
                 micro_batch: int, dp_rank: int, dp_world: int,
                 batch_at: Callable[[int], int] | None = None) -> Iterator[np.ndarray]:
    """Micro-batches of the global sample stream ``samples(start, count)`` for one data-parallel
    rank, from ``consumed_samples`` on, forever.

    Each global batch is split into ``dp_world`` contiguous slices; rank ``r`` takes slice ``r`` in
    micro-batches of ``micro_batch`` (its gradient accumulation steps, in order). The batch is
    ``global_batch``, or ``batch_at(consumed)`` for a schedule that changes it (a batch ramp): each
    step then covers the next ``batch_at(consumed)`` samples of the same stream.
    """
    check_batch_layout(global_batch, micro_batch, dp_world)
    if not 0 <= dp_rank < dp_world:
        raise KolmError(f"data-parallel rank {dp_rank} is outside [0, {dp_world})")
    if batch_at is None and consumed_samples % global_batch:
        raise KolmError(
            f"consumed_samples {consumed_samples} is not a multiple of the global batch {global_batch}: "
            "a run can only resume on a step boundary with the same global batch"
        )
    consumed = consumed_samples
    while True:
        batch = global_batch if batch_at is None else batch_at(consumed)
        per_rank = check_batch_layout(batch, micro_batch, dp_world) * micro_batch
        base = consumed + dp_rank * per_rank
        for a in range(per_rank // micro_batch):
            yield samples(base + a * micro_batch, micro_batch)
        consumed += batch


def check_batch_layout(global_batch: int, micro_batch: int, dp_world: int) -> int:
    """Gradient accumulation steps for a layout, or a clear error when it is impossible."""
    if min(global_batch, micro_batch, dp_world) < 1:
        raise KolmError("global_batch, micro_batch and the data-parallel size must all be positive")
    if global_batch % (micro_batch * dp_world):
        raise KolmError(
            f"global batch {global_batch} is not divisible by micro batch {micro_batch} x "
            f"{dp_world} data-parallel ranks = {micro_batch * dp_world}; choose a global batch that is a "
            "multiple of it, or change the micro batch"
        )
    return global_batch // (micro_batch * dp_world)
