"""`streamtrainer dlq inspect|redrive` and the identity of a dead letter, through the broker (#15, case 6).

Dead letters are written by :class:`DeadLetterQueue` from records consumed from the broker, as two
consumer groups would write them; the commands run in-process (``streamtrainer.cli.main``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry

from streamtrainer import cli
from streamtrainer.connection import ensure_topic
from streamtrainer.consumer.dead_letter import (
    DEAD_LETTER_REASONS,
    GROUP,
    NO_GROUP,
    REDRIVEN,
    SOURCE_KEY,
    DeadLetterQueue,
    identity_of,
    read_dead_letter_log,
    read_dead_letters,
)
from streamtrainer.metrics import WorkerMetrics
from streamtrainer.settings import KafkaSettings

N = 30
BAD = {0: "label_out_of_range", 10: "oversize", 20: "non_finite"}  # source offset -> reason
GROUPS = ("group-a", "group-b")


@dataclass(frozen=True)
class _Rejected:
    reason: str
    detail: str = "rejected by the test"


def _read_all(bootstrap: str, topic: str) -> list[Message]:
    """Every record of partition 0 of ``topic``, read to its end."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex}", "enable.partition.eof": True}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    messages: list[Message] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                assert error.code() == KafkaError._PARTITION_EOF, error
                return messages
            messages.append(message)
    finally:
        consumer.close()
    raise AssertionError(f"{topic} not read to its end")


def _queue(bootstrap: str, topic: str, group: str | None) -> DeadLetterQueue:
    return DeadLetterQueue(
        KafkaSettings(bootstrap_servers=bootstrap),
        topic=f"{topic}.dlq",
        worker_id=f"worker-{group}",
        metrics=WorkerMetrics(CollectorRegistry()),
        source_topic=topic,
        group=group,
    )


def _dead_letter(queue: DeadLetterQueue, messages: list[Message], reasons: dict[int, str]) -> None:
    """Dead-letter ``messages[offset]`` for each reason, confirmed."""
    failures = [(messages[offset], _Rejected(reason)) for offset, reason in reasons.items()]
    assert queue.send(failures, serve=lambda: None, should_stop=lambda: False)


@pytest.fixture()
def source(bootstrap: str, topic_factory: Callable[..., str]) -> tuple[str, list[Message]]:
    """A topic of N records whose records BAD were dead-lettered by both GROUPS."""
    topic = topic_factory(partitions=1)
    ensure_topic(AdminClient({"bootstrap.servers": bootstrap}), f"{topic}.dlq", 1)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(N):
        producer.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), headers=[("h", b"x")])
    assert producer.flush(10) == 0
    messages = _read_all(bootstrap, topic)
    assert len(messages) == N
    for group in GROUPS:
        queue = _queue(bootstrap, topic, group)
        _dead_letter(queue, messages, BAD)
        queue.close()
    return topic, messages


Run = Callable[..., tuple[int, list[str], list[str]]]


