"""What a decoded batch still needs before training: labels the task can learn from."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from streamtrainer.records import DecodedBatch, DecodeError
from streamtrainer.training import OnlineLearner

Trainable = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.intp]]


def trainable_rows(
    batch: DecodedBatch, learner: OnlineLearner, errors: list[tuple[int, DecodeError]]
) -> Trainable:
    """Features, labels and batch positions of the rows ``learner`` can train on.

    Rows whose label does not fit the task (a class index out of range, a
    binary label other than 0/1) are appended to ``errors`` as ``label_out_of_range``.
    """
    features, labels, index = batch.features, batch.labels, batch.index
    if not len(batch):
        return features, labels, index
    valid = learner.valid_labels(labels)
    if valid.all():
        return features, labels, index
    for position in index[~valid]:
        errors.append((int(position), DecodeError("label_out_of_range", "label does not fit the task")))
    return features[valid], labels[valid], index[valid]
