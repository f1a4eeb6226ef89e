"""The worker daemon: a consumer-group member that learns from every record it reads.

Shape of ``run()`` (after quix-streams' Application.run): resources live in an
ExitStack, the loop is ``while self._running``, SIGTERM/SIGINT only flip that
flag, and the trained offsets are committed once more on the way out.

Model state and offsets move together. Auto-commit and the automatic offset
store are off. A checkpoint holds the model, optimizer and scaler state *and*,
per partition, the next offset to read; offsets are committed to Kafka only
after the checkpoint that contains them is durable. On assignment a partition
starts at the later of its checkpointed and its committed offset, so a
restarted worker neither re-applies nor skips a record. See docs/semantics.md.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import threading
import time
import uuid
from collections import Counter as CountOf
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import orjson
import torch
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from prometheus_client import CollectorRegistry

from streamtrainer.broker import warn_if_static_membership_on_tansu
from streamtrainer.connection import (
    RepeatedErrors,
    admin_client,
    assigning_consumer_config,
    check_reachable,
    client_config,
    ensure_topic,
    topic_partitions,
)
from streamtrainer.consumer.compactor import HTTP, SIGNAL, Compactor
from streamtrainer.consumer.dead_letter import (
    DEAD_LETTER_REASONS,
    DeadLetterQueue,
    Rejection,
    TrainingGuardSkip,
    dead_letter_topic,
    default_worker_id,
)
from streamtrainer.consumer.error_budget import ErrorBudget, ErrorBudgetExceeded, Verdict
from streamtrainer.consumer.exceptions import DeadLetterError
from streamtrainer.consumer.messages import HeaderCodecs, key_bytes, timestamps_of
from streamtrainer.consumer.offsets import OffsetTracker, Partition
from streamtrainer.consumer.schema_probe import settle_schema_from_log
from streamtrainer.consumer.training_lane import TrainingLane
from streamtrainer.consumer.validation import trainable_rows
from streamtrainer.exceptions import ConfigurationError, StreamtrainerError, TopicError
from streamtrainer.metrics import MetricsServer, WorkerMetrics
from streamtrainer.records import BatchDecoder
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import (
    LearnerConfig,
    OnlineLearner,
    PendingSteps,
    ProgressiveMetrics,
    ProgressiveReport,
    StepResult,
)
from streamtrainer.training.checkpoint import Checkpoint, CheckpointStore
from streamtrainer.training.drift import LossDriftDetector, loss_drift_detector
from streamtrainer.training.exceptions import CheckpointError, DivergenceError, TrainingError
from streamtrainer.training.learner import prepare_training
from streamtrainer.training.threads import set_intra_op_threads

logger = logging.getLogger(__name__)

_PROGRESS_INTERVAL_S = 0.5
_LAG_INTERVAL_S = 5.0
# /healthz fails once the loop has not gone round for this long (Kafka's default max.poll.interval.ms);
# /ready once it has not polled for this long (a poll is every 0.2 s at most when idle).
_LIVENESS_STALL_S = 300.0
_READY_STALL_S = 30.0
_RUN_LOG_INTERVAL_S = 1.0
_INVALID_LOG_INTERVAL_S = 5.0
# During compaction epochs the consumer is polled this often: far inside any max.poll.interval.ms.
_SERVE_GROUP_INTERVAL_S = 0.1
# A poll takes no more records than its update trains in about this long (at the last update's
# speed): big polls amortize per-batch work for the compiled loops, small ones keep a slow model
# (autograd: ~100x slower) responsive to signals, progress and the group. The first poll, with
# no speed known yet (and the loop perhaps still compiling), takes at most _FIRST_POLL records.
_UPDATE_TARGET_S = 0.1
_FIRST_POLL = 1000
_MIN_POLL = 100
# Checkpoint tensors of the progressive metrics (their scalars are the metadata's "progressive").
_PROGRESSIVE_PREFIX = "progressive."


def learner_config(s: WorkerSettings) -> LearnerConfig:
    """The learner a worker on these settings trains (one place: the worker and the benches)."""
    return LearnerConfig(
        model=s.model,
        task=s.resolved_task,
        loss=s.loss,
        optimizer=s.optimizer,
        lr=s.lr,
        hidden=s.hidden,
        n_classes=s.n_classes,
        standardize=s.standardize,
        standardize_target=s.standardize_target,
        seed=s.seed,
        device=s.device,
        fused=s.fused,
        clip_grad_norm=s.clip_grad_norm,
        spike_factor=s.spike_factor,
        max_consecutive_skips=s.max_consecutive_skips,
    )


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A snapshot for live views, run logs and the final summary."""

    elapsed_s: float
    records_consumed: int
    records_trained: int
    records_invalid: int
    records_per_second: float
    # Progressive validation (each record scored before learning from it): the whole run's and the
    # last --prequential-window records' figures, named; the three losses below come from it too.
    prequential: ProgressiveReport
    first_window_loss: float
    last_window_loss: float  # the window's mean loss
    mean_loss: float  # the whole run's
    updates: int
    assigned: int
    model_version: int
    records_applied: int
    compactions: int
    compaction_records: int
    compaction_epoch_loss: float | None
    compaction_loss_before: float | None
    compaction_loss_after: float | None

    def as_json(self) -> dict[str, object]:
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields["prequential"] = self.prequential.as_json()
        return fields


@dataclass(slots=True)
class _Polled:
    """A polled batch, from its decoding to the end of its update (``_start_update``, ``_finish_update``)."""

    records: list[Message]
    partitions: list[int] | None  # per record; None: all of them are of the one partition in last_offsets
    last_offsets: dict[int, int]  # per partition: its last offset in the batch
    features: npt.NDArray[np.float32]  # the trainable rows ...
    labels: npt.NDArray[np.float32]
    index: npt.NDArray[np.intp]  # ... and where they are in ``records``
    # Its update: started on the loop's thread (scaling, the compiled loop prepared), computed in the
    # training lane (``update``: the seconds it took), finished on the loop's thread again.
    steps: PendingSteps | None = None
    update: Future[float] | None = None
    updates_before: int = 0  # the learner's optimizer steps before this batch's
    start_seconds: float = 0.0


