"""User modules of known layers, lowered and trained by the compiled program loop, against autograd."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from streamtrainer.training import kernels, lowering, program_loops
from streamtrainer.training.kernels import FusedUnsupportedError, fused_learn, fused_supported
from streamtrainer.training.learner import make_optimizer
from tests.training import reference

D = 6
H = 12  # >= program_loops.BLAS_MIN_WIDTH: micro-batches take the hidden layers through BLAS
OPTIMIZERS = ["sgd", "adam", "adagrad"]
LR = {"sgd": 0.01, "adam": 0.005, "adagrad": 0.05}
# (task, loss, n_outputs)
TASKS = [("regression", "mse", 1), ("regression", "l1", 1), ("binary", "bce", 1), ("multiclass", "ce", 3)]
# Parity tolerance: torch.testing/np.testing with rtol=1e-5 AND atol=1e-5 (|a - b| <= 1e-5 + 1e-5 |b|).
TOL = {"rtol": 1e-5, "atol": 1e-5}


class Traced(nn.Module):
    """A custom forward that torch.fx traces to a chain: functional activations and a tensor method."""

    def __init__(self, k: int) -> None:
        super().__init__()
        # Declared out of forward order: the program maps parameters by identity, not position.
        self.head = nn.Linear(H, k)
        self.body = nn.Linear(D, H)
        self.norm = nn.LayerNorm(H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.body(x), 0.2)
        x = self.norm(x).tanh()
        x = F.gelu(x, approximate="tanh")
        return self.head(torch.sigmoid(F.silu(x)))


class Wrapped(nn.Module):
    """The built-in MLP's shape written as a user's module."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(D, H), nn.ReLU()), nn.Dropout(0.0), nn.Linear(H, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mlp(*middle: nn.Module) -> Callable[[int], nn.Module]:
    return lambda k: nn.Sequential(nn.Linear(D, H), *copy.deepcopy(middle), nn.Linear(H, k))


KINDS: dict[str, Callable[[int], nn.Module]] = {
    "relu-depth3": lambda k: nn.Sequential(
        nn.Linear(D, H), nn.ReLU(), nn.Linear(H, 10), nn.ReLU(), nn.Linear(10, k)
    ),
    "leaky_relu": _mlp(nn.LeakyReLU(0.1)),
    "tanh": _mlp(nn.Tanh()),
    "sigmoid": _mlp(nn.Sigmoid()),
    "gelu": _mlp(nn.GELU()),
    "gelu_tanh": _mlp(nn.GELU(approximate="tanh")),
    "silu": _mlp(nn.SiLU()),
    "elu": _mlp(nn.ELU(alpha=0.7)),
    "layernorm": _mlp(nn.LayerNorm(H), nn.Tanh()),
    "layernorm_plain": _mlp(nn.LayerNorm(H, elementwise_affine=False), nn.ReLU()),
    "layernorm_no_bias": _mlp(nn.LayerNorm(H, bias=False), nn.GELU()),
    "layernorm_input": lambda k: nn.Sequential(nn.LayerNorm(D), nn.Linear(D, H), nn.ReLU(), nn.Linear(H, k)),
    "no_bias": lambda k: nn.Sequential(nn.Linear(D, H, bias=False), nn.ReLU(), nn.Linear(H, k, bias=False)),
    "depth1_no_bias": lambda k: nn.Linear(D, k, bias=False),
    "depth2_linear": lambda k: nn.Sequential(nn.Linear(D, H), nn.Linear(H, k)),
    "depth4": lambda k: nn.Sequential(
        nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, 9), nn.GELU(), nn.Linear(9, k)
    ),
    "activation_first": lambda k: nn.Sequential(nn.Tanh(), nn.Linear(D, H), nn.SiLU(), nn.Linear(H, k)),
    "nested": lambda k: nn.Sequential(
        nn.Sequential(nn.Linear(D, H), nn.Sequential(nn.ReLU(), nn.Identity())),
        nn.Sequential(nn.Linear(H, H), nn.Sigmoid()),
        nn.Linear(H, k),
    ),
    "dropout0": _mlp(nn.Dropout(0.0), nn.ELU(), nn.Dropout(p=0)),
    "traced": Traced,
}


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    # Every program variant, through the compiler child processes (as a worker compiles them).
    kernels.warm_up(tuple(("program", optimizer) for optimizer in OPTIMIZERS))


