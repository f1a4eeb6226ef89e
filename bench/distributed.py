"""``worker --distributed``: the cost of an averaging round, and records/s per rank at 1 and 2 ranks.

1. ``rounds``: ModelAverager.average on 2 gloo ranks (torch.multiprocessing, loopback) for a
   d=16, 64-hidden MLP with Adagrad (parameters and accumulator: 2 x 1,153 floats + 2 steps):
   the median and p90 of a few hundred rounds, per rank.
2. ``worker``: the embedded broker, a 4-partition topic of N regression records (d=16), and
   ``torchrun --nproc-per-node=R -m streamtrainer worker --distributed`` (mlp, hidden 64, or
   linear: --model; --stop-at-end) for R = 1 and 2: each rank's records/s (its final line) and
   its rounds' share of its run (its summary line).

3. ``quality``: the whole-stream prequential loss of N ranks' averaged model against one learner
   that saw every record, in memory (the worker's learner and ModelAverager on N gloo ranks, no
   Kafka): a stationary and a drifting d=16 regression stream, 4 partitions (partition i mod 4,
   partition p to rank p mod N), the worker's defaults (--average-warmup-records rounds after
   every step, then the first clock round ~20,000 records in, doubling up to
   --average-every-records). Rounds come at the group's record counts where the worker's come at
   its clock: the same thing when the ranks train at one rate.

Usage: python -m bench.distributed [rounds|worker|quality|all] [--records N] [--stream stationary|drifting]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from torch import nn

from streamtrainer.broker import EmbeddedBroker
from streamtrainer.connection import ensure_topic
from streamtrainer.consumer.worker import learner_config
from streamtrainer.records import CODEC_HEADER, Sample, encode_binary
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import OnlineLearner
from streamtrainer.training.averaging import ModelAverager

D, HIDDEN, PARTITIONS = 16, 64, 4


def _rounds_rank(rank: int, port: int, rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    model = nn.Sequential(nn.Linear(D, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    averager = ModelAverager(model, optimizer)
    times = []
    for _ in range(rounds):
        dist.barrier()  # the ranks arrive together: the round itself, not the wait for the other
        started = time.perf_counter()
        averager.average(100.0)
        times.append(time.perf_counter() - started)
    Path(out, f"rank{rank}.txt").write_text(" ".join(f"{t:.9f}" for t in times))
    dist.destroy_process_group()


def bench_rounds(rounds: int = 500) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rounds_rank, args=(port, rounds, out), nprocs=2, join=True)
        for rank in (0, 1):
            times = np.array([float(t) for t in Path(out, f"rank{rank}.txt").read_text().split()])[20:]
            print(
                f"averaging round, 2 ranks, d={D} MLP {HIDDEN} hidden + Adagrad state, rank {rank}: "
                f"median {1e6 * np.median(times):.0f} us, p90 {1e6 * np.percentile(times, 90):.0f} us"
            )


def _produce(bootstrap: str, topic: str, n: int, kind: str = "stationary") -> None:
    features, labels = _stream(n, kind)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000})
    for i in range(n):
        value = encode_binary(Sample(features[i], float(labels[i])))
        while True:
            try:
                producer.produce(
                    topic, value=value, partition=i % PARTITIONS, headers=[(CODEC_HEADER, b"binary")]
                )
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(120) == 0


def _worker_run(
    bootstrap: str, topic: str, ranks: int, directory: Path, model: str = "mlp", *extra: str
) -> str:
    """A launch of ``ranks`` ranks (0: one plain worker, not --distributed); its output."""
    launch = ["torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "streamtrainer"]
    command = [
        sys.executable,
        "-m",
        *(launch if ranks else ["streamtrainer"]),
        "worker",
        *(["--distributed"] if ranks else ["--no-compaction"]),
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--group",
        f"bench-{uuid.uuid4().hex[:8]}",
        "--checkpoint-dir",
        str(directory / f"ckpt-{model}-{ranks}-{uuid.uuid4().hex[:8]}"),  # a new model each run
        "--metrics-port",
        "-1",
        "--model",
        model,
        "--task",
        "regression",
        "--hidden",
        str(HIDDEN),
        "--stop-at-end",
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    return result.stdout + result.stderr


def bench_worker(
    n: int,
    model: str,
    ranks_list: tuple[int, ...],
    everies: tuple[int | None, ...] = (None,),
    kind: str = "stationary",
) -> None:
    """One produced topic; for each launch size (0: one plain worker) and each K, one run."""
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        bootstrap = broker.bootstrap_servers
        topic = f"bench-distributed-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        ensure_topic(admin, topic, partitions=PARTITIONS, timeout_s=30)
        _produce(bootstrap, topic, n, kind)
        for ranks, every in [(r, k) for r in ranks_list for k in (everies if r else (None,))]:
            extra = ["--average-every-records", str(every)] if every and ranks else []
            text = _worker_run(bootstrap, topic, ranks, Path(tmp), model, *extra)
            rates = re.findall(r"trained (\d+) record\(s\) .*? in ([\d.]+)s, ([\d,]+) records/s", text)
            # The whole stream's prequential loss: each rank's, weighted by the records it scored.
            losses = [
                (int(n), float(loss))
                for n, loss in re.findall(r"trained (\d+) record.*? loss ([-\d.e]+) \(", text)
            ]
            total = sum(n for n, _ in losses)
            whole = sum(n * loss for n, loss in losses) / total if total else float("nan")
            shares = re.findall(
                r"rank (\d+): (\d+) averaging round\(s\), ([\d.]+) ms each .*?, ([\d.]+)% of the ([\d.]+) s "
                r"since the [\w-]+(?:; warm-up: (\d+) round\(s\) in ([\d.]+) s, ([\d.]+) ms each)?",
                text,
            )
            row = f"{kind}, {model}, {ranks} rank(s)" if ranks else f"{kind}, {model}, one plain worker"
            row += f", every {every} records" if every and ranks else ""
            print(f"{row}: whole-stream prequential loss {whole:.5f} over {total} records")
            for trained, seconds, rate in rates:
                print(f"{row}: a rank trained {trained} records in {seconds} s: {rate} records/s")
            aggregate = (
                sum(int(t) for t, _, _ in rates) / max(float(s) for _, s, _ in rates) if rates else 0.0
            )
            print(f"{row}: aggregate {aggregate:,.0f} records/s (all records / the slowest rank's time)")
            for rank, count, ms, share, _, warm_rounds, warm_s, warm_ms in shares:
                warm = (
                    f"; warm-up {warm_rounds} rounds in {warm_s} s ({warm_ms} ms each)" if warm_rounds else ""
                )
                print(
                    f"{row}: rank {rank}: {count} rounds, {ms} ms each, "
                    f"{share}% of its run after the warm-up{warm}"
                )
            if shares and rates:
                # The records after the warm-up (--average-warmup-records, 2,000, before it) over the
                # longest time since it: the rate a long-running group keeps.
                warmed = 2_000 if any(w for *_, w, _, _ in shares) else 0
                since = max(float(s[4]) for s in shares)
                after = (sum(int(t) for t, _, _ in rates) - warmed) / since
                print(f"{row}: after the warm-up: {after:,.0f} records/s aggregate")


def _stream(n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """d=16 regression: ``stationary`` (one linear target), or ``drifting`` (an abrupt change of
    target a third of the way in, then a gradual one back over the last third)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, D)).astype(np.float32)
    w1, w2 = rng.normal(size=D), rng.normal(size=D)
    if kind == "stationary":
        y = x @ w1
    else:
        t = np.arange(n) / n
        a = np.where(t < 1 / 3, 0.0, np.where(t < 2 / 3, 1.0, 1.0 - (t - 2 / 3) * 3))
        y = (1 - a) * (x @ w1) + a * (x @ w2)
    return x, (y + 0.1 * rng.normal(size=n)).astype(np.float32)


