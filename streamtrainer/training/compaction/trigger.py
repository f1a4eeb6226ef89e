"""When to compact: every N trained records, every T seconds, or on request.

The worker asks :meth:`CompactionTrigger.due` once per poll (it is a few
attribute reads), runs a compaction when it names a reason, then calls
:meth:`CompactionTrigger.reset`.

Requests come from outside the training loop: an HTTP handler thread, a
``SIGUSR1`` handler, or a drift detector. :meth:`CompactionTrigger.request`
therefore takes no lock — a signal handler runs on the main thread between two
bytecodes, possibly while that thread holds the very lock it would wait for.
It writes the reason and then bumps a sequence number (``next`` on an
``itertools.count`` and attribute stores are atomic under the GIL). ``due``
notes the sequence number it has seen and ``reset`` marks only requests up to
that one as served, so a request that arrives while a compaction runs is not
lost: it makes the next poll compact again.

A drift detector (``training/drift.py``) is fed the pre-update losses of each
batch; when it fires, :meth:`CompactionTrigger.drift` makes the next compaction a
``drift`` one. With ``drift_every_records=G`` it falls due at the next multiple of
G records trained since the last compaction, not at the next poll: the worker's
polls end at those points as they end at the ``every_records`` count, so where a
drift compaction falls depends only on the records (a restarted worker compacts
exactly where an uninterrupted one would; the count and the pending drift are in
the checkpoint). A schedule that falls due first (``every_records`` below the
grid, say) makes its compaction the drift one. The compaction then replays the
records since the estimated change point, the ones that describe the new concept
(``Compactor.run``).
Without ``drift_every_records`` a drift is a plain request, served at the next poll.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Final, Protocol

from streamtrainer.training.exceptions import CompactionError

logger = logging.getLogger(__name__)

RECORDS: Final = "records"
INTERVAL: Final = "interval"
ON_DEMAND: Final = "on_demand"
DRIFT: Final = "drift"


class CompactionRequester(Protocol):
    """What a drift detector, a signal handler or an HTTP endpoint needs: a way to ask for a compaction."""

    def request(self, reason: str = ON_DEMAND) -> None: ...


class CompactionTrigger:
    """Decides when a compaction is due (see the module docstring).

    ``every_records``: after that many records trained since the last
    compaction. ``every_seconds``: that long after the last compaction (or the
    creation), but only once a record has been trained since — an idle stream
    has nothing new to compact. Both None: only on request (or drift).
    ``drift_every_records``: the grid a detected drift compacts on (see the module docstring).
    """

    def __init__(
        self,
        *,
        every_records: int | None,
        every_seconds: float | None,
        clock: Callable[[], float] = time.monotonic,
        drift_every_records: int | None = None,
    ) -> None:
        if every_records is not None and every_records < 1:
            raise CompactionError(f"every_records must be >= 1 or None, got {every_records}")
        if drift_every_records is not None and drift_every_records < 1:
            raise CompactionError(f"drift_every_records must be >= 1 or None, got {drift_every_records}")
        self.drift_every_records = drift_every_records
        self._drift_due_at: int | None = None  # count of records at which the pending drift compacts
        if every_seconds is not None and not every_seconds > 0:
            raise CompactionError(f"every_seconds must be > 0 or None, got {every_seconds}")
        self.every_records = every_records
        self.every_seconds = every_seconds
        self._clock = clock
        self._since = clock()
        self._records = 0
        self._sequence = itertools.count(1)
        self._requested = 0  # number of the newest request
        self._reason = ON_DEMAND  # reason of the newest request
        self._seen = 0  # newest request number that due() reported
        self._served = 0  # newest request number a compaction has served

    @property
    def records_since_compaction(self) -> int:
        return self._records

    @property
    def drift_due_at(self) -> int | None:
        """Records since the last compaction at which a pending drift compacts (None: none pending)."""
        return self._drift_due_at

    def records_until_due(self) -> int | None:
        """Records still to train before the record schedule (or the drift grid) falls due
        (None: there is none)."""
        until = None if self.every_records is None else max(0, self.every_records - self._records)
        grid = self.drift_every_records
        if grid is not None:
            to_grid = grid - self._records % grid
            until = to_grid if until is None else min(until, to_grid)
        return until

    def restore(self, records_since_compaction: int, *, drift_due_at: int | None = None) -> None:
        """Continue a checkpoint's count (a restart, a rollback): the next compaction falls on the
        same record as it would have without the interruption. The interval restarts from now."""
        if records_since_compaction < 0:
            raise CompactionError(f"records_since_compaction must be >= 0, got {records_since_compaction}")
        self._records = records_since_compaction
        self._since = self._clock()
        self._drift_due_at = drift_due_at

    def observe(self, n_records: int) -> None:
        """Count records trained since the last compaction (worker thread only)."""
        self._records += n_records

    def request(self, reason: str = ON_DEMAND) -> None:
        """Ask for a compaction at the next poll; safe from any thread and from a signal handler."""
        self._reason = reason
        self._requested = next(self._sequence)

    def drift(self) -> None:
        """A drift was detected in the records just counted by :meth:`observe` (call it after that,
        worker thread only): compact when the count reaches the grid point that ends them (the worker's
        polls never cross one, so that is the end of the batch or later), or at the next poll without
        a grid."""
        grid = self.drift_every_records
        if grid is None:
            self.request(DRIFT)
        elif self._drift_due_at is None:
            self._drift_due_at = max(grid, -(-self._records // grid) * grid)

    def due(self) -> str | None:
        """The reason a compaction is due now, or None. A request wins over a drift; a pending drift
        makes a compaction that a schedule calls for a drift one (it replays the new concept)."""
        requested = self._requested
        if requested > self._served:
            self._seen = requested
            return self._reason
        scheduled: str | None = None
        if self.every_records is not None and self._records >= self.every_records:
            scheduled = RECORDS
        elif (
            self.every_seconds is not None
            and self._records > 0
            and self._clock() - self._since >= self.every_seconds
        ):
            scheduled = INTERVAL
        if self._drift_due_at is not None and (scheduled is not None or self._records >= self._drift_due_at):
            return DRIFT
        return scheduled

    def reset(self) -> None:
        """A compaction ran: restart both schedules; requests seen by the last ``due`` are served."""
        self._records = 0
        self._since = self._clock()
        self._served = max(self._served, self._seen)
        self._drift_due_at = None