def _compute(steps: PendingSteps) -> float:
    """A polled batch's compiled loop, in the training lane: the seconds it took."""
    started = time.perf_counter()
    steps.compute()
    return time.perf_counter() - started


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
        self.compactor = Compactor(settings, self.metrics) if settings.compaction else None
        self.metrics_server = MetricsServer(
            self.registry,
            host=settings.metrics_host,
            port=settings.metrics_port,
            # Admin endpoints only when asked for (--admin-endpoints): they have no authentication.
            actions={"/compact": self._compact_on_request}
            if settings.admin_endpoints and self.compactor is not None
            else None,
            liveness=self.liveness,
            readiness=self.readiness,
        )
        self.on_progress = on_progress
        self.decoder = self._new_decoder(settings.n_features, settings.feature_names)
        self.learner: OnlineLearner | None = None
        self.prequential = ProgressiveMetrics(
            settings.resolved_task, settings.n_classes, settings.prequential_window
        )
        self.metrics.track_progressive(
            self.prequential.task, self.prequential.window, self.prequential.report
        )
        self.drift = self._new_drift_detector()
        self.offsets = OffsetTracker()
        self.store = CheckpointStore(settings.checkpoint_dir, keep=settings.checkpoint_keep)
        # Records applied to the model, per partition, over the model's whole history.
        self.applied: dict[Partition, int] = {}
        self.model_version = 0
        self._dirty = False
        self._since_checkpoint = 0
        self._last_checkpoint = 0.0
        self.records_consumed = 0
        self.records_trained = 0
        self.records_invalid = 0
        self.error_budget = ErrorBudget(
            settings.errors_tolerance, settings.error_budget, settings.error_budget_window
        )
        # Why the worker stopped on its own (the error budget): no checkpoint may follow it.
        self._failure: StreamtrainerError | None = None
        # --stop-at-end: per assigned partition, (low, high) watermarks when it was assigned.
        self._end_offsets: dict[Partition, tuple[int, int]] = {}
        self._running = False
        self._stop_requested = threading.Event()
        self._stop_signal: int | None = None  # the signal that asked to stop
        self._consumer: Consumer | None = None
        self._assigned: set[Partition] = set()
        self._started = 0.0
        self._throughput = _Throughput()
        self._rate = 0.0
        self._invalid_logged_at = 0.0
        self._invalid_since_log = 0
        self._kafka_errors = RepeatedErrors()
        # Messages a poll returned while a compaction had the partitions paused: trained next.
        self._held: list[Message] = []
        # Where updates run (replaced in run() by the configured one) and the polled batch whose
        # update may still be running there.
        self._lane = TrainingLane(background=False)
        self._in_flight: _Polled | None = None
        # Counters a polled batch compares to see whether a rollback or a rebalance came meanwhile.
        self._rewinds = 0
        self._assignment_changes = 0
        self._in_rebalance = False
        self._seconds_per_record: float | None = None  # of the last update
        self._guard_rolled_back = False
        self.dead_letters: DeadLetterQueue | None = None
        self._dead_letters_unconfirmed = False
        # (partition, offset) of the records this group dead-lettered past the last checkpoint (and,
        # after a restart, found in the dead-letter topic): read again after a rollback or a restart,
        # they are neither sent nor counted as invalid again.
        self._in_dead_letter_topic: set[tuple[int, int]] = set()
        # The dead-letter topic's end offsets (per partition) the next checkpoint records.
        self._dlq_ends: dict[int, int] | None = None
        self._dlq_ends_stale = False
        # --fresh: checkpoints up to this version belong to the model it ignores.
        self._fresh_floor = 0
        # Divergence (refused records that pass on the model a rollback goes back to): the learning-rate
        # backoffs in a row, the last offsets per partition of the batch that diverged last, and the
        # first offset read per partition (where a rollback with no checkpoint and no commit goes).
        self._lr_backoffs = 0
        self._diverged_at: dict[int, int] = {}
        self._first_read: dict[int, int] = {}
        # The model refused records are judged on (latest checkpoint version, that checkpoint, model):
        # rebuilding it costs ~1 ms (mlp), checking the version ~12 us.
        self._reference: tuple[int, Checkpoint | None, torch.nn.Module] | None = None
        self._paused: list[TopicPartition] = []
        self._abort_compaction = False
        self._served_group_at = 0.0
        # When the loop last went round (or, within a compaction or a dead-letter retry, served the
        # group): /healthz and /ready read it from the metrics server's thread.
        self._heartbeat = 0.0
        self._finished = False
        # Export every reason from the start (at zero): a rate over a missing series shows no data.
        for reason in DEAD_LETTER_REASONS:
            self.metrics.records_invalid.labels(settings.topic, reason)
            self.metrics.dead_lettered.labels(settings.topic, reason)

    # -- lifecycle ------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish (safe from signal handlers and other threads)."""
        self._stop_requested.set()
        self._running = False

    def run(self) -> WorkerStatus:
        settings = self.settings
        set_intra_op_threads(settings.torch_threads)
        with ExitStack() as stack:
            # Before connecting: a checkpoint of another topic, group or schema is a usage error.
            stack.enter_context(self.store)
            checkpoint = None
            if settings.fresh:
                logger.info("--fresh: ignoring checkpoints in %s", settings.checkpoint_dir)
                # Rollbacks must not go back to the checkpoints --fresh ignores either.
                self._fresh_floor = self.store.latest_version()
            else:
                checkpoint = self.store.load_latest()
                self._check_binding(checkpoint)
            stack.enter_context(self._signals_stop_the_loop())
            if settings.fused and settings.device == "cpu":
                prepare_training(settings.model, settings.optimizer)  # compiles in the background meanwhile
            try:
                self._restore(checkpoint)
            except TrainingError as error:
                raise ConfigurationError(
                    f"{settings.checkpoint_dir}: {error} (use another --checkpoint-dir, or --fresh)"
                ) from None
            if self.learner is None and settings.init_from is not None:
                self._initialise_from(settings.init_from)
            self._check_topic()
            if checkpoint is None and self.learner is None:
                logger.info("no checkpoint in %s: starting a new model", settings.checkpoint_dir)
            self.dead_letters = self._open_dead_letters()
            stack.callback(self.dead_letters.close)
            self._find_dead_lettered_since(checkpoint)
            if self.compactor is not None:
                stack.enter_context(self.compactor)
            self._heartbeat = time.monotonic()
            stack.enter_context(self.metrics_server)
            stack.callback(setattr, self, "_finished", True)
            self._lane = stack.enter_context(TrainingLane(background=settings.overlap))
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
            if settings.errors_tolerance != "all":
                # NaN (the default) while the budget is off: "no limit" is neither 0 nor any share.
                limit = settings.error_budget if settings.errors_tolerance == "budget" else 0.0
                self.metrics.error_budget_limit.set(limit)
                self.metrics.error_budget_ratio.set(0.0)
            run_log = stack.enter_context(self._run_log())
            consumer.subscribe(
                [settings.topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            logger.info("joining group %s on topic %s", settings.group, settings.topic)
            # Torch, numba and the client make a few hundred thousand long-lived objects: frozen, the
            # garbage collector stops rescanning them on every full pass (~1.5 us per record otherwise).
            gc.freeze()
            self._started = time.monotonic()
            self._running = not self._stop_requested.is_set()
            next_progress = next_lag = next_log = self._last_checkpoint = self._started
            clean = bounded = False
            try:
                while self._running:
                    now = self._heartbeat = time.monotonic()
                    if settings.max_seconds is not None and now - self._started >= settings.max_seconds:
                        break
                    budget = self._poll_budget()
                    if budget <= 0 and self._in_flight is None:
                        bounded = True  # --max-records reached
                        break
                    rewinds, assignment = self._rewinds, self._assignment_changes
                    messages: list[Message] = []
                    if budget > 0:
                        # With --overlap the previous batch trains in the background meanwhile.
                        messages = self._take_held(budget) or consumer.consume(
                            num_messages=budget, timeout=0.2
                        )
                    # Its bookkeeping, then everything that needs the model and the offsets to agree,
                    # then this batch's update starts (with --overlap: runs while the next is polled).
                    self._finish_update()
                    if self._failure is not None:
                        break
                    if self._reached_end(idle=not messages):
                        bounded = True
                        break
                    if self.compactor is not None and (reason := self.compactor.due()) is not None:
                        self._compact(reason)
                    now = time.monotonic()
                    if self._dirty and (
                        self._since_checkpoint >= settings.checkpoint_every_records
                        or now - self._last_checkpoint >= settings.checkpoint_interval_s
                    ):
                        self._checkpoint_and_commit()
                    if now >= next_lag:
                        self._refresh_lag()
                        if self.error_budget.enabled:
                            self.metrics.error_budget_ratio.set(self.error_budget.share)
                        if self.compactor is not None:
                            self.compactor.publish_store_size()
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
                    if messages:
                        self._start_update(self._still_ours(messages, rewinds, assignment))
                clean = True
            finally:
                self._running = False
                if bounded and self._failure is None:
                    self._stop_if_all_invalid()
                if clean and self._failure is None:
                    # Clean shutdown: everything trained becomes durable, then committed.
                    self._checkpoint_and_commit()
                else:
                    # Stopped on an error or an exception (a batch may be half accounted for):
                    # nothing past the last checkpoint is committed.
                    self._discard_update()
            status = self.status()
            if run_log is not None:
                run_log.write(orjson.dumps(status.as_json()) + b"\n")
            if self._failure is not None:
                # Out of the group first: its partitions go to another member meanwhile.
                self._close_consumer()
                self._linger_for_scrapes()
                raise self._failure
        return status

    def liveness(self) -> tuple[bool, str]:
        """``GET /healthz``: the worker runs and its loop goes round (or serves its group meanwhile).

        Not alive once its loop has been stuck for longer than Kafka's default ``max.poll.interval.ms``
        (300 s: the group has given its partitions away by then), or once it is finished.
        """
        if self._finished:
            return False, "finished"
        if not self._heartbeat:
            return True, "starting"
        quiet = time.monotonic() - self._heartbeat
        if quiet > _LIVENESS_STALL_S:
            return False, f"stuck: the loop has not run for {quiet:.0f} s"
        return True, "alive"

    def readiness(self) -> tuple[bool, str]:
        """``GET /ready``: partitions assigned and the loop polls them (not stalled, not blocked)."""
        alive, why = self.liveness()
        if not alive:
            return False, why
        if not self._running:
            return False, "stopping" if self._started else "starting"
        if not self._assigned:
            return False, "no partitions assigned"
        quiet = time.monotonic() - self._heartbeat
        if quiet > _READY_STALL_S:
            return False, f"stalled: nothing polled for {quiet:.0f} s"
        if self.dead_letters is not None and self.dead_letters.blocked:
            return False, "blocked on the dead-letter topic"
        return True, f"ready: {len(self._assigned)} partition(s) assigned"

    def status(self) -> WorkerStatus:
        elapsed = time.monotonic() - self._started if self._started else 0.0
        compactor = self.compactor
        last = compactor.last if compactor is not None else None
        prequential = self.prequential.report()
        return WorkerStatus(
            elapsed_s=elapsed,
            records_consumed=self.records_consumed,
            records_trained=self.records_trained,
            records_invalid=self.records_invalid,
            records_per_second=self.records_trained / elapsed if elapsed > 0 else 0.0,
            prequential=prequential,
            first_window_loss=prequential.first_window_loss,
            last_window_loss=prequential.window["loss"],
            mean_loss=prequential.run["loss"],
            updates=self.learner.updates if self.learner is not None else 0,
            assigned=len(self._assigned),
            model_version=self.model_version,
            records_applied=sum(self.applied.values()),
            compactions=compactor.count if compactor is not None else 0,
            compaction_records=last.records if last is not None else 0,
            compaction_epoch_loss=last.epoch_losses[-1] if last is not None and last.epoch_losses else None,
            compaction_loss_before=last.loss_before if last is not None else None,
            compaction_loss_after=compactor.loss_after if compactor is not None else None,
        )

    # -- setup ----------------------------------------------------------------

    def _check_binding(self, checkpoint: Checkpoint | None) -> None:
        """Refuse a checkpoint of another topic, group or input schema (before connecting: exit 2)."""
        if checkpoint is None:
            return
        settings, metadata = self.settings, checkpoint.metadata
        topic = metadata.get("topic")
        if topic is None:  # checkpoints before the topic was recorded: their positions name it
            topics = {str(key).rpartition(":")[0] for key in dict(metadata.get("positions", {}))}
            topic = topics.pop() if len(topics) == 1 else None
        group = metadata.get("group")
        where = f"{settings.checkpoint_dir} (checkpoint {checkpoint.version})"
        if (topic is not None and topic != settings.topic) or (group is not None and group != settings.group):
            raise ConfigurationError(
                f"{where} holds the model of topic {topic!r}, group {group!r}, not of topic "
                f"{settings.topic!r}, group {settings.group!r}: use another --checkpoint-dir, --fresh "
                f"to start a new model there, or --init-from to take that model across on purpose"
            )
        n_features, names = metadata.get("n_features"), metadata.get("feature_names")
        wanted = settings.n_features
        if wanted is not None and isinstance(n_features, int) and n_features != wanted:
            raise ConfigurationError(
                f"{where} holds a model of {n_features} features, not --n-features {settings.n_features}"
            )
        if settings.feature_names is not None and isinstance(names, list) and names != settings.feature_names:
            raise ConfigurationError(
                f"{where} holds a model of features {names}, not --feature-names {settings.feature_names}"
            )

    def _check_topic(self) -> None:
        settings = self.settings
        admin = admin_client(settings)
        # The signal handlers are in place: SIGINT or SIGTERM ends the wait for the broker at once.
        check_reachable(admin, settings, stop_signal=lambda: self._stop_signal)
        warn_if_static_membership_on_tansu(admin, settings.group_instance_id, settings.startup_timeout_s)
        if topic_partitions(admin, self.settings.topic, self.settings.startup_timeout_s) is None:
            raise TopicError(
                f"topic {self.settings.topic!r} does not exist on {self.settings.bootstrap_servers}"
            )

    def _open_dead_letters(self) -> DeadLetterQueue:
        settings = self.settings
        topic = dead_letter_topic(settings.topic, settings.dlq_topic)
        admin = admin_client(settings)
        ensure_topic(admin, topic, partitions=1, timeout_s=settings.startup_timeout_s)
        logger.info("invalid records go to %s", topic)
        return DeadLetterQueue(
            settings,
            topic=topic,
            worker_id=settings.worker_id or default_worker_id(),
            metrics=self.metrics,
            source_topic=settings.topic,
            producer_config=settings.dlq_kafka_config,
            group=settings.group,
        )

    def _find_dead_lettered_since(self, checkpoint: Checkpoint | None) -> None:
        """The records this group dead-lettered after ``checkpoint`` (it will read them again).

        The checkpoint records the dead-letter topic's end offsets; only what was written since is
        read (after a stop on the error budget: its last window, a few hundred records at most).
        Without a checkpoint (a worker stopped before its first) the whole topic is read.
        """
        assert self.dead_letters is not None
        ends = checkpoint.metadata.get("dlq_end_offsets") if checkpoint is not None else None
        since = {int(p): int(o) for p, o in ends.items()} if isinstance(ends, dict) else None
        self._in_dead_letter_topic = self.dead_letters.already_dead_lettered(since)
        self._dlq_ends = since
        self._note_dead_letter_ends()
        if self._in_dead_letter_topic:
            logger.info(
                "%d record(s) after checkpoint %d are in the dead-letter topic already: not sent again",
                len(self._in_dead_letter_topic),
                self.model_version,
            )

    def _note_dead_letter_ends(self) -> None:
        """Where the dead-letter topic ends now, for the next checkpoint: after a restart only what
        follows is searched for records sent already. A watermark query (~1 ms), made at start and
        at a checkpoint after records were dead-lettered; if it fails the older ends stay (a restart
        then reads more).
        """
        if self.dead_letters is None:
            return
        try:
            self._dlq_ends = self.dead_letters.end_offsets()
            self._dlq_ends_stale = False
        except (KafkaException, DeadLetterError) as error:
            logger.warning("could not read the dead-letter topic's end offsets: %s", error)

    def _create_consumer(self) -> Consumer:
        settings = self.settings
        config = client_config(
            settings,
            **{
                "group.id": settings.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": settings.auto_offset_reset,
                # cooperative-sticky: a member keeps training the partitions it keeps during a rebalance.
                "partition.assignment.strategy": settings.assignment_strategy,
                "session.timeout.ms": settings.session_timeout_ms,
                "heartbeat.interval.ms": max(100, settings.session_timeout_ms // 5),
                # The default 1 s fetch backoff caps a fast consumer at ~150k records/s.
                "fetch.queue.backoff.ms": 5,
                "queued.min.messages": 200000,
                "error_cb": self._on_kafka_error,
            },
        )
        if settings.group_instance_id:
            config["group.instance.id"] = settings.group_instance_id
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
            self._stop_signal = signum
            self.stop()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        compactor = self.compactor
        if compactor is not None:

            def compact(signum: int, frame: FrameType | None) -> None:
                compactor.request(SIGNAL)

            previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, compact)
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

    def _poll_budget(self) -> int:
        """Most records the next poll may take; 0 or less: none (both count the update in flight)."""
        settings = self.settings
        budget = settings.poll_batch
        if self._seconds_per_record is None:
            budget = min(budget, _FIRST_POLL)
        elif self._seconds_per_record > 0:
            budget = min(budget, max(_MIN_POLL, int(_UPDATE_TARGET_S / self._seconds_per_record)))
        in_flight = int(self._in_flight.index.shape[0]) if self._in_flight is not None else 0
        if settings.max_records is not None:
            # Records consumed, trained or routed: a run with dead letters still reaches its limit.
            budget = min(budget, settings.max_records - self.records_consumed)
        if self.compactor is not None and (until := self.compactor.records_until_due()) is not None:
            # Not past the next compaction: "every N records" stays every N, whatever the poll size.
            if until > in_flight:
                budget = min(budget, until - in_flight)
            elif in_flight:
                budget = min(budget, 0)  # the batch in flight completes the count: compact first
        return budget

    def _reached_end(self, idle: bool) -> bool:
        """--stop-at-end: every assigned partition is read up to its end offset when assigned.

        ``idle``: the last poll returned no record (everything handed out is accounted for).
        """
        consumer = self._consumer
        if (
            not self.settings.stop_at_end
            or consumer is None
            or not self._assigned
            or self._in_flight is not None
            or self._held
        ):
            return False
        for key in self._assigned:
            if key not in self._end_offsets:
                # The watermarks of the first fetch response after the assignment: "the end" of the
                # bounded run. (Not a ListOffsets query: the embedded broker answers it wrongly,
                # e.g. 1 for a partition of 1,573 records.)
                try:
                    low, high = consumer.get_watermark_offsets(TopicPartition(*key), cached=True)
                except KafkaException:
                    return False
                if high < 0:
                    return False  # nothing fetched from it yet
                self._end_offsets[key] = (max(low, 0), high)
            low, high = self._end_offsets[key]
            position = self.offsets.next_offset(*key)
            if max(position if position is not None else low, low) < high:
                # Nothing left to train may still sit below the end: control records of a
                # transactional producer, or gaps of a compacted topic. When the last poll returned
                # nothing, the consumer's position (past the last record it handed out, and past
                # those) tells.
                if not idle:
                    return False
                try:
                    (consumed,) = consumer.position([TopicPartition(*key)])
                except KafkaException:
                    return False
                if consumed.offset < high:
                    return False
        logger.info("--stop-at-end: every assigned partition is read to its end offset")
        return True

    def _still_ours(self, messages: list[Message], rewinds: int, assignment: int) -> list[Message]:
        """What of a polled batch is still to be trained, after what happened since the poll began."""
        if self._rewinds != rewinds:
            # A rollback: the positions went back to the checkpoint and these records are read again
            # from there. Seek there once more: the rollback may have run inside the poll, which can
            # return records fetched after its seek.
            self._seek_to_positions()
            kept = [message for message in messages if message.error() is not None]
        elif self._assignment_changes != assignment:
            # Records of partitions revoked meanwhile: their new owner reads them from the commit.
            topic, owned = self.settings.topic, self._assigned
            kept = [m for m in messages if m.error() is not None or (topic, m.partition()) in owned]
        else:
            return messages
        if len(kept) < len(messages):
            logger.debug("%d polled record(s) left to be read again", len(messages) - len(kept))
        return kept

    def _start_update(self, messages: list[Message]) -> None:
        """Decode a polled batch, route what cannot be trained on, and start the update of the rest.

        The update runs in the training lane; ``_finish_update`` waits for it and
        accounts for the batch (offsets, metrics, compaction log). Offsets move
        only then: a checkpoint never records a position its model has not learned.
        """
        assert self._in_flight is None, "one update in flight at most"
        topic_name = self.settings.topic
        # A few list comprehensions over the batch, not one loop body per record: this
        # is the hottest Python in the worker (each call on a message costs 20-50 ns).
        records = messages
        if any([message.error() is not None for message in messages]):
            records = []
            for message in messages:
                error = message.error()
                if error is None:
                    records.append(message)
                else:
                    self._on_message_error(error)
        if not records:
            return
        n = len(records)
        values = [message.value() for message in records]
        # Offsets within a partition rise, so its last record has its last offset.
        partitions: list[int] | None = None
        if len(self._assigned) == 1:
            # One partition assigned: every record is of it (``_still_ours`` saw to that), and
            # reading each record's partition and offset (~50 ns a call) can be skipped.
            ((_, partition),) = self._assigned
            last_offsets: dict[int, int] = {partition: records[-1].offset()}  # type: ignore[dict-item]
            counts: dict[int, int] = {partition: n}
        else:
            partitions = [message.partition() for message in records]  # type: ignore[misc]
            offsets: list[int] = [message.offset() for message in records]  # type: ignore[misc]
            last_offsets = dict(zip(partitions, offsets, strict=True))
            counts = CountOf(partitions)
        self.records_consumed += n
        self.error_budget.consume(n)
        for partition, count in counts.items():
            self.metrics.records_consumed.labels(topic_name, str(partition)).inc(count)

        schema_order: list[int] | None = None
        if self.decoder.n_features is None and partitions is not None:
            # The first record in (partition, offset) order fixes the schema, not the first decoded.
            schema_order = sorted(range(n), key=lambda i: (partitions[i], offsets[i]))
        batch = self.decoder.decode(values, HeaderCodecs(records), schema_order=schema_order)
        errors = batch.errors
        features, labels, index = batch.features, batch.labels, batch.index
        if len(batch) and self.learner is None:
            self.learner = self._create_learner(features.shape[1])
            gc.freeze()
        if self.learner is not None:
            features, labels, index = trainable_rows(batch, self.learner, errors)
        if errors:
            rewinds, assignment = self._rewinds, self._assignment_changes
            self._route_invalid(records, errors)
            if self._rewinds != rewinds or self._failure is not None:
                return  # rolled back while the dead-letter topic was written: read again from there
            if self._assignment_changes != assignment and len(index):
                owned = np.array([(topic_name, m.partition()) in self._assigned for m in records])
                keep = owned[index]
                features, labels, index = features[keep], labels[keep], index[keep]
        elif (verdict := self.error_budget.check()) is not None:
            # Invalid records earlier in the window, and now enough records to judge it by.
            self._spend_error_budget(verdict, None, None)
        if self._failure is not None:
            return
        polled = _Polled(records, partitions, last_offsets, features, labels, index)
        if self.learner is None or not len(index):
            self._mark_read(polled)
            return
        polled.updates_before = self.learner.updates
        started = time.perf_counter()
        polled.steps = self.learner.start_learn_many(features, labels, batch_size=self.settings.update_batch)
        polled.start_seconds = time.perf_counter() - started
        polled.update = self._lane.submit(_compute, polled.steps)
        self._in_flight = polled

    def _finish_update(self) -> None:
        """Wait for the update in flight, if any, and account for its batch."""
        polled, self._in_flight = self._in_flight, None
        if polled is None or polled.update is None or polled.steps is None:
            return
        compute_seconds = self._update_result(polled.update)
        learner = self.learner
        assert learner is not None  # a rollback waits for the update, then replaces the learner
        started = time.perf_counter()
        result = polled.steps.finish()
        seconds = polled.start_seconds + compute_seconds + time.perf_counter() - started
        topic_name = self.settings.topic
        records, partitions = polled.records, polled.partitions
        features, labels, index = polled.features, polled.labels, polled.index
        self._mark_read(polled)
        self._seconds_per_record = seconds / int(index.shape[0])
        self.metrics.update_latency.observe(self._seconds_per_record)
        self.metrics.model_updates.inc(learner.updates - polled.updates_before)
        losses, predictions = result.losses, result.predictions
        for partition in polled.last_offsets.keys() - self._first_read.keys():
            # A partition's first batch: where a rollback with no checkpoint (and no commit) reads again.
            first = records[0 if partitions is None else partitions.index(partition)]
            self._first_read[partition] = first.offset() or 0
        self.metrics.learning_rate.set(learner.lr)  # once a batch: ~0.3 us
        if result.skipped_nonfinite or result.skipped_spike:
            # Records a training guard refused are not trained on. If they fail on the model a rollback
            # goes back to, they go to the dead-letter topic; if not, the model diverged: it rolls back.
            self.metrics.updates_skipped.labels("non_finite").inc(result.skipped_nonfinite)
            self.metrics.updates_skipped.labels("spike").inc(result.skipped_spike)
            rewinds = self._rewinds
            self._route_skipped(polled, result)
            if self._rewinds != rewinds:
                return  # rolled back meanwhile: this batch is read and trained again
            learned = np.ones(index.shape[0], dtype=np.bool_)
            learned[result.skipped] = False
            features, labels, index = features[learned], labels[learned], index[learned]
            losses, predictions = losses[learned], predictions[learned]
        trained = int(index.shape[0])
        self.records_trained += trained
        measured = np.isfinite(losses)  # a non-finite loss is no measurement of the model
        if measured.all():
            sums = self.prequential.update(losses, predictions, labels.astype(np.float64))
        else:
            sums = self.prequential.update(
                losses[measured], predictions[measured], labels[measured].astype(np.float64)
            )
        self.metrics.count_progressive(sums)
        if partitions is None:
            ((only, _),) = polled.last_offsets.items()
            trained_partitions = None
            trained_counts = {only: trained} if trained else {}
        else:
            trained_partitions = np.asarray(partitions, dtype=np.int32)[index]
            kinds, numbers = np.unique(trained_partitions, return_counts=True)
            trained_counts = dict(zip(kinds.tolist(), numbers.tolist(), strict=True))
        for partition, count in trained_counts.items():
            self.metrics.records_trained.labels(topic_name, str(partition)).inc(count)
            key = (topic_name, partition)
            self.applied[key] = self.applied.get(key, 0) + count
        self.metrics.last_trained_timestamp.set(time.time())
        if self.compactor is not None and trained:
            if trained_partitions is None:
                trained_partitions = np.full(trained, only, dtype=np.int32)
            kept = [records[i] for i in index.tolist()]
            self.compactor.keep(
                features,
                labels,
                trained_partitions,
                np.array([message.offset() for message in kept], dtype=np.int64),
                # Keys are only needed to deduplicate (hashing them costs ~1 us per record).
                [key_bytes(message) for message in kept] if self.settings.compaction_dedupe else None,
                timestamps_of(kept),
                losses,
            )
        if self.drift is not None and trained:
            # After keep(): a drift compaction falls on the grid point that ends this batch.
            self._detect_drift(losses if measured.all() else losses[measured])
        if result.rollback_needed:
            self._guard_rollback()

    def _update_result(self, update: Future[float]) -> float:
        return update.result()

    def _discard_update(self) -> None:
        """Wait for the update in flight and forget its batch: the model goes back to a checkpoint next."""
        polled, self._in_flight = self._in_flight, None
        if polled is not None and polled.update is not None and (error := polled.update.exception()):
            logger.warning("the update of a discarded batch failed: %s", error)
        if polled is not None and polled.steps is not None:
            polled.steps.abandon()

    def _mark_read(self, polled: _Polled) -> None:
        """The batch's records are trained on or routed: its offsets may go into the next checkpoint."""
        topic_name = self.settings.topic
        for partition, offset in polled.last_offsets.items():
            if (topic_name, partition) in self._assigned:
                self.offsets.done(topic_name, partition, offset)
        # Offsets moved (even for invalid records): the next checkpoint has something to record.
        self._dirty = True
        self._since_checkpoint += len(polled.records)

    def _guard_rollback(self) -> None:
        """Too many updates in a row were refused: the model is likely broken; go back to the checkpoint."""
        learner, consumer = self.learner, self._consumer
        skips = self.settings.max_consecutive_skips
        if learner is None or consumer is None:
            return
        if self._guard_rolled_back:
            # The same records would be read and refused again: one rollback per checkpoint.
            logger.warning(
                "%d updates in a row skipped again since the last rollback: continuing from here", skips
            )
            learner.reset_guards()
            return
        logger.warning(
            "%d updates in a row were skipped by the training guards: rolling back to the last checkpoint",
            skips,
        )
        self._guard_rolled_back = True
        self._rollback_to_restored(consumer)

    def _back_off(
        self,
        consumer: Consumer,
        learner: OnlineLearner,
        checkpoint: Checkpoint | None,
        polled: _Polled,
        culprit: str,
    ) -> None:
        """The model diverged on ``polled`` (``culprit``: the first record it failed): back off or stop."""
        settings = self.settings
        topic = settings.topic
        positions = checkpoint.metadata.get("positions", {}) if checkpoint is not None else {}
        assert isinstance(positions, dict)
        if self._diverged_at and all(
            int(positions.get(f"{topic}:{partition}", 0)) > offset
            for partition, offset in self._diverged_at.items()
        ):
            self._lr_backoffs = 0  # the model got durably past where it diverged last: that was progress
        self._diverged_at = dict(polled.last_offsets)
        target = f"checkpoint {checkpoint.version}" if checkpoint is not None else "the initial model"
        if checkpoint is None and settings.init_from is not None:
            target = f"the --init-from model ({settings.init_from})"
        lr, n_features = learner.lr, learner.n_features
        give_up = self._lr_backoffs >= settings.max_lr_backoffs
        scale = learner.lr_scale * (1.0 if give_up else settings.lr_backoff)
        self._rollback_to_restored(consumer)
        if give_up:
            tried = (
                f"after {self._lr_backoffs} learning-rate backoff(s) from --lr {settings.lr:g} to {lr:g} "
                "that never got past it"
                if self._lr_backoffs
                else "and --max-lr-backoffs is 0"
            )
            raise DivergenceError(
                f"the model kept diverging: {culprit} failed on it but not on {target}, {tried}; "
                "lower --lr (or raise --max-lr-backoffs)"
            )
        self._lr_backoffs += 1
        if self.learner is None:  # no checkpoint: the initial model, as the next batch would make it
            self.learner = self._create_learner(n_features)
        self.learner.set_lr_scale(scale)
        self.metrics.learning_rate.set(self.learner.lr)
        logger.warning(
            "the model diverged: %s failed on it but not on %s; rolled back there and lowered the "
            "learning rate from %g to %g (backoff %d of at most %d in a row)",
            culprit,
            target,
            lr,
            self.learner.lr,
            self._lr_backoffs,
            settings.max_lr_backoffs,
        )

    def _rollback_to_restored(self, consumer: Consumer) -> None:
        """``_rollback``, also when there is no checkpoint yet: back to where ``run()`` started.

        That is the --init-from model if one was given (else a new model), and a partition with no
        commit either is read again from where it was first read (not from wherever the fetch is).
        """
        self._rollback(consumer)
        if self.learner is None and self.settings.init_from is not None:
            self._initialise_from(self.settings.init_from)

    def _take_held(self, budget: int) -> list[Message]:
        if not self._held:
            return []
        taken, self._held = self._held[:budget], self._held[budget:]
        return taken

    # -- compaction ---------------------------------------------------------------

    def _new_drift_detector(self) -> LossDriftDetector | None:
        s = self.settings
        if s.drift_detector == "none":
            return None
        return loss_drift_detector(
            delta=s.drift_delta, threshold=s.drift_threshold, min_instances=s.drift_min_instances
        )

    def _detect_drift(self, losses: npt.NDArray[np.float64]) -> None:
        """Feed a trained batch's prequential losses to the drift detector (it restarts after a
        detection). Batched numpy, ~30-40 us a call plus 25-50 ns a record (training/drift.py):
        1,000,000 records through the embedded broker at the defaults (logistic, d=16, 2 cores),
        median of 3: 124k records/s with the detector and a 2,000-record drift grid against 125k
        without; the default 1,000-record grid (more, shorter polls) 122k; a 250-record grid 98k."""
        assert self.drift is not None
        detections = self.drift.update(losses)
        if not detections:
            return
        self.metrics.drift_detections.inc(len(detections))
        first = detections[0]
        since_change = self.drift.seen - first.change_at - 1  # records after the change point
        logger.info(
            "drift detected on the prequential loss (Page-Hinkley, detection %d): the loss rose over the "
            "last %d record(s)%s",
            self.drift.detections,
            since_change,
            "; compacting them" if self.compactor is not None else "",
        )
        if self.compactor is not None:
            self.compactor.drift(since_change)

    def _compact_on_request(self) -> str:
        """``POST /compact`` on the metrics server (runs in its thread: only flags the request)."""
        if self.compactor is None:
            return "compaction is off"
        self.compactor.request(HTTP)
        return "compaction requested"

    def _compact(self, reason: str) -> None:
        """Batch epochs over the consumed log, while staying a live member of the group.

        A compaction that runs longer than a moment pauses the assigned
        partitions and polls the consumer between chunks of mini-batches, so
        heartbeats, rebalance callbacks and max.poll.interval.ms are all served
        however long the epochs take. (Short ones — the common case with the
        compiled loop — touch the consumer not at all: pausing drops librdkafka's
        prefetched records, which would then be fetched again.) A record that a
        poll still returns is held and trained after the compaction, in order;
        nothing is skipped and nothing applied twice.
        """
        self._finish_update()
        compactor, consumer, learner = self.compactor, self._consumer, self.learner
        if compactor is None or consumer is None or learner is None:
            if compactor is not None:
                compactor.trigger.reset()
            return
        self._abort_compaction = False
        self._served_group_at = time.monotonic()
        try:
            result = compactor.run(
                learner,
                reason,
                loss_before=self.prequential.window_loss,
                between_batches=self._serve_group,
                should_stop=lambda: not self._running or self._abort_compaction,
            )
        finally:
            self._resume_paused()
        if result is None or self._abort_compaction:
            return
        # The model changed: the next checkpoint (on its usual cadence) holds it and records the
        # compactions since the one before, with the offset ranges they covered.
        self._dirty = True

    def _resume_paused(self) -> None:
        consumer = self._consumer
        still_ours = [tp for tp in self._paused if (tp.topic, tp.partition) in self._assigned]
        if still_ours and consumer is not None:
            consumer.resume(still_ours)
        self._paused = []

    def _serve_group(self) -> None:
        """Poll during long compaction epochs: heartbeats, rebalances and the poll interval stay served."""
        now = self._heartbeat = time.monotonic()
        consumer = self._consumer
        if now - self._served_group_at < _SERVE_GROUP_INTERVAL_S or consumer is None or self._in_rebalance:
            return  # (a rebalance callback runs inside a poll already: no poll within it)
        if not self._paused:
            self._paused = [TopicPartition(topic, partition) for topic, partition in sorted(self._assigned)]
            if self._paused:
                consumer.pause(self._paused)
        message = consumer.poll(0)
        if message is not None:
            self._held.append(message)
        self._served_group_at = time.monotonic()

    def _initialise_from(self, directory: Path) -> None:
        """Adopt the model of another run's newest checkpoint (a replay's, say), but not its offsets."""
        if not directory.is_dir():
            raise CheckpointError(f"--init-from {directory}: no such directory")
        # Read only: no lock taken, so the source may belong to a running worker or replay.
        checkpoint = CheckpointStore(directory).load_latest()
        if checkpoint is None:
            raise CheckpointError(f"--init-from {directory}: no valid checkpoint there")
        n_features = checkpoint.metadata.get("n_features")
        if not isinstance(n_features, int):
            raise CheckpointError(f"--init-from {directory}: checkpoint {checkpoint.version} holds no model")
        learner = self._create_learner(n_features)
        where = f"--init-from {directory}: checkpoint {checkpoint.version}"
        try:
            learner.load_initial_state(checkpoint.tensors, checkpoint.metadata, where)
        except TrainingError as error:
            raise CheckpointError(f"--init-from {directory}: {error}") from None
        self.learner = learner
        names = checkpoint.metadata.get("feature_names")
        self.decoder = self._new_decoder(n_features, names if isinstance(names, list) else None)
        logger.info(
            "initialised the model from %s checkpoint %d (%s records applied there)",
            directory,
            checkpoint.version,
            checkpoint.metadata.get("records_applied", "?"),
        )

    def _new_decoder(self, n_features: int | None, feature_names: list[str] | None) -> BatchDecoder:
        return BatchDecoder(
            n_features=n_features,
            feature_names=feature_names,
            max_value_bytes=self.settings.max_value_bytes,
        )

    def _create_learner(self, n_features: int) -> OnlineLearner:
        s = self.settings
        config = learner_config(s)
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

    def _route_skipped(self, polled: _Polled, result: StepResult) -> None:
        """Dead-letter the records a training guard refused if they are to blame, else roll back.

        Each refused record is tried on the model a rollback goes back to (the
        last checkpoint's; with none yet, the initial model). If every one fails
        there too (non-finite loss or gradient, or still a spike), they are bad
        records: they go to the dead-letter topic. If any passes, the model
        diverged: nothing is dead-lettered, the worker rolls back, multiplies the
        learning rate by ``lr_backoff`` and reads the records again. After
        ``max_lr_backoffs`` backoffs in a row whose rollback target never got past
        the previous divergence, it rolls back one last time and raises
        :class:`DivergenceError` (nothing past the checkpoint is committed).
        """
        records, index = polled.records, polled.index
        learner, consumer, steps = self.learner, self._consumer, polled.steps
        if learner is not None and consumer is not None and steps is not None:
            version = self.store.latest_version()
            if self._reference is None or self._reference[0] != version:
                checkpoint = restored = self._latest_checkpoint()
                if restored is None and self.settings.init_from is not None:
                    restored = CheckpointStore(self.settings.init_from).load_latest()  # read only
                model = learner.reference_model(restored.tensors if restored is not None else None)
                self._reference = (version, checkpoint, model)
            _, checkpoint, reference = self._reference
            fails = learner.failing_on(reference, steps, result.skips)
            if not fails.all():
                first = int(np.argmin(fails))  # the first record the model is to blame for
                message = records[int(index[result.skipped[first]])]
                culprit = f"{self.settings.topic}[{message.partition()}]@{message.offset()}"
                culprit += f" ({result.skipped_reasons[first].replace('_', ' ')})"
                self._back_off(consumer, learner, checkpoint, polled, culprit)
                return
        rows = index[result.skipped].tolist()
        losses = result.losses[result.skipped].tolist()
        thresholds = result.skipped_thresholds.tolist()
        refused: list[tuple[int, Rejection]] = [
            (row, TrainingGuardSkip.of(reason, loss, threshold))
            for row, reason, loss, threshold in zip(
                rows, result.skipped_reasons, losses, thresholds, strict=True
            )
        ]
        if refused:
            self._route_invalid(records, refused)

    def _route_invalid(self, records: list[Message], errors: Sequence[tuple[int, Rejection]]) -> bool:
        """Every record that cannot be trained on goes to the dead-letter topic, confirmed (True).

        The error budget counts them first: a batch that spends it sends only its records up to
        the one that did (the rest are read again after a restart), and the worker stops. A record
        this group dead-lettered past the last checkpoint, read again after a rollback or a restart,
        counts in the budget's window again, but is neither sent nor counted as invalid again.
        """
        # ``records`` is the batch consumed last (a batch's update finishes before the next starts):
        # its records are the last len(records) the budget counted.
        first = self.error_budget.consumed - len(records)
        verdict = self.error_budget.invalid(sorted(first + position for position, _ in errors))
        if verdict is not None:
            errors = [(position, error) for position, error in errors if first + position <= verdict.index]
        judged = errors  # the verdict names its record among these
        sent = self._in_dead_letter_topic
        if sent:
            errors = [(p, e) for p, e in errors if (records[p].partition(), records[p].offset()) not in sent]
        dead_letters = self.dead_letters
        if dead_letters is not None:
            failures = [(records[position], error) for position, error in errors]
            # Until they are confirmed no checkpoint may pass these records (a rebalance callback
            # may try one while the group is served during the write).
            self._dead_letters_unconfirmed = True
            confirmed = dead_letters.send(
                failures, serve=self._serve_group, should_stop=lambda: not self._running
            )
            self._resume_paused()
            if not confirmed:
                # Stopping while the dead-letter topic is unwritable: the flag stays, so these records
                # are read (and dead-lettered) again after the restart.
                return False
            self._dead_letters_unconfirmed = False
            sent.update((m.partition() or 0, m.offset() or 0) for m, _ in failures)
            if failures:
                self._dlq_ends_stale = True
        if errors:
            self._count_invalid(errors)
        if verdict is not None:
            position, error = next((p, e) for p, e in judged if first + p == verdict.index)
            self._spend_error_budget(verdict, records[position], error)
        return True

    def _spend_error_budget(self, verdict: Verdict, message: Message | None, error: Rejection | None) -> None:
        """The error budget is spent: stop, committing nothing past the last checkpoint."""
        settings = self.settings
        latest = ""
        if message is not None and error is not None:
            latest = f"; latest {message.topic()}[{message.partition()}]@{message.offset()}: {error}"
        if settings.errors_tolerance == "none":
            text = f"a record could not be trained on (--errors-tolerance none){latest}"
        else:
            text = (
                f"error budget spent: {verdict.invalid} of the last {verdict.records} records could not be "
                f"trained on ({verdict.share:.1%} > --error-budget {verdict.limit:.1%}){latest}"
            )
        self._failure = ErrorBudgetExceeded(
            f"{text}. Stopped at checkpoint {self.model_version} (nothing later committed; the dead-lettered "
            f"records are in {dead_letter_topic(settings.topic, settings.dlq_topic)}): fix the cause, or "
            "raise --error-budget, or --errors-tolerance all"
        )
        self.metrics.error_budget_ratio.set(verdict.share)
        self.metrics.error_budget_exhausted.set(1)
        logger.error("%s", self._failure)
        self._running = False

    def _stop_if_all_invalid(self) -> None:
        """A bounded run (--stop-at-end, --max-records) that trained nothing and dead-lettered
        everything is no success.

        (With fewer records than the budget judges: past them, the budget has stopped it already.)
        """
        consumed = self.error_budget.consumed
        if self.settings.errors_tolerance == "all" or self.records_trained or not self.records_invalid:
            return
        invalid = min(self.records_invalid, consumed)
        if invalid and invalid > self.error_budget.limit * consumed:
            self._spend_error_budget(
                Verdict(invalid, consumed, self.error_budget.limit, consumed - 1), None, None
            )

    def _linger_for_scrapes(self) -> None:
        """Keep /metrics up a while after an error stop, so Prometheus sees why (not only that) it stopped."""
        linger = self.settings.metrics_linger_s
        if linger <= 0 or self.settings.metrics_port < 0:
            return
        logger.info("serving /metrics %gs more before exiting (--metrics-linger-s)", linger)
        self._stop_requested.clear()
        deadline = time.monotonic() + linger
        # A second SIGTERM/SIGINT ends the wait (the handlers only set the flag).
        while time.monotonic() < deadline and not self._stop_requested.wait(0.2):
            pass

    def _count_invalid(self, errors: Sequence[tuple[int, Rejection]]) -> None:
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

    def _restore(self, checkpoint: Checkpoint | None) -> None:
        """Adopt a checkpoint's model and positions (None: start from nothing)."""
        self.offsets = OffsetTracker()
        self.applied = {}
        if checkpoint is None:
            self.learner = None
            self.decoder = self._new_decoder(self.settings.n_features, self.settings.feature_names)
            self.error_budget.restore(None)
            self.prequential.reset()
            self.drift = self._new_drift_detector()
            if self.compactor is not None:
                self.compactor.restore(None)
            return
        metadata = checkpoint.metadata
        n_features = metadata.get("n_features")
        if isinstance(n_features, int):
            self.learner = self._create_learner(n_features)
            self.learner.load_state(checkpoint.tensors, metadata)
            names = metadata.get("feature_names")
            self.decoder = self._new_decoder(n_features, names if isinstance(names, list) else None)
        for key, offset in dict(metadata.get("positions", {})).items():
            topic, _, partition = str(key).rpartition(":")
            self.offsets.done(topic, int(partition), int(offset) - 1)
        self.offsets.mark_committed([])
        for key, count in dict(metadata.get("applied", {})).items():
            topic, _, partition = str(key).rpartition(":")
            self.applied[(topic, int(partition))] = int(count)
        if self.compactor is not None:
            self.compactor.restore(metadata.get("compaction"))
        self.error_budget.restore(metadata.get("error_budget"))
        self._restore_progressive(checkpoint)
        self.drift = self._new_drift_detector()
        if self.drift is not None:
            self.drift.load_state_dict(metadata.get("drift"))
        self.model_version = checkpoint.version
        self.metrics.model_version.set(checkpoint.version)
        created = metadata.get("created_at")
        if isinstance(created, str):
            with contextlib.suppress(ValueError):
                self.metrics.last_checkpoint_timestamp.set(datetime.fromisoformat(created).timestamp())
        logger.info(
            "resumed from checkpoint %d (%d records applied; positions %s)",
            checkpoint.version,
            sum(self.applied.values()),
            metadata.get("positions"),
        )

    def _restore_progressive(self, checkpoint: Checkpoint) -> None:
        """The progressive metrics as at ``checkpoint``: the records read again are measured again.

        A checkpoint without them (written before they were saved) or of another task starts them
        afresh, with a warning.
        """
        scalars = checkpoint.metadata.get("progressive")
        arrays = {
            name.removeprefix(_PROGRESSIVE_PREFIX): tensor.numpy()
            for name, tensor in checkpoint.tensors.items()
            if name.startswith(_PROGRESSIVE_PREFIX)
        }
        if not isinstance(scalars, dict):
            logger.warning(
                "checkpoint %d holds no progressive metrics: they start again from this record",
                checkpoint.version,
            )
            self.prequential.reset()
            return
        try:
            self.prequential.load_state_dict(arrays, scalars)
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("checkpoint %d: progressive metrics not restored (%s)", checkpoint.version, error)
            self.prequential.reset()

    def _checkpoint_and_commit(self) -> None:
        """Make everything applied so far durable, then tell Kafka (never the other way round)."""
        self._finish_update()  # the model and the offsets agree only between updates
        if not self._dirty or self._failure is not None:
            return
        if self._dead_letters_unconfirmed:
            logger.warning(
                "not checkpointing: invalid records are not yet confirmed in the dead-letter topic"
            )
            return
        started = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict[str, object] = {}
        if self.learner is not None:
            tensors, metadata = self.learner.state()
            metadata["feature_names"] = (
                list(self.decoder.feature_names) if self.decoder.feature_names is not None else None
            )
        metadata.update(
            positions={f"{t}:{p}": o for (t, p), o in self.offsets.positions().items()},
            applied={f"{t}:{p}": n for (t, p), n in self.applied.items()},
            records_applied=sum(self.applied.values()),
            config_digest=self.settings.digest(),
            topic=self.settings.topic,
            group=self.settings.group,
            error_budget=self.error_budget.state(),
        )
        if self.drift is not None:
            metadata["drift"] = self.drift.state_dict()
        if self._dlq_ends_stale:
            self._note_dead_letter_ends()
        if self._dlq_ends is not None:
            metadata["dlq_end_offsets"] = {str(p): o for p, o in self._dlq_ends.items()}
        compaction = self.compactor.checkpoint_metadata(self.settings.topic) if self.compactor else None
        if compaction is not None:
            metadata["compaction"] = compaction
        # The progressive metrics (whole run and window) go with the model they measured.
        arrays, metadata["progressive"] = self.prequential.state_dict()
        tensors.update(
            {
                f"{_PROGRESSIVE_PREFIX}{name}": torch.from_numpy(np.ascontiguousarray(a))
                for name, a in arrays.items()
            }
        )
        try:
            checkpoint = self.store.save(tensors, metadata)
        except (CheckpointError, OSError) as error:
            # Not fatal: offsets stay uncommitted, so nothing is lost; the next attempt may succeed.
            self.metrics.checkpoint_failures.inc()
            logger.error("checkpoint failed, offsets not committed: %s", error)
            return
        self.model_version = checkpoint.version
        self._guard_rolled_back = False
        if self._in_dead_letter_topic:
            # A rollback goes back no further than this checkpoint: forget what it cannot read again.
            topic, positions = self.settings.topic, self.offsets.positions()
            self._in_dead_letter_topic = {
                (partition, offset)
                for partition, offset in self._in_dead_letter_topic
                if offset >= positions.get((topic, partition), 0)
            }
        if self.compactor is not None:
            self.compactor.checkpointed()
        self._dirty = False
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._commit()
        self.metrics.checkpoints.inc()
        self.metrics.model_version.set(checkpoint.version)
        self.metrics.last_checkpoint_timestamp.set(time.time())
        self.metrics.checkpoint_duration.observe(time.perf_counter() - started)

    def _commit(self) -> None:
        """Commit the checkpointed positions of the partitions this worker owns."""
        consumer = self._consumer
        if consumer is None:
            return
        pending = self.offsets.pending(sorted(self._assigned))
        if not pending:
            return
        try:
            consumer.commit(offsets=pending, asynchronous=False)
        except KafkaException as error:
            # Not fatal: the checkpoint is the source of truth; Kafka's offsets catch up next time.
            logger.warning("offset commit failed: %s", error)
            return
        self.offsets.mark_committed(pending)
        self.metrics.offsets_committed.inc()

    def _refresh_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        for topic, partition in list(self._assigned):
            try:
                # The watermark of the last fetch response: no broker round trip on the hot loop's
                # thread (an uncached query blocks it for hundreds of ms on some brokers).
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            if high < 0:
                continue  # nothing fetched from it yet
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
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in consumer.committed(partitions, timeout=self.settings.startup_timeout_s)
            if tp.offset >= 0
        }
        starts = []
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._end_offsets.pop(key, None)  # --stop-at-end: learnt again from the next fetch
            known = [o for o in (self.offsets.next_offset(*key), committed.get(key)) if o is not None]
            # The later of the two: records before the checkpoint's position are in our model;
            # records before the committed offset are durably in some member's model.
            if known:
                tp.offset = max(known)
                self.offsets.done(tp.topic, tp.partition, tp.offset - 1)
            else:
                # Neither: the reset policy decides. Named here rather than left to librdkafka
                # (OFFSET_INVALID), which would look the committed offset up again and then the
                # reset offset: ~0.1 s more before the first fetch (measured on the embedded broker).
                tp.offset = OFFSET_BEGINNING if self.settings.auto_offset_reset == "earliest" else OFFSET_END
            starts.append(
                f"{tp.topic}[{tp.partition}]@{tp.offset if known else self.settings.auto_offset_reset}"
            )
        if self.decoder.n_features is None:
            self._settle_schema([(tp.partition, tp.offset) for tp in partitions if tp.offset != OFFSET_END])
        self._assignment_changes += 1
        # Offsets set on these partitions only take effect if we assign them ourselves.
        if self.settings.assignment_strategy == "cooperative-sticky":
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        self._assigned.update(keys)
        for topic, partition in keys:
            self.metrics.records_consumed.labels(topic, str(partition))
            self.metrics.records_trained.labels(topic, str(partition))
        self.metrics.assigned_partitions.set(len(self._assigned))
        if self.compactor is not None:
            # The rows the checkpoint's compaction windows held, read back from the log (refill.py).
            resumed = {tp.partition: tp.offset for tp in partitions if tp.offset >= 0}
            self.compactor.refill(resumed, self.decoder, self.learner)
        logger.info("assigned %s", ", ".join(starts))

    def _settle_schema(self, starts: list[tuple[int, int]]) -> None:
        """No schema yet (no checkpoint, no --n-features): take it from the first record in
        (partition, offset) order of what this worker is about to read (schema_probe).

        Runs inside the assignment callback: a failure is logged, not raised (the first
        batch's (partition, offset) order decides then).
        """
        settings = self.settings
        try:
            probe = Consumer(
                assigning_consumer_config(
                    settings,
                    **{
                        "group.id": f"streamtrainer-schema-{uuid.uuid4().hex[:8]}",  # never joins
                        "enable.auto.commit": False,
                        "enable.partition.eof": True,
                        "auto.offset.reset": settings.auto_offset_reset,
                    },
                )
            )
        except KafkaException as error:
            logger.warning("could not read the input schema from the log: %s", error)
            return
        try:
            settle_schema_from_log(
                probe,
                settings.topic,
                [(partition, offset, None) for partition, offset in starts],
                self.decoder,
                timeout_s=settings.startup_timeout_s,
            )
        except KafkaException as error:
            logger.warning("could not read the input schema from the log: %s", error)
        finally:
            probe.close()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        # Before another member takes them: the update in flight, a checkpoint, then the commit
        # (cooperative: only these are revoked).
        with self._rebalancing():
            self._checkpoint_and_commit()
        self._release(keys)
        logger.info("revoked %s", _describe(keys))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        # Another member may already own them and have applied their records: never commit, and
        # discard what we applied since the last checkpoint by going back to it.
        self._release(keys)
        logger.warning(
            "lost %s without a clean revocation: rolling back to the last checkpoint", _describe(keys)
        )
        with self._rebalancing():
            self._rollback(consumer)

    @contextlib.contextmanager
    def _rebalancing(self) -> Iterator[None]:
        self._in_rebalance = True
        try:
            yield
        finally:
            self._in_rebalance = False

    def _rollback(self, consumer: Consumer) -> None:
        self._discard_update()
        self._rewinds += 1
        checkpoint = self._latest_checkpoint()
        self._restore(checkpoint)
        # Whatever was consumed since that checkpoint is read again: forget the copies kept of it.
        self._held.clear()
        self._dead_letters_unconfirmed = False
        self._abort_compaction = True
        if self.compactor is not None:
            self.compactor.forget()
        self._dirty = False
        self._since_checkpoint = 0
        self.metrics.rollbacks.inc()
        for topic, partition in sorted(self._assigned):
            if self.offsets.next_offset(topic, partition) is None:
                # Not in the checkpoint (or none yet): read again from where this worker first read
                # it, else from the committed offset; never from wherever the fetch has got to.
                start = self._first_read.get(partition)
                if start is None:
                    start = consumer.committed([TopicPartition(topic, partition)], timeout=10)[0].offset
                if start >= 0:
                    self.offsets.done(topic, partition, start - 1)
        if self.compactor is not None:
            positions = {p: o for t, p in self._assigned if (o := self.offsets.next_offset(t, p)) is not None}
            self.compactor.refill(positions, self.decoder, self.learner)
        self._seek_to_positions()

    def _latest_checkpoint(self) -> Checkpoint | None:
        """The checkpoint a rollback goes back to: the newest, but none that --fresh ignored."""
        checkpoint = self.store.load_latest()
        if checkpoint is not None and checkpoint.version <= self._fresh_floor:
            return None
        return checkpoint

    def _seek_to_positions(self) -> None:
        """Read each assigned partition again from the next offset to train."""
        consumer = self._consumer
        if consumer is None:
            return
        for topic, partition in sorted(self._assigned):
            position = self.offsets.next_offset(topic, partition)
            if position is not None:
                consumer.seek(TopicPartition(topic, partition, position))

    def _release(self, keys: list[Partition]) -> None:
        if self.compactor is not None:
            # Another member trains these now; our copies of their records would go stale.
            self.compactor.forget([partition for _, partition in keys])
        released = set(keys)
        self._assignment_changes += 1
        self._held = [m for m in self._held if (m.topic(), m.partition()) not in released]
        for topic, partition in keys:
            self._assigned.discard((topic, partition))
            self._end_offsets.pop((topic, partition), None)
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
        # librdkafka's error names are a fixed set: a bounded label.
        self.metrics.kafka_errors.labels(error.name()).inc()
        text = error.str()
        if (more := self._kafka_errors.admit(text)) is not None:
            logger.warning("kafka: %s%s", text, more)


def _describe(keys: list[Partition]) -> str:
    return ", ".join(f"{topic}[{partition}]" for topic, partition in sorted(keys)) or "nothing"
