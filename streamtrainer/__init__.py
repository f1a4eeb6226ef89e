"""streamtrainer: train PyTorch models on a Kafka stream.

The Python API (docs/python-api.md) is what this package exports:

* :class:`OnlineLearner` (``OnlineLearner.from_module(module, task=...)``), with
  ``learn_one`` / ``learn_many`` / ``predict_one`` / ``predict_many`` /
  ``predict_proba_one`` / ``predict_proba_many``; :class:`LearnerConfig`,
  :class:`StepResult`; :class:`ProgressiveMetrics` and :class:`ProgressiveReport`
  (prequential evaluation);
* :class:`Worker` (``Worker(settings, model=...)``, a consumer-group member in the
  caller's process) and :class:`WorkerStatus`;
* the settings: :class:`WorkerSettings`, :class:`KafkaSettings` (built in code they
  read no environment variable; ``WorkerSettings.load`` reads them as the CLI does);
* :func:`load_model`: a trained model from a checkpoint, for predictions (docs/serving.md).

The names are loaded on first use (PEP 562): ``import streamtrainer`` imports
neither torch nor the Kafka client, so the CLI reports a usage error before
either is imported (1-2 s).

Data flows producer -> records (codec) -> consumer -> training -> metrics; a
module only imports modules at or after its own stage (training knows nothing
of Kafka).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamtrainer.consumer.worker import Worker, WorkerStatus
    from streamtrainer.settings import KafkaSettings, WorkerSettings
    from streamtrainer.training.learner import LearnerConfig, OnlineLearner, StepResult
    from streamtrainer.training.predictor import load_model  # issue 19, helper C's module
    from streamtrainer.training.progressive import ProgressiveMetrics, ProgressiveReport

__version__ = "0.1.0"

# Each public name and the module it is loaded from on first use.
_EXPORTS = {
    "KafkaSettings": "streamtrainer.settings",
    "LearnerConfig": "streamtrainer.training.learner",
    "OnlineLearner": "streamtrainer.training.learner",
    "ProgressiveMetrics": "streamtrainer.training.progressive",
    "ProgressiveReport": "streamtrainer.training.progressive",
    "StepResult": "streamtrainer.training.learner",
    "Worker": "streamtrainer.consumer.worker",
    "WorkerSettings": "streamtrainer.settings",
    "WorkerStatus": "streamtrainer.consumer.worker",
    # Issue 19, helper C: streamtrainer/training/predictor.py (load_model -> Predictor).
    "load_model": "streamtrainer.training.predictor",
}

__all__ = [
    "KafkaSettings",
    "LearnerConfig",
    "OnlineLearner",
    "ProgressiveMetrics",
    "ProgressiveReport",
    "StepResult",
    "Worker",
    "WorkerSettings",
    "WorkerStatus",
    "load_model",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
