"""Training samples and their wire formats. Knows nothing of Kafka clients."""

from streamtrainer.records.codec import (
    BINARY_CODEC,
    CODEC_HEADER,
    JSON_CODEC,
    BatchDecoder,
    DecodedBatch,
    encode_binary,
    encode_json,
    encode_sample,
)
from streamtrainer.records.exceptions import DecodeError, RecordsError
from streamtrainer.records.sample import Sample

__all__ = [
    "BINARY_CODEC",
    "CODEC_HEADER",
    "JSON_CODEC",
    "BatchDecoder",
    "DecodeError",
    "DecodedBatch",
    "RecordsError",
    "Sample",
    "encode_binary",
    "encode_json",
    "encode_sample",
]
