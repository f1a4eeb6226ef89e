"""What a checkpoint records of the compaction store and trigger, so that a restart compacts the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamtrainer.training.compaction import CompactionStore, CompactionTrigger
from streamtrainer.training.exceptions import CompactionError


def _filled(tmp_path: Path, rows: int = 1000, memory: int = 64) -> CompactionStore:
    """Three partitions interleaved, gaps in the offsets, spread over many shards and the memory buffer."""
    store = CompactionStore(tmp_path / "store", memory_records=memory, retain_records=rows)
    rng = np.random.default_rng(3)
    next_offset = {0: 0, 1: 500, 2: 9000}
    for size in rng.integers(1, 90, 40).tolist():
        partitions = rng.integers(0, 3, size).astype(np.int32)
        offsets = np.empty(size, np.int64)
        for i, p in enumerate(partitions.tolist()):
            offsets[i] = next_offset[p]
            next_offset[p] += 1 + int(rng.integers(0, 3) == 0)
        features = rng.normal(size=(size, 3)).astype(np.float32)
        store.append(features, features[:, 0].copy(), partitions, offsets)
    return store


@pytest.mark.parametrize("last", [None, 0, 1, 63, 64, 65, 700, 10_000])
def test_window_positions_are_the_rows_of_the_window(tmp_path: Path, last: int | None) -> None:
    with _filled(tmp_path) as store:
        assert store.shards  # some rows on disk, some in memory
        for since in (None, {0: 150}, {0: 150, 1: 700, 2: 10**9}):
            window = store.window(last=last, since=since)
            partitions, offsets = store.window_positions(last=last, since=since)
            assert partitions.dtype == np.int32 and offsets.dtype == np.int64
            assert partitions.tolist() == window.partitions.tolist()
            assert offsets.tolist() == window.offsets.tolist()


def test_window_positions_after_a_partition_is_dropped(tmp_path: Path) -> None:
    with _filled(tmp_path) as store:
        store.drop_partitions([1])
        partitions, offsets = store.window_positions(last=500)
        window = store.window(last=500)
        assert 1 not in set(partitions.tolist())
        assert (partitions.tolist(), offsets.tolist()) == (
            window.partitions.tolist(),
            window.offsets.tolist(),
        )
        with pytest.raises(CompactionError):
            store.window_positions(last=-1)


def test_trigger_restore_continues_the_count() -> None:
    trigger = CompactionTrigger(every_records=100, every_seconds=None)
    trigger.restore(70)
    assert trigger.records_since_compaction == 70 and trigger.records_until_due() == 30
    assert trigger.due() is None
    trigger.observe(30)
    assert trigger.due() == "records"
    trigger.restore(100)  # a checkpoint taken when the count was reached, before the compaction ran
    assert trigger.due() == "records"
    with pytest.raises(CompactionError):
        trigger.restore(-1)
