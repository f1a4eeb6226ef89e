"""The models topic's record format (records/model_version.py): round trip and refusals."""

from __future__ import annotations

import pytest

from streamtrainer.records.model_version import (
    ModelVersion,
    ModelVersionError,
    artifact_digest,
    decode,
    encode,
)


def _version(artifact: bytes | None = b"\x00tensors", uri: str | None = None) -> ModelVersion:
    data = artifact if artifact is not None else b"elsewhere"
    return ModelVersion(
        model="events",
        version=7,
        created_at=1_700_000_000.5,
        offsets={"events:0": 120, "events:1": 98},
        records_applied=218,
        metrics={"rmse": 0.25, "records": 218.0},
        schema_hash="ab" * 32,
        sha256=artifact_digest(data),
        size=len(data),
        checkpoint={"model": "mlp", "n_features": 4},
        artifact=artifact,
        uri=uri,
    )


def test_an_inline_version_round_trips() -> None:
    version = _version()
    back = decode(encode(version))
    assert back == version
    assert back.artifact == b"\x00tensors"


def test_a_version_by_uri_carries_no_bytes() -> None:
    version = _version(artifact=None, uri="file:///models/7.safetensors")
    value = encode(version)
    back = decode(value)
    assert back.artifact is None and back.uri == "file:///models/7.safetensors"
    assert back.sha256 == artifact_digest(b"elsewhere")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"STM", "not a model version"),
        (b"XXXX\x01\x00\x00\x00\x02{}", "starts with"),
        (b"STMV\x09\x00\x00\x00\x02{}", "format 9"),
        (b"STMV\x01\x00\x00\x10\x00{}", "cut short"),
        (b"STMV\x01\x00\x00\x00\x02{]", "not JSON"),
    ],
)
def test_anything_else_is_refused_with_a_reason(value: bytes, message: str) -> None:
    with pytest.raises(ModelVersionError, match=message):
        decode(value)


def test_a_changed_inline_artifact_fails_its_checksum() -> None:
    value = bytearray(encode(_version()))
    value[-1] ^= 0xFF
    with pytest.raises(ModelVersionError, match="sha256"):
        decode(bytes(value))


def test_a_version_needs_its_bytes_somewhere() -> None:
    with pytest.raises(ValueError, match="inline or a uri"):
        encode(_version(artifact=None))
