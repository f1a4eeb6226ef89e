"""What a drift compaction replays, and that a pending one survives a checkpoint (no broker needed).

The worker's ``Compactor`` (its defaults, a drift grid of 250 records): a drift reported after a batch is
kept makes the compaction at the next grid point (``--drift-every-records``) a
``drift`` one over the records since the change point, not the scheduled window;
its grid point and its record count go through the checkpoint's JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from streamtrainer.consumer.compactor import Compactor
from streamtrainer.metrics import WorkerMetrics
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import LearnerConfig, OnlineLearner


def _settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        bootstrap_servers="unused:9092",
        topic="t",
        group="g",
        checkpoint_dir=tmp_path,
        model="logistic",
        metrics_port=-1,
        drift_every_records=250,
    )


def _keep(compactor: Compactor, start: int, n: int) -> None:
    rng = np.random.default_rng(start)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    offsets = np.arange(start, start + n, dtype=np.int64)
    compactor.keep(x, y, np.zeros(n, np.int32), offsets, None, None, np.full(n, 0.5))


def test_a_drift_compaction_replays_the_records_since_the_change_point(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert settings.compaction_every_records == 2000 and settings.compaction_window == 2000  # defaults
    learner = OnlineLearner(LearnerConfig(model="logistic", task="binary"), 3)
    registry = CollectorRegistry()
    with Compactor(settings, WorkerMetrics(registry)) as compactor:
        _keep(compactor, 0, 1000)
        assert compactor.records_until_due() == 250  # the drift grid: polls end at multiples of 250
        _keep(compactor, 1000, 120)
        compactor.drift(since_change=70)  # the estimated change point lies 70 records back
        assert compactor.due() is None  # 1,120 records: not on the grid yet
        assert compactor.records_until_due() == 130
        _keep(compactor, 1120, 130)
        assert compactor.due() == "drift"
        result = compactor.run(learner, "drift", loss_before=math.nan)
        assert result is not None and result.reason == "drift"
        assert result.records == 70 + 130  # since the change point, not the scheduled 2,000
        assert result.ranges == {0: (1250 - 200, 1249)}
        assert registry.get_sample_value("streamtrainer_compactions_total", {"reason": "drift"}) == 1
        # The schedule starts over from this compaction; the next one is a plain window again.
        _keep(compactor, 1250, 2000)
        assert compactor.due() == "records"
        result = compactor.run(learner, "records", loss_before=math.nan)
        assert result is not None and result.records == settings.compaction_window


def test_a_pending_drift_goes_through_the_checkpoint(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with Compactor(settings, WorkerMetrics(CollectorRegistry())) as compactor:
        _keep(compactor, 0, 610)
        compactor.drift(since_change=300)
        metadata = json.loads(json.dumps(compactor.checkpoint_metadata("t")))
        assert metadata["state"]["drift_due_at"] == 750 and metadata["state"]["drift_records"] == 300
    with Compactor(_settings(tmp_path / "b"), WorkerMetrics(CollectorRegistry())) as restored:
        restored.restore(metadata)
        assert restored.records_until_due() == 140
        _keep(restored, 610, 140)
        assert restored.due() == "drift"
        # Without a pending drift the state has no drift keys (older checkpoints read the same).
        restored.run(
            OnlineLearner(LearnerConfig(model="logistic", task="binary"), 3), "drift", loss_before=0.0
        )
        state = restored.checkpoint_metadata("t")["state"]
        assert isinstance(state, dict) and "drift_due_at" not in state
