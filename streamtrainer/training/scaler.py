"""Online feature standardization: running mean and variance, updated per record.

Each record first updates the statistics, then is standardized with them (as
river's StandardScaler does), so a record is never scaled with statistics from
the future. A whole batch is processed at once with prefix sums, yet every row
gets exactly the statistics it would have had record by record.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt


class RunningStandardizer:
    """Running per-feature mean and variance; rows standardized by their prefix statistics."""

    def __init__(self, n_features: int, *, eps: float = 1e-8) -> None:
        self.n_features = n_features
        self.eps = eps
        self.count = 0
        self.mean = np.zeros(n_features, dtype=np.float64)
        # Sum of squared deviations from the mean (Welford's M2).
        self.m2 = np.zeros(n_features, dtype=np.float64)

    def learn_transform(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Update with each row in order and return each row standardized by its prefix statistics."""
        n = features.shape[0]
        if n == 0:
            return features
        # Center on the old mean so the prefix sums stay numerically small.
        centered = features.astype(np.float64) - self.mean
        counts = (self.count + np.arange(1, n + 1, dtype=np.float64))[:, None]
        sum1 = np.cumsum(centered, axis=0)
        sum2 = np.cumsum(centered * centered, axis=0)
        mean_shift = sum1 / counts
        m2 = self.m2 + sum2 - sum1 * sum1 / counts
        np.maximum(m2, 0.0, out=m2)  # rounding must not make a variance negative
        std = np.sqrt(m2 / counts + self.eps)
        out = (centered - mean_shift) / std
        self.count += n
        self.mean = self.mean + mean_shift[-1]
        self.m2 = m2[-1].copy()
        return out.astype(np.float32)

    def transform(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Standardize with the current statistics, without learning from ``features``."""
        if self.count == 0:
            return np.zeros_like(features, dtype=np.float32)
        std = np.sqrt(self.m2 / self.count + self.eps)
        return ((features - self.mean) / std).astype(np.float32)

    def state_dict(self) -> dict[str, npt.NDArray[np.float64]]:
        return {
            "count": np.array([self.count], dtype=np.float64),
            "mean": self.mean.copy(),
            "m2": self.m2.copy(),
        }

    def load_state_dict(self, state: dict[str, npt.NDArray[np.float64]]) -> None:
        self.count = int(state["count"][0])
        self.mean = np.asarray(state["mean"], dtype=np.float64).copy()
        self.m2 = np.asarray(state["m2"], dtype=np.float64).copy()


class TargetStandardizer:
    """Online standardization of a regression label, so that its scale and offset need no tuning.

    The model learns ``t = (y - mean) / std``; a prediction ``s`` of the model means
    ``mean + std * s`` in the label's units. Each record's training target uses the
    statistics including that record (as the features', so ``|t| <= sqrt(n - 1)``:
    a target cannot explode however the labels run), while its prediction is
    de-standardized with the statistics *before* it (the label is not known when it
    is predicted: the prequential measurement stays honest). Before the first record
    the scale is 1 and the mean 0; after one, the mean is that label.

    Why: a label around 43 made the intercept crawl at a step of 0.01 (the MAE was 2.4x
    River's) and diverge at 0.1; standardized, the same default step fits a label of
    43 or 43,000 (bench/quality.py measures it).
    """

    def __init__(self, *, eps: float = 1e-8) -> None:
        self.eps = eps
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def std(self) -> float:
        """The current scale (1 before any record)."""
        return math.sqrt(self.m2 / self.count + self.eps) if self.count else 1.0

    def learn_transform(
        self, labels: npt.NDArray[np.floating[Any]]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Learn from each finite label in order; return the targets and each record's prior mean and std.

        A non-finite label is left out of the statistics; its target is NaN.
        """
        y = np.asarray(labels, dtype=np.float64)
        n = y.shape[0]
        targets = np.full(n, np.nan, dtype=np.float32)
        prior_mean = np.empty(n, dtype=np.float64)
        prior_std = np.empty(n, dtype=np.float64)
        finite = np.isfinite(y)
        values = y[finite]
        m = values.shape[0]
        # Prefix sums centred on the old mean, as RunningStandardizer.learn_transform does.
        centered = values - self.mean
        counts = self.count + np.arange(1, m + 1, dtype=np.float64)
        sum1 = np.cumsum(centered)
        m2 = self.m2 + np.cumsum(centered * centered) - sum1 * sum1 / counts
        np.maximum(m2, 0.0, out=m2)
        means = self.mean + sum1 / counts
        stds = np.sqrt(m2 / counts + self.eps)
        targets[finite] = ((values - means) / stds).astype(np.float32)
        # Statistics before each finite record: those after the previous finite one.
        before_mean = np.concatenate(([self.mean], means[:-1]))
        before_std = np.concatenate(([self.std], stds[:-1]))
        slot = np.cumsum(finite) - finite  # finite records seen before each row
        prior_mean[:] = np.concatenate((before_mean, [means[-1] if m else self.mean]))[slot]
        prior_std[:] = np.concatenate((before_std, [stds[-1] if m else self.std]))[slot]
        if m:
            self.count += m
            self.mean = float(means[-1])
            self.m2 = float(m2[-1])
        return targets, prior_mean, prior_std

    def transform(self, labels: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
        """Targets under the current statistics, without learning from ``labels``."""
        return ((np.asarray(labels, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def inverse(self, outputs: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
        """Model outputs in the label's units under the current statistics."""
        return self.mean + self.std * np.asarray(outputs, dtype=np.float64)

    def state_dict(self) -> dict[str, npt.NDArray[np.float64]]:
        """The statistics as arrays (for safetensors)."""
        return {"count": np.array([self.count], dtype=np.float64), "stats": np.array([self.mean, self.m2])}

    def load_state_dict(self, state: dict[str, npt.NDArray[np.float64]]) -> None:
        """Adopt ``state_dict``'s statistics."""
        self.count = int(state["count"][0])
        self.mean, self.m2 = (float(v) for v in state["stats"])
