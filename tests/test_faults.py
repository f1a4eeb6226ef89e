"""Faults: the broker goes away mid-run and comes back on the same port.

Real processes, no mocks: moto's S3 server on loopback, the embedded Tansu broker
with S3 storage (so topics, records, offsets and producer state survive its
restart), a worker and a producer as subprocesses of the ``streamtrainer`` CLI.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamtrainer.broker import EmbeddedBroker, _port_open, free_port, s3_environment
from streamtrainer.connection import ensure_topic
from tests.helpers import committed_offsets
from tests.processes import CLI, STARTED, WorkerProcess, kill_survivors, latest_state, wait_until

pytestmark = pytest.mark.integration

BUCKET = "tansu"
OUTAGE_S = 5.0
OUTAGE_LOGGED = r"kafka: .*(Connection refused|brokers are down|Disconnected)"


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test() -> Iterator[None]:
    yield
    kill_survivors()


@dataclass(frozen=True)
class S3:
    endpoint: str
    env: dict[str, str]


@pytest.fixture()
def moto_s3(tmp_path: Path) -> Iterator[S3]:
    """moto's S3 server on a loopback port, with one bucket."""
    pytest.importorskip("moto.server", reason="needs moto[server] (the test extras)")
    import boto3

    port = free_port()
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [CLI[0], "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_until(lambda: _port_open("127.0.0.1", port), timeout=30), "moto did not start"
        endpoint = f"http://127.0.0.1:{port}"
        env = s3_environment(endpoint, access_key_id="test", secret_access_key="test")
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        yield S3(endpoint, env)
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def _read_topic(bootstrap: str, topic: str, partitions: int) -> tuple[int, dict[int, int]]:
    """Records in the topic, and per partition the offset after the last one (read, not asked:
    Tansu's high watermarks are not exact)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    count = 0
    ends: dict[int, int] = {}
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 5.0:
        messages = [m for m in consumer.consume(5000, 0.5) if m.error() is None]
        if messages:
            quiet_since = time.monotonic()
        for message in messages:
            count += 1
            ends[message.partition() or 0] = max(ends.get(message.partition() or 0, 0), message.offset() + 1)
    consumer.close()
    return count, ends


def _producer_command(bootstrap: str, topic: str, count: int, *extra: str) -> list[str]:
    return [
        *CLI,
        "produce",
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--source",
        "synthetic",
        "--task",
        "regression",
        "--n-features",
        "4",
        "--count",
        str(count),
        *extra,
    ]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAINER_")}


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def test_worker_and_producer_ride_out_a_broker_restart_with_s3_storage(moto_s3: S3, tmp_path: Path) -> None:
    n_before, m_during, rate, partitions = 2000, 4000, 500, 3
    broker = EmbeddedBroker(
        port=free_port(),
        storage_engine=f"s3://{BUCKET}/",
        extra_env=moto_s3.env,
        log_path=tmp_path / "tansu.log",
    )
    with broker:
        bootstrap = broker.bootstrap_servers
        topic, group = f"faults-{uuid.uuid4().hex[:8]}", f"group-{uuid.uuid4().hex[:8]}"
        ensure_topic(AdminClient({"bootstrap.servers": bootstrap}), topic, partitions)

        # N records, every one acknowledged, before anything else runs.
        before = subprocess.run(
            _producer_command(bootstrap, topic, n_before, "--seed", "1", "--metrics-port", "-1"),
            env=_clean_env(),
            capture_output=True,
            check=False,
            timeout=120,
        )
        assert before.returncode == 0, before.stderr.decode()[-2000:]

        metrics_port = free_port()
        worker = WorkerProcess(
            bootstrap,
            topic,
            group,
            tmp_path / "ckpt",
            tmp_path / "worker.log",
            "--task",
            "regression",
            "--no-compaction",
            "--checkpoint-interval-s",
            "1",
            "--max-seconds",
            "240",
            "--metrics-port",
            str(metrics_port),
            env={"STREAMTRAINER_TEST": "1"},
        ).start()
        assert wait_until(worker.running_loop, timeout=60), (tmp_path / "worker.log").read_text()

        producer_log = tmp_path / "producer.log"
        producer_port = free_port()
        with open(producer_log, "wb") as log:
            producer = subprocess.Popen(
                _producer_command(
                    bootstrap,
                    topic,
                    m_during,
                    *("--seed", "2", "--rate", str(rate), "--metrics-port", str(producer_port)),
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
            )
        STARTED.append(producer)

        # Mid-run (a third of the producer's records acknowledged), the broker goes away for OUTAGE_S.
        def delivered_so_far() -> float:
            text = _scrape(producer_port)
            found = re.search(r"streamtrainer_producer_records_delivered_total\{[^}]*\} (\S+)", text)
            return float(found.group(1)) if found else 0.0

        assert wait_until(lambda: delivered_so_far() >= m_during / 3, timeout=60, interval=0.05)
        stopped = time.monotonic()
        broker.halt()
        time.sleep(OUTAGE_S)
        broker.start()
        outage_s = time.monotonic() - stopped
        assert outage_s >= OUTAGE_S

        # The worker is alive, back in its group, and exposes the outage while it still runs.
        time.sleep(2.0)
        assert worker.alive
        metrics = _scrape(metrics_port)

        producer_rc = producer.wait(timeout=180)
        output = producer_log.read_text(errors="replace")

        # Count what is in the topic after the restart (read back, not asked for).
        in_topic, ends = _read_topic(bootstrap, topic, partitions)

        def trained_all() -> bool:
            state = latest_state(tmp_path / "ckpt")
            return state is not None and int(state[0]["records_applied"]) >= in_topic  # type: ignore[call-overload]

        assert wait_until(trained_all, timeout=90), (tmp_path / "worker.log").read_text()[-3000:]
        assert worker.terminate() == 0
        state = latest_state(tmp_path / "ckpt")
        committed = committed_offsets(bootstrap, topic, group)

    worker_log = (tmp_path / "worker.log").read_text(errors="replace")

    # The producer: exit 0 and every record delivered, or non-zero and it says so.
    match = re.search(r"produced (\d+) record\(s\) to \S+, failed (\d+)", output)
    assert match is not None, output[-3000:]
    delivered, failed = int(match.group(1)), int(match.group(2))
    if producer_rc == 0:
        assert (delivered, failed) == (m_during, 0), output[-3000:]
    else:
        assert failed > 0 and delivered + failed == m_during, output[-3000:]

    # Both logged the outage (and the producer its end).
    assert re.search(OUTAGE_LOGGED, output), output[-3000:]
    assert "kafka reachable again" in output, output[-3000:]
    assert re.search(OUTAGE_LOGGED, worker_log), worker_log[-3000:]

    # Nothing acknowledged is lost -- except what Tansu acknowledged as a duplicate it did not have.
    # Tansu 0.6.0 (S3 storage): a produce in flight when it stops can leave the producer's sequence
    # and the offsets recorded without the batch; the retry after the restart is answered
    # DUPLICATE_SEQUENCE_NUMBER, which librdkafka reports as delivered with no offset. The producer
    # counts those records and says so; only they may be missing.
    unconfirmed = re.search(r"(\d+) record\(s\) were acknowledged as duplicates", output)
    without_offset = int(unconfirmed.group(1)) if unconfirmed else 0
    acknowledged = n_before + delivered
    lost = acknowledged - in_topic
    print(
        f"\nfaults: acknowledged={acknowledged} in_topic={in_topic} lost={lost} "
        f"acknowledged_without_offset={without_offset} outage={outage_s:.1f}s producer_rc={producer_rc}"
    )
    assert 0 <= lost <= without_offset, output[-3000:]

    # The worker trained every record in the topic exactly once, and committed past all of them.
    assert state is not None
    assert int(state[0]["records_applied"]) == in_topic  # type: ignore[call-overload]
    assert committed == {p: ends.get(p, 0) for p in range(partitions)}

    # The worker reported the outage as a metric too (librdkafka error names: a bounded label).
    counts = re.findall(r'streamtrainer_kafka_errors_total\{kind="(\w+)"\} (\d+\.\d+)', metrics)
    assert counts and sum(float(value) for _, value in counts) > 0, metrics[-3000:]

    if lost:
        pytest.xfail(
            f"Tansu 0.6.0 (S3) lost {lost} acknowledged record(s) at the restart "
            "(answered their retry as a duplicate it did not store); everything else held"
        )
