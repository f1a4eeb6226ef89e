"""The metrics port: /metrics, /healthz, /ready, 404 elsewhere, admin actions only when enabled;
and gauges that are absent until they have a value (issue #20, "Metrics and health")."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from datetime import datetime

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamtrainer.consumer import Worker
from streamtrainer.metrics import MetricsServer, WorkerMetrics
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from tests.helpers import produce, worker_settings

MEASUREMENTS = (
    "streamtrainer_prequential_loss",
    "streamtrainer_prequential_accuracy",
    "streamtrainer_prequential_mae",
    "streamtrainer_prequential_roc_auc",
    "streamtrainer_prequential_macro_f1",
    "streamtrainer_prequential_rmse",
    "streamtrainer_prequential_r2",
    "streamtrainer_last_trained_timestamp_seconds",
    "streamtrainer_last_checkpoint_timestamp_seconds",
    "streamtrainer_learning_rate",
    "streamtrainer_compaction_records",
    "streamtrainer_compaction_epoch_loss",
)


def _get(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _names(body: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(body) for s in family.samples}


def test_a_fresh_worker_exports_no_measurement_until_it_has_one() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    for name in MEASUREMENTS:
        assert registry.get_sample_value(name) is None, name  # absent, not a made-up 0
    assert registry.get_sample_value("streamtrainer_records_trained_total") is None  # labelled
    assert registry.get_sample_value("streamtrainer_model_updates_total") == 0  # a real zero
    metrics.learning_rate.set(0.0)
    assert registry.get_sample_value("streamtrainer_learning_rate") == 0.0  # a real zero now
    metrics.learning_rate.set(0.75)  # set again: the same series, not registered twice
    assert registry.get_sample_value("streamtrainer_learning_rate") == 0.75


def test_the_server_answers_its_paths_and_404_elsewhere() -> None:
    registry = CollectorRegistry()
    WorkerMetrics(registry).model_updates.inc()
    calls: list[str] = []
    ready = [False]

    def compact() -> str:
        calls.append("compact")
        return "compaction requested"

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    with MetricsServer(
        registry,
        host="127.0.0.1",
        port=0,
        actions={"/compact": compact},
        readiness=lambda: (ready[0], "ready" if ready[0] else "no partitions assigned"),
    ) as server:
        base = f"http://127.0.0.1:{server.port}"
        status, body = _get(f"{base}/metrics")
        assert status == 200 and "streamtrainer_model_updates_total 1.0" in body
        assert _get(f"{base}/healthz") == (200, "ok\n")
        assert _get(f"{base}/ready") == (503, "no partitions assigned\n")
        ready[0] = True
        assert _get(f"{base}/ready") == (200, "ready\n")
        for path in ("/", "/metricsx", "/favicon.ico", "/healthz/x"):
            assert _get(f"{base}{path}")[0] == 404, path
        assert _get(f"{base}/metrics", "POST")[0] == 405
        assert _get(f"{base}/compact")[0] == 405 and not calls
        assert _get(f"{base}/compact", "POST") == (202, "compaction requested\n")
        assert calls == ["compact"]
    # No actions: the path is unknown; a probe that raises is "not healthy", not a 500.
    with MetricsServer(registry, host="127.0.0.1", port=0, liveness=broken) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert _get(f"{base}/compact", "POST")[0] == 404
        status, body = _get(f"{base}/healthz")
        assert status == 503 and "boom" in body
        assert _get(f"{base}/ready")[0] == 503  # readiness defaults to liveness


@pytest.mark.integration
def test_a_running_worker_is_alive_ready_and_exports_only_its_tasks_measurements(
    bootstrap: str, topic_factory, group_id: str
) -> None:
    topic = topic_factory(partitions=2)
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="logistic",
        task="binary",
        metrics_port=0,
        max_seconds=90.0,
        max_records=None,
        checkpoint_interval_s=3600.0,
        checkpoint_every_records=10**9,
    )
    assert settings.admin_endpoints is False  # the default
    worker = Worker(settings)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while worker.metrics_server.port is None and time.monotonic() < deadline:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{worker.metrics_server.port}"
        assert _get(f"{base}/healthz")[0] == 200
        ready = _get(f"{base}/ready")
        while ready[0] != 200 and time.monotonic() < deadline:
            assert ready[0] == 503, ready  # starting, or no partitions yet
            time.sleep(0.1)
            ready = _get(f"{base}/ready")
        assert ready == (200, "ready: 2 partition(s) assigned\n")

        # Idle (nothing on the topic yet): no measurement is exported, not even as 0.
        status, body = _get(f"{base}/metrics")
        assert status == 200
        idle = _names(body)
        assert "streamtrainer_assigned_partitions" in idle
        assert not idle & set(MEASUREMENTS), idle & set(MEASUREMENTS)
        # Admin endpoints are off unless --admin-endpoints; unknown paths are 404.
        assert _get(f"{base}/compact", "POST")[0] == 404
        assert _get(f"{base}/nothing-here")[0] == 404

        produce(bootstrap, topic, generate(SyntheticSpec(task="binary", n_features=4, seed=5), 1000))
        while worker.records_trained < 1000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.records_trained == 1000
        names = _names(_get(f"{base}/metrics")[1])
        # A binary classifier: loss, accuracy and ROC AUC (whole run and window) and their counters,
        # never an MAE nor an error sum; no checkpoint yet, so no checkpoint time.
        assert {
            "streamtrainer_prequential_loss",
            "streamtrainer_prequential_accuracy",
            "streamtrainer_prequential_roc_auc",
            "streamtrainer_prequential_records_total",
            "streamtrainer_prequential_correct_total",
            "streamtrainer_last_trained_timestamp_seconds",
            "streamtrainer_learning_rate",
        } <= names
        assert not names & {
            "streamtrainer_prequential_mae",
            "streamtrainer_prequential_macro_f1",
            "streamtrainer_prequential_absolute_error_sum_total",
        }
        records = worker.registry.get_sample_value("streamtrainer_prequential_records_total")
        assert records == 1000
        for scope in ("run", "window"):
            assert worker.registry.get_sample_value("streamtrainer_prequential_accuracy", {"scope": scope})
        assert "streamtrainer_last_checkpoint_timestamp_seconds" not in names
        assert _get(f"{base}/ready")[0] == 200
    finally:
        worker.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert worker.liveness() == (False, "finished")
    assert worker.readiness()[0] is False
    # The clean stop checkpointed: now the time is a real one.
    value = worker.registry.get_sample_value("streamtrainer_last_checkpoint_timestamp_seconds")
    assert value is not None and abs(value - time.time()) < 600
    # A worker that restores that checkpoint exports its time from the start (not absent, not 0).
    restarted = Worker(settings)
    with restarted.store:
        checkpoint = restarted.store.load_latest()
        assert checkpoint is not None
        restarted._restore(checkpoint)
    restored = restarted.registry.get_sample_value("streamtrainer_last_checkpoint_timestamp_seconds")
    created = datetime.fromisoformat(str(checkpoint.metadata["created_at"])).timestamp()
    assert restored == pytest.approx(created) and restored is not None and restored <= value + 1


def test_readiness_says_why_a_worker_is_not_ready(tmp_path) -> None:
    settings = worker_settings("127.0.0.1:1", "t", "g", checkpoint_dir=tmp_path)
    worker = Worker(settings)
    assert worker.liveness() == (True, "starting")
    assert worker.readiness() == (False, "starting")
    # In its loop, with no partition assigned, then with one, then stalled.
    worker._heartbeat = time.monotonic()
    worker._running = True
    worker._started = time.monotonic()
    assert worker.readiness() == (False, "no partitions assigned")
    worker.membership.assigned.add(("t", 0))
    assert worker.readiness() == (True, "ready: 1 partition(s) assigned")
    worker._heartbeat = time.monotonic() - 45
    ready, why = worker.readiness()
    assert not ready and why.startswith("stalled: nothing polled for 4"), why
    assert worker.liveness() == (True, "alive")
    worker._heartbeat = time.monotonic() - 400
    alive, why = worker.liveness()
    assert not alive and why.startswith("stuck"), why
