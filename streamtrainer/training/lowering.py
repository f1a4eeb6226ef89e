"""Lowering a user's ``nn.Module`` to a straight-line program the compiled loop can run.

:func:`lower` accepts any nesting of ``nn.Sequential``, and any module whose
``forward`` ``torch.fx.symbolic_trace`` traces to a straight chain (each node's
only input is the previous node's output) of known layers: ``Linear`` (with or
without bias), ReLU, LeakyReLU, Tanh, Sigmoid, GELU (``none``/``tanh``), SiLU,
ELU, Identity, Dropout with ``p=0`` and LayerNorm over the last dimension, or
their functional forms (``torch.relu``, ``F.gelu``, ``x.tanh()``...). The
result, a :class:`Program`, lists the operations with their sizes and
constants, and the model's parameters in the order of ``model.parameters()``
(which is how the optimizer's state is found for each). Anything else — a
residual add, random dropout, hooks, buffers, shared or frozen parameters —
gets a reason instead, in words a log line can show.

``Embedding``/``EmbeddingBag`` are not lowered: the wire format carries float32 features only.
Carried, ids would travel either as float32 feature columns (exact up to 2**24) or as a typed
int64 id field of the record schema, and the program would gather/scatter-add rows of the table.
"""

from __future__ import annotations

import inspect
import operator
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
import torch.fx
from torch import nn
from torch.nn import functional as F  # noqa: N812

from streamtrainer.training.program_ops import (
    ELU,
    GELU,
    GELU_TANH,
    LAYER_NORM,
    LEAKY_RELU,
    LINEAR,
    RELU,
    SIGMOID,
    SILU,
    TANH,
)

_NAMES: Final = {
    LINEAR: "Linear",
    RELU: "ReLU",
    LEAKY_RELU: "LeakyReLU",
    TANH: "Tanh",
    SIGMOID: "Sigmoid",
    GELU: "GELU",
    GELU_TANH: "GELU(tanh)",
    SILU: "SiLU",
    ELU: "ELU",
    LAYER_NORM: "LayerNorm",
}


@dataclass(frozen=True, slots=True)
class Op:
    """One operation: ``code``, its input and output widths, parameters (indices into
    :attr:`Program.params`, -1 for none) and a constant (LeakyReLU's slope, ELU's
    alpha, LayerNorm's eps)."""

    code: int
    n_in: int
    n_out: int
    weight: int = -1
    bias: int = -1
    constant: float = 0.0


@dataclass(frozen=True, slots=True)
class Program:
    """A lowered model: its operations in order, and its parameters in ``model.parameters()`` order.

    Made by :func:`lower` through :meth:`of`, which also builds the arrays the compiled loop takes.
    """

    ops: tuple[Op, ...]
    params: tuple[torch.Tensor, ...] = field(repr=False)
    # What the compiled loop takes, made once (not per call): the ops as rows of
    # (code, n_in, n_out, weight, bias), their constants, and where each parameter starts in the
    # flat parameter array (one more entry: the total).
    codes: npt.NDArray[np.int64] = field(
        repr=False, compare=False, default_factory=lambda: np.empty((0, 5), np.int64)
    )
    constants: npt.NDArray[np.float64] = field(repr=False, compare=False, default_factory=lambda: np.empty(0))
    offsets: npt.NDArray[np.int64] = field(
        repr=False, compare=False, default_factory=lambda: np.zeros(1, np.int64)
    )

    @classmethod
    def of(cls, ops: tuple[Op, ...], params: tuple[torch.Tensor, ...]) -> Program:
        """A program with its arrays for the compiled loop."""
        codes = np.array([(op.code, op.n_in, op.n_out, op.weight, op.bias) for op in ops], dtype=np.int64)
        offsets = np.zeros(len(params) + 1, dtype=np.int64)
        np.cumsum([p.numel() for p in params], out=offsets[1:])
        constants = np.array([op.constant for op in ops], dtype=np.float64)
        return cls(ops, params, codes.reshape(len(ops), 5), constants, offsets)

    @property
    def n_features(self) -> int:
        """Width of the input."""
        return self.ops[0].n_in

    @property
    def n_outputs(self) -> int:
        """Width of the output."""
        return self.ops[-1].n_out

    def describe(self) -> str:
        """``Linear(16->64) > ReLU > Linear(64->1)``: for log lines."""
        parts = []
        for op in self.ops:
            name = _NAMES[op.code]
            if op.code == LINEAR:
                name += f"({op.n_in}->{op.n_out}{'' if op.bias >= 0 else ', no bias'})"
            parts.append(name)
        return " > ".join(parts)

    def builtin(self) -> tuple[str, tuple[torch.Tensor, ...]] | None:
        """``("linear", (w, b))`` or ``("mlp", (w1, b1, w2, b2))`` when the program is exactly one of the
        shapes the hand-written loop trains (biases included), with the parameters in forward order."""
        codes = tuple(op.code for op in self.ops)
        if any(op.code == LINEAR and op.bias < 0 for op in self.ops):
            return None
        tensors = tuple(self.params[i] for op in self.ops if op.code == LINEAR for i in (op.weight, op.bias))
        if codes == (LINEAR,):
            return "linear", tensors
        if codes == (LINEAR, RELU, LINEAR):
            return "mlp", tensors
        return None


