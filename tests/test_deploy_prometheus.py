"""deploy/prometheus and the Grafana dashboard, checked by promtool and by a real Prometheus server.

The live test starts Prometheus on loopback, scraping two workers (a classifier and a regressor,
on two topics) that train from the embedded broker while a producer publishes, and a third, a
`worker --distributed` rank under torchrun (one rank: the rank series of the dashboard's "One
model across ranks" row), on a third topic; then it asks the Prometheus HTTP API for every
expression of the dashboard and of the alert rules. The first two workers compact every 1,000
records (a few seconds) and spill their compaction store to disk, so the compaction panels have
data too (compaction is not yet supported with --distributed). One record in 400 on each topic is
bad (not JSON, the wrong number of features, a non-finite value): the workers dead-letter it, so
the dead-letter panels have data too, while the invalid share (0.25%) stays under every alert
threshold.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamtrainer.broker import free_port
from streamtrainer.consumer import Worker
from streamtrainer.consumer.compactor import REASONS as COMPACTION_TRIGGERS
from streamtrainer.consumer.dead_letter import DEAD_LETTER_REASONS
from streamtrainer.metrics import MetricsServer, ProducerMetrics
from streamtrainer.metrics.worker_metrics import LABEL_SIGNS, PROGRESSIVE_SCOPES
from streamtrainer.producer.publisher import publish
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.settings import KafkaSettings, WorkerSettings
from tests.helpers import worker_settings

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamtrainer.json"

WORKER_JOB = "streamtrainer-worker"
PRODUCER_JOB = "streamtrainer-producer"
# Series Prometheus itself makes for every target (never exported by our processes).
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Metrics of a task the live stack does not run (it has a binary and a regression worker): the
# multi-class gauge is checked in tests/metrics/test_progressive_export.py.
OTHER_TASKS = {"streamtrainer_prequential_macro_f1"}
RATE_INTERVAL = "15s"  # what $__rate_interval becomes: many 1 s scrapes per window
# The torchrun launch of the live stack's --distributed worker: its ranks (label rank: 0..RANKS-1).
RANKS = 1
# Rows of the dashboard only some workers have data for: compacting ones, --distributed ranks.
COMPACTION_ROW = "Compaction"
RANK_ROW = "One model across ranks"
# Label values of streamtrainer_compactions_total (an unknown trigger counts as "other") and of
# streamtrainer_compaction_store_records.
COMPACTION_REASONS = {*COMPACTION_TRIGGERS, "other"}
STORE_LOCATIONS = {"memory", "disk"}
# One bad record per BAD_EVERY good ones delivered, cycling through these values (n_features=4).
BAD_EVERY = 400
BAD_VALUES = (
    b"not json",
    b'{"features": [1.0, 2.0], "label": 0}',
    b'{"features": [1, 1e39, 3, 4], "label": 1}',
)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed (Debian: apt-get install prometheus)")
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_binary("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


# -- the files themselves ------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def panels_of_row(title: str) -> set[str]:
    """Titles of the panels in the dashboard row ``title``."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    rows = [p for p in panels if p["type"] == "row"]
    (row,) = [r for r in rows if r["title"] == title]
    start = row["gridPos"]["y"]
    end = min((r["gridPos"]["y"] for r in rows if r["gridPos"]["y"] > start), default=10**6)
    return {p["title"] for p in panels if p["type"] != "row" and start < p["gridPos"]["y"] < end}


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title / refId, expression) for every query of the dashboard."""
    return [
        (f"{panel['title']} / {target['refId']}", target["expr"])
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]


def dashboard_variables() -> list[tuple[str, str]]:
    """(name, query) of the template variables, in dashboard order."""
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    return [
        (v["name"], v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
        for v in variables
        if v["type"] == "query"  # not the data source variable
    ]


def test_promtool_accepts_the_config_and_the_rules() -> None:
    result = _promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_stays_quiet() -> None:
    cases = [
        case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]
    ]
    for rule in alert_rules():
        name = rule["alert"]
        fires = [c for c in cases if c["alertname"] == name and c.get("exp_alerts")]
        quiet = [c for c in cases if c["alertname"] == name and not c.get("exp_alerts")]
        assert fires, f"no unit test makes {name} fire"
        assert quiet, f"no unit test checks that {name} stays quiet"


def test_bursts_and_budget_stopped_workers_fire_within_5_minutes_and_stay_firing() -> None:
    """Issue #15, case 4: the unit tests that pin it down are there (promtool runs them above)."""
    tests = {test["name"]: test for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]}

    def firing(test: str, alert: str) -> set[str]:
        return {
            case["eval_time"]
            for case in tests[test]["alert_rule_test"]
            if case["alertname"] == alert and case.get("exp_alerts")
        }

    # 4,200 invalid records within a minute (10m..11m): 3, 12 and 40 minutes after.
    assert firing("a burst of invalid records", "StreamtrainerDeadLetterRateHigh") >= {"14m", "23m", "51m"}
    assert firing("a burst of invalid records", "StreamtrainerInvalidRecordsHigh") >= {"14m", "23m"}
    # 40% of the stream invalid from 10m to 60m: within 2 minutes, and until it ends.
    for alert in ("StreamtrainerInvalidRecordsHigh", "StreamtrainerDeadLetterRateHigh"):
        assert firing("a lasting stream of invalid records", alert) >= {"12m", "59m"}
    # Stopped by its budget at 5m, then crash-looping: within a minute, and 3, 12 and 40 minutes after.
    budget = firing("a worker stopped by its error budget crash-loops", "StreamtrainerErrorBudgetExhausted")
    assert budget >= {"6m", "8m", "17m", "45m"}


