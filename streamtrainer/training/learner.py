"""The online learner: predict, measure the loss, then take one gradient step per record.

``learn_one`` and ``learn_many`` share one private step, ``_learn``. In strict
mode (the default) ``learn_many`` applies the records one at a time, exactly as
``learn_one`` would in a loop: the loss of each record is measured with the
model as it was before that record (test-then-train). Micro-batch mode
(``batch_size > 1``) takes one step per group of records instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the conventional name

from streamtrainer.training.exceptions import ModelSpecError, TrainingError
from streamtrainer.training.models import build_model, n_outputs_for
from streamtrainer.training.scaler import RunningStandardizer

logger = logging.getLogger(__name__)

TASK_LOSSES = {"regression": ("mse", "l1"), "binary": ("bce",), "multiclass": ("ce",)}
DEFAULT_LOSS = {"regression": "mse", "binary": "bce", "multiclass": "ce"}


@dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    model: str = "linear"
    task: str = "regression"
    loss: str = "auto"
    optimizer: str = "sgd"
    lr: float = 0.01
    hidden: int = 64
    n_classes: int | None = None
    standardize: bool = True
    seed: int = 0
    device: str = "cpu"

    @property
    def resolved_loss(self) -> str:
        return DEFAULT_LOSS[self.task] if self.loss == "auto" else self.loss


@dataclass(frozen=True, slots=True)
class StepResult:
    """Per-record pre-update losses and predictions (value, or class index)."""

    losses: npt.NDArray[np.float64]
    predictions: npt.NDArray[np.float64]


class OnlineLearner:
    def __init__(self, config: LearnerConfig, n_features: int) -> None:
        loss = config.resolved_loss
        if config.task not in TASK_LOSSES:
            raise ModelSpecError(f"unknown task {config.task!r}")
        if loss not in TASK_LOSSES[config.task]:
            raise ModelSpecError(
                f"loss {loss!r} does not fit a {config.task} task (use {', '.join(TASK_LOSSES[config.task])})"
            )
        self.config = config
        self.n_features = n_features
        self.n_outputs = n_outputs_for(config.task, config.n_classes)
        self.device = torch.device(config.device)
        self.model = build_model(
            config.model,
            n_features=n_features,
            n_outputs=self.n_outputs,
            hidden=config.hidden,
            seed=config.seed,
        ).to(self.device)
        self.optimizer = make_optimizer(config.optimizer, self.model.parameters(), config.lr)
        self.scaler = RunningStandardizer(n_features) if config.standardize else None
        self.updates = 0
        self._loss_name = loss

    # -- public API ---------------------------------------------------------

    def learn_one(self, features: npt.NDArray[np.float32], label: float) -> float:
        result = self.learn_many(features.reshape(1, -1), np.array([label], dtype=np.float32))
        return float(result.losses[0])

    def learn_many(
        self,
        features: npt.NDArray[np.float32],
        labels: npt.NDArray[np.float32],
        *,
        batch_size: int = 1,
    ) -> StepResult:
        """Learn from the rows in order, ``batch_size`` records per update (1: strict)."""
        n = features.shape[0]
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise TrainingError(f"expected features of shape (n, {self.n_features}), got {features.shape}")
        if self.scaler is not None:
            features = self.scaler.learn_transform(features)
        x_all = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
        y_all = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)).to(self.device)
        losses = np.empty(n, dtype=np.float64)
        predictions = np.empty(n, dtype=np.float64)
        self.model.train()
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            step_losses, step_predictions = self._learn(x_all[start:stop], y_all[start:stop])
            losses[start:stop] = step_losses
            predictions[start:stop] = step_predictions
        return StepResult(losses, predictions)

    @torch.no_grad()
    def predict_many(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Predictions without learning: values, or class indices."""
        if self.scaler is not None:
            features = self.scaler.transform(features)
        self.model.eval()
        outputs = self.model(
            torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
        )
        return self._predictions(outputs).cpu().numpy().astype(np.float64)

    def predict_one(self, features: npt.NDArray[np.float32]) -> float:
        return float(self.predict_many(features.reshape(1, -1))[0])

    # -- the one training step ---------------------------------------------

    def _learn(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """One gradient step on a batch; returns its pre-update per-record losses and predictions."""
        outputs = self.model(x)
        per_record = self._per_record_loss(outputs, y)
        self.optimizer.zero_grad(set_to_none=True)
        per_record.mean().backward()
        self.optimizer.step()
        self.updates += 1
        with torch.no_grad():
            predictions = self._predictions(outputs.detach())
        return per_record.detach().cpu().double().numpy(), predictions.cpu().double().numpy()

    def _per_record_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        name = self._loss_name
        if name == "ce":
            return F.cross_entropy(outputs, y.long(), reduction="none")
        scores = outputs.reshape(-1)
        if name == "mse":
            return F.mse_loss(scores, y, reduction="none")
        if name == "l1":
            return F.l1_loss(scores, y, reduction="none")
        return F.binary_cross_entropy_with_logits(scores, y, reduction="none")

    def _predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        task = self.config.task
        if task == "multiclass":
            return outputs.argmax(dim=-1)
        scores = outputs.reshape(-1)
        if task == "binary":
            return (scores > 0).to(scores.dtype)
        return scores

    def valid_labels(self, labels: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
        """Which labels the task can train on (0/1 for binary, a class index for multiclass)."""
        task = self.config.task
        if task == "binary":
            return (labels == 0) | (labels == 1)
        if task == "multiclass":
            return (labels >= 0) & (labels < self.n_outputs) & (labels == np.floor(labels))
        return np.isfinite(labels)


def make_optimizer(name: str, parameters: object, lr: float) -> torch.optim.Optimizer:
    params = list(parameters)  # type: ignore[call-overload]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    raise ModelSpecError(f"unknown optimizer {name!r} (sgd, adam, adagrad)")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
