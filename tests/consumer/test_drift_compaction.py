"""Drift detection in the worker, through the embedded broker, at the worker's defaults.

A topic whose concept changes abruptly halfway (a binary stream whose weights
are redrawn at record 6,000): the worker's Page-Hinkley detector sees the
prequential loss rise, counts it in ``streamtrainer_drift_detections_total``,
logs it, and a compaction with reason ``drift`` runs, over the records since the
estimated change point (fewer than the scheduled window). Its state is in the
checkpoint. The same stream without the drift: no detection, no drift compaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from streamtrainer.consumer.worker import Worker
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.training.checkpoint import CheckpointStore
from tests.helpers import produce, worker_settings

pytestmark = pytest.mark.integration

N_RECORDS, DRIFT_AT = 12_000, 6_000


def _run(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str, drift: str
) -> tuple[CollectorRegistry, dict[str, object]]:
    topic = topic_factory(partitions=1)
    spec = SyntheticSpec(task="binary", n_features=8, noise=0.05, seed=3, drift=drift, drift_at=DRIFT_AT)
    produce(bootstrap, topic, generate(spec, N_RECORDS), codec="binary")
    registry = CollectorRegistry()
    settings = worker_settings(bootstrap, topic, group_id, model="logistic", max_records=N_RECORDS)
    assert settings.drift_detector == "page-hinkley" and settings.compaction  # the defaults
    status = Worker(settings, registry=registry).run()
    assert status.records_trained == N_RECORDS
    checkpoint = CheckpointStore(settings.checkpoint_dir).load_latest()
    assert checkpoint is not None
    return registry, checkpoint.metadata


def _count(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


def test_an_abrupt_drift_is_detected_and_compacted(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="streamtrainer.consumer"):
        registry, metadata = _run(bootstrap, topic_factory, group_id, "abrupt")
    detections = _count(registry, "streamtrainer_drift_detections_total")
    assert detections >= 1
    assert _count(registry, "streamtrainer_compactions_total", {"reason": "drift"}) >= 1
    assert _count(registry, "streamtrainer_compactions_total", {"reason": "records"}) >= 1
    assert any("drift detected" in record.getMessage() for record in caplog.records)
    state = metadata["drift"]
    assert isinstance(state, dict)
    assert state["detections"] == detections and state["seen"] == N_RECORDS


def test_a_stationary_stream_has_no_drift(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str
) -> None:
    registry, metadata = _run(bootstrap, topic_factory, group_id, "none")
    assert _count(registry, "streamtrainer_drift_detections_total") == 0
    assert _count(registry, "streamtrainer_compactions_total", {"reason": "drift"}) == 0
    assert _count(registry, "streamtrainer_compactions_total", {"reason": "records"}) >= 1
    state = metadata["drift"]
    assert isinstance(state, dict) and state["detections"] == 0 and state["seen"] == N_RECORDS
