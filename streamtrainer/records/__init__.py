"""Training samples and their wire formats. Knows nothing of Kafka clients."""

from streamtrainer.records.codec import (
    BINARY_CODEC,
    BINARY_MAGIC,
    CODEC_HEADER,
    JSON_CODEC,
    BatchDecoder,
    CodecLookup,
    DecodedBatch,
    encode_binary,
    encode_binary_rows,
    encode_json,
    encode_sample,
)
from streamtrainer.records.exceptions import DecodeError, RecordsError
from streamtrainer.records.sample import Sample

__all__ = [
    "BINARY_CODEC",
    "BINARY_MAGIC",
    "CODEC_HEADER",
    "JSON_CODEC",
    "BatchDecoder",
    "CodecLookup",
    "DecodeError",
    "DecodedBatch",
    "RecordsError",
    "Sample",
    "encode_binary",
    "encode_binary_rows",
    "encode_json",
    "encode_sample",
]
