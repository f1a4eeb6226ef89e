"""The online learner: predict, measure the loss, then take one gradient step per record.

A learner trains a model named by its :class:`LearnerConfig` (built in, or a
``package.module:factory``) or a module instance of the caller's
(:meth:`OnlineLearner.from_module`, the Python API's way: docs/python-api.md).

``learn_one`` and ``learn_many`` share one private step, ``_learn``. In strict
mode (the default) ``learn_many`` applies the records one at a time, exactly as
``learn_one`` would in a loop: the loss of each record is measured with the
model as it was before that record (test-then-train). Micro-batch mode
(``batch_size > 1``) takes one step per group of records instead.

A learner picks the way its steps run once, when it is made
(:func:`streamtrainer.training.paths.choose`, logged, kept in ``path``): a
compiled loop for a model made of known layers (built in or the user's), a
compiled step graph for any other module, else autograd. Compiled paths compile
in the background (``prepare`` starts them early); until one is ready the
learner takes autograd. They agree with autograd (to float32 rounding, or within
1e-5) and share the model's parameters and the optimizer's state, so a learner
may switch between them at any batch; ``LearnerConfig.fused=False`` keeps it on
autograd.
``start_learn_many`` splits a ``learn_many`` call in three (prepare, the
compiled loop without the GIL on any thread, check and finish) for a caller
that overlaps the loop with other work (the worker's ``--overlap``).

Guards (:mod:`streamtrainer.training.guards`) protect the model from bad records:

* a record whose loss, or a step whose gradient, is not finite is not learned
  from (``StepResult.skipped_nonfinite``); a step that would leave a parameter or
  an optimizer state value non-finite is undone, so the model never holds one;
* ``clip_grad_norm`` clips each step's gradient to that norm;
* ``spike_factor`` skips a record whose loss exceeds that multiple of the EW
  mean (span ``spike_span``) of the losses learned from, once ``spike_warmup``
  were (``StepResult.skipped_spike``);
* ``divergence_factor`` (on by default) skips, as a spike too, a record whose
  prediction is that many times the label's magnitude off
  (:func:`guards.divergence_bounds`): a diverging model is stopped before its
  losses overflow;
* after ``max_consecutive_skips`` skipped records in a row the learner sets
  ``rollback_needed`` (also in each ``StepResult``) until ``load_state`` or
  ``reset_guards``: the caller should reload its last checkpoint.

A refused record is not necessarily a bad one: a model that diverged (too
large a learning rate) makes every loss explode, then overflow. ``failing_on`` judges the
records of a finished call on a reference model (the last checkpoint's, or the
initial one): those that fail there too are the records' fault, the others the
model's. For the latter a caller rolls back and lowers the step size
(``set_lr_scale``; ``state`` keeps the scale, ``load_state`` restores it).

``StepResult.skipped`` lists the records a guard refused (positions within the
call) and ``skipped_reasons`` why (``non_finite_loss`` or ``loss_spike``), so
that a caller can route them elsewhere rather than count them as learned.

A skipped record keeps its measured pre-update loss and prediction in the
result (a valid prequential measurement), except that a non-finite loss is
reported as NaN, with a NaN prediction: callers drop ``~np.isfinite(losses)``
records from their metrics. In micro-batch mode a skipped record is left out of
its group's step and the others still learn. The compiled loop has no guards:
a batch runs through it after a snapshot of the parameters and optimizer state,
and is checked afterwards (losses finite and below the spike thresholds, for a
linear model the gradient norm below the clip, everything finite); from the
first group that fails the check, the batch is restored and redone, that group
through the guarded autograd step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the conventional name

from streamtrainer.training import catalog, guards, kernels, optimizers, paths
from streamtrainer.training.exceptions import CompiledPathRefusedError, ModelSpecError, TrainingError
from streamtrainer.training.models import build_model, check_module, module_name, n_outputs_for
from streamtrainer.training.scaler import RunningStandardizer, TargetStandardizer

logger = logging.getLogger(__name__)


# One record's features: an array or a sequence of numbers in the model's feature order, or a mapping
# of feature names to numbers (its order fixed by the first mapping the learner sees).
Row: TypeAlias = npt.ArrayLike | Mapping[str, float]


@dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    """How a learner is built and learns: its model, task, loss, optimizer and guards.

    ``model`` names a built-in model (``linear``, ``logistic``, ``softmax``, ``mlp``) or a
    ``package.module:factory``; a learner made from a module instance
    (:meth:`OnlineLearner.from_module`) names its class there. A checkpoint loads only into a
    learner whose ``digest_fields`` agree.
    """

    model: str = "linear"
    task: str = "regression"
    loss: str = "auto"
    # The worker's defaults (settings.DEFAULT_OPTIMIZER/DEFAULT_LR; why: see there).
    optimizer: str = "adagrad"
    lr: float = 0.1
    hidden: int = 128
    n_classes: int | None = None
    standardize: bool = True
    # Regression: learn the label standardized online (TargetStandardizer); predictions and losses
    # are reported in the label's units all the same.
    standardize_target: bool = True
    seed: int = 0
    device: str = "cpu"
    # Strict and micro-batch learning through the compiled loops when they fit (False: autograd).
    fused: bool = True
    # Guards (none of them in digest_fields: a checkpoint loads whatever they are).
    clip_grad_norm: float | None = None  # clip each step's gradient to this L2 norm (None: off)
    spike_factor: float | None = None  # skip a record whose loss > factor x EW mean loss (None: off)
    spike_span: int = 1000  # span of that EW mean, in accepted records
    spike_warmup: int = 200  # accepted records before the spike check starts
    max_consecutive_skips: int | None = 100  # skipped records in a row that call for a rollback
    divergence_factor: float | None = 1000.0  # skip a record predicted this x |label| (min 1) off (None: off)

    @property
    def resolved_loss(self) -> str:
        """The loss trained on: ``loss``, or the task's default (mse, bce, ce) for ``auto``."""
        if self.model == "audit":
            return "audit"
        return catalog.DEFAULT_LOSS[self.task] if self.loss == "auto" else self.loss  # type: ignore[index]

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
            "standardize_target": self.standardize_target,
        }

    @property
    def scales_target(self) -> bool:
        """Whether the label is standardized: a regression on mse or l1 (not the audit loss)."""
        return self.standardize_target and self.task == "regression" and self.resolved_loss in ("mse", "l1")


# Why a guard refused a record (``StepResult.skipped_reasons``): its loss, or its step's gradient or
# update, was not finite (counted in ``skipped_nonfinite``; the metric label ``non_finite``), or its
# loss was a spike (``skipped_spike``; ``spike``). Bounded: callers use them as metric labels.
SKIP_NON_FINITE = "non_finite_loss"
SKIP_SPIKE = "loss_spike"
SKIP_REASONS = (SKIP_NON_FINITE, SKIP_SPIKE)


# A refused spike counts against the model only if its loss on the reference model is under its
# threshold / this (see OnlineLearner.failing_on).
_JUDGE_MARGIN = 4.0
# ... and if its features' norm and its gradient there are under this multiple of the typical
# record's of the same call (see failing_on).
_JUDGE_OUTLIER_FACTOR = 1000.0

