"""Acknowledgements without an offset are checked by reading the partition back.

The broker and the reads are real. What cannot be made to happen on demand is the broker answering a
retry DUPLICATE_SEQUENCE_NUMBER (tests/test_faults.py gets real ones from Tansu across a restart), so
one test hands the publisher the delivery reports librdkafka makes of such an answer: delivered, the
batch's first record at offset -1 and the next ones numbered 0, 1, ...
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from streamtrainer.broker import EmbeddedBroker
from streamtrainer.connection import ensure_topic
from streamtrainer.producer.publisher import Publisher
from streamtrainer.producer.readback import Content, ReadBack, read_back, run_of
from streamtrainer.records import Sample
from streamtrainer.records.codec import CODEC_HEADER
from streamtrainer.settings import KafkaSettings

pytestmark = pytest.mark.integration


def _sample(i: int) -> Sample:
    return Sample(np.array([float(i), 1.0], dtype=np.float32), float(i))


def _topic_records(bootstrap: str, topic: str) -> list[Message]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(topic, 0, 0)])
    records: list[Message] = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 3.0:
        batch = [m for m in consumer.consume(1000, 0.3) if m.error() is None]
        if batch:
            quiet_since = time.monotonic()
        records.extend(batch)
    consumer.close()
    return records


def _publish(bootstrap: str, topic: str, n: int) -> list[Message]:
    publisher = Publisher(KafkaSettings(bootstrap_servers=bootstrap), topic=topic, codec="json")
    for i in range(n):
        publisher.send(_sample(i))
    publisher.flush()
    assert publisher.summary(0).ok
    return _topic_records(bootstrap, topic)


def test_every_record_carries_the_codec_and_the_run_id(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory(partitions=1)
    records = _publish(bootstrap, topic, 50)
    headers = [dict(m.headers() or []) for m in records]  # type: ignore[arg-type]
    assert {h[CODEC_HEADER] for h in headers} == {b"json"}
    runs = {run_of(m) for m in records}
    assert len(runs) == 1 and len(next(iter(runs)) or b"") == 8


def _wanted(records: list[Message], *indices: int, extra: Content | None = None) -> Counter[Content]:
    wanted = Counter((records[i].value(), records[i].key()) for i in indices)
    if extra is not None:
        wanted[extra] += 1
    return wanted


def test_read_back_finds_exactly_the_run_s_records_in_the_range(
    bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory(partitions=1)
    records = _publish(bootstrap, topic, 20)
    settings = KafkaSettings(bootstrap_servers=bootstrap)
    run = run_of(records[0]) or b""
    unknown: Content = (b'{"features":[1.0],"label":0.0}', None)
    twice: Content = (records[6].value(), records[6].key())

    inside = ReadBack(0, 4, 9, run, _wanted(records, 5, 8, extra=unknown))  # offsets 5..8
    doubled = ReadBack(0, 4, 9, run, Counter({twice: 2}))  # sent twice, in the range once
    outside = ReadBack(0, 4, 9, run, _wanted(records, 4, 9))  # the known offsets themselves
    other_run = ReadBack(0, 4, 9, b"\x00" * 8, _wanted(records, 5))  # the same content by another run
    to_end = ReadBack(0, 15, None, run, _wanted(records, 19, extra=unknown))
    empty = ReadBack(0, 7, 8, run, _wanted(records, 7))
    first, second = (
        ReadBack(0, 1, 3, run, _wanted(records, 2)),
        ReadBack(0, 10, 13, run, _wanted(records, 2, 12)),
    )
    read_back(settings, topic, [inside, doubled, outside, other_run], timeout_s=30)
    read_back(settings, topic, [to_end, empty], timeout_s=30)
    read_back(settings, topic, [first, second], timeout_s=30)  # two ranges of one partition: apart
    for wanted in (inside, doubled, outside, other_run, to_end, empty, first, second):
        assert wanted.complete, wanted
    assert inside.found == _wanted(records, 5, 8) and inside.records_read == 4
    assert doubled.found == Counter({twice: 1})
    assert outside.found == Counter() and other_run.found == Counter()
    assert to_end.found == _wanted(records, 19) and to_end.records_read == 4
    assert empty.found == Counter() and empty.records_read == 0
    assert first.found == _wanted(records, 2) and second.found == _wanted(records, 12)


def test_acknowledgements_without_offset_are_verified_or_published_again(
    bootstrap: str, topic_factory: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """Records 2 and 3 are in the topic, record X never was: all three acknowledged without an offset
    between records 1 and 4. Reading offsets 2..3 back finds 2 and 3 (nothing re-sent, as on Apache
    Kafka, where DUPLICATE_SEQUENCE_NUMBER means stored) and not X (as on Tansu after a restart): X
    alone is published again, once."""
    topic = topic_factory(partitions=1)
    publisher = Publisher(KafkaSettings(bootstrap_servers=bootstrap), topic=topic, codec="json")
    for i in range(6):
        publisher.send(_sample(i))
    publisher.flush()
    records = _topic_records(bootstrap, topic)
    x_value = b'{"features":[42.0,1.0],"label":42.0}'
    timestamp = (TIMESTAMP_CREATE_TIME, 1_700_000_000_000)

    def report(value: bytes | None, offset: int) -> None:
        message = Message(topic=topic, partition=0, offset=offset, value=value, timestamp=timestamp)
        publisher._on_delivery(None, message)

    with caplog.at_level(logging.WARNING, logger="streamtrainer.producer.publisher"):
        report(records[1].value(), 1)
        report(records[2].value(), -1)  # DUPLICATE_SEQUENCE_NUMBER: delivered, no offset
        report(records[3].value(), 0)
        report(x_value, 1)
        report(records[4].value(), 4)  # an offset again: the three lie in offsets 2..3
        publisher.flush()
    summary = publisher.summary(0)
    assert (summary.acknowledged_without_offset, summary.verified, summary.republished) == (3, 2, 1), summary
    # (The made-up reports are counted as delivered too: the count of failures tells.)
    assert summary.unverified == 0 and publisher.failed == 0
    assert "read back 3 record(s) acknowledged without an offset" in caplog.text

    after = _topic_records(bootstrap, topic)
    counts = Counter(m.value() for m in after)
    assert len(after) == 7 and counts[x_value] == 1 and max(counts.values()) == 1
    republished = after[-1]
    assert republished.value() == x_value and republished.timestamp() == timestamp
    assert run_of(republished) == run_of(records[0])


def test_a_record_that_cannot_be_read_back_counts_as_failed(caplog: pytest.LogCaptureFixture) -> None:
    """The broker is gone when the publisher would read back: the record is neither trusted nor sent
    again blindly, it is counted as failed (and ``produce`` exits non-zero)."""
    with EmbeddedBroker() as broker:
        topic = f"gone-{uuid.uuid4().hex[:8]}"
        ensure_topic(AdminClient({"bootstrap.servers": broker.bootstrap_servers}), topic, 1)
        publisher = Publisher(
            KafkaSettings(bootstrap_servers=broker.bootstrap_servers), topic=topic, codec="json"
        )
        publisher.send(_sample(0))
        publisher.flush()
        message = Message(topic=topic, partition=0, offset=-1, value=b'{"features":[1.0],"label":1.0}')
        publisher._on_delivery(None, message)  # acknowledged without an offset
    with caplog.at_level(logging.WARNING, logger="streamtrainer.producer.publisher"):
        publisher.flush()
    assert (publisher.unverified, publisher.failed, publisher.republished) == (1, 1, 0)
    assert "could not be read back: counted as failed" in caplog.text
