"""`streamtrainer produce`: from settings to a published stream."""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import ExitStack

from prometheus_client import CollectorRegistry

from streamtrainer.connection import admin_client, check_reachable
from streamtrainer.metrics import MetricsServer, ProducerMetrics
from streamtrainer.producer.publisher import ProduceSummary, publish
from streamtrainer.producer.sources import check_csv_file, open_source
from streamtrainer.producer.stop import Stopped, StopSignals
from streamtrainer.producer.synthetic import SyntheticSpec
from streamtrainer.settings import ProducerSettings

logger = logging.getLogger(__name__)

DEFAULT_SYNTHETIC_COUNT = 10_000
_ANNOUNCE_CHECK_BYTES = 16 * 1024 * 1024  # a CSV file read first for longer than a moment is announced


def synthetic_spec(settings: ProducerSettings) -> SyntheticSpec:
    """The synthetic generator's spec from the producer's settings."""
    return SyntheticSpec(
        task=settings.synthetic_task,
        n_features=settings.n_features,
        n_classes=settings.n_classes,
        nonlinear=settings.nonlinear,
        noise=settings.noise,
        seed=settings.synthetic_seed,
        drift=settings.drift,
        drift_at=settings.drift_at,
        drift_width=settings.drift_width,
        n_keys=settings.n_keys,
    )


def run_producer(settings: ProducerSettings) -> ProduceSummary:
    """Publish the configured source; the summary says how the run ended and where to resume.

    SIGINT and SIGTERM stop it (see :mod:`streamtrainer.producer.stop`): from the first connection on,
    a signal ends the run with what was read flushed and counted, never with a traceback."""
    count = settings.max_records
    if count is None and settings.source == "synthetic":
        count = DEFAULT_SYNTHETIC_COUNT
    registry = CollectorRegistry()
    metrics = ProducerMetrics(registry)
    progress = settings.progress if settings.progress is not None else sys.stderr.isatty()
    # A source spec that cannot work is a usage error, reported before anything connects; so is a CSV
    # file with a text column among its features (it is read first: see check_csv_file).
    _check_csv_file(settings, count)
    with ExitStack() as stack:
        stop = stack.enter_context(StopSignals())
        try:
            with stop.interruptible():
                # Opening reads a CSV header (stdin's too): a bad one is reported before connecting.
                source = stack.enter_context(
                    open_source(
                        settings.source,
                        label=settings.label,
                        key_column=settings.key_column,
                        synthetic=synthetic_spec(settings),
                        count=count,
                        skip=settings.skip,
                        features=settings.features,
                        ignore_columns=settings.ignore_columns,
                    )
                )
                # Fail fast, before anything else starts, when the cluster does not answer.
                check_reachable(admin_client(settings), settings)
                stack.enter_context(
                    MetricsServer(registry, host=settings.metrics_host, port=settings.metrics_port)
                )
        except Stopped:
            return ProduceSummary(
                0, 0, 0, 0.0, position=settings.skip, skipped=settings.skip, signal=stop.name
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
            stop=stop,
        )


def _check_csv_file(settings: ProducerSettings, count: int | None) -> None:
    """Check the source spec, and read a CSV file source, before connecting (see check_csv_file)."""
    _, _, path = settings.source.partition(":")
    if settings.source.startswith("csv:") and path != "-" and os.path.isfile(path):
        size = os.path.getsize(path)
        if size > _ANNOUNCE_CHECK_BYTES:
            logger.info("checking %s (%.0f MB) before connecting", path, size / 1e6)
    checked = check_csv_file(
        settings.source,
        label=settings.label,
        key_column=settings.key_column,
        features=settings.features,
        ignore_columns=settings.ignore_columns,
        count=count,
        skip=settings.skip,
    )
    if checked is None:
        return
    if checked.whole:
        logger.debug("%s: %d row(s) checked in %.1fs", path, checked.rows, checked.seconds)
    else:
        logger.info(
            "%s: its first %d rows checked (%.1fs); a bad row further on stops the run there, with the "
            "rows before it published",
            path,
            checked.rows,
            checked.seconds,
        )


def exit_code(summary: ProduceSummary) -> int:
    """0: everything delivered; 128 + signal number after SIGINT/SIGTERM (130, 143); 1 otherwise."""
    if summary.signal is not None:
        return 128 + int(signal.Signals[summary.signal])
    return 0 if summary.ok else 1
