"""The fused per-record loop against the autograd loop it replaces: same parameters, same state."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from streamtrainer.training import fused_loops, kernels
from streamtrainer.training.exceptions import TrainingError
from streamtrainer.training.kernels import FusedUnsupportedError, fused_learn, fused_supported
from streamtrainer.training.learner import LearnerConfig, OnlineLearner, StepResult, make_optimizer
from streamtrainer.training.models import build_model
from streamtrainer.training.scaler import RunningStandardizer
from tests.training import reference

# (model, task, loss, n_outputs)
MODELS = [
    ("linear", "regression", "mse", 1),
    ("linear", "regression", "l1", 1),
    ("logistic", "binary", "bce", 1),
    ("softmax", "multiclass", "ce", 3),
    ("mlp", "regression", "mse", 1),
    ("mlp", "binary", "bce", 1),
    ("mlp", "multiclass", "ce", 3),
]
OPTIMIZERS = ["sgd", "adam", "adagrad"]
# Moderate rates: with large steps the float32 rounding differences between two correct
# implementations grow chaotically, which would test the data, not the kernel.
LR = {"sgd": 0.01, "adam": 0.005, "adagrad": 0.05}
D = 6
HIDDEN = 16
VARIANTS = tuple((kind, optimizer) for kind in ("linear", "mlp") for optimizer in OPTIMIZERS)


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    kernels.warm_up(VARIANTS)  # compile (or load) once, outside the timed tests


def _data(task: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return reference.stream(task, n, D, seed)


_autograd = reference.autograd_loop


def _pair(
    name: str, n_outputs: int, optimizer: str
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, torch.optim.Optimizer]:
    model = build_model(name, n_features=D, n_outputs=n_outputs, hidden=HIDDEN, seed=3)
    # Built-in linear models start at zero, where Adam's first steps normalize gradients that are
    # exactly zero in one implementation and ~1e-9 in the other (rounding): from a random start,
    # as a user's model or a trained one, the comparison tests the step, not the rounding of zero.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    twin = copy.deepcopy(model)
    return (
        model,
        make_optimizer(optimizer, model.parameters(), LR[optimizer]),
        twin,
        make_optimizer(optimizer, twin.parameters(), LR[optimizer]),
    )


_assert_same_state = reference.assert_same_state


# 1: strict. Below BLAS_MIN_ROWS a group's rows go through the row-by-row pass; from it on,
# a hidden layer's group goes through matrix products (8, 32: with partial last groups of 5
# and 13 rows, which take them too).
BATCHES = [1, fused_loops.BLAS_MIN_ROWS - 1, 8, 32]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("case", MODELS, ids=lambda case: "-".join(map(str, case)))
def test_fused_equals_autograd(case: tuple[str, str, str, int], optimizer: str, batch: int) -> None:
    name, task, loss, n_outputs = case
    n = 200 if batch == 1 else 205  # 205: the last micro-batch is a partial one
    x, y = _data(task, n)
    model, opt, twin, twin_opt = _pair(name, n_outputs, optimizer)
    assert fused_supported(twin, twin_opt, loss=loss, task=task)

    expected_losses, expected_predictions = _autograd(model, opt, loss, x, y, batch=batch)
    losses, predictions = fused_learn(twin, twin_opt, x, y, loss=loss, task=task, batch_size=batch)

    _assert_same_state(model, opt, twin, twin_opt)
    # Losses and predictions are those of the model before each record's (group's) step.
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predictions, expected_predictions, rtol=1e-5, atol=1e-5)


def test_micro_batches_of_a_hidden_layer_take_the_grouped_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # The parity tests above cover the matrix-product pass only if fused_learn takes it.
    used: list[tuple[int, bool, bool]] = []
    real = kernels._train_loop

    def spy(variant: tuple[int, bool, bool]) -> Any:
        used.append(variant)
        return real(variant)

    monkeypatch.setattr(kernels, "_train_loop", spy)
    x, y = _data("regression", 40)
    for name in ("mlp", "linear"):
        model, opt, _, _ = _pair(name, 1, "sgd")
        for batch in (1, fused_loops.BLAS_MIN_ROWS - 1, fused_loops.BLAS_MIN_ROWS, 32):
            fused_learn(model, opt, x, y, loss="mse", task="regression", batch_size=batch)
    grouped = [variant[2] for variant in used]
    assert grouped == [False, False, True, True] + [False] * 4


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_state_continuity_fused_then_autograd(name: str, optimizer: str) -> None:
    """Fused N records, then autograd M == autograd N + M: the optimizer state carries over."""
    x, y = _data("regression", 150, seed=1)
    model, opt, twin, twin_opt = _pair(name, 1, optimizer)
    _autograd(model, opt, "mse", x, y, batch=1)
    fused_learn(twin, twin_opt, x[:100], y[:100], loss="mse", task="regression")
    _autograd(twin, twin_opt, "mse", x[100:], y[100:], batch=1)
    _assert_same_state(model, opt, twin, twin_opt)
    if optimizer != "sgd":
        assert all(float(s["step"]) == 150.0 for s in twin_opt.state.values())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_state_continuity_autograd_then_fused_and_checkpoint(optimizer: str) -> None:
    """Autograd first, fused after; a state_dict round trip in between changes nothing."""
    x, y = _data("binary", 120, seed=2)
    model, opt, twin, twin_opt = _pair("mlp", 1, optimizer)
    _autograd(model, opt, "bce", x, y, batch=4)
    _autograd(twin, twin_opt, "bce", x[:40], y[:40], batch=4)
    # What a checkpoint does: save both state dicts, load them into fresh objects.
    restored = build_model("mlp", n_features=D, n_outputs=1, hidden=HIDDEN, seed=99)
    restored.load_state_dict(twin.state_dict())
    restored_opt = make_optimizer(optimizer, restored.parameters(), LR[optimizer])
    restored_opt.load_state_dict(twin_opt.state_dict())
    fused_learn(restored, restored_opt, x[40:], y[40:], loss="bce", task="binary", batch_size=4)
    _assert_same_state(model, opt, restored, restored_opt)


def test_fresh_adam_state_is_created_as_torch_creates_it() -> None:
    model, opt, twin, twin_opt = _pair("linear", 1, "adam")
    x, y = _data("regression", 1)
    _autograd(model, opt, "mse", x, y, batch=1)
    fused_learn(twin, twin_opt, x, y, loss="mse", task="regression")
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        a, b = opt.state[p], twin_opt.state[q]
        assert list(a) == list(b) == ["step", "exp_avg", "exp_avg_sq"]
        assert b["step"].dtype == a["step"].dtype == torch.float32 and b["step"].dim() == 0


def test_parameters_are_updated_in_place() -> None:
    model = build_model("mlp", n_features=D, n_outputs=1, hidden=HIDDEN)
    opt = make_optimizer("sgd", model.parameters(), 0.1)
    pointers = [p.data_ptr() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data("regression", 10)
    fused_learn(model, opt, x, y, loss="mse", task="regression")
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_inputs_of_any_layout_and_empty_batches() -> None:
    model, opt, twin, twin_opt = _pair("linear", 1, "adam")
    x, y = _data("regression", 30)
    # Read-only rows straight from a buffer (as a binary decode gives them), and float64 labels.
    frozen = np.frombuffer(x.tobytes(), dtype=np.float32).reshape(x.shape)
    fused_learn(model, opt, frozen, y.astype(np.float64), loss="mse", task="regression")
    fused_learn(twin, twin_opt, np.asfortranarray(x), y, loss="mse", task="regression")
    _assert_same_state(model, opt, twin, twin_opt)
    losses, predictions = fused_learn(
        twin, twin_opt, np.empty((0, D), np.float32), np.empty(0, np.float32), loss="mse", task="regression"
    )
    assert losses.shape == predictions.shape == (0,)
    _assert_same_state(model, opt, twin, twin_opt)


def test_learning_rate_changes_between_calls_are_honoured() -> None:
    model, opt, twin, twin_opt = _pair("linear", 1, "sgd")
    x, y = _data("regression", 40)
    _autograd(model, opt, "mse", x[:20], y[:20], batch=1)
    fused_learn(twin, twin_opt, x[:20], y[:20], loss="mse", task="regression")
    for group in (*opt.param_groups, *twin_opt.param_groups):
        group["lr"] = 0.002  # what a scheduler or a restart with another --lr does
    _autograd(model, opt, "mse", x[20:], y[20:], batch=1)
    fused_learn(twin, twin_opt, x[20:], y[20:], loss="mse", task="regression")
    _assert_same_state(model, opt, twin, twin_opt)


def _hooked_model() -> nn.Module:
    model = nn.Linear(D, 1)
    model.register_forward_hook(lambda module, args, out: out)
    return model


def _float64_model() -> nn.Module:
    return nn.Linear(D, 1).double()


@pytest.mark.parametrize(
    ("make_model", "make_opt", "loss", "task"),
    [
        # Tanh and a Linear without bias are lowered to a program now (tests/training/test_program_kernels.py)
        (lambda: nn.Sequential(nn.Linear(D, 4), nn.Softplus(), nn.Linear(4, 1)), "sgd", "mse", "regression"),
        (lambda: nn.Sequential(nn.Linear(D, 4), nn.Dropout(0.5)), "sgd", "mse", "regression"),
        (_float64_model, "sgd", "mse", "regression"),
        (_hooked_model, "sgd", "mse", "regression"),
        (lambda: nn.Linear(D, 1), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "mse", "regression"),
        (
            lambda: nn.Linear(D, 1),
            lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=1e-4),
            "mse",
            "regression",
        ),
        (lambda: nn.Linear(D, 1), lambda ps: torch.optim.Adam(ps, amsgrad=True), "mse", "regression"),
        (lambda: nn.Linear(D, 1), torch.optim.AdamW, "mse", "regression"),
        (lambda: nn.Linear(D, 1), torch.optim.RMSprop, "mse", "regression"),
        (lambda: nn.Linear(D, 1), "sgd", "audit", "regression"),
        (lambda: nn.Linear(D, 1), "sgd", "bce", "regression"),
        (lambda: nn.Linear(D, 2), "sgd", "mse", "regression"),
        (lambda: nn.Linear(D, 1), "sgd", "ce", "multiclass"),
    ],
)
def test_unsupported_combinations_keep_the_autograd_path(
    make_model: Callable[[], nn.Module],
    make_opt: str | Callable[..., torch.optim.Optimizer],
    loss: str,
    task: str,
) -> None:
    model = make_model()
    params = list(model.parameters())
    opt = make_optimizer(make_opt, params, 0.1) if isinstance(make_opt, str) else make_opt(params)
    assert not fused_supported(model, opt, loss=loss, task=task)
    assert kernels.unsupported_reason(model, opt, loss=loss, task=task)
    with pytest.raises(FusedUnsupportedError):
        fused_learn(model, opt, *_data(task, 4), loss=loss, task=task)


def test_several_parameter_groups_are_not_fused() -> None:
    model = nn.Linear(D, 1)
    groups: list[dict[str, Any]] = [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}]
    opt = torch.optim.SGD(groups, lr=0.1)
    assert not fused_supported(model, opt, loss="mse", task="regression")


def test_background_compile_reports_ready() -> None:
    kernels.prepare("mlp", "adagrad")
    kernels.prepare("package.module:factory", "rmsprop")  # not built in: only the common preparation
    model = nn.Linear(D, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert kernels.wait_until_ready(model, opt, loss="mse", task="regression", timeout_s=120)
    assert kernels.kernels_ready(model, opt, loss="mse", task="regression")
    assert kernels.compile_state() == "ready"
    assert not kernels.kernels_ready(_hooked_model(), opt, loss="mse", task="regression")


def test_fused_standardize_equals_the_scaler() -> None:
    rng = np.random.default_rng(5)
    reference, fused = RunningStandardizer(D), RunningStandardizer(D)
    for size in (1, 7, 300, 0, 64):
        x = (rng.normal(size=(size, D)) * rng.uniform(0.5, 20, D) + rng.uniform(-5, 5, D)).astype(np.float32)
        np.testing.assert_allclose(
            kernels.fused_standardize(fused, x), reference.learn_transform(x), atol=1e-5
        )
    assert fused.count == reference.count == 372
    np.testing.assert_allclose(fused.mean, reference.mean, rtol=1e-10)
    np.testing.assert_allclose(fused.m2, reference.m2, rtol=1e-10)
    # The state stays the scaler's own: a checkpoint round trip and transform() see it.
    row = rng.normal(size=(1, D)).astype(np.float32)
    np.testing.assert_allclose(fused.transform(row), reference.transform(row), atol=1e-6)


# -- OnlineLearner.learn_many on the fused path ------------------------------------------

# (model, task, n_classes): the built-in models as a worker names them
LEARNERS = [
    ("linear", "regression", None),
    ("logistic", "binary", None),
    ("softmax", "multiclass", 3),
    ("mlp", "regression", None),
]
N = 2000
CHUNK = 500  # records per learn_many call, as a worker's polls hand them over


def _config(
    case: tuple[str, str, int | None], optimizer: str, standardize: bool, **overrides: object
) -> LearnerConfig:
    name, task, n_classes = case
    values: dict[str, object] = {
        "model": name,
        "task": task,
        "n_classes": n_classes,
        "optimizer": optimizer,
        "lr": LR[optimizer],
        "hidden": HIDDEN,
        "standardize": standardize,
        "seed": 3,
    }
    return LearnerConfig(**{**values, **overrides})  # type: ignore[arg-type]


def _wait_for_kernels(learner: OnlineLearner) -> None:
    """Block until the learner's compiled loop is ready, so that learn_many takes it."""
    loss, task = learner.config.resolved_loss, learner.config.task
    assert kernels.wait_until_ready(learner.model, learner.optimizer, loss=loss, task=task, timeout_s=300)
    assert kernels.kernels_ready(learner.model, learner.optimizer, loss=loss, task=task)


