"""Every record is trained or dead-lettered: the poison test, against the real broker."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
from collections import Counter

from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from streamtrainer.consumer.dead_letter import (
    ERROR_CLASS,
    ERROR_MESSAGE,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TIMESTAMP,
    SOURCE_TOPIC,
    WORKER_ID,
    read_dead_letters,
)
from streamtrainer.consumer.worker import Worker
from streamtrainer.records import CODEC_HEADER
from streamtrainer.records.exceptions import DECODE_REASONS
from streamtrainer.settings import KafkaSettings
from streamtrainer.training.checkpoint import CheckpointStore
from tests.helpers import committed_offsets, produce_tracked, worker_settings

N_FEATURES = 4
MAX_VALUE_BYTES = 4096


def _good(i: int) -> bytes:
    x = [((i * 7 + k) % 11) / 10 for k in range(N_FEATURES)]
    return json.dumps({"features": x, "label": float(sum(x) > 2)}).encode()


# One maker per reason: (value, headers) of a record that must be dead-lettered for it.
BAD = {
    "invalid_json": lambda i: (b'{"features": [1, 2', None),
    "not_an_object": lambda i: (b"[1, 2, 3]", None),
    "missing_field": lambda i: (b'{"features": [1, 2, 3, 4]}', None),
    "non_numeric": lambda i: (b'{"features": [1, "two", 3, 4], "label": 1}', None),
    "wrong_feature_count": lambda i: (b'{"features": [1, 2, 3], "label": 1}', None),
    "unknown_feature_names": lambda i: (b'{"features": {"a": 1, "b": 2, "c": 3, "zz": 4}, "label": 0}', None),
    "non_finite": lambda i: (b'{"features": [1, 1e39, 3, 4], "label": 1}', None),
    "bad_binary_length": lambda i: (struct.pack("<3f", 1, 2, 3), [(CODEC_HEADER, b"binary")]),
    "unknown_codec": lambda i: (b"\x00\x01", [(CODEC_HEADER, b"avro")]),
    "empty_value": lambda i: (None, None),
    "label_out_of_range": lambda i: (b'{"features": [1, 2, 3, 4], "label": 7}', None),
    "oversize": lambda i: (b'{"pad": "' + b"x" * MAX_VALUE_BYTES + b'"}', None),
}


def test_poison_every_bad_record_is_dead_lettered_once_and_the_rest_trained_once(
    bootstrap: str, topic_factory, group_id: str
) -> None:
    assert set(BAD) == set(DECODE_REASONS)  # every reason the worker knows is exercised
    partitions, n = 3, 24_000
    topic = topic_factory(partitions=partitions)
    kinds = list(BAD)
    # 1% of the stream for every kind of bad record (12%, all kinds together), spread through it.
    plan: list[str | None] = [
        kinds[i % 100 - 37] if 37 <= i % 100 < 37 + len(kinds) else None for i in range(n)
    ]
    records = [(_good(i), None) if kind is None else BAD[kind](i) for i, kind in enumerate(plan)]
    delivered = produce_tracked(bootstrap, topic, records, partitions)
    expected_bad = {delivered[i]: kind for i, kind in enumerate(plan) if kind is not None}
    per_kind = Counter(expected_bad.values())
    assert set(per_kind.values()) == {n // 100}

    registry = CollectorRegistry()
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="logistic",
        feature_names=["a", "b", "c", "d"],
        max_value_bytes=MAX_VALUE_BYTES,
        worker_id="poison-test",
        max_records=n,  # records consumed: trained or dead-lettered
        max_seconds=120.0,
        errors_tolerance="all",  # 12% invalid on purpose: past the default error budget
    )
    status = Worker(settings, registry=registry).run()  # one run: no restart, no crash

    good = n - len(expected_bad)
    assert status.records_trained == good and status.records_applied == good
    assert status.records_invalid == len(expected_bad)
    assert status.records_trained + status.records_invalid == n
    assert sum(committed_offsets(bootstrap, topic, group_id).values()) == n
    for kind, count in per_kind.items():
        assert (
            registry.get_sample_value(
                "streamtrainer_records_dead_lettered_total", {"topic": topic, "reason": kind}
            )
            == count
        )

    letters = list(read_dead_letters(KafkaSettings(bootstrap_servers=bootstrap), f"{topic}.dlq"))
    found = {}
    for letter in letters:
        source_topic, partition, offset = letter.source
        assert source_topic == topic and letter.header(SOURCE_TOPIC) == topic
        assert (partition, offset) not in found, "dead-lettered twice"
        found[(partition, offset)] = letter.reason
        assert letter.header(ERROR_MESSAGE) and letter.header(WORKER_ID) == "poison-test"
        assert int(letter.header(SOURCE_TIMESTAMP)) > 0
        assert letter.header(SOURCE_PARTITION) == str(partition) and letter.header(SOURCE_OFFSET) == str(
            offset
        )
        assert letter.header(ERROR_CLASS) == letter.reason
    # Exactly the bad records, each with the right reason; their key and value are the originals.
    assert found == expected_bad
    sample = next(letter for letter in letters if letter.reason == "unknown_codec")
    assert sample.value == b"\x00\x01" and dict(sample.original_headers)[CODEC_HEADER] == b"avro"
    assert sample.key is not None and sample.key.startswith(b"k")
    print(
        f"\npoison test: {n} records, {len(expected_bad)} bad ({len(per_kind)} kinds x "
        f"{min(per_kind.values())}-{max(per_kind.values())}), dead-lettered {len(letters)}, "
        f"trained {status.records_trained}, restarts 0"
    )


def test_dlq_inspect_and_redrive(bootstrap: str, topic_factory, group_id: str) -> None:
    topic = topic_factory(partitions=1)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(30):
        value = _good(i) if i % 10 else b'{"features": [1, 2, 3, 4], "label": 9}'
        producer.produce(topic, key=f"k{i}".encode(), value=value)
    producer.flush(10)
    settings = worker_settings(bootstrap, topic, group_id, model="logistic", max_records=30)
    assert Worker(settings).run().records_invalid == 3

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "streamtrainer.cli",
                "dlq",
                *args,
                "--bootstrap-servers",
                bootstrap,
                "--topic",
                topic,
                "--idle-s",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    listed = cli("inspect")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 3 and all("label_out_of_range" in line for line in lines)
    assert f"{topic}[0]@0" in lines[0] and "3 dead-lettered record(s)" in listed.stderr
    assert cli("inspect", "--reason", "oversize").stdout == ""

    redriven = cli("redrive", "--source-offsets", "0:10")
    assert redriven.returncode == 0, redriven.stderr
    assert f"redrove 1 record(s) to {topic}" in redriven.stdout
    nothing = cli("redrive", "--reason", "oversize")
    assert nothing.returncode == 1 and "no dead-lettered record" in nothing.stderr
    # The redriven record is back in the source topic (still invalid: it is dead-lettered again).
    again = Worker(worker_settings(bootstrap, topic, group_id, model="logistic", max_seconds=8.0)).run()
    assert again.records_consumed == 1 and again.records_invalid == 1


def test_an_unwritable_dead_letter_topic_blocks_and_loses_nothing(
    bootstrap: str, topic_factory, group_id: str, tmp_path
) -> None:
    topic = topic_factory(partitions=1)
    producer = Producer({"bootstrap.servers": bootstrap})
    n = 200
    for i in range(n):
        # Record 100 is invalid and too big for the dead-letter producer configured below.
        producer.produce(topic, value=b"x" * 5000 if i == 100 else _good(i))
    producer.flush(10)
    checkpoints = tmp_path / "ckpt"
    registry = CollectorRegistry()
    blocked = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="logistic",
        poll_batch=50,
        checkpoint_dir=checkpoints,
        checkpoint_every_records=10,
        dlq_kafka_config={"message.max.bytes": "2000"},  # the dead-letter write fails, every time
    )
    worker = Worker(blocked, registry=registry)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        failures = "streamtrainer_dead_letter_write_failures_total"
        deadline = time.monotonic() + 60
        while (registry.get_sample_value(failures) or 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (registry.get_sample_value(failures) or 0) >= 3  # retried with backoff, not skipped
        assert registry.get_sample_value("streamtrainer_dead_letter_blocked") == 1
        assert worker.records_trained <= 100  # nothing after the blocked record
    finally:
        worker.stop()
        thread.join(timeout=60)
    # No checkpoint and no commit passed the record that could not be dead-lettered.
    assert committed_offsets(bootstrap, topic, group_id)[0] <= 100
    state = CheckpointStore(checkpoints).load_latest()
    assert state is None or state.metadata["positions"][f"{topic}:0"] <= 100
    applied_before = int(state.metadata["records_applied"]) if state is not None else 0

    # The dead-letter topic is writable again: the restarted worker routes it and trains the rest once.
    registry = CollectorRegistry()
    healthy = blocked.model_copy(update={"dlq_kafka_config": {}, "max_records": n - applied_before})
    status = Worker(healthy, registry=registry).run()
    assert status.records_applied == n - 1
    assert sum(committed_offsets(bootstrap, topic, group_id).values()) == n
    letters = list(read_dead_letters(KafkaSettings(bootstrap_servers=bootstrap), f"{topic}.dlq"))
    assert [letter.source for letter in letters] == [(topic, 0, 100)]
    assert registry.get_sample_value("streamtrainer_dead_letter_blocked") == 0
