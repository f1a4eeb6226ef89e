"""Averaging one model across the ranks of a torch.distributed process group.

Each rank trains its own copy of the model on its share of the stream; at an averaging point
(a *round*) every rank calls :meth:`ModelAverager.average` with the records it trained since the
last round, and leaves with the same model. One round is one ``all_reduce`` (SUM) of one float64
buffer holding, in this order:

- ``weight`` (the records this rank trained in the round) and the caller's ``sums`` (any vector
  the caller wants summed across ranks: the consumer puts positions and counts there);
- the standardizers' statistics, as the *change* of their raw moments (count, sum, sum of
  squares) since the round began: their sum is exactly the statistics of every rank's records;
- the parameters and the optimizer state, by ``reduction``:

  ``mean`` (the default): the weighted mean ``sum_i w_i theta_i / sum_i w_i``. With plain SGD
  and a round after every step, N ranks are one process taking mini-batches of N with averaged
  gradients (tests/consumer/test_distributed_training.py). A rank with weight 0 (no data)
  contributes nothing and leaves with the others' mean; when every weight is 0 nothing changes.

  ``sum``: the round's start plus the sum of every rank's *update* since then,
  ``theta_0 + sum_i (theta_i - theta_0)``: one process applying every rank's updates, exactly,
  for a model whose update does not depend on its parameters (the audit model: w = sum of the
  records applied). It overshoots for most models (local SGD with a server step of N); it is
  there for the exactly-once audit and for sum-like models.

Optimizer state: every tensor of ``optimizer.state[p]`` (Adam's ``exp_avg``/``exp_avg_sq`` and
``step``, Adagrad's ``sum`` and ``step``, SGD's momentum buffer if any) is reduced like the
parameters. Why: the moments are statistics of the gradients the model has seen; averaging the
parameters but keeping each rank's moments would give each rank's next steps the scale of its
own history, not the model's (and Adagrad's accumulator would grow on a rank with more data
only). Under ``mean`` Adagrad's accumulator is the ranks' mean, not their sum: its steps stay
about as large as one rank's (the conservative choice); ``sum`` gives one process's exactly.
State a rank has not created yet (no step taken) is created as torch would on the first step.

Everything is in place (``copy_`` into the existing tensors): the compiled loop's numpy views of
the parameters and the optimizer state stay valid. Call only between updates.

Cost: one all_reduce of (parameters + optimizer state) x 8 bytes. For a d=16, 64-hidden MLP with
Adagrad (2 x 1,153 + 4 floats), ~0.3-0.5 ms per round on 2 gloo ranks over loopback
(bench figure in docs/semantics.md and the issue 18 report).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch import nn

from streamtrainer.training.scaler import RunningStandardizer, TargetStandardizer

logger = logging.getLogger(__name__)

Reduction = Literal["mean", "sum"]

# Optimizer state that accumulates over the steps taken (Adagrad's sum of squared gradients, the
# step counts): under ``mean`` the round adds every rank's increments to it, as one process taking
# every rank's steps would have it (see the module doc for why).
_ACCUMULATED_STATE = frozenset({"sum", "step"})
REDUCTIONS: tuple[Reduction, ...] = ("mean", "sum")


# Count, mean and sum of squared deviations: the standardizers' running statistics.
RunningStatistics = RunningStandardizer | TargetStandardizer


@dataclass(frozen=True, slots=True)
class RoundResult:
    """What one round gave every rank."""

    total_weight: float  # records trained by all ranks in the round
    sums: npt.NDArray[np.float64]  # the callers' ``sums``, summed across ranks
    distance: float  # L2 distance of this rank's parameters from the result, before the round
    seconds: float  # the round's duration on this rank (the all_reduce and the copies)


def _moments(stats: RunningStatistics) -> npt.NDArray[np.float64]:
    """(count, sum, sum of squares) of a running statistic, flattened: additive across ranks."""
    mean = np.atleast_1d(np.asarray(stats.mean, dtype=np.float64))
    m2 = np.atleast_1d(np.asarray(stats.m2, dtype=np.float64))
    count = float(stats.count)
    return np.concatenate([[count], count * mean, m2 + count * mean * mean])


def _set_moments(stats: RunningStatistics, moments: npt.NDArray[np.float64]) -> None:
    n = (len(moments) - 1) // 2
    count = float(moments[0])
    total, squares = moments[1 : 1 + n], moments[1 + n :]
    mean = total / count if count > 0 else np.zeros(n)
    m2 = np.maximum(squares - count * mean * mean, 0.0) if count > 0 else np.zeros(n)
    stats.count = round(count)
    if isinstance(stats.mean, np.ndarray):
        stats.mean = mean
        stats.m2 = m2
    else:
        stats.mean = float(mean[0])
        stats.m2 = float(m2[0])


def _ensure_optimizer_state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> None:
    """The state torch creates on a parameter's first step, for one that has taken none yet."""
    state = optimizer.state[p]
    if state:
        return
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    if isinstance(optimizer, torch.optim.Adam):
        state["step"] = torch.tensor(0.0, dtype=step_dtype)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if optimizer.param_groups[0].get("amsgrad"):
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    elif isinstance(optimizer, torch.optim.Adagrad):
        group = optimizer.param_groups[0]
        state["step"] = torch.tensor(0.0, dtype=step_dtype)
        state["sum"] = torch.full_like(
            p, group.get("initial_accumulator_value", 0.0), memory_format=torch.preserve_format
        )
    # SGD: no state without momentum (and torch creates the momentum buffer on the first step:
    # a rank without it would disagree on the buffer's layout, so momentum is not averaged then).


