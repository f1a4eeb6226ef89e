"""Mini-batch epochs over a window: the loss falls, the result is reproducible, the hooks are honoured."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamtrainer.training import LearnerConfig, OnlineLearner
from streamtrainer.training.compaction import EpochData, evaluate, split_holdout, train_epochs
from streamtrainer.training.exceptions import CompactionError


def regression(n: int = 3000, d: int = 6, seed: int = 0) -> EpochData:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) * 4 + 2).astype(np.float32)
    w = rng.normal(size=d)
    y = ((x - 2) / 4 @ w + 0.5 + 0.05 * rng.normal(size=n)).astype(np.float32)
    return EpochData.from_arrays(x, y)


def learner(seed: int = 0, d: int = 6, lr: float = 0.05) -> OnlineLearner:
    return OnlineLearner(
        LearnerConfig(model="linear", task="regression", optimizer="sgd", lr=lr, seed=seed), d
    )


def primed(data: EpochData, seed: int = 0, lr: float = 0.05) -> OnlineLearner:
    """A learner whose scaler has seen the data (online), as the worker's has when it compacts."""
    model = learner(seed, data.n_features, lr)
    model.learn_many(data.features[:50], data.labels[:50])
    return model


def parameters(model: OnlineLearner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.model.parameters()]


def test_epoch_loss_falls_on_a_learnable_task() -> None:
    data = regression()
    model = primed(data, lr=0.01)  # slow enough that every epoch still has something to learn
    scaler_count = model.scaler.count if model.scaler is not None else -1
    before = evaluate(model, data)
    report = train_epochs(model, data, epochs=3, batch_size=32, seed=1)
    after = evaluate(model, data)
    assert len(report.epoch_losses) == 3
    assert report.epoch_losses[0] > report.epoch_losses[1] > report.epoch_losses[2]
    assert after < before / 100 and after < 0.01
    assert report.records == 3 * data.count
    assert report.batches == 3 * math.ceil(data.count / 32)
    assert report.device == "cpu" and report.duration_s > 0 and not report.stopped
    assert model.scaler is not None and model.scaler.count == scaler_count  # replays do not count twice


def test_same_seed_same_model_other_seed_other_model() -> None:
    data = regression()
    runs = []
    for seed in (7, 7, 8):
        model = primed(data)
        train_epochs(model, data, epochs=2, batch_size=16, seed=seed)
        runs.append(parameters(model))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))


def test_between_batches_runs_after_every_chunk_of_whole_batches() -> None:
    data = regression(n=5000)
    calls: list[int] = []
    model = primed(data)
    before = model.updates
    report = train_epochs(
        model, data, epochs=2, batch_size=64, seed=0, between_batches=lambda: calls.append(model.updates)
    )
    # Chunks of 32 batches (2,048 rows): 2048 + 2048 + 904 rows per epoch, never a split batch.
    steps = np.diff([before, *calls]).tolist()
    assert steps == [32, 32, 15, 32, 32, 15]
    assert report.batches == 2 * 79 == model.updates - before


def test_should_stop_aborts_with_what_was_done() -> None:
    data = regression(n=5000)
    model = primed(data)
    chunks = 0

    def count() -> None:
        nonlocal chunks
        chunks += 1

    report = train_epochs(
        model, data, epochs=5, batch_size=100, seed=0, between_batches=count, should_stop=lambda: chunks >= 4
    )
    # Chunks of 2,000 rows: the first epoch takes three (2000 + 2000 + 1000), the second one.
    assert report.stopped and report.batches == 70 and report.records == 7000
    assert len(report.epoch_losses) == 2  # one full epoch and the part of the second
    assert train_epochs(model, data, epochs=5, batch_size=100, seed=0, should_stop=lambda: True).batches == 0


def test_empty_data_and_bad_arguments() -> None:
    model = learner()
    empty = EpochData.empty(6)
    report = train_epochs(model, empty, epochs=3, batch_size=8, seed=0)
    assert report.batches == 0 and report.epoch_losses == [] and report.records == 0
    assert math.isnan(evaluate(model, empty))
    with pytest.raises(CompactionError):
        train_epochs(model, regression(n=10), epochs=1, batch_size=0, seed=0)
    with pytest.raises(CompactionError, match="features"):
        train_epochs(model, regression(n=10, d=3), epochs=1, batch_size=4, seed=0)


def test_evaluate_is_the_mean_record_loss_without_learning() -> None:
    data = regression(n=500)
    model = primed(data)
    before = parameters(model)
    updates = model.updates
    # In the label's units (the model learns it standardized).
    expected = float(((model.predict_many(data.features) - data.labels.astype(np.float64)) ** 2).mean())
    assert evaluate(model, data) == pytest.approx(expected, rel=1e-5)
    assert model.updates == updates
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(model), strict=True))


def test_split_holdout() -> None:
    data = EpochData.from_arrays(np.arange(2000).reshape(1000, 2), np.arange(1000))
    train, holdout = split_holdout(data, 0.2, seed=3)
    assert (train.count, holdout.count) == (800, 200)
    assert set(train.offsets.tolist()).isdisjoint(holdout.offsets.tolist())
    assert sorted(train.offsets.tolist() + holdout.offsets.tolist()) == list(range(1000))
    assert np.all(np.diff(train.offsets) > 0) and np.all(np.diff(holdout.offsets) > 0)  # arrival order
    np.testing.assert_array_equal(holdout.labels, holdout.offsets.astype(np.float32))
    again = split_holdout(data, 0.2, seed=3)[1]
    np.testing.assert_array_equal(again.offsets, holdout.offsets)
    assert split_holdout(data, 0.0, seed=3)[1].count == 0
    with pytest.raises(CompactionError):
        split_holdout(data, 1.0, seed=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_epochs_on_cuda_come_back_to_the_cpu() -> None:
    data = regression()
    on_gpu, on_cpu = primed(data), primed(data)
    report = train_epochs(on_gpu, data, epochs=2, batch_size=32, seed=5, device="cuda")
    train_epochs(on_cpu, data, epochs=2, batch_size=32, seed=5)
    assert report.device.startswith("cuda")
    assert on_gpu.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in on_gpu.model.parameters())
    for a, b in zip(parameters(on_gpu), parameters(on_cpu), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert evaluate(on_gpu, data, device="cuda") == pytest.approx(evaluate(on_gpu, data), rel=1e-4)
