"""Source specs: CSV, JSON lines, stdin, synthetic; and their one-line errors."""

from __future__ import annotations

import builtins
import io
import math
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtrainer.producer.exceptions import ProducerError, SourceError
from streamtrainer.producer.sources import SampleSource, open_source
from streamtrainer.producer.synthetic import SyntheticSpec, generate_arrays
from streamtrainer.records.sample import Sample


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _read_all(source: SampleSource) -> list[Sample]:
    with source:
        return list(source)


def _error(spec: str, **kwargs: object) -> str:
    """The message of the SourceError raised while opening or reading ``spec``."""
    with pytest.raises(SourceError) as caught:
        _read_all(open_source(spec, **kwargs))  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- CSV ---------------------------------------------------------------------------------


def test_csv_label_and_key_columns(tmp_path: Path) -> None:
    path = _write(tmp_path, "data.csv", "a,id,y,b\n1.5,u1,0,2\n-3,u2,1,4e2\n")
    source = open_source(f"csv:{path}", label="y", key_column="id")
    assert source.feature_names == ("a", "b")
    samples = _read_all(source)
    assert len(samples) == 2
    np.testing.assert_array_equal(samples[0].features, np.array([1.5, 2.0], dtype=np.float32))
    np.testing.assert_array_equal(samples[1].features, np.array([-3.0, 400.0], dtype=np.float32))
    assert [s.label for s in samples] == [0.0, 1.0]
    assert [s.key for s in samples] == [b"u1", b"u2"]
    assert samples[0].features.dtype == np.float32


def test_csv_without_key_skips_blank_lines_and_strips_header(tmp_path: Path) -> None:
    path = _write(tmp_path, "data.csv", "\n x , target \n\n1,2\n   \n3,4\n")
    source = open_source(f"csv:{path}", label="target")
    assert source.feature_names == ("x",)
    samples = _read_all(source)
    assert [(float(s.features[0]), s.label, s.key) for s in samples] == [
        (1.0, 2.0, None),
        (3.0, 4.0, None),
    ]


def test_csv_empty_key_is_no_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "data.csv", "k,x,y\n,1,2\n")
    assert _read_all(open_source(f"csv:{path}", label="y", key_column="k"))[0].key is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x,y\n1,2\n\n3,abc\n", ["data.csv:4:", "column 'y'", "'abc' is not a number"]),
        ("x,y\n1,2\n,3\n", ["data.csv:3:", "column 'x'", "empty value"]),
        ("x,y\n1,nan\n", ["data.csv:2:", "column 'y'", "not a finite number"]),
        ("x,y\n1e39,1\n", ["data.csv:2:", "column 'x'", "float32 range"]),
        ("x,y\n1,2\n1,2,3\n", ["data.csv:3:", "3 fields, expected 2"]),
        ("x,y\n1,2\n1\n", ["data.csv:3:", "1 fields, expected 2"]),
        ("", ["data.csv", "empty file"]),
        ("\n\n", ["data.csv", "empty file"]),
        ("x,x,y\n1,2,3\n", ["data.csv:1:", "duplicate columns ['x']"]),
        ("y\n1\n", ["data.csv", "no feature columns"]),
    ],
)
def test_csv_errors_name_file_line_and_problem(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = _write(tmp_path, "data.csv", text)
    message = _error(f"csv:{path}", label="y")
    for part in expected:
        assert part in message


def test_csv_error_keeps_the_good_rows_before_it(tmp_path: Path) -> None:
    path = _write(tmp_path, "data.csv", "x,y\n1,2\n3,4\nbad,5\n")
    source = open_source(f"csv:{path}", label="y")
    assert next(source).label == 2.0
    assert next(source).label == 4.0
    with pytest.raises(SourceError, match=r"data\.csv:4: column 'x'"):
        next(source)
    source.close()


def test_csv_label_is_required_and_must_exist(tmp_path: Path) -> None:
    path = _write(tmp_path, "data.csv", "x,y\n1,2\n")
    assert "label column" in _error(f"csv:{path}")
    message = _error(f"csv:{path}", label="target")
    assert "'target'" in message
    assert "['x', 'y']" in message
    assert "key column 'id'" in _error(f"csv:{path}", label="y", key_column="id")
    assert "both the label and the key" in _error(f"csv:{path}", label="y", key_column="y")


def test_csv_key_column_may_hold_text(tmp_path: Path) -> None:
    path = _write(tmp_path, "data.csv", 'name,x,y\n"Smith, J.",1,0\n')
    sample = _read_all(open_source(f"csv:{path}", label="y", key_column="name"))[0]
    assert sample.key == b"Smith, J."


def test_csv_reads_utf8_bom_and_from_stdin(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfx,y\n1,2\n")
    assert open_source(f"csv:{path}", label="y").feature_names == ("x",)
    stdin = io.StringIO("x,z,y\n1,2,3\n")
    source = open_source("csv:-", label="y", stdin=stdin)
    assert source.feature_names == ("x", "z")
    samples = _read_all(source)
    np.testing.assert_array_equal(samples[0].features, np.array([1, 2], dtype=np.float32))
    assert not stdin.closed  # the caller's stream is not ours to close


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=3, max_size=3),
        min_size=1,
        max_size=20,
    )
)
def test_csv_and_jsonl_round_trip_float32_values(rows: list[list[float]]) -> None:
    expected = np.array(rows, dtype=np.float32)
    csv_text = "a,b,label\n" + "".join(f"{r[0]!r},{r[1]!r},{r[2]!r}\n" for r in rows)
    jsonl_text = "".join(
        orjson.dumps({"features": {"a": r[0], "b": r[1]}, "label": r[2]}).decode() + "\n" for r in rows
    )
    for source in (
        open_source("csv:-", label="label", stdin=io.StringIO(csv_text)),
        open_source("-", stdin=io.StringIO(jsonl_text)),
    ):
        samples = _read_all(source)
        assert source.feature_names == ("a", "b")
        np.testing.assert_array_equal(np.stack([s.features for s in samples]), expected[:, :2])
        np.testing.assert_array_equal(np.array([s.label for s in samples]), expected[:, 2])


