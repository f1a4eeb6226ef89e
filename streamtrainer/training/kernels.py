"""Fused per-record learning for the built-in models: strict test-then-train at compiled speed.

A per-record step through autograd costs 170-350 us, almost all of it Python and
dispatch overhead for a few hundred flops. For the built-in models
(``nn.Linear``, and ``Linear -> ReLU -> Linear``) with plain SGD, Adam or
Adagrad this module runs the whole loop — forward, loss, backward, optimizer
step, record after record — in one compiled function
(:mod:`streamtrainer.training.fused_loops`), directly on the memory of the torch
tensors:

* parameters are updated in place through ``.numpy()`` views of
  ``model.parameters()``;
* optimizer state is updated in place through views of
  ``optimizer.state[p]`` (``exp_avg``/``exp_avg_sq``/``step`` for Adam,
  ``sum``/``step`` for Adagrad), created first exactly as torch would create it.

So the model and the optimizer stay the single source of truth: a checkpoint
taken from ``model.state_dict()``/``optimizer.state_dict()`` after fused steps
is correct, and a later autograd step continues as if every step had been
taken by torch. The results agree with the autograd loop to float32 rounding
(tests/test_kernels.py checks every model x optimizer against it).

Any other module is lowered (:mod:`streamtrainer.training.lowering`): a chain of
known layers (any nesting of ``Sequential``, or a ``forward`` torch.fx traces to
a chain) becomes a program, which the program loop
(:mod:`streamtrainer.training.program_loops`) trains with the same discipline;
one that lowers to exactly a built-in shape (a user's module wrapping
``Linear -> ReLU -> Linear``) takes the hand-written loop. A program's
parameters and optimizer state are gathered into flat arrays before a call and
copied back by :meth:`FusedCall.result`.

Anything the kernels do not reproduce exactly — a module that is not a chain of
known layers, hooks, weight decay, momentum, AMSGrad, another dtype or device,
several parameter groups — makes :func:`fused_supported` false
(:func:`unsupported_reason` says why, in words for a log line), and the caller
keeps the autograd path.

Compiling takes seconds, so it happens in a background thread: :func:`prepare`
(when a worker starts) imports numba and warms torch's optimizer machinery,
:func:`kernels_ready` (per batch, never blocking) schedules the loop of the
model/optimizer at hand and says whether it is compiled; until then the caller
keeps its autograd path. numba caches each compiled loop on disk, in a user cache
directory (:func:`cache_dir`), never in the installed package.

:func:`fused_call` prepares a run without running it: its ``run`` is one call
into the compiled loop that releases the GIL, so a caller may run it on
another thread (the worker's training lane) while it polls.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from streamtrainer.training import catalog, lowering, optimizers, program_ops
from streamtrainer.training.exceptions import CompiledPathRefusedError, TrainingError
from streamtrainer.training.scaler import RunningStandardizer

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

# From the catalog: the losses the loops compute, and the shape each built-in model has.
LOSS_CODES: Final = {name: e.kernel_code for name, e in catalog.LOSSES.items() if e.kernel_code is not None}
OPTIMIZER_CODES: Final = {torch.optim.SGD: 0, torch.optim.Adam: 1, torch.optim.Adagrad: 2}
_SGD, _ADAM, _ADAGRAD = 0, 1, 2
_BUILTIN_KINDS: Final = {name: e.compiled_kind for name, e in catalog.MODELS.items() if e.compiled_kind}
_EMPTY: Final = np.empty(0, dtype=np.float32)
# program_loops.BLAS_MIN_WIDTH, which kernels_ready reads without importing numba (~0.5 s: it never
# blocks); tests/training/test_program_kernels.py checks that the two agree.
PROGRAM_BLAS_MIN_WIDTH: Final = 8


class FusedUnsupportedError(CompiledPathRefusedError):
    """The model/optimizer/loss combination has no fused kernel; use the autograd path."""


@dataclass(frozen=True, slots=True)
class _Plan:
    kind: str  # "linear" | "mlp" | "program"
    params: tuple[torch.Tensor, ...]
    opt: int
    loss: int
    n_features: int
    program: lowering.Program | None = None  # kind "program": the lowered model


# -- public API ---------------------------------------------------------------


def fused_supported(model: nn.Module, optimizer: torch.optim.Optimizer, *, loss: str, task: str) -> bool:
    """Whether :func:`fused_learn` reproduces the autograd step for this combination.

    Cheap (~10 us): call it per batch, as a checkpoint restore or a user may swap
    the optimizer state or the model's tensors between batches.
    """
    return isinstance(_plan(model, optimizer, loss, task), _Plan)


def unsupported_reason(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, loss: str, task: str
) -> str | None:
    """Why there is no fused kernel for this combination (None: there is one)."""
    plan = _plan(model, optimizer, loss, task)
    return plan if isinstance(plan, str) else None


def plan_summary(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, loss: str, task: str
) -> tuple[str, str]:
    """The kind of loop that trains this combination (``linear``, ``mlp``, ``program``) and what it
    trains, in words (e.g. ``Linear(16->64) -> Tanh -> LayerNorm(64) -> Linear(64->1)``).

    Raises :class:`FusedUnsupportedError` when there is none (see :func:`unsupported_reason`).
    """
    plan = _plan(model, optimizer, loss, task)
    if isinstance(plan, str):
        raise FusedUnsupportedError(plan)
    if plan.program is not None:
        return plan.kind, plan.program.describe()
    shapes = [tuple(p.shape) for p in plan.params[::2]]  # the weights, (out, in) each
    layers = [f"Linear({n_in}->{n_out})" for n_out, n_in in shapes]
    return plan.kind, " > ReLU > ".join(layers)


def fused_learn(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
    *,
    loss: str,
    task: str,
    batch_size: int = 1,
) -> tuple[F64, F64]:
    """Learn from the rows of ``x`` in order, one optimizer step per ``batch_size`` records.

    Updates the model's parameters and the optimizer's state in place and returns
    each record's loss and prediction (regression: the value; binary: 1.0 when
    the logit is > 0, else 0.0; multiclass: the argmax) from before the step of
    its group — exactly what ``OnlineLearner._learn`` computes per group.
    ``x`` must already be standardized; ``y`` must be valid for the task.
    Raises :class:`FusedUnsupportedError` when :func:`fused_supported` is false.
    """
    return fused_call(model, optimizer, x, y, loss=loss, task=task, batch_size=batch_size).result()


class FusedCall:
    """One run of the compiled loop, prepared: :meth:`run` it, then take its :meth:`result`.

    ``run`` is a single call into the compiled loop, which releases the GIL: it
    may run on another thread (the worker's training lane) while the caller's
    thread polls, as long as nothing else touches the model or the optimizer
    until ``result``. ``result`` (on any thread; it runs the loop first if need
    be) writes the optimizer's step counts back and returns the losses and
    predictions.
    """

    __slots__ = ("_args", "_finish", "_loop", "_ran", "_step_slots", "_steps", "losses", "predictions")

    def __init__(
        self,
        loop: Any,
        args: tuple[Any, ...],
        *,
        losses: F64,
        predictions: F64,
        steps: F64,
        step_slots: list[tuple[int, torch.Tensor]],
        finish: Callable[[], None] | None = None,
    ) -> None:
        self._loop, self._args = loop, args
        self._finish = finish  # a program's loop: copies parameters and state back into the tensors
        self.losses, self.predictions = losses, predictions
        self._steps, self._step_slots = steps, step_slots
        self._ran = loop is None  # nothing to run (no rows)

    def run(self) -> None:
        if not self._ran:
            self._loop(*self._args)
            self._ran = True

    def result(self) -> tuple[F64, F64]:
        self.run()
        if self._finish is not None:
            self._finish()
            self._finish = None
        for index, tensor in self._step_slots:
            tensor.fill_(float(self._steps[index]))
        self._step_slots = []
        return self.losses, self.predictions


def fused_call(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
    *,
    loss: str,
    task: str,
    batch_size: int = 1,
) -> FusedCall:
    """:func:`fused_learn`, prepared but not run: checks, views of the state, the loop to call.

    Raises :class:`FusedUnsupportedError` (nothing has moved yet) when
    :func:`fused_supported` is false.
    """
    plan = _plan(model, optimizer, loss, task)
    if isinstance(plan, str):
        raise FusedUnsupportedError(plan)
    if batch_size < 1:
        raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
    x = _float32_rows(x)
    y = np.require(y, dtype=np.float32, requirements=["C", "W"])
    n = x.shape[0]
    if x.ndim != 2 or x.shape[1] != plan.n_features or y.shape != (n,):
        raise TrainingError(
            f"expected features (n, {plan.n_features}) and labels (n,), got {x.shape} and {y.shape}"
        )
    losses = np.empty(n, dtype=np.float64)
    predictions = np.empty(n, dtype=np.float64)
    if n == 0:
        return FusedCall(None, (), losses=losses, predictions=predictions, steps=np.zeros(0), step_slots=[])
    if plan.program is not None:
        return _program_call(plan, plan.program, optimizer, x, y, int(batch_size), losses, predictions)

    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    beta1, beta2 = (float(b) for b in group.get("betas", (0.9, 0.999)))
    eps = float(group.get("eps", 0.0))
    lr_decay = float(group.get("lr_decay", 0.0))
    states = [_state_views(optimizer, p, plan.opt) for p in plan.params]
    step_tensors = [state[2] for state in states]
    # The loop always takes a hidden layer (w1, b1) and an output layer (w2, b2); a linear
    # model has an empty hidden layer.
    padding = 4 - len(plan.params)
    flat = [_EMPTY] * padding + [_flat_view(p) for p in plan.params]
    state_arrays = [_EMPTY] * (2 * padding) + [array for state in states for array in state[:2]]
    steps = np.zeros(4, dtype=np.float64)
    for index, tensor in enumerate(step_tensors, start=padding):
        steps[index] = float(tensor) if tensor is not None else 0.0
    round_step = all(t is None or t.dtype == torch.float32 for t in step_tensors)
    hidden = plan.params[1].shape[0] if plan.kind == "mlp" else 0
    n_outputs = plan.params[-1].shape[0]
    variants = _variants(plan)
    variant, group_rows = variants[0], 0
    if hidden and batch_size >= _loops().BLAS_MIN_ROWS:
        # Micro-batches of a hidden layer: the grouped variant once it is compiled (it was
        # scheduled with the row-by-row one); the row-by-row pass until then, same results.
        if _ready(variants[1]):
            variant, group_rows = variants[1], int(batch_size)
        else:
            _schedule(variants[1])  # without kernels_ready first: compile it in the background now
    work = np.empty(_loops().work_size(plan.n_features, hidden, n_outputs, group_rows), dtype=np.float32)

    args = (
        x,
        y,
        *flat,
        *state_arrays,
        steps,
        plan.loss,
        lr,
        beta1,
        beta2,
        eps,
        lr_decay,
        round_step,
        int(batch_size),
        losses,
        predictions,
        work,
    )
    step_slots = [(i, t) for i, t in enumerate(step_tensors, start=padding) if t is not None]
    return FusedCall(
        _train_loop(variant), args, losses=losses, predictions=predictions, steps=steps, step_slots=step_slots
    )


def _program_call(  # noqa: PLR0917 - fused_call's checked arguments, passed on
    plan: _Plan,
    program: lowering.Program,
    optimizer: torch.optim.Optimizer,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
    batch_size: int,
    losses: F64,
    predictions: F64,
) -> FusedCall:
    """:func:`fused_call` of a lowered program: parameters and optimizer state gathered into flat arrays.

    The program loop takes them as one flat array each (any number of parameters, one compiled
    signature); :meth:`FusedCall.result` copies them back into the tensors, so after it the model and
    the optimizer hold what torch would. Both copies are O(#parameters) per call, not per record:
    a call of one record on the 16-64-1 MLP with Adam (1,153 parameters, three arrays) takes
    144 us here against the hand-written loop's 78 (bench/program_kernels.py, a loaded 2-core
    machine): ~50 us of copies and ~17 us of the lowering check, what the loop spends on ~70
    records strict; nothing next to a poll of thousands of records.
    """
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    beta1, beta2 = (float(b) for b in group.get("betas", (0.9, 0.999)))
    eps = float(group.get("eps", 0.0))
    lr_decay = float(group.get("lr_decay", 0.0))
    params, offsets = program.params, program.offsets
    states = [_state_views(optimizer, p, plan.opt) for p in params]
    views = [_flat_view(p) for p in params]
    theta = np.concatenate(views)
    first = [state[0] for state in states] if plan.opt != _SGD else []
    second = [state[1] for state in states] if plan.opt == _ADAM else []
    s1 = np.concatenate(first) if first else _EMPTY
    s2 = np.concatenate(second) if second else _EMPTY
    step_tensors = [state[2] for state in states]
    steps = np.array([float(t) if t is not None else 0.0 for t in step_tensors], dtype=np.float64)
    round_step = all(t is None or t.dtype == torch.float32 for t in step_tensors)

    variants = _variants(plan)
    variant = variants[0]
    if len(variants) > 1 and batch_size >= _program_loops().BLAS_MIN_ROWS:
        if _ready(variants[1]):
            variant = variants[1]
        else:
            _schedule(variants[1])  # the row-by-row pass until it is compiled: the same updates
    rows = min(batch_size, x.shape[0])
    work = np.empty(
        _program_loops().work_size(program.n_features, [op.n_out for op in program.ops], theta.size, rows),
        dtype=np.float32,
    )

    def finish() -> None:
        for low, high, view in zip(offsets[:-1], offsets[1:], views, strict=True):
            view[:] = theta[low:high]
        for source, targets in ((s1, first), (s2, second)):
            for low, high, view in zip(offsets[:-1], offsets[1:], targets, strict=False):  # none for SGD
                view[:] = source[low:high]

    args = (
        x, y, program.codes, program.constants, theta, offsets, s1, s2, steps, plan.loss,
        lr, beta1, beta2, eps, lr_decay, round_step, batch_size, losses, predictions, work,
    )  # fmt: skip
    step_slots = [(i, t) for i, t in enumerate(step_tensors) if t is not None]
    return FusedCall(
        _train_loop(variant),
        args,
        losses=losses,
        predictions=predictions,
        steps=steps,
        step_slots=step_slots,
        finish=finish,
    )


def fused_standardize(
    scaler: RunningStandardizer, features: npt.NDArray[np.floating[Any]]
) -> npt.NDArray[np.float32]:
    """``scaler.learn_transform(features)`` in one compiled pass (10x faster at d=16, 30x at d=128).

    Same result to float32 rounding, same state afterwards (``count``, ``mean``
    and ``m2`` are updated in place). Use it once :func:`kernels_ready` is
    true (or after :func:`prepare` finished); before, it may compile on the spot.
    """
    x = _float32_rows(features)
    n, d = x.shape
    if d != scaler.n_features:
        raise TrainingError(f"expected {scaler.n_features} features, got {d}")
    out = np.empty((n, d), dtype=np.float32)
    if n == 0:
        return out
    # The scaler's arrays are updated in place; make sure they are ones the loop can write.
    scaler.mean = np.require(scaler.mean, dtype=np.float64, requirements=["C", "W"])
    scaler.m2 = np.require(scaler.m2, dtype=np.float64, requirements=["C", "W"])
    _loops().standardize_loop(x, scaler.mean, scaler.m2, float(scaler.count), float(scaler.eps), out)
    scaler.count += n
    return out


def prepare(model: str | None = None, optimizer: str | None = None) -> None:
    """Start getting ready in a background thread; returns at once (idempotent).

    Call it as early as possible — when a worker starts, before it joins its
    group — with the names from its settings (``prepare("mlp", "adam")``), so
    that the preparation overlaps the group join instead of delaying the first
    trained record. The thread (1) constructs a throwaway torch optimizer: the
    first construction in a process imports ``torch._dynamo``, 2-6 s on a small
    machine, which the learner would otherwise pay after the partition
    assignment; (2) imports numba and compiles the standardizer (which also pays
    numba's one-time start-up); (3) for a built-in model (``linear``,
    ``logistic``, ``softmax``, ``mlp``) and optimizer (``sgd``, ``adam``,
    ``adagrad``), compiles their training loop. Anything else only gets (1) and
    (2); :func:`kernels_ready` schedules the loop it needs on first use anyway.
    Each compilation loads from numba's on-disk cache when it can.
    """
    code = {"sgd": _SGD, "adam": _ADAM, "adagrad": _ADAGRAD}.get(optimizer or "")
    if code is not None and model in _BUILTIN_KINDS and _numba_installed():
        _schedule(*_variants_of(code, _BUILTIN_KINDS[model]))
    else:
        with _lock:
            _submit_base()


def kernels_ready(model: nn.Module, optimizer: torch.optim.Optimizer, *, loss: str, task: str) -> bool:
    """Whether :func:`fused_learn` runs this combination without compiling first. Never blocks.

    False for an unsupported combination. Otherwise the first call schedules the
    combination's loop for compilation in the background (for a hidden layer
    also its grouped variant, which :func:`fused_learn` takes for micro-batches
    once it is ready); until it is ready the caller trains through autograd, and
    since both agree to float32 rounding, switching over between two batches is
    seamless.
    """
    plan = _plan(model, optimizer, loss, task)
    if isinstance(plan, str):
        return False
    variants = _variants(plan)
    _schedule(*variants)
    return _ready(variants[0])


def wait_until_ready(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    loss: str | None = None,
    task: str | None = None,
    timeout_s: float | None = None,
) -> bool:
    """Schedule what :func:`kernels_ready` would, then wait for everything asked for so far.

    False if it is not ready within ``timeout_s``, or failed.
    """
    with _lock:
        _submit_base()
    if model is not None and optimizer is not None and loss is not None and task is not None:
        kernels_ready(model, optimizer, loss=loss, task=task)
    with _lock:
        futures = list(_jobs.values())
    done, pending = concurrent.futures.wait(futures, timeout=timeout_s)
    return not pending and all(f.exception() is None for f in done)


def compile_state() -> str:
    """``idle`` (no loop asked for), ``compiling``, ``ready`` or ``failed``; starts nothing."""
    with _lock:
        futures = [f for key, f in _jobs.items() if key != "base"]
    if not futures:
        return "idle"
    if any(not f.done() for f in futures):
        return "compiling"
    return "failed" if any(f.exception() is not None for f in futures) else "ready"


def warm_up(variants: tuple[tuple[str, str], ...] = (("linear", "sgd"),)) -> float:
    """Compile (or load from the cache) the loops of ``(model, optimizer)`` pairs now; blocks.

    ``model`` is ``linear`` (any nn.Linear), ``mlp`` or ``program`` (the loop of
    lowered modules); ``optimizer`` is ``sgd``, ``adam`` or ``adagrad``. Returns
    the seconds it took.
    """
    started = time.perf_counter()
    codes = {"sgd": _SGD, "adam": _ADAM, "adagrad": _ADAGRAD}
    wanted = tuple(v for kind, optimizer in variants for v in _variants_of(codes[optimizer], kind))
    # Two compiler processes: the machines this runs on have two cores or more.
    _prepare_base(tuple(v for v in wanted if v not in _dispatchers), processes=2)
    for variant in wanted:
        _compile(variant)
    elapsed = time.perf_counter() - started
    logger.debug("fused loops %s ready in %.2fs", variants, elapsed)
    return elapsed


# -- compilation ------------------------------------------------------------------

# (optimizer code, has a hidden layer, grouped: a hidden layer's micro-batches by matrix products),
# or ("program", optimizer code, grouped): the loop of lowered programs (program_loops)
Variant = tuple[int, bool, bool] | tuple[str, int, bool]

_lock = threading.Lock()
# Held while an optimizer is constructed, here and in the learner: the first construction in a
# process imports torch._dynamo, and two threads doing it at once (this warm-up and a learner being
# built) could see each other's half-imported modules ("'prims' object has no attribute 'view_of'",
# "operator onnx_symbolic::_symbolic_multi_out does not exist", seen on a loaded 2-core machine);
# the warm-up then failed and training stayed on autograd for the whole run.
OPTIMIZER_IMPORT_LOCK = threading.Lock()
_jobs: dict[str | Variant, concurrent.futures.Future[None]] = {}
_dispatchers: dict[Variant, Any] = {}


class _DaemonThread:
    """Runs submitted calls one after another on a daemon thread.

    Not a ThreadPoolExecutor: the interpreter waits for an executor's threads at exit, so a worker
    stopped by a signal during start-up waited for the warm-up (~2 s) or a cold compile (~6 s, the
    compiler child included) before exiting. A daemon thread ends with the process, and the compiler
    child with it (its parent-death signal); a compile cut short leaves numba's cache consistent."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Any, tuple[Any, ...]]]
        self._calls = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Any, *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((future, function, args))
        return future

    def _run(self) -> None:
        while True:
            future, function, args = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = function(*args)
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(error)
            else:
                future.set_result(result)


