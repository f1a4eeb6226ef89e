"""Workers as real processes (for kill -9), and reading their durable state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from streamtrainer.training.checkpoint import CheckpointStore

CLI = [sys.executable, "-m", "streamtrainer.cli"]
# Every process started, so a failing test never leaves a worker behind (see kill_survivors).
STARTED: list[subprocess.Popen[bytes]] = []


def kill_survivors() -> None:
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


class WorkerProcess:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        checkpoint_dir: Path,
        log: Path,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = [
            *CLI,
            "worker",
            "--bootstrap-servers",
            bootstrap,
            "--topic",
            topic,
            "--group",
            group,
            "--checkpoint-dir",
            str(checkpoint_dir),
            "--metrics-port",
            "-1",
            "--session-timeout-ms",
            "6000",
            *extra,
        ]
        self.checkpoint_dir = checkpoint_dir
        self.log = log
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAINER_")} | (env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def start(self) -> WorkerProcess:
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        STARTED.append(self.process)
        return self

    def running_loop(self) -> bool:
        """This life of the process has joined the group (its signal handlers are in place)."""
        if not self.log.exists():
            return False
        with open(self.log, "rb") as log:
            log.seek(self._log_start)
            return b"joining group" in log.read()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def terminate(self, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def latest_state(checkpoint_dir: Path) -> tuple[dict[str, object], np.ndarray] | None:
    """Metadata and weights of the newest valid checkpoint, read without taking the writer's lock."""
    store = CheckpointStore(checkpoint_dir)
    checkpoint = store.load_latest()
    if checkpoint is None:
        return None
    weight = checkpoint.tensors.get("model.weight")
    return checkpoint.metadata, (weight.numpy().reshape(-1) if weight is not None else np.zeros(0))


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
