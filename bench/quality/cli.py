"""``python -m bench.quality``: the quality table, or (``--grid``) candidate defaults ranked.

The table: per dataset, the whole-stream progressive metric of record
(accuracy, or MAE) of the worker at its defaults (compaction on, as by
default), the same without compaction, the worker's MLP at its defaults
(nonlinear tasks), River's default linear model, the best of River's
nonlinear learners (nonlinear tasks), which contender won, and whether the
issue's target holds (linear task: worker >= River default; nonlinear: worker
MLP >= River's best nonlinear). Everything, each contender's other metrics
and timings included, goes to a JSON file.

``--grid`` evaluates candidate overrides of the defaults (``--override
optimizer=adagrad,lr=0.1``, repeatable; without any, a built-in optimizer x lr
grid) on the TUNING datasets only, and prints each candidate's metric per
dataset, its mean rank and its mean ratio to River (> 1: better than River).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from scipy.stats import rankdata

from bench.quality import contenders
from bench.quality.contenders import Overrides, Run, check_overrides, learner_config, worker_settings
from bench.quality.datasets import (
    DATASETS,
    KEPT_ASIDE,
    QUICK,
    QUICK_RECORDS,
    SYNTHETIC_RECORDS,
    TUNING,
    Dataset,
    Stream,
    select,
)
from bench.quality.metrics import HIGHER_IS_BETTER, better, progressive, score_ratio

logger = logging.getLogger("bench.quality")

ROOT = Path(__file__).resolve().parents[2]
WORKER = "worker"
WORKER_OFF = "worker no-compaction"
MLP = "worker mlp"
MLP_OFF = "worker mlp no-compaction"
RIVER = "river default"
# The built-in --grid: the optimizers the worker offers x a log grid of steps.
GRID_OPTIMIZERS = ("sgd", "adam", "adagrad")
GRID_LRS = (0.003, 0.01, 0.03, 0.1, 0.3)


@dataclass
class TaskResult:
    """Every contender's run on one dataset, and their metrics."""

    dataset: Dataset
    stream: Stream
    runs: dict[str, Run] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, name: str, run: Run) -> None:
        self.runs[name] = run
        self.metrics[name] = progressive(self.dataset.kind, self.stream.labels, run.predictions)
        logger.info(
            "  %-26s %s = %.4f  (%.2f s)",
            name,
            self.dataset.metric,
            self.metric_of(name),
            run.seconds,
        )

    def metric_of(self, name: str) -> float:
        return self.metrics[name][self.dataset.metric]

    def best_of(self, names: Sequence[str]) -> str | None:
        present = [n for n in names if n in self.metrics]
        if not present:
            return None
        best = present[0]
        for name in present[1:]:
            if better(self.dataset.metric, self.metric_of(name), self.metric_of(best)):
                best = name
        return best

    def river_nonlinear(self) -> list[str]:
        return [n for n in self.metrics if n.startswith("river ") and n != RIVER]


def evaluate(
    dataset: Dataset,
    stream: Stream,
    *,
    seed: int = 0,
    overrides: Overrides | None = None,
    nonlinear: bool | None = None,
    arf: bool = True,
) -> TaskResult:
    """Run every contender on one dataset (nonlinear ones: on nonlinear tasks, or when asked)."""
    with_nonlinear = dataset.shape == "nonlinear" if nonlinear is None else nonlinear
    result = TaskResult(dataset, stream)
    overrides = overrides or {}
    off = {**overrides, "compaction": False}
    result.add(WORKER, contenders.run_worker(dataset, stream, overrides=overrides))
    result.add(WORKER_OFF, contenders.run_worker(dataset, stream, overrides=off))
    if with_nonlinear:
        result.add(MLP, contenders.run_worker(dataset, stream, model="mlp", overrides=overrides))
        result.add(MLP_OFF, contenders.run_worker(dataset, stream, model="mlp", overrides=off))
    rows = contenders.river_rows(stream)
    result.add(RIVER, contenders.run_river(dataset, stream, contenders.river_default(dataset.kind), rows))
    if with_nonlinear:
        for name, factory in contenders.river_nonlinear(dataset.kind, seed).items():
            if name == "river arf" and not arf:
                continue
            result.add(name, contenders.run_river(dataset, stream, factory(), rows))
    return result


