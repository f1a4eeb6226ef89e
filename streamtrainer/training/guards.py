"""Training guards: the pieces ``OnlineLearner`` uses to keep bad records from wrecking the model.

* :class:`LossMonitor` — a bias-corrected exponentially weighted mean of the
  losses of the records the model learned from, with a warm-up, and the
  threshold above which a record's loss counts as a spike
  (``spike_factor x`` that mean). It can also give the thresholds a whole batch
  would meet if every record were accepted, so that a batch run through the
  compiled loop can be checked afterwards with a few array operations.
* :class:`Snapshot` — the model's parameters and the optimizer's state, copied
  into preallocated buffers before a step (or a compiled batch) and copied back
  when the step left anything non-finite, so the learner never keeps, and a
  checkpoint never sees, a NaN or an Inf.
* :func:`linear_grad_norm_bounds` — for a linear model, an upper bound of each
  step's gradient norm from the losses and the features alone, so that a
  compiled batch can be shown not to have needed gradient clipping.
* :func:`divergence_bounds` — per record, the loss past which the model, not
  the record, is presumed broken (a prediction 1000x off the label's scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

F64 = npt.NDArray[np.float64]

# Rows per block of the closed-form EW recursion: keep^-128 stays far from overflow for any span >= 2.
_BLOCK = 128


class LossMonitor:
    """EW mean of accepted losses, and the spike threshold derived from it.

    ``factor`` None turns the spike check off (``threshold`` is then +inf). The
    check is active once ``warmup`` losses were accepted; before that every
    finite loss is accepted and feeds the mean. Skipped records never feed it.
    """

    def __init__(self, factor: float | None, span: int, warmup: int) -> None:
        self.factor = factor
        self.alpha = 2.0 / (span + 1.0)
        self.warmup = warmup
        self.reset()

    def reset(self) -> None:
        self._sum = 0.0
        self._weight = 0.0
        self.seen = 0

    @property
    def mean(self) -> float:
        return self._sum / self._weight if self._weight > 0 else math.nan

    @property
    def active(self) -> bool:
        return self.factor is not None and self.seen >= self.warmup and self._weight > 0

    def threshold(self) -> float:
        """Losses above this are spikes (+inf while off or warming up)."""
        if not self.active or self.factor is None:
            return math.inf
        return self.factor * self.mean

    def accept(self, losses: F64) -> None:
        """Fold accepted (finite) losses into the mean, in order (as ExponentialMean.update)."""
        n = losses.shape[0]
        if n == 0:
            return
        keep = 1.0 - self.alpha
        if n == 1:
            self._sum = keep * self._sum + self.alpha * float(losses[0])
            self._weight = keep * self._weight + self.alpha
            self.seen += 1
            return
        weights = self.alpha * keep ** np.arange(n - 1, -1, -1, dtype=np.float64)
        decay = keep**n
        self._sum = decay * self._sum + float(weights @ losses)
        self._weight = decay * self._weight + float(weights.sum())
        self.seen += n

    def batch_thresholds(self, losses: F64, batch_size: int) -> F64 | None:
        """Per-record thresholds for a batch, as if every record before each group were accepted.

        Each group of ``batch_size`` records is judged against the mean before
        the group (as the per-group step does). Values after a non-finite loss
        are meaningless: use them only up to the first failure. None: spike
        check off.
        """
        if self.factor is None:
            return None
        n = losses.shape[0]
        keep = 1.0 - self.alpha
        sums = _ew_sums(self._sum, losses, keep, self.alpha)  # after each record
        powers = keep ** np.arange(1, n + 1, dtype=np.float64)
        weights = powers * self._weight + (1.0 - powers)
        starts = np.arange(0, n, batch_size)
        sums_before = np.concatenate(([self._sum], sums[starts[1:] - 1]))
        weights_before = np.concatenate(([self._weight], weights[starts[1:] - 1]))
        active = (self.seen + starts >= self.warmup) & (weights_before > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            group = np.where(active, self.factor * sums_before / weights_before, np.inf)
        return np.repeat(group, batch_size)[:n]


def _ew_sums(start: float, values: F64, keep: float, alpha: float) -> F64:
    """s_i = keep * s_{i-1} + alpha * v_i for every i, in closed form over blocks (values >= 0)."""
    n = values.shape[0]
    out = np.empty(n, dtype=np.float64)
    powers = keep ** np.arange(1, _BLOCK + 1, dtype=np.float64)
    s = start
    for begin in range(0, n, _BLOCK):
        block = values[begin : begin + _BLOCK]
        p = powers[: block.shape[0]]
        with np.errstate(over="ignore", invalid="ignore"):
            out[begin : begin + block.shape[0]] = p * (s + alpha * np.cumsum(block / p))
        s = float(out[begin + block.shape[0] - 1])
    return out


class Snapshot:
    """Parameters and optimizer state, copied into reused buffers and back.

    ``take`` before a step, ``restore`` if the step must be undone. Optimizer
    state a step creates (Adam's, on its first step) is removed by ``restore``.
    When everything is one dtype on the CPU (the built-in models), a take is a
    single ``np.concatenate`` into one buffer (~2 us) and ``finite`` one sum.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self._params = list(model.parameters())  # Module.to and load_state_dict keep these objects
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fresh: list[torch.Tensor] = []  # parameters that had no optimizer state
        self._scalars: list[tuple[torch.Tensor, str, object]] = []
        self._key: tuple[int, ...] = ()
        self._views: list[np.ndarray] | None = None  # flat views of the live tensors (CPU, one dtype)
        self._flat: np.ndarray | None = None
        self._flat_taken = False

    def _walk(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, str, object]]]:
        lives: list[torch.Tensor] = []
        fresh: list[torch.Tensor] = []
        scalars: list[tuple[torch.Tensor, str, object]] = []
        state = self.optimizer.state
        for p in self._params:
            lives.append(p)
            entries = state.get(p)
            if not entries:
                fresh.append(p)
                continue
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    lives.append(value)
                else:
                    scalars.append((p, key, value))
        return lives, fresh, scalars

    def _flat_views(self, lives: list[torch.Tensor]) -> list[np.ndarray] | None:
        """Cached flat numpy views of ``lives`` when they are all CPU tensors of one dtype."""
        key = tuple(t.data_ptr() for t in lives)
        if key == self._key:
            return self._views
        self._key = key
        self._views = None
        dtypes = {t.dtype for t in lives}
        if all(t.device.type == "cpu" and t.is_contiguous() for t in lives) and len(dtypes) == 1:
            views = [t.detach().numpy().reshape(-1) for t in lives]
            if all(v.flags.writeable for v in views):
                self._views = views
                self._flat = np.empty(sum(v.shape[0] for v in views), dtype=views[0].dtype)
        return self._views

    @torch.no_grad()
    def take(self) -> None:
        lives, self._fresh, self._scalars = self._walk()
        views = self._flat_views(lives)
        if views is not None and self._flat is not None:
            np.concatenate(views, out=self._flat)
            self._flat_taken = True
            return
        self._flat_taken = False
        pairs = [(t, self._buffer((index, ""), t)) for index, t in enumerate(lives)]
        for live, buffer in pairs:
            buffer.copy_(live)
        self._pairs = pairs

    def _buffer(self, key: tuple[int, str], tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if (
            buffer is None
            or buffer.shape != tensor.shape
            or buffer.dtype != tensor.dtype
            or buffer.device != tensor.device
        ):
            buffer = self._buffers[key] = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        return buffer

    @torch.no_grad()
    def restore(self) -> None:
        if self._flat_taken and self._views is not None and self._flat is not None:
            start = 0
            for view in self._views:
                stop = start + view.shape[0]
                np.copyto(view, self._flat[start:stop])
                start = stop
        else:
            for live, buffer in self._pairs:
                live.copy_(buffer)
        for p in self._fresh:
            self.optimizer.state.pop(p, None)
        for p, key, value in self._scalars:
            self.optimizer.state[p][key] = value

    @torch.no_grad()
    def finite(self) -> bool:
        """Whether every parameter and optimizer state value is finite now."""
        lives, _, _ = self._walk()
        # A sum is finite iff every value is, barring an overflow of the sum (then check exactly).
        if (
            self._views is not None
            and tuple(t.data_ptr() for t in lives) == self._key
            and math.isfinite(float(np.concatenate(self._views).sum()))
        ):
            return True
        return all_finite([t for t in lives if t.is_floating_point()])


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    if not tensors:
        return True
    if all(t.device.type == "cpu" for t in tensors):
        total = np.concatenate([t.detach().numpy().reshape(-1) for t in tensors]).sum()
        if math.isfinite(float(total)):
            return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def grad_norm(grads: Sequence[torch.Tensor]) -> float:
    """The L2 norm of all gradients together, in float64 (a float32 sum of squares overflows early)."""
    total = 0.0
    for grad in grads:
        flat = grad.detach().reshape(-1).double()
        total += float(flat @ flat)
    return math.sqrt(total)


def linear_grad_norm_bounds(loss: str, losses: F64, x: npt.NDArray[np.float32], batch_size: int) -> F64:
    """Per-group upper bounds of the gradient norm of a linear model (weight and bias together).

    A record's gradient is ``g (x) [x, 1]`` with ``g`` the loss's gradient in the
    outputs, so its norm is ``|g| * sqrt(|x|^2 + 1)``; ``|g|`` follows from the
    loss alone: mse ``2 sqrt(loss)``, l1 ``<= 1``, bce ``1 - exp(-loss)``, ce
    ``<= sqrt(2) (1 - exp(-loss))``. A group's gradient is the mean of its
    records', so its norm is at most the mean of their norms.
    """
    if loss == "mse":
        g = 2.0 * np.sqrt(losses)
    elif loss == "l1":
        g = np.ones_like(losses)
    elif loss == "bce":
        g = -np.expm1(-losses)
    else:
        g = math.sqrt(2.0) * -np.expm1(-losses)
    x64 = x.astype(np.float64, copy=False)
    per_record = g * np.sqrt(np.einsum("ij,ij->i", x64, x64) + 1.0)
    if batch_size == 1:
        return per_record
    starts = np.arange(0, losses.shape[0], batch_size)
    counts = np.diff(np.append(starts, losses.shape[0]))
    return np.repeat(np.add.reduceat(per_record, starts) / counts, batch_size)[: losses.shape[0]]


def divergence_bounds(loss: str, labels: npt.NDArray[np.floating], factor: float | None) -> F64 | None:
    """Per-record losses above which a model has diverged, whatever the record (None: no bound).

    A loss is past its bound when the prediction is off by more than ``factor``
    times the label's magnitude (at least 1): mse ``(factor max(1, |y|))^2``, l1
    ``factor max(1, |y|)``; for bce and ce, whose loss grows with the logit,
    ``factor``. No trained model is that far off a sane record, so a run of such
    losses means the model diverged (a learning rate too large) long before its
    losses overflow; a record past its bound on the last checkpoint's model too
    is an outlier. Stateless: no warm-up, nothing to checkpoint.
    """
    if factor is None or loss == "audit":
        return None
    n = labels.shape[0]
    if loss in ("bce", "ce"):
        return np.full(n, factor, dtype=np.float64)
    scale = factor * np.maximum(1.0, np.abs(labels.astype(np.float64)))
    return scale * scale if loss == "mse" else scale
