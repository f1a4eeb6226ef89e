"""Compaction inside the worker, against the real broker: triggers, checkpoints, group stability."""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from streamtrainer.consumer.worker import Worker
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.training.checkpoint import CheckpointStore
from tests.helpers import committed_offsets, produce, worker_settings


def _compactions(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("streamtrainer_compactions_total", {"reason": reason}) or 0.0


def test_compaction_fires_every_n_records_and_is_checkpointed(bootstrap, topic_factory, group_id) -> None:
    topic = topic_factory(partitions=2)
    n = 5000
    produce(bootstrap, topic, generate(SyntheticSpec(task="binary", n_features=4, seed=5), n))
    registry = CollectorRegistry()
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="logistic",
        max_records=n,
        poll_batch=100,  # the trigger is checked per poll: small polls make the counts exact
        compaction_every_records=1000,
        compaction_window=800,
        compaction_epochs=2,
        compaction_batch_size=32,
    )
    status = Worker(settings, registry=registry).run()

    assert status.records_trained == n
    assert status.compactions == 5
    assert _compactions(registry, "records") == 5
    assert registry.get_sample_value("streamtrainer_compaction_records") == 800
    assert registry.get_sample_value("streamtrainer_compaction_duration_seconds_count") == 5
    epoch_loss = registry.get_sample_value("streamtrainer_compaction_epoch_loss")
    assert epoch_loss is not None and 0 < epoch_loss < 0.7
    # Compaction never counts as applying a record: offsets and applied counts are the online ones.
    assert status.records_applied == n
    assert sum(committed_offsets(bootstrap, topic, group_id).values()) == n
    checkpoint = CheckpointStore(settings.checkpoint_dir).load_latest()
    assert checkpoint is not None
    # The shutdown checkpoint is the first (every 10,000 records / 30 s): it records all five.
    compaction = checkpoint.metadata["compaction"]
    assert compaction["total"] == compaction["since_previous_checkpoint"] == 5
    assert compaction["records"] == 5 * 800
    last = compaction["last"]
    assert last["number"] == 5 and last["records"] == 800 and len(last["epoch_losses"]) == 2
    assert set(last["ranges"]) <= {f"{topic}:0", f"{topic}:1"}
    assert sum(high - low + 1 for low, high in last["ranges"].values()) == 800
    # Together the five windows reach from the first's oldest record to the newest of each partition.
    covered = compaction["ranges"]
    assert set(last["ranges"]) <= set(covered)
    for name, (low, high) in last["ranges"].items():
        assert covered[name][0] <= low and high == covered[name][1]
    assert 800 < sum(high - low + 1 for low, high in covered.values()) <= n - 200


def test_compaction_on_request_over_http(bootstrap, topic_factory, group_id) -> None:
    topic = topic_factory(partitions=1)
    produce(bootstrap, topic, generate(SyntheticSpec(task="regression", n_features=3, seed=2), 1500))
    registry = CollectorRegistry()
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="linear",
        metrics_port=0,
        max_seconds=60.0,
        compaction_every_records=None,
        admin_endpoints=True,  # POST /compact is off by default
    )
    worker = Worker(settings, registry=registry)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 45
        while worker.records_trained < 1500 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.records_trained == 1500
        assert _compactions(registry, "http") == 0
        port = worker.metrics_server.port
        request = urllib.request.Request(f"http://127.0.0.1:{port}/compact", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
            assert b"compaction requested" in response.read()
        while _compactions(registry, "http") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _compactions(registry, "http") == 1
        assert _compactions(registry, "records") == 0
        # GET still serves the metrics, and a GET of the action is refused.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read()
        assert b"streamtrainer_compactions_total" in body
        # A regressor: an MAE (whole run and window), never an accuracy.
        assert b'\nstreamtrainer_prequential_mae{scope="run"} ' in body
        assert b'\nstreamtrainer_prequential_mae{scope="window"} ' in body
        assert b"streamtrainer_prequential_accuracy" not in body
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/compact", timeout=10)
        assert refused.value.code == 405
    finally:
        worker.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()


def test_an_epoch_longer_than_max_poll_interval_keeps_the_group(
    bootstrap, topic_factory, group_id, caplog: pytest.LogCaptureFixture
) -> None:
    topic = topic_factory(partitions=2)
    n = 4000
    produce(bootstrap, topic, generate(SyntheticSpec(task="regression", n_features=4, seed=9), n))
    registry = CollectorRegistry()
    max_poll_interval_s = 6.0
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="tests.custom_model:make_slow_model",  # 5 ms per mini-batch forward pass
        task="regression",
        max_records=n,
        poll_batch=500,
        kafka_config={"max.poll.interval.ms": str(int(max_poll_interval_s * 1000))},
        compaction_every_records=2000,
        compaction_window=2000,
        compaction_epochs=4,
        compaction_batch_size=4,  # 4 epochs x 500 batches x 5 ms: about 10 s per compaction
        fused=False,  # its forward's sleep is Python: a compiled step graph would leave it out
    )
    caplog.set_level(logging.INFO, logger="streamtrainer")
    status = Worker(settings, registry=registry).run()

    durations = registry.get_sample_value("streamtrainer_compaction_duration_seconds_sum")
    assert status.compactions == 2
    assert durations is not None and durations / 2 > max_poll_interval_s
    # Never left the group: no revocation, no loss, no rollback, nothing applied twice or skipped.
    assert registry.get_sample_value("streamtrainer_rollbacks_total") == 0
    messages = [record.getMessage() for record in caplog.records]
    exceeded = [m for m in messages if "poll interval" in m.lower() and "exceeded" in m.lower()]
    assert not exceeded and not [m for m in messages if m.startswith("lost")], messages
    assert len([m for m in messages if m.startswith("assigned")]) == 1
    # The one revocation is the clean exit's (closing the consumer), after both compactions.
    revocations = [i for i, m in enumerate(messages) if m.startswith("revoked")]
    last_compaction = max(i for i, m in enumerate(messages) if m.startswith("compaction 2 "))
    assert len(revocations) == 1 and revocations[0] > last_compaction, messages
    assert status.records_trained == status.records_applied == n
    assert sum(committed_offsets(bootstrap, topic, group_id).values()) == n