def summary_row(result: TaskResult) -> dict[str, Any]:
    """One line of the table (as JSON), with every contender's metrics and notes."""
    dataset, metric = result.dataset, result.dataset.metric
    river_best = result.best_of(result.river_nonlinear())
    winner = result.best_of(list(result.metrics))
    # Equal to rounding: the same model fed in different chunk sizes differs by ~1e-15.
    ties = [
        n
        for n in result.metrics
        if winner and math.isclose(result.metric_of(n), result.metric_of(winner), rel_tol=1e-9)
    ]
    if dataset.shape == "nonlinear" and MLP in result.metrics and river_best is not None:
        target = "worker mlp >= river nonlinear best"
        met = not better(metric, result.metric_of(river_best), result.metric_of(MLP))
    else:
        target = "worker >= river default"
        met = not better(metric, result.metric_of(RIVER), result.metric_of(WORKER))
    return {
        "dataset": dataset.name,
        "group": dataset.group,
        "task": dataset.kind,
        "shape": dataset.shape,
        "source": dataset.source,
        "n": result.stream.n,
        "n_features": int(result.stream.features.shape[1]),
        "metric": metric,
        "values": {name: result.metric_of(name) for name in result.metrics},
        "river_nonlinear_best": river_best,
        "winner": ties,
        "target": target,
        "target_met": met,
        "contenders": {
            name: {"metrics": result.metrics[name], "seconds": round(run.seconds, 3), **run.notes}
            for name, run in result.runs.items()
        },
    }


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if metric in ("accuracy", "roc_auc", "macro_f1"):
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table of record, one line per dataset."""
    header = (
        "dataset", "group", "task", "n", "metric", "worker", "no-compact", "mlp", "River", "River NL best",
        "winner", "target",
    )  # fmt: skip
    lines = [header]
    for row in rows:
        m, values = row["metric"], row["values"]
        best = row["river_nonlinear_best"]
        winner = row["winner"]
        lines.append(
            (
                row["dataset"],
                row["group"],
                f"{row['task']}/{row['shape']}",
                str(row["n"]),
                m,
                _fmt(m, values.get(WORKER)),
                _fmt(m, values.get(WORKER_OFF)),
                _fmt(m, values.get(MLP)),
                _fmt(m, values.get(RIVER)),
                f"{_fmt(m, values[best])} ({best.removeprefix('river ')})" if best else "-",
                winner[0] + (f" (+{len(winner) - 1} tied)" if len(winner) > 1 else ""),
                "met" if row["target_met"] else "MISSED",
            )
        )
    return _columns(lines)


def format_details(rows: Sequence[dict[str, Any]]) -> str:
    """Every contender's metrics per dataset."""
    out = []
    for row in rows:
        out.append(f"{row['dataset']} ({row['group']}, {row['task']}/{row['shape']}, n={row['n']}):")
        for name, info in row["contenders"].items():
            metrics = ", ".join(f"{k} {_fmt(k, v)}" for k, v in info["metrics"].items())
            keys = ("compactions", "drift_detections", "skipped", "rollbacks")
            flags = ", ".join(f"{k}={info[k]}" for k in keys if info.get(k))
            out.append(f"  {name:<26} {metrics}  [{info['seconds']:.1f} s{', ' + flags if flags else ''}]")
    return "\n".join(out)


def _columns(lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    rule = ["-" * w for w in widths]
    rendered = [lines[0], rule, *lines[1:]]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in rendered
    )


# -- --grid ------------------------------------------------------------------------------------------


def parse_override(text: str) -> dict[str, object]:
    """``optimizer=adagrad,lr=0.1`` -> {"optimizer": "adagrad", "lr": 0.1} (none/true/false/numbers)."""
    out: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key:
            raise ValueError(f"override {part!r}: expected key=value")
        out[key.strip().replace("-", "_")] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> object:
    lowered = raw.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _label(overrides: Overrides) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "(defaults)"


