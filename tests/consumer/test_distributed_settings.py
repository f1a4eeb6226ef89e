"""``--distributed``: partitions by rank, its settings, and its usage errors (no broker, no ranks)."""

from __future__ import annotations

import os

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from streamtrainer.consumer.rank_membership import rank_partitions
from streamtrainer.exceptions import ConfigurationError
from streamtrainer.settings import WorkerSettings
from tests.test_cli import run_cli


@pytest.mark.parametrize(("partitions", "world"), [(4, 2), (4, 3), (3, 4), (12, 5), (1, 1)])
def test_every_partition_is_read_by_exactly_one_rank_p_mod_world_size(partitions: int, world: int) -> None:
    owned = [rank_partitions(partitions, rank, world) for rank in range(world)]
    assert sorted(p for ps in owned for p in ps) == list(range(partitions))
    for rank, ps in enumerate(owned):
        assert all(p % world == rank for p in ps)


def test_distributed_turns_compaction_off_unless_asked_and_refuses_it_when_asked() -> None:
    settings = WorkerSettings(topic="t", distributed=True)
    assert settings.compaction is False
    assert WorkerSettings(topic="t").compaction is True  # unchanged without --distributed
    with pytest.raises(ValidationError, match="not supported with --distributed"):
        WorkerSettings(topic="t", distributed=True, compaction=True)


def test_a_worker_outside_torchrun_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamtrainer.consumer import Worker

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError, match="torchrun"):
        Worker(WorkerSettings(topic="t", distributed=True, metrics_port=-1), registry=CollectorRegistry())
    assert "RANK" not in os.environ


def test_the_cli_says_how_to_launch_it() -> None:
    result = run_cli("worker", "--topic", "t", "--distributed", "--metrics-port", "-1")
    assert result.returncode == 2, result.stderr
    assert "torchrun --nproc-per-node=N -m streamtrainer worker --distributed" in result.stderr


def test_several_nodes_on_torchruns_shared_store_are_a_usage_error_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Restart counts key each life on the shared store, and agents count their own: one store per life."""
    from streamtrainer.consumer.rounds import launch_environment

    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "GROUP_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(ConfigurationError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        launch_environment()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that setting gives the ranks
    assert launch_environment() == (1, 2, 0)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")  # one node: the agent's restart count keys each life
    assert launch_environment() == (1, 2, 0)
