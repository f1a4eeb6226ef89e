"""Which offsets are done, per partition, and which of those Kafka has not been told yet."""

from __future__ import annotations

from confluent_kafka import TopicPartition

Partition = tuple[str, int]


class OffsetTracker:
    """Tracks the next offset to read per partition (Kafka's committed-offset convention).

    A record counts as done once it has been trained on or counted as invalid.
    """

    def __init__(self) -> None:
        self._next: dict[Partition, int] = {}
        self._committed: dict[Partition, int] = {}

    def done(self, topic: str, partition: int, offset: int) -> None:
        """Record ``offset`` as processed: the partition's next offset becomes ``offset + 1``."""
        self._next[(topic, partition)] = offset + 1

    def next_offset(self, topic: str, partition: int) -> int | None:
        return self._next.get((topic, partition))

    def pending(self, partitions: list[Partition] | None = None) -> list[TopicPartition]:
        """Offsets to commit: partitions whose done offset moved since the last commit."""
        keys = self._next.keys() if partitions is None else [p for p in partitions if p in self._next]
        return [
            TopicPartition(topic, partition, self._next[(topic, partition)])
            for topic, partition in keys
            if self._committed.get((topic, partition)) != self._next[(topic, partition)]
        ]

    def mark_committed(self, offsets: list[TopicPartition]) -> None:
        """Record a successful commit (an empty list: nothing is known to be committed)."""
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset

    def forget(self, partitions: list[Partition]) -> None:
        for key in partitions:
            self._next.pop(key, None)
            self._committed.pop(key, None)

    def partitions(self) -> list[Partition]:
        return list(self._next)

    def positions(self) -> dict[Partition, int]:
        """Next offset to read per partition ever seen (kept after a revocation, for checkpoints)."""
        return dict(self._next)
