"""Reading a process's children and state from /proc (Linux), for the process-lifetime tests."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def children(pid: int) -> list[int]:
    """The direct children of ``pid``, from every one of its threads."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue  # the thread ended meanwhile
    return found


def state(pid: int) -> str:
    """The process's state letter (R, S, D, T, Z, ...), or ``gone`` once it is reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running(pid: int) -> bool:
    """Alive: neither reaped nor a zombie."""
    return state(pid) not in ("gone", "Z", "X")


def kill_quietly(pids: list[int]) -> None:
    """SIGKILL whatever of ``pids`` still runs (a failed test leaves nothing behind)."""
    for pid in pids:
        if running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
