"""A compiled per-record (or micro-batch) step for any module: the traced graph path.

The numba loop (:mod:`streamtrainer.training.kernels`) covers the built-in
layouts. Any other module — a gated or residual block, a convolution over the
features — learns here: one optimizer step (forward, loss, gradient, update) is
written functionally (``torch.func.grad_and_value`` over
``torch.func.functional_call`` plus the optimizer's update formulas), unrolled
over a block of ``S`` steps of ``B`` rows, traced into an aten graph
(``make_fx``), exported and compiled ahead of time by Inductor
(``torch._inductor.aoti_compile_and_package``) into a ``.pt2`` package cached
on disk. One call into the package then takes ``S`` steps with no Python in
between.

Why AOTInductor, measured on a 2-core CPU (torch 2.13, gated block d=16 h=64,
Adam): the naive autograd loop learns 1.7-1.9k records/s; a block of S=16
steps through the package 46-50k/s (26x); plain ``torch.compile(fullgraph=True)``
of the same block only 24k/s (dynamo's guards and re-traces per call) and
7.9 s to start even warm, where a cached package loads in ~2 s. On the same
machine shared with other work (load 4-5 on 2 cores; ``python -m
bench.graph_step``): strict 11-36x the naive loop (S=8/16), see the bench.

Exactness: the update formulas mirror torch.optim's single-tensor CPU code op
for op (``lerp``, ``mul``/``addcmul``, bias corrections in float64 as torch
computes them in Python, ``addcdiv`` as a division then a product), so the
parameters and the optimizer state agree with the autograd loop to float32
rounding (tests/training/test_graph_step.py: within 1e-5). Everything is
written back into ``model.parameters()`` and ``optimizer.state`` after a
call: they stay the single source of truth, as with the numba loop.

Remainders: a call's rows are padded to whole blocks, each row weighted 1 (a
real record) or 0 (padding); a step whose rows are all padding changes nothing
(its results are discarded by a ``where``). So every row goes through the
compiled package, also a final short group of a micro-batch (its mean is over
its real rows, as torch's), and there is no slow eager tail.

Compiling takes 20-150 s cold (S, B, the module's size, how busy the machine is:
2 cores shared with other work), so it runs in a child process (see
``_CHILD_CODE``) while the caller keeps its autograd path; a restarted process
finds the package in the cache (``key`` = sha256 of one traced step's aten
graph and constants, the shapes, S, B, the optimizer's hyper-parameters and the
torch version) and is ready 4-5 s after it started (importing torch 1.3-1.7 s,
the tracing and packaging tools 1.2-1.5 s, see :func:`prepare`; one traced
step 0.2 s; the first package load 1.3-1.5 s).

Threads: the package's own kernels are compiled single-threaded, but its matrix
products call aten, which uses torch's intra-op pool. On a busy 2-core machine
two threads made a 16-step call 30-60x slower (35-67 ms instead of ~1 ms, the
OpenMP barrier waiting on descheduled threads), micro-batch B=32 58k records/s
instead of 465k; run the worker with ``torch.set_num_threads(1)`` there.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.nn.modules import module as torch_module

from streamtrainer.training import optimizers
from streamtrainer.training.exceptions import CompiledPathRefusedError, TrainingError

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

_TASK_OF_LOSS: Final = {"mse": "regression", "l1": "regression", "bce": "binary", "ce": "multiclass"}
# Random ops in a traced step: their draws cannot match autograd's, so such a module is refused.
_RANDOM_OPS: Final = ("bernoulli", "dropout", "rand", "normal", "uniform", "multinomial", "exponential")
STATES: Final = ("idle", "compiling", "ready", "failed")


class GraphUnsupportedError(CompiledPathRefusedError):
    """The model/optimizer/loss combination cannot take the graph path; keep the autograd path."""


def block_steps(batch_size: int) -> int:
    """Steps per compiled call for a batch size: S=16 strict, fewer for micro-batches.

    Measured (gated d=16 h=64, Adam, 2 cores): strict S=8 38-41k records/s (20 s
    cold), S=16 46-50k/s (43 s cold); B=32 with S=4 601k/s (16 s cold). Past ~128
    rows per call the call overhead (~20 us) is already small against the work.
    """
    if batch_size <= 1:
        return 16
    return max(2, min(16, 128 // batch_size))


# -- checks -------------------------------------------------------------------


def graph_supported(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    loss: str,
    task: str,
    n_features: int | None = None,
) -> str | None:
    """Why the graph path cannot train this combination (a log line), or None: it can.

    Cheap (no tracing). With ``n_features`` the model's output shape is checked too
    (one forward on a zero record). What only a trace shows (random ops in
    ``forward``, a buffer it mutates) fails the compile instead, with the reason.
    """
    if loss not in _TASK_OF_LOSS:
        return f"no graph step for the loss {loss!r}"
    if _TASK_OF_LOSS[loss] != task:
        return f"loss {loss!r} does not fit a {task} task"
    if (
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or getattr(torch_module, "_global_backward_pre_hooks", None)
    ):
        return "global module hooks are registered"
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if (
            module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or module._backward_pre_hooks
        ):
            return f"{label} has module hooks"
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and module.training:
            return f"{label} is a dropout with p={module.p} (random: its draws cannot match autograd's)"
        if (
            isinstance(module, nn.modules.batchnorm._NormBase)
            and module.training
            and module.track_running_stats
        ):
            return f"{label} is a batch norm in training mode (its forward updates its running statistics)"
    params = list(model.parameters())
    if not params:
        return "the model has no parameters"
    for p in params:
        if p.dtype != torch.float32 or p.device.type != "cpu" or p.layout != torch.strided:
            return f"parameters must be dense float32 on the CPU, not {p.dtype} on {p.device}"
        if not p.requires_grad or p.is_conj() or p.is_neg():
            return "parameters must be plain and require grad"
        if getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None):
            return "a parameter has gradient hooks"
    for _, b in model.named_buffers():
        if b.device.type != "cpu":
            return "buffers must be on the CPU"
    reason = optimizers.optimizer_problem(optimizer, params)
    if reason is not None:
        return reason
    if n_features is not None:
        return _output_problem(model, loss, n_features)
    return None


def _output_problem(model: nn.Module, loss: str, n_features: int) -> str | None:
    try:
        # On copies of the buffers: a forward that updates one must not count this check.
        copies = {name: b.detach().clone() for name, b in model.named_buffers()}
        with torch.no_grad():
            out = torch.func.functional_call(model, copies, (torch.zeros(1, n_features),))
    except Exception as error:  # noqa: BLE001 - any failure of the user's forward is a reason
        return f"the model's forward fails on (1, {n_features}): {error!r}"
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        return "the model's forward must return one float32 tensor"
    if loss == "ce":
        if out.dim() != 2 or out.shape[1] < 2:
            return f"cross-entropy needs (n, classes >= 2) outputs, got {tuple(out.shape)}"
    elif out.numel() != 1:
        return f"loss {loss!r} needs one output per record, got {tuple(out.shape)}"
    return None


# -- the functional step ----------------------------------------------------------


class _Step:
    """The functional step of one model/optimizer/loss, and blocks of it.

    Flat inputs of a block (what the compiled package takes, in order): the P
    parameters, the buffers, the optimizer's state tensors (Adam: P exp_avg then
    P exp_avg_sq; Adagrad: P sum; SGD: none), the P step counts (float64, one
    vector), the rows ``x`` (S*B, d) float32, labels ``y`` (S*B,) float32, row
    weights ``w`` (S*B,) float32 (1: a record, 0: padding), and ``lr`` (float64,
    0-dim). Outputs: the new parameters, state tensors and step counts, then each
    row's loss and prediction (float32).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, loss: str, task: str) -> None:
        kind = optimizers.optimizer_kind(optimizer)
        if kind is None:
            raise GraphUnsupportedError(f"no graph step for the optimizer {type(optimizer).__name__}")
        self.model, self.optimizer, self.loss, self.task, self.kind = model, optimizer, loss, task, kind
        self.param_names = [name for name, _ in model.named_parameters()]
        self.buffer_names = [name for name, _ in model.named_buffers()]
        self.n_params = len(self.param_names)
        self.group_hyper = _group_hyper(optimizer)
        self.beta1, self.beta2, self.eps, self.lr_decay = self.group_hyper
        # torch counts steps in a float32 tensor (the default dtype): past 2**24 the count stops
        # growing, and so must ours to stay identical.
        self.round_step = _scalar_dtype() == torch.float32
        self._grad = torch.func.grad_and_value(self._group_loss, has_aux=True)

    def hyper(self) -> dict[str, Any]:
        """What the compiled graph bakes in besides the traced code (part of the cache key)."""
        return {
            "optimizer": self.kind,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "lr_decay": self.lr_decay,
            "round_step": self.round_step,
            "loss": self.loss,
            "task": self.task,
        }

    def n_states(self) -> int:
        return len(optimizers.STATE_NAMES[self.kind]) * self.n_params

    # The step of one group of rows.
    def _group_loss(
        self,
        params: list[torch.Tensor],
        buffers: list[torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        tensors = dict(zip(self.param_names, params, strict=True))
        tensors.update(zip(self.buffer_names, buffers, strict=True))
        outputs = torch.func.functional_call(self.model, tensors, (x,))
        per_record = self._per_record_loss(outputs, y)
        count = w.sum()
        # The group's mean over its real rows (padding weighs 0), as torch's mean over the group.
        mean = (per_record * w).sum() / count.clamp_min(1.0)
        detached = outputs.detach()
        return mean, (per_record.detach(), self._predictions(detached), count)

    def _per_record_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # As OnlineLearner._per_record_loss.
        if self.loss == "ce":
            return F.cross_entropy(outputs, y.long(), reduction="none")
        scores = outputs.reshape(-1)
        if self.loss == "mse":
            return F.mse_loss(scores, y, reduction="none")
        if self.loss == "l1":
            return F.l1_loss(scores, y, reduction="none")
        return F.binary_cross_entropy_with_logits(scores, y, reduction="none")

    def _predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        # As OnlineLearner._predictions, in float32 (class indices are exact).
        if self.task == "multiclass":
            return outputs.argmax(dim=-1).to(torch.float32)
        scores = outputs.reshape(-1)
        if self.task == "binary":
            return (scores > 0).to(torch.float32)
        return scores

    def group_step(
        self,
        params: list[torch.Tensor],
        buffers: list[torch.Tensor],
        states: list[torch.Tensor],
        steps: torch.Tensor,
        *,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        lr: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step on a group's mean loss; a group of padding only changes nothing."""
        grads, (_, (losses, predictions, count)) = self._grad(params, buffers, x, y, w)
        active = count > 0
        new_steps = steps + 1.0
        if self.round_step:
            new_steps = new_steps.to(torch.float32).to(torch.float64)
        n = self.n_params
        new_params: list[torch.Tensor] = []
        new_states: list[torch.Tensor] = []
        if self.kind == "sgd":
            # torch: param.add_(grad, alpha=-lr)
            for p, g in zip(params, grads, strict=True):
                new_params.append(p + g * (-lr).to(torch.float32))
        elif self.kind == "adam":
            exp_avgs, exp_avg_sqs = states[:n], states[n:]
            new_avgs: list[torch.Tensor] = []
            new_sqs: list[torch.Tensor] = []
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                step = new_steps[i]
                # torch.optim.adam._single_tensor_adam, CPU, not capturable: the bias corrections
                # are Python floats (float64) from the step count.
                m = exp_avgs[i].lerp(g, 1.0 - self.beta1)
                v = exp_avg_sqs[i].mul(self.beta2).addcmul(g, g, value=1.0 - self.beta2)
                bias_correction1 = 1.0 - torch.pow(self.beta1, step)
                bias_correction2 = 1.0 - torch.pow(self.beta2, step)
                step_size = (lr / bias_correction1).to(torch.float32)
                bias_correction2_sqrt = bias_correction2.sqrt().to(torch.float32)
                denom = (v.sqrt() / bias_correction2_sqrt).add(self.eps)
                # param.addcdiv_(exp_avg, denom, value=-step_size): param + value * (exp_avg / denom)
                new_params.append(p + (m / denom) * (-step_size))
                new_avgs.append(m)
                new_sqs.append(v)
            new_states = new_avgs + new_sqs
        else:  # adagrad
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                # torch.optim.adagrad._single_tensor_adagrad
                clr = (lr / (1.0 + (new_steps[i] - 1.0) * self.lr_decay)).to(torch.float32)
                total = states[i].addcmul(g, g, value=1.0)
                std = total.sqrt().add(self.eps)
                new_params.append(p + (g / std) * (-clr))
                new_states.append(total)
        new_params = [torch.where(active, new, old) for new, old in zip(new_params, params, strict=True)]
        new_states = [torch.where(active, new, old) for new, old in zip(new_states, states, strict=True)]
        new_steps = steps if self.kind == "sgd" else torch.where(active, new_steps, steps)
        return new_params, new_states, new_steps, losses, predictions

    def block(self, n_steps: int, batch_size: int) -> Callable[..., tuple[torch.Tensor, ...]]:
        """The flat function of ``n_steps`` group steps of ``batch_size`` rows (see the class)."""
        n, n_buffers, n_states = self.n_params, len(self.buffer_names), self.n_states()

        def run(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            params = list(args[:n])
            buffers = list(args[n : n + n_buffers])
            at = n + n_buffers
            states = list(args[at : at + n_states])
            steps, x, y, w, lr = args[at + n_states :]
            losses, predictions = [], []
            for g in range(n_steps):
                rows = slice(g * batch_size, (g + 1) * batch_size)
                params, states, steps, loss, prediction = self.group_step(
                    params, buffers, states, steps, x=x[rows], y=y[rows], w=w[rows], lr=lr
                )
                losses.append(loss)
                predictions.append(prediction)
            return (*params, *states, steps, torch.cat(losses), torch.cat(predictions))

        return run

    def example_inputs(self, rows: int, n_features: int) -> tuple[torch.Tensor, ...]:
        """Inputs of the right shapes and dtypes for tracing a block of ``rows`` rows."""
        params = [p.detach().clone() for p in self.model.parameters()]
        buffers = [b.detach().clone() for b in self.model.buffers()]
        states = [torch.zeros_like(p) for _ in optimizers.STATE_NAMES[self.kind] for p in params]
        return (
            *params,
            *buffers,
            *states,
            torch.ones(self.n_params, dtype=torch.float64),
            torch.zeros(rows, n_features),
            torch.zeros(rows),
            torch.ones(rows),
            torch.tensor(0.01, dtype=torch.float64),
        )


def _group_hyper(optimizer: torch.optim.Optimizer) -> tuple[float, float, float, float]:
    """(beta1, beta2, eps, lr_decay) of the optimizer's group, as the package bakes them in."""
    group = optimizer.param_groups[0]
    betas = group.get("betas", (0.9, 0.999))
    return float(betas[0]), float(betas[1]), float(group.get("eps", 0.0)), float(group.get("lr_decay", 0.0))


def _scalar_dtype() -> torch.dtype:
    # torch.optim.optimizer._get_scalar_dtype(): the step count follows the default dtype
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class TracedStep:
    """One step traced into an aten graph (``make_fx``), its cache key, and what a compiler child needs.

    The key covers what the compiled package bakes in: the aten graph of one step
    (everything the module's code does), the values of the constants it holds
    (``torch.tensor(2.0)`` in a ``forward``), the inputs' shapes and dtypes, S, B,
    the optimizer's hyper-parameters, and the versions of torch and Python.
    """

    def __init__(self, step: _Step, *, n_features: int, n_steps: int, batch_size: int) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.fx.graph import _custom_builtins

        inputs = step.example_inputs(batch_size, n_features)
        before = [t.clone() for t in inputs]
        graph = make_fx(step.block(1, batch_size))(*inputs)  # runs the step for real, on copies
        # In place on a buffer (a forward counting its calls, a running mean) or on the rows: the
        # compiled package could not carry it. functional_call swapped in the copies: the module's
        # own buffers are untouched.
        if not all(torch.equal(a, b) for a, b in zip(before, inputs, strict=True)):
            raise GraphUnsupportedError("the model's forward mutates a buffer or its input in place")
        constants: dict[str, torch.Tensor] = {}
        for node in graph.graph.nodes:
            if node.op == "call_function" and any(word in str(node.target) for word in _RANDOM_OPS):
                raise GraphUnsupportedError(f"the model's forward draws random numbers ({node.target})")
            if node.op == "get_attr":
                value = getattr(graph, node.target)
                if not isinstance(value, torch.Tensor):
                    raise GraphUnsupportedError(f"the traced step holds a {type(value).__name__} constant")
                constants[node.target] = value.detach().contiguous()
            elif node.op == "call_module":
                raise GraphUnsupportedError("the traced step calls a module")
        code = graph.graph.python_code("self")
        unknown = set(code.globals) - set(_custom_builtins)
        if unknown:
            raise GraphUnsupportedError(f"the traced step needs the globals {sorted(unknown)}")
        self.source: str = code.src
        self.constants = constants
        self.shapes = [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in inputs]
        self.n_steps, self.batch_size = n_steps, batch_size
        self.n_params, self.n_buffers, self.n_states = step.n_params, len(step.buffer_names), step.n_states()
        digest = hashlib.sha256()
        digest.update(self.source.encode())
        for name in sorted(constants):
            value = constants[name]
            digest.update(f"{name} {list(value.shape)} {value.dtype}".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        description = {
            "shapes": self.shapes,
            "n_steps": n_steps,
            "batch_size": batch_size,
            "hyper": step.hyper(),
            "torch": torch.__version__,
            "python": list(sys.version_info[:2]),
            "machine": platform.machine(),
            "recipe": _RECIPE,
        }
        digest.update(json.dumps(description, sort_keys=True).encode())
        self.key = digest.hexdigest()

    def write(self, folder: Path, package: Path) -> None:
        """What the compiler child reads: the step's source, its constants (safetensors), the layout."""
        from safetensors.torch import save_file

        (folder / "step.py").write_text(self.source)
        save_file(self.constants, str(folder / "constants.safetensors"))
        meta = {
            "shapes": self.shapes,
            "n_steps": self.n_steps,
            "batch_size": self.batch_size,
            "n_params": self.n_params,
            "n_buffers": self.n_buffers,
            "n_states": self.n_states,
            "package": str(package),
        }
        (folder / "meta.json").write_text(json.dumps(meta))


# The compiler child: rebuilds the traced step from its aten source and constants (no pickle, no
# need to know how to build the user's module), unrolls it over S steps in a module holding its
# constants as buffers, exports that (non-strict) and compiles it with AOTInductor into a temporary
# package it renames into place: a child killed midway leaves no torn package under the real name.
#
# Why a child, not a thread: (1) safety: make_fx and torch.export rewrite process-global state
# (torch.fx.traceback.current_meta) that torch's own optimizer wrappers touch on every
# zero_grad/step: a compile thread made the training thread's zero_grad raise KeyError: 'custom'
# (torch 2.13, seen here). (2) speed: a compile holding the GIL slows the autograd loop that
# trains meanwhile. The child compiles with one Inductor compile thread, so it takes one core. It is
# not niced. Measured on a 2-core machine shared with other work (load 3-5), bench.graph_step: while
# a cold compile runs (40-150 s) the autograd loop trains at 0.4-0.7k records/s instead of 1.1-2.3k;
# with the child at nice 10 the loop kept 1.2k of 2.0k/s but the compile took 482 s. The compiled
# path learns 20x+ faster, so finishing the compile sooner is worth far more records than the
# slower autograd meanwhile costs. The child dies with its parent (PR_SET_PDEATHSIG).
_CHILD_CODE = """
import ctypes, json, os, sys
folder, parent = sys.argv[1], int(sys.argv[2])
try:
    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
except (AttributeError, OSError):
    pass  # not Linux
if os.getppid() != parent:
    sys.exit(1)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
import torch
import torch._inductor.config
from torch import nn
torch._inductor.config.cpp.threads = 1  # see _RECIPE
from torch.fx.graph import _custom_builtins
from safetensors.torch import load_file
meta = json.load(open(os.path.join(folder, "meta.json")))
constants = load_file(os.path.join(folder, "constants.safetensors"))
namespace = {name: builtin.obj for name, builtin in _custom_builtins.items()}
exec(compile(open(os.path.join(folder, "step.py")).read(), "graph_step", "exec"), namespace)
forward = namespace["forward"]
S, B = meta["n_steps"], meta["batch_size"]
P, NB, NS = meta["n_params"], meta["n_buffers"], meta["n_states"]
head = P + NB + NS + 1
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        for name, value in constants.items():
            self.register_buffer(name, value)  # the step's source reads them as self.<name>
    def forward(self, *args):
        carried, (x, y, w, lr) = list(args[:head]), args[head:]
        losses, predictions = [], []
        for g in range(S):
            rows = slice(g * B, (g + 1) * B)
            out = forward(self, *carried, x[rows], y[rows], w[rows], lr)
            carried = [*out[:P], *carried[P:P + NB], *out[P:P + NS + 1]]
            losses.append(out[-2])
            predictions.append(out[-1])
        return (*carried[:P], *carried[P + NB:], torch.cat(losses), torch.cat(predictions))
inputs = []
for i, (shape, dtype) in enumerate(meta["shapes"]):
    if i >= head and i < head + 3:
        shape = [shape[0] * S, *shape[1:]]
    inputs.append(torch.ones(shape, dtype=getattr(torch, dtype)))
inputs = tuple(inputs)
exported = torch.export.export(Block(), inputs, strict=False)
package = meta["package"]
name = "." + os.path.basename(package) + f".{os.getpid()}.tmp.pt2"
temporary = os.path.join(os.path.dirname(package), name)
try:
    torch._inductor.aoti_compile_and_package(exported, package_path=temporary)
    os.replace(temporary, package)
finally:
    if os.path.exists(temporary):
        os.unlink(temporary)
"""
_CHILD_TIMEOUT_S = 900
# How the child compiles, part of the key. Kernels compiled single-threaded (cpp.threads=1): the
# tensors are tiny, and OpenMP regions cost more than they save: on a loaded 2-core machine a
# 16-step call took 67 ms with 2 OpenMP threads against 0.85 ms with 1 (torch 2.13).
_RECIPE = "aoti-cpp-threads-1"


def compile_package(traced: TracedStep, package: Path) -> None:
    """Compile ``traced``'s block of S steps into ``package`` in a child process; blocks until done.

    Raises :class:`GraphUnsupportedError` with the child's last error lines if it fails.
    """
    import tempfile

    package.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="graph-step-") as folder:
        traced.write(Path(folder), package)
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, folder, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, stderr = child.communicate(timeout=_CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise GraphUnsupportedError(f"the compiler process took over {_CHILD_TIMEOUT_S}s") from None
    if child.returncode != 0 or not package.is_file():
        lines = stderr.decode(errors="replace").strip().splitlines()
        errors = [line for line in lines if "Error" in line] or lines
        raise GraphUnsupportedError(f"the compiler process failed: {' | '.join(errors[-2:])[-400:]}")


_prepared: threading.Thread | None = None


def prepare() -> None:
    """Import what tracing and loading a package need, in a background thread; returns at once.

    Call it when a worker starts, before training (the imports would otherwise
    race nothing, but they hold the GIL): of a restarted worker's ~4-5 s from
    process start to a loaded package (2 cores, busy), ~1.3 s are these imports
    (``make_fx``, ``torch._inductor.package``), which then overlap the group join.
    Idempotent.
    """
    global _prepared  # noqa: PLW0603 - one preparation per process
    if _prepared is None:
        _prepared = threading.Thread(target=_import_tools, name="graph-step-prepare", daemon=True)
        _prepared.start()


def _import_tools() -> None:
    started = time.perf_counter()
    importlib.import_module("torch.fx.experimental.proxy_tensor")
    importlib.import_module("torch._inductor.package")
    logger.debug("graph step tools imported in %.2fs", time.perf_counter() - started)


def default_cache_dir() -> Path:
    """``<the kernels' cache root>/graphs``: beside numba's cache (``--cache-dir``, ``NUMBA_CACHE_DIR``'s
    parent, else ``$XDG_CACHE_HOME/streamtrainer`` or ``~/.cache/streamtrainer``)."""
    from streamtrainer.training import kernels

    return kernels.cache_dir().parent / "graphs"


# -- the path: compile in the background, call ------------------------------------


class GraphCall:
    """One call's steps, prepared: :meth:`run` them (any thread), then take the :meth:`result`.

    As :class:`streamtrainer.training.kernels.FusedCall`: nothing else may touch the
    model or the optimizer between the preparation and ``result``, which writes the
    parameters, the optimizer's state and its step counts back (running the steps
    first if need be) and returns each record's loss and prediction (float64).
    """

    __slots__ = ("_args", "_blocks", "_n", "_path", "_ran", "_rows", "losses", "predictions")

    def __init__(
        self,
        path: GraphPath,
        blocks: Callable[..., Sequence[torch.Tensor]],
        args: list[torch.Tensor],
        n: int,
        rows: int,
    ) -> None:
        self._path, self._blocks, self._args, self._n, self._rows = path, blocks, args, n, rows
        self._ran = n == 0
        self.losses = np.empty(n, dtype=np.float64)
        self.predictions = np.empty(n, dtype=np.float64)

    def run(self) -> None:
        """Take the steps (the compiled package, one call per block of S steps)."""
        if self._ran:
            return
        path = self._path
        head = path.n_head
        carried, (x, y, w, lr) = self._args[:head], self._args[head:]
        step_rows = self._rows
        losses, predictions = [], []
        with torch.no_grad():
            for start in range(0, x.shape[0], step_rows):
                rows = slice(start, start + step_rows)
                outputs = self._blocks(*carried, x[rows], y[rows], w[rows], lr)
                carried = path.carry(carried, outputs)
                losses.append(outputs[-2])
                predictions.append(outputs[-1])
        n = self._n
        self.losses[:] = torch.cat(losses)[:n].numpy()
        self.predictions[:] = torch.cat(predictions)[:n].numpy()
        self._args = carried
        self._ran = True

    def result(self) -> tuple[F64, F64]:
        """Run if not yet, write everything back; each record's loss and prediction."""
        self.run()
        if self._n:
            self._path.write_back(self._args)
            self._n = 0
        return self.losses, self.predictions


class GraphPath:
    """The compiled graph step of one learner's model and optimizer, per batch size.

    :meth:`ready` (never blocks) schedules the compile of a batch size's block in
    the background the first time and says whether it is ready; :meth:`call`
    prepares a run. Compiled packages are cached in ``cache_dir`` (default
    :func:`default_cache_dir`); a restarted process loads its package in ~3 s.
    Build it when :func:`graph_supported` is None. ``call`` checks the shapes and
    that the optimizer still fits (~20 us) and raises :class:`GraphUnsupportedError`,
    nothing moved, if not (a changed beta: build a new path).
    ``steps_per_call`` overrides :func:`block_steps` (tests use small blocks).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss: str,
        task: str,
        cache_dir: Path | None = None,
        n_features: int | None = None,
        steps_per_call: int | None = None,
    ) -> None:
        reason = graph_supported(model, optimizer, loss=loss, task=task, n_features=n_features)
        if reason is not None:
            raise GraphUnsupportedError(reason)
        self.model, self.optimizer = model, optimizer
        self._step = _Step(model, optimizer, loss=loss, task=task)
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.n_features = n_features
        self._steps_per_call = steps_per_call
        self._params = list(model.parameters())
        n_states = self._step.n_states()
        self.n_head = self._step.n_params + len(self._step.buffer_names) + n_states + 1
        self._lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}
        # How each compile went (tests and the bench read them): "cold" or "warm" per batch size.
        self.compiles: dict[int, str] = {}

    def steps_per_call(self, batch_size: int) -> int:
        """S for ``batch_size``."""
        return self._steps_per_call or block_steps(batch_size)

    def ready(self, batch_size: int) -> bool:
        """Whether :meth:`call` runs compiled for ``batch_size``; schedules the compile. Never waits for it.

        The first call for a batch size traces one step on this thread (0.1-0.3 s: the
        cache key; make_fx is not safe beside a training thread) and starts a
        background thread that loads the cached package or has a child compile it.
        """
        return self._job(batch_size).state() == "ready"

    def wait(self, batch_size: int, timeout_s: float | None = None) -> bool:
        """Schedule (if need be) and wait for ``batch_size``'s compile; False: not ready in time or failed."""
        job = self._job(batch_size)
        job.done.wait(timeout_s)
        return job.state() == "ready"

    def state(self, batch_size: int) -> str:
        """``idle`` (never asked for), ``compiling``, ``ready`` or ``failed``; starts nothing."""
        with self._lock:
            job = self._jobs.get(batch_size)
        return "idle" if job is None else job.state()

    def failure(self, batch_size: int) -> str | None:
        """Why ``batch_size``'s compile failed (None: it did not)."""
        with self._lock:
            job = self._jobs.get(batch_size)
        return None if job is None else job.error

    def _job(self, batch_size: int) -> _Job:
        if batch_size < 1:
            raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
        with self._lock:
            job = self._jobs.get(batch_size)
            if job is None:
                job = self._jobs[batch_size] = _Job(self, batch_size)
                job.start()
            return job

    def call(self, x: F32, y: F32, batch_size: int, *, lr: float | None = None) -> GraphCall:
        """Prepare the steps over ``x`` (n, d) standardized and ``y`` (n,): one per ``batch_size`` rows.

        Through the compiled package when :meth:`ready`, else the same function run
        eagerly (same results, slow: for checks). ``lr``: the group's current rate
        unless given. The optimizer's state is created here as torch would on its first
        step. Raises :class:`GraphUnsupportedError` (nothing has moved) on wrong shapes.
        """
        if batch_size < 1:
            raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
        # A checkpoint restore or a user may have changed the optimizer since: the package bakes in
        # its hyper-parameters and the parameters it updates (~20 us to check).
        problem = optimizers.optimizer_problem(self.optimizer, self._params)
        if problem is None and _group_hyper(self.optimizer) != self._step.group_hyper:
            problem = "the optimizer's hyper-parameters changed since the step was built"
        if problem is not None:
            raise GraphUnsupportedError(problem)
        x_tensor = torch.from_numpy(np.require(x, dtype=np.float32, requirements=["C"]))
        y_tensor = torch.from_numpy(np.require(y, dtype=np.float32, requirements=["C"]))
        n = x_tensor.shape[0]
        if (
            x_tensor.dim() != 2
            or y_tensor.shape != (n,)
            or (self.n_features is not None and x_tensor.shape[1] != self.n_features)
        ):
            raise GraphUnsupportedError(
                f"expected features (n, {self.n_features or 'd'}) and labels (n,), "
                f"got {tuple(x_tensor.shape)} and {tuple(y_tensor.shape)}"
            )
        if self.n_features is None:
            self.n_features = int(x_tensor.shape[1])
        n_steps = self.steps_per_call(batch_size)
        block_rows = n_steps * batch_size
        if n == 0:  # no step: nothing moves, no optimizer state is created (as torch)
            return GraphCall(self, self._step.block(n_steps, batch_size), [], 0, block_rows)
        blocks: Callable[..., Sequence[torch.Tensor]]
        job = self._jobs.get(batch_size)
        if job is not None and job.state() == "ready" and job.runner is not None:
            blocks = job.runner
        else:
            blocks = self._step.block(n_steps, batch_size)
        padded = -(-n // block_rows) * block_rows
        w = torch.ones(padded)
        if padded != n:
            w[n:] = 0.0
            x_tensor = torch.cat([x_tensor, x_tensor.new_zeros(padded - n, x_tensor.shape[1])])
            y_tensor = torch.cat([y_tensor, y_tensor.new_zeros(padded - n)])
        group_lr = float(self.optimizer.param_groups[0]["lr"]) if lr is None else float(lr)
        args = [*self._read_state(), x_tensor, y_tensor, w, torch.tensor(group_lr, dtype=torch.float64)]
        return GraphCall(self, blocks, args, n, block_rows)

    def learn(self, x: F32, y: F32, batch_size: int) -> tuple[F64, F64]:
        """:meth:`call` and its result at once."""
        return self.call(x, y, batch_size).result()

    # -- state in and out --------------------------------------------------------------

    def _read_state(self) -> list[torch.Tensor]:
        """Parameters, buffers, optimizer state and step counts as the block's inputs (copies)."""
        step, optimizer = self._step, self.optimizer
        names = optimizers.STATE_NAMES[step.kind]
        states: list[list[torch.Tensor]] = [[] for _ in names]
        counts = torch.zeros(step.n_params, dtype=torch.float64)
        for i, p in enumerate(self._params):
            if step.kind == "sgd":
                continue
            state = optimizer.state[p]
            if not state:
                _init_state(optimizer, p, step.kind)
            problem = optimizers.state_problem(state, p, step.kind)
            if problem is not None:
                raise GraphUnsupportedError(problem)
            for slot, name in enumerate(names):
                states[slot].append(state[name].detach())
            counts[i] = float(state["step"])
        params = [p.detach() for p in self._params]
        buffers = [b.detach() for b in self.model.buffers()]
        return [*params, *buffers, *(t for slot in states for t in slot), counts]

    def carry(self, inputs: list[torch.Tensor], outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The inputs of the next block from this one's outputs (the buffers stay)."""
        n, n_buffers = self._step.n_params, len(self._step.buffer_names)
        n_states = self._step.n_states()
        return [
            *outputs[:n],
            *inputs[n : n + n_buffers],
            *outputs[n : n + n_states + 1],
        ]

    def write_back(self, carried: list[torch.Tensor]) -> None:
        """Copy the last block's parameters, optimizer state and step counts into torch's."""
        step = self._step
        n, n_buffers = step.n_params, len(step.buffer_names)
        names = optimizers.STATE_NAMES[step.kind]
        states = carried[n + n_buffers : n + n_buffers + step.n_states()]
        counts = carried[-1]
        with torch.no_grad():
            for i, p in enumerate(self._params):
                if carried[i] is not p:
                    p.copy_(carried[i])
                if step.kind == "sgd":
                    continue
                state = self.optimizer.state[p]
                for slot, name in enumerate(names):
                    source = states[slot * n + i]
                    if source is not state[name]:
                        state[name].copy_(source)
                state["step"].fill_(float(counts[i]))


def _flat_runner(package: Any) -> Callable[..., Sequence[torch.Tensor]]:
    """Call a loaded package with its flat tensors directly.

    Its own ``__call__`` parses its input and output tree specs and flattens the arguments
    on every call: 20% of a strict learner's time (gated block, 16 steps a call, ~85 of
    ~430 us a call, cProfile). Every input and output here is a flat tuple of tensors, so the
    loader's ``boxed_run`` takes them as they are (it consumes the list it is given).
    """
    loader = getattr(package, "loader", None)
    boxed_run = getattr(loader, "boxed_run", None)
    if boxed_run is None:  # another torch's package object: its own call
        return package  # type: ignore[no-any-return]

    def run(*tensors: torch.Tensor) -> Sequence[torch.Tensor]:
        return boxed_run(list(tensors))  # type: ignore[no-any-return]

    return run


def _init_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, kind: str) -> None:
    """``optimizer.state[p]`` as torch creates it for a CPU parameter (not fused, not capturable)."""
    state = optimizer.state[p]
    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
    if kind == "adam":
        # torch.optim.Adam._init_group
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    else:
        # torch.optim.Adagrad.__init__ creates this; a parameter added later would lack it.
        value = optimizer.param_groups[0].get("initial_accumulator_value", 0.0)
        state["sum"] = torch.full_like(p, value, memory_format=torch.preserve_format)


class _Job:
    """The compile (or cache load) of one batch size's block.

    Started on the caller's thread by the first :meth:`GraphPath.ready`: the one-step
    trace that gives the key (0.1-0.3 s, once per batch size; on this thread because
    make_fx rewrites global state the training thread's optimizer touches), then a
    daemon thread that loads the cached package or has a child process compile it
    first (:func:`compile_package`) and loads it then.
    """

    def __init__(self, path: GraphPath, batch_size: int) -> None:
        self.path, self.batch_size = path, batch_size
        self.done = threading.Event()
        self.runner: Callable[..., Sequence[torch.Tensor]] | None = None
        self.error: str | None = None
        self.started = time.perf_counter()

    def start(self) -> None:
        path, batch_size = self.path, self.batch_size
        try:
            if path.n_features is None:
                raise GraphUnsupportedError("the number of features is not known yet (pass n_features)")
            n_steps = path.steps_per_call(batch_size)
            traced = TracedStep(
                path._step, n_features=path.n_features, n_steps=n_steps, batch_size=batch_size
            )
        except Exception as error:  # noqa: BLE001 - any failure leaves training on autograd
            self._fail(error)
            return
        package = path.cache_dir / f"{traced.key}.pt2"
        warm = package.is_file()
        logger.info(
            "graph step: %s %s, S=%d B=%d (key %s)",
            "loading the cached package of" if warm else "compiling (cold, in the background)",
            type(path.model).__name__,
            n_steps,
            batch_size,
            traced.key[:12],
        )
        # A daemon thread: a worker stopped during a compile exits at once; its compiler child dies
        # with it, and the package is renamed into place only once complete.
        threading.Thread(
            target=self._run, args=(traced, package, warm), name=f"graph-step-{batch_size}", daemon=True
        ).start()

    def state(self) -> str:
        if not self.done.is_set():
            return "compiling"
        return "ready" if self.runner is not None else "failed"

    def _run(self, traced: TracedStep, package: Path, warm: bool) -> None:
        try:
            if not warm:
                compile_package(traced, package)
            runner = _flat_runner(torch._inductor.aoti_load_package(str(package)))
            self.path.compiles[self.batch_size] = "warm" if warm else "cold"
            self.runner = runner
            logger.info(
                "graph step ready for B=%d in %.1fs (%s)",
                self.batch_size,
                time.perf_counter() - self.started,
                "from the cache" if warm else "compiled",
            )
        except Exception as error:  # noqa: BLE001 - any failure leaves training on autograd
            self._fail(error)
        finally:
            self.done.set()

    def _fail(self, error: Exception) -> None:
        self.error = f"{type(error).__name__}: {error}"[:500]
        logger.warning(
            "graph step for B=%d failed; training stays on autograd: %s", self.batch_size, self.error
        )
        self.done.set()
