"""The worker end to end: a consumer-group member on the embedded broker, timed from outside.

:class:`TimedWorker` only records timestamps around the worker's own steps (its
run, assignment callback, learner creation, the start and the finish of each
batch's update, and inside and around them decode, learn_many, the wait for the
update, compactor.keep, the prequential update, compaction, checkpoints and the
lag refresh: per polled batch, never per record); the training path is the
worker's, unchanged.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer, Message, TopicPartition

from bench.workloads import HIDDEN, Timing, lr_for
from streamtrainer.consumer.worker import Worker, WorkerStatus
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import OnlineLearner, catalog
from streamtrainer.training.checkpoint import Checkpoint

T = TypeVar("T")
# Timed steps of the worker's loop thread: starting a polled batch's update (decoding it, then
# start_learn_many: scaling, the compiled loop prepared) ...
INSIDE_START = ("decode", "learn_start")
# ... finishing it (waiting for the update, PendingSteps.finish: the guards' checks, then the
# bookkeeping) ...
INSIDE_FINISH = ("wait", "learn_finish", "keep", "prequential")
# ... and the rest of its run loop.
OUTSIDE_UPDATES = ("compact", "checkpoint", "lag")
# "learn" (PendingSteps.compute: the compiled loop) runs in the training lane: the loop's thread,
# or a background one with --overlap.
PARTS = ("start", "finish", "learn", *INSIDE_START, *INSIDE_FINISH, *OUTSIDE_UPDATES)
# Garbage collection, all generations and full collections: inside whichever step it interrupts.
GC = ("gc", "gc_full")


class TimedWorker(Worker):
    """A Worker that notes when it was assigned, and when it trained its first and last records."""

    def __init__(self, settings: WorkerSettings) -> None:
        super().__init__(settings)
        self.run_started: float | None = None
        self.run_ended: float | None = None
        self.assigned_at: float | None = None
        self.learner_seconds: float | None = None
        self.first_trained_at: float | None = None
        self.last_trained_at: float | None = None
        self.fused_from: float | None = None  # end of the first batch trained with the loop ready
        self.records_at_fused = 0  # records trained by then
        self.first_batch_records = 0
        self.batches = 0  # batches whose update finished
        self._batches_at_first = 0
        # Seconds spent in each timed step, accumulated over the run; snapshots of them are taken at
        # the end of the first trained batch and of the last one (the steady window in between).
        self.spent: dict[str, float] = dict.fromkeys((*PARTS, *GC), 0.0)
        self._gc_began: float | None = None
        self._at_first_batch: dict[str, float] = dict(self.spent)
        self._at_last_batch: dict[str, float] = dict(self.spent)
        self.decoder.decode = self._timed("decode", self.decoder.decode)  # type: ignore[method-assign]
        self.prequential.update = self._timed("prequential", self.prequential.update)  # type: ignore[method-assign]
        if self.compactor is not None:
            self.compactor.keep = self._timed("keep", self.compactor.keep)  # type: ignore[method-assign]

    def _timed(self, part: str, function: Callable[..., T]) -> Callable[..., T]:
        spent = self.spent

        def timed(*args: Any, **kwargs: Any) -> T:
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - began

        timed.__wrapped_part__ = part  # type: ignore[attr-defined]
        return timed

    @property
    def process_seconds(self) -> float:
        return self.spent["start"] + self.spent["finish"]

    @property
    def learn_seconds(self) -> float:
        return self.spent["learn"]

    def run(self) -> WorkerStatus:
        self.run_started = time.perf_counter()
        gc.callbacks.append(self._on_gc)
        try:
            return super().run()
        finally:
            gc.callbacks.remove(self._on_gc)
            self.run_ended = time.perf_counter()

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        """Time in Python's cyclic garbage collector (it interrupts whichever step allocates)."""
        if phase == "start":
            self._gc_began = time.perf_counter()
        elif self._gc_began is not None:
            elapsed = time.perf_counter() - self._gc_began
            self.spent["gc"] += elapsed
            if info.get("generation") == 2:  # the oldest generation: a full collection
                self.spent["gc_full"] += elapsed
            self._gc_began = None

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.assigned_at is None:
            self.assigned_at = time.perf_counter()
        super()._on_assign(consumer, partitions)

    def _create_learner(self, n_features: int) -> OnlineLearner:
        started = time.perf_counter()
        learner = super()._create_learner(n_features)
        self.learner_seconds = time.perf_counter() - started
        learner.start_learn_many = self._timed("learn_start", learner.start_learn_many)  # type: ignore[method-assign]
        learner._finish_steps = self._timed("learn_finish", learner._finish_steps)  # type: ignore[method-assign]
        return learner

    def _restore(self, checkpoint: Checkpoint | None) -> None:
        super()._restore(checkpoint)  # may replace the decoder
        if not hasattr(self.decoder.decode, "__wrapped_part__"):
            self.decoder.decode = self._timed("decode", self.decoder.decode)  # type: ignore[method-assign]

    def _checkpoint_and_commit(self) -> None:
        began = time.perf_counter()
        try:
            super()._checkpoint_and_commit()
        finally:
            self.spent["checkpoint"] += time.perf_counter() - began

    def _compact(self, reason: str) -> None:
        began = time.perf_counter()
        try:
            super()._compact(reason)
        finally:
            self.spent["compact"] += time.perf_counter() - began

    def _refresh_lag(self) -> None:
        began = time.perf_counter()
        try:
            super()._refresh_lag()
        finally:
            self.spent["lag"] += time.perf_counter() - began

    def _start_update(self, messages: list[Message]) -> None:
        began = time.perf_counter()
        try:
            super()._start_update(messages)
        finally:
            self.spent["start"] += time.perf_counter() - began

    def _update_result(self, update: Future[float]) -> float:
        began = time.perf_counter()
        try:
            seconds = super()._update_result(update)
        finally:
            self.spent["wait"] += time.perf_counter() - began
        self.spent["learn"] += seconds  # the compiled loop, timed where it ran (the lane)
        return seconds

    def _finish_update(self) -> None:
        if self._in_flight is None or self._in_flight.update is None:
            return
        ready_before = self._compiled_path_ready()
        began = time.perf_counter()
        super()._finish_update()
        now = time.perf_counter()
        self.spent["finish"] += now - began
        self.batches += 1
        if self.records_trained and self.first_trained_at is None:
            self.first_trained_at = now
            self.first_batch_records = self.records_trained
            self._at_first_batch = dict(self.spent)
            self._batches_at_first = self.batches
        self._at_last_batch = dict(self.spent)
        if self.fused_from is None and ready_before and self.records_trained:
            self.fused_from = now
            self.records_at_fused = self.records_trained
        self.last_trained_at = now

    def _compiled_path_ready(self) -> bool:
        """Whether the learner's compiled path (if it has one) runs this batch size compiled now."""
        learner = self.learner
        if learner is None or learner.path.compiled is None:
            return False
        return learner.path.compiled.ready(self.settings.update_batch)

    def timing(self, *, from_assignment: bool = False) -> Timing:
        """Steady-state rate: the records after the first batch over the time since it.

        ``from_assignment``: the rate is every record over the time from the partition
        assignment to the last trained record instead (the first fetch included, and no head
        start: librdkafka prefetches while the first batch is trained). The breakdown in the
        extras stays the steady state's.
        """
        first, last = self.first_trained_at, self.last_trained_at
        if first is None or last is None:
            return Timing(0, 0.0)
        records = self.records_trained - self.first_batch_records
        seconds = last - first
        extra: dict[str, Any] = {
            "records_trained": self.records_trained,
            "records_invalid": self.records_invalid,
            "updates": self.learner.updates if self.learner is not None else 0,
            "prequential_loss": self.prequential.mean_loss,
            "last_window_loss": self.prequential.window_loss,
            "learner_created_s": self.learner_seconds,
        }
        if self.assigned_at is not None:
            extra["first_record_s"] = first - self.assigned_at
            extra["end_to_end_rate"] = self.records_trained / (last - self.assigned_at)
            if self.fused_from is not None:
                extra["fused_from_s"] = self.fused_from - self.assigned_at
                if last > self.fused_from:
                    # The steady state of the compiled path alone: from the first batch it trained.
                    compiled = self.records_trained - self.records_at_fused
                    extra["compiled_rate"] = compiled / (last - self.fused_from)
            if self.run_started is not None:
                extra["join_s"] = self.assigned_at - self.run_started
        if self.run_ended is not None:
            extra["shutdown_s"] = self.run_ended - last
        if records > 0:
            # Where a steady-state record's time goes (microseconds per record, first batch to last).
            # The loop's thread: starting updates (decode, learn_start, and the rest: the
            # per-message calls for value, partition and offset, metrics), finishing them (wait:
            # blocked until the update is done; learn_finish; keep: compactor.keep; prequential;
            # the rest: offsets, metrics, index arithmetic), compact, checkpoint (+ commit), lag
            # (watermark refresh), and consume (consumer.consume and the loop's own bookkeeping).
            # learn (the compiled loop) runs in the training lane: with --overlap in the
            # background (only "wait" is on the loop's thread).
            spent = {k: self._at_last_batch[k] - self._at_first_batch[k] for k in (*PARTS, *GC)}
            outside = sum(spent[k] for k in OUTSIDE_UPDATES)
            for part in (*PARTS, *GC):
                extra[f"us_{part}"] = 1e6 * spent[part] / records
            start_rest = spent["start"] - sum(spent[k] for k in INSIDE_START)
            if not self.settings.overlap:
                start_rest -= spent["learn"]  # the update ran inside _start_update, on this thread
            finish_rest = spent["finish"] - sum(spent[k] for k in INSIDE_FINISH)
            extra["us_process_rest"] = 1e6 * (start_rest + finish_rest) / records
            extra["us_consume"] = 1e6 * (seconds - spent["start"] - spent["finish"] - outside) / records
            extra["overlap"] = self.settings.overlap
            extra["records_per_batch"] = records / max(1, self.batches - self._batches_at_first)
        extra["compactions"] = self.compactor.count if self.compactor is not None else 0
        if from_assignment and self.assigned_at is not None:
            extra["steady_rate"] = records / seconds if seconds > 0 else 0.0
            return Timing(self.records_trained, last - self.assigned_at, extra)
        return Timing(records, seconds, extra)


