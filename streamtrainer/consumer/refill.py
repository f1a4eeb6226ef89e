"""Reading the compaction store's rows back from the log: what makes crash recovery deterministic.

The compaction store is a cache of the log (see ``training/compaction/store.py``):
a restarted worker opens it empty. Without its rows, the next compactions would
replay other windows than an uninterrupted run would, and the models would part.
So a checkpoint records which rows the coming windows may still need — the rows
of the store that the next window would take now, as a :class:`WindowPlan` —
and after a restart, a rollback or a re-assignment the worker reads exactly
those records again (:func:`read_plan`) with a short-lived consumer of its own
(direct assignment: it joins no group and commits nothing), decodes them
through the worker's own path and puts them back in the store in their order.

A plan is a list of runs ``[partition, first, last]`` in arrival order: rows
of one partition at consecutive offsets. A record that was not in the store
(dead-lettered: undecodable, a label out of range, refused by a training guard)
ends a run, so the plan names the store's rows exactly and the refill needs no
judgement of its own. One partition without dead letters is one run; a plan
with more than ``MAX_RUNS`` runs (many partitions interleaved, many dead
letters) keeps only each partition's span, in the order the partitions first
appear, and the refill then takes every trainable record in the spans.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamtrainer.connection import assigning_consumer_config
from streamtrainer.consumer.messages import HeaderCodecs, key_bytes, timestamps_of
from streamtrainer.consumer.validation import trainable_rows
from streamtrainer.records import BatchDecoder
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import OnlineLearner

logger = logging.getLogger(__name__)

# A checkpoint's plan stays a few tens of kB at most (~25 bytes of JSON a run).
MAX_RUNS: Final = 2000
_POLL_BATCH: Final = 10_000

Run = tuple[int, int, int]  # partition, first offset, last offset (inclusive)


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """The store's rows the coming compaction windows may need, as runs of the log (arrival order).

    ``exact``: the runs name exactly the rows the store held; False: only each
    partition's span (too many runs to record), and every trainable record in it counts.
    """

    runs: tuple[Run, ...]
    exact: bool = True

    @classmethod
    def of(
        cls,
        partitions: npt.NDArray[np.int32],
        offsets: npt.NDArray[np.int64],
        max_runs: int = MAX_RUNS,
    ) -> WindowPlan:
        """The plan of the rows ``(partitions[i], offsets[i])``, in their order."""
        n = int(partitions.shape[0])
        if n == 0:
            return cls(())
        p = partitions.astype(np.int64)
        breaks = np.flatnonzero((p[1:] != p[:-1]) | (offsets[1:] != offsets[:-1] + 1)) + 1
        starts = np.r_[0, breaks]
        ends = np.r_[breaks - 1, n - 1]
        if starts.shape[0] <= max_runs:
            runs = tuple(
                (int(p[s]), int(offsets[s]), int(offsets[e])) for s, e in zip(starts, ends, strict=True)
            )
            return cls(runs)
        first_seen: dict[int, tuple[int, int]] = {}
        for partition, offset in zip(p.tolist(), offsets.tolist(), strict=True):
            low, high = first_seen.get(partition, (offset, offset))
            first_seen[partition] = (min(low, offset), max(high, offset))
        return cls(tuple((q, low, high) for q, (low, high) in first_seen.items()), exact=False)

    @classmethod
    def from_json(cls, document: object) -> WindowPlan | None:
        """A plan from checkpoint metadata (None: none there, or not one this version reads)."""
        if not isinstance(document, dict):
            return None
        runs = document.get("runs")
        if not isinstance(runs, list):
            return None
        parsed: list[Run] = []
        for run in runs:
            if not (isinstance(run, list) and len(run) == 3 and all(isinstance(v, int) for v in run)):
                return None
            parsed.append((run[0], run[1], run[2]))
        return cls(tuple(parsed), exact=document.get("exact") is not False)

    def as_json(self) -> dict[str, object]:
        """The plan as checkpoint metadata (JSON)."""
        return {"runs": [list(run) for run in self.runs], "exact": self.exact}

    @property
    def records(self) -> int:
        """Offsets the runs cover (the rows, for an exact plan)."""
        return sum(last - first + 1 for _, first, last in self.runs)

    @property
    def partitions(self) -> set[int]:
        """The partitions the plan names."""
        return {partition for partition, _, _ in self.runs}

    def before(self, starts: Mapping[int, int]) -> WindowPlan:
        """The runs of the partitions in ``starts``, cut to the offsets before each one's start."""
        runs: list[Run] = []
        for partition, first, last in self.runs:
            start = starts.get(partition)
            if start is None or first >= start:
                continue
            runs.append((partition, first, min(last, start - 1)))
        return WindowPlan(tuple(runs), self.exact)

    def spans(self) -> dict[int, tuple[int, int]]:
        """Per partition: the first and last offset of its runs."""
        spans: dict[int, tuple[int, int]] = {}
        for partition, first, last in self.runs:
            low, high = spans.get(partition, (first, last))
            spans[partition] = (min(low, first), max(high, last))
        return spans


