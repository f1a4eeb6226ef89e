"""Errors raised while encoding or decoding samples."""

from __future__ import annotations

from typing import Final

# Bounded set of reasons: they become a Prometheus label, so never a free-form string.
DECODE_REASONS: Final = (
    "invalid_json",
    "not_an_object",
    "missing_field",
    "non_numeric",
    "wrong_feature_count",
    "unknown_feature_names",
    "non_finite",
    "bad_binary_length",
    "unknown_codec",
    "empty_value",
    "label_out_of_range",
    "oversize",
)


class RecordsError(Exception):
    """Base class of the records layer."""


class DecodeError(RecordsError):
    """A record value could not be turned into a sample.

    ``reason`` is one of :data:`DECODE_REASONS` (safe as a metric label);
    ``detail`` is the human-readable explanation.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown decode reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class EncodeError(RecordsError):
    """A sample cannot be written in the requested codec."""
