"""`streamtrainer replay`: bounded ranges, exact manifests, deterministic models, on a real broker."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamtrainer.connection import ensure_topic
from streamtrainer.consumer import Worker
from streamtrainer.consumer.ranges import (
    Bound,
    PartitionRange,
    RangeError,
    parse_bound,
    resolve_ranges,
)
from streamtrainer.consumer.replay import ReplayError, ReplayResult, run_replay
from streamtrainer.exceptions import ConfigurationError
from streamtrainer.records import Sample
from streamtrainer.settings import ReplaySettings, env_name
from streamtrainer.training.checkpoint import CheckpointStore
from tests.conftest import KafkaBroker
from tests.helpers import produce, worker_settings

pytestmark = pytest.mark.integration

N_FEATURES = 4


# -- helpers ---------------------------------------------------------------------------------


def replay(bootstrap: str, out: Path, **overrides: object) -> ReplayResult:
    values: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "out": out,
        "epochs": 2,
        "batch_size": 32,
        "idle_s": 0.5,
        "progress": False,
        **overrides,
    }
    return run_replay(ReplaySettings(**values))  # type: ignore[arg-type]


def model_tensors(out: Path) -> dict[str, torch.Tensor]:
    checkpoint = CheckpointStore(out / "checkpoints").load_latest()
    assert checkpoint is not None
    return checkpoint.tensors


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def samples(n: int, seed: int, *, binary_labels: bool = False) -> list[Sample]:
    rng = np.random.default_rng(seed)
    weights = np.array([1.5, -2.0, 0.5, 3.0])
    out = []
    for _ in range(n):
        x = rng.normal(size=N_FEATURES)
        y = float(x @ weights + rng.normal(scale=0.1))
        out.append(Sample.of(x, float(y > 0) if binary_labels else y))
    return out


def read_back(bootstrap: str, topic: str, partitions: int, n: int) -> dict[int, list[bytes | None]]:
    """Ground truth: every value of the topic, per partition, in offset order."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"truth-{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    values: dict[int, list[bytes | None]] = {p: [] for p in range(partitions)}
    deadline = time.monotonic() + 30
    try:
        while sum(map(len, values.values())) < n and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.2):
                if message.error() is None:
                    assert message.offset() == len(values[message.partition() or 0])
                    values[message.partition() or 0].append(message.value())
    finally:
        consumer.close()
    assert sum(map(len, values.values())) == n
    return values


def content_sha256(values: dict[int, list[bytes | None]], ranges: dict[int, tuple[int, int]]) -> str:
    """The manifest's content hash, computed independently from its documented definition."""
    content = hashlib.sha256()
    for partition in sorted(ranges):
        start, end = ranges[partition]
        inner = hashlib.sha256()
        for value in values[partition][start:end]:
            inner.update(struct.pack("<q", -1) if value is None else struct.pack("<q", len(value)) + value)
        content.update(struct.pack("<iq", partition, end - start) + inner.digest())
    return content.hexdigest()


@dataclass(frozen=True)
class SharedTopic:
    topic: str
    partitions: int
    n: int
    values: dict[int, list[bytes | None]]


@pytest.fixture(scope="module")
def shared(kafka_broker: KafkaBroker) -> Iterator[SharedTopic]:
    """A 2-partition regression topic, half JSON and half binary records, read by many tests."""
    bootstrap = kafka_broker.bootstrap_servers
    topic = f"replay-{uuid.uuid4().hex[:12]}"
    ensure_topic(AdminClient({"bootstrap.servers": bootstrap}), topic, 2)
    data = samples(800, seed=1)
    keyed = [Sample(s.features, s.label, key=str(i % 7).encode()) for i, s in enumerate(data)]
    produce(bootstrap, topic, keyed[:400], codec="json")
    produce(bootstrap, topic, keyed[400:], codec="binary")
    yield SharedTopic(topic, 2, 800, read_back(bootstrap, topic, 2, 800))


# -- ranges: pure parsing and resolution --------------------------------------------------------


def test_bounds_parse_every_form_and_reject_nonsense() -> None:
    assert parse_bound("earliest", "from").kind == "earliest"
    assert parse_bound("end", "to").kind == "end"
    assert parse_bound("0:10, 2:5", "from").offsets == {0: 10, 2: 5}
    moment = parse_bound("2024-05-01T12:00:00Z", "from")
    assert moment.kind == "time"
    assert moment.timestamp_ms == int(datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp() * 1000)
    # No zone: UTC.
    assert parse_bound("2024-05-01T12:00:00", "to").timestamp_ms == moment.timestamp_ms
    for text, side in [("end", "from"), ("earliest", "to"), ("0:1,0:2", "from"), ("x", "to"), ("5", "from")]:
        with pytest.raises(ConfigurationError, match=f"--{side}"):
            parse_bound(text, side)  # type: ignore[arg-type]