# Functions (and tensor methods) that fx records as call_function/call_method, with the code and
# how to read their constant: a name -> default of the bound arguments.
_ELEMENTWISE_FUNCTIONS: Final[dict[Any, int]] = {
    torch.relu: RELU,
    F.relu: RELU,
    torch.tanh: TANH,
    F.tanh: TANH,
    torch.sigmoid: SIGMOID,
    F.sigmoid: SIGMOID,
    F.silu: SILU,
    F.leaky_relu: LEAKY_RELU,
    F.elu: ELU,
    F.gelu: GELU,
    F.dropout: -1,
}
_METHODS: Final = {"relu": RELU, "tanh": TANH, "sigmoid": SIGMOID}


class _RefusedError(Exception):
    """Internal: the reason a model cannot be lowered."""


def lower(model: nn.Module) -> Program | str:
    """The model as a :class:`Program`, or the reason it cannot be lowered (a sentence for a log line).

    Costs a torch.fx trace (~1 ms): cache it (:func:`lowered` does, per model).
    """
    try:
        return _lower(model)
    except _RefusedError as refused:
        return f"{type(model).__name__}: {refused}"


def _lower(model: nn.Module) -> Program:
    _check_hooks_and_tensors(model)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    leaf = _leaf_op(model, "the model", index)
    ops: list[Op] = []
    if leaf is not _NOT_A_LEAF:
        if leaf is not None:
            ops.append(leaf)
    else:
        graph = _trace(model)
        modules = dict(model.named_modules())
        previous: torch.fx.Node | None = None
        for node in graph.nodes:
            if node.op == "placeholder":
                if previous is not None:
                    raise _RefusedError("forward takes more than one input")
                previous = node
                continue
            if node.op == "output":
                if node.args[0] is not previous:
                    raise _RefusedError("forward does not return the last layer's output")
                break
            inputs = [arg for arg in _flatten((node.args, node.kwargs)) if isinstance(arg, torch.fx.Node)]
            if previous is None or inputs != [previous]:
                raise _RefusedError(
                    f"forward is not a chain of known layers ({_what(node)} at node {node.name!r})"
                )
            op = _node_op(node, modules, index)
            if op is not None:
                ops.append(op)
            previous = node
    return _checked(ops, model, index)


_NOT_A_LEAF: Final = Op(-1, 0, 0)


def _trace(model: nn.Module) -> torch.fx.Graph:
    try:
        return torch.fx.symbolic_trace(model).graph
    except Exception as error:  # noqa: BLE001 - fx raises anything a forward raises on proxies
        raise _RefusedError(
            f"forward cannot be traced by torch.fx ({type(error).__name__}: {error})"
        ) from None


def _node_op(node: torch.fx.Node, modules: dict[str, nn.Module], index: dict[int, int]) -> Op | None:
    if node.op == "call_module":
        module = modules[str(node.target)]
        op = _leaf_op(module, f"layer {node.target!r}", index)
        if op is _NOT_A_LEAF:
            raise _RefusedError(
                f"forward is not a chain of known layers ({type(module).__name__} at node {node.name!r})"
            )
        return op
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        return _function_op(node)
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1 and not node.kwargs:
        return Op(_METHODS[str(node.target)], 0, 0)
    raise _RefusedError(f"forward is not a chain of known layers ({_what(node)} at node {node.name!r})")


