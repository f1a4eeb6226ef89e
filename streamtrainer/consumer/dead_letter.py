"""The dead-letter topic: where every record the worker cannot train on goes, with its reason.

A record that fails validation, or whose update a training guard refused
(:class:`TrainingGuardSkip`), is produced to ``<topic>.dlq`` (configurable)
with its original key, value and headers, plus headers naming its source
topic, partition, offset and timestamp, the error class and message, and the
worker. The write is *confirmed* (delivery report) before the worker's
checkpoint — and so its committed offset — can move past the record; if the
dead-letter topic cannot be written the worker retries with backoff, says so
in its log and metrics, and never skips the record.

``streamtrainer dlq inspect`` lists dead-lettered records and ``streamtrainer
dlq redrive`` publishes selected ones back to their source topic.
"""

from __future__ import annotations

import logging
import math
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from streamtrainer.connection import client_config
from streamtrainer.consumer.exceptions import DeadLetterError
from streamtrainer.consumer.messages import timestamp_of
from streamtrainer.metrics import WorkerMetrics
from streamtrainer.records.exceptions import DECODE_REASONS
from streamtrainer.settings import KafkaSettings
from streamtrainer.training.learner import SKIP_REASONS, SKIP_SPIKE

logger = logging.getLogger(__name__)

HEADER_PREFIX = "streamtrainer.dlq."
SOURCE_TOPIC = HEADER_PREFIX + "source.topic"
SOURCE_PARTITION = HEADER_PREFIX + "source.partition"
SOURCE_OFFSET = HEADER_PREFIX + "source.offset"
SOURCE_TIMESTAMP = HEADER_PREFIX + "source.timestamp"
ERROR_CLASS = HEADER_PREFIX + "error.class"
ERROR_MESSAGE = HEADER_PREFIX + "error.message"
WORKER_ID = HEADER_PREFIX + "worker.id"

_FLUSH_TIMEOUT_S = 10.0
_MAX_BACKOFF_S = 30.0
_SERVE_INTERVAL_S = 0.1

Headers = list[tuple[str, str | bytes | None]]

# Every reason a record is dead-lettered for (a bounded metric label): it failed decoding or
# validation, or a training guard refused its update.
DEAD_LETTER_REASONS: Final = (*DECODE_REASONS, *SKIP_REASONS)


class Rejection(Protocol):
    """Why a record is dead-lettered: a :class:`DecodeError` or a :class:`TrainingGuardSkip`."""

    @property
    def reason(self) -> str: ...  # one of DEAD_LETTER_REASONS: the error.class header

    @property
    def detail(self) -> str: ...  # for people: the error.message header


@dataclass(frozen=True, slots=True)
class TrainingGuardSkip:
    """A record a training guard refused to learn from: ``non_finite_loss`` or ``loss_spike``."""

    reason: str
    detail: str

    @classmethod
    def of(cls, reason: str, loss: float, threshold: float) -> TrainingGuardSkip:
        """The rejection of a record with this pre-update ``loss`` (NaN: not finite) and spike threshold."""
        if reason == SKIP_SPIKE:
            detail = f"loss {loss:.6g} above the spike threshold {threshold:.6g} (factor x running loss)"
        elif math.isfinite(loss):
            detail = f"loss {loss:.6g}, but the step's gradient or updated state was not finite"
        else:
            detail = "the loss was not finite"
        return cls(reason, f"training guard refused the update: {detail}")


def _headers_of(message: Message) -> list[tuple[str, bytes]]:
    """A message's headers as (name, bytes) pairs."""
    pairs = []
    for header in message.headers() or []:
        name, value = header[0], header[1]
        pairs.append((name, value if isinstance(value, bytes) else (value or "").encode()))
    return pairs


