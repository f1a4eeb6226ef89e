"""The dead-letter topic: where every record the worker cannot train on goes, with its reason.

A record that fails validation, or whose update a training guard refused
(:class:`TrainingGuardSkip`), is produced to ``<topic>.dlq`` (configurable)
with its original value and headers, plus headers naming its source topic,
partition, offset, timestamp and key, the consumer group that dead-lettered it,
the error class and message, and the worker. Its record key is its identity,
``<source topic>:<partition>:<offset>:<group>``: one source record read by two
groups is two dead letters, and every record about one identity (the letter,
a redrive marker) lands in the same partition of the dead-letter topic. The
write is *confirmed* (delivery report) before the worker's checkpoint — and so
its committed offset — can move past the record; if the dead-letter topic
cannot be written the worker retries with backoff, says so in its log and
metrics, and never skips the record. :meth:`DeadLetterQueue.end_offsets` and
:meth:`DeadLetterQueue.already_dead_lettered` let a restarted worker see what
it wrote already, so that it does not write it twice.

``streamtrainer dlq inspect`` lists dead-lettered records and ``streamtrainer
dlq redrive`` publishes selected ones back to their source topic, once per
source record, and then writes a *redrive marker* (same key, no value, a
``streamtrainer.dlq.redriven`` header) for each letter it republished, so that
a second redrive skips them unless forced.
"""

from __future__ import annotations

import logging
import math
import socket
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
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

from streamtrainer.connection import assigning_consumer_config, client_config
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
GROUP = HEADER_PREFIX + "group"  # the consumer group that dead-lettered the record
SOURCE_KEY = HEADER_PREFIX + "source.key"  # the original key (absent: the record had none)
REDRIVEN = HEADER_PREFIX + "redriven"  # on a redrive marker: when (ISO 8601, UTC)
REDRIVEN_TO = HEADER_PREFIX + "redriven.to"  # ... and where: TOPIC:PARTITION:OFFSET

# The group label of dead letters written outside a consumer group (``DeadLetterQueue(group=None)``).
NO_GROUP: Final = "-"

_FLUSH_TIMEOUT_S = 10.0
_MAX_BACKOFF_S = 30.0
_SERVE_INTERVAL_S = 0.1
# Reading the dead-letter topic to its end fails (rather than stopping short) after this long
# without a record.
_SCAN_STALL_S = 30.0

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
    """The dead-letter topic of ``topic``: ``configured``, else ``<topic>.dlq``."""
    return configured or f"{topic}.dlq"


def default_worker_id() -> str:
    """A worker id unique enough for the ``worker.id`` header: host name and a random suffix."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def identity_of(topic: str, partition: int, offset: int, group: str) -> str:
    """A dead letter's identity and record key: ``<source topic>:<partition>:<offset>:<group>``."""
    return f"{topic}:{partition}:{offset}:{group}"


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
        group: str | None = None,
    ) -> None:
        self.settings = settings
        self.producer_config = dict(producer_config or {})
        self.topic = topic
        self.worker_id = worker_id
        self.metrics = metrics
        self.source_topic = source_topic
        # None: a reader outside any consumer group (replay); its dead letters say NO_GROUP.
        self.group = group if group is not None else NO_GROUP
        self._fatal: KafkaError | None = None
        self._reader: Consumer | None = None  # for end_offsets(): created on first use
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
        """Deliver what is still queued (send() already waited for its own records)."""
        self._producer.flush(_FLUSH_TIMEOUT_S)
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def end_offsets(self) -> dict[int, int]:
        """The dead-letter topic's end (high watermark) per partition, now.

        Every record :meth:`send` confirmed before is below it (``acks=all``: confirmed means the
        watermark has passed it). A worker keeps it with its checkpoint, so that after a restart
        :meth:`already_dead_lettered` reads only what was written since. (The embedded broker
        reports less than the true end after a batch: reading from there reads a little more.)
        """
        if self._reader is None:
            # Kept open: a call on a connected client (metadata, then one watermark query per
            # partition) measured 0.55 ms on the embedded broker; the first, connecting, 3 ms.
            self._reader = Consumer(_reader_config(self.settings, self.producer_config))
        return _end_offsets(self._reader, self.topic, self.settings.startup_timeout_s)

    def already_dead_lettered(self, since: Mapping[int, int] | None = None) -> set[tuple[int, int]]:
        """The (source partition, source offset) of this source topic and group in the dead-letter
        topic from ``since`` (partition -> offset, as :meth:`end_offsets` returned it; a partition
        missing from it, or None, is read from its beginning) to its end.

        A restarted worker skips re-sending those: they are in the topic already. Redrive markers
        do not count (a marker says the letter was dealt with, not that it is missing).
        """
        found: set[tuple[int, int]] = set()
        for message in _scan(
            self.settings,
            self.topic,
            start=since or {},
            idle_s=_SCAN_STALL_S,
            extra_config=self.producer_config,
        ):
            letter = _letter_of(message)
            if letter.is_marker or letter.group != self.group:
                continue
            topic, partition, offset = letter.source
            if topic == self.source_topic:
                found.add((partition, offset))
        return found

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
                    key=self._identity(message).encode(),
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

    def _identity(self, message: Message) -> str:
        return identity_of(
            message.topic() or self.source_topic, message.partition() or 0, message.offset() or 0, self.group
        )

    def _headers(self, message: Message, error: Rejection) -> Headers:
        original: Headers = [(k, v) for k, v in _headers_of(message) if not k.startswith(HEADER_PREFIX)]
        key = message.key()
        return [
            *original,
            (SOURCE_TOPIC, (message.topic() or self.source_topic).encode()),
            (SOURCE_PARTITION, str(message.partition()).encode()),
            (SOURCE_OFFSET, str(message.offset()).encode()),
            (SOURCE_TIMESTAMP, str(timestamp_of(message)).encode()),
            *([(SOURCE_KEY, key)] if key is not None else []),
            (GROUP, self.group.encode()),
            (ERROR_CLASS, error.reason.encode()),
            (ERROR_MESSAGE, error.detail.encode(errors="replace")[:1000]),
            (WORKER_ID, self.worker_id.encode()),
        ]


