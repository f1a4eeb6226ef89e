"""Model state and offsets move together: kill -9 a worker again and again, lose nothing, apply nothing twice.

The audit model makes this exact: float64 weights from zero, loss -w.x, SGD at
lr=1, so each applied record adds its features to w. The durable w must equal
the sum of the produced features; any duplicate or lost record shows as a
difference. The first feature is 1, so w[0] counts applied records.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition

from streamtrainer.records import BatchDecoder, Sample
from tests.helpers import produce
from tests.processes import WorkerProcess, kill_survivors, latest_state, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    yield
    kill_survivors()


AUDIT = [
    "--model",
    "audit",
    "--optimizer",
    "sgd",
    "--lr",
    "1",
    "--no-standardize",
    "--no-compaction",
    "--group-instance-id",
]


def _audit_samples(n: int, seed: int) -> tuple[list[Sample], np.ndarray]:
    rng = np.random.default_rng(seed)
    features = np.concatenate([np.ones((n, 1)), rng.integers(0, 10, size=(n, 4))], axis=1).astype(np.float32)
    return [Sample(row, 0.0, key=str(i % 97).encode()) for i, row in enumerate(features)], features


def _per_partition_truth(bootstrap: str, topic: str, partitions: int, n: int) -> dict[int, np.ndarray]:
    """Sum of features per partition, read back from the topic itself."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "truth", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    decoder = BatchDecoder()
    sums: dict[int, np.ndarray] = {}
    seen = 0
    deadline = time.monotonic() + 60
    while seen < n and time.monotonic() < deadline:
        messages = [m for m in consumer.consume(5000, 1.0) if m.error() is None]
        for m in messages:
            sample = decoder.decode_one(m.value(), "binary")
            p = m.partition() or 0
            sums[p] = sums.get(p, np.zeros(5)) + sample.features.astype(np.float64)
        seen += len(messages)
    consumer.close()
    assert seen == n
    return sums


