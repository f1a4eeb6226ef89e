"""One name per concept across commands (issue 20); the old spellings are hidden aliases for a
release: accepted as a flag, a variable or a --config key, absent from --help, and each use says
so in one warning line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from streamtrainer.cli import build_settings
from streamtrainer.settings import (
    COMMAND_SETTINGS,
    ENV_PREFIX,
    DeadLetterSettings,
    ProducerSettings,
    ReplaySettings,
    WorkerSettings,
    _Settings,
)
from tests.test_cli import run_cli


class Rename(NamedTuple):
    old: str
    command: str
    settings_class: type[_Settings]
    new: str
    value: Any


RENAMED = [
    pytest.param(Rename("count", "produce", ProducerSettings, "max_records", 5), id="produce --count"),
    pytest.param(Rename("limit", "dlq inspect", DeadLetterSettings, "max_records", 5), id="dlq --limit"),
    pytest.param(Rename("end_idle_s", "replay", ReplaySettings, "idle_s", 2.5), id="replay --end-idle-s"),
]
REQUIRED: dict[type[_Settings], dict[str, Any]] = {
    ProducerSettings: {"topic": "t"},
    DeadLetterSettings: {"topic": "t"},
    ReplaySettings: {"topic": "t", "out": Path("out")},
}


@pytest.fixture(autouse=True)
def _no_streamtrainer_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_stop_after_n_and_idle_have_one_name_in_every_command() -> None:
    for command in (WorkerSettings, ProducerSettings, DeadLetterSettings):
        assert "max_records" in command.model_fields, command
    for command in (ReplaySettings, DeadLetterSettings):
        assert "idle_s" in command.model_fields, command
    # Epochs, batch size and memory records: the worker's compaction is replay's run, in its section.
    for name in ("epochs", "batch_size", "memory_records"):
        assert name in ReplaySettings.model_fields
        assert f"compaction_{name}" in WorkerSettings.model_fields
    old = {"count", "limit", "end_idle_s"}
    assert not old & {name for command in COMMAND_SETTINGS.values() for name in command.model_fields}


@pytest.mark.parametrize("rename", RENAMED)
def test_an_old_flag_still_works_with_a_warning(
    capsys: pytest.CaptureFixture[str],
    rename: Rename,
) -> None:
    old, _, settings_class, new, value = rename
    settings = build_settings(settings_class, {**REQUIRED[settings_class], old: value})
    assert getattr(settings, new) == value
    assert capsys.readouterr().err.splitlines() == [
        f"streamtrainer: warning: {_flag(old)} is deprecated: use {_flag(new)}"
    ]
    # Given both, the new name wins.
    settings = build_settings(settings_class, {**REQUIRED[settings_class], old: value, new: value * 2})
    assert getattr(settings, new) == value * 2


@pytest.mark.parametrize("rename", RENAMED)
def test_an_old_variable_still_works_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rename: Rename,
) -> None:
    old, _, settings_class, new, value = rename
    old_variable, new_variable = ENV_PREFIX + old.upper(), ENV_PREFIX + new.upper()
    monkeypatch.setenv(old_variable, str(value))
    settings = build_settings(settings_class, REQUIRED[settings_class])
    assert getattr(settings, new) == value
    assert capsys.readouterr().err.splitlines() == [
        f"streamtrainer: warning: {old_variable} is deprecated: use {new_variable}"
    ]
    monkeypatch.setenv(new_variable, str(value * 2))
    assert getattr(build_settings(settings_class, REQUIRED[settings_class]), new) == value * 2


@pytest.mark.parametrize("rename", RENAMED)
def test_an_old_file_key_still_works_with_a_warning(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rename: Rename,
) -> None:
    old, _, settings_class, new, value = rename
    section = settings_class.config_section
    path = tmp_path / "streamtrainer.toml"
    path.write_text(f"[{section}]\n{old} = {value}\n")
    settings = build_settings(settings_class, {**REQUIRED[settings_class], "config_file": path})
    assert getattr(settings, new) == value
    assert capsys.readouterr().err.splitlines() == [
        f"streamtrainer: warning: --config {path}: [{section}] {old} is deprecated: use {new}"
    ]


@pytest.mark.parametrize("rename", RENAMED)
def test_help_shows_the_new_name_only(rename: Rename) -> None:
    old, command, _, new, _ = rename
    help_text = run_cli(*command.split(), "--help").stdout
    assert f"{_flag(new)} " in help_text
    assert f"{_flag(old)} " not in help_text
    assert ENV_PREFIX + old.upper() not in help_text.replace("\n", "").replace(" ", "")


def test_an_old_flag_works_on_the_command_line(tmp_path: Path) -> None:
    """Through click as a user types it: the hidden --end-idle-s reaches the setting (a bad value is
    refused under the new name, before connecting)."""
    result = run_cli(
        "replay", "--topic", "t", "--out", str(tmp_path), "--bootstrap-servers", "127.0.0.1:1",
        "--end-idle-s", "-1",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "streamtrainer: warning: --end-idle-s is deprecated: use --idle-s"
    assert lines[1].startswith("streamtrainer: error: --idle-s: Input should be greater than 0")
