"""Training guards in the worker: poisoned values never reach a checkpoint; a broken run rolls back.

A record whose update a guard refuses is not trained on: it goes to the dead-letter topic with
its reason (``non_finite_loss``, ``loss_spike``), so that trained + dead-lettered = produced.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from streamtrainer.consumer.dead_letter import (
    ERROR_CLASS,
    ERROR_MESSAGE,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    WORKER_ID,
    DeadLetter,
    read_dead_letters,
)
from streamtrainer.consumer.worker import Worker
from streamtrainer.settings import KafkaSettings, WorkerSettings
from streamtrainer.training.checkpoint import CheckpointStore
from tests.helpers import committed_offsets, produce_tracked, worker_settings


def _settings(*args: object, **overrides: object) -> WorkerSettings:
    """The scenarios here were built on plain SGD (lr 0.01) and raw-scale labels, not the adaptive,
    standardized defaults (docs/quality.md): under those a too-large step does not diverge."""
    values: dict[str, object] = {"optimizer": "sgd", "lr": 0.01, "standardize_target": False, **overrides}
    return worker_settings(*args, **values)  # type: ignore[arg-type]


def _produce(
    bootstrap: str,
    topic: str,
    features: list[list[float]],
    labels: list[float] | None = None,
    partitions: int = 1,
) -> list[tuple[int, int]]:
    """Produce record i to partition i % partitions; returns each record's (partition, offset)."""
    records = [
        (json.dumps({"features": x, "label": float(i % 3) if labels is None else labels[i]}).encode(), None)
        for i, x in enumerate(features)
    ]
    return produce_tracked(bootstrap, topic, records, partitions)


def _good(i: int) -> list[float]:
    return [((i * 5 + k) % 7) / 7 for k in range(4)]


def _dead_letters(bootstrap: str, topic: str) -> dict[tuple[int, int], DeadLetter]:
    """The dead-letter topic's records by source (partition, offset); each source at most once."""
    found: dict[tuple[int, int], DeadLetter] = {}
    for letter in read_dead_letters(KafkaSettings(bootstrap_servers=bootstrap), f"{topic}.dlq"):
        source_topic, partition, offset = letter.source
        assert source_topic == topic and letter.header(SOURCE_TOPIC) == topic
        assert letter.header(SOURCE_PARTITION) == str(partition)
        assert letter.header(SOURCE_OFFSET) == str(offset)
        assert (partition, offset) not in found, f"{partition}:{offset} dead-lettered twice"
        found[(partition, offset)] = letter
    return found


def _assert_finite_checkpoint(directory: object) -> None:
    checkpoint = CheckpointStore(directory).load_latest()  # type: ignore[arg-type]
    assert checkpoint is not None
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint.tensors.values() if t.is_floating_point())


