"""`streamtrainer demo`: the whole pipeline in one command.

Starts the embedded broker (unless a bootstrap server is given), creates a
topic, produces a synthetic stream whose concept changes halfway through, and
runs a worker on it while a live view shows throughput and the prequential loss.
It ends when every record has been trained, with a summary.
"""

from __future__ import annotations

import logging
import sys
import threading
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from streamtrainer.broker import EmbeddedBroker
from streamtrainer.connection import admin_client, check_reachable, ensure_topic
from streamtrainer.consumer import Worker, WorkerStatus
from streamtrainer.producer.publisher import ProduceSummary, publish
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.settings import NONLINEAR_COMPACTION, DemoSettings, KafkaSettings, WorkerSettings
from streamtrainer.training.progressive import named_figures

logger = logging.getLogger(__name__)

_SPARK = "▁▂▃▄▅▆▇█"
# An mlp on a concept no linear model separates, at the worker's defaults (its optimizer, step,
# width and compaction schedule): what a user gets without tuning.
_DEMO_MODELS: dict[str, str] = {
    "regression": "mlp",
    "binary": "mlp",
    "multiclass": "mlp",
}
_DEMO_HIDDEN: int = WorkerSettings.model_fields["hidden"].default
_DEMO_EVERY = NONLINEAR_COMPACTION["compaction_every_records"]


@dataclass(frozen=True)
class DemoResult:
    produced: ProduceSummary | None
    worker: WorkerStatus
    metrics_url: str | None
    run_log: str
    picture: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.produced is not None
            and self.produced.ok
            and self.worker.records_trained == self.produced.delivered
        )


class _LiveView:
    """Renders the worker's progress: a table and a sparkline of the loss."""

    def __init__(self, settings: DemoSettings, metrics_url: str | None) -> None:
        self.settings = settings
        self.metrics_url = metrics_url
        self.losses: list[float] = []

    def render(self, status: WorkerStatus) -> Table:
        if status.last_window_loss == status.last_window_loss:  # not NaN
            self.losses.append(status.last_window_loss)
        table = Table(
            title=f"streamtrainer demo: {self.settings.task} on '{self.settings.topic}'", show_header=False
        )
        table.add_column(justify="right", style="bold")
        table.add_column()
        done = status.records_trained / self.settings.records
        table.add_row("trained", f"{status.records_trained:,} / {self.settings.records:,} ({done:.0%})")
        table.add_row("records/s", f"{status.records_per_second:,.0f}")
        report = status.prequential
        table.add_row("prequential", f"whole run ({report.records:,}) / last {report.window_records:,}")
        for label, run, window in named_figures(report):
            table.add_row(label, f"{run} / {window}")
        table.add_row("window loss", _sparkline(self.losses[-60:]))
        table.add_row("compactions", _describe_compactions(status))
        table.add_row("metrics", self.metrics_url or "off")
        return table


def _describe_compactions(status: WorkerStatus) -> str:
    if not status.compactions:
        return "none yet"
    text = f"{status.compactions}, last over {status.compaction_records:,} records"
    if status.compaction_epoch_loss is not None:
        text += f", epoch loss {status.compaction_epoch_loss:.4f}"
    if status.compaction_loss_before is not None and status.compaction_loss_after is not None:
        text += (
            f"; prequential loss {status.compaction_loss_before:.4f} before -> "
            f"{status.compaction_loss_after:.4f} after"
        )
    return text


def _sparkline(values: list[float]) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(_SPARK[min(len(_SPARK) - 1, int((v - low) / span * len(_SPARK)))] for v in values)


