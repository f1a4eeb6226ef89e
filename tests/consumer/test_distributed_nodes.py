"""``worker --distributed`` as docker-compose.yml runs it: one torchrun agent per node (replica).

Each agent launches one rank (``--nproc-per-node=1``) and they meet at a c10d rendezvous hosted by
the first agent (``--rdzv-endpoint``), elastic ``--nnodes=1:2``, with
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` as in the compose file. Unlike ``--standalone`` (one agent,
tests/consumer/test_distributed_worker.py), a killed rank is restarted by its own agent, which
counts the failure, while the other agent restarts its rank for the membership change without
counting it: the ranks of the next life must still find each other (consumer/rounds.py,
``_launch_store``). The audit model checks every record is applied exactly once.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from torch._C._distributed_c10d import TCPStore

from streamtrainer.broker import free_port
from streamtrainer.consumer.rounds import _launch_store, launch_environment
from streamtrainer.exceptions import ConfigurationError
from tests.consumer.test_distributed_worker import (
    _LAUNCHED,
    PARTITIONS,
    _check,
    _command,
    _committed,
    _lives,
    _no_worker_outlives_its_test,  # noqa: F401  # autouse: no rank outlives the test
)
from tests.helpers import produce
from tests.processes import wait_until
from tests.test_crash_recovery import _audit_samples, _per_partition_truth


def test_a_life_keys_its_store_by_restart_only_on_the_agents_shared_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agents' shared store: keys of each restart (several agents on it: a usage error); a store
    of the life's own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): the same keys on every node, whatever
    each agent's restart count."""
    timeout = timedelta(seconds=10)
    agent = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # One agent, two local ranks, on the agent's store: the restart count keys the life.
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert launch_environment() == (0, 2, 0)
    _launch_store(0, 2, timeout).set("k", "one agent")
    assert agent.get("streamtrainer/job/3/2//k") == b"one agent"  # (PrefixStore adds a "/")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "4")  # the next life: keys of its own
    _launch_store(0, 2, timeout).set("k", "next life")
    assert agent.get("streamtrainer/job/3/2//k") == b"one agent"
    assert agent.get("streamtrainer/job/4/2//k") == b"next life"
    # Two agents (nodes) on the shared store: refused before any store is joined.
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    with pytest.raises(ConfigurationError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        launch_environment()
    # A store of the life's own: rank 0 hosts it on the port torchrun found; no restart count.
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert launch_environment() == (0, 2, 0)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    own = _launch_store(0, 1, timeout)
    own.set("k", "own")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # another agent's count, same life
    assert _launch_store(1, 1, timeout).get("k") == b"own"


def _agent(command: list[str], endpoint: str, log: Path) -> subprocess.Popen[bytes]:
    """One node's torchrun agent (as one compose replica runs it), its output appended to ``log``."""
    rendezvous = [
        "--nnodes=1:2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-id=streamtrainer-test",
        "--local-addr=127.0.0.1",
        "--max-restarts=10",
    ]
    start = command.index("--standalone")
    command = [*command[:start], *rendezvous, *command[start + 1 :]]
    command[command.index("--nproc-per-node=2")] = "--nproc-per-node=1"
    environment = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=environment
        )
    _LAUNCHED.append(process)
    return process


def _rounds_in_life(text: str, life: int) -> int:
    """Rounds logged since life number ``life`` (from 1) had both ranks joined."""
    lives = _lives(text)
    if len(lives) < life or len(lives[life - 1]) < 2:
        return 0
    joined = max(text.rfind(f"(pid {pid}) joined") for pid in lives[life - 1].values())
    return text[joined:].count("records of the group")


@pytest.mark.integration
def test_two_agents_survive_kills_of_a_rank_and_apply_every_record_once(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=PARTITIONS)
    n, kills = 16_000, 3
    samples, _ = _audit_samples(n, seed=21)
    produce(bootstrap, topic, samples, codec="binary")
    truth = _per_partition_truth(bootstrap, topic, PARTITIONS, n)
    counts = {p: int(truth[p][0]) for p in range(PARTITIONS)}
    checkpoints, log = tmp_path / "ckpt", tmp_path / "torchrun.log"
    command = _command(
        bootstrap, topic, group_id, checkpoints, "--stop-at-end", "--collective-timeout-s", "30"
    )
    command[command.index("--poll-batch") + 1] = "100"  # slow enough to outlive the kills
    endpoint = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    agents = [_agent(command, endpoint, log), _agent(command, endpoint, log)]
    rng = random.Random(6)
    killed, lives_took = 0, []
    for life in range(1, kills + 1):
        began = time.monotonic()
        assert wait_until(
            lambda life=life: (
                _rounds_in_life(log.read_text(), life) >= 2 or all(a.poll() is not None for a in agents)
            ),
            120,
        ), log.read_text()[-4000:]
        lives_took.append(time.monotonic() - began)
        if any(a.poll() is not None for a in agents):
            break
        time.sleep(rng.uniform(0.0, 1.0))
        pids = _lives(log.read_text())[life - 1]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[rng.choice(sorted(pids))], signal.SIGKILL)
            killed += 1
    codes = [a.wait(timeout=300) for a in agents]
    took = time.monotonic() - started
    text = log.read_text()
    print(
        f"{killed} kills; each next life averaging after {[round(t, 1) for t in lives_took]} s; {took:.0f} s"
    )
    assert codes == [0, 0], text[-5000:]
    assert killed == kills, (killed, text[-3000:])  # the run outlived every kill
    # Every life after a kill joined at once: no round failed on a rank that never came.
    assert "did not come within --collective-timeout-s" not in text.split("joined the process group")[-1]
    assert max(lives_took[1:]) < 60, lives_took  # not a collective timeout (30 s) per life
    _check(checkpoints, topic, truth, counts, log)
    assert _committed(bootstrap, topic, group_id) == counts
