"""Small helpers shared by the integration tests."""

from __future__ import annotations

import tempfile
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
