"""The worker end to end: a consumer-group member on the embedded broker, timed from outside.

:class:`TimedWorker` only records timestamps around the worker's own steps (its
run, assignment callback, learner creation, batch processing and learn_many
calls); the training path is the worker's, unchanged.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from bench.workloads import HIDDEN, Timing, lr_for
from streamtrainer.consumer.worker import Worker, WorkerStatus
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import OnlineLearner, StepResult, kernels


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
        self.first_batch_records = 0
        self.process_seconds = 0.0  # inside _process: decode, bookkeeping and learning
        self.learn_seconds = 0.0  # inside learner.learn_many
        self._at_first_batch = (0.0, 0.0)

    def run(self) -> WorkerStatus:
        self.run_started = time.perf_counter()
        try:
            return super().run()
        finally:
            self.run_ended = time.perf_counter()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.assigned_at is None:
            self.assigned_at = time.perf_counter()
        super()._on_assign(consumer, partitions)

    def _create_learner(self, n_features: int) -> OnlineLearner:
        started = time.perf_counter()
        learner = super()._create_learner(n_features)
        self.learner_seconds = time.perf_counter() - started
        learn_many = learner.learn_many

        def timed_learn_many(*args: Any, **kwargs: Any) -> StepResult:
            began = time.perf_counter()
            try:
                return learn_many(*args, **kwargs)
            finally:
                self.learn_seconds += time.perf_counter() - began

        learner.learn_many = timed_learn_many  # type: ignore[method-assign]
        return learner

    def _process(self, messages: list[Message]) -> None:
        ready_before = kernels.compile_state() == "ready"
        began = time.perf_counter()
        super()._process(messages)
        now = time.perf_counter()
        self.process_seconds += now - began
        if self.records_trained and self.first_trained_at is None:
            self.first_trained_at = now
            self.first_batch_records = self.records_trained
            self._at_first_batch = (self.process_seconds, self.learn_seconds)
        if self.fused_from is None and ready_before and self.records_trained:
            self.fused_from = now
        self.last_trained_at = now

    def timing(self) -> Timing:
        """Steady-state rate: the records after the first batch over the time since it."""
        first, last = self.first_trained_at, self.last_trained_at
        if first is None or last is None:
            return Timing(0, 0.0)
        records = self.records_trained - self.first_batch_records
        seconds = last - first
        extra: dict[str, Any] = {
            "records_trained": self.records_trained,
            "records_invalid": self.records_invalid,
            "updates": self.learner.updates if self.learner is not None else 0,
            "prequential_loss": self.prequential.loss.value,
            "last_window_loss": self.prequential.last_window_loss,
            "learner_created_s": self.learner_seconds,
        }
        if self.assigned_at is not None:
            extra["first_record_s"] = first - self.assigned_at
            extra["end_to_end_rate"] = self.records_trained / (last - self.assigned_at)
            if self.fused_from is not None:
                extra["fused_from_s"] = self.fused_from - self.assigned_at
            if self.run_started is not None:
                extra["join_s"] = self.assigned_at - self.run_started
        if self.run_ended is not None:
            extra["shutdown_s"] = self.run_ended - last
        if records > 0:
            # Where a steady-state record's time goes: learning, the rest of the worker's batch
            # handling (decode, offsets, metrics, checkpoints), and outside _process (polling).
            process = self.process_seconds - self._at_first_batch[0]
            learn = self.learn_seconds - self._at_first_batch[1]
            extra["us_learn"] = 1e6 * learn / records
            extra["us_worker_other"] = 1e6 * (process - learn) / records
            extra["us_poll"] = 1e6 * (seconds - process) / records
        checkpoint_s = self.registry.get_sample_value("streamtrainer_checkpoint_duration_seconds_sum")
        if checkpoint_s is not None:
            # Whole run (the final checkpoint included), per trained record; part of us_worker_other.
            extra["us_checkpoint"] = 1e6 * checkpoint_s / max(self.records_trained, 1)
        return Timing(records, seconds, extra)


def worker_settings(
    bootstrap: str, topic: str, model: str, records: int, *, d: int, update_batch: int = 1
) -> WorkerSettings:
    values: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "topic": topic,
        "group": f"bench-{uuid.uuid4().hex[:10]}",
        "model": model,
        "hidden": HIDDEN,
        "lr": lr_for(d),
        "update_batch": update_batch,
        "max_records": records,
        "max_seconds": 300.0,
        "metrics_port": -1,
        "session_timeout_ms": 6000,
        # Defaults otherwise (the checkpoint cadence included): the worker as deployed.
        "checkpoint_dir": Path(tempfile.mkdtemp(prefix="streamtrainer-bench-ckpt-")),
        "fresh": True,
    }
    known = WorkerSettings.model_fields
    return WorkerSettings(**{k: v for k, v in values.items() if k in known})


def run_worker(
    bootstrap: str, topic: str, model: str, records: int, *, d: int, update_batch: int = 1
) -> tuple[Timing, TimedWorker]:
    worker = TimedWorker(worker_settings(bootstrap, topic, model, records, d=d, update_batch=update_batch))
    worker.run()
    if worker.records_trained < records:
        raise RuntimeError(f"worker trained {worker.records_trained} of {records} records from {topic}")
    return worker.timing(), worker


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
