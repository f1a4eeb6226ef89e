"""Training guards: non-finite records and steps, loss spikes, gradient clipping, the rollback signal.

Every behaviour is checked on the fused (compiled) path and on the autograd path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamtrainer.training import kernels
from streamtrainer.training.exceptions import TrainingError
from streamtrainer.training.learner import LearnerConfig, OnlineLearner, StepResult

D = 6
HIDDEN = 16
# (model, task, n_classes)
CASES = [
    ("linear", "regression", None),
    ("logistic", "binary", None),
    ("softmax", "multiclass", 3),
    ("mlp", "regression", None),
]
PATHS = pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    kernels.warm_up(tuple((kind, opt) for kind in ("linear", "mlp") for opt in ("sgd", "adam")))


def _data(task: str, n: int, seed: int = 0, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, D)) * 2 + 0.5).astype(np.float32)
    z = (x - 0.5) @ rng.normal(size=D)
    if task == "regression":
        return x, (z + noise * rng.normal(size=n)).astype(np.float32)
    if task == "binary":
        return x, (z > 0).astype(np.float32)
    return x, np.digitize(z, np.quantile(z, [1 / 3, 2 / 3])).astype(np.float32)


def _learner(fused: bool, case: tuple[str, str, int | None] = CASES[0], **overrides: object) -> OnlineLearner:
    name, task, n_classes = case
    values: dict[str, object] = {
        "model": name,
        "task": task,
        "n_classes": n_classes,
        "optimizer": "sgd",
        "lr": 0.01,
        "hidden": HIDDEN,
        "seed": 3,
        "fused": fused,
        # The guards' mechanics on raw-scale labels (standardized ones are bounded: see
        # tests/training/test_target_standardization.py).
        "standardize_target": False,
    }
    learner = OnlineLearner(LearnerConfig(**{**values, **overrides}), D)  # type: ignore[arg-type]
    if fused:
        loss, task = learner.config.resolved_loss, learner.config.task
        assert kernels.wait_until_ready(learner.model, learner.optimizer, loss=loss, task=task, timeout_s=300)
    return learner


def _learn(
    learner: OnlineLearner, x: np.ndarray, y: np.ndarray, chunk: int = 100, batch: int = 1
) -> StepResult:
    results = [
        learner.learn_many(x[i : i + chunk], y[i : i + chunk], batch_size=batch)
        for i in range(0, len(x), chunk)
    ]
    return StepResult(
        np.concatenate([r.losses for r in results]),
        np.concatenate([r.predictions for r in results]),
        sum(r.skipped_nonfinite for r in results),
        sum(r.skipped_spike for r in results),
        results[-1].rollback_needed,
    )


def _assert_all_finite(learner: OnlineLearner) -> None:
    tensors, _ = learner.state()
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name


def _assert_same_model(a: OnlineLearner, b: OnlineLearner, tol: float = 1e-5) -> None:
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def _check_path(fused: bool, fused_calls: list[int]) -> None:
    assert bool(fused_calls) == fused


# -- non-finite records and steps -----------------------------------------------------------


@pytest.mark.parametrize("standardize", [True, False], ids=["standardize", "raw"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case[0])
@PATHS
def test_nonfinite_features_are_skipped_and_the_rest_learns_as_without_them(
    fused: bool, case: tuple[str, str, int | None], standardize: bool, fused_calls: list[int]
) -> None:
    x, y = _data(case[1], 300)
    bad = [7, 120, 121, 250]
    x[7, 2] = np.nan
    x[120] = np.inf
    x[121, 0] = -np.inf
    x[250] = np.nan
    learner = _learner(fused, case, standardize=standardize)
    result = _learn(learner, x, y)
    clean = np.setdiff1d(np.arange(300), bad)
    reference = _learner(fused, case, standardize=standardize)  # the same path, without them
    expected = _learn(reference, x[clean], y[clean])

    _check_path(fused, fused_calls)
    assert result.skipped_nonfinite == 4 and result.skipped_spike == 0
    assert np.isnan(result.losses[bad]).all() and np.isnan(result.predictions[bad]).all()
    np.testing.assert_allclose(result.losses[clean], expected.losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.predictions[clean], expected.predictions, rtol=1e-5, atol=1e-5)
    assert learner.updates == reference.updates == 296
    _assert_same_model(learner, reference)
    _assert_all_finite(learner)
    if standardize:  # the running statistics never saw the bad rows
        assert learner.scaler is not None and reference.scaler is not None
        assert learner.scaler.count == reference.scaler.count == 296
        np.testing.assert_allclose(learner.scaler.mean, reference.scaler.mean, rtol=1e-9)
    assert not result.rollback_needed


@PATHS
def test_huge_values_giving_an_infinite_loss_are_skipped(fused: bool, fused_calls: list[int]) -> None:
    x, y = _data("regression", 200, seed=1)
    x[40, 3] = 1e30  # the output overflows float32's loss
    y[90] = 1e25  # so does the residual
    learner = _learner(fused, standardize=False)
    result = _learn(learner, x, y)
    clean = np.setdiff1d(np.arange(200), [40, 90])
    reference = _learner(fused, standardize=False)
    expected = _learn(reference, x[clean], y[clean])

    _check_path(fused, fused_calls)
    assert result.skipped_nonfinite == 2
    assert np.isnan(result.losses[[40, 90]]).all()
    np.testing.assert_allclose(result.losses[clean], expected.losses, rtol=1e-5, atol=1e-5)
    _assert_same_model(learner, reference)
    _assert_all_finite(learner)


@PATHS
def test_a_step_leaving_a_non_finite_optimizer_state_is_undone(fused: bool, fused_calls: list[int]) -> None:
    """Finite loss and gradient, but Adam's squared-gradient average overflows: the step is undone."""
    x, y = _data("regression", 200, seed=2)
    x[130] = 1e12  # loss ~1e24 and gradient ~1e24 are finite in float32; the gradient squared is not
    # (With the divergence bound on, that loss is refused before the step: off, the step is tried.)
    learner = _learner(fused, optimizer="adam", lr=0.005, standardize=False, divergence_factor=None)
    result = _learn(learner, x, y)
    clean = np.setdiff1d(np.arange(200), [130])
    reference = _learner(fused, optimizer="adam", lr=0.005, standardize=False, divergence_factor=None)
    expected = _learn(reference, x[clean], y[clean])

    _check_path(fused, fused_calls)
    assert result.skipped_nonfinite == 1
    assert np.isfinite(result.losses[130]) and result.losses[130] > 1e15  # a finite loss is reported
    np.testing.assert_allclose(result.losses[clean], expected.losses, rtol=1e-5, atol=1e-5)
    assert learner.updates == reference.updates == 199
    _assert_same_model(learner, reference)
    _assert_all_finite(learner)