def _learn(
    learner: OnlineLearner, x: np.ndarray, y: np.ndarray, batch: int, chunk: int = CHUNK
) -> StepResult:
    results = [
        learner.learn_many(x[start : start + chunk], y[start : start + chunk], batch_size=batch)
        for start in range(0, len(x), chunk)
    ]
    for result in results:
        assert result.losses.dtype == result.predictions.dtype == np.float64
    return StepResult(
        np.concatenate([r.losses for r in results]), np.concatenate([r.predictions for r in results])
    )


@cache
def _autograd_reference(
    case: tuple[str, str, int | None], optimizer: str, standardize: bool, batch: int
) -> tuple[OnlineLearner, StepResult]:
    """The same records through autograd (fused=False); shared by the tests below, never modified."""
    learner = OnlineLearner(_config(case, optimizer, standardize, fused=False), D)
    x, y = _data(case[1], N, seed=4)
    return learner, _learn(learner, x, y, batch)


def _assert_same_learner(a: OnlineLearner, b: OnlineLearner) -> None:
    _assert_same_state(a.model, a.optimizer, b.model, b.optimizer)
    assert a.updates == b.updates
    assert (a.scaler is None) == (b.scaler is None)
    if a.scaler is not None and b.scaler is not None:
        assert a.scaler.count == b.scaler.count
        np.testing.assert_allclose(a.scaler.mean, b.scaler.mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a.scaler.m2, b.scaler.m2, rtol=1e-9, atol=1e-12)


