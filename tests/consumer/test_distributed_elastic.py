"""``worker --distributed`` under failures and membership changes, with the stream still being produced.

Issue 18, point 2: an audit model over a stream produced while the ranks run; ``kill -9`` of random
ranks, 3 ranks, at least 10 times; and an elastic 2 -> 1 -> 2 resize inside one torchrun launch
(two agents, ``--nnodes=1:2``, c10d rendezvous). In both, every record is applied exactly once in the
final durable model (the audit model under ``--average-reduction sum``: its weights are the sum of
the records applied, see tests/consumer/test_distributed_worker.py), the checkpoint's positions and
the group's committed offsets are the partitions' ends, and every partition is owned by exactly one
rank at a time (``_check_ownership``, from the ranks' own log lines: under --distributed each names
its rank and process).
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition

from streamtrainer.records import Sample
from tests.consumer.test_distributed_worker import (  # noqa: F401  (an autouse fixture: killed after each test)
    _command,
    _no_worker_outlives_its_test,
    _start,
)
from tests.helpers import produce
from tests.processes import latest_state, wait_until
from tests.test_crash_recovery import _audit_samples, _per_partition_truth

_TAG = re.compile(r"\[rank \d+ pid (\d+)\] ")
_JOINED = re.compile(r"rank (\d+) of (\d+) \(pid (\d+)\) joined the process group")
_PARTITIONS = re.compile(r"rank (\d+) of (\d+): partitions (.*?) of (\d+) \(p mod")


@dataclass
class _Life:
    """One start of the ranks (the first, or a restart by torchrun): its world size and rank -> pid."""

    world: int
    pids: dict[int, int] = field(default_factory=dict)


def _lives(text: str) -> list[_Life]:
    """The group's lives in order, from the ranks' join lines (a rank again, or another world: a new life)."""
    lives: list[_Life] = []
    for rank, world, pid in _JOINED.findall(text):
        if not lives or int(world) != lives[-1].world or int(rank) in lives[-1].pids:
            lives.append(_Life(int(world)))
        lives[-1].pids[int(rank)] = int(pid)
    return lives


def _averaged(log: Path, life: int, rounds: int = 2) -> bool:
    """Life number ``life`` (from 0) has all its ranks up, and they averaged ``rounds`` times since."""
    text = log.read_text()
    lives = _lives(text)
    if len(lives) <= life or len(lives[life].pids) < lives[life].world:
        return False
    joined = max(text.rfind(f"(pid {pid}) joined") for pid in lives[life].pids.values())
    return f"round {rounds}:" in text[joined:]


def _newest_averaged(log: Path, since: int) -> int | None:
    """The newest life, if it is life ``since`` or later and has averaged twice."""
    newest = len(_lives(log.read_text())) - 1
    return newest if newest >= since and _averaged(log, newest) else None


def _check_ownership(text: str, topic: str, partitions: int) -> list[_Life]:
    """Every partition owned by exactly one rank at a time; returns the lives.

    Within a life, rank r of N owns the partitions p with p mod N == r (its ``partitions`` line):
    no partition twice, and all of them in a life whose ranks all assigned theirs. Between lives,
    every line of a life's processes comes before any line of the next life's: the processes of
    two lives never ran (owned partitions) at the same time. The log is one file that every process
    appends to (O_APPEND, a line per write), so its order is the order in which the lines were
    written.
    """
    lives = _lives(text)
    life_of = {pid: i for i, life in enumerate(lives) for pid in life.pids.values()}
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    owned: dict[int, dict[int, set[int]]] = {}  # life -> pid -> partitions
    for number, line in enumerate(text.splitlines()):
        tag = _TAG.search(line)
        if tag is None:
            continue
        pid = int(tag.group(1))
        if pid not in life_of:
            continue  # a process that never joined the process group (killed as it started)
        life = life_of[pid]
        first.setdefault(life, number)
        last[life] = number
        assigned = _PARTITIONS.search(line)
        if assigned is not None:
            rank, world, keys, total = (int(assigned[1]), int(assigned[2]), assigned[3], int(assigned[4]))
            mine = {int(p) for p in re.findall(rf"{re.escape(topic)}\[(\d+)\]", keys)}
            assert world == lives[life].world and lives[life].pids[rank] == pid, line
            assert total == partitions and mine == {p for p in range(partitions) if p % world == rank}, line
            owned.setdefault(life, {})[pid] = mine
    for life, by_pid in owned.items():
        sets = list(by_pid.values())
        assert sum(len(s) for s in sets) == len(set().union(*sets)), (life, by_pid)  # none twice
        if len(by_pid) == lives[life].world:
            assert set().union(*sets) == set(range(partitions)), (life, by_pid)
    for life in range(len(lives) - 1):
        if life in last and life + 1 in first:
            assert last[life] < first[life + 1], (life, lives[life], lives[life + 1])
    return lives


def _committed(bootstrap: str, topic: str, group: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in offsets}


def _durable_at(checkpoints: Path, topic: str, counts: dict[int, int]) -> bool:
    """The newest checkpoint's positions are ``counts`` (every partition's end)."""
    state = latest_state(checkpoints)
    return state is not None and state[0]["positions"] == {f"{topic}:{p}": n for p, n in counts.items()}


def _applied(checkpoints: Path) -> int:
    state = latest_state(checkpoints)
    return 0 if state is None else int(state[0]["records_applied"])  # type: ignore[call-overload]


def _audit(
    checkpoints: Path, topic: str, truth: dict[int, np.ndarray], counts: dict[int, int], log: Path
) -> tuple[int, int]:
    """The final durable model applied every record exactly once: returns (duplicates, losses).

    The weights are the sum of the records applied; feature 0 is 1, so w[0] is the count applied,
    and the other four (random integers) are what tells a duplicate plus a loss from neither.
    """
    state = latest_state(checkpoints)
    assert state is not None, log.read_text()[-3000:]
    metadata, weight = state
    expected = sum(truth.values())
    n = sum(counts.values())
    extra = round(float(weight[0])) - n
    duplicates, losses = max(extra, 0), max(-extra, 0)
    tail = log.read_text()[-3000:]
    assert weight.tolist() == expected.tolist(), (duplicates, losses, weight, expected, tail)
    assert metadata["records_applied"] == n
    assert metadata["positions"] == {f"{topic}:{p}": counts[p] for p in counts}
    assert metadata["applied"] == {f"{topic}:{p}": counts[p] for p in counts}
    return duplicates, losses


class _Producer(threading.Thread):
    """Produces the records it is fed (``feed``) while the ranks run: ``chunk`` at a time, ``pause`` apart.

    The test feeds a slice at each step (a life of the group, a resize), so the stream is being
    written while that step's ranks run and are killed, however long the steps take.
    """

    def __init__(self, bootstrap: str, topic: str, chunk: int = 500, pause: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.chunk, self.pause = bootstrap, topic, chunk, pause
        self.slices: queue.Queue[list[Sample] | None] = queue.Queue()
        self.fed = 0
        self.produced = 0

    def feed(self, samples: list[Sample]) -> None:
        self.fed += len(samples)
        self.slices.put(samples)

    def run(self) -> None:
        while (samples := self.slices.get()) is not None:
            for start in range(0, len(samples), self.chunk):
                chunk = samples[start : start + self.chunk]
                produce(self.bootstrap, self.topic, chunk, codec="binary")
                self.produced += len(chunk)
                time.sleep(self.pause)

    def finish(self, timeout: float) -> None:
        """Every record fed is produced (a failed produce ends the thread early, its error in the output)."""
        self.slices.put(None)
        self.join(timeout)
        assert not self.is_alive() and self.produced == self.fed, (self.produced, self.fed)


def _resumed(text: str, life: _Life) -> int:
    """The records applied in the checkpoint a life started from (0: none)."""
    pattern = rf"\[rank 0 pid {life.pids[0]}\] .*resumed from checkpoint \d+ \((\d+) records applied"
    found = re.search(pattern, text)
    return int(found[1]) if found else 0


@pytest.mark.integration
def test_kill_minus_9_of_random_ranks_of_3_while_the_stream_is_produced_applies_every_record_once(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    """3 ranks, 10 ``kill -9`` of a random rank, a producer writing the stream all along."""
    partitions, kills = 6, 10
    topic = topic_factory(partitions=partitions)
    n, first = 30_000, 3_000
    samples, _ = _audit_samples(n, seed=31)
    produce(bootstrap, topic, samples[:first], codec="binary")
    checkpoints, log = tmp_path / "ckpt", tmp_path / "torchrun.log"
    command = _command(bootstrap, topic, group_id, checkpoints, "--collective-timeout-s", "30")
    command[command.index("--nproc-per-node=2")] = "--nproc-per-node=3"
    command.insert(command.index("--standalone") + 1, f"--max-restarts={kills + 5}")
    command[command.index("--poll-batch") + 1] = "200"
    started = time.monotonic()
    process = _start(command, log)
    producer = _Producer(bootstrap, topic)
    producer.start()
    fed, step = first, 2_500  # records fed to the producer so far; a life's share
    rng = random.Random(31)
    killed = 0
    at_kills: list[tuple[int, int]] = []  # (records produced, records durable) at each kill
    seen = 0  # lives seen so far: the next kill is in a newer one
    while killed < kills:
        averaged = wait_until(lambda seen=seen: _newest_averaged(log, seen) is not None, 120)
        assert averaged, log.read_text()[-5000:]
        assert process.poll() is None, log.read_text()[-5000:]
        life = _newest_averaged(log, seen)
        assert life is not None
        seen = life + 1
        producer.feed(samples[fed : fed + step])  # written while this life runs and loses a rank
        fed += step
        time.sleep(rng.uniform(0.0, 1.0))
        pids = _lives(log.read_text())[life].pids
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[rng.choice(sorted(pids))], signal.SIGKILL)
            killed += 1
            at_kills.append((first + producer.produced, _applied(checkpoints)))
    producer.feed(samples[fed:])
    producer.finish(timeout=120)
    truth = _per_partition_truth(bootstrap, topic, partitions, n)
    counts = {p: int(truth[p][0]) for p in range(partitions)}  # feature 0 is 1: a count
    assert wait_until(lambda: _durable_at(checkpoints, topic, counts), 240), log.read_text()[-5000:]
    # One rank asked to stop: every rank ends at the next round, after which rank 0 checkpoints.
    last = _lives(log.read_text())[-1]
    os.kill(last.pids[last.world - 1], signal.SIGTERM)
    assert process.wait(timeout=120) == 0, log.read_text()[-5000:]
    took = time.monotonic() - started
    text = log.read_text()
    duplicates, losses = _audit(checkpoints, topic, truth, counts, log)
    assert _committed(bootstrap, topic, group_id, partitions) == counts
    lives = _check_ownership(text, topic, partitions)
    assert killed == kills and len(lives) >= kills + 1, (killed, len(lives))
    assert {life.world for life in lives} == {3}
    assert "joining the process group failed" not in text  # each life joined at once
    print(
        f"3 ranks: {killed} kill -9, {len(lives)} lives, {n} records ({n - first} produced while the ranks "
        f"ran), duplicates {duplicates}, losses {losses}, (produced, durable) at the kills {at_kills}, "
        f"{took:.0f} s"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
def test_an_elastic_resize_2_1_2_inside_one_launch_applies_every_record_once(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    """Two torchrun agents (``--nnodes=1:2``, c10d): one killed, then a new one: worlds 2, 1, 2.

    The agents are two "nodes" on this machine (the checkpoint directory is then one both reach).
    Agent A hosts the rendezvous store (started first; a killed host would end the rendezvous);
    agent B and its rank are killed (``kill -9``: a node lost), A's rank fails its next round,
    and A re-forms the rendezvous alone once B's heartbeats have stopped (world 1); agent C starts,
    A sees a node waiting and restarts its rank, and the next rendezvous has both (world 2). The
    ranks run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a store of each life's own; see
    consumer/rounds.py ``_launch_store`` for why several agents need it).
    """
    partitions = 4
    topic = topic_factory(partitions=partitions)
    n, first = 24_000, 4_000
    samples, _ = _audit_samples(n, seed=41)
    produce(bootstrap, topic, samples[:first], codec="binary")
    checkpoints, port = tmp_path / "ckpt", _free_port()
    command = _command(bootstrap, topic, group_id, checkpoints, "--collective-timeout-s", "30")
    command[command.index("--poll-batch") + 1] = "200"
    at = command.index("--standalone")
    command[at : at + 2] = [
        "--nnodes=1:2",
        "--nproc-per-node=1",
        "--max-restarts=5",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={group_id}",
        # A node gone is seen after 8 s without its heartbeat (torch's default: 3 x 5 s), well clear:
        # a heartbeat goes out when the last is an interval old, on a timer of that same interval,
        # so they come 1-2 s apart, and at 1 s x 2 an agent saw itself dead (measured). A rendezvous
        # with at least one node closes 5 s after it, unless the second node comes first.
        "--rdzv-conf=last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=8",
    ]
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    log = tmp_path / "torchrun.log"  # every agent and rank appends to it: one order of lines

    def start(name: str) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            out.write(f"--- agent {name} starts\n".encode())
        return _start(command, log, env=env)

    started = time.monotonic()
    agent_a = start("A")
    assert wait_until(lambda: _listening(port), 60), log.read_text()[-3000:]
    agent_b = start("B")
    producer = _Producer(bootstrap, topic)
    producer.start()
    step = 6_000  # records produced from each step on: world 2, the kill, agent C's start
    timeline: list[str] = []

    def life_with(world: int, rounds: int = 3) -> int | None:
        lives = _lives(log.read_text())
        if lives and lives[-1].world == world and _averaged(log, len(lives) - 1, rounds):
            return len(lives) - 1
        return None

    assert wait_until(lambda: life_with(2) is not None, 120), log.read_text()[-5000:]
    two = _lives(log.read_text())[-1]
    timeline.append(f"world 2 at {time.monotonic() - started:.1f} s, {_applied(checkpoints)} durable")
    producer.feed(samples[first : first + step])
    # Node B lost: its agent and its rank (torchrun starts each rank in a session of its own, so
    # the agent's process group does not hold it).
    (b_rank,) = [pid for pid in two.pids.values() if _parent(pid) == agent_b.pid]
    os.killpg(agent_b.pid, signal.SIGKILL)
    os.kill(b_rank, signal.SIGKILL)
    lost = time.monotonic()
    producer.feed(samples[first + step : first + 2 * step])
    assert wait_until(lambda: life_with(1) is not None, 120), log.read_text()[-5000:]
    timeline.append(
        f"world 1 {time.monotonic() - lost:.1f} s after the kill, {_applied(checkpoints)} durable"
    )
    agent_c = start("C")
    joined = time.monotonic()
    producer.feed(samples[first + 2 * step : first + 3 * step])
    assert wait_until(lambda: life_with(2) is not None and len(_lives(log.read_text())) > 2, 120), (
        log.read_text()[-5000:]
    )
    timeline.append(
        f"world 2 again {time.monotonic() - joined:.1f} s after agent C started, "
        f"{_applied(checkpoints)} durable"
    )
    producer.feed(samples[first + 3 * step :])
    producer.finish(timeout=120)
    truth = _per_partition_truth(bootstrap, topic, partitions, n)
    counts = {p: int(truth[p][0]) for p in range(partitions)}
    assert wait_until(lambda: _durable_at(checkpoints, topic, counts), 240), log.read_text()[-5000:]
    last = _lives(log.read_text())[-1]
    os.kill(last.pids[1], signal.SIGTERM)  # the group ends at the next round; both agents exit 0
    assert agent_c.wait(timeout=120) == 0, log.read_text()[-5000:]
    assert agent_a.wait(timeout=120) == 0, log.read_text()[-5000:]
    took = time.monotonic() - started
    text = log.read_text()
    duplicates, losses = _audit(checkpoints, topic, truth, counts, log)
    assert _committed(bootstrap, topic, group_id, partitions) == counts
    lives = _check_ownership(text, topic, partitions)
    worlds = [life.world for life in lives]
    assert re.search(r"2,( 2,)* 1,( 1,)* 2", ", ".join(map(str, worlds))), worlds
    # What each life left durable (the next one resumed from it): the rank alone made progress.
    durable = [_resumed(text, life) for life in lives[1:]] + [n]
    (alone,) = [i for i, life in enumerate(lives) if life.world == 1 and i > 0 and lives[i - 1].world == 2]
    assert durable[alone] > durable[alone - 1], durable
    assert "joining the process group failed" not in text  # each life joined at once
    print(
        f"elastic 2 -> 1 -> 2: lives {worlds}, durable at each life's end {durable}, {n} records "
        f"({n - first} produced while the ranks ran), duplicates {duplicates}, losses {losses}; "
        f"{'; '.join(timeline)}; {took:.0f} s"
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _parent(pid: int) -> int:
    """A process's parent, from /proc (the field after the parenthesised name)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _line(pid: int, rank: int, message: str) -> str:
    return f"12:00:00 INFO    [rank {rank} pid {pid}] streamtrainer.x: {message}"


