"""The training lane: one update at a time, in order, results and errors delivered to the poll loop."""

from __future__ import annotations

import threading

import pytest

from streamtrainer.consumer.training_lane import TrainingLane


@pytest.mark.parametrize("background", [True, False])
def test_updates_run_one_at_a_time_in_the_order_submitted(background: bool) -> None:
    seen: list[int] = []
    threads: set[str] = set()

    def step(i: int) -> int:
        threads.add(threading.current_thread().name)
        seen.append(i)
        return i * i

    with TrainingLane(background=background) as lane:
        results = [lane.submit(step, i).result(timeout=10) for i in range(50)]

    assert results == [i * i for i in range(50)]
    assert seen == list(range(50))
    # In the background every update runs in the one lane thread, never the caller's.
    expected = "streamtrainer-train" if background else threading.current_thread().name
    assert len(threads) == 1 and next(iter(threads)).startswith(expected)


@pytest.mark.parametrize("background", [True, False])
def test_an_error_in_an_update_reaches_the_caller(background: bool) -> None:
    def broken() -> None:
        raise ValueError("no such update")

    with TrainingLane(background=background) as lane:
        future = lane.submit(broken)
        with pytest.raises(ValueError, match="no such update"):
            future.result(timeout=10)
        # The lane goes on after a failed update.
        assert lane.submit(lambda: 7).result(timeout=10) == 7


def test_submit_returns_once_the_lane_has_started_the_update() -> None:
    """The poll that follows must not take the GIL before the lane's thread holds the update."""
    release = threading.Event()
    second_started = threading.Event()
    submitted = threading.Event()

    def first() -> None:
        release.wait(timeout=10)

    def second() -> None:
        second_started.set()

    with TrainingLane(background=True) as lane:
        lane.submit(first)
        # The lane's one thread is busy with the first update: the second cannot start, so
        # submitting it does not return ...
        caller = threading.Thread(target=lambda: (lane.submit(second), submitted.set()))
        caller.start()
        assert not submitted.wait(timeout=0.3)
        # ... until it has started.
        release.set()
        assert submitted.wait(timeout=10)
        assert second_started.is_set()
        caller.join(timeout=10)