def _quality_learner(model: str, settings_overrides: dict[str, Any]) -> tuple[WorkerSettings, OnlineLearner]:
    settings = WorkerSettings(
        topic="bench", model=model, task="regression", hidden=HIDDEN, distributed=True, **settings_overrides
    )
    return settings, OnlineLearner(learner_config(settings), D)


def _round_bounds(n: int, world: int, warmup: int, every: int) -> list[int]:
    """The group's record counts at which rounds come (see the module doc)."""
    bounds, done = [], 0
    while done < min(warmup, n):
        done = min(n, done + world)
        bounds.append(done)
    step = 20_000
    while done < n:
        done = min(n, done + min(step, every))
        bounds.append(done)
        step *= 2
    return bounds


def _quality_rank(rank: int, job: tuple[int, int, int, str, str, int, str]) -> None:
    world, port, n, kind, model, warmup, out = job
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    x, y = _stream(n, kind)
    settings, learner = _quality_learner(model, {"average_warmup_records": warmup})
    mine = np.nonzero((np.arange(n) % PARTITIONS) % world == rank)[0]
    statistics = [s for s in (learner.scaler, learner.target_scaler) if s is not None]
    averager = ModelAverager(learner.model, learner.optimizer, statistics=statistics)
    losses, previous = [], 0
    for bound in _round_bounds(n, world, warmup, settings.average_every_records):
        rows = mine[(mine >= previous) & (mine < bound)]
        for i in range(0, len(rows), 500):
            losses.append(learner.learn_many(x[rows[i : i + 500]], y[rows[i : i + 500]]).losses)
        averager.average(float(len(rows)))
        previous = bound
    scored = np.concatenate(losses) if losses else np.zeros(0)
    Path(out, f"rank{rank}.txt").write_text(f"{np.nansum(scored)} {np.sum(~np.isnan(scored))}")
    dist.destroy_process_group()


