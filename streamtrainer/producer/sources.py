"""Where the producer's samples come from: synthetic, a CSV or JSON-lines file, or stdin.

Files are streamed row by row (never loaded whole), so a source can be larger
than memory or a pipe that never ends. Every bad row is a :class:`SourceError`
naming the file and line: a producer that silently skipped rows would train
models on data that differs from what the user believes they sent.

Positions, which a run reports as the last one delivered and ``skip`` resumes after (1-based):

- JSON lines: the line number, every line counted (blank ones too);
- CSV: the row number after the header (row 1 is the first row after it; blank rows count);
- synthetic: the record number (record ``i`` of the stream is position ``i + 1``).

``skip=N`` skips the first N of those without parsing them, so a source reopened with the last
position a run delivered continues with the very next record.

A CSV's features are every column but the label and the key, in the header's order, unless
``features`` names them (in the order wanted) or ``ignore_columns`` leaves some out (an ``id``, a
text column). :func:`check_csv_file` reads a CSV file as it would be published before anything
connects, so that a text column among the features is reported before a topic is created: the
whole file up to :data:`WHOLE_CHECK_BYTES` (a 98 MB file of 1M rows of 11 numbers took 5.0 s on a
busy 2-core machine, where reading it as samples took 5.9 s; of 200,000 such rows, 0.9 s checked
against 2.2 s published), the first :data:`LARGE_FILE_CHECK_ROWS` rows of a larger one. Stdin
and pipes cannot be read twice: a bad row stops the run before it is sent, with the rows before it
published.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import logging
import math
import os
import stat
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Final, Self, TextIO, TypeGuard

import numpy as np
import orjson

from streamtrainer.producer.exceptions import SourceDataError, SourceError, SourceSpecError
from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.records.sample import Sample

logger = logging.getLogger(__name__)

SPEC_FORMS: Final = ("synthetic", "csv:PATH", "jsonl:PATH", "-")
STDIN_NAME: Final = "<stdin>"
_SPEC_HELP: Final = "synthetic, csv:PATH, jsonl:PATH, or - (JSON lines on stdin); PATH may be - for stdin"
_FLOAT32_MAX: Final = float(np.finfo(np.float32).max)
_MAX_SHOWN: Final = 40  # characters of a bad value quoted in an error message
# A CSV file up to this size is read whole before anything connects; of a larger one, the first rows.
WHOLE_CHECK_BYTES: Final = 256 * 1024 * 1024
LARGE_FILE_CHECK_ROWS: Final = 100_000
_TEXT_HINT: Final = " (a text column? leave it out with --ignore-columns, or choose --features)"


class _Reader:
    """One kind of input; ``samples()`` is called once.

    ``position`` is the position (see the module doc) of the last sample ``samples()`` yielded, or
    the number skipped before the first; ``unit`` names it ("line", "row", "record").
    """

    name: str
    feature_names: tuple[str, ...] | None = None
    position: int = 0
    unit: str = "record"
    # Every position is one sample (no blank lines or rows): the position of the k-th sample after
    # ``skip`` is skip + k, so a consumer need not read ``position`` per sample.
    dense: bool = False

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the reader opened (nothing by default)."""


class SampleSource:
    """A single-pass iterator of :class:`Sample`, to be closed (or used with ``with``).

    ``feature_names`` is the CSV header minus the label and key columns, or the
    names of the first JSON record whose ``features`` is an object (known once
    that record has been read), or None when the features are unnamed.
    ``position`` is the source position (see the module doc) of the last sample
    returned (``skip`` before the first), in units of ``unit``.
    """

    def __init__(self, reader: _Reader, count: int | None = None, skip: int = 0) -> None:
        self._reader = reader
        self.name = reader.name
        self.unit = reader.unit
        self.skip = skip
        self.dense = reader.dense
        reader.position = skip
        self._generator = reader.samples()
        self._samples: Iterator[Sample] = (
            self._generator if count is None else itertools.islice(self._generator, count)
        )
        self._closed = False

    @property
    def feature_names(self) -> tuple[str, ...] | None:
        """The feature names, when the source names them (see the class doc)."""
        return self._reader.feature_names

    @property
    def position(self) -> int:
        """The position of the last sample returned (``skip`` before the first)."""
        return self._reader.position

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Sample:
        try:
            return next(self._samples)
        except StopIteration:
            # Exhausted (or the count reached): release the file right away.
            self.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._generator, "close", None)
        if close is not None:
            close()
        self._reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SampleSource({self.name!r})"


