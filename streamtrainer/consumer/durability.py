"""Checkpoint, then commit; and restore: how a worker's model and offsets move together.

Auto-commit and the automatic offset store are off. A checkpoint holds the model, optimizer and
scaler state *and*, per partition, the next offset to read; offsets are committed to Kafka only
after the checkpoint that contains them is durable. A restore adopts a checkpoint's model and
positions together (at start, and on every rollback). See docs/semantics.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from confluent_kafka import KafkaException

from streamtrainer.consumer.compactor import Compactor
from streamtrainer.consumer.dead_letter import DeadLetterQueue
from streamtrainer.consumer.error_budget import ErrorBudget
from streamtrainer.consumer.exceptions import DeadLetterError
from streamtrainer.consumer.membership import Membership
from streamtrainer.consumer.model_state import ModelState, new_decoder, new_drift_detector
from streamtrainer.consumer.model_versions import PUBLISHED_KEY as MODELS_PUBLISHED
from streamtrainer.consumer.model_versions import VersionPublisher
from streamtrainer.consumer.offsets import OffsetTracker, Partition
from streamtrainer.consumer.outputs import OutputError
from streamtrainer.consumer.predictions import END_OFFSETS_KEY as PREDICTIONS_END_OFFSETS
from streamtrainer.consumer.predictions import PredictionStream
from streamtrainer.exceptions import ConfigurationError
from streamtrainer.metrics import WorkerMetrics
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import OnlineLearner, ProgressiveMetrics
from streamtrainer.training.checkpoint import Checkpoint, CheckpointStore
from streamtrainer.training.exceptions import CheckpointError, TrainingError

logger = logging.getLogger(__name__)

# Checkpoint tensors of the progressive metrics (their scalars are the metadata's "progressive").
PROGRESSIVE_PREFIX = "progressive."


class Durability:
    """Owns what is durable and what is not yet: the checkpoint store, checkpoint-then-commit, restore.

    Also the records applied to the model per partition over its whole history (``applied``), the
    version of the newest checkpoint (``model_version``), whether anything changed since it (the
    dirty flags, and so whether one is due), and the dead-letter bookkeeping a checkpoint records
    or waits for (records sent already, unconfirmed sends, the dead-letter topic's end offsets).
    ``create_learner`` builds a learner of n features (the worker's, so a subclass may time it).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        state: ModelState,
        membership: Membership,
        *,
        prequential: ProgressiveMetrics,
        error_budget: ErrorBudget,
        compactor: Compactor | None,
        create_learner: Callable[[int], OnlineLearner],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = state
        self.membership = membership
        self.prequential = prequential
        self.error_budget = error_budget
        self.compactor = compactor
        self.create_learner = create_learner
        self.store = CheckpointStore(settings.checkpoint_dir, keep=settings.checkpoint_keep)
        # Records applied to the model, per partition, over the model's whole history.
        self.applied: dict[Partition, int] = {}
        self.model_version = 0
        self.dirty = False
        self.since_checkpoint = 0
        self.last_checkpoint = 0.0
        # --fresh: checkpoints up to this version belong to the model it ignores.
        self.fresh_floor = 0
        # One guard rollback per checkpoint: set by it, cleared by the next checkpoint.
        self.guard_rolled_back = False
        self.dead_letters: DeadLetterQueue | None = None
        self.dead_letters_unconfirmed = False
        # (partition, offset) of the records this group dead-lettered past the last checkpoint (and,
        # after a restart, found in the dead-letter topic): read again after a rollback or a restart,
        # they are neither sent nor counted as invalid again.
        self.dead_lettered: set[tuple[int, int]] = set()
        # The dead-letter topic's end offsets (per partition) the next checkpoint records.
        self.dlq_ends: dict[int, int] | None = None
        self.dlq_ends_stale = False
        # --predictions-topic and the models topic (opened by the worker's run()): the predictions'
        # transaction commits right before a checkpoint is saved, a version is published right after.
        self.predictions: PredictionStream | None = None
        self.versions: VersionPublisher | None = None
        self._next_version: int | None = None

    @property
    def next_version(self) -> int:
        """The version the next checkpoint gets (what the records trained now land in)."""
        if self._next_version is None:
            self._next_version = self.store.latest_version() + 1
        return self._next_version

    # -- at start -----------------------------------------------------------------

    def load_at_start(self) -> Checkpoint | None:
        """The checkpoint to resume from (None with --fresh, or none there), refused if not ours."""
        settings = self.settings
        if settings.fresh:
            logger.info("--fresh: ignoring checkpoints in %s", settings.checkpoint_dir)
            # Rollbacks must not go back to the checkpoints --fresh ignores either.
            self.fresh_floor = self.store.latest_version()
            return None
        checkpoint = self.store.load_latest()
        self.check_binding(checkpoint)
        return checkpoint

    def check_binding(self, checkpoint: Checkpoint | None) -> None:
        """Refuse a checkpoint of another topic, group or input schema (before connecting: exit 2)."""
        if checkpoint is None:
            return
        settings, metadata = self.settings, checkpoint.metadata
        topic = metadata.get("topic")
        if topic is None:  # checkpoints before the topic was recorded: their positions name it
            topics = {str(key).rpartition(":")[0] for key in dict(metadata.get("positions", {}))}
            topic = topics.pop() if len(topics) == 1 else None
        group = metadata.get("group")
        where = f"{settings.checkpoint_dir} (checkpoint {checkpoint.version})"
        if (topic is not None and topic != settings.topic) or (group is not None and group != settings.group):
            raise ConfigurationError(
                f"{where} holds the model of topic {topic!r}, group {group!r}, not of topic "
                f"{settings.topic!r}, group {settings.group!r}: use another --checkpoint-dir, --fresh "
                f"to start a new model there, or --init-from to take that model across on purpose"
            )
        n_features, names = metadata.get("n_features"), metadata.get("feature_names")
        wanted = settings.n_features
        if wanted is not None and isinstance(n_features, int) and n_features != wanted:
            raise ConfigurationError(
                f"{where} holds a model of {n_features} features, not --n-features {settings.n_features}"
            )
        if settings.feature_names is not None and isinstance(names, list) and names != settings.feature_names:
            raise ConfigurationError(
                f"{where} holds a model of features {names}, not --feature-names {settings.feature_names}"
            )

    def initialise_from(self, directory: Path) -> None:
        """Adopt the model of another run's newest checkpoint (a replay's, say), but not its offsets."""
        if not directory.is_dir():
            raise CheckpointError(f"--init-from {directory}: no such directory")
        # Read only: no lock taken, so the source may belong to a running worker or replay.
        checkpoint = CheckpointStore(directory).load_latest()
        if checkpoint is None:
            raise CheckpointError(f"--init-from {directory}: no valid checkpoint there")
        n_features = checkpoint.metadata.get("n_features")
        if not isinstance(n_features, int):
            raise CheckpointError(f"--init-from {directory}: checkpoint {checkpoint.version} holds no model")
        learner = self.create_learner(n_features)
        where = f"--init-from {directory}: checkpoint {checkpoint.version}"
        try:
            learner.load_initial_state(checkpoint.tensors, checkpoint.metadata, where)
        except TrainingError as error:
            raise CheckpointError(f"--init-from {directory}: {error}") from None
        self.state.learner = learner
        names = checkpoint.metadata.get("feature_names")
        self.state.decoder = new_decoder(
            self.settings, n_features, names if isinstance(names, list) else None
        )
        logger.info(
            "initialised the model from %s checkpoint %d (%s records applied there)",
            directory,
            checkpoint.version,
            checkpoint.metadata.get("records_applied", "?"),
        )

    def find_dead_lettered_since(self, checkpoint: Checkpoint | None) -> None:
        """The records this group dead-lettered after ``checkpoint`` (it will read them again).

        The checkpoint records the dead-letter topic's end offsets; only what was written since is
        read (after a stop on the error budget: its last window, a few hundred records at most).
        Without a checkpoint (a worker stopped before its first) the whole topic is read.
        """
        assert self.dead_letters is not None
        ends = checkpoint.metadata.get("dlq_end_offsets") if checkpoint is not None else None
        since = {int(p): int(o) for p, o in ends.items()} if isinstance(ends, dict) else None
        self.dead_lettered = self.dead_letters.already_dead_lettered(since)
        self.dlq_ends = since
        self.note_dead_letter_ends()
        if self.dead_lettered:
            logger.info(
                "%d record(s) after checkpoint %d are in the dead-letter topic already: not sent again",
                len(self.dead_lettered),
                self.model_version,
            )

    def note_dead_letter_ends(self) -> None:
        """Where the dead-letter topic ends now, for the next checkpoint: after a restart only what
        follows is searched for records sent already. A watermark query (~1 ms), made at start and
        at a checkpoint after records were dead-lettered; if it fails the older ends stay (a restart
        then reads more).
        """
        if self.dead_letters is None:
            return
        try:
            self.dlq_ends = self.dead_letters.end_offsets()
            self.dlq_ends_stale = False
        except (KafkaException, DeadLetterError) as error:
            logger.warning("could not read the dead-letter topic's end offsets: %s", error)

    # -- restore ------------------------------------------------------------------

    def latest_checkpoint(self) -> Checkpoint | None:
        """The checkpoint a rollback goes back to: the newest, but none that --fresh ignored."""
        checkpoint = self.store.load_latest()
        if checkpoint is not None and checkpoint.version <= self.fresh_floor:
            return None
        return checkpoint

    def restore(self, checkpoint: Checkpoint | None) -> None:
        """Adopt a checkpoint's model and positions (None: start from nothing)."""
        settings, state = self.settings, self.state
        state.offsets = OffsetTracker()
        self.applied = {}
        if checkpoint is None:
            state.learner = None
            state.decoder = new_decoder(settings, settings.n_features, settings.feature_names)
            self.error_budget.restore(None)
            self.prequential.reset()
            state.drift = new_drift_detector(settings)
            if self.compactor is not None:
                self.compactor.restore(None)
            return
        metadata = checkpoint.metadata
        n_features = metadata.get("n_features")
        if isinstance(n_features, int):
            state.learner = self.create_learner(n_features)
            state.learner.load_state(checkpoint.tensors, metadata)
            names = metadata.get("feature_names")
            state.decoder = new_decoder(settings, n_features, names if isinstance(names, list) else None)
        for key, offset in dict(metadata.get("positions", {})).items():
            topic, _, partition = str(key).rpartition(":")
            state.offsets.done(topic, int(partition), int(offset) - 1)
        state.offsets.mark_committed([])
        for key, count in dict(metadata.get("applied", {})).items():
            topic, _, partition = str(key).rpartition(":")
            self.applied[(topic, int(partition))] = int(count)
        if self.compactor is not None:
            self.compactor.restore(metadata.get("compaction"))
        self.error_budget.restore(metadata.get("error_budget"))
        self._restore_progressive(checkpoint)
        state.drift = new_drift_detector(settings)
        if state.drift is not None:
            state.drift.load_state_dict(metadata.get("drift"))
        self.model_version = checkpoint.version
        self.metrics.model_version.set(checkpoint.version)
        created = metadata.get("created_at")
        if isinstance(created, str):
            with contextlib.suppress(ValueError):
                self.metrics.last_checkpoint_timestamp.set(datetime.fromisoformat(created).timestamp())
        logger.info(
            "resumed from checkpoint %d (%d records applied; positions %s)",
            checkpoint.version,
            sum(self.applied.values()),
            metadata.get("positions"),
        )

    def _restore_progressive(self, checkpoint: Checkpoint) -> None:
        """The progressive metrics as at ``checkpoint``: the records read again are measured again.

        A checkpoint without them (written before they were saved) or of another task starts them
        afresh, with a warning.
        """
        scalars = checkpoint.metadata.get("progressive")
        arrays = {
            name.removeprefix(PROGRESSIVE_PREFIX): tensor.numpy()
            for name, tensor in checkpoint.tensors.items()
            if name.startswith(PROGRESSIVE_PREFIX)
        }
        if not isinstance(scalars, dict):
            logger.warning(
                "checkpoint %d holds no progressive metrics: they start again from this record",
                checkpoint.version,
            )
            self.prequential.reset()
            return
        try:
            self.prequential.load_state_dict(arrays, scalars)
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("checkpoint %d: progressive metrics not restored (%s)", checkpoint.version, error)
            self.prequential.reset()

    def forget_since_checkpoint(self) -> None:
        """A rollback: nothing applied since the last checkpoint remains to be made durable."""
        self.dead_letters_unconfirmed = False
        self.dirty = False
        self.since_checkpoint = 0

    # -- checkpoint, then commit --------------------------------------------------

    def mark_read(self, records: int) -> None:
        """Offsets moved (even for invalid records): the next checkpoint has something to record."""
        self.dirty = True
        self.since_checkpoint += records

    def due(self, now: float) -> bool:
        """Something to make durable, and enough records or time since the last checkpoint."""
        settings = self.settings
        return self.dirty and (
            self.since_checkpoint >= settings.checkpoint_every_records
            or now - self.last_checkpoint >= settings.checkpoint_interval_s
        )

    def checkpoint_and_commit(self) -> None:
        """Make everything applied so far durable, then tell Kafka (never the other way round).

        Only between updates (the model and the offsets agree only then): the worker finishes the
        update in flight first.
        """
        if not self.dirty:
            return
        if self.dead_letters_unconfirmed:
            logger.warning(
                "not checkpointing: invalid records are not yet confirmed in the dead-letter topic"
            )
            return
        settings, state = self.settings, self.state
        started = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict[str, object] = {}
        if state.learner is not None:
            tensors, metadata = state.learner.state()
            metadata["feature_names"] = (
                list(state.decoder.feature_names) if state.decoder.feature_names is not None else None
            )
        metadata.update(
            positions={f"{t}:{p}": o for (t, p), o in state.offsets.positions().items()},
            applied={f"{t}:{p}": n for (t, p), n in self.applied.items()},
            records_applied=sum(self.applied.values()),
            config_digest=settings.digest(),
            topic=settings.topic,
            group=settings.group,
            error_budget=self.error_budget.state(),
        )
        if state.drift is not None:
            metadata["drift"] = state.drift.state_dict()
        if self.dlq_ends_stale:
            self.note_dead_letter_ends()
        if self.dlq_ends is not None:
            metadata["dlq_end_offsets"] = {str(p): o for p, o in self.dlq_ends.items()}
        if self.predictions is not None:
            # Before the checkpoint: a crash between the two leaves the predictions visible and the
            # restarted worker finds them (recover); the other way round they would be lost.
            self.predictions.commit()
            if (ends := self.predictions.checkpoint_metadata()) is not None:
                metadata[PREDICTIONS_END_OFFSETS] = ends
        if self.versions is not None and (published := self.versions.checkpoint_metadata()) is not None:
            metadata[MODELS_PUBLISHED] = published
        compaction = self.compactor.checkpoint_metadata(settings.topic) if self.compactor else None
        if compaction is not None:
            metadata["compaction"] = compaction
        # The progressive metrics (whole run and window) go with the model they measured.
        arrays, metadata["progressive"] = self.prequential.state_dict()
        tensors.update(
            {
                f"{PROGRESSIVE_PREFIX}{name}": torch.from_numpy(np.ascontiguousarray(a))
                for name, a in arrays.items()
            }
        )
        try:
            checkpoint = self.store.save(tensors, metadata)
        except (CheckpointError, OSError) as error:
            # Not fatal: offsets stay uncommitted, so nothing is lost; the next attempt may succeed.
            self.metrics.checkpoint_failures.inc()
            logger.error("checkpoint failed, offsets not committed: %s", error)
            return
        self.model_version = checkpoint.version
        self._next_version = checkpoint.version + 1
        self.guard_rolled_back = False
        if self.predictions is not None:
            self.predictions.checkpointed(state.offsets.positions())
        if self.dead_lettered:
            # A rollback goes back no further than this checkpoint: forget what it cannot read again.
            topic, positions = settings.topic, state.offsets.positions()
            self.dead_lettered = {
                (partition, offset)
                for partition, offset in self.dead_lettered
                if offset >= positions.get((topic, partition), 0)
            }
        if self.compactor is not None:
            self.compactor.checkpointed()
        self.dirty = False
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        if self.versions is not None and self.versions.due(checkpoint.version):
            try:
                self.versions.publish(checkpoint, self.prequential.report())
            except (OutputError, KafkaException, OSError) as error:
                # Not fatal: the checkpoint stands; a restart publishes its newest one if missing.
                logger.error("model version %d not published: %s", checkpoint.version, error)
        self.commit()
        self.metrics.checkpoints.inc()
        self.metrics.model_version.set(checkpoint.version)
        self.metrics.last_checkpoint_timestamp.set(time.time())
        self.metrics.checkpoint_duration.observe(time.perf_counter() - started)

    def commit(self) -> None:
        """Commit the checkpointed positions of the partitions this worker commits (``committable``)."""
        consumer = self.membership.consumer
        if consumer is None:
            return
        pending = self.state.offsets.pending(self.membership.committable())
        if not pending:
            return
        try:
            consumer.commit(offsets=pending, asynchronous=False)
        except KafkaException as error:
            # Not fatal: the checkpoint is the source of truth; Kafka's offsets catch up next time.
            logger.warning("offset commit failed: %s", error)
            return
        self.state.offsets.mark_committed(pending)
        self.metrics.offsets_committed.inc()
