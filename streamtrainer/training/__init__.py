"""Models, online learning and prequential evaluation. Knows nothing of Kafka."""

from streamtrainer.training.learner import LearnerConfig, OnlineLearner, StepResult
from streamtrainer.training.prequential import PrequentialMetrics

__all__ = ["LearnerConfig", "OnlineLearner", "PrequentialMetrics", "StepResult"]
