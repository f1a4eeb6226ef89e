"""Membership by rank (``--distributed``): partition p is read by rank p mod WORLD_SIZE.

No group rebalances: each rank assigns its partitions itself (``consumer.assign``, not
``subscribe``), so a partition changes hands only when torchrun restarts the ranks with another
world size, and never inside an averaging round. Every partition is owned by exactly one rank at
a time (the ranks of one life share a WORLD_SIZE; torchrun stops every rank, on every node, before
the next rendezvous round starts any: tests/consumer/test_distributed_elastic.py checks it from the
ranks' log lines, over 10 ``kill -9`` with 3 ranks and a 2 -> 1 -> 2 resize of one launch). The
partitions are those the topic has when the ranks start; one added later is read after the next
restart.

Offsets still go to the group (so lag dashboards and ``kafka-consumer-groups`` work): rank 0
commits every partition's position, right after the checkpoint that holds it is durable. Why
rank 0 and not each rank its own: the order "checkpoint durable, then commit" is then local to
one process (no extra collective to tell the others the checkpoint is written), and a commit is
one request per round, not one per rank. A consumer that never joins the group may commit for it
(Kafka's "simple consumer" commits, generation -1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import Consumer, TopicPartition

from streamtrainer.consumer.compactor import Compactor
from streamtrainer.consumer.membership import Membership, describe
from streamtrainer.consumer.model_state import ModelState
from streamtrainer.consumer.offsets import Partition
from streamtrainer.exceptions import TopicError
from streamtrainer.metrics import WorkerMetrics
from streamtrainer.settings import WorkerSettings

logger = logging.getLogger(__name__)


def rank_partitions(partitions: int, rank: int, world_size: int) -> list[int]:
    """The partitions rank ``rank`` of ``world_size`` reads: p mod world_size == rank."""
    return [p for p in range(partitions) if p % world_size == rank]


class RankMembership(Membership):
    """A rank's partitions, assigned directly by rank (see the module's docstring)."""

    def __init__(
        self,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        state: ModelState,
        compactor: Compactor | None,
        *,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__(settings, metrics, state, compactor)
        self.rank = rank
        self.world_size = world_size
        self.partitions = 0  # the topic's, when the ranks started

    def join(
        self,
        consumer: Consumer,
        on_assign: Callable[[Consumer, list[TopicPartition]], None],
        on_revoke: Callable[[Consumer, list[TopicPartition]], None],
        on_lost: Callable[[Consumer, list[TopicPartition]], None],
    ) -> None:
        """Assign this rank's partitions (no group join: the callbacks are never called)."""
        settings = self.settings
        metadata = consumer.list_topics(settings.topic, timeout=settings.startup_timeout_s)
        topic = metadata.topics.get(settings.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            why = topic.error if topic is not None else "missing"
            raise TopicError(f"topic {settings.topic!r}: no partitions ({why})")
        self.partitions = len(topic.partitions)
        mine = rank_partitions(self.partitions, self.rank, self.world_size)
        logger.info(
            "rank %d of %d: partitions %s of %d (p mod %d == %d); offsets committed to group %s by rank 0",
            self.rank,
            self.world_size,
            describe([(settings.topic, p) for p in mine]),
            self.partitions,
            self.world_size,
            self.rank,
            settings.group,
        )
        self.assign(consumer, [TopicPartition(settings.topic, p) for p in mine])

    def reached_end(self, idle: bool, busy: bool) -> bool:
        """--stop-at-end: a rank with no partition (more ranks than partitions) is at its end at once."""
        if self.settings.stop_at_end and not self.assigned and self.partitions:
            return True
        return super().reached_end(idle, busy)

    def hand_over(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Direct assignment: the whole set at once, at the start offsets ``assign`` set."""
        consumer.assign(partitions)

    def committable(self) -> list[Partition]:
        """Rank 0 commits every partition (the checkpoint holds all their positions); others none."""
        if self.rank != 0:
            return []
        return [(self.settings.topic, p) for p in range(self.partitions)]
