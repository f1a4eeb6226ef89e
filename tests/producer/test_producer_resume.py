"""The producer never leaves an unknown partial write (issue #15, case 5): real processes, real broker.

Whatever ends a run (the end of the source, a bad record, SIGINT, SIGTERM), what was read before is
flushed and the run prints a summary: delivered, failed, and the ``--skip`` that resumes after the
last source position delivered. Every check reads the topic back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamtrainer.records.codec import BatchDecoder

CLI = [sys.executable, "-m", "streamtrainer.cli"]
SUMMARY = re.compile(
    r"produced (\d+) record\(s\) to \S+, failed (\d+), .*; resume with --skip (\d+)(?: |$)", re.MULTILINE
)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAINER_")}


def _produce(
    bootstrap: str, topic: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = [*CLI, "produce", "--bootstrap-servers", bootstrap, "--topic", topic, "--metrics-port", "-1"]
    return subprocess.run(
        [*command, *args], input=stdin, capture_output=True, text=True, timeout=90, env=_env(), check=False
    )


def _summary(stdout: str) -> tuple[int, int, int]:
    """(delivered, failed, skip to resume with) from the summary line."""
    match = SUMMARY.search(stdout)
    assert match is not None, f"no summary with a --skip in: {stdout!r}"
    delivered, failed, skip = (int(group) for group in match.groups())
    return delivered, failed, skip


def _topic_exists(bootstrap: str, topic: str) -> bool:
    topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return topic in topics and topics[topic].error is None


def _labels_in_topic(bootstrap: str, topic: str, quiet_s: float = 1.5) -> Counter[float]:
    """How many times each label is in the topic (every record read, until none came for quiet_s)."""
    partitions = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic=topic, timeout=10)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "readback", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions.topics[topic].partitions])
    labels: Counter[float] = Counter()
    decoder = BatchDecoder()
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s:
        messages = [m for m in consumer.consume(1000, 0.2) if m.error() is None]
        if messages:
            quiet_since = time.monotonic()
        for message in messages:
            labels[decoder.decode_one(message.value()).label] += 1
    consumer.close()
    return labels


def _jsonl(path: Path, n: int, bad: int | None = None) -> Path:
    """Line i (1-based) is a record with label i and key k<i % 5> (5 keys: 3 partitions, out of order)."""
    lines = [
        "{not json" if i == bad else json.dumps({"features": [i, i / 2], "label": i, "key": f"k{i % 5}"})
        for i in range(1, n + 1)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_jsonl_line_delivers_all_before_it_and_the_printed_skip_resumes_without_duplicates(
    bootstrap: str, group_id: str, tmp_path: Path
) -> None:
    topic = f"resume-{group_id}"
    data = _jsonl(tmp_path / "data.jsonl", 400, bad=301)
    first = _produce(bootstrap, topic, "--partitions", "3", "--source", f"jsonl:{data}")
    assert first.returncode == 1, first.stderr
    errors = [line for line in first.stderr.splitlines() if line.startswith("streamtrainer: error:")]
    assert len(errors) == 1 and f"{data}:301: invalid JSON" in errors[0], first.stderr
    assert "Traceback" not in first.stderr
    assert "up to line 300" in first.stdout
    assert _summary(first.stdout) == (300, 0, 300)
    assert _labels_in_topic(bootstrap, topic) == Counter(float(i) for i in range(1, 301))

    _jsonl(data, 400)  # fixed
    second = _produce(bootstrap, topic, "--source", f"jsonl:{data}", "--skip", "300")
    assert second.returncode == 0, second.stderr
    assert _summary(second.stdout) == (100, 0, 400)
    # Every record of the file exactly once: nothing lost, nothing duplicated.
    assert _labels_in_topic(bootstrap, topic) == Counter(float(i) for i in range(1, 401))


def test_bad_csv_row_on_stdin_delivers_the_good_rows_before_it(bootstrap: str, group_id: str) -> None:
    """Stdin cannot be read twice: its bad row is met while publishing. (A CSV file is read whole
    before connecting: tests/producer/test_csv_columns.py.)"""
    topic = f"csvrow-{group_id}"
    text = "a,b,y\n1,2,1\n4,5,2\n7,x,3\n10,11,4\n"
    result = _produce(bootstrap, topic, "--partitions", "2", "--source", "csv:-", "--label", "y", stdin=text)
    assert result.returncode == 1, result.stderr
    assert "<stdin>:4: column 'b': 'x' is not a number (row 3)" in result.stderr
    assert "up to row 2" in result.stdout
    assert _summary(result.stdout) == (2, 0, 2)
    assert _labels_in_topic(bootstrap, topic) == Counter([1.0, 2.0])


@pytest.mark.parametrize(
    ("text", "args", "expected"),
    [
        ("a,name,y\n1,bob,3\n", ("--label", "y"), "column 'name': 'bob' is not a number (row 1)"),
        ("a,b,y\n1,2,3\n", ("--label", "price"), "label column 'price' is not in the header"),
        ("a,b,y\n1,2,3\n", ("--label", "y", "--skip", "5"), "cannot skip 5 rows: it ends after 1"),
    ],
    ids=["text-column", "missing-label", "skip-past-the-end"],
)
def test_bad_input_found_before_producing_creates_no_topic(
    bootstrap: str, group_id: str, tmp_path: Path, text: str, args: tuple[str, ...], *, expected: str
) -> None:
    topic = f"nothing-{group_id}"
    data = tmp_path / "data.csv"
    data.write_text(text)
    result = _produce(bootstrap, topic, "--partitions", "1", "--source", f"csv:{data}", *args)
    assert result.returncode == 2, result.stderr  # a CSV file is read before connecting: a usage error
    assert expected in result.stderr
    assert not _topic_exists(bootstrap, topic)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_reading_flushes_and_reports(bootstrap: str, group_id: str, signum: int) -> None:
    topic = f"signal-{group_id}"
    command = [
        *CLI,
        "produce",
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--metrics-port",
        "-1",
        "--partitions",
        "3",
        "--n-keys",
        "7",
        "--max-records",
        "100000",
        "--rate",
        "400",
        "--codec",
        "binary",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 30
        while not _topic_exists(bootstrap, topic) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)  # some hundreds of records out, some queued
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr
    assert "Traceback" not in stderr
    delivered, failed, skip = _summary(stdout)
    assert failed == 0 and delivered > 0
    # Synthetic records are numbered: all delivered, the resume point is the last one.
    assert skip == delivered
    in_topic = _labels_in_topic(bootstrap, topic)
    assert sum(in_topic.values()) == delivered
    assert max(in_topic.values()) == 1  # no record twice


def test_a_signal_ends_a_wait_for_stdin(bootstrap: str, group_id: str) -> None:
    """A producer waiting on a quiet pipe stops at SIGTERM too, with what it read delivered."""
    topic = f"stdin-{group_id}"
    command = [*CLI, "produce", "--bootstrap-servers", bootstrap, "--topic", topic, "--metrics-port", "-1"]
    process = subprocess.Popen(
        [*command, "--partitions", "2", "--source", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    assert process.stdin is not None
    try:
        for i in range(1, 6):
            process.stdin.write(orjson.dumps({"features": [i, 1], "label": i}) + b"\n")
        process.stdin.flush()  # and the pipe stays open: the producer waits for line 6
        deadline = time.monotonic() + 30
        while not (_topic_exists(bootstrap, topic) and len(_labels_in_topic(bootstrap, topic)) == 5):
            assert time.monotonic() < deadline, "the five records never arrived"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert _summary(stdout.decode()) == (5, 0, 5)
    assert _labels_in_topic(bootstrap, topic) == Counter(float(i) for i in range(1, 6))


def _pid_namespaces() -> bool:
    try:
        done = subprocess.run(["unshare", "-Urpf", "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.skipif(not _pid_namespaces(), reason="needs unshare and unprivileged PID namespaces")
def test_sigterm_stops_the_producer_as_pid_1(bootstrap: str, group_id: str) -> None:
    """As PID 1 (a container's exec-form entrypoint), a signal without a handler is ignored: docker stop
    would wait its 10 s and SIGKILL. The producer handles SIGTERM there too."""
    topic = f"pid1-{group_id}"
    command = [*CLI, "produce", "--bootstrap-servers", bootstrap, "--topic", topic, "--metrics-port", "-1"]
    process = subprocess.Popen(
        ["unshare", "-Urpf", *command, "--partitions", "2", "--max-records", "100000", "--rate", "400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while not _topic_exists(bootstrap, topic) and time.monotonic() < deadline:
            time.sleep(0.2)
        children = subprocess.run(
            ["pgrep", "-P", str(process.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGTERM)  # the producer: PID 1 of its namespace
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "stopped by SIGTERM" in stderr
    delivered, failed, skip = _summary(stdout)
    assert failed == 0 and skip == delivered
    assert sum(_labels_in_topic(bootstrap, topic).values()) == delivered
