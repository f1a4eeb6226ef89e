"""Errors shared by the commands: each carries a message fit to show a user on one line."""

from __future__ import annotations


class StreamtrainerError(Exception):
    """An error the CLI reports as one line and a non-zero exit, without a traceback."""

    exit_code = 1


class ConfigurationError(StreamtrainerError):
    exit_code = 2


class BrokerUnavailableError(StreamtrainerError):
    """The Kafka cluster could not be reached."""


class EmbeddedBrokerError(StreamtrainerError):
    """The embedded Tansu broker could not be started."""


class TopicError(StreamtrainerError):
    """A topic is missing or could not be created."""
