"""Each command's own variables, and the data's seed and task apart from the model's (issue 20).

``STREAMTRAINER_<COMMAND>_<NAME>`` (``STREAMTRAINER_WORKER_SEED``) overrides the shared
``STREAMTRAINER_<NAME>`` for that command only, so one shell can run ``produce`` and ``worker``
with different values; precedence is flag > command variable > shared variable > --config file >
default. ``produce``'s generator settings that are not a model's have their own names
(``--synthetic-seed``, ``--synthetic-task``): the worker's ``STREAMTRAINER_SEED`` no longer seeds
the data. Most cases build the settings in-process through the CLI's own ``build_settings``; one
runs both commands as a user would, against the embedded broker."""

from __future__ import annotations

import os
import socket
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
    command_env_name,
    env_name,
)
from tests.test_cli import run_cli

WORKER = {"topic": "t", "model": "mlp", "task": "binary"}
PRODUCER = {"topic": "t"}


@pytest.fixture(autouse=True)
def _no_streamtrainer_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case sets the variables it means; none leaks in from the test run's environment."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning" in line]


def test_one_environment_gives_produce_and_worker_their_own_seed_task_and_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {
        "STREAMTRAINER_SEED": "3",  # the model's
        "STREAMTRAINER_TASK": "binary",  # the model's
        "STREAMTRAINER_METRICS_PORT": "9600",  # every command's, unless its own says otherwise
        "STREAMTRAINER_PRODUCE_METRICS_PORT": "9601",
        "STREAMTRAINER_SYNTHETIC_SEED": "11",  # the data's
        "STREAMTRAINER_SYNTHETIC_TASK": "regression",
    }.items():
        monkeypatch.setenv(name, value)
    worker = build_settings(WorkerSettings, {"topic": "t", "model": "mlp"})
    producer = build_settings(ProducerSettings, PRODUCER)
    assert (worker.seed, worker.task, worker.metrics_port) == (3, "binary", 9600)
    assert (producer.synthetic_seed, producer.synthetic_task, producer.metrics_port) == (
        11,
        "regression",
        9601,
    )
    assert capsys.readouterr().err == ""


class Case(NamedTuple):
    settings_class: type[_Settings]
    required: dict[str, Any]
    field: str
    default: Any


PRECEDENCE = [
    pytest.param(Case(WorkerSettings, WORKER, "seed", 0), id="worker seed"),
    pytest.param(Case(WorkerSettings, WORKER, "metrics_port", 9464), id="worker metrics_port"),
    pytest.param(Case(ProducerSettings, PRODUCER, "synthetic_seed", 0), id="produce synthetic_seed"),
    pytest.param(Case(ProducerSettings, PRODUCER, "metrics_port", 9465), id="produce metrics_port"),
    # Fields read under aliases in the shared environment (a renamed one, a Python keyword).
    pytest.param(Case(ProducerSettings, PRODUCER, "max_records", None), id="produce max_records"),
    pytest.param(
        Case(ReplaySettings, {"topic": "t", "out": Path("out")}, "from_", "earliest"), id="replay from"
    ),
]
LAYERS = ("file", "shared", "command", "flag")


@pytest.mark.parametrize("case", PRECEDENCE)
def test_flag_beats_command_variable_beats_shared_variable_beats_file_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case
) -> None:
    settings_class, required, field, default = case
    if field == "from_":
        values: dict[str, Any] = {layer: f"0:{n}" for n, layer in enumerate(LAYERS, 1)}
    else:
        values = {layer: 1000 + n for n, layer in enumerate(LAYERS, 1)}
    path = tmp_path / "streamtrainer.toml"
    path.write_text(
        f"[{settings_class.config_section}]\n{field.removesuffix('_')} = {values['file']!r}\n".replace(
            "'", '"'
        )
    )
    scope = settings_class.env_scopes[0]
    monkeypatch.setenv(env_name(field), str(values["shared"]))
    monkeypatch.setenv(command_env_name(scope, field), str(values["command"]))

    def value(flags: dict[str, Any], config: Path | None = path) -> Any:
        given = {**required, **flags, "config_file": config}
        return getattr(build_settings(settings_class, given), field)

    assert value({field: values["flag"]}) == values["flag"]
    assert value({}) == values["command"]
    monkeypatch.delenv(command_env_name(scope, field))
    assert value({}) == values["shared"]
    monkeypatch.delenv(env_name(field))
    assert value({}) == values["file"]
    assert value({}, config=None) == default