def _function_op(node: torch.fx.Node) -> Op | None:
    function: Callable[..., Any] = node.target  # type: ignore[assignment]
    code = _ELEMENTWISE_FUNCTIONS[function]
    try:
        bound = inspect.signature(function).bind(*node.args, **node.kwargs)
    except ValueError:  # a builtin without a signature: torch.relu & co. take the input only
        names = ("input", "approximate") if code == GELU else ("input",)
        if len(node.args) > len(names) or set(node.kwargs) - set(names[len(node.args) :]):
            raise _RefusedError(f"unexpected arguments to {_what(node)} at node {node.name!r}") from None
        arguments = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    except TypeError:
        raise _RefusedError(f"unexpected arguments to {_what(node)} at node {node.name!r}") from None
    else:
        bound.apply_defaults()
        arguments = dict(bound.arguments)
    arguments.pop(next(iter(arguments)))  # the input
    if code == -1:  # F.dropout(x, p, training, inplace)
        if arguments.get("p") != 0 and arguments.get("training", True) is not False:
            raise _RefusedError(f"dropout with p={arguments.get('p')} at node {node.name!r} is random")
        return None
    inplace = bool(arguments.pop("inplace", False))
    if inplace and code not in {RELU, LEAKY_RELU}:
        raise _RefusedError(f"in-place {_what(node)} at node {node.name!r}")
    if code == LEAKY_RELU:
        slope = float(arguments.pop("negative_slope"))  # type: ignore[arg-type]
        if slope <= 0 and inplace:
            raise _RefusedError(f"in-place LeakyReLU with slope {slope} at node {node.name!r}")
        return Op(code, 0, 0, constant=slope)
    if code == ELU:
        return Op(code, 0, 0, constant=float(arguments.pop("alpha")))  # type: ignore[arg-type]
    if code == GELU:
        approximate = arguments.pop("approximate", "none")
        return Op(GELU_TANH if approximate == "tanh" else GELU, 0, 0)
    if arguments:
        raise _RefusedError(f"unexpected arguments to {_what(node)} at node {node.name!r}")
    return Op(code, 0, 0)


def _leaf_op(module: nn.Module, where: str, index: dict[int, int]) -> Op | None:
    """The op of a known layer (None: a no-op layer), or _NOT_A_LEAF."""
    kind = type(module)
    if kind is nn.Linear:
        assert isinstance(module, nn.Linear)
        bias = index[id(module.bias)] if module.bias is not None else -1
        return Op(LINEAR, module.in_features, module.out_features, index[id(module.weight)], bias)
    if kind is nn.ReLU:
        return Op(RELU, 0, 0)
    if kind is nn.LeakyReLU:
        assert isinstance(module, nn.LeakyReLU)
        slope = float(module.negative_slope)
        if module.inplace and slope <= 0:
            raise _RefusedError(f"{where}: in-place LeakyReLU with slope {slope}")
        return Op(LEAKY_RELU, 0, 0, constant=slope)
    if kind in (nn.Tanh, nn.Sigmoid):
        return Op(TANH if kind is nn.Tanh else SIGMOID, 0, 0)
    if kind is nn.GELU:
        assert isinstance(module, nn.GELU)
        return Op(GELU_TANH if module.approximate == "tanh" else GELU, 0, 0)
    if kind in (nn.SiLU, nn.ELU):
        if getattr(module, "inplace", False):
            raise _RefusedError(f"{where}: in-place {kind.__name__}")
        return Op(SILU, 0, 0) if kind is nn.SiLU else Op(ELU, 0, 0, constant=float(module.alpha))  # type: ignore[arg-type]
    if kind is nn.Identity:
        return None
    if kind is nn.Dropout:
        assert isinstance(module, nn.Dropout)
        if module.p != 0 and module.training:
            raise _RefusedError(f"{where}: Dropout(p={module.p}) is random")
        return None
    if kind is nn.LayerNorm:
        assert isinstance(module, nn.LayerNorm)
        if len(module.normalized_shape) != 1:
            raise _RefusedError(f"{where}: LayerNorm over more than the last dimension")
        width = module.normalized_shape[0]
        weight = index[id(module.weight)] if module.weight is not None else -1
        bias = index[id(module.bias)] if module.bias is not None else -1
        return Op(LAYER_NORM, width, width, weight, bias, float(module.eps))
    if kind is nn.Sequential and not list(module.children()):
        return None  # an empty Sequential is the identity (fx would trace it to nothing, too)
    return _NOT_A_LEAF