def run_demo(settings: DemoSettings, console: Console | None = None) -> DemoResult:
    console = console or Console(stderr=False)
    live_enabled = settings.live if settings.live is not None else sys.stdout.isatty()
    task = settings.task
    model = _DEMO_MODELS[task]
    with ExitStack() as stack:
        bootstrap = settings.bootstrap_servers
        if not bootstrap:
            broker = stack.enter_context(EmbeddedBroker())
            bootstrap = broker.bootstrap_servers
            console.print(f"embedded broker (Tansu) on {bootstrap}")
        kafka = KafkaSettings(
            bootstrap_servers=bootstrap,
            kafka_config=settings.kafka_config,
            kafka_config_file=settings.kafka_config_file,
            kafka_secret_file=settings.kafka_secret_file,
            allow_insecure_tls=settings.allow_insecure_tls,
            startup_timeout_s=settings.startup_timeout_s,
        )
        admin = admin_client(kafka)
        check_reachable(admin, kafka)
        ensure_topic(admin, settings.topic, settings.partitions, settings.startup_timeout_s)

        spec = SyntheticSpec(
            task=task,
            n_features=settings.n_features,
            n_classes=3,
            nonlinear=True,
            noise=0.02,
            seed=7,
            drift="abrupt",
            drift_at=settings.records // 2,
        )
        console.print(
            f"producing {settings.records:,} {task} records ({settings.n_features} features, nonlinear, "
            f"{settings.codec}); the concept changes abruptly at record {spec.drift_at:,}; "
            f"training an mlp ({_DEMO_HIDDEN} hidden units), "
            + (
                f"compacting the log into batch epochs every {_DEMO_EVERY:,} records"
                if settings.compaction
                else "online only"
            )
        )
        stop_producing = threading.Event()
        produced: list[ProduceSummary] = []

        def produce() -> None:
            try:
                produced.append(
                    publish(
                        kafka,
                        generate(spec, settings.records),
                        topic=settings.topic,
                        codec=settings.codec,
                        count=settings.records,
                        rate=settings.rate,
                        should_stop=stop_producing.is_set,
                    )
                )
            except Exception:  # reported by the summary: the worker must still stop cleanly
                logger.exception("demo producer failed")

        producer_thread = threading.Thread(target=produce, name="demo-producer", daemon=True)
        run_log = settings.out_dir / "run.jsonl"
        run_log.parent.mkdir(parents=True, exist_ok=True)
        run_log.unlink(missing_ok=True)
        worker_settings = WorkerSettings(
            bootstrap_servers=bootstrap,
            kafka_config=settings.kafka_config,
            kafka_config_file=settings.kafka_config_file,
            kafka_secret_file=settings.kafka_secret_file,
            allow_insecure_tls=settings.allow_insecure_tls,
            topic=settings.topic,
            group=f"streamtrainer-demo-{uuid.uuid4().hex[:8]}",
            model=model,
            task=task,
            n_classes=3 if task == "multiclass" else None,
            max_records=settings.records,
            max_seconds=600.0,
            metrics_host=settings.metrics_host,
            metrics_port=settings.metrics_port,
            session_timeout_ms=6000,
            checkpoint_dir=settings.out_dir / "checkpoints",
            fresh=True,
            run_log=run_log,
            compaction=settings.compaction,
        )
        view = _LiveView(settings, None)
        live = stack.enter_context(Live(console=console, auto_refresh=False)) if live_enabled else None

        def on_progress(status: WorkerStatus) -> None:
            if live is not None:
                live.update(view.render(status), refresh=True)

        worker = Worker(worker_settings, on_progress=on_progress)
        producer_thread.start()
        try:
            status = worker.run()
        finally:
            stop_producing.set()
            producer_thread.join(timeout=60)
        view.metrics_url = worker.metrics_server.url
        if live is not None:
            live.update(view.render(status), refresh=True)
    picture = _plot_run(run_log, settings.out_dir / "run.png")
    result = DemoResult(
        produced[0] if produced else None, status, worker.metrics_server.url, str(run_log), picture
    )
    _print_summary(console, settings, result)
    return result


def _plot_run(run_log: Path, output: Path) -> str | None:
    """The run log as a PNG (``streamtrainer plot``); None, with a warning, if it cannot be drawn."""
    from streamtrainer.plot import PlotError, plot_run

    try:
        return str(plot_run(run_log, output))
    except PlotError as error:
        logger.warning("no picture of the run: %s", error)
        return None


def _print_summary(console: Console, settings: DemoSettings, result: DemoResult) -> None:
    status = result.worker
    produced = result.produced
    console.print()
    console.print("[bold]demo summary[/bold]")
    if produced is not None:
        console.print(f"  produced        {produced.delivered:,} records ({produced.failed} failed)")
    else:
        console.print("  produced        [red]producer failed (see log)[/red]")
    console.print(
        f"  trained         {status.records_trained:,} records in {status.elapsed_s:.1f}s "
        f"({status.records_per_second:,.0f} records/s, {status.records_invalid} invalid)"
    )
    report = status.prequential
    first = min(report.window_size, report.records)
    console.print(
        f"  loss            first {first:,} records: {status.first_window_loss:.4f}  ->  "
        f"last {report.window_records:,} records: {status.last_window_loss:.4f}"
    )
    console.print(
        f"  prequential     whole run ({report.records:,} records) / last {report.window_records:,}"
    )
    for label, run, window in named_figures(report):
        console.print(f"    {label:<13} {run} / {window}")
    falling = status.last_window_loss < status.first_window_loss
    console.print(f"  loss fell       {'yes' if falling else 'NO'}")
    console.print(f"  compactions     {_describe_compactions(status)}")
    console.print(f"  run log         {result.run_log}")
    if result.picture is not None:
        console.print(f"  picture         {result.picture}")
    console.print("  result          " + ("[green]ok[/green]" if result.ok else "[red]FAILED[/red]"))
