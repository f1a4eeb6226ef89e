"""The benchmark's datasets: each one a fixed, seeded sequence of records, and what kind of task it is.

* ``tuning``: scikit-learn's bundled real datasets (no download), streamed in
  a seeded shuffled order since they are not streams; River's synthetic
  generators, most of them with concept drift, a fixed number of records each.
* ``kept-aside``: River's bundled real streams, in their own order. They check
  the defaults independently: never choose a default on them.

Every dataset becomes float32 feature rows (one column per feature, in a fixed
order) and float32 labels: the value (regression), 0/1 (binary) or the class
index (multiclass, classes numbered in sorted order). The same arrays feed the
worker's learner and, as dicts, River's models.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

TUNING: Final = "tuning"
KEPT_ASIDE: Final = "kept-aside"
Group = Literal["tuning", "kept-aside"]
Kind = Literal["regression", "binary", "multiclass"]
Shape = Literal["linear", "nonlinear"]

# Records each synthetic stream yields (``--records`` overrides; ``--quick``: QUICK_RECORDS).
SYNTHETIC_RECORDS = 10_000
QUICK_RECORDS = 3_000


@dataclass(frozen=True)
class Stream:
    """A dataset's records in stream order."""

    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.float32]
    feature_names: tuple[str, ...]
    classes: tuple[str, ...] = ()  # classification: the class of each label index

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    """One benchmark task: where its records come from and what kind of task it is."""

    name: str
    group: Group
    kind: Kind
    shape: Shape
    source: str  # where the data comes from, for the table's notes
    load: Callable[[int, int], Stream]  # (seed, synthetic records) -> the stream
    n_classes: int | None = None  # multiclass: number of classes

    @property
    def metric(self) -> str:
        """The metric of record: whole-stream progressive accuracy, or MAE."""
        return "mae" if self.kind == "regression" else "accuracy"


def _from_arrays(
    features: npt.ArrayLike, labels: npt.ArrayLike, seed: int, *, shuffle: bool, classes: tuple[str, ...] = ()
) -> Stream:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.float32)
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(y))
        x, y = x[order], y[order]
    names = tuple(f"x{i}" for i in range(x.shape[1]))
    return Stream(np.ascontiguousarray(x), np.ascontiguousarray(y), names, classes)


def _sklearn(loader_name: str) -> Callable[[int, int], Stream]:
    def load(seed: int, _records: int) -> Stream:
        from sklearn import datasets

        bunch = getattr(datasets, loader_name)()
        classes = tuple(str(c) for c in getattr(bunch, "target_names", ()))
        if loader_name == "load_diabetes":
            classes = ()
        return _from_arrays(bunch.data, bunch.target, seed, shuffle=True, classes=classes)

    return load


def _from_dicts(rows: Iterable[tuple[Mapping[str, Any], Any]], kind: Kind) -> Stream:
    """River-style ``(x, y)`` pairs as arrays: features in the first record's key order."""
    pairs = list(rows)
    keys = list(pairs[0][0])
    names = tuple(str(k) for k in keys)
    x = np.array([[float(row[k]) for k in keys] for row, _ in pairs], dtype=np.float32)
    raw = [label for _, label in pairs]
    classes: tuple[str, ...] = ()
    if kind == "multiclass":
        classes = tuple(sorted({str(label) for label in raw}))
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[str(label)] for label in raw], dtype=np.float32)
    elif kind == "binary":
        classes = ("False", "True")
        y = np.array([bool(label) for label in raw], dtype=np.float32)
    else:
        y = np.array(raw, dtype=np.float32)
    return Stream(np.ascontiguousarray(x), y, names, classes)


def _river_real(class_name: str, kind: Kind) -> Callable[[int, int], Stream]:
    def load(_seed: int, _records: int) -> Stream:
        from river import datasets

        return _from_dicts(getattr(datasets, class_name)(), kind)

    return load


def _river_synth(
    build: Callable[[int, int], Iterable[tuple[Mapping[str, Any], Any]]], kind: Kind
) -> Callable[[int, int], Stream]:
    def load(seed: int, records: int) -> Stream:
        return _from_dicts(itertools.islice(build(seed, records), records), kind)

    return load


