"""``worker --distributed`` end to end: torchrun, 2 ranks, a 4-partition topic, the audit model.

The audit model's weights are the sum of the records applied (tests/test_crash_recovery.py). The
ranks' models are combined by ``--average-reduction sum`` (the round's start plus every rank's
update), under which the group's model is, exactly, the sum of every record every rank applied:
so the final durable model equals the sum of the produced records only if each was applied
exactly once across the ranks. (Under the default weighted mean the audit model's weights would
be a weighted mean of sums: no exactness check; the mean is checked in
tests/consumer/test_distributed_training.py.) A second launch after more records are produced
resumes from rank 0's checkpoint, broadcast to both ranks, and again applies each record once.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.helpers import produce
from tests.processes import latest_state, wait_until
from tests.test_crash_recovery import _audit_samples, _per_partition_truth

pytestmark = pytest.mark.integration

PARTITIONS = 4


# torchrun and its ranks, each launch in a process group of its own: killed together after a test.
_LAUNCHED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    yield
    while _LAUNCHED:
        process = _LAUNCHED.pop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _command(bootstrap: str, topic: str, group: str, checkpoints: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "streamtrainer",
        "worker",
        "--distributed",
        "--average-reduction",
        "sum",
        "--average-interval-s",
        "0.3",
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--group",
        group,
        "--checkpoint-dir",
        str(checkpoints),
        "--checkpoint-every-records",
        "3000",
        "--checkpoint-interval-s",
        "0.5",
        "--metrics-port",
        "-1",
        "--model",
        "audit",
        "--optimizer",
        "sgd",
        "--lr",
        "1",
        "--no-standardize",
        "--no-compaction",
        "--poll-batch",
        "500",
        "--log-level",
        "debug",
        *extra,
    ]


def _start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    _LAUNCHED.append(process)
    return process


def _launch(bootstrap: str, topic: str, group: str, checkpoints: Path, log: Path) -> int:
    command = _command(bootstrap, topic, group, checkpoints, "--stop-at-end", "--collective-timeout-s", "60")
    return _start(command, log).wait(timeout=240)


def _committed(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in offsets}


def _check_rounds(text: str) -> None:
    """Each round's group figure is the sum of what the two ranks trained in it (their debug lines)."""
    rounds: dict[int, list[tuple[int, int]]] = {}
    for number, group, here in re.findall(r"round (\d+): (\d+) records of the group \((\d+) here\)", text):
        rounds.setdefault(int(number), []).append((int(group), int(here)))
    assert len(rounds) >= 3, text[-3000:]  # the ranks averaged, more than once
    for number, lines in rounds.items():
        assert len(lines) == 2, (number, lines)
        (group_0, here_0), (group_1, here_1) = lines
        assert group_0 == group_1 == here_0 + here_1, (number, lines)
    assert any(here for lines in rounds.values() for _, here in lines)


def _check_warmup(text: str, warmup: int = 2_000) -> None:
    """A new model: a round after every record of each rank until the group has trained ``warmup``."""
    rounds: dict[int, list[tuple[int, int]]] = {}
    for number, group, here in re.findall(r"round (\d+): (\d+) records of the group \((\d+) here\)", text):
        rounds.setdefault(int(number), []).append((int(group), int(here)))
    trained, warm = 0, 0
    for number in sorted(rounds):
        if trained >= warmup:
            break
        assert all(here <= 1 for _, here in rounds[number]), (number, rounds[number])
        trained += rounds[number][0][0]
        warm += 1
    assert trained >= warmup and warm >= warmup // 2, (trained, warm)


def _check(
    checkpoints: Path, topic: str, truth: dict[int, np.ndarray], counts: dict[int, int], log: Path
) -> None:
    state = latest_state(checkpoints)
    assert state is not None, log.read_text()[-3000:]
    metadata, weight = state
    expected = sum(truth.values())
    # Every record applied exactly once across the two ranks: w is the sum of all of them.
    assert weight.tolist() == expected.tolist(), (weight, expected, log.read_text()[-3000:])
    assert metadata["records_applied"] == sum(counts.values())
    assert metadata["positions"] == {f"{topic}:{p}": counts[p] for p in range(PARTITIONS)}
    assert metadata["applied"] == {f"{topic}:{p}": counts[p] for p in range(PARTITIONS)}