_NO_POSITIONS: npt.NDArray[np.intp] = np.empty(0, dtype=np.intp)
_NO_POSITIONS.flags.writeable = False
_NO_THRESHOLDS: npt.NDArray[np.float64] = np.empty(0, dtype=np.float64)
_NO_THRESHOLDS.flags.writeable = False


@dataclass(frozen=True, slots=True)
class Skips:
    """The records of one call the guards refused: positions (ascending), reasons, spike thresholds."""

    positions: npt.NDArray[np.intp]
    reasons: tuple[str, ...]
    thresholds: npt.NDArray[np.float64]


NO_SKIPS = Skips(_NO_POSITIONS, (), _NO_THRESHOLDS)  # shared: nothing was skipped


@dataclass(frozen=True, slots=True)
class StepResult:
    """Per-record pre-update losses and predictions (value, or class index).

    A non-finite loss is NaN, with a NaN prediction: leave those records out of
    prequential metrics. ``skipped_nonfinite`` and ``skipped_spike`` count the
    records of this call that were not learned from; ``skipped`` lists them
    (positions within the call, ascending), ``skipped_reasons`` says why, one of
    :data:`SKIP_REASONS` each, and ``skipped_thresholds`` the spike threshold a
    ``loss_spike`` record's loss exceeded (NaN for ``non_finite_loss``). In
    micro-batch mode a group whose step was undone lists every record it learned
    from. The three live in one ``Skips`` (:data:`NO_SKIPS`, shared, when nothing
    was skipped: the common case costs one field). ``rollback_needed`` is the
    learner's flag after the call (see ``OnlineLearner.rollback_needed``).
    """

    losses: npt.NDArray[np.float64]
    predictions: npt.NDArray[np.float64]
    skipped_nonfinite: int = 0
    skipped_spike: int = 0
    rollback_needed: bool = False
    skips: Skips = NO_SKIPS

    @property
    def skipped(self) -> npt.NDArray[np.intp]:
        """Positions (within the call, ascending) of the records the guards did not learn from."""
        return self.skips.positions

    @property
    def skipped_reasons(self) -> tuple[str, ...]:
        """Why each of ``skipped`` was refused: one of :data:`SKIP_REASONS` each."""
        return self.skips.reasons

    @property
    def skipped_thresholds(self) -> npt.NDArray[np.float64]:
        """The spike threshold each ``loss_spike`` record's loss exceeded (NaN for ``non_finite_loss``)."""
        return self.skips.thresholds