def test_resolution_names_partitions_and_refuses_impossible_ranges() -> None:
    marks = {0: (10, 100), 1: (0, 50), 2: (0, 0)}

    def resolve(start: str, end: str) -> list[PartitionRange]:
        return resolve_ranges(
            parse_bound(start, "from"),
            parse_bound(end, "to"),
            topic="t",
            existing=[0, 1, 2],
            watermarks=marks,
            offset_for_time=lambda partition, ms: 42 if partition == 0 else -1,
        )

    assert resolve("earliest", "end") == [
        PartitionRange(0, 10, None),
        PartitionRange(1, 0, None),
        PartitionRange(2, 0, None),
    ]
    # Partitions not named are not read; the other bound of a named one is earliest/end.
    assert resolve("1:5", "end") == [PartitionRange(1, 5, None)]
    assert resolve("earliest", "0:20,1:30") == [PartitionRange(0, 10, 20), PartitionRange(1, 0, 30)]
    # A time with no record at or after it: the end of the log (high watermark) at resolution.
    assert resolve("2024-01-01T00:00:00Z", "end")[:2] == [
        PartitionRange(0, 42, None),
        PartitionRange(1, 50, None),
    ]
    with pytest.raises(RangeError, match="has no partition 7"):
        resolve("0:0,7:0", "end")
    with pytest.raises(RangeError, match="below the log start offset 10"):
        resolve("0:3", "end")
    with pytest.raises(RangeError, match="after its end"):
        resolve("1:40", "1:20")
    with pytest.raises(RangeError, match="empty"):
        resolve("1:20", "1:20")
    assert str(Bound("end")) == "end"


# -- reading and training ------------------------------------------------------------------------


def test_replay_trains_exactly_the_produced_range(
    bootstrap: str, shared: SharedTopic, tmp_path: Path
) -> None:
    result = replay(bootstrap, tmp_path / "a", topic=shared.topic, holdout=0.25)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest == result.manifest
    counts = {p: len(v) for p, v in shared.values.items()}
    assert manifest["topic"] == shared.topic
    assert manifest["partitions"] == {
        str(p): {"start": 0, "end": counts[p], "records": counts[p]} for p in counts
    }
    assert manifest["records"] == manifest["records_read"] == shared.n == result.records
    assert manifest["train_records"] + manifest["holdout_records"] == shared.n
    assert manifest["holdout_records"] == shared.n // 4
    assert manifest["invalid_total"] == 0
    assert manifest["invalid"] == {}
    assert manifest["content_sha256"] == content_sha256(shared.values, {p: (0, c) for p, c in counts.items()})
    assert manifest["seed"] == 0
    assert manifest["config"]["epochs"] == 2
    assert manifest["config"]["batch_size"] == 32
    assert manifest["config"]["model"] == "linear"
    assert len(manifest["epoch_losses"]) == 2
    assert manifest["epoch_losses"][1] < manifest["epoch_losses"][0]
    assert math.isfinite(manifest["holdout_loss"])
    assert manifest["checkpoint"]["version"] == 1
    datetime.fromisoformat(manifest["created_at"])
    assert not (tmp_path / "a" / "shards").exists()

    # A worker resumes from the replay's checkpoint: same model, positions at the ends of the range.
    checkpoint = CheckpointStore(tmp_path / "a" / "checkpoints").load_latest()
    assert checkpoint is not None
    worker = Worker(
        worker_settings(bootstrap, shared.topic, "unused", checkpoint_dir=tmp_path / "a" / "checkpoints")
    )
    worker._restore(checkpoint)
    assert worker.learner is not None
    assert worker.learner.n_features == N_FEATURES
    assert worker.offsets.positions() == {(shared.topic, p): c for p, c in counts.items()}
    tensors, _ = worker.learner.state()
    assert same_tensors(tensors, checkpoint.tensors)


