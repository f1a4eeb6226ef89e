"""The graph path (streamtrainer.training.graph_step) against the naive autograd loop.

``python -m bench.graph_step [--quick]``: for a gated block (d=16, h=64) and an
MLP-sized module written as a user's module (16 -> 64 -> 1 with a residual
input term, so the numba loop cannot take it), Adam: records/s of the naive
loop (strict and B=32), of the compiled package strict for several S and
micro-batch B=32, the cold compile (an empty package cache and an empty
Inductor cache) and the warm start (package cached: trace + load), and the
autograd loop's rate while a cold compile runs in the background. Side by side
in one process; a few repetitions, best kept.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from streamtrainer.training import graph_step

D, H = 16, 64


class Gated(nn.Module):
    """A gated block: tanh(a x) * sigmoid(g x), then a linear output, plus a skip of x[0]."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.o = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(H, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.a(x)) * torch.sigmoid(self.g(x))) + x[:, :1]


class Mlp(nn.Module):
    """16 -> 64 -> 1 ReLU, as a user would write it (a class with its own forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(D, H), nn.Linear(H, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def naive(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    """Records/s of the autograd loop (as OnlineLearner._learn, without its guards)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    started = time.perf_counter()
    for start in range(0, len(x), batch):
        out = model(xs[start : start + batch])
        loss = F.mse_loss(out.reshape(-1), ys[start : start + batch], reduction="none")
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()
    return len(x) / (time.perf_counter() - started)


def graph_rate(path: graph_step.GraphPath, x: np.ndarray, y: np.ndarray, batch: int, calls: int) -> float:
    """Records/s through the compiled package, in calls of len(x)/calls records."""
    chunks = np.array_split(np.arange(len(x)), calls)
    started = time.perf_counter()
    for rows in chunks:
        path.call(x[rows], y[rows], batch).result()
    return len(x) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="gated block only, S=16 and B=32")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both paths (default 1: on a busy 2-core machine two OpenMP threads made a "
        "16-step call of either path 30-60x slower, 35-67 ms instead of ~1 ms)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 8192
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = rng.normal(size=n).astype(np.float32)
    modules = {"gated": Gated} if args.quick else {"gated": Gated, "mlp-module": Mlp}
    shapes = [(16, 1), (32, 4)] if args.quick else [(8, 1), (16, 1), (32, 4)]  # (S, B) ... (B, S) below
    root = Path(tempfile.mkdtemp(prefix="bench-graph-"))
    # An empty Inductor cache too, so that "cold" is a first compile on a fresh machine.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"{'module':<11} {'path':<22} {'records/s':>10} {'x naive':>8} {'cold s':>7} {'warm s':>7}")
    for name, build in modules.items():
        model = build()
        base = {
            b: max(naive(copy.deepcopy(model), x[: 2048 * b], y[: 2048 * b], b) for _ in range(2))
            for b in (1, 4)
        }
        base[32] = max(naive(copy.deepcopy(model), x, y, 32) for _ in range(2))
        print(f"{name:<11} {'naive strict':<22} {base[1]:>10.0f}")
        print(f"{name:<11} {'naive B=32':<22} {base[32]:>10.0f}")
        for first, second in shapes:
            batch, steps = (1, first) if second == 1 else (first, second)
            cache = root / f"{name}-{steps}-{batch}"
            trained = copy.deepcopy(model)
            optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3)
            path = graph_step.GraphPath(
                trained,
                optimizer,
                loss="mse",
                task="regression",
                cache_dir=cache,
                n_features=D,
                steps_per_call=steps,
            )
            # The autograd loop's rate while the cold compile runs (child process, niced), measured
            # during the first compile of each module; the others just wait.
            other = copy.deepcopy(model)
            started = time.perf_counter()
            path.ready(batch)
            during, rows = 0.0, 0
            while path.state(batch) == "compiling" and (first, second) == shapes[0]:
                during += 512 / naive(other, x[:512], y[:512], 1)
                rows += 512
            path.wait(batch, 900)
            cold = time.perf_counter() - started
            if not path.wait(batch, 0):
                print(f"{name:<11} S={steps} B={batch}: failed: {path.failure(batch)}")
                continue
            restarted = copy.deepcopy(model)
            again = graph_step.GraphPath(
                restarted,
                torch.optim.Adam(restarted.parameters(), lr=1e-3),
                loss="mse",
                task="regression",
                cache_dir=cache,
                n_features=D,
                steps_per_call=steps,
            )
            started = time.perf_counter()
            again.wait(batch, 60)
            warm = time.perf_counter() - started
            graph_rate(path, x[:1024], y[:1024], batch, 4)  # first calls
            rate = max(graph_rate(path, x, y, batch, 16) for _ in range(3))
            label = f"graph S={steps}" + (" strict" if batch == 1 else f" B={batch}")
            print(
                f"{name:<11} {label:<22} {rate:>10.0f} {rate / base[batch]:>8.1f} {cold:>7.1f} {warm:>7.1f}"
                + (f"   (autograd during the compile: {rows / during:.0f}/s)" if rows else "")
            )


if __name__ == "__main__":
    main()
