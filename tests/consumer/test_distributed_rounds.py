"""One rank's side of a round (consumer/rounds.py), in this process: a group of 1 over a TCPStore.

What a round leaves behind: the positions and applied counts of the partitions (as their owner
has them), a model created for a rank that had none once another has one (here: none has, then
this one), the group's records in the checkpoint's bookkeeping, the next round's time from the
group's rate, the end when every rank is done, and the per-rank metrics.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from prometheus_client import CollectorRegistry
from torch._C._distributed_c10d import TCPStore

from streamtrainer.consumer.durability import Durability
from streamtrainer.consumer.error_budget import ErrorBudget
from streamtrainer.consumer.model_state import fresh_state
from streamtrainer.consumer.rank_membership import RankMembership
from streamtrainer.consumer.rounds import Rounds
from streamtrainer.consumer.worker import learner_config
from streamtrainer.metrics import WorkerMetrics
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import OnlineLearner, ProgressiveMetrics


@pytest.fixture
def group() -> Iterator[None]:
    store = TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=timedelta(seconds=10))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=10))
    yield
    if dist.is_initialized():  # (Rounds.close leaves it)
        dist.destroy_process_group()


def _parts(tmp_path: Path) -> tuple[WorkerSettings, CollectorRegistry, Rounds, RankMembership, Durability]:
    settings = WorkerSettings(
        topic="t",
        distributed=True,
        model="audit",
        optimizer="sgd",
        lr=1.0,
        standardize=False,
        checkpoint_dir=tmp_path / "ckpt",
        average_every_records=1000,
        average_interval_s=4.0,
        metrics_port=-1,
    )
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    state = fresh_state(settings)
    membership = RankMembership(settings, metrics, state, None, rank=0, world_size=1)
    membership.partitions = 3
    membership.assigned = {("t", 0), ("t", 2)}  # (partition 1: no rank has read it yet)
    durability = Durability(
        settings,
        metrics,
        state,
        membership,
        prequential=ProgressiveMetrics("regression"),
        error_budget=ErrorBudget("all", 0.0, 1000),
        compactor=None,
        create_learner=lambda n: OnlineLearner(learner_config(settings), n),
    )
    rounds = Rounds(settings, metrics, state, rank=0, world_size=1)
    return settings, registry, rounds, membership, durability


def test_a_round_shares_positions_creates_the_model_paces_the_next_and_counts_by_rank(
    group: None, tmp_path: Path
) -> None:
    settings, registry, rounds, membership, durability = _parts(tmp_path)
    state = rounds.state
    created: list[int] = []

    def create(n: int) -> OnlineLearner:
        created.append(n)
        return OnlineLearner(learner_config(settings), n)

    # The rounds counter is exported at 0 before any round (the rounds-stopped alert reads it).
    assert registry.get_sample_value("streamtrainer_averaging_rounds_total", {"rank": "0"}) == 0
    assert registry.get_sample_value("streamtrainer_averaging_duration_seconds_count", {"rank": "0"}) == 0
    rounds.begin(trained=0, read=0)
    assert registry.get_sample_value("streamtrainer_world_size", {"rank": "0"}) == 1
    # No model anywhere yet: the round shares positions only.
    state.offsets.done("t", 0, 41)
    durability.applied[("t", 0)] = 42
    rounds.run(
        membership=membership,
        durability=durability,
        trained=42,
        read=42,
        done=False,
        stop=False,
        create_learner=create,
    )
    assert created == [] and state.learner is None
    assert state.offsets.next_offset("t", 0) == 42
    assert state.offsets.next_offset("t", 1) is None  # no rank has a position for it
    assert durability.applied == {("t", 0): 42}
    assert durability.dirty and durability.since_checkpoint == 0  # this rank's own reads: mark_read's
    assert not rounds.ended
    # The group trained 42 records since the start round: the next round comes when about 1,000
    # more are trained at that rate (capped at --average-interval-s 4 s).
    assert rounds.next_at - time.time() <= 4.0
    # A model now (this rank's), trained: the round averages it (a group of 1: unchanged).
    learner = state.learner = create(5)
    rounds.adopt(learner)
    x = np.ones((3, 5), dtype=np.float32)
    learner.learn_many(x, np.zeros(3, dtype=np.float32))
    before = learner.model.weight.detach().clone()
    rounds.run(
        membership=membership,
        durability=durability,
        trained=45,
        read=45,
        done=True,
        stop=False,
        create_learner=create,
    )
    assert (learner.model.weight.detach() == before).all()
    assert before.abs().sum() > 0  # (the audit model moved: the check above is not of zeros)
    assert rounds.ended  # every rank (the one) is done
    assert registry.get_sample_value("streamtrainer_averaging_rounds_total", {"rank": "0"}) == 2
    assert registry.get_sample_value("streamtrainer_averaging_duration_seconds_count", {"rank": "0"}) == 2
    assert registry.get_sample_value("streamtrainer_parameter_distance", {"rank": "0"}) == 0.0


def test_a_run_that_ends_in_the_warm_up_reports_the_warm_up_s_time_as_unfinished(
    group: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, _, rounds, membership, durability = _parts(tmp_path)
    rounds.begin(trained=0, read=0)
    rounds.warmup_left = 2_000  # (what share_checkpoint sets for a new model on 2+ ranks)
    time.sleep(0.3)
    rounds.run(
        membership=membership,
        durability=durability,
        trained=1,
        read=1,
        done=False,
        stop=False,
        create_learner=lambda n: OnlineLearner(learner_config(settings), n),
    )
    assert rounds.warmup_left == 1_999 and rounds.warmup_rounds == 1
    with caplog.at_level(logging.INFO, logger="streamtrainer.consumer.rounds"):
        rounds.close()
    (line,) = [r.getMessage() for r in caplog.records if "averaging round(s)" in r.getMessage()]
    # No clock round yet; the warm-up lasted from the start round to the end (not 0 s).
    assert line.startswith("rank 0: 0 averaging round(s)") and "since the warm-up" in line, line
    found = re.search(r"warm-up: 1 round\(s\) in ([\d.]+) s, [\d.]+ ms each \(unfinished\)$", line)
    assert found is not None and float(found[1]) >= 0.3, line