def _data(task: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return reference.stream(task, n, D, seed)


_autograd = reference.autograd_loop


def _pair(
    build: Callable[[int], nn.Module], k: int, optimizer: str
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(3)
    model = build(k)
    with torch.no_grad():  # LayerNorm starts at weight 1, bias 0: move it, so its gradients matter
        for name, p in model.named_parameters():
            if "norm" in name or p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape))
    twin = copy.deepcopy(model)
    return (
        model,
        make_optimizer(optimizer, model.parameters(), LR[optimizer]),
        twin,
        make_optimizer(optimizer, twin.parameters(), LR[optimizer]),
    )


_assert_same_state = reference.assert_same_state


def _parity_cases() -> list[Any]:
    """Every layer kind x optimizer x strict/micro-batch, each with one of the losses in turn (so every
    kind meets every loss across its six cases); the full loss matrix for three kinds whose backward
    passes differ most. 168 cases (~40 s on 2 cores), where the whole product was 480 (~110 s)."""
    full = {"tanh", "layernorm", "gelu"}
    cases = []
    for i, kind in enumerate(KINDS):
        for j, optimizer in enumerate(OPTIMIZERS):
            for b, batch in enumerate((1, 8)):
                tasks = TASKS if kind in full else [TASKS[(i + 2 * j + b) % len(TASKS)]]
                cases += [
                    pytest.param(kind, optimizer, task, batch, id=f"{kind}-{optimizer}-{task[1]}-{batch}")
                    for task in tasks
                ]
    return cases


@pytest.mark.parametrize(("kind", "optimizer", "task", "batch"), _parity_cases())
def test_program_equals_autograd(kind: str, optimizer: str, task: tuple[str, str, int], batch: int) -> None:
    name, loss, k = task
    n = 200 if batch == 1 else 205  # 205: a partial last micro-batch
    x, y = _data(name, n)
    model, opt, twin, twin_opt = _pair(KINDS[kind], k, optimizer)
    plan = kernels._plan(twin, twin_opt, loss, name)
    assert isinstance(plan, kernels._Plan) and plan.kind == "program", plan

    expected_losses, expected_predictions = _autograd(model, opt, loss, x, y, batch=batch)
    losses, predictions = fused_learn(twin, twin_opt, x, y, loss=loss, task=name, batch_size=batch)

    _assert_same_state(model, opt, twin, twin_opt)
    np.testing.assert_allclose(losses, expected_losses, **TOL)
    np.testing.assert_allclose(predictions, expected_predictions, **TOL)
    assert not np.allclose(losses[:20], losses[-20:])  # it did learn something


def test_micro_batches_take_the_grouped_program_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # The parity tests cover the BLAS pass only if fused_learn takes it: with a wide Linear layer
    # and groups of BLAS_MIN_ROWS or more.
    used: list[Any] = []
    real = kernels._train_loop

    def spy(variant: Any) -> Any:
        used.append(variant)
        return real(variant)

    monkeypatch.setattr(kernels, "_train_loop", spy)
    x, y = _data("regression", 40)
    model, opt, _, _ = _pair(KINDS["tanh"], 1, "adam")
    for batch in (1, program_loops.BLAS_MIN_ROWS - 1, program_loops.BLAS_MIN_ROWS, 32):
        fused_learn(model, opt, x, y, loss="mse", task="regression", batch_size=batch)
    assert used == [("program", 1, False)] * 2 + [("program", 1, True)] * 2
    assert kernels.PROGRAM_BLAS_MIN_WIDTH == program_loops.BLAS_MIN_WIDTH


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_program_state_continues_in_autograd_and_through_a_checkpoint(optimizer: str) -> None:
    """Program loop for 100 records, a state_dict round trip, autograd for 50 == autograd for 150."""
    x, y = _data("regression", 150, seed=1)
    model, opt, twin, twin_opt = _pair(KINDS["layernorm"], 1, optimizer)
    _autograd(model, opt, "mse", x, y, batch=1)
    fused_learn(twin, twin_opt, x[:100], y[:100], loss="mse", task="regression")
    restored = KINDS["layernorm"](1)
    restored.load_state_dict(twin.state_dict())
    restored_opt = make_optimizer(optimizer, restored.parameters(), LR[optimizer])
    restored_opt.load_state_dict(twin_opt.state_dict())
    _autograd(restored, restored_opt, "mse", x[100:], y[100:], batch=1)
    _assert_same_state(model, opt, restored, restored_opt)
    if optimizer != "sgd":
        assert all(float(s["step"]) == 150.0 for s in restored_opt.state.values())


