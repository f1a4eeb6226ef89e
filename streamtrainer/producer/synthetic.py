"""A seeded synthetic sample stream with optional concept drift.

It exists so that training can be tested and benchmarked without a data set:
the ground truth is known, the difficulty is chosen (linear or not, label
noise), and drift happens at a known record index.

Random access: the stream is cut into blocks of :data:`BLOCK_SIZE` records and
each block draws from its own generator seeded by ``(seed, block index)``. Any
range of the stream can therefore be produced without generating what comes
before it, and :func:`generate` and :func:`generate_arrays` agree exactly.

Labels are computed from standard-normal latent features ``z``; the emitted
features are ``z * scale + offset`` with a per-feature scale in [0.5, 20] and
offset in [-5, 5] (fixed by the seed). This affine map keeps the linear tasks
linear in the emitted features while making standardization matter.

Concepts (``t``, ``u``: projections of ``z`` on two orthonormal directions):
regression ``t + b`` or ``sin(2t) + (u^2 - 1)/2 + b``; binary ``t + b > 0`` or
``t * u > 0`` (XOR); multiclass argmax of K linear scores, or a pinwheel of 2K
sectors in the (t, u) plane with opposite sectors sharing a class. After a
drift the direction ``t`` is orthogonal to the old one, so drift always matters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import numpy as np
import numpy.typing as npt

from streamtrainer.producer.exceptions import SyntheticSpecError
from streamtrainer.records.sample import Sample

TASKS: Final = ("regression", "binary", "multiclass")
DRIFTS: Final = ("none", "abrupt", "gradual")
BLOCK_SIZE: Final = 4096

_SCALE_RANGE: Final = (0.5, 20.0)
_OFFSET_RANGE: Final = (-5.0, 5.0)
# Spawn-key tags: independent random streams derived from one seed.
_LAYOUT_STREAM: Final = 0
_CONCEPT_STREAM: Final = 1
_BLOCK_STREAM: Final = 2

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, kw_only=True)
class SyntheticSpec:
    """What to generate; two equal specs generate the same stream.

    ``noise`` is the gaussian label-noise std for regression and the label
    flip probability for classification. ``drift`` switches from concept 0 to
    concept 1: ``abrupt`` at record ``drift_at``, ``gradual`` with a
    probability of the new concept rising linearly from 0 at ``drift_at`` to 1
    at ``drift_at + drift_width``. ``n_keys > 0`` gives record ``i`` the key
    ``entity-{i % n_keys}``.
    """

    task: str = "regression"
    n_features: int = 8
    n_classes: int = 3
    nonlinear: bool = False
    noise: float = 0.1
    seed: int = 0
    drift: str = "none"
    drift_at: int = 0
    drift_width: int = 1000
    n_keys: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SyntheticSpecError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.drift not in DRIFTS:
            raise SyntheticSpecError(f"unknown drift {self.drift!r}; expected one of {', '.join(DRIFTS)}")
        if self.n_features < 1:
            raise SyntheticSpecError(f"n_features must be >= 1, got {self.n_features}")
        if self.task != "regression" and self.nonlinear and self.n_features < 2:
            raise SyntheticSpecError(f"the nonlinear {self.task} task needs n_features >= 2 (a 2-D pattern)")
        if self.n_classes < 2:
            raise SyntheticSpecError(f"n_classes must be >= 2, got {self.n_classes}")
        if not self.noise >= 0.0:
            raise SyntheticSpecError(f"noise must be >= 0, got {self.noise}")
        if self.task != "regression" and self.noise > 1.0:
            raise SyntheticSpecError(f"noise is a flip probability for {self.task}, got {self.noise} > 1")
        if self.seed < 0:
            raise SyntheticSpecError(f"seed must be >= 0, got {self.seed}")
        if self.drift_at < 0:
            raise SyntheticSpecError(f"drift_at must be >= 0, got {self.drift_at}")
        if self.drift_width < 1:
            raise SyntheticSpecError(f"drift_width must be >= 1, got {self.drift_width}")
        if self.n_keys < 0:
            raise SyntheticSpecError(f"n_keys must be >= 0, got {self.n_keys}")


@dataclass(frozen=True)
class _Concept:
    """The hidden function from latent features to noiseless labels."""

    direction: F64  # (d,) unit vector: the linear target / decision boundary normal
    second: F64  # (d,) unit vector orthogonal to ``direction`` (nonlinear variants)
    class_weights: F64  # (d, K) unit columns: per-class score directions
    bias: float
    class_bias: F64  # (K,)
    rotation: float  # angle of the nonlinear multiclass pinwheel


@dataclass(frozen=True)
class _World:
    scale: F64
    offset: F64
    concepts: tuple[_Concept, _Concept]  # before, after drift


def generate(spec: SyntheticSpec, count: int | None = None, start: int = 0) -> Iterator[Sample]:
    """Yield ``count`` samples (forever when None) from record ``start`` on, identical to
    :func:`generate_arrays` (``start`` resumes a stream: the records after it are the same)."""
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    produced = start
    end = None if count is None else start + count
    while end is None or produced < end:
        # To the end of the current block: a chunk never spans two blocks (each costs a draw).
        n = BLOCK_SIZE - produced % BLOCK_SIZE
        if end is not None:
            n = min(n, end - produced)
        features, labels = generate_arrays(spec, n, start=produced)
        for row, label in zip(features, labels.tolist(), strict=True):
            key = f"entity-{produced % spec.n_keys}".encode() if spec.n_keys else None
            yield Sample(row.copy(), label, key)
            produced += 1


def generate_arrays(spec: SyntheticSpec, count: int, start: int = 0) -> tuple[F32, F32]:
    """Features ``(count, d)`` and labels ``(count,)`` of records ``start .. start+count-1``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if count == 0:
        return np.empty((0, spec.n_features), dtype=np.float32), np.empty(0, dtype=np.float32)
    world = _world(spec)
    first, last = start // BLOCK_SIZE, (start + count - 1) // BLOCK_SIZE
    feature_parts: list[F32] = []
    label_parts: list[F32] = []
    for block in range(first, last + 1):
        features, labels = _block(spec, world, block)
        lo = max(start - block * BLOCK_SIZE, 0)
        hi = min(start + count - block * BLOCK_SIZE, BLOCK_SIZE)
        feature_parts.append(features[lo:hi])
        label_parts.append(labels[lo:hi])
    if len(feature_parts) == 1:
        return feature_parts[0], label_parts[0]
    return np.concatenate(feature_parts), np.concatenate(label_parts)


