"""Prometheus metrics of the worker and the producer, and the HTTP endpoint that serves them."""

from streamtrainer.metrics.producer_metrics import ProducerMetrics
from streamtrainer.metrics.server import MetricsServer
from streamtrainer.metrics.worker_metrics import WorkerMetrics

__all__ = ["MetricsServer", "ProducerMetrics", "WorkerMetrics"]
