"""The worker's metrics. Every one takes a registry; labels are bounded (never a record key).

Label cardinality: ``topic`` and ``partition`` are bounded by the topics and
partitions assigned; ``reason`` by :data:`streamtrainer.consumer.dead_letter.DEAD_LETTER_REASONS`
(the decode reasons and the training guards'; for compactions, the fixed set of triggers);
``location`` is memory or disk.

Gauges that hold a measurement (the learning rate, the last trained and checkpointed times, the
last compaction's size and loss) are :class:`LazyGauge`: absent from ``/metrics`` until the
worker first sets them, never a made-up 0 that a rule or a panel would take for a real one.

Progressive validation (each record scored before the model learns from it) comes two ways,
only for the metrics of the worker's task (:meth:`WorkerMetrics.track_progressive`):

* counters from which PromQL computes any window exactly, e.g. the last hour's loss is
  ``increase(streamtrainer_prequential_loss_sum_total[1h])
  / increase(streamtrainer_prequential_records_total[1h])``: records measured, loss sum, correct
  predictions (classification), absolute and squared error sums, label sums by sign and label
  squared sum (regression: R2 over a window);
* gauges read at scrape time (:class:`ProgressiveCollector`), ``streamtrainer_prequential_<metric>``
  with ``scope="run"`` (every record since the model started, restored from its checkpoint) and
  ``scope="window"`` (the last ``--prequential-window`` records), each absent until it has a value
  (ROC AUC needs both classes, R2 two different labels).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
        # Progressive validation: the counters and gauges of the worker's task (track_progressive).
        self.prequential_records: Counter | None = None
        self.prequential_loss_sum: Counter | None = None
        self.prequential_correct: Counter | None = None
        self.prequential_absolute_error_sum: Counter | None = None
        self.prequential_squared_error_sum: Counter | None = None
        self.prequential_label_sum: Counter | None = None
        self.prequential_label_squared_sum: Counter | None = None
        self.prequential_gauges: ProgressiveCollector | None = None
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
        # --distributed (consumer/rounds.py): one series per rank, labelled by its torchrun RANK.
        self.world_size = Gauge(
            "streamtrainer_world_size",
            "Ranks training the one model (--distributed; the torchrun WORLD_SIZE).",
            ["rank"],
            registry=registry,
        )
        self.averaging_rounds = Counter(
            "streamtrainer_averaging_rounds",
            "Averaging rounds this rank took part in (--distributed).",
            ["rank"],
            registry=registry,
        )
        self.averaging_duration = Histogram(
            "streamtrainer_averaging_duration_seconds",
            "Time of an averaging round on this rank: its all-reduces, including waiting for the others.",
            ["rank"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5),
            registry=registry,
        )
        self.parameter_distance = Gauge(
            "streamtrainer_parameter_distance",
            "L2 distance of this rank's parameters from the averaged ones, before the last round.",
            ["rank"],
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
        self.drift_detections = Counter(
            "streamtrainer_drift_detections",
            "Drifts detected on the prequential loss (Page-Hinkley, --drift-detector).",
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

    def track_progressive(self, task: str, window: int, read: Callable[[], ProgressiveSnapshot]) -> None:
        """Export the progressive metrics of a ``task`` worker: counters, and gauges ``read`` when scraped."""
        registry = self.registry
        self.prequential_records = Counter(
            "streamtrainer_prequential_records",
            "Records measured before the model learned from them (progressive validation).",
            registry=registry,
        )
        self.prequential_loss_sum = Counter(
            "streamtrainer_prequential_loss_sum",
            "Sum of the per-record losses measured before learning (the log loss for classification): "
            "a window's mean loss is its increase over that of streamtrainer_prequential_records_total.",
            registry=registry,
        )
        if task == "regression":
            self.prequential_absolute_error_sum = Counter(
                "streamtrainer_prequential_absolute_error_sum",
                "Sum of |prediction - label| measured before learning (a window's MAE over records_total).",
                registry=registry,
            )
            self.prequential_squared_error_sum = Counter(
                "streamtrainer_prequential_squared_error_sum",
                "Sum of (prediction - label)^2 measured before learning (a window's RMSE and R2).",
                registry=registry,
            )
            self.prequential_label_sum = Counter(
                "streamtrainer_prequential_label_sum",
                "Sum of the measured labels' magnitudes by sign (a counter cannot go down): the labels' "
                'sum over a window is the increase of sign="positive" minus that of sign="negative".',
                ["sign"],
                registry=registry,
            )
            self.prequential_label_squared_sum = Counter(
                "streamtrainer_prequential_label_squared_sum",
                "Sum of the measured labels squared (with the label sum: a window's R2).",
                registry=registry,
            )
        else:
            self.prequential_correct = Counter(
                "streamtrainer_prequential_correct",
                "Records whose class was predicted right before learning (a window's accuracy over "
                "records_total).",
                registry=registry,
            )
        self.prequential_gauges = ProgressiveCollector(task, window, read)
        registry.register(self.prequential_gauges)

    def count_progressive(self, sums: ProgressiveSums) -> None:
        """Add one measured batch to the progressive counters (after :meth:`track_progressive`)."""
        if self.prequential_records is None or self.prequential_loss_sum is None or not sums.records:
            return
        self.prequential_records.inc(sums.records)
        # Every loss a user trains with is >= 0; the test-only audit loss (-w.x) is not: a counter
        # cannot go down, so such a sum is left out rather than crash the worker.
        if sums.loss_sum >= 0:
            self.prequential_loss_sum.inc(sums.loss_sum)
        if self.prequential_correct is not None:
            self.prequential_correct.inc(sums.correct)
        if self.prequential_absolute_error_sum is not None:
            self.prequential_absolute_error_sum.inc(sums.absolute_error_sum)
        if self.prequential_squared_error_sum is not None:
            self.prequential_squared_error_sum.inc(sums.squared_error_sum)
        if self.prequential_label_sum is not None:
            self.prequential_label_sum.labels("positive").inc(sums.label_sum_positive)
            self.prequential_label_sum.labels("negative").inc(sums.label_sum_negative)
        if self.prequential_label_squared_sum is not None:
            self.prequential_label_squared_sum.inc(sums.label_squared_sum)


class ProgressiveSums(Protocol):
    """One measured batch's increments (``streamtrainer.training.progressive.BatchSums``)."""

    @property
    def records(self) -> int: ...
    @property
    def loss_sum(self) -> float: ...
    @property
    def correct(self) -> int: ...
    @property
    def absolute_error_sum(self) -> float: ...
    @property
    def squared_error_sum(self) -> float: ...
    @property
    def label_sum_positive(self) -> float: ...
    @property
    def label_sum_negative(self) -> float: ...
    @property
    def label_squared_sum(self) -> float: ...