def _joined(pid: int, rank: int, world: int) -> str:
    return _line(pid, rank, f"rank {rank} of {world} (pid {pid}) joined the process group")


def _assigned(pid: int, rank: int, world: int, partitions: list[int], total: int = 4) -> str:
    keys = ", ".join(f"t[{p}]" for p in partitions)
    return _line(pid, rank, f"rank {rank} of {world}: partitions {keys} of {total} (p mod {world} == {rank})")


def test_the_ownership_check_passes_lives_one_after_another_and_fails_an_overlap_or_a_wrong_share() -> None:
    """The check the two tests above rely on, on made-up logs: it can fail."""
    good = [
        _joined(10, 0, 2),
        _joined(11, 1, 2),
        _assigned(10, 0, 2, [0, 2]),
        _assigned(11, 1, 2, [1, 3]),
        _line(11, 1, "round 1: ..."),
        _joined(20, 0, 1),
        _assigned(20, 0, 1, [0, 1, 2, 3]),
        _joined(30, 1, 2),
        _joined(31, 0, 2),
        _assigned(31, 0, 2, [0, 2]),
        _assigned(30, 1, 2, [1, 3]),
    ]
    assert [(life.world, life.pids) for life in _check_ownership("\n".join(good), "t", 4)] == [
        (2, {0: 10, 1: 11}),
        (1, {0: 20}),
        (2, {1: 30, 0: 31}),
    ]
    # A process of the first life writes after the second life's began: two lives at once.
    overlap = [*good[:6], _line(11, 1, "round 2: ..."), *good[6:]]
    with pytest.raises(AssertionError):
        _check_ownership("\n".join(overlap), "t", 4)
    # A rank that reads another's partition (p mod N broken).
    wrong = [*good[:3], _assigned(11, 1, 2, [1, 2]), *good[4:]]
    with pytest.raises(AssertionError):
        _check_ownership("\n".join(wrong), "t", 4)
