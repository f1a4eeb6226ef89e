"""``--predictions-topic``: each trained record's test-then-train prediction, as a stream.

For every record the worker trains on, the prediction its model made *before* learning from it
(the learner's pre-update prediction, the one the progressive metrics score) is written to the
predictions topic, keyed like the input record, as a JSON object::

    {"prediction": 3.21, "loss": 0.044, "model_version": 7, "topic": "sales", "partition": 0,
     "offset": 1234, "timestamp": 1796660000000, "group": "streamtrainer"}

(classification: ``prediction`` is the class index, ``class`` the same as an integer, and for a
binary model ``probability`` is P(class 1) before the update). ``model_version``
is the checkpoint the record's update lands in (the next checkpoint).

Exactly once, as a read_committed reader sees them (docs/predictions-and-versions.md): the
predictions since the last checkpoint are one transaction, committed right before the next
checkpoint is saved. A worker that dies before that commit leaves it open; the restarted worker's
producer (same ``transactional.id``) aborts it, restores the last checkpoint and reads those records
again. Whatever of this group's predictions past that checkpoint a read_committed reader can see
then (a commit that made it just before a crash that the checkpoint did not: the embedded broker
also shows aborted records) is read back from the topic (from the end offsets the checkpoint
recorded) and not written again. The same after an in-process rollback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from streamtrainer.connection import assigning_consumer_config
from streamtrainer.consumer.messages import key_bytes, timestamps_of
from streamtrainer.consumer.outputs import OutputError, TransactionalOutputs, read_back
from streamtrainer.settings import WorkerSettings
from streamtrainer.training.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

# Checkpoint metadata: the predictions topic's end offsets (per partition) after the commit that
# preceded the checkpoint; a restart reads back only what follows.
END_OFFSETS_KEY = "predictions_end_offsets"


class PredictionStream:
    """Writes pre-update predictions to the predictions topic in the worker's output transaction."""

    def __init__(self, settings: WorkerSettings, outputs: TransactionalOutputs, topic: str) -> None:
        self.settings = settings
        self.outputs = outputs
        self.topic = topic
        self.source_topic = settings.topic
        self.group = settings.group
        # (partition, offset) of records past the last checkpoint whose prediction readers see
        # already: read again after a restart or a rollback, they are not predicted again.
        self.published: set[tuple[int, int]] = set()
        self.end_offsets: dict[int, int] | None = None
        self.written = 0  # predictions produced in this run (committed or not)
        self.skipped = 0  # records read again whose prediction was out already
        # A binary model's loss is bce (the only binary loss): its loss gives P(class 1).
        self._with_probability = settings.resolved_task == "binary"
        self._classification = settings.resolved_task != "regression"
        self._reader: Consumer | None = None

    # -- writing ----------------------------------------------------------------------------

    def write(  # noqa: PLR0917 - the trained batch's parallel arrays
        self,
        records: Sequence[Message],
        rows: npt.NDArray[np.intp],
        predictions: npt.NDArray[np.float64],
        losses: npt.NDArray[np.float64],
        labels: npt.NDArray[np.float32],
        version: int,
    ) -> None:
        """Produce the predictions of ``records[rows]`` (trained, in order) made by the model that
        lands in checkpoint ``version``."""
        kept = [records[i] for i in rows.tolist()]
        if not kept:
            return
        values = predictions.tolist()
        loss_values = losses.tolist()
        stamps = timestamps_of(kept).tolist()
        probabilities: list[float] | None = None
        if self._with_probability:
            # bce's loss is -log P(label): P(class 1) is exp(-loss) for label 1, else its complement.
            p_label = np.exp(-losses)
            probabilities = np.where(labels.astype(np.float64) >= 0.5, p_label, 1.0 - p_label).tolist()
        produce, topic, published = self.outputs.produce, self.topic, self.published
        source, group = self.source_topic, self.group
        for position, message in enumerate(kept):
            partition, offset = message.partition() or 0, message.offset() or 0
            if published and (partition, offset) in published:
                self.skipped += 1
                continue
            value = values[position]
            document: dict[str, object] = {
                "prediction": value if math.isfinite(value) else None,
                "loss": loss_values[position] if math.isfinite(loss_values[position]) else None,
                "model_version": version,
                "topic": source,
                "partition": partition,
                "offset": offset,
                "timestamp": stamps[position],
                "group": group,
            }
            if self._classification and math.isfinite(value):
                document["class"] = int(value)
            if probabilities is not None and math.isfinite(probabilities[position]):
                document["probability"] = probabilities[position]
            produce(topic, key_bytes(message), orjson.dumps(document))
            self.written += 1

    # -- the transaction, with the checkpoint -------------------------------------------------

    def commit(self) -> None:
        """Commit the predictions since the last checkpoint (right before the next is saved) and note
        the topic's end offsets for it. Raises OutputError if the commit fails."""
        if self.outputs.commit():
            self.end_offsets = self._end_offsets()

    def checkpoint_metadata(self) -> dict[str, int] | None:
        """What the next checkpoint records: where a restart starts reading the topic back."""
        return {str(p): o for p, o in self.end_offsets.items()} if self.end_offsets is not None else None

    def checkpointed(self, positions: Mapping[tuple[str, int], int]) -> None:
        """A checkpoint holds these positions: records before them are never read again."""
        if self.published:
            source = self.source_topic
            self.published = {(p, o) for p, o in self.published if o >= positions.get((source, p), 0)}

    def recover(self, checkpoint: Checkpoint | None) -> None:
        """Abort what is open and find this group's predictions past ``checkpoint`` that readers see
        (at start, and after a rollback to it): those records are not predicted again."""
        self.outputs.abort()
        metadata = checkpoint.metadata if checkpoint is not None else {}
        ends = metadata.get(END_OFFSETS_KEY)
        start = {int(p): int(o) for p, o in ends.items()} if isinstance(ends, dict) else {}
        self.end_offsets = dict(start) if start else None
        positions: dict[int, int] = {}
        for key, offset in dict(metadata.get("positions", {})).items():
            topic, _, number = str(key).rpartition(":")
            if topic == self.source_topic:
                positions[int(number)] = int(offset)
        found: set[tuple[int, int]] = set()
        read = 0
        for message in read_back(self.settings, self.topic, start):
            read += 1
            try:
                document = orjson.loads(message.value() or b"")
            except orjson.JSONDecodeError:
                continue
            if not isinstance(document, dict):
                continue
            if document.get("topic") != self.source_topic or document.get("group") != self.group:
                continue
            partition, offset = document.get("partition"), document.get("offset")
            if not isinstance(partition, int) or not isinstance(offset, int):
                continue
            if offset >= positions.get(partition, 0):
                found.add((partition, offset))
        self.published = found
        if found:
            logger.info(
                "%d prediction(s) past the checkpoint are in %s already (of %d read back): not written again",
                len(found),
                self.topic,
                read,
            )

    def abort(self) -> None:
        """Abort the predictions since the last checkpoint (the worker stops without one)."""
        self.outputs.abort()

    def _end_offsets(self) -> dict[int, int]:
        if self._reader is None:
            self._reader = Consumer(
                assigning_consumer_config(
                    self.settings,
                    **{"group.id": "streamtrainer-predictions-ends", "enable.auto.commit": False},
                )
            )
        timeout = self.settings.startup_timeout_s
        metadata = self._reader.list_topics(self.topic, timeout=timeout)
        info = metadata.topics.get(self.topic)
        if info is None or info.error is not None:
            raise OutputError(f"predictions topic {self.topic!r} is not there")
        ends = {}
        for partition in sorted(info.partitions):
            _, high = self._reader.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=timeout, cached=False
            )
            ends[partition] = high
        return ends

    def close(self) -> None:
        """Close the end-offset reader (the producer is the worker's, closed with it)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
