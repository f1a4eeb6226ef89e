"""What the worker and replay read off a Kafka message besides its value."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
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


class HeaderCodecs:
    """The codec headers of ``messages``, each read only when the decoder asks for it.

    The decoder asks only for values that are neither binary nor JSON: reading a
    record's headers makes librdkafka's binding convert them all to Python, ~1.7 us
    a record, as much as polling the record.
    """

    __slots__ = ("_messages",)

    def __init__(self, messages: Sequence[Message]) -> None:
        self._messages = messages

    def __getitem__(self, index: int, /) -> str | None:
        return codec_of(self._messages[index])


def key_bytes(message: Message) -> bytes | None:
    key = message.key()
    if key is None or isinstance(key, bytes):
        return key
    return str(key).encode()


def timestamps_of(messages: Sequence[Message]) -> npt.NDArray[np.int64]:
    """The records' timestamps in ms since the epoch, -1 where the broker gave none (one pass)."""
    if not messages:
        return np.empty(0, dtype=np.int64)
    pairs = np.array([message.timestamp() for message in messages], dtype=np.int64)
    return np.where(pairs[:, 0] != TIMESTAMP_NOT_AVAILABLE, pairs[:, 1], -1)


def timestamp_of(message: Message) -> int:
    """The record timestamp in ms since the epoch, or -1 when the broker gave none."""
    kind, value = message.timestamp()
    return int(value) if kind != TIMESTAMP_NOT_AVAILABLE else -1
