"""The contenders: the worker's learner at the worker's defaults, and River's models.

The worker's side is built the way the worker builds it, from ``WorkerSettings``
(field defaults, plus the task and any ``--override``): the ``LearnerConfig``
takes every field the settings define under the same name (or a ``resolved_``
property, such as ``resolved_task``), so a default changed in the settings or a
field added to both is picked up here without an edit (a test checks that the
config equals the worker's own ``Worker._create_learner``); the compactor is the
one a ``Worker`` on the same settings creates. The stream is fed in chunks
("polls") of at most ``CHUNK`` records that, like the worker's polls, never run
past the next compaction, so compactions fall on the same records as in a
worker; the drift detector a ``Worker`` on the settings creates watches the
prequential losses and, on a detection, asks for a drift compaction, as in the
worker. Records are learned strictly test-then-train (``learn_many``), through
the compiled loop from the first record (the learner waits for it first: both
paths agree to float32 rounding, and this keeps runs reproducible).

River's side: ``StandardScaler | LogisticRegression / LinearRegression /
SoftmaxRegression`` at River's defaults, and its nonlinear learners (Hoeffding
tree, kNN on standardized features, adaptive random forest), each predicting a
record and then learning it, on the same float32 values as dicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.quality.datasets import Dataset, Stream
from bench.quality.metrics import Predictions
from streamtrainer.consumer.worker import Worker
from streamtrainer.consumer.worker import learner_config as worker_learner_config
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import LearnerConfig, OnlineLearner
from streamtrainer.training.threads import set_intra_op_threads

logger = logging.getLogger(__name__)

# Records per "poll". The worker polls up to poll_batch (10,000) records, fewer while updates are slow
# and never past the next compaction; in strict mode the chunk size changes nothing but rounding
# (~1e-15 in a metric) and where a compaction may fall, which is mirrored (records_until_due).
CHUNK = 500
# The compiled loop compiles in the background on first use (seconds; cached on disk after that).
_COMPILE_TIMEOUT_S = 300.0

Overrides = Mapping[str, object]


@dataclass(frozen=True)
class Run:
    """One contender's pass over one stream."""

    predictions: Predictions
    seconds: float
    notes: dict[str, object] = dataclasses.field(default_factory=dict)


# -- the worker ----------------------------------------------------------------------------------


def worker_settings(
    dataset: Dataset, *, model: str | None, overrides: Overrides, directory: Path | None = None
) -> WorkerSettings:
    """The worker's settings for this task: its defaults, the task, and the overrides that are settings.

    ``directory``: where its checkpoints and compaction store would go (nothing is written there
    while the records fit in the store's memory).
    """
    fields = WorkerSettings.model_fields
    values: dict[str, Any] = {"topic": "bench-quality", "task": dataset.kind}
    if directory is not None:
        values["checkpoint_dir"] = directory
    if model is not None:
        values["model"] = model
    else:
        values["model"] = {"regression": "linear", "binary": "logistic", "multiclass": "softmax"}[
            dataset.kind
        ]
    if dataset.kind == "multiclass":
        values["n_classes"] = dataset.n_classes
    values.update({k: v for k, v in overrides.items() if k in fields})
    return WorkerSettings(**values)


def learner_config(settings: WorkerSettings, overrides: Overrides | None = None) -> LearnerConfig:
    """The ``LearnerConfig`` the worker builds from ``settings``, then any overrides that are config-only.

    The worker's own construction (``streamtrainer.consumer.worker.learner_config``).
    """
    config = worker_learner_config(settings)
    overrides = overrides or {}
    names = {f.name for f in dataclasses.fields(LearnerConfig)}
    extra: dict[str, Any] = {
        k: v for k, v in overrides.items() if k in names and k not in WorkerSettings.model_fields
    }
    return dataclasses.replace(config, **extra) if extra else config


def check_overrides(overrides: Overrides) -> None:
    """Raise ValueError for a key that is neither a worker setting nor a ``LearnerConfig`` field."""
    names = {f.name for f in dataclasses.fields(LearnerConfig)} | set(WorkerSettings.model_fields)
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(
            f"unknown override(s) {', '.join(unknown)}: not a WorkerSettings or LearnerConfig field"
        )


