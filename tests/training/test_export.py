"""Export: TorchScript and ONNX graphs with the standardizers folded in, against the learner's own
predictions (regression: values in the label's units; classification: probabilities)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamtrainer.training.export import export_model
from streamtrainer.training.predictor import load_model
from tests.test_cli import run_cli
from tests.training.model_fixtures import CASES, N_FEATURES, Trained, save, train

PARITY_CASES = ["linear", "mlp", "logistic", "softmax"]


def _expected(trained: Trained, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The learner's answers on its held-out rows (values, or the checkpoint predictor's probabilities,
    themselves held equal to the learner's outputs in test_predictor)."""
    x = trained.held_out
    if trained.learner.config.task == "regression":
        return x, trained.learner.predict_many(x)
    return x, load_model(tmp_path).predict_proba_many(x)


@pytest.mark.parametrize("case", PARITY_CASES)
def test_torchscript_export_answers_as_the_learner_does(tmp_path: Path, case: str) -> None:
    trained = train(case, 800)
    save(trained, tmp_path)
    output = export_model(load_model(tmp_path), tmp_path / "model.pt", "torchscript")
    x, expected = _expected(trained, tmp_path)
    graph = torch.jit.load(str(output))
    with torch.no_grad():
        got = graph(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape
    difference = float(np.max(np.abs(got - expected)))
    print(f"torchscript {case}: max abs difference {difference:.3g}")
    # float64 standardization and the same float32 kernels as eager torch.
    assert difference <= 1e-9 * max(1.0, float(np.max(np.abs(expected))))
    if CASES[case][1] == "regression":
        # Label units, and the model is no constant: the folding did something.
        assert float(np.std(got)) > 1.0


@pytest.mark.parametrize("case", PARITY_CASES)
def test_onnx_export_answers_as_the_learner_does_in_onnxruntime(tmp_path: Path, case: str) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    trained = train(case, 800)
    save(trained, tmp_path)
    output = export_model(load_model(tmp_path), tmp_path / "model.onnx", "onnx")
    x, expected = _expected(trained, tmp_path)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    got = session.run(None, {"features": x})[0]
    assert got.shape == expected.shape
    difference = float(np.max(np.abs(got - expected)))
    print(f"onnx {case}: max abs difference {difference:.3g}")
    # ONNX Runtime's float32 matrix products sum in another order: float32 rounding, relative to
    # the answers' scale (labels ~100 with a spread of ~40; probabilities 0..1).
    assert difference <= 2e-6 * max(1.0, float(np.max(np.abs(expected))))
    # Any batch size: one row, and many.
    one = session.run(None, {"features": x[:1]})[0]
    np.testing.assert_allclose(one, got[:1], rtol=1e-6, atol=1e-6)


def test_export_command_writes_a_graph_and_says_what_it_exported(tmp_path: Path) -> None:
    trained = train("linear", 300)
    save(trained, tmp_path / "ckpt")
    out = tmp_path / "model.pt"
    result = run_cli("export", "--checkpoint-dir", str(tmp_path / "ckpt"), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert f"version 1 (regression, {N_FEATURES} features) as torchscript" in result.stdout
    graph = torch.jit.load(str(out))
    with torch.no_grad():
        got = graph(torch.from_numpy(trained.held_out)).numpy()
    np.testing.assert_allclose(got, trained.learner.predict_many(trained.held_out), rtol=1e-12)
    # A directory with no checkpoint: one line, exit 1.
    empty = run_cli("export", "--checkpoint-dir", str(tmp_path), "--output", str(tmp_path / "x.pt"))
    assert empty.returncode == 1
    assert empty.stderr.strip().startswith("streamtrainer: error: ") and "no valid checkpoint" in empty.stderr