def run_grid(
    datasets: Sequence[Dataset],
    candidates: Sequence[Overrides],
    *,
    roles: Sequence[str],
    seed: int,
    records: int,
    arf: bool = True,
) -> dict[str, Any]:
    """Each candidate's metric per (dataset, role), ranks, and ratios to River's reference."""
    columns: list[dict[str, Any]] = []
    for dataset in datasets:
        stream = dataset.load(seed, records)
        logger.info("%s (%d records)", dataset.name, stream.n)
        rows = contenders.river_rows(stream)
        for role in roles:
            if role == "mlp" and dataset.shape != "nonlinear":
                continue
            result = TaskResult(dataset, stream)
            if role == "mlp":
                for name, factory in contenders.river_nonlinear(dataset.kind, seed).items():
                    if name != "river arf" or arf:
                        result.add(name, contenders.run_river(dataset, stream, factory(), rows))
                reference = result.best_of(result.river_nonlinear())
            else:
                result.add(
                    RIVER, contenders.run_river(dataset, stream, contenders.river_default(dataset.kind), rows)
                )
                reference = RIVER
            assert reference is not None
            model = "mlp" if role == "mlp" else None
            values = []
            for candidate in candidates:
                name = f"{role}: {_label(candidate)}"
                result.add(name, contenders.run_worker(dataset, stream, model=model, overrides=candidate))
                values.append(result.metric_of(name))
            columns.append(
                {
                    "dataset": dataset.name,
                    "role": role,
                    "metric": dataset.metric,
                    "reference": reference,
                    "reference_value": result.metric_of(reference),
                    "values": values,
                }
            )
    return {
        "candidates": [dict(c) for c in candidates],
        "columns": columns,
        "summary": _grid_summary(columns, len(candidates)),
    }


def _grid_summary(columns: Sequence[dict[str, Any]], n_candidates: int) -> list[dict[str, Any]]:
    ranks = np.zeros((len(columns), n_candidates))
    ratios = np.zeros((len(columns), n_candidates))
    for j, column in enumerate(columns):
        metric, values = column["metric"], np.asarray(column["values"], dtype=np.float64)
        keyed = -values if metric in HIGHER_IS_BETTER else values
        ranks[j] = rankdata(np.nan_to_num(keyed, nan=np.inf))
        # No value (a model that diverged to NaN) scores 0: never better than one that learned.
        ratios[j] = [score_ratio(metric, v, column["reference_value"]) for v in values]
    ratios = np.nan_to_num(ratios, nan=0.0)
    return [
        {
            "mean_rank": float(ranks[:, i].mean()) if len(columns) else math.nan,
            "mean_ratio_to_river": float(np.mean(ratios[:, i])) if len(columns) else math.nan,
            "at_least_river": int(np.sum(ratios[:, i] >= 1.0)),
            "columns": len(columns),
        }
        for i in range(n_candidates)
    ]


def format_grid(grid: dict[str, Any]) -> str:
    """One line per candidate (best mean rank first): metric per dataset, mean rank, mean ratio."""
    columns, summary = grid["columns"], grid["summary"]
    heads = [f"{c['dataset']}{'/mlp' if c['role'] == 'mlp' else ''}" for c in columns]
    header = ["candidate", *heads, "mean rank", "ratio/River", ">=River"]
    lines = [header]
    reference = ["River (reference)"]
    reference += [_fmt(c["metric"], c["reference_value"]) for c in columns] + ["", "1", ""]
    lines.append(reference)
    order = sorted(range(len(grid["candidates"])), key=lambda i: summary[i]["mean_rank"])
    for i in order:
        s = summary[i]
        lines.append(
            [
                _label(grid["candidates"][i]),
                *(_fmt(c["metric"], c["values"][i]) for c in columns),
                f"{s['mean_rank']:.2f}",
                f"{s['mean_ratio_to_river']:.4f}",
                f"{s['at_least_river']}/{s['columns']}",
            ]
        )
    return _columns(lines)


# -- command line -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {', '.join(QUICK)}; synthetic streams at {QUICK_RECORDS} records",
    )
    parser.add_argument(
        "--datasets", help="comma-separated dataset or group names (tuning, kept-aside); default: all"
    )
    parser.add_argument(
        "--records", type=int, help=f"records per synthetic stream (default {SYNTHETIC_RECORDS})"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="order of the shuffled datasets and generators' seed"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON output (default runs/quality.json, or runs/quality-grid.json)"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="K=V[,K=V]",
        help="worker setting / LearnerConfig overrides (repeatable in --grid: one candidate each)",
    )
    parser.add_argument(
        "--all-contenders", action="store_true", help="the MLP and River's nonlinear learners on every task"
    )
    parser.add_argument(
        "--no-arf", action="store_true", help="leave River's adaptive random forest out (slowest)"
    )
    parser.add_argument("--grid", action="store_true", help="rank candidate overrides on the tuning datasets")
    parser.add_argument(
        "--grid-models", default="default,mlp", help="--grid: default (the task's model), mlp, or both"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="progress per contender on stderr")
    return parser  # fmt: skip


