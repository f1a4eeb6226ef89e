"""Prequential (test-then-train) evaluation, as river's progressive validation does.

Each record's loss is measured with the model as it was *before* learning from
that record, so the running loss is an honest estimate of the error on unseen
data. This keeps an exponentially weighted loss (bias-corrected, so early
values are not pulled toward zero), accuracy for classification and mean
absolute error for regression, plus the mean loss over the first and the last
window for the run summary.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import numpy.typing as npt


class ExponentialMean:
    """A bias-corrected exponentially weighted mean, updated a batch at a time."""

    def __init__(self, span: int) -> None:
        self.alpha = 2.0 / (span + 1.0)
        self._weighted_sum = 0.0
        self._weight = 0.0

    def update(self, values: npt.NDArray[np.float64]) -> None:
        n = values.shape[0]
        if n == 0:
            return
        keep = 1.0 - self.alpha
        # Weight of value i is alpha * keep^(n-1-i): the newest counts most.
        weights = self.alpha * keep ** np.arange(n - 1, -1, -1, dtype=np.float64)
        decay = keep**n
        self._weighted_sum = decay * self._weighted_sum + float(weights @ values)
        self._weight = decay * self._weight + float(weights.sum())

    @property
    def value(self) -> float:
        return self._weighted_sum / self._weight if self._weight > 0 else float("nan")


class PrequentialMetrics:
    def __init__(self, task: str, window: int = 1000) -> None:
        self.task = task
        self.window = window
        self.count = 0
        self.loss_sum = 0.0
        self.loss = ExponentialMean(window)
        # accuracy for classification, mean absolute error for regression
        self.score = ExponentialMean(window)
        self._first: list[float] = []
        self._last: deque[npt.NDArray[np.float64]] = deque()
        self._last_count = 0

    @property
    def score_name(self) -> str:
        return "mae" if self.task == "regression" else "accuracy"

    def update(
        self,
        losses: npt.NDArray[np.float64],
        predictions: npt.NDArray[np.float64],
        labels: npt.NDArray[np.float64],
    ) -> None:
        """``predictions`` are values for regression, class indices (0/1 for binary) otherwise."""
        n = losses.shape[0]
        if n == 0:
            return
        self.count += n
        self.loss_sum += float(losses.sum())
        self.loss.update(losses)
        if self.task == "regression":
            self.score.update(np.abs(predictions - labels))
        else:
            self.score.update((predictions == labels).astype(np.float64))
        if len(self._first) < self.window:
            self._first.extend(losses[: self.window - len(self._first)].tolist())
        self._last.append(losses)
        self._last_count += n
        while self._last_count - self._last[0].shape[0] >= self.window:
            self._last_count -= self._last.popleft().shape[0]

    @property
    def first_window_loss(self) -> float:
        return float(np.mean(self._first)) if self._first else float("nan")

    @property
    def last_window_loss(self) -> float:
        if not self._last:
            return float("nan")
        return float(np.concatenate(list(self._last))[-self.window :].mean())

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")
