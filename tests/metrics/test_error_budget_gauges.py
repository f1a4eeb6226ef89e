"""The error budget's gauges: what a fresh worker exports before it sets them."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, generate_latest

from streamtrainer.metrics import WorkerMetrics


def test_a_fresh_worker_exports_the_budget_unspent_and_off_until_set() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    # Exported at 0 from the start, so the alert rule's series exists before any stop.
    assert registry.get_sample_value("streamtrainer_error_budget_exhausted") == 0
    # NaN (off) rather than 0: "no budget" must not read as "nothing spent" or "zero tolerance".
    for name in ("streamtrainer_error_budget_invalid_ratio", "streamtrainer_error_budget_limit"):
        value = registry.get_sample_value(name)
        assert value is not None and math.isnan(value), name
    metrics.error_budget_limit.set(0.1)
    metrics.error_budget_ratio.set(0.25)
    metrics.error_budget_exhausted.set(1)
    text = generate_latest(registry).decode()
    assert "streamtrainer_error_budget_exhausted 1.0" in text
    assert "streamtrainer_error_budget_invalid_ratio 0.25" in text
    assert "streamtrainer_error_budget_limit 0.1" in text
    assert "# HELP streamtrainer_error_budget_exhausted 1 once the worker has stopped" in text
