"""How many records the worker's next poll may take (pure logic: no broker)."""

from __future__ import annotations

from pathlib import Path

from streamtrainer.consumer import Worker
from streamtrainer.settings import WorkerSettings


def _worker(tmp_path: Path, **overrides: object) -> Worker:
    values: dict[str, object] = {
        "topic": "t",
        "bootstrap_servers": "127.0.0.1:1",
        "checkpoint_dir": tmp_path,
        "metrics_port": -1,
        **overrides,
    }
    return Worker(WorkerSettings(**values))  # type: ignore[arg-type]


def test_the_poll_size_follows_the_speed_of_the_last_update(tmp_path: Path) -> None:
    worker = _worker(tmp_path, compaction=False, poll_batch=10_000)
    assert worker.batching.poll_budget() == 1000  # no speed known yet: a small first poll
    worker.batching.seconds_per_record = 0.2e-6  # the compiled loop: the configured most
    assert worker.batching.poll_budget() == 10_000
    worker.batching.seconds_per_record = 200e-6  # autograd: about 0.1 s of training a poll
    assert worker.batching.poll_budget() == 500
    worker.batching.seconds_per_record = 1.0  # very slow: never below the floor
    assert worker.batching.poll_budget() == 100


def test_a_poll_stops_at_the_next_compaction_and_at_max_records(tmp_path: Path) -> None:
    # Polls also stop at the drift detector's grid (every 1,000 records by default; see
    # tests/training/test_drift_compaction_trigger.py): off here, to see the record schedule alone.
    worker = _worker(
        tmp_path, compaction_every_records=2000, poll_batch=10_000, max_records=50_000, drift_detector="none"
    )
    assert worker.compactor is not None
    with worker.compactor:
        worker.batching.seconds_per_record = 0.2e-6
        assert worker.batching.poll_budget() == 2000  # "every 2,000 records" stays every 2,000
        worker.compactor.trigger.observe(1500)
        assert worker.batching.poll_budget() == 500
        worker.compactor.trigger.observe(500)
        assert worker.batching.poll_budget() == 10_000  # due now: the loop compacts before it polls again
        worker.records_consumed = 49_900  # --max-records counts records consumed, trained or not
        assert worker.batching.poll_budget() == 100
