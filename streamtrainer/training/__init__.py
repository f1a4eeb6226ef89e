"""Models, online learning and prequential evaluation. Knows nothing of Kafka."""

from streamtrainer.training.learner import LearnerConfig, OnlineLearner, PendingSteps, StepResult
from streamtrainer.training.prequential import PrequentialMetrics

__all__ = ["LearnerConfig", "OnlineLearner", "PendingSteps", "PrequentialMetrics", "StepResult"]
