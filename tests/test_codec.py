"""Codec round trips (property-based) and the typed errors of bad values."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtrainer.records import (
    BINARY_MAGIC,
    BatchDecoder,
    DecodeError,
    Sample,
    encode_binary,
    encode_binary_rows,
    encode_json,
)
from streamtrainer.records.codec import BINARY_CODEC, JSON_CODEC, codec_headers, encode_sample
from streamtrainer.records.exceptions import EncodeError

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
rows = st.integers(min_value=1, max_value=32).flatmap(
    lambda d: st.lists(
        st.tuples(st.lists(finite32, min_size=d, max_size=d), finite32), min_size=1, max_size=20
    )
)


@settings(max_examples=200, deadline=None)
@given(rows, st.lists(st.sampled_from([JSON_CODEC, BINARY_CODEC, None]), min_size=20, max_size=20))
def test_round_trip_keeps_values_and_order(
    records: list[tuple[list[float], float]], codecs: list[str | None]
) -> None:
    samples = [Sample.of(features, label) for features, label in records]
    chosen = codecs[: len(samples)]
    values = [encode_sample(s, c or JSON_CODEC) for s, c in zip(samples, chosen, strict=True)]
    batch = BatchDecoder().decode(values, chosen)
    assert batch.errors == []
    assert batch.index.tolist() == list(range(len(samples)))
    np.testing.assert_array_equal(batch.features, np.stack([s.features for s in samples]))
    np.testing.assert_array_equal(batch.labels, np.array([s.label for s in samples], dtype=np.float32))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), finite32, min_size=1, max_size=10), finite32)
def test_named_features_follow_the_declared_order(named: dict[str, float], label: float) -> None:
    order = sorted(named)
    value = orjson.dumps({"features": named, "label": label})
    sample = BatchDecoder(feature_names=order).decode_one(value)
    np.testing.assert_array_equal(sample.features, np.array([named[k] for k in order], dtype=np.float32))


def test_first_named_record_fixes_the_order() -> None:
    decoder = BatchDecoder()
    decoder.decode_one(b'{"features": {"b": 2, "a": 1}, "label": 0}')
    assert decoder.feature_names == ("b", "a")
    # Same names in another order still map by name.
    sample = decoder.decode_one(b'{"features": {"a": 10, "b": 20}, "label": 1}')
    assert sample.features.tolist() == [20.0, 10.0]


def test_json_written_by_hand_decodes() -> None:
    sample = BatchDecoder().decode_one(b'{"features": [1, 2.5, -3], "label": 1}')
    assert sample.features.tolist() == [1.0, 2.5, -3.0]
    assert sample.label == 1.0


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not json", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'{"label": 1}', "missing_field"),
        (b'{"features": [1, 2]}', "missing_field"),
        (b'{"features": [1, "2"], "label": 1}', "non_numeric"),
        (b'{"features": [1, true], "label": 1}', "non_numeric"),
        (b'{"features": [1, 2], "label": "x"}', "non_numeric"),
        (b'{"features": "1,2", "label": 1}', "non_numeric"),
        (b'{"features": [1, 2, 3], "label": 1}', "wrong_feature_count"),
        (b'{"features": {"x": 1, "zz": 2}, "label": 1}', "unknown_feature_names"),
        (b"", "empty_value"),
        (b'{"features": [1e39, 2], "label": 1}', "non_finite"),
    ],
)
def test_bad_values_raise_a_typed_error_with_the_reason(value: bytes, reason: str) -> None:
    decoder = BatchDecoder()
    decoder.decode_one(b'{"features": {"x": 1, "y": 2}, "label": 0}')
    with pytest.raises(DecodeError) as raised:
        decoder.decode_one(value)
    assert raised.value.reason == reason
    assert raised.value.detail


def test_binary_errors_and_unknown_codec() -> None:
    decoder = BatchDecoder(n_features=2)
    good = encode_binary(Sample.of([1, 2], 3))
    nan = encode_binary(Sample.of([1, math.nan], 3))
    batch = decoder.decode(
        [good, good[:-1], nan, good, b"{}", good[4:]],
        [BINARY_CODEC, BINARY_CODEC, BINARY_CODEC, None, "avro", None],
    )
    assert batch.index.tolist() == [0, 3]  # binary values name themselves: no header needed
    assert [(p, e.reason) for p, e in batch.errors] == [
        (1, "bad_binary_length"),
        (2, "non_finite"),
        (4, "unknown_codec"),
        (5, "invalid_json"),  # the headerless layout without its header: taken as JSON
    ]


class _CountingCodecs:
    """A header lookup that records which records' headers the decoder read."""

    def __init__(self, codecs: list[str | None]) -> None:
        self.codecs = codecs
        self.read: list[int] = []

    def __getitem__(self, index: int) -> str | None:
        self.read.append(index)
        return self.codecs[index]


