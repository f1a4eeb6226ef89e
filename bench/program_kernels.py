"""User modules through the compiled loops, in memory: ``python -m bench.program_kernels [--quick]``.

Side by side in one process (repetitions interleaved: A1 B1 C1 ... A2 B2 ...), ``kernels.fused_learn``
records/s on d=16 regression (MSE, SGD lr 0.01 as bench.run), strict and ``batch_size=32``, for:

* the built-in ``mlp`` (16 -> 64 -> 1), the hand-written loop;
* the same MLP written as a user's nested module: lowered, recognised, the hand-written loop;
* the same MLP forced through the program loop (its ``builtin()`` match switched off): the
  program loop's cost against the hand-written one on the same shape;
* ``Linear-Tanh-LayerNorm-Linear`` (16 -> 64 -> 1) and a depth-3 GELU MLP (16 -> 64 -> 64 -> 1):
  the program loop.

Then the per-call costs (the lowering check per batch, the gather/scatter of parameters and
state) and the compile times of the program loop's variants, cold (an empty numba cache, in a
child process as the worker compiles) and warm (loaded from that cache).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamtrainer.training import kernels, lowering
from streamtrainer.training.models import build_model

D, H = 16, 64


class UserMlp(nn.Module):
    """The built-in MLP as a user writes it: nested, with a no-op Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Sequential(nn.Linear(D, H), nn.ReLU()), nn.Dropout(0.0))
        self.head = nn.Linear(H, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@contextmanager
def _forced_program() -> Iterator[None]:
    """Switch off the recognition of the built-in shapes: every model takes the program loop."""
    real, real_layout = lowering.Program.builtin, kernels._builtin_layout
    lowering.Program.builtin = lambda self: None  # type: ignore[method-assign]
    kernels._builtin_layout = lambda model: None
    lowering._cache.clear()
    try:
        yield
    finally:
        lowering.Program.builtin = real  # type: ignore[method-assign]
        kernels._builtin_layout = real_layout
        lowering._cache.clear()


def _models() -> dict[str, tuple[Callable[[], nn.Module], bool]]:
    """name -> (builder, forced through the program loop)."""
    return {
        "built-in mlp 16-64-1": (
            lambda: build_model("mlp", n_features=D, n_outputs=1, hidden=H, seed=1),
            False,
        ),
        "user module mlp 16-64-1": (UserMlp, False),
        "mlp 16-64-1 via program": (
            lambda: build_model("mlp", n_features=D, n_outputs=1, hidden=H, seed=1),
            True,
        ),
        "Linear-Tanh-LayerNorm-Linear": (
            lambda: nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.LayerNorm(H), nn.Linear(H, 1)),
            False,
        ),
        "GELU mlp 16-64-64-1": (
            lambda: nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, H), nn.GELU(), nn.Linear(H, 1)),
            False,
        ),
    }


