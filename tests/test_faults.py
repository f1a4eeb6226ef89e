"""Faults: the broker goes away mid-run and comes back on the same port.

Real processes, no mocks: moto's S3 server on loopback, the embedded Tansu broker
with S3 storage (so topics, records, offsets and producer state survive its
restart), a worker and a producer as subprocesses of the ``streamtrainer`` CLI. And a publisher
whose memory-storage broker restarts under it, forgetting its producer id.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamtrainer.broker import EmbeddedBroker, _port_open, free_port, s3_environment
from streamtrainer.connection import ensure_topic, topic_partitions
from streamtrainer.producer.publisher import ProduceSummary, Publisher
from streamtrainer.producer.readback import run_of
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.records import Sample
from streamtrainer.settings import KafkaSettings
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


def _read_topic(bootstrap: str, topic: str, partitions: int) -> tuple[int, dict[int, int], Counter[bytes]]:
    """Records in the topic, per partition the offset after the last one (read, not asked: Tansu's
    high watermarks are not exact), and how many times each value occurs (the samples here are
    random features: every value is distinct, and a copy is a duplicate)."""
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
    values: Counter[bytes] = Counter()
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 5.0:
        messages = [m for m in consumer.consume(5000, 0.5) if m.error() is None]
        if messages:
            quiet_since = time.monotonic()
        for message in messages:
            count += 1
            partition, offset = message.partition() or 0, message.offset() or 0
            ends[partition] = max(ends.get(partition, 0), offset + 1)
            values[message.value() or b""] += 1
            assert run_of(message) is not None, "a record without the run header"
    consumer.close()
    return count, ends, values


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
        "--synthetic-task",
        "regression",
        "--n-features",
        "4",
        "--max-records",
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
            _producer_command(bootstrap, topic, n_before, "--synthetic-seed", "1", "--metrics-port", "-1"),
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
                    *("--synthetic-seed", "2", "--rate", str(rate), "--metrics-port", str(producer_port)),
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
        in_topic, ends, values = _read_topic(bootstrap, topic, partitions)

        def trained_all() -> bool:
            state = latest_state(tmp_path / "ckpt")
            return state is not None and int(state[0]["records_applied"]) >= in_topic  # type: ignore[call-overload]

        assert wait_until(trained_all, timeout=90), (tmp_path / "worker.log").read_text()[-3000:]
        assert worker.terminate() == 0
        state = latest_state(tmp_path / "ckpt")
        committed = committed_offsets(bootstrap, topic, group)

    worker_log = (tmp_path / "worker.log").read_text(errors="replace")

    # The producer: exit 0, every record delivered.
    match = re.search(r"produced (\d+) record\(s\) to \S+, failed (\d+)", output)
    assert match is not None, output[-3000:]
    delivered, failed = int(match.group(1)), int(match.group(2))
    assert (producer_rc, delivered, failed) == (0, m_during, 0), output[-3000:]

    # Both logged the outage (and the producer its end).
    assert re.search(OUTAGE_LOGGED, output), output[-3000:]
    assert "kafka reachable again" in output, output[-3000:]
    assert re.search(OUTAGE_LOGGED, worker_log), worker_log[-3000:]

    # Nothing acknowledged is lost, nothing is in the topic twice. Tansu 0.6.0 (S3 storage) answers the
    # retry of a produce a restart interrupted as a duplicate (DUPLICATE_SEQUENCE_NUMBER: delivered,
    # without an offset), whether or not it stored the batch. The producer does not trust such
    # acknowledgements: it reads their range back, and publishes again the records that are missing.
    # Every sample (random features) is distinct: each one must be in the topic exactly once.
    checked = re.search(
        r"(\d+) record\(s\) were acknowledged without an offset, as duplicates of an earlier write: "
        r"(\d+) verified in the topic, (\d+) missing and republished, (\d+) unverified",
        output,
    )
    without_offset, verified, republished, unverified = (
        (int(checked.group(i)) for i in range(1, 5)) if checked else (0, 0, 0, 0)
    )
    acknowledged = n_before + delivered
    lost = acknowledged - len(values)
    duplicates = in_topic - len(values)
    print(
        f"\nfaults: acknowledged={acknowledged} in_topic={in_topic} lost={lost} duplicates={duplicates} "
        f"acknowledged_without_offset={without_offset} verified={verified} republished={republished} "
        f"unverified={unverified} outage={outage_s:.1f}s producer_rc={producer_rc}"
    )
    print("\n".join(line for line in output.splitlines() if "read back" in line))
    assert (lost, duplicates) == (0, 0), output[-3000:]
    assert in_topic == acknowledged
    assert verified + republished == without_offset and unverified == 0, output[-3000:]

    # The worker trained every record in the topic exactly once, and committed past all of them.
    assert state is not None
    assert int(state[0]["records_applied"]) == in_topic  # type: ignore[call-overload]
    assert committed == {p: ends.get(p, 0) for p in range(partitions)}

    # The worker reported the outage as a metric too (librdkafka error names: a bounded label).
    counts = re.findall(r'streamtrainer_kafka_errors_total\{kind="(\w+)"\} (\d+\.\d+)', metrics)
    assert counts and sum(float(value) for _, value in counts) > 0, metrics[-3000:]


# -- an idempotent producer made unusable by a broker that lost its producer state ---------------------
#
# A broker on memory storage restarted on the same port has forgotten the producer id the publisher got
# from it (and the topic, which the test creates again at once). Two real outcomes in librdkafka, each
# made certain by what is in flight when the broker goes:
# * a batch sent but not answered (the broker frozen with SIGSTOP, then killed) is retried and answered
#   UNKNOWN_PRODUCER_ID: librdkafka cannot retry it without risking duplicates and fails fatally;
# * batches never sent before (produced while the broker is down) are answered UNKNOWN_PRODUCER_ID too:
#   librdkafka bumps its epoch locally and retries, forever, with no error reported (the producer is stuck).
# Either way the publisher must replace the producer and deliver every record. Nothing was acknowledged by
# the first broker, so every record must be in the restarted broker's topic, exactly once.


def _samples(n: int) -> list[Sample]:
    return list(generate(SyntheticSpec(task="regression", n_features=4, seed=7), count=n))


def _restart_forgetting_producers(broker: EmbeddedBroker, topic: str) -> None:
    broker.halt(kill=True)
    broker.start()  # memory storage: no topic, no producer ids
    ensure_topic(AdminClient({"bootstrap.servers": broker.bootstrap_servers}), topic, 1)


def _publish_across_a_restart(
    tmp_path: Path, *, in_flight: bool
) -> tuple[ProduceSummary, Counter[bytes], int]:
    n = 2000
    with EmbeddedBroker(port=free_port(), log_path=tmp_path / "tansu.log") as broker:
        topic = f"fatal-{uuid.uuid4().hex[:8]}"
        ensure_topic(AdminClient({"bootstrap.servers": broker.bootstrap_servers}), topic, 1)
        publisher = Publisher(
            KafkaSettings(bootstrap_servers=broker.bootstrap_servers), topic=topic, codec="binary"
        )
        time.sleep(1.0)  # the producer has its producer id
        started = time.monotonic()
        if in_flight:
            # EmbeddedBroker has no pause(): freeze its process, so that the batch stays unanswered.
            assert broker._process is not None
            os.kill(broker._process.pid, signal.SIGSTOP)
            for sample in _samples(n):
                publisher.send(sample)
            time.sleep(1.0)  # sent (linger.ms=5), never answered
            _restart_forgetting_producers(broker, topic)
        else:
            broker.halt(kill=True)
            time.sleep(1.0)  # the client has seen the connection close: nothing is written to it any more
            for sample in _samples(n):
                publisher.send(sample)  # queued: never sent to the first broker
            time.sleep(0.5)
            broker.start()
            ensure_topic(AdminClient({"bootstrap.servers": broker.bootstrap_servers}), topic, 1)
        publisher.flush()
        summary = publisher.summary(time.monotonic() - started)
        # The producer's retries can reach the restarted broker before the topic is created again, and
        # Tansu then creates it itself, with its own partition count: read every partition there is.
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        partitions = topic_partitions(admin, topic, 10) or 1
        in_topic, _ends, values = _read_topic(broker.bootstrap_servers, topic, partitions)
    print(f"\n{partitions} partition(s) in the restarted broker's topic")
    return summary, values, in_topic


def test_producer_is_recreated_after_a_fatal_idempotence_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="streamtrainer.producer.publisher"):
        summary, values, in_topic = _publish_across_a_restart(tmp_path, in_flight=True)
    print(f"\nfatal: {summary}")
    fatal = [r.message for r in caplog.records if "fatal producer error" in r.message]
    assert fatal and "unknown producer id" in fatal[0].lower(), caplog.text[-3000:]
    assert summary.recreated >= 1 and summary.resent >= 1, summary
    _assert_every_record_once(summary, values, in_topic, caplog.text)


def test_producer_stuck_after_a_broker_lost_its_producer_state_is_recreated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="streamtrainer.producer.publisher"):
        summary, values, in_topic = _publish_across_a_restart(tmp_path, in_flight=False)
    print(f"\nstuck: {summary}")
    assert "the idempotent producer is stuck" in caplog.text, caplog.text[-3000:]
    assert summary.recreated >= 1 and summary.resent == 2000, summary
    _assert_every_record_once(summary, values, in_topic, caplog.text)


def _assert_every_record_once(
    summary: ProduceSummary, values: Counter[bytes], in_topic: int, log: str
) -> None:
    """All 2,000 acknowledged, and each in the restarted broker's topic exactly once."""
    assert summary.ok and summary.delivered == summary.attempted == 2000, summary
    copies = Counter(values.values())  # how many values are there once, twice, ...
    assert (in_topic, len(values), copies) == (2000, 2000, {1: 2000}), log[-3000:]
