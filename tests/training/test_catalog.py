"""One catalog of models, losses and tasks: everything that lists them reads it."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

from streamtrainer import settings
from streamtrainer.training import catalog, kernels, optimizers
from streamtrainer.training.learner import LearnerConfig, OnlineLearner, make_optimizer
from streamtrainer.training.models import build_model

PACKAGE = Path(__file__).resolve().parents[2] / "streamtrainer"


def test_the_optimizers_the_learner_makes_are_the_catalogs() -> None:
    assert tuple(optimizers.KINDS.values()) == catalog.OPTIMIZERS
    for name in catalog.OPTIMIZERS:
        assert (
            optimizers.optimizer_kind(make_optimizer(name, [torch.zeros(1, requires_grad=True)], 0.1)) == name
        )


def test_the_settings_choices_are_the_catalogs() -> None:
    assert typing.get_args(settings.OptimizerName) == catalog.OPTIMIZERS
    assert typing.get_args(settings.LossName) == ("auto", *catalog.LOSSES)
    assert typing.get_args(settings.Task) == catalog.TASKS


def test_every_loss_fits_its_task_in_the_learner_and_no_other() -> None:
    for name, entry in catalog.LOSSES.items():
        for task in catalog.TASKS:
            model = "audit" if name == "audit" else "linear"
            config = LearnerConfig(model=model, task=task, loss=name, n_classes=3, fused=False)
            if task == entry.task:
                assert OnlineLearner(config, 4).config.resolved_loss == name
            elif name != "audit":
                with pytest.raises(Exception, match="does not fit"):
                    OnlineLearner(config, 4)


def test_the_kernels_compute_exactly_the_catalogs_kernel_losses() -> None:
    assert {
        n: e.kernel_code for n, e in catalog.LOSSES.items() if e.kernel_code is not None
    } == kernels.LOSS_CODES
    assert set(kernels.LOSS_CODES) == {"mse", "l1", "bce", "ce"}


@pytest.mark.parametrize("name", list(catalog.MODELS))
def test_every_model_builds_with_the_shape_its_entry_says(name: str) -> None:
    entry = catalog.MODELS[name]
    n_outputs = 3 if entry.task == "multiclass" else 1
    model = build_model(name, n_features=5, n_outputs=n_outputs, hidden=7)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[0].in_features == 5 and linears[-1].out_features == n_outputs
    assert (len(linears) == 2) == entry.nonlinear
    if entry.compiled_kind is not None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        task = entry.task or "regression"
        loss = catalog.DEFAULT_LOSS[task]
        kind, _ = kernels.plan_summary(model, optimizer, loss=loss, task=task)
        assert kind == entry.compiled_kind


def test_settings_take_implied_tasks_and_schedules_from_the_catalog() -> None:
    for name, entry in catalog.MODELS.items():
        if entry.task is not None:
            worker = settings.WorkerSettings(topic="t", model=name, compaction=name != "audit", n_classes=3)
            assert worker.resolved_task == entry.task
            nonlinear = (
                worker.compaction_every_records == settings.NONLINEAR_COMPACTION["compaction_every_records"]
            )
            assert nonlinear == entry.nonlinear
    with pytest.raises(ValueError, match="needs --task"):
        settings.WorkerSettings(topic="t", model="mlp")


def test_no_other_module_lists_the_built_in_models() -> None:
    """The names appear as a tuple or set of strings in the catalog only."""
    names = set(catalog.MODELS) - {"audit"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "catalog.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple | ast.Set | ast.List):
                values = {
                    e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
                }
                if len(values & names) >= 3:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_reading_the_catalog_does_not_import_torch() -> None:
    code = "import sys; import streamtrainer.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