def test_values_that_blow_up_the_loss_are_dead_lettered_and_no_checkpoint_holds_a_non_finite_parameter(
    bootstrap, topic_factory, group_id
) -> None:
    n = 3000
    topic = topic_factory(partitions=2)
    # Finite (they pass validation), but 1e30 squared overflows: the loss and the gradient are Inf.
    poisoned = set(range(100, n, 145))
    rows = [[1e30, 1.0, 1.0, 1.0] if i in poisoned else _good(i) for i in range(n)]
    sources = _produce(bootstrap, topic, rows, partitions=2)
    expected = {sources[i]: rows[i] for i in poisoned}
    assert len(expected) == 20 and {partition for partition, _ in expected} == {0, 1}
    registry = CollectorRegistry()
    settings = _settings(
        bootstrap,
        topic,
        group_id,
        model="linear",
        standardize=False,
        worker_id="guard-test",
        max_records=n,  # records consumed: trained or dead-lettered
        compaction_every_records=10**9,  # keeps records for compaction epochs, runs none
    )
    worker = Worker(settings, registry=registry)
    assert worker.compactor is not None
    kept: list[tuple[int, int]] = []
    keep = worker.compactor.keep

    def keep_and_note(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kept.extend(zip(args[2].tolist(), args[3].tolist(), strict=True))
        keep(*args, **kwargs)

    worker.compactor.keep = keep_and_note  # type: ignore[method-assign]
    status = worker.run()

    good = n - len(poisoned)
    assert status.records_trained == status.records_applied == good
    assert status.records_invalid == len(poisoned)
    assert status.records_trained + status.records_invalid == status.records_consumed == n
    assert sum(committed_offsets(bootstrap, topic, group_id).values()) == n
    # A refused record is not trained on, and not kept for compaction epochs either.
    assert Counter(kept) == Counter(s for i, s in enumerate(sources) if i not in poisoned)
    labels = {"topic": topic, "reason": "non_finite_loss"}
    assert registry.get_sample_value("streamtrainer_records_dead_lettered_total", labels) == 20
    assert registry.get_sample_value("streamtrainer_records_invalid_total", labels) == 20
    skipped = registry.get_sample_value("streamtrainer_updates_skipped_total", {"reason": "non_finite"})
    assert skipped == 20
    trained = sum(
        registry.get_sample_value(
            "streamtrainer_records_trained_total", {"topic": topic, "partition": str(p)}
        )
        or 0
        for p in (0, 1)
    )
    assert trained == good
    assert registry.get_sample_value("streamtrainer_rollbacks_total") == 0
    assert np.isfinite(status.last_window_loss)  # the prequential loss stays a number
    assert np.isfinite(status.mean_loss)

    letters = _dead_letters(bootstrap, topic)
    assert set(letters) == set(expected)
    for source, letter in letters.items():
        assert letter.reason == letter.header(ERROR_CLASS) == "non_finite_loss"
        assert letter.header(ERROR_MESSAGE).startswith("training guard refused the update")
        assert letter.header(WORKER_ID) == "guard-test"
        assert letter.value is not None and json.loads(letter.value)["features"] == expected[source]
        assert letter.key is not None and letter.key.startswith(b"k")
    _assert_finite_checkpoint(settings.checkpoint_dir)


def test_loss_spikes_are_dead_lettered_with_their_reason(bootstrap, topic_factory, group_id) -> None:
    n = 3000
    topic = topic_factory(partitions=1)
    rows = [_good(i) for i in range(n)]
    # Learnable labels with a little bounded noise: no clean record's loss is 20x the running one.
    labels = [sum(x) + ((i * 37) % 11 - 5) / 50 for i, x in enumerate(rows)]
    spikes = set(range(600, n, 250))
    for i in spikes:
        labels[i] += 100.0
    sources = _produce(bootstrap, topic, rows, labels)
    registry = CollectorRegistry()
    settings = _settings(
        bootstrap,
        topic,
        group_id,
        model="linear",
        lr=0.05,
        spike_factor=20.0,
        compaction=False,
        max_records=n,
    )
    status = Worker(settings, registry=registry).run()

    assert status.records_trained == status.records_applied == n - len(spikes)
    assert status.records_trained + status.records_invalid == n
    spike = {"topic": topic, "reason": "loss_spike"}
    assert registry.get_sample_value("streamtrainer_records_dead_lettered_total", spike) == len(spikes)
    assert registry.get_sample_value("streamtrainer_records_invalid_total", spike) == len(spikes)
    assert registry.get_sample_value("streamtrainer_updates_skipped_total", {"reason": "spike"}) == len(
        spikes
    )
    letters = _dead_letters(bootstrap, topic)
    assert set(letters) == {sources[i] for i in spikes}
    for letter in letters.values():
        assert letter.reason == "loss_spike"
        assert "above the spike threshold" in letter.header(ERROR_MESSAGE)
    # The spikes never reached the prequential loss (window or whole run).
    assert np.isfinite(status.last_window_loss) and status.last_window_loss < 1.0
    assert np.isfinite(status.mean_loss) and status.mean_loss < 1.0


def test_a_run_of_refused_updates_rolls_back_to_the_checkpoint_once(
    bootstrap, topic_factory, group_id
) -> None:
    topic = topic_factory(partitions=1)
    rows = [_good(i) for i in range(1000)] + [[1e30, 1.0, 1.0, 1.0]] * 60 + [_good(i) for i in range(1000)]
    sources = _produce(bootstrap, topic, rows)
    registry = CollectorRegistry()
    settings = _settings(
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
    assert status.records_applied == 2000
    checkpoint = CheckpointStore(settings.checkpoint_dir).load_latest()
    assert checkpoint is not None and checkpoint.metadata["records_applied"] == 2000
    _assert_finite_checkpoint(settings.checkpoint_dir)
    # The refused records were read twice (the rollback) but are dead-lettered once each.
    letters = _dead_letters(bootstrap, topic)
    assert set(letters) == set(sources[1000:1060])
    assert {letter.reason for letter in letters.values()} == {"non_finite_loss"}
    assert status.records_invalid == 60
