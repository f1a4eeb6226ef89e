"""A learner picks its path once, and says which and why in one log line."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from streamtrainer.training import paths
from streamtrainer.training.learner import LearnerConfig, OnlineLearner, make_optimizer


class NestedMLP(nn.Module):
    """The built-in mlp's shape, written as a user would."""

    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_features, 16), nn.ReLU())
        self.head = nn.Linear(16, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Residual(nn.Module):
    """Not a chain: x + f(x)."""

    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.inner = nn.Linear(n_features, n_features)
        self.out = nn.Linear(n_features, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + torch.tanh(self.inner(x)))


def _choice(module: nn.Module, optimizer: str = "adam", **kwargs: object) -> paths.PathChoice:
    opt = make_optimizer(optimizer, module.parameters(), 0.01)
    return paths.choose(module, opt, loss="mse", task="regression", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("module", "path", "detail"),
    [
        (nn.Linear(4, 1), "kernel", "Linear(4->1)"),
        (nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)), "kernel", "Linear(4->16) > ReLU"),
        (NestedMLP(4, 1), "kernel", "Linear(4->16) > ReLU"),
        (nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 1)), "program", "Tanh"),
        (Residual(4, 1), "graph", "Residual"),
    ],
    ids=["linear", "sequential-mlp", "nested-mlp", "tanh-layernorm", "residual"],
)
def test_each_module_takes_the_fastest_path_that_reproduces_autograd(
    module: nn.Module, path: str, detail: str
) -> None:
    choice = _choice(module)
    assert choice.path == path
    assert detail in choice.detail
    assert choice.compiled is not None


def test_what_no_compiled_path_reproduces_trains_through_autograd_and_says_why() -> None:
    random = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    choice = _choice(random)
    assert choice.path == "autograd" and choice.compiled is None
    assert "Dropout" in choice.reason or "dropout" in choice.reason
    off = _choice(nn.Linear(4, 1), enabled=False)
    assert (off.path, off.reason) == ("autograd", "compiled paths turned off")
    clipped = _choice(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)), clip_grad_norm=1.0)
    assert clipped.path == "autograd" and "clipping" in clipped.reason
    assert _choice(nn.Linear(4, 1), clip_grad_norm=1.0).path == "kernel"  # bounded after the loop
    momentum = nn.Linear(4, 1)
    sgd = torch.optim.SGD(momentum.parameters(), lr=0.1, momentum=0.9)
    choice = paths.choose(momentum, sgd, loss="mse", task="regression")
    assert choice.path == "autograd" and "momentum" in choice.reason


def test_the_learner_logs_its_path_once_when_it_is_made(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streamtrainer.training.learner")
    config = LearnerConfig(model="tests.custom_model:make_model", task="regression")
    learner = OnlineLearner(config, 4)
    lines = [r.getMessage() for r in caplog.records if "training path" in r.getMessage()]
    assert lines == [f"training path for tests.custom_model:make_model: {learner.path.describe()}"]
    assert learner.path.path == "program"
    assert "compiled layer program" in lines[0] and "Tanh" in lines[0]


def test_a_learner_trains_any_module_through_the_compiled_graph_as_autograd_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Path 2 end to end in the learner: compiled in the background, then the same steps as autograd."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: AOTInductor cannot compile the step graph")
    config = LearnerConfig(
        model="tests.custom_model:make_gated_model", task="regression", optimizer="adam", lr=0.01
    )
    compiled = OnlineLearner(config, 6)
    plain = OnlineLearner(dataclasses.replace(config, fused=False), 6)
    assert compiled.path.path == "graph" and plain.path.path == "autograd"
    assert compiled.settle_path(timeout_s=600)
    calls: list[int] = []
    graph = compiled.path.compiled
    assert graph is not None
    original = graph.call
    monkeypatch.setattr(graph, "call", lambda x, y, b: calls.append(x.shape[0]) or original(x, y, b))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(203, 6)).astype(np.float32)
    y = (x @ rng.normal(size=6) + 0.1 * rng.normal(size=203)).astype(np.float32)
    for start in range(0, 203, 101):
        a = compiled.learn_many(x[start : start + 101], y[start : start + 101])
        b = plain.learn_many(x[start : start + 101], y[start : start + 101])
        np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.predictions, b.predictions, rtol=1e-5, atol=1e-5)
    assert calls == [101, 101, 1]
    for p, q in zip(compiled.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    assert compiled.updates == plain.updates == 203