_executor: _DaemonThread | None = None


def _background() -> _DaemonThread:
    """One thread, so compilations queue up rather than fight over two cores. Call under _lock."""
    global _executor  # noqa: PLW0603 - one compile thread per process
    if _executor is None:
        _executor = _DaemonThread("fused-loops")
    return _executor


def _submit_base(variants: tuple[Variant, ...] = ()) -> None:
    """Queue the one-time preparation first (call under _lock)."""
    if "base" not in _jobs:
        _jobs["base"] = _background().submit(_prepare_base, variants)
        _jobs["base"].add_done_callback(_log_failure)


def _schedule(*variants: Variant) -> None:
    """Queue the compilation of each of ``variants`` not queued yet, in order, behind the base."""
    with _lock:
        _submit_base(variants)
        for variant in variants:
            if variant not in _jobs:
                _jobs[variant] = _background().submit(_compile, variant)
                _jobs[variant].add_done_callback(_log_failure)


def _ready(variant: Variant) -> bool:
    """Compiled: by a background job that has finished, or by :func:`warm_up`."""
    with _lock:
        if variant in _dispatchers:
            return True
        future = _jobs.get(variant)
    return future is not None and future.done() and future.exception() is None


def _log_failure(future: concurrent.futures.Future[None]) -> None:
    error = future.exception()
    if error is not None and threading.main_thread().is_alive() and not sys.is_finalizing():
        # (After the main thread has ended, an import cut short by the exit fails for that reason.)
        # Not fatal: kernels_ready stays false and the learner keeps its autograd path.
        logger.error("preparing the fused loops failed; training stays on autograd: %r", error)


