"""The producer's metrics.

Records per second are ``rate(streamtrainer_producer_records_delivered_total[...])``: the counters
are the whole story, so the producer exports no throughput gauge of its own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ProducerMetrics:
    """The producer's counters, and where in its source it could resume."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records_produced = Counter(
            "streamtrainer_producer_records_delivered",
            "Records the broker acknowledged.",
            ["topic"],
            registry=registry,
        )
        self.records_failed = Counter(
            "streamtrainer_producer_records_failed",
            "Records that could not be delivered.",
            ["topic"],
            registry=registry,
        )
        self.kafka_errors = Counter(
            "streamtrainer_producer_kafka_errors",
            "Client-level Kafka errors (broker down, connection refused, fatal), by librdkafka error name.",
            ["kind"],
            registry=registry,
        )
        self.recreated = Counter(
            "streamtrainer_producer_recreated",
            "Times the idempotent producer failed fatally and was replaced by a new one.",
            registry=registry,
        )
        self.records_resent = Counter(
            "streamtrainer_producer_records_resent",
            "Records re-sent by a recreated producer because the fatal error failed their delivery.",
            ["topic"],
            registry=registry,
        )
        self.acknowledged_without_offset = Counter(
            "streamtrainer_producer_acknowledged_without_offset",
            "Records a broker acknowledged as duplicates of an earlier write without giving their offset.",
            ["topic"],
            registry=registry,
        )
        # Each record acknowledged without an offset is read back and ends in exactly one of these.
        self.records_verified = Counter(
            "streamtrainer_producer_records_verified",
            "Records acknowledged without an offset that reading the topic back found.",
            ["topic"],
            registry=registry,
        )
        self.records_republished = Counter(
            "streamtrainer_producer_records_republished",
            "Records acknowledged without an offset, missing from the topic, and published again.",
            ["topic"],
            registry=registry,
        )
        self.records_unverified = Counter(
            "streamtrainer_producer_records_unverified",
            "Records acknowledged without an offset that could not be read back (counted as failed).",
            ["topic"],
            registry=registry,
        )

        self.source_position = Gauge(
            "streamtrainer_producer_source_position",
            "Source position (line, CSV row after the header, synthetic record) with every record up to it "
            "delivered: what --skip resumes after.",
            ["topic"],
            registry=registry,
        )

    def start(self, topic: str, position: int = 0) -> None:
        """Export the counters of ``topic`` at zero, so a rate sees the very first failure."""
        self.source_position.labels(topic).set(position)
        self.records_produced.labels(topic)
        self.records_failed.labels(topic)
        self.records_resent.labels(topic)
        self.acknowledged_without_offset.labels(topic)
        self.records_verified.labels(topic)
        self.records_republished.labels(topic)
        self.records_unverified.labels(topic)
