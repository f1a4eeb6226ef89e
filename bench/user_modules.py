"""Users' own modules, named by the custom-models bench as ``bench.user_modules:<factory>``.

Each is a factory ``(n_features=, n_outputs=) -> nn.Module``, as ``--model`` takes.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN = 64


class UserMLP(nn.Module):
    """The built-in ``mlp`` (Linear -> ReLU -> Linear), written the way a user would: path 1."""

    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_features, HIDDEN), nn.ReLU())
        self.head = nn.Linear(HIDDEN, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def mlp(*, n_features: int, n_outputs: int) -> nn.Module:
    """The built-in mlp's shape as a user module (fx-traced to the hand-written loop)."""
    return UserMLP(n_features, n_outputs)


def sequential_mlp(*, n_features: int, n_outputs: int) -> nn.Module:
    """The issue's factory: ``nn.Sequential(Linear, ReLU, Linear)``."""
    return nn.Sequential(nn.Linear(n_features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_outputs))


def tanh_layernorm(*, n_features: int, n_outputs: int) -> nn.Module:
    """Known layers, but not the built-in shape: the layer-program loop (path 1)."""
    return nn.Sequential(
        nn.Linear(n_features, HIDDEN), nn.Tanh(), nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, n_outputs)
    )


class Gated(nn.Module):
    """A gated residual block: no chain of known layers, so the compiled step graph (path 2)."""

    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.value = nn.Linear(n_features, HIDDEN)
        self.gate = nn.Linear(n_features, HIDDEN)
        self.out = nn.Linear(HIDDEN, n_outputs)
        self.skip = nn.Linear(n_features, n_outputs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x))) + self.skip(x)


def gated(*, n_features: int, n_outputs: int) -> nn.Module:
    """An MLP-sized module the layer programs cannot take."""
    return Gated(n_features, n_outputs)
