"""Errors of the training layer."""

from __future__ import annotations


class TrainingError(Exception):
    """Base class of the training layer."""


class ModelSpecError(TrainingError):
    """A model name or factory cannot be turned into a model."""
