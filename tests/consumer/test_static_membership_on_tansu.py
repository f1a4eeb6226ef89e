"""Static membership on the embedded broker is warned about (issue #15, case 11).

Tansu 0.6.0 can leave a group of static members at "joining group" for minutes
after kills and restarts (measured in docs/semantics.md, "Crash safety"): the worker says
so when it is given a ``--group-instance-id`` on Tansu, and stays quiet on Apache Kafka.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from confluent_kafka.admin import AdminClient

from streamtrainer.broker import is_tansu, warn_if_static_membership_on_tansu
from streamtrainer.consumer import Worker
from tests.conftest import KafkaBroker
from tests.helpers import worker_settings

WARNING = "--group-instance-id w-static on the embedded broker (Tansu)"


def test_tansu_is_recognised(kafka_broker: KafkaBroker, caplog: pytest.LogCaptureFixture) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap_servers})
    on_tansu = not kafka_broker.is_real_kafka
    assert is_tansu(admin) is on_tansu
    assert not warn_if_static_membership_on_tansu(admin, None)
    with caplog.at_level(logging.WARNING):
        assert warn_if_static_membership_on_tansu(admin, "w-static") is on_tansu
    assert (WARNING in caplog.text) is on_tansu


def test_worker_warns_of_static_membership_on_tansu(
    kafka_broker: KafkaBroker,
    topic_factory: Callable[..., str],
    group_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = worker_settings(
        kafka_broker.bootstrap_servers,
        topic_factory(1),
        group_id,
        group_instance_id="w-static",
        max_seconds=0.5,
        fused=False,
    )
    with caplog.at_level(logging.WARNING):
        Worker(settings).run()
    warned = [r for r in caplog.records if WARNING in r.getMessage()]
    assert len(warned) == (0 if kafka_broker.is_real_kafka else 1), caplog.text
