"""The graph path (a compiled functional step for any module) against the autograd loop it replaces."""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from streamtrainer.training import graph_step
from streamtrainer.training.graph_step import GraphPath, GraphUnsupportedError, TracedStep, graph_supported
from tests.training import reference

D = 6
TOL = 1e-5
LR = {"sgd": 0.01, "adam": 0.005, "adagrad": 0.05}


class Gated(nn.Module):
    def __init__(self, n_out: int = 1) -> None:
        super().__init__()
        self.a, self.g, self.o = nn.Linear(D, 8), nn.Linear(D, 8), nn.Linear(8, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.a(x)) * torch.sigmoid(self.g(x))) + x[:, :1]


class Residual(nn.Module):
    def __init__(self, n_out: int = 1) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(D, 8), nn.Linear(8, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x + self.l2(F.gelu(self.l1(x)))))


class ConvFeatures(nn.Module):
    """A 1-D convolution over the features, a constant buffer and a constant in forward."""

    scale: torch.Tensor
    factor = 0.5

    def __init__(self, n_out: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * D, n_out)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv((x * self.scale).unsqueeze(1))).flatten(1)
        return self.head(h) * torch.tensor(self.factor)


# (module, task, loss, outputs)
CASES = {
    "gated": (Gated, "regression", "mse", 1),
    "residual": (Residual, "binary", "bce", 1),
    "conv": (ConvFeatures, "multiclass", "ce", 3),
}
# The compiled combinations: each module, each optimizer, strict and micro-batch (S, B).
COMPILED = {"gated-adam-1": ("gated", "adam", 1), "residual-adagrad-4": ("residual", "adagrad", 4)}
COMPILED["conv-sgd-8"] = ("conv", "sgd", 8)
S = 2


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=LR[name])
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=LR[name])
    return torch.optim.Adagrad(model.parameters(), lr=LR[name], lr_decay=0.01, initial_accumulator_value=0.1)


