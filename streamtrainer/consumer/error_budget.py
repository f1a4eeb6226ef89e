"""The error budget: how many invalid or refused records a worker tolerates before it stops.

Like Kafka Connect's ``errors.tolerance``: ``none`` stops at the first record that
cannot be trained on, ``all`` never stops (every such record is dead-lettered and
counted), and ``budget`` (the default) stops once more than ``--error-budget`` of the
last ``--error-budget-window`` records consumed could not be trained on. A stream
with a stray bad record trains on; a wrong topic, a wrong schema or a wrong
``--n-classes`` stops the worker within one window instead of dead-lettering the
whole topic.

The window counts records consumed, in order. Each invalid record is the end of a
window that is checked (the share is highest there), and so is the last record of
every batch: with fewer than ``min(window, 100)`` records consumed no verdict is
given, so the first bad record of a run does not stop it by itself. The window's
state is small (the positions of its invalid records) and goes into checkpoints,
so a restarted worker trips at the same record as the one before it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from streamtrainer.exceptions import StreamtrainerError

Tolerance = Literal["none", "budget", "all"]
# No verdict before this many records (or the whole window, if smaller): one bad record
# among the first few must not read as "100% invalid".
MIN_RECORDS = 100


class ErrorBudgetExceeded(StreamtrainerError):  # noqa: N818 - reads as the event it reports
    """The share of records that could not be trained on went past the error budget."""

    exit_code = 3


@dataclass(frozen=True, slots=True)
class Verdict:
    """The window at the moment the budget was spent."""

    invalid: int
    records: int
    limit: float
    index: int  # the consumption index of the record that spent the budget

    @property
    def share(self) -> float:
        return self.invalid / self.records if self.records else 0.0


class ErrorBudget:
    """Invalid records over a sliding window of consumed records, checked against a share."""

    def __init__(self, tolerance: Tolerance, share: float, window: int) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"error budget share {share} is not within 0..1")
        if window < 1:
            raise ValueError("error budget window must be at least 1 record")
        self.tolerance = tolerance
        self.limit = share
        self.window = window
        self.consumed = 0
        # Consumption indices of the window's invalid records, sorted. (A batch's guard refusals come
        # after its decode errors, and may lie before them: inserted in order, not appended.)
        self._invalid: list[int] = []
        self.spent: Verdict | None = None

    @property
    def enabled(self) -> bool:
        return self.tolerance != "all"

    @property
    def share(self) -> float:
        """The invalid share of the window ending at the last record consumed."""
        records = min(self.consumed, self.window)
        self._trim(self.consumed - 1)
        return len(self._invalid) / records if records else 0.0

    def consume(self, count: int) -> int:
        """``count`` more records were consumed; returns the index of the first of them."""
        first = self.consumed
        self.consumed += count
        return first

    def invalid(self, indices: Iterable[int]) -> Verdict | None:
        """Records at these consumption indices (ascending) could not be trained on.

        Returns the verdict when the budget is spent by them (and remembers it).
        """
        if not self.enabled:
            return None
        for index in indices:
            bisect.insort(self._invalid, index)
            if self.tolerance == "none":
                return self._spend(1, 1, index)
            verdict = self._check(index)
            if verdict is not None:
                return verdict
        return None

    def check(self) -> Verdict | None:
        """Check the window ending at the last record consumed (call at the end of each batch)."""
        if not self.enabled or not self._invalid or self.consumed == 0:
            return None
        return self._check(self.consumed - 1)

    def _check(self, last: int) -> Verdict | None:
        self._trim(last)
        records = min(last + 1, self.window)
        if last + 1 < min(self.window, MIN_RECORDS):
            return None
        count = bisect.bisect_right(self._invalid, last)
        if count > self.limit * records:
            return self._spend(count, records, last)
        return None

    def _trim(self, last: int) -> None:
        gone = bisect.bisect_right(self._invalid, last - self.window)
        if gone:
            del self._invalid[:gone]

    def _spend(self, invalid: int, records: int, index: int) -> Verdict:
        self.spent = Verdict(invalid, records, self.limit, index)
        return self.spent

    # -- checkpoints ------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """JSON-able state for a checkpoint: the window's invalid records, relative to its end."""
        self._trim(self.consumed - 1)
        return {
            "consumed": min(self.consumed, self.window),
            "invalid_ago": [self.consumed - index for index in self._invalid],
        }

    def restore(self, state: object) -> None:
        """Adopt a checkpoint's window (anything else: an empty one)."""
        self.consumed = 0
        self._invalid.clear()
        self.spent = None
        if not isinstance(state, dict):
            return
        consumed, ago = state.get("consumed"), state.get("invalid_ago")
        if not isinstance(consumed, int) or not isinstance(ago, list):
            return
        self.consumed = consumed
        self._invalid = sorted(consumed - int(a) for a in ago if 0 < int(a) <= consumed)
