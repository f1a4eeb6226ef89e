"""Usage and configuration errors as a new user meets them (issue 20): real processes, one line on
stderr, exit 2, before anything connects; a signal ends the wait for an unreachable broker at once.

"Before connecting" is shown by giving an unreachable ``--bootstrap-servers 127.0.0.1:1`` with a long
``--startup-timeout-s``: a check made after connecting would end in "cannot reach Kafka" (exit 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import streamtrainer
from tests.test_cli import CLI, _one_line_error, run_cli

UNREACHABLE = ("--bootstrap-servers", "127.0.0.1:1", "--startup-timeout-s", "60", "--metrics-port", "-1")
PACKAGE = Path(streamtrainer.__file__).resolve().parent


@pytest.mark.parametrize(
    ("flag", "device"),
    [
        ("--device", "cuda:99"),  # no such GPU, with or without CUDA
        ("--compaction-device", "cuda:99"),
        ("--device", "gpu"),  # not a torch device at all
        pytest.param(
            "--device",
            "cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this torch build has CUDA"),
        ),
    ],
)
def test_a_device_that_is_not_there_is_a_usage_error(flag: str, device: str) -> None:
    result = run_cli("worker", "--topic", "t", *UNREACHABLE, flag, device)
    assert result.returncode == 2, result.stderr
    assert f"{flag} {device!r}" in _one_line_error(result)


@pytest.mark.parametrize("value", ["hunter2", '{"sasl.password": hunter2'])
@pytest.mark.parametrize("variable", ["KAFKA_CONFIG", "DLQ_KAFKA_CONFIG", "KAFKA_SECRET_FILE"])
def test_a_dict_variable_neither_key_values_nor_json_is_one_line(variable: str, value: str) -> None:
    """KEY=VALUE,... or a JSON object (tests/test_cli_config.py); anything else names the variable,
    never its value."""
    result = run_cli("worker", "--topic", "t", *UNREACHABLE, env={f"STREAMTRAINER_{variable}": value})
    assert result.returncode == 2, result.stderr
    line = _one_line_error(result)
    assert f"STREAMTRAINER_{variable}" in line
    assert "JSON object" in line
    assert "hunter2" not in result.stderr  # the value may be a secret


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("no_such_package_xyz.models:make", "cannot import 'no_such_package_xyz.models'"),
        ("json:no_such_factory", "'json' has no callable 'no_such_factory'"),
        ("json:dumps", "must accept the keywords n_features= and n_outputs="),
    ],
)
def test_a_model_factory_is_checked_before_connecting(model: str, expected: str) -> None:
    result = run_cli("worker", "--topic", "t", *UNREACHABLE, "--model", model)
    assert result.returncode == 2, result.stderr
    line = _one_line_error(result)
    assert expected in line
    if "cannot import" in expected:
        assert "PYTHONPATH" in line


def test_an_importable_factory_passes_the_check() -> None:
    """The check refuses nothing that works: the test factory gets as far as the broker."""
    result = run_cli(
        "worker", "--topic", "t", *UNREACHABLE[:2], "--startup-timeout-s", "1", "--model",
        "tests.custom_model:make_model", "--task", "regression",
        env={"PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "cannot reach Kafka" in _one_line_error(result)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("csv:{data}", "a CSV source needs the name of its label column"),
        ("parquet:{data}", "unknown source 'parquet:"),
        ("jsonl:", "has no path"),
    ],
)
def test_a_source_that_cannot_work_is_a_usage_error(tmp_path: Path, source: str, expected: str) -> None:
    data = tmp_path / "data.csv"
    data.write_text("a,b,y\n1,2,3\n")
    result = run_cli("produce", "--topic", "t", *UNREACHABLE, "--source", source.format(data=data))
    assert result.returncode == 2, result.stderr
    assert expected in _one_line_error(result)


def _start_then_signal(args: list[str], signum: int, tmp_path: Path) -> tuple[int, str]:
    """Start the CLI against an unreachable broker; once it waits for the broker, send ``signum``."""
    log = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAINER_")}
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [*CLI, *args, *UNREACHABLE, "--log-level", "debug"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=tmp_path,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while "for Kafka to answer" not in log.read_text(errors="replace"):  # connection.py, at debug
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        process.send_signal(signum)
        # Far less than the 60 s --startup-timeout-s: before, it stopped only when that ran out.
        code = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, log.read_text(errors="replace")


@pytest.mark.parametrize(
    ("command", "signum", "expected"),
    [
        (["worker", "--topic", "t"], signal.SIGTERM, "stopped by SIGTERM while waiting for Kafka"),
        (["worker", "--topic", "t"], signal.SIGINT, "stopped by SIGINT while waiting for Kafka"),
        (["produce", "--topic", "t"], signal.SIGINT, "stopped by SIGINT"),
    ],
    ids=["worker-SIGTERM", "worker-SIGINT", "produce-SIGINT"],
)
def test_a_signal_ends_the_wait_for_an_unreachable_broker(
    tmp_path: Path, command: list[str], signum: int, expected: str
) -> None:
    code, stderr = _start_then_signal(command, signum, tmp_path)
    assert code == 128 + signum, stderr
    assert expected in stderr
    assert "Traceback" not in stderr
    assert "cannot reach Kafka" not in stderr


def test_test_only_choices_are_accepted_but_not_offered(tmp_path: Path) -> None:
    shown = run_cli("worker", "--help")
    assert shown.returncode == 0
    assert "audit" not in shown.stdout
    assert "--kafka-secret-file KEY=PATH" in shown.stdout
    refused = run_cli("worker", "--topic", "t", *UNREACHABLE, "--loss", "nonsense")
    assert refused.returncode == 2
    assert "audit" not in _one_line_error(refused)
    # The crash test's model and loss still pass validation: the worker gets as far as the broker.
    accepted = run_cli(
        "worker", "--topic", "t", *UNREACHABLE[:2], "--startup-timeout-s", "1", "--model", "audit",
        "--loss", "audit", "--no-compaction",
    )  # fmt: skip
    assert accepted.returncode == 1, accepted.stderr
    assert "cannot reach Kafka" in _one_line_error(accepted)


def test_a_run_that_trained_nothing_says_so(bootstrap: str, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory(1)
    result = run_cli(
        "worker", "--topic", topic, "--bootstrap-servers", bootstrap, "--metrics-port", "-1",
        "--stop-at-end", "--no-fused",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "trained 0 record(s)" in result.stdout
    assert "no records trained" in result.stdout
    assert "nan" not in result.stdout


def _numba_files(root: Path) -> dict[Path, int]:
    """numba's cache files under ``root``, with their modification times (a rewrite shows too)."""
    return {path: path.stat().st_mtime_ns for pattern in ("*.nbi", "*.nbc") for path in root.rglob(pattern)}


