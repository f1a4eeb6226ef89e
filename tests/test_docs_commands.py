"""Every command of README.md and docs/*.md runs, against the embedded broker (issue 20).

Each fenced shell block (```bash, ```sh, ```shell, ```console) is split into its commands
(``\\`` continuations joined, comments dropped, a here-document kept with its command). A command
is either run or exempted by name in EXEMPT, with the reason; any other command fails the test,
so a new doc command cannot slip through unrun.

How a documented command becomes a run one (each rule is in REWRITES, expand_placeholders or _limited):
- ``streamtrainer`` is this interpreter's ``-m streamtrainer.cli``; ``localhost:9092`` the test
  broker; ``/var/lib/streamtrainer`` a folder of the scratch directory;
- ``streamtrainer <command> ...`` (the doc's "the flags above") gets the bootstrap servers and
  topic of that command's last full example; the worker lines, alternatives rather than a
  sequence, each get their own group and checkpoint directory unless they name one;
- counts are made small (the producer's 100,000 records), and a worker stops at the end of the
  topic (``--stop-at-end``), the broker after it has answered.

The commands run in the order a user needs them (files and producers, then the workers, then
replay, dead letters, plot), each in the scratch directory where the sample files lie.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from confluent_kafka import Producer

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = frozenset({"bash", "sh", "shell", "console", "zsh"})
TOPIC = "samples"  # the topic every doc command uses
CLI = f"{shlex.quote(sys.executable)} -m streamtrainer.cli"

# pattern (searched in the command as written) -> why it is not run here
_ENV_BLOCK = (
    "set by variables; tests/test_cli_env_scopes.py (test_the_documented_example_gives_each_command_"
    "its_own_values) builds each command's settings from that block's exports"
)
EXEMPT: dict[str, str] = {
    # The block that sets everything by variables (docs/configuration.md, "one shell, or one .env file"): its
    # commands take their broker and topic from the exports, not from flags this test can add.
    r"^export STREAMTRAINER_": _ENV_BLOCK,
    r"^streamtrainer produce --partitions 3 --max-records 100000 &$": _ENV_BLOCK,
    r"^streamtrainer worker --model logistic$": _ENV_BLOCK,
    r"^make demo\b": "minutes long; tests/test_demo.py runs the demo",
    r"^make test\b": "the whole suite, this test included",
    r"^make bench(-quality|-models)?\b": "minutes long (bench-models compiles step graphs cold); tests/bench "
    "covers the quality bench's code",
    r"^docker compose\b": "needs Docker; tests/test_deploy_compose.py checks the compose file",
    r"^torchrun --nproc-per-node=2 -m streamtrainer worker --distributed": (
        "a torchrun launch of 2 ranks; tests/consumer/test_distributed_worker.py runs one"
    ),
    r"^TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=1:4 ": (
        "an elastic torchrun launch on several nodes; tests/consumer/test_distributed_elastic.py runs "
        "one (two agents on one host)"
    ),
    r"^kill -USR1 <": "a placeholder pid of a running worker; tests/test_compaction_trigger.py sends USR1",
    r"^curl -X POST http://127\.0\.0\.1:9464/compact": (
        "a running worker with --admin-endpoints; tests/metrics/test_endpoints.py posts /compact"
    ),
    r"--kafka-config-file client\.properties --kafka-secret-file": (
        "needs a SASL_SSL listener and its CA; tests/test_security.py checks the settings it builds"
    ),
    r"--kafka-config security\.protocol=SSL": (
        "needs a TLS listener and client certificates; tests/test_security.py checks the settings"
    ),
    r"--from 2024-05-01T00:00:00Z": (
        "a time range needs Apache Kafka's time lookup and records of that day; "
        "tests/test_replay.py runs time ranges where the broker has it"
    ),
    r"^streamtrainer serve\b": (
        "serves until stopped; tests/serving/test_serve_checkpoints.py runs the command (SIGTERM: exit 0), "
        "tests/serving/test_serve_models_topic.py serves from the models topic"
    ),
    r"^curl -s -X POST http://127\.0\.0\.1:8080/predict": (
        "a running serve; tests/serving/test_serve_checkpoints.py posts /predict"
    ),
    r"--source-offsets 0:1234,2:99": (
        "illustrative offsets of dead letters; tests/test_dead_letter.py redrives by offsets"
    ),
}

if shutil.which("promtool") is None:
    EXEMPT[r"^promtool\b"] = "Prometheus' promtool is not installed (the CI image has it)"

# (pattern, replacement) applied to every run command, in order: smaller counts, same meaning
REWRITES: list[tuple[str, str]] = [
    (r"--max-records 100000\b", "--max-records 3000"),
    (r"--drift-at 50000\b", "--drift-at 1500"),
    # The 3,000 records spread over 3 partitions by the sticky partitioner: one partition held 777
    # once (a CI run), short of docs/replay.md's offset 800. 500 is in every partition here.
    (r"--to 0:800,1:800\b", "--to 0:500,1:500"),
]

# exit status other than 0 a doc command may have here, and why
EXPECTED_STATUS: dict[str, tuple[int, str]] = {}
if not torch.cuda.is_available():
    EXPECTED_STATUS[r"--compaction-device cuda"] = (2, "a usage error without CUDA, before connecting")

# Files the doc commands read, written into the scratch directory.
DATA_CSV = "price,rooms,area,age\n" + "".join(
    f"{100 + 3 * i % 17},{1 + i % 5},{40 + i % 30},{i % 50}\n" for i in range(200)
)
LISTINGS_CSV = "id,name,rooms,area,age,price\n" + "".join(
    f"{i},flat {i},{1 + i % 5},{40 + i % 30},{i % 50},{100 + 3 * i % 17}\n" for i in range(200)
)
SAMPLES_JSONL = "".join(
    '{"features": [' + ", ".join(str((i * j) % 7 / 7) for j in range(16)) + f'], "label": {i % 2}}}\n'
    for i in range(200)
)
CUSTOM_MODEL = '''"""A factory named by docs/cli.md's custom-model example."""