def _path(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    plan = kernels._plan(model, optimizer, "mse", "regression")
    return plan if isinstance(plan, str) else plan.kind


def _rates(n_strict: int, reps: int) -> None:
    n_batch = 5 * n_strict  # micro-batches run ~3-5x faster: a call long enough to time
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_batch, D)).astype(np.float32)
    y = (x @ rng.normal(size=D) / 4).astype(np.float32)
    runs = {}
    for name, (build, forced) in _models().items():
        torch.manual_seed(1)
        model = build()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        with _forced_program() if forced else _nothing():
            assert kernels.wait_until_ready(model, optimizer, loss="mse", task="regression", timeout_s=600)
            kernels.fused_learn(
                model, optimizer, x[:64], y[:64], loss="mse", task="regression", batch_size=32
            )
            assert kernels.wait_until_ready(timeout_s=600)  # the grouped variant too
            path = _path(model, optimizer)
        runs[name] = (model, optimizer, forced, path)
    print(
        f"fused_learn in memory, d={D}, {n_strict:,} (strict) / {n_batch:,} (B=32) records a call, "
        f"SGD lr 0.01, median of {reps} interleaved repetitions; "
        "x built-in: the median of the per-repetition ratios"
    )
    print(f"{'model':32} {'loop':8} {'strict rec/s':>14} {'B=32 rec/s':>14}")
    results: dict[str, dict[int, list[float]]] = {name: {1: [], 32: []} for name in runs}
    for _ in range(reps):
        for batch in (1, 32):
            for name, (model, _, forced, _path_name) in runs.items():
                fresh = copy.deepcopy(model)
                fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.01)
                with _forced_program() if forced else _nothing():
                    n = n_strict if batch == 1 else n_batch
                    started = time.perf_counter()
                    kernels.fused_learn(
                        fresh, fresh_opt, x[:n], y[:n], loss="mse", task="regression", batch_size=batch
                    )
                    results[name][batch].append(n / (time.perf_counter() - started))
    base = results["built-in mlp 16-64-1"]
    for name, (_, _, _, path) in runs.items():
        strict, grouped = (statistics.median(results[name][b]) for b in (1, 32))
        print(f"{name:32} {path:8} {strict:14,.0f} {grouped:14,.0f}", end="")
        ratios = [
            statistics.median(a / b for a, b in zip(results[name][batch], base[batch], strict=True))
            for batch in (1, 32)
        ]
        print(f"   x built-in: {ratios[0]:.2f} / {ratios[1]:.2f}")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _per_call_costs() -> None:
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    builtin = build_model("mlp", n_features=D, n_outputs=1, hidden=H, seed=1)
    builtin_opt = torch.optim.Adam(builtin.parameters(), lr=0.001)
    x, y = np.zeros((1, D), np.float32), np.zeros(1, np.float32)
    for m, o in ((model, optimizer), (builtin, builtin_opt)):
        kernels.wait_until_ready(m, o, loss="mse", task="regression", timeout_s=600)
        kernels.fused_learn(m, o, x, y, loss="mse", task="regression")

    def per_call(function: Callable[[], object], reps: int = 2000) -> float:
        started = time.perf_counter()
        for _ in range(reps):
            function()
        return (time.perf_counter() - started) / reps * 1e6

    started = time.perf_counter()
    lowering.lower(model)
    trace_us = (time.perf_counter() - started) * 1e6
    check = per_call(lambda: kernels.fused_supported(model, optimizer, loss="mse", task="regression"))
    check_builtin = per_call(
        lambda: kernels.fused_supported(builtin, builtin_opt, loss="mse", task="regression")
    )
    call = per_call(lambda: kernels.fused_learn(model, optimizer, x, y, loss="mse", task="regression"))
    call_builtin = per_call(
        lambda: kernels.fused_learn(builtin, builtin_opt, x, y, loss="mse", task="regression")
    )
    print(
        f"per call, 16-64-1 with Adam: lowering (fx trace) {trace_us:.0f} us once; fused_supported "
        f"{check:.1f} us (built-in {check_builtin:.1f}); fused_learn of 1 record {call:.1f} us "
        f"(built-in {call_builtin:.1f}: the difference is the gather/scatter of 1,153 parameters x 3 arrays "
        "and the lowering check)"
    )


_COMPILE = """
import sys, time
started = time.perf_counter()
from streamtrainer.training import program_loops
imported = time.perf_counter()
program_loops.compile_variant(int(sys.argv[1]), sys.argv[2] == "1")
print(f"{imported - started:.2f} {time.perf_counter() - imported:.2f}")
"""


def _compile_times() -> None:
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": root}
        print("program loop variants, compile seconds in a child (numba import excluded): cold / warm")
        for opt, name in ((0, "sgd"), (1, "adam"), (2, "adagrad")):
            for grouped in (0, 1):
                times = []
                for _ in ("cold", "warm"):
                    out = subprocess.run(
                        [sys.executable, "-c", _COMPILE, str(opt), str(grouped)],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout.split()
                    times.append(float(out[1]))
                label = f"{name}{' grouped' if grouped else ''}"
                print(f"  {label:16} {times[0]:6.2f} / {times[1]:.2f}")


def main() -> None:
    """Run the bench and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer records and repetitions, no compile times"
    )
    args = parser.parse_args()
    _rates(20_000 if args.quick else 60_000, 3 if args.quick else 5)
    _per_call_costs()
    if not args.quick:
        _compile_times()


if __name__ == "__main__":
    main()
