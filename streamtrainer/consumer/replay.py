"""`streamtrainer replay`: train in epochs on a bounded, recorded range of a topic.

Reading never disturbs a live worker group. Partitions are assigned directly
(``Consumer.assign``) under a throwaway group id, with auto-commit off and no
commit at all; ``auto.offset.reset=error`` turns an offset outside the log into
an error instead of a silent jump. Records are decoded by the worker's
:class:`BatchDecoder` (codec from the record header) and kept in a
:class:`CompactionStore` under ``OUT/shards``, which spills to disk so memory
stays bounded while reading.

Then the records are put in a canonical order (partition, then offset: arrival
order across partitions is not reproducible), a seeded holdout is split off,
the scaler is fitted on the training part (a new model only), and the model is
trained ``epochs`` shuffled epochs of mini-batch SGD with
``torch.use_deterministic_algorithms(True)``: the same records, config and
seed give a bitwise-identical model. The checkpoint is written by
:class:`CheckpointStore` in the worker's layout (a worker can resume from it:
its positions are the ends of the range), and ``OUT/manifest.json`` records
what was read and how it was trained, so ``--manifest`` can replay it exactly.

``--to end`` means the end of the log when reading *finishes*: the reader keeps
going past the high watermark it saw at the start until every partition reported
its end and no record arrived for ``--idle-s``. (The embedded Tansu broker
reports high watermarks that are too low, so they cannot bound the read.) The
manifest records the actual end offsets.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streamtrainer import __version__
from streamtrainer.connection import (
    admin_client,
    assigning_consumer_config,
    check_reachable,
    topic_partitions,
)
from streamtrainer.consumer.error_budget import MIN_RECORDS, ErrorBudgetExceeded
from streamtrainer.consumer.exceptions import ConsumerError
from streamtrainer.consumer.messages import HeaderCodecs
from streamtrainer.consumer.ranges import (
    Bound,
    PartitionRange,
    RangeError,
    check_time_answer,
    describe_ranges,
    parse_bound,
    resolve_ranges,
)
from streamtrainer.consumer.schema_probe import settle_schema_from_log
from streamtrainer.consumer.validation import trainable_rows
from streamtrainer.exceptions import ConfigurationError, TopicError
from streamtrainer.records import BatchDecoder, DecodeError
from streamtrainer.settings import ReplaySettings
from streamtrainer.training import LearnerConfig, OnlineLearner
from streamtrainer.training.checkpoint import Checkpoint, CheckpointStore
from streamtrainer.training.compaction.epochs import evaluate, split_holdout, train_epochs
from streamtrainer.training.compaction.store import CompactionStore, EpochData
from streamtrainer.training.exceptions import CheckpointError, TrainingError
from streamtrainer.training.learner import prepare_training
from streamtrainer.training.threads import set_intra_op_threads

logger = logging.getLogger(__name__)

MANIFEST_FORMAT: Final = "streamtrainer-replay-manifest/1"
MANIFEST_NAME: Final = "manifest.json"
_POLL_BATCH: Final = 5000
_LENGTH: Final = struct.Struct("<q")
_INVALID_LOG_INTERVAL_S: Final = 5.0
_SCALER_CHUNK: Final = 65_536
# Config a manifest fixes unless the flag is given explicitly.
_CONFIG_FIELDS: Final = (
    "model",
    "task",
    "loss",
    "optimizer",
    "lr",
    "hidden",
    "n_classes",
    "standardize",
    "standardize_target",
    "epochs",
    "batch_size",
    "holdout",
    "n_features",
    "feature_names",
)


class ReplayError(ConsumerError):
    """A replay cannot be done as asked (no valid records, a manifest mismatch, a bad checkpoint...)."""


@dataclass(frozen=True, slots=True)
class ReplayResult:
    topic: str
    records: int
    invalid: int
    epoch_losses: list[float]
    holdout_loss: float | None
    checkpoint_version: int
    manifest_path: Path
    manifest: dict[str, Any]
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to read and how to train: the settings, or an earlier manifest plus explicit flags."""

    topic: str
    start: Bound
    end: Bound
    seed: int
    model: str
    task: str
    loss: str
    optimizer: str
    lr: float
    hidden: int
    n_classes: int | None
    standardize: bool
    standardize_target: bool
    epochs: int
    batch_size: int
    holdout: float
    n_features: int | None
    feature_names: list[str] | None
    expected_sha256: str | None = None
    init_from: Path | None = None
    init_version: int | None = None

    def learner_config(self, device: str) -> LearnerConfig:
        return LearnerConfig(
            model=self.model,
            task=self.task,
            loss=self.loss,
            optimizer=self.optimizer,
            lr=self.lr,
            hidden=self.hidden,
            n_classes=self.n_classes,
            standardize=self.standardize,
            standardize_target=self.standardize_target,
            seed=self.seed,
            device=device,
        )

    def config(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _CONFIG_FIELDS}


