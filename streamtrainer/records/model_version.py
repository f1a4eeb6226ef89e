"""A published model version: one record of the compacted models topic (``<topic>.models``).

The worker publishes a version of its model at a checkpoint; ``streamtrainer serve`` and any other
reader take the newest one per key (the model's name). One record holds:

- the **manifest** (JSON): the model's name, its version (the checkpoint's), when it was made,
  the next offset of every partition it has applied (``"topic:partition" -> offset``), the records
  applied, its prequential metrics, the schema hash of the features it takes, the SHA-256 and size
  of the artifact, and the checkpoint's metadata (what rebuilds the model: its kind, task, sizes,
  the scalers' layout);
- the **artifact**: the checkpoint's safetensors bytes, inline up to a size limit, else nothing
  inline and ``uri`` saying where the same bytes lie (a file path or an object-store URL).

Wire format (no pickle, no base64 overhead): ``b"STMV"``, one format byte (1), the manifest's length
(4 bytes, big-endian), the manifest (UTF-8 JSON), then the inline artifact (possibly empty).
:func:`decode` checks the framing and, for an inline artifact, its SHA-256 and size.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamtrainer.records.exceptions import RecordsError

MAGIC = b"STMV"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">4sBI")

# Kafka's default message.max.bytes is ~1 MB: the manifest and framing need a few KB.
DEFAULT_INLINE_LIMIT_BYTES = 900_000


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One version of a model, as published to the models topic."""

    model: str  # the record key: one compacted entry per model name
    version: int  # the checkpoint's version (increases by one per checkpoint)
    created_at: float  # unix seconds
    offsets: Mapping[str, int]  # "topic:partition" -> next offset applied into this version
    records_applied: int
    metrics: Mapping[str, float]  # prequential figures at this version (name -> value)
    schema_hash: str  # sha256 of the feature schema (names, count, task) the model takes
    sha256: str  # of the artifact's bytes
    size: int  # of the artifact's bytes
    checkpoint: Mapping[str, Any]  # the checkpoint's metadata (rebuilds the model)
    artifact: bytes | None = field(default=None, repr=False)  # inline safetensors bytes
    uri: str | None = None  # where the artifact lies when not inline

    def manifest(self) -> dict[str, Any]:
        """The JSON manifest (everything but the inline bytes)."""
        return {
            "format": FORMAT_VERSION,
            "model": self.model,
            "version": self.version,
            "created_at": self.created_at,
            "offsets": dict(self.offsets),
            "records_applied": self.records_applied,
            "metrics": dict(self.metrics),
            "schema_hash": self.schema_hash,
            "sha256": self.sha256,
            "size": self.size,
            "inline": self.artifact is not None,
            "uri": self.uri,
            "checkpoint": dict(self.checkpoint),
        }


class ModelVersionError(RecordsError):
    """A models-topic record that is not a model version this reader can take."""


def artifact_digest(artifact: bytes) -> str:
    """The SHA-256 (hex) a manifest carries for ``artifact``."""
    return hashlib.sha256(artifact).hexdigest()


def encode(version: ModelVersion) -> bytes:
    """The models-topic record value of ``version``."""
    if version.artifact is None and not version.uri:
        raise ValueError("a model version needs its artifact inline or a uri")
    manifest = json.dumps(version.manifest(), sort_keys=True, separators=(",", ":")).encode()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(manifest)) + manifest + (version.artifact or b"")


def decode(value: bytes) -> ModelVersion:
    """A models-topic record value back to a :class:`ModelVersion` (artifact checked if inline).

    Raises :class:`ModelVersionError` on anything else.
    """
    if len(value) < _HEADER.size:
        raise ModelVersionError(f"not a model version: {len(value)} bytes")
    magic, fmt, length = _HEADER.unpack_from(value)
    if magic != MAGIC:
        raise ModelVersionError(f"not a model version (starts with {magic!r}, not {MAGIC!r})")
    if fmt != FORMAT_VERSION:
        raise ModelVersionError(f"model version format {fmt} (this reader knows {FORMAT_VERSION})")
    end = _HEADER.size + length
    if end > len(value):
        raise ModelVersionError(f"model version manifest cut short ({len(value)} of {end} bytes)")
    try:
        manifest = json.loads(value[_HEADER.size : end])
    except ValueError as error:
        raise ModelVersionError(f"model version manifest is not JSON: {error}") from None
    artifact = value[end:] if manifest.get("inline") else None
    if artifact is not None and (
        len(artifact) != manifest["size"] or artifact_digest(artifact) != manifest["sha256"]
    ):
        raise ModelVersionError(
            f"model {manifest.get('model')!r} version {manifest.get('version')}: the inline artifact "
            "does not match its manifest's sha256 and size"
        )
    return ModelVersion(
        model=str(manifest["model"]),
        version=int(manifest["version"]),
        created_at=float(manifest["created_at"]),
        offsets={str(k): int(v) for k, v in manifest["offsets"].items()},
        records_applied=int(manifest["records_applied"]),
        metrics={str(k): float(v) for k, v in manifest["metrics"].items()},
        schema_hash=str(manifest["schema_hash"]),
        sha256=str(manifest["sha256"]),
        size=int(manifest["size"]),
        checkpoint=dict(manifest["checkpoint"]),
        artifact=artifact,
        uri=manifest.get("uri"),
    )


def schema_hash(n_features: int | None, feature_names: list[str] | None, task: str) -> str:
    """The ``schema_hash`` of a model that takes ``n_features`` features (named ``feature_names``,
    None: unnamed) for ``task``: the SHA-256 of their canonical JSON."""
    canonical = json.dumps(
        {"feature_names": feature_names, "n_features": n_features, "task": task},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
