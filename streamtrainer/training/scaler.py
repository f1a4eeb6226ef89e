"""Online feature standardization: running mean and variance, updated per record.

Each record first updates the statistics, then is standardized with them (as
river's StandardScaler does), so a record is never scaled with statistics from
the future. A whole batch is processed at once with prefix sums, yet every row
gets exactly the statistics it would have had record by record.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class RunningStandardizer:
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
