"""load_model and Predictor: the learner's own predictions, from its checkpoint, with no learner."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from streamtrainer.training import OnlineLearner
from streamtrainer.training.exceptions import CheckpointError
from streamtrainer.training.predictor import checkpoint_metrics, from_model_version, load_model
from tests.training.model_fixtures import CASES, N_FEATURES, save, train


@pytest.mark.parametrize("case", sorted(CASES))
def test_predictor_predicts_exactly_what_the_learner_does_from_its_checkpoint(
    tmp_path: Path, case: str
) -> None:
    trained = train(case)
    save(trained, tmp_path)
    predictor = load_model(tmp_path)
    x = trained.held_out
    expected = trained.learner.predict_many(x)
    got = predictor.predict_many(x)
    # The same operations on the same state: equal, not merely close.
    np.testing.assert_array_equal(got, expected)
    assert predictor.predict_one(x[3]) == trained.learner.predict_one(x[3])
    assert predictor.version == 1
    assert predictor.task == CASES[case][1]
    if predictor.task == "regression":
        # Label units: the labels are around 100 (x40 + 100), the model learns them standardized.
        assert 20.0 < float(np.mean(got)) < 200.0
        with pytest.raises(ValueError, match="no class probabilities"):
            predictor.predict_proba_many(x)
        return
    with torch.no_grad():
        learner = trained.learner
        outputs = learner.model(torch.from_numpy(learner.standardize(x))).to(torch.float64)
    probabilities = predictor.predict_proba_many(x)
    if predictor.task == "binary":
        assert probabilities.shape == (x.shape[0], 2)
        positive = torch.sigmoid(outputs.reshape(-1)).numpy()
        np.testing.assert_allclose(probabilities[:, 1], positive, atol=1e-12)
    else:
        assert probabilities.shape == (x.shape[0], 3)
        np.testing.assert_allclose(probabilities, torch.softmax(outputs, dim=-1).numpy(), atol=1e-12)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
    # The most probable class is the predicted one.
    np.testing.assert_array_equal(np.argmax(probabilities, axis=1), got)
    # One row is a batch of one (a matrix-vector product: float32 rounding may differ from the batch's).
    np.testing.assert_array_equal(predictor.predict_proba_one(x[0]), predictor.predict_proba_many(x[:1])[0])
    np.testing.assert_allclose(predictor.predict_proba_one(x[0]), probabilities[0], rtol=1e-6)


def test_the_newest_valid_checkpoint_is_loaded_while_a_worker_holds_the_directory(tmp_path: Path) -> None:
    first = train("linear", 300)
    second = train("linear", 600)
    save(first, tmp_path)
    save(second, tmp_path)
    from streamtrainer.training.checkpoint import CheckpointStore

    with CheckpointStore(tmp_path):  # the worker's exclusive lock: reading must not need it
        predictor = load_model(tmp_path)
        assert predictor.version == 2
        np.testing.assert_array_equal(
            predictor.predict_many(second.held_out), second.learner.predict_many(second.held_out)
        )
        # Version 2's tensors corrupted: version 1 is served, with a warning, never a torn model.
        (tmp_path / "000000000002.safetensors").write_bytes(b"garbage")
        assert load_model(tmp_path).version == 1
        # One checkpoint named by its marker.
        assert load_model(tmp_path / "000000000001.json").version == 1


def test_a_replay_output_directory_is_read_through_its_checkpoints_folder(tmp_path: Path) -> None:
    save(train("linear", 200), tmp_path / "checkpoints")
    assert load_model(tmp_path).version == 1


def test_metrics_are_the_checkpoints_progressive_figures(tmp_path: Path) -> None:
    trained = train("logistic")
    checkpoint = save(trained, tmp_path)
    predictor = load_model(tmp_path)
    report = trained.measured.report()
    assert predictor.metrics["records"] == 600 == trained.measured.count
    assert predictor.metrics["window.loss"] == pytest.approx(report.window["loss"], rel=1e-12)
    assert predictor.metrics["run.accuracy"] == pytest.approx(report.run["accuracy"], rel=1e-12)
    assert predictor.metrics["window.roc_auc"] == pytest.approx(report.window["roc_auc"], rel=1e-12)
    assert set(predictor.metrics) == {
        "records",
        *(f"{scope}.{name}" for scope in ("run", "window") for name in ("loss", "accuracy", "roc_auc")),
    }
    assert checkpoint_metrics(checkpoint.tensors, checkpoint.metadata) == predictor.metrics


def test_a_model_version_record_and_a_saved_manifest_load_with_their_checksum(tmp_path: Path) -> None:
    from streamtrainer.records.model_version import ModelVersion, artifact_digest, decode, encode

    trained = train("softmax")
    checkpoint = save(trained, tmp_path / "ckpt")
    artifact = (tmp_path / "ckpt" / "000000000001.safetensors").read_bytes()
    metrics = checkpoint_metrics(checkpoint.tensors, checkpoint.metadata)
    version = ModelVersion(
        model="orders",
        version=7,
        created_at=time.time(),
        offsets={"orders:0": 600},
        records_applied=600,
        metrics=metrics,
        schema_hash="x",
        sha256=artifact_digest(artifact),
        size=len(artifact),
        checkpoint=checkpoint.metadata,
        artifact=artifact,
    )
    x = trained.held_out
    predictor = load_model(decode(encode(version)))
    assert (predictor.name, predictor.version) == ("orders", 7)
    np.testing.assert_array_equal(predictor.predict_many(x), trained.learner.predict_many(x))
    # The artifact at a file:// uri, and the manifest saved as JSON beside nothing: read from the uri.
    stored = tmp_path / "versions" / "7.safetensors"
    stored.parent.mkdir()
    stored.write_bytes(artifact)
    by_uri = ModelVersion(**{**_fields(version), "artifact": None, "uri": stored.as_uri()})
    manifest = tmp_path / "orders-7.json"
    manifest.write_text(json.dumps(by_uri.manifest()))
    np.testing.assert_array_equal(load_model(manifest).predict_many(x), trained.learner.predict_many(x))
    # A changed byte is refused: the manifest's sha256 no longer matches.
    stored.write_bytes(artifact[:-1] + bytes([artifact[-1] ^ 1]))
    assert hashlib.sha256(stored.read_bytes()).hexdigest() != version.sha256
    with pytest.raises(CheckpointError, match="sha256"):
        from_model_version(by_uri)


def _fields(version: object) -> dict[str, object]:
    return {name: getattr(version, name) for name in version.__slots__}  # type: ignore[attr-defined]


def test_wrong_inputs_and_empty_places_fail_with_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_model(tmp_path / "missing")
    save(train("linear", 100), tmp_path)
    predictor = load_model(tmp_path)
    with pytest.raises(ValueError, match=f"rows of {N_FEATURES} features"):
        predictor.predict_many(np.zeros((2, N_FEATURES + 1), dtype=np.float32))


def test_a_learner_restored_from_the_checkpoint_agrees_too(tmp_path: Path) -> None:
    """The checkpoint's learner (as a worker restores it) and the predictor: one model."""
    trained = train("mlp")
    checkpoint = save(trained, tmp_path)
    restored = OnlineLearner(trained.learner.config, N_FEATURES)
    restored.load_state(dict(checkpoint.tensors), dict(checkpoint.metadata))
    x = trained.held_out
    np.testing.assert_array_equal(load_model(tmp_path).predict_many(x), restored.predict_many(x))
    assert math.isfinite(float(load_model(tmp_path).predict_many(x).sum()))
