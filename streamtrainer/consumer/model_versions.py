"""``--publish-models`` / ``--models-topic``: each checkpoint (or every N) as a model version.

Right after a checkpoint is saved, its model is published to the compacted models topic
(``<topic>.models`` by default; key: the model's name) as one :class:`ModelVersion` record
(records/model_version.py): the manifest (version = the checkpoint's, offsets per partition, the
prequential metrics ``run.<figure>``/``window.<figure>``/``records``, the schema hash, the
artifact's SHA-256 and size, the checkpoint's metadata) and the checkpoint's safetensors bytes,
inline up to ``--models-inline-limit-bytes``; a larger artifact is written durably to
``<checkpoint-dir>/versions/<version>.safetensors`` (beside its manifest, ``<version>.json``; the
newest ``--models-keep-files`` kept) and the record carries its ``file://`` uri instead.

Each version is a transaction of its own: a read_committed reader never sees half of one. A worker
that dies between the checkpoint and the commit leaves the version unpublished (or its transaction
open: the restarted worker's producer aborts it); at start the worker looks for its newest
checkpoint's version in the topic (from where the previous publication was, which the checkpoint
records) and publishes it if it is not there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import orjson
from confluent_kafka import Message

from streamtrainer.consumer.outputs import OutputError, TransactionalOutputs, read_back
from streamtrainer.records.model_version import (
    ModelVersion,
    ModelVersionError,
    artifact_digest,
    decode,
    encode,
    schema_hash,
)
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import ProgressiveReport
from streamtrainer.training.checkpoint import Checkpoint, write_durably

logger = logging.getLogger(__name__)

# Checkpoint metadata: where the previous version was published ({"version", "partition", "offset"}).
PUBLISHED_KEY = "models_published"
VERSIONS_DIR = "versions"


def version_metrics(report: ProgressiveReport) -> dict[str, float]:
    """A version's ``metrics``: ``run.<figure>``, ``window.<figure>`` (NaN left out) and ``records``."""
    metrics: dict[str, float] = {}
    for scope, values in (("run", report.run), ("window", report.window)):
        for name, value in values.items():
            if math.isfinite(value):
                metrics[f"{scope}.{name}"] = float(value)
    metrics["records"] = float(report.records)
    return metrics


class VersionPublisher:
    """Publishes checkpoints as model versions in their own transactions (see the module's text)."""

    def __init__(self, settings: WorkerSettings, outputs: TransactionalOutputs, topic: str) -> None:
        self.settings = settings
        self.outputs = outputs
        self.topic = topic
        self.model = settings.resolved_model_name
        self.every = settings.models_every_checkpoints
        self.inline_limit = settings.models_inline_limit_bytes
        self.keep_files = settings.models_keep_files
        self.directory = settings.checkpoint_dir / VERSIONS_DIR
        self.last: dict[str, int] | None = None  # where the newest version this worker knows of lies
        self.published = 0  # versions published in this run

    def due(self, version: int) -> bool:
        """Whether checkpoint ``version`` is published (a multiple of --models-every-checkpoints)."""
        return version % self.every == 0

    def checkpoint_metadata(self) -> dict[str, int] | None:
        """What the next checkpoint records: where the previous version was published."""
        return dict(self.last) if self.last is not None else None

    def build(self, checkpoint: Checkpoint, report: ProgressiveReport) -> ModelVersion:
        """The version of ``checkpoint`` (its artifact inline, or written to the versions directory)."""
        metadata = checkpoint.metadata
        artifact = checkpoint.path.with_suffix(".safetensors").read_bytes()
        digest = artifact_digest(artifact)
        names = metadata.get("feature_names")
        n_features = metadata.get("n_features")
        version = ModelVersion(
            model=self.model,
            version=checkpoint.version,
            created_at=time.time(),
            offsets={str(k): int(v) for k, v in dict(metadata.get("positions", {})).items()},
            records_applied=int(metadata.get("records_applied", 0)),
            metrics=version_metrics(report),
            schema_hash=schema_hash(
                n_features if isinstance(n_features, int) else None,
                [str(n) for n in names] if isinstance(names, list) else None,
                str(metadata.get("task", self.settings.resolved_task)),
            ),
            sha256=digest,
            size=len(artifact),
            checkpoint=metadata,
            artifact=artifact if len(artifact) <= self.inline_limit else None,
        )
        if version.artifact is None:
            uri = self._write_file(version, artifact)
            version = dataclasses.replace(version, uri=uri)
        return version

    def publish(self, checkpoint: Checkpoint, report: ProgressiveReport) -> None:
        """Publish ``checkpoint`` as a version, in a transaction of its own. Raises OutputError."""
        started = time.perf_counter()
        version = self.build(checkpoint, report)
        value = encode(version)
        where: dict[str, int] = {}

        def delivered(message: Message) -> None:
            where.update(partition=message.partition() or 0, offset=message.offset() or 0)

        if self.outputs.in_transaction:
            raise OutputError("a model version is published in a transaction of its own")
        self.outputs.produce(self.topic, self.model.encode(), value, on_delivery=delivered)
        self.outputs.flush()
        self.outputs.commit()
        if where:
            self.last = {"version": version.version, **where}
        self.published += 1
        logger.info(
            "published %s version %d to %s (%d bytes, %s) in %.0f ms",
            self.model,
            version.version,
            self.topic,
            version.size,
            "inline" if version.artifact is not None else version.uri,
            (time.perf_counter() - started) * 1e3,
        )

    def recover(self, checkpoint: Checkpoint | None, report: ProgressiveReport) -> None:
        """At start: publish ``checkpoint`` (the newest) if it is due and not in the topic yet (the
        worker stopped between saving it and publishing it)."""
        if checkpoint is None:
            return
        previous = checkpoint.metadata.get(PUBLISHED_KEY)
        start: dict[int, int] = {}
        if isinstance(previous, dict):
            self.last = {str(k): int(v) for k, v in previous.items()}
            start = {int(previous["partition"]): int(previous["offset"]) + 1}
        if not self.due(checkpoint.version):
            return
        for message in read_back(self.settings, self.topic, start):
            if message.key() != self.model.encode() or not message.value():
                continue
            try:
                found = decode(message.value() or b"")
            except ModelVersionError:
                continue
            if found.version == checkpoint.version:
                self.last = {
                    "version": found.version,
                    "partition": message.partition() or 0,
                    "offset": message.offset() or 0,
                }
                return
        logger.info("checkpoint %d was not published yet: publishing it now", checkpoint.version)
        self.publish(checkpoint, report)

    def _write_file(self, version: ModelVersion, artifact: bytes) -> str:
        """Write a too-large artifact (and its manifest) durably; keep the newest files; its uri."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{version.version}.safetensors"
        write_durably(path, artifact, sync_directory=True)
        manifest = {**version.manifest(), "uri": path.resolve().as_uri(), "inline": False}
        write_durably(
            path.with_suffix(".json"), orjson.dumps(manifest, option=orjson.OPT_INDENT_2), sync_directory=True
        )
        kept = sorted(
            (int(entry.stem) for entry in self.directory.glob("*.safetensors") if entry.stem.isdigit()),
        )
        for old in kept[: max(0, len(kept) - self.keep_files)]:
            (self.directory / f"{old}.json").unlink(missing_ok=True)
            (self.directory / f"{old}.safetensors").unlink(missing_ok=True)
        return path.resolve().as_uri()