def _usage_error(message: str) -> int:
    print(f"bench.quality: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None, *, configure_logging: bool = True) -> int:
    """Run the benchmark; 0 when it ran (targets missed or not: the table says), 2 on a usage error.

    ``configure_logging=False`` leaves the process's logging alone (a caller such as a test).
    """
    args = _parser().parse_args(argv)
    if configure_logging:
        _configure_logging(args.verbose)
    try:
        names = (
            args.datasets.split(",")
            if args.datasets
            else (list(QUICK) if args.quick else [d.name for d in DATASETS])
        )
        datasets = select(n.strip() for n in names if n.strip())
        overrides = [parse_override(text) for text in args.override]
        for candidate in overrides:
            check_overrides(candidate)
            worker_settings(datasets[0] if datasets else DATASETS[0], model=None, overrides=candidate)
    except ValidationError as error:
        problems = (f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return _usage_error(f"--override: {'; '.join(problems)}")
    except ValueError as error:
        return _usage_error(str(error))
    if not datasets:
        return _usage_error("no dataset selected")
    records = args.records or (QUICK_RECORDS if args.quick else SYNTHETIC_RECORDS)
    started = time.perf_counter()
    info: dict[str, Any] = {
        "command": " ".join(["python -m bench.quality", *(argv if argv is not None else sys.argv[1:])]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": _versions(),
        "synthetic_records": records,
        "seed": args.seed,
    }
    if args.grid:
        if not args.datasets:  # the default selection, less what is kept aside
            datasets = [d for d in datasets if d.group == TUNING]
        if any(d.group == KEPT_ASIDE for d in datasets):
            return _usage_error(
                "--grid tunes on the tuning datasets only: the kept-aside ones check the result"
            )
        roles = [r.strip() for r in args.grid_models.split(",") if r.strip()]
        if not roles or set(roles) - {"default", "mlp"}:
            return _usage_error("--grid-models: default, mlp or both")
        candidates: list[Overrides] = [{}]
        candidates += overrides or [
            {"optimizer": o, "lr": lr} for o in GRID_OPTIMIZERS for lr in GRID_LRS
        ]  # fmt: skip
        grid = run_grid(
            datasets, candidates, roles=roles, seed=args.seed, records=records, arf=not args.no_arf
        )
        info["seconds"] = round(time.perf_counter() - started, 1)
        text = format_grid(grid)
        print(text)
        _write(args.out or ROOT / "runs" / "quality-grid.json", {"info": info, **grid})
        return 0
    base = overrides[0] if overrides else {}
    if len(overrides) > 1:
        return _usage_error("more than one --override: only --grid compares candidates")
    info["overrides"] = dict(base)
    info["defaults"] = _defaults(datasets, base)
    rows = []
    for dataset in datasets:
        stream = dataset.load(args.seed, records)
        logger.info(
            "%s (%s, %s/%s, %d records)", dataset.name, dataset.group, dataset.kind, dataset.shape, stream.n
        )
        result = evaluate(
            dataset,
            stream,
            seed=args.seed,
            overrides=base,
            nonlinear=True if args.all_contenders else None,
            arf=not args.no_arf,
        )
        rows.append(summary_row(result))
    info["seconds"] = round(time.perf_counter() - started, 1)
    print(format_table(rows))
    print()
    print(format_details(rows))
    print(f"\n{len(rows)} datasets in {info['seconds']:.0f} s")
    _write(args.out or ROOT / "runs" / "quality.json", {"info": info, "rows": rows})
    return 0


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr
    )
    # The compactor logs each compaction at INFO: the bench's own progress is enough.
    logging.getLogger("streamtrainer").setLevel(logging.WARNING)


def _defaults(datasets: Sequence[Dataset], overrides: Overrides) -> dict[str, Any]:
    """The worker's configuration each kind of run used: learner config and compaction settings."""
    out: dict[str, Any] = {}
    for dataset in datasets:
        for model in (None, "mlp"):
            settings = worker_settings(dataset, model=model, overrides=overrides)
            key = f"{settings.model}/{dataset.kind}"
            if key in out:
                continue
            config = learner_config(settings, overrides)
            compaction = {
                k: v
                for k, v in settings.model_dump(mode="json").items()
                if k.startswith("compaction") and v is not None
            }
            out[key] = {"learner": dataclasses.asdict(config), "compaction": compaction}
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("streamtrainer", "torch", "numpy", "river", "scikit-learn"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "-"
    return out


def _finite(value: Any) -> Any:
    """NaN and infinities as null: the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(payload), indent=1, default=str, allow_nan=False) + "\n")
    print(f"wrote {path}")


__all__ = ["KEPT_ASIDE", "TUNING", "evaluate", "main", "summary_row"]