def test_two_ranks_train_one_model_applying_every_record_once(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=PARTITIONS)
    n = 12_000
    samples, _ = _audit_samples(n, seed=5)
    produce(bootstrap, topic, samples, codec="binary")
    truth = _per_partition_truth(bootstrap, topic, PARTITIONS, n)
    counts = {p: int(truth[p][0]) for p in range(PARTITIONS)}  # feature 0 is 1: a count
    assert all(counts.values())
    checkpoints, log = tmp_path / "ckpt", tmp_path / "torchrun.log"

    assert _launch(bootstrap, topic, group_id, checkpoints, log) == 0, log.read_text()[-5000:]
    _check(checkpoints, topic, truth, counts, log)
    text = log.read_text()
    assert "rank 0 of 2: partitions" in text and "rank 1 of 2: partitions" in text
    _check_rounds(text)
    _check_warmup(text)
    # The group's committed offsets follow the checkpoint (rank 0 commits every partition).
    assert _committed(bootstrap, topic, group_id) == counts

    # More records; a second launch resumes from the checkpoint (read by rank 0, broadcast).
    more, _ = _audit_samples(6_000, seed=6)
    produce(bootstrap, topic, more, codec="binary")
    truth = _per_partition_truth(bootstrap, topic, PARTITIONS, n + 6_000)
    counts = {p: int(truth[p][0]) for p in range(PARTITIONS)}
    assert _launch(bootstrap, topic, group_id, checkpoints, log) == 0, log.read_text()[-5000:]
    _check(checkpoints, topic, truth, counts, log)
    second = log.read_text()[len(text) :]
    assert "resumed from checkpoint" in second
    # A restored model does not warm up again: its rounds are the clock's (0.3 s apart at most).
    assert len(set(re.findall(r"round (\d+): ", second))) < 200, second[-3000:]
    assert _committed(bootstrap, topic, group_id) == counts


def test_a_stopped_rank_makes_the_other_exit_on_the_collective_timeout_not_hang(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=PARTITIONS)
    samples, _ = _audit_samples(2_000, seed=8)
    produce(bootstrap, topic, samples, codec="binary")
    log, timeout_s = tmp_path / "torchrun.log", 5.0
    # No --stop-at-end: the ranks keep averaging (idle, every --average-interval-s) until stopped.
    checkpoints = tmp_path / "ckpt"
    command = _command(bootstrap, topic, group_id, checkpoints, "--collective-timeout-s", str(timeout_s))
    process = _start(command, log)
    assert wait_until(lambda: "round 3:" in log.read_text(), timeout=120), log.read_text()[-3000:]
    (pid,) = [int(p) for p in re.findall(r"rank 1 of 2 \(pid (\d+)\) joined", log.read_text())]
    os.kill(pid, signal.SIGSTOP)  # rank 1 stops taking part (as a hung rank would)
    stopped = time.monotonic()
    try:
        pattern = "rank 0: averaging round"
        assert wait_until(lambda: pattern in log.read_text(), timeout=timeout_s + 60), log.read_text()[-3000:]
        took = time.monotonic() - stopped
    finally:
        os.kill(pid, signal.SIGCONT)
    # Rank 0 gave up after about the collective timeout (a margin for a busy machine), with the
    # one-line error that names it; torchrun then ends the launch with a failure (a restart, with
    # --max-restarts): never a silent stall.
    assert took <= timeout_s + 30, took
    text = log.read_text()
    assert "did not come within --collective-timeout-s 5 s" in text, text[-3000:]
    assert process.wait(timeout=120) != 0


def _lives(text: str) -> list[dict[int, int]]:
    """Each life of the group: its ranks' pids, from their join lines, in order."""
    lives: list[dict[int, int]] = []
    for rank, pid in re.findall(r"rank (\d+) of 2 \(pid (\d+)\) joined", text):
        if not lives or int(rank) in lives[-1]:
            lives.append({})
        lives[-1][int(rank)] = int(pid)
    return lives


def _averaging(log: Path, life: int) -> bool:
    """Life number ``life`` (from 1) has both ranks up and has averaged twice since."""
    text = log.read_text()
    lives = _lives(text)
    if len(lives) < life or len(lives[life - 1]) < 2:
        return False
    joined = text.rfind(f"(pid {lives[life - 1][0]}) joined")
    return "round 2:" in text[joined:]


