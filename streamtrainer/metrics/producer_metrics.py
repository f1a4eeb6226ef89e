"""The producer's metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ProducerMetrics:
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
        self.throughput = Gauge(
            "streamtrainer_producer_throughput_records_per_second",
            "Records acknowledged per second over the last few seconds.",
            registry=registry,
        )
