"""Regression labels learned standardized online; predictions and losses in the label's units (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamtrainer.settings import WorkerSettings
from streamtrainer.training import LearnerConfig, OnlineLearner, kernels
from streamtrainer.training.scaler import TargetStandardizer

D = 6


def _stream(n: int, scale: float = 1.0, offset: float = 43.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw-scale features (scales 1-30, offsets 0-100) and a label around ``offset``, linear in them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)) * rng.uniform(1, 30, D) + rng.uniform(0, 100, D)
    y = offset + scale * ((x - x.mean(0)) / x.std(0) @ rng.normal(size=D) + 0.1 * rng.normal(size=n))
    return x.astype(np.float32), y.astype(np.float32)


def test_each_record_is_predicted_with_the_statistics_before_it_and_learned_with_those_after() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(43.0, 2.0, 60)
    y[[5, 17]] = np.nan  # left out of the statistics
    whole = TargetStandardizer()
    targets, prior_mean, prior_std = whole.learn_transform(y)
    for i in range(60):
        before = y[:i][np.isfinite(y[:i])]
        assert prior_mean[i] == pytest.approx(before.mean() if before.size else 0.0)
        assert prior_std[i] == pytest.approx(np.sqrt(before.var() + 1e-8) if before.size else 1.0)
        if np.isfinite(y[i]):
            upto = y[: i + 1][np.isfinite(y[: i + 1])]
            assert targets[i] == pytest.approx((y[i] - upto.mean()) / np.sqrt(upto.var() + 1e-8), rel=1e-5)
        else:
            assert np.isnan(targets[i])
    # Batch boundaries change nothing.
    split = TargetStandardizer()
    parts = [split.learn_transform(y[start : start + 7]) for start in range(0, 60, 7)]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), targets, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), prior_mean)
    assert (split.count, split.mean, split.m2) == pytest.approx((whole.count, whole.mean, whole.m2))


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
def test_losses_and_predictions_are_in_the_labels_units(fused: bool) -> None:
    x, y = _stream(400)
    x = (x - x.mean(0)) / x.std(0)  # features as given (their own scaler reads a record before it learns)
    learner = OnlineLearner(LearnerConfig(model="linear", lr=0.05, fused=fused, standardize=False), D)
    if fused:
        assert kernels.wait_until_ready(learner.model, learner.optimizer, loss="mse", task="regression")
    twin = OnlineLearner(LearnerConfig(model="linear", lr=0.05, fused=False, standardize=False), D)
    predictions = []
    for i in range(50):  # record by record: the prediction the model made before each label
        assert twin.target_scaler is not None
        predictions.append(twin.predict_one(x[i]))
        twin.learn_one(x[i], float(y[i]))
    result = learner.learn_many(x[:50], y[:50])
    np.testing.assert_allclose(result.predictions, predictions, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.losses, (np.array(predictions) - y[:50]) ** 2, rtol=1e-3, atol=1e-3)
    assert result.predictions[0] == 0.0  # nothing known yet: the zero model, the prior mean 0
    assert result.predictions[1] == pytest.approx(y[0])  # one label seen: its value


def test_a_label_around_43_or_43000_is_learned_alike_and_does_not_diverge_at_a_large_step() -> None:
    # At lr 0.1 this stream diverged within ~300 records on raw labels (test_divergence_guard.py).
    errors = {}
    for scale, offset in ((1.0, 43.0), (1000.0, 43_000.0)):
        x, y = _stream(2000, scale=scale, offset=offset)
        learner = OnlineLearner(LearnerConfig(model="linear", lr=0.1, fused=False), D)
        result = learner.learn_many(x, y)
        assert result.skipped.shape[0] == 0 and np.isfinite(result.losses).all()
        errors[scale] = np.abs(result.predictions - y)[1:] / scale
    # Scale-free: the same relative errors, to float32 rounding.
    np.testing.assert_allclose(errors[1.0], errors[1000.0], rtol=1e-2, atol=1e-4)
    assert errors[1.0][-500:].mean() < 0.2  # learned: noise std is 0.1


def test_the_label_statistics_are_in_the_checkpoint() -> None:
    x, y = _stream(300)
    learner = OnlineLearner(LearnerConfig(model="linear"), D)
    learner.learn_many(x, y)
    tensors, metadata = learner.state()
    assert torch.is_tensor(tensors["target_scaler.stats"])
    restored = OnlineLearner(LearnerConfig(model="linear"), D)
    restored.load_state(tensors, metadata)
    assert restored.target_scaler is not None and learner.target_scaler is not None
    assert restored.target_scaler.count == 300
    np.testing.assert_allclose(restored.predict_many(x[:20]), learner.predict_many(x[:20]), rtol=1e-6)
    # Classification and the audit loss keep their labels as they are.
    assert OnlineLearner(LearnerConfig(model="logistic", task="binary"), D).target_scaler is None
    assert OnlineLearner(LearnerConfig(model="audit"), D).target_scaler is None


def test_linear_models_start_at_zero() -> None:
    for name, task, classes in (
        ("linear", "regression", None),
        ("logistic", "binary", None),
        ("softmax", "multiclass", 3),
    ):
        learner = OnlineLearner(LearnerConfig(model=name, task=task, n_classes=classes), D)
        assert all(not p.any() for p in learner.model.parameters())


def test_a_model_without_a_task_of_its_own_needs_one() -> None:
    with pytest.raises(ValueError, match="--model mlp needs --task"):
        WorkerSettings(topic="t", model="mlp")
    assert WorkerSettings(topic="t", model="mlp", task="binary").resolved_task == "binary"
    assert WorkerSettings(topic="t", model="logistic").resolved_task == "binary"


def test_the_learners_defaults_are_the_workers() -> None:
    settings, config = WorkerSettings(topic="t"), LearnerConfig()
    assert (config.optimizer, config.lr) == (settings.optimizer, settings.lr) == ("adagrad", 0.1)
    assert config.standardize_target == settings.standardize_target


def test_an_mlp_compacts_on_its_own_schedule_unless_told() -> None:
    mlp = WorkerSettings(topic="t", model="mlp", task="binary")
    assert (mlp.compaction_every_records, mlp.compaction_epochs, mlp.hidden) == (500, 10, 128)
    linear = WorkerSettings(topic="t", model="logistic")
    assert (linear.compaction_every_records, linear.compaction_epochs) == (2000, 3)
    told = WorkerSettings(
        topic="t", model="mlp", task="binary", compaction_every_records=None, compaction_epochs=3
    )
    assert (told.compaction_every_records, told.compaction_epochs) == (None, 3)
