"""The promotion gate: a new model version is served only if its prequential figure is not worse.

A version carries its prequential metrics (``run.<figure>``, ``window.<figure>``, ``records``: see
:mod:`streamtrainer.training.predictor`). The gate compares one of them, the candidate's against the
served version's: for a figure where lower is better (loss, mae, rmse) the candidate passes while
``candidate <= served + margin * |served|``; for the others (accuracy, r2, roc_auc, macro_f1) while
``candidate >= served - margin * |served|``. So with the default margin of 0.05 a window log loss of
0.30 lets through up to 0.315.

- Nothing served yet: the first version is served whatever its figures (there is nothing to compare
  with, and a server with no model answers nothing).
- The candidate lacks the figure (a version made before any record was scored, or a figure of another
  task): it is gated out, unless the served version lacks it too.
- ``--gate-metric none``: every newer version is served.
- ``auto``: ``window.rmse`` for a regression, ``window.loss`` (log loss) for a classification: the
  recent records, where a model that learned something bad shows first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from streamtrainer.settings import GATE_LOWER_IS_BETTER
from streamtrainer.training.predictor import Predictor

# Why a version was gated out (the gated counter's label: bounded).
WORSE = "worse"
MISSING_METRIC = "missing_metric"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A gate's decision: served or not, the figure compared and one line saying why."""

    passed: bool
    reason: str  # "" when passed, else WORSE or MISSING_METRIC
    explanation: str


@dataclass(frozen=True, slots=True)
class PromotionGate:
    """Compares ``metric`` (auto, none, or scope.figure) of a candidate with the served version's."""

    metric: str = "auto"
    margin: float = 0.05

    def metric_for(self, task: str) -> str | None:
        """The figure compared for a model of ``task`` (None: no gate)."""
        if self.metric == "none":
            return None
        if self.metric == "auto":
            return "window.rmse" if task == "regression" else "window.loss"
        return self.metric

    def judge(self, candidate: Predictor, served: Predictor | None) -> Verdict:
        """Whether ``candidate`` may replace ``served`` (see the module's docstring)."""
        if served is None:
            return Verdict(True, "", "nothing served yet")
        name = self.metric_for(candidate.task)
        if name is None:
            return Verdict(True, "", "no gate (--gate-metric none)")
        theirs = served.metrics.get(name)
        ours = candidate.metrics.get(name)
        if ours is None or not math.isfinite(ours):
            if theirs is None or not math.isfinite(theirs):
                return Verdict(True, "", f"neither version has {name}")
            return Verdict(False, MISSING_METRIC, f"it has no {name} (served: {theirs:.6g})")
        if theirs is None or not math.isfinite(theirs):
            return Verdict(True, "", f"the served version has no {name}")
        allowance = self.margin * abs(theirs)
        lower_better = name.partition(".")[2] in GATE_LOWER_IS_BETTER
        passed = ours <= theirs + allowance if lower_better else ours >= theirs - allowance
        relation = f"{name} {ours:.6g} vs {theirs:.6g} served (margin {self.margin:g})"
        return Verdict(passed, "" if passed else WORSE, relation)
