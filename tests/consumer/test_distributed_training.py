"""Averaging across torch.distributed ranks (training/averaging.py), on 2 gloo processes, no Kafka.

- Equivalence: with plain SGD and a round after every step, 2 ranks taking one record each equal
  one process taking mini-batches of the 2 records with the averaged gradient (allclose 1e-6).
- A rank with no data (weight 0) does not change the others' model, and leaves with it.
- ``mean`` adds up Adagrad's accumulated squares and the step counts (one process's state).
- ``sum``: the audit model's weights are the sum of every rank's records, exactly.
- The standardizers' statistics merge to those of every rank's records.
- No deadlock: a rank that stops coming makes the other's round raise within the collective
  timeout plus a margin, not hang.
"""

from __future__ import annotations

import json
import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from streamtrainer.training.averaging import ModelAverager
from streamtrainer.training.scaler import RunningStandardizer

STEPS = 40
LR = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(rank: int, port: int, timeout_s: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=timeout_s),
    )


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(STEPS, 2, 4, generator=g)
    y = x.sum(dim=2, keepdim=True) + 0.1 * torch.randn(STEPS, 2, 1, generator=g)
    return x, y


def _equivalence_rank(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    averager = ModelAverager(model, optimizer)
    x, y = _data()
    for t in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[t, rank : rank + 1]), y[t, rank : rank + 1])
        loss.backward()
        optimizer.step()
        result = averager.average(1.0)
        assert result.total_weight == 2.0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_two_ranks_averaging_every_step_equal_one_process_on_minibatches_of_two(tmp_path: Path) -> None:
    mp.spawn(_equivalence_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    # One process, mini-batches of both ranks' records, the mean loss (so the averaged gradient).
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data()
    for t in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[t]), y[t]).backward()
        optimizer.step()
    expected = model.state_dict()
    initial = _mlp().state_dict()
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        for name, value in expected.items():
            assert torch.allclose(got[name], value, atol=1e-6, rtol=0), (rank, name)
            # (and the training moved it: the check is not of two untouched models)
            assert not torch.allclose(value, initial[name], atol=1e-3), name


