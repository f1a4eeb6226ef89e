"""Trained learners and their checkpoints, shared by the predictor, export and serve tests.

A checkpoint here is what the worker's durability code writes: the learner's ``state()`` plus the
progressive metrics' state (tensors under ``progressive.``, scalars under ``progressive``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.training import LearnerConfig, OnlineLearner, ProgressiveMetrics
from streamtrainer.training.checkpoint import Checkpoint, CheckpointStore

# (model, task, classes) of the parity tests: both compiled kinds (linear, mlp) and the three tasks.
CASES = {
    "linear": ("linear", "regression", None),
    "mlp": ("mlp", "regression", None),
    "logistic": ("logistic", "binary", None),
    "softmax": ("softmax", "multiclass", 3),
    "mlp-multiclass": ("mlp", "multiclass", 3),
}
N_FEATURES = 6


@dataclass
class Trained:
    """A learner trained online on a synthetic stream, with its progressive metrics and held-out rows."""

    learner: OnlineLearner
    measured: ProgressiveMetrics
    held_out: npt.NDArray[np.float32]


def rows(spec: SyntheticSpec, n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``n`` records of ``spec`` as feature rows and labels."""
    samples = list(generate(spec, n))
    features = np.stack([s.features for s in samples]).astype(np.float32)
    labels = np.array([s.label for s in samples], dtype=np.float32)
    return features, labels


def train(case: str, n: int = 600, *, seed: int = 1, noise: bool = False) -> Trained:
    """A learner of ``case`` trained on ``n`` records (test-then-train, measured as the worker does).

    ``noise``: the labels shuffled (nothing to learn: a model whose prequential figures are bad).
    """
    model, task, classes = CASES[case]
    spec = SyntheticSpec(
        task=task, n_features=N_FEATURES, n_classes=classes or 3, nonlinear=model == "mlp", seed=seed
    )
    features, labels = rows(spec, n + 200)
    # Labels far from 0 and features far from unit scale: the standardizers have work to do.
    features = features * 7.0 + 3.0
    if task == "regression":
        labels = labels * 40.0 + 100.0
    if noise:
        labels[:n] = np.random.default_rng(seed).permutation(labels[:n])
    config = LearnerConfig(model=model, task=task, n_classes=classes, hidden=16, fused=False)
    learner = OnlineLearner(config, N_FEATURES)
    measured = ProgressiveMetrics(task, classes, window=500)
    result = learner.learn_many(features[:n], labels[:n])
    keep = np.isfinite(result.losses)
    measured.update(result.losses[keep], result.predictions[keep], labels[:n][keep].astype(np.float64))
    return Trained(learner, measured, features[n:])


def save(trained: Trained, directory: Path, **metadata: object) -> Checkpoint:
    """Checkpoint ``trained`` into ``directory`` as the worker's durability does (lock held meanwhile)."""
    tensors, learner_metadata = trained.learner.state()
    arrays, scalars = trained.measured.state_dict()
    tensors.update({f"progressive.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    document: dict[str, object] = {
        **learner_metadata,
        "feature_names": None,
        "progressive": scalars,
        "records_applied": trained.measured.count,
        **metadata,
    }
    with CheckpointStore(directory, keep=50) as store:
        return store.save(tensors, document)
