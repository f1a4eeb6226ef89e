"""The synthetic stream: determinism, random access, drift, label noise, learnability."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtrainer.producer.exceptions import ProducerError, SyntheticSpecError
from streamtrainer.producer.synthetic import (
    BLOCK_SIZE,
    TASKS,
    SyntheticSpec,
    generate,
    generate_arrays,
)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def _design(x: F32) -> F64:
    """Standardized features plus an intercept column."""
    x64 = x.astype(np.float64)
    design: F64 = np.c_[(x64 - x64.mean(0)) / x64.std(0), np.ones(len(x64))]
    return design


def _linear_accuracy(spec: SyntheticSpec, n_train: int = 8000, n_test: int = 4000) -> float:
    """Held-out accuracy of a least-squares linear classifier (one-vs-rest for multiclass)."""
    x, y = generate_arrays(spec, n_train + n_test)
    design = _design(x)
    classes = 2 if spec.task == "binary" else spec.n_classes
    targets = np.eye(classes)[y.astype(int)]
    weights = np.linalg.lstsq(design[:n_train], targets[:n_train], rcond=None)[0]
    predicted = (design[n_train:] @ weights).argmax(axis=1)
    return float((predicted == y[n_train:]).mean())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"task": "ranking"},
        {"drift": "sudden"},
        {"n_features": 0},
        {"n_classes": 1},
        {"noise": -0.1},
        {"noise": float("nan")},
        {"task": "binary", "noise": 1.5},
        {"seed": -1},
        {"drift_at": -1},
        {"drift_width": 0},
        {"n_keys": -2},
        {"task": "binary", "nonlinear": True, "n_features": 1},
        {"task": "multiclass", "nonlinear": True, "n_features": 1},
    ],
)
def test_invalid_spec_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(SyntheticSpecError) as caught:
        SyntheticSpec(**kwargs)  # type: ignore[arg-type]
    # Both kinds, so that callers catching either one report it.
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, ProducerError)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("nonlinear", [False, True])
def test_shapes_dtypes_and_label_ranges(task: str, nonlinear: bool) -> None:
    spec = SyntheticSpec(task=task, nonlinear=nonlinear, n_features=5, n_classes=4, seed=1)
    x, y = generate_arrays(spec, 3000)
    assert x.shape == (3000, 5)
    assert y.shape == (3000,)
    assert x.dtype == np.float32
    assert y.dtype == np.float32
    assert np.isfinite(x).all()
    assert np.isfinite(y).all()
    if task == "binary":
        assert set(np.unique(y)) == {0.0, 1.0}
        assert 0.2 < y.mean() < 0.8
    elif task == "multiclass":
        assert set(np.unique(y)) == {0.0, 1.0, 2.0, 3.0}
    else:
        assert y.std() > 0.3


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    spec = SyntheticSpec(task="binary", seed=7)
    x1, y1 = generate_arrays(spec, 500)
    x2, y2 = generate_arrays(SyntheticSpec(task="binary", seed=7), 500)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, _ = generate_arrays(SyntheticSpec(task="binary", seed=8), 500)
    assert not np.array_equal(x1, x3)


@pytest.mark.parametrize("task", TASKS)
def test_generate_equals_generate_arrays(task: str) -> None:
    spec = SyntheticSpec(task=task, drift="gradual", drift_at=3000, drift_width=2000, seed=2)
    count = 2 * BLOCK_SIZE + 37  # crosses block boundaries and ends mid-block
    samples = list(generate(spec, count))
    x, y = generate_arrays(spec, count)
    assert len(samples) == count
    np.testing.assert_array_equal(np.stack([s.features for s in samples]), x)
    np.testing.assert_array_equal(np.array([s.label for s in samples], dtype=np.float32), y)
    assert all(s.features.dtype == np.float32 and s.features.ndim == 1 for s in samples[:10])
    assert all(s.key is None and s.timestamp_ms is None for s in samples[:10])


@settings(max_examples=40, deadline=None)
@given(
    task=st.sampled_from(TASKS),
    start=st.integers(0, 3 * BLOCK_SIZE),
    count=st.integers(0, BLOCK_SIZE + 50),
)
def test_random_access_matches_the_stream(task: str, start: int, count: int) -> None:
    spec = SyntheticSpec(task=task, n_features=3, drift="abrupt", drift_at=5000, seed=4)
    x_all, y_all = generate_arrays(spec, 4 * BLOCK_SIZE + 100)
    x, y = generate_arrays(spec, count, start=start)
    np.testing.assert_array_equal(x, x_all[start : start + count])
    np.testing.assert_array_equal(y, y_all[start : start + count])


def test_generate_counts() -> None:
    spec = SyntheticSpec()
    assert list(generate(spec, 0)) == []
    infinite = generate(spec, None)
    assert len(list(itertools.islice(infinite, BLOCK_SIZE + 3))) == BLOCK_SIZE + 3
    with pytest.raises(ValueError):
        next(generate(spec, -1))
    with pytest.raises(ValueError):
        generate_arrays(spec, 5, start=-1)
    x, y = generate_arrays(spec, 0)
    assert x.shape == (0, spec.n_features)
    assert y.shape == (0,)


def test_keys_cycle_over_entities() -> None:
    keys = [s.key for s in generate(SyntheticSpec(n_keys=3), 7)]
    assert keys == [b"entity-0", b"entity-1", b"entity-2"] * 2 + [b"entity-0"]


def test_features_need_standardization() -> None:
    x, _ = generate_arrays(SyntheticSpec(n_features=16, seed=5), 5000)
    std = x.std(axis=0)
    assert std.max() / std.min() > 4
    assert np.abs(x.mean(axis=0)).max() > 1
    assert (std > 0.4).all()
    assert (std < 25).all()


@pytest.mark.parametrize("task", TASKS)
def test_abrupt_drift_switches_concept_exactly_at_drift_at(task: str) -> None:
    drift_at = 5000  # inside the second block
    base = {"task": task, "seed": 11, "noise": 0.0}
    x_old, y_old = generate_arrays(SyntheticSpec(**base), 10000)  # type: ignore[arg-type]
    x_new, y_new = generate_arrays(SyntheticSpec(**base, drift="abrupt"), 10000)  # type: ignore[arg-type]
    x, y = generate_arrays(
        SyntheticSpec(**base, drift="abrupt", drift_at=drift_at),  # type: ignore[arg-type]
        10000,
    )
    # Drift changes the labels, never the feature distribution (same draws).
    np.testing.assert_array_equal(x, x_old)
    np.testing.assert_array_equal(x, x_new)
    np.testing.assert_array_equal(y[:drift_at], y_old[:drift_at])
    np.testing.assert_array_equal(y[drift_at:], y_new[drift_at:])
    changed = float((y_old[drift_at:] != y_new[drift_at:]).mean())
    assert changed > 0.2


def test_abrupt_drift_changes_the_least_squares_fit() -> None:
    spec = SyntheticSpec(n_features=4, noise=0.05, drift="abrupt", drift_at=3000, seed=3)
    x, y = generate_arrays(spec, 6000)
    design = _design(x)
    before = np.linalg.lstsq(design[:3000], y[:3000], rcond=None)[0]
    after = np.linalg.lstsq(design[3000:], y[3000:], rcond=None)[0]
    # Each regime is linear on its own (near-perfect fit) ...
    for lo, hi, weights in ((0, 3000, before), (3000, 6000, after)):
        residual = y[lo:hi] - design[lo:hi] @ weights
        assert residual.std() < 0.1
    # ... but the pre-drift model is badly wrong after the drift.
    stale = y[3000:] - design[3000:] @ before
    assert stale.std() > 0.5


def test_gradual_drift_mixes_the_two_concepts() -> None:
    drift_at, width, n = 2000, 4000, 8000
    base = {"task": "regression", "seed": 6, "noise": 0.1}
    _, y_old = generate_arrays(SyntheticSpec(**base), n)  # type: ignore[arg-type]
    _, y_new = generate_arrays(SyntheticSpec(**base, drift="abrupt"), n)  # type: ignore[arg-type]
    spec = SyntheticSpec(**base, drift="gradual", drift_at=drift_at, drift_width=width)  # type: ignore[arg-type]
    _, y = generate_arrays(spec, n)
    is_old = y == y_old
    is_new = y == y_new
    assert (is_old | is_new).all()  # every record comes from one of the two concepts
    assert is_old[:drift_at].all()
    assert is_new[drift_at + width :].all()
    window = is_new[drift_at : drift_at + width] & ~is_old[drift_at : drift_at + width]
    first, second = window[: width // 2].mean(), window[width // 2 :].mean()
    assert 0.15 < first < 0.35  # expected 0.25: the probability rises linearly
    assert 0.65 < second < 0.85  # expected 0.75


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_classification_noise_flips_the_expected_fraction(task: str) -> None:
    _, clean = generate_arrays(SyntheticSpec(task=task, noise=0.0, n_classes=5), 20000)
    _, noisy = generate_arrays(SyntheticSpec(task=task, noise=0.2, n_classes=5), 20000)
    flipped = clean != noisy
    assert 0.18 < flipped.mean() < 0.22
    if task == "multiclass":
        assert set(np.unique(noisy[flipped])) == {0.0, 1.0, 2.0, 3.0, 4.0}


def test_regression_noise_is_gaussian_with_the_given_std() -> None:
    _, clean = generate_arrays(SyntheticSpec(noise=0.0), 20000)
    _, noisy = generate_arrays(SyntheticSpec(noise=0.5), 20000)
    difference = (noisy - clean).astype(np.float64)
    assert abs(difference.mean()) < 0.02
    assert 0.48 < difference.std() < 0.52


def test_linear_binary_task_is_learnable() -> None:
    accuracy = _linear_accuracy(SyntheticSpec(task="binary", noise=0.05, seed=9))
    assert accuracy > 0.9


def test_linear_multiclass_task_is_learnable() -> None:
    accuracy = _linear_accuracy(SyntheticSpec(task="multiclass", noise=0.0, seed=9))
    assert accuracy > 0.8


def test_linear_regression_task_is_learnable() -> None:
    x, y = generate_arrays(SyntheticSpec(noise=0.1, seed=9), 5000)
    design = _design(x)
    weights = np.linalg.lstsq(design, y, rcond=None)[0]
    r2 = 1 - ((design @ weights - y) ** 2).mean() / y.var()
    assert r2 > 0.95


@pytest.mark.parametrize("task", TASKS)
def test_nonlinear_tasks_defeat_a_linear_model(task: str) -> None:
    spec = SyntheticSpec(task=task, nonlinear=True, noise=0.0, seed=9)
    if task == "regression":
        x, y = generate_arrays(spec, 5000)
        design = _design(x)
        weights = np.linalg.lstsq(design, y, rcond=None)[0]
        r2 = 1 - ((design @ weights - y) ** 2).mean() / y.var()
        assert r2 < 0.3
    else:
        _, y = generate_arrays(spec, 12000)
        majority = np.bincount(y.astype(int)).max() / len(y)
        assert _linear_accuracy(spec) < majority + 0.15
