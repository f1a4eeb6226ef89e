"""Users' own modules against the built-in model, side by side in one run (issue 17's table).

``python -m bench.custom_models`` (``make bench-models``; ``--quick`` for fewer records). Rows:

* in memory (``OnlineLearner.learn_many``, 500 records a call as the worker's polls; each
  learner's path compiled first): the naive PyTorch loop (one autograd step a record), the
  built-in ``mlp``, the same MLP as a user's ``nn.Sequential`` and as a nested user module
  (path 1, the hand-written loop), Linear-Tanh-LayerNorm-Linear (path 1, the layer-program
  loop), a gated residual block (path 2, the compiled step graph); strict and micro-batch
  (B=32); repetitions interleaved;
* the worker end to end on the embedded broker (binary codec, --no-compaction), strict and
  --update-batch 32: the steady rate from the first batch its compiled path trained;
* cold and warm start of each compiled path: seconds from a new learner (in a new process) to
  its path compiled for strict steps, with an empty cache, then with the cache it left.

d=16 regression, the worker's default optimizer (Adagrad, lr 0.1), hidden 64. Writes
bench/results/custom-models-<time>.json and prints the table with ratios to the built-in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from bench.workloads import Timing, dataset, encode, produce
from streamtrainer.broker import EmbeddedBroker
from streamtrainer.settings import DEFAULT_LR, DEFAULT_OPTIMIZER
from streamtrainer.training.learner import LearnerConfig, OnlineLearner, make_optimizer
from streamtrainer.training.models import build_model
from streamtrainer.training.threads import set_intra_op_threads

D = 16
HIDDEN = 64
CHUNK = 500
MICRO = 32
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (label, --model, the path it should take)
MODELS: tuple[tuple[str, str, str], ...] = (
    ("built-in mlp", "mlp", "kernel"),
    ("user nn.Sequential MLP (path 1)", "bench.user_modules:sequential_mlp", "kernel"),
    ("user nested MLP module (path 1)", "bench.user_modules:mlp", "kernel"),
    ("user Linear-Tanh-LayerNorm-Linear (path 1)", "bench.user_modules:tanh_layernorm", "program"),
    ("user gated residual block (path 2)", "bench.user_modules:gated", "graph"),
)


# The naive loop of each module family: the MLP, and the module path 2 trains.
NAIVE: tuple[tuple[str, str], ...] = (
    ("naive autograd loop, MLP", "bench.user_modules:sequential_mlp"),
    ("naive autograd loop, gated block", "bench.user_modules:gated"),
)


@dataclass
class Row:
    section: str
    name: str
    model: str
    batch: int
    timings: list[Timing] = field(default_factory=list)
    path: str = ""

    @property
    def median(self) -> float:
        return statistics.median(t.rate for t in self.timings) if self.timings else float("nan")


def config_for(model: str) -> LearnerConfig:
    return LearnerConfig(
        model=model, task="regression", optimizer=DEFAULT_OPTIMIZER, lr=DEFAULT_LR, hidden=HIDDEN
    )


def naive_loop(model: str, features: np.ndarray, labels: np.ndarray) -> Timing:
    """What a PyTorch user writes first: one autograd step per record (already standardized)."""
    module = build_model(model, n_features=D, n_outputs=1, hidden=HIDDEN)
    optimizer = make_optimizer(DEFAULT_OPTIMIZER, module.parameters(), DEFAULT_LR)
    x, y = torch.from_numpy(features), torch.from_numpy(labels)
    started = time.perf_counter()
    for i in range(x.shape[0]):
        loss = F.mse_loss(module(x[i : i + 1]).reshape(-1), y[i : i + 1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Timing(x.shape[0], time.perf_counter() - started)


def learner_run(model: str, features: np.ndarray, labels: np.ndarray, batch: int) -> tuple[Timing, str]:
    learner = OnlineLearner(config_for(model), D)
    if not learner.settle_path(timeout_s=600, batch_size=batch):
        raise RuntimeError(f"{model}: no compiled path ({learner.path.describe()})")
    started = time.perf_counter()
    for start in range(0, features.shape[0], CHUNK):
        learner.learn_many(features[start : start + CHUNK], labels[start : start + CHUNK], batch_size=batch)
    return Timing(features.shape[0], time.perf_counter() - started), learner.path.path


def in_memory(
    rows: list[Row], n: dict[int, int], n_naive: int, reps: int, log: Callable[[str], None]
) -> None:
    features, labels = dataset("regression", D, max(n.values()))
    for batch in (1, MICRO):
        entries = [Row("in memory", label, model, batch) for label, model in NAIVE]
        entries += [Row("in memory", label, model, batch) for label, model, _ in MODELS]
        for rep in range(reps):
            for row in entries:
                if row.name.startswith("naive"):
                    if batch != 1:
                        continue
                    timing, path = naive_loop(row.model, features[:n_naive], labels[:n_naive]), "autograd"
                else:
                    timing, path = learner_run(row.model, features[: n[batch]], labels[: n[batch]], batch)
                row.timings.append(timing)
                row.path = path
                log(f"{row.name:<44} B={batch:<3} rep {rep + 1}: {timing.rate:>12,.0f} records/s ({path})")
        rows.extend(r for r in entries if r.timings)


def end_to_end(rows: list[Row], bootstrap: str, n: int, reps: int, log: Callable[[str], None]) -> None:
    from confluent_kafka.admin import AdminClient

    from bench.worker_runs import run_worker
    from streamtrainer.connection import ensure_topic

    topic = f"bench-models-{os.getpid()}"
    ensure_topic(AdminClient({"bootstrap.servers": bootstrap}), topic, 1)
    features, labels = dataset("regression", D, n)
    seconds = produce(bootstrap, topic, encode(features, labels, "binary"), "binary")
    log(f"produced {n:,} binary records to {topic} in {seconds:.1f}s")
    for batch in (1, MICRO):
        entries = [Row("worker", label, model, batch) for label, model, _ in MODELS]
        for rep in range(reps):
            for row in entries:
                timing, worker = run_worker(
                    bootstrap, topic, row.model, n, d=D, update_batch=batch, compaction=False
                )
                rate = timing.extra.get("compiled_rate")
                if rate is None:
                    raise RuntimeError(f"{row.model}: the worker's compiled path never trained a batch")
                records = n - worker.records_at_fused
                row.timings.append(Timing(records, records / rate, timing.extra))
                row.path = worker.learner.path.path if worker.learner is not None else "?"
                log(
                    f"worker {row.name:<37} B={batch:<3} rep {rep + 1}: {rate:>12,.0f} records/s ({row.path})"
                )
        rows.extend(entries)


_START_CODE = """
import json, sys, time
started = time.perf_counter()
from streamtrainer.training.learner import LearnerConfig, OnlineLearner
model, optimizer, lr, batch = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
config = LearnerConfig(model=model, task="regression", optimizer=optimizer, lr=lr, hidden=64)
learner = OnlineLearner(config, 16)
made = time.perf_counter()
ready = learner.settle_path(timeout_s=600, batch_size=batch)
print(json.dumps({"path": learner.path.path, "ready": ready, "import_and_learner_s": made - started,
                  "compile_s": time.perf_counter() - made}))