def run_worker(
    dataset: Dataset, stream: Stream, *, model: str | None = None, overrides: Overrides | None = None
) -> Run:
    """Stream the records through the worker's learner and compaction, as the worker would train them.

    The compactor and the drift detector are the ones a ``Worker`` on these settings creates (it
    connects to nothing until it runs); the learner's config is :func:`learner_config`'s.
    """
    overrides = overrides or {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as directory:
        settings = worker_settings(dataset, model=model, overrides=overrides, directory=Path(directory))
        config = learner_config(settings, overrides)
        set_intra_op_threads(settings.torch_threads)
        learner = OnlineLearner(config, stream.features.shape[1])
        compiled = learner.settle_path(timeout_s=_COMPILE_TIMEOUT_S)
        worker = Worker(settings)
        with worker.compactor or contextlib.nullcontext():
            started = time.perf_counter()
            values, losses, counts = _stream_through(worker, learner, stream)
            seconds = time.perf_counter() - started
    drift = worker.drift
    notes: dict[str, object] = {
        "model": config.model,
        "optimizer": config.optimizer,
        "lr": config.lr,
        "compaction": settings.compaction,
        "compactions": sum(counts["compactions"].values()),
        "compaction_reasons": counts["compactions"],
        "drift_detections": drift.detections if drift is not None else 0,
        "compiled_loop": compiled,
    }
    if counts["skipped"] or counts["rollbacks"]:
        notes.update(skipped=counts["skipped"], rollbacks=counts["rollbacks"])
    return Run(_worker_predictions(dataset, stream, values, losses), seconds, notes)


def _stream_through(
    worker: Worker, learner: OnlineLearner, stream: Stream
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], dict[str, Any]]:
    """The worker's training loop without Kafka: polls, strict updates, keep, drift, compactions."""
    compactor, drift = worker.compactor, worker.drift
    n = stream.n
    values = np.full(n, math.nan)
    losses = np.full(n, math.nan)
    compactions: dict[str, int] = {}  # by reason
    skipped = rollbacks = 0
    position = 0
    while position < n:
        budget = CHUNK
        until = compactor.records_until_due() if compactor is not None else None
        if until:
            budget = min(budget, until)
        stop = min(n, position + budget)
        x, y = stream.features[position:stop], stream.labels[position:stop]
        result = learner.learn_many(x, y, batch_size=worker.settings.update_batch)
        values[position:stop] = result.predictions
        losses[position:stop] = result.losses
        skipped += len(result.skipped)
        if result.rollback_needed:
            # The worker would reload its last checkpoint and lower the step: flagged in the notes.
            rollbacks += 1
            learner.reset_guards()
        if compactor is not None:
            offsets = np.arange(position, stop, dtype=np.int64)
            compactor.keep(x, y, np.zeros(stop - position, np.int32), offsets, None, None, result.losses)
        if drift is not None:
            # After keep(), as in the worker: a drift compaction falls on the grid point that ends this
            # batch and replays the records since the estimated change point.
            detections = drift.update(result.losses[np.isfinite(result.losses)])
            if detections and compactor is not None:
                compactor.drift(drift.seen - detections[0].change_at - 1)
        if compactor is not None and (reason := compactor.due()) is not None:
            compactor.run(learner, reason, loss_before=float(np.nanmean(result.losses)))
            compactions[reason] = compactions.get(reason, 0) + 1
        position = stop
    return values, losses, {"compactions": compactions, "skipped": skipped, "rollbacks": rollbacks}


def _worker_predictions(
    dataset: Dataset, stream: Stream, values: np.ndarray, losses: np.ndarray
) -> Predictions:
    """The learner's per-record predictions, with the probabilities its losses imply.

    Its classification losses are the log loss of the true class (binary cross-entropy on the
    logit, cross-entropy on the logits), so p(true class) = exp(-loss) exactly; a non-finite
    loss leaves the probability unknown (NaN: counted as p = 1e-15 by the log loss, 0.5 by AUC).
    """
    if dataset.kind == "regression":
        return Predictions(values)
    p_true = np.exp(-losses)
    p_one = None
    if dataset.kind == "binary":
        p_one = np.where(stream.labels == 1, p_true, 1.0 - p_true)
    return Predictions(values, p_true, p_one)


# -- River -----------------------------------------------------------------------------------------


def river_default(kind: str) -> Any:
    """River's default linear model for the task, behind its StandardScaler (as its docs show)."""
    from river import linear_model, preprocessing

    model = {
        "regression": linear_model.LinearRegression,
        "binary": linear_model.LogisticRegression,
        "multiclass": linear_model.SoftmaxRegression,
    }[kind]()
    return preprocessing.StandardScaler() | model


def river_nonlinear(kind: str, seed: int) -> dict[str, Callable[[], Any]]:
    """River's nonlinear learners at their defaults: name -> factory."""
    from river import forest, neighbors, preprocessing, tree

    if kind == "regression":
        return {
            "river hoeffding tree": lambda: preprocessing.StandardScaler() | tree.HoeffdingTreeRegressor(),
            "river knn": lambda: preprocessing.StandardScaler() | neighbors.KNNRegressor(),
            "river arf": lambda: forest.ARFRegressor(seed=seed),
        }
    return {
        "river hoeffding tree": tree.HoeffdingTreeClassifier,
        "river knn": lambda: preprocessing.StandardScaler() | neighbors.KNNClassifier(),
        "river arf": lambda: forest.ARFClassifier(seed=seed),
    }


def river_rows(stream: Stream) -> list[dict[str, float]]:
    """The stream's features as River's dicts (the same float32 values the learner sees)."""
    names = stream.feature_names
    return [dict(zip(names, row, strict=True)) for row in stream.features.astype(np.float64).tolist()]


def run_river(dataset: Dataset, stream: Stream, model: Any, rows: Sequence[dict[str, float]]) -> Run:
    """Predict each record, then learn it (River's ``progressive_val_score`` order)."""
    n = stream.n
    values = np.full(n, math.nan)
    started = time.perf_counter()
    if dataset.kind == "regression":
        for i, (x, value) in enumerate(zip(rows, stream.labels.tolist(), strict=True)):
            values[i] = model.predict_one(x)
            model.learn_one(x, value)
        return Run(Predictions(values), time.perf_counter() - started)
    binary = dataset.kind == "binary"
    k = 2 if binary else int(dataset.n_classes or 0)
    p_true = np.empty(n)
    p_one = np.empty(n) if binary else None
    for i, (x, label) in enumerate(zip(rows, stream.labels.tolist(), strict=True)):
        y: bool | int = bool(label) if binary else int(label)
        proba = model.predict_proba_one(x)
        if proba:
            # River's Classifier.predict_one is exactly this argmax of predict_proba_one.
            predicted = max(proba, key=proba.get)
            values[i] = float(predicted)
            p_true[i] = proba.get(y, 0.0)
            if p_one is not None:
                p_one[i] = proba.get(True, 0.0)
        else:  # nothing learned yet: no prediction, uniform probabilities
            p_true[i] = 1.0 / k
            if p_one is not None:
                p_one[i] = 0.5
        model.learn_one(x, y)
    return Run(Predictions(values, p_true, p_one), time.perf_counter() - started)
