"""CSV columns (issue 20): ``--features`` and ``--ignore-columns`` choose them, and a text column
among the features is reported in one line, exit 2, before a topic is created or anything is sent."""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamtrainer.producer import sources
from streamtrainer.producer.exceptions import SourceDataError, SourceError, SourceSpecError
from streamtrainer.producer.sources import check_csv_file, open_source
from streamtrainer.records.codec import BatchDecoder
from tests.test_cli import CLI, _one_line_error

DATA = "id,b,name,a,y\n7,1.5,bob,10,1\n8,2.5,ann,20,0\n"
UNREACHABLE = ("--bootstrap-servers", "127.0.0.1:1", "--startup-timeout-s", "60")


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _features(path: Path, **columns: object) -> tuple[tuple[str, ...] | None, list[list[float]]]:
    with open_source(f"csv:{path}", label="y", **columns) as source:  # type: ignore[arg-type]
        rows = [sample.features.tolist() for sample in source]
        return source.feature_names, rows


# --- choosing the columns ----------------------------------------------------------------------


def test_features_choose_the_columns_in_their_order(tmp_path: Path) -> None:
    names, rows = _features(_write(tmp_path, DATA), features=["a", "b"])
    assert names == ("a", "b")
    assert rows == [[10.0, 1.5], [20.0, 2.5]]


def test_ignored_columns_are_left_out(tmp_path: Path) -> None:
    names, rows = _features(_write(tmp_path, DATA), ignore_columns=["id", "name"])
    assert names == ("b", "a")
    assert rows == [[1.5, 10.0], [2.5, 20.0]]


def test_duplicated_names_not_chosen_are_no_matter_with_features(tmp_path: Path) -> None:
    path = _write(tmp_path, "note,x,note,y\nhi,1,ho,2\n")
    assert _features(path, features=["x"]) == (("x",), [[1.0]])
    with pytest.raises(SourceDataError, match=r"duplicate columns \['note'\]"):
        _features(path, ignore_columns=["note"])


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"features": ["a", "zz"]}, r"feature column\(s\) \['zz'\] not in the header"),
        ({"ignore_columns": ["idx"]}, r"ignored column\(s\) \['idx'\] not in the header"),
        ({"ignore_columns": ["id", "b", "name", "a"]}, "no feature columns"),
    ],
)
def test_columns_not_in_the_header_are_named(
    tmp_path: Path, columns: dict[str, list[str]], expected: str
) -> None:
    with pytest.raises(SourceDataError, match=expected):
        _features(_write(tmp_path, DATA), **columns)


@pytest.mark.parametrize(
    ("spec", "columns", "expected"),
    [
        ("csv:x.csv", {"features": ["a"], "ignore_columns": ["id"]}, "either features"),
        ("csv:x.csv", {"features": ["a", "a"]}, r"features names \['a'\] more than once"),
        ("csv:x.csv", {"features": ["a", "y"]}, "'y' is the label column; it cannot be a feature"),
        ("csv:x.csv", {"features": ["a", "id"], "key_column": "id"}, "'id' is the key column"),
        ("csv:x.csv", {"ignore_columns": ["y"]}, "'y' is the label column; it cannot be ignored"),
        ("jsonl:x.jsonl", {"features": ["a"], "label": None}, "not csv:PATH"),
    ],
)
def test_contradictory_column_options_are_usage_errors(
    spec: str, columns: dict[str, object], expected: str
) -> None:
    """Found without reading anything (the file does not exist)."""
    options: dict[str, object] = {"label": "y", **columns}
    with pytest.raises(SourceSpecError, match=expected):
        check_csv_file(spec, **options)  # type: ignore[arg-type]
    with pytest.raises(SourceSpecError, match=expected):
        open_source(spec, **options)  # type: ignore[arg-type]


# --- the check before connecting ---------------------------------------------------------------


def _rows(n: int, bad_at: int | None = None) -> str:
    """A CSV of ``n`` rows whose column x holds text in row ``bad_at``."""
    lines = ["id,x,y"] + [f"{i},{'oops' if i == bad_at else i / 2},{i}" for i in range(1, n + 1)]
    return "\n".join(lines) + "\n"


def test_a_text_cell_anywhere_in_the_file_is_found_by_the_check(tmp_path: Path) -> None:
    path = _write(tmp_path, _rows(2000, bad_at=1500))
    with pytest.raises(SourceDataError) as caught:
        check_csv_file(f"csv:{path}", label="y")
    message = str(caught.value)
    assert message.startswith(f"{path}:1501: column 'x': 'oops' is not a number (row 1500)")
    assert "--ignore-columns" in message
    assert "\n" not in message


def test_the_check_reads_what_a_run_would_publish(tmp_path: Path) -> None:
    path = _write(tmp_path, _rows(100, bad_at=50))
    # --skip past it, or --count before it: the bad row is not published, and not an error.
    after = check_csv_file(f"csv:{path}", label="y", skip=50)
    assert after is not None and (after.rows, after.whole) == (50, True)
    assert check_csv_file(f"csv:{path}", label="y", count=49) is not None
    with pytest.raises(SourceDataError, match="row 50"):
        check_csv_file(f"csv:{path}", label="y", count=50)
    # A text column left out is never read as a number.
    text_column = _write(tmp_path, DATA, "text.csv")
    checked = check_csv_file(f"csv:{text_column}", label="y", ignore_columns=["name"])
    assert checked is not None and checked.rows == 2 and checked.whole


