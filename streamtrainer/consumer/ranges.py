"""Bounded offset ranges of a topic: parsing ``--from`` / ``--to`` and resolving them to offsets.

A bound is one of:

* ``earliest`` (``--from`` only): the partition's log start offset (low watermark);
* ``end`` (``--to`` only): the end of the log, see :class:`PartitionRange`;
* ``P:O,P:O,...``: exact offsets per partition (an end offset is exclusive);
* an ISO-8601 time such as ``2024-05-01T12:00:00Z`` (no zone: UTC): the first
  offset whose record timestamp is at or after it (``offsets_for_times``).

When either bound names partitions, only the named partitions are read; a
partition named on one side only takes ``earliest`` / ``end`` (or the time) on
the other. Parsing and resolution are pure: the broker's answers (watermarks,
time lookups) are passed in, so every rule here is testable without a broker.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from streamtrainer.consumer.exceptions import ConsumerError
from streamtrainer.exceptions import ConfigurationError

BoundKind = Literal["earliest", "end", "offsets", "time"]
Side = Literal["from", "to"]

_OFFSETS = re.compile(r"^\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*,?\s*$")


class RangeError(ConsumerError):
    """A requested range cannot be read as asked (missing partition, deleted offsets, empty...)."""


@dataclass(frozen=True, slots=True)
class Bound:
    kind: BoundKind
    offsets: Mapping[int, int] = field(default_factory=dict)
    timestamp_ms: int | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.kind


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets ``[start, end)`` of one partition; ``end`` None: up to the end of the log.

    The end of the log is where reading finds no more records: the reader keeps
    going past the high watermark it saw at the start until nothing arrives for
    a moment (some brokers, such as Tansu, report a high watermark that is too low).
    """

    partition: int
    start: int
    end: int | None

    def __str__(self) -> str:
        return f"[{self.partition}] {self.start}..{'end' if self.end is None else self.end}"


def parse_bound(text: str, side: Side) -> Bound:
    """Parse a ``--from`` (``side="from"``) or ``--to`` bound; a malformed one is a usage error."""
    raw = text.strip()
    word = raw.lower()
    if side == "from" and word == "earliest":
        return Bound("earliest", text=raw)
    if side == "to" and word == "end":
        return Bound("end", text=raw)
    if _OFFSETS.match(raw):
        offsets: dict[int, int] = {}
        for item in raw.split(","):
            if not item.strip():
                continue
            partition_text, _, offset_text = item.partition(":")
            partition, offset = int(partition_text), int(offset_text)
            if partition in offsets:
                raise ConfigurationError(f"--{side}: partition {partition} is named twice in {raw!r}")
            offsets[partition] = offset
        return Bound("offsets", offsets=offsets, text=raw)
    moment = _parse_time(raw)
    if moment is not None:
        return Bound("time", timestamp_ms=int(moment.timestamp() * 1000), text=raw)
    keyword = "earliest" if side == "from" else "end"
    raise ConfigurationError(
        f"--{side} {text!r} is not {keyword}, P:O[,P:O...] (partition:offset) or an ISO-8601 time"
    )


def _parse_time(text: str) -> datetime | None:
    if not text or not text[0].isdigit() or "-" not in text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def selected_partitions(start: Bound, end: Bound, topic: str, existing: Sequence[int]) -> list[int]:
    """The partitions a range reads: the named ones if any bound names some, else all of them."""
    named = set(start.offsets) | set(end.offsets)
    known = set(existing)
    missing = sorted(named - known)
    if missing:
        raise RangeError(
            f"topic {topic!r} has no partition {', '.join(map(str, missing))} "
            f"(it has {len(known)}: {_describe_partitions(sorted(known))})"
        )
    return sorted(named) if named else sorted(known)