def test_autograd_then_program_with_parameters_updated_in_place() -> None:
    x, y = _data("binary", 60, seed=2)
    model, opt, twin, twin_opt = _pair(KINDS["depth4"], 1, "adam")
    _autograd(model, opt, "bce", x, y, batch=4)
    _autograd(twin, twin_opt, "bce", x[:20], y[:20], batch=4)
    pointers = [p.data_ptr() for p in twin.parameters()]
    fused_learn(twin, twin_opt, x[20:], y[20:], loss="bce", task="binary", batch_size=4)
    assert [p.data_ptr() for p in twin.parameters()] == pointers
    _assert_same_state(model, opt, twin, twin_opt)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_calls_with_fewer_rows_than_a_group(optimizer: str) -> None:
    """The scratch is sized for the rows of the call: 5 rows with groups of 32, 3 with groups of 8."""
    x, y = _data("multiclass", 40, seed=4)
    model, opt, twin, twin_opt = _pair(KINDS["traced"], 3, optimizer)  # LayerNorm: per-row scratch too
    calls = ((0, 5, 32), (5, 8, 8), (8, 8, 8), (8, 40, 4))
    expected = [_autograd(model, opt, "ce", x[a:b], y[a:b], batch=g) for a, b, g in calls if b > a]
    got = [
        fused_learn(twin, twin_opt, x[a:b], y[a:b], loss="ce", task="multiclass", batch_size=g)
        for a, b, g in calls
        if b > a
    ]
    assert fused_learn(twin, twin_opt, x[:0], y[:0], loss="ce", task="multiclass", batch_size=8)[0].shape == (
        0,
    )
    _assert_same_state(model, opt, twin, twin_opt)
    for (losses, _), (expected_losses, _) in zip(got, expected, strict=True):
        np.testing.assert_allclose(losses, expected_losses, **TOL)


def test_the_mlp_as_a_user_module_takes_the_hand_written_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels.warm_up((("mlp", "sgd"),))
    used: list[Any] = []
    real = kernels._train_loop
    monkeypatch.setattr(kernels, "_train_loop", lambda variant: used.append(variant) or real(variant))
    x, y = _data("regression", 50)
    model, opt, twin, twin_opt = _pair(Wrapped, 1, "sgd")
    plan = kernels._plan(twin, twin_opt, "mse", "regression")
    assert isinstance(plan, kernels._Plan) and plan.kind == "mlp" and plan.program is None
    # Forward order, as the hand-written loop takes them: w1, b1, w2, b2.
    assert [tuple(p.shape) for p in plan.params] == [(H, D), (H,), (1, H), (1,)]
    _autograd(model, opt, "mse", x, y, batch=1)
    fused_learn(twin, twin_opt, x, y, loss="mse", task="regression")
    assert used == [(0, True, False)]
    _assert_same_state(model, opt, twin, twin_opt)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x + torch.relu(self.a(x)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.a(x)
        return -self.a(x)


def _hooked() -> nn.Module:
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 1))
    model[1].register_forward_hook(lambda module, args, out: out * 2)
    return model


def _grad_hooked() -> nn.Module:
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 1))
    model[0].weight.register_hook(lambda grad: grad * 2)
    return model