def test_kill_minus_9_of_random_ranks_applies_every_record_exactly_once(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    """4 ``kill -9`` of a random rank while 2 ranks train: every record durably applied once.

    (The audit of 10 kills is the 3-rank one, tests/consumer/test_distributed_elastic.py, with the
    stream produced while the ranks run; this one keeps the one-node, two-rank launch covered.)"""
    topic = topic_factory(partitions=PARTITIONS)
    n, kills = 12_000, 4
    samples, _ = _audit_samples(n, seed=9)
    produce(bootstrap, topic, samples, codec="binary")
    truth = _per_partition_truth(bootstrap, topic, PARTITIONS, n)
    counts = {p: int(truth[p][0]) for p in range(PARTITIONS)}
    checkpoints, log = tmp_path / "ckpt", tmp_path / "torchrun.log"
    extra = ("--stop-at-end", "--collective-timeout-s", "30")
    command = _command(bootstrap, topic, group_id, checkpoints, *extra)
    # torchrun restarts every rank when one dies (the others exit on their failed round first).
    command.insert(command.index("--standalone") + 1, f"--max-restarts={kills + 5}")
    command[command.index("--poll-batch") + 1] = "200"  # slow enough to outlive the kills
    process = _start(command, log)
    rng = random.Random(18)
    killed = 0

    def ended() -> bool:
        """The launch finished (the run got to the end before every kill)."""
        return process.poll() is not None

    for life in range(1, kills + 1):
        assert wait_until(lambda life=life: _averaging(log, life) or ended(), 120), log.read_text()[-3000:]
        if ended():
            break
        time.sleep(rng.uniform(0.0, 1.0))
        pids = _lives(log.read_text())[life - 1]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[rng.choice(sorted(pids))], signal.SIGKILL)
            killed += 1
    assert process.wait(timeout=300) == 0, log.read_text()[-5000:]
    assert killed >= 2, killed  # the run outlived most of the kills
    assert "joining the process group failed" not in log.read_text()  # each life joined at once
    _check(checkpoints, topic, truth, counts, log)
    assert _committed(bootstrap, topic, group_id) == counts


# Records the group trains in each of the resize test's stopped launches (at least).
STEP = 400


def _group_trained(text: str) -> int:
    """Records the group trained in the rounds logged in ``text`` (rank 0's figures: the group's)."""
    pattern = r"\[rank 0 pid \d+\] \S+: round \d+: (\d+) records of the group"
    return sum(int(group) for group in re.findall(pattern, text))


def test_a_resize_2_1_2_between_launches_applies_every_record_once(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    """2 ranks, stopped; 1 rank, stopped; 2 ranks to the end: every record applied exactly once.

    Each launch restores rank 0's last checkpoint and reassigns the partitions by its world size
    (p mod 2, then all to rank 0, then p mod 2 again). A SIGTERM to one rank (the last one) ends
    every rank at the next round, after which rank 0 checkpoints that round's model and all exit 0.
    """
    topic = topic_factory(partitions=PARTITIONS)
    n = 24_000
    samples, _ = _audit_samples(n, seed=12)
    produce(bootstrap, topic, samples, codec="binary")
    truth = _per_partition_truth(bootstrap, topic, PARTITIONS, n)
    counts = {p: int(truth[p][0]) for p in range(PARTITIONS)}
    checkpoints, log = tmp_path / "ckpt", tmp_path / "torchrun.log"
    applied: list[int] = []
    for ranks in (2, 1):
        command = _command(bootstrap, topic, group_id, checkpoints, "--collective-timeout-s", "30")
        command[command.index("--nproc-per-node=2")] = f"--nproc-per-node={ranks}"
        command[command.index("--poll-batch") + 1] = "200"
        before = len(log.read_text()) if log.exists() else 0
        process = _start(command, log)
        # Stopped once the launch's rounds have trained STEP records, not after a number of rounds:
        # a new model's warm-up comes to a round after every record (measured: 3 rounds, 6 records,
        # when this waited for 6 round lines), and the first rounds may have none yet.
        assert wait_until(lambda before=before: _group_trained(log.read_text()[before:]) >= STEP, 120), (
            log.read_text()[-3000:]
        )
        (pids,) = _lives(log.read_text()[before:].replace(f"of {ranks} (pid", "of 2 (pid"))
        os.kill(pids[ranks - 1], signal.SIGTERM)  # one rank asked to stop: the group ends
        assert process.wait(timeout=120) == 0, log.read_text()[-5000:]
        state = latest_state(checkpoints)
        assert state is not None
        applied.append(int(state[0]["records_applied"]))  # type: ignore[call-overload]
        assert f"rank 0 of {ranks}" in log.read_text()[before:]
    # Each launch made durable progress (what its rounds trained, then the stop's round), none finished.
    assert applied[0] >= STEP and applied[0] + STEP <= applied[1] < n, applied
    assert _launch(bootstrap, topic, group_id, checkpoints, log) == 0, log.read_text()[-5000:]
    _check(checkpoints, topic, truth, counts, log)
    assert _committed(bootstrap, topic, group_id) == counts
