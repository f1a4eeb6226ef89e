"""Consumed records kept for batch epochs ("compaction"): a bounded memory buffer that spills to disk.

The worker learns from each record once, as it arrives. A compaction
revisits the recent past: it replays a window of records for a few
mini-batch epochs. :class:`CompactionStore` keeps those records, already
decoded to arrays, so a replay needs neither the broker nor the codec.

Layout and bounds:

* up to ``memory_records`` rows in memory, as the list of the (copied) arrays
  of each ``append`` call: an append is a copy, never a reallocation;
* when that buffer is full it is spilled to one shard on disk, a directory of
  columnar ``.npy`` files (features, labels, partitions, offsets, key hash,
  has_key, timestamps) and a JSON sidecar with the row count and the offset
  range of each partition. A shard is written under a temporary name and
  renamed into place, so a shard that is visible is complete;
* after a spill the oldest shards are deleted while the newer ones still hold
  ``retain_records`` records, or while the disk holds more than ``retain_bytes``
  bytes. So the newest ``retain_records`` records on disk are always kept
  (a window of that size stays whole; ``retain_bytes``, a hard budget, wins),
  the disk holds less than ``retain_records`` plus one shard, and memory and
  disk stay bounded whatever the length of the stream (``retain_records=0``:
  memory only, between 0 and ``memory_records`` records);
* shards are read back memory-mapped (``np.load(mmap_mode="r",
  allow_pickle=False)``): a window reads only the pages of the rows it needs,
  and shards outside it are not opened at all.

The store is a cache of the Kafka log, not durable state: the checkpoint is the
durable state, and whatever the store lost can be read again from the topic.
So it does not fsync, it deletes its shards when closed, and on open it removes
the leftovers of a previous process instead of trusting them.

Record keys are kept as a 128-bit BLAKE2b digest (two uint64 columns) and a
``has_key`` flag, never as the raw bytes: fixed-width columns, bounded size,
and a collision is as unlikely as a random 128-bit match. Records without a
key are never deduplicated.

The store is not thread-safe: one worker thread owns it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

import numpy as np
import numpy.typing as npt

from streamtrainer.training.exceptions import CompactionError

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Bools = npt.NDArray[np.bool_]
Ranges = dict[int, tuple[int, int]]

FORMAT: Final = "streamtrainer-compaction-shard/1"
NO_TIMESTAMP: Final = -1  # Kafka's "no timestamp"
COLUMNS: Final = ("features", "labels", "partitions", "offsets", "key_hash", "has_key", "timestamps")
_SHARD_PREFIX: Final = "shard-"
_TEMP_PREFIX: Final = ".tmp-"
_LOCK_NAME: Final = ".lock"
_META_NAME: Final = "meta.json"
_NO_KEY: Final = bytes(16)
_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "features": np.dtype(np.float32),
    "labels": np.dtype(np.float32),
    "partitions": np.dtype(np.int32),
    "offsets": np.dtype(np.int64),
    "key_hash": np.dtype(np.uint64),
    "has_key": np.dtype(np.bool_),
    "timestamps": np.dtype(np.int64),
}


# -- what a window hands out --------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EpochData:
    """Records for batch epochs, in arrival order; the arrays are copies the caller owns.

    ``ranges`` maps each partition to the first and last offset the window
    covered *before* deduplication (what a log line or a metric reports as
    "compacted offsets p:a..b"); ``count`` is the number of rows after it.
    """

    features: F32
    labels: F32
    partitions: I32
    offsets: I64
    ranges: Ranges
    count: int
    dropped_duplicates: int = 0

    def __post_init__(self) -> None:
        n = self.count
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise CompactionError(f"features must be ({n}, d), got {self.features.shape}")
        for name in ("labels", "partitions", "offsets"):
            shape = getattr(self, name).shape
            if shape != (n,):
                raise CompactionError(f"{name} must be ({n},), got {shape}")

    def __len__(self) -> int:
        return self.count

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    @classmethod
    def from_arrays(
        cls,
        features: npt.ArrayLike,
        labels: npt.ArrayLike,
        *,
        partitions: npt.ArrayLike | None = None,
        offsets: npt.ArrayLike | None = None,
    ) -> EpochData:
        """Data from elsewhere than a store (tests, a replay); by default partition 0 at offsets 0, 1, ..."""
        x = np.array(features, dtype=np.float32, copy=True, ndmin=2)
        y = np.array(labels, dtype=np.float32, copy=True).reshape(-1)
        n = y.shape[0]
        p = np.zeros(n, np.int32) if partitions is None else np.array(partitions, dtype=np.int32).reshape(-1)
        o = np.arange(n, dtype=np.int64) if offsets is None else np.array(offsets, dtype=np.int64).reshape(-1)
        return cls(x, y, p, o, offset_ranges(p, o), n)

    @classmethod
    def empty(cls, n_features: int = 0) -> EpochData:
        return cls.from_arrays(np.empty((0, n_features), np.float32), np.empty(0, np.float32))

    def subset(self, index: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> EpochData:
        """The rows at ``index`` (in that order), with their own ranges."""
        partitions, offsets = self.partitions[index], self.offsets[index]
        return EpochData(
            self.features[index],
            self.labels[index],
            partitions,
            offsets,
            offset_ranges(partitions, offsets),
            int(offsets.shape[0]),
        )


@dataclass(frozen=True)
class ShardInfo:
    """A shard on disk: its live rows and, per live partition, the first and last offset it holds."""

    path: Path
    rows: int
    ranges: Ranges
    size_bytes: int


# -- internals ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Columns:
    """One block of rows, column by column (the same columns in memory and on disk)."""

    features: F32
    labels: F32
    partitions: I32
    offsets: I64
    key_hash: U64  # (n, 2): the 128-bit digest of the key, zero when there is none
    has_key: Bools
    timestamps: I64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: slice | npt.NDArray[Any]) -> _Columns:
        return _Columns(*(getattr(self, name)[index] for name in COLUMNS))

    def tail(self, n: int) -> _Columns:
        return self.select(slice(len(self) - n, None))

    @staticmethod
    def concat(parts: Sequence[_Columns], n_features: int) -> _Columns:
        """Copies into fresh arrays (reading mapped shards into memory), even for a single part."""
        if not parts:
            return _Columns(
                np.empty((0, n_features), np.float32),
                *(np.empty((0, 2) if name == "key_hash" else 0, _DTYPES[name]) for name in COLUMNS[1:]),
            )
        return _Columns(*(np.concatenate([getattr(p, name) for p in parts]) for name in COLUMNS))


@dataclass
class _Shard:
    path: Path
    rows: int  # as written
    ranges: Ranges  # per partition, as written
    counts: dict[int, int]  # rows per partition, as written
    size_bytes: int
    excluded: set[int] = field(default_factory=set)  # partitions dropped since it was written

    @property
    def live_rows(self) -> int:
        return self.rows - sum(self.counts.get(p, 0) for p in self.excluded)

    @property
    def live_ranges(self) -> Ranges:
        return {p: r for p, r in self.ranges.items() if p not in self.excluded}

    def may_hold(self, since: Mapping[int, int]) -> bool:
        """Whether a ``since`` selection can pick any row of this shard, from the sidecar alone."""
        return any(p not in since or last >= since[p] for p, (_, last) in self.live_ranges.items())

    def load(self) -> _Columns:
        try:
            arrays = [
                np.load(self.path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in COLUMNS
            ]
        except (OSError, ValueError) as exc:
            raise CompactionError(f"cannot read compaction shard {self.path}: {exc}") from exc
        columns = _Columns(*arrays)
        if any(a.shape[0] != self.rows for a in arrays):
            raise CompactionError(f"compaction shard {self.path} does not hold the {self.rows} rows it names")
        if self.excluded:
            columns = columns.select(~np.isin(columns.partitions, list(self.excluded)))
        return columns


def offset_ranges(partitions: npt.NDArray[np.integer[Any]], offsets: I64) -> Ranges:
    """Partition -> (smallest, largest) offset, in O(n log n) whatever the number of partitions."""
    return {p: (lo, hi) for p, (lo, hi, _) in _partition_stats(partitions, offsets).items()}


def _partition_stats(
    partitions: npt.NDArray[np.integer[Any]], offsets: I64
) -> dict[int, tuple[int, int, int]]:
    if partitions.shape[0] == 0:
        return {}
    order = np.argsort(partitions, kind="stable")
    sorted_partitions = partitions[order]
    sorted_offsets = np.asarray(offsets)[order]
    starts = np.flatnonzero(np.r_[True, sorted_partitions[1:] != sorted_partitions[:-1]])
    lows = np.minimum.reduceat(sorted_offsets, starts)
    highs = np.maximum.reduceat(sorted_offsets, starts)
    counts = np.diff(np.r_[starts, sorted_partitions.shape[0]])
    return {
        int(p): (int(lo), int(hi), int(c))
        for p, lo, hi, c in zip(sorted_partitions[starts], lows, highs, counts, strict=True)
    }


def _since_mask(partitions: I32, offsets: I64, since: Mapping[int, int]) -> Bools:
    """Rows with offset >= since[partition]; rows of partitions not in ``since`` all pass."""
    if not since:
        return np.ones(partitions.shape[0], dtype=bool)
    keys = np.array(sorted(since), dtype=np.int64)
    floors = np.array([since[int(k)] for k in keys], dtype=np.int64)
    slot = np.minimum(np.searchsorted(keys, partitions), keys.shape[0] - 1)
    listed = keys[slot] == partitions
    threshold = np.where(listed, floors[slot], np.iinfo(np.int64).min)
    mask: Bools = np.asarray(offsets) >= threshold
    return mask


def _last_of_each_key(columns: _Columns) -> Bools:
    """Keep-mask: unkeyed rows, and the last row (arrival order) of each key."""
    n = len(columns)
    keep = np.ones(n, dtype=bool)
    keyed = np.flatnonzero(columns.has_key)
    if keyed.shape[0] < 2:
        return keep
    hi, lo = columns.key_hash[keyed, 0], columns.key_hash[keyed, 1]
    order = np.lexsort((keyed, lo, hi))  # by key, then arrival: the last of a run is the newest
    hi_sorted, lo_sorted = hi[order], lo[order]
    last_of_run = np.r_[(hi_sorted[1:] != hi_sorted[:-1]) | (lo_sorted[1:] != lo_sorted[:-1]), True]
    keep[keyed[order[~last_of_run]]] = False
    return keep


def hash_keys(keys: Sequence[bytes | None]) -> tuple[U64, Bools]:
    """128-bit BLAKE2b digests of the keys as (n, 2) uint64, and which records have a key."""
    n = len(keys)
    has_key = np.fromiter((k is not None for k in keys), dtype=bool, count=n)
    try:
        digests = b"".join(
            _NO_KEY if k is None else hashlib.blake2b(k, digest_size=16).digest() for k in keys
        )
    except TypeError as exc:
        raise CompactionError(f"record keys must be bytes or None: {exc}") from exc
    key_hash: U64 = np.frombuffer(digests, dtype="<u8").reshape(n, 2).astype(np.uint64)
    return key_hash, has_key


# -- the store ----------------------------------------------------------------------


class CompactionStore:
    """Decoded records of one topic for later batch epochs; owns ``directory`` (see the module docstring).

    ``memory_records``: rows held in memory, and the rows of each shard.
    ``retain_records``: the newest records kept on disk whole (None: no floor-based deletion;
    0: memory only). ``retain_bytes``: a ceiling on the disk use (None: none). Both None: the
    disk grows with the stream. Give ``retain_records`` at least the window the worker replays.
    """

    def __init__(
        self,
        directory: Path,
        *,
        memory_records: int = 50_000,
        retain_records: int | None = 1_000_000,
        retain_bytes: int | None = None,
    ) -> None:
        if memory_records < 1:
            raise CompactionError(f"memory_records must be >= 1, got {memory_records}")
        if retain_records is not None and retain_records < 0:
            raise CompactionError(f"retain_records must be >= 0 or None, got {retain_records}")
        if retain_bytes is not None and retain_bytes < 0:
            raise CompactionError(f"retain_bytes must be >= 0 or None, got {retain_bytes}")
        self.directory = Path(directory)
        self.memory_records = memory_records
        self.retain_records = retain_records
        self.retain_bytes = retain_bytes
        self._chunks: list[_Columns] = []
        self._memory_rows = 0
        self._shards: deque[_Shard] = deque()
        self._disk_rows = 0
        self._disk_bytes = 0
        self._next_shard = 0
        self._n_features: int | None = None
        self._lock: IO[bytes] | None = self._open()

    # -- lifecycle ----------------------------------------------------------------

    def _open(self) -> IO[bytes]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = open(self.directory / _LOCK_NAME, "a+b")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise CompactionError(f"cannot use compaction directory {self.directory}: {exc}") from exc
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise CompactionError(
                f"compaction directory {self.directory} is in use by another worker "
                "(give each worker its own directory)"
            ) from None
        # Leftovers of a previous process are a stale cache of the log: the checkpoint, not
        # these shards, says where training stands, so they are removed rather than trusted.
        # Only names this store writes are touched, in case it was pointed at a shared folder.
        leftovers = [p for p in self.directory.iterdir() if p.name.startswith((_SHARD_PREFIX, _TEMP_PREFIX))]
        for path in leftovers:
            _remove(path)
        if leftovers:
            logger.info("removed %d leftover compaction shard(s) from %s", len(leftovers), self.directory)
        return lock

    def close(self) -> None:
        """Delete the shards (a cache nobody will read again) and release the directory."""
        if self._lock is None:
            return
        self.clear()
        self._lock.close()
        self._lock = None

    def __enter__(self) -> CompactionStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- sizes ----------------------------------------------------------------------

    @property
    def records_in_memory(self) -> int:
        return self._memory_rows

    @property
    def records_on_disk(self) -> int:
        return self._disk_rows

    @property
    def bytes_on_disk(self) -> int:
        return self._disk_bytes

    @property
    def total_records(self) -> int:
        """Records a window can see now (memory and disk)."""
        return self._memory_rows + self._disk_rows

    @property
    def n_features(self) -> int | None:
        """The feature count fixed by the first append (None while empty)."""
        return self._n_features

    @property
    def shards(self) -> list[ShardInfo]:
        """Shards on disk, oldest first."""
        return [ShardInfo(s.path, s.live_rows, s.live_ranges, s.size_bytes) for s in self._shards]

    # -- writing ---------------------------------------------------------------------

    def append(  # noqa: PLR0917 - one column per argument, as the worker holds them
        self,
        features: npt.NDArray[np.float32],
        labels: npt.NDArray[np.float32],
        partitions: npt.NDArray[np.int32],
        offsets: npt.NDArray[np.int64],
        keys: Sequence[bytes | None] | None = None,
        timestamps: npt.NDArray[np.int64] | None = None,
    ) -> None:
        """Keep a batch of records (copied: the caller may reuse its buffers).

        May spill to disk, which raises :class:`CompactionError` when the disk
        fails; the store then stays consistent but has lost the rows it could not
        spill (a cache: the caller may log it and carry on).
        """
        self._check_open()
        columns = self._columns(features, labels, partitions, offsets, keys=keys, timestamps=timestamps)
        n, start = len(columns), 0
        while start < n:
            take = min(self.memory_records - self._memory_rows, n - start)
            self._chunks.append(columns if take == n else columns.select(slice(start, start + take)))
            self._memory_rows += take
            start += take
            if self._memory_rows >= self.memory_records:
                self._spill()

    def _columns(
        self,
        features: npt.NDArray[np.float32],
        labels: npt.NDArray[np.float32],
        partitions: npt.NDArray[np.int32],
        offsets: npt.NDArray[np.int64],
        *,
        keys: Sequence[bytes | None] | None,
        timestamps: npt.NDArray[np.int64] | None,
    ) -> _Columns:
        x = np.array(features, dtype=np.float32, copy=True, order="C")
        if x.ndim != 2:
            raise CompactionError(f"features must be (n, d), got shape {x.shape}")
        n, d = x.shape
        if self._n_features is not None and d != self._n_features and self.total_records:
            raise CompactionError(f"features have {d} columns, the store holds rows of {self._n_features}")
        columns: dict[str, npt.NDArray[Any]] = {
            "labels": np.array(labels, dtype=np.float32, copy=True),
            "partitions": np.array(partitions, dtype=np.int32, copy=True),
            "offsets": np.array(offsets, dtype=np.int64, copy=True),
            "timestamps": (
                np.full(n, NO_TIMESTAMP, np.int64)
                if timestamps is None
                else np.array(timestamps, dtype=np.int64, copy=True)
            ),
        }
        for name, array in columns.items():
            if array.shape != (n,):
                raise CompactionError(f"{name} must have shape ({n},), got {array.shape}")
        if keys is None:
            key_hash, has_key = np.zeros((n, 2), np.uint64), np.zeros(n, bool)
        else:
            if len(keys) != n:
                raise CompactionError(f"got {len(keys)} keys for {n} records")
            key_hash, has_key = hash_keys(keys)
        self._n_features = d
        return _Columns(
            x,
            columns["labels"],
            columns["partitions"],
            columns["offsets"],
            key_hash,
            has_key,
            columns["timestamps"],
        )

    def _spill(self) -> None:
        """Write the memory buffer as one shard, then enforce retention."""
        block = _Columns.concat(self._chunks, self._n_features or 0)
        self._chunks.clear()
        self._memory_rows = 0
        if self.retain_records == 0 or self.retain_bytes == 0:
            return  # a memory-only store: the shard would be deleted at once
        shard = self._write_shard(block)
        self._shards.append(shard)
        self._disk_rows += shard.live_rows
        self._disk_bytes += shard.size_bytes
        self._enforce_retention()

    def _write_shard(self, block: _Columns) -> _Shard:
        final = self.directory / f"{_SHARD_PREFIX}{self._next_shard:012d}"
        self._next_shard += 1
        temp = self.directory / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        stats = _partition_stats(block.partitions, block.offsets)
        sidecar = {
            "format": FORMAT,
            "rows": len(block),
            "n_features": int(block.features.shape[1]),
            "partitions": {str(p): {"first": lo, "last": hi, "rows": c} for p, (lo, hi, c) in stats.items()},
        }
        try:
            temp.mkdir()
            size = 0
            for name in COLUMNS:
                path = temp / f"{name}.npy"
                np.save(path, getattr(block, name), allow_pickle=False)
                size += path.stat().st_size
            (temp / _META_NAME).write_text(json.dumps(sidecar, sort_keys=True))
            size += (temp / _META_NAME).stat().st_size
            # No fsync: a crash loses the cache, never the checkpoint, and the next open clears it.
            os.rename(temp, final)
        except OSError as exc:
            _remove(temp)
            logger.error("cannot spill %d records to %s: %s", len(block), final, exc)
            raise CompactionError(f"cannot spill {len(block)} records to {final}: {exc}") from exc
        logger.debug("spilled %d records to %s (%d bytes)", len(block), final, size)
        return _Shard(
            final,
            len(block),
            {p: (lo, hi) for p, (lo, hi, _) in stats.items()},
            {p: c for p, (_, _, c) in stats.items()},
            size,
        )

    def _enforce_retention(self) -> None:
        # retain_records is a floor (a window of that many records must stay whole), so a shard
        # goes only when the newer ones still hold that many; retain_bytes is a ceiling (a disk
        # budget), so it goes whenever the disk is over it.
        while self._shards:
            spare = self._disk_rows - self._shards[0].live_rows
            if not (
                (self.retain_records is not None and spare >= self.retain_records)
                or (self.retain_bytes is not None and self._disk_bytes > self.retain_bytes)
            ):
                break
            self._delete_shard(self._shards.popleft())

    def _delete_shard(self, shard: _Shard) -> None:
        self._disk_rows -= shard.live_rows
        self._disk_bytes -= shard.size_bytes
        _remove(shard.path)

    def clear(self) -> None:
        """Forget every record (after a rollback, the retained records no longer match the model)."""
        self._chunks.clear()
        self._memory_rows = 0
        while self._shards:
            self._delete_shard(self._shards.popleft())
        self._n_features = None

    def drop_partitions(self, partitions: Iterable[int]) -> None:
        """Forget the records of ``partitions`` (revoked: another worker trains on them now).

        Shards are not rewritten: their dropped rows are masked out when read,
        and a shard left with no live rows is deleted.
        """
        dropped = {int(p) for p in partitions}
        if not dropped:
            return
        self._check_open()
        wanted = np.array(sorted(dropped), dtype=np.int32)
        kept_chunks = [c.select(~np.isin(c.partitions, wanted)) for c in self._chunks]
        self._chunks = [c for c in kept_chunks if len(c)]
        self._memory_rows = sum(len(c) for c in self._chunks)
        survivors: deque[_Shard] = deque()
        for shard in self._shards:
            hit = dropped & (shard.counts.keys() - shard.excluded)
            if hit:
                self._disk_rows -= sum(shard.counts[p] for p in hit)
                shard.excluded |= hit
            if shard.live_rows == 0:
                self._disk_bytes -= shard.size_bytes
                _remove(shard.path)
            else:
                survivors.append(shard)
        self._shards = survivors

    # -- reading --------------------------------------------------------------------

    def window(
        self,
        *,
        last: int | None = None,
        since: Mapping[int, int] | None = None,
        dedupe_by_key: bool = False,
    ) -> EpochData:
        """Retained records in arrival order, copied into memory.

        ``since``: only records with offset >= ``since[partition]`` (partitions
        not in the mapping: all their records). ``last``: only the newest
        ``last`` of those. Neither: everything retained. ``dedupe_by_key``: then
        keep only the newest record of each key (Kafka log compaction; records
        without a key are all kept). Shards outside the window are not read.
        """
        self._check_open()
        if last is not None and last < 0:
            raise CompactionError(f"last must be >= 0, got {last}")
        parts: list[_Columns] = []
        collected = 0
        segments = self._segments_newest_first(since)
        while last is None or collected < last:  # checked before a shard is opened, not after
            segment = next(segments, None)
            if segment is None:
                break
            rows = segment
            if since is not None:
                rows = rows.select(_since_mask(rows.partitions, rows.offsets, since))
            if last is not None and collected + len(rows) > last:
                rows = rows.tail(last - collected)
            if len(rows):
                parts.append(rows)
                collected += len(rows)
        parts.reverse()
        block = _Columns.concat(parts, self._n_features or 0)
        ranges = offset_ranges(block.partitions, block.offsets)
        dropped = 0
        if dedupe_by_key:
            keep = _last_of_each_key(block)
            dropped = int(keep.shape[0] - np.count_nonzero(keep))
            if dropped:
                block = block.select(keep)
        return EpochData(
            block.features, block.labels, block.partitions, block.offsets, ranges, len(block), dropped
        )

    def window_positions(
        self, *, last: int | None = None, since: Mapping[int, int] | None = None
    ) -> tuple[I32, I64]:
        """Partition and offset of each row :meth:`window` would take (before deduplication), in order.

        Only those two columns are read: what a checkpoint records so that a
        restarted worker can read the same rows back from the log.
        """
        self._check_open()
        if last is not None and last < 0:
            raise CompactionError(f"last must be >= 0, got {last}")
        partitions: list[I32] = []
        offsets: list[I64] = []
        collected = 0
        segments = self._segments_newest_first(since)
        while last is None or collected < last:
            segment = next(segments, None)
            if segment is None:
                break
            p, o = segment.partitions, segment.offsets
            if since is not None:
                mask = _since_mask(p, o, since)
                p, o = p[mask], o[mask]
            if last is not None and collected + p.shape[0] > last:
                keep = last - collected
                p, o = p[p.shape[0] - keep :], o[o.shape[0] - keep :]
            if p.shape[0]:
                partitions.append(np.array(p, dtype=np.int32))
                offsets.append(np.array(o, dtype=np.int64))
                collected += int(p.shape[0])
        partitions.reverse()
        offsets.reverse()
        if not partitions:
            return np.empty(0, np.int32), np.empty(0, np.int64)
        return np.concatenate(partitions), np.concatenate(offsets)

    def _segments_newest_first(self, since: Mapping[int, int] | None) -> Iterator[_Columns]:
        yield from reversed(self._chunks)
        for shard in reversed(self._shards):
            if since is None or shard.may_hold(since):
                yield shard.load()

    def _check_open(self) -> None:
        if self._lock is None:
            raise CompactionError(f"the compaction store of {self.directory} is closed")


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:  # a leftover costs disk space, not correctness
        logger.warning("cannot remove %s: %s", path, exc)
