"""Which way a learner's steps run, chosen once per learner, and why.

Three compiled paths, tried in this order, then autograd:

* ``kernel``: the hand-written numba loop (:mod:`streamtrainer.training.kernels`)
  for one ``nn.Linear`` or ``Linear -> ReLU -> Linear`` — a built-in model, or a
  user's module of exactly that shape;
* ``program``: the numba layer-program loop for any other chain of known layers
  (Linear, activations, LayerNorm; :mod:`streamtrainer.training.lowering`), also
  in :mod:`~streamtrainer.training.kernels`;
* ``graph``: any other module, its whole step (forward, loss, gradient,
  optimizer update) over blocks of records compiled by torch's AOTInductor
  (:mod:`streamtrainer.training.graph_step`), cached on disk;
* ``autograd``: the guarded eager step, for what none of them reproduces exactly
  (another optimizer or option, a GPU, gradient clipping of a nonlinear model).

Every compiled path compiles in the background and says whether it is ready
without blocking; until it is, the learner takes autograd. They agree with
autograd to float32 rounding (``kernel``) or within 1e-5 (``program``,
``graph``), and share the model's parameters and the optimizer's state, so a
learner switches over between two batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from streamtrainer.training import kernels

logger = logging.getLogger(__name__)

PathName = Literal["kernel", "program", "graph", "autograd"]
F64 = npt.NDArray[np.float64]


class CompiledCall(Protocol):
    """One run of a compiled path over a batch: ``run`` it (any one thread), then take its ``result``."""

    def run(self) -> None:
        """Take the steps (may run on another thread; nothing else touches the model meanwhile)."""

    def result(self) -> tuple[F64, F64]:
        """Run if not yet, write everything back, return each record's loss and prediction."""


class CompiledPath(Protocol):
    """A compiled way to take a learner's steps."""

    def ready(self, batch_size: int) -> bool:
        """Whether a batch of groups of ``batch_size`` runs compiled now; never blocks (schedules)."""

    def wait(self, batch_size: int, timeout_s: float | None) -> bool:
        """Schedule what ``ready`` would and wait for it; False if not ready in time, or failed."""

    def call(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], batch_size: int) -> CompiledCall:
        """Prepare one run over scaled rows ``x`` and targets ``y``, ``batch_size`` records per step."""


class KernelPath:
    """The numba loops of :mod:`streamtrainer.training.kernels` (paths ``kernel`` and ``program``).

    The plan is checked again on every call (~10 us): a checkpoint restore may swap
    the optimizer's state tensors between batches.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, loss: str, task: str) -> None:
        self._model, self._optimizer, self._loss, self._task = model, optimizer, loss, task

    def ready(self, batch_size: int) -> bool:
        return kernels.kernels_ready(self._model, self._optimizer, loss=self._loss, task=self._task)

    def wait(self, batch_size: int, timeout_s: float | None) -> bool:
        return kernels.wait_until_ready(
            self._model, self._optimizer, loss=self._loss, task=self._task, timeout_s=timeout_s
        )

    def call(
        self, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], batch_size: int
    ) -> kernels.FusedCall:
        return kernels.fused_call(
            self._model, self._optimizer, x, y, loss=self._loss, task=self._task, batch_size=batch_size
        )


@dataclass(frozen=True)
class PathChoice:
    """The path a learner takes (``compiled`` None: autograd), what it is, and why."""

    path: PathName
    detail: str  # what the path trains, e.g. "Linear(16->64) -> Tanh -> Linear(64->1)"
    reason: str  # why this path and not a faster one ("" for the fastest)
    compiled: CompiledPath | None

    def describe(self) -> str:
        """One line for the log: the path, what it trains, and why."""
        names = {
            "kernel": "compiled loop (numba)",
            "program": "compiled layer program (numba)",
            "graph": "compiled step graph (torch AOTInductor, cached)",
            "autograd": "autograd",
        }
        text = names[self.path] + (f": {self.detail}" if self.detail else "")
        return text + (f" ({self.reason})" if self.reason else "")


def choose(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    loss: str,
    task: str,
    enabled: bool = True,
    clip_grad_norm: float | None = None,
    n_features: int | None = None,
) -> PathChoice:
    """The fastest path that reproduces the autograd step for this model, optimizer and loss.

    ``enabled`` False (the worker's ``--no-fused``) keeps autograd. Gradient
    clipping is checked after a compiled run from a bound that holds for a linear
    model only: any other model with ``clip_grad_norm`` takes autograd.
    """
    if not enabled:
        return PathChoice("autograd", "", "compiled paths turned off", None)
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        where = f"the compiled paths run on the CPU, the model is on {', '.join(sorted(devices))}"
        return PathChoice("autograd", "", where, None)
    reason = kernels.unsupported_reason(model, optimizer, loss=loss, task=task)
    if reason is None:
        kind, detail = kernels.plan_summary(model, optimizer, loss=loss, task=task)
        if clip_grad_norm is not None and kind != "linear":
            why = "gradient clipping is checked after a compiled run for a linear model only"
            return PathChoice("autograd", "", why, None)
        path: PathName = "kernel" if kind in ("linear", "mlp") else "program"
        return PathChoice(path, detail, "", KernelPath(model, optimizer, loss=loss, task=task))
    if clip_grad_norm is not None:
        return PathChoice("autograd", "", f"gradient clipping; {reason}", None)
    # Imported here: torch's compiler stack, for the models that need it only.
    from streamtrainer.training import graph_step

    graph_reason = graph_step.graph_supported(model, optimizer, loss=loss, task=task, n_features=n_features)
    if graph_reason is None:
        graph_step.prepare()  # its tracing tools' imports (~1.3 s) start now, in the background
        compiled = graph_step.GraphPath(model, optimizer, loss=loss, task=task, n_features=n_features)
        return PathChoice("graph", type(model).__name__, reason, compiled)
    return PathChoice("autograd", "", f"{reason}; {graph_reason}", None)