# --- JSON lines --------------------------------------------------------------------------


def test_jsonl_list_features_and_keys(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "data.jsonl",
        '{"features": [1, 2.5], "label": 0}\n\n{"features": [3, 4], "label": 1, "key": "e7"}\n',
    )
    source = open_source(f"jsonl:{path}")
    samples = _read_all(source)
    assert source.feature_names is None
    np.testing.assert_array_equal(samples[0].features, np.array([1, 2.5], dtype=np.float32))
    assert [s.label for s in samples] == [0.0, 1.0]
    assert [s.key for s in samples] == [None, b"e7"]


def test_jsonl_object_features_keep_the_first_records_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "data.jsonl",
        '{"features": {"b": 1, "a": 2}, "label": 0.5}\n{"label": 1, "features": {"a": 3, "b": 4}}\n',
    )
    source = open_source(f"jsonl:{path}")
    assert source.feature_names is None  # not read yet
    samples = _read_all(source)
    assert source.feature_names == ("b", "a")
    np.testing.assert_array_equal(samples[0].features, np.array([1, 2], dtype=np.float32))
    np.testing.assert_array_equal(samples[1].features, np.array([4, 3], dtype=np.float32))


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got a list"),
        ('{"features": [1, 2]}', "field 'label' is missing"),
        ('{"label": 1}', "field 'features' is missing"),
        ('{"features": [1, 2], "label": true}', "label is a boolean"),
        ('{"features": [1, 2], "label": "1"}', "label is a string"),
        ('{"features": [1, "2"], "label": 1}', "features must all be numbers, got a string"),
        ('{"features": [1, null], "label": 1}', "got null"),
        ('{"features": "1,2", "label": 1}', "features is a string"),
        ('{"features": [1, 2, 3], "label": 1}', "3 features, expected 2 (fixed by line 1)"),
        ('{"features": [1e39, 2], "label": 1}', "float32 range"),
        ('{"features": [1, 2], "label": 1, "key": 5}', "key is int, expected a string"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, bad_line: str, problem: str) -> None:
    text = '{"features": [0, 0], "label": 0}\n\n' + bad_line + "\n"
    path = _write(tmp_path, "data.jsonl", text)
    message = _error(f"jsonl:{path}")
    assert message.startswith(f"{path}:3: ")
    assert problem in message


def test_jsonl_object_names_must_match(tmp_path: Path) -> None:
    text = '{"features": {"a": 1, "b": 2}, "label": 0}\n{"features": {"a": 1, "c": 2}, "label": 0}\n'
    message = _error(f"jsonl:{_write(tmp_path, 'data.jsonl', text)}")
    assert ":2: feature names differ from line 1's" in message
    assert "missing ['b']" in message
    assert "extra ['c']" in message


def test_jsonl_invalid_utf8_is_a_line_error(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"features": [1], "label": 0}\n{"features": [1], "label": "\xff"}\n')
    assert ":2: invalid JSON" in _error(f"jsonl:{path}")


def test_stdin_json_lines() -> None:
    stdin = io.StringIO('{"features": [1, 2], "label": 3}\n{"features": [4, 5], "label": 6}\n')
    samples = _read_all(open_source("-", stdin=stdin))
    assert [s.label for s in samples] == [3.0, 6.0]
    assert open_source("jsonl:-", stdin=io.StringIO("")).feature_names is None
    message = _error("-", stdin=io.StringIO('{"features": [1], "label": 0}\n{oops\n'))
    assert message.startswith("<stdin>:2: invalid JSON")


# --- count, synthetic, spec errors, closing ----------------------------------------------


