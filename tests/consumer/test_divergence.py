"""A diverging model is the model's fault, not the records' (issue #15, case 8).

A learning rate too large for the stream makes every loss explode and then
overflow. The records are fine: the worker must roll back, lower the learning
rate and read them again, never dead-letter them. A record that fails on the
model the rollback goes back to as well is a bad record: it is dead-lettered,
once, and nothing rolls back.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamtrainer.consumer.dead_letter import read_dead_letters
from streamtrainer.consumer.worker import Worker, WorkerStatus
from streamtrainer.settings import KafkaSettings, WorkerSettings
from streamtrainer.training import LearnerConfig, OnlineLearner
from streamtrainer.training.checkpoint import CheckpointStore
from streamtrainer.training.exceptions import DivergenceError
from tests.helpers import committed_offsets, produce_tracked, worker_settings

N = 3000
D = 16


def _settings(*args: object, **overrides: object) -> WorkerSettings:
    """The scenarios here were built on plain SGD (lr 0.01) and raw-scale labels, not the adaptive,
    standardized defaults (docs/quality.md): under those a too-large step does not diverge."""
    values: dict[str, object] = {"optimizer": "sgd", "lr": 0.01, "standardize_target": False, **overrides}
    return worker_settings(*args, **values)  # type: ignore[arg-type]


def _raw_scale_stream(n: int = N, d: int = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unscaled features (scales 1-30, offsets 0-100) and a label around 43, linear in them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(1, 30, d) + rng.uniform(0, 100, d)
    z = (x - x.mean(0)) / x.std(0)
    y = 43.0 + z @ rng.normal(size=d) + rng.normal(size=n) * 0.5
    return x, y


def _produce(bootstrap: str, topic: str, x: np.ndarray, y: np.ndarray) -> list[tuple[int, int]]:
    records = [
        (json.dumps({"features": x[i].tolist(), "label": float(y[i])}).encode(), None) for i in range(len(y))
    ]
    return produce_tracked(bootstrap, topic, records)


def _run_until_applied(worker: Worker, n: int) -> WorkerStatus:
    """Run until ``n`` records are in the model or dead-lettered (records_trained counts re-reads too)."""

    def progress(status: WorkerStatus) -> None:
        if status.records_applied + status.records_invalid >= n:
            worker.stop()

    worker.on_progress = progress
    return worker.run()


def _dead_lettered(bootstrap: str, topic: str) -> list[tuple[tuple[str, int, int], str]]:
    letters = read_dead_letters(KafkaSettings(bootstrap_servers=bootstrap), f"{topic}.dlq")
    return [(letter.source, letter.reason) for letter in letters]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])
def test_a_diverging_model_rolls_back_and_lowers_the_learning_rate_instead_of_blaming_records(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str, fused: bool
) -> None:
    topic = topic_factory(partitions=1)
    x, y = _raw_scale_stream()
    _produce(bootstrap, topic, x, y)
    registry = CollectorRegistry()
    settings = _settings(
        bootstrap,
        topic,
        group_id,
        model="linear",
        lr=0.1,
        compaction=False,
        fused=fused,
        max_seconds=60.0,
        standardize_target=False,  # a standardized label does not diverge at lr 0.1
    )
    worker = Worker(settings, registry=registry)
    status = _run_until_applied(worker, N)

    # Before: ~2000 of the 3000 valid records dead-lettered as non_finite_loss, the loss ~1e37.
    assert status.records_invalid == 0
    assert _dead_lettered(bootstrap, topic) == []
    assert (
        registry.get_sample_value(
            "streamtrainer_records_dead_lettered_total", {"topic": topic, "reason": "non_finite_loss"}
        )
        == 0
    )
    assert status.records_applied == N
    assert committed_offsets(bootstrap, topic, group_id) == {0: N}
    rollbacks = registry.get_sample_value("streamtrainer_rollbacks_total")
    assert rollbacks is not None and rollbacks >= 1
    learner = worker.learner
    assert learner is not None
    assert learner.lr == pytest.approx(0.1 * 0.5**rollbacks)
    assert registry.get_sample_value("streamtrainer_learning_rate") == pytest.approx(learner.lr)
    # Labels around 43 (a constant guess: loss ~1850); the model learned them.
    assert np.isfinite(status.last_window_loss) and status.last_window_loss < 20.0

    # The checkpoint keeps the lowered learning rate: a restarted worker (same --lr) goes on with it.
    checkpoint = CheckpointStore(settings.checkpoint_dir).load_latest()
    assert checkpoint is not None and checkpoint.metadata["records_applied"] == N
    restarted = OnlineLearner(
        LearnerConfig(model="linear", optimizer="sgd", lr=0.1, standardize_target=False), D
    )
    restarted.load_state(checkpoint.tensors, checkpoint.metadata)
    assert restarted.lr == pytest.approx(learner.lr)
    # A new --lr replaces it.
    changed = OnlineLearner(
        LearnerConfig(model="linear", optimizer="sgd", lr=0.02, standardize_target=False), D
    )
    changed.load_state(checkpoint.tensors, checkpoint.metadata)
    assert changed.lr == pytest.approx(0.02)


def _small_stream(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.array([[((i * 5 + k) % 7) / 7 for k in range(4)] for i in range(n)])
    return x, 43.0 + x.sum(axis=1)


def test_a_truly_bad_record_is_dead_lettered_once_and_nothing_rolls_back(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str
) -> None:
    n = 2000
    topic = topic_factory(partitions=1)
    x, y = _small_stream(n)
    x[700, 0] = 1e30  # any model's loss overflows
    x[1400, 2] = 1e15  # any model's prediction is ~1e14: its finite loss explodes
    sources = _produce(bootstrap, topic, x, y)
    registry = CollectorRegistry()
    settings = _settings(
        bootstrap, topic, group_id, model="linear", standardize=False, compaction=False, max_seconds=60.0
    )
    worker = Worker(settings, registry=registry)
    status = _run_until_applied(worker, n)

    assert sorted(_dead_lettered(bootstrap, topic)) == [
        ((topic, *sources[700]), "non_finite_loss"),
        ((topic, *sources[1400]), "loss_spike"),
    ]
    assert status.records_invalid == 2 and status.records_applied == n - 2
    assert registry.get_sample_value("streamtrainer_rollbacks_total") == 0
    assert worker.learner is not None and worker.learner.lr == 0.01
    assert committed_offsets(bootstrap, topic, group_id) == {0: n}
    assert np.isfinite(status.last_window_loss) and status.last_window_loss < 20.0  # a constant guess: ~1850


def test_a_model_that_keeps_diverging_stops_the_worker_with_a_clear_error(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str
) -> None:
    topic = topic_factory(partitions=1)
    x, y = _raw_scale_stream(n=1000, d=40)  # lr 0.1 and 0.05 both diverge (0.0125 would not)
    _produce(bootstrap, topic, x, y)
    registry = CollectorRegistry()
    settings = _settings(
        bootstrap,
        topic,
        group_id,
        lr=0.1,
        compaction=False,
        max_lr_backoffs=1,
        max_seconds=60.0,
        standardize_target=False,
    )
    worker = Worker(settings, registry=registry)
    with pytest.raises(DivergenceError) as raised:
        worker.run()

    message = str(raised.value)
    assert "\n" not in message and message.startswith("the model kept diverging: ")
    assert "after 1 learning-rate backoff(s) from --lr 0.1 to 0.05" in message
    assert message.endswith("lower --lr (or raise --max-lr-backoffs)")
    # It rolled back before giving up: nothing it learned while diverging was checkpointed or
    # committed, and no record was dead-lettered.
    assert registry.get_sample_value("streamtrainer_rollbacks_total") == 2
    assert CheckpointStore(settings.checkpoint_dir).load_latest() is None
    assert committed_offsets(bootstrap, topic, group_id) == {0: 0}
    assert _dead_lettered(bootstrap, topic) == []


def test_a_divergence_after_a_checkpoint_rolls_back_to_that_checkpoint(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = topic_factory(partitions=1)
    x, y = _small_stream(3000)
    x[1000:] *= 4.0  # unscaled features grow: lr 0.1 was stable, now it diverges
    y = 43.0 + x.sum(axis=1)
    _produce(bootstrap, topic, x, y)
    registry = CollectorRegistry()
    settings = _settings(
        bootstrap,
        topic,
        group_id,
        lr=0.1,
        standardize=False,
        standardize_target=False,
        compaction=False,
        checkpoint_every_records=500,
        poll_batch=250,
        max_seconds=60.0,
    )
    worker = Worker(settings, registry=registry)
    with caplog.at_level("WARNING", logger="streamtrainer.consumer.worker"):
        status = _run_until_applied(worker, 3000)

    assert status.records_invalid == 0 and status.records_applied == 3000
    assert _dead_lettered(bootstrap, topic) == []
    backoffs = [r.getMessage() for r in caplog.records if "the model diverged" in r.getMessage()]
    assert backoffs and all("but not on checkpoint " in message for message in backoffs)
    assert registry.get_sample_value("streamtrainer_rollbacks_total") == len(backoffs)
    assert worker.learner is not None and worker.learner.lr == pytest.approx(0.1 * 0.5 ** len(backoffs))
    assert np.isfinite(status.last_window_loss) and status.last_window_loss < 20.0
    assert committed_offsets(bootstrap, topic, group_id) == {0: 3000}
    # A restarted worker (same --lr) resumes from the last checkpoint with the lowered learning rate.
    restarted = Worker(settings.model_copy(update={"max_seconds": 2.0}), registry=CollectorRegistry())
    restarted.run()
    assert restarted.learner is not None and restarted.learner.lr == pytest.approx(worker.learner.lr)


def test_a_bad_record_is_dead_lettered_once_across_divergence_rollbacks(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str
) -> None:
    """An undecodable record read again after each rollback goes to the dead-letter topic once."""
    topic = topic_factory(partitions=1)
    x, y = _raw_scale_stream()
    records = [
        (json.dumps({"features": x[i].tolist(), "label": float(y[i])}).encode(), None) for i in range(N)
    ]
    records.insert(50, (b"oops", None))
    produce_tracked(bootstrap, topic, records)
    settings = _settings(bootstrap, topic, group_id, model="linear", lr=0.1, compaction=False)
    worker = Worker(settings)
    status = _run_until_applied(worker, N + 1)
    assert worker.metrics.rollbacks._value.get() >= 1  # it diverged and read the bad record again
    assert status.records_applied == N
    assert _dead_lettered(bootstrap, topic) == [((topic, 0, 50), "invalid_json")]


def test_fresh_never_rolls_back_to_the_checkpoints_it_ignores(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str, tmp_path
) -> None:
    """--fresh in a directory holding another topic's model: a divergence goes back to a new model."""
    other, topic = topic_factory(partitions=1), topic_factory(partitions=1)
    xo, yo = _raw_scale_stream(300, seed=7)
    _produce(bootstrap, other, (xo - xo.mean(0)) / xo.std(0), yo - 43.0)
    checkpoints = tmp_path / "c"
    Worker(_settings(bootstrap, other, "others", checkpoint_dir=checkpoints, compaction=False,
                           stop_at_end=True)).run()  # fmt: skip
    x, y = _raw_scale_stream()
    _produce(bootstrap, topic, x, y)
    settings = _settings(
        bootstrap,
        topic,
        group_id,
        model="linear",
        lr=0.1,
        compaction=False,
        fresh=True,
        checkpoint_dir=checkpoints,
    )
    worker = Worker(settings)
    status = _run_until_applied(worker, N)
    assert worker.metrics.rollbacks._value.get() >= 1
    # Everything applied is this topic's: the other topic's checkpoint was never restored.
    assert set(worker.applied) == {(topic, 0)} and status.records_applied == N
    latest = CheckpointStore(checkpoints).load_latest()
    assert latest is not None and latest.metadata["topic"] == topic
    assert latest.metadata["applied"] == {f"{topic}:0": N}
