"""StreamtrainerErrorBudgetExhausted, end to end: a real Prometheus evaluates deploy/prometheus/alerts.yml.

Issue #15, case 4: a worker stopped by its error budget crash-loops (restarted by its supervisor, it
reads the same records and stops again), and no alert fired. Here a worker trains from the broker
until the bad records spend its budget, twice (two lives, as a supervisor restarts it), while
Prometheus scrapes it every second: the alert fires during the first life and stays firing through
the exits (``up`` 0) and the restart. Bursts and lasting streams of invalid records, and the
minutes-long timelines, are promtool tests (alerts.test.yml, run by test_deploy_prometheus.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from streamtrainer.broker import free_port
from streamtrainer.consumer import Worker
from streamtrainer.consumer.error_budget import ErrorBudgetExceeded
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.settings import WorkerSettings
from tests.helpers import produce, worker_settings
from tests.test_deploy_prometheus import CONFIG, PRODUCER_JOB, RULES, WORKER_JOB, PrometheusServer

logger = logging.getLogger(__name__)

ALERT = "StreamtrainerErrorBudgetExhausted"
LINGER_S = 3.0  # three 1 s scrapes see streamtrainer_error_budget_exhausted at 1


def _config(worker: str, prometheus_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with 1 s scrapes and evaluations, pointed at this worker."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    targets = {
        WORKER_JOB: [worker],
        PRODUCER_JOB: [f"127.0.0.1:{free_port()}"],  # no producer here: down, and no rule reads it
        "prometheus": [f"127.0.0.1:{prometheus_port}"],
    }
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


def _alert_state(prometheus: PrometheusServer, instance: str) -> str:
    """firing, pending or inactive: the state of the alert for this instance."""
    alerts = prometheus.api("alerts")["data"]["alerts"]
    ours = [a for a in alerts if a["labels"]["alertname"] == ALERT and a["labels"]["instance"] == instance]
    return str(ours[0]["state"]) if ours else "inactive"


def _start_life(settings: WorkerSettings, life: int) -> tuple[threading.Thread, list[BaseException]]:
    """One life of the worker in a thread (a fresh registry, as a restarted process has); its error."""
    stopped: list[BaseException] = []

    def run() -> None:
        try:
            Worker(settings, registry=CollectorRegistry()).run()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            stopped.append(error)

    thread = threading.Thread(target=run, name=f"worker-life-{life}", daemon=True)
    thread.start()
    return thread, stopped


def _wait(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.integration
def test_a_worker_stopped_by_its_error_budget_fires_the_alert_through_its_crash_loop(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=1, prefix="budget-alert")
    produce(bootstrap, topic, generate(SyntheticSpec(n_features=4, seed=5), 300))
    bad = Producer({"bootstrap.servers": bootstrap})
    for i in range(200):  # 40% of the stream from record 300: past a 10% budget within ~35 records
        bad.produce(topic, key=f"bad-{i}".encode(), value=b"not json")
    assert bad.flush(10) == 0

    port = free_port()
    instance = f"127.0.0.1:{port}"
    prometheus = PrometheusServer(tmp_path)
    prometheus.start(_config(instance, prometheus.port))
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        metrics_port=port,
        metrics_linger_s=LINGER_S,
        errors_tolerance="budget",
        error_budget=0.1,
        checkpoint_dir=tmp_path / "checkpoints",
    )
    states: list[str] = []  # the alert's state, polled every 0.25 s

    def observe() -> str:
        states.append(_alert_state(prometheus, instance))
        return states[-1]

    try:
        for life in (1, 2):  # the supervisor restarts the worker once
            thread, stopped = _start_life(settings, life)
            while thread.is_alive():
                observe()
                time.sleep(0.25)
            assert len(stopped) == 1 and isinstance(stopped[0], ErrorBudgetExceeded), stopped
            if life == 1:  # no `for:`: the first evaluation after a scrape of the 1 fires it
                _wait(lambda: observe() == "firing", f"{ALERT} firing", 10)
            # Gone: Prometheus scrapes nothing (`up` 0), and the alert stays.
            _wait(lambda: prometheus.value(f'up{{instance="{instance}"}}') == 0, "up == 0", 10)
            for _ in range(4):
                observe()
                time.sleep(0.25)
    finally:
        prometheus.stop()
    fired = states.index("firing")
    logger.info("alert states: %s inactive, then %s", fired, sorted(set(states[fired:])))
    assert set(states[fired:]) == {"firing"}, states
