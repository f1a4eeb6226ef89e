"""Reading back a partition range to check which of our records a broker really stored.

A broker answers the retry of a batch it believes it already stored with DUPLICATE_SEQUENCE_NUMBER;
librdkafka reports such records as delivered, without an offset. On Apache Kafka they are stored;
Tansu 0.6.0 (S3 storage) can answer so for a batch a restart interrupted and that it never stored.
The publisher therefore keeps such records and looks for them where they must be: in their partition,
after the last offset acknowledged before them and before the first one acknowledged after them.

Records of this publisher run in that range can only be those records (every other record of the run
was acknowledged before or after them, in order), so they are told apart from other producers' records
by the run's header (:data:`RUN_HEADER`) and matched by value and key, counting copies: a sample sent
twice is two records to find.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamtrainer.connection import client_config
from streamtrainer.settings import KafkaSettings

logger = logging.getLogger(__name__)

# Record header naming the publisher run that wrote the record: 8 random bytes, the same on every record
# of the run (one constant header: 27 bytes a record uncompressed, next to nothing compressed).
RUN_HEADER: Final = "streamtrainer.run"
_WATERMARK_TIMEOUT_S: Final = 5.0

# A record's content, as matched: (value, key).
Content = tuple[bytes | None, bytes | None]


@dataclass(slots=True)
class ReadBack:
    """Where to look in one partition, and what was found there.

    ``after``: the last offset acknowledged before the records (-1: none known: the partition is read
    from its low watermark). ``before``: the first offset acknowledged after them (None: read to the
    end). ``wanted``: how many records of each content to find, written by run ``run``. ``complete``:
    the whole range was read (or everything found), so what is not in ``found`` is not in the range."""

    partition: int
    after: int
    before: int | None
    run: bytes
    wanted: Counter[Content] = field(default_factory=Counter)
    found: Counter[Content] = field(default_factory=Counter)
    complete: bool = False
    records_read: int = 0
    start: int = -1  # the offset reading began at
    left: int = 0  # records still to find

    def describe(self) -> str:
        if self.before is None:
            return f"offsets {self.start}..end"
        if self.start >= self.before:
            return f"no offset between {self.after} and {self.before}"
        return f"offsets {self.start}..{self.before - 1}"

    def _see(self, offset: int, run: bytes | None, message: Message) -> bool:
        """Take the record at ``offset`` into account; True once the range is done."""
        if self.before is not None and offset >= self.before:
            self.complete = True
            return True
        self.records_read += 1
        if run == self.run:
            content = (message.value(), message.key())
            if self.found[content] < self.wanted[content]:
                self.found[content] += 1
                self.left -= 1
        if self.left == 0 or (self.before is not None and offset >= self.before - 1):
            self.complete = True
        return self.complete


def read_back(settings: KafkaSettings, topic: str, ranges: list[ReadBack], timeout_s: float) -> None:
    """Read each range (with a short-lived consumer on the producer's connection settings; a partition
    once, from the lowest start) and fill in ``found`` and ``complete``. A range that could not be read
    in ``timeout_s`` stays incomplete; nothing is raised for a broker that does not answer."""
    consumer = Consumer(
        client_config(
            settings,
            **{
                # Partitions are assigned, never subscribed, and nothing is committed: no group is joined.
                "group.id": f"streamtrainer-readback-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "error_cb": _ignore,  # an unreachable broker shows as an incomplete range
            },
        )
    )
    try:
        _read(consumer, topic, ranges, time.monotonic() + timeout_s)
    except KafkaException as error:
        logger.warning("reading back %s failed: %s", topic, error)
    finally:
        consumer.close()


def _read(consumer: Consumer, topic: str, ranges: list[ReadBack], deadline: float) -> None:
    lows: dict[int, int] = {}
    pending: dict[int, list[ReadBack]] = {}
    for wanted in ranges:
        if wanted.partition not in lows:
            lows[wanted.partition], _high = consumer.get_watermark_offsets(
                TopicPartition(topic, wanted.partition), timeout=_WATERMARK_TIMEOUT_S, cached=False
            )
        # Records before the low watermark are gone (retention): nothing can be found there.
        wanted.start = max(wanted.after + 1, lows[wanted.partition])
        wanted.left = wanted.wanted.total()
        if wanted.before is not None and wanted.start >= wanted.before:
            wanted.complete = True  # an empty range
            continue
        pending.setdefault(wanted.partition, []).append(wanted)
    if not pending:
        return
    consumer.assign(
        [TopicPartition(topic, p, min(wanted.start for wanted in found)) for p, found in pending.items()]
    )
    while pending and time.monotonic() < deadline:
        for message in consumer.consume(1000, 0.2):
            partition = message.partition()
            if partition is None or partition not in pending:
                continue
            waiting = pending[partition]
            error = message.error()
            if error is not None:
                # The end of the partition: nothing more to read. Other errors are retried by the client.
                if error.code() == KafkaError._PARTITION_EOF:
                    for wanted in waiting:
                        wanted.complete = True
                    del pending[partition]
                continue
            offset = message.offset()
            if offset is None:
                continue
            run = run_of(message)
            waiting[:] = [w for w in waiting if offset < w.start or not w._see(offset, run, message)]
            if not waiting:
                del pending[partition]


def run_of(message: Message) -> bytes | None:
    """The record's :data:`RUN_HEADER` value, None if it has none."""
    headers = message.headers()
    if isinstance(headers, dict):
        value = headers.get(RUN_HEADER)
        return value if isinstance(value, bytes) else None
    for name, value in headers or ():
        if name == RUN_HEADER and isinstance(value, bytes):
            return value
    return None


def _ignore(_error: KafkaError) -> None:
    return None
