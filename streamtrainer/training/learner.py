"""The online learner: predict, measure the loss, then take one gradient step per record.

``learn_one`` and ``learn_many`` share one private step, ``_learn``. In strict
mode (the default) ``learn_many`` applies the records one at a time, exactly as
``learn_one`` would in a loop: the loss of each record is measured with the
model as it was before that record (test-then-train). Micro-batch mode
(``batch_size > 1``) takes one step per group of records instead.

For the built-in models on the CPU, ``learn_many`` runs the whole loop in the
compiled kernels of :mod:`streamtrainer.training.kernels` once they are ready
(they compile in the background; until then, and for anything they do not
cover, it takes the autograd path). Both paths agree to float32 rounding and
share the model's parameters and the optimizer's state, so a learner may switch
between them at any batch; ``LearnerConfig.fused=False`` keeps it on autograd.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the conventional name

from streamtrainer.training import kernels
from streamtrainer.training.exceptions import ModelSpecError, TrainingError
from streamtrainer.training.models import build_model, n_outputs_for
from streamtrainer.training.scaler import RunningStandardizer

logger = logging.getLogger(__name__)

TASK_LOSSES = {"regression": ("mse", "l1", "audit"), "binary": ("bce",), "multiclass": ("ce",)}
DEFAULT_LOSS = {"regression": "mse", "binary": "bce", "multiclass": "ce"}
# Built-in models the fused kernels may train (kernels.fused_supported checks the rest);
# a user's factory stays on autograd even when its module happens to fit.
FUSED_MODELS = frozenset({"linear", "logistic", "softmax", "mlp"})


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
    # Strict and micro-batch learning through the compiled loops when they fit (False: autograd).
    fused: bool = True

    @property
    def resolved_loss(self) -> str:
        if self.model == "audit":
            return "audit"
        return DEFAULT_LOSS[self.task] if self.loss == "auto" else self.loss

    def digest_fields(self) -> dict[str, object]:
        """What a checkpoint must agree on to be loaded into this learner (the lr may change)."""
        return {
            "model": self.model,
            "task": self.task,
            "loss": self.resolved_loss,
            "optimizer": self.optimizer,
            "hidden": self.hidden,
            "n_classes": self.n_classes,
            "standardize": self.standardize,
        }


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
        self._dtype = next(self.model.parameters()).dtype

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
        if batch_size < 1:
            raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
        fused = self._fused_ready(n, labels)
        if self.scaler is not None:
            if fused:
                features = kernels.fused_standardize(self.scaler, features)
            else:
                features = self.scaler.learn_transform(features)
        return self._steps(features, labels, batch_size=batch_size, fused=fused)

    def fit_rows(
        self, features: npt.NDArray[np.float32], labels: npt.NDArray[np.float32], *, batch_size: int
    ) -> npt.NDArray[np.float64]:
        """Mini-batch steps over rows already scaled by ``standardize``, in order (batch epochs).

        The scaler is not updated: it describes the stream, and records trained
        again must not count twice. Returns each record's loss before its step.
        Built-in models on the CPU take the compiled loop, like ``learn_many``.
        """
        if batch_size < 1:
            raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
        fused = self._fused_ready(features.shape[0], labels)
        return self._steps(features, labels, batch_size=batch_size, fused=fused).losses

    def _steps(
        self,
        features: npt.NDArray[np.float32],
        labels: npt.NDArray[np.float32],
        *,
        batch_size: int,
        fused: bool,
    ) -> StepResult:
        """Steps over scaled rows, ``batch_size`` per update: the compiled loop, or autograd."""
        n = features.shape[0]
        if fused:
            try:
                losses, predictions = kernels.fused_learn(
                    self.model,
                    self.optimizer,
                    features,
                    labels,
                    loss=self._loss_name,
                    task=self.config.task,
                    batch_size=batch_size,
                )
            except kernels.FusedUnsupportedError as error:  # raised before any parameter moves
                logger.warning("the fused loop refused a batch (%s): learning it through autograd", error)
            else:
                self.updates += -(-n // batch_size)
                return StepResult(losses, predictions)
        x_all = torch.from_numpy(np.ascontiguousarray(features)).to(self.device, self._dtype)
        y_all = torch.from_numpy(np.ascontiguousarray(labels)).to(self.device, self._dtype)
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
        outputs = self.model(torch.from_numpy(np.ascontiguousarray(features)).to(self.device, self._dtype))
        return self._predictions(outputs).cpu().numpy().astype(np.float64)

    def _fused_ready(self, n: int, labels: npt.NDArray[np.float32]) -> bool:
        """Whether this batch takes the compiled loop: a built-in model on the CPU, loop compiled.

        Never blocks: the first call for a model schedules its loop's compilation.
        """
        config = self.config
        if not config.fused or config.model not in FUSED_MODELS or self.device.type != "cpu":
            return False
        if labels.shape != (n,):
            return False
        if config.task == "multiclass" and not self.valid_labels(labels).all():
            return False  # autograd raises on a class index out of range; the loop does not check
        return kernels.kernels_ready(self.model, self.optimizer, loss=self._loss_name, task=config.task)

    def predict_one(self, features: npt.NDArray[np.float32]) -> float:
        return float(self.predict_many(features.reshape(1, -1))[0])

    # -- batch epochs (compaction, replay) ---------------------------------------

    def standardize(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Features as the model sees them, scaled by the running statistics without updating them."""
        return self.scaler.transform(features) if self.scaler is not None else features

    def as_tensors(
        self, features: npt.NDArray[np.float32], labels: npt.NDArray[np.float32]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardized features and labels on the learner's device and dtype."""
        x = torch.from_numpy(np.ascontiguousarray(self.standardize(features)))
        y = torch.from_numpy(np.ascontiguousarray(labels))
        return x.to(self.device, self._dtype), y.to(self.device, self._dtype)

    @torch.no_grad()
    def batch_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-record losses on prepared tensors, without learning (for held-out evaluation)."""
        self.model.eval()
        return self._per_record_loss(self.model(x), y)

    @contextlib.contextmanager
    def on_device(self, device: str | torch.device) -> Iterator[None]:
        """Move the model and optimizer state to ``device`` for a while (batch epochs on a GPU)."""
        target, home = torch.device(device), self.device
        if target == home:
            yield
            return
        self._move(target)
        try:
            yield
        finally:
            self._move(home)

    def _move(self, device: torch.device) -> None:
        # Module.to keeps the Parameter objects, so the optimizer still holds the right ones;
        # its per-parameter state (momentum, Adam moments) is moved alongside.
        self.model.to(device)
        for entries in self.optimizer.state.values():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    entries[key] = value.to(device)
        self.device = device

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
        if name == "audit":
            return -scores
        return F.binary_cross_entropy_with_logits(scores, y, reduction="none")

    def _predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        task = self.config.task
        if task == "multiclass":
            return outputs.argmax(dim=-1)
        scores = outputs.reshape(-1)
        if task == "binary":
            return (scores > 0).to(scores.dtype)
        return scores

    # -- state, for checkpoints ---------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        """Model, optimizer and scaler state as tensors (for safetensors) plus JSON-able metadata."""
        tensors: dict[str, torch.Tensor] = {
            f"model.{name}": value.detach().clone() for name, value in self.model.state_dict().items()
        }
        optimizer_state = self.optimizer.state_dict()
        scalars: dict[str, dict[str, float]] = {}
        for index, entries in optimizer_state["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().clone()
                else:
                    scalars.setdefault(str(index), {})[key] = float(value)
        if self.scaler is not None:
            for key, value in self.scaler.state_dict().items():
                tensors[f"scaler.{key}"] = torch.from_numpy(value.copy())
        metadata: dict[str, object] = {
            "n_features": self.n_features,
            "learner": self.config.digest_fields(),
            "updates": self.updates,
            "optimizer_param_groups": optimizer_state["param_groups"],
            "optimizer_scalars": scalars,
        }
        return tensors, metadata

    def load_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> None:
        expected = self.config.digest_fields()
        if metadata.get("learner") != expected or metadata.get("n_features") != self.n_features:
            raise TrainingError(
                f"checkpoint was made for {metadata.get('learner')} with {metadata.get('n_features')} "
                f"features, not {expected} with {self.n_features}"
            )
        model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state)
        state: dict[int, dict[str, object]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.to(self.device)
        scalars = metadata.get("optimizer_scalars") or {}
        if isinstance(scalars, dict):
            for index, entries in scalars.items():
                state.setdefault(int(index), {}).update(entries)
        groups = metadata.get("optimizer_param_groups")
        if not isinstance(groups, list):
            raise TrainingError("checkpoint has no optimizer parameter groups")
        for group in groups:
            group["lr"] = self.config.lr  # a restarted worker takes the learning rate it is given now
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if self.scaler is not None:
            self.scaler.load_state_dict(
                {k.removeprefix("scaler."): v.numpy() for k, v in tensors.items() if k.startswith("scaler.")}
            )
        updates = metadata.get("updates", 0)
        self.updates = updates if isinstance(updates, int) else 0

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
