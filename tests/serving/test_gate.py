"""The promotion gate's decisions, figure by figure."""

from __future__ import annotations

import pytest
from torch import nn

from streamtrainer.serving.gate import MISSING_METRIC, WORSE, PromotionGate
from streamtrainer.training.predictor import Predictor


def _version(version: int, task: str = "regression", **metrics: float) -> Predictor:
    named = {k.replace("__", "."): v for k, v in metrics.items()}
    return Predictor(nn.Linear(2, 1), task=task, n_features=2, version=version, metrics=named)


def test_the_first_version_is_served_whatever_its_figures() -> None:
    assert PromotionGate().judge(_version(1), None).passed


@pytest.mark.parametrize(
    ("candidate", "passed"),
    [(0.9, True), (1.0, True), (1.049, True), (1.051, False), (2.0, False)],
)
def test_a_lower_is_better_figure_passes_within_the_margin(candidate: float, passed: bool) -> None:
    gate = PromotionGate("auto", 0.05)  # a regression: window.rmse
    verdict = gate.judge(_version(2, window__rmse=candidate), _version(1, window__rmse=1.0))
    assert verdict.passed is passed
    assert verdict.reason == ("" if passed else WORSE)
    assert "window.rmse" in verdict.explanation


@pytest.mark.parametrize(("candidate", "passed"), [(0.95, True), (0.9025, True), (0.90, False)])
def test_a_higher_is_better_figure_passes_within_the_margin(candidate: float, passed: bool) -> None:
    gate = PromotionGate("run.accuracy", 0.05)
    served = _version(1, "binary", run__accuracy=0.95)
    assert gate.judge(_version(2, "binary", run__accuracy=candidate), served).passed is passed


def test_auto_takes_the_window_log_loss_of_a_classifier() -> None:
    gate = PromotionGate()
    assert gate.metric_for("binary") == gate.metric_for("multiclass") == "window.loss"
    assert gate.metric_for("regression") == "window.rmse"
    served = _version(1, "binary", window__loss=0.30, window__rmse=1.0)
    assert gate.judge(_version(2, "binary", window__loss=0.315), served).passed
    assert not gate.judge(_version(2, "binary", window__loss=0.316), served).passed


def test_a_version_without_the_figure_is_gated_out_unless_none_is_asked() -> None:
    served = _version(1, window__rmse=1.0)
    verdict = PromotionGate().judge(_version(2), served)
    assert (verdict.passed, verdict.reason) == (False, MISSING_METRIC)
    assert PromotionGate("none").judge(_version(2), served).passed
    # Nothing to compare with on the served side: the candidate passes.
    assert PromotionGate().judge(_version(2, window__rmse=5.0), _version(1)).passed
    # A much worse version passes with the gate off.
    assert PromotionGate("none").judge(_version(2, window__rmse=100.0), served).passed
