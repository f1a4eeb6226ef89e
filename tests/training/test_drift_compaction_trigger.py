"""A detected drift compacts on the drift grid: where it falls depends on the records, not on the polls.

The worker cuts its polls where ``records_until_due`` says, then reports a
drift after counting the batch. Whatever the batch sizes (random here), the
drift compaction falls on the first grid point at or after the end of the
batch that detected it, which with polls cut at the grid is the grid point
after the detected record: computed here independently of the trigger.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamtrainer.training.compaction import CompactionTrigger
from streamtrainer.training.exceptions import CompactionError

GRID, EVERY = 250, 2000


def _run(
    detections: set[int], seed: int, total: int = 9_000, grid: int = GRID, every: int = EVERY
) -> list[tuple[int, str]]:
    """(record count at the compaction, reason) with random poll sizes cut as the worker cuts them."""
    rng = np.random.default_rng(seed)
    trigger = CompactionTrigger(every_records=every, every_seconds=None, drift_every_records=grid)
    position, compactions = 0, []
    while position < total:
        budget = int(rng.integers(1, 700))
        until = trigger.records_until_due()
        assert until is not None
        budget = min(budget, until) if until > 0 else budget
        batch = range(position, min(total, position + budget))
        trigger.observe(len(batch))
        position = batch.stop
        if any(record in detections for record in batch):
            trigger.drift()
        if (reason := trigger.due()) is not None:
            compactions.append((position, reason))
            trigger.reset()
    return compactions


def _expected(
    detections: set[int], total: int = 9_000, grid: int = GRID, every: int = EVERY
) -> list[tuple[int, str]]:
    """The same schedule computed record by record: a drift compacts at the end of the grid cell
    holding the detected record (cells counted from the last compaction), or at the scheduled
    compaction if that comes first."""
    compactions, last, pending = [], 0, False
    for record in range(total):
        since = record + 1 - last
        pending = pending or record in detections
        if pending and (since % grid == 0 or since == every):
            compactions.append((record + 1, "drift"))
            last, pending = record + 1, False
        elif since == every:
            compactions.append((record + 1, "records"))
            last = record + 1
    return compactions


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("grid", "every"), [(GRID, EVERY), (1000, 700)])
def test_a_drift_compacts_at_the_same_record_whatever_the_polls(seed: int, grid: int, every: int) -> None:
    detections = {130, 1_999, 2_001, 4_321, 4_322, 7_777}
    expected = _expected(detections, grid=grid, every=every)
    assert ("drift" in {reason for _, reason in expected}) and ("records" in {r for _, r in expected})
    assert _run(detections, seed, grid=grid, every=every) == expected


def test_the_pending_drift_and_its_grid_point_survive_a_restore() -> None:
    trigger = CompactionTrigger(every_records=EVERY, every_seconds=None, drift_every_records=GRID)
    trigger.observe(610)
    trigger.drift()
    assert trigger.drift_due_at == 750 and trigger.due() is None
    restored = CompactionTrigger(every_records=EVERY, every_seconds=None, drift_every_records=GRID)
    restored.restore(trigger.records_since_compaction, drift_due_at=trigger.drift_due_at)
    assert restored.records_until_due() == 140
    restored.observe(140)
    assert restored.due() == "drift"
    restored.reset()
    assert restored.drift_due_at is None and restored.due() is None


def test_without_a_grid_a_drift_is_a_request_served_at_the_next_poll() -> None:
    trigger = CompactionTrigger(every_records=EVERY, every_seconds=None)
    assert trigger.records_until_due() == EVERY
    trigger.observe(17)
    trigger.drift()
    assert trigger.due() == "drift"
    trigger.reset()
    assert trigger.due() is None


def test_a_request_wins_over_a_pending_drift() -> None:
    trigger = CompactionTrigger(every_records=None, every_seconds=None, drift_every_records=GRID)
    trigger.observe(GRID)
    trigger.drift()
    trigger.request("http")
    assert trigger.due() == "http"
    trigger.reset()
    assert trigger.due() is None  # the compaction that ran served the drift too


def test_a_grid_below_one_is_refused() -> None:
    with pytest.raises(CompactionError):
        CompactionTrigger(every_records=None, every_seconds=None, drift_every_records=0)
