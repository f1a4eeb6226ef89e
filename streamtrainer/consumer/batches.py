"""A polled batch, from its decoding to the end of its update: the worker's hot path.

``start`` decodes a batch, routes what cannot be trained on (invalid records: the dead-letter
topic, counted against the error budget) and starts the update of the rest in the training lane;
``finish`` waits for it and accounts for the batch (offsets, metrics, the compaction log, drift),
routing the records a training guard refused. Offsets move only then: a checkpoint never records a
position its model has not learned.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter as CountOf
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from streamtrainer.consumer.compactor import Compactor
from streamtrainer.consumer.dead_letter import Rejection, TrainingGuardSkip, dead_letter_topic
from streamtrainer.consumer.durability import Durability
from streamtrainer.consumer.error_budget import ErrorBudget, ErrorBudgetExceeded, Verdict
from streamtrainer.consumer.membership import Membership
from streamtrainer.consumer.messages import HeaderCodecs, key_bytes, timestamps_of
from streamtrainer.consumer.model_state import ModelState
from streamtrainer.consumer.training_lane import TrainingLane
from streamtrainer.consumer.validation import trainable_rows
from streamtrainer.exceptions import StreamtrainerError
from streamtrainer.metrics import WorkerMetrics
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import OnlineLearner, PendingSteps, ProgressiveMetrics, StepResult
from streamtrainer.training.checkpoint import Checkpoint, CheckpointStore

logger = logging.getLogger(__name__)

_INVALID_LOG_INTERVAL_S = 5.0
# A poll takes no more records than its update trains in about this long (at the last update's
# speed): big polls amortize per-batch work for the compiled loops, small ones keep a slow model
# (autograd: ~100x slower) responsive to signals, progress and the group. The first poll, with
# no speed known yet (and the loop perhaps still compiling), takes at most _FIRST_POLL records.
_UPDATE_TARGET_S = 0.1
_FIRST_POLL = 1000
_MIN_POLL = 100


@dataclass(slots=True)
class Polled:
    """A polled batch, from its decoding to the end of its update (``Batches.start``, ``Batches.finish``)."""

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


# The model diverged on a batch: (consumer, learner, the checkpoint a rollback goes back to, the
# batch's last offset per partition, the first record it failed) -> back off or stop.
Diverged = Callable[[Consumer, OnlineLearner, Checkpoint | None, dict[int, int], str], None]


class Batches:
    """Owns a polled batch from decoding to the end of its update, and what batches add up to.

    The update in flight (at most one) and the lane it runs in, the poll budget (from the last
    update's speed), the records consumed, trained and invalid, the routing of invalid and refused
    records (dead-letter topic, error budget) and why the worker stopped on its own (``failure``).
    Coordination is the worker's, passed in: ``create_learner`` (the first trainable batch fixes
    the schema), ``guard_rollback`` (too many updates refused in a row), ``diverged`` (refused
    records pass on the model a rollback goes back to), ``serve_group`` (while the dead-letter
    topic is written), ``update_result`` (waits for an update: a subclass may time it),
    ``running`` and ``stop_loop``.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        state: ModelState,
        membership: Membership,
        durability: Durability,
        *,
        prequential: ProgressiveMetrics,
        error_budget: ErrorBudget,
        compactor: Compactor | None,
        create_learner: Callable[[int], OnlineLearner],
        update_result: Callable[[Future[float]], float],
        guard_rollback: Callable[[], None],
        diverged: Diverged,
        serve_group: Callable[[], None],
        running: Callable[[], bool],
        stop_loop: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = state
        self.membership = membership
        self.durability = durability
        self.prequential = prequential
        self.error_budget = error_budget
        self.compactor = compactor
        self._create_learner = create_learner
        self._update_result = update_result
        self._guard_rollback = guard_rollback
        self._diverged = diverged
        self._serve_group = serve_group
        self._running = running
        self._stop_loop = stop_loop
        self.records_consumed = 0
        self.records_trained = 0
        self.records_invalid = 0
        # Why the worker stopped on its own (the error budget): no checkpoint may follow it.
        self.failure: StreamtrainerError | None = None
        # Where updates run (replaced in run() by the configured one) and the polled batch whose
        # update may still be running there.
        self.lane = TrainingLane(background=False)
        self.in_flight: Polled | None = None
        self.seconds_per_record: float | None = None  # of the last update
        self._invalid_logged_at = 0.0
        self._invalid_since_log = 0
        # The model refused records are judged on (latest checkpoint version, that checkpoint, model):
        # rebuilding it costs ~1 ms (mlp), checking the version ~12 us.
        self._reference: tuple[int, Checkpoint | None, torch.nn.Module] | None = None

    def poll_budget(self) -> int:
        """Most records the next poll may take; 0 or less: none (both count the update in flight)."""
        settings = self.settings
        budget = settings.poll_batch
        if self.seconds_per_record is None:
            budget = min(budget, _FIRST_POLL)
        elif self.seconds_per_record > 0:
            budget = min(budget, max(_MIN_POLL, int(_UPDATE_TARGET_S / self.seconds_per_record)))
        in_flight = int(self.in_flight.index.shape[0]) if self.in_flight is not None else 0
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

    # -- start ------------------------------------------------------------------------

    def start(self, messages: list[Message]) -> None:
        """Decode a polled batch, route what cannot be trained on, and start the update of the rest.

        The update runs in the training lane; ``finish`` waits for it and
        accounts for the batch (offsets, metrics, compaction log). Offsets move
        only then: a checkpoint never records a position its model has not learned.
        """
        assert self.in_flight is None, "one update in flight at most"
        topic_name = self.settings.topic
        state, membership = self.state, self.membership
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
                    _on_message_error(error)
        if not records:
            return
        n = len(records)
        values = [message.value() for message in records]
        # Offsets within a partition rise, so its last record has its last offset.
        partitions: list[int] | None = None
        if len(membership.assigned) == 1:
            # One partition assigned: every record is of it (``still_ours`` saw to that), and
            # reading each record's partition and offset (~50 ns a call) can be skipped.
            ((_, partition),) = membership.assigned
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
        if state.decoder.n_features is None and partitions is not None:
            # The first record in (partition, offset) order fixes the schema, not the first decoded.
            schema_order = sorted(range(n), key=lambda i: (partitions[i], offsets[i]))
        batch = state.decoder.decode(values, HeaderCodecs(records), schema_order=schema_order)
        errors = batch.errors
        features, labels, index = batch.features, batch.labels, batch.index
        if len(batch) and state.learner is None:
            state.learner = self._create_learner(features.shape[1])
            gc.freeze()
        if state.learner is not None:
            features, labels, index = trainable_rows(batch, state.learner, errors)
        if errors:
            rewinds, assignment = membership.mark()
            self.route_invalid(records, errors)
            if membership.rewinds != rewinds or self.failure is not None:
                return  # rolled back while the dead-letter topic was written: read again from there
            if membership.changes != assignment and len(index):
                owned = np.array([(topic_name, m.partition()) in membership.assigned for m in records])
                keep = owned[index]
                features, labels, index = features[keep], labels[keep], index[keep]
        elif (verdict := self.error_budget.check()) is not None:
            # Invalid records earlier in the window, and now enough records to judge it by.
            self.spend_error_budget(verdict, None, None)
        if self.failure is not None:
            return
        polled = Polled(records, partitions, last_offsets, features, labels, index)
        learner = state.learner
        if learner is None or not len(index):
            self._mark_read(polled)
            return
        polled.updates_before = learner.updates
        started = time.perf_counter()
        polled.steps = learner.start_learn_many(features, labels, batch_size=self.settings.update_batch)
        polled.start_seconds = time.perf_counter() - started
        polled.update = self.lane.submit(_compute, polled.steps)
        self.in_flight = polled

    # -- finish -----------------------------------------------------------------------

    def finish(self) -> None:
        """Wait for the update in flight, if any, and account for its batch."""
        polled, self.in_flight = self.in_flight, None
        if polled is None or polled.update is None or polled.steps is None:
            return
        compute_seconds = self._update_result(polled.update)
        learner = self.state.learner
        assert learner is not None  # a rollback waits for the update, then replaces the learner
        started = time.perf_counter()
        result = polled.steps.finish()
        seconds = polled.start_seconds + compute_seconds + time.perf_counter() - started
        topic_name = self.settings.topic
        records, partitions = polled.records, polled.partitions
        features, labels, index = polled.features, polled.labels, polled.index
        self._mark_read(polled)
        self.seconds_per_record = seconds / int(index.shape[0])
        self.metrics.update_latency.observe(self.seconds_per_record)
        self.metrics.model_updates.inc(learner.updates - polled.updates_before)
        losses, predictions = result.losses, result.predictions
        first_read = self.membership.first_read
        for partition in polled.last_offsets.keys() - first_read.keys():
            # A partition's first batch: where a rollback with no checkpoint (and no commit) reads again.
            first = records[0 if partitions is None else partitions.index(partition)]
            first_read[partition] = first.offset() or 0
        self.metrics.learning_rate.set(learner.lr)  # once a batch: ~0.3 us
        if result.skipped_nonfinite or result.skipped_spike:
            # Records a training guard refused are not trained on. If they fail on the model a rollback
            # goes back to, they go to the dead-letter topic; if not, the model diverged: it rolls back.
            self.metrics.updates_skipped.labels("non_finite").inc(result.skipped_nonfinite)
            self.metrics.updates_skipped.labels("spike").inc(result.skipped_spike)
            rewinds = self.membership.rewinds
            self._route_skipped(polled, result)
            if self.membership.rewinds != rewinds:
                return  # rolled back meanwhile: this batch is read and trained again
            learned = np.ones(index.shape[0], dtype=np.bool_)
            learned[result.skipped] = False
            features, labels, index = features[learned], labels[learned], index[learned]
            losses, predictions = losses[learned], predictions[learned]
        trained = int(index.shape[0])
        self.records_trained += trained
        stream = self.durability.predictions
        if stream is not None and trained:
            # Pre-update predictions, in the transaction that commits with the next checkpoint.
            stream.write(records, index, predictions, losses, labels, self.durability.next_version)
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
        applied = self.durability.applied
        for partition, count in trained_counts.items():
            self.metrics.records_trained.labels(topic_name, str(partition)).inc(count)
            key = (topic_name, partition)
            applied[key] = applied.get(key, 0) + count
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
        if self.state.drift is not None and trained:
            # After keep(): a drift compaction falls on the grid point that ends this batch.
            self._detect_drift(losses if measured.all() else losses[measured])
        if result.rollback_needed:
            self._guard_rollback()

    def discard(self) -> None:
        """Wait for the update in flight and forget its batch: the model goes back to a checkpoint next."""
        polled, self.in_flight = self.in_flight, None
        if polled is not None and polled.update is not None and (error := polled.update.exception()):
            logger.warning("the update of a discarded batch failed: %s", error)
        if polled is not None and polled.steps is not None:
            polled.steps.abandon()

    def _mark_read(self, polled: Polled) -> None:
        """The batch's records are trained on or routed: its offsets may go into the next checkpoint."""
        topic_name, assigned, offsets = self.settings.topic, self.membership.assigned, self.state.offsets
        for partition, offset in polled.last_offsets.items():
            if (topic_name, partition) in assigned:
                offsets.done(topic_name, partition, offset)
        self.durability.mark_read(len(polled.records))

    def _detect_drift(self, losses: npt.NDArray[np.float64]) -> None:
        """Feed a trained batch's prequential losses to the drift detector (it restarts after a
        detection). Batched numpy, ~30-40 us a call plus 25-50 ns a record (training/drift.py):
        1,000,000 records through the embedded broker at the defaults (logistic, d=16, 2 cores),
        median of 3: 124k records/s with the detector and a 2,000-record drift grid against 125k
        without; the default 1,000-record grid (more, shorter polls) 122k; a 250-record grid 98k."""
        drift = self.state.drift
        assert drift is not None
        detections = drift.update(losses)
        if not detections:
            return
        self.metrics.drift_detections.inc(len(detections))
        first = detections[0]
        since_change = drift.seen - first.change_at - 1  # records after the change point
        logger.info(
            "drift detected on the prequential loss (Page-Hinkley, detection %d): the loss rose over the "
            "last %d record(s)%s",
            drift.detections,
            since_change,
            "; compacting them" if self.compactor is not None else "",
        )
        if self.compactor is not None:
            self.compactor.drift(since_change)

    # -- routing ----------------------------------------------------------------------

    def _route_skipped(self, polled: Polled, result: StepResult) -> None:
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
        learner, consumer, steps = self.state.learner, self.membership.consumer, polled.steps
        if learner is not None and consumer is not None and steps is not None:
            durability = self.durability
            version = durability.store.latest_version()
            if self._reference is None or self._reference[0] != version:
                checkpoint = restored = durability.latest_checkpoint()
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
                self._diverged(consumer, learner, checkpoint, dict(polled.last_offsets), culprit)
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
            self.route_invalid(records, refused)

    def route_invalid(self, records: list[Message], errors: Sequence[tuple[int, Rejection]]) -> bool:
        """Every record that cannot be trained on goes to the dead-letter topic, confirmed (True).

        The error budget counts them first: a batch that spends it sends only its records up to
        the one that did (the rest are read again after a restart), and the worker stops. A record
        this group dead-lettered past the last checkpoint, read again after a rollback or a restart,
        counts in the budget's window again, but is neither sent nor counted as invalid again.
        """
        durability = self.durability
        # ``records`` is the batch consumed last (a batch's update finishes before the next starts):
        # its records are the last len(records) the budget counted.
        first = self.error_budget.consumed - len(records)
        verdict = self.error_budget.invalid(sorted(first + position for position, _ in errors))
        if verdict is not None:
            errors = [(position, error) for position, error in errors if first + position <= verdict.index]
        judged = errors  # the verdict names its record among these
        sent = durability.dead_lettered
        if sent:
            errors = [(p, e) for p, e in errors if (records[p].partition(), records[p].offset()) not in sent]
        dead_letters = durability.dead_letters
        if dead_letters is not None:
            failures = [(records[position], error) for position, error in errors]
            # Until they are confirmed no checkpoint may pass these records (a rebalance callback
            # may try one while the group is served during the write).
            durability.dead_letters_unconfirmed = True
            running = self._running
            confirmed = dead_letters.send(
                failures, serve=self._serve_group, should_stop=lambda: not running()
            )
            self.membership.resume_paused()
            if not confirmed:
                # Stopping while the dead-letter topic is unwritable: the flag stays, so these records
                # are read (and dead-lettered) again after the restart.
                return False
            durability.dead_letters_unconfirmed = False
            sent.update((m.partition() or 0, m.offset() or 0) for m, _ in failures)
            if failures:
                durability.dlq_ends_stale = True
        if errors:
            self._count_invalid(errors)
        if verdict is not None:
            position, error = next((p, e) for p, e in judged if first + p == verdict.index)
            self.spend_error_budget(verdict, records[position], error)
        return True

    def spend_error_budget(self, verdict: Verdict, message: Message | None, error: Rejection | None) -> None:
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
        self.failure = ErrorBudgetExceeded(
            f"{text}. Stopped at checkpoint {self.durability.model_version} (nothing later committed; the "
            f"dead-lettered records are in {dead_letter_topic(settings.topic, settings.dlq_topic)}): fix the "
            "cause, or raise --error-budget, or --errors-tolerance all"
        )
        self.metrics.error_budget_ratio.set(verdict.share)
        self.metrics.error_budget_exhausted.set(1)
        logger.error("%s", self.failure)
        self._stop_loop()

    def stop_if_all_invalid(self) -> None:
        """A bounded run (--stop-at-end, --max-records) that trained nothing and dead-lettered
        everything is no success.

        (With fewer records than the budget judges: past them, the budget has stopped it already.)
        """
        consumed = self.error_budget.consumed
        if self.settings.errors_tolerance == "all" or self.records_trained or not self.records_invalid:
            return
        invalid = min(self.records_invalid, consumed)
        if invalid and invalid > self.error_budget.limit * consumed:
            self.spend_error_budget(
                Verdict(invalid, consumed, self.error_budget.limit, consumed - 1), None, None
            )

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


def _on_message_error(error: KafkaError) -> None:
    if error.code() == KafkaError._PARTITION_EOF:
        return
    if error.fatal():
        raise KafkaException(error)
    logger.warning("consumer error: %s", error.str())