def test_every_alert_says_how_bad_and_what_happened() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# -- PromQL: the metric names an expression reads --------------------------------------------

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana label_values() query)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    # Label lists of by/without/on/ignoring/group_x (...)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        # label_values(metric, label): the label is not a metric
        before = text[: match.start()].rstrip()
        if before.endswith(",") and text[: match.start()].count("label_values(") > 0:
            continue
        names.add(name)
    return names


def test_metric_names_are_extracted_from_promql() -> None:
    expr = (
        'sum by (le, instance) (rate(a_bucket{job=~"$job"}[$__rate_interval]) '
        'and on (job, instance) b_info{topic=~"x"}) > bool 0 or time() - c_seconds offset 5m'
    )
    assert metric_names(expr) == {"a_bucket", "b_info", "c_seconds"}
    assert metric_names('label_values(m_info{job=~"$job"}, instance)') == {"m_info"}
    assert metric_names("abs(x) == +Inf or y != y") == {"x", "y"}


# -- the live check ---------------------------------------------------------------------------


@dataclass
class Target:
    job: str
    port: int
    settings: WorkerSettings | None = None  # None: the producer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def exported(self) -> list[tuple[str, dict[str, str]]]:
        """(sample name, labels) of everything the /metrics endpoint serves right now."""
        with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=5) as response:
            text = response.read().decode()
        return [
            (sample.name, dict(sample.labels))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]


class PrometheusServer:
    """A real Prometheus on a free loopback port, with its own temporary storage."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.log = directory / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, config: dict[str, Any], timeout_s: float = 20.0) -> PrometheusServer:
        config_path = self.directory / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    _binary("prometheus"),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus did not become ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """GET an API path; the JSON body, errors included (status "error" with the reason)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params or {})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as error:  # 400/422: a bad query, the reason in the body
            return dict(json.loads(error.read()))

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", {"query": expr})

    def query_range(self, expr: str, seconds: float = 10.0) -> dict[str, Any]:
        """What Grafana sends for a time series panel: a range query over the last seconds."""
        end = time.time()
        return self.api(
            "query_range", {"query": expr, "start": f"{end - seconds:.3f}", "end": f"{end:.3f}", "step": "1"}
        )

    def value(self, expr: str) -> float:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else math.nan

    def label_values(self, label: str, match: str) -> list[str]:
        end = time.time()
        body = self.api(
            f"label/{label}/values", {"match[]": match, "start": f"{end - 300:.3f}", "end": f"{end:.3f}"}
        )
        assert body["status"] == "success", body
        return list(body["data"])


def _scrape_config(workers: list[Target], producer: Target, prometheus_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, its targets pointed at this test's processes, 1 s scrapes."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    targets = {
        WORKER_JOB: [w.address for w in workers],
        PRODUCER_JOB: [producer.address],
        "prometheus": [f"127.0.0.1:{prometheus_port}"],
    }
    for job in config["scrape_configs"]:
        assert job["job_name"] in targets, f"unexpected scrape job {job['job_name']}"
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