def _buffered() -> nn.Module:
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 1))
    model.register_buffer("scale", torch.ones(1))
    return model


def _shared() -> nn.Module:
    layer = nn.Linear(D, D)
    return nn.Sequential(layer, nn.Tanh(), layer, nn.Linear(D, 1))


def _frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 1))
    model[0].bias.requires_grad_(False)
    return model


def _unused() -> nn.Module:
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 1))
    model.extra = nn.Parameter(torch.zeros(2))
    return model


@pytest.mark.parametrize(
    ("make_model", "reason"),
    [
        (Residual, "not a chain of known layers (operator.add at node 'add')"),
        (lambda: _mlp(nn.Dropout(0.5))(1), "Dropout(p=0.5) is random"),
        (_hooked, "module '1' has hooks"),
        (_grad_hooked, "parameter '0.weight' has gradient hooks"),
        (_buffered, "buffer ('scale'"),
        (lambda: _mlp(nn.BatchNorm1d(H))(1), "buffer"),
        (_shared, "parameter is used by several layers"),
        (_frozen, "'0.bias' does not require grad"),
        (_unused, "parameters its forward does not use"),
        (lambda: _mlp(nn.Tanh())(1).double(), "float64"),
        (lambda: _mlp(nn.Softplus())(1), "Softplus at node"),
        (lambda: _mlp(nn.SiLU(inplace=True))(1), "in-place SiLU"),
        (lambda: nn.Sequential(nn.Embedding(10, D), nn.Linear(D, 1)), "Embedding at node"),
        (Branchy, "cannot be traced by torch.fx"),
        (lambda: nn.Sequential(nn.Tanh(), nn.LayerNorm(D)), "no Linear layer"),
        (
            lambda: nn.Sequential(nn.Linear(D, H), nn.LayerNorm(H + 1), nn.Linear(H + 1, 1)),
            "expects 13 inputs",
        ),
    ],
)
def test_modules_the_program_loop_cannot_take_are_refused_with_a_reason(
    make_model: Callable[[], nn.Module], reason: str
) -> None:
    model = make_model()
    opt = make_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], 0.1)
    assert not fused_supported(model, opt, loss="mse", task="regression")
    assert not kernels.kernels_ready(model, opt, loss="mse", task="regression")
    why = kernels.unsupported_reason(model, opt, loss="mse", task="regression")
    assert why is not None and reason in why, why
    assert isinstance(lowering.lower(model), str)
    with pytest.raises(FusedUnsupportedError, match="no compiled loop for"):
        fused_learn(model, opt, *_data("regression", 4), loss="mse", task="regression")


def test_a_changed_module_is_lowered_again() -> None:
    model = _mlp(nn.Dropout(0.0), nn.Tanh())(1)
    opt = make_optimizer("sgd", model.parameters(), 0.1)
    assert fused_supported(model, opt, loss="mse", task="regression")
    model[1].p = 0.3  # the cached lowering must not hide it
    assert "Dropout(p=0.3) is random" in (
        kernels.unsupported_reason(model, opt, loss="mse", task="regression") or ""
    )
    model[1].p = 0.0
    model[2].register_forward_hook(lambda module, args, out: out)
    assert "has hooks" in (kernels.unsupported_reason(model, opt, loss="mse", task="regression") or "")


def test_lowering_records_ops_and_parameters_in_model_order() -> None:
    model = Traced(3)
    program = lowering.lower(model)
    assert isinstance(program, lowering.Program)
    assert program.describe() == (
        "Linear(6->12) > LeakyReLU > LayerNorm > Tanh > GELU(tanh) > SiLU > Sigmoid > Linear(12->3)"
    )
    assert [id(p) for p in program.params] == [id(p) for p in model.parameters()]
    assert program.n_features == D and program.n_outputs == 3
    assert program.ops[1].constant == pytest.approx(0.2)
    head = program.ops[-1]
    assert program.params[head.weight] is model.head.weight and program.params[head.bias] is model.head.bias