def _weights_rank(rank: int, port: int, out: str) -> None:
    """Rank 0 trains (Adam); rank 1 has no data. Then the sum reduction on the audit-like model."""
    _init(rank, port)
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = RunningStandardizer(4)
    averager = ModelAverager(model, optimizer, statistics=[scaler])
    x, y = _data()
    weight = 0.0
    if rank == 0:
        for t in range(10):
            scaler.learn_transform(x[t].numpy())
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x[t]), y[t]).backward()
            optimizer.step()
        weight = 20.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    averager.average(weight)
    after = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    after.update({f"before.{k}": v.contiguous() for k, v in before.items()})
    after.update(
        {
            "exp_avg": optimizer.state[next(iter(model.parameters()))]["exp_avg"].contiguous(),
            "scaler.mean": torch.from_numpy(scaler.mean.copy()),
            "scaler.m2": torch.from_numpy(scaler.m2.copy()),
            "scaler.count": torch.tensor([scaler.count]),
        }
    )
    # sum: w starts at 0 on both; each adds its own records; the result is the sum of both.
    audit = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        audit.weight.zero_()
    summing = ModelAverager(audit, torch.optim.SGD(audit.parameters(), lr=1.0), reduction="sum")
    rows = x[:, rank].double()
    with torch.no_grad():
        audit.weight += rows[: 5 + 10 * rank].sum(dim=0)  # 5 records on rank 0, 15 on rank 1
    result = summing.average(float(5 + 10 * rank), sums=np.array([float(rank + 1)]))
    after["audit"] = audit.weight.detach().clone()
    after["sums"] = torch.from_numpy(result.sums.copy())
    save_file(after, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_a_rank_without_data_contributes_nothing_and_sum_adds_every_rank_s_updates(tmp_path: Path) -> None:
    mp.spawn(_weights_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in (0, 1)]
    x, _ = _data()
    for name in [k for k in ranks[0] if k.startswith("model.")]:
        trained = ranks[0][name.replace("model.", "before.")]
        # weight 0: rank 1's untouched model is not in the mean; both leave with rank 0's.
        assert torch.equal(ranks[0][name], trained), name
        assert torch.equal(ranks[1][name], trained), name
        assert not torch.equal(ranks[1][name.replace("model.", "before.")], trained), name
    assert torch.equal(ranks[1]["exp_avg"], ranks[0]["exp_avg"])
    assert ranks[1]["exp_avg"].abs().sum() > 0  # rank 1 had no state: it got rank 0's moments
    # The statistics of rank 0's 20 records, on both.
    rows = x[:10].reshape(-1, 4).double().numpy()
    for r in ranks:
        assert int(r["scaler.count"][0]) == 20
        assert np.allclose(r["scaler.mean"].numpy(), rows.mean(axis=0), atol=1e-9)
        assert np.allclose(r["scaler.m2"].numpy(), ((rows - rows.mean(axis=0)) ** 2).sum(axis=0), atol=1e-7)
    expected = (x[:5, 0].double().sum(dim=0) + x[:15, 1].double().sum(dim=0)).reshape(1, 4)
    for r in ranks:
        assert torch.allclose(r["audit"], expected, atol=1e-12, rtol=0)
        assert r["sums"].tolist() == [3.0]


def _hang_rank(rank: int, port: int, out: str, timeout_s: float) -> None:
    _init(rank, port, timeout_s=timeout_s)
    model = _mlp()
    averager = ModelAverager(model, torch.optim.SGD(model.parameters(), lr=LR))
    averager.average(1.0)  # one round together: the group is up
    done = Path(out) / "rank0.json"
    if rank == 1:
        # Stops participating (hung in something else): waits until rank 0 has given up.
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    started = time.monotonic()
    try:
        averager.average(1.0)
        outcome = "returned"
    except RuntimeError as error:  # torch.distributed.DistBackendError is a RuntimeError
        outcome = f"raised {type(error).__name__}: {str(error)[:200]}"
    done.write_text(json.dumps({"outcome": outcome, "seconds": time.monotonic() - started}))


@pytest.mark.parametrize("timeout_s", [3.0])
def test_a_rank_that_stops_coming_makes_the_others_round_raise_within_the_timeout(
    tmp_path: Path, timeout_s: float
) -> None:
    mp.spawn(_hang_rank, args=(_free_port(), str(tmp_path), timeout_s), nprocs=2, join=True)
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["outcome"].startswith("raised"), report
    # The collective timeout, not a hang: raised after about the timeout (a margin for a busy machine).
    assert timeout_s * 0.5 <= report["seconds"] <= timeout_s + 20, report


def _adagrad_rank(rank: int, port: int, out: str) -> None:
    """Both ranks train Adagrad on their own records (3 and 7 steps), then one mean round."""
    _init(rank, port)
    model = _mlp()
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    averager = ModelAverager(model, optimizer)
    x, y = _data()
    steps = 3 + 4 * rank
    for t in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[t, rank : rank + 1]), y[t, rank : rank + 1]).backward()
        optimizer.step()
    first = next(iter(model.parameters()))
    saved = {
        "before.weight": first.detach().clone(),
        "before.sum": optimizer.state[first]["sum"].clone(),
        "before.step": optimizer.state[first]["step"].reshape(1).clone(),
    }
    averager.average(float(steps))
    saved.update(
        {
            "after.weight": first.detach().clone(),
            "after.sum": optimizer.state[first]["sum"].clone(),
            "after.step": optimizer.state[first]["step"].reshape(1).clone(),
        }
    )
    save_file(saved, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_mean_averages_parameters_and_adds_up_adagrads_accumulated_squares(tmp_path: Path) -> None:
    """Parameters: the weighted mean; Adagrad's sum and step: what one process taking both ranks'
    steps holds (the sum of the increments), so its step sizes are not those of half the data."""
    mp.spawn(_adagrad_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in (0, 1))
    weight = (3 * r0["before.weight"].double() + 7 * r1["before.weight"].double()) / 10
    accumulated = r0["before.sum"].double() + r1["before.sum"].double()  # both started at 0
    for r in (r0, r1):
        assert torch.allclose(r["after.weight"].double(), weight, atol=1e-7, rtol=0)
        assert torch.allclose(r["after.sum"].double(), accumulated, atol=1e-6, rtol=1e-6)  # float32
        assert float(r["after.step"][0]) == 10.0
    # (the mean of the two accumulators would be half as large: the check tells them apart)
    assert not torch.allclose(accumulated / 2, accumulated, atol=1e-4)
