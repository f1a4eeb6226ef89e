"""Training guards in the worker: poisoned values never reach a checkpoint; a broken run rolls back."""

from __future__ import annotations

import json

import torch
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from streamtrainer.consumer.worker import Worker
from streamtrainer.training.checkpoint import CheckpointStore
from tests.helpers import worker_settings


def _produce(bootstrap: str, topic: str, features: list[list[float]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i, x in enumerate(features):
        producer.produce(topic, value=json.dumps({"features": x, "label": float(i % 3)}).encode())
    assert producer.flush(10) == 0


def _good(i: int) -> list[float]:
    return [((i * 5 + k) % 7) / 7 for k in range(4)]


def test_values_that_blow_up_the_loss_are_skipped_and_no_checkpoint_holds_a_non_finite_parameter(
    bootstrap, topic_factory, group_id
) -> None:
    topic = topic_factory(partitions=1)
    # Finite (they pass validation), but 1e30 squared overflows: the loss and the gradient are Inf.
    poisoned = {i for i in range(100, 3000, 150)}
    _produce(bootstrap, topic, [[1e30, 1.0, 1.0, 1.0] if i in poisoned else _good(i) for i in range(3000)])
    registry = CollectorRegistry()
    settings = worker_settings(
        bootstrap, topic, group_id, model="linear", standardize=False, max_records=3000, compaction=False
    )
    status = Worker(settings, registry=registry).run()

    skipped = registry.get_sample_value("streamtrainer_updates_skipped_total", {"reason": "non_finite"})
    assert skipped == len(poisoned) == 20
    assert status.records_trained == 3000 and registry.get_sample_value("streamtrainer_rollbacks_total") == 0
    assert status.loss == status.loss  # the prequential loss stays a number
    checkpoint = CheckpointStore(settings.checkpoint_dir).load_latest()
    assert checkpoint is not None
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint.tensors.values() if t.is_floating_point())


def test_a_run_of_refused_updates_rolls_back_to_the_checkpoint_once(
    bootstrap, topic_factory, group_id
) -> None:
    topic = topic_factory(partitions=1)
    rows = [_good(i) for i in range(1000)] + [[1e30, 1.0, 1.0, 1.0]] * 60 + [_good(i) for i in range(1000)]
    _produce(bootstrap, topic, rows)
    registry = CollectorRegistry()
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="linear",
        standardize=False,
        compaction=False,
        max_consecutive_skips=50,
        checkpoint_every_records=500,
        poll_batch=100,
        max_seconds=12.0,
    )
    status = Worker(settings, registry=registry).run()

    # One rollback to the checkpoint before the poisoned run; the second time the same records are
    # refused the worker carries on (rolling back again would loop forever), and trains the rest.
    assert registry.get_sample_value("streamtrainer_rollbacks_total") == 1
    assert status.records_applied == len(rows)
    checkpoint = CheckpointStore(settings.checkpoint_dir).load_latest()
    assert checkpoint is not None and checkpoint.metadata["records_applied"] == len(rows)
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint.tensors.values() if t.is_floating_point())
