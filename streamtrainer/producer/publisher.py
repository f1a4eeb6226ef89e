"""Publishing samples to a topic, with every delivery report checked.

A record counts as produced only when the broker acknowledged it. At the end
everything still queued is flushed; anything not acknowledged counts as failed,
and the command exits non-zero, so no record is ever lost silently.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import KafkaError, Message, Producer
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


@dataclass(frozen=True, slots=True)
class ProduceSummary:
    attempted: int
    delivered: int
    failed: int
    seconds: float

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
        self._producer = Producer(
            client_config(
                settings,
                **{
                    "enable.idempotence": True,  # retries never duplicate or reorder a record
                    "acks": "all",
                    "linger.ms": 5,
                    "queue.buffering.max.messages": 200000,
                    "error_cb": self._on_error,
                },
            )
        )
        self._lock = threading.Lock()
        self.attempted = 0
        self.delivered = 0
        self.failed = 0
        self._errors_logged = 0

    def send(self, sample: Sample) -> None:
        value = encode_sample(sample, self.codec)
        kwargs: dict[str, object] = {}
        if sample.timestamp_ms is not None:
            kwargs["timestamp"] = sample.timestamp_ms
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=value,
                    key=sample.key,
                    headers=self._headers,  # type: ignore[arg-type]
                    on_delivery=self._on_delivery,
                    **kwargs,  # type: ignore[arg-type]
                )
                break
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self._producer.poll(0.05)
        self.attempted += 1
        self._producer.poll(0)

    def flush(self, timeout_s: float = _FLUSH_TIMEOUT_S) -> None:
        remaining = self._producer.flush(timeout_s)
        if remaining:
            logger.error("%d record(s) still undelivered after %.0fs", remaining, timeout_s)

    def summary(self, seconds: float) -> ProduceSummary:
        with self._lock:
            delivered, failed = self.delivered, self.failed
        # Records neither acknowledged nor reported failed were not delivered either.
        failed += self.attempted - delivered - failed
        return ProduceSummary(self.attempted, delivered, failed, seconds)

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
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
        if error is not None and self._errors_logged < 10:
            self._errors_logged += 1
            logger.error("delivery to %s failed: %s", self.topic, error.str())

    def _on_error(self, error: KafkaError) -> None:
        logger.warning("kafka: %s", error.str())


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