def _assert_same_results(result: StepResult, expected: StepResult) -> None:
    np.testing.assert_allclose(result.losses, expected.losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.predictions, expected.predictions, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("standardize", [True, False], ids=["standardize", "raw"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("case", LEARNERS, ids=lambda case: case[0])
def test_learner_fused_equals_autograd_and_checkpoints(
    case: tuple[str, str, int | None], optimizer: str, standardize: bool, batch: int, fused_calls: list[int]
) -> None:
    """learn_many fused == fused=False on 2,000 records; a checkpoint taken halfway resumes the same."""
    reference, expected = _autograd_reference(case, optimizer, standardize, batch)
    x, y = _data(case[1], N, seed=4)
    learner = OnlineLearner(_config(case, optimizer, standardize), D)
    _wait_for_kernels(learner)

    first = _learn(learner, x[: N // 2], y[: N // 2], batch)
    # A checkpoint of the fused learner: its optimizer state, updated in place, is the real one.
    tensors, metadata = learner.state()
    metadata = json.loads(json.dumps(metadata))  # as the checkpoint stores it
    restored = OnlineLearner(_config(case, optimizer, standardize, seed=99), D)
    restored.load_state(tensors, metadata)
    _wait_for_kernels(restored)
    second = _learn(learner, x[N // 2 :], y[N // 2 :], batch)
    resumed = _learn(restored, x[N // 2 :], y[N // 2 :], batch)

    assert fused_calls == [CHUNK] * (3 * N // 2 // CHUNK)  # every call fused: 2 x 1,000 + 1,000 resumed
    assert learner.updates == reference.updates == (N // CHUNK) * -(-CHUNK // batch)
    _assert_same_results(
        StepResult(
            np.concatenate([first.losses, second.losses]),
            np.concatenate([first.predictions, second.predictions]),
        ),
        expected,
    )
    _assert_same_learner(learner, reference)
    _assert_same_results(resumed, StepResult(expected.losses[N // 2 :], expected.predictions[N // 2 :]))
    _assert_same_learner(restored, reference)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("case", LEARNERS, ids=lambda case: case[0])
def test_learn_many_in_three_parts_with_the_loop_on_another_thread_is_learn_many(
    case: tuple[str, str, int | None], batch: int, fused: bool, fused_calls: list[int]
) -> None:
    """start_learn_many here, compute on another thread, finish here: learn_many's updates, bit for bit."""
    x, y = _data(case[1], N, seed=4)
    whole = OnlineLearner(_config(case, "adam", True, fused=fused), D)
    parts = OnlineLearner(_config(case, "adam", True, fused=fused), D)
    if fused:
        _wait_for_kernels(whole)
        _wait_for_kernels(parts)
    expected = _learn(whole, x, y, batch)
    calls_whole = len(fused_calls)
    results = []
    for start in range(0, N, CHUNK):
        pending = parts.start_learn_many(x[start : start + CHUNK], y[start : start + CHUNK], batch_size=batch)
        lane = threading.Thread(target=pending.compute)
        lane.start()
        lane.join(timeout=60)
        results.append(pending.finish())

    assert fused_calls == ([CHUNK] * (2 * N // CHUNK) if fused else [])
    assert calls_whole == (N // CHUNK if fused else 0)
    np.testing.assert_array_equal(np.concatenate([r.losses for r in results]), expected.losses)
    np.testing.assert_array_equal(np.concatenate([r.predictions for r in results]), expected.predictions)
    for a, b in zip(whole.model.parameters(), parts.model.parameters(), strict=True):
        assert torch.equal(a, b)
    tensors_whole, tensors_parts = whole.state()[0], parts.state()[0]
    for key, value in tensors_whole.items():
        assert torch.equal(value, tensors_parts[key]), key  # optimizer state, step counts, scaler
    assert whole.updates == parts.updates


def test_a_learner_takes_no_new_steps_until_the_pending_ones_finish() -> None:
    x, y = _data("regression", 64, seed=5)
    learner = OnlineLearner(_config(LEARNERS[0], "sgd", True), D)
    _wait_for_kernels(learner)
    tensors, metadata = learner.state()
    pending = learner.start_learn_many(x, y, batch_size=4)
    for refused in (
        lambda: learner.learn_many(x, y),
        lambda: learner.start_learn_many(x, y),
        lambda: learner.fit_rows(x, y, batch_size=4),
    ):
        with pytest.raises(TrainingError, match="not finished"):
            refused()
    pending.compute()
    assert pending.finish().losses.shape == (64,)
    learner.learn_many(x, y)  # free again
    # A rollback replaces the state: steps started before it are forgotten ...
    learner.start_learn_many(x, y)
    learner.load_state(tensors, json.loads(json.dumps(metadata)))
    learner.learn_many(x, y)
    # ... and so does a caller that abandons them.
    learner.start_learn_many(x, y).abandon()
    learner.learn_many(x, y)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("case", LEARNERS, ids=lambda case: case[0])
def test_learner_switches_from_autograd_to_fused_seamlessly(
    case: tuple[str, str, int | None], optimizer: str, fused_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until its loop is compiled a learner trains through autograd; switching over changes nothing."""
    reference, expected = _autograd_reference(case, optimizer, True, 1)
    x, y = _data(case[1], N, seed=4)
    learner = OnlineLearner(_config(case, optimizer, True), D)
    _wait_for_kernels(learner)
    asked: list[bool] = []
    ready = kernels.kernels_ready

    def not_yet_compiled(*args: object, **kwargs: object) -> bool:
        asked.append(ready(*args, **kwargs))  # type: ignore[arg-type]
        return len(asked) > 3  # the first three batches: still compiling

    monkeypatch.setattr(kernels, "kernels_ready", not_yet_compiled)
    result = _learn(learner, x, y, 1, chunk=250)

    assert len(asked) == N // 250 and all(asked)
    assert fused_calls == [250] * (N // 250 - 3)
    _assert_same_results(result, expected)
    _assert_same_learner(learner, reference)


def _random_custom_model_config() -> LearnerConfig:
    return LearnerConfig(
        model="tests.custom_model:make_dropout_model", task="regression", optimizer="adam", lr=0.01
    )


@pytest.mark.parametrize(
    "config",
    [
        LearnerConfig(model="linear", fused=False),
        LearnerConfig(model="mlp", task="binary", optimizer="adagrad", hidden=HIDDEN, fused=False),
        _random_custom_model_config(),
        LearnerConfig(model="audit", task="regression", optimizer="sgd", lr=1.0, standardize=False),
    ],
    ids=["linear-off", "mlp-off", "custom-dropout", "audit"],
)
def test_learners_the_kernels_do_not_cover_stay_on_autograd(
    config: LearnerConfig, fused_calls: list[int]
) -> None:
    x, y = _data(config.task, 300, seed=5)
    learner = OnlineLearner(config, D)
    kernels.wait_until_ready(timeout_s=300)
    result = learner.learn_many(x, y)
    assert fused_calls == []
    assert learner.updates == 300 and np.isfinite(result.losses).all()


def test_invalid_class_index_takes_the_autograd_path_and_fails_there(fused_calls: list[int]) -> None:
    learner = OnlineLearner(_config(LEARNERS[2], "sgd", True), D)
    _wait_for_kernels(learner)
    x, y = _data("multiclass", 10)
    learner.learn_many(x, y)
    assert fused_calls == [10]
    y[4] = 3.0  # n_classes is 3: the compiled loop does not check it, torch does
    with pytest.raises(IndexError):
        learner.learn_many(x, y)
    assert fused_calls == [10]


def test_learn_one_and_partial_micro_batches_count_updates(fused_calls: list[int]) -> None:
    fused = OnlineLearner(_config(LEARNERS[3], "adam", True), D)
    plain = OnlineLearner(_config(LEARNERS[3], "adam", True, fused=False), D)
    _wait_for_kernels(fused)
    x, y = _data("regression", 45, seed=6)
    for learner in (fused, plain):
        losses = [learner.learn_one(x[i], float(y[i])) for i in range(5)]
        learner.learn_many(x[5:], y[5:], batch_size=8)  # 40 records: 5 full groups
        learner.learn_many(x[:3], y[:3], batch_size=8)  # one partial group
        learner.learn_many(x[:0], y[:0], batch_size=8)  # nothing
        assert learner.updates == 5 + 5 + 1
        assert np.isfinite(losses).all()
    assert fused_calls == [1] * 5 + [40, 3, 0]
    _assert_same_learner(fused, plain)
