"""`streamtrainer plot`: a picture of a run from the worker's --run-log, without Grafana."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import orjson
import pytest

from streamtrainer.cli import main
from streamtrainer.plot import PlotError, plot_run, read_runs, run_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _snapshot(
    elapsed: float, trained: int, loss: float | None, score: float | None, name: str
) -> dict[str, object]:
    """A line as Worker writes it (WorkerStatus.as_json()); NaN is written as null.

    The whole run's figures are the window's plus 0.1 (so the two columns can be told apart).
    """
    task = "binary" if name == "accuracy" else "regression"
    run_loss = None if loss is None else loss + 0.1
    run_score = None if score is None else score + 0.1
    return {
        "elapsed_s": elapsed,
        "records_consumed": trained,
        "records_trained": trained,
        "records_invalid": 0,
        "records_per_second": trained / elapsed if elapsed else 0.0,
        "prequential": {
            "task": task,
            "records": trained,
            "window_size": 1000,
            "window_records": min(trained, 1000),
            "run": {"loss": run_loss, name: run_score},
            "window": {"loss": loss, name: score},
            "first_window_loss": loss,
        },
        "first_window_loss": loss,
        "last_window_loss": loss,
        "updates": trained,
        "assigned": 3,
        "model_version": 0,
        "records_applied": trained,
    }


def _write_run(path: Path, seconds: int, rate: int, name: str = "accuracy") -> None:
    with open(path, "ab") as log:
        for t in range(seconds):
            trained = t * rate
            loss = None if t == 0 else 0.7 * math.exp(-t / 10) + 0.1
            score = None if t == 0 else (1 - loss / 2 if name == "accuracy" else loss)
            log.write(orjson.dumps(_snapshot(t + 0.2, trained, loss, score, name)) + b"\n")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_a_run_log_becomes_a_png(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    _write_run(log, 30, 2000)
    written = plot_run(log, tmp_path / "out" / "run.png")
    assert written == tmp_path / "out" / "run.png"
    assert _png_size(written) == (1000, 800)
    assert written.stat().st_size > 20_000  # three panels of curves, not an empty canvas


def test_curves_follow_the_log_and_null_losses_stay_gaps(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    _write_run(log, 5, 1000, name="mae")
    (rows,) = read_runs(log)
    curves = run_curves(rows)
    assert curves.score_name == "mae"
    assert curves.window_size == 1000
    assert curves.records_trained == [0, 1000, 2000, 3000, 4000]
    assert math.isnan(curves.loss[0]) and math.isnan(curves.score[0])
    assert math.isnan(curves.loss_window[0]) and math.isnan(curves.score_window[0])
    # The whole run's figures and the window's, each from its own object of the log.
    assert curves.loss[1:] == pytest.approx([w + 0.1 for w in curves.loss_window[1:]])
    assert curves.score[1:] == pytest.approx([w + 0.1 for w in curves.score_window[1:]])
    # Throughput over each interval (the log's records_per_second is the average since start).
    assert curves.records_per_second[1:] == pytest.approx([1000.0] * 4)


def test_an_appended_log_holds_several_runs_and_one_is_plotted(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    _write_run(log, 10, 100)
    _write_run(log, 20, 300)  # a restarted worker appends: elapsed_s starts again
    with open(log, "ab") as handle:
        handle.write(b'{"elapsed_s": 21.2, "records_tr')  # killed mid-line
    runs = read_runs(log)
    assert [len(run) for run in runs] == [10, 20]
    assert run_curves(runs[-1]).records_trained[-1] == 19 * 300
    plot_run(log, tmp_path / "last.png")
    plot_run(log, tmp_path / "first.png", run=1, title="the first run")
    with pytest.raises(PlotError, match="2 run"):
        plot_run(log, tmp_path / "x.png", run=3)


def test_an_empty_log_is_an_error(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_text("\n")
    with pytest.raises(PlotError, match="no snapshot"):
        plot_run(log, tmp_path / "run.png")


def test_the_plot_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "run.jsonl"
    _write_run(log, 10, 500)
    main(["plot", str(log)])
    assert _png_size(tmp_path / "run.png")  # default: next to the log
    assert f"wrote {tmp_path / 'run.png'}" in capsys.readouterr().out
    main(["plot", str(log), "--output", str(tmp_path / "other.png"), "--run", "-1"])
    assert (tmp_path / "other.png").exists()

    with pytest.raises(SystemExit) as missing:
        main(["plot", str(tmp_path / "nope.jsonl")])
    assert missing.value.code == 2
    log.write_text("")
    with pytest.raises(SystemExit) as empty:
        main(["plot", str(log)])
    assert empty.value.code == 1
    assert "no snapshot" in capsys.readouterr().err
