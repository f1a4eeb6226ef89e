"""`streamtrainer produce`: from settings to a published stream."""

from __future__ import annotations

import sys
from contextlib import ExitStack

from prometheus_client import CollectorRegistry

from streamtrainer.connection import admin_client, check_reachable
from streamtrainer.metrics import MetricsServer, ProducerMetrics
from streamtrainer.producer.publisher import ProduceSummary, publish
from streamtrainer.producer.sources import open_source
from streamtrainer.producer.synthetic import SyntheticSpec
from streamtrainer.settings import ProducerSettings

DEFAULT_SYNTHETIC_COUNT = 10_000


def synthetic_spec(settings: ProducerSettings) -> SyntheticSpec:
    return SyntheticSpec(
        task=settings.task,
        n_features=settings.n_features,
        n_classes=settings.n_classes,
        nonlinear=settings.nonlinear,
        noise=settings.noise,
        seed=settings.seed,
        drift=settings.drift,
        drift_at=settings.drift_at,
        drift_width=settings.drift_width,
        n_keys=settings.n_keys,
    )


def run_producer(settings: ProducerSettings) -> ProduceSummary:
    count = settings.count
    if count is None and settings.source == "synthetic":
        count = DEFAULT_SYNTHETIC_COUNT
    registry = CollectorRegistry()
    metrics = ProducerMetrics(registry)
    progress = settings.progress if settings.progress is not None else sys.stderr.isatty()
    # Fail fast, before anything else starts, when the cluster does not answer.
    check_reachable(admin_client(settings), settings)
    with ExitStack() as stack:
        stack.enter_context(MetricsServer(registry, host=settings.metrics_host, port=settings.metrics_port))
        source = stack.enter_context(
            open_source(
                settings.source,
                label=settings.label,
                key_column=settings.key_column,
                synthetic=synthetic_spec(settings),
                count=count,
            )
        )
        return publish(
            settings,
            source,
            topic=settings.topic,
            codec=settings.codec,
            count=count,
            rate=settings.rate,
            partitions=settings.partitions,
            progress=progress,
            metrics=metrics,
        )
