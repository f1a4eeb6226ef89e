"""Source positions, ``skip``, the resume position's bookkeeping and the stop signals (no broker).

The broker tests (test_producer_resume.py) run the whole producer; these pin the rules down.
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, Message

from streamtrainer.producer import publisher as publisher_module
from streamtrainer.producer.exceptions import SourceError
from streamtrainer.producer.publisher import Publisher
from streamtrainer.producer.sources import SampleSource, open_source
from streamtrainer.producer.stop import Stopped, StopSignals
from streamtrainer.producer.synthetic import BLOCK_SIZE, SyntheticSpec, generate
from streamtrainer.records import Sample
from streamtrainer.settings import KafkaSettings


def _positions(source: SampleSource) -> list[tuple[float, int]]:
    """(label, position) of every sample."""
    with source:
        return [(sample.label, source.position) for sample in source]


# --- positions and skip -----------------------------------------------------------------


def test_jsonl_positions_are_line_numbers_counting_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"features": [1], "label": 1}\n\n{"features": [2], "label": 2}\n   \n{"features": [3], "label": 3}\n'
    )
    source = open_source(f"jsonl:{path}")
    assert (source.unit, source.position) == ("line", 0)
    assert _positions(source) == [(1.0, 1), (2.0, 3), (3.0, 5)]
    # Skipping the lines up to a position resumes with the record after it.
    for skip, expected in [(1, [(2.0, 3), (3.0, 5)]), (3, [(3.0, 5)]), (4, [(3.0, 5)]), (5, [])]:
        source = open_source(f"jsonl:{path}", skip=skip)
        assert source.position == skip
        assert _positions(source) == expected


def test_skipped_lines_are_not_parsed(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{not json\n{"features": [1, 2], "label": 1}\n')
    assert _positions(open_source(f"jsonl:{path}", skip=1)) == [(1.0, 2)]
    stdin = io.StringIO('garbage\n{"features": [1], "label": 7}\n')
    assert _positions(open_source("-", stdin=stdin, skip=1)) == [(7.0, 2)]


def test_csv_positions_are_rows_after_the_header(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("\nx,y\n1,1\n\n2,2\n3,3\n")  # the header is on line 2; row 2 is blank
    assert [(label, position) for label, position in _positions(open_source(f"csv:{path}", label="y"))] == [
        (1.0, 1),
        (2.0, 3),
        (3.0, 4),
    ]
    source = open_source(f"csv:{path}", label="y", skip=3)
    assert (source.unit, source.position) == ("row", 3)
    assert _positions(source) == [(3.0, 4)]


def test_csv_row_errors_name_line_and_row(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("x,y\n1,2\n3,abc\n")
    with open_source(f"csv:{path}", label="y") as source, pytest.raises(SourceError) as caught:
        list(source)
    assert str(caught.value) == f"{path}:3: column 'y': 'abc' is not a number (row 2)"


@pytest.mark.parametrize(
    ("spec", "text", "message"),
    [
        ("jsonl", '{"features": [1], "label": 1}\n', "cannot skip 2 lines: it ends after 1"),
        ("csv", "x,y\n1,2\n", "cannot skip 2 rows: it ends after 1"),
    ],
)
def test_skipping_past_the_end_is_an_error(tmp_path: Path, spec: str, text: str, message: str) -> None:
    path = tmp_path / f"data.{spec}"
    path.write_text(text)
    kwargs: dict[str, Any] = {"label": "y"} if spec == "csv" else {}
    with open_source(f"{spec}:{path}", skip=2, **kwargs) as source, pytest.raises(SourceError, match=message):
        next(source)


def test_synthetic_skip_resumes_the_same_stream() -> None:
    spec = SyntheticSpec(n_features=3, n_keys=5, drift="abrupt", drift_at=BLOCK_SIZE + 10, seed=4)
    whole = list(generate(spec, BLOCK_SIZE + 100))
    for start in (1, BLOCK_SIZE - 3, BLOCK_SIZE + 7):
        tail = list(generate(spec, BLOCK_SIZE + 100 - start, start=start))
        assert [s.key for s in tail] == [s.key for s in whole[start:]]
        np.testing.assert_array_equal([s.label for s in tail], [s.label for s in whole[start:]])
        np.testing.assert_array_equal(
            np.stack([s.features for s in tail]), np.stack([s.features for s in whole[start:]])
        )
    source = open_source("synthetic", synthetic=spec, count=3, skip=10)
    assert (source.unit, source.dense, source.position) == ("record", True, 10)
    assert [s.label for s in source] == [s.label for s in whole[10:13]]


# --- the resume position ------------------------------------------------------------------


class _Client:
    """Stands in for the librdkafka client: keeps each record's delivery callback for the test to fire."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.callbacks.append(kwargs["on_delivery"])

    def poll(self, timeout: float = 0) -> int:
        return 0

    def __len__(self) -> int:
        return 0


