"""``--predictions-topic``: the worker's records/s with and without it, side by side in one run.

The embedded broker, one topic of N binary records (logistic, d=16, 1 partition, the binary codec),
and the bench's worker (bench/worker_runs.py: the deployed defaults, compaction on) run R times
alternately without and with ``--predictions-topic`` (each with its own group and predictions
topic); the steady-state records/s of each run (records after the first batch over the time since
it) and the median per mode. The predictions topic is read back after each run with it: its count
must equal the records trained.

Usage: python -m bench.predictions [--records N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import uuid

from confluent_kafka.admin import AdminClient

from bench.worker_runs import TimedWorker, worker_settings
from streamtrainer.broker import EmbeddedBroker
from streamtrainer.connection import ensure_topic
from streamtrainer.producer.publisher import publish
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.settings import KafkaSettings, WorkerSettings


def _count(bootstrap: str, topic: str) -> int:
    from streamtrainer.consumer.outputs import read_back

    return sum(1 for _ in read_back(KafkaSettings(bootstrap_servers=bootstrap), topic, {}))


def main() -> None:
    """Run the comparison and print one JSON line per run and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.records
    rates: dict[str, list[float]] = {"without": [], "with": []}
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        topic = f"bench-predictions-{uuid.uuid4().hex[:8]}"
        ensure_topic(AdminClient({"bootstrap.servers": bootstrap}), topic, partitions=1)
        summary = publish(
            KafkaSettings(bootstrap_servers=bootstrap),
            generate(SyntheticSpec(task="binary", n_features=16, seed=1), n),
            topic=topic,
            codec="binary",
        )
        assert summary.ok, summary
        for repeat in range(args.repeats):
            for mode in ("without", "with"):
                base = worker_settings(bootstrap, topic, "logistic", n, d=16)
                values = base.model_dump()
                predictions = f"{topic}.predictions-{repeat}" if mode == "with" else None
                values["predictions_topic"] = predictions
                settings = WorkerSettings(**values)
                worker = TimedWorker(settings)
                try:
                    worker.run()
                finally:
                    shutil.rmtree(settings.checkpoint_dir, ignore_errors=True)
                timing = worker.timing()
                rate = timing.records / timing.seconds if timing.seconds > 0 else 0.0
                rates[mode].append(rate)
                line: dict[str, object] = {"mode": mode, "repeat": repeat, "records_per_s": round(rate)}
                if predictions is not None:
                    line["predictions_read_back"] = _count(bootstrap, predictions)
                    line["records_trained"] = worker.records_trained
                print(json.dumps(line), flush=True)
    without, with_ = statistics.median(rates["without"]), statistics.median(rates["with"])
    print(
        json.dumps(
            {
                "records": n,
                "median_without": round(without),
                "median_with": round(with_),
                "cost": f"{1 - with_ / without:.1%}",
            }
        )
    )


if __name__ == "__main__":
    main()
