"""Refilling the compaction store from the log: the same rows, in the same order, as before the restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import KafkaError, Message, Producer
from prometheus_client import CollectorRegistry

from streamtrainer.consumer.compactor import Compactor
from streamtrainer.consumer.refill import WindowPlan
from streamtrainer.metrics import WorkerMetrics
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.records import BatchDecoder, encode_binary
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import LearnerConfig, OnlineLearner
from tests.helpers import worker_settings

KEYS = 150  # record i has key k<i % KEYS>: windows of 500 hold duplicates


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> list[tuple[int, int]]:
    """Record i (key k<i % KEYS>) to partition i % 2; each one's (partition, offset)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20})
    where: dict[int, tuple[int, int]] = {}
    for i, value in enumerate(values):

        def report(error: KafkaError | None, message: Message, i: int = i) -> None:
            assert error is None, error
            where[i] = (message.partition() or 0, message.offset() or 0)

        producer.produce(topic, key=f"k{i % KEYS}".encode(), value=value, partition=i % 2, on_delivery=report)
    assert producer.flush(30) == 0 and len(where) == len(values)
    return [where[i] for i in range(len(values))]


def _plan(rows: list[tuple[int, int]], max_runs: int = 100) -> WindowPlan:
    partitions = np.array([p for p, _ in rows], dtype=np.int32)
    offsets = np.array([o for _, o in rows], dtype=np.int64)
    return WindowPlan.of(partitions, offsets, max_runs=max_runs)


def test_a_plan_is_runs_of_consecutive_offsets_in_arrival_order() -> None:
    rows = [(0, 5), (0, 6), (0, 7), (1, 40), (1, 41), (0, 8), (0, 10), (0, 11), (1, 43)]
    plan = _plan(rows)
    assert plan.exact
    assert plan.runs == ((0, 5, 7), (1, 40, 41), (0, 8, 8), (0, 10, 11), (1, 43, 43))
    assert plan.records == len(rows)
    assert plan.spans() == {0: (5, 11), 1: (40, 43)}
    assert plan.before({0: 11}).runs == ((0, 5, 7), (0, 8, 8), (0, 10, 10))
    assert plan.before({1: 100}).runs == ((1, 40, 41), (1, 43, 43))
    assert plan.before({}).runs == ()
    assert WindowPlan.from_json(plan.as_json()) == plan
    assert _plan([]).runs == ()


def test_too_many_runs_keep_each_partitions_span() -> None:
    rows = [(i % 2, 100 * (i % 2) + i) for i in range(10)]  # alternating partitions: 10 runs
    plan = _plan(rows, max_runs=4)
    assert not plan.exact
    assert plan.runs == ((0, 0, 8), (1, 101, 109))
    assert WindowPlan.from_json(plan.as_json()) == plan


@pytest.mark.parametrize("document", [None, 3, {}, {"runs": 1}, {"runs": [[1, 2]]}, {"runs": [["a", 1, 2]]}])
def test_a_plan_that_is_not_one_reads_as_none(document: object) -> None:
    assert WindowPlan.from_json(document) is None


def _compactor(settings: WorkerSettings, directory: Path) -> Compactor:
    settings = settings.model_copy(update={"compaction_dir": directory})
    return Compactor(settings, WorkerMetrics(CollectorRegistry()))


@pytest.mark.parametrize("since_previous", [False, True], ids=["last-window", "since-previous"])
def test_a_restored_compactor_refills_the_same_windows_from_the_log(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str, tmp_path: Path, since_previous: bool
) -> None:
    # Two partitions, keyed records (the windows deduplicate by key), a few undecodable ones.
    n, d = 1200, 4
    topic = topic_factory(partitions=2)
    samples = list(generate(SyntheticSpec(task="regression", n_features=d, seed=4), n))
    values = [b"junk" if i % 97 == 5 else encode_binary(s) for i, s in enumerate(samples)]
    where = _produce(bootstrap, topic, values)
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        compaction_every_records=300,
        compaction_window=500,
        compaction_since_previous=since_previous,
        compaction_dedupe=True,
    )
    learner = OnlineLearner(LearnerConfig(model="linear", task="regression"), d)
    decoder = BatchDecoder(n_features=d)
    refused = {7, 8, 300}  # as if a training guard refused them: not trained, not kept

    # What the worker kept: the trainable records, in an interleaved arrival order (runs of each
    # partition as polls return them), compacted once on the way.
    order = sorted(range(n), key=lambda i: (i // 50, where[i][0], i))
    kept = [i for i in order if values[i] != b"junk" and i not in refused]
    with _compactor(settings, tmp_path / "before") as before:
        for chunk_start in range(0, len(kept), 100):
            chunk = kept[chunk_start : chunk_start + 100]
            batch = decoder.decode([values[i] for i in chunk])
            before.keep(
                batch.features,
                batch.labels,
                np.array([where[i][0] for i in chunk], dtype=np.int32),
                np.array([where[i][1] for i in chunk], dtype=np.int64),
                [f"k{i % KEYS}".encode() for i in chunk],
                None,
                np.zeros(len(chunk)),
            )
            if chunk_start == 400:
                assert before.run(learner, "records", loss_before=0.0) is not None
        metadata = before.checkpoint_metadata(topic)
        before.checkpointed()
        assert metadata["total"] == 1
        state = metadata["state"]
        assert isinstance(state, dict) and state["records_since_compaction"] == len(kept) - 500
        assert state["window"]["exact"]
        expected = before.store.window(  # type: ignore[union-attr]
            since=before._since if since_previous else None,
            last=None if since_previous else settings.compaction_window,
            dedupe_by_key=True,
        )

        positions = {p: max(o for q, o in where if q == p) + 1 for p in (0, 1)}
        with _compactor(settings, tmp_path / "after") as after:
            after.restore(metadata)
            assert after.count == 1 and after.trigger.records_since_compaction == len(kept) - 500
            refilled = after.refill(positions, decoder, learner)
            got = after.store.window(  # type: ignore[union-attr]
                since=after._since if since_previous else None,
                last=None if since_previous else settings.compaction_window,
                dedupe_by_key=True,
            )
        assert refilled == WindowPlan.from_json(state["window"]).records  # type: ignore[union-attr]
    assert expected.count > 0 and expected.dropped_duplicates > 0
    assert got.partitions.tolist() == expected.partitions.tolist()
    assert got.offsets.tolist() == expected.offsets.tolist()
    assert got.dropped_duplicates == expected.dropped_duplicates
    np.testing.assert_array_equal(got.features, expected.features)
    np.testing.assert_array_equal(got.labels, expected.labels)


def test_a_checkpoint_without_compaction_state_starts_empty(tmp_path: Path) -> None:
    settings = worker_settings("127.0.0.1:1", "t", "g")
    learner = OnlineLearner(LearnerConfig(model="linear", task="regression"), 2)
    with _compactor(settings, tmp_path / "c") as compactor:
        compactor.count = 9
        compactor.trigger.observe(5)
        compactor.restore({"total": 4})  # written before the state was recorded
        assert compactor.count == 4 and compactor.trigger.records_since_compaction == 0
        assert compactor.refill({0: 100}, BatchDecoder(n_features=2), learner) == 0
        compactor.restore(None)
        assert compactor.count == 0
        metadata = compactor.checkpoint_metadata("t")
        assert metadata["total"] == 0 and metadata["since_previous_checkpoint"] == 0
        assert metadata["state"] == {
            "records_since_compaction": 0,
            "since": {},
            "window": {"runs": [], "exact": True},
        }
