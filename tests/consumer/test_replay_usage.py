"""Replay and ``--init-from`` as a user meets them (issue 20): a checkpoint of another optimizer starts
a new run with its model, a real mismatch names the differing fields only, a time range on a broker
without time lookups says why, and a failed replay leaves no ``--out`` it created."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from streamtrainer.consumer import Worker
from streamtrainer.consumer.ranges import Bound, RangeError, check_time_answer, parse_bound
from streamtrainer.consumer.replay import ReplayError
from streamtrainer.records import Sample
from streamtrainer.training import LearnerConfig, OnlineLearner
from streamtrainer.training.checkpoint import CheckpointStore
from streamtrainer.training.exceptions import CheckpointError, TrainingError
from tests.helpers import produce, worker_settings
from tests.test_replay import model_tensors, replay, samples

MINUTE_MS = 60_000


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


# -- the learner: what a checkpoint must agree on ----------------------------------------------------


def _trained(config: LearnerConfig) -> OnlineLearner:
    learner = OnlineLearner(config, 4)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(64, 4)).astype(np.float32)
    learner.learn_many(features, (features @ np.array([1, -2, 0.5, 3], dtype=np.float32)).astype(np.float32))
    return learner


def test_a_mismatch_names_the_differing_fields_only() -> None:
    tensors, metadata = _trained(LearnerConfig(model="linear", optimizer="sgd")).state()
    other = OnlineLearner(LearnerConfig(model="mlp", hidden=16, optimizer="sgd"), 3)
    with pytest.raises(TrainingError) as caught:
        other.load_state(tensors, metadata)
    message = str(caught.value)
    assert "model: linear (checkpoint) vs mlp (this run)" in message
    assert "hidden: 128 (checkpoint) vs 16 (this run)" in message
    assert "n_features: 4 (checkpoint) vs 3 (this run)" in message
    for same in ("task", "optimizer", "loss", "standardize"):
        assert f"{same}:" not in message
    assert "{" not in message  # no dictionaries


def test_another_optimizer_takes_the_model_and_starts_the_optimizer_fresh(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = _trained(LearnerConfig(optimizer="sgd", lr=0.01))
    tensors, metadata = source.state()
    only = r"^checkpoint was made for another learner: optimizer: sgd \(checkpoint\) vs adagrad \(this run\)$"
    with pytest.raises(TrainingError, match=only):
        OnlineLearner(LearnerConfig(optimizer="adagrad", lr=0.2), 4).load_state(tensors, metadata)
    learner = OnlineLearner(LearnerConfig(optimizer="adagrad", lr=0.2), 4)
    with caplog.at_level(logging.INFO, logger="streamtrainer.training.learner"):
        learner.load_initial_state(tensors, metadata, "--init-from x: checkpoint 1")
    assert (
        "--init-from x: checkpoint 1 was trained with the sgd optimizer, this run uses adagrad" in caplog.text
    )
    assert "optimizer state starts fresh" in caplog.text
    for name, value in source.model.state_dict().items():
        assert torch.equal(learner.model.state_dict()[name], value)
    assert learner.scaler is not None and source.scaler is not None
    assert learner.scaler.count == source.scaler.count
    assert learner.lr == 0.2
    # Adagrad's own fresh state (its accumulators at their start), not sgd's (which has none).
    assert all(torch.count_nonzero(state["sum"]) == 0 for state in learner.optimizer.state.values())
    # The same optimizer: its state is taken too, and nothing is said.
    caplog.clear()
    same = OnlineLearner(LearnerConfig(optimizer="sgd", lr=0.05), 4)
    with caplog.at_level(logging.INFO, logger="streamtrainer.training.learner"):
        same.load_initial_state(tensors, metadata, "--init-from x: checkpoint 1")
    assert "starts fresh" not in caplog.text
    assert same.lr == 0.05


# -- --init-from through replay and the worker -----------------------------------------------------


def test_replay_init_from_a_checkpoint_of_another_optimizer(
    bootstrap: str, topic_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic = topic_factory(partitions=1)
    produce(bootstrap, topic, samples(400, seed=11))
    first = replay(bootstrap, tmp_path / "a", topic=topic, optimizer="sgd", lr=0.01, holdout=0.0)
    with caplog.at_level(logging.INFO):
        second = replay(
            bootstrap, tmp_path / "b", topic=topic, optimizer="adam", lr=0.001, holdout=0.0, epochs=1,
            init_from=tmp_path / "a" / "checkpoints",
        )  # fmt: skip
    assert second.manifest["init_from"]["version"] == first.checkpoint_version
    assert "was trained with the sgd optimizer, this run uses adam" in caplog.text
    # It started from the first's model: its first epoch is no worse than the first's last.
    assert second.epoch_losses[0] <= first.epoch_losses[-1] * 1.5
    # A model of another shape is refused, naming the fields that differ and no others.
    with pytest.raises(ReplayError) as caught:
        replay(
            bootstrap, tmp_path / "c", topic=topic, model="mlp", task="regression", hidden=8,
            init_from=tmp_path / "a" / "checkpoints",
        )  # fmt: skip
    message = str(caught.value)
    assert "model: linear (checkpoint) vs mlp (this run); hidden: 128 (checkpoint) vs 8 (this run)" in message
    assert "optimizer" not in message and "{" not in message
    assert not (tmp_path / "c").exists()


def test_worker_init_from_a_replay_of_another_optimizer(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic = topic_factory(partitions=1)
    produce(bootstrap, topic, samples(600, seed=12))
    pre = replay(bootstrap, tmp_path / "pre", topic=topic, optimizer="sgd", lr=0.01, holdout=0.0)
    with caplog.at_level(logging.INFO):
        status = Worker(
            worker_settings(
                bootstrap, topic, group_id, optimizer="adagrad", max_records=600, compaction=False,
                init_from=tmp_path / "pre" / "checkpoints", checkpoint_dir=tmp_path / "online",
            )
        ).run()  # fmt: skip
    assert status.records_trained == 600
    assert (
        f"checkpoint {pre.checkpoint_version} was trained with the sgd optimizer, this run uses adagrad"
        in (caplog.text)
    )
    # Another model is still refused, in the fields that differ.
    with pytest.raises(
        CheckpointError, match=r"another learner: model: linear \(checkpoint\) vs mlp \(this run\)$"
    ):
        Worker(
            worker_settings(
                bootstrap, topic, f"{group_id}-mlp", model="mlp", task="regression", compaction=False,
                init_from=tmp_path / "pre" / "checkpoints", checkpoint_dir=tmp_path / "other",
            )
        ).run()  # fmt: skip


# -- time ranges on a broker without time lookups ------------------------------------------------------


def _bound(ms: int) -> Bound:
    return parse_bound(_iso(ms), "from")


def test_a_time_answer_is_checked_against_the_records_around_it() -> None:
    t = 1_700_000_000_000
    # Right answers: the record at the answer is at or after the time, the one before it is before.
    check_time_answer(_bound(t), 0, "s", 100, [(99, t - 1), (100, t)])
    check_time_answer(_bound(t), 0, "s", 0, [(0, t + 5)])
    check_time_answer(_bound(t), 0, "s", -1, [(299, t - 1)])  # none at or after: the last is before
    check_time_answer(_bound(t), 0, "s", 100, [(99, None), (100, None)])  # no timestamps: no verdict
    check_time_answer(_bound(t), 0, "s", 5, [])  # nothing read: no verdict
    # Wrong answers, as the embedded Tansu gives (offset 0 for any time), or none when there is one.
    for answer, records in [(0, [(0, t - MINUTE_MS)]), (100, [(99, t), (100, t + 1)]), (-1, [(299, t)])]:
        with pytest.raises(RangeError) as caught:
            check_time_answer(_bound(t), 3, "s", answer, records)
        message = str(caught.value)
        assert message.startswith(f"partition 3 of 's': the broker did not resolve the timestamp {_iso(t)}")
        assert message.endswith("use offsets (P:O,...)")


def test_a_time_range_on_the_embedded_broker_says_why_and_leaves_no_out(
    bootstrap: str, topic_factory, tmp_path: Path
) -> None:
    """The embedded Tansu answers a time lookup with offset 0: the range would silently be the whole
    log (or "empty"); the answer is checked against the records' own timestamps instead."""
    topic = topic_factory(partitions=1)
    base = int(time.time() * 1000) - 3_600_000
    timed = [
        Sample(s.features, s.label, timestamp_ms=base + (i // 100) * MINUTE_MS)
        for i, s in enumerate(samples(300, seed=13))
    ]
    produce(bootstrap, topic, timed)
    out = tmp_path / "runs" / "by-time"
    with pytest.raises(RangeError) as caught:
        replay(bootstrap, out, topic=topic, **{"from_": _iso(base + 30_000), "to": _iso(base + 90_000)})
    message = str(caught.value)
    assert "the broker did not resolve the timestamp" in message
    assert "use offsets" in message
    assert "empty" not in message
    # Neither --out nor the folder above it, which the replay created, is left behind.
    assert not (tmp_path / "runs").exists()


def test_a_failed_replay_leaves_an_out_that_existed_as_it_was(
    bootstrap: str, topic_factory, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=1)  # empty: the replay fails ("holds no records")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    with pytest.raises(RangeError, match="holds no records"):
        replay(bootstrap, out, topic=topic)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(RangeError, match="holds no records"):
        replay(bootstrap, tmp_path / "new", topic=topic)
    assert not (tmp_path / "new").exists()


def test_a_successful_replay_keeps_its_out(bootstrap: str, topic_factory, tmp_path: Path) -> None:
    topic = topic_factory(partitions=1)
    produce(bootstrap, topic, samples(100, seed=14))
    result = replay(bootstrap, tmp_path / "ok" / "run", topic=topic)
    assert result.manifest_path.exists()
    assert model_tensors(tmp_path / "ok" / "run")
    assert CheckpointStore(tmp_path / "ok" / "run" / "checkpoints").load_latest() is not None


def test_a_time_range_before_every_record_is_empty_and_says_so(
    bootstrap: str, topic_factory, tmp_path: Path
) -> None:
    """A right answer is not refused: every record is newer than the range, on any broker."""
    topic = topic_factory(partitions=1)
    produce(bootstrap, topic, samples(50, seed=15))
    with pytest.raises(RangeError) as caught:
        replay(
            bootstrap, tmp_path / "old", topic=topic, **{"from_": "2024-05-01T00:00:00Z", "to": "2024-05-02"}
        )
    message = str(caught.value)
    assert "is empty" in message and "no record's timestamp is in that time" in message
    assert "did not resolve" not in message
    assert not (tmp_path / "old").exists()
