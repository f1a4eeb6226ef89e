"""Producer -> Kafka -> worker, on a real broker (never a mock)."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamtrainer.consumer import Worker
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.records import Sample
from tests.helpers import committed_offsets, produce, worker_settings

pytestmark = pytest.mark.integration

REQUIRED_METRICS = {
    "streamtrainer_records_consumed_total",
    "streamtrainer_records_trained_total",
    "streamtrainer_records_invalid_total",
    "streamtrainer_prequential_loss",
    "streamtrainer_prequential_accuracy",
    "streamtrainer_prequential_roc_auc",
    "streamtrainer_prequential_records_total",
    "streamtrainer_prequential_loss_sum_total",
    "streamtrainer_prequential_correct_total",
    "streamtrainer_throughput_records_per_second",
    "streamtrainer_update_latency_seconds_bucket",
    "streamtrainer_consumer_lag_records",
    "streamtrainer_model_updates_total",
}


@pytest.mark.parametrize("codec", ["json", "binary"])
def test_worker_trains_exactly_the_produced_records_and_loss_falls(
    bootstrap: str, topic_factory, group_id: str, codec: str
) -> None:
    topic = topic_factory(partitions=3)
    n = 6000
    spec = SyntheticSpec(task="binary", n_features=6, noise=0.02, seed=3)
    produce(bootstrap, topic, generate(spec, n), codec=codec)
    registry = CollectorRegistry()
    settings = worker_settings(
        bootstrap, topic, group_id, model="logistic", lr=0.05, max_records=n, prequential_window=500
    )
    status = Worker(settings, registry=registry).run()

    assert status.records_trained == n
    assert status.records_invalid == 0
    assert status.last_window_loss < 0.8 * status.first_window_loss
    assert status.prequential.window["accuracy"] > 0.9
    assert status.prequential.records == n
    trained = sum(
        registry.get_sample_value(
            "streamtrainer_records_trained_total", {"topic": topic, "partition": str(p)}
        )
        or 0
        for p in range(3)
    )
    assert trained == n
    assert registry.get_sample_value("streamtrainer_model_updates_total") == n
    # Every trained record's offset is committed, and nothing beyond.
    assert sum(committed_offsets(bootstrap, topic, group_id).values()) == n


def test_undecodable_records_are_counted_by_reason_and_never_crash_the_worker(
    bootstrap: str, topic_factory, group_id: str
) -> None:
    from confluent_kafka import Producer

    topic = topic_factory(partitions=1)
    good = [Sample.of([1.0, 2.0], 1.0)] * 10
    produce(bootstrap, topic, good[:5])
    producer = Producer({"bootstrap.servers": bootstrap})
    for value in [b"not json", b'{"features": [1, 2]}', b'{"features": [1, 2, 3], "label": 1}', b""]:
        producer.produce(topic, value=value)
    producer.produce(topic, value=b"\x00\x00", headers=[("streamtrainer.codec", b"binary")])
    assert producer.flush(10) == 0
    produce(bootstrap, topic, good[5:])

    registry = CollectorRegistry()
    settings = worker_settings(bootstrap, topic, group_id, max_records=15)
    status = Worker(settings, registry=registry).run()
    assert status.records_trained == 10
    assert status.records_invalid == 5
    reasons = {"invalid_json", "missing_field", "wrong_feature_count", "empty_value", "bad_binary_length"}
    for reason in reasons:
        assert (
            registry.get_sample_value(
                "streamtrainer_records_invalid_total", {"topic": topic, "reason": reason}
            )
            == 1
        )
    # Invalid records are done too: the committed offset is past all 15.
    assert committed_offsets(bootstrap, topic, group_id) == {0: 15}


def test_metrics_endpoint_serves_every_metric_during_a_run(
    bootstrap: str, topic_factory, group_id: str
) -> None:
    topic = topic_factory(partitions=2)
    produce(bootstrap, topic, generate(SyntheticSpec(task="binary", n_features=4, seed=1), 3000))
    settings = worker_settings(
        bootstrap, topic, group_id, model="logistic", metrics_port=0, max_seconds=60.0, max_records=None
    )
    worker = Worker(settings)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        names: set[str] = set()
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            url = worker.metrics_server.url
            if url is not None and worker.records_trained >= 3000:
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = response.read().decode()
                names = {s.name for family in text_string_to_metric_families(body) for s in family.samples}
                if names >= REQUIRED_METRICS:
                    break
            time.sleep(0.5)
        assert names >= REQUIRED_METRICS, REQUIRED_METRICS - names
    finally:
        worker.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert worker.records_trained == 3000


def test_sigterm_style_stop_commits_what_was_trained(bootstrap: str, topic_factory, group_id: str) -> None:
    topic = topic_factory(partitions=1)
    produce(bootstrap, topic, generate(SyntheticSpec(n_features=3, seed=2), 2000))
    worker = Worker(
        worker_settings(
            bootstrap,
            topic,
            group_id,
            checkpoint_interval_s=3600.0,
            checkpoint_every_records=10**9,
            max_records=None,
        )
    )
    thread = threading.Thread(target=worker.run)
    thread.start()
    deadline = time.monotonic() + 60
    while worker.records_trained < 2000 and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.stop()
    thread.join(timeout=30)
    assert worker.records_trained == 2000
    # No periodic checkpoint happened (an hour, 10**9 records): the one on exit made it durable.
    assert committed_offsets(bootstrap, topic, group_id) == {0: 2000}


@pytest.mark.parametrize("reset", ["earliest", "latest"])
def test_a_new_group_starts_where_the_reset_policy_says(
    bootstrap: str, topic_factory, group_id: str, reset: str
) -> None:
    """No checkpoint, no committed offset: earliest trains the records already there, latest only new ones."""
    topic = topic_factory(partitions=1)
    old = 300
    produce(bootstrap, topic, generate(SyntheticSpec(n_features=3, seed=2), old))
    settings = worker_settings(bootstrap, topic, group_id, auto_offset_reset=reset, max_records=200)
    worker = Worker(settings)
    thread = threading.Thread(target=worker.run)
    thread.start()
    # New records keep coming until the worker has trained its 200 (the latest offset is
    # resolved after the assignment: records produced meanwhile may fall before it).
    deadline = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        produce(bootstrap, topic, generate(SyntheticSpec(n_features=3, seed=3), 50))
        time.sleep(0.1)
    thread.join(timeout=30)
    assert worker.records_trained == 200
    (committed,) = committed_offsets(bootstrap, topic, group_id).values()
    if reset == "earliest":
        assert committed == 200  # from offset 0
    else:
        assert committed >= old + 200  # none of the records that were there before it joined


def test_restart_resumes_from_the_checkpoint_and_refuses_a_different_model(
    bootstrap: str, topic_factory, group_id: str, tmp_path
) -> None:
    from streamtrainer.exceptions import ConfigurationError

    topic = topic_factory(partitions=1)
    produce(bootstrap, topic, generate(SyntheticSpec(task="binary", n_features=3, seed=4), 3000))
    checkpoints = tmp_path / "ckpt"
    first = Worker(
        worker_settings(
            bootstrap, topic, group_id, model="logistic", checkpoint_dir=checkpoints, max_records=1000
        )
    ).run()
    assert (first.records_applied, first.model_version) == (1000, 1)
    # Same group, same directory: it resumes at offset 1000 with the model that applied 1000 records.
    second = Worker(
        worker_settings(
            bootstrap, topic, group_id, model="logistic", checkpoint_dir=checkpoints, max_records=2000
        )
    ).run()
    assert second.records_trained == 2000 and second.records_applied == 3000
    assert committed_offsets(bootstrap, topic, group_id) == {0: 3000}
    # Another model cannot silently load these weights...
    with pytest.raises(ConfigurationError, match="checkpoint was made for"):
        Worker(
            worker_settings(
                bootstrap, topic, group_id, model="mlp", task="binary", checkpoint_dir=checkpoints
            )
        ).run()
    # ...but --fresh starts a new one (a new group here, so it reads from the beginning).
    fresh = Worker(
        worker_settings(
            bootstrap,
            topic,
            f"{group_id}-b",
            model="mlp",
            task="binary",
            checkpoint_dir=checkpoints,
            fresh=True,
            max_records=3000,
        )
    ).run()
    assert fresh.records_applied == 3000 and fresh.model_version > second.model_version


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_the_worker_learns_exactly_what_the_learner_learns_from_the_same_records_in_order(
    bootstrap: str, topic_factory, group_id: str, overlap: bool
) -> None:
    """Training in the background lane (or not) changes when updates run, never which or in what order."""
    import numpy as np

    from streamtrainer.training import LearnerConfig, OnlineLearner
    from streamtrainer.training.checkpoint import CheckpointStore

    topic = topic_factory(partitions=1)
    n = 5000
    samples = list(generate(SyntheticSpec(task="binary", n_features=6, noise=0.05, seed=11), n))
    produce(bootstrap, topic, samples, codec="binary")
    # Small polls: many batches, each trained while the next one is polled.
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="logistic",
        optimizer="adam",
        lr=0.01,
        max_records=n,
        poll_batch=300,
        overlap=overlap,
        compaction=False,
        seed=4,
    )
    status = Worker(settings).run()
    assert status.records_trained == n

    reference = OnlineLearner(
        LearnerConfig(model="logistic", task="binary", optimizer="adam", lr=0.01, seed=4), n_features=6
    )
    features = np.array([s.features for s in samples], dtype=np.float32)
    labels = np.array([s.label for s in samples], dtype=np.float32)
    reference.learn_many(features, labels)
    expected, _ = reference.state()
    checkpoint = CheckpointStore(settings.checkpoint_dir).load_latest()
    assert checkpoint is not None and checkpoint.metadata["records_applied"] == n
    assert checkpoint.metadata["updates"] == n
    for name, tensor in expected.items():
        # Per-record steps in the same order; the worker's first batches may go through autograd
        # while the compiled loop loads, and the two agree to float32 rounding.
        np.testing.assert_allclose(checkpoint.tensors[name].numpy(), tensor.numpy(), rtol=0, atol=1e-5)
