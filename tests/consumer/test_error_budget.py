"""The error budget's window arithmetic (the worker and replay tests run it through the broker)."""

from __future__ import annotations

import pytest

from streamtrainer.consumer.error_budget import ErrorBudget


def _feed(budget: ErrorBudget, bad: list[bool]) -> int | None:
    """Consume ``bad`` one record at a time; the index at which the budget was spent, if it was."""
    for index, is_bad in enumerate(bad):
        first = budget.consume(1)
        if is_bad and budget.invalid([first]) is not None:
            return index
        if budget.check() is not None:
            return index
    return None


def test_no_verdict_on_the_first_hundred_records() -> None:
    budget = ErrorBudget("budget", 0.1, 1000)
    assert _feed(budget, [True] * 99) is None
    # The 100th record: 100 of 100 invalid.
    assert budget.invalid([budget.consume(1)]) is not None
    assert budget.spent is not None and (budget.spent.invalid, budget.spent.records) == (100, 100)


def test_a_share_within_the_budget_never_trips() -> None:
    budget = ErrorBudget("budget", 0.1, 1000)
    assert _feed(budget, [i % 10 == 9 for i in range(50_000)]) is None  # exactly 10%: not more than
    assert budget.share == pytest.approx(0.1)


def test_a_burst_trips_once_the_window_holds_more_than_the_share() -> None:
    budget = ErrorBudget("budget", 0.1, 1000)
    bad = [False] * 5000 + [True] * 200
    # The window of 1,000 ending at record 5000+k holds k+1 invalid: 101 > 100 at k = 100.
    assert _feed(budget, bad) == 5100


def test_old_invalid_records_leave_the_window() -> None:
    budget = ErrorBudget("budget", 0.1, 1000)
    bad = ([True] * 90 + [False] * 910) * 20  # any 1,000 consecutive records hold at most 90 invalid
    assert _feed(budget, [False] * 1000 + bad) is None


def test_bad_records_early_in_a_small_run_are_judged_once_enough_are_consumed() -> None:
    budget = ErrorBudget("budget", 0.1, 1000)
    # 50 invalid, then valid ones: at record 100 the window holds 50 of 100.
    assert _feed(budget, [True] * 50 + [False] * 100) == 99


def test_none_and_all() -> None:
    assert _feed(ErrorBudget("none", 0.1, 1000), [False] * 10 + [True]) == 10
    assert _feed(ErrorBudget("all", 0.1, 1000), [True] * 5000) is None


def test_the_window_survives_a_checkpoint() -> None:
    budget = ErrorBudget("budget", 0.1, 1000)
    _feed(budget, [False] * 900 + [True] * 80)
    restored = ErrorBudget("budget", 0.1, 1000)
    restored.restore(budget.state())
    assert _feed(restored, [True] * 30) == 20  # 80 + 21 > 100
    fresh = ErrorBudget("budget", 0.1, 1000)
    assert _feed(fresh, [True] * 30) is None  # too few records to judge


def test_records_counted_out_of_order_are_placed_in_order() -> None:
    # A batch's decode errors (late indices) come before its guard refusals (earlier indices).
    budget = ErrorBudget("budget", 0.1, 1000)
    budget.consume(1100)
    assert budget.invalid(range(910, 1000)) is None  # 90 invalid
    assert budget.invalid(range(1090, 1100)) is None  # window ending at 1099: 100 of 1000
    # A refusal at 1005: the window ending there holds 91, not 101.
    assert budget.invalid([1005]) is None
    verdict = budget.check()  # ending at 1099: 101 of 1000
    assert verdict is not None and (verdict.invalid, verdict.records, verdict.index) == (101, 1000, 1099)
