"""A trained model as one self-contained graph: TorchScript or ONNX, the standardizers folded in.

The exported graph takes raw features (``float32``, shape ``(n, n_features)``, any ``n``) and
gives what :class:`~streamtrainer.training.predictor.Predictor` gives, in float64:

- regression: ``(n,)`` predictions in the label's units (the target standardizer undone);
- binary: ``(n, 2)`` probabilities, P(0) and P(1);
- multiclass: ``(n, k)`` probabilities (softmax).

The standardization runs in float64, as the predictor's numpy code does (``(x - mean) / std``, the
same statistics), then the model in its own dtype: TorchScript agrees with the predictor to the
last bit on the built-in models, ONNX Runtime to float32 rounding (its matrix products sum in
another order); ``tests/training/test_export.py`` measures both.

ONNX needs the ``export`` extra (``pip install 'streamtrainer[export]'``: onnx, onnxscript; and
onnxruntime to run it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from streamtrainer.training.exceptions import TrainingError
from streamtrainer.training.predictor import Predictor

logger = logging.getLogger(__name__)

ExportFormat = Literal["torchscript", "onnx"]
FORMATS: tuple[ExportFormat, ...] = ("torchscript", "onnx")
INPUT_NAME = "features"
OUTPUT_NAMES = {"regression": "predictions", "binary": "probabilities", "multiclass": "probabilities"}
# ONNX opset: 18 is what torch's exporter writes best (and onnxruntime >= 1.14 runs).
ONNX_OPSET = 18


class FoldedModel(nn.Module):
    """The predictor's model with its standardizers around it: raw features in, label units out."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.model = copy.deepcopy(predictor.model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)  # an inference graph: its outputs need no autograd
        self.task = predictor.task
        self.dtype = next(iter(self.model.parameters()), torch.zeros((), dtype=torch.float32)).dtype
        n = predictor.n_features
        mean = np.zeros(n, dtype=np.float64)
        std = np.ones(n, dtype=np.float64)
        self.standardize = predictor.scaler is not None
        scaler = predictor.scaler
        if scaler is not None:
            if scaler.count == 0:
                # Nothing seen: the predictor scales every feature to 0 (transform's zeros).
                std = np.full(n, np.inf)
            else:
                mean = scaler.mean.copy()
                std = np.sqrt(scaler.m2 / scaler.count + scaler.eps)
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.label: torch.Tensor
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))
        target = predictor.target_scaler
        label = np.array([target.mean, target.std] if target is not None else [0.0, 1.0], dtype=np.float64)
        self.scales_target = target is not None
        self.register_buffer("label", torch.from_numpy(label))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Raw features (n, n_features) -> predictions (n,) or probabilities (n, classes), float64."""
        x = features
        if self.standardize:
            x = (features.to(torch.float64) - self.mean) / self.std
        outputs: torch.Tensor = self.model(x.to(self.dtype))
        if self.task == "multiclass":
            return torch.softmax(outputs.to(torch.float64), dim=-1)
        scores = outputs.reshape(-1).to(torch.float64)
        if self.task == "binary":
            positive = torch.sigmoid(scores)
            return torch.stack((1.0 - positive, positive), dim=-1)
        if self.scales_target:
            offset, scale = self.label[0], self.label[1]
            return offset + scale * scores
        return scores


def export_model(predictor: Predictor, output: Path, fmt: ExportFormat) -> Path:
    """Write ``predictor`` as one graph in ``fmt`` to ``output``; returns ``output``.

    Raises :class:`TrainingError` for a model the exporter cannot take (with its reason).
    """
    if fmt not in FORMATS:
        raise TrainingError(f"unknown export format {fmt!r} (use {', '.join(FORMATS)})")
    folded = FoldedModel(predictor).eval()
    example = torch.zeros((2, predictor.n_features), dtype=torch.float32)
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        _torchscript(folded, example, output)
    else:
        _onnx(folded, example, output, OUTPUT_NAMES[predictor.task])
    logger.info("exported %r as %s to %s", predictor, fmt, output)
    return output


def _torchscript(folded: FoldedModel, example: torch.Tensor, output: Path) -> None:
    # Traced, not scripted: a user's factory model need not be scriptable, and the graph has no
    # data-dependent branch (the task and the scalers are fixed at export).
    try:
        with torch.no_grad():
            traced = torch.jit.trace(folded, example, check_trace=True)  # type: ignore[no-untyped-call]
    except (RuntimeError, TypeError, ValueError) as error:
        raise TrainingError(f"cannot export the model as TorchScript: {error}") from None
    traced.save(str(output))


def _onnx(folded: FoldedModel, example: torch.Tensor, output: Path, output_name: str) -> None:
    try:
        import onnxscript  # noqa: F401 - torch's ONNX exporter needs it
    except ImportError:
        raise TrainingError(
            "ONNX export needs the export extra: pip install 'streamtrainer[export]'"
        ) from None
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                folded,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_shapes=({0: batch},),
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as error:  # noqa: BLE001 - the exporter raises many kinds; one line for the user
        raise TrainingError(f"cannot export the model as ONNX: {error}") from None
    if program is None:
        raise TrainingError("cannot export the model as ONNX: the exporter returned nothing")
    program.save(str(output))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch's ONNX exporter logs a warning per torchvision op it cannot register (torchvision is
    not installed: four lines) and its own deprecation notices: noise on a command's stderr."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        exporter_log.setLevel(level)
