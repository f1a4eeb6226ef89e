"""A trained model for predictions only: ``load_model(path)`` and the :class:`Predictor` it returns.

A predictor holds the model and the standardization statistics the learner had at a checkpoint
(the features' :class:`RunningStandardizer`, and for a regression the label's
:class:`TargetStandardizer`): it takes raw features and answers in the label's units, exactly as
:meth:`OnlineLearner.predict_many` does on the same state (the same operations in the same order;
``tests/training/test_predictor.py`` holds them equal). No optimizer, no compiled training path, no
Kafka.

Where a model comes from (:func:`load_model`):

- a checkpoint directory (a worker's ``--checkpoint-dir``, or a replay's ``--out``, whose
  checkpoints lie in ``checkpoints/``): its newest checkpoint that verifies, read without the
  directory's lock (the worker writing there holds it);
- a checkpoint's ``<version>.json`` (its commit marker): that checkpoint;
- a models-topic ``streamtrainer.records.model_version.ModelVersion`` (decoded), or its
  manifest saved as JSON with the artifact beside it (same name, ``.safetensors``) or at its
  ``file://`` uri: the artifact's SHA-256 is checked against the manifest's.

``Predictor.metrics`` are the prequential figures of the model at that version, named
``run.<figure>`` and ``window.<figure>`` (figures of :data:`progressive.TASK_METRICS`; undefined
ones left out) plus ``records`` (records measured): what ``streamtrainer serve``'s promotion gate
compares.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import numpy as np
import numpy.typing as npt
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from torch import nn

from streamtrainer.training.checkpoint import FORMAT as CHECKPOINT_FORMAT
from streamtrainer.training.checkpoint import Checkpoint, CheckpointStore
from streamtrainer.training.exceptions import CheckpointError
from streamtrainer.training.models import build_model, n_outputs_for
from streamtrainer.training.progressive import ProgressiveMetrics
from streamtrainer.training.scaler import RunningStandardizer, TargetStandardizer

logger = logging.getLogger(__name__)

# The checkpoint tensors of the progressive metrics (the worker's durability.PROGRESSIVE_PREFIX).
_PROGRESSIVE_PREFIX = "progressive."
# A replay's --out holds its checkpoints here.
_REPLAY_CHECKPOINTS = "checkpoints"


class VersionLike(Protocol):
    """What a predictor needs of a models-topic record (``records.model_version.ModelVersion``;
    a protocol, as training imports no other layer)."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def metrics(self) -> Mapping[str, float]: ...
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def checkpoint(self) -> Mapping[str, Any]: ...
    @property
    def artifact(self) -> bytes | None: ...
    @property
    def uri(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class _Manifest:
    """A model version's manifest read from a JSON file (its artifact beside it or at its uri)."""

    model: str
    version: int
    metrics: Mapping[str, float]
    sha256: str
    size: int
    checkpoint: Mapping[str, Any]
    artifact: bytes | None
    uri: str | None


class Predictor:
    """A model at one version, for predictions: raw features in, the label's units out.

    Built by :func:`load_model` (or :meth:`from_state`). Thread-safe for predictions (inference
    only, no state changes): ``streamtrainer serve`` shares one among its request threads.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        task: str,
        n_features: int,
        n_classes: int | None = None,
        scaler: RunningStandardizer | None = None,
        target_scaler: TargetStandardizer | None = None,
        version: int = 0,
        metrics: Mapping[str, float] | None = None,
        name: str | None = None,
        feature_names: list[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.task = task
        self.n_features = n_features
        self.n_classes = n_classes if task == "multiclass" else (2 if task == "binary" else None)
        self.scaler = scaler
        self.target_scaler = target_scaler
        self.version = version
        self.metrics: dict[str, float] = dict(metrics or {})
        self.name = name
        self.feature_names = feature_names
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._dtype = next(iter(model.parameters()), torch.zeros((), dtype=torch.float32)).dtype

    # -- building -------------------------------------------------------------------

    @classmethod
    def from_state(
        cls,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        *,
        version: int = 0,
        metrics: Mapping[str, float] | None = None,
        name: str | None = None,
        source: str = "checkpoint",
        module: nn.Module | None = None,
    ) -> Predictor:
        """A predictor from a learner's ``state()`` (a checkpoint's tensors and metadata).

        ``metrics``: None reads them from the checkpoint's progressive state (see
        :func:`checkpoint_metrics`). ``module``: the architecture to load the weights into (a copy
        of it), for a model trained from a module instance (``Worker(settings, model=module)``,
        ``OnlineLearner.from_module``), whose checkpoint names only its class; None rebuilds the
        model the checkpoint names. Raises :class:`CheckpointError` (naming ``source``) for a
        checkpoint that holds no model or one this cannot rebuild.
        """
        n_features = metadata.get("n_features")
        learner = metadata.get("learner")
        if not isinstance(n_features, int) or not isinstance(learner, dict):
            raise CheckpointError(f"{source} holds no model (no n_features or learner configuration)")
        task = str(learner.get("task", "regression"))
        n_classes = learner.get("n_classes")
        n_classes = int(n_classes) if isinstance(n_classes, int) else None
        try:
            model = (
                copy.deepcopy(module)
                if module is not None
                else build_model(
                    str(learner["model"]),
                    n_features=n_features,
                    n_outputs=n_outputs_for(task, n_classes),
                    hidden=int(learner.get("hidden", 128)),
                )
            )
            model.load_state_dict(
                {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
            )
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"{source}: cannot rebuild its model: {error}") from None
        scaler = target_scaler = None
        if learner.get("standardize", True):
            scaler = RunningStandardizer(n_features)
            scaler.load_state_dict(_prefixed(tensors, "scaler."))
        if _scales_target(learner):
            target_scaler = TargetStandardizer()
            target_scaler.load_state_dict(_prefixed(tensors, "target_scaler."))
        names = metadata.get("feature_names")
        return cls(
            model,
            task=task,
            n_features=n_features,
            n_classes=n_classes,
            scaler=scaler,
            target_scaler=target_scaler,
            version=version,
            metrics=checkpoint_metrics(tensors, metadata) if metrics is None else metrics,
            name=name,
            feature_names=[str(n) for n in names] if isinstance(names, list) else None,
            metadata=metadata,
        )

    # -- predictions ------------------------------------------------------------------

    @torch.no_grad()
    def outputs(self, features: npt.ArrayLike) -> torch.Tensor:
        """The model's raw outputs (scores, logits; a regression's standardized) for raw features."""
        x = self._features(features)
        if self.scaler is not None:
            x = self.scaler.transform(x)
        return self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self._dtype))  # type: ignore[no-any-return]

    def predict_many(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Predictions of rows of raw features: values in the label's units, or class indices
        (0/1 for a binary task), as :meth:`OnlineLearner.predict_many` gives them."""
        outputs = self.outputs(features)
        if self.task == "multiclass":
            predictions = outputs.argmax(dim=-1)
        else:
            scores = outputs.reshape(-1)
            predictions = (scores > 0).to(scores.dtype) if self.task == "binary" else scores
        values = predictions.cpu().numpy().astype(np.float64)
        if self.target_scaler is not None:
            return self.target_scaler.inverse(values)
        return values

    def predict_one(self, features: npt.ArrayLike) -> float:
        """The prediction of one row of raw features (a value, or a class index)."""
        return float(self.predict_many(np.asarray(features, dtype=np.float32).reshape(1, -1))[0])

    def predict_proba_many(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Class probabilities, one row per input row and one column per class (a binary task's
        columns: P(0), P(1)). A regression has none: ``ValueError``."""
        if self.task == "regression":
            raise ValueError("a regression model has no class probabilities (use predict_many)")
        outputs = self.outputs(features).to(torch.float64)
        if self.task == "binary":
            positive = torch.sigmoid(outputs.reshape(-1))
            probabilities = torch.stack((1.0 - positive, positive), dim=-1)
        else:
            probabilities = torch.softmax(outputs, dim=-1)
        return probabilities.cpu().numpy()

    def predict_proba_one(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Class probabilities of one row of raw features (one per class)."""
        probabilities = self.predict_proba_many(np.asarray(features, dtype=np.float32).reshape(1, -1))
        return np.asarray(probabilities[0], dtype=np.float64)

    def _features(self, features: npt.ArrayLike) -> npt.NDArray[np.float32]:
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got an array of shape {x.shape}")
        return x

    def __repr__(self) -> str:
        return (
            f"Predictor(name={self.name!r}, version={self.version}, task={self.task!r}, "
            f"n_features={self.n_features})"
        )


# -- loading ------------------------------------------------------------------------------


def load_model(source: str | Path | VersionLike, *, module: nn.Module | None = None) -> Predictor:
    """A :class:`Predictor` from a checkpoint directory, a checkpoint's ``.json``, a models-topic
    :class:`ModelVersion`, or a model version's manifest ``.json`` (see the module's docstring).

    ``module``: for a model trained from a module instance, that module (its weights are replaced
    by the checkpoint's, in a copy). Raises :class:`CheckpointError` when there is no valid model there.
    """
    if not isinstance(source, str | Path):
        return from_model_version(source, module=module)
    path = Path(source)
    if path.is_dir():
        return _from_directory(path, module)
    if path.suffix == ".json" and path.is_file():
        try:
            document = json.loads(path.read_bytes())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path} is unreadable: {error}") from None
        if isinstance(document, dict) and document.get("format") == CHECKPOINT_FORMAT:
            version = document.get("version")
            if not isinstance(version, int):
                raise CheckpointError(f"{path} names no checkpoint version")
            return from_checkpoint(CheckpointStore(path.parent).load(version), str(path), module=module)
        if isinstance(document, dict) and "sha256" in document and "checkpoint" in document:
            return _from_manifest(path, document, module)
        raise CheckpointError(f"{path} is neither a checkpoint nor a model version manifest")
    raise CheckpointError(f"{path}: no such checkpoint directory, checkpoint .json or model version manifest")