def test_headers_are_read_only_for_values_that_do_not_name_their_codec() -> None:
    samples = [Sample.of([i, -i], i % 2) for i in range(6)]
    binary = [encode_binary(s) for s in samples[:3]]
    json = [encode_json(s) for s in samples[3:]]
    headerless = encode_binary(Sample.of([7, 8], 1))[4:]  # the older layout: no magic
    values = [*binary, *json, headerless, b"\x00\x01", b"{oops"]
    lookup = _CountingCodecs([BINARY_CODEC] * 3 + [JSON_CODEC] * 3 + [BINARY_CODEC, "avro", None])
    batch = BatchDecoder().decode(values, lookup)
    assert lookup.read == [6, 7, 8]  # never for the six good records
    assert batch.index.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert batch.features[6].tolist() == [7.0, 8.0] and batch.labels[6] == 1.0
    assert [(p, e.reason) for p, e in batch.errors] == [(7, "unknown_codec"), (8, "invalid_json")]


def test_a_batch_of_binary_records_decodes_in_one_pass_and_keeps_its_errors() -> None:
    features = np.arange(40, dtype=np.float32).reshape(10, 4)
    labels = np.arange(10, dtype=np.float32)
    features[3, 1] = np.inf
    values = encode_binary_rows(features, labels)
    assert all(v.startswith(BINARY_MAGIC) and len(v) == 4 + 5 * 4 for v in values)
    assert values[5] == encode_binary(Sample.of(features[5].tolist(), float(labels[5])))
    decoder = BatchDecoder(max_value_bytes=24)
    batch = decoder.decode(values)
    assert decoder.n_features == 4
    assert batch.index.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert [(p, e.reason) for p, e in batch.errors] == [(3, "non_finite")]
    np.testing.assert_array_equal(batch.features, np.delete(features, 3, axis=0))
    np.testing.assert_array_equal(batch.labels, np.delete(labels, 3))
    batch.features[0, 0] = 1.0  # the rows are the caller's to modify
    # Over the size cap, or one feature too many: the same values are refused, each with its reason.
    assert {e.reason for _, e in BatchDecoder(max_value_bytes=20).decode(values).errors} == {"oversize"}
    wide = encode_binary_rows(np.zeros((2, 5), dtype=np.float32), np.zeros(2, dtype=np.float32))
    assert [e.reason for _, e in BatchDecoder(n_features=4).decode(wide).errors] == ["bad_binary_length"] * 2


def test_mixed_batch_one_bad_record_does_not_spoil_the_rest() -> None:
    decoder = BatchDecoder()
    values = [encode_json(Sample.of([i, i], i)) for i in range(5)]
    values[2] = b"garbage"
    batch = decoder.decode(values)
    assert batch.index.tolist() == [0, 1, 3, 4]
    assert batch.labels.tolist() == [0.0, 1.0, 3.0, 4.0]
    assert [p for p, _ in batch.errors] == [2]


def test_encoding_guards() -> None:
    with pytest.raises(EncodeError):
        encode_sample(Sample.of([1.0], 0), "avro")
    with pytest.raises(EncodeError):
        codec_headers("avro")
    with pytest.raises(EncodeError):
        encode_json(Sample.of([1.0, 2.0], 0), feature_names=["only-one"])
    named = orjson.loads(encode_json(Sample.of([1.0, 2.0], 0), feature_names=["a", "b"]))
    assert named == {"features": {"a": 1.0, "b": 2.0}, "label": 0.0}
