"""README command 1, in small: the demo runs the whole pipeline and the loss falls."""

from __future__ import annotations

import io

import orjson
from rich.console import Console

from streamtrainer.demo import run_demo
from streamtrainer.settings import DemoSettings


def test_demo_on_its_own_embedded_broker(tmp_path) -> None:
    console = Console(file=io.StringIO(), width=120)
    settings = DemoSettings(records=8000, metrics_port=0, live=True, out_dir=tmp_path, n_features=4)
    result = run_demo(settings, console=console)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert result.ok, output
    assert result.produced is not None and result.produced.delivered == 8000
    assert result.worker.records_trained == 8000
    assert result.worker.last_window_loss < result.worker.first_window_loss
    assert "demo summary" in output and "loss fell       yes" in output
    # Compaction every 2,000 records: shown live and in the summary.
    assert result.worker.compactions >= 3
    assert "compactions     " in output and "last over 2,000 records" in output
    lines = (tmp_path / "run.jsonl").read_bytes().splitlines()
    assert lines and orjson.loads(lines[-1])["records_trained"] == 8000
