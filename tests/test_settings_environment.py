"""Settings read the environment and the --config file in the CLI only, never built in code (issue 19)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamtrainer.cli import build_settings
from streamtrainer.settings import ENV_PREFIX, KafkaSettings, ReplaySettings, WorkerSettings

# A variable of every kind the CLI reads: shared, the command's own, a renamed field's alias, the
# --config file's variable, a list and a dict.
VARIABLES = {
    f"{ENV_PREFIX}LR": "0.5",
    f"{ENV_PREFIX}WORKER_SEED": "7",
    f"{ENV_PREFIX}BOOTSTRAP_SERVERS": "env-host:9092",
    f"{ENV_PREFIX}FEATURE_NAMES": "a,b",
    f"{ENV_PREFIX}KAFKA_CONFIG": "acks=all",
    f"{ENV_PREFIX}FROM": "0:3",
}


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in VARIABLES.items():
        monkeypatch.setenv(name, value)


def test_settings_built_in_code_take_their_arguments_and_defaults_only(environment: None) -> None:
    settings = WorkerSettings(topic="t", group="g")
    assert (settings.lr, settings.seed, settings.bootstrap_servers) == (0.1, 0, None)
    assert (settings.feature_names, settings.kafka_config) == (None, {})
    assert settings.model_fields_set == {"topic", "group"}
    assert KafkaSettings().bootstrap_servers is None
    assert ReplaySettings(topic="t", out=Path("o")).from_ == "earliest"
    # Arguments are validated as ever (a usage error stays one).
    with pytest.raises(ValueError, match="lr"):
        WorkerSettings(topic="t", lr=-1.0)


def test_the_cli_and_load_read_the_environment_as_before(environment: None, tmp_path: Path) -> None:
    for settings in (build_settings(WorkerSettings, {"topic": "t"}), WorkerSettings.load({"topic": "t"})):
        assert (settings.lr, settings.seed, settings.bootstrap_servers) == (0.5, 7, "env-host:9092")
        assert (settings.feature_names, settings.kafka_config) == (["a", "b"], {"acks": "all"})
    assert build_settings(ReplaySettings, {"topic": "t", "out": Path("o")}).from_ == "0:3"
    # The --config file too, under the variables; and only through load.
    path = tmp_path / "streamtrainer.toml"
    path.write_text('[worker]\ngroup = "from-file"\nhidden = 9\n')
    loaded = WorkerSettings.load({"topic": "t"}, path)
    assert (loaded.group, loaded.hidden, loaded.lr) == ("from-file", 9, 0.5)
    assert (WorkerSettings(topic="t").group, WorkerSettings(topic="t").hidden) == ("streamtrainer", 128)


def test_a_usage_error_of_the_cli_names_the_variable_it_came_from(environment: None) -> None:
    """The environment is still read on the CLI's path: a bad variable fails there, and only there."""
    result = subprocess.run(
        [sys.executable, "-m", "streamtrainer", "worker", "--topic", "t"],
        capture_output=True,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)},
            **VARIABLES,
            f"{ENV_PREFIX}LR": "-2",
        },
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("streamtrainer: error: --lr:"), result.stderr
