"""Where the compiled part of a polled batch's update runs: the poll loop's thread, or a background one.

With the lane in the background (``--overlap``) the worker trains polled batch k
while it polls batch k+1. Only code that releases the GIL overlaps: what the
lane runs is the compiled loop alone (``PendingSteps.compute``: one numba
``nogil`` call), while the Python around it (scaling the batch before, the
guards' checks after) stays on the loop's thread. ``submit`` returns once the
lane's thread has the work in hand: otherwise the poll that follows could take
the GIL first and hold it for milliseconds (librdkafka's binding builds a poll's
``Message`` objects without letting go of it), and the lane would not even start
until the poll ended. At most one update is in flight, and the worker waits for
it before anything that must see the model and its offsets agree: a checkpoint,
a compaction, a rebalance, a rollback, the exit. Updates still happen one after
the other, in the order the records were read: the model's history is the same
either way, only the waiting moves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class TrainingLane:
    """Runs one function at a time, in one background thread or inline (``background=False``)."""

    def __init__(self, *, background: bool) -> None:
        self.background = background
        self._executor = None
        if background:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamtrainer-train")

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        if self._executor is not None:
            started = threading.Event()

            def run() -> T:
                started.set()
                return function(*args)

            submitted = self._executor.submit(run)
            started.wait()
            return submitted
        future: Future[T] = Future()
        try:
            future.set_result(function(*args))
        except Exception as error:  # noqa: BLE001 - delivered by result(), as from the thread
            future.set_exception(error)
        return future

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> TrainingLane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
