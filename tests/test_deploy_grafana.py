"""deploy/grafana: the provisioning and a dashboard a current Grafana loads.

Grafana cannot run here: what its queries return is checked against a live Prometheus in
test_deploy_prometheus.py. This checks the JSON model and the provisioning.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "streamtrainer.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "streamtrainer.yml"
COMPOSE = ROOT / "docker-compose.yml"

# Panel types of current Grafana (no Angular "graph"/"singlestat": Grafana 11+ no longer runs them).
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text", "heatmap", "state-timeline"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert len(sources) == 1
    return dict(sources[0])


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_the_dashboard_is_a_current_grafana_model(dashboard: dict[str, Any]) -> None:
    # Grafana migrates older schema versions forward; 39 is Grafana 10.4/11.x, 41 is 12.x.
    assert isinstance(dashboard["schemaVersion"], int) and 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] == "streamtrainer" and dashboard["title"]
    assert dashboard.get("id") is None  # a provisioned dashboard gets its id from Grafana
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["title"]
    # Wrapped ({"dashboard": ...}) JSON is the HTTP API's shape; file provisioning wants the bare model.
    assert "dashboard" not in dashboard


def test_panels_fill_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_query_takes_its_datasource_from_the_datasource_variable(
    dashboard: dict[str, Any], datasource: dict[str, Any]
) -> None:
    # Imported into another Grafana (whatever its Prometheus uid), the variable picks the data source.
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True  # what the variable selects in the compose stack
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["name"] == "datasource" and variable["query"] == "prometheus"
    expected = {"type": "prometheus", "uid": "${datasource}"}
    for panel in _panels(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == expected, variable["name"]
    # No uid of one particular Grafana anywhere (the built-in annotations' "-- Grafana --" aside).
    uids = re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text())
    assert set(uids) == {"streamtrainer", "${datasource}", "-- Grafana --"}, set(uids)


def test_template_variables_select_job_instance_and_topic(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"] if v["type"] == "query"}
    assert list(variables) == ["job", "instance", "topic"]
    for name, variable in variables.items():
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        assert re.fullmatch(rf"label_values\(.+,\s*{name}\)", query), query
        assert variable["includeAll"] and variable["multi"], name
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            # `up` is Prometheus's own series: it knows no topic (a down worker exports nothing).
            assert "$topic" in expr or expr.startswith("sum(up{"), f"{panel['title']}: not filtered by topic"
            if "producer" not in expr:
                assert "$job" in expr and "$instance" in expr, f"{panel['title']}: not filtered by worker"
            # Grafana's rate window, except for rare events: checkpoints come every few tens of
            # seconds, compactions every few minutes (20,000 records), rollbacks and drifts hardly ever.
            windows = set(re.findall(r"\[([^\]]+)\]", expr))
            if "checkpoint" in expr:
                allowed = {"$__rate_interval", "5m"}
            elif "compaction" in expr or "rollbacks" in expr or "drift_detections" in expr:
                allowed = {"$__rate_interval", "15m"}
            else:
                allowed = {"$__rate_interval"}
            assert windows <= allowed, f"{panel['title']}: range {windows}"


@pytest.mark.parametrize(
    ("what", "metric"),
    [
        ("records consumed", "streamtrainer_records_consumed_total"),
        ("records trained", "streamtrainer_records_trained_total"),
        ("records produced", "streamtrainer_producer_records_delivered_total"),
        ("prequential loss", "streamtrainer_prequential_loss"),
        ("accuracy", "streamtrainer_prequential_accuracy"),
        ("MAE", "streamtrainer_prequential_mae"),
        ("ROC AUC", "streamtrainer_prequential_roc_auc"),
        ("macro F1", "streamtrainer_prequential_macro_f1"),
        ("R2", "streamtrainer_prequential_r2"),
        ("prequential loss from the counters", "streamtrainer_prequential_loss_sum_total"),
        ("records measured", "streamtrainer_prequential_records_total"),
        ("consumer lag", "streamtrainer_consumer_lag_records"),
        ("update latency quantiles", "streamtrainer_update_latency_seconds_bucket"),
        ("checkpoint age", "streamtrainer_last_checkpoint_timestamp_seconds"),
        ("checkpoint duration", "streamtrainer_checkpoint_duration_seconds_bucket"),
        ("model version", "streamtrainer_model_version"),
        ("invalid records", "streamtrainer_records_invalid_total"),
        ("rollbacks", "streamtrainer_rollbacks_total"),
        ("compactions by trigger", "streamtrainer_compactions_total"),
        ("compaction duration quantiles", "streamtrainer_compaction_duration_seconds_bucket"),
        ("average compaction duration", "streamtrainer_compaction_duration_seconds_sum"),
        ("records per compaction", "streamtrainer_compaction_records"),
        ("compaction epoch loss", "streamtrainer_compaction_epoch_loss"),
        ("compaction store records", "streamtrainer_compaction_store_records"),
        ("compaction store bytes", "streamtrainer_compaction_store_bytes"),
        ("dead-lettered records", "streamtrainer_records_dead_lettered_total"),
        ("dead-letter write failures", "streamtrainer_dead_letter_write_failures_total"),
        ("workers blocked on the dead-letter topic", "streamtrainer_dead_letter_blocked"),
        ("world size", "streamtrainer_world_size"),
        ("averaging rounds", "streamtrainer_averaging_rounds_total"),
        ("averaging duration quantiles", "streamtrainer_averaging_duration_seconds_bucket"),
        ("time in averaging rounds", "streamtrainer_averaging_duration_seconds_sum"),
        ("parameter distance before averaging", "streamtrainer_parameter_distance"),
    ],
)
def test_the_dashboard_shows(dashboard: dict[str, Any], what: str, metric: str) -> None:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p["targets"]]
    assert any(re.search(rf"\b{metric}\b", e) for e in exprs), f"no panel shows {what}"


def test_per_partition_panels_split_by_partition(dashboard: dict[str, Any]) -> None:
    by_title = {p["title"]: p for p in _panels(dashboard)}
    for title in ("Trained records/s per partition", "Consumer lag per partition"):
        expr = by_title[title]["targets"][0]["expr"]
        assert re.search(r"by \(topic, partition\)", expr), expr
    latency = [t["expr"] for t in by_title["Update latency"]["targets"]]
    assert [re.search(r"histogram_quantile\(([\d.]+)", e).group(1) for e in latency] == ["0.5", "0.9", "0.99"]  # type: ignore[union-attr]


def test_the_compaction_row_shows_whether_compaction_helped(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    rows = [p for p in panels if p["type"] == "row"]
    (row,) = [r for r in rows if r["title"] == "Compaction"]
    following = [r["gridPos"]["y"] for r in rows if r["gridPos"]["y"] > row["gridPos"]["y"]]
    end = min(following, default=10**6)
    in_row = {p["title"]: p for p in _panels(dashboard) if row["gridPos"]["y"] < p["gridPos"]["y"] < end}
    assert len(in_row) >= 5, sorted(in_row)
    for title, panel in in_row.items():
        assert any("compaction" in t["expr"] for t in panel["targets"]), title
    # The epoch loss of each compaction, as points, on the same axes as the prequential loss.
    (loss,) = [p for p in in_row.values() if any("compaction_epoch_loss" in t["expr"] for t in p["targets"])]
    refs = {t["refId"]: t["expr"] for t in loss["targets"]}
    assert any(re.match(r"streamtrainer_prequential_loss\b", e) for e in refs.values()), refs
    (epoch_ref,) = [ref for ref, e in refs.items() if "compaction_epoch_loss" in e]
    assert "streamtrainer_compactions_total" in refs[epoch_ref]  # only where a compaction finished
    (override,) = [o for o in loss["fieldConfig"]["overrides"] if o["matcher"]["options"] == epoch_ref]
    assert {"id": "custom.drawStyle", "value": "points"} in override["properties"]
    durations = [
        p
        for p in in_row.values()
        if any("compaction_duration_seconds_bucket" in t["expr"] for t in p["targets"])
    ]
    assert len(durations) == 1
    exprs = [t["expr"] for t in durations[0]["targets"]]
    assert sum("histogram_quantile" in e for e in exprs) >= 2
    assert any("_sum" in e and "_count" in e for e in exprs), "no average compaction duration"


def _row(dashboard: dict[str, Any], title: str) -> dict[str, dict[str, Any]]:
    """The panels of one row, by title."""
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    (row,) = [r for r in rows if r["title"] == title]
    following = [r["gridPos"]["y"] for r in rows if r["gridPos"]["y"] > row["gridPos"]["y"]]
    end = min(following, default=10**6)
    return {p["title"]: p for p in _panels(dashboard) if row["gridPos"]["y"] < p["gridPos"]["y"] < end}


def test_the_dead_letter_row_shows_reasons_share_failures_and_blocked_workers(
    dashboard: dict[str, Any],
) -> None:
    in_row = _row(dashboard, "Dead letters")
    assert len(in_row) == 4, sorted(in_row)
    for title, panel in in_row.items():
        assert any("dead_letter" in t["expr"] for t in panel["targets"]), title
    exprs = {title: [t["expr"] for t in panel["targets"]] for title, panel in in_row.items()}
    by_reason = [e for es in exprs.values() for e in es if "by (topic, reason)" in e]
    assert by_reason and all("streamtrainer_records_dead_lettered_total" in e for e in by_reason)
    share = [p for p in in_row.values() if p["fieldConfig"]["defaults"]["unit"] == "percentunit"]
    (share_expr,) = [t["expr"] for p in share for t in p["targets"]]
    assert re.search(r"dead_lettered_total.*\) / .*records_consumed_total", share_expr), share_expr
    # Blocked is a state over time (0 writing, 1 blocked), not a line.
    (blocked,) = [p for p in in_row.values() if "dead_letter_blocked" in p["targets"][0]["expr"]]
    assert blocked["type"] == "state-timeline"
    (mapping,) = blocked["fieldConfig"]["defaults"]["mappings"]
    assert mapping["options"]["1"]["text"] == "blocked" and mapping["options"]["0"]["text"] == "writing"


def test_the_rank_row_shows_each_rank_of_one_model(dashboard: dict[str, Any]) -> None:
    """worker --distributed (issue 18): world size, rounds, their duration, the parameter distance,
    records/s and lag, each per rank (the records and lag series get the rank from the world size)."""
    in_row = _row(dashboard, "One model across ranks")
    exprs = {title: [t["expr"] for t in panel["targets"]] for title, panel in in_row.items()}
    legends = [t["legendFormat"] for panel in in_row.values() for t in panel["targets"]]
    assert len(in_row) == 7, sorted(in_row)
    by_metric = {
        "streamtrainer_world_size": "World size and ranks scraped",
        "streamtrainer_averaging_rounds_total": "Averaging rounds/s per rank",
        "streamtrainer_averaging_duration_seconds_bucket": "Averaging round duration per rank",
        "streamtrainer_parameter_distance": "Parameter distance before averaging",
        "streamtrainer_records_trained_total": "Trained records/s per rank",
        "streamtrainer_consumer_lag_records": "Consumer lag per rank",
    }
    for metric, title in by_metric.items():
        assert any(metric in e for e in exprs[title]), (title, exprs[title])
    # Every query splits by rank, and every line says which rank it is.
    for title, queries in exprs.items():
        for expr in queries:
            if expr.startswith("count("):
                continue  # the number of ranks scraped: one line for the group
            assert re.search(r"by \((le, )?rank\)", expr) or "group_left (rank)" in expr, (title, expr)
    assert sum("{{rank}}" in legend for legend in legends) == len(legends) - 1, legends
    duration = exprs["Averaging round duration per rank"]
    quantiles = [m.group(1) for e in duration if (m := re.search(r"histogram_quantile\(([\d.]+)", e))]
    assert quantiles == ["0.5", "0.9"]
    assert any("_sum" in e and "_count" in e for e in duration), "no mean round duration"
    (share,) = [p for p in in_row.values() if p["fieldConfig"]["defaults"]["unit"] == "percentunit"]
    assert "averaging_duration_seconds_sum" in share["targets"][0]["expr"]


def test_provisioning_points_at_the_compose_services() -> None:
    source = yaml.safe_load(DATASOURCES.read_text())
    assert source["apiVersion"] == 1
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    compose = yaml.safe_load(COMPOSE.read_text())
    assert "prometheus" in compose["services"]
    assert "9090" in str(compose["services"]["prometheus"]["ports"])

    providers = yaml.safe_load(PROVIDERS.read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_the_learning_row_names_the_window_and_the_whole_run(dashboard: dict[str, Any]) -> None:
    by_title = {p["title"]: p for p in _panels(dashboard)}
    loss = by_title["Prequential loss"]["targets"]
    scopes = {m.group(1): t["legendFormat"] for t in loss if (m := re.search(r'scope="(\w+)"', t["expr"]))}
    assert set(scopes) == {"window", "run"}
    assert "last window" in scopes["window"] and "whole run" in scopes["run"]
    # ... and a window PromQL computes from the counters.
    assert any("rate(streamtrainer_prequential_loss_sum_total" in t["expr"] for t in loss)
    # The quality gauges carry both scopes: the legend says which.
    (quality,) = [p for title, p in by_title.items() if title.startswith("Quality:")]
    assert all("{{scope}}" in t["legendFormat"] for t in quality["targets"])