def open_source(
    spec: str,
    *,
    label: str | None = None,
    key_column: str | None = None,
    synthetic: SyntheticSpec | None = None,
    count: int | None = None,
    stdin: TextIO | None = None,
    skip: int = 0,
    features: Sequence[str] | None = None,
    ignore_columns: Sequence[str] | None = None,
) -> SampleSource:
    """Open the source named by ``spec`` (see :data:`SPEC_FORMS`).

    ``label`` (required), ``key_column``, ``features`` and ``ignore_columns`` name CSV columns (see
    the module doc); ``synthetic`` is
    the generator spec for ``synthetic`` (ignored otherwise); ``count`` caps the
    number of samples (None: all, which is forever for ``synthetic``);
    ``stdin`` replaces ``sys.stdin`` (it is never closed); ``skip`` skips the
    first positions (lines, rows after the header, records: see the module doc)
    unread, and reading fails if the source ends before them. Raises
    :class:`SourceSpecError` for a bad spec, :class:`SourceDataError` for a file that cannot be
    opened or a CSV header without a named column.
    """
    columns = _Columns(label, key_column, features, ignore_columns)
    check_spec(
        spec,
        label=label,
        key_column=key_column,
        count=count,
        skip=skip,
        features=features,
        ignore_columns=ignore_columns,
    )
    kind, colon, path = spec.partition(":")
    is_csv = kind == "csv" and bool(colon)
    reader: _Reader
    if spec == "synthetic":
        reader = _SyntheticReader(synthetic or SyntheticSpec(), skip)
    elif spec == "-":
        reader = _JsonLinesReader(_stdin(stdin), STDIN_NAME, owned=False, skip=skip)
    elif is_csv or (kind == "jsonl" and colon):
        if not path:
            raise SourceError(f"source {spec!r} has no path; expected {kind}:PATH")
        reader = _open_csv(path, columns, stdin, skip) if is_csv else _open_jsonl(path, stdin, skip)
    else:
        raise SourceError(f"unknown source {spec!r}; expected {_SPEC_HELP}")
    logger.debug("opened source %s", reader.name)
    return SampleSource(reader, count, skip)


def check_spec(
    spec: str,
    *,
    label: str | None = None,
    key_column: str | None = None,
    count: int | None = None,
    skip: int = 0,
    features: Sequence[str] | None = None,
    ignore_columns: Sequence[str] | None = None,
) -> None:
    """Raise :class:`SourceSpecError` for a spec that cannot work, reading nothing (so a command can
    check it before it connects); :func:`open_source` checks the same first."""
    if count is not None and count < 0:
        raise SourceSpecError(f"count must be >= 0, got {count}")
    if skip < 0:
        raise SourceSpecError(f"skip must be >= 0, got {skip}")
    kind, colon, path = spec.partition(":")
    is_csv = kind == "csv" and bool(colon)
    if not is_csv and (label is not None or key_column is not None):
        raise SourceSpecError(f"label and key_column name CSV columns; source {spec!r} is not csv:PATH")
    if not is_csv and (features or ignore_columns):
        raise SourceSpecError(
            f"features and ignore_columns name CSV columns; source {spec!r} is not csv:PATH"
        )
    _check_column_choice(label, key_column, features, ignore_columns)
    if spec in ("synthetic", "-"):
        return
    if not (is_csv or (kind == "jsonl" and colon)):
        raise SourceSpecError(f"unknown source {spec!r}; expected {_SPEC_HELP}")
    if not path:
        raise SourceSpecError(f"source {spec!r} has no path; expected {kind}:PATH")
    if is_csv and label is None:
        name = STDIN_NAME if path == "-" else path
        raise SourceSpecError(f"{name}: a CSV source needs the name of its label column (label=...)")


