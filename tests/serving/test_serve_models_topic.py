"""streamtrainer serve from the models topic (embedded broker): versions published with a
transactional producer, as the worker publishes them; the newest one served, each newer one swapped
in within a few seconds with the learner's own predictions, a worse one gated out."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from streamtrainer.connection import ensure_topic
from streamtrainer.records.model_version import ModelVersion, artifact_digest, encode
from streamtrainer.serving.server import ModelServer
from streamtrainer.settings import ServeSettings
from streamtrainer.training.predictor import checkpoint_metrics
from tests.serving.client import get, post, sample_value, served_version, wait_for
from tests.training.model_fixtures import Trained, save, train

pytestmark = pytest.mark.integration

SWAP_LIMIT_S = 5.0


class Publisher:
    """Publishes model versions of one model as the worker does: one transaction per version."""

    def __init__(self, bootstrap: str, topic: str, model: str, directory: Path) -> None:
        self.topic, self.model, self.directory = topic, model, directory
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "transactional.id": f"test-publisher-{uuid.uuid4().hex[:8]}"}
        )
        self.producer.init_transactions(30)

    def publish(self, trained: Trained, version: int, *, inline: bool = True) -> ModelVersion:
        """Publish ``trained`` as ``version`` (its artifact inline, or at a file:// uri)."""
        record = self.record(trained, version, inline=inline)
        self.send(self.model.encode(), encode(record))
        return record

    def record(self, trained: Trained, version: int, *, inline: bool = True) -> ModelVersion:
        """``trained``'s checkpoint as the models-topic record of ``version``."""
        checkpoint = save(trained, self.directory / f"v{version}")
        artifact = (self.directory / f"v{version}" / "000000000001.safetensors").read_bytes()
        uri = None
        if not inline:  # as the worker does past --models-inline-limit-bytes: a durable file, its uri
            stored = self.directory / "versions" / f"{version}.safetensors"
            stored.parent.mkdir(exist_ok=True)
            stored.write_bytes(artifact)
            uri = stored.as_uri()
        return ModelVersion(
            model=self.model,
            version=version,
            created_at=time.time(),
            offsets={f"{self.model}:0": trained.measured.count},
            records_applied=trained.measured.count,
            metrics=checkpoint_metrics(checkpoint.tensors, checkpoint.metadata),
            schema_hash="test",
            sha256=artifact_digest(artifact),
            size=len(artifact),
            checkpoint=checkpoint.metadata,
            artifact=artifact if inline else None,
            uri=uri,
        )

    def send(self, key: bytes, value: bytes) -> None:
        self.producer.begin_transaction()
        self.producer.produce(self.topic, key=key, value=value)
        self.producer.commit_transaction(30)


@pytest.fixture()
def models_topic(bootstrap: str) -> Callable[[], str]:
    def create() -> str:
        name = f"orders-{uuid.uuid4().hex[:8]}.models"
        ensure_topic(
            AdminClient({"bootstrap.servers": bootstrap}), name, 1, config={"cleanup.policy": "compact"}
        )
        return name

    return create


def test_serve_follows_the_models_topic_and_gates_a_worse_version(
    bootstrap: str, models_topic: Callable[[], str], tmp_path: Path
) -> None:
    topic = models_topic()
    model = topic.removesuffix(".models")
    publisher = Publisher(bootstrap, topic, model, tmp_path)
    old, current = train("mlp", 300), train("mlp", 800)
    publisher.publish(old, 1)
    publisher.publish(current, 2)  # the newest when serve starts: the one served
    # Another model's version, and a record that is no model version: neither is served.
    publisher.send(
        b"other-model", encode(ModelVersion(**{**_fields(publisher.publish(old, 1)), "model": "x"}))
    )
    publisher.send(model.encode(), b"not a model version")
    x = current.held_out
    row = [float(v) for v in x[0]]
    settings = ServeSettings(bootstrap_servers=bootstrap, models_topic=topic, port=0)
    with ModelServer(settings) as server:
        base = server.url
        wait_for(lambda: get(f"{base}/ready")[0] == 200, 20.0)
        status, answer = post(f"{base}/predict", {"instances": x.tolist()})
        assert status == 200
        assert (answer["model"], answer["version"]) == (model, 2)
        np.testing.assert_array_equal(np.asarray(answer["predictions"]), current.learner.predict_many(x))
        metrics = get(f"{base}/metrics")[1]
        assert sample_value(metrics, "streamtrainer_serve_swaps_total") == 1  # 1 was never loaded
        assert sample_value(metrics, "streamtrainer_serve_versions_invalid_total") == 1

        # Version 3, its artifact past the inline limit: a file:// uri, its sha256 checked.
        newer = train("mlp", 1000)
        started = time.monotonic()
        publisher.publish(newer, 3, inline=False)
        wait_for(lambda: served_version(base, row) == 3, SWAP_LIMIT_S)
        swap_s = time.monotonic() - started
        print(f"models topic: version 3 served {swap_s:.3f}s after its publishing began")
        status, answer = post(f"{base}/predict", {"instances": x.tolist()})
        np.testing.assert_array_equal(np.asarray(answer["predictions"]), newer.learner.predict_many(x))

        worse = train("mlp", 1000, noise=True)
        publisher.publish(worse, 4)
        wait_for(lambda: server.source.offered == 4, SWAP_LIMIT_S)
        assert served_version(base, row) == 3
        metrics = get(f"{base}/metrics")[1]
        assert sample_value(metrics, "streamtrainer_serve_versions_gated_total", {"reason": "worse"}) == 1
        assert sample_value(metrics, "streamtrainer_serve_model_version") == 3


def _fields(version: ModelVersion) -> dict[str, object]:
    return {name: getattr(version, name) for name in version.__slots__}


def test_serve_waits_for_a_models_topic_that_does_not_exist_yet(bootstrap: str, tmp_path: Path) -> None:
    topic = f"later-{uuid.uuid4().hex[:8]}.models"
    settings = ServeSettings(bootstrap_servers=bootstrap, models_topic=topic, port=0)
    with ModelServer(settings) as server:
        time.sleep(1.0)
        assert get(f"{server.url}/ready")[0] == 503
        ensure_topic(
            AdminClient({"bootstrap.servers": bootstrap}), topic, 1, config={"cleanup.policy": "compact"}
        )
        trained = train("linear", 300)
        Publisher(bootstrap, topic, topic.removesuffix(".models"), tmp_path).publish(trained, 1)
        wait_for(lambda: get(f"{server.url}/ready")[0] == 200, 20.0)
