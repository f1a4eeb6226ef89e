"""``--help`` in sections, required flags named, test-only choices hidden (issue 20)."""

from __future__ import annotations

import re

import pytest

from streamtrainer.settings import WorkerSettings, public_name
from tests.test_cli import run_cli

WORKER_SECTIONS = [
    "Required",
    "Options",
    "Kafka",
    "Model",
    "Run",
    "Checkpoints",
    "Distributed",
    "Compaction and drift",
    "Guards",
    "Dead letters and errors",
    "Metrics and logging",
]


def _sections(help_text: str) -> dict[str, str]:
    """Each section's title and its text, in order."""
    parts = re.split(r"^([A-Z][A-Za-z ]+):$", help_text, flags=re.MULTILINE)
    return {title: body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def _flags(body: str) -> list[str]:
    return re.findall(r"^  (--[a-z0-9-]+)", body, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def worker_help() -> str:
    result = run_cli("worker", "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_worker_help_is_in_sections(worker_help: str) -> None:
    sections = _sections(worker_help)
    assert list(sections) == WORKER_SECTIONS
    expected = {
        "Kafka": ["--bootstrap-servers", "--topic", "--group", "--kafka-config", "--auto-offset-reset"],
        "Model": ["--model", "--task", "--loss", "--optimizer", "--lr", "--device", "--update-batch"],
        "Run": ["--max-records", "--max-seconds", "--stop-at-end"],
        "Checkpoints": ["--checkpoint-dir", "--checkpoint-every-records", "--fresh", "--init-from"],
        "Distributed": [
            "--distributed",
            "--average-every-records",
            "--average-interval-s",
            "--average-warmup-records",
            "--average-reduction",
            "--collective-timeout-s",
        ],
        "Compaction and drift": ["--compaction-epochs", "--compaction-batch-size", "--drift-detector"],
        "Guards": ["--spike-factor", "--lr-backoff", "--clip-grad-norm"],
        "Dead letters and errors": [
            "--dlq-topic",
            "--errors-tolerance",
            "--error-budget",
            "--max-value-bytes",
        ],
        "Metrics and logging": ["--metrics-port", "--metrics-host", "--run-log", "--log-level"],
        "Options": ["--config"],
    }
    for title, flags in expected.items():
        listed = _flags(sections[title])
        for flag in flags:
            assert flag in listed, (title, flag)


def test_every_worker_flag_is_listed_once(worker_help: str) -> None:
    sections = _sections(worker_help)
    listed = [flag for title, body in sections.items() if title != "Required" for flag in _flags(body)]
    assert len(listed) == len(set(listed))
    for name in WorkerSettings.model_fields:
        assert "--" + public_name(name).replace("_", "-") in listed, name


def test_required_flags_are_marked(worker_help: str) -> None:
    sections = _sections(worker_help)
    assert sections["Required"].split() == ["--topic,", "--bootstrap-servers"]
    kafka = " ".join(sections["Kafka"].split())
    assert "STREAMTRAINER_TOPIC; required]" in kafka
    assert "STREAMTRAINER_BOOTSTRAP_SERVERS; required (or bootstrap.servers in --kafka-config" in kafka


def test_the_demo_needs_no_bootstrap_server() -> None:
    """It starts the embedded broker without one: nothing is required."""
    sections = _sections(run_cli("demo", "--help").stdout)
    assert "Required" not in sections
    assert "--bootstrap-servers" in _flags(sections["Kafka"])


@pytest.mark.parametrize("command", ["produce", "replay", "dlq inspect", "dlq redrive", "demo"])
def test_every_settings_command_has_sections(command: str) -> None:
    sections = _sections(run_cli(*command.split(), "--help").stdout)
    assert {"Options", "Kafka", "Metrics and logging"} <= set(sections)
    assert "--config" in _flags(sections["Options"])


@pytest.mark.parametrize("command", ["worker", "replay"])
def test_test_only_choices_are_not_offered(command: str) -> None:
    help_text = run_cli(command, "--help").stdout
    assert "audit" not in help_text
    assert "[auto|mse|l1|bce|ce]" in " ".join(help_text.split())


def test_a_test_only_choice_is_still_accepted() -> None:
    """The crash test's audit loss passes the flag check (then fails only on the broker)."""
    result = run_cli(
        "worker", "--topic", "t", "--bootstrap-servers", "127.0.0.1:1", "--startup-timeout-s", "1",
        "--metrics-port", "-1", "--loss", "audit", "--optimizer", "sgd",
    )  # fmt: skip
    assert "cannot reach Kafka" in result.stderr, result.stderr
    assert result.returncode == 1
