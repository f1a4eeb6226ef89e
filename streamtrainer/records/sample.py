"""The unit of data that flows through the system: features, a label, an optional key."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Sample:
    """One training example.

    ``features`` is a 1-D float array; ``label`` is the regression target, the
    0/1 class for binary tasks, or the class index for multi-class tasks.
    ``key`` is the Kafka record key (an entity id), ``timestamp_ms`` the record
    timestamp (``None`` lets the broker/producer assign it).
    """

    features: npt.NDArray[np.float32]
    label: float
    key: bytes | None = None
    timestamp_ms: int | None = None

    @staticmethod
    def of(
        features: object,
        label: float,
        key: bytes | str | None = None,
        timestamp_ms: int | None = None,
    ) -> Sample:
        """Build a sample from any array-like of numbers."""
        array = np.ascontiguousarray(features, dtype=np.float32).reshape(-1)
        raw_key = key.encode() if isinstance(key, str) else key
        return Sample(array, float(label), raw_key, timestamp_ms)