def _sea_drift(seed: int, records: int) -> Iterable[tuple[Mapping[str, Any], Any]]:
    from river.datasets import synth

    return synth.ConceptDriftStream(
        stream=synth.SEA(variant=0, noise=0.1, seed=seed),
        drift_stream=synth.SEA(variant=3, noise=0.1, seed=seed + 1),
        position=records // 2,
        width=max(1, records // 20),
        seed=seed,
    )


def _hyperplane(seed: int, _records: int) -> Iterable[tuple[Mapping[str, Any], Any]]:
    from river.datasets import synth

    return synth.Hyperplane(seed=seed, n_features=10, n_drift_features=5, mag_change=0.001)


def _agrawal_drift(seed: int, records: int) -> Iterable[tuple[Mapping[str, Any], Any]]:
    from river.datasets import synth

    return synth.ConceptDriftStream(
        stream=synth.Agrawal(classification_function=0, seed=seed),
        drift_stream=synth.Agrawal(classification_function=2, seed=seed + 1),
        position=records // 2,
        width=max(1, records // 20),
        seed=seed,
    )


def _rbf_drift(seed: int, _records: int) -> Iterable[tuple[Mapping[str, Any], Any]]:
    from river.datasets import synth

    return synth.RandomRBFDrift(
        seed_model=seed,
        seed_sample=seed + 1,
        n_classes=3,
        n_features=10,
        n_centroids=50,
        change_speed=0.001,
        n_drift_centroids=25,
    )


def _friedman_drift(seed: int, records: int) -> Iterable[tuple[Mapping[str, Any], Any]]:
    from river.datasets import synth

    return synth.FriedmanDrift(
        drift_type="gra", position=(records // 3, 2 * records // 3), transition_window=0, seed=seed
    )


def _friedman(seed: int, _records: int) -> Iterable[tuple[Mapping[str, Any], Any]]:
    from river.datasets import synth

    return synth.Friedman(seed=seed)


DATASETS: tuple[Dataset, ...] = (
    # -- tuning: scikit-learn's bundled real datasets, seeded shuffled order -----------------------
    Dataset("breast_cancer", TUNING, "binary", "linear", "sklearn", _sklearn("load_breast_cancer")),
    Dataset("iris", TUNING, "multiclass", "linear", "sklearn", _sklearn("load_iris"), n_classes=3),
    Dataset("wine", TUNING, "multiclass", "linear", "sklearn", _sklearn("load_wine"), n_classes=3),
    Dataset("digits", TUNING, "multiclass", "linear", "sklearn", _sklearn("load_digits"), n_classes=10),
    Dataset("diabetes", TUNING, "regression", "linear", "sklearn", _sklearn("load_diabetes")),
    # -- tuning: River's synthetic generators ----------------------------------------------------------
    Dataset(
        "sea_drift", TUNING, "binary", "linear", "ConceptDriftStream(SEA 0 -> 3, noise 0.1)",
        _river_synth(_sea_drift, "binary"),
    ),
    Dataset(
        "hyperplane", TUNING, "binary", "linear", "Hyperplane(10 features, 5 drifting, mag 0.001)",
        _river_synth(_hyperplane, "binary"),
    ),
    Dataset(
        "agrawal_drift", TUNING, "binary", "nonlinear", "ConceptDriftStream(Agrawal 0 -> 2)",
        _river_synth(_agrawal_drift, "binary"),
    ),
    Dataset(
        "rbf_drift", TUNING, "multiclass", "nonlinear", "RandomRBFDrift(3 classes, speed 0.001)",
        _river_synth(_rbf_drift, "multiclass"), n_classes=3,
    ),
    Dataset("friedman", TUNING, "regression", "nonlinear", "Friedman", _river_synth(_friedman, "regression")),
    Dataset(
        "friedman_drift", TUNING, "regression", "nonlinear", "FriedmanDrift(gra, 2 abrupt drifts)",
        _river_synth(_friedman_drift, "regression"),
    ),
    # -- kept aside: River's bundled real streams, their own order. Never tune on these. --------------
    Dataset("phishing", KEPT_ASIDE, "binary", "linear", "river Phishing", _river_real("Phishing", "binary")),
    Dataset("bananas", KEPT_ASIDE, "binary", "nonlinear", "river Bananas", _river_real("Bananas", "binary")),
    Dataset(
        "trump_approval", KEPT_ASIDE, "regression", "linear", "river TrumpApproval",
        _river_real("TrumpApproval", "regression"),
    ),
    Dataset(
        "image_segments", KEPT_ASIDE, "multiclass", "linear", "river ImageSegments",
        _river_real("ImageSegments", "multiclass"), n_classes=7,
    ),
    Dataset(
        "chick_weights", KEPT_ASIDE, "regression", "linear", "river ChickWeights",
        _river_real("ChickWeights", "regression"),
    ),
)  # fmt: skip

BY_NAME: dict[str, Dataset] = {d.name: d for d in DATASETS}
# ``--quick``: one of each kind of task, synthetic streams at QUICK_RECORDS.
QUICK = ("iris", "breast_cancer", "diabetes", "agrawal_drift", "friedman_drift", "phishing")


def select(names: Iterable[str]) -> list[Dataset]:
    """Datasets by name or group name (``tuning``, ``kept-aside``), in the fixed order of DATASETS."""
    wanted: set[str] = set()
    for name in names:
        if name in (TUNING, KEPT_ASIDE):
            wanted.update(d.name for d in DATASETS if d.group == name)
        elif name in BY_NAME:
            wanted.add(name)
        else:
            raise ValueError(f"unknown dataset {name!r} (one of {', '.join(BY_NAME)}, tuning, kept-aside)")
    return [d for d in DATASETS if d.name in wanted]