# -- reading -------------------------------------------------------------------------


@dataclass(slots=True)
class _PartitionRead:
    partition: int
    start: int
    end: int | None
    next_offset: int
    records: int = 0
    eof_at: int | None = None  # end-of-log position reported since the last record
    done: bool = False
    hasher: Any = field(default_factory=hashlib.sha256)

    def hash_values(self, values: Sequence[bytes | None]) -> None:
        """Each record's int64 length (-1: no value), then its value: the manifest's content hash."""
        try:
            sizes = set(map(len, values))  # type: ignore[arg-type]
        except TypeError:  # a record without a value (a tombstone)
            sizes = set()
        if len(sizes) == 1 and (size := sizes.pop()) > 0:
            # All the same size (binary records): one call hashes the batch.
            prefix = _LENGTH.pack(size)
            self.hasher.update(prefix + prefix.join(values))  # type: ignore[arg-type]
            return
        for value in values:
            self.hasher.update(_LENGTH.pack(-1 if value is None else len(value)))
            if value:
                self.hasher.update(value)


@dataclass(frozen=True, slots=True)
class ReadBatch:
    """Records of one poll, in the order read: per partition, in offset order."""

    messages: list[Message]
    values: list[bytes | None]
    partitions: npt.NDArray[np.int32]
    offsets: npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class ReadSummary:
    """What a read covered: ``ends`` are exclusive, ``records`` counts every record, valid or not."""

    starts: dict[int, int]
    ends: dict[int, int]
    records: dict[int, int]
    content_sha256: str