def test_a_command_variable_is_only_its_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMTRAINER_WORKER_METRICS_PORT", "9700")
    monkeypatch.setenv("STREAMTRAINER_WORKER_SEED", "5")
    assert build_settings(WorkerSettings, WORKER).metrics_port == 9700
    assert build_settings(ProducerSettings, PRODUCER).metrics_port == 9465
    replay = build_settings(ReplaySettings, {**WORKER, "out": Path("out")})
    assert (replay.seed, build_settings(WorkerSettings, WORKER).seed) == (0, 5)


def test_dlq_inspect_and_redrive_have_their_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Their scope is the command path: STREAMTRAINER_DLQ_TOPIC is the worker's --dlq-topic (and the
    dlq commands' too), so a dlq scope of STREAMTRAINER_DLQ_ would read it as the source topic."""
    monkeypatch.setenv("STREAMTRAINER_TOPIC", "orders")
    monkeypatch.setenv("STREAMTRAINER_DLQ_TOPIC", "orders.dead")
    monkeypatch.setenv("STREAMTRAINER_DLQ_INSPECT_MAX_RECORDS", "7")
    monkeypatch.setenv("STREAMTRAINER_DLQ_REDRIVE_MAX_RECORDS", "2")
    inspect = build_settings(DeadLetterSettings, {}, command="dlq inspect")
    redrive = build_settings(DeadLetterSettings, {}, command="dlq redrive")
    assert (inspect.topic, inspect.dlq_topic, inspect.max_records) == ("orders", "orders.dead", 7)
    assert (redrive.topic, redrive.dlq_topic, redrive.max_records) == ("orders", "orders.dead", 2)


def test_no_command_variable_is_another_setting_s_shared_variable() -> None:
    shared = {env_name(field) for command in COMMAND_SETTINGS.values() for field in command.model_fields}
    scoped = {
        command_env_name(scope, field)
        for command in COMMAND_SETTINGS.values()
        for scope in command.env_scopes
        for field in command.model_fields
    }
    assert not shared & scoped
    assert all(command.env_scopes for command in COMMAND_SETTINGS.values())


def test_produce_no_longer_reads_the_models_seed_and_task_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMTRAINER_SEED", "3")
    monkeypatch.setenv("STREAMTRAINER_TASK", "binary")
    producer = build_settings(ProducerSettings, PRODUCER)
    assert (producer.synthetic_seed, producer.synthetic_task) == (0, "regression")
    assert _warnings(capsys.readouterr().err) == [
        "streamtrainer: warning: STREAMTRAINER_SEED is not read by this command (it is another command's "
        "--seed): set STREAMTRAINER_SYNTHETIC_SEED for its --synthetic-seed",
        "streamtrainer: warning: STREAMTRAINER_TASK is not read by this command (it is another command's "
        "--task): set STREAMTRAINER_SYNTHETIC_TASK for its --synthetic-task",
    ]
    # The worker reads them without a word.
    assert build_settings(WorkerSettings, {"topic": "t", "model": "mlp"}).seed == 3
    assert capsys.readouterr().err == ""


def test_produce_seed_and_task_are_hidden_aliases_in_its_own_scope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The flag.
    producer = build_settings(ProducerSettings, {**PRODUCER, "seed": 5, "task": "binary"})
    assert (producer.synthetic_seed, producer.synthetic_task) == (5, "binary")
    assert _warnings(capsys.readouterr().err) == [
        "streamtrainer: warning: --seed is deprecated: use --synthetic-seed",
        "streamtrainer: warning: --task is deprecated: use --synthetic-task",
    ]
    # The command's own variable.
    monkeypatch.setenv("STREAMTRAINER_PRODUCE_SEED", "6")
    assert build_settings(ProducerSettings, PRODUCER).synthetic_seed == 6
    assert _warnings(capsys.readouterr().err) == [
        "streamtrainer: warning: STREAMTRAINER_PRODUCE_SEED is deprecated: "
        "use STREAMTRAINER_PRODUCE_SYNTHETIC_SEED"
    ]
    monkeypatch.delenv("STREAMTRAINER_PRODUCE_SEED")
    # Its section of the file; a top-level seed is the model's, every command's but produce's.
    path = tmp_path / "streamtrainer.toml"
    path.write_text('seed = 4\ntask = "binary"\n[produce]\nseed = 7\n')
    producer = build_settings(ProducerSettings, {**PRODUCER, "config_file": path})
    assert (producer.synthetic_seed, producer.synthetic_task) == (7, "regression")
    assert _warnings(capsys.readouterr().err) == [
        f"streamtrainer: warning: --config {path}: [produce] seed is deprecated: use synthetic_seed"
    ]
    assert build_settings(WorkerSettings, {"topic": "t", "model": "mlp", "config_file": path}).seed == 4