@PATHS
def test_micro_batches_leave_the_bad_record_out_of_its_group(fused: bool, fused_calls: list[int]) -> None:
    x, y = _data("regression", 200, seed=3)
    x[45] = np.nan
    reference = _learner(False, standardize=False)
    expected = _learn(reference, x, y, batch=4)  # the autograd path defines the micro-batch semantics
    learner = _learner(fused, standardize=False)
    result = _learn(learner, x, y, batch=4)

    _check_path(fused, fused_calls)
    assert result.skipped_nonfinite == expected.skipped_nonfinite == 1
    assert learner.updates == reference.updates == 50  # the group of record 45 still learns from 3
    np.testing.assert_allclose(result.losses, expected.losses, rtol=1e-5, atol=1e-5)
    _assert_same_model(learner, reference)
    _assert_all_finite(learner)


# -- loss spikes ------------------------------------------------------------------------------

SPIKE = {"spike_factor": 10.0, "spike_warmup": 50, "spike_span": 100, "standardize": False}


@PATHS
def test_spike_guard_skips_an_outlier_and_counts_it(fused: bool, fused_calls: list[int]) -> None:
    x, y = _data("regression", 400, seed=4)
    outliers = [150, 301]
    y_bad = y.copy()
    y_bad[outliers] += 50.0  # a finite loss far above the running one
    learner = _learner(fused, **SPIKE)
    result = _learn(learner, x, y_bad)
    clean = np.setdiff1d(np.arange(400), outliers)
    reference = _learner(fused, **SPIKE)
    expected = _learn(reference, x[clean], y[clean])

    _check_path(fused, fused_calls)
    # The outliers are skipped, and the rest is judged exactly as without them.
    assert result.skipped_spike == expected.skipped_spike + 2
    assert result.skipped_nonfinite == 0
    assert (result.losses[outliers] > 100).all()  # their measured losses are reported
    np.testing.assert_allclose(result.losses[clean], expected.losses, rtol=1e-5, atol=1e-5)
    assert learner.updates == reference.updates
    _assert_same_model(learner, reference)


@pytest.mark.parametrize("batch", [1, 4])
def test_spike_guard_fused_equals_autograd(batch: int, fused_calls: list[int]) -> None:
    x, y = _data("regression", 400, seed=5)
    y[[60, 61, 200, 333]] += 40.0
    fused, plain = _learner(True, **SPIKE), _learner(False, **SPIKE)
    result, expected = _learn(fused, x, y, batch=batch), _learn(plain, x, y, batch=batch)
    assert fused_calls
    assert result.skipped_spike == expected.skipped_spike >= 4
    assert fused.updates == plain.updates
    np.testing.assert_allclose(result.losses, expected.losses, rtol=1e-5, atol=1e-5)
    _assert_same_model(fused, plain)