def _variants(plan: _Plan) -> tuple[Variant, ...]:
    if plan.program is not None:
        # The grouped variant only helps a program with a Linear layer wide enough for BLAS.
        ops = plan.program.ops
        wide = any(op.code == program_ops.LINEAR and op.n_out >= PROGRAM_BLAS_MIN_WIDTH for op in ops)
        rows: Variant = ("program", plan.opt, False)
        return (rows, ("program", plan.opt, True)) if wide else (rows,)
    return _variants_of(plan.opt, plan.kind)


def _variants_of(opt: int, kind: str) -> tuple[Variant, ...]:
    """The row-by-row loop first; for a hidden layer also the grouped one (micro-batches).

    A hidden layer's grouped variant compiles ~2 s longer: strict learning, and the
    first micro-batches, take the row-by-row loop meanwhile (the same updates).
    """
    if kind == "mlp":
        return (opt, True, False), (opt, True, True)
    if kind == "program":
        return ("program", opt, False), ("program", opt, True)
    return ((opt, False, False),)


def _train_loop(variant: Variant) -> Any:
    with _lock:
        dispatcher = _dispatchers.get(variant)
        if dispatcher is None:
            if variant[0] == "program":
                dispatcher = _program_loops().make_program_loop(int(variant[1]), bool(variant[2]))
            else:
                dispatcher = _loops().make_train_loop(*variant)
            _dispatchers[variant] = dispatcher
        return dispatcher