def _block(spec: SyntheticSpec, world: _World, block: int) -> tuple[F32, F32]:
    n, d = BLOCK_SIZE, spec.n_features
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(_BLOCK_STREAM, block)))
    # Per-record uniforms first, in a fixed order, so they do not depend on the task.
    eps = rng.standard_normal(n)
    u_flip = rng.random(n)
    u_class = rng.random(n)
    u_drift = rng.random(n)
    z = rng.standard_normal((n, d))

    index = np.arange(block * n, (block + 1) * n, dtype=np.int64)
    if spec.drift == "abrupt":
        new = index >= spec.drift_at
    elif spec.drift == "gradual":
        p_new = np.clip((index - spec.drift_at) / spec.drift_width, 0.0, 1.0)
        new = u_drift < p_new
    else:
        new = np.zeros(n, dtype=bool)

    before, after = world.concepts
    if new.all():
        clean = _clean_labels(spec, after, z)
    elif not new.any():
        clean = _clean_labels(spec, before, z)
    else:
        clean = np.where(new, _clean_labels(spec, after, z), _clean_labels(spec, before, z))

    if spec.task == "regression":
        labels = clean + spec.noise * eps
    elif spec.task == "binary":
        labels = np.where(u_flip < spec.noise, 1.0 - clean, clean)
    else:
        k = spec.n_classes
        # A flipped label is one of the other k - 1 classes, uniformly.
        shift = 1 + np.minimum(np.floor(u_class * (k - 1)), k - 2)
        labels = np.where(u_flip < spec.noise, (clean + shift) % k, clean)

    features = (z * world.scale + world.offset).astype(np.float32)
    return features, labels.astype(np.float32)


def _clean_labels(spec: SyntheticSpec, concept: _Concept, z: F64) -> F64:
    """Noiseless labels of latent features ``z`` under ``concept``."""
    if spec.task == "regression":
        t = z @ concept.direction
        if spec.nonlinear:
            u = z @ concept.second
            return np.sin(2.0 * t) + 0.5 * (u * u - 1.0) + concept.bias
        return t + concept.bias
    if spec.task == "binary":
        t = z @ concept.direction
        score = t * (z @ concept.second) if spec.nonlinear else t + concept.bias
        return (score > 0.0).astype(np.float64)
    if spec.nonlinear:
        # Pinwheel: 2K sectors around the origin of the (direction, second) plane; class c
        # owns two opposite sectors, so every class is symmetric about the origin and no
        # linear score separates it.
        angle = np.arctan2(z @ concept.second, z @ concept.direction) + concept.rotation
        sector = np.floor((angle / (2.0 * np.pi)) % 1.0 * (2 * spec.n_classes))
        pinwheel: F64 = (sector % spec.n_classes).astype(np.float64)
        return pinwheel
    scores = z @ concept.class_weights + concept.class_bias
    classes: F64 = np.argmax(scores, axis=1).astype(np.float64)
    return classes


@lru_cache(maxsize=64)
def _world(spec: SyntheticSpec) -> _World:
    """Feature layout and concepts of a spec (cached: every block needs them)."""
    d = spec.n_features
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(_LAYOUT_STREAM,)))
    scale = np.exp(rng.uniform(np.log(_SCALE_RANGE[0]), np.log(_SCALE_RANGE[1]), d))
    offset = rng.uniform(_OFFSET_RANGE[0], _OFFSET_RANGE[1], d)
    before = _draw_concept(spec, 0, None)
    after = _draw_concept(spec, 1, before)
    return _World(scale, offset, (before, after))


def _draw_concept(spec: SyntheticSpec, number: int, previous: _Concept | None) -> _Concept:
    d, k = spec.n_features, spec.n_classes
    seed = np.random.SeedSequence(spec.seed, spawn_key=(_CONCEPT_STREAM, number))
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(d)
    second = rng.standard_normal(d)
    class_weights = rng.standard_normal((d, k))
    bias = float(rng.uniform(-0.25, 0.25))  # keeps binary classes between ~40% and ~60%
    class_bias = 0.1 * rng.standard_normal(k)
    rotation = float(rng.uniform(0.0, 2.0 * np.pi))
    if previous is not None and d >= 2:
        # Orthogonal to the old direction, so a drift is never a near no-op by chance.
        direction = _orthogonalize(direction, previous.direction)
    direction = direction / np.linalg.norm(direction)
    second = _orthogonalize(second, direction) if d >= 2 else direction.copy()
    second = second / np.linalg.norm(second)
    class_weights = class_weights / np.linalg.norm(class_weights, axis=0, keepdims=True)
    return _Concept(direction, second, class_weights, bias, class_bias, rotation)


def _orthogonalize(vector: F64, against: F64) -> F64:
    unit = against / np.linalg.norm(against)
    result: F64 = vector - (vector @ unit) * unit
    return result
