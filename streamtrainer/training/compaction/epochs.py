"""Mini-batch epochs over a window of records: the training half of a compaction.

Online learning sees each record once, with a small step, so after a drift the
model trails the new concept for a long time. Replaying the recent window for
a few shuffled epochs pulls it onto that concept in a fraction of the records
(tests/test_compaction_drift.py measures it).

The epochs go through the learner's public batch API, so they use its model,
optimizer and loss exactly as online learning does: ``standardize`` scales the
features with the running statistics *without updating them* (the scaler
describes the stream, and replaying old records must not count them twice);
``standardize_labels`` does the same for a regression's labels;
``fit_rows`` takes the mini-batch steps, through the compiled loop for the
built-in models on the CPU (a compaction then costs about as much as reading
its records). With ``device`` they run elsewhere (e.g. ``cuda``, through
autograd) and the model and optimizer state come back afterwards.

Determinism: each epoch's order is ``torch.randperm`` from a CPU generator
seeded with ``seed + epoch``, so the same data, seed and starting model give a
bitwise-identical model on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from streamtrainer.training.compaction.store import EpochData
from streamtrainer.training.exceptions import CompactionError
from streamtrainer.training.learner import OnlineLearner

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 2048
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
    lr: float | None = None,
    device: str | None = None,
    between_batches: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EpochReport:
    """Train ``epochs`` shuffled passes over ``data`` in mini-batches of ``batch_size``.

    ``lr`` (default: the learner's own) is the learning rate for these epochs
    only; the online rate is restored afterwards. Steps run in chunks of whole
    mini-batches through ``learner.fit_rows`` (the compiled loop for built-in
    models on the CPU). ``between_batches`` runs after every chunk (the worker
    polls Kafka there to keep its group membership during a long compaction);
    ``should_stop`` is asked before every chunk, and when true the epochs end
    early and the report says so.
    """
    if epochs < 0:
        raise CompactionError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise CompactionError(f"batch_size must be >= 1, got {batch_size}")
    if lr is not None and not lr > 0:
        raise CompactionError(f"lr must be > 0, got {lr}")
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
    # Whole mini-batches per chunk, about _CHUNK_ROWS rows: the compiled loop's per-call overhead is
    # amortised, and the caller still gets control every few milliseconds.
    chunk = batch_size * max(1, _CHUNK_ROWS // batch_size)
    x = np.ascontiguousarray(learner.standardize(data.features), dtype=np.float32)
    y = np.ascontiguousarray(learner.standardize_labels(data.labels), dtype=np.float32)
    with learner.on_device(target), _learning_rate(learner, lr):
        for epoch in range(epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
            x_epoch, y_epoch = x[order], y[order]
            total, seen = 0.0, 0
            for start in range(0, n, chunk):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                losses = learner.fit_rows(
                    x_epoch[start : start + chunk], y_epoch[start : start + chunk], batch_size=batch_size
                )
                # A record the guards refused reports a NaN loss: it is not part of the epoch's mean.
                finite = np.isfinite(losses)
                total += float(losses[finite].sum())
                seen += int(finite.sum())
                batches += -(-losses.shape[0] // batch_size)
                if between_batches is not None:
                    between_batches()
            records += seen
            if seen:
                epoch_losses.append(total / seen)
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


@contextlib.contextmanager
def _learning_rate(learner: OnlineLearner, lr: float | None) -> Iterator[None]:
    if lr is None:
        yield
        return
    groups = learner.optimizer.param_groups
    online = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = lr
    try:
        yield
    finally:
        for group, rate in zip(groups, online, strict=True):
            group["lr"] = rate


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