@dataclass
class LiveStack:
    prometheus: PrometheusServer
    workers: list[Target]
    producer: Target
    topics: dict[str, int]  # topic -> partitions


@pytest.fixture()
def live_stack(bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path) -> Iterator[LiveStack]:
    prometheus = PrometheusServer(tmp_path)  # skips the test early when the binary is missing
    _binary("prometheus")
    classification = topic_factory(partitions=3, prefix="deploy-cls")
    regression = topic_factory(partitions=2, prefix="deploy-reg")
    ranked = topic_factory(partitions=2, prefix="deploy-rank")
    stop = threading.Event()
    threads: list[threading.Thread] = []

    producer_registry = CollectorRegistry()
    producer_metrics = ProducerMetrics(producer_registry)
    producer_server = MetricsServer(producer_registry, host="127.0.0.1", port=0).start()
    producer = Target(PRODUCER_JOB, int(producer_server.port or 0))
    for topic, task in ((classification, "binary"), (regression, "regression"), (ranked, "binary")):
        # Many distinct record keys: none of them may turn up in a label.
        spec = SyntheticSpec(task=task, n_features=4, noise=0.05, seed=11, n_keys=500)

        def produce(topic: str = topic, spec: SyntheticSpec = spec) -> None:
            publish(
                KafkaSettings(bootstrap_servers=bootstrap),
                generate(spec, 200_000),
                topic=topic,
                codec="json",
                rate=300.0,
                metrics=producer_metrics,
                should_stop=stop.is_set,
            )

        threads.append(threading.Thread(target=produce, name=f"producer-{topic}", daemon=True))

    def produce_bad_records() -> None:
        """One bad record per BAD_EVERY good ones the producer delivered, on every topic."""
        bad = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        sent = dict.fromkeys((classification, regression, ranked), 0)
        while not stop.is_set():
            for topic in sent:
                delivered = producer_registry.get_sample_value(
                    "streamtrainer_producer_records_delivered_total", {"topic": topic}
                )
                while sent[topic] < int((delivered or 0) // BAD_EVERY):
                    value = BAD_VALUES[sent[topic] % len(BAD_VALUES)]
                    bad.produce(topic, key=f"bad-{sent[topic]}".encode(), value=value)
                    sent[topic] += 1
            bad.poll(0)
            stop.wait(0.1)
        bad.flush(10)

    threads.append(threading.Thread(target=produce_bad_records, name="bad-records", daemon=True))

    workers: list[Worker] = []
    for topic, model, lr in ((classification, "logistic", 0.05), (regression, "linear", 0.01)):
        settings = worker_settings(
            bootstrap,
            topic,
            f"group-{topic}",
            model=model,
            lr=lr,
            metrics_port=0,
            max_seconds=120.0,
            checkpoint_interval_s=1.0,  # checkpoints (and their metrics) every second
            checkpoint_dir=tmp_path / f"checkpoints-{topic}",
            prequential_window=200,
            # A compaction every few seconds (300 records/s), its store spilling to disk.
            compaction=True,
            compaction_every_records=1000,
            compaction_window=1000,
            compaction_memory_records=400,
        )
        worker = Worker(settings, registry=CollectorRegistry())
        workers.append(worker)
        threads.append(threading.Thread(target=worker.run, name=f"worker-{topic}", daemon=True))
    # worker --distributed, as torchrun launches it: one rank, its metrics on a port of its own.
    rank_settings = worker_settings(
        bootstrap,
        ranked,
        f"group-{ranked}",
        model="logistic",
        lr=0.05,
        distributed=True,
        metrics_port=free_port(),
        checkpoint_dir=tmp_path / f"checkpoints-{ranked}",
        checkpoint_interval_s=1.0,
        prequential_window=200,
        average_interval_s=1.0,
    )
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={RANKS}",
        "-m",
        "streamtrainer",
        "worker",
        "--distributed",
        *(("--bootstrap-servers", bootstrap, "--topic", ranked, "--group", rank_settings.group)),
        *(("--model", "logistic", "--lr", "0.05", "--prequential-window", "200")),
        *(("--metrics-host", "127.0.0.1", "--metrics-port", str(rank_settings.metrics_port))),
        *(("--checkpoint-dir", str(rank_settings.checkpoint_dir), "--checkpoint-interval-s", "1")),
        *(("--average-interval-s", "1", "--max-seconds", "120")),
    ]
    rank_log = tmp_path / "torchrun.log"
    for thread in threads:
        thread.start()
    launched = time.monotonic()
    with open(rank_log, "wb") as out:
        ranks = subprocess.Popen(launch, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    rank = Target(WORKER_JOB, rank_settings.metrics_port, rank_settings)
    try:
        _wait_for(lambda: all(w.metrics_server.port is not None for w in workers), "worker metrics", 30)
        targets = [Target(WORKER_JOB, int(w.metrics_server.port or 0), w.settings) for w in workers]
        # Scraping starts while the rank starts (torchrun and torch's import: 16-23 s measured here,
        # under load): the rank is down (up 0) meanwhile, far from StreamtrainerWorkerDown's minute.
        prometheus.start(_scrape_config([*targets, rank], producer, prometheus.port))
        _wait_for(lambda: _serves(rank) or ranks.poll() is not None, "the rank's metrics", 50)
        assert ranks.poll() is None, rank_log.read_text()[-3000:]
        logger.info("the rank served /metrics %.1f s after torchrun started", time.monotonic() - launched)
        yield LiveStack(prometheus, [*targets, rank], producer, {classification: 3, regression: 2, ranked: 2})
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ranks.pid, signal.SIGTERM)  # torchrun passes it to its rank
        try:
            ranks.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ranks.pid, signal.SIGKILL)
            ranks.wait()
        for worker in workers:
            worker.stop()
        for thread in threads:
            thread.join(timeout=30)
        prometheus.stop()
        producer_server.stop()


