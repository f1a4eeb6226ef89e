"""The worker's side of compaction: keep what it consumed, and turn it into batch epochs when due.

Online learning takes one small step per record; a compaction takes the last
W records the worker consumed (already decoded, from the compaction store),
optionally keeps only the last record per key, and trains E shuffled epochs of
mini-batches into the same model. The worker stays in its consumer group
meanwhile (see ``Worker._compact`` and ``Membership.serve_group``: partitions
paused, ``poll`` served between batches).

Whether it helped is measured, not assumed: the prequential loss (measured on
each record *before* learning from it) of the next records after a compaction
is compared with the loss just before it, and both are logged and reported.

Crash recovery is deterministic (count-based triggers). What decides the next
compaction besides the model: the rows of the store its window takes, the
trigger's count since the previous one (it falls on the same record), the
compaction's number (``seed + number`` seeds its shuffles) and, with
``--compaction-since-previous``, where the previous one ended. A checkpoint
records the small things and a :class:`~streamtrainer.consumer.refill.WindowPlan`
of the rows; :meth:`Compactor.restore` takes them back and :meth:`Compactor.refill`
reads the rows again from the log. The online losses of the kept records are
not part of it: they only measure a compaction's effect (a metric, never the model).

A drift (the worker's detector on the prequential loss, :meth:`Compactor.drift`)
makes the compaction at the next point of the drift grid a ``drift`` one over the
records since the estimated change point (at most the usual window, so the
checkpoint's plan covers them): the records of the new concept, without the older
ones that would pull the model back. Where it falls and what it replays are in the
checkpoint's state while it is pending (``drift_due_at``, ``drift_records``), so it
is as deterministic as the count trigger.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt
from confluent_kafka import KafkaException

from streamtrainer.consumer.refill import WindowPlan, decode_plan, read_plan
from streamtrainer.metrics import WorkerMetrics
from streamtrainer.records import BatchDecoder
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import OnlineLearner
from streamtrainer.training.compaction.epochs import train_epochs
from streamtrainer.training.compaction.store import CompactionStore
from streamtrainer.training.compaction.trigger import DRIFT, INTERVAL, ON_DEMAND, RECORDS, CompactionTrigger
from streamtrainer.training.exceptions import CompactionError

logger = logging.getLogger(__name__)

SIGNAL = "signal"
HTTP = "http"
# Metric label values must stay a small fixed set, whatever a caller passes to request().
REASONS = (RECORDS, INTERVAL, ON_DEMAND, SIGNAL, HTTP, DRIFT)
_OTHER = "other"
# Compactions can run many times a second: one INFO line per this many seconds, the rest at DEBUG.
_INFO_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class CompactionResult:
    number: int
    reason: str
    records: int
    dropped_duplicates: int
    ranges: dict[int, tuple[int, int]]
    epoch_losses: list[float]
    duration_s: float
    device: str
    stopped: bool
    loss_before: float

    def as_metadata(self, topic: str) -> dict[str, object]:
        """What the checkpoint after this compaction records (JSON)."""
        return {
            "number": self.number,
            "reason": self.reason,
            "records": self.records,
            "dropped_duplicates": self.dropped_duplicates,
            "ranges": {f"{topic}:{p}": [first, last] for p, (first, last) in sorted(self.ranges.items())},
            "epoch_losses": self.epoch_losses,
            "duration_s": round(self.duration_s, 6),
            "device": self.device,
            "stopped": self.stopped,
            "loss_before": self.loss_before,
            "finished_at": time.time(),
        }


class Compactor:
    """Owns the compaction store and trigger of one worker."""

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.directory = settings.compaction_dir or Path(settings.checkpoint_dir) / "compaction-store"
        self.trigger = CompactionTrigger(
            every_records=settings.compaction_every_records,
            every_seconds=settings.compaction_interval_s,
            drift_every_records=settings.drift_every_records if settings.drift_detector != "none" else None,
        )
        # A detected drift: records kept since its estimated change point (what its compaction replays).
        self._drift_records: int | None = None
        self.store: CompactionStore | None = None
        self.count = 0
        self.last: CompactionResult | None = None
        # Compactions since the last durable checkpoint: the next one records them.
        self._pending: list[CompactionResult] = []
        self._logged_at = -_INFO_INTERVAL_S
        self._effect_logged_at = -_INFO_INTERVAL_S
        # Offsets of the previous compaction's end, per partition (for --compaction-since-previous).
        self._since: dict[int, int] = {}
        # The store's rows as of the last durable checkpoint (what a refill reads back), and the plan
        # the checkpoint being written records (it becomes the former once that one is durable).
        self._plan: WindowPlan | None = None
        self._plan_written: WindowPlan | None = None
        # The effect of the last compaction: prequential losses of the records trained after it.
        self.effect_window = min(settings.compaction_window, 2000)
        self._after_sum = 0.0
        self._after_count = 0
        self.loss_after: float | None = None
        for reason in (*REASONS, _OTHER):
            metrics.compactions.labels(reason)

    # -- lifecycle ------------------------------------------------------------

    def open(self) -> Compactor:
        self.store = CompactionStore(
            self.directory,
            memory_records=self.settings.compaction_memory_records,
            retain_records=self.settings.compaction_retain_records,
            retain_bytes=self.settings.compaction_retain_bytes,
        )
        return self

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> Compactor:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- fed by the worker's hot path ---------------------------------------------

    def keep(  # noqa: PLR0917 - one column per argument, as the worker holds them
        self,
        features: npt.NDArray[np.float32],
        labels: npt.NDArray[np.float32],
        partitions: npt.NDArray[np.int32],
        offsets: npt.NDArray[np.int64],
        keys: Sequence[bytes | None] | None,
        timestamps: npt.NDArray[np.int64] | None,
        losses: npt.NDArray[np.float64],
    ) -> None:
        """Records just trained: keep them for later compactions, count them toward the trigger."""
        if self.store is None:
            return
        self.store.append(features, labels, partitions, offsets, keys, timestamps)
        self.trigger.observe(len(labels))
        if self._drift_records is not None:
            self._drift_records += len(labels)
        if self.last is not None and self.loss_after is None:
            take = min(len(losses), self.effect_window - self._after_count)
            self._after_sum += float(np.nansum(losses[:take]))
            self._after_count += take
            if self._after_count >= self.effect_window:
                self.loss_after = self._after_sum / self._after_count
                self._effect_logged_at, log = _rate_limited(self._effect_logged_at)
                log(
                    "compaction %d effect: prequential loss %.4f over the next %d records (%.4f before)",
                    self.last.number,
                    self.loss_after,
                    self._after_count,
                    self.last.loss_before,
                )

    def forget(self, partitions: Sequence[int] | None = None) -> None:
        """Drop kept records: of revoked partitions (another member trains them now), or all (rollback).

        A rollback's counts and plan are the checkpoint's, which :meth:`restore` took: they stay.
        """
        if self.store is None:
            return
        if partitions is None:
            self.store.clear()
            self._pending.clear()
        else:
            self.store.drop_partitions(partitions)
            for partition in partitions:
                self._since.pop(partition, None)

    def request(self, reason: str = ON_DEMAND) -> None:
        """Ask for a compaction at the next poll (thread- and signal-safe)."""
        self.trigger.request(reason)

    def drift(self, since_change: int) -> None:
        """A drift was detected in the records just kept; ``since_change``: records kept from its
        estimated change point on (that batch included). Its compaction replays them (at most the
        window); a second detection before it runs keeps the first change point."""
        if self.store is None:
            return
        if self._drift_records is None:
            self._drift_records = max(1, since_change)
        self.trigger.drift()

    def due(self) -> str | None:
        return self.trigger.due()

    def records_until_due(self) -> int | None:
        """Records still to train before a compaction falls due by count (None: not by count)."""
        return self.trigger.records_until_due() if self.store is not None else None

    def publish_store_size(self) -> None:
        if self.store is None:
            return
        self.metrics.compaction_store_records.labels("memory").set(self.store.records_in_memory)
        self.metrics.compaction_store_records.labels("disk").set(self.store.records_on_disk)
        self.metrics.compaction_store_bytes.set(self.store.bytes_on_disk)

    # -- a compaction ---------------------------------------------------------------

    def run(
        self,
        learner: OnlineLearner,
        reason: str,
        *,
        loss_before: float,
        between_batches: Callable[[], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> CompactionResult | None:
        """Build the window's dataset and train its epochs; None when there was nothing to train."""
        store = self.store
        self.trigger.reset()
        if store is None:
            return None
        settings = self.settings
        started = time.perf_counter()
        if settings.compaction_since_previous:
            data = store.window(since=self._since, dedupe_by_key=settings.compaction_dedupe)
        else:
            data = store.window(last=settings.compaction_window, dedupe_by_key=settings.compaction_dedupe)
        drift_records, self._drift_records = self._drift_records, None
        if reason == DRIFT and drift_records is not None and drift_records < data.count:
            # The records since the change point describe the new concept; older ones would pull
            # the model back towards the old one (tests/test_compaction_drift.py, bench/drift.py).
            data = data.subset(np.arange(data.count - drift_records, data.count))
        if data.count == 0:
            logger.info("compaction (%s): no records kept since the last one, nothing to do", reason)
            return None
        number = self.count + 1
        report = train_epochs(
            learner,
            data,
            epochs=settings.compaction_epochs,
            batch_size=settings.compaction_batch_size,
            seed=settings.seed + number,
            lr=settings.compaction_lr,
            device=settings.compaction_device,
            between_batches=between_batches,
            should_stop=should_stop,
        )
        duration = time.perf_counter() - started
        result = CompactionResult(
            number=number,
            reason=reason,
            records=data.count,
            dropped_duplicates=data.dropped_duplicates,
            ranges=dict(data.ranges),
            epoch_losses=[float(loss) for loss in report.epoch_losses],
            duration_s=duration,
            device=report.device,
            stopped=report.stopped,
            loss_before=loss_before,
        )
        self.count = number
        self.last = result
        self._since = {partition: last + 1 for partition, (_, last) in data.ranges.items()}
        self._after_sum, self._after_count, self.loss_after = 0.0, 0, None
        self.metrics.compactions.labels(reason if reason in REASONS else _OTHER).inc()
        self.metrics.compaction_duration.observe(duration)
        self.metrics.compaction_records.set(data.count)
        if result.epoch_losses:
            self.metrics.compaction_epoch_loss.set(result.epoch_losses[-1])
        self._pending.append(result)
        losses = ", ".join(f"{loss:.4f}" for loss in result.epoch_losses)
        self._logged_at, log = _rate_limited(self._logged_at)
        log(
            "compaction %d (%s): %d records%s, %d epoch(s) on %s in %.2f s, epoch loss %s%s",
            number,
            reason,
            data.count,
            f" ({data.dropped_duplicates} duplicate keys dropped)" if data.dropped_duplicates else "",
            len(result.epoch_losses),
            report.device,
            duration,
            losses or "-",
            " (stopped early)" if report.stopped else "",
        )
        return result

    # -- checkpoints ------------------------------------------------------------------

    def checkpoint_metadata(self, topic: str) -> dict[str, object]:
        """What the next checkpoint records: the compactions since the previous one, and the state
        the coming compactions depend on (``state``: see :meth:`restore`)."""
        metadata: dict[str, object] = {"total": self.count, "since_previous_checkpoint": len(self._pending)}
        if self._pending and self.last is not None:
            ranges: dict[int, tuple[int, int]] = {}
            for result in self._pending:
                for partition, (first, last) in result.ranges.items():
                    low, high = ranges.get(partition, (first, last))
                    ranges[partition] = (min(low, first), max(high, last))
            metadata.update(
                ranges={f"{topic}:{p}": [first, last] for p, (first, last) in sorted(ranges.items())},
                records=sum(result.records for result in self._pending),
                last=self.last.as_metadata(topic),
            )
        self._plan_written = self._window_plan()
        state: dict[str, object] = {
            "records_since_compaction": self.trigger.records_since_compaction,
            "since": {str(p): offset for p, offset in sorted(self._since.items())},
            "window": self._plan_written.as_json() if self._plan_written is not None else None,
        }
        if self.trigger.drift_due_at is not None and self._drift_records is not None:
            # A drift detected, its compaction not run yet: where it falls and what it replays.
            state["drift_due_at"] = self.trigger.drift_due_at
            state["drift_records"] = self._drift_records
        metadata["state"] = state
        return metadata

    def _window_plan(self) -> WindowPlan | None:
        """The rows the next window would take now (before deduplication): all a later one can need
        of the records read so far, since every later window ends later."""
        store = self.store
        if store is None:
            return None
        # Per checkpoint, not per record: ~1 ms for a window of 2,000 rows, ~5 ms for 150,000 rows
        # across shards (only the partition and offset columns are read); the plan is tens of bytes
        # for one partition, ~33 kB at its 2,000 runs.
        if self.settings.compaction_since_previous:
            partitions, offsets = store.window_positions(since=self._since)
        else:
            partitions, offsets = store.window_positions(last=self.settings.compaction_window)
        return WindowPlan.of(partitions, offsets)

    def checkpointed(self) -> None:
        """The checkpoint from the last :meth:`checkpoint_metadata` is durable."""
        self._pending.clear()
        if self._plan_written is not None:
            self._plan = self._plan_written

    def restore(self, metadata: object) -> None:
        """Take a checkpoint's compaction state (None: a checkpoint without one, or none at all).

        The numbering of its compactions, the trigger's count since the last one,
        where that one ended and the plan of the store's rows (read back by
        :meth:`refill` once the partitions are assigned). The store's own rows are
        dropped: they are what was read since the checkpoint, or nothing.
        """
        state = metadata.get("state") if isinstance(metadata, dict) else None
        total = metadata.get("total") if isinstance(metadata, dict) else None
        self.count = total if isinstance(total, int) else 0
        self._pending.clear()
        self._plan_written = None
        if self.store is not None:
            self.store.clear()
        if not isinstance(state, dict):
            # A checkpoint of a run without compaction, or of an older version: windows start empty.
            self.trigger.restore(0)
            self._since = {}
            self._plan = None
            self._drift_records = None
            return
        records = state.get("records_since_compaction")
        due_at, drift_records = state.get("drift_due_at"), state.get("drift_records")
        pending = isinstance(due_at, int) and isinstance(drift_records, int)
        self.trigger.restore(
            records if isinstance(records, int) and records >= 0 else 0,
            drift_due_at=due_at if pending and isinstance(due_at, int) else None,
        )
        self._drift_records = drift_records if pending and isinstance(drift_records, int) else None
        since = state.get("since")
        self._since = {int(p): int(offset) for p, offset in since.items()} if isinstance(since, dict) else {}
        self._plan = WindowPlan.from_json(state.get("window"))

    def refill(self, starts: Mapping[int, int], decoder: BatchDecoder, learner: OnlineLearner | None) -> int:
        """Read the plan's rows of the partitions just assigned (or rolled back) back from the log.

        ``starts``: each partition's next offset to train. The rows before it that
        the last durable checkpoint's windows held are read again with a consumer of
        our own, decoded as the worker decodes, and kept in their order, ahead of
        everything trained from ``starts`` on. Returns the rows refilled.
        """
        store, plan = self.store, self._plan
        if store is None or plan is None or learner is None:
            return 0
        wanted = plan.before(starts)
        if not wanted.runs:
            return 0
        started = time.perf_counter()
        # Nothing of these partitions may be kept twice (they come back after a revocation).
        store.drop_partitions(wanted.partitions)
        try:
            read = read_plan(self.settings, wanted, timeout_s=self.settings.startup_timeout_s)
            rows = decode_plan(wanted, read, decoder, learner, keys=self.settings.compaction_dedupe)
            if len(rows):
                store.append(
                    rows.features, rows.labels, rows.partitions, rows.offsets, rows.keys, rows.timestamps
                )
        except (KafkaException, CompactionError) as error:
            # The store is a cache: without these rows the next windows are shorter, nothing is lost.
            logger.warning("compaction store: cannot read back the windows' records: %s", error)
            store.drop_partitions(wanted.partitions)
            return 0
        if wanted.exact and len(rows) != wanted.records:
            logger.warning(
                "compaction store: read back %d of the %d records the checkpoint's windows held "
                "(the others are no longer in the log): the next windows differ",
                len(rows),
                wanted.records,
            )
        logger.info(
            "compaction store: read back %d record(s) of %s from the log in %.2f s",
            len(rows),
            ", ".join(f"[{p}] {first}..{last}" for p, (first, last) in sorted(wanted.spans().items())),
            time.perf_counter() - started,
        )
        return len(rows)


def _rate_limited(last: float) -> tuple[float, Callable[..., None]]:
    """(new last-INFO time, the logging function to use now)."""
    now = time.monotonic()
    if now - last >= _INFO_INTERVAL_S:
        return now, logger.info
    return last, logger.debug
