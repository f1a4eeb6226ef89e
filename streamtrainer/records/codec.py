"""Wire formats of a sample.

Two codecs. A value says which one it is by its first bytes, so the consumer
never has to read a record's headers (converting them costs librdkafka's
Python binding ~1.7 us per record, as much as polling the record itself):

* ``json``: ``{"features": [1.0, 2.0], "label": 0.5}``, or ``features`` as an
  object of name -> number. Any Kafka client can produce it.
* ``binary``: the 4-byte magic ``b"\\xffSTb"`` (0xFF never starts UTF-8 text,
  so no JSON value can begin with it), then float32 little-endian
  ``[label, f1, ..., fd]``. No parsing at all: a polled batch of binary records
  becomes one ``numpy.frombuffer`` call.

Producers also name the codec in the ``streamtrainer.codec`` header, for other
tools. The decoder looks at it only for a value that is neither binary nor
valid JSON: the header then tells a record in the older headerless binary
layout (float32 ``[label, f1, ..., fd]`` without the magic, named ``binary`` by
its header) and a record in a codec this package does not read (``unknown_codec``).

Decoding works on whole polled batches (no Python object per record on the
binary path) and keeps the records' order, which per-record training needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from streamtrainer.records.exceptions import DecodeError, EncodeError
from streamtrainer.records.sample import Sample

CODEC_HEADER: Final = "streamtrainer.codec"
JSON_CODEC: Final = "json"
BINARY_CODEC: Final = "binary"
CODECS: Final = (JSON_CODEC, BINARY_CODEC)

_BINARY_DTYPE: Final = np.dtype("<f4")
BINARY_MAGIC: Final = b"\xffSTb"
_MAGIC_WORD: Final = int.from_bytes(BINARY_MAGIC, "little")
_MAGIC_BYTES: Final = len(BINARY_MAGIC)
_NUMBER_TYPES: Final = (int, float)
_NUMBER_TYPE_SET: Final = frozenset(_NUMBER_TYPES)


def encode_json(sample: Sample, feature_names: Sequence[str] | None = None) -> bytes:
    """Encode as the JSON wire format; with names, ``features`` becomes an object."""
    values = sample.features.tolist()
    features: object = values
    if feature_names is not None:
        if len(feature_names) != len(values):
            raise EncodeError(f"{len(feature_names)} feature names for {len(values)} features")
        features = dict(zip(feature_names, values, strict=True))
    return orjson.dumps({"features": features, "label": sample.label})


def encode_binary(sample: Sample) -> bytes:
    """Encode as the magic, then float32 little-endian ``[label, features...]``."""
    row = np.empty(sample.features.shape[0] + 1, dtype=_BINARY_DTYPE)
    row[0] = sample.label
    row[1:] = sample.features
    return BINARY_MAGIC + row.tobytes()


def encode_binary_rows(features: npt.NDArray[np.floating], labels: npt.NDArray[np.floating]) -> list[bytes]:
    """Encode many samples at once as binary values (bulk producers, benchmarks, tests)."""
    n, d = features.shape
    rows = np.empty((n, d + 2), dtype=_BINARY_DTYPE)
    rows.view("<u4")[:, 0] = _MAGIC_WORD
    rows[:, 1] = labels
    rows[:, 2:] = features
    buffer = rows.tobytes()
    width = (d + 2) * 4
    return [buffer[i * width : (i + 1) * width] for i in range(n)]


def encode_sample(sample: Sample, codec: str) -> bytes:
    if codec == JSON_CODEC:
        return encode_json(sample)
    if codec == BINARY_CODEC:
        return encode_binary(sample)
    raise EncodeError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def codec_headers(codec: str) -> list[tuple[str, bytes]]:
    """The record headers that name ``codec`` to consumers."""
    if codec not in CODECS:
        raise EncodeError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    return [(CODEC_HEADER, codec.encode())]


class CodecLookup(Protocol):
    """``codecs[i]``: the codec record i names in its header, None when it names none."""

    def __getitem__(self, index: int, /) -> str | None: ...


@dataclass(slots=True)
class DecodedBatch:
    """The decodable part of a polled batch, in the records' order.

    ``index[i]`` is the position in the input of the record in row ``i``;
    ``errors`` lists ``(position, error)`` for the records that did not decode.
    """

    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.float32]
    index: npt.NDArray[np.intp]
    errors: list[tuple[int, DecodeError]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class BatchDecoder:
    """Decodes batches of record values into feature and label arrays.

    The feature dimension is ``n_features`` when given, else fixed by the first
    record that decodes. For object-form ``features`` the order is
    ``feature_names`` when given, else the key order of the first such record.
    """

    def __init__(
        self,
        *,
        n_features: int | None = None,
        feature_names: Sequence[str] | None = None,
        max_value_bytes: int | None = None,
    ) -> None:
        self.max_value_bytes = max_value_bytes
        if feature_names is not None:
            if n_features is not None and n_features != len(feature_names):
                raise ValueError(f"n_features={n_features} but {len(feature_names)} feature names")
            n_features = len(feature_names)
        self._n_features = n_features
        self._feature_names: tuple[str, ...] | None = (
            tuple(feature_names) if feature_names is not None else None
        )

    @property
    def n_features(self) -> int | None:
        return self._n_features

    @property
    def feature_names(self) -> tuple[str, ...] | None:
        return self._feature_names

    def decode_one(self, value: bytes | None, codec: str | None = None) -> Sample:
        """Decode a single value (convenience for tools and tests)."""
        batch = self.decode([value], [codec])
        if batch.errors:
            raise batch.errors[0][1]
        return Sample(batch.features[0].copy(), float(batch.labels[0]))

    def decode(
        self,
        values: Sequence[bytes | None],
        codecs: CodecLookup | None = None,
        *,
        schema_order: Sequence[int] | None = None,
    ) -> DecodedBatch:
        """Decode ``values``, in order.

        ``codecs[i]`` is the codec record i names in its header (None: none). It
        is looked at only for a value that is neither binary nor valid JSON (see
        the module doc), so a lazy sequence that reads headers on demand costs
        nothing for good records.

        While the feature dimension is unknown, the first record that decodes in
        ``schema_order`` (positions; default: the input order) fixes it, whatever its
        codec, before the rest are decoded against it: the worker passes the batch's
        (partition, offset) order. (Decoding the codecs in groups would otherwise let
        a stray JSON record fix the dimension for the binary records before it.)
        """
        if self._n_features is None:
            self.settle_schema(values, codecs, range(len(values)) if schema_order is None else schema_order)
        uniform = self._decode_uniform_binary(values)
        if uniform is not None:
            return uniform
        errors: list[tuple[int, DecodeError]] = []
        binary_positions: list[int] = []
        headerless_positions: list[int] = []  # the older binary layout, without the magic
        json_positions: list[int] = []
        json_rows: list[list[object]] = []  # numbers (checked), converted together below
        json_labels: list[float] = []
        for position, value in enumerate(values):
            if not value:
                errors.append((position, DecodeError("empty_value", "record has no value")))
            elif self.max_value_bytes is not None and len(value) > self.max_value_bytes:
                # Checked before parsing: a huge value must not cost its parse.
                detail = f"{len(value)} bytes, more than the {self.max_value_bytes} allowed"
                errors.append((position, DecodeError("oversize", detail)))
            elif value.startswith(BINARY_MAGIC):
                binary_positions.append(position)
            else:
                try:
                    row, label = self._decode_json(value)
                except DecodeError as error:
                    # Not JSON either: only now does the header matter.
                    codec = codecs[position] if codecs is not None else None
                    if codec is None or codec == JSON_CODEC:
                        errors.append((position, error))
                    elif codec == BINARY_CODEC:
                        headerless_positions.append(position)
                    else:
                        detail = f"codec header {codec[:40]!r}"
                        errors.append((position, DecodeError("unknown_codec", detail)))
                else:
                    json_positions.append(position)
                    json_rows.append(row)
                    json_labels.append(label)

        d = self._n_features or 0
        groups: list[tuple[list[int], npt.NDArray[np.float32]]] = []
        if json_positions:
            json_block = np.empty((len(json_positions), d + 1), dtype=np.float32)
            # One conversion for the batch (orjson gives ints within 64 bits, floats within float64:
            # nothing overflows). Values beyond float32's range become Inf here and are rejected as
            # non-finite below.
            with np.errstate(over="ignore"):
                json_block[:, 1:] = np.array(json_rows, dtype=np.float64)
            json_block[:, 0] = json_labels
            groups.append((json_positions, json_block))
        for positions_of_layout, magic_words in ((binary_positions, 1), (headerless_positions, 0)):
            rows, good = self._decode_binary(values, positions_of_layout, errors, magic_words)
            if good:
                groups.append((good, rows))

        d = self._n_features or 0
        if not groups:
            positions = np.empty(0, dtype=np.intp)
            block = np.empty((0, d + 1), dtype=np.float32)
        else:
            positions = np.asarray([p for group, _ in groups for p in group], dtype=np.intp)
            block = np.concatenate([rows for _, rows in groups]) if len(groups) > 1 else groups[0][1]
        labels = np.ascontiguousarray(block[:, 0])
        features = np.ascontiguousarray(block[:, 1:])
        positions, features, labels = _drop_non_finite(positions, features, labels, errors)
        if len(groups) > 1:
            # Mixed codecs in one batch: restore the records' order.
            order = np.argsort(positions, kind="stable")
            positions, features, labels = positions[order], features[order], labels[order]
        errors.sort(key=lambda item: item[0])
        return DecodedBatch(features, labels, positions, errors)

    def settle_schema(
        self, values: Sequence[bytes | None], codecs: CodecLookup | None, order: Sequence[int]
    ) -> bool:
        """Fix the schema from the first value in ``order`` that decodes on its own (True: fixed).

        Each value is tried alone with a probe decoder, so this costs ~10 us a record, and only
        until one decodes: once per stream, not per batch.
        """
        if self._n_features is not None:
            return True
        probe = BatchDecoder(feature_names=self._feature_names, max_value_bytes=self.max_value_bytes)
        for position in order:
            # The header is read only if the value does not name its codec (as in decode).
            lookup = _Shifted(codecs, position) if codecs is not None else None
            batch = probe.decode([values[position]], lookup, schema_order=())
            if len(batch):
                self._n_features = probe.n_features
                if self._feature_names is None:
                    self._feature_names = probe.feature_names
                return True
            probe = BatchDecoder(feature_names=self._feature_names, max_value_bytes=self.max_value_bytes)
        return False

    def _decode_uniform_binary(self, values: Sequence[bytes | None]) -> DecodedBatch | None:
        """The common case in one pass: every value binary, of the same size (None: not that case)."""
        try:
            sizes = set(map(len, values))  # type: ignore[arg-type]
        except TypeError:  # a record without a value
            return None
        if len(sizes) != 1:
            return None
        size = sizes.pop()
        if size % 4 or size < 12 or (self.max_value_bytes is not None and size > self.max_value_bytes):
            return None
        if self._n_features is not None and size != (self._n_features + 2) * 4:
            return None
        n = len(values)
        words = np.frombuffer(b"".join(values), dtype="<u4").reshape(n, size // 4)  # type: ignore[arg-type]
        if not (words[:, 0] == _MAGIC_WORD).all():
            return None
        self._n_features = size // 4 - 2
        rows = words[:, 1:].view(_BINARY_DTYPE)
        errors: list[tuple[int, DecodeError]] = []
        positions, features, labels = _drop_non_finite(
            np.arange(n, dtype=np.intp), np.ascontiguousarray(rows[:, 1:]), rows[:, 0].copy(), errors
        )
        return DecodedBatch(features, labels, positions, errors)

    def _decode_binary(
        self,
        values: Sequence[bytes | None],
        positions: list[int],
        errors: list[tuple[int, DecodeError]],
        magic_words: int,
    ) -> tuple[npt.NDArray[np.float32], list[int]]:
        """Rows ``[label, features...]`` of the binary values at ``positions``, and which decoded."""
        if not positions:
            return np.empty((0, (self._n_features or 0) + 1), dtype=np.float32), []
        if self._n_features is None:
            first = values[positions[0]] or b""
            if len(first) % 4 or len(first) < (magic_words + 2) * 4:
                self._reject_binary(values, positions[:1], errors, magic_words)
                return self._decode_binary(values, positions[1:], errors, magic_words)
            self._n_features = len(first) // 4 - 1 - magic_words
        words = self._n_features + 1 + magic_words
        good = [p for p in positions if len(values[p] or b"") == words * 4]
        if len(good) != len(positions):
            good_set = set(good)
            self._reject_binary(values, [p for p in positions if p not in good_set], errors, magic_words)
        if not good:
            return np.empty((0, self._n_features + 1), dtype=np.float32), []
        buffer = b"".join(values[p] or b"" for p in good)
        rows = np.frombuffer(buffer, dtype=_BINARY_DTYPE).reshape(len(good), words)
        return rows[:, magic_words:], good

    def _reject_binary(
        self,
        values: Sequence[bytes | None],
        positions: list[int],
        errors: list[tuple[int, DecodeError]],
        magic_words: int,
    ) -> None:
        magic = "the 4-byte magic + " if magic_words else ""
        expected = f"{magic}a multiple of 4 bytes, at least {(magic_words + 2) * 4}"
        if self._n_features is not None:
            size = (self._n_features + 1 + magic_words) * 4
            expected = f"{size} bytes ({magic}{self._n_features} features + label)"
        for position in positions:
            size = len(values[position] or b"")
            detail = f"binary value of {size} bytes, expected {expected}"
            errors.append((position, DecodeError("bad_binary_length", detail)))

    def _decode_json(self, value: bytes) -> tuple[list[object], float]:
        try:
            document = orjson.loads(value)
        except orjson.JSONDecodeError as error:
            raise DecodeError("invalid_json", str(error)[:200]) from None
        if not isinstance(document, dict):
            raise DecodeError("not_an_object", f"expected a JSON object, got {_kind(document)}")
        try:
            raw_features = document["features"]
            label = document["label"]
        except KeyError as error:
            raise DecodeError("missing_field", f"field {error.args[0]!r} is missing") from None
        if not _is_number(label):
            raise DecodeError("non_numeric", f"label is {_kind(label)}, expected a number")
        if isinstance(raw_features, dict):
            row = self._ordered_features(raw_features)
        elif isinstance(raw_features, list):
            # The types of all values in one C-level pass (orjson gives exactly int or float for a
            # number; bool is neither), and no array per record: one conversion per batch in
            # decode. JSON decode at d=16: 9.8 -> 4.6 us a record (orjson.loads alone: 2.1-3.1).
            if not _NUMBER_TYPE_SET.issuperset(map(type, raw_features)):
                raise DecodeError("non_numeric", "features must all be numbers")
            row = raw_features
        else:
            raise DecodeError("non_numeric", f"features is {_kind(raw_features)}, expected a list or object")
        if self._n_features is None:
            if not row:
                raise DecodeError("wrong_feature_count", "features is empty")
            self._n_features = len(row)
        elif len(row) != self._n_features:
            raise DecodeError("wrong_feature_count", f"{len(row)} features, expected {self._n_features}")
        if not math.isfinite(label):
            raise DecodeError("non_finite", "label is NaN or Inf")
        return row, float(label)

    def _ordered_features(self, named: dict[str, object]) -> list[object]:
        if self._feature_names is None:
            if not named:
                raise DecodeError("wrong_feature_count", "features is empty")
            if self._n_features is not None and len(named) != self._n_features:
                raise DecodeError(
                    "wrong_feature_count", f"{len(named)} features, expected {self._n_features}"
                )
            # The first named record fixes the order for the rest of the stream.
            self._feature_names = tuple(named)
            self._n_features = len(named)
        names = self._feature_names
        if len(named) != len(names) or any(name not in named for name in names):
            missing = [name for name in names if name not in named][:5]
            extra = [name for name in named if name not in names][:5]
            raise DecodeError(
                "unknown_feature_names",
                f"feature names differ from the declared ones (missing {missing}, extra {extra})",
            )
        row = [named[name] for name in names]
        if not _NUMBER_TYPE_SET.issuperset(map(type, row)):
            raise DecodeError("non_numeric", "features must all be numbers")
        return row


class _Shifted:
    """``codecs`` seen from ``position``: the lookup of a one-value batch, still lazy."""

    __slots__ = ("codecs", "position")

    def __init__(self, codecs: CodecLookup, position: int) -> None:
        self.codecs = codecs
        self.position = position

    def __getitem__(self, index: int, /) -> str | None:
        return self.codecs[self.position + index]


def _drop_non_finite(
    positions: npt.NDArray[np.intp],
    features: npt.NDArray[np.float32],
    labels: npt.NDArray[np.float32],
    errors: list[tuple[int, DecodeError]],
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """A record with a non-finite value cannot be trained on: report it like a decode error."""
    finite = np.isfinite(features).all(axis=1) & np.isfinite(labels)
    if finite.all():
        return positions, features, labels
    for position in positions[~finite]:
        errors.append((int(position), DecodeError("non_finite", "NaN or Inf value")))
    errors.sort(key=lambda item: item[0])
    return positions[finite], features[finite], labels[finite]


def _is_number(value: object) -> bool:
    # bool is an int subclass, but true/false is not a feature value.
    return isinstance(value, _NUMBER_TYPES) and not isinstance(value, bool)


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
