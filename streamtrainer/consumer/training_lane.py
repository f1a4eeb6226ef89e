"""Where a polled batch's update runs: the poll loop's own thread, or a background one.

With the lane in the background (``--overlap``) the worker trains polled batch k
while it polls batch k+1: the compiled loops release the GIL (numba ``nogil``)
and so do librdkafka's fetch and torch's kernels, so those parts overlap. The
Python around them does not: each side waits for the GIL while the other runs
Python (building a poll's ``Message`` objects holds it for milliseconds), which
is why it is off by default (bench/README.md has the figures). At most one
update is in flight, and the worker waits for it before anything that must see
the model and its offsets agree: a checkpoint, a compaction, a rebalance, a
rollback, the exit. Updates still happen one after the other, in the order the
records were read: the model's history is the same either way, only the waiting
moves.
"""

from __future__ import annotations

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
            return self._executor.submit(function, *args)
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
