"""Errors of the training layer."""

from __future__ import annotations


class TrainingError(Exception):
    """Base class of the training layer."""


class ModelSpecError(TrainingError):
    """A model name or factory cannot be turned into a model."""


class CheckpointError(TrainingError):
    """A checkpoint cannot be written, or one on disk is invalid."""


class CompactionError(TrainingError):
    """The compaction store cannot keep, spill or read back records, or is misused."""


class DivergenceError(TrainingError):
    """The model kept diverging although its learning rate was lowered as far as allowed."""


class CompiledPathRefusedError(TrainingError):
    """A compiled path cannot take this batch (nothing has moved yet): the caller takes autograd."""