class ModelAverager:
    """Averages ``model`` (and ``optimizer``'s state, and ``statistics``) across a process group.

    Every rank of ``group`` (None: the default group) must call :meth:`average` the same number of
    times, in the same order; a rank that does not come makes the others' call raise once the
    group's timeout passes (``init_process_group(timeout=...)``): never a silent stall.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        statistics: Sequence[RunningStatistics] = (),
        reduction: Reduction = "mean",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r} (mean, sum)")
        self.model = model
        self.optimizer = optimizer
        self.statistics = list(statistics)
        self.reduction = reduction
        self.group = group
        self.rounds = 0
        self._start: npt.NDArray[np.float64] | None = None
        self._start_moments: npt.NDArray[np.float64] | None = None
        self.mark()

    # -- the tensors a round reduces ------------------------------------------------------

    def _tensors(self) -> list[torch.Tensor]:
        """Parameters, then each parameter's optimizer state tensors (by name): a fixed layout."""
        return [tensor for tensor, _ in self._layout()]

    def _layout(self) -> list[tuple[torch.Tensor, bool]]:
        """Each tensor a round reduces, and whether it accumulates (summed: see the module doc)."""
        params: list[torch.Tensor] = list(self.model.parameters())
        layout = [(p, False) for p in params]
        optimizer = self.optimizer
        if optimizer is not None:
            for p in params:
                _ensure_optimizer_state(optimizer, p)
                state = optimizer.state[p]
                layout.extend(
                    (value, name in _ACCUMULATED_STATE)
                    for name, value in sorted(state.items())
                    if isinstance(value, torch.Tensor) and value.is_floating_point()
                )
        return layout

    def _flat(self, tensors: list[torch.Tensor]) -> npt.NDArray[np.float64]:
        if not tensors:
            return np.zeros(0)
        with torch.no_grad():
            return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).numpy()

    def _moments(self) -> npt.NDArray[np.float64]:
        if not self.statistics:
            return np.zeros(0)
        return np.concatenate([_moments(s) for s in self.statistics])

    def mark(self) -> None:
        """The round's start (for ``sum`` and the statistics): after a restore, and after each round."""
        self._start = self._flat(self._tensors()).copy()
        self._start_moments = self._moments().copy()

    # -- a round ------------------------------------------------------------------------

    def average(self, weight: float, sums: npt.NDArray[np.float64] | None = None) -> RoundResult:
        """One round: every rank leaves with the same model; ``sums`` come back summed across ranks.

        ``weight``: the records this rank trained since the last round (0: it contributes nothing).
        """
        started = time.perf_counter()
        extra = np.zeros(0) if sums is None else np.asarray(sums, dtype=np.float64).reshape(-1)
        layout = self._layout()
        tensors = [tensor for tensor, _ in layout]
        mine = self._flat(tensors)
        start = self._start
        if start is None or start.shape != mine.shape:
            # A layout the round's start does not match (optimizer state created since): the start
            # is this rank's model as the last round left it, which is the model itself if it has
            # not trained since (the only case this happens: state is created on the first step).
            start = mine.copy()
        moments = self._moments()
        start_moments = self._start_moments
        if start_moments is None or start_moments.shape != moments.shape:
            start_moments = moments.copy()
        if self.reduction == "mean":
            accumulated = self._accumulated_mask(layout)
            contribution = np.where(accumulated, mine - start, mine * weight)
        else:
            contribution = mine - start
        buffer = np.concatenate([[weight], extra, moments - start_moments, contribution])
        reduced = torch.from_numpy(buffer)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.group)
        result = reduced.numpy()
        total = float(result[0])
        summed = result[1 : 1 + len(extra)].copy()
        offset = 1 + len(extra)
        merged_moments = start_moments + result[offset : offset + len(moments)]
        offset += len(moments)
        body = result[offset:]
        if self.reduction == "sum":
            averaged = start + body
        else:
            averaged = np.where(accumulated, start + body, body / total if total > 0 else mine)
        n = self._parameter_count()
        distance = float(np.linalg.norm(mine[:n] - averaged[:n]))
        self._write(tensors, averaged)
        position = 0
        for stats in self.statistics:
            size = len(_moments(stats))
            _set_moments(stats, merged_moments[position : position + size])
            position += size
        self.mark()
        self.rounds += 1
        return RoundResult(
            total_weight=total, sums=summed, distance=distance, seconds=time.perf_counter() - started
        )

    def broadcast(self, src: int = 0) -> None:
        """Every rank takes rank ``src``'s model, optimizer state and statistics (one broadcast)."""
        tensors = self._tensors()
        buffer = torch.from_numpy(np.concatenate([self._moments(), self._flat(tensors)]))
        dist.broadcast(buffer, src=src, group=self.group)
        values = buffer.numpy()
        moments = len(self._moments())
        self._write(tensors, values[moments:])
        position = 0
        for stats in self.statistics:
            size = len(_moments(stats))
            _set_moments(stats, values[position : position + size])
            position += size
        self.mark()

    @staticmethod
    def _accumulated_mask(layout: list[tuple[torch.Tensor, bool]]) -> npt.NDArray[np.bool_]:
        if not layout:
            return np.zeros(0, dtype=bool)
        return np.concatenate([np.full(tensor.numel(), summed) for tensor, summed in layout])

    def _parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @staticmethod
    def _write(tensors: list[torch.Tensor], values: npt.NDArray[np.float64]) -> None:
        position = 0
        with torch.no_grad():
            for tensor in tensors:
                n = tensor.numel()
                chunk = torch.from_numpy(values[position : position + n]).reshape(tensor.shape)
                tensor.copy_(chunk.to(tensor.dtype))
                position += n