def test_stdin_and_other_sources_are_not_read_by_the_check(tmp_path: Path) -> None:
    assert check_csv_file("csv:-", label="y") is None
    assert check_csv_file("synthetic", label=None) is None
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    assert check_csv_file(f"csv:{fifo}", label="y") is None  # opening it would wait for a writer


def test_a_large_file_is_checked_in_its_first_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, _rows(300, bad_at=250))
    monkeypatch.setattr(sources, "WHOLE_CHECK_BYTES", 100)
    monkeypatch.setattr(sources, "LARGE_FILE_CHECK_ROWS", 200)
    checked = check_csv_file(f"csv:{path}", label="y")
    assert checked is not None and (checked.rows, checked.whole) == (200, False)
    with pytest.raises(SourceDataError, match="row 250"):
        check_csv_file(f"csv:{path}", label="y", skip=200)
    # What the check did not read is checked as it is read: the run stops at the bad row.
    with open_source(f"csv:{path}", label="y") as source, pytest.raises(SourceError, match="row 250"):
        for _ in source:
            pass
    assert source.position == 249


# --- through the command -----------------------------------------------------------------------


def _produce(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAINER_")}
    return subprocess.run(
        [*CLI, "produce", "--metrics-port", "-1", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        check=False,
    )


def _topic_exists(bootstrap: str, topic: str) -> bool:
    topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return topic in topics and topics[topic].error is None


def _features_in_topic(bootstrap: str, topic: str, expected: int) -> list[list[float]]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"{topic}-read", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    decoder = BatchDecoder()
    found: list[list[float]] = []
    deadline = time.monotonic() + 30
    try:
        while len(found) < expected and time.monotonic() < deadline:
            for message in consumer.consume(100, 0.5):
                if message.error() is None:
                    found.append(decoder.decode_one(message.value()).features.tolist())
    finally:
        consumer.close()
    return found


def test_a_text_column_is_one_line_exit_2_and_no_topic(bootstrap: str, group_id: str, tmp_path: Path) -> None:
    topic = f"textcol-{group_id}"
    data = _write(tmp_path, _rows(500, bad_at=400))
    result = _produce(
        "--bootstrap-servers", bootstrap, "--topic", topic, "--partitions", "1", "--source", f"csv:{data}",
        "--label", "y",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    line = _one_line_error(result)
    assert f"{data}:401: column 'x': 'oops' is not a number (row 400)" in line
    assert "produced" not in result.stdout
    assert not _topic_exists(bootstrap, topic)


def test_a_text_column_is_found_before_connecting(tmp_path: Path) -> None:
    """An unreachable broker with a long timeout: a check made after connecting would wait 60 s."""
    data = _write(tmp_path, DATA)
    result = _produce(*UNREACHABLE, "--topic", "t", "--source", f"csv:{data}", "--label", "y")
    assert result.returncode == 2, result.stderr
    assert "column 'name': 'bob' is not a number (row 1)" in _one_line_error(result)
    header = _produce(
        *UNREACHABLE, "--topic", "t", "--source", "csv:-", "--label", "y", "--features", "q", stdin=DATA
    )
    assert header.returncode == 2, header.stderr
    assert "<stdin>: feature column(s) ['q'] not in the header" in _one_line_error(header)


def test_chosen_columns_are_published_in_their_order(bootstrap: str, group_id: str, tmp_path: Path) -> None:
    data = _write(tmp_path, DATA)
    chosen = f"chosen-{group_id}"
    result = _produce(
        "--bootstrap-servers", bootstrap, "--topic", chosen, "--partitions", "1", "--source", f"csv:{data}",
        "--label", "y", "--features", "a,b",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _features_in_topic(bootstrap, chosen, 2) == [[10.0, 1.5], [20.0, 2.5]]
    ignored = f"ignored-{group_id}"
    result = _produce(
        "--bootstrap-servers", bootstrap, "--topic", ignored, "--partitions", "1", "--source", f"csv:{data}",
        "--label", "y", "--ignore-columns", "id", "--ignore-columns", "name",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _features_in_topic(bootstrap, ignored, 2) == [[1.5, 10.0], [2.5, 20.0]]


def test_a_text_column_on_stdin_stops_before_its_row_is_sent(bootstrap: str, group_id: str) -> None:
    """Stdin is read once: the first row is read before the topic is created, so a text column in it
    leaves nothing behind; the exit is non-zero."""
    topic = f"stdintext-{group_id}"
    result = _produce(
        "--bootstrap-servers", bootstrap, "--topic", topic, "--partitions", "1", "--source", "csv:-",
        "--label", "y", stdin=DATA,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "<stdin>:2: column 'name': 'bob' is not a number (row 1)" in result.stderr
    assert not _topic_exists(bootstrap, topic)


def test_an_in_memory_stdin_reads_the_chosen_columns() -> None:
    with open_source("csv:-", label="y", features=["a"], stdin=io.StringIO(DATA)) as source:
        assert [sample.features.tolist() for sample in source] == [[10.0], [20.0]]
    assert source.position == 2