"""


def start_times(models: list[tuple[str, str]], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Cold (empty cache) then warm (its cache) start of each compiled path, each in a new process."""
    out = []
    for label, model in models:
        with tempfile.TemporaryDirectory(prefix="streamtrainer-bench-cache-") as cache:
            env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
            env["XDG_CACHE_HOME"] = cache  # both compiled paths cache under it
            for batch in (1, MICRO):
                for phase in ("cold", "warm"):
                    args = [model, DEFAULT_OPTIMIZER, str(DEFAULT_LR), str(batch)]
                    done = subprocess.run(
                        [sys.executable, "-c", _START_CODE, *args],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                        timeout=900,
                    )
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    result.update(model=label, phase=phase, batch=batch)
                    out.append(result)
                    log(
                        f"{phase} start {label:<40} B={batch:<3} compiled in {result['compile_s']:.2f}s "
                        f"(+{result['import_and_learner_s']:.2f}s import and learner; {result['path']})"
                    )
    return out


def print_table(rows: list[Row], starts: list[dict[str, Any]]) -> None:
    print("\n| section | model | path | B | records/s (median) | x built-in | x naive (same module) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(
            (r for r in rows if r.section == row.section and r.batch == row.batch and r.model == "mlp"), None
        )
        family = "gated" if "gated" in row.model else "sequential_mlp"
        model = f"bench.user_modules:{family}"
        naive = next((r for r in rows if r.name.startswith("naive") and r.model == model), None)
        vs_base = f"{row.median / base.median:.2f}" if base is not None else "-"
        vs_naive = f"{row.median / naive.median:.1f}" if naive is not None and row.batch == 1 else "-"
        cells = (row.section, row.name, row.path, row.batch, f"{row.median:,.0f}", vs_base, vs_naive)
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if starts:
        print("\n| model | B | cold start (s) | warm start (s) | path |")
        print("|---|---|---|---|---|")
        for cold in (s for s in starts if s["phase"] == "cold"):
            warm = next(
                s
                for s in starts
                if s["phase"] == "warm" and s["model"] == cold["model"] and s["batch"] == cold["batch"]
            )
            cells = (
                cold["model"],
                cold["batch"],
                f"{cold['compile_s']:.2f}",
                f"{warm['compile_s']:.2f}",
                cold["path"],
            )
            print("| " + " | ".join(str(c) for c in cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="users' own modules vs the built-in model (bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="fewer records and repetitions")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--skip-worker", action="store_true", help="in memory and start times only")
    parser.add_argument("--skip-starts", action="store_true", help="no cold/warm start measurements")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    set_intra_op_threads(1)
    reps = args.reps or (1 if args.quick else 2)
    n = {1: 20_000, MICRO: 100_000} if args.quick else {1: 100_000, MICRO: 400_000}
    n_naive = 2_000 if args.quick else 5_000
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {text}", file=sys.stderr, flush=True)

    rows: list[Row] = []
    in_memory(rows, n, n_naive, reps, log)
    if not args.skip_worker:
        with EmbeddedBroker() as broker:
            end_to_end(rows, broker.bootstrap_servers, 100_000 if args.quick else 300_000, reps, log)
    starts = [] if args.skip_starts else start_times([(label, model) for label, model, _ in MODELS[2:]], log)
    print_table(rows, starts)
    out = args.out or RESULTS_DIR / f"custom-models-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rows": [
                    {
                        "section": r.section,
                        "name": r.name,
                        "model": r.model,
                        "batch": r.batch,
                        "path": r.path,
                        "rates": [t.rate for t in r.timings],
                    }
                    for r in rows
                ],
                "starts": starts,
                "load": os.getloadavg(),
                "seconds": time.perf_counter() - started,
            },
            indent=1,
        )
    )
    print(f"\n{time.perf_counter() - started:.0f}s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