def test_worker_starts_from_another_runs_checkpoint(
    bootstrap, topic_factory, group_id, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=1)
    produce(bootstrap, topic, generate(SyntheticSpec(task="binary", n_features=4, seed=1), 2000))
    # Without compaction the optimizer steps are exactly one per record (checked below).
    source = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="logistic",
        max_records=1500,
        checkpoint_dir=tmp_path / "pre",
        compaction=False,
    )
    pre = Worker(source).run()
    assert pre.records_applied == 1500

    # A new group and directory, initialised from the first run's model: it trains on from there.
    settings = worker_settings(
        bootstrap,
        topic,
        group_id + "-online",
        model="logistic",
        max_records=2000,
        checkpoint_dir=tmp_path / "online",
        init_from=tmp_path / "pre",
        compaction=False,
    )
    status = Worker(settings).run()
    assert status.records_applied == 2000  # its own count: the source's records are not its offsets
    assert status.updates == pre.updates + 2000
    # Both read the same records from offset 0; the pre-trained model does better from the start.
    assert status.first_window_loss < 0.9 * pre.first_window_loss

    with pytest.raises(Exception, match="checkpoint was made for"):
        Worker(
            worker_settings(
                bootstrap,
                topic,
                group_id + "-mlp",
                model="mlp",
                task="binary",
                max_records=10,
                checkpoint_dir=tmp_path / "mlp",
                init_from=tmp_path / "pre",
            )
        ).run()


def test_compaction_lowers_the_prequential_loss_on_a_drifting_stream(
    bootstrap, topic_factory, group_id
) -> None:
    topic = topic_factory(partitions=1)
    n = 40000
    # A model that online SGD fits slowly (an mlp on a nonlinear concept): what compaction is for.
    spec = SyntheticSpec(
        task="regression", n_features=8, nonlinear=True, noise=0.02, seed=0, drift="abrupt", drift_at=n // 2
    )
    produce(bootstrap, topic, generate(spec, n), codec="binary")
    results = {}
    for compaction in (False, True):
        settings = worker_settings(
            bootstrap,
            topic,
            f"{group_id}-{compaction}",
            model="mlp",
            task="regression",
            hidden=32,
            lr=0.01,
            max_records=n,
            compaction=compaction,
            compaction_every_records=2000,
            compaction_window=2000,
            compaction_epochs=3,
            compaction_batch_size=8,
            compaction_lr=0.08,  # the online lr x the batch size
        )
        results[compaction] = Worker(settings).run()
    without, with_ = results[False], results[True]
    print(
        f"\nmean prequential loss over {n} records: without compaction {without.mean_loss:.4f}, "
        f"with {with_.mean_loss:.4f}; last window {without.last_window_loss:.4f} vs "
        f"{with_.last_window_loss:.4f}"
    )
    assert with_.records_trained == without.records_trained == n
    assert with_.compactions >= n // 2000 - 1
    assert with_.mean_loss < 0.9 * without.mean_loss


def test_compaction_can_keep_only_the_last_record_per_key(bootstrap, topic_factory, group_id) -> None:
    topic = topic_factory(partitions=1)
    spec = SyntheticSpec(task="regression", n_features=3, seed=4, n_keys=50)  # key entity-{i % 50}
    produce(bootstrap, topic, generate(spec, 2000))
    registry = CollectorRegistry()
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        max_records=2000,
        poll_batch=100,
        compaction_every_records=1000,
        compaction_window=1000,
        compaction_dedupe=True,
    )
    status = Worker(settings, registry=registry).run()
    assert status.compactions == 2
    # 1,000 records of 50 keys: the epochs train on the newest record of each key.
    assert registry.get_sample_value("streamtrainer_compaction_records") == 50