def bench_quality(n: int, model: str, ranks_list: tuple[int, ...]) -> None:
    for kind in ("stationary", "drifting"):
        x, y = _stream(n, kind)
        _, learner = _quality_learner(model, {})
        scored = np.concatenate(
            [learner.learn_many(x[i : i + 500], y[i : i + 500]).losses for i in range(0, n, 500)]
        )
        alone = float(np.nanmean(scored))
        print(f"quality, {kind}, {model}, {n} records: one learner, every record: {alone:.5f}")
        for world in (r for r in ranks_list if r > 0):
            for warmup in (2_000, 0):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = int(s.getsockname()[1])
                with tempfile.TemporaryDirectory() as out:
                    mp.spawn(
                        _quality_rank,
                        args=((world, port, n, kind, model, warmup, out),),
                        nprocs=world,
                        join=True,
                    )
                    parts = [Path(out, f"rank{r}.txt").read_text().split() for r in range(world)]
                total = sum(float(a) for a, _ in parts) / sum(float(b) for _, b in parts)
                print(
                    f"quality, {kind}, {model}, {n} records: {world} rank(s), warm-up {warmup}: "
                    f"{total:.5f} ({100 * (total / alone - 1):+.1f}%)"
                )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="?", default="all", choices=["rounds", "worker", "quality", "all"])
    parser.add_argument("--records", type=int, default=400_000)
    parser.add_argument("--model", default="mlp", choices=["mlp", "linear"])
    parser.add_argument("--ranks", default="0,1,2", help="launches: 0 is one plain worker")
    parser.add_argument("--every", default="", help="--average-every-records, comma-separated (default: its)")
    parser.add_argument("--stream", default="stationary", choices=["stationary", "drifting"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.what in ("rounds", "all"):
        bench_rounds()
    if args.what in ("quality", "all"):
        quality_ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks != "0,1,2" else (2, 3)
        bench_quality(args.records, args.model, quality_ranks)
    if args.what in ("worker", "all"):
        ranks = tuple(int(r) for r in args.ranks.split(","))
        everies = tuple(int(k) for k in args.every.split(",")) if args.every else (None,)
        bench_worker(args.records, args.model, ranks, everies, args.stream)


if __name__ == "__main__":
    main()
