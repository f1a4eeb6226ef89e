"""The progressive metrics on /metrics: counters any window is computed from, and scoped gauges."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import accuracy_score, mean_absolute_error, r2_score, root_mean_squared_error

from streamtrainer.metrics import WorkerMetrics
from streamtrainer.training import ProgressiveMetrics


def _exported(registry: CollectorRegistry) -> set[str]:
    body = generate_latest(registry).decode()
    return {family.name for family in text_string_to_metric_families(body) if family.samples}


def _tracked(
    task: str, window: int, n_classes: int | None = None
) -> tuple[CollectorRegistry, WorkerMetrics, ProgressiveMetrics]:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    progressive = ProgressiveMetrics(task, n_classes, window)
    metrics.track_progressive(task, window, progressive.report)
    return registry, metrics, progressive


def test_binary_gauges_appear_with_their_values_and_only_the_task_s() -> None:
    registry, metrics, progressive = _tracked("binary", window=50)
    assert not _exported(registry) & {"streamtrainer_prequential_loss", "streamtrainer_prequential_accuracy"}
    assert registry.get_sample_value("streamtrainer_prequential_records_total") == 0  # a real zero
    # Positives only: loss and accuracy, but no ROC AUC yet (absent, not NaN, not 0).
    metrics.count_progressive(progressive.update(np.full(3, 0.1), np.ones(3), np.ones(3)))
    names = _exported(registry)
    assert {"streamtrainer_prequential_loss", "streamtrainer_prequential_accuracy"} <= names
    assert "streamtrainer_prequential_roc_auc" not in names
    metrics.count_progressive(progressive.update(np.array([2.0, 0.05]), np.array([1.0, 0.0]), np.zeros(2)))
    report = progressive.report()
    for scope in ("run", "window"):
        values = getattr(report, scope)
        for name in ("loss", "accuracy", "roc_auc"):
            sample = registry.get_sample_value(f"streamtrainer_prequential_{name}", {"scope": scope})
            assert sample == pytest.approx(values[name]), (scope, name)
    names = _exported(registry)
    assert not names & {
        "streamtrainer_prequential_mae",
        "streamtrainer_prequential_macro_f1",
        "streamtrainer_prequential_r2",
        "streamtrainer_prequential_absolute_error_sum",
        "streamtrainer_prequential_label_sum",
    }
    assert registry.get_sample_value("streamtrainer_prequential_records_total") == 5
    assert registry.get_sample_value("streamtrainer_prequential_correct_total") == 4
    assert registry.get_sample_value("streamtrainer_prequential_loss_sum_total") == pytest.approx(2.35)
    help_text = generate_latest(registry).decode()
    assert 'scope="window": the last 50 records' in help_text


def test_a_window_from_the_regression_counters_matches_scikit_learn() -> None:
    """What PromQL does: increase() of each counter over a span, then the metric from the sums."""
    registry, metrics, progressive = _tracked("regression", window=1000)
    rng = np.random.default_rng(4)
    labels = 43.0 + rng.normal(0.0, 3.0, 900) * np.r_[np.ones(450), -np.ones(450)]
    predictions = labels + rng.normal(0.0, 1.0, 900)
    losses = (predictions - labels) ** 2
    names = (
        "records",
        "absolute_error_sum",
        "squared_error_sum",
        "label_squared_sum",
        "correct",
    )

    def sample() -> dict[str, float]:
        values = {
            name: registry.get_sample_value(f"streamtrainer_prequential_{name}_total") for name in names
        }
        assert values.pop("correct") is None  # no classification counter on a regressor
        for sign in ("positive", "negative"):
            values[sign] = registry.get_sample_value(
                "streamtrainer_prequential_label_sum_total", {"sign": sign}
            )
        return {k: float(v) for k, v in values.items() if v is not None}

    metrics.count_progressive(progressive.update(losses[:300], predictions[:300], labels[:300]))
    start = sample()
    for a in range(300, 900, 77):
        metrics.count_progressive(
            progressive.update(losses[a : a + 77], predictions[a : a + 77], labels[a : a + 77])
        )
    end = sample()
    d = {k: end[k] - start[k] for k in end}
    y, p = labels[300:], predictions[300:]
    n = d["records"]
    assert n == 600
    assert d["absolute_error_sum"] / n == pytest.approx(mean_absolute_error(y, p))
    assert (d["squared_error_sum"] / n) ** 0.5 == pytest.approx(root_mean_squared_error(y, p))
    label_sum = d["positive"] - d["negative"]
    sst = d["label_squared_sum"] - label_sum**2 / n
    assert 1.0 - d["squared_error_sum"] / sst == pytest.approx(r2_score(y, p), rel=1e-6)
    # The gauges: the whole run and the window (here all 900 records) from the metrics themselves.
    run_r2 = registry.get_sample_value("streamtrainer_prequential_r2", {"scope": "run"})
    assert run_r2 == pytest.approx(r2_score(labels, predictions), rel=1e-9)
    assert "streamtrainer_prequential_accuracy" not in _exported(registry)


def test_the_multiclass_counters_and_gauges() -> None:
    registry, metrics, progressive = _tracked("multiclass", window=4, n_classes=3)
    labels = np.array([0.0, 1.0, 2.0, 2.0, 1.0, 0.0])
    predictions = np.array([0.0, 2.0, 2.0, 2.0, 1.0, 1.0])
    metrics.count_progressive(progressive.update(np.ones(6), predictions, labels))
    assert registry.get_sample_value("streamtrainer_prequential_correct_total") == 4
    window = registry.get_sample_value("streamtrainer_prequential_accuracy", {"scope": "window"})
    assert window == accuracy_score(labels[-4:], predictions[-4:])
    assert registry.get_sample_value("streamtrainer_prequential_macro_f1", {"scope": "run"}) is not None
    assert "streamtrainer_prequential_roc_auc" not in _exported(registry)
