"""Where served versions come from: a checkpoint directory, or the compacted models topic.

Each source runs on a thread of its own and offers every version newer than the last it offered to
the :class:`~streamtrainer.serving.slot.ModelSlot` (which gates it). A version that cannot be loaded
(a torn or corrupted file, a checksum mismatch, an undecodable record) is counted and skipped; the
served model stays.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamtrainer.connection import assigning_consumer_config
from streamtrainer.records.model_version import ModelVersion, ModelVersionError, decode
from streamtrainer.serving.slot import ModelSlot
from streamtrainer.settings import KafkaSettings
from streamtrainer.training.checkpoint import CheckpointStore
from streamtrainer.training.exceptions import CheckpointError
from streamtrainer.training.predictor import Predictor, from_checkpoint, from_model_version

logger = logging.getLogger(__name__)

# The models topic's suffix: `<topic>.models` holds the versions of the model of <topic>.
MODELS_SUFFIX = ".models"


def default_model_name(models_topic: str) -> str:
    """The key served by default: the models topic's name without its ``.models`` suffix."""
    return models_topic.removesuffix(MODELS_SUFFIX)


class _Source:
    """A thread that offers versions to a slot until stopped."""

    def __init__(self, slot: ModelSlot, name: str) -> None:
        self.slot = slot
        self.stopping = threading.Event()
        self.offered = 0  # the newest version offered (or found unloadable)
        self._thread = threading.Thread(target=self._run_logged, name=name, daemon=True)

    def start(self) -> None:
        """Start following the source (returns at once)."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop following it and wait for the thread to end."""
        self.stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception:  # a thread's death must be logged, not silent
            logger.exception("%s stopped on an error", self._thread.name)
            raise

    def run(self) -> None:
        """The thread's loop (until ``stopping`` is set)."""
        raise NotImplementedError

    def _offer(self, version: int, load: Callable[[], Predictor]) -> None:
        self.offered = max(self.offered, version)
        try:
            candidate = load()
        except CheckpointError as error:
            self.slot.metrics.invalid.inc()
            logger.warning("version %d not loaded: %s", version, error)
            return
        self.slot.offer(candidate)


class CheckpointDirSource(_Source):
    """Offers the newest valid checkpoint of a directory, looking again every ``interval_s``.

    Reads without the directory's lock (the worker writing there holds it): a checkpoint exists once
    its JSON marker is in place, and one that fails its checksum is skipped (the previous one loads).
    """

    def __init__(self, slot: ModelSlot, directory: Path, *, interval_s: float = 1.0) -> None:
        super().__init__(slot, "serve-checkpoints")
        self.directory = directory
        self.interval_s = interval_s

    def poll_once(self) -> None:
        """Offer the newest checkpoint if it is newer than the last offered."""
        store = CheckpointStore(self.directory)  # never opened: no lock taken
        if store.latest_version() <= self.offered:
            return
        checkpoint = store.load_latest()
        if checkpoint is None or checkpoint.version <= self.offered:
            return
        self._offer(checkpoint.version, lambda: from_checkpoint(checkpoint))

    def run(self) -> None:
        """Poll until stopped."""
        while not self.stopping.is_set():
            try:
                self.poll_once()
            except OSError as error:
                logger.warning("reading %s: %s", self.directory, error)
            self.stopping.wait(self.interval_s)


class ModelsTopicSource(_Source):
    """Follows ``model``'s key on the compacted models topic, ``read_committed``, from its beginning.

    Until every partition's end is reached it keeps only the newest version read (a compacted topic
    may still hold older ones), then offers it; after that each newer version as it arrives. A
    partition-less (not yet created) topic is waited for.
    """

    def __init__(self, slot: ModelSlot, settings: KafkaSettings, topic: str, model: str) -> None:
        super().__init__(slot, "serve-models-topic")
        self.settings = settings
        self.topic = topic
        self.model = model
        self.caught_up = threading.Event()  # every partition read to its end once
        self._config = assigning_consumer_config(
            settings,
            **{
                # A throwaway group id that never joins: partitions are assigned, nothing committed.
                "group.id": f"streamtrainer-serve-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                # A version is read once its transaction committed: never a half-published one.
                "isolation.level": "read_committed",
            },
        )

    def run(self) -> None:
        """Read until stopped."""
        consumer = Consumer(self._config)
        try:
            partitions = self._wait_for_partitions(consumer)
            if partitions is None:
                return
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
            pending = set(partitions)
            newest: ModelVersion | None = None
            while not self.stopping.is_set():
                message = consumer.poll(0.2)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(message.partition() or 0)
                        if not pending and not self.caught_up.is_set():
                            self.caught_up.set()
                            if newest is not None:
                                self._offer_version(newest)
                                newest = None
                        continue
                    logger.warning("reading %s: %s", self.topic, error.str())
                    continue
                version = self._decode(message)
                if version is None or version.version <= self.offered:
                    continue
                if not self.caught_up.is_set():
                    if newest is None or version.version > newest.version:
                        newest = version
                    continue
                self._offer_version(version)
        finally:
            consumer.close()

    def _wait_for_partitions(self, consumer: Consumer) -> list[int] | None:
        warned = False
        while not self.stopping.is_set():
            try:
                metadata = consumer.list_topics(self.topic, timeout=self.settings.startup_timeout_s)
            except KafkaException as error:
                logger.warning("reading the metadata of %s: %s", self.topic, error)
                self.stopping.wait(1.0)
                continue
            info = metadata.topics.get(self.topic)
            if info is not None and info.error is None and info.partitions:
                return sorted(info.partitions)
            if not warned:
                logger.warning("models topic %s does not exist yet: waiting for it", self.topic)
                warned = True
            self.stopping.wait(1.0)
        return None

    def _decode(self, message: Message) -> ModelVersion | None:
        key = message.key()
        value = message.value()
        if value is None or key is None or key.decode(errors="replace") != self.model:
            return None  # a tombstone, or another model's version
        try:
            return decode(value)
        except ModelVersionError as error:
            self.slot.metrics.invalid.inc()
            logger.warning(
                "%s[%s]@%s is not a model version: %s",
                self.topic,
                message.partition(),
                message.offset(),
                error,
            )
            return None

    def _offer_version(self, version: ModelVersion) -> None:
        self._offer(version.version, lambda: from_model_version(version))