def worker_settings(
    bootstrap: str,
    topic: str,
    model: str,
    records: int,
    *,
    d: int,
    update_batch: int = 1,
    compaction: bool = True,
    overlap: bool | None = None,
) -> WorkerSettings:
    values: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "topic": topic,
        "group": f"bench-{uuid.uuid4().hex[:10]}",
        "model": model,
        # An mlp or a factory needs --task: the bench's streams of those are regressions.
        "task": catalog.implied_task(model) or "regression",
        "hidden": HIDDEN,
        "lr": lr_for(d),
        "update_batch": update_batch,
        "max_records": records,
        "max_seconds": 300.0,
        "compaction": compaction,  # on by default (every 2,000 records); False: --no-compaction
        "metrics_port": -1,
        "session_timeout_ms": 6000,
        # Defaults otherwise (the checkpoint cadence included): the worker as deployed.
        "checkpoint_dir": Path(tempfile.mkdtemp(prefix="streamtrainer-bench-ckpt-")),
        "fresh": True,
    }
    if overlap is not None:
        values["overlap"] = overlap  # the worker's default otherwise (on)
    known = WorkerSettings.model_fields
    return WorkerSettings(**{k: v for k, v in values.items() if k in known})


def run_worker(
    bootstrap: str,
    topic: str,
    model: str,
    records: int,
    *,
    d: int,
    update_batch: int = 1,
    compaction: bool = True,
    overlap: bool | None = None,
    from_assignment: bool = False,
) -> tuple[Timing, TimedWorker]:
    settings = worker_settings(
        bootstrap,
        topic,
        model,
        records,
        d=d,
        update_batch=update_batch,
        compaction=compaction,
        overlap=overlap,
    )
    worker = TimedWorker(settings)
    try:
        worker.run()
    finally:
        shutil.rmtree(settings.checkpoint_dir, ignore_errors=True)
    if worker.records_trained < records:
        raise RuntimeError(f"worker trained {worker.records_trained} of {records} records from {topic}")
    return worker.timing(from_assignment=from_assignment), worker


def read_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class RssSampler:
    """Samples this process's RSS and the worker's trained count every ``interval_s``."""

    def __init__(self, worker: Worker, interval_s: float = 0.1) -> None:
        self.worker = worker
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._started = time.perf_counter()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(self._started)  # the end state, however the run ended

    def _sample(self, started: float) -> None:
        self.samples.append((time.perf_counter() - started, self.worker.records_trained, read_rss_mb()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample(self._started)

    def rss_at(self, records: int) -> float:
        """RSS of the first sample taken once ``records`` were trained."""
        for _, trained, rss in self.samples:
            if trained >= records:
                return rss
        return float("nan")
