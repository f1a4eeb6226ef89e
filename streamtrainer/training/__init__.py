"""Models, online learning and progressive (prequential) evaluation. Knows nothing of Kafka."""

from streamtrainer.training.learner import LearnerConfig, OnlineLearner, PendingSteps, StepResult
from streamtrainer.training.progressive import BatchSums, ProgressiveMetrics, ProgressiveReport

__all__ = [
    "BatchSums",
    "LearnerConfig",
    "OnlineLearner",
    "PendingSteps",
    "ProgressiveMetrics",
    "ProgressiveReport",
    "StepResult",
]
