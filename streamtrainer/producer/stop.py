"""SIGINT and SIGTERM ask the producer to stop: it stops reading, flushes, and reports.

Python's defaults lose records: SIGINT raises KeyboardInterrupt wherever the program is (the records
queued in librdkafka are dropped with the process, uncounted), and SIGTERM kills at once (or, for
PID 1 in a container, is ignored, so that ``docker stop`` waits and then kills). While
:class:`StopSignals` is entered, both only set :attr:`StopSignals.signum`; the publishing loop looks at
it between records. A wait that could last (the next line of a pipe, the pause of ``--rate``, the
first connection) is marked :attr:`StopSignals.waiting`: a signal then raises :class:`Stopped` into
it, since nothing is half done there.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any, Self

# Bound on the flush after a signal: docker stop sends SIGKILL 10 s after SIGTERM by default, and the
# purge and summary after it take up to ~1.5 s more (measured: a broker frozen with ~1,000 queued).
DEFAULT_GRACE_S = 6.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):  # noqa: N818 - a stop asked for, not an error
    """Raised by the signal handler into a wait marked :attr:`StopSignals.waiting`."""


class StopSignals:
    """Turns SIGINT and SIGTERM into a request to stop, while entered (in the main thread only).

    Not entered (or entered off the main thread), it never sees a signal: ``signum`` stays None.
    A second signal, or ``grace_s`` after the first, makes :meth:`give_up` true: the flush stops.
    A SIGINT that is ignored when entering (``nohup``, a background job) stays ignored.
    """

    __slots__ = ("_count", "_grace_s", "_previous", "_since", "signum", "waiting")

    def __init__(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.signum: int | None = None
        self.waiting = False
        self._count = 0
        self._since = 0.0
        self._grace_s = grace_s
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in _SIGNALS:
            previous = signal.getsignal(signum)
            if signum == signal.SIGINT and previous == signal.SIG_IGN:
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self._count += 1
        if self.signum is None:
            self.signum = signum
            self._since = time.monotonic()
        if self.waiting:
            self.waiting = False
            raise Stopped

    @property
    def name(self) -> str | None:
        """The first signal's name (SIGINT, SIGTERM), or None."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def give_up(self) -> bool:
        """True after a second signal, or ``grace_s`` after the first: stop flushing."""
        return self._count > 1 or (self.signum is not None and time.monotonic() - self._since > self._grace_s)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Mark a wait that a signal may end with :class:`Stopped` (nothing half done in it)."""
        if self.signum is not None:
            raise Stopped
        self.waiting = True
        try:
            yield
        finally:
            self.waiting = False