def from_model_version(
    version: VersionLike, artifact: bytes | None = None, *, module: nn.Module | None = None
) -> Predictor:
    """A predictor from a decoded models-topic record; ``artifact``: its bytes when not inline
    (None: read from its ``file://`` uri); ``module``: as :func:`load_model` takes it. The bytes'
    SHA-256 and size are checked."""
    where = f"model {version.model!r} version {version.version}"
    payload = artifact if artifact is not None else version.artifact
    if payload is None:
        payload = read_artifact_uri(version.uri, where)
    if len(payload) != version.size or hashlib.sha256(payload).hexdigest() != version.sha256:
        raise CheckpointError(f"{where}: the artifact does not match its manifest's sha256 and size")
    tensors = _tensors_of(payload, where)
    return Predictor.from_state(
        tensors,
        version.checkpoint,
        version=version.version,
        metrics={k: float(v) for k, v in version.metrics.items()},
        name=version.model,
        source=where,
        module=module,
    )


def read_artifact_uri(uri: str | None, where: str) -> bytes:
    """The bytes at a model version's ``file://`` uri (the only scheme read here)."""
    if not uri:
        raise CheckpointError(f"{where}: no inline artifact and no uri")
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise CheckpointError(f"{where}: artifact uri {uri!r}: only file:// is read")
    try:
        return Path(unquote(parsed.path)).read_bytes()
    except OSError as error:
        raise CheckpointError(f"{where}: artifact {uri} is unreadable: {error}") from None