def _check_column_choice(
    label: str | None,
    key_column: str | None,
    features: Sequence[str] | None,
    ignore_columns: Sequence[str] | None,
) -> None:
    """The CSV column options agree with each other (the header is not read here)."""
    if features and ignore_columns:
        raise SourceSpecError(
            "give either features (the feature columns) or ignore_columns (the columns left out), not both"
        )
    if features:
        duplicates = sorted({name for name in features if list(features).count(name) > 1})
        if duplicates:
            raise SourceSpecError(f"features names {duplicates} more than once")
        for name, role in ((label, "label"), (key_column, "key")):
            if name is not None and name in features:
                raise SourceSpecError(f"column {name!r} is the {role} column; it cannot be a feature too")
    if ignore_columns and label is not None and label in ignore_columns:
        raise SourceSpecError(f"column {label!r} is the label column; it cannot be ignored")


@dataclass(frozen=True)
class _Columns:
    """The CSV column options, as given."""

    label: str | None
    key_column: str | None
    features: Sequence[str] | None
    ignore_columns: Sequence[str] | None


@dataclass(frozen=True)
class CsvCheck:
    """What :func:`check_csv_file` read: ``rows`` samples (non-blank rows after ``skip``), the whole
    of what a run would publish or only its first rows (``whole``), in ``seconds``."""

    rows: int
    whole: bool
    seconds: float


def check_csv_file(
    spec: str,
    *,
    label: str | None,
    key_column: str | None = None,
    features: Sequence[str] | None = None,
    ignore_columns: Sequence[str] | None = None,
    count: int | None = None,
    skip: int = 0,
) -> CsvCheck | None:
    """Read a CSV file source as a run would publish it (after ``skip``, at most ``count`` rows) and
    raise :class:`SourceDataError` for its first problem: a header without a named column, a row
    whose width differs from the header's, a feature or label that is not a finite float32 number.

    The whole file is read when it is at most :data:`WHOLE_CHECK_BYTES`, its first
    :data:`LARGE_FILE_CHECK_ROWS` rows otherwise. None, reading nothing, when the source is not a
    CSV file that can be read twice (synthetic, JSON lines, stdin, a pipe).
    """
    check_spec(
        spec,
        label=label,
        key_column=key_column,
        count=count,
        skip=skip,
        features=features,
        ignore_columns=ignore_columns,
    )
    kind, _, path = spec.partition(":")
    if kind != "csv" or path == "-":
        return None
    try:
        status = os.stat(path)
    except OSError as error:
        raise SourceDataError(f"{path}: cannot open: {error.strerror or error}") from None
    if not stat.S_ISREG(status.st_mode):
        return None  # a FIFO, a device: what is read now would not be there for the run
    whole = status.st_size <= WHOLE_CHECK_BYTES
    limit = (
        count if whole else min(LARGE_FILE_CHECK_ROWS, count if count is not None else LARGE_FILE_CHECK_ROWS)
    )
    started = time.monotonic()
    reader = _open_csv(path, _Columns(label, key_column, features, ignore_columns), None, skip)
    try:
        rows = reader.check(limit)
    except SourceDataError:
        raise
    except SourceError as error:
        raise SourceDataError(str(error)) from None
    finally:
        reader.close()
    return CsvCheck(rows, whole or (limit is not None and rows < limit), time.monotonic() - started)


def _stdin(stdin: TextIO | None) -> TextIO:
    return stdin if stdin is not None else sys.stdin


def _open_text(path: str) -> TextIO:
    try:
        # newline="" as the csv module requires; utf-8-sig drops a spreadsheet's BOM.
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as error:
        raise SourceDataError(f"{path}: cannot open: {error.strerror or error}") from None


