"""The worker's metrics. Every one takes a registry; labels are bounded (never a record key).

Label cardinality: ``topic`` and ``partition`` are bounded by the topics and
partitions assigned; ``reason`` by :data:`streamtrainer.consumer.dead_letter.DEAD_LETTER_REASONS`
(the decode reasons and the training guards'; for compactions, the fixed set of triggers);
``location`` is memory or disk.

Gauges that hold a measurement (the prequential loss and score, the learning rate, the last
trained and checkpointed times, the last compaction's size and loss) are :class:`LazyGauge`:
absent from ``/metrics`` until the worker first sets them, never a made-up 0 that a rule or a
panel would take for a real one. The score is either accuracy (classification) or MAE
(regression): a worker only ever sets, so only ever exports, the one of its task.
"""

from __future__ import annotations

import math
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Per-record update latency spans microseconds (fused updates) to milliseconds (autograd).
UPDATE_LATENCY_BUCKETS = (
    1e-6,
    2.5e-6,
    5e-6,
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    0.1,
    1.0,
)


class LazyGauge:
    """A gauge without labels that is exported only from its first :meth:`set` on.

    A plain gauge is exported at 0 from its creation: an idle worker would report a prequential
    loss of 0, a last checkpoint in 1970. This one joins its registry when it first has a value.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self._gauge = Gauge(name, documentation, registry=None)
        self._registry = registry
        self._registered = False
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        """Set the value (and, the first time, start exporting it)."""
        self._gauge.set(value)
        if not self._registered:
            with self._lock:
                if not self._registered:
                    self._registry.register(self._gauge)
                    self._registered = True

    @property
    def exported(self) -> bool:
        """Whether it has been set (so is on ``/metrics``)."""
        return self._registered


class WorkerMetrics:
    """Every metric of the worker, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.records_consumed = Counter(
            "streamtrainer_records_consumed",
            "Records taken from Kafka.",
            ["topic", "partition"],
            registry=registry,
        )
        self.records_trained = Counter(
            "streamtrainer_records_trained",
            "Records the model learned from.",
            ["topic", "partition"],
            registry=registry,
        )
        self.records_invalid = Counter(
            "streamtrainer_records_invalid",
            "Records that could not be decoded or trained on, by reason.",
            ["topic", "reason"],
            registry=registry,
        )
        self.model_updates = Counter(
            "streamtrainer_model_updates", "Optimizer steps taken.", registry=registry
        )
        self.prequential_loss = LazyGauge(
            "streamtrainer_prequential_loss",
            "Exponentially weighted loss, measured on each record before learning from it.",
            registry,
        )
        self.prequential_accuracy = LazyGauge(
            "streamtrainer_prequential_accuracy",
            "Exponentially weighted accuracy before learning (classification tasks).",
            registry,
        )
        self.prequential_mae = LazyGauge(
            "streamtrainer_prequential_mae",
            "Exponentially weighted absolute error before learning (regression tasks).",
            registry,
        )
        self.throughput = Gauge(
            "streamtrainer_throughput_records_per_second",
            "Records trained per second over the last few seconds.",
            registry=registry,
        )
        self.update_latency = Histogram(
            "streamtrainer_update_latency_seconds",
            "Time to predict, measure and learn from one record (averaged within a polled batch).",
            buckets=UPDATE_LATENCY_BUCKETS,
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "streamtrainer_consumer_lag_records",
            "High watermark minus the next offset to train, per assigned partition.",
            ["topic", "partition"],
            registry=registry,
        )
        self.offsets_committed = Counter(
            "streamtrainer_offset_commits", "Offset commits to Kafka.", registry=registry
        )
        self.assigned_partitions = Gauge(
            "streamtrainer_assigned_partitions", "Partitions assigned to this worker.", registry=registry
        )
        self.last_trained_timestamp = LazyGauge(
            "streamtrainer_last_trained_timestamp_seconds",
            "Unix time at which the last record was trained.",
            registry,
        )
        self.checkpoints = Counter(
            "streamtrainer_checkpoints", "Checkpoints written durably.", registry=registry
        )
        self.checkpoint_failures = Counter(
            "streamtrainer_checkpoint_failures", "Checkpoints that could not be written.", registry=registry
        )
        self.checkpoint_duration = Histogram(
            "streamtrainer_checkpoint_duration_seconds",
            "Time to write a checkpoint durably and commit its offsets.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=registry,
        )
        self.last_checkpoint_timestamp = LazyGauge(
            "streamtrainer_last_checkpoint_timestamp_seconds",
            "Unix time of the last durable checkpoint.",
            registry,
        )
        self.model_version = Gauge(
            "streamtrainer_model_version", "Version of the last durable checkpoint.", registry=registry
        )
        self.rollbacks = Counter(
            "streamtrainer_rollbacks",
            "Times the model was reset to its last checkpoint (e.g. partitions lost).",
            registry=registry,
        )
        self.learning_rate = LazyGauge(
            "streamtrainer_learning_rate",
            "Learning rate of the online steps (lowered after each divergence).",
            registry,
        )
        self.updates_skipped = Counter(
            "streamtrainer_updates_skipped",
            "Records whose update was skipped by a training guard (non-finite loss or gradient, loss spike).",
            ["reason"],
            registry=registry,
        )
        self.kafka_errors = Counter(
            "streamtrainer_kafka_errors",
            "Client-level Kafka errors (e.g. broker down), by librdkafka error name.",
            ["kind"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "streamtrainer_records_dead_lettered",
            "Invalid records written to the dead-letter topic (acknowledged), by reason.",
            ["topic", "reason"],
            registry=registry,
        )
        self.dead_letter_write_failures = Counter(
            "streamtrainer_dead_letter_write_failures",
            "Failed attempts to write a record to the dead-letter topic (each retried, never skipped).",
            registry=registry,
        )
        self.dead_letter_blocked = Gauge(
            "streamtrainer_dead_letter_blocked",
            "1 while the worker waits for the dead-letter topic to accept records, else 0.",
            registry=registry,
        )
        # The error budget (stop past a share of invalid or refused records). The ratio and the limit
        # are NaN until the worker sets them, and stay NaN while the budget is off: every comparison
        # with NaN is false, so no rule or panel mistakes "off" for "nothing spent" (0) or for a zero
        # tolerance (a limit of 0).
        self.error_budget_exhausted = Gauge(
            "streamtrainer_error_budget_exhausted",
            "1 once the worker has stopped because its error budget was spent (served for a short linger "
            "before it exits), else 0.",
            registry=registry,
        )
        self.error_budget_ratio = Gauge(
            "streamtrainer_error_budget_invalid_ratio",
            "Share of invalid or refused records over the error budget's window (what the budget compares "
            "with its limit); NaN while the budget is off.",
            registry=registry,
        )
        self.error_budget_ratio.set(math.nan)
        self.error_budget_limit = Gauge(
            "streamtrainer_error_budget_limit",
            "Share of invalid or refused records over the error budget's window past which the worker "
            "stops; NaN while the budget is off.",
            registry=registry,
        )
        self.error_budget_limit.set(math.nan)
        self.compactions = Counter(
            "streamtrainer_compactions",
            "Compactions of the consumed log into batch epochs, by trigger.",
            ["reason"],
            registry=registry,
        )
        self.compaction_duration = Histogram(
            "streamtrainer_compaction_duration_seconds",
            "Time to build a compaction's dataset and train its epochs.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0),
            registry=registry,
        )
        self.compaction_records = LazyGauge(
            "streamtrainer_compaction_records",
            "Records in the last compaction's epoch dataset (after deduplication).",
            registry,
        )
        self.compaction_epoch_loss = LazyGauge(
            "streamtrainer_compaction_epoch_loss",
            "Mean training loss of the last epoch of the last compaction.",
            registry,
        )
        self.compaction_store_records = Gauge(
            "streamtrainer_compaction_store_records",
            "Consumed records held for compaction, in memory or spilled to disk.",
            ["location"],
            registry=registry,
        )
        self.compaction_store_bytes = Gauge(
            "streamtrainer_compaction_store_bytes",
            "Bytes of consumed records spilled to disk for compaction.",
            registry=registry,
        )
        self.info = Info("streamtrainer_worker", "Worker configuration.", registry=registry)
