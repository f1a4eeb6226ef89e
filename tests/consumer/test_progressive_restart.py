"""The progressive metrics survive a restart: they are in the checkpoint (run and window).

A worker trains a binary stream and stops (its clean stop checkpoints); a second worker on the
same checkpoint directory and group trains what was produced since. The second one's whole-run
figures cover both runs: its record count is the sum, and its accuracy, log loss and ROC AUC
equal scikit-learn's over the concatenated per-record measurements of both workers, as do
the window's, which spans the restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from streamtrainer.consumer import Worker
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.training.progressive import logits_from_bce
from tests.helpers import produce, worker_settings

pytestmark = pytest.mark.integration

Recorded = list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]]


def _recording(worker: Worker, into: Recorded) -> None:
    """Keep a copy of each batch the worker measures (the inputs of ProgressiveMetrics.update)."""
    update: Callable[..., Any] = worker.prequential.update

    def record(losses: Any, predictions: Any, labels: Any) -> Any:
        into.append((np.array(losses, np.float64), np.array(predictions, np.float64), np.array(labels)))
        return update(losses, predictions, labels)

    worker.prequential.update = record  # type: ignore[method-assign]


def test_a_restarted_worker_continues_the_whole_run_metrics(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str
) -> None:
    topic = topic_factory(partitions=1)
    before, after, window = 1500, 1200, 2000
    samples = list(generate(SyntheticSpec(task="binary", n_features=4, noise=0.1, seed=21), before + after))
    produce(bootstrap, topic, samples[:before])
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="logistic",
        lr=0.05,
        compaction=False,
        prequential_window=window,
        max_records=before,
    )
    recorded: Recorded = []
    first = Worker(settings, registry=CollectorRegistry())
    _recording(first, recorded)
    status = first.run()
    assert status.records_trained == before and status.prequential.records == before

    produce(bootstrap, topic, samples[before:])
    registry = CollectorRegistry()
    second = Worker(settings.model_copy(update={"max_records": after}), registry=registry)
    _recording(second, recorded)
    status = second.run()
    assert status.records_trained == after

    losses = np.concatenate([r[0] for r in recorded])
    predictions = np.concatenate([r[1] for r in recorded])
    labels = np.array([s.label for s in samples], dtype=np.float64)
    assert losses.shape[0] == before + after  # each record measured once, in stream order
    np.testing.assert_array_equal(np.concatenate([r[2] for r in recorded]), labels)
    report = status.prequential
    assert report.records == before + after
    assert report.window_records == window
    logits = logits_from_bce(losses, labels)
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    for values, part in ((report.run, slice(None)), (report.window, slice(-window, None))):
        assert values["accuracy"] == pytest.approx(accuracy_score(labels[part], predictions[part]))
        assert values["loss"] == pytest.approx(log_loss(labels[part], probabilities[part]), rel=1e-6)
        exact = roc_auc_score(labels[part], logits[part])
        assert abs(values["roc_auc"] - exact) <= (0.005 if part == slice(None) else 1e-9)
    assert status.first_window_loss == pytest.approx(float(losses[:window].mean()))
    # The gauges show the whole run; the counters count this process's measurements (a counter
    # restarts at 0 with its process: PromQL's increase() handles that, a drop would not be).
    assert registry.get_sample_value("streamtrainer_prequential_records_total") == after
    run_accuracy = registry.get_sample_value("streamtrainer_prequential_accuracy", {"scope": "run"})
    assert run_accuracy == pytest.approx(report.run["accuracy"])
