"""The compaction store: windows, deduplication, spills and retention, checked against plain-list oracles."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtrainer.training.compaction import CompactionStore, EpochData
from streamtrainer.training.exceptions import CompactionError, TrainingError

D = 4


class Oracle:
    """Every appended record as a plain list of rows: (partition, offset, key, label, features)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, bytes | None, float, list[float]]] = []
        self.next_offset: dict[int, int] = {}

    def batch(
        self, rng: np.random.Generator, n: int, partitions: int = 3, keys: list[bytes | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[bytes | None]]:
        part = rng.integers(0, partitions, n).astype(np.int32)
        offsets = np.empty(n, np.int64)
        for i, p in enumerate(part.tolist()):
            offsets[i] = self.next_offset.get(p, 1000 * p)  # partitions start at different offsets
            self.next_offset[p] = int(offsets[i]) + 1 + int(rng.integers(0, 2))  # gaps, as after compaction
        start = len(self.rows)
        features = (np.arange(start, start + n, dtype=np.float32)[:, None] + np.arange(D) / 10).astype(
            np.float32
        )
        labels = np.arange(start, start + n, dtype=np.float32) * -1
        if keys is None:
            keys = [None if k < 0 else b"key-%d" % k for k in rng.integers(-2, 6, n).tolist()]
        for i in range(n):
            self.rows.append((int(part[i]), int(offsets[i]), keys[i], float(labels[i]), features[i].tolist()))
        return features, labels, part, offsets, keys

    def window(
        self, last: int | None = None, since: dict[int, int] | None = None, dedupe: bool = False
    ) -> tuple[list[tuple[int, int, bytes | None, float, list[float]]], dict[int, tuple[int, int]]]:
        rows = [r for r in self.rows if since is None or r[1] >= since.get(r[0], -(2**62))]
        if last is not None:
            rows = rows[max(len(rows) - last, 0) :] if last else []
        ranges: dict[int, tuple[int, int]] = {}
        for p, o, *_ in rows:
            lo, hi = ranges.get(p, (o, o))
            ranges[p] = (min(lo, o), max(hi, o))
        if dedupe:
            newest = {r[2]: i for i, r in enumerate(rows) if r[2] is not None}
            rows = [r for i, r in enumerate(rows) if r[2] is None or newest[r[2]] == i]
        return rows, ranges


def assert_matches(data: EpochData, rows: list[tuple[int, int, bytes | None, float, list[float]]]) -> None:
    assert data.count == len(rows) == data.features.shape[0]
    assert data.features.dtype == np.float32 and data.labels.dtype == np.float32
    assert data.partitions.dtype == np.int32 and data.offsets.dtype == np.int64
    assert data.partitions.tolist() == [r[0] for r in rows]
    assert data.offsets.tolist() == [r[1] for r in rows]
    assert data.labels.tolist() == [r[3] for r in rows]
    if rows:
        np.testing.assert_array_equal(data.features, np.array([r[4] for r in rows], np.float32))


def fill(store: CompactionStore, oracle: Oracle, sizes: list[int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for n in sizes:
        features, labels, partitions, offsets, keys = oracle.batch(rng, n)
        store.append(features, labels, partitions, offsets, keys=keys)


# -- windows ---------------------------------------------------------------------------


def test_window_last_and_since_equal_the_oracle_across_spills(tmp_path: Path) -> None:
    oracle = Oracle()
    with CompactionStore(tmp_path / "store", memory_records=100, retain_records=None) as store:
        fill(store, oracle, [1, 37, 250, 99, 100, 3, 180, 64])
        assert store.total_records == len(oracle.rows) == 734
        assert store.records_in_memory == 734 % 100 and store.records_on_disk == 700
        assert len(store.shards) == 7
        for last in [0, 1, 33, 100, 101, 250, 734, 10_000]:
            rows, ranges = oracle.window(last=last)
            data = store.window(last=last)
            assert_matches(data, rows)
            assert data.ranges == ranges and data.dropped_duplicates == 0
        rows, ranges = oracle.window()
        everything = store.window()
        assert_matches(everything, rows)
        assert everything.ranges == ranges and set(ranges) == {0, 1, 2}
        for since in [{}, {0: 1100}, {1: 1200, 2: 2100}, {0: 0, 1: 0, 2: 0}, {0: 10**9, 1: 10**9, 2: 10**9}]:
            for last in [None, 50, 500]:
                rows, ranges = oracle.window(last=last, since=since)
                data = store.window(last=last, since=since)
                assert_matches(data, rows)
                assert data.ranges == ranges


def test_window_copies_are_the_callers(tmp_path: Path) -> None:
    oracle = Oracle()
    with CompactionStore(tmp_path, memory_records=10) as store:
        fill(store, oracle, [15])
        first = store.window()
        first.features[:] = -1.0
        first.labels[:] = 7.0
        assert_matches(store.window(), oracle.window()[0])


def test_window_reads_no_shard_outside_it(tmp_path: Path) -> None:
    oracle = Oracle()
    with CompactionStore(tmp_path, memory_records=50, retain_records=None) as store:
        fill(store, oracle, [50, 50, 50, 20])
        oldest, middle = store.shards[0], store.shards[1]
        # Were they read, these shards would raise now.
        for path in (oldest.path, middle.path):
            for column in path.glob("*.npy"):
                column.write_bytes(b"garbage")
        assert_matches(store.window(last=70), oracle.window(last=70)[0])  # memory + the newest shard
        since = {p: hi + 1 for p, (_, hi) in middle.ranges.items()}
        for p in oldest.ranges:
            since[p] = max(since.get(p, 0), oldest.ranges[p][1] + 1)
        assert_matches(store.window(since=since), oracle.window(since=since)[0])
        with pytest.raises(CompactionError, match="cannot read compaction shard"):
            store.window()


def test_empty_store_windows(tmp_path: Path) -> None:
    with CompactionStore(tmp_path) as store:
        data = store.window(last=10, dedupe_by_key=True)
        assert data.count == 0 and data.features.shape == (0, 0) and data.ranges == {}
        store.append(
            np.zeros((0, 3), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0)
        )
        assert store.window().features.shape == (0, 3)
        with pytest.raises(CompactionError):
            store.window(last=-1)


# -- deduplication ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.one_of(st.none(), st.sampled_from([b"a", b"b", b"c", b"", b"\x00" * 20])), max_size=60),
    memory_records=st.integers(1, 9),
    batch=st.integers(1, 13),
    last=st.one_of(st.none(), st.integers(0, 70)),
)
def test_dedupe_keeps_the_last_record_of_each_key(
    keys: list[bytes | None], memory_records: int, batch: int, last: int | None
) -> None:
    oracle = Oracle()
    rng = np.random.default_rng(len(keys))
    with (
        tempfile.TemporaryDirectory() as directory,
        CompactionStore(Path(directory), memory_records=memory_records, retain_records=None) as store,
    ):
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            features, labels, partitions, offsets, chunk_keys = oracle.batch(rng, len(chunk), keys=chunk)
            store.append(features, labels, partitions, offsets, keys=chunk_keys)
        rows, ranges = oracle.window(last=last, dedupe=True)
        data = store.window(last=last, dedupe_by_key=True)
        assert_matches(data, rows)
        window_rows = oracle.window(last=last)[0]
        assert data.dropped_duplicates == len(window_rows) - len(rows)
        assert data.ranges == ranges  # covered before deduplication


def test_dedupe_across_the_memory_shard_boundary(tmp_path: Path) -> None:
    with CompactionStore(tmp_path, memory_records=3, retain_records=None) as store:
        for i, key in enumerate([b"x", b"y", None, b"x", None, b"y", b"x"]):
            store.append(
                np.full((1, 2), i, np.float32),
                np.array([i], np.float32),
                np.zeros(1, np.int32),
                np.array([i]),
            )
            store.append(
                np.full((1, 2), 100 + i, np.float32),
                np.array([100 + i], np.float32),
                np.ones(1, np.int32),
                np.array([i]),
                keys=[key],
            )
        assert store.records_on_disk == 12 and store.records_in_memory == 2
        data = store.window(dedupe_by_key=True)
        # Unkeyed records all kept (partition 0 and the two None keys); each key's newest survives.
        assert data.labels.tolist() == [0, 1, 2, 102, 3, 4, 104, 5, 105, 6, 106]
        assert data.dropped_duplicates == 3
        assert data.ranges == {0: (0, 6), 1: (0, 6)}


# -- bounds and retention ----------------------------------------------------------------


def test_memory_and_disk_stay_bounded_over_a_long_stream(tmp_path: Path) -> None:
    d, batch, total, memory, retain = 16, 2000, 302_000, 5_000, 50_000
    directory = tmp_path / "store"
    elapsed = 0.0
    with CompactionStore(directory, memory_records=memory, retain_records=retain) as store:
        for start in range(0, total, batch):
            index = np.arange(start, start + batch)
            features = (index[:, None] * 16 + np.arange(d)).astype(np.float32)
            keys = [b"k%d" % (i % 1000) for i in index.tolist()]
            began = time.perf_counter()
            store.append(features, -index.astype(np.float32), (index % 4).astype(np.int32), index, keys=keys)
            elapsed += time.perf_counter() - began
            assert store.records_in_memory <= memory
            assert store.records_on_disk <= retain + memory  # the floor plus at most one shard
            if start >= retain + memory:
                assert store.records_on_disk >= retain
            files = list(directory.rglob("*"))
            # The lock, and per shard its folder, 7 columns and the sidecar.
            assert len(files) <= 1 + (retain // memory + 1) * 9
            assert store.bytes_on_disk == sum(
                f.stat().st_size for f in files if f.is_file() and f.name != ".lock"
            )
        assert store.records_in_memory == 2000 and store.total_records == retain + 2000
        data = store.window(last=20_000)
        expected = np.arange(total - 20_000, total)
        np.testing.assert_array_equal(data.offsets, expected)
        np.testing.assert_array_equal(data.labels, -expected.astype(np.float32))
        np.testing.assert_array_equal(
            data.features, (expected[:, None] * 16 + np.arange(d)).astype(np.float32)
        )
        assert data.ranges == {p: (total - 20_000 + p, total - 4 + p) for p in range(4)}
        assert store.window().offsets[0] == total - retain - 2000  # the oldest retained record
        assert store.window(dedupe_by_key=True).count == 1000
    per_row_us = elapsed / total * 1e6
    print(f"append: {per_row_us:.2f} us per row, keys hashed, spills included")
    assert per_row_us < 20  # a few us on a quiet machine; generous for a shared one
    assert not any(directory.glob("shard-*"))  # close() deletes the cache


def test_retention_by_bytes(tmp_path: Path) -> None:
    oracle = Oracle()
    with CompactionStore(tmp_path, memory_records=100, retain_records=None, retain_bytes=12_000) as store:
        fill(store, oracle, [100] * 10)
        assert 0 < store.bytes_on_disk <= 12_000
        assert store.records_on_disk == 100 * len(store.shards)
        assert_matches(store.window(), oracle.window(last=store.total_records)[0])


def test_retain_records_is_a_floor_whole_shards_above_it(tmp_path: Path) -> None:
    oracle = Oracle()
    with CompactionStore(tmp_path, memory_records=50, retain_records=120) as store:
        fill(store, oracle, [30] * 20)
        # 600 records: 12 spills of 50; the newest 3 shards (150 rows) are the fewest that hold 120.
        assert store.records_on_disk == 150 and store.records_in_memory == 0
        assert_matches(store.window(last=120), oracle.window(last=120)[0])


def test_memory_only_store(tmp_path: Path) -> None:
    oracle = Oracle()
    with CompactionStore(tmp_path, memory_records=100, retain_records=0) as store:
        fill(store, oracle, [150])
        assert store.records_on_disk == 0 and not store.shards and store.records_in_memory == 50
        assert_matches(store.window(), oracle.window(last=50)[0])


# -- files, lifecycle -------------------------------------------------------------------


def test_shards_are_columnar_npy_with_a_json_sidecar(tmp_path: Path) -> None:
    oracle = Oracle()
    with CompactionStore(tmp_path, memory_records=40, retain_records=None) as store:
        fill(store, oracle, [100])
        infos = store.shards
        assert [s.rows for s in infos] == [40, 40]
        for number, info in enumerate(infos):
            rows = oracle.rows[40 * number : 40 * (number + 1)]
            expected: dict[int, tuple[int, int]] = {}
            for p, o, *_ in rows:
                expected[p] = (min(expected.get(p, (o, o))[0], o), max(expected.get(p, (o, o))[1], o))
            assert info.ranges == expected
            sidecar = json.loads((info.path / "meta.json").read_text())
            assert sidecar["rows"] == 40
            assert {int(p): (v["first"], v["last"]) for p, v in sidecar["partitions"].items()} == expected
            offsets = np.load(info.path / "offsets.npy", allow_pickle=False)
            assert offsets.tolist() == [r[1] for r in rows]
            assert np.load(info.path / "key_hash.npy", allow_pickle=False).shape == (40, 2)
            assert info.size_bytes == sum(f.stat().st_size for f in info.path.iterdir())


def test_open_removes_leftovers_and_locks_the_directory(tmp_path: Path) -> None:
    (tmp_path / "shard-000000000007").mkdir()
    (tmp_path / "shard-000000000007" / "offsets.npy").write_bytes(b"stale")
    (tmp_path / ".tmp-abc").mkdir()
    (tmp_path / "notes.txt").write_text("not ours")
    with CompactionStore(tmp_path, memory_records=5) as store:
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "notes.txt"]
        assert store.total_records == 0
        with pytest.raises(CompactionError, match="in use"):
            CompactionStore(tmp_path)
    with CompactionStore(tmp_path):  # released on close
        pass


def test_clear_drop_partitions_and_close(tmp_path: Path) -> None:
    oracle = Oracle()
    store = CompactionStore(tmp_path, memory_records=50, retain_records=None)
    fill(store, oracle, [60, 60, 60])
    store.drop_partitions([1])
    oracle.rows = [r for r in oracle.rows if r[0] != 1]
    assert_matches(store.window(), oracle.window()[0])
    assert store.total_records == len(oracle.rows)
    assert all(1 not in s.ranges for s in store.shards)
    assert store.records_on_disk == sum(s.rows for s in store.shards)
    store.drop_partitions([0, 2])
    assert store.total_records == 0 and not store.shards and not list(tmp_path.glob("shard-*"))
    fill(store, oracle := Oracle(), [120])
    store.clear()
    assert store.total_records == 0 and store.bytes_on_disk == 0 and not list(tmp_path.glob("shard-*"))
    assert store.window().count == 0
    store.append(np.ones((2, 7), np.float32), np.ones(2, np.float32), np.zeros(2, np.int32), np.arange(2))
    assert store.n_features == 7  # a cleared store takes any width again
    store.close()
    store.close()
    with pytest.raises(CompactionError, match="closed"):
        store.window()


def test_bad_input_is_a_training_error(tmp_path: Path) -> None:
    with CompactionStore(tmp_path) as store:
        ok = (np.ones((2, 3), np.float32), np.ones(2, np.float32), np.zeros(2, np.int32), np.arange(2))
        store.append(*ok)
        with pytest.raises(TrainingError, match="columns"):
            store.append(np.ones((2, 4), np.float32), *ok[1:])
        with pytest.raises(CompactionError, match="labels"):
            store.append(ok[0], np.ones(3, np.float32), *ok[2:])
        with pytest.raises(CompactionError, match="keys"):
            store.append(*ok, keys=[b"a"])
        with pytest.raises(CompactionError, match="bytes"):
            store.append(*ok, keys=["a", None])  # type: ignore[list-item]
        store.append(*ok, keys=[b"a", None], timestamps=np.array([1, 2]))
        assert store.total_records == 4
    with pytest.raises(CompactionError):
        CompactionStore(tmp_path, memory_records=0)


def test_epoch_data_from_arrays_and_subset() -> None:
    data = EpochData.from_arrays(
        np.arange(12).reshape(6, 2), [0, 1, 0, 1, 0, 1], partitions=[0, 0, 1, 1, 0, 1]
    )
    assert data.count == 6 and data.n_features == 2
    assert data.ranges == {0: (0, 4), 1: (2, 5)}
    part = data.subset(np.array([1, 3]))
    assert part.offsets.tolist() == [1, 3] and part.ranges == {0: (1, 1), 1: (3, 3)}
    with pytest.raises(CompactionError):
        EpochData(data.features, data.labels[:2], data.partitions, data.offsets, {}, 6)
