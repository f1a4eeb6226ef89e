"""When a compaction is due: record counts, intervals, and requests from threads and signal handlers."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from streamtrainer.training.compaction import CompactionRequester, CompactionTrigger
from streamtrainer.training.exceptions import CompactionError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fires_every_n_records_exactly() -> None:
    trigger = CompactionTrigger(every_records=100, every_seconds=None)
    fired = []
    for record in range(1, 1001):
        trigger.observe(1)
        if trigger.due() is not None:
            assert trigger.due() == "records"
            fired.append(record)
            trigger.reset()
    assert fired == list(range(100, 1001, 100))


def test_fires_on_the_batch_that_reaches_n() -> None:
    trigger = CompactionTrigger(every_records=1000, every_seconds=None)
    for _ in range(3):
        trigger.observe(300)
        assert trigger.due() is None
    trigger.observe(300)
    assert trigger.due() == "records" and trigger.records_since_compaction == 1200
    trigger.reset()
    assert trigger.due() is None and trigger.records_since_compaction == 0


def test_interval_counts_from_the_last_compaction_and_needs_new_records() -> None:
    clock = FakeClock()
    trigger = CompactionTrigger(every_records=None, every_seconds=60.0, clock=clock)
    clock.now += 59.9
    trigger.observe(5)
    assert trigger.due() is None
    clock.now += 0.1
    assert trigger.due() == "interval"
    trigger.reset()
    assert trigger.due() is None
    clock.now += 120  # idle: nothing new to compact
    assert trigger.due() is None
    trigger.observe(1)
    assert trigger.due() == "interval"
    trigger.reset()
    clock.now += 30
    trigger.observe(1)
    assert trigger.due() is None  # 30 s after the last compaction, not after creation


def test_records_and_interval_together() -> None:
    clock = FakeClock()
    trigger = CompactionTrigger(every_records=10, every_seconds=5.0, clock=clock)
    trigger.observe(10)
    assert trigger.due() == "records"
    trigger.reset()
    trigger.observe(3)
    clock.now += 5
    assert trigger.due() == "interval"


def test_on_demand_wins_and_is_served_once() -> None:
    trigger = CompactionTrigger(every_records=10, every_seconds=None)
    requester: CompactionRequester = trigger
    assert trigger.due() is None
    trigger.observe(10)
    requester.request("drift")
    assert trigger.due() == "drift"
    trigger.reset()
    assert trigger.due() is None
    trigger.request()
    assert trigger.due() == "on_demand"
    trigger.reset()
    assert trigger.due() is None


def test_a_request_during_a_compaction_is_not_lost() -> None:
    trigger = CompactionTrigger(every_records=None, every_seconds=None)
    trigger.request("first")
    assert trigger.due() == "first"
    trigger.request("second")  # arrives while the first compaction runs
    trigger.reset()
    assert trigger.due() == "second"
    trigger.reset()
    assert trigger.due() is None


def test_request_from_another_thread() -> None:
    trigger = CompactionTrigger(every_records=None, every_seconds=None)
    threads = [threading.Thread(target=trigger.request, args=(f"t{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    reason = None
    while reason is None and time.monotonic() < deadline:
        reason = trigger.due()
    for thread in threads:
        thread.join()
    assert reason is not None and reason.startswith("t")
    assert trigger.due() is not None  # requests seen later keep it due until served
    trigger.reset()
    assert trigger.due() is None


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_request_from_a_signal_handler() -> None:
    trigger = CompactionTrigger(every_records=None, every_seconds=None)
    previous = signal.signal(signal.SIGUSR1, lambda *_: trigger.request("signal"))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while trigger.due() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert trigger.due() == "signal"
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_rejects_nonsense() -> None:
    with pytest.raises(CompactionError):
        CompactionTrigger(every_records=0, every_seconds=None)
    with pytest.raises(CompactionError):
        CompactionTrigger(every_records=None, every_seconds=0.0)
