"""Building librdkafka configuration and the admin calls every command needs."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Mapping
from typing import NoReturn

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streamtrainer import security
from streamtrainer.exceptions import (
    BrokerUnavailableError,
    ConfigurationError,
    StreamtrainerError,
    TopicError,
)
from streamtrainer.settings import KafkaSettings

logger = logging.getLogger(__name__)
LIBRDKAFKA_LOGGER = logging.getLogger("streamtrainer.librdkafka")
# librdkafka redacts its sensitive properties in its debug output; this catches anything else.
security.install_log_scrubbing(LIBRDKAFKA_LOGGER)


def client_config(settings: KafkaSettings, **overrides: object) -> dict[str, object]:
    """librdkafka config, the one place it is assembled. Later wins: ``--kafka-config-file``,
    ``--kafka-config``, ``--kafka-secret-file``, ``--bootstrap-servers``, then ``overrides``.

    Raises ConfigurationError for an unreadable file, a missing bootstrap server, or TLS
    verification turned off without ``--allow-insecure-tls``."""
    user = security.resolve(
        config_file=settings.kafka_config_file,
        kafka_config=settings.kafka_config,
        secret_files=settings.kafka_secret_file,
    )
    bootstrap = settings.bootstrap_servers or user.get("bootstrap.servers")
    if not bootstrap:
        raise ConfigurationError(
            "no Kafka bootstrap server: set --bootstrap-servers or STREAMTRAINER_BOOTSTRAP_SERVERS"
        )
    # librdkafka's own log lines go through Python logging (quiet unless debugging);
    # errors that matter reach the application through error_cb and exceptions.
    config: dict[str, object] = {"logger": LIBRDKAFKA_LOGGER, **user, "bootstrap.servers": bootstrap}
    config.update(overrides)
    security.check_tls(config, allow_insecure=settings.allow_insecure_tls)
    return config


# Group-membership settings a user may give for the worker's consumer: meaningless to a consumer that
# only assigns partitions, and some refused there (max.poll.interval.ms below the default
# session.timeout.ms is a configuration error to librdkafka).
_GROUP_ONLY = ("max.poll.interval.ms", "session.timeout.ms", "heartbeat.interval.ms", "group.instance.id")


def assigning_consumer_config(settings: KafkaSettings, **overrides: object) -> dict[str, object]:
    """:func:`client_config` for a consumer that never joins its group (direct assignment: replay,
    the schema probe, the compaction refill, the dead-letter reader)."""
    config = client_config(settings, **overrides)
    for key in _GROUP_ONLY:
        if key not in overrides:
            config.pop(key, None)
    return config


class RepeatedErrors:
    """Reports each distinct client error every few seconds, not many times a second.

    While a broker is down librdkafka repeats the same errors many times a second.
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._seen: dict[str, tuple[float, int]] = {}  # text -> (last reported, held back since)

    def admit(self, text: str) -> str | None:
        """None: held back; else a suffix to report it with (how many like it were held back)."""
        now = time.monotonic()
        last, held = self._seen.get(text, (-math.inf, 0))
        if now - last < self.interval_s:
            self._seen[text] = (last, held + 1)
            return None
        self._seen[text] = (now, 0)
        return f" ({held} more like it)" if held else ""


class _LastError:
    """The admin client's error_cb: remembers the last error (a TLS handshake failure, say), so that
    "cannot reach Kafka" can say why."""

    def __init__(self) -> None:
        self.text: str | None = None

    def __call__(self, error: KafkaError) -> None:
        self.text = security.scrub(str(error.str()))
        LIBRDKAFKA_LOGGER.debug("admin client error: %s", self.text)


def admin_client(settings: KafkaSettings) -> AdminClient:
    errors = _LastError()
    admin = AdminClient(client_config(settings, error_cb=errors))  # type: ignore[arg-type]
    admin._streamtrainer_errors = errors  # type: ignore[attr-defined]
    return admin


class ConnectInterruptedError(StreamtrainerError):
    """A signal asked to stop while waiting for the cluster to answer: exit 128 + its number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


# How long one metadata request of the reachability wait may take. librdkafka's own call does not
# return to Python (so no signal handler runs) until its timeout: in slices, SIGINT and SIGTERM
# take effect within a slice instead of after --startup-timeout-s (measured: 14 s before).
_REACHABLE_SLICE_S = 0.25


def check_reachable(
    admin: AdminClient, settings: KafkaSettings, *, stop_signal: Callable[[], int | None] | None = None
) -> None:
    """Fail fast, with one clear line, when the cluster does not answer within
    ``--startup-timeout-s``.

    The wait is made of short metadata requests: a signal handler runs between them (Python's
    default SIGINT handler raises KeyboardInterrupt there); a number from ``stop_signal`` (the
    signal a worker's handlers received) raises :class:`ConnectInterruptedError`."""
    deadline = time.monotonic() + settings.startup_timeout_s
    logger.debug("waiting up to %gs for Kafka to answer", settings.startup_timeout_s)
    signum = None
    while signum is None:
        started = time.monotonic()
        try:
            admin.list_topics(timeout=max(0.001, min(_REACHABLE_SLICE_S, deadline - started)))
            return
        except KafkaException as error:
            last_error = error
        now = time.monotonic()
        if now >= deadline:
            _unreachable(admin, settings, last_error)
        # A refused connection can fail a request at once: keep to one request per slice.
        time.sleep(max(0.0, min(started + _REACHABLE_SLICE_S, deadline) - now))
        signum = stop_signal() if stop_signal is not None else None
    where = settings.bootstrap_servers or "the --kafka-config-file's bootstrap.servers"
    name = signal.Signals(signum).name if signum in signal.Signals.__members__.values() else str(signum)
    raise ConnectInterruptedError(f"stopped by {name} while waiting for Kafka at {where}", signum)


def _unreachable(admin: AdminClient, settings: KafkaSettings, error: KafkaException) -> NoReturn:
    # The admin client's logs and errors wait in its queue until served.
    admin.poll(0)
    where = settings.bootstrap_servers or "the --kafka-config-file's bootstrap.servers"
    errors = getattr(admin, "_streamtrainer_errors", None)
    last = f"; {errors.text}" if errors is not None and errors.text else ""
    within = f"within {settings.startup_timeout_s:g}s"
    raise BrokerUnavailableError(
        security.scrub(f"cannot reach Kafka at {where} {within} ({_reason(error)}{last})")
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
