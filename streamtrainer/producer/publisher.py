"""Publishing samples to a topic, with every delivery report checked.

A record counts as produced only when the broker acknowledged it. At the end
everything still queued is flushed; anything not acknowledged counts as failed,
and the command exits non-zero, so no record is ever lost silently.

A broker outage is ridden out: librdkafka keeps retrying (with backoff) every
record for ``message.timeout.ms``; the outage is logged (rate-limited) and counted
in ``streamtrainer_producer_kafka_errors_total{kind}``, and its end is logged too.
An idempotent producer that fails fatally (e.g. UNKNOWN_PRODUCER_ID after a broker
lost its producer state) is replaced by a new one, and every record whose delivery
the fatal error failed is sent again (at least once: counted, logged, never dropped).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, KafkaException, Message, Producer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streamtrainer.connection import (
    admin_client,
    client_config,
    ensure_topic,
    topic_partitions,
)
from streamtrainer.exceptions import TopicError
from streamtrainer.metrics import ProducerMetrics
from streamtrainer.records import Sample
from streamtrainer.records.codec import codec_headers, encode_sample
from streamtrainer.settings import KafkaSettings

logger = logging.getLogger(__name__)

_FLUSH_TIMEOUT_S = 30.0
# The same client error repeats many times a second while a broker is down.
_ERROR_LOG_INTERVAL_S = 5.0
# A producer that keeps failing fatally is replaced at most this many times per run.
_MAX_RECREATES = 10
# Errors that mean "the broker is unreachable" (an outage begins).
_OUTAGE_ERRORS = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE})


@dataclass(frozen=True, slots=True)
class ProduceSummary:
    attempted: int
    delivered: int
    failed: int
    seconds: float
    resent: int = 0  # re-sent after a fatal producer error (at least once: may be duplicates)
    recreated: int = 0  # times the producer was replaced after a fatal error
    acknowledged_without_offset: int = 0  # acknowledged as duplicates of an earlier write

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.delivered == self.attempted


class Publisher:
    """Sends samples to one topic and counts acknowledgements."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        topic: str,
        codec: str,
        metrics: ProducerMetrics | None = None,
    ) -> None:
        self.topic = topic
        self.codec = codec
        self.metrics = metrics
        if metrics is not None:
            metrics.start(topic)
        self._headers = codec_headers(codec)
        self._settings = settings
        self._lock = threading.Lock()
        self.attempted = 0
        self.delivered = 0
        self.failed = 0
        self.resent = 0
        self.recreated = 0
        self.acknowledged_without_offset = 0
        self._errors_logged = 0
        self._kafka_errors: dict[str, tuple[float, int]] = {}
        self._outage_since: float | None = None
        self._fatal: KafkaError | None = None
        # Records whose delivery a fatal error failed: sent again by the next producer.
        self._resend: list[Message] = []
        # Per partition: the next offset of a run of records acknowledged without an offset.
        self._unknown_offset_run: dict[int, int] = {}
        self._producer = self._create_producer()

    def _create_producer(self) -> Producer:
        self._fatal = None
        return Producer(
            client_config(
                self._settings,
                **{
                    "enable.idempotence": True,  # retries never duplicate or reorder a record
                    "acks": "all",
                    "linger.ms": 5,
                    "queue.buffering.max.messages": 200000,
                    "error_cb": self._on_error,
                },
            )
        )

    def send(self, sample: Sample) -> None:
        value = encode_sample(sample, self.codec)
        self._produce(value, sample.key, self._headers, sample.timestamp_ms)
        self.attempted += 1
        self._poll(0)

    def _produce(
        self,
        value: bytes | None,
        key: bytes | str | None,
        headers: object,
        timestamp_ms: int | None,
    ) -> None:
        kwargs: dict[str, object] = {}
        if timestamp_ms is not None:
            kwargs["timestamp"] = timestamp_ms
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=value,
                    key=key,
                    headers=headers,  # type: ignore[arg-type]
                    on_delivery=self._on_delivery,
                    **kwargs,  # type: ignore[arg-type]
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self._poll(0.05)
            except KafkaException as error:
                # A fatal producer refuses new records: replace it, then try again.
                if self._fatal is None and error.args and error.args[0].fatal():
                    self._fatal = error.args[0]
                if self._fatal is None:
                    raise
                self._recreate()

    def _poll(self, timeout_s: float) -> None:
        self._producer.poll(timeout_s)
        if self._fatal is not None:
            self._recreate()

    def flush(self, timeout_s: float = _FLUSH_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = self._producer.flush(max(0.0, min(1.0, deadline - time.monotonic())))
            if self._fatal is not None:
                self._recreate()
                continue
            if remaining == 0 or time.monotonic() >= deadline:
                break
        if remaining:
            logger.error("%d record(s) still undelivered after %.0fs", remaining, timeout_s)
        if self.resent or self.recreated:
            logger.warning(
                "the producer failed fatally %d time(s) and was recreated; %d record(s) were sent again "
                "(at least once: a record the broker had already stored may now be in the topic twice)",
                self.recreated,
                self.resent,
            )
        if self.acknowledged_without_offset:
            logger.warning(
                "%d record(s) were acknowledged as duplicates of an earlier write, without an offset "
                "(a retry after a broker restart); a broker that lost that write has lost them",
                self.acknowledged_without_offset,
            )

    def _recreate(self) -> None:
        """Replace a producer that failed fatally; re-send every record the failure took down."""
        error = self._fatal
        assert error is not None
        old = self._producer
        # Fail what the dead producer still holds, so that its delivery reports hand it back to us.
        with contextlib.suppress(KafkaException, RuntimeError):
            old.purge()
        with contextlib.suppress(KafkaException, RuntimeError):
            old.flush(0)
        if self.recreated >= _MAX_RECREATES:
            logger.error(
                "the producer failed fatally again (%s) after %d recreations: giving up on %d record(s)",
                error.str(),
                self.recreated,
                len(self._resend),
            )
            self._fail(len(self._resend))
            self._resend = []
            self._fatal = None  # keep the dead producer: everything produced from now on fails loudly
            self.recreated += 1
            return
        self.recreated += 1
        pending, self._resend = self._resend, []
        logger.warning(
            "producer failed fatally (%s): recreating it and re-sending %d record(s)",
            error.str(),
            len(pending),
        )
        if self.metrics is not None:
            self.metrics.recreated.inc()
            self.metrics.records_resent.labels(self.topic).inc(len(pending))
        self._producer = self._create_producer()
        self.resent += len(pending)
        for message in pending:
            timestamp_type, timestamp = message.timestamp()
            self._produce(
                message.value(),
                message.key(),
                message.headers(),
                timestamp if timestamp_type == TIMESTAMP_CREATE_TIME else None,
            )

    def _fail(self, n: int) -> None:
        with self._lock:
            self.failed += n
        if self.metrics is not None and n:
            self.metrics.records_failed.labels(self.topic).inc(n)

    def summary(self, seconds: float) -> ProduceSummary:
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
        )

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None and (self._fatal is not None or error.code() == KafkaError._FATAL):
            # Failed by the producer's fatal error, not by the broker: the next producer sends it.
            self._resend.append(message)
            return
        with self._lock:
            if error is None:
                self.delivered += 1
            else:
                self.failed += 1
        if self.metrics is not None:
            if error is None:
                self.metrics.records_produced.labels(self.topic).inc()
            else:
                self.metrics.records_failed.labels(self.topic).inc()
        if error is None:
            self._check_offset(message)
            if self._outage_since is not None:
                logger.warning(
                    "kafka reachable again: records acknowledged after %.1fs of errors",
                    time.monotonic() - self._outage_since,
                )
                self._outage_since = None
        if error is not None and self._errors_logged < 10:
            self._errors_logged += 1
            logger.error("delivery to %s failed: %s", self.topic, error.str())

    def _check_offset(self, message: Message) -> None:
        """Count records acknowledged without an offset.

        A broker answers a retried batch it believes it already stored with DUPLICATE_SEQUENCE_NUMBER,
        which librdkafka reports as delivered, with base offset -1: the batch's first record has no
        offset, the rest count up from 0. Tansu 0.6.0 (S3 storage) does this for a batch whose write a
        restart interrupted, and that batch is not in the topic: such records are counted and reported.
        """
        partition = message.partition()
        offset = message.offset()
        if partition is None:
            return
        if offset is None or offset < 0:
            self._unknown_offset_run[partition] = 0
        elif self._unknown_offset_run.get(partition) == offset:
            self._unknown_offset_run[partition] = offset + 1
        else:
            self._unknown_offset_run.pop(partition, None)
            return
        self.acknowledged_without_offset += 1
        if self.metrics is not None:
            self.metrics.acknowledged_without_offset.labels(self.topic).inc()

    def _on_error(self, error: KafkaError) -> None:
        if self.metrics is not None:
            self.metrics.kafka_errors.labels(error.name()).inc()
        if error.fatal():
            # An idempotent producer's fatal error (e.g. after a broker lost its producer state)
            # makes it unusable: the next poll replaces it (see _recreate).
            self._fatal = error
            logger.error("kafka: fatal producer error: %s", error.str())
            return
        if error.code() in _OUTAGE_ERRORS and self._outage_since is None:
            self._outage_since = time.monotonic()
        # Report each distinct error every few seconds, not many times a second.
        now = time.monotonic()
        text = error.str()
        last, suppressed = self._kafka_errors.get(text, (-_ERROR_LOG_INTERVAL_S, 0))
        if now - last < _ERROR_LOG_INTERVAL_S:
            self._kafka_errors[text] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more like it)" if suppressed else ""
        logger.warning("kafka: %s%s (records are kept and retried)", text, more)
        self._kafka_errors[text] = (now, 0)


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
) -> ProduceSummary:
    """Publish ``samples`` (at most ``count``), optionally at ``rate`` records/s."""
    admin = admin_client(settings)
    if partitions is not None:
        ensure_topic(admin, topic, partitions, settings.startup_timeout_s)
    elif topic_partitions(admin, topic, settings.startup_timeout_s) is None:
        raise TopicError(f"topic {topic!r} does not exist (create it, or pass --partitions N)")
    publisher = Publisher(settings, topic=topic, codec=codec, metrics=metrics)
    started = time.monotonic()
    with _progress_bar(progress, count) as advance:
        for sample in samples:
            if count is not None and publisher.attempted >= count:
                break
            if should_stop is not None and should_stop():
                break
            if rate is not None:
                # Pace against the schedule, not the previous record, so the rate does not drift.
                ahead = started + publisher.attempted / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            publisher.send(sample)
            advance()
        publisher.flush()
    return publisher.summary(time.monotonic() - started)


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