def test_same_seed_is_bitwise_identical_a_manifest_reproduces_it_and_another_seed_differs(
    bootstrap: str, shared: SharedTopic, tmp_path: Path
) -> None:
    config: dict[str, object] = {"topic": shared.topic, "model": "mlp", "task": "regression", "hidden": 8}
    config["optimizer"] = "adam"
    replay(bootstrap, tmp_path / "a", **config, seed=7, lr=0.01)
    replay(bootstrap, tmp_path / "b", **config, seed=7, lr=0.01)
    replay(bootstrap, tmp_path / "c", **config, seed=8, lr=0.01)
    # The manifest fixes topic, range, seed and config (the lr among them).
    again = replay(bootstrap, tmp_path / "d", manifest=tmp_path / "a" / "manifest.json")
    a = model_tensors(tmp_path / "a")
    assert same_tensors(a, model_tensors(tmp_path / "b"))
    assert same_tensors(a, model_tensors(tmp_path / "d"))
    assert not same_tensors(a, model_tensors(tmp_path / "c"))
    first = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert again.manifest["partitions"] == first["partitions"]
    assert again.manifest["content_sha256"] == first["content_sha256"]
    assert again.manifest["epoch_losses"] == first["epoch_losses"]
    assert again.manifest["config"] == first["config"]
    assert again.manifest["seed"] == 7


