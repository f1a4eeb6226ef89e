"""Small helpers shared by the integration tests."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamtrainer.producer.publisher import ProduceSummary, publish
from streamtrainer.records import Sample
from streamtrainer.settings import KafkaSettings, WorkerSettings

# Short session timeouts: a group join takes a few seconds instead of tens.
FAST_GROUP = {"session_timeout_ms": 6000}


def produce(bootstrap: str, topic: str, samples: Iterable[Sample], codec: str = "json") -> ProduceSummary:
    summary = publish(KafkaSettings(bootstrap_servers=bootstrap), samples, topic=topic, codec=codec)
    assert summary.ok, summary
    return summary


def produce_tracked(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes, list[tuple[str, bytes]] | None]],
    partitions: int = 1,
) -> list[tuple[int, int]]:
    """Produce record i (value, headers) with key ``k<i>`` to partition i % partitions.

    Returns each record's (partition, offset), from its delivery report.
    """
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20})
    delivered: dict[int, tuple[int, int]] = {}
    for i, (value, headers) in enumerate(records):

        def report(error: KafkaError | None, message: Message, i: int = i) -> None:
            assert error is None, error
            delivered[i] = (message.partition() or 0, message.offset() or 0)

        producer.produce(
            topic,
            key=f"k{i}".encode(),
            value=value,
            headers=headers,
            partition=i % partitions,
            on_delivery=report,
        )
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0 and len(delivered) == len(records)
    return [delivered[i] for i in range(len(records))]


def worker_settings(bootstrap: str, topic: str, group: str, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "topic": topic,
        "group": group,
        "metrics_port": -1,
        "max_seconds": 120.0,
        "checkpoint_dir": Path(tempfile.mkdtemp(prefix="streamtrainer-test-ckpt-")),
        **FAST_GROUP,
    }
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]


def committed_offsets(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    partitions = admin.list_topics(topic=topic, timeout=10).topics[topic].partitions
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    finally:
        consumer.close()
    # A partition with no commit reports OFFSET_INVALID (-1001): nothing of it was consumed.
    return {tp.partition: max(tp.offset, 0) for tp in offsets}


def read_to_end(
    bootstrap: str, topic: str, *, isolation: str = "read_committed", idle_s: float = 5.0
) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of every record a reader of ``isolation`` sees in ``topic``, to each partition's end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "isolation.level": isolation,
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    out: list[tuple[bytes | None, bytes]] = []
    pending, idle = set(partitions), time.monotonic()
    while pending and time.monotonic() - idle < idle_s:
        message = consumer.poll(0.2)
        if message is None:
            continue
        idle = time.monotonic()
        if message.error() is not None:
            if message.error().code() == KafkaError._PARTITION_EOF:
                pending.discard(message.partition())
            continue
        out.append((message.key(), message.value()))
    consumer.close()
    assert not pending, f"partitions {pending} of {topic} not read to their end"
    return out
