"""--predictions-topic: every trained record's pre-update prediction, exactly once (embedded broker)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from streamtrainer.consumer import Worker
from streamtrainer.records import Sample
from tests.helpers import produce, read_to_end, worker_settings
from tests.processes import WorkerProcess, kill_survivors, latest_state, wait_until

pytestmark = pytest.mark.integration

AUDIT = {"model": "audit", "optimizer": "sgd", "lr": 1.0, "standardize": False, "compaction": False}


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    yield
    kill_survivors()


def audit_samples(n: int, seed: int) -> tuple[list[Sample], np.ndarray]:
    """Integer features (the first is 1): the audit model's sums are exact in float64."""
    rng = np.random.default_rng(seed)
    features = np.concatenate([np.ones((n, 1)), rng.integers(0, 10, size=(n, 4))], axis=1).astype(np.float32)
    return [Sample(row, 0.0, key=f"k{i}".encode()) for i, row in enumerate(features)], features


def read_committed(bootstrap: str, topic: str, idle_s: float = 5.0) -> list[tuple[bytes | None, dict]]:
    """Every record a read_committed reader sees in ``topic``, to its end: (key, JSON value)."""
    return [(key, orjson.loads(value)) for key, value in read_to_end(bootstrap, topic, idle_s=idle_s)]


def test_each_trained_record_has_its_pre_update_prediction_once(
    bootstrap: str, topic_factory, group_id: str
) -> None:
    n = 3000
    topic = topic_factory(partitions=1)
    samples, features = audit_samples(n, seed=3)
    produce(bootstrap, topic, samples, codec="binary")
    predictions_topic = f"{topic}.predictions"
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        **AUDIT,
        stop_at_end=True,
        predictions_topic=predictions_topic,
        checkpoint_every_records=700,
    )
    status = Worker(settings).run()
    assert status.records_trained == n

    seen = read_committed(bootstrap, predictions_topic)
    assert len(seen) == n
    by_offset = {value["offset"]: (key, value) for key, value in seen}
    assert sorted(by_offset) == list(range(n))
    # The audit model (SGD at lr 1 on -w.x from w = 0) adds each record to w: record i's prediction
    # before its update is (x_0 + ... + x_{i-1}) . x_i, exactly (integers in float64).
    before = np.vstack([np.zeros((1, 5)), np.cumsum(features.astype(np.float64), axis=0)[:-1]])
    expected = (before * features).sum(axis=1)
    got = np.array([by_offset[i][1]["prediction"] for i in range(n)])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal([by_offset[i][1]["loss"] for i in range(n)], -expected)
    assert all(by_offset[i][0] == f"k{i}".encode() for i in range(n))  # keyed like the input
    first = by_offset[0][1]
    assert first["topic"] == topic and first["partition"] == 0 and first["group"] == group_id
    assert first["timestamp"] > 0
    # The version a record's update lands in: 700 records a checkpoint, so record i lands in i // 700 + 1.
    versions = [by_offset[i][1]["model_version"] for i in range(n)]
    assert versions[0] == 1 and versions[-1] == status.model_version
    assert versions == sorted(versions)


def test_predictions_stay_exactly_once_across_kill_minus_9(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    n, partitions = 8_000, 2
    topic = topic_factory(partitions=partitions)
    samples, _ = audit_samples(n, seed=7)
    produce(bootstrap, topic, samples, codec="binary")
    predictions_topic = f"{topic}.predictions"
    checkpoints = tmp_path / "ckpt"
    worker = WorkerProcess(
        bootstrap,
        topic,
        group_id,
        checkpoints,
        tmp_path / "worker.log",
        *("--model", "audit", "--optimizer", "sgd", "--lr", "1", "--no-standardize", "--no-compaction"),
        *("--predictions-topic", predictions_topic),
        *("--checkpoint-every-records", "700", "--checkpoint-interval-s", "0.3", "--poll-batch", "500"),
        # Widens the moment between the predictions' commit and the checkpoint's marker (see below).
        env={"STREAMTRAINER_TEST_CHECKPOINT_WRITE_DELAY_S": "0.1"},
    )
    rng = random.Random(19)

    def applied() -> int:
        state = latest_state(checkpoints)
        return int(state[0]["records_applied"]) if state else 0  # type: ignore[call-overload]

    def writing() -> bool:
        """A checkpoint is half written (tensors without their marker): the predictions before it are
        committed already, the checkpoint is not."""
        names = {p.name for p in checkpoints.iterdir()}
        stems = {name.split(".")[0] for name in names if name.endswith(".json")}
        return any(".tmp-" in name for name in names) or any(
            name.endswith(".safetensors") and name.split(".")[0] not in stems for name in names
        )

    kills = mid_write = 0
    while kills < 4 and applied() < n * 0.8:
        before = applied()
        worker.start()
        log = tmp_path / "worker.log"
        assert wait_until(lambda b=before: applied() > b, timeout=60), log.read_text()[-3000:]
        if kills % 2:
            # Between the commit and the checkpoint: the restart must find these and not write them again.
            wait_until(writing, timeout=10, interval=0.002)
        else:
            time.sleep(rng.uniform(0.0, 1.0))
        worker.kill()
        kills += 1
        mid_write += writing()
    worker.start()
    assert wait_until(lambda: applied() >= n, timeout=120), (tmp_path / "worker.log").read_text()[-3000:]
    assert worker.terminate() == 0

    seen = read_committed(bootstrap, predictions_topic)
    identities = [(value["partition"], value["offset"]) for _, value in seen]
    unique = set(identities)
    produced = {(p, o) for p in range(partitions) for o in range(n)}  # a superset: filtered below
    ends = {p: 1 + max(o for q, o in unique if q == p) for p in range(partitions)}
    expected = {(p, o) for p, o in produced if o < ends[p]}
    report = {
        "kills": kills,
        "kills_between_commit_and_checkpoint": mid_write,
        "records": n,
        "predictions": len(seen),
        "duplicates": len(identities) - len(unique),
        "missing": len(expected - unique),
        "recovered_at_restart": (tmp_path / "worker.log").read_text().count("not written again"),
    }
    print("predictions crash test:", json.dumps(report))
    assert kills >= 3 and mid_write >= 1
    assert report["recovered_at_restart"] >= 1  # the read-back path ran
    assert sum(ends.values()) == n  # every partition's last record was predicted
    assert report["duplicates"] == 0 and report["missing"] == 0
    assert len(seen) == n