def _data(task: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return reference.stream(task, n, D, seed)


def _autograd(  # noqa: PLR0917 - the loop's inputs, as the learner has them
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: str,
    task: str,
    x: np.ndarray,
    y: np.ndarray,
    batch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The naive loop, as OnlineLearner._learn runs it: per-record losses and predictions."""
    return reference.autograd_loop(model, optimizer, loss, x, y, batch=batch)


def _pair(
    case: str, optimizer: str, seed: int = 0
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, torch.optim.Optimizer]:
    build, _, _, n_out = CASES[case]
    torch.manual_seed(seed)
    model = build(n_out)
    twin = copy.deepcopy(model)
    return model, _optimizer(optimizer, model), twin, _optimizer(optimizer, twin)


def _assert_same(
    model: nn.Module, optimizer: torch.optim.Optimizer, twin: nn.Module, twin_optimizer: torch.optim.Optimizer
) -> None:
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=TOL), (name, (p - q).abs().max().item())
        mine, theirs = optimizer.state.get(p, {}), twin_optimizer.state.get(q, {})
        assert mine.keys() == theirs.keys(), name
        for key, value in theirs.items():
            assert mine[key].dtype == value.dtype and mine[key].shape == value.shape, (name, key)
            assert torch.allclose(mine[key], value, rtol=TOL, atol=TOL), (name, key)


def _compiler_missing() -> bool:
    return not any(shutil.which(name) for name in ("g++", "c++", "clang++"))


needs_compiler = pytest.mark.skipif(_compiler_missing(), reason="no C++ compiler: AOTInductor cannot compile")


# -- the functional step, run eagerly: the same math as the compiled package ------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adagrad"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch", [1, 4])
def test_functional_step_matches_autograd(case: str, optimizer: str, batch: int) -> None:
    _, task, loss, _ = CASES[case]
    model, opt, twin, twin_opt = _pair(case, optimizer)
    x, y = _data(task, 2 * S * batch + 3)  # not a multiple of S*B: padding, and a short last group
    path = GraphPath(
        model, opt, loss=loss, task=task, n_features=D, steps_per_call=S, cache_dir=Path("unused")
    )
    losses, predictions = path.call(x, y, batch).result()  # not compiled: the same function, eagerly
    want_losses, want_predictions = _autograd(twin, twin_opt, loss, task, x, y, batch)
    np.testing.assert_allclose(losses, want_losses, rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(predictions, want_predictions) if task != "regression" else (
        np.testing.assert_allclose(predictions, want_predictions, rtol=TOL, atol=TOL)
    )
    _assert_same(model, opt, twin, twin_opt)
    assert path.state(batch) == "idle"  # call() schedules nothing


# -- the compiled package ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[Any, ...]]]:
    """The compiled combinations, compiled once for the module (all at once, in the background)."""
    if _compiler_missing():
        pytest.skip("no C++ compiler: AOTInductor cannot compile")
    cache = tmp_path_factory.mktemp("graphs")
    started = {}
    for name, (case, optimizer, batch) in COMPILED.items():
        _, task, loss, _ = CASES[case]
        model, opt, twin, twin_opt = _pair(case, optimizer)
        path = GraphPath(model, opt, loss=loss, task=task, n_features=D, steps_per_call=S, cache_dir=cache)
        assert path.ready(batch) is False  # never blocks: the compile runs in the background
        assert path.state(batch) == "compiling"
        started[name] = (path, model, opt, twin, twin_opt)
    for name, (path, *_rest) in started.items():
        batch = COMPILED[name][2]
        assert path.wait(batch, 600), path.failure(batch)
        assert path.compiles[batch] == "cold"
    return cache, started


@needs_compiler
@pytest.mark.parametrize("name", list(COMPILED))
def test_compiled_matches_autograd(compiled: Any, name: str) -> None:
    case, _, batch = COMPILED[name]
    _, task, loss, _ = CASES[case]
    path, model, opt, twin, twin_opt = compiled[1][name]
    assert path.ready(batch) and path.state(batch) == "ready"
    x, y = _data(task, 3 * S * batch + 5, seed=1)  # three blocks and a padded fourth
    losses, predictions = path.call(x, y, batch).result()
    want_losses, want_predictions = _autograd(twin, twin_opt, loss, task, x, y, batch)
    np.testing.assert_allclose(losses, want_losses, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(predictions, want_predictions, rtol=TOL, atol=TOL)
    _assert_same(model, opt, twin, twin_opt)
    # And again, continuing from the state written back (a single record: one padded block).
    call = path.call(x[:1], y[:1], batch)
    call.run()
    losses, _ = call.result()
    want_losses, _ = _autograd(twin, twin_opt, loss, task, x[:1], y[:1], batch)
    np.testing.assert_allclose(losses, want_losses, rtol=TOL, atol=TOL)
    _assert_same(model, opt, twin, twin_opt)
    # A later autograd step continues from what the package left (torch's own state objects).
    _autograd(model, opt, loss, task, x[:batch], y[:batch], batch)
    _autograd(twin, twin_opt, loss, task, x[:batch], y[:batch], batch)
    _assert_same(model, opt, twin, twin_opt)


@needs_compiler
def test_learning_rate_is_an_input(compiled: Any) -> None:
    path, model, opt, twin, twin_opt = compiled[1]["gated-adam-1"]
    x, y = _data("regression", 4 * S, seed=2)
    for lr in (0.02, 0.001):  # the learner lowers the rate after a divergence
        opt.param_groups[0]["lr"] = twin_opt.param_groups[0]["lr"] = lr
        losses, _ = path.learn(x, y, 1)
        want, _ = _autograd(twin, twin_opt, "mse", "regression", x, y, 1)
        np.testing.assert_allclose(losses, want, rtol=TOL, atol=TOL)
        _assert_same(model, opt, twin, twin_opt)


@needs_compiler
def test_restart_loads_the_cached_package(compiled: Any, caplog: pytest.LogCaptureFixture) -> None:
    cache = compiled[0]
    assert not [p.name for p in cache.iterdir() if ".tmp" in p.name]  # renamed into place, nothing torn
    model, opt, twin, twin_opt = _pair("gated", "adam", seed=3)  # other values: the same graph
    with caplog.at_level(logging.INFO, logger=graph_step.__name__):
        path = GraphPath(
            model, opt, loss="mse", task="regression", n_features=D, steps_per_call=S, cache_dir=cache
        )
        assert path.wait(1, 60), path.failure(1)
    assert path.compiles == {1: "warm"}
    assert any("loading the cached package" in r.getMessage() for r in caplog.records)
    assert not any("compiling" in r.getMessage() for r in caplog.records)
    x, y = _data("regression", 2 * S + 1, seed=4)
    losses, _ = path.learn(x, y, 1)
    want, _ = _autograd(twin, twin_opt, "mse", "regression", x, y, 1)
    np.testing.assert_allclose(losses, want, rtol=TOL, atol=TOL)
    _assert_same(model, opt, twin, twin_opt)


# -- keys and refusals --------------------------------------------------------------------------------


def _key(model: nn.Module, optimizer: str = "adam", batch: int = 1, steps: int = S) -> str:
    step = graph_step._Step(model, _optimizer(optimizer, model), loss="mse", task="regression")
    return TracedStep(step, n_features=D, n_steps=steps, batch_size=batch).key


def test_key_covers_code_constants_shapes_and_hyper_parameters() -> None:
    torch.manual_seed(0)
    base = _key(ConvFeatures())
    assert base == _key(ConvFeatures())  # parameter values are inputs, not part of the key
    assert base != _key(ConvFeatures(), optimizer="adagrad")
    assert base != _key(ConvFeatures(), batch=2)
    assert base != _key(ConvFeatures(), steps=4)
    other = ConvFeatures()
    other.factor = 0.25
    assert base != _key(other)  # the same code with another constant
    model = ConvFeatures()
    adam = torch.optim.Adam(model.parameters(), betas=(0.8, 0.999))
    step = graph_step._Step(model, adam, loss="mse", task="regression")
    assert TracedStep(step, n_features=D, n_steps=S, batch_size=1).key != base


class _Hooked(Gated):
    def __init__(self) -> None:
        super().__init__()
        self.a.register_forward_hook(lambda *_: None)


REFUSED: dict[
    str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.optim.Optimizer], str, str, str]
] = {
    "dropout": (
        lambda: nn.Sequential(nn.Linear(D, 4), nn.Dropout(0.1), nn.Linear(4, 1)),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        "mse",
        "regression",
        "dropout",
    ),
    "batchnorm": (
        lambda: nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        "mse",
        "regression",
        "batch norm",
    ),
    "hooks": (_Hooked, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "mse", "regression", "hooks"),
    "momentum": (
        Gated,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        "mse",
        "regression",
        "momentum",
    ),
    "amsgrad": (
        Gated,
        lambda m: torch.optim.Adam(m.parameters(), amsgrad=True),
        "mse",
        "regression",
        "AMSGrad",
    ),
    "weight-decay": (
        Gated,
        lambda m: torch.optim.Adagrad(m.parameters(), weight_decay=0.1),
        "mse",
        "regression",
        "weight decay",
    ),
    "rmsprop": (Gated, lambda m: torch.optim.RMSprop(m.parameters()), "mse", "regression", "RMSprop"),
    "groups": (
        Gated,
        lambda m: torch.optim.SGD(
            [{"params": list(m.parameters())[:1]}, {"params": list(m.parameters())[1:]}],
            lr=0.1,
        ),
        "mse",
        "regression",
        "several parameter groups",
    ),
    "subset": (
        Gated,
        lambda m: torch.optim.SGD(list(m.parameters())[2:], lr=0.1),
        "mse",
        "regression",
        "exactly the model's parameters",
    ),
    "float64": (
        lambda: Gated().double(),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        "mse",
        "regression",
        "float32",
    ),
    "loss-task": (
        Gated,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        "bce",
        "regression",
        "does not fit",
    ),
    "outputs": (
        lambda: Gated(2),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        "mse",
        "regression",
        "one output",
    ),
    "ce-outputs": (Gated, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "ce", "multiclass", "classes"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_combinations_are_refused_with_a_reason(name: str) -> None:
    build, make_optimizer, loss, task, words = REFUSED[name]
    model = build()
    optimizer = make_optimizer(model)
    reason = graph_supported(model, optimizer, loss=loss, task=task, n_features=D)
    assert reason is not None and words in reason, reason
    with pytest.raises(GraphUnsupportedError, match=words):
        GraphPath(model, optimizer, loss=loss, task=task, n_features=D, cache_dir=Path("unused"))


def test_the_supported_combinations_pass() -> None:
    for case, (build, task, loss, n_out) in CASES.items():
        for optimizer in LR:
            model = build(n_out)
            assert (
                graph_supported(model, _optimizer(optimizer, model), loss=loss, task=task, n_features=D)
                is None
            ), case
    model = nn.Sequential(nn.Linear(D, 4), nn.Dropout(0.0), nn.BatchNorm1d(4).eval(), nn.Linear(4, 1))
    assert (
        graph_supported(model, torch.optim.SGD(model.parameters(), lr=0.1), loss="mse", task="regression")
        is None
    )


class _RandomForward(Gated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(super().forward(x), 0.5, training=True)


class _CountingForward(Gated):
    seen: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return super().forward(x)


@pytest.mark.parametrize(
    ("build", "words"), [(_RandomForward, "random"), (_CountingForward, "mutates a buffer")]
)
def test_what_only_the_trace_shows_fails_the_compile_with_a_reason(
    build: Callable[[], nn.Module], words: str, tmp_path: Path
) -> None:
    model = build()
    path = GraphPath(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loss="mse",
        task="regression",
        n_features=D,
        cache_dir=tmp_path,
    )
    assert path.ready(1) is False
    assert path.state(1) == "failed"
    assert words in (path.failure(1) or "")
    assert not list(tmp_path.iterdir())  # no compile started
    if isinstance(model, _CountingForward):
        assert float(model.seen) == 0.0  # the trace ran on copies


def test_wrong_shapes_are_refused_before_anything_moves_and_empty_calls_change_nothing() -> None:
    model, opt, twin, twin_opt = _pair("gated", "adam")
    path = GraphPath(model, opt, loss="mse", task="regression", n_features=D, cache_dir=Path("unused"))
    x, y = _data("regression", 5)
    with pytest.raises(GraphUnsupportedError, match="expected features"):
        path.call(x[:, :4], y, 1)
    with pytest.raises(GraphUnsupportedError, match="expected features"):
        path.call(x, y[:4], 1)
    losses, predictions = path.call(x[:0], y[:0], 1).result()
    assert losses.shape == predictions.shape == (0,)
    assert not opt.state  # no step: no state, as torch
    _assert_same(model, opt, twin, twin_opt)
    assert path.state(1) == "idle"


def test_unknown_feature_count_fails_the_compile_with_a_reason(tmp_path: Path) -> None:
    model = Gated()
    path = GraphPath(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loss="mse", task="regression", cache_dir=tmp_path
    )
    assert path.ready(1) is False
    assert path.state(1) == "failed"
    assert "number of features" in (path.failure(1) or "")


def test_a_changed_optimizer_is_refused_at_call() -> None:
    model, opt, _, _ = _pair("gated", "adam")
    path = GraphPath(model, opt, loss="mse", task="regression", n_features=D, cache_dir=Path("unused"))
    x, y = _data("regression", 3)
    opt.param_groups[0]["betas"] = (0.8, 0.999)  # baked into the package
    with pytest.raises(GraphUnsupportedError, match="hyper-parameters changed"):
        path.call(x, y, 1)
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(GraphUnsupportedError, match="AMSGrad"):
        path.call(x, y, 1)
    assert not opt.state