def _open_binary(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as error:
        raise SourceDataError(f"{path}: cannot open: {error.strerror or error}") from None


def _open_csv(path: str, columns: _Columns, stdin: TextIO | None, skip: int) -> _CsvReader:
    name = STDIN_NAME if path == "-" else path
    if columns.label is None:
        raise SourceError(f"{name}: a CSV source needs the name of its label column (label=...)")
    if path == "-":
        return _CsvReader(_stdin(stdin), name, columns, owned=False, skip=skip)
    stream = _open_text(path)
    try:
        return _CsvReader(stream, name, columns, owned=True, skip=skip)
    except BaseException:
        stream.close()
        raise


def _open_jsonl(path: str, stdin: TextIO | None, skip: int) -> _JsonLinesReader:
    if path == "-":
        return _JsonLinesReader(_stdin(stdin), STDIN_NAME, owned=False, skip=skip)
    return _JsonLinesReader(_open_binary(path), path, owned=True, skip=skip)


def _too_short(name: str, skip: int, unit: str, found: int) -> SourceError:
    return SourceError(f"{name}: cannot skip {skip} {unit}s: it ends after {found}")


class _SyntheticReader(_Reader):
    unit = "record"
    dense = True

    def __init__(self, spec: SyntheticSpec, skip: int = 0) -> None:
        self.name = "synthetic"
        self._spec = spec
        self._skip = skip

    def samples(self) -> Iterator[Sample]:
        # ``position`` is not updated per sample (dense: the publisher counts): the stream is
        # the fastest source (~150k records/s published) and every attribute store shows.
        return generate(self._spec, None, start=self._skip)


class _CsvReader(_Reader):
    """CSV with a header row; the feature and label columns must be numeric (see the module doc)."""

    unit = "row"

    def __init__(
        self,
        stream: TextIO,
        name: str,
        columns: _Columns,
        *,
        owned: bool,
        skip: int = 0,
    ) -> None:
        self.name = name
        self._stream = stream
        self._owned = owned
        self._skip = skip
        self._rows = csv.reader(stream)
        header = self._read_header()
        self._columns = header
        label, key_column = columns.label, columns.key_column
        assert label is not None  # _open_csv refuses a CSV source without one
        positions = {column: i for i, column in enumerate(header)}
        named = {label, key_column, *(columns.features or ()), *(columns.ignore_columns or ())}
        duplicates = sorted({c for c in header if header.count(c) > 1})
        # Duplicated names are ambiguous where they are named or taken as features by default.
        if duplicates and (not columns.features or named & set(duplicates)):
            raise SourceDataError(f"{name}:{self._rows.line_num}: duplicate columns {duplicates}")
        if label not in positions:
            raise SourceDataError(f"{name}: label column {label!r} is not in the header {header}")
        if key_column is not None and key_column not in positions:
            raise SourceDataError(f"{name}: key column {key_column!r} is not in the header {header}")
        if key_column == label:
            raise SourceDataError(f"{name}: column {label!r} cannot be both the label and the key")
        for option, given in (("feature", columns.features), ("ignored", columns.ignore_columns)):
            missing = [column for column in given or () if column not in positions]
            if missing:
                raise SourceDataError(f"{name}: {option} column(s) {missing} not in the header {header}")
        self._label_index = positions[label]
        self._key_index = positions[key_column] if key_column is not None else None
        if columns.features:
            self._feature_index = [positions[column] for column in columns.features]
        else:
            left_out = {self._label_index, self._key_index}
            left_out |= {positions[column] for column in columns.ignore_columns or ()}
            self._feature_index = [i for i in range(len(header)) if i not in left_out]
        if not self._feature_index:
            raise SourceDataError(f"{name}: no feature columns besides the label, the key and those ignored")
        self.feature_names = tuple(header[i] for i in self._feature_index)
        self._checked = [*self._feature_index, self._label_index]  # columns that must be numbers

    def _next_row(self) -> list[str] | None:
        """The next non-blank row, or None at the end."""
        while (row := self._any_row()) is not None:
            if any(cell.strip() for cell in row):
                return row
        return None

    def _any_row(self) -> list[str] | None:
        """The next row, blank or not, or None at the end."""
        try:
            return next(self._rows)
        except StopIteration:
            return None
        except UnicodeDecodeError:
            line = self._rows.line_num + 1
            raise SourceError(f"{self.name}:{line}: not valid UTF-8") from None
        except csv.Error as error:
            raise SourceError(f"{self.name}:{self._rows.line_num}: {error}") from None

    def _read_header(self) -> list[str]:
        try:
            row = self._next_row()
        except SourceError as error:
            raise SourceDataError(str(error)) from None
        if row is None:
            raise SourceDataError(f"{self.name}: empty file, expected a header row")
        return [cell.strip() for cell in row]

    def _skip_rows(self) -> int:
        number = 0  # rows after the header, blank ones too
        while number < self._skip:
            if self._any_row() is None:
                raise _too_short(self.name, self._skip, self.unit, number)
            number += 1
        return number

    def samples(self) -> Iterator[Sample]:
        width = len(self._columns)
        features_at = self._feature_index
        label_at = self._label_index
        key_at = self._key_index
        number = self._skip_rows()
        while (row := self._any_row()) is not None:
            number += 1
            if not any(cell.strip() for cell in row):
                continue
            line = self._rows.line_num
            if len(row) != width:
                raise self._bad_width(row, line, number)
            try:
                values = [float(row[i]) for i in features_at]
                label = float(row[label_at])
            except ValueError:
                raise self._bad_cell(row, line, number) from None
            if not (_in_range(label) and all(map(_in_range, values))):
                raise self._bad_cell(row, line, number)
            key = row[key_at].encode() if key_at is not None and row[key_at] else None
            sample = Sample(np.asarray(values, dtype=np.float32), label, key)
            self.position = number
            yield sample

    def check(self, limit: int | None) -> int:
        """Read the rows :meth:`samples` would yield (at most ``limit``: None for all) and check them as
        it does, making no sample; the number read. Raises :class:`SourceError` at the first bad one."""
        width = len(self._columns)
        checked = self._checked
        number = self._skip_rows()
        found = 0
        while (limit is None or found < limit) and (row := self._any_row()) is not None:
            number += 1
            if not any(cell.strip() for cell in row):
                continue
            line = self._rows.line_num
            if len(row) != width:
                raise self._bad_width(row, line, number)
            try:
                if not all(_in_range(float(row[i])) for i in checked):
                    raise self._bad_cell(row, line, number)
            except ValueError:
                raise self._bad_cell(row, line, number) from None
            found += 1
        return found

    def _bad_width(self, row: Sequence[str], line: int, number: int) -> SourceError:
        expected = len(self._columns)
        return SourceError(
            f"{self.name}:{line}: {len(row)} fields, expected {expected} as in the header (row {number})"
        )

    def _bad_cell(self, row: Sequence[str], line: int, number: int) -> SourceError:
        for i in self._checked:
            problem = _number_problem(row[i])
            if problem is not None:
                hint = _TEXT_HINT if problem.endswith(" is not a number") and i != self._label_index else ""
                return SourceError(
                    f"{self.name}:{line}: column {self._columns[i]!r}: {problem} (row {number}){hint}"
                )
        return SourceError(f"{self.name}:{line}: bad row (row {number})")  # not reached: some cell was bad

    def close(self) -> None:
        if self._owned:
            self._stream.close()


def _number_problem(cell: str) -> str | None:
    """Why ``cell`` is not a usable float32 number, or None if it is one."""
    shown = repr(cell[:_MAX_SHOWN])
    if not cell.strip():
        return "empty value, expected a number"
    try:
        value = float(cell)
    except ValueError:
        return f"{shown} is not a number"
    if not math.isfinite(value):
        return f"{shown} is not a finite number"
    if not _in_range(value):
        return f"{shown} is out of the float32 range"
    return None


class _JsonLinesReader(_Reader):
    """One JSON wire-format object per line, plus an optional string ``key``."""

    unit = "line"

    def __init__(self, lines: Iterable[str | bytes], name: str, *, owned: bool, skip: int = 0) -> None:
        self.name = name
        self._lines = lines
        self._owned = owned
        self._skip = skip
        self._n_features: int | None = None
        self._first_line = 0  # the line that fixed the feature count
        self._names_line = 0  # the line that fixed the feature names

    def samples(self) -> Iterator[Sample]:
        lines = iter(self._lines)
        skipped = sum(1 for _ in itertools.islice(lines, self._skip))
        if skipped < self._skip:
            raise _too_short(self.name, self._skip, self.unit, skipped)
        for number, raw in enumerate(lines, start=skipped + 1):
            line = raw.removeprefix(codecs.BOM_UTF8) if isinstance(raw, bytes) else raw
            if line.strip():
                sample = self._parse(line, number)
                self.position = number
                yield sample

    def _parse(self, line: str | bytes, number: int) -> Sample:
        where = f"{self.name}:{number}"
        try:
            document = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            raise SourceError(f"{where}: invalid JSON: {error}") from None
        if not isinstance(document, dict):
            raise SourceError(f"{where}: expected a JSON object, got {_kind(document)}")
        for field in ("features", "label"):
            if field not in document:
                raise SourceError(f"{where}: field {field!r} is missing")
        label = document["label"]
        if not _is_number(label):
            raise SourceError(f"{where}: label is {_kind(label)}, expected a number")
        values = self._feature_values(document["features"], where, number)
        if self._n_features is None:
            if not values:
                raise SourceError(f"{where}: features is empty")
            self._n_features, self._first_line = len(values), number
        elif len(values) != self._n_features:
            raise SourceError(
                f"{where}: {len(values)} features, expected {self._n_features}"
                f" (fixed by line {self._first_line})"
            )
        if not (_in_range(label) and all(map(_in_range, values))):
            raise SourceError(f"{where}: a value is out of the float32 range")
        features = np.asarray(values, dtype=np.float32)
        raw_key = document.get("key")
        if raw_key is not None and not isinstance(raw_key, str):
            raise SourceError(f"{where}: key is {_kind(raw_key)}, expected a string")
        return Sample(features, float(label), raw_key.encode() if raw_key else None)

    def _feature_values(self, raw: object, where: str, number: int) -> list[float]:
        if isinstance(raw, list):
            values: list[object] = raw
        elif isinstance(raw, dict):
            if self.feature_names is None:
                # The first named record fixes the order for the rest of the stream.
                self.feature_names = tuple(raw)
                self._names_line = number
            names = self.feature_names
            if len(raw) != len(names) or any(name not in raw for name in names):
                missing = [name for name in names if name not in raw][:5]
                extra = [name for name in raw if name not in names][:5]
                raise SourceError(
                    f"{where}: feature names differ from line {self._names_line}'s"
                    f" (missing {missing}, extra {extra})"
                )
            values = [raw[name] for name in names]
        else:
            raise SourceError(f"{where}: features is {_kind(raw)}, expected a list or object")
        numbers: list[float] = []
        for value in values:
            if not _is_number(value):
                raise SourceError(f"{where}: features must all be numbers, got {_kind(value)}")
            numbers.append(float(value))
        return numbers

    def close(self) -> None:
        if self._owned:
            close = getattr(self._lines, "close", None)
            if close is not None:
                close()


def _in_range(value: float) -> bool:
    """Finite and representable as float32 (the dtype of training and the binary codec)."""
    return -_FLOAT32_MAX <= value <= _FLOAT32_MAX  # False for NaN too


def _is_number(value: object) -> TypeGuard[int | float]:
    # bool is an int subclass, but true/false is not a feature value.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)
