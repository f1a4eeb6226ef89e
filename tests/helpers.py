"""Small helpers shared by the integration tests."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
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