# -- reading it back: `streamtrainer dlq inspect / redrive` -------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """A record of the dead-letter topic: a dead letter, or a redrive marker (:attr:`is_marker`).

    ``key`` is the source record's original key (``record_key`` the dead letter's own: its
    identity); letters written before dead letters had an identity have the original as both.
    """

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    record_key: bytes | None = None

    def header(self, name: str) -> str:
        """The first value of header ``name``, decoded ("" when absent)."""
        for key, value in self.headers:
            if key == name:
                return value.decode(errors="replace")
        return ""

    @property
    def reason(self) -> str:
        """Why it was dead-lettered: one of :data:`DEAD_LETTER_REASONS`."""
        return self.header(ERROR_CLASS)

    @property
    def group(self) -> str:
        """The consumer group that dead-lettered it ("" for a letter older than this header)."""
        return self.header(GROUP)

    @property
    def source(self) -> tuple[str, int, int]:
        """Where the record came from: (topic, partition, offset)."""
        return (
            self.header(SOURCE_TOPIC),
            int(self.header(SOURCE_PARTITION) or -1),
            int(self.header(SOURCE_OFFSET) or -1),
        )

    @property
    def identity(self) -> str:
        """``<source topic>:<partition>:<offset>:<group>`` (see :func:`identity_of`)."""
        return identity_of(*self.source, self.group)

    @property
    def is_marker(self) -> bool:
        """True for a redrive marker: the letter of the same identity was republished."""
        return any(name == REDRIVEN for name, _ in self.headers)

    @property
    def original_headers(self) -> Headers:  # for produce()
        """The source record's own headers (without this module's)."""
        return [(k, v) for k, v in self.headers if not k.startswith(HEADER_PREFIX)]


def _letter_of(message: Message) -> DeadLetter:
    headers = _headers_of(message)
    names = {name for name, _ in headers}
    record_key = message.key()
    if GROUP in names or REDRIVEN in names:  # keyed by identity: the original key is a header
        key = next((value for name, value in headers if name == SOURCE_KEY), None)
    else:  # written before dead letters had an identity: the record key is the original
        key = record_key
    return DeadLetter(
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=key,
        value=message.value(),
        headers=headers,
        record_key=record_key,
    )


def _reader_config(settings: KafkaSettings, extra: Mapping[str, str]) -> dict[str, object]:
    return assigning_consumer_config(
        settings,
        **{
            # A throwaway group id that never joins: partitions are assigned, nothing is committed.
            "group.id": f"streamtrainer-dlq-read-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            # A start offset below the log start (retention) reads from the start, never skips.
            "auto.offset.reset": "earliest",
            # The dead-letter topic may live elsewhere (--dlq-kafka-config bootstrap.servers=...).
            **extra,
        },
    )


def _partitions(consumer: Consumer, topic: str, timeout_s: float) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=timeout_s)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise DeadLetterError(f"dead-letter topic {topic!r} does not exist")
    return sorted(info.partitions)


def _end_offsets(consumer: Consumer, topic: str, timeout_s: float) -> dict[int, int]:
    ends = {}
    for partition in _partitions(consumer, topic, timeout_s):
        _, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=timeout_s, cached=False
        )
        ends[partition] = high
    return ends


def _scan(
    settings: KafkaSettings,
    topic: str,
    *,
    start: Mapping[int, int],
    idle_s: float,
    extra_config: Mapping[str, str] | None = None,
) -> Iterator[Message]:
    """The records of ``topic`` from ``start`` (per partition; default its beginning) to its end,
    oldest first per partition.

    The end of a partition is its end-of-partition event, not a watermark read beforehand: the
    embedded broker (Tansu) reports a high watermark one past the *first* record of the last
    batch, which would stop the reading short. Raises DeadLetterError if no record or event
    arrives for ``idle_s`` before every partition's end: it never stops short silently.
    """
    consumer = Consumer(_reader_config(settings, extra_config or {}))
    try:
        ends = _end_offsets(consumer, topic, settings.startup_timeout_s)
        # A start past the end: the topic was re-created since; read all of it.
        begin = {p: start.get(p, 0) if 0 <= start.get(p, 0) <= end else 0 for p, end in ends.items()}
        pending = set(ends)
        consumer.assign(
            [
                TopicPartition(topic, p, begin[p] if begin[p] > 0 else OFFSET_BEGINNING)
                for p in sorted(pending)
            ]
        )
        idle_since = time.monotonic()
        while pending:
            message = consumer.poll(0.2)
            if message is None:
                if time.monotonic() - idle_since >= idle_s:
                    raise DeadLetterError(
                        f"reading {topic!r}: nothing for {idle_s:g}s before the end of partition(s) "
                        f"{sorted(pending)}"
                    )
                continue
            idle_since = time.monotonic()
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(message.partition() or 0)
                    continue
                raise DeadLetterError(f"reading {topic!r}: {error.str()}")
            yield message
            idle_since = time.monotonic()
    finally:
        consumer.close()


def scan_topic(
    settings: KafkaSettings, topic: str, *, start: Mapping[int, int], idle_s: float = _SCAN_STALL_S
) -> Iterator[Message]:
    """The committed records of any ``topic`` from ``start`` to its end (the worker's output topics
    read back: consumer/outputs.py); as :func:`_scan`."""
    return _scan(settings, topic, start=start, idle_s=idle_s)


def read_dead_letters(
    settings: KafkaSettings, topic: str, *, idle_s: float = _SCAN_STALL_S
) -> Iterator[DeadLetter]:
    """Every dead letter in ``topic`` (redrive markers left out), oldest first per partition.

    Reads up to the topic's end; raises DeadLetterError when nothing arrived for ``idle_s`` before.
    """
    for message in _scan(settings, topic, start={}, idle_s=idle_s):
        letter = _letter_of(message)
        if not letter.is_marker:
            yield letter


@dataclass(frozen=True)
class Redriven:
    """A redrive marker: when the letter of an identity was republished, and where to."""

    at: str  # ISO 8601, UTC
    to: str  # TOPIC:PARTITION:OFFSET of the republished record


@dataclass
class DeadLetterLog:
    """The dead-letter topic, read once: its letters (one per identity) and redrive markers."""

    letters: list[DeadLetter] = field(default_factory=list)
    redriven: dict[str, Redriven] = field(default_factory=dict)  # by identity
    duplicates: int = 0  # letters of an identity seen already (left out of ``letters``)


def read_dead_letter_log(
    settings: KafkaSettings, topic: str, *, idle_s: float = _SCAN_STALL_S
) -> DeadLetterLog:
    """The whole dead-letter topic up to its end now: what was dead-lettered, what was redriven."""
    log = DeadLetterLog()
    seen: set[str] = set()
    for message in _scan(settings, topic, start={}, idle_s=idle_s):
        letter = _letter_of(message)
        if letter.is_marker:
            log.redriven[letter.identity] = Redriven(letter.header(REDRIVEN), letter.header(REDRIVEN_TO))
        elif letter.identity in seen:
            log.duplicates += 1
        else:
            seen.add(letter.identity)
            log.letters.append(letter)
    return log


@dataclass(frozen=True)
class Selection:
    """The letters a ``dlq`` command selected, and what it could not or would not select."""

    letters: list[DeadLetter]
    missing: list[tuple[int, int]]  # --source-offsets with no letter (that passed the other filters)
    already_redriven: int  # letters left out because they were redriven already (redrive, no --force)


def parse_source_offsets(items: Iterable[str]) -> set[tuple[int, int]]:
    """``PARTITION:OFFSET`` strings as pairs; ValueError for anything else."""
    wanted = set()
    for item in items:
        partition, sep, offset = item.partition(":")
        if not sep:
            raise ValueError(item)
        wanted.add((int(partition), int(offset)))
    return wanted


def select(
    log: DeadLetterLog,
    *,
    topic: str,
    reasons: Collection[str] | None = None,
    groups: Collection[str] | None = None,
    source_offsets: Collection[tuple[int, int]] | None = None,
    skip_redriven: bool = False,
    limit: int | None = None,
) -> Selection:
    """The letters of source ``topic`` that pass every filter given, in topic order.

    ``skip_redriven`` leaves out the letters a redrive marker names. ``limit`` caps the number of
    source records (two groups' letters of one record count once).
    """
    matched: list[DeadLetter] = []
    found: set[tuple[int, int]] = set()
    already = 0
    sources: set[tuple[int, int]] = set()
    for letter in log.letters:
        source_topic, partition, offset = letter.source
        if source_topic != topic:
            continue
        if reasons and letter.reason not in reasons:
            continue
        if groups and letter.group not in groups:
            continue
        if source_offsets is not None and (partition, offset) not in source_offsets:
            continue
        found.add((partition, offset))
        if skip_redriven and letter.identity in log.redriven:
            already += 1
            continue
        if limit is not None and (partition, offset) not in sources and len(sources) >= limit:
            continue
        sources.add((partition, offset))
        matched.append(letter)
    missing = sorted(set(source_offsets or ()) - found)
    return Selection(matched, missing, already)


@dataclass(frozen=True)
class RedriveResult:
    """What :func:`redrive` did: records republished, and letters marked as redriven."""

    published: int
    marked: int


def redrive(
    settings: KafkaSettings, letters: Sequence[DeadLetter], *, dead_letter_topic: str
) -> RedriveResult:
    """Publish ``letters`` back to their source topics (original key, value, headers), once per
    source record however many groups dead-lettered it, then mark each letter as redriven in
    ``dead_letter_topic`` (a marker record under its identity). Raises DeadLetterError if any
    record could not be published (nothing is marked then) or marked.

    Between the two steps a crash leaves the letters unmarked: a second redrive would publish
    them again (at least once, never lost).
    """
    producer = Producer(client_config(settings, **{"enable.idempotence": True, "acks": "all"}))
    by_source: dict[tuple[str, int, int], list[DeadLetter]] = {}
    for letter in letters:
        topic, _, _ = letter.source
        if not topic:
            raise DeadLetterError(f"dead letter {letter.partition}:{letter.offset} names no source topic")
        by_source.setdefault(letter.source, []).append(letter)

    failures: list[str] = []
    written: dict[tuple[str, int, int], str] = {}

    def published(source: tuple[str, int, int]) -> Callable[[KafkaError | None, Message], None]:
        def report(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                failures.append(error.str())
            else:
                written[source] = f"{message.topic()}:{message.partition()}:{message.offset()}"

        return report

    for source, same in by_source.items():
        first = same[0]
        producer.produce(
            source[0],
            key=first.key,
            value=first.value,
            headers=first.original_headers,
            on_delivery=published(source),
        )
        producer.poll(0)
    remaining = producer.flush(_FLUSH_TIMEOUT_S * 3)
    if failures or remaining:
        raise DeadLetterError(
            f"{len(failures) + remaining} of {len(by_source)} record(s) were not redriven "
            f"({failures[0] if failures else 'timed out'}); none was marked as redriven"
        )

    def marked(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error.str())

    now = datetime.now(UTC).isoformat(timespec="seconds")
    for source, same in by_source.items():
        for letter in same:
            producer.produce(
                dead_letter_topic,
                key=letter.identity.encode(),
                value=None,
                headers=[
                    (SOURCE_TOPIC, source[0].encode()),
                    (SOURCE_PARTITION, str(source[1]).encode()),
                    (SOURCE_OFFSET, str(source[2]).encode()),
                    (GROUP, letter.group.encode()),
                    (REDRIVEN, now.encode()),
                    (REDRIVEN_TO, written[source].encode()),
                ],
                on_delivery=marked,
            )
            producer.poll(0)
    remaining = producer.flush(_FLUSH_TIMEOUT_S * 3)
    if failures or remaining:
        raise DeadLetterError(
            f"redrove {len(by_source)} record(s) but could not mark {len(failures) + remaining} of "
            f"{len(letters)} letter(s) as redriven in {dead_letter_topic!r} "
            f"({failures[0] if failures else 'timed out'}): a second redrive would publish them again"
        )
    return RedriveResult(published=len(by_source), marked=len(letters))
