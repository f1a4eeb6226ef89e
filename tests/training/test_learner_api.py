"""OnlineLearner's public API (issue 19): from_module, the _one/_many methods, class probabilities."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import nn

from streamtrainer.training import LearnerConfig, OnlineLearner
from streamtrainer.training.exceptions import ModelSpecError, TrainingError


def _stream(n: int, task: str, seed: int = 0) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32) * np.array([1.0, 10.0, 0.1, 3.0], dtype=np.float32)
    score = x @ np.array([1.0, 0.1, 10.0, -0.3], dtype=np.float32)
    if task == "regression":
        return x, (40.0 + 2.0 * score).astype(np.float32)
    if task == "binary":
        return x, (score > 0).astype(np.float32)
    return x, np.digitize(score, [-1.0, 0.0, 1.0]).astype(np.float32)


def _zero_linear(n_outputs: int) -> nn.Linear:
    module = nn.Linear(4, n_outputs)
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


@pytest.mark.parametrize(
    ("builtin", "task", "n_outputs"),
    [("linear", "regression", 1), ("logistic", "binary", 1), ("softmax", "multiclass", 4)],
)
def test_from_module_learns_exactly_as_the_built_in_model_of_the_same_layers(
    builtin: str, task: str, n_outputs: int
) -> None:
    """A zero nn.Linear given as an instance is the built-in linear model: same losses, predictions,
    parameters after 800 records, and the module passed is the one trained (in place)."""
    x, y = _stream(800, task)
    module = _zero_linear(n_outputs)
    given = OnlineLearner.from_module(module, task=task, fused=False)
    reference = OnlineLearner(
        LearnerConfig(model=builtin, task=task, n_classes=4 if task == "multiclass" else None, fused=False),
        n_features=4,
    )
    assert given.n_features == 4 and given.n_outputs == n_outputs  # inferred from the module
    ours, theirs = given.learn_many(x, y), reference.learn_many(x, y)
    np.testing.assert_allclose(ours.losses, theirs.losses, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(ours.predictions, theirs.predictions)
    assert given.model is module
    np.testing.assert_allclose(
        module.weight.detach().numpy(), reference.model.weight.detach().numpy(), rtol=1e-6, atol=1e-9
    )
    assert float(module.weight.detach().abs().sum()) > 0.1  # it learned
    np.testing.assert_allclose(given.predict_many(x[:50]), reference.predict_many(x[:50]), rtol=1e-6)


def test_learn_one_and_predict_one_take_arrays_sequences_and_mappings() -> None:
    """learn_one over rows given as arrays, lists and dicts learns exactly what learn_many learns."""
    x, y = _stream(300, "regression", seed=1)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    twin_module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    twin_module.load_state_dict(module.state_dict())
    learner = OnlineLearner.from_module(module, task="regression", fused=False)
    twin = OnlineLearner.from_module(twin_module, task="regression", fused=False)
    expected = twin.learn_many(x, y).losses
    names = ["a", "b", "c", "d"]
    losses = []
    for i in range(x.shape[0]):
        row = (
            x[i]
            if i % 3 == 0
            else (x[i].tolist() if i % 3 == 1 else dict(zip(names, x[i].tolist(), strict=True)))
        )
        prediction = learner.predict_one(row)
        assert prediction == pytest.approx(float(learner.predict_many(x[i : i + 1])[0]), rel=1e-12)
        losses.append(learner.learn_one(row, float(y[i])))
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-7)
    assert learner.feature_names == names
    assert np.mean(losses[-50:]) < 0.05 * np.mean(losses[:50])  # it learned, in the label's units
    # A mapping is read by name, whatever its order; a missing name is said.
    reordered = {name: float(x[0][i]) for i, name in reversed(list(enumerate(names)))}
    assert learner.predict_one(reordered) == pytest.approx(learner.predict_one(x[0]))
    with pytest.raises(TrainingError, match="missing from the record: c"):
        learner.predict_one({"a": 1.0, "b": 2.0, "d": 3.0})
    with pytest.raises(TrainingError, match="expected 4 features, got 3"):
        learner.learn_one([1.0, 2.0, 3.0], 1.0)


@pytest.mark.parametrize(("task", "n_outputs"), [("binary", 1), ("multiclass", 4)])
def test_class_probabilities_sum_to_one_and_their_argmax_is_the_prediction(task: str, n_outputs: int) -> None:
    x, y = _stream(1500, task, seed=2)
    torch.manual_seed(0)
    learner = OnlineLearner.from_module(
        nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, n_outputs)), task=task
    )
    learner.learn_many(x[:1000], y[:1000])
    probabilities = learner.predict_proba_many(x[1000:])
    assert probabilities.shape == (500, 2 if task == "binary" else 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), learner.predict_many(x[1000:]))
    accuracy = float((probabilities.argmax(axis=1) == y[1000:]).mean())
    assert accuracy > 0.8, accuracy  # held out: the probabilities mean something
    # One row alone and the same row in a batch go through different float32 kernels (seen on CI:
    # 9.5e-7 relative apart): equal to float32 rounding, not to the bit.
    np.testing.assert_allclose(learner.predict_proba_one(x[1000]), probabilities[0], rtol=1e-5, atol=1e-9)


def test_a_regression_has_no_class_probabilities() -> None:
    learner = OnlineLearner.from_module(nn.Linear(4, 1), task="regression")
    with pytest.raises(TrainingError, match="regression learner predicts values"):
        learner.predict_proba_many(np.zeros((1, 4), dtype=np.float32))


def test_a_module_that_does_not_fit_the_task_is_refused_before_learning() -> None:
    with pytest.raises(ModelSpecError, match=r"maps \(2, 4\) to \(2, 3\); a binary model must give \(2, 1\)"):
        OnlineLearner.from_module(nn.Linear(4, 3), task="binary")
    with pytest.raises(ModelSpecError, match="failed on a batch of shape"):
        OnlineLearner.from_module(nn.Linear(4, 1), task="regression", n_features=5)
    with pytest.raises(ModelSpecError, match="pass n_features="):
        OnlineLearner.from_module(nn.Sequential(nn.Tanh(), nn.Bilinear(2, 2, 1)), task="regression")
    with pytest.raises(ModelSpecError, match="has no parameters"):
        OnlineLearner.from_module(nn.Identity(), task="regression", n_features=1)


def test_a_rollback_without_a_checkpoint_goes_back_to_the_module_as_given() -> None:
    """reference_model(None), what a rollback with no checkpoint restarts from, is the module's
    starting state, not a rebuild of some named model; a checkpoint's tensors load into a copy."""
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    start = {k: v.clone() for k, v in module.state_dict().items()}
    learner = OnlineLearner.from_module(module, task="regression")
    x, y = _stream(200, "regression", seed=4)
    learner.learn_many(x, y)
    initial = learner.reference_model(None)
    assert initial is not learner.model
    for name, value in initial.state_dict().items():
        torch.testing.assert_close(value, start[name])
    tensors, _ = learner.state()
    restored = learner.reference_model(tensors)
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, module.state_dict()[name])
    assert not torch.equal(module.state_dict()["0.weight"], start["0.weight"])  # it did learn


def test_a_checkpoint_of_a_module_learner_restores_into_a_new_one() -> None:
    x, y = _stream(400, "binary", seed=5)
    torch.manual_seed(1)
    first = OnlineLearner.from_module(
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), task="binary"
    )
    first.learn_many(x[:300], y[:300])
    tensors, metadata = first.state()
    second = OnlineLearner.from_module(
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), task="binary"
    )
    second.load_state(tensors, metadata)
    np.testing.assert_allclose(
        second.predict_proba_many(x[300:]), first.predict_proba_many(x[300:]), rtol=1e-6
    )
    np.testing.assert_allclose(
        second.learn_many(x[300:], y[300:]).losses, first.learn_many(x[300:], y[300:]).losses, rtol=1e-5
    )
