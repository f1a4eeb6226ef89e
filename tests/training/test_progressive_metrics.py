"""ProgressiveMetrics against scikit-learn's metrics on the same predictions, run and window."""

from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    log_loss,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
    root_mean_squared_error,
)

from streamtrainer.training import LearnerConfig, OnlineLearner, ProgressiveMetrics
from streamtrainer.training.progressive import describe, logits_from_bce

WINDOW = 250
# Batch splittings: one at a time, odd sizes, one just over the window, all at once.
SPLITS = ("single", "seven", "window_plus_3", "random", "whole")

Array = npt.NDArray[np.float64]


def _batches(n: int, split: str, rng: np.random.Generator) -> list[slice]:
    if split == "single":
        sizes = [1] * n
    elif split == "seven":
        sizes = [7] * (n // 7) + ([n % 7] if n % 7 else [])
    elif split == "window_plus_3":
        sizes = [WINDOW + 3] * (n // (WINDOW + 3)) + [n % (WINDOW + 3)]
    elif split == "random":
        sizes = []
        while sum(sizes) < n:
            sizes.append(min(int(rng.integers(1, 2 * WINDOW)), n - sum(sizes)))
    else:
        sizes = [n]
    edges = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def _feed(metrics: ProgressiveMetrics, losses: Array, predictions: Array, labels: Array, split: str) -> None:
    rng = np.random.default_rng(0)
    for part in _batches(losses.shape[0], split, rng):
        metrics.update(losses[part], predictions[part], labels[part])


def _softplus(x: Array) -> Array:
    return np.logaddexp(0.0, x)


def _binary_stream(n: int, seed: int, *, scale: float = 1.0) -> tuple[Array, Array, Array]:
    """Logits of a model that improves over the stream, their labels, BCE losses."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.float64)
    signal = np.linspace(0.2, 3.0, n)
    logits = scale * (signal * (2 * labels - 1) + rng.normal(0.0, 1.5, n))
    losses = np.where(labels > 0.5, _softplus(-logits), _softplus(logits))
    return logits, labels, losses


def _sigmoid(z: Array) -> Array:
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("n", [100, 250, 1037])  # under, at and past the window
def test_binary_run_and_window_match_scikit_learn(split: str, n: int) -> None:
    logits, labels, losses = _binary_stream(n, seed=n)
    predictions = (logits > 0).astype(np.float64)
    metrics = ProgressiveMetrics("binary", window=WINDOW)
    _feed(metrics, losses, predictions, labels, split)
    report = metrics.report()
    assert report.records == n and report.window_records == min(n, WINDOW)
    for scope, part in (("run", slice(None)), ("window", slice(-WINDOW, None))):
        values = getattr(report, scope)
        y, z = labels[part], logits[part]
        assert values["accuracy"] == pytest.approx(accuracy_score(y, predictions[part]), abs=1e-12)
        assert values["loss"] == pytest.approx(log_loss(y, _sigmoid(z)), rel=1e-6)
        exact = roc_auc_score(y, z)
        if scope == "window":
            assert values["roc_auc"] == pytest.approx(exact, abs=1e-12)
        else:
            assert abs(values["roc_auc"] - exact) <= 0.005
            assert abs(values["roc_auc"] - exact) <= metrics.run_auc_error_bound + 1e-12


@pytest.mark.parametrize("scale", [1e-3, 0.05, 1.0, 30.0])
def test_run_auc_stays_within_its_bound_at_any_logit_scale(scale: float) -> None:
    # An early model's logits are all near 0, a confident one's far out: the binning is in asinh.
    logits, labels, losses = _binary_stream(20_000, seed=3, scale=scale)
    metrics = ProgressiveMetrics("binary", window=WINDOW)
    _feed(metrics, losses, (logits > 0).astype(np.float64), labels, "random")
    exact = roc_auc_score(labels, logits_from_bce(losses, labels))  # what the loss says
    run = metrics.run_values()["roc_auc"]
    bound = metrics.run_auc_error_bound
    assert abs(run - exact) <= bound + 1e-12
    assert bound < 0.005, bound
    assert abs(run - roc_auc_score(labels, logits)) <= 0.005


def test_logits_are_recovered_exactly_from_the_loss_and_the_label() -> None:
    logits, labels, losses = _binary_stream(2000, seed=1, scale=5.0)
    recovered = logits_from_bce(losses, labels)
    close = np.abs(logits) < 30  # beyond, softplus loses the digits in float64
    np.testing.assert_allclose(recovered[close], logits[close], rtol=1e-6, atol=1e-9)
    # A loss of exactly 0: infinitely sure, and right.
    assert logits_from_bce(np.zeros(2), np.array([1.0, 0.0])).tolist() == [math.inf, -math.inf]


def test_binary_ties_and_single_class_windows() -> None:
    # A model that starts at zero: every logit 0 (a tie of all pairs: AUC 1/2 exactly).
    labels = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    losses = np.full(5, math.log(2.0))
    metrics = ProgressiveMetrics("binary", window=3)
    metrics.update(losses[:1], np.zeros(1), labels[:1])
    # Only positives so far: no AUC, and NaN rather than 0.
    assert math.isnan(metrics.run_values()["roc_auc"]) and math.isnan(metrics.window_values()["roc_auc"])
    metrics.update(losses[1:], np.zeros(4), labels[1:])
    assert metrics.run_values()["roc_auc"] == 0.5 == roc_auc_score(labels, np.zeros(5))
    assert metrics.window_values()["roc_auc"] == 0.5


def _multiclass_stream(n: int, k: int, seed: int) -> tuple[Array, Array, Array, Array]:
    rng = np.random.default_rng(seed)
    # Class k-1 never occurs as a label; class 0 is rare.
    weights = np.r_[0.02, np.ones(k - 2), 0.0]
    labels = rng.choice(k, size=n, p=weights / weights.sum()).astype(np.float64)
    logits = rng.normal(0.0, 1.0, (n, k))
    logits[np.arange(n), labels.astype(int)] += np.linspace(0.0, 2.5, n)
    losses = np.logaddexp.reduce(logits, axis=1) - logits[np.arange(n), labels.astype(int)]
    predictions = logits.argmax(axis=1).astype(np.float64)
    probabilities = np.exp(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))
    return labels, predictions, losses, probabilities


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("n", [60, 1013])
def test_multiclass_run_and_window_match_scikit_learn(split: str, n: int) -> None:
    k = 5
    labels, predictions, losses, probabilities = _multiclass_stream(n, k, seed=n)
    metrics = ProgressiveMetrics("multiclass", n_classes=k, window=WINDOW)
    _feed(metrics, losses, predictions, labels, split)
    report = metrics.report()
    for scope, part in (("run", slice(None)), ("window", slice(-WINDOW, None))):
        values = getattr(report, scope)
        y, p = labels[part], predictions[part]
        assert values["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
        assert values["loss"] == pytest.approx(log_loss(y, probabilities[part], labels=range(k)), rel=1e-6)
        # The convention: the macro mean over the classes seen as labels.
        expected = f1_score(y, p, average="macro", labels=np.unique(y), zero_division=0.0)
        assert values["macro_f1"] == pytest.approx(expected, abs=1e-12)


def test_macro_f1_convention_for_classes_never_seen_or_never_predicted() -> None:
    # Class 2 is predicted but never a label (no term of the mean); class 1 is a label never
    # predicted (F1 0); class 3 neither (ignored).
    labels = np.array([0.0, 0.0, 1.0, 1.0, 0.0])
    predictions = np.array([0.0, 2.0, 0.0, 2.0, 0.0])
    metrics = ProgressiveMetrics("multiclass", n_classes=4, window=10)
    metrics.update(np.ones(5), predictions, labels)
    expected = f1_score(labels, predictions, average="macro", labels=[0, 1], zero_division=0.0)
    assert metrics.run_values()["macro_f1"] == pytest.approx(expected, abs=1e-12)
    assert metrics.window_values()["macro_f1"] == pytest.approx(expected, abs=1e-12)
    # By hand: class 0: tp 2, fp 1, fn 1 -> 2*2/(4+1+1) = 2/3; class 1: 0.
    assert expected == pytest.approx((2 / 3 + 0.0) / 2)


def _regression_stream(n: int, seed: int, offset: float) -> tuple[Array, Array]:
    rng = np.random.default_rng(seed)
    labels = offset + rng.normal(0.0, 3.0, n)
    noise = rng.normal(0.0, 1.0, n) * np.linspace(4.0, 0.5, n)
    return labels + noise, labels


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("offset", [0.0, 43.0, 43_000.0])
def test_regression_run_and_window_match_scikit_learn(split: str, offset: float) -> None:
    n = 1021
    predictions, labels = _regression_stream(n, seed=7, offset=offset)
    losses = (predictions - labels) ** 2
    metrics = ProgressiveMetrics("regression", window=WINDOW)
    sums = []
    rng = np.random.default_rng(0)
    for part in _batches(n, split, rng):
        sums.append(metrics.update(losses[part], predictions[part], labels[part]))
    report = metrics.report()
    for scope, part in (("run", slice(None)), ("window", slice(-WINDOW, None))):
        values = getattr(report, scope)
        y, p = labels[part], predictions[part]
        assert values["loss"] == pytest.approx(float(np.mean(losses[part])), rel=1e-9)
        assert values["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-9)
        assert values["rmse"] == pytest.approx(root_mean_squared_error(y, p), rel=1e-9)
        assert values["r2"] == pytest.approx(r2_score(y, p), rel=1e-6, abs=1e-9)
    # The counters' increments add up to the run's sums (from which PromQL computes a window).
    assert sum(s.records for s in sums) == n
    assert sum(s.absolute_error_sum for s in sums) == pytest.approx(np.abs(predictions - labels).sum())
    assert sum(s.squared_error_sum for s in sums) == pytest.approx(((predictions - labels) ** 2).sum())
    label_sum = sum(s.label_sum_positive - s.label_sum_negative for s in sums)
    assert label_sum == pytest.approx(labels.sum())
    assert sum(s.label_squared_sum for s in sums) == pytest.approx((labels**2).sum())


def test_undefined_values_are_nan_not_zero() -> None:
    for task, k in (("binary", None), ("multiclass", 3), ("regression", None)):
        metrics = ProgressiveMetrics(task, n_classes=k, window=5)
        report = metrics.report()
        assert report.records == 0
        assert all(math.isnan(v) for v in (*report.run.values(), *report.window.values()))
        assert report.as_json()["run"] == dict.fromkeys(metrics.metric_names)
    # One regression record: R2 is undefined (constant labels), the errors are not.
    metrics = ProgressiveMetrics("regression", window=5)
    metrics.update(np.array([4.0]), np.array([3.0]), np.array([1.0]))
    assert math.isnan(metrics.run_values()["r2"]) and metrics.run_values()["mae"] == 2.0


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_state_round_trip_keeps_the_run_and_the_window(task: str) -> None:
    k = 4 if task == "multiclass" else None
    n = 800
    if task == "binary":
        logits, labels, losses = _binary_stream(n, seed=11)
        predictions = (logits > 0).astype(np.float64)
    elif task == "multiclass":
        labels, predictions, losses, _ = _multiclass_stream(n, 4, seed=11)
    else:
        predictions, labels = _regression_stream(n, seed=11, offset=43.0)
        losses = (predictions - labels) ** 2
    whole = ProgressiveMetrics(task, n_classes=k, window=WINDOW)
    whole.update(losses, predictions, labels)
    first = ProgressiveMetrics(task, n_classes=k, window=WINDOW)
    first.update(losses[:333], predictions[:333], labels[:333])
    arrays, scalars = first.state_dict()
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    # Through the checkpoint's formats: tensors (safetensors) and JSON.
    import json

    from safetensors.torch import load, save

    tensors = load(save({name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}))
    restored = ProgressiveMetrics(task, n_classes=k, window=WINDOW)
    restored.load_state_dict(
        {name: t.numpy() for name, t in tensors.items()}, json.loads(json.dumps(scalars))
    )
    restored.update(losses[333:], predictions[333:], labels[333:])
    a, b = restored.report(), whole.report()
    assert a.records == b.records == n and a.window_records == b.window_records
    for scope in ("run", "window"):
        for name, value in getattr(b, scope).items():
            assert getattr(a, scope)[name] == pytest.approx(value, rel=1e-9), (scope, name)
    assert a.first_window_loss == pytest.approx(b.first_window_loss)
    # Another task's state is refused, and leaves the metrics as they were.
    other = ProgressiveMetrics("regression" if task != "regression" else "binary", window=WINDOW)
    with pytest.raises(ValueError, match="task"):
        other.load_state_dict(arrays, scalars)
    assert other.report().records == 0


def test_state_with_another_window_keeps_the_newest_records() -> None:
    predictions, labels = _regression_stream(500, seed=2, offset=0.0)
    losses = np.abs(predictions - labels)
    big = ProgressiveMetrics("regression", window=400)
    big.update(losses, predictions, labels)
    small = ProgressiveMetrics("regression", window=100)
    small.load_state_dict(*big.state_dict())
    assert small.report().records == 500 and small.report().window_records == 100
    assert small.window_values()["mae"] == pytest.approx(
        mean_absolute_error(labels[-100:], predictions[-100:])
    )


def test_a_real_learner_stream_matches_scikit_learn() -> None:
    """The worker's learner on a logistic stream: its losses give the probabilities back."""
    rng = np.random.default_rng(5)
    n = 3000
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ np.array([1.5, -2.0, 0.5, 0.0]) + rng.normal(0, 1.0, n) > 0.3).astype(np.float32)
    learner = OnlineLearner(LearnerConfig(model="logistic", task="binary", lr=0.05), n_features=4)
    metrics = ProgressiveMetrics("binary", window=WINDOW)
    losses, predictions = [], []
    for start in range(0, n, 200):
        result = learner.learn_many(x[start : start + 200], y[start : start + 200])
        metrics.update(result.losses, result.predictions, y[start : start + 200].astype(np.float64))
        losses.append(result.losses)
        predictions.append(result.predictions)
    loss, prediction, labels = np.concatenate(losses), np.concatenate(predictions), y.astype(np.float64)
    logits = logits_from_bce(loss, labels)
    # The recovered logit agrees with the learner's own prediction (its sign) where it is not ~0.
    clear = np.abs(logits) > 1e-4
    np.testing.assert_array_equal((logits[clear] > 0).astype(np.float64), prediction[clear])
    report = metrics.report()
    assert report.run["accuracy"] == pytest.approx(accuracy_score(labels, prediction))
    assert report.run["loss"] == pytest.approx(log_loss(labels, _sigmoid(logits)), rel=1e-5)
    assert abs(report.run["roc_auc"] - roc_auc_score(labels, logits)) <= 0.005
    assert report.window["roc_auc"] == pytest.approx(roc_auc_score(labels[-WINDOW:], logits[-WINDOW:]))
    text = describe(report)
    assert text.startswith(f"prequential over {n:,} records: accuracy ")
    assert f"(last {WINDOW:,}: " in text and "log loss" in text and "ROC AUC" in text