def _checked(ops: list[Op], model: nn.Module, index: dict[int, int]) -> Program:
    """Widths filled in and checked; every parameter used by exactly one op."""
    first_linear = next((i for i, op in enumerate(ops) if op.code == LINEAR), None)
    if first_linear is None:
        raise _RefusedError("no Linear layer")
    width = ops[first_linear].n_in
    sized: list[Op] = []
    for op in ops:
        if op.code in {LINEAR, LAYER_NORM}:
            if op.n_in != width:
                raise _RefusedError(f"{_NAMES[op.code]} expects {op.n_in} inputs, gets {width}")
            sized.append(op)
            width = op.n_out
        else:
            sized.append(Op(op.code, width, width, op.weight, op.bias, op.constant))
    used = [i for op in sized for i in (op.weight, op.bias) if i >= 0]
    if len(used) != len(set(used)):
        raise _RefusedError("a parameter is used by several layers")
    if len(used) != len(index):
        raise _RefusedError("the model has parameters its forward does not use")
    return Program.of(tuple(sized), tuple(model.parameters()))


def _check_hooks_and_tensors(model: nn.Module) -> None:
    if any(_global_hooks()):
        raise _RefusedError("global module hooks are registered")
    for name, module in model.named_modules():
        if _has_hooks(module):
            raise _RefusedError(f"module {name or 'the model'!r} has hooks")
    for name, buffer in model.named_buffers():
        raise _RefusedError(f"it has a buffer ({name!r}, {tuple(buffer.shape)})")
    for name, p in model.named_parameters():
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise _RefusedError(f"parameter {name!r} is {p.dtype} on {p.device}, not float32 on the CPU")
        if not p.requires_grad:
            raise _RefusedError(f"parameter {name!r} does not require grad (frozen)")
        if getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None):
            raise _RefusedError(f"parameter {name!r} has gradient hooks")


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _global_hooks() -> tuple[Any, ...]:
    hooks = nn.modules.module
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    return (
        *(getattr(hooks, name, None) for name in names),
        getattr(hooks, "_global_backward_pre_hooks", None),
    )


def _what(node: torch.fx.Node) -> str:
    target = node.target
    if node.op == "call_function":
        module = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", str(target))
        if target in {operator.add, operator.mul, operator.sub, operator.getitem}:
            return f"operator.{name}"
        return f"{module.replace('torch._C._nn', 'F').replace('torch.nn.functional', 'F')}.{name}".lstrip(".")
    if node.op == "call_method":
        return f"Tensor.{target}"
    return f"{node.op} {target}"


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    else:
        yield value


# -- a per-model cache --------------------------------------------------------

_cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], Program | str]] = (
    weakref.WeakKeyDictionary()
)


def lowered(model: nn.Module) -> Program | str:
    """:func:`lower`, cached per model while its structure stays the same.

    The key — each module's identity, mode, hooks, buffers and the attributes
    lowering reads (a Dropout's ``p``, a LeakyReLU's slope), and each
    parameter's identity, shape, dtype and device — takes ~2 us per module to
    build, where a trace costs 1-4 ms: cheap enough to check on every batch.
    """
    key = _fingerprint(model)
    hit = _cache.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    result = lower(model)
    _cache[model] = (key, result)
    return result


# The attributes lowering reads, per layer type (a module's identity covers its type).
_ATTRIBUTES: Final[dict[type, tuple[str, ...]]] = {
    nn.Linear: ("in_features", "out_features"),
    nn.LeakyReLU: ("negative_slope", "inplace"),
    nn.GELU: ("approximate",),
    nn.SiLU: ("inplace",),
    nn.ELU: ("alpha", "inplace"),
    nn.Dropout: ("p",),
    nn.LayerNorm: ("normalized_shape", "eps"),
}


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    parts: list[Any] = [tuple(map(bool, _global_hooks()))]
    for module in model.modules():
        names = _ATTRIBUTES.get(type(module), ())
        attributes = tuple(module.__dict__.get(name) for name in names)
        parts.append(
            (id(module), type(module), module.training, _has_hooks(module), bool(module._buffers), attributes)
        )
    for p in model.parameters():
        parts.append((id(p), p.shape, p.dtype, p.device, p.requires_grad))
    return tuple(parts)