def dead_letter_topic(topic: str, configured: str | None) -> str:
    return configured or f"{topic}.dlq"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class DeadLetterQueue:
    """Produces invalid records to the dead-letter topic and waits until each is acknowledged."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        topic: str,
        worker_id: str,
        metrics: WorkerMetrics,
        source_topic: str,
        producer_config: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.producer_config = dict(producer_config or {})
        self.topic = topic
        self.worker_id = worker_id
        self.metrics = metrics
        self.source_topic = source_topic
        self._fatal: KafkaError | None = None
        self._producer = self._create_producer()
        self.blocked = False
        metrics.dead_letter_blocked.set(0)

    def _create_producer(self) -> Producer:
        self._fatal = None
        config = client_config(
            self.settings,
            **{
                # Idempotent, acks=all: a retried write is never duplicated, an acknowledged one is durable.
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "error_cb": self._on_error,
                **self.producer_config,
            },
        )
        return Producer(config)

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            # An idempotent producer's fatal error (e.g. after a broker lost its state) makes it
            # unusable: note it, and the next attempt builds a new one.
            self._fatal = error

    def close(self) -> None:
        self._producer.flush(_FLUSH_TIMEOUT_S)

    def send(
        self,
        failures: Sequence[tuple[Message, Rejection]],
        *,
        serve: Callable[[], None],
        should_stop: Callable[[], bool],
    ) -> bool:
        """Write ``failures`` and wait until every one is acknowledged; True when they all are.

        On failure it retries with exponential backoff (calling ``serve`` meanwhile, so the
        worker stays in its group) until ``should_stop()``; then it returns False and the
        caller must not let its offsets pass these records.
        """
        pending = list(failures)
        attempt = 0
        while pending:
            if self._fatal is not None:
                logger.warning("dead-letter producer failed fatally (%s): recreating it", self._fatal.str())
                self._producer = self._create_producer()
            pending, last_error = self._attempt(pending)
            if not pending:
                break
            attempt += 1
            self.blocked = True
            self.metrics.dead_letter_blocked.set(1)
            self.metrics.dead_letter_write_failures.inc(len(pending))
            backoff = min(_MAX_BACKOFF_S, 0.25 * 2 ** (attempt - 1))
            logger.warning(
                "cannot write %d record(s) to dead-letter topic %s (%s): not skipping them, "
                "retrying in %.1fs (attempt %d)",
                len(pending),
                self.topic,
                last_error,
                backoff,
                attempt,
            )
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline:
                if should_stop():
                    return False
                serve()
                time.sleep(_SERVE_INTERVAL_S)
        if self.blocked:
            logger.info("dead-letter topic %s is writable again", self.topic)
        self.blocked = False
        self.metrics.dead_letter_blocked.set(0)
        for _, error in failures:
            self.metrics.dead_lettered.labels(self.source_topic, error.reason).inc()
        return True

    def _attempt(self, batch: list[tuple[Message, Rejection]]) -> tuple[list[tuple[Message, Rejection]], str]:
        outcome: dict[int, KafkaError | None] = {}
        last_error = "no delivery report"
        for index, (message, error) in enumerate(batch):

            def report(err: KafkaError | None, _msg: Message, index: int = index) -> None:
                outcome[index] = err

            try:
                self._producer.produce(
                    self.topic,
                    key=message.key(),
                    value=message.value(),
                    headers=self._headers(message, error),
                    on_delivery=report,
                )
            except (BufferError, KafkaException) as produce_error:
                outcome[index] = KafkaError(KafkaError._FAIL, str(produce_error))
        self._producer.flush(_FLUSH_TIMEOUT_S)
        failed = []
        for index, item in enumerate(batch):
            result = outcome.get(index, KafkaError(KafkaError._TIMED_OUT, "no delivery report"))
            if result is not None:
                failed.append(item)
                last_error = result.str()
        return failed, last_error

    def _headers(self, message: Message, error: Rejection) -> Headers:
        original: Headers = [(k, v) for k, v in _headers_of(message) if not k.startswith(HEADER_PREFIX)]
        return [
            *original,
            (SOURCE_TOPIC, (message.topic() or self.source_topic).encode()),
            (SOURCE_PARTITION, str(message.partition()).encode()),
            (SOURCE_OFFSET, str(message.offset()).encode()),
            (SOURCE_TIMESTAMP, str(timestamp_of(message)).encode()),
            (ERROR_CLASS, error.reason.encode()),
            (ERROR_MESSAGE, error.detail.encode(errors="replace")[:1000]),
            (WORKER_ID, self.worker_id.encode()),
        ]


# -- reading it back: `streamtrainer dlq inspect / redrive` -------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key == name:
                return value.decode(errors="replace")
        return ""

    @property
    def reason(self) -> str:
        return self.header(ERROR_CLASS)

    @property
    def source(self) -> tuple[str, int, int]:
        return (
            self.header(SOURCE_TOPIC),
            int(self.header(SOURCE_PARTITION) or -1),
            int(self.header(SOURCE_OFFSET) or -1),
        )

    @property
    def original_headers(self) -> Headers:  # for produce()
        return [(k, v) for k, v in self.headers if not k.startswith(HEADER_PREFIX)]


def read_dead_letters(settings: KafkaSettings, topic: str, *, idle_s: float = 2.0) -> Iterator[DeadLetter]:
    """Every record in the dead-letter topic, oldest first per partition (reads until idle)."""
    consumer = Consumer(
        client_config(
            settings,
            **{
                "group.id": f"streamtrainer-dlq-inspect-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            },
        )
    )
    try:
        metadata = consumer.list_topics(timeout=settings.startup_timeout_s)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            raise DeadLetterError(f"dead-letter topic {topic!r} does not exist")
        partitions = sorted(info.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        at_end: set[int] = set()
        idle_since = time.monotonic()
        while len(at_end) < len(partitions) or time.monotonic() - idle_since < idle_s:
            message = consumer.poll(0.2)
            if message is None:
                if time.monotonic() - idle_since >= idle_s:
                    break
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition() or 0)
                    continue
                raise DeadLetterError(f"reading {topic!r}: {error.str()}")
            idle_since = time.monotonic()
            at_end.discard(message.partition() or 0)
            yield DeadLetter(
                partition=message.partition() or 0,
                offset=message.offset() or 0,
                key=message.key(),
                value=message.value(),
                headers=_headers_of(message),
            )
    finally:
        consumer.close()


def redrive(settings: KafkaSettings, letters: Sequence[DeadLetter]) -> int:
    """Publish ``letters`` back to their source topics (original key, value, headers); returns count."""
    producer = Producer(client_config(settings, **{"enable.idempotence": True, "acks": "all"}))
    failures: list[str] = []

    def report(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error.str())

    for letter in letters:
        topic, _, _ = letter.source
        if not topic:
            raise DeadLetterError(f"dead letter {letter.partition}:{letter.offset} names no source topic")
        producer.produce(
            topic, key=letter.key, value=letter.value, headers=letter.original_headers, on_delivery=report
        )
        producer.poll(0)
    remaining = producer.flush(_FLUSH_TIMEOUT_S * 3)
    if failures or remaining:
        raise DeadLetterError(
            f"{len(failures) + remaining} of {len(letters)} record(s) were not redriven "
            f"({failures[0] if failures else 'timed out'})"
        )
    return len(letters)