def test_a_manifest_whose_records_changed_is_refused(
    bootstrap: str, shared: SharedTopic, tmp_path: Path
) -> None:
    replay(bootstrap, tmp_path / "a", topic=shared.topic, **{"from_": "0:0,1:0", "to": "0:50,1:50"})
    path = tmp_path / "a" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["content_sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(ReplayError, match="differ from the manifest"):
        replay(bootstrap, tmp_path / "b", manifest=path)
    with pytest.raises(ConfigurationError, match="seed"):
        replay(bootstrap, tmp_path / "b", manifest=path, seed=99)


def test_a_partial_range_by_offsets_gives_exactly_those_records(
    bootstrap: str, shared: SharedTopic, tmp_path: Path
) -> None:
    start, end = 30, 130
    result = replay(
        bootstrap, tmp_path / "a", topic=shared.topic, **{"from_": f"1:{start}", "to": f"1:{end}"}
    )
    manifest = result.manifest
    assert manifest["partitions"] == {"1": {"start": start, "end": end, "records": end - start}}
    assert manifest["records"] == end - start
    assert manifest["content_sha256"] == content_sha256(shared.values, {1: (start, end)})


def test_range_errors_are_clear(bootstrap: str, shared: SharedTopic, topic_factory, tmp_path: Path) -> None:
    topic = shared.topic
    ends = {p: len(v) for p, v in shared.values.items()}
    with pytest.raises(RangeError, match="has no partition 5"):
        replay(bootstrap, tmp_path / "x", topic=topic, **{"from_": "5:0"})
    with pytest.raises(RangeError, match="after its end"):
        replay(bootstrap, tmp_path / "x", topic=topic, **{"from_": "0:20", "to": "0:10"})
    with pytest.raises(RangeError, match="empty"):
        replay(bootstrap, tmp_path / "x", topic=topic, **{"from_": "0:10", "to": "0:10"})
    with pytest.raises(RangeError, match=f"the log ends at offset {ends[0]}, before the end of the range"):
        replay(bootstrap, tmp_path / "x", topic=topic, **{"from_": "0:0", "to": f"0:{ends[0] + 100}"})
    with pytest.raises(RangeError, match="holds no records"):
        replay(bootstrap, tmp_path / "x", topic=topic_factory(partitions=1))
    with pytest.raises(ConfigurationError, match="--from"):
        replay(bootstrap, tmp_path / "x", topic=topic, **{"from_": "yesterday"})


def test_invalid_records_are_counted_by_reason_in_the_manifest(
    bootstrap: str, topic_factory, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=1)
    good = samples(40, seed=2, binary_labels=True)
    produce(bootstrap, topic, good[:20], codec="binary")
    producer = Producer({"bootstrap.servers": bootstrap})
    for value in [b"not json", b'{"features": [1, 2, 3, 4]}', b'{"features": [1, 2, 3, 4], "label": 3}']:
        producer.produce(topic, value=value)
    producer.produce(topic, value=b"\x00\x00", headers=[("streamtrainer.codec", b"binary")])
    producer.produce(topic, value=None, key=b"deleted")  # a tombstone
    assert producer.flush(10) == 0
    produce(bootstrap, topic, good[20:], codec="json")

    result = replay(bootstrap, tmp_path / "a", topic=topic, model="logistic")
    manifest = result.manifest
    assert manifest["records"] == 40
    assert manifest["records_read"] == 45
    assert manifest["partitions"] == {"0": {"start": 0, "end": 45, "records": 45}}
    assert manifest["invalid"] == {
        "bad_binary_length": 1,
        "empty_value": 1,
        "invalid_json": 1,
        "label_out_of_range": 1,
        "missing_field": 1,
    }
    assert manifest["invalid_total"] == result.invalid == 5
    values = read_back(bootstrap, topic, 1, 45)
    assert manifest["content_sha256"] == content_sha256(values, {0: (0, 45)})


def test_init_from_continues_a_checkpoint_and_refuses_another_model(
    bootstrap: str, shared: SharedTopic, tmp_path: Path
) -> None:
    first = replay(bootstrap, tmp_path / "a", topic=shared.topic, holdout=0.0)
    second = replay(
        bootstrap,
        tmp_path / "b",
        topic=shared.topic,
        holdout=0.0,
        epochs=1,
        init_from=tmp_path / "a" / "checkpoints",
    )
    assert second.manifest["init_from"]["version"] == first.checkpoint_version
    batches = math.ceil(shared.n / 32)
    start = CheckpointStore(tmp_path / "a" / "checkpoints").load_latest()
    continued = CheckpointStore(tmp_path / "b" / "checkpoints").load_latest()
    assert start is not None and continued is not None
    assert start.metadata["updates"] == 2 * batches
    assert continued.metadata["updates"] == 3 * batches
    # It picks up where the first left off: its first epoch starts from the trained model.
    assert second.epoch_losses[0] < first.epoch_losses[0]
    with pytest.raises(ReplayError, match="does not fit this model"):
        replay(
            bootstrap,
            tmp_path / "c",
            topic=shared.topic,
            model="mlp",
            task="regression",
            init_from=tmp_path / "a" / "checkpoints",
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayError, match="no valid checkpoint"):
        replay(bootstrap, tmp_path / "c", topic=shared.topic, init_from=tmp_path / "empty")


def test_the_command_line_replays_a_range(bootstrap: str, shared: SharedTopic, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAINER_")}
    env[env_name("from_")] = "0:0"  # STREAMTRAINER_FROM
    command = [sys.executable, "-m", "streamtrainer.cli", "replay", "--bootstrap-servers", bootstrap]
    command += ["--topic", shared.topic, "--to", "0:100", "--epochs", "2", "--batch-size", "16"]
    command += ["--out", str(tmp_path / "cli"), "--seed", "3", "--holdout", "0.2"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "replayed 100 record(s) (0 invalid)" in done.stdout
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["partitions"] == {"0": {"start": 0, "end": 100, "records": 100}}
    assert manifest["seed"] == 3
    assert manifest["holdout_records"] == 20

    failed = subprocess.run(
        [*command[:-6], "--from", "0:0,9:0", "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert failed.returncode == 1
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert lines == [f"streamtrainer: error: topic {shared.topic!r} has no partition 9 (it has 2: 0, 1)"]


# -- Apache Kafka only ----------------------------------------------------------------------------


@pytest.mark.requires_real_kafka
def test_a_time_range_reads_the_records_of_that_time(bootstrap: str, topic_factory, tmp_path: Path) -> None:
    topic = topic_factory(partitions=1)
    base = int(time.time() * 1000) - 3_600_000
    data = samples(300, seed=4)
    timed = [Sample(s.features, s.label, timestamp_ms=base + (i // 100) * 60_000) for i, s in enumerate(data)]
    produce(bootstrap, topic, timed)

    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat()

    result = replay(
        bootstrap, tmp_path / "a", topic=topic, **{"from_": iso(base + 30_000), "to": iso(base + 90_000)}
    )
    assert result.manifest["partitions"] == {"0": {"start": 100, "end": 200, "records": 100}}


@pytest.mark.requires_real_kafka
def test_a_range_below_the_log_start_offset_is_refused(bootstrap: str, topic_factory, tmp_path: Path) -> None:
    topic = topic_factory(partitions=1)
    produce(bootstrap, topic, samples(200, seed=5))
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, 50)]).values():
        future.result(timeout=30)
    with pytest.raises(RangeError, match="below the log start offset 50"):
        replay(bootstrap, tmp_path / "a", topic=topic, **{"from_": "0:10"})
    result = replay(bootstrap, tmp_path / "b", topic=topic)
    assert result.manifest["partitions"] == {"0": {"start": 50, "end": 200, "records": 150}}
