"""``--config FILE`` (TOML, per-command sections) and one syntax for lists (issue 20).

Precedence is flags > ``STREAMTRAINER_*`` variables > the file > defaults, each applied by
pydantic-settings' own sources; a list is ``a,b`` (or JSON) in a flag and a variable, a native
array in the file. Most cases build the settings in-process through the CLI's own
``build_settings``; the file errors and one real run go through the command as a user runs it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from streamtrainer.cli import build_settings
from streamtrainer.exceptions import ConfigurationError
from streamtrainer.settings import (
    ENV_PREFIX,
    DeadLetterSettings,
    ProducerSettings,
    ReplaySettings,
    WorkerSettings,
)
from tests.test_cli import _one_line_error, run_cli

UNREACHABLE = ("--bootstrap-servers", "127.0.0.1:1", "--startup-timeout-s", "60", "--metrics-port", "-1")


@pytest.fixture(autouse=True)
def _no_streamtrainer_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case sets the variables it means; none leaks in from the test run's environment."""
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "streamtrainer.toml"
    path.write_text(text)
    return path


def test_flags_beat_variables_beat_the_file_beats_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config(
        tmp_path,
        """
        [worker]
        topic = "from-file"
        lr = 0.5
        group = "file-group"
        checkpoint_keep = 7
        """,
    )
    monkeypatch.setenv(f"{ENV_PREFIX}LR", "0.25")
    monkeypatch.setenv(f"{ENV_PREFIX}GROUP", "env-group")
    settings = build_settings(WorkerSettings, {"config_file": path, "lr": 0.75, "group": None})
    assert settings.lr == 0.75  # flag over variable and file
    assert settings.group == "env-group"  # variable over file
    assert settings.checkpoint_keep == 7  # file over default
    assert settings.topic == "from-file"
    assert settings.checkpoint_interval_s == 30.0  # default


def test_a_command_reads_its_section_then_kafka_then_top_level_keys(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        """
        topic = "shared"
        startup_timeout_s = 1

        [kafka]
        bootstrap_servers = "kafka:9092"
        startup_timeout_s = 2

        [worker]
        topic = "worker-topic"
        startup_timeout_s = 3

        [replay]
        out = "replay-out"
        from = "0:5"
        epochs = 2

        [produce]
        max_records = 40
        """,
    )
    worker = build_settings(WorkerSettings, {"config_file": path})
    assert (worker.topic, worker.startup_timeout_s, worker.bootstrap_servers) == (
        "worker-topic",
        3,
        "kafka:9092",
    )
    replay = build_settings(ReplaySettings, {"config_file": path})
    assert (replay.topic, replay.startup_timeout_s, replay.bootstrap_servers) == ("shared", 2, "kafka:9092")
    assert (replay.out, replay.from_, replay.epochs) == (Path("replay-out"), "0:5", 2)
    # Another command's section is not read: the worker trains in its default epochs, produce has no epochs.
    assert worker.compaction_epochs == 3
    assert build_settings(ProducerSettings, {"config_file": path}).max_records == 40


def test_unknown_keys_and_sections_are_named_with_the_likely_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(
        tmp_path,
        """
        topic = "t"
        lrr = 0.1
        reason = ["oversize"]  # a dlq setting at the top level: read by dlq, not unknown

        [wroker]
        lr = 0.1

        [kafka]
        bootstrap_server = "kafka:9092"

        [worker]
        compaction_epocs = 4
        """,
    )
    settings = build_settings(WorkerSettings, {"config_file": path})
    assert settings.compaction_epochs == 3  # the misspelled key did nothing
    warnings = capsys.readouterr().err.splitlines()
    prefix = f"streamtrainer: warning: --config {path}: "
    assert warnings == [
        prefix + "unknown key lrr ignored (did you mean lr?)",
        prefix + "unknown section [wroker] ignored (did you mean [worker]?)",
        prefix + "unknown key [kafka] bootstrap_server ignored (did you mean bootstrap_servers?)",
        prefix + "unknown key [worker] compaction_epocs ignored (did you mean compaction_epochs?)",
    ]


LIST_WAYS = [
    pytest.param({"feature_names": ("a,b",)}, {}, "", id="flag a,b"),
    pytest.param({"feature_names": ("a", "b")}, {}, "", id="flag repeated"),
    pytest.param({}, {"FEATURE_NAMES": "a,b"}, "", id="variable a,b"),
    pytest.param({}, {"FEATURE_NAMES": '["a", "b"]'}, "", id="variable JSON"),
    pytest.param({}, {}, 'feature_names = ["a", "b"]', id="file array"),
    pytest.param({}, {}, 'feature_names = "a,b"', id="file a,b"),
]


