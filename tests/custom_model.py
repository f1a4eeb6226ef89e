"""A user-style model factory, loaded by the tests as ``tests.custom_model:make_model``."""

from __future__ import annotations

from torch import nn


def make_model(*, n_features: int, n_outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_features, 8), nn.Tanh(), nn.Linear(8, n_outputs))
