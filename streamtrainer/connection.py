"""Building librdkafka configuration and the admin calls every command needs."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streamtrainer.exceptions import BrokerUnavailableError, ConfigurationError, TopicError
from streamtrainer.settings import KafkaSettings

logger = logging.getLogger(__name__)
LIBRDKAFKA_LOGGER = logging.getLogger("streamtrainer.librdkafka")


def client_config(settings: KafkaSettings, **overrides: object) -> dict[str, object]:
    """librdkafka config: the bootstrap servers, the user's extra settings, then ``overrides``."""
    if not settings.bootstrap_servers:
        raise ConfigurationError(
            "no Kafka bootstrap server: set --bootstrap-servers or STREAMTRAINER_BOOTSTRAP_SERVERS"
        )
    # librdkafka's own log lines go through Python logging (quiet unless debugging);
    # errors that matter reach the application through error_cb and exceptions.
    config: dict[str, object] = {"bootstrap.servers": settings.bootstrap_servers, "logger": LIBRDKAFKA_LOGGER}
    config.update(settings.kafka_config)
    config.update(overrides)
    return config


def admin_client(settings: KafkaSettings) -> AdminClient:
    return AdminClient(client_config(settings))  # type: ignore[arg-type]


def check_reachable(admin: AdminClient, settings: KafkaSettings) -> None:
    """Fail fast, with one clear line, when the cluster does not answer."""
    try:
        admin.list_topics(timeout=settings.startup_timeout_s)
    except KafkaException as error:
        raise BrokerUnavailableError(
            f"cannot reach Kafka at {settings.bootstrap_servers} within "
            f"{settings.startup_timeout_s:g}s ({_reason(error)})"
        ) from None


def topic_partitions(admin: AdminClient, topic: str, timeout_s: float) -> int | None:
    """Number of partitions of ``topic``, or None if it does not exist."""
    # Ask for all topics: a metadata request naming the topic can auto-create it on some brokers.
    metadata = admin.list_topics(timeout=timeout_s)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        return None
    return len(info.partitions)


def ensure_topic(
    admin: AdminClient,
    topic: str,
    partitions: int,
    timeout_s: float = 15.0,
    config: Mapping[str, str] | None = None,
) -> int:
    """Create ``topic`` unless it exists; returns its partition count."""
    existing = topic_partitions(admin, topic, timeout_s)
    if existing is not None:
        return existing
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=-1, config=dict(config or {}))],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    try:
        futures[topic].result(timeout=timeout_s)
    except KafkaException as error:
        if error.args and error.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return topic_partitions(admin, topic, timeout_s) or partitions
        raise TopicError(f"could not create topic {topic!r}: {_reason(error)}") from None
    logger.info("created topic %s with %d partitions", topic, partitions)
    return partitions


def _reason(error: KafkaException) -> str:
    if error.args and isinstance(error.args[0], KafkaError):
        return str(error.args[0].str())
    return str(error)