@dataclass(frozen=True, slots=True)
class RefilledRows:
    """Decoded rows of a plan, in the plan's order: what goes back into the compaction store."""

    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.float32]
    partitions: npt.NDArray[np.int32]
    offsets: npt.NDArray[np.int64]
    keys: list[bytes | None] | None
    timestamps: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_plan(settings: WorkerSettings, plan: WindowPlan, *, timeout_s: float) -> dict[int, list[Message]]:
    """The records of each partition's span in ``plan``, in offset order, read with a consumer of our own.

    Direct assignment, no group, no commit. Stops at each span's last offset, at
    the end of the log, or after ``timeout_s`` (a warning then says what is missing).
    """
    spans = plan.spans()
    read: dict[int, list[Message]] = {partition: [] for partition in spans}
    if not spans:
        return read
    topic = settings.topic
    consumer = Consumer(
        assigning_consumer_config(  # type: ignore[arg-type]
            settings,
            **{
                # Never used for a request: this consumer neither joins a group nor commits.
                "group.id": f"streamtrainer-refill-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                # Records the retention deleted meanwhile are gone: read what is left.
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
                "fetch.queue.backoff.ms": 5,
            },
        )
    )
    pending = dict(spans)
    try:
        consumer.assign([TopicPartition(topic, partition, first) for partition, (first, _) in spans.items()])
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=_POLL_BATCH, timeout=0.2):
                partition = message.partition()
                if partition is None or partition not in pending:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.pop(partition)  # the log ends before the span does
                    elif error.fatal():
                        raise KafkaException(error)
                    continue
                offset = message.offset() or 0
                first, last = pending[partition]
                if first <= offset <= last:
                    read[partition].append(message)
                if offset >= last:
                    pending.pop(partition)
    finally:
        with contextlib.suppress(KafkaException, RuntimeError):
            consumer.close()
    if pending:
        logger.warning(
            "compaction store: not all records read back from %s within %.0f s (%s)",
            topic,
            timeout_s,
            ", ".join(f"[{p}] from {spans[p][0]}" for p in sorted(pending)),
        )
    return read


def decode_plan(
    plan: WindowPlan,
    read: Mapping[int, Sequence[Message]],
    decoder: BatchDecoder,
    learner: OnlineLearner,
    *,
    keys: bool,
) -> RefilledRows:
    """The rows of ``plan`` among the ``read`` records, decoded as the worker decodes, in the plan's order.

    The worker's path: ``decoder.decode`` with the records' codec headers, then
    :func:`trainable_rows`; for an exact plan only the offsets its runs name.
    """
    messages = [message for partition in sorted(read) for message in read[partition]]
    n_features = decoder.n_features or learner.n_features
    if not messages:
        return _empty(n_features, keys)
    batch = decoder.decode([message.value() for message in messages], HeaderCodecs(messages))
    features, labels, index = trainable_rows(batch, learner, list(batch.errors))
    partitions = np.array([messages[i].partition() or 0 for i in index.tolist()], dtype=np.int32)
    offsets = np.array([messages[i].offset() or 0 for i in index.tolist()], dtype=np.int64)
    run_of = _run_of(plan, partitions, offsets)
    kept = np.flatnonzero(run_of >= 0)
    # By run, and within a run by offset (the records are in offset order per partition already).
    order = kept[np.argsort(run_of[kept], kind="stable")]
    chosen = [messages[i] for i in index[order].tolist()]
    return RefilledRows(
        np.ascontiguousarray(features[order]),
        np.ascontiguousarray(labels[order]),
        partitions[order],
        offsets[order],
        [key_bytes(message) for message in chosen] if keys else None,
        timestamps_of(chosen),
    )


def _run_of(
    plan: WindowPlan, partitions: npt.NDArray[np.int32], offsets: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """For each row, the position in ``plan.runs`` of the run that holds it (-1: none)."""
    found = np.full(partitions.shape[0], -1, dtype=np.int64)
    by_partition: dict[int, list[tuple[int, int, int]]] = {}
    for position, (partition, first, last) in enumerate(plan.runs):
        by_partition.setdefault(partition, []).append((first, last, position))
    for partition, runs in by_partition.items():
        runs.sort()
        firsts = np.array([first for first, _, _ in runs], dtype=np.int64)
        lasts = np.array([last for _, last, _ in runs], dtype=np.int64)
        positions = np.array([position for _, _, position in runs], dtype=np.int64)
        rows = np.flatnonzero(partitions == partition)
        slot = np.searchsorted(firsts, offsets[rows], side="right") - 1
        inside = (slot >= 0) & (offsets[rows] <= lasts[np.maximum(slot, 0)])
        found[rows[inside]] = positions[slot[inside]]
    return found


def _empty(n_features: int, keys: bool) -> RefilledRows:
    return RefilledRows(
        np.empty((0, n_features), np.float32),
        np.empty(0, np.float32),
        np.empty(0, np.int32),
        np.empty(0, np.int64),
        [] if keys else None,
        np.empty(0, np.int64),
    )
