"""Which optimizer configurations the compiled paths reproduce: one check for all of them.

The numba loops (:mod:`~streamtrainer.training.kernels`) and the step graph
(:mod:`~streamtrainer.training.graph_step`) both mirror torch.optim's
single-tensor CPU update of plain SGD, Adam and Adagrad, on one parameter group
holding exactly the model's parameters; anything else (hooks, momentum, weight
decay, AMSGrad, maximize, fused or capturable implementations, state of another
shape or device) trains through autograd, with the reason this module gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import torch
from torch.optim import optimizer as torch_optimizer

KINDS: Final[dict[type[torch.optim.Optimizer], str]] = {
    torch.optim.SGD: "sgd",
    torch.optim.Adam: "adam",
    torch.optim.Adagrad: "adagrad",
}
# The per-parameter state tensors of each kind besides its step count (plain SGD has none).
STATE_NAMES: Final[dict[str, tuple[str, ...]]] = {
    "sgd": (),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adagrad": ("sum",),
}


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str | None:
    """``sgd``, ``adam`` or ``adagrad`` for exactly those torch classes (not subclasses), else None."""
    return KINDS.get(type(optimizer))


def optimizer_problem(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], *, contiguous_state: bool = False
) -> str | None:
    """Why a compiled path cannot reproduce ``optimizer``'s steps on ``params`` (None: it can).

    ``contiguous_state``: the path also needs each state tensor contiguous (the numba
    loops update them through flat views).
    """
    kind = optimizer_kind(optimizer)
    if kind is None:
        return f"the optimizer {type(optimizer).__name__} has no compiled path"
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return "the optimizer has step hooks"
    if getattr(torch_optimizer, "_global_optimizer_pre_hooks", None) or getattr(
        torch_optimizer, "_global_optimizer_post_hooks", None
    ):
        return "global optimizer hooks are registered"
    if len(optimizer.param_groups) != 1:
        return "the optimizer has several parameter groups"
    group = optimizer.param_groups[0]
    members = group["params"]
    if len(members) != len(params) or {id(p) for p in members} != {id(p) for p in params}:
        return "the optimizer does not hold exactly the model's parameters"
    if isinstance(group["lr"], torch.Tensor):
        return "a tensor learning rate has no compiled path"
    if (
        group.get("weight_decay", 0) != 0
        or group.get("maximize", False)
        or group.get("differentiable", False)
    ):
        return "weight decay, maximize and differentiable have no compiled path"
    if group.get("fused", False) or group.get("capturable", False):
        return "fused or capturable torch optimizers have no compiled path"
    if kind == "sgd" and (group.get("momentum", 0) != 0 or group.get("nesterov", False)):
        return "SGD with momentum has no compiled path"
    if kind == "adam" and (group.get("amsgrad", False) or group.get("decoupled_weight_decay", False)):
        return "AMSGrad and decoupled weight decay have no compiled path"
    for p in params:
        state = optimizer.state.get(p)
        if state:
            reason = state_problem(state, p, kind, contiguous=contiguous_state)
            if reason is not None:
                return reason
    return None


def state_problem(
    state: dict[str, Any], p: torch.Tensor, kind: str, *, contiguous: bool = False
) -> str | None:
    """Why ``p``'s optimizer state is not what the compiled paths update (None: it is)."""
    if kind == "sgd":
        return "SGD has unexpected per-parameter state" if state.get("momentum_buffer") is not None else None
    step = state.get("step")
    if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.device.type != "cpu":
        return "the optimizer's step count is not a CPU tensor"
    for name in STATE_NAMES[kind]:
        value = state.get(name)
        if (
            not isinstance(value, torch.Tensor)
            or value.shape != p.shape
            or value.dtype != torch.float32
            or value.device.type != "cpu"
            or (contiguous and not value.is_contiguous())
        ):
            return f"optimizer state {name!r} is not a float32 CPU tensor like its parameter"
    return None