class RangeReader:
    """Reads ranges of one topic by direct partition assignment; never commits, never joins a group."""

    def __init__(self, settings: ReplaySettings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.partitions: list[int] = []
        self._consumer: Consumer | None = None

    def __enter__(self) -> RangeReader:
        admin = admin_client(self.settings)
        check_reachable(admin, self.settings)
        count = topic_partitions(admin, self.topic, self.settings.startup_timeout_s)
        if count is None:
            raise TopicError(f"topic {self.topic!r} does not exist on {self.settings.bootstrap_servers}")
        self.partitions = list(range(count))
        self._consumer = Consumer(
            assigning_consumer_config(  # type: ignore[arg-type]
                self.settings,
                **{
                    # A group id nobody else uses: nothing is ever committed under it.
                    "group.id": f"streamtrainer-replay-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "error",  # an offset outside the log is an error, not a jump
                    "enable.partition.eof": True,
                    "fetch.queue.backoff.ms": 5,
                    "queued.min.messages": 200000,
                },
            )
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(KafkaException, RuntimeError):
                consumer.close()

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("RangeReader used outside its context")
        return self._consumer

    def resolve(self, start: Bound, end: Bound) -> list[PartitionRange]:
        timeout = self.settings.startup_timeout_s
        watermarks = {}
        named = set(start.offsets) | set(end.offsets)
        for partition in self.partitions:
            if named and partition not in named:
                continue
            low, high = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=timeout, cached=False
            )
            watermarks[partition] = (int(low), int(high))

        def offset_for_time(partition: int, timestamp_ms: int) -> int:
            bound = start if start.timestamp_ms == timestamp_ms else end
            try:
                found = self.consumer.offsets_for_times(
                    [TopicPartition(self.topic, partition, timestamp_ms)], timeout=timeout
                )[0]
            except KafkaException as error:
                raise RangeError(
                    f"partition {partition} of {self.topic!r}: the broker did not resolve the timestamp "
                    f"{bound} ({error}); use offsets (P:O,...)"
                ) from None
            if found.error is not None:
                raise RangeError(
                    f"partition {partition} of {self.topic!r}: the broker did not resolve the timestamp "
                    f"{bound} ({found.error.str()}); use offsets (P:O,...)"
                )
            answer = int(found.offset)
            # Some brokers answer, wrongly: the records around the answer must agree with it.
            low, high = watermarks[partition]
            if answer >= 0:
                around = self._timestamps(partition, max(low, answer - 1), 2 if answer > low else 1)
            else:
                around = self._timestamps(partition, high - 1, 1) if high > low else []
            check_time_answer(bound, partition, self.topic, answer, around)
            return answer

        return resolve_ranges(
            start,
            end,
            topic=self.topic,
            existing=self.partitions,
            watermarks=watermarks,
            offset_for_time=offset_for_time,
        )

    def _timestamps(self, partition: int, offset: int, count: int) -> list[tuple[int, int | None]]:
        """(offset, timestamp in ms or None) of the first ``count`` records from ``offset`` on: fewer at
        the end of the log, or when none came within the startup timeout."""
        consumer = self.consumer
        found: list[tuple[int, int | None]] = []
        consumer.assign([TopicPartition(self.topic, partition, offset)])
        deadline = time.monotonic() + self.settings.startup_timeout_s
        try:
            while len(found) < count and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is None:
                    continue
                if message.error() is not None:
                    break  # the end of the log, or an offset outside it: nothing to judge by
                kind, timestamp = message.timestamp()
                found.append(
                    (int(message.offset() or 0), None if kind == TIMESTAMP_NOT_AVAILABLE else timestamp)
                )
        finally:
            with contextlib.suppress(KafkaException):
                consumer.unassign()
        return found

    def settle_schema(self, ranges: Sequence[PartitionRange], decoder: BatchDecoder) -> None:
        """Fix ``decoder``'s schema from the range's first record in (partition, offset) order that decodes.

        Reading order across partitions differs from run to run; the schema must not (a stray
        record of another shape read first would otherwise fix it).
        """
        settle_schema_from_log(
            self.consumer,
            self.topic,
            [(r.partition, r.start, r.end) for r in ranges],
            decoder,
            timeout_s=self.settings.startup_timeout_s,
        )

    def read(
        self,
        ranges: Sequence[PartitionRange],
        on_batch: Callable[[ReadBatch], None],
        *,
        on_progress: Callable[[int], None] | None = None,
    ) -> ReadSummary:
        """Feed every record of ``ranges`` to ``on_batch`` (per partition in offset order)."""
        gc.freeze()  # long-lived objects out of the collector's full passes (see Worker.run)
        states = {r.partition: _PartitionRead(r.partition, r.start, r.end, r.start) for r in ranges}
        for state in states.values():
            if state.end is not None and state.start >= state.end:
                state.done = True
        consumer = self.consumer
        wanted = [TopicPartition(self.topic, s.partition, s.start) for s in states.values() if not s.done]
        if wanted:
            consumer.assign(wanted)
        idle_s = self.settings.idle_s
        stall_s = max(self.settings.startup_timeout_s, 2 * idle_s)
        last_record = last_activity = time.monotonic()
        total = 0
        while not all(s.done for s in states.values()):
            messages = consumer.consume(num_messages=_POLL_BATCH, timeout=0.2)
            now = time.monotonic()
            batch = _take_run(messages, states)
            if batch is not None:
                messages = []  # taken whole: one run of one partition's next records
                state = states[int(batch.partitions[0])]
                if state.end is not None and state.next_offset >= state.end:
                    self._finish(state)
            kept: list[Message] = []
            values: list[bytes | None] = []
            partitions: list[int] = []
            offsets: list[int] = []
            for message in messages:
                error = message.error()
                if error is not None:
                    if self._on_error(error, message, states):
                        last_activity = now
                    continue
                found = states.get(message.partition() or 0)
                offset = message.offset() or 0
                if found is None or found.done or offset < found.next_offset:
                    continue
                state = found
                if state.end is not None and offset >= state.end:
                    self._finish(state)
                    continue
                value = message.value()
                state.hash_values((value,))
                state.next_offset = offset + 1
                state.records += 1
                state.eof_at = None
                kept.append(message)
                values.append(value)
                partitions.append(state.partition)
                offsets.append(offset)
                if state.end is not None and state.next_offset >= state.end:
                    self._finish(state)
            if kept:
                batch = ReadBatch(
                    kept, values, np.array(partitions, dtype=np.int32), np.array(offsets, dtype=np.int64)
                )
            if batch is not None:
                on_batch(batch)
                total += len(batch.messages)
                last_record = last_activity = now
                if on_progress is not None:
                    on_progress(total)
            idle = now - last_record
            for state in states.values():
                if state.done or state.eof_at is None or idle < idle_s:
                    continue
                if state.end is not None and state.eof_at < state.end:
                    raise RangeError(
                        f"partition {state.partition} of {self.topic!r}: the log ends at offset "
                        f"{state.eof_at}, before the end of the range {state.end}"
                    )
                # The end of the log: nothing new for a while after the broker said so.
                if state.end is None:
                    state.next_offset = max(state.next_offset, state.eof_at)
                self._finish(state)
            if now - last_activity > stall_s:
                stuck = [s for s in states.values() if not s.done]
                raise RangeError(
                    f"no record and no end of log from {self.topic!r} "
                    + ", ".join(f"[{s.partition}] at offset {s.next_offset}" for s in stuck)
                    + f" within {stall_s:g}s (does the range start beyond the end of the log?)"
                )
        with contextlib.suppress(KafkaException):
            consumer.unassign()
        return _summary(states)

    def _finish(self, state: _PartitionRead) -> None:
        state.done = True
        with contextlib.suppress(KafkaException):
            self.consumer.pause([TopicPartition(self.topic, state.partition)])

    def _on_error(self, error: KafkaError, message: Message, states: dict[int, _PartitionRead]) -> bool:
        """Handle a consumer event; True when it is news from a partition (its end of log)."""
        code = error.code()
        partition = message.partition()
        state = states.get(partition) if partition is not None else None
        if code == KafkaError._PARTITION_EOF:
            if state is not None and not state.done:
                state.eof_at = int(message.offset() or 0)
            return True
        if code in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
            where = f"partition {partition} of {self.topic!r}"
            at = f" at offset {state.next_offset}" if state is not None else ""
            raise RangeError(
                f"{where}: the range{at} is outside the log (below its start offset, "
                f"or beyond its end): {error.str()}"
            )
        if error.fatal():
            raise KafkaException(error)
        logger.warning("consumer error: %s", error.str())
        return False


def _take_run(messages: list[Message], states: dict[int, _PartitionRead]) -> ReadBatch | None:
    """The common case in a few passes over the batch: records of one partition, in sequence.

    Reads and hashes the batch like the per-message loop does (same content hash:
    each record's int64 length, then its value) when every message is a record
    of one partition still being read, its first offset the next one wanted and
    none of them at or past the range's end; None otherwise (the per-message
    loop then handles errors, end-of-log events, overlaps and range ends).
    """
    if not messages or any([message.error() is not None for message in messages]):
        return None
    partition = messages[0].partition()
    state = states.get(partition) if partition is not None else None
    if state is None or state.done:
        return None
    first, last = messages[0].offset(), messages[-1].offset()
    n = len(messages)
    if (
        first != state.next_offset
        or last is None
        or last - first != n - 1  # a gap (compacted topic) or another partition mixed in
        or (state.end is not None and last >= state.end)
        or any([message.partition() != partition for message in messages])
    ):
        return None
    values = [message.value() for message in messages]
    state.hash_values(values)
    state.next_offset = last + 1
    state.records += n
    state.eof_at = None
    return ReadBatch(
        messages, values, np.full(n, partition, dtype=np.int32), np.arange(first, last + 1, dtype=np.int64)
    )


def _summary(states: dict[int, _PartitionRead]) -> ReadSummary:
    content = hashlib.sha256()
    for partition in sorted(states):
        state = states[partition]
        content.update(struct.pack("<iq", partition, state.records))
        content.update(state.hasher.digest())
    return ReadSummary(
        starts={p: s.start for p, s in sorted(states.items())},
        ends={p: s.end if s.end is not None else s.next_offset for p, s in sorted(states.items())},
        records={p: s.records for p, s in sorted(states.items())},
        content_sha256=content.hexdigest(),
    )


# -- decoding into the store ---------------------------------------------------------------


class _Collector:
    """Decodes polled batches as the worker does and appends the valid records to the store."""

    def __init__(
        self,
        store: CompactionStore,
        decoder: BatchDecoder,
        topic: str,
        make_learner: Callable[[int], OnlineLearner],
        learner: OnlineLearner | None,
    ) -> None:
        self.store = store
        self.decoder = decoder
        self.topic = topic
        self.make_learner = make_learner
        self.learner = learner
        self.valid = 0
        self.invalid: Counter[str] = Counter()
        self._logged_at = 0.0
        self._since_log = 0

    def __call__(self, read: ReadBatch) -> None:
        messages = read.messages
        batch = self.decoder.decode(read.values, HeaderCodecs(messages))
        errors = list(batch.errors)
        features, labels, index = batch.features, batch.labels, batch.index
        if len(batch) and self.learner is None:
            self.learner = self.make_learner(int(features.shape[1]))
        if self.learner is not None:
            features, labels, index = trainable_rows(batch, self.learner, errors)
        if errors:
            self._count_invalid(errors, messages)
        if not len(index):
            return
        everything = len(index) == len(messages)
        # Neither keys nor timestamps: a replay never deduplicates and trains on the records alone
        # (hashing keys costs ~1 us a record, reading timestamps ~0.2 us).
        self.store.append(
            features,
            labels,
            read.partitions if everything else read.partitions[index],
            read.offsets if everything else read.offsets[index],
        )
        self.valid += int(index.shape[0])

    def _count_invalid(self, errors: list[tuple[int, DecodeError]], messages: list[Message]) -> None:
        self.invalid.update(error.reason for _, error in errors)
        self._since_log += len(errors)
        now = time.monotonic()
        if now - self._logged_at >= _INVALID_LOG_INTERVAL_S:
            position, error = errors[-1]
            message = messages[position]
            logger.warning(
                "%d invalid record(s) in the range since last report; latest %s[%s]@%s: %s",
                self._since_log,
                self.topic,
                message.partition(),
                message.offset(),
                error,
            )
            self._logged_at = now
            self._since_log = 0


# -- the command -------------------------------------------------------------------------


def run_replay(settings: ReplaySettings) -> ReplayResult:
    """Read the range, train, write the checkpoint and the manifest (see the module docstring).

    A replay that fails leaves no ``--out`` behind that it created (nor the folders above it that it
    created); an ``--out`` that existed before is left, without the replay's spilled records.
    """
    out = settings.out.absolute()
    created = None  # the topmost folder this run creates for --out
    while not out.exists() and out != out.parent:
        created, out = out, out.parent
    try:
        return _run_replay(settings)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
            logger.debug("removed %s: the replay failed", created)
        raise


def _run_replay(settings: ReplaySettings) -> ReplayResult:
    started = time.monotonic()
    set_intra_op_threads(settings.torch_threads)
    if settings.device.startswith("cuda"):
        # Deterministic cuBLAS needs this before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    plan = _plan(settings)
    # Torch's optimizer machinery (a 1-2 s import on first use) and the compiled loop get
    # ready in the background while the range is resolved and read.
    prepare_training(plan.model, plan.optimizer)
    out = settings.out
    show = settings.progress if settings.progress is not None else sys.stderr.isatty()
    start_model = _initial_checkpoint(plan)
    learner: OnlineLearner | None = None
    decoder = BatchDecoder(n_features=plan.n_features, feature_names=plan.feature_names)
    if start_model is not None:
        learner, decoder = _learner_from_checkpoint(plan, settings.device, start_model)

    def make_learner(n_features: int) -> OnlineLearner:
        config = plan.learner_config(settings.device)
        logger.info(
            "model %s (%s, %d features, loss %s, %s lr=%g)",
            plan.model,
            plan.task,
            n_features,
            config.resolved_loss,
            plan.optimizer,
            plan.lr,
        )
        return OnlineLearner(config, n_features)

    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.callback(_remove_shards, out)  # runs last: after the store has closed
        store = stack.enter_context(
            CompactionStore(out / "shards", memory_records=settings.memory_records, retain_records=None)
        )
        reader = stack.enter_context(RangeReader(settings, plan.topic))
        ranges = reader.resolve(plan.start, plan.end)
        logger.info("replaying %s: %s", plan.topic, describe_ranges(ranges))
        if decoder.n_features is None:
            reader.settle_schema(ranges, decoder)
        collector = _Collector(store, decoder, plan.topic, make_learner, learner)
        known = [r.end - r.start for r in ranges if r.end is not None]
        total = sum(known) if len(known) == len(ranges) else None
        with _progress(show, "reading", total, records=True) as advance:
            read = reader.read(ranges, collector, on_progress=advance)
        read_records = sum(read.records.values())
        invalid_total = sum(collector.invalid.values())
        if read_records == 0:
            raise RangeError(
                f"the range {plan.start}..{plan.end} of {plan.topic!r} holds no records: "
                + ", ".join(f"[{p}] {read.starts[p]}..{read.ends[p]}" for p in read.starts)
            )
        if invalid_total:
            logger.warning(
                "%d invalid record(s) in the range (%s)",
                invalid_total,
                ", ".join(f"{reason}: {n}" for reason, n in sorted(collector.invalid.items())),
            )
        _check_error_budget(settings, plan.topic, read_records, collector.invalid)
        if plan.expected_sha256 is not None and read.content_sha256 != plan.expected_sha256:
            raise ReplayError(
                f"the records read from {plan.topic!r} differ from the manifest's (content sha256 "
                f"{read.content_sha256[:16]}..., manifest {plan.expected_sha256[:16]}...): the topic "
                "was rewritten, or it is another topic of the same name"
            )
        learner = collector.learner
        if learner is None or collector.valid == 0:
            raise ReplayError(
                f"the range of {plan.topic!r} holds {read_records} record(s), none valid "
                f"({', '.join(f'{r}: {n}' for r, n in sorted(collector.invalid.items()))})"
            )
        data = store.window()
        # Canonical order: arrival order across partitions differs from run to run.
        data = data.subset(np.lexsort((data.offsets, data.partitions)))
    train, held = split_holdout(data, plan.holdout, plan.seed)
    del data
    if start_model is None or (learner.scaler is not None and learner.scaler.count == 0):
        for begin in range(0, train.count, _SCALER_CHUNK):
            stop = begin + _SCALER_CHUNK
            learner.learn_statistics(train.features[begin:stop], train.labels[begin:stop])
    learner.settle_path(batch_size=plan.batch_size)  # one path for every step: bitwise reproducible
    epoch_losses = _train(learner, train, plan, show)
    holdout_loss = evaluate(learner, held) if held.count else math.nan
    checkpoint = _save_checkpoint(
        out, learner=learner, decoder=decoder, plan=plan, read=read, train=train, settings=settings
    )
    manifest = _manifest(
        plan,
        read=read,
        collector=collector,
        train=train,
        held=held,
        epoch_losses=epoch_losses,
        holdout_loss=holdout_loss,
        checkpoint=checkpoint,
        start_model=start_model,
    )
    manifest_path = out / MANIFEST_NAME
    _write_json(manifest_path, manifest)
    elapsed = time.monotonic() - started
    logger.info(
        "replayed %d record(s) of %s in %.1fs: epoch losses %s, holdout loss %s, checkpoint %d",
        collector.valid,
        plan.topic,
        elapsed,
        [round(v, 5) for v in epoch_losses],
        manifest["holdout_loss"],
        checkpoint.version,
    )
    return ReplayResult(
        topic=plan.topic,
        records=collector.valid,
        invalid=invalid_total,
        epoch_losses=epoch_losses,
        holdout_loss=manifest["holdout_loss"],
        checkpoint_version=checkpoint.version,
        manifest_path=manifest_path,
        manifest=manifest,
        elapsed_s=elapsed,
    )


def _check_error_budget(settings: ReplaySettings, topic: str, records: int, invalid: Counter[str]) -> None:
    """Refuse to train on a range with more invalid records than the error budget allows.

    A replay is a batch job: its budget is the share of the whole range (the same verdict
    whatever order the partitions were read in), not a sliding window; as in the worker, no
    verdict on fewer than 100 records (or the window, if smaller).
    """
    count = sum(invalid.values())
    if settings.errors_tolerance == "all" or not count:
        return
    if settings.errors_tolerance == "budget" and records < min(settings.error_budget_window, MIN_RECORDS):
        return
    if settings.errors_tolerance == "budget" and count <= settings.error_budget * records:
        return
    reasons = ", ".join(f"{reason}: {n}" for reason, n in invalid.most_common())
    raise ErrorBudgetExceeded(
        f"{count} of the {records} record(s) read from {topic!r} could not be trained on "
        f"({count / records:.1%}; --error-budget {settings.error_budget:.1%}, --errors-tolerance "
        f"{settings.errors_tolerance}): {reasons}. No checkpoint written"
    )


def _train(learner: OnlineLearner, train: EpochData, plan: _Plan, show: bool) -> list[float]:
    """Epochs of mini-batch SGD, deterministic: seeded shuffles, deterministic kernels."""
    losses: list[float] = []
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with _progress(show, "training", plan.epochs, records=False) as advance:
            for epoch in range(plan.epochs):
                # One epoch per call, seeded seed + epoch: the same shuffles as one call for all epochs.
                report = train_epochs(
                    learner, train, epochs=1, batch_size=plan.batch_size, seed=plan.seed + epoch
                )
                losses.extend(report.epoch_losses)
                advance(epoch + 1, losses[-1] if losses else math.nan)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    return losses


# -- plan, checkpoints, manifest -------------------------------------------------------------


def _plan(settings: ReplaySettings) -> _Plan:
    given = settings.model_fields_set
    if settings.manifest is None:
        assert settings.topic is not None  # the settings validator requires one
        return _Plan(
            topic=settings.topic,
            start=parse_bound(settings.from_, "from"),
            end=parse_bound(settings.to, "to"),
            seed=settings.seed,
            model=settings.model,
            task=settings.resolved_task,
            loss=settings.loss,
            optimizer=settings.optimizer,
            lr=settings.lr,
            hidden=settings.hidden,
            n_classes=settings.n_classes,
            standardize=settings.standardize,
            standardize_target=settings.standardize_target,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            holdout=settings.holdout,
            n_features=settings.n_features,
            feature_names=settings.feature_names,
            init_from=settings.init_from,
        )
    manifest = read_manifest(settings.manifest)
    topic = str(manifest["topic"])
    if settings.topic is not None and settings.topic != topic:
        raise ConfigurationError(f"--topic {settings.topic} differs from the manifest's topic {topic}")
    for name in ("from_", "to"):
        if name in given:
            raise ConfigurationError(
                f"--{name.rstrip('_')} cannot be combined with --manifest (it fixes the range)"
            )
    seed = int(manifest["seed"])
    if "seed" in given and settings.seed != seed:
        raise ConfigurationError(f"--seed {settings.seed} differs from the manifest's seed {seed}")
    partitions = manifest["partitions"]
    start = Bound(
        "offsets", offsets={int(p): int(r["start"]) for p, r in partitions.items()}, text="manifest"
    )
    end = Bound("offsets", offsets={int(p): int(r["end"]) for p, r in partitions.items()}, text="manifest")
    config = dict(manifest["config"])
    for name in _CONFIG_FIELDS:
        if name in given:
            config[name] = settings.resolved_task if name == "task" else getattr(settings, name)
    init = manifest.get("init_from")
    init_from, init_version = settings.init_from, None
    if init_from is None and isinstance(init, dict):
        init_from, init_version = Path(str(init["directory"])), int(init["version"])
    if config.get("task") == "multiclass" and config.get("n_classes") is None:
        raise ConfigurationError("a multiclass model needs n_classes (--n-classes)")
    return _Plan(
        topic=topic,
        start=start,
        end=end,
        seed=seed,
        model=str(config["model"]),
        task=str(config["task"]),
        loss=str(config["loss"]),
        optimizer=str(config["optimizer"]),
        lr=float(config["lr"]),
        hidden=int(config["hidden"]),
        n_classes=None if config.get("n_classes") is None else int(config["n_classes"]),
        standardize=bool(config["standardize"]),
        # A manifest from before target standardization existed replays without it.
        standardize_target=bool(config.get("standardize_target", False)),
        epochs=int(config["epochs"]),
        batch_size=int(config["batch_size"]),
        holdout=float(config["holdout"]),
        n_features=None if config.get("n_features") is None else int(config["n_features"]),
        feature_names=None if config.get("feature_names") is None else list(config["feature_names"]),
        expected_sha256=str(manifest["content_sha256"]),
        init_from=init_from,
        init_version=init_version,
    )


def read_manifest(path: Path) -> dict[str, Any]:
    """An earlier replay's manifest (``path`` may be the file or its directory)."""
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"--manifest {path}: cannot read it ({error})") from None
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise ConfigurationError(f"--manifest {path} is not a {MANIFEST_FORMAT} document")
    for key in ("topic", "partitions", "seed", "config", "content_sha256"):
        if key not in document:
            raise ConfigurationError(f"--manifest {path} has no {key!r}")
    return document


