"""bench.quality: the table holds every contender with sane values, and its metrics are River's and
scikit-learn's on the same predictions; the learner it builds is the worker's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from river import metrics as river_metrics
from sklearn import metrics as sk_metrics

from bench.quality import cli
from bench.quality.contenders import learner_config, worker_settings
from bench.quality.datasets import BY_NAME
from bench.quality.metrics import progressive
from streamtrainer.consumer.worker import Worker

LINEAR_CONTENDERS = {cli.WORKER, cli.WORKER_OFF, cli.RIVER}
NONLINEAR_CONTENDERS = LINEAR_CONTENDERS | {
    cli.MLP,
    cli.MLP_OFF,
    "river hoeffding tree",
    "river knn",
    "river arf",
}


def test_quick_run_reports_every_contender_with_sane_values(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    # 700 records, a compaction every 500: it runs once (the default is every 2,000).
    argv = ["--quick", "--datasets", "iris,agrawal_drift", "--records", "700", "--out", str(out)]
    argv += ["--override", "compaction_every_records=500"]
    assert cli.main(argv, configure_logging=False) == 0
    rows = {row["dataset"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"iris", "agrawal_drift"}
    assert set(rows["iris"]["contenders"]) == LINEAR_CONTENDERS
    assert set(rows["agrawal_drift"]["contenders"]) == NONLINEAR_CONTENDERS
    assert rows["agrawal_drift"]["n"] == 700
    assert rows["agrawal_drift"]["river_nonlinear_best"] in NONLINEAR_CONTENDERS
    assert rows["agrawal_drift"]["contenders"][cli.WORKER]["compactions"] == 1
    assert rows["agrawal_drift"]["contenders"][cli.WORKER_OFF]["compactions"] == 0
    for row in rows.values():
        assert row["metric"] == "accuracy"
        assert set(row["winner"]) <= set(row["contenders"])
        for name, info in row["contenders"].items():
            m = info["metrics"]
            assert 0.0 <= m["accuracy"] <= 1.0, name
            assert m["log_loss"] >= 0.0, name
            assert row["values"][name] == m["accuracy"]
            # Anything worth comparing learns: above the majority class.
        assert row["values"][cli.RIVER] > 0.5
    assert 0.0 <= rows["agrawal_drift"]["contenders"][cli.WORKER]["metrics"]["roc_auc"] <= 1.0


@pytest.mark.parametrize("name", ["breast_cancer", "iris", "diabetes"])
def test_metrics_equal_rivers_and_sklearns_on_the_same_predictions(name: str) -> None:
    dataset = BY_NAME[name]
    stream = dataset.load(0, 0)
    result = cli.evaluate(dataset, stream, nonlinear=False)
    labels = stream.labels
    for contender, run in result.runs.items():
        p = run.predictions
        ours = progressive(dataset.kind, labels, p)
        if dataset.kind == "regression":
            mae, rmse, r2 = river_metrics.MAE(), river_metrics.RMSE(), river_metrics.R2()
            for y, value in zip(labels.tolist(), p.values.tolist(), strict=True):
                for metric in (mae, rmse, r2):
                    metric.update(y, value)
            assert ours["mae"] == pytest.approx(mae.get(), rel=1e-9), contender
            assert ours["rmse"] == pytest.approx(rmse.get(), rel=1e-9), contender
            assert ours["r2"] == pytest.approx(sk_metrics.r2_score(labels, p.values), rel=1e-6), contender
            continue
        assert p.p_true is not None
        accuracy = river_metrics.Accuracy()
        loss = river_metrics.LogLoss() if dataset.kind == "binary" else river_metrics.CrossEntropy()
        for i, (y, value) in enumerate(zip(labels.astype(int).tolist(), p.values.tolist(), strict=True)):
            accuracy.update(y, None if math.isnan(value) else int(value))
            if dataset.kind == "binary":
                assert p.p_one is not None
                loss.update(bool(y), float(p.p_one[i]))
            else:
                loss.update(y, {y: float(p.p_true[i])})
        assert ours["accuracy"] == pytest.approx(accuracy.get(), abs=1e-12), contender
        assert ours["log_loss"] == pytest.approx(loss.get(), rel=1e-6), contender
        if dataset.kind == "binary":
            assert p.p_one is not None
            assert ours["roc_auc"] == pytest.approx(sk_metrics.roc_auc_score(labels, p.p_one), abs=1e-12)
            # The probability the worker's losses imply agrees with its predicted class.
            confident = np.abs(p.p_one - 0.5) > 1e-4
            assert np.array_equal((p.p_one > 0.5)[confident], (p.values == 1)[confident]), contender
        else:
            # A missing prediction (River before its first record) is wrong, yet no class of its own.
            finite = np.isfinite(p.values)
            classes = np.union1d(labels, p.values[finite])
            filled = np.where(finite, p.values, -1.0)
            expected = sk_metrics.f1_score(labels, filled, labels=classes, average="macro")
            assert ours["macro_f1"] == pytest.approx(expected, abs=1e-12), contender


@pytest.mark.parametrize(
    ("name", "model"), [("diabetes", None), ("breast_cancer", None), ("iris", None), ("iris", "mlp")]
)
def test_the_learner_config_is_the_workers(name: str, model: str | None, tmp_path: Path) -> None:
    settings = worker_settings(BY_NAME[name], model=model, overrides={}, directory=tmp_path)
    assert learner_config(settings) == Worker(settings)._create_learner(5).config
    # A config-only override (no such worker setting) is applied on top.
    assert learner_config(settings, {"spike_span": 7}).spike_span == 7


def test_grid_ranks_candidates_on_tuning_data_only(tmp_path: Path) -> None:
    out = tmp_path / "grid.json"
    argv = [
        "--grid",
        "--datasets",
        "iris",
        "--grid-models",
        "default",
        "--override",
        "lr=0.3",
        "--out",
        str(out),
    ]
    assert cli.main(argv, configure_logging=False) == 0
    grid = json.loads(out.read_text())
    assert grid["candidates"] == [{}, {"lr": 0.3}]
    (column,) = grid["columns"]
    assert column["dataset"] == "iris" and column["reference"] == cli.RIVER
    assert sorted(s["mean_rank"] for s in grid["summary"]) in ([1.0, 2.0], [1.5, 1.5])
    # Kept-aside datasets are never tuned on; a misspelled override is refused before anything runs.
    assert cli.main(["--grid", "--datasets", "phishing"], configure_logging=False) == 2
    assert cli.main(["--override", "learning_rate=0.1"], configure_logging=False) == 2
    assert cli.main(["--override", "lr=-1"], configure_logging=False) == 2


def test_parse_override() -> None:
    assert cli.parse_override("optimizer=adagrad,lr=0.1, compaction=false,clip-grad-norm=none,epochs=3") == {
        "optimizer": "adagrad",
        "lr": 0.1,
        "compaction": False,
        "clip_grad_norm": None,
        "epochs": 3,
    }
    with pytest.raises(ValueError, match="key=value"):
        cli.parse_override("lr")


def test_grid_summary_ranks_a_diverged_candidate_last() -> None:
    columns = [
        {"metric": "accuracy", "reference_value": 0.8, "values": [0.8, 0.9, math.nan]},
        {"metric": "mae", "reference_value": 2.0, "values": [4.0, 1.0, math.nan]},
    ]
    summary = cli._grid_summary(columns, 3)
    assert [s["mean_rank"] for s in summary] == [2.0, 1.0, 3.0]
    assert [s["mean_ratio_to_river"] for s in summary] == pytest.approx([0.75, (0.9 / 0.8 + 2.0) / 2, 0.0])
    assert [s["at_least_river"] for s in summary] == [1, 2, 0]