def _publisher(n: int, positions: list[int] | None = None) -> tuple[Publisher, _Client]:
    publisher = Publisher(KafkaSettings(bootstrap_servers="127.0.0.1:9"), topic="t", codec="binary")
    client = _Client()
    publisher._producer = client  # type: ignore[assignment]
    for i in range(n):
        sample = Sample(np.array([i], dtype=np.float32), float(i))
        publisher.send(sample, None if positions is None else positions[i])
    return publisher, client


def _report(client: _Client, index: int, *, error: int | None = None) -> None:
    message = Message(topic="t", partition=0, offset=index, value=b"v")
    client.callbacks[index](KafkaError(error) if error is not None else None, message)


def test_the_resume_position_waits_for_every_record_before_it() -> None:
    n = 100
    publisher, client = _publisher(n)
    # Acknowledged out of order (partitions), the last first: no position until the first is in.
    order = list(range(n - 1, -1, -1))
    for index in order[:-1]:
        _report(client, index)
    assert publisher.position < n
    _report(client, order[-1])
    publisher.flush(0.1)
    summary = publisher.summary(0.1)
    assert (summary.delivered, summary.failed, summary.position, summary.delivered_after) == (n, 0, n, 0)


def test_a_failed_record_stops_the_resume_position_before_its_batch() -> None:
    n = 100
    batch = publisher_module._BATCH
    publisher, client = _publisher(n)
    failed = batch + 7  # record 40 (0-based 39) in the second batch
    for index in range(n):
        _report(client, index, error=KafkaError.MSG_SIZE_TOO_LARGE if index == failed else None)
    publisher.flush(0.1)
    summary = publisher.summary(0.1)
    assert (summary.delivered, summary.failed) == (n - 1, 1)
    assert summary.position == batch  # never past the failed record: every record up to it delivered
    assert summary.delivered_after == n - 1 - batch  # reported: a resume sends those again


def test_an_unconfirmed_record_counts_as_failed_and_stops_the_resume_position() -> None:
    positions = [2 * i + 1 for i in range(100)]  # a source with gaps (blank lines)
    publisher, client = _publisher(100, positions)
    for index in range(100):
        if index != 70:
            _report(client, index)
    publisher.flush(0.1)
    summary = publisher.summary(0.1)
    assert (summary.delivered, summary.failed) == (99, 1)
    # Record 70 is in the third batch: every record of the first two is delivered.
    assert summary.position == positions[2 * publisher_module._BATCH - 1]


# --- stop signals ---------------------------------------------------------------------------


def test_a_signal_only_asks_to_stop_and_ends_an_interruptible_wait() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals(grace_s=60) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes: asked, nothing raised
        assert stop.name == "SIGTERM"
        assert not stop.give_up()
        with pytest.raises(Stopped), stop.interruptible():
            pass  # already asked: a wait does not even start
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with StopSignals(grace_s=60) as stop, pytest.raises(Stopped), stop.interruptible():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # ended by the signal (else no Stopped)
    assert stop.name == "SIGINT"


def test_a_second_signal_gives_up_the_flush() -> None:
    with StopSignals(grace_s=60) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert not stop.give_up()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.give_up()