def _initial_checkpoint(plan: _Plan) -> Checkpoint | None:
    if plan.init_from is None:
        return None
    # Read only, without the store's lock: the directory may belong to a running worker.
    store = CheckpointStore(plan.init_from)
    if not plan.init_from.is_dir():
        raise ReplayError(f"--init-from {plan.init_from}: no such directory")
    if plan.init_version is not None:
        try:
            return store.load(plan.init_version)
        except CheckpointError as error:
            raise ReplayError(
                f"the manifest starts from checkpoint {plan.init_version} in {plan.init_from}, "
                f"which cannot be loaded: {error}"
            ) from None
    checkpoint = store.load_latest()
    if checkpoint is None:
        raise ReplayError(f"--init-from {plan.init_from}: no valid checkpoint there")
    return checkpoint


def _learner_from_checkpoint(
    plan: _Plan, device: str, checkpoint: Checkpoint
) -> tuple[OnlineLearner, BatchDecoder]:
    metadata = checkpoint.metadata
    n_features = metadata.get("n_features")
    where = f"--init-from {plan.init_from}: checkpoint {checkpoint.version}"
    if not isinstance(n_features, int):
        raise ReplayError(f"{where} holds no model")
    if plan.n_features is not None and plan.n_features != n_features:
        raise ReplayError(f"{where} has {n_features} features, not {plan.n_features}")
    learner = OnlineLearner(plan.learner_config(device), n_features)
    try:
        learner.load_initial_state(checkpoint.tensors, metadata, where)
    except (TrainingError, RuntimeError, KeyError, ValueError) as error:
        raise ReplayError(f"{where} does not fit this model: {error}") from None
    names = metadata.get("feature_names")
    decoder = BatchDecoder(n_features=n_features, feature_names=names if isinstance(names, list) else None)
    logger.info("starting from checkpoint %d of %s", checkpoint.version, plan.init_from)
    return learner, decoder


