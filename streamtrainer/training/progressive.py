"""Progressive validation (test-then-train): whole-run and windowed quality of an online model.

Each record is scored with the model as it was *before* learning from it, so
every figure here is an honest estimate of the error on unseen data (river's
``evaluate.progressive_val_score`` measures the same way). Two scopes are kept:

* **run**: every record measured since the model started (restored from the
  checkpoint after a restart, so a restarted worker continues its counts);
* **window**: exactly the last ``window`` records (ring buffers; the windowed
  figures are computed when read, not per batch).

Metrics, by task (``NaN`` while undefined, e.g. ROC AUC before both classes
have been seen, never a made-up 0):

* every task: ``loss`` (the mean per-record training loss; for classification
  it is the log loss: binary tasks train with BCE-with-logits and multi-class
  ones with cross-entropy, see ``TASK_LOSSES`` in ``learner.py``);
* classification: ``accuracy``;
* binary: ``roc_auc``. The probability is recovered exactly from the BCE loss
  and the label: ``p(label) = exp(-loss)``, so the logit is
  ``-log(expm1(loss))`` for a positive and ``log(expm1(loss))`` for a negative
  (a loss of 0 is a logit of +-inf). The window's AUC is exact (Mann-Whitney,
  ties counting one half, as scikit-learn's ``roc_auc_score``). The run's AUC is
  a streaming approximation: a histogram of positives and negatives over
  ``asinh(logit / AUC_SCALE)`` in bins of ``AUC_BIN_WIDTH``. A positive and a
  negative in the same bin count one half whatever their order, so the error is
  at most ``0.5 * sum_b pos_b * neg_b / (P * N)`` (:attr:`ProgressiveMetrics.run_auc_error_bound`;
  pairs truly tied count one half in the exact AUC too). The bins are 1/256
  wide in asinh: about 0.4% of the logit for ``|logit| > 0.01`` and 4e-6 near 0,
  so the bound does not depend on the scale of the logits; on realistic streams
  the error is well under 0.005 (tests/training/test_progressive_metrics.py);
* multi-class: ``macro_f1``: the mean over the classes *seen as labels* in the
  scope of ``2 tp / (2 tp + fp + fn)``, i.e. scikit-learn's
  ``f1_score(y, p, average="macro", labels=<classes in y>)``; a class only ever
  predicted is no term of the mean (its false positives still lower the
  recall of the true classes), a class seen but never predicted counts 0;
* regression: ``mae``, ``rmse`` and ``r2`` (``1 - SSE / SST``; NaN while the
  labels are all equal, where scikit-learn's ``r2_score`` makes up 0 or 1).

:meth:`ProgressiveMetrics.update` returns the batch's sums (:class:`BatchSums`),
from which monotonic counters are kept (Prometheus): any window is their
difference. The state (run and window) is numpy arrays plus JSON-able scalars
(:meth:`~ProgressiveMetrics.state_dict`), saved in the worker's checkpoint.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

TASKS = ("regression", "binary", "multiclass")
# The metrics of each task, in the order they are reported.
TASK_METRICS = {
    "binary": ("loss", "accuracy", "roc_auc"),
    "multiclass": ("loss", "accuracy", "macro_f1"),
    "regression": ("loss", "mae", "rmse", "r2"),
}
# Run AUC histogram: bins of AUC_BIN_WIDTH over asinh(logit / AUC_SCALE), |logit| up to
# AUC_SCALE * sinh(AUC_T_MAX) (~7e4; beyond, and +-inf, fall in the end bins). 9,600 bins per
# class (150 KB), updated with np.add.at; only the non-empty ones go into a checkpoint (~700 on a
# 20,000-record stream: ~17 KB, with ~24 KB for a 1,000-record window). Measured on the 2-core
# dev machine: update() costs ~40-60 us per batch of 200-1,000 records and ~20 ns a record beyond
# (the exponentially weighted means it replaced: ~20-35 us, ~13 ns), and the worker sizes its
# batches to ~0.1 s of training; a read (report()) ~0.2 ms with a 1,000-record window.
AUC_SCALE = 2.0**-10
AUC_BIN_WIDTH = 1.0 / 256.0
AUC_T_MAX = 18.75
AUC_BINS = 2 * round(AUC_T_MAX / AUC_BIN_WIDTH)
_STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class BatchSums:
    """What one :meth:`ProgressiveMetrics.update` measured: the increments of the counters.

    ``correct`` is for classification; the error and label sums for regression
    (``label_sum_positive``/``_negative``: the sums of the positive labels and of
    minus the negative ones, both monotonic). Zero where not of the task.
    """

    records: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    absolute_error_sum: float = 0.0
    squared_error_sum: float = 0.0
    label_sum_positive: float = 0.0
    label_sum_negative: float = 0.0
    label_squared_sum: float = 0.0


@dataclass(frozen=True, slots=True)
class ProgressiveReport:
    """A snapshot of the progressive metrics: the whole run and the window, named.

    ``run`` and ``window`` map each metric of the task (:data:`TASK_METRICS`) to
    its value, NaN while undefined. ``window_size`` is the configured window,
    ``window_records`` the records in it now (fewer until ``window_size`` were
    measured). ``first_window_loss`` is the mean loss of the run's first
    ``window_size`` records (where the model started from).
    """

    task: str
    records: int
    window_size: int
    window_records: int
    run: dict[str, float]
    window: dict[str, float]
    first_window_loss: float

    def as_json(self) -> dict[str, object]:
        """JSON-able, NaN as None."""
        return {
            "task": self.task,
            "records": self.records,
            "window_size": self.window_size,
            "window_records": self.window_records,
            "run": {k: _json_float(v) for k, v in self.run.items()},
            "window": {k: _json_float(v) for k, v in self.window.items()},
            "first_window_loss": _json_float(self.first_window_loss),
        }


def logits_from_bce(
    losses: npt.NDArray[np.float64], labels: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """The logits that gave these BCE-with-logits losses with these 0/1 labels (exact inverse).

    ``loss = softplus(-z)`` for a positive, ``softplus(z)`` for a negative, so
    ``z = -+log(expm1(loss))``; a loss of 0 is a logit of +-inf.
    """
    if losses.shape[0] and losses.min() > 0.0 and losses.max() < 700.0:
        magnitude = np.log(np.expm1(losses))
    else:
        # A loss of 0 (log(0): -inf) or past ~709 (expm1 overflows: +inf). np.errstate costs
        # ~5 us a call, twice the rest at 200 records: only here.
        with np.errstate(divide="ignore", over="ignore"):
            magnitude = np.log(np.expm1(np.maximum(losses, 0.0)))
    np.negative(magnitude, out=magnitude, where=labels > 0.5)
    return magnitude


def roc_auc(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.float64]) -> float:
    """Exact ROC AUC (Mann-Whitney U, ties one half); NaN unless both classes are present."""
    positive = labels > 0.5
    n_pos = int(positive.sum())
    n_neg = int(positive.shape[0]) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.shape[0]]
    # Average 1-based rank of each group of equal scores.
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.repeat(mean_rank, ends - starts)
    rank_sum = float(ranks[positive[order]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def auc_bins(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """The run-AUC histogram bin of each logit (monotonic in the logit; +-inf in the end bins)."""
    t = np.arcsinh(logits * (1.0 / AUC_SCALE))  # |logit| <= ~745 or inf: no overflow
    np.clip(t, -AUC_T_MAX, AUC_T_MAX, out=t)  # +-inf: the end bins
    # In place, shifted to >= 0 so that truncation is the floor (~8 us per 1,000 logits, half of
    # np.floor/np.clip on copies).
    t *= 1.0 / AUC_BIN_WIDTH
    t += AUC_BINS // 2
    index = t.astype(np.intp)
    np.minimum(index, AUC_BINS - 1, out=index)
    return index


def macro_f1(confusion: npt.NDArray[np.int64]) -> float:
    """Macro F1 over the classes seen as labels (rows: label, columns: prediction); NaN if none."""
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)  # tp + fn
    predicted = confusion.sum(axis=0).astype(np.float64)  # tp + fp
    seen = support > 0
    if not seen.any():
        return math.nan
    f1 = 2.0 * tp[seen] / (support[seen] + predicted[seen])
    return float(f1.mean())


class ProgressiveMetrics:
    """Whole-run and windowed progressive metrics of one task (see the module's docstring).

    ``update`` takes per-record pre-update losses (finite: the caller leaves out
    the non-finite ones), predictions (the value for regression, the class index
    otherwise, 0/1 for binary) and labels. Reads and updates may come from
    different threads (a scrape reads while the worker updates): a lock keeps
    them consistent.
    """

    def __init__(self, task: str, n_classes: int | None = None, window: int = 1000) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        if window < 1:
            raise ValueError("window must be at least 1")
        if task == "multiclass" and (n_classes is None or n_classes < 2):
            raise ValueError("a multiclass task needs n_classes >= 2")
        self.task = task
        self.n_classes = n_classes if task == "multiclass" else (2 if task == "binary" else None)
        self.window = window
        self._lock = threading.Lock()
        self.reset()

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics of this task, in report order."""
        return TASK_METRICS[self.task]

    def reset(self) -> None:
        """Forget everything: a run that starts from nothing."""
        with self._lock:
            self.count = 0
            self.loss_sum = 0.0
            self.correct = 0
            # Regression: error sums, and the labels' mean and sum of squared deviations (Chan's
            # merge of per-batch moments: no cancellation for labels around 43,000).
            self.absolute_error_sum = 0.0
            self.squared_error_sum = 0.0
            self.label_mean = 0.0
            self.label_m2 = 0.0
            self.first_loss_sum = 0.0
            self.first_count = 0
            # Binary: negatives per bin, then positives per bin, in one array (one np.add.at a batch).
            self._auc_counts = np.zeros(2 * AUC_BINS, dtype=np.int64) if self.task == "binary" else None
            self.auc_negative = self._auc_counts[:AUC_BINS] if self._auc_counts is not None else None
            self.auc_positive = self._auc_counts[AUC_BINS:] if self._auc_counts is not None else None
            k = self.n_classes if self.task == "multiclass" else None
            self.confusion = np.zeros((k, k), dtype=np.int64) if k is not None else None
            # The window: ring buffers of the last ``window`` records; ``_next`` is where the next
            # record goes, ``_filled`` how many are held.
            self._losses = np.zeros(self.window, dtype=np.float64)
            self._predictions = np.zeros(self.window, dtype=np.float64)
            self._labels = np.zeros(self.window, dtype=np.float64)
            self._next = 0
            self._filled = 0

    # -- updates ----------------------------------------------------------------

    def update(
        self,
        losses: npt.NDArray[np.float64],
        predictions: npt.NDArray[np.float64],
        labels: npt.NDArray[np.float64],
    ) -> BatchSums:
        """Measure a batch (records in stream order); returns its sums for the counters."""
        n = int(losses.shape[0])
        if n == 0:
            return BatchSums()
        losses = np.asarray(losses, dtype=np.float64)
        predictions = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.float64)
        loss_sum = float(losses.sum())
        with self._lock:
            self.count += n
            self.loss_sum += loss_sum
            if self.first_count < self.window:
                take = min(n, self.window - self.first_count)
                self.first_loss_sum += float(losses[:take].sum())
                self.first_count += take
            self._push(losses, predictions, labels)
            if self.task == "regression":
                return self._update_regression(n, loss_sum, predictions, labels)
            correct = int(np.count_nonzero(predictions == labels))
            self.correct += correct
            if self._auc_counts is not None:
                # np.add.at over (label, bin): 2-7 us for 200-5,000 records, where a bincount over
                # the 19,200 counts costs 5-11 us.
                key = auc_bins(logits_from_bce(losses, labels))
                key[labels > 0.5] += AUC_BINS
                np.add.at(self._auc_counts, key, 1)
            if self.confusion is not None:
                k = self.confusion.shape[0]
                true, predicted = labels.astype(np.int64), predictions.astype(np.int64)
                inside = (true >= 0) & (true < k) & (predicted >= 0) & (predicted < k)
                if not inside.all():
                    true, predicted = true[inside], predicted[inside]
                self.confusion += np.bincount(true * k + predicted, minlength=k * k).reshape(k, k)
            return BatchSums(records=n, loss_sum=loss_sum, correct=correct)

    def _update_regression(
        self, n: int, loss_sum: float, predictions: npt.NDArray[np.float64], labels: npt.NDArray[np.float64]
    ) -> BatchSums:
        errors = predictions - labels
        absolute = float(np.abs(errors).sum())
        squared = float(errors @ errors)
        self.absolute_error_sum += absolute
        self.squared_error_sum += squared
        before = self.count - n
        mean = float(labels.mean())
        deviations = labels - mean
        m2 = float(deviations @ deviations)
        delta = mean - self.label_mean
        self.label_m2 += m2 + delta * delta * before * n / self.count
        self.label_mean += delta * n / self.count
        return BatchSums(
            records=n,
            loss_sum=loss_sum,
            absolute_error_sum=absolute,
            squared_error_sum=squared,
            label_sum_positive=float(labels[labels > 0].sum()),
            label_sum_negative=-float(labels[labels < 0].sum()),
            label_squared_sum=float(labels @ labels),
        )

    def _push(
        self,
        losses: npt.NDArray[np.float64],
        predictions: npt.NDArray[np.float64],
        labels: npt.NDArray[np.float64],
    ) -> None:
        """Write a batch into the ring buffers (only its last ``window`` records matter)."""
        n, size = int(losses.shape[0]), self.window
        if n >= size:
            self._losses[:] = losses[-size:]
            self._predictions[:] = predictions[-size:]
            self._labels[:] = labels[-size:]
            self._next, self._filled = 0, size
            return
        first = min(n, size - self._next)
        for ring, values in (
            (self._losses, losses),
            (self._predictions, predictions),
            (self._labels, labels),
        ):
            ring[self._next : self._next + first] = values[:first]
            ring[: n - first] = values[first:]
        self._next = (self._next + n) % size
        self._filled = min(size, self._filled + n)

    def _window_arrays(
        self,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The window's losses, predictions and labels, oldest first (copies)."""
        if self._filled < self.window:
            end = self._filled
            return self._losses[:end].copy(), self._predictions[:end].copy(), self._labels[:end].copy()
        order = np.r_[np.arange(self._next, self.window), np.arange(0, self._next)]
        return self._losses[order], self._predictions[order], self._labels[order]

    # -- reads ------------------------------------------------------------------

    @property
    def mean_loss(self) -> float:
        """Mean loss over the whole run (NaN before the first record)."""
        with self._lock:
            return self.loss_sum / self.count if self.count else math.nan

    @property
    def window_loss(self) -> float:
        """Mean loss over the window (NaN before the first record)."""
        with self._lock:
            return float(self._losses[: self._filled].mean()) if self._filled else math.nan

    @property
    def first_window_loss(self) -> float:
        """Mean loss over the run's first ``window`` records."""
        with self._lock:
            return self.first_loss_sum / self.first_count if self.first_count else math.nan

    @property
    def run_auc_error_bound(self) -> float:
        """Binary: the most the run's ROC AUC can be off the exact one (NaN while undefined)."""
        with self._lock:
            if self.auc_positive is None or self.auc_negative is None:
                return math.nan
            p, n = int(self.auc_positive.sum()), int(self.auc_negative.sum())
            if p == 0 or n == 0:
                return math.nan
            pairs = float(self.auc_positive.astype(np.float64) @ self.auc_negative.astype(np.float64))
            return 0.5 * pairs / (p * n)

    def run_values(self) -> dict[str, float]:
        """Each metric of the task over the whole run."""
        with self._lock:
            return self._run_values()

    def window_values(self) -> dict[str, float]:
        """Each metric of the task over the last ``window`` records."""
        with self._lock:
            return self._window_values()

    def report(self) -> ProgressiveReport:
        """Run and window figures, named, in one consistent snapshot."""
        with self._lock:
            return ProgressiveReport(
                task=self.task,
                records=self.count,
                window_size=self.window,
                window_records=self._filled,
                run=self._run_values(),
                window=self._window_values(),
                first_window_loss=self.first_loss_sum / self.first_count if self.first_count else math.nan,
            )

    def _run_values(self) -> dict[str, float]:
        n = self.count
        if n == 0:
            return dict.fromkeys(self.metric_names, math.nan)
        values = {"loss": self.loss_sum / n}
        if self.task == "regression":
            values["mae"] = self.absolute_error_sum / n
            values["rmse"] = math.sqrt(self.squared_error_sum / n)
            values["r2"] = 1.0 - self.squared_error_sum / self.label_m2 if self.label_m2 > 0 else math.nan
            return values
        values["accuracy"] = self.correct / n
        if self.auc_positive is not None and self.auc_negative is not None:
            values["roc_auc"] = _histogram_auc(self.auc_positive, self.auc_negative)
        if self.confusion is not None:
            values["macro_f1"] = macro_f1(self.confusion)
        return values

    def _window_values(self) -> dict[str, float]:
        if self._filled == 0:
            return dict.fromkeys(self.metric_names, math.nan)
        losses, predictions, labels = self._window_arrays()
        values = {"loss": float(losses.mean())}
        if self.task == "regression":
            errors = predictions - labels
            values["mae"] = float(np.abs(errors).mean())
            values["rmse"] = math.sqrt(float(errors @ errors) / errors.shape[0])
            deviations = labels - labels.mean()
            sst = float(deviations @ deviations)
            values["r2"] = 1.0 - float(errors @ errors) / sst if sst > 0 else math.nan
            return values
        values["accuracy"] = float(np.count_nonzero(predictions == labels)) / losses.shape[0]
        if self.task == "binary":
            values["roc_auc"] = roc_auc(logits_from_bce(losses, labels), labels)
        elif self.confusion is not None:
            k = self.confusion.shape[0]
            true, predicted = labels.astype(np.int64), predictions.astype(np.int64)
            inside = (true >= 0) & (true < k) & (predicted >= 0) & (predicted < k)
            counts = np.bincount(true[inside] * k + predicted[inside], minlength=k * k)
            values["macro_f1"] = macro_f1(counts.reshape(k, k))
        return values

    # -- state ------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
        """The run and the window: numpy arrays (for safetensors) and JSON-able scalars. No pickle."""
        with self._lock:
            losses, predictions, labels = self._window_arrays()
            arrays: dict[str, npt.NDArray[Any]] = {
                "window_losses": losses,
                "window_predictions": predictions,
                "window_labels": labels,
            }
            if self.auc_positive is not None and self.auc_negative is not None:
                # Only the non-empty bins (a few hundred of 9,600 on a typical run).
                used = np.flatnonzero((self.auc_positive > 0) | (self.auc_negative > 0)).astype(np.int64)
                arrays["auc_bins"] = used
                arrays["auc_positive"] = self.auc_positive[used].copy()
                arrays["auc_negative"] = self.auc_negative[used].copy()
            if self.confusion is not None:
                arrays["confusion"] = self.confusion.copy()
            scalars: dict[str, Any] = {
                "version": _STATE_VERSION,
                "task": self.task,
                "n_classes": self.n_classes,
                "window": self.window,
                "count": self.count,
                "loss_sum": self.loss_sum,
                "correct": self.correct,
                "absolute_error_sum": self.absolute_error_sum,
                "squared_error_sum": self.squared_error_sum,
                "label_mean": self.label_mean,
                "label_m2": self.label_m2,
                "first_loss_sum": self.first_loss_sum,
                "first_count": self.first_count,
                "auc_bin_width": AUC_BIN_WIDTH,
                "auc_scale": AUC_SCALE,
                "auc_bins": AUC_BINS,
            }
            return arrays, scalars

    def load_state_dict(self, arrays: dict[str, npt.NDArray[Any]], scalars: dict[str, Any]) -> None:
        """Adopt :meth:`state_dict`'s output. A state of another task, class count or AUC binning
        raises ``ValueError`` (nothing changed); one of another window size keeps its newest records.
        """
        if scalars.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown progressive state version {scalars.get('version')!r}")
        if scalars.get("task") != self.task or scalars.get("n_classes") != self.n_classes:
            raise ValueError(
                f"progressive state of a {scalars.get('task')} task ({scalars.get('n_classes')} classes), "
                f"not {self.task} ({self.n_classes})"
            )
        if self.task == "binary" and (
            scalars.get("auc_bin_width") != AUC_BIN_WIDTH
            or scalars.get("auc_scale") != AUC_SCALE
            or scalars.get("auc_bins") != AUC_BINS
        ):
            raise ValueError("progressive state with another ROC AUC histogram")
        losses = np.asarray(arrays["window_losses"], dtype=np.float64)
        predictions = np.asarray(arrays["window_predictions"], dtype=np.float64)
        labels = np.asarray(arrays["window_labels"], dtype=np.float64)
        if not losses.shape == predictions.shape == labels.shape or losses.ndim != 1:
            raise ValueError("progressive state: window arrays of different shapes")
        auc_counts = confusion = None
        if self.task == "binary":
            bins = np.asarray(arrays["auc_bins"], dtype=np.int64)
            if bins.size and (bins.min() < 0 or bins.max() >= AUC_BINS):
                raise ValueError("progressive state: ROC AUC bin out of range")
            auc_counts = np.zeros(2 * AUC_BINS, dtype=np.int64)
            auc_counts[bins] = np.asarray(arrays["auc_negative"], dtype=np.int64)
            auc_counts[AUC_BINS + bins] = np.asarray(arrays["auc_positive"], dtype=np.int64)
        if self.task == "multiclass":
            confusion = np.asarray(arrays["confusion"], dtype=np.int64).copy()
            k = self.n_classes
            if confusion.shape != (k, k):
                raise ValueError(f"progressive state: confusion matrix of shape {confusion.shape}")
        self.reset()
        with self._lock:
            self.count = int(scalars["count"])
            self.loss_sum = float(scalars["loss_sum"])
            self.correct = int(scalars["correct"])
            self.absolute_error_sum = float(scalars["absolute_error_sum"])
            self.squared_error_sum = float(scalars["squared_error_sum"])
            self.label_mean = float(scalars["label_mean"])
            self.label_m2 = float(scalars["label_m2"])
            self.first_loss_sum = float(scalars["first_loss_sum"])
            self.first_count = int(scalars["first_count"])
            if self._auc_counts is not None and auc_counts is not None:
                self._auc_counts[:] = auc_counts
            self.confusion = confusion
            if losses.shape[0]:
                self._push(losses, predictions, labels)


def _histogram_auc(positive: npt.NDArray[np.int64], negative: npt.NDArray[np.int64]) -> float:
    """ROC AUC from per-bin counts (bins in logit order; a pair within a bin counts one half)."""
    p, n = int(positive.sum()), int(negative.sum())
    if p == 0 or n == 0:
        return math.nan
    pos, neg = positive.astype(np.float64), negative.astype(np.float64)
    below = np.cumsum(neg) - neg  # negatives in lower bins
    return float(pos @ (below + 0.5 * neg)) / (p * n)


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def describe(report: ProgressiveReport) -> str:
    """The summary line's figures: the whole run, then the window in parentheses, each named.

    e.g. ``prequential over 12,345 records: accuracy 87.52% (last 1,000: 89.32%), log loss
    0.3120 (0.2700), ROC AUC 0.9340 (0.9510)``.
    """
    parts = []
    for i, (label, run, window) in enumerate(named_figures(report)):
        where = f"last {report.window_records:,}: " if i == 0 else ""
        parts.append(f"{label} {run} ({where}{window})")
    return f"prequential over {report.records:,} records: " + ", ".join(parts)


def named_figures(report: ProgressiveReport) -> list[tuple[str, str, str]]:
    """(label, whole-run figure, window figure) of each metric, formatted ("-" while undefined)."""
    return [
        (
            _LABELS[report.task].get(name, name),
            _format(name, report.run[name]),
            _format(name, report.window[name]),
        )
        for name in _SUMMARY_ORDER[report.task]
    ]


_SUMMARY_ORDER = {
    "binary": ("accuracy", "loss", "roc_auc"),
    "multiclass": ("accuracy", "loss", "macro_f1"),
    "regression": ("mae", "rmse", "r2", "loss"),
}
_LABELS = {
    "binary": {"loss": "log loss", "roc_auc": "ROC AUC"},
    "multiclass": {"loss": "log loss", "macro_f1": "macro F1"},
    "regression": {"mae": "MAE", "rmse": "RMSE", "r2": "R2"},
}


def _format(name: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    if name == "accuracy":
        return f"{value:.2%}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
