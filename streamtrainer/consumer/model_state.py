"""The parts of a worker's model that a restore replaces, shared by the worker's parts.

A checkpoint holds the learner, the input schema (the decoder's), the drift detector's state and,
per partition, the next offset to read. A restore (at start, after a rollback) replaces all four
at once; membership (where partitions start), durability (what a checkpoint records) and a polled
batch (what it trains on, where offsets move) read them from here, so none holds a stale copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamtrainer.consumer.offsets import OffsetTracker
from streamtrainer.records import BatchDecoder
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import OnlineLearner
from streamtrainer.training.drift import LossDriftDetector, loss_drift_detector


@dataclass(slots=True)
class ModelState:
    """The model as a checkpoint holds it: learner, schema, drift detector and trained positions.

    ``learner`` is None until the first trainable batch (or a checkpoint, or --init-from) fixes the
    number of features.
    """

    decoder: BatchDecoder
    drift: LossDriftDetector | None
    offsets: OffsetTracker
    learner: OnlineLearner | None = None


def new_decoder(
    settings: WorkerSettings, n_features: int | None, feature_names: list[str] | None
) -> BatchDecoder:
    """A decoder of this schema (None: the first record fixes it)."""
    return BatchDecoder(
        n_features=n_features,
        feature_names=feature_names,
        max_value_bytes=settings.max_value_bytes,
    )


def new_drift_detector(settings: WorkerSettings) -> LossDriftDetector | None:
    """A fresh drift detector on the prequential loss (None with --drift-detector none)."""
    if settings.drift_detector == "none":
        return None
    return loss_drift_detector(
        delta=settings.drift_delta,
        threshold=settings.drift_threshold,
        min_instances=settings.drift_min_instances,
    )


def fresh_state(settings: WorkerSettings) -> ModelState:
    """No model yet: the configured schema (if any), a new drift detector, no positions."""
    return ModelState(
        decoder=new_decoder(settings, settings.n_features, settings.feature_names),
        drift=new_drift_detector(settings),
        offsets=OffsetTracker(),
    )
