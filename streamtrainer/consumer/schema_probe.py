"""The input schema from the log: the first record, in (partition, offset) order, that decodes.

A worker without a checkpoint or ``--n-features`` (and every replay) takes its feature
count and names from the stream. Decode order is not a stable choice: polls interleave
partitions differently from run to run, and within a batch the codecs decode in
groups. So before training, the first records of each partition are read with a
short-lived assignment (no group, nothing committed), lowest partition first, until one
decodes on its own. Costs one client and a fetch per partition (~0.1-0.3 s on the
embedded broker), once per new model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamtrainer.consumer.messages import HeaderCodecs
from streamtrainer.records import BatchDecoder

logger = logging.getLogger(__name__)

# Records of a partition read, at most, to find the first that decodes.
PROBE_RECORDS = 1000


def settle_schema_from_log(
    consumer: Consumer,
    topic: str,
    starts: Sequence[tuple[int, int, int | None]],
    decoder: BatchDecoder,
    *,
    timeout_s: float,
) -> bool:
    """Fix ``decoder``'s schema from the log (True: fixed).

    ``starts``: (partition, first offset or a logical one such as OFFSET_BEGINNING, end
    offset or None). ``consumer`` must have ``enable.partition.eof`` on; it is assigned
    each partition in turn and unassigned at the end.
    """
    deadline = time.monotonic() + timeout_s
    try:
        for partition, start, end in sorted(starts):
            if end is not None and start >= 0 and start >= end:
                continue
            consumer.assign([TopicPartition(topic, partition, start)])
            seen: list[Message] = []
            while len(seen) < PROBE_RECORDS and time.monotonic() < deadline:
                messages = consumer.consume(num_messages=PROBE_RECORDS, timeout=0.2)
                seen += [m for m in messages if m.error() is None]
                errors = [error for m in messages if (error := m.error()) is not None]
                if any(error.code() == KafkaError._PARTITION_EOF for error in errors):
                    break
            if end is not None:
                seen = [m for m in seen if (m.offset() or 0) < end]
            seen = seen[:PROBE_RECORDS]
            values = [m.value() for m in seen]
            if decoder.settle_schema(values, HeaderCodecs(seen), range(len(seen))):
                logger.info(
                    "input schema from %s[%d]: %d features%s",
                    topic,
                    partition,
                    decoder.n_features,
                    f" {list(decoder.feature_names)}" if decoder.feature_names else "",
                )
                return True
        if time.monotonic() >= deadline:
            logger.warning("no record decoded within %gs: the schema comes from the first batch", timeout_s)
        return False
    finally:
        with contextlib.suppress(KafkaException):
            consumer.unassign()