@pytest.mark.parametrize(("flags", "variables", "file_line"), LIST_WAYS)
def test_a_list_is_written_the_same_way_everywhere(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: dict[str, Any],
    variables: dict[str, str],
    file_line: str,
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(ENV_PREFIX + name, value)
    path = _config(tmp_path, f'[worker]\ntopic = "t"\n{file_line}\n')
    settings = build_settings(WorkerSettings, {"config_file": path, **flags})
    assert settings.feature_names == ["a", "b"]


DICT_WAYS = [
    pytest.param({"kafka_config": ("acks=all,linger.ms=5",)}, {}, "", id="flag K=V,K=V"),
    pytest.param({"kafka_config": ("acks=all", "linger.ms=5")}, {}, "", id="flag repeated"),
    pytest.param({}, {"KAFKA_CONFIG": "acks=all,linger.ms=5"}, "", id="variable K=V,K=V"),
    pytest.param({}, {"KAFKA_CONFIG": '{"acks": "all", "linger.ms": "5"}'}, "", id="variable JSON"),
    pytest.param({}, {}, 'kafka_config = { acks = "all", "linger.ms" = 5 }', id="file table"),
]


@pytest.mark.parametrize(("flags", "variables", "file_line"), DICT_WAYS)
def test_a_dict_is_written_the_same_way_everywhere(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: dict[str, Any],
    variables: dict[str, str],
    file_line: str,
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(ENV_PREFIX + name, value)
    path = _config(tmp_path, f'[kafka]\n{file_line}\n[worker]\ntopic = "t"\n')
    settings = build_settings(WorkerSettings, {"config_file": path, **flags})
    assert settings.kafka_config == {"acks": "all", "linger.ms": "5"}


def test_a_comma_inside_a_value_stays_with_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """``bootstrap.servers=a:9092,b:9092``: a piece without ``=`` continues the previous value."""
    monkeypatch.setenv(f"{ENV_PREFIX}DLQ_KAFKA_CONFIG", "bootstrap.servers=a:9092,b:9092,acks=all")
    settings = build_settings(DeadLetterSettings, {"topic": "t", "reason": ("oversize,non_finite",)})
    assert settings.reason == ["oversize", "non_finite"]
    worker = build_settings(WorkerSettings, {"topic": "t"})
    assert worker.dlq_kafka_config == {"bootstrap.servers": "a:9092,b:9092", "acks": "all"}


def test_a_value_of_the_wrong_type_in_the_file_is_a_configuration_error(tmp_path: Path) -> None:
    path = _config(tmp_path, '[worker]\ntopic = "t"\nlr = "fast"\n')
    with pytest.raises(ConfigurationError, match="--lr"):
        build_settings(WorkerSettings, {"config_file": path})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'topic = "t"\n[worker\nlr = 0.1\n',
            "not valid TOML: Expected ']' at the end of a table declaration",
        ),
        ('topic = "t"\nlr = \n', "not valid TOML: Invalid value (at line 2"),
        ("worker = 3\n", "worker must be a table ([worker])"),
        ('[worker]\ntopic = "t"\nlr = -1\n', "--lr: Input should be greater than 0"),
    ],
)
def test_a_malformed_file_is_one_line_and_exit_2_before_connecting(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = _config(tmp_path, text)
    result = run_cli("worker", "--config", str(path), *UNREACHABLE)
    assert result.returncode == 2, result.stderr
    line = _one_line_error(result)
    assert expected in line
    if "TOML" in expected:
        assert str(path) in line


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("worker", "--config", str(tmp_path / "missing.toml"), "--topic", "t", *UNREACHABLE)
    assert result.returncode == 2, result.stderr
    assert "missing.toml" in _one_line_error(result)


def test_streamtrainer_config_names_the_file_too(tmp_path: Path) -> None:
    """The file's value is read (here refused: exit 2 naming it), without --config on the line."""
    path = _config(tmp_path, '[worker]\ntopic = "t"\nlr = -1\n')
    result = run_cli("worker", *UNREACHABLE, env={f"{ENV_PREFIX}CONFIG": str(path)})
    assert result.returncode == 2, result.stderr
    assert "--lr" in _one_line_error(result)


def test_a_produce_run_takes_its_settings_from_the_file(
    bootstrap: str, group_id: str, tmp_path: Path
) -> None:
    path = _config(
        tmp_path,
        f"""
        topic = "config-{group_id}"

        [kafka]
        bootstrap_servers = "{bootstrap}"

        [produce]
        max_records = 40
        partitions = 1
        metrics_port = -1
        synthetic_task = "binary"
        """,
    )
    result = run_cli("produce", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "produced 40 record(s)" in result.stdout
    assert "warning" not in result.stderr


def test_the_documented_example_file_is_read_without_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/configuration.md's config file (its first ```toml block) sets what it says, silently."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", page, flags=re.DOTALL)
    assert blocks, "docs/configuration.md has a ```toml example"
    path = _config(tmp_path, blocks[0])
    worker = build_settings(WorkerSettings, {"config_file": path})
    assert (worker.topic, worker.group, worker.model) == ("samples", "trainers", "logistic")
    assert worker.kafka_secret_file == {"sasl.password": Path("/run/secrets/kafka-password")}
    replay = build_settings(ReplaySettings, {"config_file": path})
    assert (replay.bootstrap_servers, replay.epochs) == ("kafka:9092", 5)
    dlq = build_settings(DeadLetterSettings, {"config_file": path})
    assert dlq.reason == ["non_finite", "oversize"]
    assert capsys.readouterr().err == ""