def _compile_variant(variant: Variant) -> Any:
    """Compile ``variant`` in this process (or load it from the cache); returns the dispatcher."""
    if variant[0] == "program":
        return _program_loops().compile_variant(int(variant[1]), bool(variant[2]))
    return _loops().compile_variant(*variant)


def _job(variant: Variant) -> str:
    """``variant`` as a compiler child's job: ``opt:hidden:grouped`` or ``program:opt:grouped``."""
    first, second, grouped = variant
    return f"{first}:{int(second)}:{int(grouped)}"


def _prepare_base(variants: tuple[Variant, ...] = (), processes: int = 1) -> None:
    started = time.perf_counter()
    with _lock:
        variants = tuple(v for v in variants if v not in _dispatchers)
    children = _start_compilers(variants, processes)
    # A parameter-free SGD would be rejected; one scalar is enough to run Optimizer.__init__.
    with OPTIMIZER_IMPORT_LOCK:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    warmed = time.perf_counter()
    _wait_for_compilers(children)
    _precompiled.update(variants if children else ())
    _loops().compile_standardizer()
    logger.debug(
        "torch optimizers ready in %.2fs; numba and the standardizer %.2fs later",
        warmed - started,
        time.perf_counter() - warmed,
    )


def _compile(variant: Variant) -> None:
    started = time.perf_counter()
    with _lock:
        dispatcher = _dispatchers.get(variant)
    if dispatcher is None and variant not in _precompiled:
        _wait_for_compilers(_start_compilers((variant,), 1))
    if dispatcher is None:
        dispatcher = _compile_variant(variant)  # loads what the child compiled
        with _lock:
            _dispatchers.setdefault(variant, dispatcher)
    logger.debug("fused loop %s ready in %.2fs", variant, time.perf_counter() - started)


