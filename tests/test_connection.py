"""Client-side helpers shared by the producer and the worker (pure logic, no broker)."""

from __future__ import annotations

import pytest

from streamtrainer import connection
from streamtrainer.connection import RepeatedErrors


def test_a_repeated_error_is_reported_once_per_interval_with_what_was_held_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(connection.time, "monotonic", lambda: clock[0])
    errors = RepeatedErrors(interval_s=5.0)
    assert errors.admit("broker down") == ""
    assert errors.admit("broker down") is None
    assert errors.admit("other error") == ""  # each distinct text has its own interval
    clock[0] = 103.0
    assert errors.admit("broker down") is None
    clock[0] = 105.5
    assert errors.admit("broker down") == " (2 more like it)"
    assert errors.admit("broker down") is None