def test_a_misspelled_or_misplaced_command_variable_is_warned(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMTRAINER_WORKER_SEDD", "1")
    monkeypatch.setenv("STREAMTRAINER_PRODUCE_GROUP", "g")  # produce has no consumer group
    monkeypatch.setenv("STREAMTRAINER_WORKER_SEED", "1")  # known: not warned
    monkeypatch.setenv("STREAMTRAINER_DLQ_REDRIVE_FORCE", "true")  # known: not warned
    build_settings(WorkerSettings, WORKER)
    assert _warnings(capsys.readouterr().err) == [
        "streamtrainer: warning: unknown environment variable STREAMTRAINER_PRODUCE_GROUP ignored "
        "(did you mean STREAMTRAINER_PRODUCE_TOPIC?)",
        "streamtrainer: warning: unknown environment variable STREAMTRAINER_WORKER_SEDD ignored "
        "(did you mean STREAMTRAINER_WORKER_SEED?)",
    ]


def test_help_names_the_command_variables_and_the_synthetic_names() -> None:
    help_text = run_cli("produce", "--help").stdout
    flat = "".join(help_text.split())
    assert "STREAMTRAINER_PRODUCE_<NAME>overridesSTREAMTRAINER_<NAME>" in flat
    assert "--synthetic-seed " in help_text and "--synthetic-task " in help_text
    assert "--seed " not in help_text and "--task " not in help_text


def _busy_port() -> socket.socket:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


def test_one_shell_runs_produce_then_worker(bootstrap: str, group_id: str) -> None:
    """The worker's metrics port in the shared variable; produce, run meanwhile, keeps off it."""
    topic = f"scopes-{group_id}"
    held = _busy_port()  # a worker already serving its metrics there
    port = held.getsockname()[1]
    env = {
        "STREAMTRAINER_BOOTSTRAP_SERVERS": bootstrap,
        "STREAMTRAINER_TOPIC": topic,
        "STREAMTRAINER_METRICS_PORT": str(port),
        "STREAMTRAINER_PRODUCE_METRICS_PORT": "0",
        "STREAMTRAINER_SEED": "3",
        "STREAMTRAINER_SYNTHETIC_SEED": "11",
        "STREAMTRAINER_SYNTHETIC_TASK": "binary",
        "STREAMTRAINER_WORKER_MODEL": "logistic",
        "STREAMTRAINER_WORKER_MAX_RECORDS": "600",
        "STREAMTRAINER_PRODUCE_MAX_RECORDS": "600",
        "STREAMTRAINER_PRODUCE_PARTITIONS": "1",
    }
    try:
        produced = run_cli("produce", env=env)
    finally:
        held.close()
    assert produced.returncode == 0, produced.stderr
    assert "produced 600 record(s)" in produced.stdout
    assert "warning" not in produced.stderr
    trained = run_cli("worker", "--group", group_id, "--session-timeout-ms", "6000", env=env)
    assert trained.returncode == 0, trained.stderr
    assert "trained 600 record(s)" in trained.stdout
    assert "accuracy" in trained.stdout  # a binary model on binary data
    assert "warning" not in trained.stderr


def test_the_documented_example_gives_each_command_its_own_values(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/configuration.md's "One shell, several commands" block, its exports applied as a shell would."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    section = page.split("## One shell, several commands", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    for line in block.splitlines():
        if line.startswith("export "):
            for assignment in line.split("#", 1)[0].split()[1:]:
                name, _, value = assignment.partition("=")
                monkeypatch.setenv(name, value)
    assert "streamtrainer produce " in block and "streamtrainer worker --model logistic" in block
    producer = build_settings(ProducerSettings, {"partitions": 3, "max_records": 100000})
    worker = build_settings(WorkerSettings, {"model": "logistic"})
    assert (producer.metrics_port, worker.metrics_port) == (9465, 9464)
    assert (producer.synthetic_seed, producer.synthetic_task, worker.seed) == (11, "binary", 3)
    assert producer.topic == worker.topic == "samples"
    assert capsys.readouterr().err == ""