@pytest.mark.parametrize("how", ["XDG_CACHE_HOME", "--cache-dir"])
def test_the_compile_cache_is_a_user_directory_not_the_package(tmp_path: Path, how: str) -> None:
    """A cold compile of a training loop writes numba's cache under the user's cache directory."""
    before = _numba_files(PACKAGE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMTRAINER_", "NUMBA_"))}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    given = {} if how == "XDG_CACHE_HOME" else {"topic": "t", "cache_dir": str(tmp_path / "mine")}
    code = (
        "import sys\n"
        "from streamtrainer.cli import build_settings\n"
        "from streamtrainer.settings import WorkerSettings\n"
        "from streamtrainer.training import kernels\n"
        f"if {bool(given)!r}:\n"
        f"    build_settings(WorkerSettings, {given!r})\n"
        "kernels.warm_up((('linear', 'adagrad'),))\n"
        "print(kernels.cache_dir())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    if how == "XDG_CACHE_HOME":
        expected = tmp_path / "xdg" / "streamtrainer" / "numba"
    else:
        expected = tmp_path / "mine" / "numba"
    assert Path(done.stdout.strip()) == expected
    assert _numba_files(expected), list(tmp_path.rglob("*"))
    assert _numba_files(PACKAGE) == before


def test_a_misspelled_variable_is_named_with_the_likely_intended_one() -> None:
    env = {
        "STREAMTRAINER_CHECKPIONT_DIR": "x",
        "STREAMTRAINER_N_CLASSES": "3",  # known: no warning
        "STREAMTRAINER_TEST_BOOTSTRAP_SERVERS": "y",  # the tests' own: no warning
    }
    result = run_cli("worker", "--topic", "t", "--model", "softmax", env=env)
    warnings = [
        line for line in result.stderr.splitlines() if "warning: unknown environment variable" in line
    ]
    assert warnings == [
        "streamtrainer: warning: unknown environment variable STREAMTRAINER_CHECKPIONT_DIR ignored "
        "(did you mean STREAMTRAINER_CHECKPOINT_DIR?)"
    ], result.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--predictions-topic", "t"), "must name different topics"),
        (("--predictions-topic", "p", "--models-topic", "p"), "must name different topics"),
        (("--publish-models", "--predictions-topic", "t.models"), "must name different topics"),
        (("--predictions-topic", "p", "--distributed", "--no-compaction"), "not supported with --distrib"),
    ],
)
def test_output_topics_that_cannot_work_are_usage_errors(flags: tuple[str, ...], expected: str) -> None:
    result = run_cli("worker", "--topic", "t", *UNREACHABLE, *flags)
    assert result.returncode == 2, result.stderr
    assert expected in _one_line_error(result)
