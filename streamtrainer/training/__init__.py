"""Models, online learning and progressive (prequential) evaluation. Knows nothing of Kafka.

The names below are loaded on first use (PEP 562), so that importing a torch-free
part of the package (:mod:`streamtrainer.training.catalog`, read by the settings
before a usage error is reported) does not import torch (1-2 s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamtrainer.training.learner import LearnerConfig, OnlineLearner, PendingSteps, StepResult
    from streamtrainer.training.progressive import BatchSums, ProgressiveMetrics, ProgressiveReport

_EXPORTS = {
    "BatchSums": "streamtrainer.training.progressive",
    "LearnerConfig": "streamtrainer.training.learner",
    "OnlineLearner": "streamtrainer.training.learner",
    "PendingSteps": "streamtrainer.training.learner",
    "ProgressiveMetrics": "streamtrainer.training.progressive",
    "ProgressiveReport": "streamtrainer.training.progressive",
    "StepResult": "streamtrainer.training.learner",
}

__all__ = [
    "BatchSums",
    "LearnerConfig",
    "OnlineLearner",
    "PendingSteps",
    "ProgressiveMetrics",
    "ProgressiveReport",
    "StepResult",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
