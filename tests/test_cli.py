"""The command line as a user meets it: real processes, real broker, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from streamtrainer.settings import (
    DemoSettings,
    ExportSettings,
    ProducerSettings,
    ReplaySettings,
    ServeSettings,
    WorkerSettings,
    env_name,
    public_name,
)
from tests.helpers import committed_offsets

CLI = [sys.executable, "-m", "streamtrainer.cli"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAINER_")}
    full_env.update(env or {})
    # A scratch working directory keeps default outputs (checkpoints/, runs/) out of the checkout.
    with tempfile.TemporaryDirectory(prefix="streamtrainer-cli-") as cwd:
        return subprocess.run(
            [*CLI, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            cwd=cwd,
            check=False,
        )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streamtrainer: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["worker", "--topic", "t", "--bogus"], "No such option"),
        (["worker", "--topic", "t", "--lr", "-1"], "--lr"),
        (["worker", "--topic", "t", "--optimizer", "lbfgs"], "lbfgs"),
        (["worker", "--model", "softmax", "--topic", "t"], "n_classes"),
        (["worker", "--model", "nonsense", "--topic", "t"], "nonsense"),
        (["worker"], "--topic is required"),
        (["produce", "--topic", "t", "--codec", "xml"], "xml"),
        (["worker", "--topic", "t", "--kafka-config", "novalue"], "KEY=VALUE"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(args: list[str], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert expected in _one_line_error(result)


@pytest.mark.parametrize("command", ["worker", "produce"])
def test_unreachable_broker_gives_one_line_and_exit_1(command: str) -> None:
    result = run_cli(
        command, "--topic", "t", "--bootstrap-servers", "127.0.0.1:1", "--startup-timeout-s", "2"
    )
    assert result.returncode == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in _one_line_error(result)


def test_missing_topic_and_bad_source_are_clear(bootstrap: str) -> None:
    result = run_cli(
        "worker", "--topic", "no-such-topic-xyz", "--bootstrap-servers", bootstrap, "--metrics-port", "-1"
    )
    assert result.returncode == 1
    assert "does not exist" in _one_line_error(result)
    result = run_cli(
        "produce",
        "--topic",
        "t",
        "--source",
        "csv:/no/such.csv",
        "--label",
        "y",
        "--bootstrap-servers",
        bootstrap,
        "--partitions",
        "1",
        "--metrics-port",
        "-1",
    )
    assert result.returncode == 2  # a CSV file is read before connecting: a usage error
    assert "/no/such.csv" in _one_line_error(result)


def test_environment_configures_a_produce_then_worker_run(bootstrap: str, group_id: str, tmp_path) -> None:
    topic = f"cli-{group_id}"
    env = {env_name("bootstrap_servers"): bootstrap, env_name("topic"): topic, env_name("metrics_port"): "-1"}
    produced = run_cli(
        "produce", "--max-records", "1500", "--partitions", "2", "--synthetic-task", "binary", env=env
    )
    assert produced.returncode == 0, produced.stderr
    assert "produced 1500 record(s)" in produced.stdout
    trained = run_cli(
        "worker",
        "--model",
        "logistic",
        "--max-records",
        "1500",
        "--group",
        group_id,
        "--session-timeout-ms",
        "6000",
        env=env,
    )
    assert trained.returncode == 0, trained.stderr
    assert "trained 1500 record(s)" in trained.stdout
    # The whole run's figures, then the window's, named (a binary model: accuracy, log loss, AUC).
    assert "prequential over 1,500 records: accuracy " in trained.stdout
    assert all(part in trained.stdout for part in ("(last 1,000: ", "log loss ", "ROC AUC "))
    assert sum(committed_offsets(bootstrap, topic, group_id).values()) == 1500


def test_every_setting_has_an_env_name_and_a_flag() -> None:
    for command, settings_class in (
        ("worker", WorkerSettings),
        ("produce", ProducerSettings),
        ("demo", DemoSettings),
        ("replay", ReplaySettings),
        ("serve", ServeSettings),
        ("export", ExportSettings),
    ):
        help_text = run_cli(command, "--help").stdout
        for name, field in settings_class.model_fields.items():
            assert "--" + public_name(name).replace("_", "-") in help_text, name
            assert env_name(name) in help_text.replace("\n", "").replace(" ", ""), name
            assert field.description, name
