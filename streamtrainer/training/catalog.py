"""The one list of built-in models, losses, tasks and optimizers.

Every other place reads it: :mod:`streamtrainer.training.models` builds a model
from its entry, the learner takes its losses and defaults, the compiled kernels
their loss codes and model shapes, and the settings check a ``--model`` against
it (and pick a model's compaction schedule). A new built-in model is one entry
here.

Importing this module does not import torch (the settings read it before a
usage error is reported, and torch takes 1-2 s to import): a builder imports it
when it is called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from torch import nn

Task = Literal["regression", "binary", "multiclass"]
TASKS: Final[tuple[Task, ...]] = ("regression", "binary", "multiclass")
OPTIMIZERS: Final = ("sgd", "adam", "adagrad")

# A builder: (n_features, n_outputs, hidden) -> an untrained module. Called under a fixed seed.
Builder = Callable[[int, int, int], "nn.Module"]


@dataclass(frozen=True, slots=True)
class LossEntry:
    """A loss: the task it fits and its code in the compiled loops (None: autograd only)."""

    name: str
    task: Task
    kernel_code: int | None
    description: str


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A built-in model.

    ``task``: the task it implies (None: it needs ``--task``). ``compiled_kind``:
    the shape the hand-written compiled loop trains (``linear``: one
    ``nn.Linear``; ``mlp``: ``Linear -> ReLU -> Linear``), None for none.
    ``nonlinear``: it has a hidden layer (it compacts more often, see the
    settings). ``offered``: listed to users (``audit`` is a test-only model).
    """

    name: str
    task: Task | None
    builder: Builder
    compiled_kind: str | None
    nonlinear: bool
    offered: bool
    description: str


def _zero_linear(n_features: int, n_outputs: int, hidden: int) -> nn.Module:
    # From zero, as River and Vowpal Wabbit start: a random start is a random first guess, a worse
    # prior than "no opinion" (on the quality bench's linear tasks it cost accuracy over the first
    # few hundred records), and a convex loss needs no symmetry breaking.
    from torch import nn

    model = nn.Linear(n_features, n_outputs)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def _mlp(n_features: int, n_outputs: int, hidden: int) -> nn.Module:
    from torch import nn

    return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, n_outputs))


def _audit(n_features: int, n_outputs: int, hidden: int) -> nn.Module:
    # Test-mode model: float64 weights from zero, no bias. Trained with the "audit" loss (-w.x) and
    # SGD at lr=1, each record adds exactly its features to w, so w is the sum of the applied
    # records: a duplicate or a lost record shows as a difference.
    from torch import nn

    model = nn.Linear(n_features, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    return model


MODELS: Final[Mapping[str, ModelEntry]] = MappingProxyType(
    {
        entry.name: entry
        for entry in (
            ModelEntry("linear", "regression", _zero_linear, "linear", False, True, "linear regression"),
            ModelEntry("logistic", "binary", _zero_linear, "linear", False, True, "logistic regression"),
            ModelEntry("softmax", "multiclass", _zero_linear, "linear", False, True, "multinomial logistic"),
            ModelEntry("mlp", None, _mlp, "mlp", True, True, "one hidden ReLU layer (--hidden units)"),
            ModelEntry("audit", "regression", _audit, None, False, False, "test only: w = sum of records"),
        )
    }
)

LOSSES: Final[Mapping[str, LossEntry]] = MappingProxyType(
    {
        entry.name: entry
        for entry in (
            LossEntry("mse", "regression", 0, "squared error"),
            LossEntry("l1", "regression", 1, "absolute error"),
            LossEntry("bce", "binary", 2, "binary cross-entropy on the logit"),
            LossEntry("ce", "multiclass", 3, "cross-entropy on the logits"),
            LossEntry("audit", "regression", None, "test only: -score"),
        )
    }
)

DEFAULT_LOSS: Final[Mapping[Task, str]] = MappingProxyType(
    {"regression": "mse", "binary": "bce", "multiclass": "ce"}
)
FACTORY_FORM: Final = "package.module:factory"


def offered_models() -> tuple[str, ...]:
    """The built-in model names a user is offered (help texts, error messages)."""
    return tuple(name for name, entry in MODELS.items() if entry.offered)


def task_losses(task: str) -> tuple[str, ...]:
    """The losses that fit ``task``, in catalog order."""
    return tuple(name for name, entry in LOSSES.items() if entry.task == task)


def implied_task(model: str) -> Task | None:
    """The task a built-in model implies (None: a model that needs ``--task``, or a factory)."""
    entry = MODELS.get(model)
    return entry.task if entry is not None else None


def is_nonlinear(model: str) -> bool:
    """Whether ``model`` has a hidden layer: an mlp, or any factory (it may)."""
    entry = MODELS.get(model)
    return entry.nonlinear if entry is not None else True


def is_factory(model: str) -> bool:
    """Whether ``model`` names a user's factory (``package.module:factory``) rather than a built-in."""
    return model not in MODELS and ":" in model