class ProgressiveSnapshot(Protocol):
    """The figures the gauges show (``streamtrainer.training.progressive.ProgressiveReport``)."""

    @property
    def run(self) -> Mapping[str, float]: ...
    @property
    def window(self) -> Mapping[str, float]: ...


# Label values of the progressive gauges (scope) and of the label-sum counter (sign).
PROGRESSIVE_SCOPES = ("run", "window")
LABEL_SIGNS = ("positive", "negative")
# The gauge of each progressive metric, and what it is.
PROGRESSIVE_GAUGES = {
    "loss": "mean per-record loss (the log loss for classification)",
    "accuracy": "accuracy (classification)",
    "roc_auc": "ROC AUC (binary; the run's from a histogram, within 0.005)",
    "macro_f1": "macro F1 over the classes seen as labels (multi-class)",
    "mae": "mean absolute error (regression)",
    "rmse": "root mean squared error (regression)",
    "r2": "coefficient of determination R2 (regression)",
}


class ProgressiveCollector(Collector):
    """``streamtrainer_prequential_<metric>{scope="run"|"window"}``, read at scrape time.

    Only the metrics ``read`` returns (those of the worker's task) are exported, and a value
    only once it is defined (not NaN): an idle worker exports none of them.
    """

    def __init__(self, task: str, window: int, read: Callable[[], ProgressiveSnapshot]) -> None:
        self.task = task
        self.window = window
        self._read = read

    def _family(self, name: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            f"streamtrainer_prequential_{name}",
            f"Progressive validation (each record scored before learning from it): "
            f'{PROGRESSIVE_GAUGES[name]}; scope="run": every record since the model started, '
            f'scope="window": the last {self.window:,} records.',
            labels=["scope"],
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The families this collector may export (for the registry's duplicate check)."""
        for name in PROGRESSIVE_GAUGES:
            yield self._family(name)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The defined values of the worker's metrics, both scopes."""
        snapshot = self._read()
        for name in PROGRESSIVE_GAUGES:
            family = self._family(name)
            for scope, values in zip(PROGRESSIVE_SCOPES, (snapshot.run, snapshot.window), strict=True):
                value = values.get(name)
                if value is not None and not math.isnan(value):
                    family.add_metric([scope], value)
            if family.samples:
                yield family
