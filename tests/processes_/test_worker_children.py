"""No child of a worker outlives a kill -9 of it (issue #15, case 11).

A worker starts its fused-loop compiler as a child process at start-up
(kernels.prepare); with an empty numba cache that child compiles for seconds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.processes import WorkerProcess, kill_survivors, wait_until
from tests.processes_.proc_tree import children, command_line, kill_quietly, running, state

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    kill_survivors()
    kill_quietly(pids)


def test_worker_kill_leaves_no_compiler_running(
    bootstrap: str,
    topic_factory: Callable[..., str],
    group_id: str,
    tmp_path: Path,
    leftovers: list[int],
) -> None:
    topic = topic_factory(1)
    worker = WorkerProcess(
        bootstrap,
        topic,
        group_id,
        tmp_path / "checkpoints",
        tmp_path / "worker.log",
        "--model",
        "mlp",
        "--task",
        "regression",
        "--optimizer",
        "adam",
        # An empty cache: the compiler child works for seconds (6 s here for mlp + adam).
        env={"NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")},
    ).start()
    assert worker.process is not None
    pid = worker.process.pid

    def compiler_started() -> bool:
        return any("fused_loops" in command_line(child) for child in children(pid))

    assert wait_until(compiler_started, timeout=90, interval=0.02), worker.log.read_text()
    leftovers += children(pid)  # collected before the kill: afterwards they are nobody's children
    worker.kill()  # kill -9, during start-up
    assert wait_until(lambda: not any(running(child) for child in leftovers), timeout=3, interval=0.05), [
        (child, state(child), command_line(child)[:80]) for child in leftovers
    ]