def _save_checkpoint(
    out: Path,
    *,
    learner: OnlineLearner,
    decoder: BatchDecoder,
    plan: _Plan,
    read: ReadSummary,
    train: EpochData,
    settings: ReplaySettings,
) -> Checkpoint:
    tensors, metadata = learner.state()
    applied = Counter(train.partitions.tolist())
    metadata.update(
        feature_names=list(decoder.feature_names) if decoder.feature_names is not None else None,
        # The worker's layout: a worker resuming from this checkpoint continues after the range.
        positions={f"{plan.topic}:{p}": end for p, end in read.ends.items()},
        applied={f"{plan.topic}:{p}": int(applied.get(p, 0)) for p in read.ends},
        records_applied=int(train.count),
        config_digest=settings.digest(),
        replay={"topic": plan.topic, "content_sha256": read.content_sha256, "seed": plan.seed},
    )
    with CheckpointStore(out / "checkpoints") as store:
        return store.save(tensors, metadata)


def _manifest(
    plan: _Plan,
    *,
    read: ReadSummary,
    collector: _Collector,
    train: EpochData,
    held: EpochData,
    epoch_losses: list[float],
    holdout_loss: float,
    checkpoint: Checkpoint,
    start_model: Checkpoint | None,
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "topic": plan.topic,
        "from": str(plan.start),
        "to": str(plan.end),
        "partitions": {
            str(p): {"start": read.starts[p], "end": read.ends[p], "records": read.records[p]}
            for p in read.starts
        },
        "records": collector.valid,
        "records_read": sum(read.records.values()),
        "invalid": dict(sorted(collector.invalid.items())),
        "invalid_total": sum(collector.invalid.values()),
        "content_sha256": read.content_sha256,
        "content_hash": "sha256 over the partitions in order: partition, record count and the sha256 "
        "of its record values (each prefixed by its length) in offset order",
        "seed": plan.seed,
        "deterministic": True,
        "config": plan.config(),
        "n_features": train.n_features,
        "train_records": train.count,
        "holdout_records": held.count,
        "epoch_losses": epoch_losses,
        "holdout_loss": None if math.isnan(holdout_loss) else holdout_loss,
        "checkpoint": {
            "directory": "checkpoints",
            "version": checkpoint.version,
            "tensors_sha256": checkpoint.metadata.get("tensors_sha256"),
        },
        "init_from": None
        if start_model is None
        else {
            "directory": str(plan.init_from.resolve()) if plan.init_from is not None else None,
            "version": start_model.version,
            "tensors_sha256": start_model.metadata.get("tensors_sha256"),
        },
        "created_at": datetime.now(UTC).isoformat(),
        "streamtrainer_version": __version__,
    }


def _write_json(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(temporary, path)


# -- progress ------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress(
    enabled: bool, label: str, total: int | None, *, records: bool
) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr (records and records/s, or epochs and loss); no-op when off."""
    if not enabled:
        yield lambda *args: None
        return
    if records:
        columns: tuple[Any, ...] = (
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} rec/s"),
            TimeElapsedColumn(),
        )
    else:
        columns = (
            TextColumn(label),
            BarColumn(),
            TextColumn("epoch {task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        )
    started = time.monotonic()
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(label, total=total, rate="-", loss="-")

        def advance(done: int, loss: float | None = None) -> None:
            if records:
                rate = done / max(time.monotonic() - started, 1e-9)
                progress.update(task, completed=done, rate=f"{rate:,.0f}")
            else:
                progress.update(task, completed=done, loss=f"{loss:.4f}" if loss is not None else "-")

        yield advance


def _remove_shards(out: Path) -> None:
    """Remove ``out/shards`` once the store (which deletes its shards when it closes) left it empty."""
    directory = out / "shards"
    with contextlib.suppress(OSError):
        (directory / ".lock").unlink(missing_ok=True)
        directory.rmdir()  # only when empty: never anything the store did not write
