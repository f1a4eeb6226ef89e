"""`streamtrainer broker` stops on SIGTERM and SIGINT, and Tansu never outlives it (issue #15, case 7).

Real processes: the command is started as `python -m streamtrainer.cli broker`, Tansu is
found among its children in /proc, and the test checks what is left after the signal.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamtrainer.broker import free_port
from tests.processes import wait_until
from tests.processes_.proc_tree import children, kill_quietly, running, state

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

STOP_WITHIN_S = 5.0  # what issue #15 asks of a stop signal


class BrokerCommand:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.process: subprocess.Popen[bytes] | None = None
        self.seen: list[int] = []  # every child seen, for the clean-up

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.out, "wb") as out:
            command = [sys.executable, "-m", "streamtrainer.cli", "broker", "--port", str(free_port())]
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        return self.process

    def tansu(self, timeout: float = 30) -> int:
        """Tansu's pid: the command's one child."""
        assert self.process is not None
        assert wait_until(lambda: children(self.process.pid), timeout, interval=0.01), self.output()  # type: ignore[union-attr]
        (pid,) = children(self.process.pid)
        self.seen.append(pid)
        return pid

    def listening(self, timeout: float = 30) -> None:
        assert wait_until(lambda: b"broker listening on" in self.out.read_bytes(), timeout), self.output()

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def clean_up(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        kill_quietly(self.seen)


@pytest.fixture
def broker_command(tmp_path: Path) -> Iterator[BrokerCommand]:
    command = BrokerCommand(tmp_path / "broker.out")
    yield command
    command.clean_up()


def _stopped(command: BrokerCommand, tansu: int) -> int:
    """The command's exit status; fails if it or Tansu is still there (or Tansu unreaped)."""
    assert command.process is not None
    try:
        status = command.process.wait(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_WITHIN_S:.0f}s after the signal; Tansu is {state(tansu)}")
    # Reaped by the command before it exited: not running, not a zombie.
    assert state(tansu) == "gone", (state(tansu), command.output())
    return status


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_broker_command_stops_on_signal(broker_command: BrokerCommand, signum: int) -> None:
    process = broker_command.start()
    tansu = broker_command.tansu()
    broker_command.listening()
    started = time.monotonic()
    process.send_signal(signum)
    assert _stopped(broker_command, tansu) == 0, broker_command.output()
    output = broker_command.output()
    assert f"received {signal.Signals(signum).name}" in output
    print(f"{signal.Signals(signum).name}: stopped in {time.monotonic() - started:.2f}s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_broker_command_stops_on_signal_during_startup(broker_command: BrokerCommand, signum: int) -> None:
    """The signal arrives while Tansu starts, before it listens (it takes about a second)."""
    process = broker_command.start()
    tansu = broker_command.tansu()
    process.send_signal(signum)
    assert _stopped(broker_command, tansu) == 0, broker_command.output()


def test_tansu_dies_with_a_killed_broker_command(broker_command: BrokerCommand) -> None:
    process = broker_command.start()
    tansu = broker_command.tansu()
    broker_command.listening()
    process.kill()
    process.wait()
    # Its parent gone, Tansu is reaped by whoever adopts it: a zombie at worst, never running.
    assert wait_until(lambda: not running(tansu), STOP_WITHIN_S, interval=0.05), state(tansu)
