"""Worker(settings, model=...): a worker embedded in a user's process, training a module object (issue 19)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from streamtrainer.consumer import Worker
from streamtrainer.consumer.worker import settings_for_model
from streamtrainer.exceptions import ConfigurationError
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.settings import NONLINEAR_COMPACTION, WorkerSettings
from streamtrainer.training import OnlineLearner
from streamtrainer.training.checkpoint import CheckpointStore
from tests.helpers import produce, worker_settings


class _Net(nn.Module):
    """A user's module: not a chain of layers (a skip connection)."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_features, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))) + x[:, :1]


def _factory(*, n_features: int, n_outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_features, 4), nn.ReLU(), nn.Linear(4, n_outputs))


def test_a_worker_trains_a_copy_of_the_module_it_is_given_exactly_as_the_learner_would(
    bootstrap: str, topic_factory, group_id: str
) -> None:
    topic = topic_factory(partitions=1)
    first, more = 1500, 500
    samples = list(generate(SyntheticSpec(task="binary", n_features=5, noise=0.05, seed=2), first + more))
    produce(bootstrap, topic, samples[:first])
    torch.manual_seed(5)
    module = _Net(5)
    given = copy.deepcopy(module.state_dict())
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        task="binary",
        compaction=False,
        stop_at_end=True,
        poll_batch=400,
        fused=False,  # autograd: this test is about the embedding, tests/training/test_paths.py the paths
    )
    worker = Worker(settings, model=module)
    status = worker.run()
    assert status.records_trained == first
    # The module given is left as given: the worker trained a copy (worker.learner.model).
    assert worker.learner is not None and worker.learner.model is not module
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, given[name])

    # The same records in order through OnlineLearner.from_module: the same model.
    reference = OnlineLearner.from_module(copy.deepcopy(module), task="binary", fused=False)
    features = np.array([s.features for s in samples[:first]], dtype=np.float32)
    labels = np.array([s.label for s in samples[:first]], dtype=np.float32)
    reference.learn_many(features, labels)
    checkpoint = CheckpointStore(settings.checkpoint_dir).load_latest()
    assert checkpoint is not None and checkpoint.metadata["records_applied"] == first
    learner_fields = checkpoint.metadata["learner"]
    assert isinstance(learner_fields, dict)
    assert learner_fields["model"] == "tests.consumer.test_embedded_worker:_Net"
    expected, _ = reference.state()
    for name, tensor in expected.items():
        if name.startswith("model."):
            # The same autograd steps over batches of other sizes: equal to float32 rounding.
            np.testing.assert_allclose(checkpoint.tensors[name].numpy(), tensor.numpy(), rtol=0, atol=1e-5)

    # A restart with the same module resumes from the checkpoint: only the new records are trained.
    produce(bootstrap, topic, samples[first:])
    again = Worker(settings, model=_Net(5)).run()
    assert again.records_trained == more
    latest = CheckpointStore(settings.checkpoint_dir).load_latest()
    assert latest is not None and latest.metadata["records_applied"] == first + more


def test_a_model_object_needs_the_task_and_no_settings_model() -> None:
    with pytest.raises(ConfigurationError, match="give one of them"):
        settings_for_model(WorkerSettings(topic="t", model="mlp", task="binary"), _Net(3))
    with pytest.raises(ConfigurationError, match=r"needs settings\.task"):
        settings_for_model(WorkerSettings(topic="t"), _Net(3))


def test_a_model_object_is_named_after_it_and_compacts_as_a_custom_model() -> None:
    settings = settings_for_model(WorkerSettings(topic="t", task="regression"), _factory)
    assert settings.model == "tests.consumer.test_embedded_worker:_factory"
    for name, value in NONLINEAR_COMPACTION.items():
        assert getattr(settings, name) == value
    # ... unless the settings say otherwise.
    given = settings_for_model(WorkerSettings(topic="t", task="regression", compaction_epochs=2), _factory)
    assert given.compaction_epochs == 2
    assert settings_for_model(WorkerSettings(topic="t"), None) == WorkerSettings(topic="t")
