"""Publishing samples to a topic, with every delivery report checked.

A record counts as produced only when the broker acknowledged it with an offset, or acknowledged it
without one and reading it back found it (below). At the end everything still queued is flushed;
anything not acknowledged counts as failed, and the command exits non-zero, so no record is ever
lost silently.

A broker outage is ridden out: librdkafka keeps retrying (with backoff) every record for
``message.timeout.ms``; the outage is logged (rate-limited) and counted in
``streamtrainer_producer_kafka_errors_total{kind}``, and its end is logged too.

An idempotent producer that becomes unusable is replaced by a new one, and every record its failure
took down is sent again (at least once: counted, logged, never dropped). Two ways, both seen after a
broker restarted with its producer state lost: a fatal error (UNKNOWN_PRODUCER_ID for a retried batch:
librdkafka cannot retry it without risking duplicates), and a producer stuck bumping its epoch in a
loop without ever getting a record acknowledged (seen in its statistics).

An acknowledgement without an offset is not trusted. A broker answers the retry of a batch it
believes it already stored with DUPLICATE_SEQUENCE_NUMBER, which librdkafka reports as delivered with
no offset; Tansu 0.6.0 does so after a restart for batches it did not store as well as for batches it
did. Such records are kept (only those), and once the broker acknowledges a later record of their
partition with an offset (at the latest in :meth:`Publisher.flush`), the range where they must be is
read back (:mod:`streamtrainer.producer.readback`): the records found count as delivered, the missing
ones are published again, and the ones that cannot be checked count as failed. Every record carries
the run's id in a header for this (:data:`~streamtrainer.producer.readback.RUN_HEADER`).

Where to resume. Each record has a source position (a line, a CSV row, a record number: see
:mod:`streamtrainer.producer.sources`). The run reports a position with every record up to it
delivered (:attr:`ProduceSummary.position`), not the last one delivered: records of different
partitions are acknowledged out of order. Records go out in batches of :data:`_BATCH` consecutive
ones sharing a delivery callback (:class:`_Batch`), and the position moves over a batch once all its
records are delivered. When every record is delivered (the usual end, a bad record, a signal whose
flush completed) it is the last record's position; a record that failed for good stops it before its
batch for the rest of the run. A source reopened with ``skip=position`` sends exactly the records
that the run did not deliver, plus those delivered after it (:attr:`ProduceSummary.delivered_after`,
reported: a record past a failed one, or of its batch).

A bad record in the source (a :class:`~streamtrainer.producer.exceptions.ProducerError` while reading
it) ends the run like the end of the source: what was read before it is flushed, and the summary
carries the error. A bad first record ends it before the topic is created. SIGINT and SIGTERM do the
same (with :class:`~streamtrainer.producer.stop.StopSignals`), with a flush bounded by its grace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import orjson
from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, KafkaException, Message, Producer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streamtrainer.connection import (
    RepeatedErrors,
    admin_client,
    client_config,
    ensure_topic,
    topic_partitions,
)
from streamtrainer.exceptions import TopicError
from streamtrainer.metrics import ProducerMetrics
from streamtrainer.producer.exceptions import ProducerError
from streamtrainer.producer.readback import RUN_HEADER, Content, ReadBack, read_back
from streamtrainer.producer.sources import SampleSource
from streamtrainer.producer.stop import Stopped, StopSignals
from streamtrainer.records import Sample
from streamtrainer.records.codec import codec_headers, encode_sample
from streamtrainer.settings import KafkaSettings

logger = logging.getLogger(__name__)

_FLUSH_TIMEOUT_S = 30.0
# A producer that keeps failing fatally is replaced at most this many times per run.
_MAX_RECREATES = 10
# Errors that mean "the broker is unreachable" (an outage begins).
_OUTAGE_ERRORS = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE})
# A record failed with one of these was failed by the idempotent producer's state, not by the broker
# refusing the record: a new producer sends it again.
_PRODUCER_STATE_ERRORS = frozenset(
    {
        KafkaError._FATAL,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_EPOCH,
    }
)
# librdkafka statistics (the idempotent producer's epoch) every few seconds: a few kB of JSON.
_STATS_INTERVAL_MS = 2000
# This many epoch bumps without a single delivery report: the producer is stuck (see _on_stats).
_STUCK_EPOCH_BUMPS = 30
# Records acknowledged without an offset, kept until read back; past this many they are read back now.
_MAX_HELD = 50_000
# Reading back while publishing (the publisher waits meanwhile), and in flush() before the result.
_READBACK_TIMEOUT_S = 10.0
_FINAL_READBACK_TIMEOUT_S = 30.0
_READBACK_RETRY_S = 10.0
# flush(): at most this many rounds of read back, publish the missing again, flush.
_MAX_READBACK_ROUNDS = 3
# After a stop, waiting for the reports of the records purged from the local queue.
_PURGE_REPORTS_TIMEOUT_S = 1.0
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
# Records per delivery callback (see _Batch). One callback per record would give each record's position
# exactly, but cost ~1.2 us of main-thread CPU a record on the binary synthetic path (which spends
# ~5.6 us a record in all): allocating it, collecting it, and cache misses on the ~40k in flight.
_BATCH = 32
# Batches kept behind one not yet complete (~250 bytes each: ~16 MB). Past that (a record unconfirmed
# while millions of later ones went out) the resume position stops where it is, for the run.
_MAX_BATCHES = 65_536


@dataclass(frozen=True, slots=True)
class ProduceSummary:
    attempted: int
    delivered: int
    failed: int
    seconds: float
    resent: int = 0  # re-sent after a fatal producer error (at least once: may be duplicates)
    recreated: int = 0  # times the producer was replaced (fatal error, or stuck)
    acknowledged_without_offset: int = 0  # acknowledged as duplicates of an earlier write, no offset
    # What reading back those found: verified (in the topic), republished (missing: published again),
    # unverified (the range could not be read: counted in failed). They add up to the count above.
    verified: int = 0
    republished: int = 0
    unverified: int = 0
    # Where to resume: every record of the source up to `position` (in `unit`s: line, row, record)
    # is delivered, this run's or skipped. `delivered_after`: records delivered past it (out of
    # order, or after a failed one), which a resume from `position` would send again.
    position: int = 0
    unit: str = "record"
    delivered_after: int = 0
    skipped: int = 0  # the position the run started after (the source's skip)
    source: str | None = None
    error: str | None = None  # the bad record that ended the run (a ProducerError), if one did
    signal: str | None = None  # the signal that stopped the run (SIGINT, SIGTERM), if one did

    @property
    def ok(self) -> bool:
        """Everything read was delivered, and the run ended at the end of its input."""
        return (
            self.failed == 0 and self.delivered == self.attempted and self.error is None and not self.signal
        )

    def describe(self, topic: str) -> str:
        """One line: the counts, and where to resume (``--skip``)."""
        where = f" of {self.source}" if self.source else ""
        if self.position > self.skipped:
            resume = f"delivered every {self.unit} up to {self.unit} {self.position}{where}"
            if self.skipped:
                resume += f" ({self.skipped} skipped)"
        elif self.skipped:
            resume = f"delivered no {self.unit} after {self.unit} {self.skipped}{where}"
        else:
            resume = f"delivered no {self.unit}{where}"
        again = ""
        if self.delivered_after:
            again = (
                f" ({self.delivered_after} record(s) after it were delivered too, past an undelivered one:"
                " a resume sends them again)"
            )
        return (
            f"produced {self.delivered} record(s) to {topic}, failed {self.failed}, in {self.seconds:.1f}s "
            f"({self.delivered / max(self.seconds, 1e-9):,.0f} records/s); {resume}; "
            f"resume with --skip {self.position}{again}"
        )


class _Batch:
    """Consecutive records sharing one delivery callback: the unit the resume position moves by.

    ``settled`` counts the records delivered or failed for good; once the batch is closed
    (``target`` = ``sent``, -1 before) and all are settled, it is complete."""

    __slots__ = ("callback", "complete", "failed", "last", "sent", "settled", "target")

    callback: Callable[[KafkaError | None, Message], None]

    def __init__(self) -> None:
        self.sent = 0
        self.settled = 0
        self.failed = 0
        self.last = 0  # the position of its last record
        self.target = -1
        self.complete = False


@dataclass(slots=True)
class _Gap:
    """Consecutive records of one partition acknowledged without an offset."""

    partition: int
    after: int  # the last offset acknowledged before them (-1: none)
    before: int | None = None  # the first offset acknowledged after them, once known
    next_offset: int = 0  # librdkafka numbers a batch's records -1, 0, 1, ... in such reports
    records: list[tuple[_Batch, Message]] = field(default_factory=list)


class Publisher:
    """Sends samples to one topic and counts acknowledgements.

    ``start`` is the source position before the first record (what the source skipped); each record
    sent has a higher one. :attr:`position`: every record up to it is delivered (see the module doc).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        topic: str,
        codec: str,
        metrics: ProducerMetrics | None = None,
        start: int = 0,
    ) -> None:
        self.topic = topic
        self.codec = codec
        self.metrics = metrics
        if metrics is not None:
            metrics.start(topic, start)
        # The same headers on every record (delivery reports do not carry them: re-sent records get
        # these too): the codec, and this run's id, which read-back uses to tell our records apart.
        self._run_id = os.urandom(8)
        self._headers: list[tuple[str, str | bytes | None]] = [
            *codec_headers(codec),
            (RUN_HEADER, self._run_id),
        ]
        self._settings = settings
        self._lock = threading.Lock()
        self.attempted = 0
        self.delivered = 0
        self.failed = 0
        self.resent = 0
        self.recreated = 0
        self.acknowledged_without_offset = 0
        self.verified = 0
        self.republished = 0
        self.unverified = 0
        self._errors_logged = 0
        self._kafka_errors = RepeatedErrors()
        self._outage_since: float | None = None
        # Why the producer is unusable (a fatal error, or stuck): the next poll replaces it.
        self._fatal: str | None = None
        self._dead = False  # recreated too often: every further record fails
        # Records whose delivery a fatal error failed: sent again by the next producer.
        self._resend: list[tuple[_Batch, Message]] = []
        # Per partition: the last offset acknowledged, and the open run of records acknowledged
        # without one; closed runs wait in _ready to be read back.
        self._last_offset: dict[int, int] = {}
        self._open: dict[int, _Gap] = {}
        self._ready: list[_Gap] = []
        self._held = 0
        self._readback_after = 0.0
        # Something to do between records (replace the producer, read back): checked after each poll.
        self._attention = False
        self._attending = False
        self._stats_baseline = (-1, -1)  # (delivery reports, producer epoch) at the last change
        # Source positions. `position`: every record up to it delivered; `in_prefix`: how many of
        # this run's those are; `_batches`: the batches after it, in order; `_tracking`: False once a
        # batch had a record failed for good (`position` stays before it; memory stays bounded).
        self.position = self._start = start
        self.in_prefix = 0
        self._last_sent = start
        self._batches: deque[_Batch] = deque()
        self._tracking = True
        self._batch = self._open_batch()
        self._loose = self._new_batch()  # never closed, never in _batches (see _on_delivery)
        self._m_delivered = self._m_failed = self._m_awo = self._m_position = None
        if metrics is not None:
            self._m_delivered = metrics.records_produced.labels(topic)
            self._m_failed = metrics.records_failed.labels(topic)
            self._m_awo = metrics.acknowledged_without_offset.labels(topic)
            self._m_position = metrics.source_position.labels(topic)
        self._producer = self._create_producer()

    def _create_producer(self) -> Producer:
        self._fatal = None
        self._stats_baseline = (-1, -1)
        return Producer(
            client_config(
                self._settings,
                **{
                    "enable.idempotence": True,  # retries never duplicate or reorder a record
                    "acks": "all",
                    "linger.ms": 5,
                    "queue.buffering.max.messages": 200000,
                    "error_cb": self._on_error,
                    "statistics.interval.ms": _STATS_INTERVAL_MS,
                    "stats_cb": self._on_stats,
                },
            )
        )

    def send(self, sample: Sample, position: int | None = None) -> None:
        """Queue ``sample``; ``position``: its source position (default: the one after the last)."""
        if position is None:
            position = self._last_sent + 1
        self._last_sent = position
        batch = self._batch
        batch.last = position
        batch.sent += 1
        self.attempted += 1
        self._produce(encode_sample(sample, self.codec), sample.key, sample.timestamp_ms, batch)
        if batch.sent == _BATCH:
            self._close_batch()
        self._poll(0)

    def _new_batch(self) -> _Batch:
        batch = _Batch()
        batch.callback = partial(self._on_report, batch)
        return batch

    def _open_batch(self) -> _Batch:
        batch = self._new_batch()
        if self._tracking and len(self._batches) >= _MAX_BATCHES:
            logger.warning(
                "a record is unconfirmed after %d later ones were sent: the resume position stays at %d",
                _MAX_BATCHES * _BATCH,
                self.position,
            )
            self._tracking = False
            self._batches.clear()
        if self._tracking:
            self._batches.append(batch)
        self._batch = batch
        return batch

    def _close_batch(self) -> None:
        """No more records join the current batch (full, or the end): it can complete."""
        batch = self._batch
        if batch.sent == 0:
            return
        batch.target = batch.sent
        self._open_batch()
        if batch.settled == batch.target:
            self._completed(batch)

    def _settle(self, batch: _Batch, *, failed: bool = False) -> None:
        """A record of ``batch`` is delivered, or failed for good."""
        if failed:
            batch.failed += 1
        batch.settled += 1
        if batch.settled == batch.target:
            self._completed(batch)

    def _completed(self, batch: _Batch) -> None:
        """Move :attr:`position` over the complete batches at the head."""
        batch.complete = True
        batches = self._batches
        while batches and batches[0].complete:
            head = batches.popleft()
            if head.failed:
                # A record of it failed for good: the position never passes it.
                self._tracking = False
                batches.clear()
                break
            self.position = head.last
            self.in_prefix += head.sent
        if self._m_position is not None:
            self._m_position.set(self.position)

    def _produce(
        self,
        value: bytes | None,
        key: bytes | str | None,
        timestamp_ms: int | None,
        batch: _Batch,
        partition: int = -1,
    ) -> None:
        on_delivery = batch.callback
        while not self._dead:
            try:
                self._producer.produce(
                    self.topic,
                    value=value,
                    key=key,
                    partition=partition,
                    on_delivery=on_delivery,
                    timestamp=timestamp_ms or 0,  # 0: now
                    headers=self._headers,
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self._poll(0.05)
            except KafkaException as error:
                # A fatal producer refuses new records: replace it, then try again.
                self._raised(error)
                self._recreate()
        self._failed_at((batch,))

    def _poll(self, timeout_s: float) -> None:
        try:
            self._producer.poll(timeout_s)
        except KafkaException as error:
            self._raised(error)
        if self._attention and not self._attending:
            self._attend()

    def _raised(self, error: KafkaException) -> None:
        """A fatal error comes as an exception from poll() (and produce() refuses records after it)."""
        kafka_error = error.args[0] if error.args and isinstance(error.args[0], KafkaError) else None
        if kafka_error is None or not (kafka_error.fatal() or kafka_error.code() == KafkaError._FATAL):
            raise error
        if self._dead:
            return  # given up on: every record fails anyway
        if self._fatal is None:
            self._fatal = str(kafka_error.str())
            logger.error("kafka: fatal producer error: %s", self._fatal)
            if self.metrics is not None:
                self.metrics.kafka_errors.labels(kafka_error.name()).inc()
        self._attention = True

    def _attend(self) -> None:
        """Replace an unusable producer; read back records acknowledged without an offset."""
        self._attending = True
        try:
            self._attention = False
            if self._fatal is not None and not self._dead:
                self._recreate()
            if self._ready or self._held >= _MAX_HELD:
                if time.monotonic() >= self._readback_after:
                    self._verify(final=False)
                # Still waiting (the broker did not answer): look again at a later poll.
                self._attention = bool(self._ready)
        finally:
            self._attending = False

    def flush(self, timeout_s: float = _FLUSH_TIMEOUT_S, abandon: Callable[[], bool] | None = None) -> None:
        """Deliver everything, read back what was acknowledged without an offset, and report.

        ``abandon()`` true ends the wait early (a second signal): what is still queued stays
        undelivered (see :meth:`drop_queued`)."""
        self._close_batch()
        self._flush(timeout_s, abandon)
        for _ in range(_MAX_READBACK_ROUNDS):
            if not (self._ready or self._open) or (abandon is not None and abandon()):
                break
            self._verify(final=True)
            self._flush(timeout_s, abandon)
        self._give_up_held()
        if self.resent or self.recreated:
            logger.warning(
                "the producer was unusable %d time(s) and was recreated; %d record(s) were sent again "
                "(at least once: a record the broker had already stored may now be in the topic twice)",
                self.recreated,
                self.resent,
            )
        if self.acknowledged_without_offset:
            logger.warning(
                "%d record(s) were acknowledged without an offset, as duplicates of an earlier write: "
                "%d verified in the topic, %d missing and republished, %d unverified (counted as failed)",
                self.acknowledged_without_offset,
                self.verified,
                self.republished,
                self.unverified,
            )

    def _flush(self, timeout_s: float, abandon: Callable[[], bool] | None = None) -> None:
        # poll(), not Producer.flush(): a fatal error raised inside flush() leaves the delivery reports
        # it serves next running with the exception set (confluent-kafka 2.16: SystemError).
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            self._poll(max(0.0, min(0.1, deadline - time.monotonic())))
            remaining = len(self._producer)
            if remaining == 0 or time.monotonic() >= deadline or (abandon is not None and abandon()):
                break
        if remaining:
            logger.error("%d record(s) still undelivered after %.1fs", remaining, time.monotonic() - started)

    def drop_queued(self) -> None:
        """Give up on every record not confirmed yet (a stop): counted as failed, not resumed past.

        A record already sent may still be stored by the broker: it counts as failed all the same,
        and a resume sends it again (at least once)."""
        pending = self.pending
        if not pending:
            return
        with contextlib.suppress(KafkaException, RuntimeError):
            self._producer.purge(in_queue=True, in_flight=True)
        # Their delivery reports (failed: purged) come with the next polls.
        self._flush(_PURGE_REPORTS_TIMEOUT_S)
        logger.error("gave up on %d record(s) not confirmed in time: counted as failed", pending)

    def _recreate(self) -> None:
        """Replace a producer that failed fatally; re-send every record the failure took down."""
        reason = self._fatal or "unknown"
        old = self._producer
        # Fail what the dead producer still holds, so that its delivery reports hand it back to us.
        with contextlib.suppress(KafkaException, RuntimeError):
            old.purge()
        deadline = time.monotonic() + 5.0
        while len(old) and time.monotonic() < deadline:
            with contextlib.suppress(KafkaException, RuntimeError):
                old.flush(0.1)
        self.recreated += 1
        pending, self._resend = self._resend, []
        if self.recreated > _MAX_RECREATES:
            logger.error(
                "the producer is unusable again (%s) after %d recreations: giving up on %d record(s) "
                "and on every record still to come",
                reason,
                self.recreated - 1,
                len(pending),
            )
            self._failed_at([batch for batch, _ in pending])
            self._dead = True
            self._fatal = None
            return
        logger.warning(
            "producer unusable (%s): recreating it and re-sending %d record(s)", reason, len(pending)
        )
        if self.metrics is not None:
            self.metrics.recreated.inc()
            self.metrics.records_resent.labels(self.topic).inc(len(pending))
        self._producer = self._create_producer()
        self.resent += len(pending)
        for batch, message in pending:
            self._produce_again(message, batch)

    def _produce_again(self, message: Message, batch: _Batch, partition: int = -1) -> None:
        timestamp_type, timestamp = message.timestamp()
        self._produce(
            message.value(),
            message.key(),
            timestamp if timestamp_type == TIMESTAMP_CREATE_TIME and timestamp > 0 else None,
            batch,
            partition,
        )

    def _fail(self, n: int) -> None:
        with self._lock:
            self.failed += n
        if self._m_failed is not None and n:
            self._m_failed.inc(n)

    def _failed_at(self, batches: Collection[_Batch]) -> None:
        """Records (one per item: its batch) failed for good."""
        self._fail(len(batches))
        for batch in batches:
            self._settle(batch, failed=True)

    def _deliver(self, n: int) -> None:
        with self._lock:
            self.delivered += n
        if self._m_delivered is not None and n:
            self._m_delivered.inc(n)

    @property
    def pending(self) -> int:
        """Records sent and neither delivered nor failed yet."""
        with self._lock:
            return self.attempted - self.delivered - self.failed

    def summary(
        self,
        seconds: float,
        *,
        unit: str = "record",
        source: str | None = None,
        error: str | None = None,
        signal: str | None = None,
    ) -> ProduceSummary:
        """The counts so far (after :meth:`flush`), with what ended the run (see :class:`ProduceSummary`)."""
        with self._lock:
            delivered, failed = self.delivered, self.failed
        # Records neither acknowledged nor reported failed were not delivered either.
        failed += self.attempted - delivered - failed
        return ProduceSummary(
            self.attempted,
            delivered,
            failed,
            seconds,
            resent=self.resent,
            recreated=self.recreated,
            acknowledged_without_offset=self.acknowledged_without_offset,
            verified=self.verified,
            republished=self.republished,
            unverified=self.unverified,
            position=self.position,
            unit=unit,
            delivered_after=delivered - self.in_prefix,
            skipped=self._start,
            source=source,
            error=error,
            signal=signal,
        )

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        """A delivery report of a record outside the batches: counted, no part of the resume position."""
        self._on_report(self._loose, error, message)

    def _on_report(self, batch: _Batch, error: KafkaError | None, message: Message) -> None:
        """The delivery report of a record of ``batch``."""
        if error is not None:
            if self._fatal is not None or error.code() in _PRODUCER_STATE_ERRORS:
                # Failed by the producer's fatal error, not by the broker: the next producer sends it.
                self._resend.append((batch, message))
                if self._fatal is None:
                    self._fatal = f"delivery failed: {error.str()}"
                    self._attention = True
                return
            self._failed_at((batch,))
            if self._errors_logged < 10 and error.code() not in _PURGED:  # purged: drop_queued logs
                self._errors_logged += 1
                logger.error("delivery to %s failed: %s", self.topic, error.str())
            return
        if self._outage_since is not None:
            logger.warning(
                "kafka reachable again: records acknowledged after %.1fs of errors",
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
        offset = message.offset()
        if self._open or offset is None or offset < 0:
            if self._hold(batch, message, offset):
                return
        else:
            self._last_offset[message.partition() or 0] = offset
        self._deliver(1)
        batch.settled += 1  # _settle(batch), inline: once per record
        if batch.settled == batch.target:
            self._completed(batch)

    def _hold(self, batch: _Batch, message: Message, offset: int | None) -> bool:
        """Keep a record acknowledged without an offset (True), or close its partition's open run.

        A broker answers a retried batch it believes it already stored with DUPLICATE_SEQUENCE_NUMBER,
        which librdkafka reports as delivered, with base offset -1: the batch's first record has no
        offset, the rest count up from 0. Tansu 0.6.0 (S3 storage) does this for a batch whose write a
        restart interrupted, whether it stored the batch or not. A record taken for one by mistake (a
        real offset equal to the count) is found when read back: the check errs on the safe side.
        """
        partition = message.partition() or 0
        gap = self._open.get(partition)
        if offset is not None and offset >= 0 and (gap is None or offset != gap.next_offset):
            if gap is not None:
                # Acknowledged with an offset again: the run lies between the two known offsets.
                del self._open[partition]
                gap.before = offset
                self._ready.append(gap)
                self._attention = True
            self._last_offset[partition] = offset
            return False
        if gap is None:
            gap = self._open[partition] = _Gap(partition, self._last_offset.get(partition, -1))
        gap.next_offset = offset + 1 if offset is not None and offset >= 0 else 0
        gap.records.append((batch, message))
        self._held += 1
        self.acknowledged_without_offset += 1
        if self._m_awo is not None:
            self._m_awo.inc()
        if self._held >= _MAX_HELD:
            self._attention = True
        return True

    def _verify(self, *, final: bool) -> None:
        """Read back the held records' ranges; count the found, publish the missing again."""
        gaps, self._ready = self._ready, []
        if final or self._held >= _MAX_HELD:
            # No later offset known (yet): read to the end of the partition.
            gaps.extend(self._open.values())
            self._open.clear()
        if not gaps:
            return
        # One range per run of records: two runs of a partition are read apart, so that a record of this
        # publisher acknowledged with an offset between them is never taken for one of them.
        ranges = [
            ReadBack(
                gap.partition,
                gap.after,
                gap.before,
                self._run_id,
                Counter(_content(message) for _, message in gap.records),
            )
            for gap in gaps
        ]
        started = time.monotonic()
        read_back(
            self._settings, self.topic, ranges, _FINAL_READBACK_TIMEOUT_S if final else _READBACK_TIMEOUT_S
        )
        found_total = missing_total = 0
        unchecked: list[_Batch] = []
        for gap, wanted in zip(gaps, ranges, strict=True):
            held = gap.records
            if not wanted.complete:
                if final:
                    unchecked.extend(batch for batch, _ in held)
                    continue
                # The broker did not answer: keep them, try again later.
                self._ready.append(gap)
                self._readback_after = time.monotonic() + _READBACK_RETRY_S
                continue
            self._held -= len(held)
            found: list[_Batch] = []
            missing: list[tuple[_Batch, Message]] = []
            unmatched = Counter(wanted.found)
            for batch, message in held:
                content = _content(message)
                if unmatched[content] > 0:
                    unmatched[content] -= 1
                    found.append(batch)
                else:
                    missing.append((batch, message))
            found_total += len(found)
            missing_total += len(missing)
            self._count_verified(len(found), len(missing))
            if found:
                self._deliver(len(found))
                for batch in found:
                    self._settle(batch)
            logger.warning(
                "read back %d record(s) acknowledged without an offset in %s [%d] (%s, %d record(s) read): "
                "%d found, %d missing%s",
                len(held),
                self.topic,
                gap.partition,
                wanted.describe(),
                wanted.records_read,
                len(found),
                len(missing),
                ": publishing them again" if missing else "",
            )
            for batch, message in missing:
                self._produce_again(message, batch, gap.partition)
        if unchecked:
            self._held -= len(unchecked)
            self._unverified(unchecked)
        logger.debug(
            "read back in %.2fs: %d found, %d republished, %d unverified",
            time.monotonic() - started,
            found_total,
            missing_total,
            len(unchecked),
        )

    def _count_verified(self, found: int, missing: int) -> None:
        self.verified += found
        self.republished += missing
        if self.metrics is not None:
            self.metrics.records_verified.labels(self.topic).inc(found)
            self.metrics.records_republished.labels(self.topic).inc(missing)

    def _unverified(self, batches: Collection[_Batch]) -> None:
        n = len(batches)
        logger.error(
            "%d record(s) acknowledged without an offset could not be read back: counted as failed", n
        )
        self.unverified += n
        self._failed_at(batches)
        if self.metrics is not None:
            self.metrics.records_unverified.labels(self.topic).inc(n)

    def _give_up_held(self) -> None:
        """Records still held after the last read-back round (acknowledged without an offset again)."""
        left = [batch for gap in (*self._ready, *self._open.values()) for batch, _ in gap.records]
        self._ready = []
        self._open.clear()
        self._held = 0
        if left:
            self._unverified(left)

    def _on_stats(self, text: str) -> None:
        """Notice an idempotent producer stuck in a loop of epoch bumps.

        After a broker restart that lost its producer state, librdkafka answers UNKNOWN_PRODUCER_ID
        for a batch never sent before by bumping its epoch locally and retrying, which such a broker
        rejects again: no record is ever acknowledged and no error is reported. Its statistics show
        the epoch climbing (tens a second on Tansu) while no delivery report comes."""
        try:
            epoch = int(orjson.loads(text)["eos"]["producer_epoch"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        progress = self.delivered + self.failed + self.acknowledged_without_offset + len(self._resend)
        last_progress, last_epoch = self._stats_baseline
        if progress != last_progress or epoch < last_epoch or last_epoch < 0:
            self._stats_baseline = (progress, epoch)
            return
        if epoch - last_epoch >= _STUCK_EPOCH_BUMPS and self._fatal is None and len(self._producer):
            self._fatal = (
                f"stuck: {epoch - last_epoch} producer epoch bumps and no delivery report "
                "(the broker does not know this producer)"
            )
            logger.error("kafka: the idempotent producer is %s", self._fatal)
            self._attention = True

    def _on_error(self, error: KafkaError) -> None:
        if self.metrics is not None:
            self.metrics.kafka_errors.labels(error.name()).inc()
        if error.fatal():
            # An idempotent producer's fatal error (e.g. after a broker lost its producer state)
            # makes it unusable: the next poll replaces it (see _recreate).
            self._fatal = str(error.str())
            self._attention = True
            logger.error("kafka: fatal producer error: %s", error.str())
            return
        if error.code() in _OUTAGE_ERRORS and self._outage_since is None:
            self._outage_since = time.monotonic()
        text = error.str()
        if (more := self._kafka_errors.admit(text)) is not None:
            logger.warning("kafka: %s%s (records are kept and retried)", text, more)


def _content(message: Message) -> Content:
    return (message.value(), message.key())


def publish(
    settings: KafkaSettings,
    samples: Iterable[Sample],
    *,
    topic: str,
    codec: str,
    count: int | None = None,
    rate: float | None = None,
    partitions: int | None = None,
    progress: bool = False,
    metrics: ProducerMetrics | None = None,
    should_stop: Callable[[], bool] | None = None,
    stop: StopSignals | None = None,
) -> ProduceSummary:
    """Publish ``samples`` (at most ``count``), optionally at ``rate`` records/s.

    The run ends at the end of ``samples``, at ``count``, when ``should_stop()`` is true, at a signal
    that ``stop`` (entered) caught, or at a bad record (a :class:`ProducerError` from ``samples``: in
    the summary's ``error``); every record read before is then flushed (after a signal, within its
    grace) and counted. A :class:`SampleSource` gives the records' positions (otherwise they are
    numbered from 1). The first record is read before the topic is created (``partitions``): a bad
    one, or a signal, ends the run with nothing created.
    """
    watch = stop if stop is not None else StopSignals()  # not entered: never signalled
    source = samples if isinstance(samples, SampleSource) else None
    unit = source.unit if source is not None else "record"
    name = source.name if source is not None else None
    # Dense: one position per record (synthetic, plain iterables): counted here, not read per record.
    positions = None if source is None or source.dense else source
    position = source.position if source is not None else 0
    admin = admin_client(settings)
    if partitions is None and topic_partitions(admin, topic, settings.startup_timeout_s) is None:
        raise TopicError(f"topic {topic!r} does not exist (create it, or pass --partitions N)")
    started = time.monotonic()
    records = iter(samples)
    sample: Sample | None = None
    error: str | None = None
    try:
        if count is None or count > 0:
            with watch.interruptible():
                sample = next(records, None)
    except ProducerError as bad:
        error = str(bad)
    except Stopped:
        pass
    if sample is None and (error is not None or watch.signum is not None):
        # Nothing was read: nothing to flush, and no topic to create for nothing.
        return ProduceSummary(
            0,
            0,
            0,
            time.monotonic() - started,
            position=position,
            unit=unit,
            skipped=position,
            source=name,
            error=error,
            signal=watch.name,
        )
    if partitions is not None:
        ensure_topic(admin, topic, partitions, settings.startup_timeout_s)
    publisher = Publisher(settings, topic=topic, codec=codec, metrics=metrics, start=position)
    started = time.monotonic()
    with _progress_bar(progress, count) as advance:
        try:
            while sample is not None:
                if watch.signum is not None or (should_stop is not None and should_stop()):
                    break
                position = position + 1 if positions is None else positions.position
                publisher.send(sample, position)
                advance()
                if count is not None and publisher.attempted >= count:
                    break
                # A signal raises Stopped into this wait (the next line of a pipe, the pace).
                watch.waiting = True
                if rate is not None:
                    # Pace against the schedule, not the previous record, so the rate does not drift.
                    ahead = started + publisher.attempted / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                sample = next(records, None)
                watch.waiting = False
        except ProducerError as bad:
            error = str(bad)
        except Stopped:
            pass
        finally:
            watch.waiting = False
        if watch.signum is not None:
            logger.warning(
                "%s: stopped reading the source; flushing %d unconfirmed record(s) (a 2nd signal gives up)",
                watch.name,
                publisher.pending,
            )
        elif error is not None:
            logger.debug("bad record: flushing the %d record(s) read before it", publisher.pending)
        publisher.flush(abandon=watch.give_up)
        if watch.signum is not None:
            publisher.drop_queued()
    return publisher.summary(
        time.monotonic() - started, unit=unit, source=name, error=error, signal=watch.name
    )


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int | None) -> Iterator[Callable[[], None]]:
    """A rich progress bar on the terminal; a no-op advance() otherwise."""
    if not enabled:
        yield lambda: None
        return
    columns = (
        TextColumn("producing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]} rec/s"),
    )
    started = time.monotonic()
    done = 0
    last_refresh = 0.0
    with Progress(*columns) as progress:
        task = progress.add_task("produce", total=total, rate="-")

        def advance() -> None:
            nonlocal done, last_refresh
            done += 1
            now = time.monotonic()
            if now - last_refresh >= 0.1:  # redraw at 10 Hz, not per record
                rate = done / max(now - started, 1e-9)
                progress.update(task, completed=done, rate=f"{rate:,.0f}")
                last_refresh = now

        yield advance
        progress.update(task, completed=done)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