def test_count_limits_every_source(tmp_path: Path) -> None:
    csv_path = _write(tmp_path, "data.csv", "x,y\n" + "".join(f"{i},{i}\n" for i in range(10)))
    assert [s.label for s in _read_all(open_source(f"csv:{csv_path}", label="y", count=3))] == [
        0.0,
        1.0,
        2.0,
    ]
    assert _read_all(open_source(f"csv:{csv_path}", label="y", count=0)) == []
    assert len(_read_all(open_source(f"csv:{csv_path}", label="y", count=100))) == 10
    lines = "".join(f'{{"features": [{i}], "label": {i}}}\n' for i in range(10))
    assert len(_read_all(open_source("-", count=4, stdin=io.StringIO(lines)))) == 4
    assert len(_read_all(open_source("synthetic", count=5))) == 5
    assert "count must be >= 0" in _error("synthetic", count=-1)


def test_count_stops_before_a_later_bad_row(tmp_path: Path) -> None:
    path = _write(tmp_path, "data.csv", "x,y\n1,2\nbad,3\n")
    assert len(_read_all(open_source(f"csv:{path}", label="y", count=1))) == 1


def test_synthetic_source_follows_its_spec() -> None:
    spec = SyntheticSpec(task="multiclass", n_features=4, seed=3, n_keys=2)
    source = open_source("synthetic", synthetic=spec, count=50)
    assert source.feature_names is None
    samples = _read_all(source)
    x, y = generate_arrays(spec, 50)
    np.testing.assert_array_equal(np.stack([s.features for s in samples]), x)
    np.testing.assert_array_equal(np.array([s.label for s in samples], dtype=np.float32), y)
    assert samples[3].key == b"entity-1"
    default = _read_all(open_source("synthetic", count=2))
    np.testing.assert_array_equal(default[0].features, generate_arrays(SyntheticSpec(), 1)[0][0])


def test_synthetic_source_without_count_is_endless() -> None:
    with open_source("synthetic") as source:
        for _ in range(10_000):
            next(source)


@pytest.mark.parametrize("spec", ["", "kafka:topic", "csv", "data.csv", "json:x.jsonl", "SYNTHETIC"])
def test_unknown_spec_lists_the_valid_forms(spec: str) -> None:
    message = _error(spec)
    assert "unknown source" in message
    for form in ("synthetic", "csv:PATH", "jsonl:PATH", "- (JSON lines on stdin)"):
        assert form in message


def test_spec_errors(tmp_path: Path) -> None:
    assert "has no path" in _error("csv:", label="y")
    assert "has no path" in _error("jsonl:")
    missing = tmp_path / "missing.csv"
    message = _error(f"csv:{missing}", label="y")
    assert message.startswith(f"{missing}: cannot open")
    assert "cannot open" in _error(f"jsonl:{tmp_path}")  # a directory
    assert "not csv:PATH" in _error("synthetic", label="y")
    assert "not csv:PATH" in _error("-", key_column="k", stdin=io.StringIO(""))
    assert issubclass(SourceError, ProducerError)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[IO[Any]]:
    """Every file that ``open`` returns during the test, to check that sources close them."""
    files: list[IO[Any]] = []
    real_open = builtins.open

    def recording_open(*args: Any, **kwargs: Any) -> IO[Any]:
        file: IO[Any] = real_open(*args, **kwargs)
        files.append(file)
        return file

    monkeypatch.setattr(builtins, "open", recording_open)
    return files


def test_close_is_idempotent_and_ends_iteration(tmp_path: Path, opened: list[IO[Any]]) -> None:
    path = _write(tmp_path, "data.csv", "x,y\n1,2\n3,4\n5,6\n")
    source = open_source(f"csv:{path}", label="y")
    assert iter(source) is source
    assert next(source).label == 2.0
    assert len(opened) == 1
    assert not opened[0].closed
    source.close()
    assert opened[0].closed
    source.close()
    assert list(source) == []


def test_exhaustion_and_count_close_the_file(tmp_path: Path, opened: list[IO[Any]]) -> None:
    path = _write(tmp_path, "data.jsonl", '{"features": [1], "label": 0}\n' * 3)
    assert len(list(open_source(f"jsonl:{path}"))) == 3
    assert len(list(open_source(f"jsonl:{path}", count=2))) == 2
    assert len(opened) == 2
    assert all(file.closed for file in opened)


def test_csv_bad_header_closes_the_file(tmp_path: Path, opened: list[IO[Any]]) -> None:
    path = _write(tmp_path, "data.csv", "x,y\n1,2\n")
    with pytest.raises(SourceError):
        open_source(f"csv:{path}", label="nope")
    assert len(opened) == 1
    assert opened[0].closed


def test_values_must_fit_float32(tmp_path: Path) -> None:
    path = _write(tmp_path, "data.csv", "x,y\n3e38,-3e38\n")
    sample = _read_all(open_source(f"csv:{path}", label="y"))[0]
    assert math.isfinite(float(sample.features[0]))
    assert sample.label == -3e38
    path = _write(tmp_path, "big.csv", "x,y\n1,1e300\n")
    assert "column 'y': '1e300' is out of the float32 range" in _error(f"csv:{path}", label="y")
    path = _write(tmp_path, "big.jsonl", '{"features": [1], "label": -1e39}\n')
    assert "big.jsonl:1: a value is out of the float32 range" in _error(f"jsonl:{path}")
