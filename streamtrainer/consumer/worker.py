"""The worker daemon: a consumer-group member that learns from every record it reads.

Shape of ``run()`` (after quix-streams' Application.run): resources live in an
ExitStack, the loop is ``while self._running``, SIGTERM/SIGINT only flip that
flag, and the trained offsets are committed once more on the way out.

Offsets: auto-commit and auto offset store are off. A record's offset is
committed only after the record has been trained on (or counted as invalid),
so a crash re-reads records rather than skipping them. (Checkpoints that move
model state and offsets together are the job of the checkpoint layer.)
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import Counter as CountOf
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from types import FrameType
from typing import BinaryIO

import numpy as np
import orjson
import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry

from streamtrainer.connection import admin_client, check_reachable, client_config, topic_partitions
from streamtrainer.consumer.offsets import OffsetTracker, Partition
from streamtrainer.exceptions import TopicError
from streamtrainer.metrics import MetricsServer, WorkerMetrics
from streamtrainer.records import CODEC_HEADER, BatchDecoder, DecodeError
from streamtrainer.records.exceptions import DECODE_REASONS
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import LearnerConfig, OnlineLearner, PrequentialMetrics

logger = logging.getLogger(__name__)

_PROGRESS_INTERVAL_S = 0.5
_LAG_INTERVAL_S = 5.0
_RUN_LOG_INTERVAL_S = 1.0
_INVALID_LOG_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A snapshot for live views, run logs and the final summary."""

    elapsed_s: float
    records_consumed: int
    records_trained: int
    records_invalid: int
    records_per_second: float
    loss: float
    score_name: str
    score: float
    first_window_loss: float
    last_window_loss: float
    updates: int
    assigned: int

    def as_json(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Throughput:
    """Records per second over a sliding few seconds."""

    def __init__(self, horizon_s: float = 5.0) -> None:
        self.horizon_s = horizon_s
        self._marks: list[tuple[float, int]] = []

    def add(self, now: float, total: int) -> float:
        self._marks.append((now, total))
        while len(self._marks) > 2 and now - self._marks[1][0] >= self.horizon_s:
            self._marks.pop(0)
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        registry: CollectorRegistry | None = None,
        on_progress: Callable[[WorkerStatus], None] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.metrics_server = MetricsServer(
            self.registry, host=settings.metrics_host, port=settings.metrics_port
        )
        self.on_progress = on_progress
        self.decoder = BatchDecoder(n_features=settings.n_features, feature_names=settings.feature_names)
        self.learner: OnlineLearner | None = None
        self.prequential = PrequentialMetrics(settings.resolved_task, settings.prequential_window)
        self.offsets = OffsetTracker()
        self.records_consumed = 0
        self.records_trained = 0
        self.records_invalid = 0
        self._running = False
        self._stop_requested = threading.Event()
        self._consumer: Consumer | None = None
        self._assigned: set[Partition] = set()
        self._started = 0.0
        self._throughput = _Throughput()
        self._rate = 0.0
        self._invalid_logged_at = 0.0
        self._invalid_since_log = 0
        # Export every reason from the start (at zero): a rate over a missing series shows no data.
        for reason in DECODE_REASONS:
            self.metrics.records_invalid.labels(settings.topic, reason)

    # -- lifecycle ------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish (safe from signal handlers and other threads)."""
        self._stop_requested.set()
        self._running = False

    def run(self) -> WorkerStatus:
        settings = self.settings
        torch.set_num_threads(settings.torch_threads)
        with ExitStack() as stack:
            stack.enter_context(self._signals_stop_the_loop())
            self._check_topic()
            stack.enter_context(self.metrics_server)
            consumer = self._create_consumer()
            stack.callback(self._close_consumer)
            self.metrics.info.info(
                {
                    "topic": settings.topic,
                    "group": settings.group,
                    "model": settings.model,
                    "task": settings.resolved_task,
                    "optimizer": settings.optimizer,
                }
            )
            run_log = stack.enter_context(self._run_log())
            consumer.subscribe(
                [settings.topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._started = time.monotonic()
            self._running = not self._stop_requested.is_set()
            next_progress = next_lag = next_log = next_commit = self._started
            try:
                while self._running:
                    now = time.monotonic()
                    if settings.max_seconds is not None and now - self._started >= settings.max_seconds:
                        break
                    budget = settings.poll_batch
                    if settings.max_records is not None:
                        budget = min(budget, settings.max_records - self.records_trained)
                        if budget <= 0:
                            break
                    messages = consumer.consume(num_messages=budget, timeout=0.2)
                    if messages:
                        self._process(messages)
                    now = time.monotonic()
                    if now >= next_commit:
                        self._commit()
                        next_commit = now + settings.commit_interval_s
                    if now >= next_lag:
                        self._refresh_lag()
                        next_lag = now + _LAG_INTERVAL_S
                    if now >= next_progress:
                        self._rate = self._throughput.add(now, self.records_trained)
                        self.metrics.throughput.set(self._rate)
                        if self.on_progress is not None:
                            self.on_progress(self.status())
                        next_progress = now + _PROGRESS_INTERVAL_S
                    if run_log is not None and now >= next_log:
                        run_log.write(orjson.dumps(self.status().as_json()) + b"\n")
                        run_log.flush()
                        next_log = now + _RUN_LOG_INTERVAL_S
            finally:
                self._running = False
                self._commit(final=True)
            status = self.status()
            if run_log is not None:
                run_log.write(orjson.dumps(status.as_json()) + b"\n")
        return status

    def status(self) -> WorkerStatus:
        elapsed = time.monotonic() - self._started if self._started else 0.0
        return WorkerStatus(
            elapsed_s=elapsed,
            records_consumed=self.records_consumed,
            records_trained=self.records_trained,
            records_invalid=self.records_invalid,
            records_per_second=self.records_trained / elapsed if elapsed > 0 else 0.0,
            loss=self.prequential.loss.value,
            score_name=self.prequential.score_name,
            score=self.prequential.score.value,
            first_window_loss=self.prequential.first_window_loss,
            last_window_loss=self.prequential.last_window_loss,
            updates=self.learner.updates if self.learner is not None else 0,
            assigned=len(self._assigned),
        )

    # -- setup ----------------------------------------------------------------

    def _check_topic(self) -> None:
        admin = admin_client(self.settings)
        check_reachable(admin, self.settings)
        if topic_partitions(admin, self.settings.topic, self.settings.startup_timeout_s) is None:
            raise TopicError(
                f"topic {self.settings.topic!r} does not exist on {self.settings.bootstrap_servers}"
            )

    def _create_consumer(self) -> Consumer:
        settings = self.settings
        config = client_config(
            settings,
            **{
                "group.id": settings.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": settings.auto_offset_reset,
                "session.timeout.ms": settings.session_timeout_ms,
                "heartbeat.interval.ms": max(100, settings.session_timeout_ms // 5),
                # The default 1 s fetch backoff caps a fast consumer at ~150k records/s.
                "fetch.queue.backoff.ms": 5,
                "queued.min.messages": 200000,
                "error_cb": self._on_kafka_error,
            },
        )
        self._consumer = Consumer(config)
        return self._consumer

    def _close_consumer(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    @contextlib.contextmanager
    def _signals_stop_the_loop(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            logger.info(
                "received %s: finishing the current batch and committing", signal.Signals(signum).name
            )
            self.stop()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    @contextlib.contextmanager
    def _run_log(self) -> Iterator[BinaryIO | None]:
        path = self.settings.run_log
        if path is None:
            yield None
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as handle:
            yield handle

    # -- the hot path -----------------------------------------------------------

    def _process(self, messages: list[Message]) -> None:
        topic_name = self.settings.topic
        values: list[bytes | None] = []
        codecs: list[str | None] = []
        partitions: list[int] = []
        offsets = self.offsets
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_message_error(error)
                continue
            partition, offset = message.partition() or 0, message.offset() or 0
            partitions.append(partition)
            offsets.done(message.topic() or topic_name, partition, offset)
            values.append(message.value())
            codecs.append(_codec_of(message))
        if not values:
            return
        n = len(values)
        self.records_consumed += n
        for partition, count in CountOf(partitions).items():
            self.metrics.records_consumed.labels(topic_name, str(partition)).inc(count)

        batch = self.decoder.decode(values, codecs)
        errors = batch.errors
        features, labels, index = batch.features, batch.labels, batch.index
        if len(batch) and self.learner is None:
            self.learner = self._create_learner(features.shape[1])
        if self.learner is not None and len(batch):
            valid = self.learner.valid_labels(labels)
            if not valid.all():
                for position in index[~valid]:
                    errors.append(
                        (int(position), DecodeError("label_out_of_range", "label does not fit the task"))
                    )
                features, labels, index = features[valid], labels[valid], index[valid]
        if errors:
            self._count_invalid(errors)
        if self.learner is None or not len(index):
            return

        updates_before = self.learner.updates
        started = time.perf_counter()
        result = self.learner.learn_many(features, labels, batch_size=self.settings.update_batch)
        elapsed = time.perf_counter() - started
        trained = int(index.shape[0])
        self.metrics.update_latency.observe(elapsed / trained)
        self.records_trained += trained
        self.prequential.update(result.losses, result.predictions, labels.astype(np.float64))
        self.metrics.model_updates.inc(self.learner.updates - updates_before)
        self.metrics.prequential_loss.set(self.prequential.loss.value)
        if self.prequential.score_name == "mae":
            self.metrics.prequential_mae.set(self.prequential.score.value)
        else:
            self.metrics.prequential_accuracy.set(self.prequential.score.value)
        trained_partitions = np.asarray(partitions)[index] if len(index) != n else partitions
        for partition, count in CountOf(np.asarray(trained_partitions).tolist()).items():
            self.metrics.records_trained.labels(topic_name, str(partition)).inc(count)
        self.metrics.last_trained_timestamp.set(time.time())

    def _create_learner(self, n_features: int) -> OnlineLearner:
        s = self.settings
        config = LearnerConfig(
            model=s.model,
            task=s.resolved_task,
            loss=s.loss,
            optimizer=s.optimizer,
            lr=s.lr,
            hidden=s.hidden,
            n_classes=s.n_classes,
            standardize=s.standardize,
            seed=s.seed,
            device=s.device,
        )
        learner = OnlineLearner(config, n_features)
        logger.info(
            "model %s (%s, %d features, loss %s, %s lr=%g)",
            s.model,
            s.resolved_task,
            n_features,
            config.resolved_loss,
            s.optimizer,
            s.lr,
        )
        return learner

    def _count_invalid(self, errors: list[tuple[int, DecodeError]]) -> None:
        self.records_invalid += len(errors)
        for reason, count in CountOf(error.reason for _, error in errors).items():
            self.metrics.records_invalid.labels(self.settings.topic, reason).inc(count)
        # One line per few seconds, not one per bad record: a poisoned topic must not flood the log.
        self._invalid_since_log += len(errors)
        now = time.monotonic()
        if now - self._invalid_logged_at >= _INVALID_LOG_INTERVAL_S:
            logger.warning(
                "%d invalid record(s) skipped since last report; latest: %s",
                self._invalid_since_log,
                errors[-1][1],
            )
            self._invalid_logged_at = now
            self._invalid_since_log = 0

    # -- offsets, lag, rebalances -------------------------------------------------

    def _commit(self, partitions: list[Partition] | None = None, *, final: bool = False) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        pending = self.offsets.pending(partitions)
        if not pending:
            return
        try:
            consumer.commit(offsets=pending, asynchronous=False)
        except KafkaException as error:
            # Not fatal: the records were trained and will be committed next time (at worst re-read).
            logger.warning("offset commit failed%s: %s", " at exit" if final else "", error)
            return
        self.offsets.mark_committed(pending)
        self.metrics.offsets_committed.inc()

    def _refresh_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        for topic, partition in list(self._assigned):
            try:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=1.0, cached=False
                )
            except KafkaException:
                continue
            position = self.offsets.next_offset(topic, partition)
            if position is None:
                # Nothing trained from it yet: the fetch position is the best local estimate.
                fetched = consumer.position([TopicPartition(topic, partition)])[0].offset
                if fetched < 0:
                    continue
                position = fetched
            self.metrics.consumer_lag.labels(topic, str(partition)).set(max(0, high - position))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._assigned.update(keys)
        for topic, partition in keys:
            self.metrics.records_consumed.labels(topic, str(partition))
            self.metrics.records_trained.labels(topic, str(partition))
        self.metrics.assigned_partitions.set(len(self._assigned))
        logger.info("assigned %s", _describe(keys))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        # Everything trained from these partitions is committed before another member takes them.
        self._commit(keys)
        self._release(keys)
        logger.info("revoked %s", _describe(keys))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        # Another member may already own them: committing now could move its offsets backwards.
        self._release(keys)
        logger.warning("lost %s without a clean revocation", _describe(keys))

    def _release(self, keys: list[Partition]) -> None:
        self.offsets.forget(keys)
        for topic, partition in keys:
            self._assigned.discard((topic, partition))
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(topic, str(partition))
        self.metrics.assigned_partitions.set(len(self._assigned))

    def _on_message_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise KafkaException(error)
        logger.warning("consumer error: %s", error.str())

    def _on_kafka_error(self, error: KafkaError) -> None:
        logger.warning("kafka: %s", error.str())


def _codec_of(message: Message) -> str | None:
    headers = message.headers()
    if not headers:
        return None
    for header in headers:
        name, value = header[0], header[1]
        if name == CODEC_HEADER:
            if isinstance(value, bytes):
                return value.decode(errors="replace")
            return value or ""
    return None


def _describe(keys: list[Partition]) -> str:
    return ", ".join(f"{topic}[{partition}]" for topic, partition in sorted(keys)) or "nothing"