from torch import nn


def make_model(n_features: int, n_outputs: int) -> nn.Module:
    """A small MLP."""
    return nn.Sequential(nn.Linear(n_features, 8), nn.ReLU(), nn.Linear(8, n_outputs))
'''


@dataclass
class DocCommand:
    """One command of a fenced shell block: where it is, as written, and its here-document."""

    where: str
    text: str
    heredoc: str = ""
    tokens: list[str] = field(default_factory=list)

    @property
    def program(self) -> str:
        """The command's first word."""
        return self.tokens[0] if self.tokens else ""


def _blocks(path: Path) -> Iterator[tuple[int, list[str]]]:
    language, start, lines = None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = re.match(r"^\s*```\s*([\w-]*)", line)
        if fence and language is None:
            language, start, lines = fence.group(1) or "", number, []
        elif fence:
            if language in SHELL_LANGUAGES:
                yield start, lines
            language = None
        elif language is not None:
            lines.append(line.removeprefix("$ ") if language == "console" else line)


def doc_commands() -> list[DocCommand]:
    """Every command of every fenced shell block of the docs."""
    commands: list[DocCommand] = []
    for path in DOCS:
        for start, lines in _blocks(path):
            index = 0
            while index < len(lines):
                number = start + 1 + index
                text = lines[index]
                while text.endswith("\\") and index + 1 < len(lines):
                    index += 1
                    text = text[:-1] + " " + lines[index].strip()
                index += 1
                tokens = shlex.split(text, comments=True)
                if not tokens:
                    continue
                command = DocCommand(f"{path.name}:{number}", text, tokens=tokens)
                marker = re.search(r"<<-?'?(\w+)'?", text)
                if marker:
                    end = lines.index(marker.group(1), index)
                    command.heredoc = "\n".join(lines[index : end + 1])
                    index = end + 1
                commands.append(command)
    return commands


def _exemption(command: DocCommand) -> str | None:
    stripped = " ".join(command.tokens)
    for pattern, reason in EXEMPT.items():
        if re.search(pattern, stripped):
            return reason
    return None


def _runnable(command: DocCommand) -> bool:
    """A streamtrainer command, alone or at the end of a pipe, or a here-document written to a file."""
    if command.program in {"streamtrainer", "promtool"}:
        return True
    if command.heredoc and command.tokens[:2] == ["cat", ">"]:
        return True
    return command.program == "cat" and "|" in command.tokens and "streamtrainer" in command.tokens


def _subcommand(command: DocCommand) -> str:
    """worker, produce, replay, dlq, plot, broker (the streamtrainer one of a pipe)."""
    tokens = (
        command.tokens[command.tokens.index("streamtrainer") :] if "streamtrainer" in command.tokens else []
    )
    return tokens[1] if len(tokens) > 1 else ""


def _option(tokens: list[str], name: str) -> str | None:
    return tokens[tokens.index(name) + 1] if name in tokens[:-1] else None


def expand_placeholders(commands: list[DocCommand]) -> dict[int, str]:
    """The doc's ``streamtrainer <command> ...``: the broker and topic of that command's last full example.

    Only those two: the examples after a ``...`` are alternatives, so each keeps its own group,
    checkpoint directory and model.
    """
    last: dict[str, tuple[str, str]] = {}
    expanded: dict[int, str] = {}
    for number, command in enumerate(commands):
        if "streamtrainer" not in command.tokens:
            continue
        tokens = command.tokens[command.tokens.index("streamtrainer") :]
        kind = tokens[1] if len(tokens) > 1 else ""
        bootstrap, topic = _option(tokens, "--bootstrap-servers"), _option(tokens, "--topic")
        if bootstrap and topic and not _exemption(command):  # an exempted one names another broker
            last[kind] = (bootstrap, topic)
        if "..." in tokens and kind in last:
            where = tokens.index("...")
            bootstrap, topic = last[kind]
            tokens = [
                *tokens[:where],
                "--bootstrap-servers",
                bootstrap,
                "--topic",
                topic,
                *tokens[where + 1 :],
            ]
        expanded[number] = " ".join(shlex.quote(t) if t not in {"|", "&&"} else t for t in tokens)
    return expanded


def _limited(command: DocCommand, expanded: str, number: int, scratch: Path, bootstrap: str) -> str:
    """The command as run here: placeholders expanded, the test broker, small counts, a stop."""
    if command.heredoc:  # a file written as documented
        return command.text + "\n" + command.heredoc
    if "streamtrainer" not in command.tokens:  # another tool, as documented
        return " ".join(shlex.quote(token) for token in command.tokens)
    pipe = command.tokens[: command.tokens.index("streamtrainer")]
    text = " ".join(shlex.quote(t) if t != "|" else t for t in pipe) + (" " if pipe else "") + expanded
    assert "..." not in text, f"{command.where}: a '...' placeholder the test cannot expand: {command.text}"
    for pattern, replacement in REWRITES:
        text = re.sub(pattern, replacement, text)
    text = text.replace("localhost:9092", bootstrap).replace("/var/lib/streamtrainer", str(scratch / "var"))
    if _subcommand(command) == "worker":
        if "--group " not in text:
            text += f" --group docs-{number}"
        if "--checkpoint-dir " not in text:
            text += f" --checkpoint-dir checkpoints-{number}"
        text += f" --stop-at-end --max-seconds 120 --run-log worker-{number}.jsonl"
    return text.replace("streamtrainer ", CLI + " ")


def _environment(models: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAINER_")}
    env["STREAMTRAINER_METRICS_PORT"] = "0"  # commands run side by side: any free port
    # the checkout, and the folder of docs/cli.md's custom model (mypackage/), as that page says
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(models), os.environ.get("PYTHONPATH", "")])
    return env


def _run(script: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_environment(cwd / "models"),
        cwd=cwd,
        check=False,
    )


def _check(command: DocCommand, result: subprocess.CompletedProcess[str]) -> str | None:
    expected = 0
    for pattern, (status, _why) in EXPECTED_STATUS.items():
        if re.search(pattern, command.text):
            expected = status
    stopped = expected != 0 or _subcommand(command) != "worker" or "read to its end offset" in result.stderr
    if result.returncode == expected and stopped:
        return None
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-8:])
    return (
        f"{command.where}: exit {result.returncode}, expected {expected}"
        + ("" if stopped else ", stopped before the end of the topic")
        + f": {command.text}\n{tail}"
    )


def _run_broker(command: DocCommand, scratch: Path) -> str | None:
    """The broker in the foreground: it must listen, then stop on Ctrl-C (SIGINT) with exit 0."""
    port = _free_port()
    script = _limited(command, " ".join(command.tokens), 0, scratch, "").replace(
        "--port 9092", f"--port {port}"
    )
    process = subprocess.Popen(
        ["bash", "-c", f"exec {script}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_environment(scratch / "models"),
        cwd=scratch,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None and not _listening(port):
            time.sleep(0.2)
        listened = _listening(port)
        process.send_signal(signal.SIGINT)  # the doc's Ctrl-C
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if listened and process.returncode == 0:
        return None
    return f"{command.where}: listened {listened}, exit {process.returncode}: {command.text}\n{output[-800:]}"


def _free_port() -> int:
    """A TCP port of 127.0.0.1 free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _write_samples(scratch: Path) -> None:
    (scratch / "data.csv").write_text(DATA_CSV)
    (scratch / "listings.csv").write_text(LISTINGS_CSV)
    (scratch / "samples.jsonl").write_text(SAMPLES_JSONL)
    package = scratch / "models" / "mypackage"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(CUSTOM_MODEL)


def _publish_bad_records(bootstrap: str) -> None:
    """Records a worker dead-letters, for the dlq examples: non-finite and a wrong feature count."""
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(TOPIC, value=b'{"features": [%s], "label": 1}' % b", ".join([b"1e39"] * 16))
    producer.produce(TOPIC, value=b'{"features": [1, 2, 3], "label": 1}')
    assert producer.flush(30) == 0


# The order a user needs them in (what a phase reads, an earlier one wrote), and how many of a
# phase run side by side: the workers are alternatives, each waiting mostly on its group join.
PHASES = {
    "files": 1,
    "broker": 1,
    "produce": 1,
    "worker": 12,
    "replay": 3,
    "replay-again": 1,
    "export": 2,  # the checkpoints of a worker and a replay
    "dlq": 1,
    "plot": 2,
    "promtool": 1,
}


def _phase(command: DocCommand) -> str:
    if command.heredoc:
        return "files"
    if command.program == "promtool":
        return "promtool"
    if _subcommand(command) == "replay" and "--manifest" in command.tokens:
        return "replay-again"  # reads the manifest an earlier replay wrote
    return _subcommand(command)


def test_every_doc_command_is_run_or_exempted_with_a_reason() -> None:
    """The parse finds the commands, and each is runnable or named in EXEMPT."""
    commands = doc_commands()
    assert len(commands) >= 30, [c.text for c in commands]
    unknown = [f"{c.where}: {c.text}" for c in commands if not _exemption(c) and not _runnable(c)]
    assert not unknown, "doc commands neither run by this test nor in its EXEMPT table:\n" + "\n".join(
        unknown
    )
    phases = {_phase(c) for c in commands if _runnable(c) and not _exemption(c)}
    assert phases <= set(PHASES), phases
    used = {pattern for pattern in EXEMPT if any(re.search(pattern, " ".join(c.tokens)) for c in commands)}
    assert used == set(EXEMPT), f"exemptions matching no doc command: {set(EXEMPT) - used}"


@pytest.mark.integration
def test_every_doc_command_runs(bootstrap: str, tmp_path: Path) -> None:
    """Each runnable doc command exits as documented against the test broker, in a user's order."""
    _write_samples(tmp_path)
    commands = doc_commands()
    expanded = expand_placeholders(commands)
    runnable = [
        (number, command)
        for number, command in enumerate(commands)
        if _runnable(command) and not _exemption(command)
    ]
    failures: list[str] = []
    for phase, side_by_side in PHASES.items():
        batch = [(number, command) for number, command in runnable if _phase(command) == phase]
        if phase == "broker":
            failures += [f for _, command in batch if (f := _run_broker(command, tmp_path))]
            continue
        if phase == "worker":
            _publish_bad_records(bootstrap)
        if phase == "plot":
            logs = sorted(tmp_path.glob("worker-*.jsonl"))
            assert logs, "no worker wrote a run log"
            (tmp_path / "runs" / "demo").mkdir(parents=True, exist_ok=True)
            shutil.copy(logs[0], tmp_path / "runs" / "demo" / "run.jsonl")  # make demo's, which is not run
            shutil.copy(logs[0], tmp_path / "run.jsonl")
        scripts = [
            (command, _limited(command, expanded.get(number, ""), number, tmp_path, bootstrap))
            for number, command in batch
        ]
        with ThreadPoolExecutor(max_workers=side_by_side) as pool:
            # promtool's paths are the checkout's (deploy/prometheus/...)
            cwd = ROOT if phase == "promtool" else tmp_path
            results = list(pool.map(_run, [script for _, script in scripts], [cwd] * len(scripts)))
        failures += [
            f for (command, _), result in zip(scripts, results, strict=True) if (f := _check(command, result))
        ]
    assert not failures, "doc commands that fail:\n\n" + "\n\n".join(failures)
