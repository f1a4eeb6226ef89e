"""Mistakes stop loudly; a stray record never fixes the schema; bounded runs (issue: no silent loss).

Every case runs through the broker. Figures of the issue's "before" are in the comments.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from streamtrainer.consumer import Worker
from streamtrainer.consumer.dead_letter import read_dead_letters
from streamtrainer.consumer.error_budget import ErrorBudgetExceeded
from streamtrainer.consumer.replay import run_replay
from streamtrainer.exceptions import ConfigurationError
from streamtrainer.producer.synthetic import SyntheticSpec, generate, generate_arrays
from streamtrainer.records import encode_binary_rows
from streamtrainer.settings import KafkaSettings, ReplaySettings
from streamtrainer.training.checkpoint import CheckpointStore
from tests.helpers import committed_offsets, produce, produce_tracked, worker_settings
from tests.test_cli import run_cli

pytestmark = pytest.mark.integration


def _stray_record_topic(bootstrap: str, topic: str, before: int = 50, after: int = 450) -> None:
    """``before`` binary 8-feature records, one 3-feature JSON record, then ``after`` binary ones."""
    features, labels = generate_arrays(SyntheticSpec(n_features=8, seed=3), before + after)
    binary = encode_binary_rows(features, labels)
    stray = orjson.dumps({"features": [1.0, 2.0, 3.0], "label": 0.5})
    values = [*binary[:before], stray, *binary[before:]]
    produce_tracked(bootstrap, topic, [(value, None) for value in values])


def test_a_stray_record_does_not_fix_the_feature_count(bootstrap: str, topic_factory, group_id: str) -> None:
    # Before: "model linear (regression, 3 features)", trained 1, 500 invalid, exit 0.
    topic = topic_factory(partitions=1)
    _stray_record_topic(bootstrap, topic)
    registry = CollectorRegistry()
    worker = Worker(worker_settings(bootstrap, topic, group_id, stop_at_end=True), registry=registry)
    status = worker.run()
    assert worker.learner is not None and worker.learner.n_features == 8
    assert (status.records_trained, status.records_invalid) == (500, 1)
    assert (
        registry.get_sample_value(
            "streamtrainer_records_invalid_total", {"topic": topic, "reason": "wrong_feature_count"}
        )
        == 1
    )
    assert committed_offsets(bootstrap, topic, group_id) == {0: 501}


def test_the_first_record_in_partition_offset_order_fixes_the_schema(
    bootstrap: str, topic_factory, group_id: str
) -> None:
    # Partition 0 starts with an 8-feature record, partition 1 with a 3-feature one: however the
    # first poll interleaves them, the schema is partition 0's first record's.
    topic = topic_factory(partitions=2)
    features, labels = generate_arrays(SyntheticSpec(n_features=8, seed=5), 400)
    small, small_labels = generate_arrays(SyntheticSpec(n_features=3, seed=6), 5)
    eight = encode_binary_rows(features, labels)
    three = encode_binary_rows(small, small_labels)
    # Record i goes to partition i % 2: partition 1 gets the 3-feature records first.
    values: list[bytes] = []
    for i in range(400):
        values += [eight[i], three[i] if i < 5 else eight[i]]
    produce_tracked(bootstrap, topic, [(value, None) for value in values], partitions=2)
    worker = Worker(worker_settings(bootstrap, topic, group_id, stop_at_end=True, fresh=True))
    status = worker.run()
    assert worker.learner is not None and worker.learner.n_features == 8
    assert (status.records_trained, status.records_invalid) == (795, 5)


def test_replay_takes_the_schema_from_the_first_record(bootstrap: str, topic_factory, tmp_path: Path) -> None:
    # Before: "replayed 5 record(s) (3003 invalid)", exit 0, a checkpoint written.
    topic = topic_factory(partitions=1)
    _stray_record_topic(bootstrap, topic, before=50, after=2950)
    result = run_replay(
        ReplaySettings(bootstrap_servers=bootstrap, topic=topic, out=tmp_path / "out", epochs=1, holdout=0.0)
    )
    assert (result.records, result.invalid) == (3000, 1)


def test_replay_of_a_mostly_invalid_range_fails_without_a_checkpoint(
    bootstrap: str, topic_factory, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=1)
    good = [(value, None) for value in encode_binary_rows(*generate_arrays(SyntheticSpec(seed=1), 300))]
    bad = [(b"not json", None)] * 200
    produce_tracked(bootstrap, topic, good + bad)
    out = tmp_path / "out"
    with pytest.raises(ErrorBudgetExceeded, match="200 of the 500"):
        run_replay(ReplaySettings(bootstrap_servers=bootstrap, topic=topic, out=out, epochs=1))
    assert CheckpointStore(out / "checkpoints").load_latest() is None


def _checkpointed_worker(bootstrap: str, topic: str, group: str, checkpoints: Path) -> None:
    produce(bootstrap, topic, generate(SyntheticSpec(n_features=16, seed=2), 300))
    Worker(worker_settings(bootstrap, topic, group, checkpoint_dir=checkpoints, stop_at_end=True)).run()
    assert CheckpointStore(checkpoints).load_latest() is not None


def test_a_checkpoint_of_another_topic_or_group_is_refused_before_connecting(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    # Before: the worker on topic "live" resumed the 16-feature model of "samples", dead-lettered
    # all 4,200 records of "live" as wrong_feature_count, committed, exit 0.
    samples = topic_factory(partitions=1)
    checkpoints = tmp_path / "checkpoints"
    _checkpointed_worker(bootstrap, samples, group_id, checkpoints)
    nowhere = "127.0.0.1:1"  # refused before any connection: no broker is asked
    for topic, group in [("live", group_id), (samples, "trainers")]:
        # A ConfigurationError, not BrokerUnavailableError: nothing tried to connect.
        with pytest.raises(ConfigurationError, match=f"holds the model of topic '{samples}'"):
            Worker(worker_settings(nowhere, topic, group, checkpoint_dir=checkpoints)).run()
    # The command line: one line, exit 2.
    result = run_cli(
        "worker", "--bootstrap-servers", nowhere, "--topic", "live", "--group", group_id,
        "--checkpoint-dir", str(checkpoints), "--metrics-port", "-1",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--init-from" in lines[0] and repr(samples) in lines[0], result.stderr
    # A conflicting schema flag is refused too.
    with pytest.raises(ConfigurationError, match="16 features, not --n-features 4"):
        Worker(worker_settings(nowhere, samples, group_id, checkpoint_dir=checkpoints, n_features=4)).run()


def test_init_from_takes_a_model_across_on_purpose(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    samples, live = topic_factory(partitions=1), topic_factory(partitions=1)
    checkpoints = tmp_path / "samples"
    _checkpointed_worker(bootstrap, samples, group_id, checkpoints)
    produce(bootstrap, live, generate(SyntheticSpec(n_features=16, seed=9), 200))
    status = Worker(
        worker_settings(
            bootstrap, live, "trainers", checkpoint_dir=tmp_path / "live", init_from=checkpoints,
            stop_at_end=True,
        )
    ).run()  # fmt: skip
    assert (status.records_trained, status.records_invalid) == (200, 0)
    latest = CheckpointStore(tmp_path / "live").load_latest()
    assert latest is not None and (latest.metadata["topic"], latest.metadata["group"]) == (live, "trainers")


def test_a_topic_of_invalid_records_stops_the_worker_and_commits_nothing(
    bootstrap: str, topic_factory, group_id: str
) -> None:
    # Before: every record dead-lettered, all committed, exit 0.
    topic = topic_factory(partitions=1)
    produce_tracked(bootstrap, topic, [(b'{"features": "no", "label": 1}', None)] * 4200)
    registry = CollectorRegistry()
    worker = Worker(worker_settings(bootstrap, topic, group_id, stop_at_end=True), registry=registry)
    with pytest.raises(ErrorBudgetExceeded, match="error budget spent"):
        worker.run()
    assert committed_offsets(bootstrap, topic, group_id) == {0: 0}
    # It stopped within its first window: a fraction of the topic was dead-lettered, not all of it.
    assert worker.records_invalid <= 1000
    assert registry.get_sample_value("streamtrainer_error_budget_exhausted") == 1


def test_a_wrong_class_count_stops_the_worker(bootstrap: str, topic_factory, group_id: str) -> None:
    # Before: --n-classes 3 on a 5-class topic: 40% dead-lettered as label_out_of_range, exit 0.
    topic = topic_factory(partitions=1)
    produce(bootstrap, topic, generate(SyntheticSpec(task="multiclass", n_classes=5, seed=1), 3000))
    worker = Worker(
        worker_settings(bootstrap, topic, group_id, model="softmax", n_classes=3, stop_at_end=True)
    )
    with pytest.raises(ErrorBudgetExceeded, match="label_out_of_range"):
        worker.run()
    assert committed_offsets(bootstrap, topic, group_id) == {0: 0}
    assert worker.records_consumed < 3000


def test_stray_bad_records_within_the_budget_train_on(bootstrap: str, topic_factory, group_id: str) -> None:
    topic = topic_factory(partitions=1)
    good = encode_binary_rows(*generate_arrays(SyntheticSpec(seed=4), 2000))
    values = [(b"oops" if i % 100 == 99 else value, None) for i, value in enumerate(good)]  # 1% bad
    produce_tracked(bootstrap, topic, values)
    status = Worker(worker_settings(bootstrap, topic, group_id, stop_at_end=True)).run()
    assert (status.records_trained, status.records_invalid) == (1980, 20)
    assert committed_offsets(bootstrap, topic, group_id) == {0: 2000}


def test_errors_tolerance_all_never_stops(bootstrap: str, topic_factory, group_id: str) -> None:
    topic = topic_factory(partitions=1)
    produce_tracked(bootstrap, topic, [(b"oops", None)] * 500)
    settings = worker_settings(bootstrap, topic, group_id, stop_at_end=True, errors_tolerance="all")
    status = Worker(settings).run()
    assert (status.records_trained, status.records_invalid) == (0, 500)
    assert committed_offsets(bootstrap, topic, group_id) == {0: 500}


def test_errors_tolerance_none_stops_at_the_first(bootstrap: str, topic_factory, group_id: str) -> None:
    topic = topic_factory(partitions=1)
    good = encode_binary_rows(*generate_arrays(SyntheticSpec(seed=4), 300))
    produce_tracked(
        bootstrap,
        topic,
        [(v, None) for v in good[:200]] + [(b"oops", None)] + [(v, None) for v in good[200:]],
    )
    settings = worker_settings(bootstrap, topic, group_id, stop_at_end=True, errors_tolerance="none")
    with pytest.raises(ErrorBudgetExceeded, match="errors-tolerance none"):
        Worker(settings).run()


def test_the_budget_stop_exits_3_with_one_line(
    bootstrap: str, topic_factory, group_id: str, tmp_path
) -> None:
    topic = topic_factory(partitions=1)
    produce_tracked(bootstrap, topic, [(b"oops", None)] * 300)
    result = run_cli(
        "worker", "--bootstrap-servers", bootstrap, "--topic", topic, "--group", group_id,
        "--checkpoint-dir", str(tmp_path / "c"), "--metrics-port", "-1", "--session-timeout-ms", "6000",
        "--log-level", "error", "--stop-at-end",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("streamtrainer: error:")]
    assert len(lines) == 1 and "error budget spent" in lines[0]
    assert committed_offsets(bootstrap, topic, group_id) == {0: 0}


def test_max_records_counts_consumed_records(bootstrap: str, topic_factory, group_id: str) -> None:
    # Before: --max-records counted trained records only; with dead letters the run overshot it.
    topic = topic_factory(partitions=1)
    good = encode_binary_rows(*generate_arrays(SyntheticSpec(seed=4), 1000))
    values = [(b"oops" if i % 20 == 0 else value, None) for i, value in enumerate(good)]  # 5% bad
    produce_tracked(bootstrap, topic, values)
    status = Worker(worker_settings(bootstrap, topic, group_id, max_records=500)).run()
    assert status.records_consumed == 500
    assert (status.records_trained, status.records_invalid) == (475, 25)
    assert committed_offsets(bootstrap, topic, group_id) == {0: 500}


def test_stop_at_end_is_a_bounded_run(bootstrap: str, topic_factory, group_id: str) -> None:
    # Before: nothing stopped a worker at the end of the data (it ran to --max-seconds).
    topic = topic_factory(partitions=3)
    produce(bootstrap, topic, generate(SyntheticSpec(seed=7), 3000), codec="binary")
    # max_seconds far beyond what the run needs: stopping at the end is what ends it (it did not before).
    status = Worker(worker_settings(bootstrap, topic, group_id, stop_at_end=True, max_seconds=600)).run()
    assert status.records_trained == 3000
    assert status.elapsed_s < 600
    assert sum(committed_offsets(bootstrap, topic, group_id).values()) == 3000
    # A second bounded run finds nothing new and ends at once.
    again = Worker(worker_settings(bootstrap, topic, group_id, stop_at_end=True, max_seconds=600)).run()
    assert again.records_consumed == 0


def test_the_budget_window_survives_a_checkpoint_and_restart(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    """The window's state is in the checkpoint: the restarted worker trips at the same record."""
    topic = topic_factory(partitions=1)
    good = encode_binary_rows(*generate_arrays(SyntheticSpec(seed=4), 900))
    # 900 good, 80 bad (8%: within the budget), the checkpoint, then 30 bad.
    values = [(value, None) for value in good] + [(b"oops", None)] * 110
    produce_tracked(bootstrap, topic, values)
    checkpoints = tmp_path / "c"
    first = Worker(worker_settings(bootstrap, topic, group_id, checkpoint_dir=checkpoints, max_records=980))
    first.run()
    assert first.records_invalid == 80 and committed_offsets(bootstrap, topic, group_id) == {0: 980}
    # 80 + 21 > 10% of 1000 only if the first 80 are remembered (30 records alone are too few to judge).
    second = Worker(worker_settings(bootstrap, topic, group_id, checkpoint_dir=checkpoints, stop_at_end=True))
    with pytest.raises(ErrorBudgetExceeded, match="101 of the last 1000"):
        second.run()
    assert committed_offsets(bootstrap, topic, group_id) == {0: 980}
    # Restarted again, it stops at the same record and sends none of the 21 again.
    third = Worker(worker_settings(bootstrap, topic, group_id, checkpoint_dir=checkpoints, stop_at_end=True))
    with pytest.raises(ErrorBudgetExceeded, match="101 of the last 1000"):
        third.run()
    _assert_dead_lettered_once(bootstrap, topic, 101)


def _assert_dead_lettered_once(bootstrap: str, topic: str, count: int) -> None:
    letters = [
        letter.source
        for letter in read_dead_letters(KafkaSettings(bootstrap_servers=bootstrap), f"{topic}.dlq")
        if not letter.is_marker
    ]
    assert len(letters) == len(set(letters)) == count


def test_a_restart_after_a_budget_stop_sends_no_dead_letter_twice(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=1)
    good = encode_binary_rows(*generate_arrays(SyntheticSpec(seed=4), 300))
    produce_tracked(bootstrap, topic, [(value, None) for value in good] + [(b"oops", None)] * 500)
    for _ in range(2):  # stopped before its first checkpoint, twice
        worker = Worker(
            worker_settings(bootstrap, topic, group_id, checkpoint_dir=tmp_path, stop_at_end=True)
        )
        with pytest.raises(ErrorBudgetExceeded, match="34 of the last 334"):
            worker.run()
    assert committed_offsets(bootstrap, topic, group_id) == {0: 0}
    _assert_dead_lettered_once(bootstrap, topic, 34)