@PATHS
def test_no_spike_check_during_warm_up(fused: bool) -> None:
    x, y = _data("regression", 60, seed=6)
    y[20] += 100.0
    result = _learn(_learner(fused, **SPIKE), x, y)
    assert result.skipped_spike == 0


# -- gradient clipping ------------------------------------------------------------------------

CLIP = 0.5


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case[0])
@PATHS
def test_clipping_bounds_the_update_norm(
    fused: bool, case: tuple[str, str, int | None], batch: int, fused_calls: list[int]
) -> None:
    x, y = _data(case[1], 120, seed=7)
    if case[1] == "regression":
        y *= 10  # large residuals: clipping binds
    lr = 0.1
    learner = _learner(fused, case, lr=lr, clip_grad_norm=CLIP, standardize=False)
    reference = _learner(False, case, lr=lr, clip_grad_norm=CLIP, standardize=False)
    unclipped = _learner(False, case, lr=lr, standardize=False)
    largest = largest_unclipped = 0.0
    for i in range(0, 120, batch):
        before = torch.cat([p.detach().reshape(-1).clone() for p in learner.model.parameters()])
        learner.learn_many(x[i : i + batch], y[i : i + batch], batch_size=batch)
        after = torch.cat([p.detach().reshape(-1) for p in learner.model.parameters()])
        largest = max(largest, float((after - before).norm()))
        before = torch.cat([p.detach().reshape(-1).clone() for p in unclipped.model.parameters()])
        unclipped.learn_many(x[i : i + batch], y[i : i + batch], batch_size=batch)
        after = torch.cat([p.detach().reshape(-1) for p in unclipped.model.parameters()])
        largest_unclipped = max(largest_unclipped, float((after - before).norm()))
    _learn(reference, x, y, batch=batch)

    assert largest <= lr * CLIP * (1 + 1e-5)
    assert largest_unclipped > 2 * lr * CLIP  # it did bind
    _assert_same_model(learner, reference)
    # The fused loop runs linear models (checked afterwards); an mlp with clipping stays on autograd.
    _check_path(fused and case[0] != "mlp", fused_calls)


@pytest.mark.parametrize("case", CASES[:3], ids=lambda case: case[0])
def test_clipping_fused_batches_equal_autograd(
    case: tuple[str, str, int | None], fused_calls: list[int]
) -> None:
    x, y = _data(case[1], 600, seed=8)
    config = {"lr": 0.05, "clip_grad_norm": 3.0, "optimizer": "adam"}
    fused, plain = _learner(True, case, **config), _learner(False, case, **config)
    result, expected = _learn(fused, x, y, chunk=300), _learn(plain, x, y, chunk=300)
    assert fused_calls
    np.testing.assert_allclose(result.losses, expected.losses, rtol=1e-5, atol=1e-5)
    _assert_same_model(fused, plain)


# -- which records were skipped, and why ----------------------------------------------------


def _skips(
    learner: OnlineLearner, x: np.ndarray, y: np.ndarray, batch: int, chunk: int = 100
) -> tuple[list[tuple[int, str]], list[StepResult]]:
    """(position in the stream, reason) of every record the guards refused, and each call's result."""
    skipped: list[tuple[int, str]] = []
    results = []
    for i in range(0, len(x), chunk):
        result = learner.learn_many(x[i : i + chunk], y[i : i + chunk], batch_size=batch)
        assert result.skipped.dtype == np.intp and len(result.skipped_reasons) == len(result.skipped)
        assert len(result.skipped) == result.skipped_nonfinite + result.skipped_spike
        assert list(result.skipped) == sorted(set(result.skipped.tolist()))  # ascending, once each
        assert result.skipped_reasons.count("loss_spike") == result.skipped_spike
        skipped += [(i + int(p), r) for p, r in zip(result.skipped, result.skipped_reasons, strict=True)]
        results.append(result)
    return skipped, results


