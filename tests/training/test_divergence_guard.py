"""The learner's side of divergence: the divergence bound, judging refused records, the lowered lr.

Checked on the compiled path and on autograd: both refuse the same records for the same reasons.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamtrainer.training import kernels
from streamtrainer.training.learner import SKIP_NON_FINITE, SKIP_SPIKE, LearnerConfig, OnlineLearner

D = 16
PATHS = pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    kernels.warm_up((("linear", "sgd"),))


def _learner(fused: bool, **overrides: object) -> OnlineLearner:
    # Raw labels: a standardized label (the default) does not diverge at lr 0.1 (tests/training/
    # test_target_standardization.py); the guard is for what still does (a too large step, bad data).
    values = {
        "model": "linear",
        "optimizer": "sgd",
        "lr": 0.1,
        "fused": fused,
        "standardize_target": False,
        **overrides,
    }
    config = LearnerConfig(**values)  # type: ignore[arg-type]
    learner = OnlineLearner(config, D)
    if fused:
        assert kernels.wait_until_ready(learner.model, learner.optimizer, loss="mse", task="regression")
    return learner


def _stream(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw-scale features and labels around 43: at lr 0.1 the linear model diverges within ~300 records."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)) * rng.uniform(1, 30, D) + rng.uniform(0, 100, D)
    y = 43.0 + (x - x.mean(0)) / x.std(0) @ rng.normal(size=D)
    return x.astype(np.float32), y.astype(np.float32)


def _tame(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Features in [0, 1], labels around 43: stable at lr 0.01 without standardization."""
    x = np.array([[((i * 5 + k) % 7) / 7 for k in range(D)] for i in range(n)], dtype=np.float32)
    return x, (43.0 + x.sum(axis=1)).astype(np.float32)


@PATHS
def test_a_diverging_model_is_stopped_by_the_bound_and_the_records_pass_on_the_initial_model(
    fused: bool,
) -> None:
    x, y = _stream(1000)
    learner = _learner(fused)
    pending = learner.start_learn_many(x, y)
    pending.run_here()
    result = pending.finish()

    assert result.skipped.shape[0] > 0
    first = int(result.skipped[0])
    # Refused as exploding (finite, past the bound) before any loss overflowed.
    assert result.skipped_reasons[0] == SKIP_SPIKE and np.isfinite(result.losses[first])
    assert result.losses[first] > (1000 * 43.0) ** 2 * 0.9
    fails = learner.failing_on(learner.reference_model(None), pending, result.skips)
    assert not fails.any()  # every one is fine on the model a rollback goes back to


@PATHS
def test_records_bad_for_any_model_fail_on_the_reference_too(fused: bool) -> None:
    x, y = _tame(300)
    x[100, 0] = 1e30  # overflows: non-finite loss
    x[200, 1] = 1e15  # finite, but ~1e14 off: past the bound
    learner = _learner(fused, lr=0.01, standardize=False)
    pending = learner.start_learn_many(x, y)
    pending.run_here()
    result = pending.finish()
    assert result.skipped.tolist() == [100, 200]
    assert result.skipped_reasons == (SKIP_NON_FINITE, SKIP_SPIKE)
    reference = learner.reference_model(learner.state()[0])  # a checkpoint's model
    assert learner.failing_on(reference, pending, result.skips).tolist() == [True, True]


def test_the_lowered_learning_rate_is_kept_by_a_checkpoint_made_with_the_same_lr() -> None:
    learner = _learner(False)
    learner.set_lr_scale(0.25)
    assert learner.lr == pytest.approx(0.025)
    tensors, metadata = learner.state()
    same = _learner(False)
    same.load_state(tensors, metadata)
    assert same.lr == pytest.approx(0.025) and same.lr_scale == 0.25
    other = _learner(False, lr=0.03)
    other.load_state(tensors, metadata)
    assert other.lr == pytest.approx(0.03) and other.lr_scale == 1.0
    ignored = _learner(False)
    ignored.load_state(tensors, metadata, keep_lr_backoff=False)
    assert ignored.lr == pytest.approx(0.1)


def test_the_bound_can_be_turned_off() -> None:
    x, y = _tame(300)
    x[200, 1] = 1e15
    learner = _learner(False, lr=0.01, standardize=False, divergence_factor=None)
    result = learner.learn_many(x[:201], y[:201])
    assert result.skipped_spike == 0  # learned from, as before the bound existed


@PATHS
def test_absurd_records_are_their_own_fault_even_on_a_model_that_starts_at_zero(fused: bool) -> None:
    # A zero model predicts 0 for anything: a record of 1e30s has a finite loss there, and a zero one
    # if its label is 0. Its features, and its gradient, are a thousand times the call's others'.
    x, y = _tame(300)
    x[[40, 90, 200]] = 1e30
    y[[40, 90]] = 0.0
    y[200] = 7.0
    learner = _learner(fused, lr=0.01, standardize=False)
    pending = learner.start_learn_many(x, y)
    pending.run_here()
    result = pending.finish()
    assert result.skipped.tolist() == [40, 90, 200]
    reference = learner.reference_model(None)
    assert all(not p.any() for p in reference.parameters())
    assert learner.failing_on(reference, pending, result.skips).all()
