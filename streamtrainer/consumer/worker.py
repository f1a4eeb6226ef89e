"""The worker daemon: a consumer-group member that learns from every record it reads.

Shape of ``run()`` (after quix-streams' Application.run): resources live in an
ExitStack, the loop is ``while self._running``, SIGTERM/SIGINT only flip that
flag, and the trained offsets are committed once more on the way out. Each line
of the loop is one call to the part that owns one concern:

- membership.py: the consumer, assignment, seeking, pausing, held records, lag;
- durability.py: checkpoint-then-commit and restore;
- batches.py: a polled batch, from its decoding to the end of its update;
- this module: coordination (rollbacks, compaction, stopping) and reporting.

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
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from types import FrameType
from typing import BinaryIO

import orjson
from confluent_kafka import Consumer, Message, TopicPartition
from prometheus_client import CollectorRegistry

from streamtrainer.broker import warn_if_static_membership_on_tansu
from streamtrainer.connection import admin_client, check_reachable, ensure_topic, topic_partitions
from streamtrainer.consumer.batches import Batches, Polled
from streamtrainer.consumer.compactor import HTTP, SIGNAL, Compactor
from streamtrainer.consumer.dead_letter import (
    DEAD_LETTER_REASONS,
    DeadLetterQueue,
    dead_letter_topic,
    default_worker_id,
)
from streamtrainer.consumer.durability import Durability
from streamtrainer.consumer.error_budget import ErrorBudget
from streamtrainer.consumer.membership import Membership, describe
from streamtrainer.consumer.model_state import ModelState, fresh_state
from streamtrainer.consumer.model_versions import VersionPublisher
from streamtrainer.consumer.offsets import OffsetTracker, Partition
from streamtrainer.consumer.outputs import TransactionalOutputs, transactional_id
from streamtrainer.consumer.predictions import PredictionStream
from streamtrainer.consumer.rank_membership import RankMembership
from streamtrainer.consumer.rounds import Rounds, launch_environment
from streamtrainer.consumer.training_lane import TrainingLane
from streamtrainer.exceptions import ConfigurationError, TopicError
from streamtrainer.metrics import MetricsServer, WorkerMetrics
from streamtrainer.records import BatchDecoder
from streamtrainer.settings import NONLINEAR_COMPACTION, WorkerSettings
from streamtrainer.training import (
    LearnerConfig,
    OnlineLearner,
    ProgressiveMetrics,
    ProgressiveReport,
)
from streamtrainer.training.checkpoint import Checkpoint, CheckpointStore
from streamtrainer.training.drift import LossDriftDetector
from streamtrainer.training.exceptions import DivergenceError, TrainingError
from streamtrainer.training.learner import prepare_training
from streamtrainer.training.models import ModelSource, build_module, module_name, n_outputs_for
from streamtrainer.training.threads import set_intra_op_threads

logger = logging.getLogger(__name__)

_PROGRESS_INTERVAL_S = 0.5
_LAG_INTERVAL_S = 5.0
# /healthz fails once the loop has not gone round for this long (Kafka's default max.poll.interval.ms);
# /ready once it has not polled for this long (a poll is every 0.2 s at most when idle).
_LIVENESS_STALL_S = 300.0
_READY_STALL_S = 30.0
_RUN_LOG_INTERVAL_S = 1.0


def settings_for_model(settings: WorkerSettings, model: ModelSource | None) -> WorkerSettings:
    """The settings a worker given ``model`` as an object runs on: ``model`` named after it, and a
    custom model's compaction schedule where the settings leave it (``NONLINEAR_COMPACTION``).

    :class:`ConfigurationError` if ``settings.model`` is set as well, or ``settings.task`` is not.
    """
    if model is None:
        return settings
    if "model" in settings.model_fields_set:
        raise ConfigurationError(
            f"the worker was given a model object and settings.model {settings.model!r}: give one of them"
        )
    if settings.task is None:
        raise ConfigurationError(
            "a model given as an object needs settings.task (regression, binary or multiclass)"
        )
    update: dict[str, object] = {"model": module_name(model)}
    if settings.compaction:
        update.update({k: v for k, v in NONLINEAR_COMPACTION.items() if k not in settings.model_fields_set})
    return settings.model_copy(update=update)


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
        """The snapshot as a JSON-able dict (a run log line): every field, the prequential report's too."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields["prequential"] = self.prequential.as_json()
        return fields


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
    """A consumer-group member that trains one model on every record it reads (``run()``).

    It coordinates three parts, each owning one concern: ``membership`` (the consumer and the
    partitions the group gave it), ``durability`` (checkpoint-then-commit, restore) and
    ``batching`` (a polled batch from decoding to the end of its update: batches.py); rollbacks,
    compaction and stopping, which touch all three, are its own. (Not ``batches``: bench/worker_runs.py's
    TimedWorker counts its batches under that name.)
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        model: ModelSource | None = None,
        registry: CollectorRegistry | None = None,
        on_progress: Callable[[WorkerStatus], None] | None = None,
    ) -> None:
        """A worker on ``settings``; ``run()`` starts it.

        ``model``: train this model rather than ``settings.model``: an ``nn.Module`` instance (each
        learner the worker makes, at the start, after a restore or a rollback, trains a deep copy
        of it: ``worker.learner.model`` is the one being trained) or a factory called as
        ``factory(n_features=..., n_outputs=...)``. ``settings.task`` must then be given, and
        ``settings.model`` left unset (checkpoints and logs name the class or factory, ``module:Name``);
        compaction follows a custom model's schedule unless the settings set it, as ``--model
        package.module:factory`` does. ``registry``: where its Prometheus metrics are registered
        (default: a registry of its own). ``on_progress``: called with a :class:`WorkerStatus`
        about twice a second.
        """
        settings = settings_for_model(settings, model)
        self._model_source = model
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.compactor = Compactor(settings, self.metrics) if settings.compaction else None
        # --distributed: this process is one rank of a torchrun launch (rounds.py); each rank of a
        # host serves /metrics on the port plus its local rank.
        launch = launch_environment() if settings.distributed else None
        port = settings.metrics_port
        if launch is not None and port > 0:
            port += launch[2]
        self.metrics_server = MetricsServer(
            self.registry,
            host=settings.metrics_host,
            port=port,
            # Admin endpoints only when asked for (--admin-endpoints): they have no authentication.
            actions={"/compact": self._compact_on_request}
            if settings.admin_endpoints and self.compactor is not None
            else None,
            liveness=self.liveness,
            readiness=self.readiness,
        )
        self.on_progress = on_progress
        self.prequential = ProgressiveMetrics(
            settings.resolved_task, settings.n_classes, settings.prequential_window
        )
        self.metrics.track_progressive(
            self.prequential.task, self.prequential.window, self.prequential.report
        )
        self.error_budget = ErrorBudget(
            settings.errors_tolerance, settings.error_budget, settings.error_budget_window
        )
        # The learner, schema, drift detector and positions: what a restore replaces.
        self.state: ModelState = fresh_state(settings)
        self.rounds: Rounds | None = None
        if launch is None:
            self.membership = Membership(settings, self.metrics, self.state, self.compactor)
        else:
            rank, world_size, _ = launch
            self.rounds = Rounds(settings, self.metrics, self.state, rank=rank, world_size=world_size)
            self.membership = RankMembership(
                settings, self.metrics, self.state, self.compactor, rank=rank, world_size=world_size
            )
        self.durability = Durability(
            settings,
            self.metrics,
            self.state,
            self.membership,
            prequential=self.prequential,
            error_budget=self.error_budget,
            compactor=self.compactor,
            create_learner=self._create_learner,
        )
        self.batching = Batches(
            settings,
            self.metrics,
            self.state,
            self.membership,
            self.durability,
            prequential=self.prequential,
            error_budget=self.error_budget,
            compactor=self.compactor,
            create_learner=self._create_learner,
            update_result=self._update_result,
            guard_rollback=self._guard_rollback,
            diverged=self._back_off,
            serve_group=self._serve_group,
            running=lambda: self._running,
            stop_loop=self._stop_loop,
        )
        self._running = False
        self._stop_requested = threading.Event()
        self._stop_signal: int | None = None  # the signal that asked to stop
        self._started = 0.0
        self._throughput = _Throughput()
        self._rate = 0.0
        # When the loop next refreshes the lag, reports progress and writes the run log.
        self._next_lag = self._next_progress = self._next_log = 0.0
        # Divergence (refused records that pass on the model a rollback goes back to): the learning-rate
        # backoffs in a row and the last offsets per partition of the batch that diverged last.
        self._lr_backoffs = 0
        self._diverged_at: dict[int, int] = {}
        self._abort_compaction = False
        # When the loop last went round (or, within a compaction or a dead-letter retry, served the
        # group): /healthz and /ready read it from the metrics server's thread.
        self._heartbeat = 0.0
        self._finished = False
        # Export every reason from the start (at zero): a rate over a missing series shows no data.
        for reason in DEAD_LETTER_REASONS:
            self.metrics.records_invalid.labels(settings.topic, reason)
            self.metrics.dead_lettered.labels(settings.topic, reason)

    # -- the parts' state, as the worker has always exposed it -------------------------

    @property
    def learner(self) -> OnlineLearner | None:
        """The model being trained (None until the schema is known)."""
        return self.state.learner

    @property
    def decoder(self) -> BatchDecoder:
        """Decodes polled records to feature rows (its schema is the model's)."""
        return self.state.decoder

    @property
    def drift(self) -> LossDriftDetector | None:
        """The drift detector on the prequential loss (None: --drift-detector none)."""
        return self.state.drift

    @property
    def offsets(self) -> OffsetTracker:
        """The next offset to read per partition, as far as the model has learned."""
        return self.state.offsets

    @property
    def store(self) -> CheckpointStore:
        """The checkpoint directory."""
        return self.durability.store

    @property
    def applied(self) -> dict[Partition, int]:
        """Records applied to the model, per partition, over the model's whole history."""
        return self.durability.applied

    @property
    def model_version(self) -> int:
        """The version of the newest checkpoint of this model (0: none yet)."""
        return self.durability.model_version

    @property
    def dead_letters(self) -> DeadLetterQueue | None:
        """Where records that cannot be trained on go (opened by ``run()``)."""
        return self.durability.dead_letters

    @property
    def records_consumed(self) -> int:
        """Records polled in this run (trained, routed or invalid)."""
        return self.batching.records_consumed

    @records_consumed.setter
    def records_consumed(self, value: int) -> None:
        self.batching.records_consumed = value

    @property
    def records_trained(self) -> int:
        """Records trained on in this run."""
        return self.batching.records_trained

    @property
    def records_invalid(self) -> int:
        """Records that could not be trained on in this run."""
        return self.batching.records_invalid

    @property
    def _in_flight(self) -> Polled | None:
        """The polled batch whose update may still run (bench/worker_runs.py reads it)."""
        return self.batching.in_flight

    # -- lifecycle ------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish (safe from signal handlers and other threads)."""
        self._stop_requested.set()
        self._running = False

    def _stop_loop(self) -> None:
        """The worker stops on its own (the error budget): the loop ends after this step."""
        self._running = False

    def run(self) -> WorkerStatus:
        """Join the group and train on every record read until stopped (or a bound is reached)."""
        settings, batching, membership = self.settings, self.batching, self.membership
        set_intra_op_threads(settings.torch_threads)
        with ExitStack() as stack:
            consumer, run_log = self._start(stack)
            clean = bounded = False
            try:
                while self._running:
                    now = self._heartbeat = time.monotonic()
                    if settings.max_seconds is not None and now - self._started >= settings.max_seconds:
                        break
                    budget = batching.poll_budget()
                    if budget <= 0 and batching.in_flight is None:
                        bounded = True  # --max-records reached
                        break
                    mark = membership.mark()  # a rollback or a rebalance may come during the poll
                    messages: list[Message] = []
                    if budget > 0:
                        # With --overlap the previous batch trains in the background meanwhile.
                        messages = membership.take_held(budget) or self._poll(consumer, budget)
                    # Its bookkeeping, then everything that needs the model and the offsets to agree,
                    # then this batch's update starts (with --overlap: runs while the next is polled).
                    self._finish_update()
                    if batching.failure is not None:
                        break
                    if membership.reached_end(idle=not messages, busy=batching.in_flight is not None):
                        bounded = True
                        break
                    self._compact_if_due()
                    now = time.monotonic()
                    self._checkpoint_if_due(now)
                    self._report(now, run_log)
                    if messages and not (self.rounds is not None and self.rounds.ended):
                        self._start_update(membership.still_ours(messages, mark))
                self._finish_rounds()
                clean = True
            finally:
                self._wind_down(clean=clean, bounded=bounded)
            status = self.status()
            if run_log is not None:
                run_log.write(orjson.dumps(status.as_json()) + b"\n")
            if batching.failure is not None:
                # Out of the group first: its partitions go to another member meanwhile.
                self.membership.close_consumer()
                self._linger_for_scrapes()
                raise batching.failure
        return status

    def _start(self, stack: ExitStack) -> tuple[Consumer, BinaryIO | None]:
        """Everything ``run()`` needs, entered into ``stack``: the model restored, the group joined."""
        settings = self.settings
        # Before connecting: a checkpoint of another topic, group or schema is a usage error.
        rounds = self.rounds
        if rounds is None or rounds.rank == 0:
            stack.enter_context(self.durability.store)  # --distributed: rank 0 alone writes checkpoints
        if rounds is None:
            checkpoint = self.durability.load_at_start()
        else:
            rounds.connect()
            stack.callback(rounds.close)
            checkpoint = rounds.share_checkpoint(self.durability.load_at_start)
        stack.enter_context(self._signals_stop_the_loop())
        try:
            self._restore(checkpoint)
        except TrainingError as error:
            raise ConfigurationError(
                f"{settings.checkpoint_dir}: {error} (use another --checkpoint-dir, or --fresh)"
            ) from None
        if self.learner is None and settings.init_from is not None:
            self.durability.initialise_from(settings.init_from)
        if rounds is not None and self.learner is not None:
            rounds.adopt(self.learner)  # the restored model is where the first round starts from
        self._check_topic()
        if settings.fused and settings.device == "cpu":
            # Once the broker and the topic are known to be there: a worker that stops at once on a
            # usage error must not exit in the middle of torch's imports on another thread (at exit
            # those fail, and their error line followed the one that mattered).
            prepare_training(settings.model, settings.optimizer)  # compiles while the group is joined
        if checkpoint is None and self.learner is None:
            logger.info("no checkpoint in %s: starting a new model", settings.checkpoint_dir)
        dead_letters = self.durability.dead_letters = self._open_dead_letters()
        stack.callback(dead_letters.close)
        self.durability.find_dead_lettered_since(checkpoint)
        if rounds is None or rounds.rank == 0:
            self._open_outputs(stack, checkpoint)
        if self.compactor is not None:
            stack.enter_context(self.compactor)
        self._heartbeat = time.monotonic()
        stack.enter_context(self.metrics_server)
        stack.callback(setattr, self, "_finished", True)
        self.batching.lane = stack.enter_context(TrainingLane(background=settings.overlap))
        consumer = self.membership.create_consumer()
        stack.callback(self.membership.close_consumer)
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
        self.membership.join(consumer, self._on_assign, self._on_revoke, self._on_lost)
        if rounds is not None:
            rounds.begin(self.records_trained, self.records_consumed)
        # Torch, numba and the client make a few hundred thousand long-lived objects: frozen, the
        # garbage collector stops rescanning them on every full pass (~1.5 us per record otherwise).
        gc.freeze()
        self._started = time.monotonic()
        self._running = not self._stop_requested.is_set()
        self._next_progress = self._next_lag = self._next_log = self._started
        self.durability.last_checkpoint = self._started
        return consumer, run_log

    def _wind_down(self, *, clean: bool, bounded: bool) -> None:
        """The loop ended: on a clean end everything trained becomes durable, then committed."""
        self._running = False
        if bounded and self.batching.failure is None:
            self.batching.stop_if_all_invalid()
        if clean and self.batching.failure is None:
            self._checkpoint_and_commit()
        else:
            # Stopped on an error or an exception (a batch may be half accounted for):
            # nothing past the last checkpoint is committed.
            self.batching.discard()

    def _checkpoint_if_due(self, now: float) -> None:
        if self.rounds is not None:
            # --distributed: checkpoints only right after a round (rank 0's model is the group's then).
            if self.rounds.due():
                self._round()
            return
        if self.durability.due(now):
            self._checkpoint_and_commit()

    # -- --distributed: averaging rounds (rounds.py) ----------------------------------

    def _poll(self, consumer: Consumer, budget: int) -> list[Message]:
        """Up to ``budget`` records; --distributed: no more than can be trained before the next round."""
        if self.rounds is None:
            return consumer.consume(budget, timeout=0.2)
        take, timeout = self.rounds.poll_limits(budget, self.batching.seconds_per_record)
        return consumer.consume(take, timeout=timeout) if take > 0 else []

    def _round(self, *, done: bool = False) -> None:
        """An averaging round; then rank 0 checkpoints if one is due (or the group ended: _wind_down)."""
        rounds, membership = self.rounds, self.membership
        assert rounds is not None and isinstance(membership, RankMembership)
        self._finish_update()  # the model and the offsets agree only between updates
        rounds.run(
            membership=membership,
            durability=self.durability,
            trained=self.records_trained,
            read=self.records_consumed,
            done=done,
            stop=self._stop_requested.is_set(),
            create_learner=self._create_learner,
        )
        if rounds.ended:
            self._running = False  # every rank finished, or one was asked to stop
        elif rounds.rank == 0 and self.durability.due(time.monotonic()):
            self.durability.checkpoint_and_commit()

    def _finish_rounds(self) -> None:
        """This rank's loop ended: it keeps coming to the rounds, with no records, until the group ends."""
        rounds = self.rounds
        if rounds is None or rounds.ended or self.batching.failure is not None:
            return
        self._finish_update()
        while not rounds.ended:
            rounds.wait(self._stop_requested.is_set)
            self._heartbeat = time.monotonic()
            self._round(done=True)

    def _report(self, now: float, run_log: BinaryIO | None) -> None:
        """Lag and gauges every few seconds, progress twice a second, the run log once a second."""
        if now >= self._next_lag:
            self._refresh_lag()
            if self.error_budget.enabled:
                self.metrics.error_budget_ratio.set(self.error_budget.share)
            if self.compactor is not None:
                self.compactor.publish_store_size()
            self._next_lag = now + _LAG_INTERVAL_S
        if now >= self._next_progress:
            self._rate = self._throughput.add(now, self.records_trained)
            self.metrics.throughput.set(self._rate)
            if self.on_progress is not None:
                self.on_progress(self.status())
            self._next_progress = now + _PROGRESS_INTERVAL_S
        if run_log is not None and now >= self._next_log:
            run_log.write(orjson.dumps(self.status().as_json()) + b"\n")
            run_log.flush()
            self._next_log = now + _RUN_LOG_INTERVAL_S

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
        assigned = self.membership.assigned
        if not assigned:
            return False, "no partitions assigned"
        quiet = time.monotonic() - self._heartbeat
        if quiet > _READY_STALL_S:
            return False, f"stalled: nothing polled for {quiet:.0f} s"
        if self.dead_letters is not None and self.dead_letters.blocked:
            return False, "blocked on the dead-letter topic"
        return True, f"ready: {len(assigned)} partition(s) assigned"

    def status(self) -> WorkerStatus:
        """A snapshot of the run so far (for live views, run logs and the final summary)."""
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
            assigned=len(self.membership.assigned),
            model_version=self.model_version,
            records_applied=sum(self.applied.values()),
            compactions=compactor.count if compactor is not None else 0,
            compaction_records=last.records if last is not None else 0,
            compaction_epoch_loss=last.epoch_losses[-1] if last is not None and last.epoch_losses else None,
            compaction_loss_before=last.loss_before if last is not None else None,
            compaction_loss_after=compactor.loss_after if compactor is not None else None,
        )

    # -- setup ----------------------------------------------------------------

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

    def _open_outputs(self, stack: ExitStack, checkpoint: Checkpoint | None) -> None:
        """The predictions and models topics (when asked for): their transactional producer, and
        what a restart owes them (predictions readers see already, the newest version if unpublished)."""
        settings = self.settings
        models_topic = settings.resolved_models_topic
        if settings.predictions_topic is None and models_topic is None:
            return
        admin = admin_client(settings)
        timeout = settings.startup_timeout_s
        outputs = TransactionalOutputs(settings, transactional_id(settings.checkpoint_dir, settings.group))
        stack.callback(outputs.close)  # aborts a transaction still open: nothing past the checkpoint
        if settings.predictions_topic is not None:
            # As many partitions as the input: keyed alike, a prediction lands beside its record's key.
            partitions = topic_partitions(admin, settings.topic, timeout) or 1
            ensure_topic(admin, settings.predictions_topic, partitions=partitions, timeout_s=timeout)
            stream = PredictionStream(settings, outputs, settings.predictions_topic)
            stack.callback(stream.close)
            stream.recover(checkpoint)
            self.durability.predictions = stream
            logger.info("predictions go to %s", settings.predictions_topic)
        if models_topic is not None:
            ensure_topic(
                admin, models_topic, partitions=1, timeout_s=timeout, config={"cleanup.policy": "compact"}
            )
            publisher = VersionPublisher(settings, outputs, models_topic)
            publisher.recover(checkpoint, self.prequential.report())
            self.durability.versions = publisher
            logger.info("model versions of %s go to %s", publisher.model, models_topic)

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

    # -- the parts' steps (hooks: bench/worker_runs.py times them) ------------------

    def _create_learner(self, n_features: int) -> OnlineLearner:
        s = self.settings
        config = learner_config(s)
        module = None
        if self._model_source is not None:
            module = build_module(
                self._model_source,
                n_features=n_features,
                n_outputs=n_outputs_for(config.task, config.n_classes),
                seed=config.seed,
            )
        learner = OnlineLearner(config, n_features, module=module)
        if self.rounds is not None:
            self.rounds.adopt(learner)  # before it trains: the first round's start (--average-reduction sum)
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

    def _start_update(self, messages: list[Message]) -> None:
        """Decode a polled batch, route what cannot be trained on, start the update of the rest."""
        self.batching.start(messages)

    def _finish_update(self) -> None:
        """Wait for the update in flight, if any, and account for its batch."""
        self.batching.finish()

    def _update_result(self, update: Future[float]) -> float:
        return update.result()

    def _restore(self, checkpoint: Checkpoint | None) -> None:
        """Adopt a checkpoint's model and positions (None: start from nothing)."""
        self.durability.restore(checkpoint)

    def _checkpoint_and_commit(self) -> None:
        """Make everything applied so far durable, then tell Kafka (never the other way round)."""
        self._finish_update()  # the model and the offsets agree only between updates
        if self.rounds is not None and self.rounds.rank != 0:
            return  # --distributed: rank 0 checkpoints the group's model, after a round
        if self.batching.failure is None:
            self.durability.checkpoint_and_commit()

    def _refresh_lag(self) -> None:
        self.membership.refresh_lag()

    def _serve_group(self) -> None:
        """While the loop is busy elsewhere (compaction epochs, dead-letter retries): the group stays
        served and the heartbeat notes it."""
        now = self._heartbeat = time.monotonic()
        self.membership.serve_group(now)

    # -- rebalances -----------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.membership.assign(consumer, partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        # Before another member takes them: the update in flight, a checkpoint, then the commit
        # (cooperative: only these are revoked).
        with self.membership.rebalancing():
            self._checkpoint_and_commit()
        self.membership.release(keys)
        logger.info("revoked %s", describe(keys))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        # Another member may already own them and have applied their records: never commit, and
        # discard what we applied since the last checkpoint by going back to it.
        self.membership.release(keys)
        logger.warning(
            "lost %s without a clean revocation: rolling back to the last checkpoint", describe(keys)
        )
        with self.membership.rebalancing():
            self._rollback(consumer)

    # -- rollbacks ------------------------------------------------------------------

    def _rollback(self, consumer: Consumer) -> None:
        """Back to the last checkpoint: its model, its positions, and every partition read again."""
        if self.rounds is not None:
            # One rank cannot go back alone (the others' models hold records past the checkpoint):
            # the group restarts (torchrun) and every rank resumes from the last checkpoint.
            raise TrainingError(
                "--distributed: a rollback to the last checkpoint needs the whole group: exiting so that "
                "torchrun restarts the ranks from it"
            )
        self.batching.discard()
        checkpoint = self.durability.latest_checkpoint()
        self._restore(checkpoint)
        self.durability.forget_since_checkpoint()
        if self.durability.predictions is not None:
            # The predictions since the checkpoint are aborted; what readers see of them stays out.
            self.durability.predictions.recover(checkpoint)
        self._abort_compaction = True
        if self.compactor is not None:
            self.compactor.forget()
        self.metrics.rollbacks.inc()
        self.membership.rewind(consumer)

    def _rollback_to_restored(self, consumer: Consumer) -> None:
        """``_rollback``, also when there is no checkpoint yet: back to where ``run()`` started.

        That is the --init-from model if one was given (else a new model), and a partition with no
        commit either is read again from where it was first read (not from wherever the fetch is).
        """
        self._rollback(consumer)
        if self.learner is None and self.settings.init_from is not None:
            self.durability.initialise_from(self.settings.init_from)

    def _guard_rollback(self) -> None:
        """Too many updates in a row were refused: the model is likely broken; go back to the checkpoint."""
        learner, consumer = self.learner, self.membership.consumer
        skips = self.settings.max_consecutive_skips
        if learner is None or consumer is None:
            return
        if self.durability.guard_rolled_back:
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
        self.durability.guard_rolled_back = True
        self._rollback_to_restored(consumer)

    def _back_off(
        self,
        consumer: Consumer,
        learner: OnlineLearner,
        checkpoint: Checkpoint | None,
        last_offsets: dict[int, int],
        culprit: str,
    ) -> None:
        """The model diverged on a batch (``last_offsets``: its last offset per partition; ``culprit``:
        the first record it failed): back off or stop."""
        settings = self.settings
        topic = settings.topic
        positions = checkpoint.metadata.get("positions", {}) if checkpoint is not None else {}
        assert isinstance(positions, dict)
        if self._diverged_at and all(
            int(positions.get(f"{topic}:{partition}", 0)) > offset
            for partition, offset in self._diverged_at.items()
        ):
            self._lr_backoffs = 0  # the model got durably past where it diverged last: that was progress
        self._diverged_at = last_offsets
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
        state = self.state
        if state.learner is None:  # no checkpoint: the initial model, as the next batch would make it
            state.learner = self._create_learner(n_features)
        state.learner.set_lr_scale(scale)
        self.metrics.learning_rate.set(state.learner.lr)
        logger.warning(
            "the model diverged: %s failed on it but not on %s; rolled back there and lowered the "
            "learning rate from %g to %g (backoff %d of at most %d in a row)",
            culprit,
            target,
            lr,
            state.learner.lr,
            self._lr_backoffs,
            settings.max_lr_backoffs,
        )

    # -- compaction ---------------------------------------------------------------

    def _compact_if_due(self) -> None:
        if self.compactor is not None and (reason := self.compactor.due()) is not None:
            self._compact(reason)

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
        compactor, consumer, learner = self.compactor, self.membership.consumer, self.learner
        if compactor is None or consumer is None or learner is None:
            if compactor is not None:
                compactor.trigger.reset()
            return
        self._abort_compaction = False
        self.membership.served_group_at = time.monotonic()
        try:
            result = compactor.run(
                learner,
                reason,
                loss_before=self.prequential.window_loss,
                between_batches=self._serve_group,
                should_stop=lambda: not self._running or self._abort_compaction,
            )
        finally:
            self.membership.resume_paused()
        if result is None or self._abort_compaction:
            return
        # The model changed: the next checkpoint (on its usual cadence) holds it and records the
        # compactions since the one before, with the offset ranges they covered.
        self.durability.dirty = True