def test_kill_minus_9_at_random_moments_applies_every_record_exactly_once(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    n, partitions = 50_000, 3
    topic = topic_factory(partitions=partitions)
    samples, features = _audit_samples(n, seed=11)
    produce(bootstrap, topic, samples, codec="binary")
    truth = _per_partition_truth(bootstrap, topic, partitions, n)
    checkpoints = tmp_path / "ckpt"
    worker = WorkerProcess(
        bootstrap,
        topic,
        group_id,
        checkpoints,
        tmp_path / "worker.log",
        *AUDIT,
        "crash-test",
        "--checkpoint-every-records",
        "700",
        "--checkpoint-interval-s",
        "0.3",
        # Small polls: a checkpoint every few hundred records, and so many lives before the end.
        "--poll-batch",
        "500",
        env={"STREAMTRAINER_TEST_CHECKPOINT_WRITE_DELAY_S": "0.03"},
    )
    rng = random.Random(2024)
    kills = mid_write = 0

    def applied() -> int:
        state = latest_state(checkpoints)
        return int(state[0]["records_applied"]) if state else 0  # type: ignore[call-overload]

    def writing() -> bool:
        """A checkpoint is half written: a temporary file, or tensors without their marker yet."""
        names = {p.name for p in checkpoints.iterdir()}
        stems = {name.split(".")[0] for name in names if name.endswith(".json")}
        return any(".tmp-" in name for name in names) or any(
            name.endswith(".safetensors") and name.split(".")[0] not in stems for name in names
        )

    while (kills < 10 or mid_write == 0) and kills < 30 and applied() < n * 0.9:
        before = applied()
        worker.start()
        # Wait until it has made progress in this life, then kill it at a random moment; every
        # third life, at the moment a checkpoint is being written (the test delays the marker).
        assert wait_until(lambda b=before: applied() > b, timeout=60), (tmp_path / "worker.log").read_text()[
            -3000:
        ]
        if kills % 3 == 2:
            wait_until(writing, timeout=10, interval=0.002)
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        worker.kill()
        kills += 1
        if writing():
            mid_write += 1

    worker.start()
    assert wait_until(worker.running_loop, timeout=60)
    assert wait_until(lambda: applied() >= n, timeout=180), (tmp_path / "worker.log").read_text()[-3000:]
    time.sleep(1.0)  # anything applied twice would show up in a checkpoint after this one
    assert worker.terminate() == 0
    state = latest_state(checkpoints)
    assert state is not None
    metadata, weights = state
    expected = features.astype(np.float64).sum(axis=0)
    applied_per_partition = {int(k.split(":")[1]): v for k, v in metadata["applied"].items()}  # type: ignore[union-attr]
    duplicates = sum(max(0, applied_per_partition.get(p, 0) - int(truth[p][0])) for p in truth)
    losses = sum(max(0, int(truth[p][0]) - applied_per_partition.get(p, 0)) for p in truth)
    report = {
        "kills": kills,
        "kills_mid_checkpoint_write": mid_write,
        "records": n,
        "partitions": partitions,
        "duplicates": duplicates,
        "losses": losses,
        "max_abs_weight_error": float(np.abs(weights - expected).max()),
    }
    print("crash test:", json.dumps(report))
    (Path(__file__).parent.parent / "runs").mkdir(exist_ok=True)
    (Path(__file__).parent.parent / "runs" / "crash-test.json").write_text(json.dumps(report, indent=1))
    assert kills >= 10 and mid_write >= 1
    assert duplicates == 0 and losses == 0
    np.testing.assert_array_equal(weights, expected)  # exact: integer sums in float64
    assert metadata["records_applied"] == n


def test_a_run_with_crashes_equals_an_uninterrupted_run(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    from streamtrainer.producer.synthetic import SyntheticSpec, generate

    n = 8000
    topic = topic_factory(partitions=1)
    produce(bootstrap, topic, generate(SyntheticSpec(task="binary", n_features=6, seed=5), n), codec="binary")
    model = ["--model", "logistic", "--optimizer", "adam", "--lr", "0.01", "--seed", "3"]

    def run(name: str, kills: int) -> np.ndarray:
        checkpoints = tmp_path / name
        worker = WorkerProcess(
            bootstrap,
            topic,
            f"{group_id}-{name}",
            checkpoints,
            tmp_path / f"{name}.log",
            *model,
            "--checkpoint-every-records",
            "500",
            "--checkpoint-interval-s",
            "0.5",
        )
        rng = random.Random(99)

        def applied() -> int:
            state = latest_state(checkpoints)
            return int(state[0]["records_applied"]) if state else 0  # type: ignore[call-overload]

        for _ in range(kills):
            before = applied()
            if before >= n:
                break
            worker.start()
            assert wait_until(lambda b=before: applied() > b, timeout=60)
            time.sleep(rng.uniform(0.0, 0.8))
            worker.kill()
        worker.start()
        assert wait_until(worker.running_loop, timeout=60)
        assert wait_until(lambda: applied() >= n, timeout=120), (tmp_path / f"{name}.log").read_text()[-2000:]
        assert worker.terminate() == 0
        state = latest_state(checkpoints)
        assert state is not None and state[0]["records_applied"] == n
        return state[1]

    uninterrupted = run("clean", kills=0)
    crashed = run("crashed", kills=4)
    print("determinism: max |w_crashed - w_clean| =", float(np.abs(crashed - uninterrupted).max()))
    np.testing.assert_allclose(crashed, uninterrupted, rtol=0, atol=1e-6)


def test_rebalance_churn_applies_each_record_once_across_the_group(
    kafka_broker, bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    import threading

    # Tansu's group coordinator stalls cooperative rebalances with 3 members (some partitions are
    # never assigned), so on the embedded broker the churn runs with the eager protocol.
    strategy = "cooperative-sticky" if kafka_broker.is_real_kafka else "roundrobin"
    # Static membership (a restarted member rejoins under its old id) wedges Tansu's coordinator for
    # good now and then: no member is assigned again. On Tansu the members join dynamically.
    audit = AUDIT if kafka_broker.is_real_kafka else AUDIT[:-1]

    from streamtrainer.producer.publisher import publish
    from streamtrainer.settings import KafkaSettings

    n, partitions = 24_000, 6
    topic = topic_factory(partitions=partitions)
    samples, features = _audit_samples(n, seed=21)
    producer = threading.Thread(
        target=publish,
        args=(KafkaSettings(bootstrap_servers=bootstrap), samples),
        kwargs={"topic": topic, "codec": "binary", "rate": 1500.0},
    )
    producer.start()
    workers = [
        WorkerProcess(
            bootstrap,
            topic,
            group_id,
            tmp_path / f"ckpt-{i}",
            tmp_path / f"worker-{i}.log",
            *audit,
            *([f"churn-{i}"] if kafka_broker.is_real_kafka else []),
            "--checkpoint-every-records",
            "500",
            "--checkpoint-interval-s",
            "0.5",
            "--assignment-strategy",
            strategy,
        )
        for i in range(3)
    ]

    def total_applied() -> int:
        states = [latest_state(w.checkpoint_dir) for w in workers if w.checkpoint_dir.exists()]
        return sum(int(s[0]["records_applied"]) for s in states if s)  # type: ignore[call-overload]

    events: list[str] = []
    try:
        _churn(workers, events, producer)
        assert wait_until(lambda: all(w.running_loop() for w in workers), timeout=60)
        for attempt in range(4):
            if wait_until(lambda: total_applied() >= n, timeout=60):
                break
            if kafka_broker.is_real_kafka:
                continue
            # Tansu's group coordinator now and then leaves a rebalance hanging for good (every member
            # joined, nothing assigned). A member restart starts a new one: more churn, same invariant.
            victim = workers[attempt % len(workers)]
            victim.terminate()
            victim.start()
            events.append(f"restart {attempt % len(workers)} (Tansu rebalance stalled)")
        assert total_applied() >= n
        # A member restarted for a stalled rebalance may still be starting (a SIGTERM before its
        # handler is installed ends it with -15): a clean stop is asked of running loops only.
        assert wait_until(lambda: all(w.running_loop() for w in workers), timeout=60)
        time.sleep(1.5)
        for worker in workers:
            assert worker.terminate() == 0
    finally:
        for worker in workers:
            if worker.alive:
                worker.kill()
    weights = np.zeros(5)
    applied = 0
    for worker in workers:
        state = latest_state(worker.checkpoint_dir)
        if state is None:
            # Assigned for a moment only, between rebalances: it trained no record, so it has
            # nothing to checkpoint (and applied nothing: the sums below still have to add up).
            trained = re.findall(r"trained (\d+) record\(s\)", worker.log.read_text())
            assert set(trained) <= {"0"}, trained  # (a killed life prints no summary)
            continue
        weights += state[1]
        applied += int(state[0]["records_applied"])  # type: ignore[call-overload]
    print(f"churn: {events}; applied {applied} of {n}")
    assert applied == n
    np.testing.assert_array_equal(weights, features.astype(np.float64).sum(axis=0))


def _churn(workers: list[WorkerProcess], events: list[str], producer) -> None:  # type: ignore[no-untyped-def]
    """Members join, leave cleanly, crash and come back while the stream is being produced."""
    workers[0].start()
    time.sleep(4)
    workers[1].start()
    time.sleep(4)
    workers[2].start()
    time.sleep(4)
    assert workers[1].terminate() == 0  # clean leave: its partitions move to the others
    events.append("stop 1")
    time.sleep(3)
    workers[0].kill()  # crash, and back under the same group.instance.id
    workers[0].start()
    events.append("kill+restart 0")
    time.sleep(3)
    workers[1].start()  # rejoin: partitions move back
    events.append("start 1")
    time.sleep(4)
    workers[2].kill()
    workers[2].start()
    events.append("kill+restart 2")
    producer.join(timeout=120)