def checkpoint_metrics(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> dict[str, float]:
    """A checkpoint's prequential figures as ``run.<figure>``, ``window.<figure>`` and ``records``
    (the models-topic convention); NaN figures left out; {} without a progressive state."""
    scalars = metadata.get("progressive")
    if not isinstance(scalars, dict):
        return {}
    arrays = {
        name.removeprefix(_PROGRESSIVE_PREFIX): tensor.numpy()
        for name, tensor in tensors.items()
        if name.startswith(_PROGRESSIVE_PREFIX)
    }
    try:
        task = str(scalars["task"])
        classes = scalars.get("n_classes") if task == "multiclass" else None
        measured = ProgressiveMetrics(task, classes, window=int(scalars["window"]))
        measured.load_state_dict(arrays, scalars)
    except (KeyError, TypeError, ValueError) as error:
        logger.warning("progressive metrics of the checkpoint unreadable: %s", error)
        return {}
    return metrics_of(measured)


def metrics_of(measured: ProgressiveMetrics) -> dict[str, float]:
    """``measured``'s figures named as a model version carries them (NaN ones left out)."""
    report = measured.report()
    named = {f"run.{k}": v for k, v in report.run.items()} | {
        f"window.{k}": v for k, v in report.window.items()
    }
    figures = {k: float(v) for k, v in named.items() if math.isfinite(v)}
    figures["records"] = float(report.records)
    return figures


def _from_directory(directory: Path, module: nn.Module | None = None) -> Predictor:
    store = CheckpointStore(directory)  # never opened: no lock (a worker may hold it)
    if not store.versions() and (directory / _REPLAY_CHECKPOINTS).is_dir():
        store = CheckpointStore(directory / _REPLAY_CHECKPOINTS)
    checkpoint = store.load_latest()
    if checkpoint is None:
        raise CheckpointError(f"{directory}: no valid checkpoint there")
    return from_checkpoint(checkpoint, f"{directory} (checkpoint {checkpoint.version})", module=module)


def from_checkpoint(
    checkpoint: Checkpoint, source: str | None = None, *, module: nn.Module | None = None
) -> Predictor:
    """A predictor from a loaded checkpoint (its version, its topic as the name; ``module``: as
    :func:`load_model` takes it)."""
    name = checkpoint.metadata.get("topic")
    return Predictor.from_state(
        checkpoint.tensors,
        checkpoint.metadata,
        version=checkpoint.version,
        name=str(name) if name is not None else None,
        source=source or str(checkpoint.path),
        module=module,
    )


def _from_manifest(path: Path, manifest: dict[str, Any], module: nn.Module | None = None) -> Predictor:
    beside = path.with_suffix(".safetensors")
    where = str(path)
    payload = beside.read_bytes() if beside.is_file() else read_artifact_uri(manifest.get("uri"), where)
    try:
        version = _Manifest(
            model=str(manifest["model"]),
            version=int(manifest["version"]),
            metrics={str(k): float(v) for k, v in dict(manifest.get("metrics", {})).items()},
            sha256=str(manifest["sha256"]),
            size=int(manifest["size"]),
            checkpoint=dict(manifest["checkpoint"]),
            artifact=None,
            uri=manifest.get("uri"),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a model version manifest ({error})") from None
    return from_model_version(version, payload, module=module)


def _tensors_of(payload: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(payload)
    except (SafetensorError, ValueError) as error:
        raise CheckpointError(f"{where}: the artifact is not a safetensors file: {error}") from None


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, npt.NDArray[np.float64]]:
    return {k.removeprefix(prefix): v.numpy() for k, v in tensors.items() if k.startswith(prefix)}


def _scales_target(learner: Mapping[str, Any]) -> bool:
    """LearnerConfig.scales_target, from a checkpoint's ``learner`` fields."""
    return bool(
        learner.get("standardize_target", False)
        and learner.get("task") == "regression"
        and learner.get("loss") in ("mse", "l1")
    )
