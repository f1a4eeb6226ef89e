"""Pure training logic: no broker involved."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F  # noqa: N812

from streamtrainer.training import LearnerConfig, OnlineLearner, ProgressiveMetrics
from streamtrainer.training.exceptions import ModelSpecError
from streamtrainer.training.models import build_model
from streamtrainer.training.scaler import RunningStandardizer

MODEL_TASKS = [
    ("linear", "regression", None),
    ("logistic", "binary", None),
    ("softmax", "multiclass", 3),
    ("mlp", "regression", None),
    ("mlp", "binary", None),
    ("tests.custom_model:make_model", "regression", None),
]


def _data(task: str, n: int, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) * 3 + 1).astype(np.float32)
    w = rng.normal(size=d)
    z = (x - 1) @ w
    if task == "regression":
        return x, (z + 0.01 * rng.normal(size=n)).astype(np.float32)
    if task == "binary":
        return x, (z > 0).astype(np.float32)
    return x, np.digitize(z, np.quantile(z, [1 / 3, 2 / 3])).astype(np.float32)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 50), st.integers(1, 6), st.integers(0, 3))
def test_scaler_batch_equals_record_by_record(n: int, d: int, seed: int) -> None:
    x = (np.random.default_rng(seed).normal(size=(n, d)) * 10 + 5).astype(np.float32)
    batch = RunningStandardizer(d)
    single = RunningStandardizer(d)
    out_batch = np.concatenate([batch.learn_transform(x[: n // 2]), batch.learn_transform(x[n // 2 :])])
    out_single = np.concatenate([single.learn_transform(x[i : i + 1]) for i in range(n)])
    np.testing.assert_allclose(out_batch, out_single, rtol=1e-5, atol=1e-5)
    # The statistics are those of every row seen, and each row was scaled before later rows counted.
    np.testing.assert_allclose(batch.mean, x.astype(np.float64).mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(batch.m2 / n, x.astype(np.float64).var(axis=0), rtol=1e-7, atol=1e-7)
    expected_last = (x[-1] - x.mean(axis=0)) / np.sqrt(x.astype(np.float64).var(axis=0) + 1e-8)
    np.testing.assert_allclose(out_batch[-1], expected_last, rtol=1e-4, atol=1e-4)


def test_scaler_state_round_trip() -> None:
    scaler = RunningStandardizer(3)
    scaler.learn_transform(np.arange(12, dtype=np.float32).reshape(4, 3))
    copy = RunningStandardizer(3)
    copy.load_state_dict(scaler.state_dict())
    row = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(copy.transform(row), scaler.transform(row))


@pytest.mark.parametrize(("model", "task", "n_classes"), MODEL_TASKS)
def test_strict_learn_many_equals_learn_one_loop(model: str, task: str, n_classes: int | None) -> None:
    x, y = _data(task, 40)
    # One path for both (the compiled loop may become ready mid-test; its equivalence to autograd
    # is tests/test_kernels.py's business).
    config = LearnerConfig(
        model=model, task=task, n_classes=n_classes, lr=0.05, optimizer="adam", fused=False
    )
    many, one = OnlineLearner(config, 4), OnlineLearner(config, 4)
    result = many.learn_many(x, y)
    losses = [one.learn_one(x[i], float(y[i])) for i in range(len(y))]
    np.testing.assert_allclose(result.losses, losses, rtol=1e-6, atol=1e-7)
    for a, b in zip(many.model.parameters(), one.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert many.updates == one.updates == 40


@pytest.mark.parametrize(("model", "task", "n_classes"), MODEL_TASKS)
def test_loss_is_measured_before_the_update(model: str, task: str, n_classes: int | None) -> None:
    x, y = _data(task, 5)
    config = LearnerConfig(
        model=model, task=task, n_classes=n_classes, standardize=False, standardize_target=False
    )
    learner = OnlineLearner(config, 4)
    for i in range(5):
        with torch.no_grad():
            out = learner.model(torch.from_numpy(x[i : i + 1]))
            target = torch.from_numpy(y[i : i + 1])
            if task == "multiclass":
                expected = F.cross_entropy(out, target.long()).item()
            elif task == "binary":
                expected = F.binary_cross_entropy_with_logits(out.reshape(-1), target).item()
            else:
                expected = F.mse_loss(out.reshape(-1), target).item()
        assert learner.learn_one(x[i], float(y[i])) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adagrad"])
@pytest.mark.parametrize(("model", "task", "n_classes"), MODEL_TASKS[:4])
def test_prequential_loss_falls_on_a_learnable_task(
    model: str, task: str, n_classes: int | None, optimizer: str
) -> None:
    x, y = _data(task, 3000)
    lr = {"sgd": 0.02, "adam": 0.01, "adagrad": 0.1}[optimizer]
    learner = OnlineLearner(
        LearnerConfig(model=model, task=task, n_classes=n_classes, optimizer=optimizer, lr=lr), 4
    )
    metrics = ProgressiveMetrics(task, n_classes, window=300)
    for start in range(0, 3000, 500):
        result = learner.learn_many(x[start : start + 500], y[start : start + 500])
        metrics.update(result.losses, result.predictions, y[start : start + 500].astype(np.float64))
    assert metrics.count == 3000
    assert metrics.window_loss < 0.5 * metrics.first_window_loss
    if task != "regression":
        assert metrics.window_values()["accuracy"] > 0.85


def test_micro_batch_mode_takes_one_step_per_batch() -> None:
    x, y = _data("regression", 100)
    learner = OnlineLearner(LearnerConfig(model="linear"), 4)
    learner.learn_many(x, y, batch_size=32)
    assert learner.updates == 4


def test_l1_loss_and_invalid_combinations() -> None:
    x, y = _data("regression", 10)
    learner = OnlineLearner(LearnerConfig(model="linear", loss="l1"), 4)
    assert learner.learn_many(x, y).losses.shape == (10,)
    with pytest.raises(ModelSpecError, match="does not fit"):
        OnlineLearner(LearnerConfig(model="linear", task="regression", loss="ce"), 4)
    with pytest.raises(ModelSpecError, match="n_classes"):
        OnlineLearner(LearnerConfig(model="softmax", task="multiclass"), 4)
    with pytest.raises(ModelSpecError, match="cannot import"):
        build_model("no_such_module:factory", n_features=2, n_outputs=1)
    with pytest.raises(ModelSpecError, match="no callable"):
        build_model("tests.custom_model:missing", n_features=2, n_outputs=1)


def test_valid_labels_by_task() -> None:
    labels = np.array([0, 1, 2, 0.5, -1], dtype=np.float32)
    assert OnlineLearner(LearnerConfig(model="logistic", task="binary"), 2).valid_labels(labels).tolist() == [
        True,
        True,
        False,
        False,
        False,
    ]
    softmax = OnlineLearner(LearnerConfig(model="softmax", task="multiclass", n_classes=3), 2)
    assert softmax.valid_labels(labels).tolist() == [True, True, True, False, False]


def test_same_seed_same_initial_model() -> None:
    a = build_model("mlp", n_features=3, n_outputs=1, seed=5)
    b = build_model("mlp", n_features=3, n_outputs=1, seed=5)
    c = build_model("mlp", n_features=3, n_outputs=1, seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
