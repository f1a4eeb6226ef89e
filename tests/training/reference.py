"""The reference the compiled paths are held to: the naive autograd loop, and the streams it learns."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def stream(task: str, n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` standardized-looking rows of ``d`` features and labels for ``task`` (3 classes)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)  # as the standardizer hands them over
    z = x @ rng.normal(size=d)
    if task == "regression":
        return x, (z + 0.1 * rng.normal(size=n)).astype(np.float32)
    if task == "binary":
        return x, (z > 0).astype(np.float32)
    return x, np.digitize(z, np.quantile(z, [1 / 3, 2 / 3])).astype(np.float32)


def per_record_loss(loss: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each record's loss, as ``OnlineLearner._per_record_loss`` computes it."""
    if loss == "ce":
        return F.cross_entropy(out, y.long(), reduction="none")
    scores = out.reshape(-1)
    if loss == "mse":
        return F.mse_loss(scores, y, reduction="none")
    if loss == "l1":
        return F.l1_loss(scores, y, reduction="none")
    return F.binary_cross_entropy_with_logits(scores, y, reduction="none")


def autograd_loop(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss: str, x: np.ndarray, y: np.ndarray, *, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """The naive loop, as ``OnlineLearner._learn`` runs it: per-record losses and predictions."""
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    losses, predictions = [], []
    for start in range(0, len(x), batch):
        out = model(xs[start : start + batch])
        per_record = per_record_loss(loss, out, ys[start : start + batch])
        optimizer.zero_grad(set_to_none=True)
        per_record.mean().backward()
        optimizer.step()
        losses.append(per_record.detach().double().numpy())
        out = out.detach()
        if loss == "ce":
            predictions.append(out.argmax(dim=-1).double().numpy())
        elif loss == "bce":
            predictions.append((out.reshape(-1) > 0).double().numpy())
        else:
            predictions.append(out.reshape(-1).double().numpy())
    return np.concatenate(losses), np.concatenate(predictions)


def assert_same_state(
    a: nn.Module,
    opt_a: torch.optim.Optimizer,
    b: nn.Module,
    opt_b: torch.optim.Optimizer,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> float:
    """Parameters and optimizer state equal within the tolerances; the largest parameter difference."""
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        worst = max(worst, float((p - q).detach().abs().max()))
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index, entries in state_a.items():
        assert list(entries) == list(state_b[index])
        for key, value in entries.items():
            other = state_b[index][key]
            assert value.dtype == other.dtype and value.shape == other.shape, key
            torch.testing.assert_close(value, other, rtol=rtol, atol=atol)
    return worst
