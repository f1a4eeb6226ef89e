"""`streamtrainer plot`: a picture of a run, from the run log a worker writes with ``--run-log``.

The run log has one JSON object per line, a :class:`~streamtrainer.consumer.worker.WorkerStatus`
snapshot every second (``elapsed_s``, ``records_trained``, ``prequential``: the progressive
metrics over the whole run, ``run``, and over the last ``window_size`` records, ``window``, ...).
Both are plotted, labelled: the loss, and accuracy (classification) or MAE (regression). A worker
restarted with the same ``--run-log`` appends to it: each run starts again at a
small ``elapsed_s``, and one run is plotted at a time (the last by default).

Rendering uses matplotlib's Agg canvas directly (no pyplot, no display, no global state).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import orjson

from streamtrainer.exceptions import StreamtrainerError

logger = logging.getLogger(__name__)

_SCORE_LABELS = {"accuracy": "accuracy", "mae": "mean absolute error"}
# The score each task plots with its loss.
_TASK_SCORES = {"binary": "accuracy", "multiclass": "accuracy", "regression": "mae"}


class PlotError(StreamtrainerError):
    """The run log cannot be plotted (missing, empty, or no such run)."""


@dataclass(frozen=True)
class RunCurves:
    """One run of a run log, as the columns the plot draws."""

    elapsed_s: list[float]
    records_trained: list[int]
    # Progressive (prequential) figures over the whole run and over the window; NaN where the
    # worker had measured nothing yet.
    loss: list[float]
    loss_window: list[float]
    score: list[float]
    score_window: list[float]
    score_name: str
    window_size: int
    records_per_second: list[float]  # over the interval since the previous snapshot

    @property
    def final(self) -> tuple[float, int]:
        return self.elapsed_s[-1], self.records_trained[-1]


def read_runs(path: Path) -> list[list[dict[str, object]]]:
    """The snapshots of a run log, split into runs (a run starts where ``elapsed_s`` goes back)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise PlotError(f"cannot read run log {path}: {error.strerror}") from None
    runs: list[list[dict[str, object]]] = []
    skipped = 0
    previous = math.inf
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            skipped += 1  # e.g. the last line of a worker that was killed mid-write
            continue
        if not isinstance(row, dict) or not isinstance(row.get("elapsed_s"), int | float):
            skipped += 1
            continue
        elapsed = float(row["elapsed_s"])
        if elapsed < previous:
            runs.append([])
        runs[-1].append(row)
        previous = elapsed
    if skipped:
        logger.warning("skipped %d unreadable line(s) of %s", skipped, path)
    return runs


def run_curves(rows: list[dict[str, object]]) -> RunCurves:
    elapsed = [float(_number(row.get("elapsed_s"))) for row in rows]
    trained = [_count(row.get("records_trained")) for row in rows]
    rates = [0.0]
    for i in range(1, len(rows)):
        dt = elapsed[i] - elapsed[i - 1]
        rates.append((trained[i] - trained[i - 1]) / dt if dt > 0 else rates[-1])
    reports = [_mapping(row.get("prequential")) for row in rows]
    tasks = [report.get("task") for report in reports if isinstance(report.get("task"), str)]
    name = _TASK_SCORES.get(str(tasks[-1]), "score") if tasks else "score"
    sizes = [size for report in reports if isinstance(size := report.get("window_size"), int)]

    def column(scope: str, metric: str) -> list[float]:
        return [_number(_mapping(report.get(scope)).get(metric)) for report in reports]

    return RunCurves(
        elapsed_s=elapsed,
        records_trained=trained,
        loss=column("run", "loss"),
        loss_window=column("window", "loss"),
        score=column("run", name),
        score_window=column("window", name),
        score_name=name,
        window_size=sizes[-1] if sizes else 0,
        records_per_second=rates,
    )


def plot_run(run_log: Path, output: Path, *, run: int = -1, title: str | None = None) -> Path:
    """Render loss, accuracy/MAE and throughput of one run of ``run_log`` to the PNG ``output``.

    ``run`` picks the run of an appended log: 1 is the first, -1 (the default) the last.
    """
    runs = [rows for rows in read_runs(run_log) if rows]
    if not runs:
        raise PlotError(f"run log {run_log} has no snapshot to plot")
    if run == 0 or not -len(runs) <= run <= len(runs):
        raise PlotError(f"run log {run_log} has {len(runs)} run(s); there is no run {run}")
    curves = run_curves(runs[run - 1 if run > 0 else run])
    output.parent.mkdir(parents=True, exist_ok=True)
    _render(curves, output, title or _default_title(run_log, curves, len(runs), run))
    return output


def _default_title(run_log: Path, curves: RunCurves, n_runs: int, run: int) -> str:
    seconds, trained = curves.final
    which = f", run {run if run > 0 else n_runs + 1 + run} of {n_runs}" if n_runs > 1 else ""
    return f"{run_log.name}{which}: {trained:,} records trained in {seconds:,.0f}s"


def _render(curves: RunCurves, output: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 8), dpi=100, layout="constrained")
    loss_axes, score_axes, rate_axes = figure.subplots(3, 1, sharex=True)
    x = curves.elapsed_s

    # One point per snapshot (about one a second): markers show where the curves were measured.
    style = {"linewidth": 1.5, "marker": ".", "markersize": 4}
    last = f"last {curves.window_size:,} records"
    loss_axes.plot(x, curves.loss, color="tab:red", label="whole run", **style)
    loss_axes.plot(x, curves.loss_window, color="tab:orange", label=last, **style)
    loss_axes.set_ylabel("loss")
    loss_axes.set_ylim(bottom=0.0)
    loss_axes.set_title("prequential loss (each record measured before learning from it)", fontsize=10)
    loss_axes.legend(loc="upper right", fontsize=8)

    score_label = _SCORE_LABELS.get(curves.score_name, curves.score_name)
    score_axes.plot(x, curves.score, color="tab:blue", label="whole run", **style)
    score_axes.plot(x, curves.score_window, color="tab:cyan", label=last, **style)
    score_axes.set_ylabel(curves.score_name)
    score_axes.set_title(f"prequential {score_label}", fontsize=10)
    score_axes.legend(loc="lower right" if curves.score_name == "accuracy" else "upper right", fontsize=8)
    if curves.score_name == "accuracy":
        score_axes.set_ylim(0.0, 1.02)
    else:
        score_axes.set_ylim(bottom=0.0)

    rate_axes.plot(x, curves.records_per_second, color="tab:green", label="records/s", **style)
    overall = [n / t if t > 0 else 0.0 for n, t in zip(curves.records_trained, x, strict=True)]
    rate_axes.plot(x, overall, color="tab:green", linestyle="--", linewidth=1.0, label="average since start")
    rate_axes.set_ylabel("records/s")
    rate_axes.set_title("throughput (records trained per second)", fontsize=10)
    rate_axes.set_ylim(bottom=0.0)
    rate_axes.legend(loc="lower right", fontsize=8)
    rate_axes.set_xlabel("elapsed (s)")

    for axes in (loss_axes, score_axes, rate_axes):
        axes.grid(True, alpha=0.3)
        axes.set_xlim(left=0.0)
    figure.suptitle(title, fontsize=12)
    figure.savefig(output, format="png")


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _mapping(value: object) -> dict[str, object]:
    """A JSON object, or empty (an older run log, or a line without it)."""
    return value if isinstance(value, dict) else {}


def _number(value: object) -> float:
    """A float from a JSON value; null (nothing trained yet) and non-numbers become NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)
