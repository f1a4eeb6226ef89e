"""What the worker and replay read off a Kafka message besides its value."""

from __future__ import annotations

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from streamtrainer.records import CODEC_HEADER


def codec_of(message: Message) -> str | None:
    """The codec a record names in its header (None: no header, the default codec)."""
    headers = message.headers()
    if not headers:
        return None
    for header in headers:
        name, value = header[0], header[1]
        if name == CODEC_HEADER:
            if isinstance(value, bytes):
                return value.decode(errors="replace")
            return value or ""
    return None


def key_bytes(message: Message) -> bytes | None:
    key = message.key()
    if key is None or isinstance(key, bytes):
        return key
    return str(key).encode()


def timestamp_of(message: Message) -> int:
    """The record timestamp in ms since the epoch, or -1 when the broker gave none."""
    kind, value = message.timestamp()
    return int(value) if kind != TIMESTAMP_NOT_AVAILABLE else -1
