"""Whole-stream progressive metrics, one function for every contender.

Each contender hands over, per record, what it predicted *before* learning from
that record (test-then-train): the value, or the class index, and for
classification the probability it gave the true class (and, for a binary
task, the probability of class 1). The metrics below are computed from those
arrays alone, so the worker, River's linear models and River's trees are
measured by exactly the same code (tests/bench/test_bench_quality.py checks it
against River's and scikit-learn's own metrics on the same predictions).

Conventions, the same for all: a missing prediction (NaN: River's classifier
before it has seen a class, or the learner's prediction of a record whose loss
was not finite) counts as wrong; probabilities are clipped to [1e-15, 1 - 1e-15]
for the log loss, as River's ``LogLoss`` and scikit-learn's ``log_loss`` do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

from bench.quality.datasets import Kind

_EPS = 1e-15

# Higher is better for these; lower for the others (mae, rmse, log_loss).
HIGHER_IS_BETTER = frozenset({"accuracy", "roc_auc", "macro_f1", "r2"})


@dataclass(frozen=True)
class Predictions:
    """What one contender predicted for each record before learning from it."""

    values: npt.NDArray[np.float64]  # the value, or the class index; NaN: none
    p_true: npt.NDArray[np.float64] | None = None  # classification: probability of the true class
    p_one: npt.NDArray[np.float64] | None = None  # binary: probability of class 1


def accuracy(labels: npt.NDArray[np.floating], values: npt.NDArray[np.float64]) -> float:
    """Share of records whose predicted class is the label (a NaN prediction is wrong)."""
    return float(np.mean(values == labels))


def log_loss(p_true: npt.NDArray[np.float64]) -> float:
    """Mean of -log p(true class), p clipped to [1e-15, 1 - 1e-15]."""
    return float(np.mean(-np.log(np.clip(np.nan_to_num(p_true, nan=_EPS), _EPS, 1 - _EPS))))


def roc_auc(labels: npt.NDArray[np.floating], p_one: npt.NDArray[np.float64]) -> float:
    """Exact ROC AUC (Mann-Whitney U with tied scores counted half); NaN if one class is absent."""
    positive = labels == 1
    n_pos = int(positive.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(np.nan_to_num(p_one, nan=0.5))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_f1(labels: npt.NDArray[np.floating], values: npt.NDArray[np.float64]) -> float:
    """Unweighted mean F1 over the classes that occur as a label or a prediction (scikit-learn's)."""
    predicted = values[np.isfinite(values)]
    classes = np.union1d(np.unique(labels), np.unique(predicted))
    scores = []
    for c in classes:
        tp = float(np.sum((values == c) & (labels == c)))
        fp = float(np.sum((values == c) & (labels != c)))
        fn = float(np.sum((values != c) & (labels == c)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def regression_metrics(labels: npt.NDArray[np.floating], values: npt.NDArray[np.float64]) -> dict[str, float]:
    """MAE, RMSE and R2 (against the whole stream's label variance, as scikit-learn's r2_score)."""
    y = labels.astype(np.float64)
    error = values - y
    sse = float(np.sum(error * error))
    sst = float(np.sum((y - y.mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(error))),
        "rmse": math.sqrt(sse / len(y)),
        "r2": 1.0 - sse / sst if sst > 0 else math.nan,
    }


def progressive(kind: Kind, labels: npt.NDArray[np.floating], predictions: Predictions) -> dict[str, float]:
    """Every metric of the task from one contender's predictions; the first key is the metric of record."""
    values = predictions.values
    if kind == "regression":
        return regression_metrics(labels, values)
    out = {"accuracy": accuracy(labels, values)}
    if predictions.p_true is not None:
        out["log_loss"] = log_loss(predictions.p_true)
    if kind == "binary" and predictions.p_one is not None:
        out["roc_auc"] = roc_auc(labels, predictions.p_one)
    if kind == "multiclass":
        out["macro_f1"] = macro_f1(labels, values)
    return out


def better(metric: str, a: float, b: float) -> bool:
    """Whether ``a`` is strictly better than ``b`` on ``metric`` (NaN is worse than anything)."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if metric in HIGHER_IS_BETTER else a < b


def score_ratio(metric: str, value: float, reference: float) -> float:
    """How many times better than ``reference`` (> 1: better): value/ref, or ref/value for an error."""
    if math.isnan(value) or math.isnan(reference):
        return math.nan
    if metric in HIGHER_IS_BETTER:
        return value / reference if reference else math.inf
    return reference / value if value else math.inf
