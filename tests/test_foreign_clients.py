"""JSON samples produced by clients that are not ours are trained on.

* kafka-python: an independent, pure-Python implementation of the Kafka protocol.
* Debian's kcat: needs a real Kafka — kcat 1.7.1 in Debian 12 links librdkafka
  2.0.2, whose ApiVersion request the embedded Tansu broker cannot parse
  ("Read underflow"), so on Tansu it is skipped.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from streamtrainer.consumer import Worker
from tests.helpers import committed_offsets, worker_settings

pytestmark = pytest.mark.integration

VALUES = [
    b'{"features": [1.0, 2.0, 3.0], "label": 0.5}',
    b'{"features": {"a": 1, "b": 2, "c": 3}, "label": 1.5}',  # named: the order is taken from here
    b'{"features": {"c": 3, "a": 1, "b": 2}, "label": 2.5}',
    b'{"features": [4, 5, 6], "label": 3.5}',
]


def _train_and_check(bootstrap: str, topic: str, group: str) -> None:
    status = Worker(worker_settings(bootstrap, topic, group, max_records=len(VALUES))).run()
    assert status.records_trained == len(VALUES)
    assert status.records_invalid == 0
    assert committed_offsets(bootstrap, topic, group) == {0: len(VALUES)}


def test_json_produced_by_kafka_python_is_trained(bootstrap: str, topic_factory, group_id: str) -> None:
    from kafka import KafkaProducer

    topic = topic_factory(partitions=1)
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for i, value in enumerate(VALUES):
            producer.send(topic, value, key=f"entity-{i}".encode()).get(timeout=15)
    finally:
        producer.close()
    _train_and_check(bootstrap, topic, group_id)


@pytest.mark.requires_real_kafka
@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (.ci/run installs it)")
def test_json_produced_by_kcat_is_trained(bootstrap: str, topic_factory, group_id: str) -> None:
    topic = topic_factory(partitions=1)
    lines = [f"entity-{i}|{value.decode()}" for i, value in enumerate(VALUES)]
    result = subprocess.run(
        ["kcat", "-P", "-b", bootstrap, "-t", topic, "-K", "|"],
        input="\n".join(lines) + "\n",
        text=True,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    _train_and_check(bootstrap, topic, group_id)
