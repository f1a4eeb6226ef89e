"""A worker's membership of its consumer group: which partitions it owns and where it reads them.

On assignment a partition starts at the later of its checkpointed and its committed offset (the
worker assigns it itself: an offset set in ``on_assign`` does nothing otherwise). A revoked or lost
partition is released at once; records a poll returned for it are left to its new owner. During
long compaction epochs and dead-letter retries the group stays served (partitions paused, the
consumer polled, what a poll still returns held for later). See docs/semantics.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from streamtrainer.connection import RepeatedErrors, assigning_consumer_config, client_config
from streamtrainer.consumer.compactor import Compactor
from streamtrainer.consumer.model_state import ModelState
from streamtrainer.consumer.offsets import Partition
from streamtrainer.consumer.schema_probe import settle_schema_from_log
from streamtrainer.metrics import WorkerMetrics
from streamtrainer.settings import WorkerSettings

logger = logging.getLogger(__name__)

# During compaction epochs the consumer is polled this often: far inside any max.poll.interval.ms.
SERVE_GROUP_INTERVAL_S = 0.1

# What a polled batch compares to see whether a rollback or a rebalance came meanwhile.
Mark = tuple[int, int]


class Membership:
    """Owns the consumer and what the group gave this worker.

    The assigned partitions, where each starts (assign), their release (revoke, lost), seeking
    back to the trained positions (a rollback), pausing and serving the group while the loop is
    busy elsewhere, the records held meanwhile, the end offsets of --stop-at-end, and the lag.
    It never checkpoints or rolls back itself: the worker does that around its callbacks.
    """

    def __init__(
        self, settings: WorkerSettings, metrics: WorkerMetrics, state: ModelState, compactor: Compactor | None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = state
        self.compactor = compactor
        self.consumer: Consumer | None = None
        self.assigned: set[Partition] = set()
        # --stop-at-end: per assigned partition, (low, high) watermarks when it was assigned.
        self.end_offsets: dict[Partition, tuple[int, int]] = {}
        # Messages a poll returned while a compaction had the partitions paused: trained next.
        self.held: list[Message] = []
        self.paused: list[TopicPartition] = []
        self.served_group_at = 0.0
        self.in_rebalance = False
        # Counters a polled batch compares to see whether a rollback or a rebalance came meanwhile.
        self.rewinds = 0
        self.changes = 0
        # The first offset read per partition: where a rollback with no checkpoint and no commit goes.
        self.first_read: dict[int, int] = {}
        self._kafka_errors = RepeatedErrors()

    # -- the consumer -----------------------------------------------------------

    def create_consumer(self) -> Consumer:
        """The group's consumer: no auto-commit, no automatic offset store (offsets follow checkpoints)."""
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
        self.consumer = Consumer(config)
        return self.consumer

    def close_consumer(self) -> None:
        """Leave the group (idempotent)."""
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None

    def _on_kafka_error(self, error: KafkaError) -> None:
        # librdkafka's error names are a fixed set: a bounded label.
        self.metrics.kafka_errors.labels(error.name()).inc()
        text = error.str()
        if (more := self._kafka_errors.admit(text)) is not None:
            logger.warning("kafka: %s%s", text, more)

    # -- assignment -------------------------------------------------------------

    def assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each assigned partition at the later of its trained and its committed offset."""
        keys = [(tp.topic, tp.partition) for tp in partitions]
        offsets, decoder = self.state.offsets, self.state.decoder
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in consumer.committed(partitions, timeout=self.settings.startup_timeout_s)
            if tp.offset >= 0
        }
        starts = []
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.end_offsets.pop(key, None)  # --stop-at-end: learnt again from the next fetch
            known = [o for o in (offsets.next_offset(*key), committed.get(key)) if o is not None]
            # The later of the two: records before the checkpoint's position are in our model;
            # records before the committed offset are durably in some member's model.
            if known:
                tp.offset = max(known)
                offsets.done(tp.topic, tp.partition, tp.offset - 1)
            else:
                # Neither: the reset policy decides. Named here rather than left to librdkafka
                # (OFFSET_INVALID), which would look the committed offset up again and then the
                # reset offset: ~0.1 s more before the first fetch (measured on the embedded broker).
                tp.offset = OFFSET_BEGINNING if self.settings.auto_offset_reset == "earliest" else OFFSET_END
            starts.append(
                f"{tp.topic}[{tp.partition}]@{tp.offset if known else self.settings.auto_offset_reset}"
            )
        if decoder.n_features is None:
            self._settle_schema([(tp.partition, tp.offset) for tp in partitions if tp.offset != OFFSET_END])
        self.changes += 1
        self.hand_over(consumer, partitions)
        self.assigned.update(keys)
        for topic, partition in keys:
            self.metrics.records_consumed.labels(topic, str(partition))
            self.metrics.records_trained.labels(topic, str(partition))
        self.metrics.assigned_partitions.set(len(self.assigned))
        if self.compactor is not None:
            # The rows the checkpoint's compaction windows held, read back from the log (refill.py).
            resumed = {tp.partition: tp.offset for tp in partitions if tp.offset >= 0}
            self.compactor.refill(resumed, self.state.decoder, self.state.learner)
        logger.info("assigned %s", ", ".join(starts))

    def hand_over(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Give the consumer these partitions at their start offsets."""
        # Offsets set on these partitions only take effect if we assign them ourselves.
        if self.settings.assignment_strategy == "cooperative-sticky":
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def join(
        self,
        consumer: Consumer,
        on_assign: Callable[[Consumer, list[TopicPartition]], None],
        on_revoke: Callable[[Consumer, list[TopicPartition]], None],
        on_lost: Callable[[Consumer, list[TopicPartition]], None],
    ) -> None:
        """Join the group: it assigns partitions (the callbacks run inside later polls)."""
        consumer.subscribe([self.settings.topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
        logger.info("joining group %s on topic %s", self.settings.group, self.settings.topic)

    def committable(self) -> list[Partition]:
        """The partitions whose checkpointed positions this worker commits: those it owns."""
        return sorted(self.assigned)

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
                self.state.decoder,
                timeout_s=settings.startup_timeout_s,
            )
        except KafkaException as error:
            logger.warning("could not read the input schema from the log: %s", error)
        finally:
            probe.close()

    def release(self, keys: list[Partition]) -> None:
        """Revoked or lost: another member trains these now."""
        if self.compactor is not None:
            # Another member trains these now; our copies of their records would go stale.
            self.compactor.forget([partition for _, partition in keys])
        released = set(keys)
        self.changes += 1
        self.held = [m for m in self.held if (m.topic(), m.partition()) not in released]
        for topic, partition in keys:
            self.assigned.discard((topic, partition))
            self.end_offsets.pop((topic, partition), None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(topic, str(partition))
        self.metrics.assigned_partitions.set(len(self.assigned))

    @contextlib.contextmanager
    def rebalancing(self) -> Iterator[None]:
        """Inside a rebalance callback (a poll runs it already: the group is not polled within it)."""
        self.in_rebalance = True
        try:
            yield
        finally:
            self.in_rebalance = False

    # -- positions --------------------------------------------------------------

    def rewind(self, consumer: Consumer) -> None:
        """A rollback restored the model: read every assigned partition again from its positions.

        Held records are dropped (they are read again); a partition the restored positions do not
        name goes back to where this worker first read it, else to its committed offset.
        """
        self.rewinds += 1
        # Whatever was consumed since that checkpoint is read again: forget the copies kept of it.
        self.held.clear()
        offsets = self.state.offsets
        for topic, partition in sorted(self.assigned):
            if offsets.next_offset(topic, partition) is None:
                # Not in the checkpoint (or none yet): read again from where this worker first read
                # it, else from the committed offset; never from wherever the fetch has got to.
                start = self.first_read.get(partition)
                if start is None:
                    start = consumer.committed([TopicPartition(topic, partition)], timeout=10)[0].offset
                if start >= 0:
                    offsets.done(topic, partition, start - 1)
        if self.compactor is not None:
            positions = {p: o for t, p in self.assigned if (o := offsets.next_offset(t, p)) is not None}
            self.compactor.refill(positions, self.state.decoder, self.state.learner)
        self.seek_to_positions()

    def seek_to_positions(self) -> None:
        """Read each assigned partition again from the next offset to train."""
        consumer = self.consumer
        if consumer is None:
            return
        for topic, partition in sorted(self.assigned):
            position = self.state.offsets.next_offset(topic, partition)
            if position is not None:
                consumer.seek(TopicPartition(topic, partition, position))

    def mark(self) -> Mark:
        """Taken before a poll: ``still_ours`` compares it afterwards."""
        return self.rewinds, self.changes

    def still_ours(self, messages: list[Message], mark: Mark) -> list[Message]:
        """What of a polled batch is still to be trained, after what happened since the poll began."""
        rewinds, changes = mark
        if self.rewinds != rewinds:
            # A rollback: the positions went back to the checkpoint and these records are read again
            # from there. Seek there once more: the rollback may have run inside the poll, which can
            # return records fetched after its seek.
            self.seek_to_positions()
            kept = [message for message in messages if message.error() is not None]
        elif self.changes != changes:
            # Records of partitions revoked meanwhile: their new owner reads them from the commit.
            topic, owned = self.settings.topic, self.assigned
            kept = [m for m in messages if m.error() is not None or (topic, m.partition()) in owned]
        else:
            return messages
        if len(kept) < len(messages):
            logger.debug("%d polled record(s) left to be read again", len(messages) - len(kept))
        return kept

    def take_held(self, budget: int) -> list[Message]:
        """Up to ``budget`` records held during a compaction or a dead-letter retry, oldest first."""
        if not self.held:
            return []
        taken, self.held = self.held[:budget], self.held[budget:]
        return taken

    # -- serving the group while busy -------------------------------------------

    def serve_group(self, now: float) -> None:
        """Poll during long compaction epochs: heartbeats, rebalances and the poll interval stay served."""
        consumer = self.consumer
        if now - self.served_group_at < SERVE_GROUP_INTERVAL_S or consumer is None or self.in_rebalance:
            return  # (a rebalance callback runs inside a poll already: no poll within it)
        if not self.paused:
            self.paused = [TopicPartition(topic, partition) for topic, partition in sorted(self.assigned)]
            if self.paused:
                consumer.pause(self.paused)
        message = consumer.poll(0)
        if message is not None:
            self.held.append(message)
        self.served_group_at = time.monotonic()

    def resume_paused(self) -> None:
        """Resume what ``serve_group`` paused, of the partitions still assigned."""
        consumer = self.consumer
        still_ours = [tp for tp in self.paused if (tp.topic, tp.partition) in self.assigned]
        if still_ours and consumer is not None:
            consumer.resume(still_ours)
        self.paused = []

    # -- where the partitions end, and the lag ----------------------------------

    def reached_end(self, idle: bool, busy: bool) -> bool:
        """--stop-at-end: every assigned partition is read up to its end offset when assigned.

        ``idle``: the last poll returned no record (everything handed out is accounted for);
        ``busy``: a polled batch's update is still in flight.
        """
        consumer = self.consumer
        if not self.settings.stop_at_end or consumer is None or not self.assigned or busy or self.held:
            return False
        for key in self.assigned:
            if key not in self.end_offsets:
                # The watermarks of the first fetch response after the assignment: "the end" of the
                # bounded run. (Not a ListOffsets query: the embedded broker answers it wrongly,
                # e.g. 1 for a partition of 1,573 records.)
                try:
                    low, high = consumer.get_watermark_offsets(TopicPartition(*key), cached=True)
                except KafkaException:
                    return False
                if high < 0:
                    return False  # nothing fetched from it yet
                self.end_offsets[key] = (max(low, 0), high)
            low, high = self.end_offsets[key]
            position = self.state.offsets.next_offset(*key)
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

    def refresh_lag(self) -> None:
        """``consumer_lag`` per assigned partition, from the last fetch's watermarks."""
        consumer = self.consumer
        if consumer is None:
            return
        for topic, partition in list(self.assigned):
            try:
                # The watermark of the last fetch response: no broker round trip on the hot loop's
                # thread (an uncached query blocks it for hundreds of ms on some brokers).
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            if high < 0:
                continue  # nothing fetched from it yet
            position = self.state.offsets.next_offset(topic, partition)
            if position is None:
                # Nothing trained from it yet: the fetch position is the best local estimate.
                fetched = consumer.position([TopicPartition(topic, partition)])[0].offset
                if fetched < 0:
                    continue
                position = fetched
            self.metrics.consumer_lag.labels(topic, str(partition)).set(max(0, high - position))


def describe(keys: list[Partition]) -> str:
    """``topic[0], topic[1]`` (or ``nothing``), for the log."""
    return ", ".join(f"{topic}[{partition}]" for topic, partition in sorted(keys)) or "nothing"
