"""Errors of the consumer layer."""

from __future__ import annotations

from streamtrainer.exceptions import StreamtrainerError


class ConsumerError(StreamtrainerError):
    """The worker cannot go on consuming."""


class DeadLetterError(ConsumerError):
    """The dead-letter topic cannot be read or written as asked."""


class CollectiveError(ConsumerError):
    """--distributed: a collective with the other ranks failed (one did not come in time, or left)."""