def resolve_ranges(
    start: Bound,
    end: Bound,
    *,
    topic: str,
    existing: Sequence[int],
    watermarks: Mapping[int, tuple[int, int]],
    offset_for_time: Callable[[int, int], int] | None = None,
) -> list[PartitionRange]:
    """Offsets of every partition to read.

    ``watermarks[p]`` is ``(low, high)`` of partition p when reading starts;
    ``offset_for_time(p, ms)`` the first offset with a timestamp at or after ``ms``
    (negative: none). Raises :class:`RangeError` for a range that cannot be read as
    asked: a partition that does not exist, a start below the log start offset,
    a start after the end, or a range that is known to be empty.
    """
    ranges = []
    for partition in selected_partitions(start, end, topic, existing):
        low, high = watermarks[partition]
        first = _resolve_start(start, partition, low, high, offset_for_time)
        last = _resolve_end(end, partition, high, offset_for_time)
        if first < low:
            raise RangeError(
                f"partition {partition} of {topic!r}: the range starts at offset {first}, below the "
                f"log start offset {low} (the records before it were deleted)"
            )
        if last is not None and first > last:
            raise RangeError(
                f"partition {partition} of {topic!r}: the range starts at offset {first} ({start}), "
                f"after its end {last} ({end})"
            )
        ranges.append(PartitionRange(partition, first, last))
    if all(r.end is not None and r.end == r.start for r in ranges):
        timed = " (no record's timestamp is in that time)" if "time" in (start.kind, end.kind) else ""
        raise RangeError(f"the range {start}..{end} of {topic!r} is empty: {describe_ranges(ranges)}{timed}")
    return ranges


def _resolve_start(
    bound: Bound, partition: int, low: int, high: int, offset_for_time: Callable[[int, int], int] | None
) -> int:
    if bound.kind == "offsets" and partition in bound.offsets:
        return bound.offsets[partition]
    if bound.kind == "time":
        return _time_offset(bound, partition, high, offset_for_time)
    return low


def _resolve_end(
    bound: Bound, partition: int, high: int, offset_for_time: Callable[[int, int], int] | None
) -> int | None:
    if bound.kind == "offsets" and partition in bound.offsets:
        return bound.offsets[partition]
    if bound.kind == "time":
        return _time_offset(bound, partition, high, offset_for_time)
    return None


def _time_offset(
    bound: Bound, partition: int, high: int, offset_for_time: Callable[[int, int], int] | None
) -> int:
    if offset_for_time is None or bound.timestamp_ms is None:
        raise RangeError(f"cannot look up offsets by time for {bound}")
    offset = offset_for_time(partition, bound.timestamp_ms)
    # No record at or after that time: the range bound is the end of the log.
    return offset if offset >= 0 else high


def check_time_answer(
    bound: Bound, partition: int, topic: str, answer: int, records: Sequence[tuple[int, int | None]]
) -> None:
    """Raise :class:`RangeError` when the broker's answer to a time lookup contradicts the log.

    ``answer`` is the offset the broker gave for ``bound``'s time, the first record at or after it
    (negative: none); ``records`` are (offset, timestamp in ms or None) of records read around it: the
    one before the answer and the answer's, or the last of the log when there was none. A broker that
    cannot look up offsets by time (the embedded Tansu answers offset 0 for any time) would otherwise
    turn a time range into the wrong records, or into an "empty" range without a reason.
    """
    target = bound.timestamp_ms
    if target is None:
        return
    for offset, timestamp in records:
        if timestamp is None or timestamp < 0:
            continue  # no timestamp to judge by
        # The answer's record must be at or after the time; one before it (or past "none"), before it.
        answers = answer >= 0 and offset >= answer
        if timestamp < target if answers else timestamp >= target:
            when = datetime.fromtimestamp(timestamp / 1000, UTC).isoformat(timespec="milliseconds")
            said = f"offset {answer}" if answer >= 0 else "no offset"
            raise RangeError(
                f"partition {partition} of {topic!r}: the broker did not resolve the timestamp {bound} "
                f"(it answered {said}, but the record at offset {offset} is from {when}); it cannot look "
                "up offsets by time (the embedded Tansu broker cannot): use offsets (P:O,...)"
            )
        if answers:
            return  # the answer's own record: the ones after it are not the broker's claim


def describe_ranges(ranges: Sequence[PartitionRange]) -> str:
    return ", ".join(str(r) for r in ranges) or "no partitions"


def _describe_partitions(partitions: Sequence[int]) -> str:
    if partitions and partitions == list(range(partitions[0], partitions[-1] + 1)) and len(partitions) > 2:
        return f"{partitions[0]}-{partitions[-1]}"
    return ", ".join(map(str, partitions)) or "none"