# Compiling in a child process keeps the GIL free: a compile thread in the worker
# makes every torch op of the autograd path (which trains meanwhile) wait up to
# the 5 ms switch interval for the GIL, slowing it ~4x. The child writes numba's
# on-disk cache; this process then loads from it in a fraction of the time. The
# child imports only the loops' module: ``streamtrainer`` and
# ``streamtrainer.training`` are stood in by bare packages so that their
# ``__init__`` (and torch, 2 s) stays out, while the module keeps its real name,
# which the cache entries refer to.
#
# The child dies with the worker, even with a kill -9 of it (Linux): it arms a parent-death
# SIGKILL first thing, then checks that the worker did not die before that (else the kernel
# would never send it). It is started from the compile thread, which waits on it: the signal
# follows the thread that started the child, not the process. A compile killed midway leaves
# numba's cache consistent: numba writes each file to a temporary name and renames it, the
# index before the data, and an index entry whose data file is missing is a cache miss
# (numba 0.68, caching.IndexDataCacheFile); at worst a ``*.tmp.*`` file stays behind.
_CHILD_CODE = """
import ctypes, os, sys, types
root, jobs, parent = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
except (AttributeError, OSError):
    pass  # not Linux
if os.getppid() != parent:
    sys.exit(1)  # the worker is gone already
for name in ("streamtrainer", "streamtrainer.training"):
    package = types.ModuleType(name)
    package.__path__ = [root + "/" + name.replace(".", "/")]
    sys.modules[name] = package
from streamtrainer.training import fused_loops
fused_loops.compile_standardizer()
for job in filter(None, jobs.split(",")):
    first, second, grouped = job.split(":")
    if first == "program":
        from streamtrainer.training import program_loops
        program_loops.compile_variant(int(second), grouped == "1")
    else:
        fused_loops.compile_variant(int(first), second == "1", grouped == "1")
"""
_precompiled: set[Variant] = set()