@pytest.mark.parametrize("batch", [1, 4], ids=["strict", "micro-batch"])
@PATHS
def test_step_result_lists_the_skipped_records_and_why(
    batch: int, fused: bool, fused_calls: list[int]
) -> None:
    x, y = _data("regression", 400, seed=11)
    x[40] = 1e30  # finite, but the loss overflows
    x[41, 0] = np.nan
    y[[150, 301]] += 50.0  # finite losses far above the running one
    learner = _learner(fused, **SPIKE)
    skipped, results = _skips(learner, x, y, batch)

    _check_path(fused, fused_calls)
    assert skipped == [
        (40, "non_finite_loss"),
        (41, "non_finite_loss"),
        (150, "loss_spike"),
        (301, "loss_spike"),
    ]
    losses = np.concatenate([r.losses for r in results])
    thresholds = np.concatenate([r.skipped_thresholds for r in results])
    assert np.isnan(losses[[40, 41]]).all() and np.isnan(thresholds[:2]).all()
    assert (losses[[150, 301]] > thresholds[2:]).all() and np.isfinite(thresholds[2:]).all()
    clean = [r for r in results if not r.skipped_nonfinite and not r.skipped_spike]
    assert clean and all(len(r.skipped) == 0 and r.skipped_reasons == () for r in clean)
    if batch == 1:
        # Exactly those were left out: the model is the one trained, unguarded, on all the others.
        rest = np.setdiff1d(np.arange(400), [40, 41, 150, 301])
        reference = _learner(fused, standardize=False)
        _learn(reference, x[rest], y[rest])
        assert learner.updates == reference.updates == 396
        _assert_same_model(learner, reference)


@pytest.mark.parametrize("batch", [1, 4], ids=["strict", "micro-batch"])
@PATHS
def test_a_step_undone_lists_every_record_of_its_group(
    batch: int, fused: bool, fused_calls: list[int]
) -> None:
    """A finite loss whose step overflows Adam's state: the whole group is refused, and listed."""
    x, y = _data("regression", 200, seed=2)
    x[130] = 1e12
    learner = _learner(fused, optimizer="adam", lr=0.005, standardize=False, divergence_factor=None)
    skipped, results = _skips(learner, x, y, batch)

    _check_path(fused, fused_calls)
    group = [130] if batch == 1 else [128, 129, 130, 131]
    assert skipped == [(p, "non_finite_loss") for p in group]
    assert sum(r.skipped_nonfinite for r in results) == len(group)
    losses = np.concatenate([r.losses for r in results])
    assert np.isfinite(losses[group]).all()  # measured, but not learned from
    assert learner.updates == 200 // batch - 1
    _assert_all_finite(learner)


# -- the rollback signal ----------------------------------------------------------------------


@PATHS
def test_consecutive_skips_trip_the_rollback_signal(fused: bool) -> None:
    x, y = _data("regression", 30, seed=9)
    learner = _learner(fused, max_consecutive_skips=5)
    checkpoint = learner.state()
    x[0:4] = np.nan  # four in a row, then a good record: the streak starts over
    x[5:9] = np.nan
    first = learner.learn_many(x[:10], y[:10])
    assert first.skipped_nonfinite == 8 and not first.rollback_needed and not learner.rollback_needed
    x[10:15] = np.nan  # with record 9 (good) before them: five in a row
    second = learner.learn_many(x[10:20], y[10:20])
    assert second.rollback_needed and learner.rollback_needed
    assert learner.learn_many(x[20:], y[20:]).rollback_needed  # it stays set until a reload
    _assert_all_finite(learner)

    tensors, metadata = checkpoint
    learner.load_state(tensors, json.loads(json.dumps(metadata)))
    assert not learner.rollback_needed
    assert not learner.learn_many(x[20:], y[20:]).rollback_needed


@PATHS
def test_a_run_of_spikes_trips_the_rollback_signal(fused: bool) -> None:
    x, y = _data("regression", 300, seed=10)
    y[200:] *= 1000  # the stream (or the model) went wrong: every loss is a spike
    learner = _learner(fused, max_consecutive_skips=50, **SPIKE)
    result = _learn(learner, x, y)
    assert result.skipped_spike >= 50 and result.rollback_needed
    learner.reset_guards()
    assert not learner.rollback_needed
    assert learner.learn_many(x[:0], y[:0]).rollback_needed is False


# -- configuration ----------------------------------------------------------------------------


def test_guard_settings_stay_out_of_the_checkpoint_digest() -> None:
    plain = _learner(False)
    guarded = _learner(
        False, clip_grad_norm=1.0, spike_factor=10.0, spike_span=50, spike_warmup=10, max_consecutive_skips=3
    )
    assert plain.config.digest_fields() == guarded.config.digest_fields()
    tensors, metadata = plain.state()
    guarded.load_state(tensors, json.loads(json.dumps(metadata)))


@pytest.mark.parametrize(
    "overrides",
    [
        {"clip_grad_norm": 0.0},
        {"spike_factor": 1.0},
        {"spike_span": 1},
        {"spike_warmup": -1},
        {"max_consecutive_skips": 0},
    ],
)
def test_invalid_guard_settings(overrides: dict[str, object]) -> None:
    with pytest.raises(TrainingError):
        OnlineLearner(LearnerConfig(**overrides), D)  # type: ignore[arg-type]
