"""The schema is the first record's in the order given, whatever the codecs of a mixed batch."""

from __future__ import annotations

import numpy as np
import orjson

from streamtrainer.records import BatchDecoder, Sample, encode_binary


def _mixed() -> list[bytes | None]:
    eight = encode_binary(Sample(np.arange(8, dtype=np.float32), 1.0))
    return [eight] * 50 + [orjson.dumps({"features": [1, 2, 3], "label": 1})] + [eight] * 450


def test_a_stray_json_record_does_not_fix_the_binary_records_dimension() -> None:
    decoder = BatchDecoder()
    batch = decoder.decode(_mixed())
    assert decoder.n_features == 8
    assert len(batch) == 500 and [(p, e.reason) for p, e in batch.errors] == [(50, "wrong_feature_count")]


def test_the_schema_order_decides() -> None:
    decoder = BatchDecoder()
    batch = decoder.decode(_mixed(), schema_order=[50, *range(50), *range(51, 501)])
    assert decoder.n_features == 3 and len(batch) == 1


def test_undecodable_records_are_skipped_and_named_features_fix_the_names() -> None:
    values: list[bytes | None] = [
        b"garbage",
        None,
        orjson.dumps({"features": {"b": 1, "a": 2}, "label": 0}),
        orjson.dumps({"features": [1, 2, 3], "label": 0}),
    ]
    decoder = BatchDecoder()
    batch = decoder.decode(values)
    assert decoder.feature_names == ("b", "a") and decoder.n_features == 2
    assert batch.index.tolist() == [2]
    assert sorted(e.reason for _, e in batch.errors) == ["empty_value", "invalid_json", "wrong_feature_count"]
