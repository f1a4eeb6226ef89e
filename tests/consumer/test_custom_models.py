"""A user's own module in the worker: trained through the compiled path it takes, which the log names."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from streamtrainer.consumer.worker import Worker
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.training import kernels
from tests.helpers import produce, worker_settings

pytestmark = pytest.mark.integration


def test_a_user_module_of_known_layers_trains_in_the_compiled_layer_program(
    bootstrap: str,
    topic_factory: Callable[..., str],
    group_id: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernels.warm_up((("program", "adagrad"),))  # compiled before the worker starts: every batch takes it
    compiled_rows: list[int] = []
    fused_call = kernels.fused_call

    def counted(*args: Any, **kwargs: Any) -> kernels.FusedCall:
        compiled_rows.append(args[2].shape[0])
        return fused_call(*args, **kwargs)

    monkeypatch.setattr(kernels, "fused_call", counted)
    topic = topic_factory(partitions=1)
    n = 3000
    produce(bootstrap, topic, generate(SyntheticSpec(task="regression", n_features=4, seed=5), n))
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="tests.custom_model:make_model",  # Linear -> Tanh -> Linear
        task="regression",
        max_records=n,
        poll_batch=200,
        compaction=False,
    )
    caplog.set_level(logging.INFO, logger="streamtrainer")
    worker = Worker(settings, registry=CollectorRegistry())
    status = worker.run()

    assert status.records_trained == n
    learner = worker.learner
    assert learner is not None and learner.updates == n
    assert learner.path.path == "program"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training path for")]
    assert lines == [
        "training path for tests.custom_model:make_model: compiled layer program (numba): "
        "Linear(4->8) > Tanh > Linear(8->1)"
    ]
    assert sum(compiled_rows) >= n  # every record through the compiled loop (a redone batch: more)