class OnlineLearner:
    """A model learning from a stream, one record at a time: predict, measure the loss, then step.

    Made from a :class:`LearnerConfig` (a built-in model or a factory, by name) or from a module
    instance (:meth:`from_module`). ``learn_one`` / ``learn_many`` learn (test-then-train: each
    record's loss and prediction are from before its update); ``predict_one`` / ``predict_many``
    and, for a classifier, ``predict_proba_one`` / ``predict_proba_many`` predict without
    learning. Features are standardized online and a regression's label too (``LearnerConfig``):
    inputs and outputs are always in the data's own units. ``model`` is the module trained.
    """

    def __init__(self, config: LearnerConfig, n_features: int, *, module: nn.Module | None = None) -> None:
        """A learner of ``config`` over ``n_features`` features.

        ``module``: train this module (in place) instead of building ``config.model``; it must map
        ``(n, n_features)`` to ``(n, n_outputs)`` raw scores (see :meth:`from_module`).
        """
        loss = config.resolved_loss
        if config.task not in catalog.TASKS:
            raise ModelSpecError(f"unknown task {config.task!r}")
        if loss not in catalog.task_losses(config.task):
            raise ModelSpecError(
                f"loss {loss!r} does not fit a {config.task} task "
                f"(use {', '.join(catalog.task_losses(config.task))})"
            )
        self.config = config
        self.n_features = n_features
        self.n_outputs = n_outputs_for(config.task, config.n_classes)
        self.device = torch.device(config.device)
        # A module given as an instance: its starting state, what a rollback with no checkpoint
        # (reference_model(None)) goes back to; a built model is rebuilt from its seed instead.
        self._initial_state: dict[str, torch.Tensor] | None = None
        if module is None:
            self.model = build_model(
                config.model,
                n_features=n_features,
                n_outputs=self.n_outputs,
                hidden=config.hidden,
                seed=config.seed,
            ).to(self.device)
        else:
            check_module(module, n_features=n_features, n_outputs=self.n_outputs, task=config.task)
            self.model = module.to(self.device)
            self._initial_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        # Feature names of mapping rows (learn_one({"a": 1.0, ...})), fixed by the first one seen.
        self.feature_names: list[str] | None = None
        self.optimizer = make_optimizer(config.optimizer, self.model.parameters(), config.lr)
        self.scaler = RunningStandardizer(n_features) if config.standardize else None
        self.target_scaler = TargetStandardizer() if config.scales_target else None
        self.updates = 0
        self._loss_name = loss
        self._dtype = next(self.model.parameters()).dtype
        _check_guards(config)
        self._monitor = guards.LossMonitor(config.spike_factor, config.spike_span, config.spike_warmup)
        self._snapshot = guards.Snapshot(self.model, self.optimizer)
        self._params = list(self.model.parameters())
        self._streak = 0  # records skipped in a row
        self._rollback_needed = False
        self._lr_scale = 1.0  # the steps take config.lr x this (lowered after a divergence)
        self._pending: PendingSteps | None = None  # started by start_learn_many, not yet finished
        self.path = paths.choose(
            self.model,
            self.optimizer,
            loss=loss,
            task=config.task,
            enabled=config.fused,
            clip_grad_norm=config.clip_grad_norm,
            n_features=n_features,
        )
        logger.info("training path for %s: %s", config.model, self.path.describe())

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        task: str,
        n_features: int | None = None,
        n_classes: int | None = None,
        loss: str = "auto",
        optimizer: str = "adagrad",
        lr: float = 0.1,
        standardize: bool = True,
        standardize_target: bool = True,
        device: str = "cpu",
        fused: bool = True,
        clip_grad_norm: float | None = None,
        spike_factor: float | None = None,
        name: str | None = None,
    ) -> OnlineLearner:
        """A learner that trains ``module`` itself (in place), an ``nn.Module`` instance of the caller's.

        ``module`` maps a float tensor of shape ``(n, n_features)`` to raw scores of shape ``(n, 1)``
        (regression, binary: a logit) or ``(n, n_classes)`` (multiclass: logits): no sigmoid or
        softmax, the losses take logits. ``task`` is ``regression``, ``binary`` or ``multiclass``.
        ``n_features`` defaults to the ``in_features`` of the module's first ``nn.Linear``, and a
        multiclass ``n_classes`` to the ``out_features`` of its last; the module is checked with one
        forward pass on zeros (in eval mode, no gradient) before anything learns. ``optimizer``
        (``adagrad``, ``adam`` or ``sgd``) and ``lr`` default to the worker's defaults; the other
        options are :class:`LearnerConfig`'s. ``name`` (default: ``module:Class``) is what
        checkpoints and logs call the model. Modules of known layers take the compiled paths as a
        built-in model does (``path`` says which).
        """
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if n_features is None:
            if not linears or linears[0].in_features < 1:
                raise ModelSpecError(
                    f"cannot tell the number of features of {type(module).__name__}: pass n_features="
                )
            n_features = linears[0].in_features
        if task == "multiclass" and n_classes is None and linears:
            n_classes = linears[-1].out_features
        config = LearnerConfig(
            model=name or module_name(module),
            task=task,
            loss=loss,
            optimizer=optimizer,
            lr=lr,
            n_classes=n_classes,
            standardize=standardize,
            standardize_target=standardize_target,
            device=device,
            fused=fused,
            clip_grad_norm=clip_grad_norm,
            spike_factor=spike_factor,
        )
        return cls(config, n_features, module=module)

    def prepare(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Start compiling this learner's path for steps of ``batch_sizes`` records, in the background.

        Returns at once. Optional: the first batch of a size schedules its compilation anyway
        (and trains through autograd until it is ready); calling this early hides the wait.
        """
        if self.path.compiled is not None:
            for batch_size in batch_sizes:
                self.path.compiled.ready(batch_size)

    # -- public API ---------------------------------------------------------

    def learn_one(self, features: Row, label: float) -> float:
        """Learn from one record; returns its loss measured before the update (in the label's units).

        ``features``: an array or sequence of ``n_features`` numbers, or a mapping of feature names
        to numbers (the first mapping fixes the names and their order). ``label``: a value
        (regression), 0 or 1 (binary) or a class index (multiclass). A loss of NaN: the record was
        not finite and was not learned from (``learn_many``'s ``StepResult`` says more).
        """
        result = self.learn_many(self._row(features).reshape(1, -1), np.array([label], dtype=np.float32))
        return float(result.losses[0])

    def learn_many(
        self,
        features: npt.ArrayLike,
        labels: npt.ArrayLike,
        *,
        batch_size: int = 1,
    ) -> StepResult:
        """Learn from the rows in order, ``batch_size`` records per update (1: strict).

        ``features`` is ``(n, n_features)``, ``labels`` ``(n,)`` (anything ``numpy.asarray`` takes).
        Returns each record's pre-update loss and prediction, and the records the guards refused.
        """
        pending = self.start_learn_many(
            np.asarray(features, dtype=np.float32),
            np.asarray(labels, dtype=np.float32),
            batch_size=batch_size,
        )
        pending.run_here()
        return pending.finish()

    def start_learn_many(
        self,
        features: npt.NDArray[np.float32],
        labels: npt.NDArray[np.float32],
        *,
        batch_size: int = 1,
    ) -> PendingSteps:
        """``learn_many`` in three parts, for a caller that overlaps the middle one with other work.

        This call checks and scales the rows (the running statistics learn from
        them here) and prepares the compiled loop; :meth:`PendingSteps.compute`
        runs it over the whole batch without the GIL, on any one thread;
        :meth:`PendingSteps.finish`, on the caller's thread, checks the outcome
        (guards; a batch that fails them is redone as ``learn_many`` would) and
        returns the result. Until ``finish`` (or ``load_state``) nothing else may
        use the learner. Without the compiled loop ``compute`` does nothing and
        ``finish`` does all the steps.
        """
        n = features.shape[0]
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise TrainingError(f"expected features of shape (n, {self.n_features}), got {features.shape}")
        if batch_size < 1:
            raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
        fused = self._fused_ready(n, labels, batch_size)
        absent: npt.NDArray[np.bool_] | None = None  # rows left out of the running statistics
        if self.scaler is not None:
            # A finite sum means every value is finite (NaN and inf propagate): one fast pass for the
            # common case; the row by row check only when the sum is not (overflow included).
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, or overflow: checked below
                total = features.sum()
            rows = None if np.isfinite(total) else np.isfinite(features).all(axis=1)
            if rows is not None and not rows.all():
                absent = np.logical_not(rows)
            if rows is None or rows.all():
                features = self._standardize_learn(features, fused)
            else:
                # A non-finite row must not reach the running statistics: it is left NaN (its loss
                # will be non-finite, and it is skipped) and the others are scaled as if it were absent.
                scaled = np.full(features.shape, np.nan, dtype=np.float32)
                scaled[rows] = self._standardize_learn(features[rows], fused)
                features = scaled
        units = None
        if self.target_scaler is not None:
            # A row with a non-finite feature is not learned from: its label stays out of the
            # statistics too, as if the record were absent.
            counted = labels if absent is None else np.where(absent, np.float32(np.nan), labels)
            targets, prior_mean, prior_std = self.target_scaler.learn_transform(counted)
            units = _LabelUnits(labels, prior_mean, prior_std)
            labels = targets
        pending = self._start_steps(features, labels, batch_size=batch_size, fused=fused, stream=True)
        pending.units = units
        return pending

    def _standardize_learn(self, features: npt.NDArray[np.float32], fused: bool) -> npt.NDArray[np.float32]:
        assert self.scaler is not None
        if fused and self.path.path in ("kernel", "program"):  # the numba loops' standardizer is compiled
            return kernels.fused_standardize(self.scaler, features)
        return self.scaler.learn_transform(features)

    @property
    def rollback_needed(self) -> bool:
        """Set after ``max_consecutive_skips`` skipped records in a row; cleared by a reload.

        The model has stopped learning (every record non-finite or a spike): the
        caller should reload its last checkpoint (``load_state`` clears the flag
        and the guards' running loss) or call ``reset_guards``.
        """
        return self._rollback_needed

    def reset_guards(self) -> None:
        """Forget the running loss (the spike check warms up again), the skip streak and the flag."""
        self._monitor.reset()
        self._streak = 0
        self._rollback_needed = False

    # -- divergence: the model's fault or the records' --------------------------

    @property
    def lr(self) -> float:
        """The learning rate of the online steps now: ``config.lr`` times ``lr_scale``."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def lr_scale(self) -> float:
        """What ``config.lr`` is multiplied by (1 until a divergence lowered it)."""
        return self._lr_scale

    def set_lr_scale(self, scale: float) -> None:
        """Take steps of ``config.lr * scale`` from now on (``state`` records the scale)."""
        if not (math.isfinite(scale) and scale > 0):
            raise TrainingError(f"the learning-rate scale must be > 0, got {scale}")
        self._lr_scale = scale
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * scale

    def reference_model(self, tensors: Mapping[str, torch.Tensor] | None) -> nn.Module:
        """A model to judge refused records on: a checkpoint's (its ``model.*`` tensors) or the initial one.

        None gives the model this learner started from (its seed's): the one a
        rollback with no checkpoint goes back to. The global RNG is left as it was.
        """
        config = self.config
        if self._initial_state is not None:  # a module given as an instance: a copy, at its start
            model = copy.deepcopy(self.model)
            model.load_state_dict(self._initial_state)
            if tensors is not None:
                model.load_state_dict(
                    {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
                )
            return model
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            model = build_model(
                config.model,
                n_features=self.n_features,
                n_outputs=self.n_outputs,
                hidden=config.hidden,
                seed=config.seed,
            ).to(self.device)
        if tensors is not None:
            model.load_state_dict(
                {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
            )
        return model

    def failing_on(self, reference: nn.Module, steps: PendingSteps, skips: Skips) -> npt.NDArray[np.bool_]:
        """Which records a finished call refused fail on ``reference`` too: their own fault, not the model's.

        ``steps`` is the finished call and ``skips`` its ``StepResult.skips``. The
        records are taken as that call scaled them: re-read after a rollback, they
        are scaled the same way again (the running statistics do not depend on the
        model). A record fails if its loss or its gradient is not finite there,
        or, refused as a spike, its loss there is above a quarter of the threshold
        it exceeded (a record near the threshold on both models is no evidence
        against the model: rolling back for it would lower the learning rate for
        nothing), or its features' norm or its gradient there is over 1,000
        times the median of the call's other records (absurd values that a model
        starting from zero still predicts finitely). A record that passes failed only because of the model.
        """
        positions = skips.positions
        if positions.shape[0] == 0:
            return np.zeros(0, dtype=np.bool_)
        x = torch.from_numpy(np.ascontiguousarray(steps.features[positions])).to(self.device, self._dtype)
        y = torch.from_numpy(np.ascontiguousarray(steps.labels[positions])).to(self.device, self._dtype)
        reference.train()
        with torch.no_grad():
            losses = self._per_record_loss(reference(x), y).cpu().double().numpy()
        with np.errstate(invalid="ignore"):
            limits = np.nan_to_num(skips.thresholds, nan=np.inf) / _JUDGE_MARGIN
            fails = ~np.isfinite(losses) | (losses > limits)
        passing = np.flatnonzero(~fails)
        if passing.shape[0] == 0:
            return fails
        # Their gradients: finite for the records together implies finite for each (an Inf or a NaN
        # in one record's reaches the sum). Only if the sum's is not, record by record (rare).
        rows = torch.from_numpy(passing).to(x.device)
        if not self._gradient_finite(reference, x[rows], y[rows]):
            for j in passing.tolist():
                fails[j] = not self._gradient_finite(reference, x[j : j + 1], y[j : j + 1])
        passing = np.flatnonzero(~fails)
        if passing.shape[0] == 0:
            return fails
        # A model that starts at zero predicts 0 for any record, so a record of absurd values (1e30)
        # has a finite loss there (zero, if its label is 0): what gives it away is its features, or
        # its gradient there, _JUDGE_OUTLIER_FACTOR times the typical record's of the same call. A
        # diverging model's refusals are ordinary records: like the others on both counts.
        rows = torch.from_numpy(passing).to(x.device)
        sample = self._typical_sample(steps, skips)
        if sample.shape[0]:
            features = np.nan_to_num(steps.features.astype(np.float64), nan=np.inf, posinf=np.inf)
            sizes = np.linalg.norm(features[positions[passing]], axis=1)
            typical_size = float(np.median(np.linalg.norm(features[sample], axis=1)))
            norms = self._gradient_norms(reference, x[rows], y[rows])
            typical_norm = self._typical_gradient_norm(reference, steps, sample)
            with np.errstate(invalid="ignore", over="ignore"):
                fails[passing] |= ~(sizes <= _JUDGE_OUTLIER_FACTOR * max(typical_size, 1e-12))
                fails[passing] |= ~(norms <= _JUDGE_OUTLIER_FACTOR * max(typical_norm, 1e-12))
        return fails

    @staticmethod
    def _typical_sample(steps: PendingSteps, skips: Skips) -> npt.NDArray[np.intp]:
        """Up to 64 records of the call the guards did not refuse, spread over it."""
        kept = np.setdiff1d(np.arange(steps.features.shape[0]), skips.positions)
        if kept.shape[0] == 0:
            return kept
        return kept[np.linspace(0, kept.shape[0] - 1, min(64, kept.shape[0])).astype(np.intp)]

    def _typical_gradient_norm(
        self, reference: nn.Module, steps: PendingSteps, sample: npt.NDArray[np.intp]
    ) -> float:
        """The median gradient norm on ``reference`` of the ``sample`` records of the call."""
        x = torch.from_numpy(np.ascontiguousarray(steps.features[sample])).to(self.device, self._dtype)
        y = torch.from_numpy(np.ascontiguousarray(steps.labels[sample])).to(self.device, self._dtype)
        norms = self._gradient_norms(reference, x, y)
        finite = norms[np.isfinite(norms)]
        return float(np.median(finite)) if finite.shape[0] else math.inf

    def _gradient_norms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> npt.NDArray[np.float64]:
        """Each record's gradient norm on ``model`` (record by record: only refused records and a sample)."""
        norms = np.empty(x.shape[0], dtype=np.float64)
        for j in range(x.shape[0]):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                self._per_record_loss(model(x[j : j + 1]), y[j : j + 1]).sum().backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norms[j] = guards.grad_norm(grads) if grads else 0.0
        model.zero_grad(set_to_none=True)
        return norms

    def _gradient_finite(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            self._per_record_loss(model(x), y).sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return guards.all_finite(grads)

    def fit_rows(
        self, features: npt.NDArray[np.float32], labels: npt.NDArray[np.float32], *, batch_size: int
    ) -> npt.NDArray[np.float64]:
        """Mini-batch steps over rows already scaled by ``standardize`` (features) and
        ``standardize_labels`` (labels), in order (batch epochs).

        The scalers are not updated: they describe the stream, and records trained
        again must not count twice. Returns each record's loss before its step, in
        the label's units.
        Built-in models on the CPU take the compiled loop, like ``learn_many``.
        The non-finite guard and clipping apply; the spike check, its running
        loss and the skip streak do not (they describe the stream). A non-finite
        loss is returned as NaN.
        """
        if batch_size < 1:
            raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
        fused = self._fused_ready(features.shape[0], labels, batch_size)
        pending = self._start_steps(features, labels, batch_size=batch_size, fused=fused, stream=False)
        pending.run_here()
        return pending.finish().losses * self._loss_unit()

    def _loss_unit(self) -> float:
        """What a loss on standardized labels is multiplied by to be in the label's units."""
        if self.target_scaler is None:
            return 1.0
        std = self.target_scaler.std
        return std * std if self._loss_name == "mse" else std

    def _start_steps(
        self,
        features: npt.NDArray[np.float32],
        labels: npt.NDArray[np.float32],
        *,
        batch_size: int,
        fused: bool,
        stream: bool,
    ) -> PendingSteps:
        """Guarded steps over scaled rows, ``batch_size`` per update: the compiled loop, or autograd.

        ``stream``: records of the stream (spike check, running loss, skip streak), not a replay.
        The compiled loop's first run covers the whole batch, after a snapshot; it is what
        ``PendingSteps.compute`` runs, and ``_finish_steps`` checks it.
        """
        if self._pending is not None:
            raise TrainingError("the previous batch's steps are not finished (PendingSteps.finish)")
        call = None
        if fused:
            self._snapshot.take()
            try:
                call = self._fused_call(features, labels, batch_size)
            except CompiledPathRefusedError as error:  # raised before any parameter moves
                logger.warning("the compiled path refused a batch (%s): learning it through autograd", error)
        pending = PendingSteps(
            self,
            features=features,
            labels=labels,
            batch_size=batch_size,
            stream=stream,
            call=call,
        )
        self._pending = pending
        return pending

    def _finish_steps(self, pending: PendingSteps) -> StepResult:
        assert pending is self._pending, "finish the steps this learner started last"
        self._pending = None
        features, labels = pending.features, pending.labels
        batch_size, stream = pending.batch_size, pending.stream
        n = features.shape[0]
        out = _Outcome(np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64))
        done = 0
        if pending.call is not None:
            first = pending.call.result()
            done = self._fused_steps(features, labels, batch_size, stream, out, first=first)
        if done < n:
            self._autograd_steps(
                features[done:], labels[done:], batch_size=batch_size, stream=stream, out=out, offset=done
            )
        if pending.units is not None:
            out.losses, out.predictions = pending.units.to_label_units(out.predictions, self._loss_name)
        if out.skips is None:
            return StepResult(out.losses, out.predictions, out.nonfinite, out.spikes, self._rollback_needed)
        positions, reasons, thresholds = zip(*out.skips, strict=True)
        skips = Skips(np.array(positions, dtype=np.intp), reasons, np.array(thresholds, dtype=np.float64))
        return StepResult(
            out.losses, out.predictions, out.nonfinite, out.spikes, self._rollback_needed, skips
        )

    def _fused_steps(
        self,
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.float32],
        batch_size: int,
        stream: bool,
        out: _Outcome,
        *,
        first: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None,
    ) -> int:
        """The compiled loop, checked afterwards; returns how many leading records it has handled.

        ``first``: the losses and predictions of its first run, over all of ``x``
        (``_start_steps`` took the snapshot and ``PendingSteps.compute`` ran it).
        A snapshot is taken before each run. From the first group that fails the
        check the run is undone: the records before it are learned again through
        the loop (deterministic: same results), and that group is skipped (a
        single record with a non-finite or spiking loss: no step, its loss is
        known) or taken through the guarded autograd step; the loop resumes
        after it. Runs cover a window of records that shrinks after a failure and
        grows after a clean run, so frequent failures cost little work redone.
        """
        n, pos = x.shape[0], 0
        window = max(n, 1)
        while pos < n or n == 0:  # an empty batch runs too (as the loop always has)
            end = min(n, pos + window)
            if first is not None:
                losses, predictions = first  # the run over [0, n), prepared in _start_steps
                first = None
            else:
                self._snapshot.take()
                try:
                    losses, predictions = self._fused_run(x[pos:end], y[pos:end], batch_size)
                except CompiledPathRefusedError as error:  # raised before any parameter moves
                    logger.warning("the compiled path refused a batch (%s): it goes through autograd", error)
                    return pos
            bad = self._first_failure(losses, x[pos:end], y[pos:end], batch_size, stream)
            if bad == losses.shape[0] and self._snapshot.finite():
                self._accept_fused(losses, predictions, pos, batch_size=batch_size, stream=stream, out=out)
                if end >= n:
                    return n
                pos, window = end, window * 4
                continue
            self._snapshot.restore()
            loss_failed = bad < losses.shape[0]
            if not loss_failed:
                # Every loss passed but a step broke something: find it among all the groups.
                bad = (bad - 1) // batch_size * batch_size
            failed_loss, failed_prediction = losses[bad], predictions[bad]
            clean, losses, predictions = self._clean_prefix(x[pos:end], y[pos:end], batch_size, bad)
            if clean > 0:
                self._accept_fused(losses, predictions, pos, batch_size=batch_size, stream=stream, out=out)
            start = pos + clean
            stop = min(start + batch_size, n)
            if (
                batch_size == 1
                and clean == bad
                and loss_failed
                and self._loss_only_failure(failed_loss, x[start], float(y[start]), stream)
            ):
                self._skip_one(start, failed_loss, failed_prediction, float(y[start]), stream=stream, out=out)
            else:
                self._autograd_steps(
                    x[start:stop], y[start:stop], batch_size=batch_size, stream=stream, out=out, offset=start
                )
            pos = stop
            window = max(2 * bad, 16 * batch_size)
        return pos

    def _loss_only_failure(self, loss: float, x: npt.NDArray[np.float32], label: float, stream: bool) -> bool:
        """Whether a single record failed on its loss alone (non-finite or a spike), not the clip."""
        if not math.isfinite(loss):
            return True
        if self.config.clip_grad_norm is not None:
            bound = guards.linear_grad_norm_bounds(self._loss_name, np.array([loss]), x.reshape(1, -1), 1)
            if float(bound[0]) > self.config.clip_grad_norm:
                return False
        return stream and loss > self._threshold(label)

    def _threshold(self, label: float) -> float:
        """A stream record's spike threshold: the running loss's, or its divergence bound if lower."""
        bound = guards.divergence_bounds(self._loss_name, np.array([label]), self.config.divergence_factor)
        threshold = self._monitor.threshold()
        return threshold if bound is None else min(threshold, float(bound[0]))

    def _skip_one(
        self, index: int, loss: float, prediction: float, label: float, *, stream: bool, out: _Outcome
    ) -> None:
        """A single record the check stopped on its loss: no step, as the guarded autograd step does."""
        if math.isfinite(loss):
            out.losses[index], out.predictions[index] = loss, prediction
            out.spikes += 1
            out.skip(index, SKIP_SPIKE, self._threshold(label))
        else:
            out.losses[index] = out.predictions[index] = math.nan
            out.nonfinite += 1
            out.skip(index, SKIP_NON_FINITE, math.nan)
        if stream:
            self._count_streak(np.zeros(1, dtype=np.bool_))

    def _clean_prefix(
        self, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], batch_size: int, bad: int
    ) -> tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Learn the longest prefix of ``bad`` records (whole groups) that leaves everything finite.

        Usually the first ``bad`` (those before the group that failed the check)
        do. If not, a step before that group made a parameter or an optimizer
        state value non-finite without a non-finite loss: a binary search over
        the number of groups finds the last clean prefix (non-finite values
        stay non-finite, so "finite after k groups" is monotone). Returns its
        length and results, learned; the snapshot's state if it is empty.
        """
        empty = np.empty(0, dtype=np.float64)
        if bad == 0:
            return 0, empty, empty
        losses, predictions = self._fused_run(x[:bad], y[:bad], batch_size)
        if self._snapshot.finite():
            return bad, losses, predictions
        self._snapshot.restore()
        low, high = 0, bad // batch_size - 1  # groups: low is known clean, high not yet tried
        while low < high:
            middle = (low + high + 1) // 2
            self._fused_run(x[: middle * batch_size], y[: middle * batch_size], batch_size)
            clean = self._snapshot.finite()
            self._snapshot.restore()
            if clean:
                low = middle
            else:
                high = middle - 1
        if low == 0:
            return 0, empty, empty
        losses, predictions = self._fused_run(x[: low * batch_size], y[: low * batch_size], batch_size)
        return low * batch_size, losses, predictions

    def _fused_run(
        self, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], batch_size: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        return self._fused_call(x, y, batch_size).result()

    def _fused_call(
        self, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], batch_size: int
    ) -> paths.CompiledCall:
        compiled = self.path.compiled
        if compiled is None:
            raise CompiledPathRefusedError("this learner trains through autograd")
        return compiled.call(x, y, batch_size)

    def _first_failure(
        self,
        losses: npt.NDArray[np.float64],
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.float32],
        batch_size: int,
        stream: bool,
    ) -> int:
        """Start of the first group a guard would have stopped (len(losses): none)."""
        n = losses.shape[0]
        failed = ~np.isfinite(losses)
        if stream:
            thresholds = self._monitor.batch_thresholds(losses, batch_size)
            if thresholds is not None:
                failed |= losses > thresholds
            # On by default, so on the hot path: ~1.7 ns a record (measured over 10k), a few vector ops.
            limits = guards.divergence_bounds(self._loss_name, y, self.config.divergence_factor)
            if limits is not None:
                failed |= losses > limits
        if self.config.clip_grad_norm is not None:
            bounds = guards.linear_grad_norm_bounds(self._loss_name, losses, x, batch_size)
            failed |= bounds > self.config.clip_grad_norm
        if not failed.any():
            return n
        return int(np.argmax(failed)) // batch_size * batch_size

    def _accept_fused(
        self,
        losses: npt.NDArray[np.float64],
        predictions: npt.NDArray[np.float64],
        pos: int,
        *,
        batch_size: int,
        stream: bool,
        out: _Outcome,
    ) -> None:
        m = losses.shape[0]
        out.losses[pos : pos + m] = losses
        out.predictions[pos : pos + m] = predictions
        self.updates += -(-m // batch_size)
        if stream and m:
            if self.config.spike_factor is not None:
                self._monitor.accept(losses)
            self._streak = 0

    def _autograd_steps(
        self,
        features: npt.NDArray[np.float32],
        labels: npt.NDArray[np.float32],
        *,
        batch_size: int,
        stream: bool,
        out: _Outcome,
        offset: int,
    ) -> None:
        n = features.shape[0]
        if n == 0:
            return
        x_all = torch.from_numpy(np.ascontiguousarray(features)).to(self.device, self._dtype)
        y_all = torch.from_numpy(np.ascontiguousarray(labels)).to(self.device, self._dtype)
        self.model.train()
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            self._learn(x_all[start:stop], y_all[start:stop], stream, out, offset + start)

    @torch.no_grad()
    def predict_many(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Predictions for ``(n, n_features)`` rows without learning: values (in the label's units),
        or class indices (binary: 0 or 1)."""
        outputs = self._outputs(features)
        predictions = self._predictions(outputs).cpu().numpy().astype(np.float64)
        if self.target_scaler is not None:
            return self.target_scaler.inverse(predictions)
        return predictions

    @torch.no_grad()
    def predict_proba_many(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Class probabilities for ``(n, n_features)`` rows without learning: ``(n, n_classes)``.

        Binary: the columns are P(0) and P(1) (the sigmoid of the model's logit); multiclass: the
        softmax of its logits. Each row sums to 1, and ``predict_many`` is its argmax. A regression
        has none (:class:`TrainingError`).
        """
        task = self.config.task
        if task not in ("binary", "multiclass"):
            raise TrainingError(f"a {task} learner predicts values, not class probabilities (predict_many)")
        outputs = self._outputs(features).double()
        if task == "multiclass":
            return torch.softmax(outputs, dim=-1).cpu().numpy()  # type: ignore[no-any-return]
        positive = torch.sigmoid(outputs.reshape(-1)).cpu().numpy()
        return np.stack([1.0 - positive, positive], axis=1)

    def predict_proba_one(self, features: Row) -> npt.NDArray[np.float64]:
        """Class probabilities of one record (``features`` as ``learn_one`` takes them): ``(n_classes,)``."""
        return self.predict_proba_many(self._row(features).reshape(1, -1))[0]  # type: ignore[no-any-return]

    def _outputs(self, features: npt.ArrayLike) -> torch.Tensor:
        """The model's raw outputs for rows, scaled by the running statistics (not updated), eval mode."""
        rows = np.asarray(features, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise TrainingError(f"expected features of shape (n, {self.n_features}), got {rows.shape}")
        if self.scaler is not None:
            rows = self.scaler.transform(rows)
        self.model.eval()
        return self.model(torch.from_numpy(np.ascontiguousarray(rows)).to(self.device, self._dtype))

    def _row(self, features: Row) -> npt.NDArray[np.float32]:
        """One record's features as a float32 vector (a mapping read in ``feature_names`` order)."""
        if isinstance(features, Mapping):
            if self.feature_names is None:
                if len(features) != self.n_features:
                    raise TrainingError(f"expected {self.n_features} features, got {len(features)}")
                self.feature_names = [str(name) for name in features]
            missing = [name for name in self.feature_names if name not in features]
            if missing:
                raise TrainingError(f"features missing from the record: {', '.join(missing)}")
            return np.array([features[name] for name in self.feature_names], dtype=np.float32)
        row = np.asarray(features, dtype=np.float32).reshape(-1)
        if row.shape[0] != self.n_features:
            raise TrainingError(f"expected {self.n_features} features, got {row.shape[0]}")
        return row

    def _fused_ready(self, n: int, labels: npt.NDArray[np.float32], batch_size: int = 1) -> bool:
        """Whether this batch takes the learner's compiled path: there is one, compiled, on the CPU.

        Never blocks: the first call for a batch size schedules its compilation.
        """
        compiled = self.path.compiled
        if compiled is None or self.device.type != "cpu" or labels.shape != (n,):
            return False  # (on_device moves the model for batch epochs on a GPU)
        if self.config.task == "multiclass" and not self.valid_labels(labels).all():
            return False  # autograd raises on a class index out of range; the loop does not check
        return compiled.ready(batch_size)

    def settle_path(self, timeout_s: float = 120.0, batch_size: int = 1) -> bool:
        """Wait until this learner's steps take one path for good (the compiled loop, if it applies).

        Online learning never waits: the first batches go through autograd while the loop compiles,
        and the two agree to float32 rounding. A run that must be bitwise reproducible (replay)
        calls this first; if the loop cannot be had, the learner stays on autograd. True: compiled.
        """
        compiled = self.path.compiled
        if compiled is not None and self.device.type == "cpu":
            if compiled.wait(batch_size, timeout_s):
                return True
            logger.warning("the compiled path is not ready after %.0fs: staying on autograd", timeout_s)
        self.config = dataclasses.replace(self.config, fused=False)
        self.path = dataclasses.replace(
            self.path, path="autograd", compiled=None, reason="not compiled in time"
        )
        return False

    def predict_one(self, features: Row) -> float:
        """The prediction for one record without learning (``features`` as ``learn_one`` takes them):
        a value in the label's units, or a class index."""
        return float(self.predict_many(self._row(features).reshape(1, -1))[0])

    # -- batch epochs (compaction, replay) ---------------------------------------

    def standardize(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Features as the model sees them, scaled by the running statistics without updating them."""
        return self.scaler.transform(features) if self.scaler is not None else features

    def standardize_labels(self, labels: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Labels as the model learns them (standardized for a regression), statistics not updated."""
        return self.target_scaler.transform(labels) if self.target_scaler is not None else labels

    def learn_statistics(self, features: npt.NDArray[np.float32], labels: npt.NDArray[np.float32]) -> None:
        """Update the running statistics of features and labels from rows, without training (replay)."""
        if self.scaler is not None:
            self.scaler.learn_transform(features)
        if self.target_scaler is not None:
            self.target_scaler.learn_transform(labels)

    def as_tensors(
        self, features: npt.NDArray[np.float32], labels: npt.NDArray[np.float32]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardized features and labels on the learner's device and dtype."""
        x = torch.from_numpy(np.ascontiguousarray(self.standardize(features)))
        y = torch.from_numpy(np.ascontiguousarray(self.standardize_labels(labels)))
        return x.to(self.device, self._dtype), y.to(self.device, self._dtype)

    @torch.no_grad()
    def batch_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-record losses on ``as_tensors``' tensors, without learning, in the label's units (held-out
        evaluation)."""
        self.model.eval()
        return self._per_record_loss(self.model(x), y) * self._loss_unit()

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

    def _learn(self, x: torch.Tensor, y: torch.Tensor, stream: bool, out: _Outcome, offset: int) -> None:
        """One guarded gradient step on a group; writes its pre-update losses and predictions to ``out``."""
        outputs = self.model(x)
        per_record = self._per_record_loss(outputs, y)
        with torch.no_grad():
            predictions = self._predictions(outputs.detach()).cpu().double().numpy()
        losses = per_record.detach().cpu().double().numpy()
        m = losses.shape[0]
        finite = np.isfinite(losses)
        keep = finite.copy()
        spikes = 0
        threshold: float | npt.NDArray[np.float64] = math.inf
        if stream:
            threshold = self._monitor.threshold()
            bounds = guards.divergence_bounds(
                self._loss_name, y.detach().cpu().double().numpy(), self.config.divergence_factor
            )
            if bounds is not None:
                threshold = np.minimum(threshold, bounds)
            if np.any(threshold < math.inf):
                with np.errstate(invalid="ignore"):
                    spiked = finite & (losses > threshold)
                spikes = int(spiked.sum())
                keep &= ~spiked
        losses[~finite] = np.nan
        predictions[~finite] = np.nan
        out.losses[offset : offset + m] = losses
        out.predictions[offset : offset + m] = predictions
        out.spikes += spikes
        nonfinite = m - int(finite.sum())
        kept = int(keep.sum())
        if kept:
            if kept < m:
                # Left-out records must not reach the gradient at all: a NaN row times a zero is NaN.
                rows = torch.from_numpy(keep).to(x.device)
                per_record = self._per_record_loss(self.model(x[rows]), y[rows])
            self.optimizer.zero_grad(set_to_none=True)
            per_record.mean().backward()
            if self._step_guarded():
                self.updates += 1
                if stream and self.config.spike_factor is not None:
                    self._monitor.accept(losses[keep])
            else:
                nonfinite += kept
                keep[:] = False
        out.nonfinite += nonfinite
        if nonfinite or spikes:
            # Which ones: a finite loss a guard left out is a spike (below the threshold: a step undone).
            limits = np.broadcast_to(threshold, losses.shape)
            for j in np.flatnonzero(~keep).tolist():
                if finite[j] and losses[j] > limits[j]:
                    out.skip(offset + j, SKIP_SPIKE, float(limits[j]))
                else:
                    out.skip(offset + j, SKIP_NON_FINITE, math.nan)
        if stream:
            self._count_streak(keep)

    def _step_guarded(self) -> bool:
        """Clip, step, and undo the step if it left anything non-finite; False: no step taken."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if not guards.all_finite(grads):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        clip = self.config.clip_grad_norm
        if clip is not None:
            norm = guards.grad_norm(grads)
            if norm > clip:
                with torch.no_grad():
                    scale = clip / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
                    for grad in grads:
                        grad.mul_(scale)
        self._snapshot.take()
        self.optimizer.step()
        if self._snapshot.finite():
            return True
        self._snapshot.restore()
        return False

    def _count_streak(self, keep: npt.NDArray[np.bool_]) -> None:
        if keep.all():
            self._streak = 0
            return
        learned = np.flatnonzero(keep)
        self._streak = keep.shape[0] - 1 - int(learned[-1]) if learned.size else self._streak + keep.shape[0]
        limit = self.config.max_consecutive_skips
        if limit is not None and self._streak >= limit and not self._rollback_needed:
            self._rollback_needed = True
            logger.warning(
                "%d records in a row were skipped by the training guards: rollback needed", self._streak
            )

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
        if self.target_scaler is not None:
            for key, value in self.target_scaler.state_dict().items():
                tensors[f"target_scaler.{key}"] = torch.from_numpy(value.copy())
        metadata: dict[str, object] = {
            "n_features": self.n_features,
            "learner": self.config.digest_fields(),
            "updates": self.updates,
            "optimizer_param_groups": optimizer_state["param_groups"],
            "optimizer_scalars": scalars,
            # The learning rate given and the scale divergences lowered it by: a restart keeps the scale.
            "lr_backoff": {"lr": self.config.lr, "scale": self._lr_scale},
        }
        return tensors, metadata

    def checkpoint_differences(self, metadata: Mapping[str, object]) -> dict[str, tuple[object, object]]:
        """What a checkpoint (``state``'s metadata) must agree on and does not: for each such field of
        ``config.digest_fields()`` and ``n_features``, (the checkpoint's value, this learner's)."""
        recorded = metadata.get("learner")
        theirs = {
            **(recorded if isinstance(recorded, dict) else {}),
            "n_features": metadata.get("n_features"),
        }
        ours = {**self.config.digest_fields(), "n_features": self.n_features}
        return {name: (theirs.get(name), value) for name, value in ours.items() if theirs.get(name) != value}

    def load_state(
        self,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, object],
        *,
        keep_lr_backoff: bool = True,
        model_only: bool = False,
    ) -> None:
        """Adopt a checkpoint's state (``state``'s tensors and metadata).

        The learning rate is ``config.lr``, times the checkpoint's backoff scale
        (``set_lr_scale``) if ``keep_lr_backoff`` and the checkpoint was made with
        the same ``lr``: a restart keeps a lowered step size, a new ``lr`` replaces it.

        ``model_only`` takes the model and the standardization statistics, not the optimizer's state
        (this learner's is kept: a new learner's starts fresh) nor the backoff scale: the checkpoint may
        then have been made with another optimizer. Raises :class:`TrainingError` naming each field in
        which the checkpoint differs from this learner's configuration.
        """
        differences = self.checkpoint_differences(metadata)
        if model_only:
            differences.pop("optimizer", None)
        if differences:
            raise TrainingError(
                "checkpoint was made for another learner: "
                + "; ".join(
                    f"{name}: {theirs} (checkpoint) vs {ours} (this run)"
                    for name, (theirs, ours) in differences.items()
                )
            )
        model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state)
        if model_only:
            self.set_lr_scale(1.0)
        else:
            self._load_optimizer(tensors, metadata, keep_lr_backoff=keep_lr_backoff)
        if self.scaler is not None:
            self.scaler.load_state_dict(
                {k.removeprefix("scaler."): v.numpy() for k, v in tensors.items() if k.startswith("scaler.")}
            )
        if self.target_scaler is not None:
            self.target_scaler.load_state_dict(
                {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith("target_scaler.")}
            )
        updates = metadata.get("updates", 0)
        self.updates = updates if isinstance(updates, int) else 0
        self._pending = None  # steps started before are forgotten: the state is the checkpoint's
        self.reset_guards()

    def load_initial_state(
        self, tensors: dict[str, torch.Tensor], metadata: dict[str, object], source: str
    ) -> None:
        """Start from another run's checkpoint (``--init-from``), named ``source`` in the log line.

        Its whole state when it was trained with this optimizer; otherwise only its model (and
        standardization statistics), the optimizer's state starting fresh, as a log line says. Any
        other difference is a :class:`TrainingError` naming the differing fields.
        """
        optimizer = self.checkpoint_differences(metadata).get("optimizer")
        self.load_state(tensors, metadata, model_only=optimizer is not None)
        if optimizer is not None:
            logger.info(
                "%s was trained with the %s optimizer, this run uses %s: its model is taken and the "
                "optimizer state starts fresh (lr %g)",
                source,
                optimizer[0],
                optimizer[1],
                self.lr,
            )

    def _load_optimizer(
        self, tensors: dict[str, torch.Tensor], metadata: dict[str, object], *, keep_lr_backoff: bool
    ) -> None:
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
        scale = _lr_backoff_scale(metadata, self.config.lr) if keep_lr_backoff else 1.0
        for group in groups:
            group["lr"] = self.config.lr * scale  # the learning rate it is given now (see above)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self._lr_scale = scale

    def valid_labels(self, labels: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
        """Which labels the task can train on (0/1 for binary, a class index for multiclass)."""
        task = self.config.task
        if task == "binary":
            return (labels == 0) | (labels == 1)
        if task == "multiclass":
            return (labels >= 0) & (labels < self.n_outputs) & (labels == np.floor(labels))
        return np.isfinite(labels)


class PendingSteps:
    """One ``learn_many`` call between :meth:`OnlineLearner.start_learn_many` and :meth:`finish`."""

    __slots__ = ("_learner", "batch_size", "call", "features", "labels", "stream", "units")

    def __init__(
        self,
        learner: OnlineLearner,
        *,
        features: npt.NDArray[np.float32],
        labels: npt.NDArray[np.float32],
        batch_size: int,
        stream: bool,
        call: paths.CompiledCall | None,
    ) -> None:
        self._learner = learner
        self.features, self.labels, self.batch_size = features, labels, batch_size
        self.stream, self.call = stream, call  # call: the compiled loop's first run (None: autograd)
        # The labels as given and the statistics each prediction is read with, when the learner
        # standardizes them (``labels`` are then the targets the model learns).
        self.units: _LabelUnits | None = None

    def compute(self) -> None:
        """The compiled loop over the whole batch: one call that releases the GIL (any one thread)."""
        if self.call is not None:
            self.call.run()

    def finish(self) -> StepResult:
        """Check the outcome and return the result (the caller's thread): ``learn_many``'s return value."""
        return self._learner._finish_steps(self)

    def abandon(self) -> None:
        """Give up on these steps (the learner's state is to be replaced): the learner is free again."""
        if self._learner._pending is self:
            self._learner._pending = None

    def run_here(self) -> None:
        """``compute`` on this thread; the learner is freed if it fails."""
        try:
            self.compute()
        except BaseException:
            self.abandon()
            raise


@dataclass(slots=True)
class _Outcome:
    """What the steps of one call write: per-record results, skip counts and the skipped records."""

    losses: npt.NDArray[np.float64]
    predictions: npt.NDArray[np.float64]
    nonfinite: int = 0
    spikes: int = 0
    # (position, reason, threshold) of each skipped record, in order (the steps run through the
    # call in order); None until one is: nothing to allocate on the common path.
    skips: list[tuple[int, str, float]] | None = None

    def skip(self, position: int, reason: str, threshold: float) -> None:
        if self.skips is None:
            self.skips = []
        self.skips.append((position, reason, threshold))


@dataclass(frozen=True, slots=True)
class _LabelUnits:
    """A call's labels as given, and the statistics its predictions are read back with."""

    labels: npt.NDArray[np.float32]
    prior_mean: npt.NDArray[np.float64]
    prior_std: npt.NDArray[np.float64]

    def to_label_units(
        self, predictions: npt.NDArray[np.float64], loss: str
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Losses and predictions in the label's units from the model's standardized predictions.

        Each prediction is read with the statistics from before its record; its loss
        is then measured against the label as given (NaN stays NaN: a skipped
        non-finite record).
        """
        values = self.prior_mean + self.prior_std * predictions
        errors = values - self.labels.astype(np.float64)
        losses = errors * errors if loss == "mse" else np.abs(errors)
        return losses, values


def _lr_backoff_scale(metadata: Mapping[str, object], lr: float) -> float:
    """The backoff scale a checkpoint records, if it was made with learning rate ``lr`` (else 1)."""
    backoff = metadata.get("lr_backoff")
    if not isinstance(backoff, dict):
        return 1.0
    base, scale = backoff.get("lr"), backoff.get("scale")
    if not isinstance(scale, (int, float)) or not (math.isfinite(scale) and 0 < scale <= 1):
        return 1.0
    if scale < 1 and base != lr:
        logger.info(
            "the checkpoint's learning rate %g was lowered to %g after divergence; using the given %g",
            base,
            float(base) * scale if isinstance(base, (int, float)) else math.nan,
            lr,
        )
        return 1.0
    return float(scale)


def _check_guards(config: LearnerConfig) -> None:
    if config.clip_grad_norm is not None and not config.clip_grad_norm > 0:
        raise TrainingError(f"clip_grad_norm must be > 0, got {config.clip_grad_norm}")
    if config.spike_factor is not None and not config.spike_factor > 1:
        raise TrainingError(f"spike_factor must be > 1, got {config.spike_factor}")
    if config.divergence_factor is not None and not config.divergence_factor > 1:
        raise TrainingError(f"divergence_factor must be > 1, got {config.divergence_factor}")
    if config.spike_span < 2 or config.spike_warmup < 0:
        raise TrainingError("spike_span must be >= 2 and spike_warmup >= 0")
    if config.max_consecutive_skips is not None and config.max_consecutive_skips < 1:
        raise TrainingError(f"max_consecutive_skips must be >= 1, got {config.max_consecutive_skips}")


def prepare_training(model: str, optimizer: str) -> None:
    """Start getting any learner of ``model`` and ``optimizer`` ready, in the background; returns at once.

    For a worker or a replay to call before it knows its features (while it joins its group or
    reads its range): torch's optimizer machinery is imported (1-2 s on first use), and for a
    built-in model its compiled loop compiled (or loaded from the cache). A learner made later
    compiles what is left of its own path (``OnlineLearner.prepare``).
    """
    kernels.prepare(model, optimizer)


def make_optimizer(name: str, parameters: object, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``parameters`` (see ``kernels.OPTIMIZER_IMPORT_LOCK`` for the lock)."""
    params = list(parameters)  # type: ignore[call-overload]
    kinds: dict[str, Any] = {kind: cls for cls, kind in optimizers.KINDS.items()}
    if name not in kinds:
        raise ModelSpecError(f"unknown optimizer {name!r} ({', '.join(catalog.OPTIMIZERS)})")
    with kernels.OPTIMIZER_IMPORT_LOCK:
        return kinds[name](params, lr=lr)  # type: ignore[no-any-return]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
