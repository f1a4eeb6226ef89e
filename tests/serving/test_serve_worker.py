"""The worker writes version v, then v+1, into its checkpoint directory while serve reads it: serve
answers with each, as a learner restored from that very checkpoint predicts (embedded broker)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from streamtrainer.consumer import Worker
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.serving.server import ModelServer
from streamtrainer.settings import ServeSettings
from streamtrainer.training import LearnerConfig, OnlineLearner
from streamtrainer.training.checkpoint import CheckpointStore
from tests.helpers import produce, worker_settings
from tests.serving.client import get, post, wait_for

pytestmark = pytest.mark.integration


def _restored(directory: Path) -> tuple[int, OnlineLearner]:
    checkpoint = CheckpointStore(directory).load_latest()
    assert checkpoint is not None
    learner = OnlineLearner(
        LearnerConfig(model="linear", task="regression"), int(checkpoint.metadata["n_features"])
    )
    learner.load_state(dict(checkpoint.tensors), dict(checkpoint.metadata))
    return checkpoint.version, learner


def test_serve_answers_with_each_version_the_worker_checkpoints(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=1)
    spec = SyntheticSpec(task="regression", n_features=4, noise=0.05, seed=5)
    samples = list(generate(spec, 3000))
    produce(bootstrap, topic, samples[:1500])
    directory = tmp_path / "ckpt"
    settings = worker_settings(
        bootstrap, topic, group_id, model="linear", checkpoint_dir=directory, stop_at_end=True
    )
    Worker(settings).run()
    x = np.stack([s.features for s in samples[2900:]]).astype(np.float32)
    with ModelServer(ServeSettings(checkpoint_dir=directory, port=0, poll_interval_s=0.2)) as server:
        base = server.url
        wait_for(lambda: get(f"{base}/ready")[0] == 200, 10.0)
        version, learner = _restored(directory)
        status, answer = post(f"{base}/predict", {"instances": x.tolist()})
        assert status == 200 and answer["version"] == version
        np.testing.assert_array_equal(np.asarray(answer["predictions"]), learner.predict_many(x))

        # The worker resumes from its checkpoint and checkpoints again at the end of the new records.
        produce(bootstrap, topic, samples[1500:2900])
        Worker(settings).run()
        written = time.monotonic()
        newer, learner = _restored(directory)
        assert newer > version
        # Measured from the worker's return (its last checkpoint is durable by then).
        wait_for(lambda: post(f"{base}/predict", {"features": x[0].tolist()})[1]["version"] == newer, 5.0)
        swap_s = time.monotonic() - written
        print(f"worker checkpoint dir: version {newer} served {swap_s:.3f}s after the worker stopped")
        status, answer = post(f"{base}/predict", {"instances": x.tolist()})
        assert answer["version"] == newer
        np.testing.assert_array_equal(np.asarray(answer["predictions"]), learner.predict_many(x))
        assert swap_s < 5.0


def test_serve_follows_the_versions_a_worker_publishes_to_its_models_topic(
    bootstrap: str, topic_factory, group_id: str, tmp_path: Path
) -> None:
    """Worker (--publish-models) -> models topic -> serve: v, then v+1 within seconds, each answering
    as the learner restored from that version's checkpoint (the whole chain, no hand-made records)."""
    topic = topic_factory(partitions=1)
    spec = SyntheticSpec(task="regression", n_features=4, noise=0.05, seed=6)
    samples = list(generate(spec, 3000))
    produce(bootstrap, topic, samples[:1500])
    directory = tmp_path / "ckpt"
    settings = worker_settings(
        bootstrap,
        topic,
        group_id,
        model="linear",
        checkpoint_dir=directory,
        stop_at_end=True,
        publish_models=True,
    )
    Worker(settings).run()
    x = np.stack([s.features for s in samples[2900:]]).astype(np.float32)
    serve = ServeSettings(
        bootstrap_servers=bootstrap, models_topic=f"{topic}.models", port=0, gate_metric="none"
    )
    with ModelServer(serve) as server:
        base = server.url
        version, learner = _restored(directory)
        wait_for(lambda: get(f"{base}/ready")[0] == 200, 30.0)
        wait_for(lambda: post(f"{base}/predict", {"features": x[0].tolist()})[1]["version"] == version, 10.0)
        status, answer = post(f"{base}/predict", {"instances": x.tolist()})
        assert status == 200 and answer["version"] == version
        np.testing.assert_array_equal(np.asarray(answer["predictions"]), learner.predict_many(x))

        produce(bootstrap, topic, samples[1500:2900])
        Worker(settings).run()
        published = time.monotonic()
        newer, learner = _restored(directory)
        assert newer > version
        wait_for(lambda: post(f"{base}/predict", {"features": x[0].tolist()})[1]["version"] == newer, 10.0)
        swap_s = time.monotonic() - published
        print(f"worker models topic: version {newer} served {swap_s:.3f}s after the worker stopped")
        status, answer = post(f"{base}/predict", {"instances": x.tolist()})
        assert answer["version"] == newer
        np.testing.assert_array_equal(np.asarray(answer["predictions"]), learner.predict_many(x))