def _serves(target: Target) -> bool:
    """Whether ``target`` answers on /metrics yet."""
    try:
        target.exported()
    except OSError:
        return False
    return True


def _substitute(expr: str, variables: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    assert "$" not in expr, f"unresolved template variable in {expr}"
    return expr


def _promql_regex(values: list[str]) -> str:
    """Values as Grafana writes a multi-value variable into a =~ matcher (inside a PromQL string)."""
    escaped = [re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def _has_finite_value(body: dict[str, Any]) -> bool:
    return any(
        math.isfinite(float(value))
        for series in body["data"]["result"]
        for _, value in series.get("values", [series.get("value", (0, "NaN"))])
    )


def _wait_until_scraped_enough(stack: LiveStack) -> None:
    prometheus = stack.prometheus
    n = len(stack.workers)
    compacting = sum(1 for w in stack.workers if w.settings is not None and w.settings.compaction)
    ranks = sum(1 for w in stack.workers if w.settings is not None and w.settings.distributed)
    window = f"[{RATE_INTERVAL}]"
    # What each check counts, and how many workers it must count.
    checks = {
        "every worker trained": (
            f"count(sum by (instance) (rate(streamtrainer_records_trained_total{window})) > 0)",
            n,
        ),
        "every worker checkpointed": ("count(streamtrainer_last_checkpoint_timestamp_seconds > 0)", n),
        "every worker checkpointing now": (
            f"count(sum by (instance) (rate(streamtrainer_checkpoint_duration_seconds_count{window})) > 0)",
            n,
        ),
        "the compacting workers compacting now": (
            f"count(sum by (instance) (increase(streamtrainer_compactions_total{window})) > 0)",
            compacting,
        ),
        "the compacting workers spilled records to disk": (
            'count(streamtrainer_compaction_store_records{location="disk"} > 0)',
            compacting,
        ),
        "every worker dead-lettering now": (
            f"count(sum by (instance) (increase(streamtrainer_records_dead_lettered_total{window})) > 0)",
            n,
        ),
        "the ranks averaging now": (
            f"count(sum by (instance) (rate(streamtrainer_averaging_rounds_total{window})) > 0)",
            ranks,
        ),
        "the ranks measured their parameter distance": (
            "count(streamtrainer_parameter_distance >= 0)",
            ranks,
        ),
    }

    def ready() -> bool:
        if any(prometheus.value(expr) != count for expr, count in checks.values()):
            return False
        if prometheus.value("min(count_over_time(up[1m]))") < 8:
            return False
        if (
            not prometheus.value(
                f"sum(rate(streamtrainer_producer_records_delivered_total[{RATE_INTERVAL}]))"
            )
            > 0
        ):
            return False
        rules = [rule for group in prometheus.api("rules")["data"]["groups"] for rule in group["rules"]]
        return bool(rules) and all(rule["health"] != "unknown" for rule in rules)

    try:
        _wait_for(ready, "a few scrapes of three training workers and a producer", 60)
    except AssertionError:
        status = {what: (prometheus.value(expr), count) for what, (expr, count) in checks.items()}
        raise AssertionError(f"not enough data in Prometheus: {status}") from None


@pytest.mark.integration
def test_prometheus_scrapes_live_workers_and_every_dashboard_and_alert_query_works(
    live_stack: LiveStack, tmp_path: Path
) -> None:
    stack = live_stack
    prometheus = stack.prometheus
    started = time.monotonic()
    _wait_until_scraped_enough(stack)
    logger.info(
        "enough data after %.1fs; %s compactions so far",
        time.monotonic() - started,
        prometheus.value("sum(streamtrainer_compactions_total)"),
    )
    problems: list[str] = []

    # The template variables, resolved as Grafana does: each query sees the ones before it.
    resolved: dict[str, list[str]] = {}
    as_regex: dict[str, str] = {}
    for name, query in dashboard_variables():
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", _substitute(query, as_regex))
        assert match, f"variable {name}: {query} is not label_values(metric, label)"
        values = prometheus.label_values(match.group(2), match.group(1))
        resolved[name] = values
        as_regex[name] = _promql_regex(values) if values else "^$"
    assert resolved["job"] == [WORKER_JOB], resolved
    assert sorted(resolved["instance"]) == sorted(w.address for w in stack.workers), resolved
    assert sorted(resolved["topic"]) == sorted(stack.topics), resolved

    # Every dashboard query, with "All" selected: valid, and data (a finite value) from the live workers.
    everything = {"job": WORKER_JOB, "instance": ".*", "topic": ".*"}
    returned = 0
    for where, expr in dashboard_expressions():
        body = prometheus.query_range(_substitute(expr, everything))
        if body["status"] != "success":
            problems.append(f"dashboard {where}: invalid: {body.get('error')}: {expr}")
        elif not _has_finite_value(body):
            problems.append(f"dashboard {where}: no data: {expr}")
        else:
            returned += 1
    logger.info("%d of %d dashboard expressions returned data", returned, len(dashboard_expressions()))

    # One worker selected (instance and its topic): every panel still shows it, but for the
    # compaction panels of a worker that does not compact and the rank panels of one without
    # --distributed.
    compaction_panels, rank_panels = panels_of_row(COMPACTION_ROW), panels_of_row(RANK_ROW)
    for worker in stack.workers:
        assert worker.settings is not None
        one = {
            "job": WORKER_JOB,
            "instance": _promql_regex([worker.address]),
            "topic": _promql_regex([worker.settings.topic]),
        }
        for panel in dashboard_panels():
            compaction_only = all("compaction" in t["expr"] for t in panel["targets"])
            if panel["title"] in compaction_panels and compaction_only and not worker.settings.compaction:
                continue
            if panel["title"] in rank_panels and not worker.settings.distributed:
                continue
            bodies = [prometheus.query_range(_substitute(t["expr"], one)) for t in panel["targets"]]
            if not any(body["status"] == "success" and _has_finite_value(body) for body in bodies):
                problems.append(f"dashboard {panel['title']}: no data with only {worker.address} selected")

    # Every alert expression: valid, and quiet on this healthy stack.
    for rule in alert_rules():
        body = prometheus.query(rule["expr"])
        if body["status"] != "success":
            problems.append(f"alert {rule['alert']}: invalid: {body.get('error')}")
        elif body["data"]["result"]:
            problems.append(f"alert {rule['alert']}: fires on a healthy stack: {body['data']['result']}")
    # ... and as Prometheus itself evaluates them from the rule file.
    for group in prometheus.api("rules")["data"]["groups"]:
        for rule in group["rules"]:
            if rule["health"] != "ok" or rule.get("lastError"):
                problems.append(f"rule {rule['name']}: health {rule['health']}: {rule.get('lastError')}")
    firing = [
        a["labels"]["alertname"] for a in prometheus.api("alerts")["data"]["alerts"] if a["state"] == "firing"
    ]
    if firing:
        problems.append(f"alerts firing on a healthy stack: {firing}")

    # Every metric the dashboard and the rules read is one the worker or the producer exports.
    exported = {name for target in [*stack.workers, stack.producer] for name, _ in target.exported()}
    queries = [expr for _, expr in dashboard_expressions()] + [q for _, q in dashboard_variables()]
    queries += [rule["expr"] for rule in alert_rules()]
    for expr in queries:
        for name in sorted(metric_names(expr) - exported - PROMETHEUS_SYNTHETIC - OTHER_TASKS):
            problems.append(f"{name} is read by `{expr}` but exported by no worker or producer")
    # Exported at zero from the start: a rate over it sees the very first failed delivery.
    produced = stack.producer.exported()
    for topic in stack.topics:
        if ("streamtrainer_producer_records_failed_total", {"topic": topic}) not in produced:
            problems.append(f"the producer does not export its failed-records counter for {topic}")

    problems += _unbounded_labels(stack)
    assert not problems, "\n".join(problems)

    # deploy/grafana/preview.py (docs/deploy.md's picture of the dashboard) still draws it.
    spec = importlib.util.spec_from_file_location("preview", ROOT / "deploy" / "grafana" / "preview.py")
    assert spec is not None and spec.loader is not None
    preview = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preview)
    picture = tmp_path / "dashboard.png"
    preview.render(preview.Prometheus(prometheus.url), picture, minutes=0.5, step_s=1.0)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _unbounded_labels(stack: LiveStack) -> list[str]:
    """Label values must come from small fixed sets; the number of series must not grow with records."""
    problems: list[str] = []
    partitions = {topic: {str(p) for p in range(n)} for topic, n in stack.topics.items()}
    before: dict[str, set[tuple[str, tuple[tuple[str, str], ...]]]] = {}
    for target in [*stack.workers, stack.producer]:
        samples = target.exported()
        before[target.address] = {(name, tuple(sorted(labels.items()))) for name, labels in samples}
        buckets: dict[str, set[str]] = {}
        for name, labels in samples:
            for label, value in labels.items():
                if label == "topic":
                    ok = value in stack.topics
                elif label == "partition":
                    ok = value in partitions.get(labels.get("topic", ""), set())
                elif label == "reason" and name.startswith("streamtrainer_compactions_"):
                    ok = value in COMPACTION_REASONS
                elif label == "reason":
                    ok = value in DEAD_LETTER_REASONS
                elif label == "location":
                    ok = value in STORE_LOCATIONS
                elif label == "scope":
                    ok = value in PROGRESSIVE_SCOPES
                elif label == "sign":
                    ok = value in LABEL_SIGNS
                elif label == "rank":  # the torchrun RANK of a --distributed worker
                    ok = target.settings is not None and target.settings.distributed
                    ok = ok and value in {str(r) for r in range(RANKS)}
                elif label == "le":
                    buckets.setdefault(name, set()).add(value)
                    ok = True
                elif name == "streamtrainer_worker_info" and target.settings is not None:
                    configured = {
                        "group": target.settings.group,
                        "model": target.settings.model,
                        "task": target.settings.resolved_task,
                        "optimizer": target.settings.optimizer,
                    }
                    ok = configured.get(label) == value
                else:
                    ok = False
                if not ok:
                    problems.append(
                        f"{target.address}: {name}{{{label}={value!r}}} is not from a bounded set"
                    )
        for name, values in buckets.items():
            if len(values) > 30:
                problems.append(f"{target.address}: {name} has {len(values)} buckets")

    # More records flow; the same series (no new label values) must describe them.
    prometheus = stack.prometheus
    trained = prometheus.value("sum(streamtrainer_records_trained_total)")
    _wait_for(
        lambda: prometheus.value("sum(streamtrainer_records_trained_total)") >= trained + 500,
        "500 more records trained",
        20,
    )
    for target in [*stack.workers, stack.producer]:
        after = {(name, tuple(sorted(labels.items()))) for name, labels in target.exported()}
        if after != before[target.address]:
            problems.append(
                f"{target.address}: {len(before[target.address])} series, then {len(after)} after more "
                f"records (new: {sorted(after - before[target.address])}, "
                f"gone: {sorted(before[target.address] - after)})"
            )
    return problems
