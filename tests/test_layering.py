"""The data flow is visible in the imports: no lower layer imports a higher one.

Flow: producer -> records (codec) -> consumer -> training -> metrics, and
models out through serving. The producer, the consumer and serving are the top
(they talk to Kafka); records, training and metrics are the foundations they
build on and know nothing of them. Training knows nothing of Kafka.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "streamtrainer"
LAYERS = ["producer", "records", "consumer", "training", "metrics", "serving"]
# What each layer may import from the others.
ALLOWED = {
    "producer": {"records", "metrics"},
    "records": set(),
    "consumer": {"records", "training", "metrics"},
    "training": set(),
    "metrics": set(),
    # `streamtrainer serve`: models from checkpoints (training) or the models topic (records, Kafka).
    "serving": {"records", "training", "metrics"},
}
KAFKA_MODULES = ("confluent_kafka", "streamtrainer.connection", "streamtrainer.broker")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_what_they_build_on(layer: str) -> None:
    forbidden = [other for other in LAYERS if other != layer and other not in ALLOWED[layer]]
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            for other in forbidden:
                assert not name.startswith(f"streamtrainer.{other}"), f"{layer}/{path.name} imports {name}"


@pytest.mark.parametrize("layer", ["records", "training", "metrics"])
def test_pure_layers_know_no_kafka(layer: str) -> None:
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imports(path):
            assert not name.startswith(KAFKA_MODULES), f"{path.name} imports {name}"


def test_no_pickle_and_no_star_imports_in_product_code() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert all(alias.name != "*" for alias in node.names), path
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                )
                assert not any(m.split(".")[0] in {"pickle", "dill", "cloudpickle"} for m in modules), path
        assert "torch.load(" not in text, path


def test_the_consumer_reaches_training_through_the_learner_not_its_compiled_paths() -> None:
    """How a learner's steps run (kernels, compiled graphs) is the learner's business."""
    internals = tuple(
        f"streamtrainer.training.{name}"
        for name in ("kernels", "fused_loops", "program_loops", "graph_step", "paths")
    )
    for path in sorted((PACKAGE / "consumer").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "streamtrainer.training":
                assert not {a.name for a in node.names} & {n.rsplit(".", 1)[1] for n in internals}, path
        for name in _imports(path):
            assert not name.startswith(internals), f"consumer/{path.name} imports {name}"
