"""Mini-batch epochs over a window of records: the training half of a compaction.

Online learning sees each record once, with a small step, so after a drift the
model trails the new concept for a long time. Replaying the recent window for
a few shuffled epochs pulls it onto that concept in a fraction of the records
(tests/test_compaction_drift.py measures it).

The epochs go through the learner's public batch API, so they use its model,
optimizer and loss exactly as online learning does: ``as_tensors`` scales the
features with the running statistics *without updating them* (the scaler
describes the stream, and replaying old records must not count them twice);
``fit_batch`` takes one optimizer step. With ``device`` they run elsewhere
(e.g. ``cuda``) and the model and optimizer state come back afterwards.

Determinism: each epoch's order is ``torch.randperm`` from a CPU generator
seeded with ``seed + epoch``, so the same data, seed and starting model give a
bitwise-identical model on the CPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from streamtrainer.training.compaction.store import EpochData
from streamtrainer.training.exceptions import CompactionError
from streamtrainer.training.learner import OnlineLearner

logger = logging.getLogger(__name__)

_EVAL_CHUNK = 65_536  # rows per forward pass in evaluate(): bounded memory on big windows


@dataclass(frozen=True)
class EpochReport:
    """What a compaction did. ``epoch_losses``: per epoch, the mean pre-step loss of its batches
    weighted by their sizes (the last one partial when stopped); ``records``: rows stepped on,
    all epochs together; ``batches``: optimizer steps."""

    epoch_losses: list[float]
    records: int
    batches: int
    duration_s: float
    device: str
    stopped: bool = False


def train_epochs(
    learner: OnlineLearner,
    data: EpochData,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    device: str | None = None,
    between_batches: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EpochReport:
    """Train ``epochs`` shuffled passes over ``data`` in mini-batches of ``batch_size``.

    ``between_batches`` runs after every step (the worker polls Kafka there to
    keep its group membership during a long compaction); ``should_stop`` is
    asked before every step, and when true the epochs end early and the
    report says so.
    """
    if epochs < 0:
        raise CompactionError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise CompactionError(f"batch_size must be >= 1, got {batch_size}")
    n = data.count
    if n and data.n_features != learner.n_features:
        raise CompactionError(f"data has {data.n_features} features, the model takes {learner.n_features}")
    target = str(torch.device(device)) if device is not None else str(learner.device)
    started = time.perf_counter()
    epoch_losses: list[float] = []
    records = batches = 0
    stopped = False
    if n == 0 or epochs == 0:
        return EpochReport(epoch_losses, 0, 0, 0.0, target)
    with learner.on_device(target):
        x, y = learner.as_tensors(data.features, data.labels)
        for epoch in range(epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            order = order.to(x.device)
            weighted, seen = 0.0, 0
            for start in range(0, n, batch_size):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                index = order[start : start + batch_size]
                size = int(index.shape[0])
                weighted += learner.fit_batch(x[index], y[index]) * size
                seen += size
                batches += 1
                if between_batches is not None:
                    between_batches()
            records += seen
            if seen:
                epoch_losses.append(weighted / seen)
            if stopped:
                break
    report = EpochReport(epoch_losses, records, batches, time.perf_counter() - started, target, stopped)
    logger.debug(
        "compaction epochs: %d records x %d epochs in %d batches on %s, %.3fs, losses %s%s",
        n,
        len(epoch_losses),
        batches,
        target,
        report.duration_s,
        [round(v, 5) for v in epoch_losses],
        " (stopped)" if stopped else "",
    )
    return report


def evaluate(learner: OnlineLearner, data: EpochData, *, device: str | None = None) -> float:
    """Mean per-record loss on ``data`` without learning (NaN when it is empty)."""
    if data.count == 0:
        return math.nan
    total = 0.0
    with learner.on_device(device if device is not None else learner.device):
        for start in range(0, data.count, _EVAL_CHUNK):
            stop = start + _EVAL_CHUNK
            x, y = learner.as_tensors(data.features[start:stop], data.labels[start:stop])
            total += float(learner.batch_losses(x, y).double().sum())
    return total / data.count


def split_holdout(data: EpochData, fraction: float, seed: int) -> tuple[EpochData, EpochData]:
    """A random ``fraction`` of the rows held out (seeded), both parts in arrival order."""
    if not 0.0 <= fraction < 1.0:
        raise CompactionError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = data.count
    held = np.zeros(n, dtype=bool)
    n_held = round(n * fraction)
    held[np.random.default_rng(seed).permutation(n)[:n_held]] = True
    return data.subset(~held), data.subset(held)