@pytest.fixture()
def dlq(
    bootstrap: str,
    source: tuple[str, list[Message]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Run:
    """``dlq(*args)`` runs ``streamtrainer dlq ARGS`` on the source topic in-process: (exit code,
    stdout lines, stderr lines)."""
    monkeypatch.setattr(cli, "_configure_logging", lambda level: None)  # keep pytest's logging as it is
    topic, _ = source

    def run(*args: str, bootstrap_servers: str = bootstrap) -> tuple[int, list[str], list[str]]:
        capsys.readouterr()
        argv = ["dlq", *args, "--bootstrap-servers", bootstrap_servers, "--topic", topic, "--idle-s", "10"]
        try:
            cli.main(argv)
            code = 0
        except SystemExit as done:
            code = int(done.code or 0)
        out, err = capsys.readouterr()
        return code, out.splitlines(), err.splitlines()

    return run


def _sources(lines: list[str], topic: str) -> list[tuple[int, str]]:
    """(source offset, group) of every line `dlq inspect` printed."""
    found = []
    for line in lines:
        where, *_ = line.split("\t")
        group = next(field.removeprefix("group=") for field in line.split("\t") if field.startswith("group="))
        assert where.startswith(f"{topic}[0]@")
        found.append((int(where.rpartition("@")[2]), group))
    return sorted(found)


def test_every_repeated_flag_applies(bootstrap: str, source: tuple[str, list[Message]], dlq: Run) -> None:
    topic, _ = source
    run = dlq

    code, out, err = run("inspect")
    assert code == 0 and _sources(out, topic) == sorted((o, g) for o in BAD for g in GROUPS)
    assert "6 dead-lettered record(s), 0 of them redriven" in err

    # Before: only the last --reason applied (2 lines, oversize only).
    code, out, _ = run("inspect", "--reason", "label_out_of_range", "--reason", "oversize")
    assert code == 0 and _sources(out, topic) == sorted((o, g) for o in (0, 10) for g in GROUPS)
    # Repeated and comma-separated mix.
    code, out, _ = run(
        "inspect", "--source-offsets", "0:0", "--source-offsets", "0:10,0:20", "--group", GROUPS[0]
    )
    assert code == 0 and _sources(out, topic) == [(0, GROUPS[0]), (10, GROUPS[0]), (20, GROUPS[0])]
    code, out, _ = run("inspect", "--group", GROUPS[0], "--group", GROUPS[1], "--source-offsets", "0:20")
    assert code == 0 and _sources(out, topic) == [(20, GROUPS[0]), (20, GROUPS[1])]


def test_an_unknown_reason_is_a_usage_error_naming_the_valid_ones(dlq: Run) -> None:
    for command in ("inspect", "redrive"):
        code, out, err = dlq(command, "--reason", "oversize,wrong_count")
        assert code == 2 and out == [] and len(err) == 1  # before: exit 0, "0 dead-lettered record(s)"
        assert "wrong_count" in err[0] and all(reason in err[0] for reason in DEAD_LETTER_REASONS)
    # Before connecting: the same answer with no broker there.
    code, _, err = dlq("inspect", "--reason", "wrong_count", bootstrap_servers="127.0.0.1:1")
    assert code == 2 and len(err) == 1 and "valid:" in err[0]


def test_missing_source_offsets_are_reported_and_fail_the_command(
    bootstrap: str, source: tuple[str, list[Message]], dlq: Run
) -> None:
    topic, _ = source
    code, out, err = dlq("inspect", "--source-offsets", "0:10,2:99,0:5")
    assert code == 1 and _sources(out, topic) == [(10, GROUPS[0]), (10, GROUPS[1])]
    assert err[-1].endswith("matches source offset(s) 0:5,2:99")

    # Before: exit 0, no warning, and 0:10 published twice (once per group's letter).
    code, out, err = dlq("redrive", "--source-offsets", "0:10,2:99")
    assert code == 1 and err[-1].endswith("matches source offset(s) 2:99")
    assert out == [f"redrove 1 record(s) to {topic} (2 dead letter(s) marked as redriven)"]
    assert len(_read_all(bootstrap, topic)) == N + 1


def test_a_second_redrive_skips_what_was_redriven_unless_forced(
    bootstrap: str, source: tuple[str, list[Message]], dlq: Run
) -> None:
    topic, messages = source
    run = dlq

    code, out, _ = run("redrive", "--reason", "oversize")
    assert code == 0 and out == [f"redrove 1 record(s) to {topic} (2 dead letter(s) marked as redriven)"]
    republished = _read_all(bootstrap, topic)[N:]
    assert [(m.key(), m.value(), m.headers()) for m in republished] == [(b"k10", b"v10", [("h", b"x")])]

    # Before: a second redrive published both copies again.
    code, out, err = run("redrive", "--reason", "oversize")
    assert code == 0 and out == [] and "skipped 2 dead letter(s) redriven already" in err[0]
    assert len(_read_all(bootstrap, topic)) == N + 1

    code, out, _ = run("redrive", "--reason", "oversize", "--force")
    assert code == 0 and out == [f"redrove 1 record(s) to {topic} (2 dead letter(s) marked as redriven)"]
    assert len(_read_all(bootstrap, topic)) == N + 2

    # Everything else, once each: 0 and 20, whatever the two groups.
    code, out, err = run("redrive")
    assert code == 0 and out == [f"redrove 2 record(s) to {topic} (4 dead letter(s) marked as redriven)"]
    assert "skipped 2" in err[0]
    assert sorted(m.key() or b"" for m in _read_all(bootstrap, topic)[N + 2 :]) == [b"k0", b"k20"]

    code, out, err = run("inspect")
    assert code == 0 and all("\tredriven=" in line for line in out) and len(out) == 6
    assert "6 dead-lettered record(s), 6 of them redriven" in err
    assert messages[0].key() == b"k0"


def test_group_filter_redrives_one_groups_letter_only(
    bootstrap: str, source: tuple[str, list[Message]], dlq: Run
) -> None:
    topic, _ = source
    run = dlq
    code, out, _ = run("redrive", "--source-offsets", "0:20", "--group", GROUPS[1])
    assert code == 0 and out == [f"redrove 1 record(s) to {topic} (1 dead letter(s) marked as redriven)"]
    log = read_dead_letter_log(KafkaSettings(bootstrap_servers=bootstrap), f"{topic}.dlq")
    assert set(log.redriven) == {identity_of(topic, 0, 20, GROUPS[1])}
    # The other group's letter of that record is still to be redriven: asked for, it is published.
    code, out, err = run("redrive", "--source-offsets", "0:20")
    assert code == 0 and out == [f"redrove 1 record(s) to {topic} (1 dead letter(s) marked as redriven)"]
    assert "skipped 1" in err[0]


def test_dead_letters_are_keyed_by_source_and_group_and_name_the_group(
    bootstrap: str, source: tuple[str, list[Message]]
) -> None:
    topic, _ = source
    letters = list(read_dead_letters(KafkaSettings(bootstrap_servers=bootstrap), f"{topic}.dlq"))
    assert len(letters) == 6
    for letter in letters:
        _, partition, offset = letter.source
        assert letter.group in GROUPS and letter.header(GROUP) == letter.group
        assert letter.record_key == f"{topic}:{partition}:{offset}:{letter.group}".encode()
        assert letter.identity == letter.record_key.decode()
        assert letter.key == f"k{offset}".encode() and letter.header(SOURCE_KEY) == f"k{offset}"
        assert letter.value == f"v{offset}".encode() and letter.original_headers == [("h", b"x")]
        assert not letter.is_marker and letter.header(REDRIVEN) == ""
    assert len({letter.identity for letter in letters}) == 6


def test_a_worker_sees_what_it_dead_lettered_since_a_checkpoint(
    bootstrap: str, source: tuple[str, list[Message]]
) -> None:
    topic, messages = source
    queue = _queue(bootstrap, topic, GROUPS[0])
    other = _queue(bootstrap, topic, None)  # outside any group (replay)
    try:
        # Everything of this group so far, from the beginning.
        assert queue.already_dead_lettered() == {(0, offset) for offset in BAD}
        since = queue.end_offsets()
        assert set(since) == {0} and since[0] > 0
        assert queue.already_dead_lettered(since) == set()
        _dead_letter(queue, messages, {25: "non_numeric"})
        _dead_letter(other, messages, {25: "non_numeric", 20: "non_finite"})
        assert queue.already_dead_lettered(since) == {(0, 25)}
        assert other.already_dead_lettered(since) == {(0, 25), (0, 20)}
        assert queue.end_offsets()[0] > since[0]
        # A start past the end (the topic was re-created): all of it.
        assert queue.already_dead_lettered({0: 10**9}) == {(0, offset) for offset in (*BAD, 25)}
    finally:
        queue.close()
        other.close()
    letters = read_dead_letter_log(KafkaSettings(bootstrap_servers=bootstrap), f"{topic}.dlq").letters
    assert {letter.group for letter in letters} == {*GROUPS, NO_GROUP}
