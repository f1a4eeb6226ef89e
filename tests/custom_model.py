"""A user-style model factory, loaded by the tests as ``tests.custom_model:make_model``."""

from __future__ import annotations

import time

import torch
from torch import nn


def make_model(*, n_features: int, n_outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_features, 8), nn.Tanh(), nn.Linear(8, n_outputs))


def make_dropout_model(*, n_features: int, n_outputs: int) -> nn.Module:
    """Random in training (dropout): no compiled path can reproduce it, so it trains through autograd."""
    return nn.Sequential(nn.Linear(n_features, 8), nn.Dropout(0.5), nn.Linear(8, n_outputs))


class _Gated(nn.Module):
    """A gated block with a skip connection: not a chain of layers, so the compiled step graph."""

    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.value = nn.Linear(n_features, 8)
        self.gate = nn.Linear(n_features, 8)
        self.out = nn.Linear(8, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x))) + x[:, :1]


def make_gated_model(*, n_features: int, n_outputs: int) -> nn.Module:
    return _Gated(n_features, n_outputs)


class _SlowInBatches(nn.Module):
    """A linear model whose mini-batch forward passes take a while: a compaction far longer than
    max.poll.interval.ms, without making the online (one record per step) path slow."""

    def __init__(self, n_features: int, n_outputs: int, delay_s: float) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, n_outputs)
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            time.sleep(self.delay_s)
        return self.linear(x)


def make_slow_model(*, n_features: int, n_outputs: int) -> nn.Module:
    return _SlowInBatches(n_features, n_outputs, delay_s=0.005)
