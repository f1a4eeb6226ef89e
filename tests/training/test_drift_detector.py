"""The batched Page-Hinkley detector against River's ``drift.PageHinkley``, record by record.

Same streams (loss-like: exponential and Bernoulli-mixture values whose mean
shifts, up and down), fed to River one value at a time and to ours in random
batch sizes: the same detection indices, in every mode, with River's defaults and
with other parameters (no fading, a short fading, a late ``min_instances``). Then
what River does not have: the change-point estimate, the JSON round trip of the
state mid-stream, and the relative-loss wrapper (checked against River fed the
ratios it should compute).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from river import drift as river_drift

from streamtrainer.training.drift import DriftError, LossDriftDetector, PageHinkley, loss_drift_detector


def _stream(seed: int, n: int = 6_000) -> np.ndarray:
    """Losses whose level moves: calm, a rise, a fall, a bigger rise, with Bernoulli spikes."""
    rng = np.random.default_rng(seed)
    quarter = n // 4
    levels = (0.3, 0.8, 0.2, 1.5)
    parts = [rng.exponential(level, quarter) + 2.0 * (rng.random(quarter) < 0.02) for level in levels]
    return np.concatenate(parts)


def _river_indices(values: np.ndarray, **params: object) -> list[int]:
    detector = river_drift.PageHinkley(**params)  # type: ignore[arg-type]
    found = []
    for i, value in enumerate(values.tolist()):
        detector.update(value)
        if detector.drift_detected:
            found.append(i)
    return found


def _batched_indices(values: np.ndarray, detector: PageHinkley, seed: int) -> list[int]:
    rng = np.random.default_rng(seed + 100)
    found, start = [], 0
    while start < len(values):
        size = int(rng.integers(1, 1_500))
        found += [start + d.index for d in detector.update(values[start : start + size])]
        start += size
    return found


PARAMS = [
    {},  # River's defaults
    {"delta": 0.05, "threshold": 20.0, "alpha": 1.0},
    {"delta": 0.01, "threshold": 10.0, "alpha": 0.99},
    {"delta": 0.0, "threshold": 30.0, "min_instances": 500},
]


@pytest.mark.parametrize("mode", ["up", "down", "both"])
@pytest.mark.parametrize("params", PARAMS, ids=["river-defaults", "no-fading", "short-fading", "late-start"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_detections_as_river(mode: str, params: dict[str, float], seed: int) -> None:
    values = _stream(seed)
    expected = _river_indices(values, mode=mode, **params)
    ours = _batched_indices(values, PageHinkley(mode=mode, **params), seed)  # type: ignore[arg-type]
    assert ours == expected
    if mode != "down" and not params.get("min_instances"):
        assert expected, "a stream with rises of the loss should make River detect something"


def test_one_value_at_a_time_and_one_batch_agree() -> None:
    values = _stream(5)
    one = PageHinkley()
    singles = [i for i, value in enumerate(values) if one.update([value])]
    whole = [d.index for d in PageHinkley().update(values)]
    assert singles == whole == _river_indices(values, mode="up")


def test_the_change_point_is_where_the_statistic_was_lowest() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.exponential(0.3, 3_000), rng.exponential(1.0, 2_000)])
    (first, *_) = PageHinkley().update(values)
    assert 3_000 < first.record < 3_400
    # The estimate is close to the true change (record 3,000), before the detection.
    assert 2_800 <= first.change_at <= 3_050 < first.record
    # And it is the argmin of the statistic River accumulates (recomputed here independently).
    mean = np.cumsum(values[: first.record + 1]) / np.arange(1, first.record + 2)
    s, sums = 0.0, []
    for x, m in zip(values[: first.record + 1], mean, strict=True):
        s = (1 - 0.0001) * s + (x - m) - 0.005
        sums.append(s)
    assert first.change_at == int(np.argmin(sums))


def test_the_state_survives_a_json_round_trip_mid_stream() -> None:
    values = _stream(7, 8_000)
    expected = _river_indices(values, mode="up")
    first = PageHinkley()
    found = [d.index for d in first.update(values[:3_333])]
    second = PageHinkley()
    assert second.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    found += [3_333 + d.index for d in second.update(values[3_333:])]
    assert found == expected
    assert second.detections == len(expected) and second.seen == len(values)


def test_a_state_of_other_parameters_starts_afresh() -> None:
    first = PageHinkley(threshold=10.0)
    first.update(_stream(1)[:2_000])
    second = PageHinkley(threshold=20.0)
    assert not second.load_state_dict(first.state_dict())
    assert second.statistic == 0.0
    assert not second.load_state_dict(None)
    assert not second.load_state_dict({"format": "something else"})


def test_non_finite_values_are_skipped_and_indices_stay_those_of_the_input() -> None:
    values = _stream(2)
    holed = np.insert(values, [10, 2_000, 2_000], [np.nan, np.inf, -np.inf])
    expected = _river_indices(values, mode="up")
    got = [d.index for d in PageHinkley().update(holed)]
    finite = np.flatnonzero(np.isfinite(holed))
    assert [int(np.searchsorted(finite, i)) for i in got] == expected


def test_bad_parameters_are_refused() -> None:
    for params in (
        {"mode": "sideways"},
        {"threshold": 0.0},
        {"delta": -1.0},
        {"alpha": 0.0},
        {"min_instances": 0},
    ):
        with pytest.raises(DriftError):
            PageHinkley(**params)  # type: ignore[arg-type]


def test_the_loss_detector_runs_page_hinkley_on_the_losses_over_their_mean() -> None:
    """Ratios to the mean loss since the last detection (before each batch), clipped at 5, fed to
    River give the same detections; and scaling every loss by 1,000 changes none of them."""
    values = _stream(4, 8_000)
    batches = np.array_split(values, 16)
    ours = LossDriftDetector(PageHinkley(delta=0.1, threshold=30.0))
    scaled = LossDriftDetector(PageHinkley(delta=0.1, threshold=30.0))
    river = river_drift.PageHinkley(delta=0.1, threshold=30.0, mode="up")
    got, got_scaled, expected = [], [], []
    total, count, start = 0.0, 0, 0
    for batch in batches:
        got += [start + d.index for d in ours.update(batch)]
        got_scaled += [start + d.index for d in scaled.update(batch * 1_000.0)]
        scale = total / count if count else float(batch.mean())
        last = None
        for i, value in enumerate(batch.tolist()):
            river.update(min(value / scale, 5.0))  # clipped at 5 mean losses
            if river.drift_detected:
                expected.append(start + i)
                last = i
        if last is None:
            total, count = total + float(batch.sum()), count + len(batch)
        else:
            total, count = float(batch[last + 1 :].sum()), len(batch) - last - 1
        start += len(batch)
    assert got == expected == got_scaled
    assert expected


def test_the_loss_detector_state_round_trips() -> None:
    values = _stream(6, 8_000)
    whole = LossDriftDetector(PageHinkley(delta=0.1, threshold=30.0))
    expected = [d.record for batch in np.array_split(values, 8) for d in whole.update(batch)]
    first = LossDriftDetector(PageHinkley(delta=0.1, threshold=30.0))
    found = [d.record for batch in np.array_split(values, 8)[:3] for d in first.update(batch)]
    second = LossDriftDetector(PageHinkley(delta=0.1, threshold=30.0))
    assert second.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    found += [d.record for batch in np.array_split(values, 8)[3:] for d in second.update(batch)]
    assert found == expected and expected


def test_the_workers_detector_ignores_outliers_and_finds_a_rise_of_the_loss() -> None:
    """The worker's settings (relative, clipped, no forgetting): squared errors with rare outliers
    of 1,000 mean losses over 200,000 stationary records raise nothing; a tripled loss is found
    within a few hundred records, whatever the loss's scale."""
    rng = np.random.default_rng(11)
    calm = rng.chisquare(1, 200_000) * 0.01
    calm[rng.choice(calm.shape[0], 20, replace=False)] *= 1_000.0
    risen = rng.chisquare(1, 5_000) * 0.03
    for scale in (1.0, 1e6):
        detector = loss_drift_detector(delta=0.3, threshold=50.0, min_instances=30)
        found = [d for batch in np.array_split(calm * scale, 200) for d in detector.update(batch)]
        assert found == []
        found = [d for batch in np.array_split(risen * scale, 20) for d in detector.update(batch)]
        assert found and found[0].record - calm.shape[0] < 300
        assert calm.shape[0] - 50 <= found[0].change_at <= found[0].record
    # River's forgetting factor on the same ratios: false detections on the calm records.
    river_style = LossDriftDetector(PageHinkley(delta=0.3, threshold=50.0, alpha=1 - 1e-4), clip=5.0)
    assert [d for batch in np.array_split(calm, 200) for d in river_style.update(batch)]