def _start_compilers(variants: tuple[Variant, ...], processes: int) -> list[subprocess.Popen[bytes]]:
    """Start up to ``processes`` children compiling ``variants`` (and the standardizer) into the cache."""
    if not variants:
        return []  # the standardizer alone compiles in a quarter second: not worth a process
    root = str(Path(__file__).resolve().parents[2])
    _use_user_cache_dir()  # the children inherit NUMBA_CACHE_DIR
    shares = [variants[i::processes] for i in range(min(processes, len(variants)))]
    children = []
    for share in shares:
        jobs = ",".join(map(_job, share))
        try:
            children.append(
                subprocess.Popen(
                    [sys.executable, "-c", _CHILD_CODE, root, jobs, str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        except OSError as error:
            logger.info("cannot start a compiler process (%s): compiling in this one", error)
            break
    return children


def _wait_for_compilers(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        try:
            _, stderr = child.communicate(timeout=_CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            logger.info("a compiler process took over %ds: compiling in this one", _CHILD_TIMEOUT_S)
            continue
        if child.returncode != 0:
            # This process compiles whatever the child did not put in the cache.
            logger.info("a compiler process failed: %s", stderr.decode(errors="replace").strip()[-500:])


_CHILD_TIMEOUT_S = 300


# -- checks -------------------------------------------------------------------


def _plan(model: nn.Module, optimizer: torch.optim.Optimizer, loss_name: str, task: str) -> _Plan | str:
    if loss_name not in LOSS_CODES:
        return f"no fused kernel for the loss {loss_name!r}"
    if catalog.LOSSES[loss_name].task != task:
        return f"loss {loss_name!r} does not fit a {task} task"
    layout = _layout(model)
    if isinstance(layout, str):
        return layout
    kind, params, program = layout
    n_outputs = program.n_outputs if program is not None else params[-1].shape[0]
    if loss_name == "ce" and n_outputs < 2:
        return "cross-entropy needs at least 2 outputs"
    if loss_name != "ce" and n_outputs != 1:
        return f"loss {loss_name!r} needs one output, the model has {n_outputs}"
    for p in params:
        if p.dtype != torch.float32 or p.device.type != "cpu" or p.layout != torch.strided:
            return f"parameters must be dense float32 on the CPU, not {p.dtype} on {p.device}"
        if not p.is_contiguous() or not p.requires_grad or p.is_conj() or p.is_neg():
            return "parameters must be contiguous, plain, and require grad"
        if getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None):
            return "a parameter has gradient hooks"
    opt = _optimizer_code(optimizer, params)
    if isinstance(opt, str):
        return opt
    if not _numba_installed():
        return "numba is not installed"
    if program is not None:
        return _Plan(kind, params, opt, LOSS_CODES[loss_name], program.n_features, program)
    return _Plan(kind, params, opt, LOSS_CODES[loss_name], params[0].shape[1])


def _layout(model: nn.Module) -> tuple[str, tuple[torch.Tensor, ...], lowering.Program | None] | str:
    """The built-in shapes as they are; any other model lowered (:mod:`lowering`).

    A lowered model that is exactly one of the built-in shapes (a user's module wrapping
    ``Sequential(Linear, ReLU, Linear)``, say) takes the hand-written loop, the fastest.
    """
    builtin = _builtin_layout(model)
    if builtin is not None:
        return builtin
    program = lowering.lowered(model)
    if isinstance(program, str):
        return f"no compiled loop for {program}"
    shape = program.builtin()
    if shape is not None:
        return shape[0], shape[1], None
    return "program", program.params, program


def _builtin_layout(model: nn.Module) -> tuple[str, tuple[torch.Tensor, ...], None] | str | None:
    if type(model) is nn.Linear:
        modules: list[nn.Module] = [model]
        kind = "linear"
    elif (
        type(model) is nn.Sequential
        and len(model) == 3
        and type(model[0]) is nn.Linear
        and type(model[1]) is nn.ReLU
        and type(model[2]) is nn.Linear
    ):
        modules = [model, model[0], model[1], model[2]]
        kind = "mlp"
    else:
        return None
    for module in modules:
        if (
            module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or module._backward_pre_hooks
        ):
            return "the model has module hooks"
    linears = [m for m in modules if type(m) is nn.Linear]
    if any(m.bias is None for m in linears):
        return None  # a program
    params: list[torch.Tensor] = []
    for m in linears:
        params += [m.weight, m.bias]
    if len(list(model.parameters())) != len(params):
        return "the model has parameters the kernel does not know"
    return kind, tuple(params), None


def _optimizer_code(optimizer: torch.optim.Optimizer, params: tuple[torch.Tensor, ...]) -> int | str:
    reason = optimizers.optimizer_problem(optimizer, params, contiguous_state=True)
    if reason is not None:
        return reason
    return OPTIMIZER_CODES[type(optimizer)]


# -- glue ---------------------------------------------------------------------


def _state_views(
    optimizer: torch.optim.Optimizer, p: torch.Tensor, code: int
) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
    """Flat views of ``p``'s optimizer state (created as torch would on its first step)."""
    if code == _SGD:
        return _EMPTY, _EMPTY, None
    state = optimizer.state[p]
    if code == _ADAM:
        if not state:
            # torch.optim.Adam._init_group, for a CPU parameter without fused/capturable
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return _flat_view(state["exp_avg"]), _flat_view(state["exp_avg_sq"]), state["step"]
    if not state:
        # torch.optim.Adagrad.__init__ creates this; a parameter added later would lack it.
        group = optimizer.param_groups[0]
        state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        state["sum"] = torch.full_like(
            p, group.get("initial_accumulator_value", 0.0), memory_format=torch.preserve_format
        )
    return _flat_view(state["sum"]), _EMPTY, state["step"]


def _scalar_dtype() -> torch.dtype:
    # torch.optim.optimizer._get_scalar_dtype(): the step count follows the default dtype
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _flat_view(tensor: torch.Tensor) -> np.ndarray:
    view = tensor.detach().numpy().reshape(-1)
    if not view.flags.c_contiguous or not view.flags.writeable:
        raise FusedUnsupportedError("a tensor's memory cannot be updated in place")
    return view


def _float32_rows(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    # One compiled signature only: C-contiguous, writable float32 (numba types a read-only
    # array, such as one straight from np.frombuffer, differently and would compile again).
    return np.require(x, dtype=np.float32, requirements=["C", "W"])


_loops_module: ModuleType | None = None


def cache_dir() -> Path:
    """Where numba caches the compiled loops: ``NUMBA_CACHE_DIR`` (the CLI's ``--cache-dir`` sets it),
    else ``$XDG_CACHE_HOME/streamtrainer/numba``, else ``~/.cache/streamtrainer/numba``.

    Never the installed package: numba's default writes next to the module's source, which is
    read-only in the image (and shared by every user of an installation)."""
    _use_user_cache_dir()
    return Path(os.environ["NUMBA_CACHE_DIR"])


def _use_user_cache_dir() -> None:
    # numba reads NUMBA_CACHE_DIR when it is imported (and each @njit(cache=True) picks its cache
    # folder when it is decorated): set before the loops' module is imported, here and in the
    # compiler processes, which inherit the environment.
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    os.environ["NUMBA_CACHE_DIR"] = str(Path(base) / "streamtrainer" / "numba")
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba imported already, by someone else: let it read the variable again
        config.reload_config()


def _loops() -> ModuleType:
    """The compiled loops' module; numba is imported on first use (~0.5 s)."""
    global _loops_module  # noqa: PLW0603 - a process-wide, import-once cache
    if _loops_module is None:
        _use_user_cache_dir()
        started = time.perf_counter()
        from streamtrainer.training import fused_loops

        logger.debug("imported numba and the fused loops in %.2fs", time.perf_counter() - started)
        _loops_module = fused_loops
    return _loops_module


def _program_loops() -> ModuleType:
    """The lowered programs' compiled loop (imports numba and the fused loops first)."""
    _loops()
    from streamtrainer.training import program_loops

    return program_loops


@cache
def _numba_installed() -> bool:
    # find_spec, not an import: importing numba takes ~0.5 s, which belongs in the background.
    if find_spec("numba") is None:
        logger.warning("numba is not installed: per-record learning stays on autograd, ~100x slower")
        return False
    return True
