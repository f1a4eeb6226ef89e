"""One command for the whole benchmark: ``python -m bench.run [--quick]``.

Measures, side by side in one run on the same seeded data, how fast a stream is
trained record by record: the naive PyTorch loop (the baseline), River, the
learner alone (fused kernels), the worker end to end through the embedded broker (strict
and micro-batch, binary and JSON codecs, with compaction on as by default and
with --no-compaction), and the ceiling (consume + decode, no training); compaction
epochs against a plain in-memory mini-batch loop; the replay's read into a
compaction store against a raw consume of the same records; plus the time from
partition assignment to the first trained record with empty compile caches, and
resident memory over a long run. Prints a table and writes everything to
bench/results/<timestamp>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from confluent_kafka.admin import AdminClient

from bench.workloads import (
    MODELS,
    Timing,
    compaction_epochs,
    dataset,
    encode,
    learner_loop,
    naive_loop,
    plain_epochs_loop,
    produce,
    raw_consume,
    replay_read,
    river_available,
    river_loop,
)
from streamtrainer.broker import EmbeddedBroker
from streamtrainer.connection import ensure_topic
from streamtrainer.settings import WorkerSettings
from streamtrainer.training.threads import set_intra_op_threads

logger = logging.getLogger("bench")

NAIVE = "naive loop (json.loads, autograd)"
RAW_BINARY = "raw consume + decode (binary"
RIVER = "River learn_one"
STRICT_BINARY = "worker strict (binary)"
STRICT_BINARY_OFF = "worker strict (binary, --no-compaction)"
STRICT_BINARY_INLINE = "worker strict (binary, --no-compaction, --no-overlap)"
STRICT_JSON = "worker strict (json)"
RAW_PAIRED = "raw consume + decode (binary, alongside micro-batch, from assignment)"
RAW_FROM_ASSIGNMENT = "raw consume + decode (binary, from assignment)"
REPLAY = "replay read + collect into store"
# The worker's compaction defaults: what a compaction trains, per the settings.
COMPACTION_EPOCHS: int = WorkerSettings.model_fields["compaction_epochs"].default
COMPACTION_BATCH: int = WorkerSettings.model_fields["compaction_batch_size"].default
PLAIN = f"plain loop (autograd) B={COMPACTION_BATCH} E={COMPACTION_EPOCHS}"
COMPACTION = f"compaction epochs (window + train_epochs) B={COMPACTION_BATCH} E={COMPACTION_EPOCHS}"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """Records per repetition of each measurement (by feature dimension), and repetitions."""

    reps: int  # in memory, and the end-to-end strict binary runs at d=16
    reps_other: int  # the other end-to-end runs (each pays a ~3 s consumer-group join)
    dims: tuple[int, ...]  # end to end, and naive/River; the fused kernels always run d=16 and d=128
    naive: dict[int, int]
    river: dict[int, int]
    kernel: dict[int, int]
    compaction_window: int  # W of the compaction-vs-plain-loop rows (both dims)
    strict_binary: dict[int, int]
    strict_json: dict[int, int]
    micro: dict[int, int]
    micro_batch: int
    micro_no_compaction: bool  # also run micro-batch with --no-compaction
    replay: int  # records the replay reads (from the regression d=16 binary topic)
    first_record: int
    rss_warm: int
    rss_total: int
    warm_children: bool  # separate warm-cache runs (quick: the memory run doubles as one)


FULL = Sizes(
    reps=3,
    reps_other=2,
    dims=(16, 128),
    naive={16: 2500, 128: 1500},
    river={16: 20000, 128: 5000},
    kernel={16: 300_000, 128: 50_000},
    compaction_window=100_000,
    strict_binary={16: 400_000, 128: 100_000},
    strict_json={16: 120_000, 128: 25_000},
    # 1M at d=16: the raw consumer reads it in ~1 s (a shorter read is at the mercy of one stall).
    micro={16: 1_000_000, 128: 100_000},
    micro_batch=32,
    micro_no_compaction=True,
    replay=1_000_000,
    first_record=60_000,
    rss_warm=500_000,
    rss_total=2_000_000,
    warm_children=True,
)
QUICK = Sizes(
    reps=2,
    reps_other=1,
    dims=(16,),
    naive={16: 1000},
    river={16: 6000},
    kernel={16: 150_000, 128: 25_000},
    compaction_window=10_000,
    strict_binary={16: 150_000},
    strict_json={16: 40_000},
    micro={16: 150_000},
    micro_batch=32,
    micro_no_compaction=True,
    replay=300_000,
    first_record=30_000,
    rss_warm=100_000,
    rss_total=400_000,
    warm_children=False,
)


# A correctness run in well under a minute (CI, editing the bench): its numbers mean nothing.
SMOKE = Sizes(
    reps=1,
    reps_other=1,
    dims=(16,),
    naive={16: 200},
    river={16: 500},
    kernel={16: 4000, 128: 2000},
    compaction_window=3000,
    strict_binary={16: 6000},
    strict_json={16: 3000},
    micro={16: 6000},
    micro_batch=32,
    micro_no_compaction=True,
    replay=8000,
    first_record=3000,
    rss_warm=4000,
    rss_total=8000,
    warm_children=False,
)


@dataclass
class Row:
    section: str
    name: str
    model: str
    d: int
    timings: list[Timing] = field(default_factory=list)
    note: str = ""
    status: str = "measured"  # or "pending", "skipped"
    group: int | None = None  # rows measured side by side, repetitions interleaved: ratios pair up

    @property
    def rates(self) -> list[float]:
        return [t.rate for t in self.timings]

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.timings else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "model": self.model,
            "d": self.d,
            "status": self.status,
            "note": self.note,
            "group": self.group,
            "median_rate": self.median,
            "min_rate": min(self.rates, default=float("nan")),
            "max_rate": max(self.rates, default=float("nan")),
            "runs": [
                {"records": t.records, "seconds": t.seconds, "rate": t.rate, **t.extra} for t in self.timings
            ],
        }


class Bench:
    def __init__(self, sizes: Sizes, *, reps: int | None) -> None:
        self.sizes = sizes
        self.reps = reps or sizes.reps
        self.rows: list[Row] = []
        self.started = time.perf_counter()
        self.info: dict[str, Any] = {}
        self._groups = 0

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def measure(
        self,
        section: str,
        name: str,
        model: str,
        d: int,
        fn: Callable[[], Timing],
        *,
        reps: int | None = None,
    ) -> Row:
        row = Row(section, name, model, d)
        for rep in range(reps or self.reps):
            timing = fn()
            row.timings.append(timing)
            self.log(f"{name:<34} {model:<8} d={d:<4} rep {rep + 1}: {timing.rate:>12,.0f} records/s")
        self.rows.append(row)
        return row

    def side_by_side(
        self, entries: Sequence[tuple[str, str, str, int, Callable[[], Timing]]], *, reps: int | None = None
    ) -> list[Row]:
        """Measure several rows with their repetitions interleaved (A1 B1 A2 B2 ...).

        Load that comes and goes then hits both sides of a ratio alike, and the
        per-repetition ratios pair up (see :func:`ratio_stats`).
        """
        self._groups += 1
        rows = [Row(section, name, model, d, group=self._groups) for section, name, model, d, _ in entries]
        for rep in range(reps or self.reps):
            for row, (_, name, model, d, fn) in zip(rows, entries, strict=True):
                timing = fn()
                row.timings.append(timing)
                self.log(f"{name:<34} {model:<8} d={d:<4} rep {rep + 1}: {timing.rate:>12,.0f} records/s")
        self.rows.extend(rows)
        return rows

    def find(self, name: str, model: str, d: int) -> Row | None:
        for row in self.rows:
            if row.name == name and row.model == model and row.d == d and row.timings:
                return row
        return None


# -- the parts ---------------------------------------------------------------------


def in_memory(bench: Bench) -> None:
    sizes = bench.sizes
    b = sizes.micro_batch
    for d in (16, 128):
        for model, (task, _loss) in MODELS.items():
            k = sizes.kernel[d]
            n, r = sizes.naive.get(d, 0), sizes.river.get(d, 0)
            features, labels = dataset(task, d, max(n, r, k))
            if n:
                values = encode(features[:n], labels[:n], "json")
                bench.measure("baseline", NAIVE, model, d, partial(naive_loop, model, values))
            if r and model != "mlp":
                if river_available():
                    bench.measure(
                        "baseline", RIVER, model, d, partial(river_loop, model, features[:r], labels[:r])
                    )
                else:
                    bench.rows.append(
                        Row("baseline", RIVER, model, d, status="skipped", note="river not installed")
                    )
            x, y = features[:k], labels[:k]
            bench.measure(
                "learner",
                "learn_many strict (fused), in memory",
                model,
                d,
                partial(learner_loop, model, x, y),
            )
            bench.measure(
                "learner",
                f"learn_many B={b} (fused), in memory",
                model,
                d,
                partial(learner_loop, model, x, y, batch_size=b),
            )


def compaction(bench: Bench) -> None:
    """Item 6: one compaction of W records (E epochs of B) against a plain autograd loop on the same."""
    w = bench.sizes.compaction_window
    for d in (16, 128):
        for model, (task, _loss) in MODELS.items():
            features, labels = dataset(task, d, w, seed=11)
            with tempfile.TemporaryDirectory(prefix="streamtrainer-bench-store-") as directory:
                common = {"epochs": COMPACTION_EPOCHS, "batch_size": COMPACTION_BATCH}
                # 2/5 of W per shard: the window spans two shards on disk and the memory buffer.
                store = {"directory": Path(directory) / "store", "memory_records": max(1, 2 * w // 5)}
                _plain_row, compact_row = bench.side_by_side(
                    [
                        (
                            "compaction",
                            PLAIN,
                            model,
                            d,
                            _Seeded(plain_epochs_loop, model, features, labels, **common),
                        ),
                        (
                            "compaction",
                            COMPACTION,
                            model,
                            d,
                            _Seeded(compaction_epochs, model, features, labels, **common, **store),
                        ),
                    ]
                )
            compact_row.note = _compaction_note(compact_row)


class _Seeded:
    """``function(*args, seed=k, **kwargs)``, k = 0, 1, 2, ... on successive calls (one per repetition)."""

    def __init__(self, function: Callable[..., Timing], *args: Any, **kwargs: Any) -> None:
        self.function, self.args, self.kwargs = function, args, kwargs
        self.calls = 0

    def __call__(self) -> Timing:
        self.calls += 1
        return self.function(*self.args, seed=self.calls - 1, **self.kwargs)


def _compaction_note(row: Row) -> str:
    window = statistics.median(t.extra["window_s"] for t in row.timings)
    epochs = statistics.median(t.extra["epochs_s"] for t in row.timings)
    first = row.timings[0].extra
    fused = "compiled loop" if all(t.extra.get("fused") for t in row.timings) else "AUTOGRAD (loop not ready)"
    return (
        f"window {1e3 * window:.0f} ms + epochs {1e3 * epochs:.0f} ms; {first['records_on_disk']:,} of "
        f"{row.timings[0].records // COMPACTION_EPOCHS:,} from {first['shards']} shards on disk; {fused}"
    )


def replay(bench: Bench, bootstrap: str) -> None:
    """Item 7: the replay's read into a compaction store against a raw consume of the same records."""
    n = bench.sizes.replay
    topic = topic_name("regression", 16, "binary")

    def read() -> Timing:
        with tempfile.TemporaryDirectory(prefix="streamtrainer-bench-replay-") as directory:
            return replay_read(bootstrap, topic, n, directory=Path(directory))

    _raw, row = bench.side_by_side(
        [
            (
                "replay",
                RAW_FROM_ASSIGNMENT,
                "-",
                16,
                partial(raw_consume, bootstrap, topic, n, from_assignment=True),
            ),
            ("replay", REPLAY, "-", 16, read),
        ]
    )
    window = statistics.median(t.extra["window_s"] for t in row.timings)
    with_window = statistics.median(t.extra["read_and_window_rate"] for t in row.timings)
    row.note = (
        f"{n:,} records; then window + canonical order {window:.2f}s ({with_window:,.0f} rec/s incl.); "
        f"{row.timings[0].extra['shards']} shards"
    )


def topic_name(task: str, d: int, codec: str) -> str:
    return f"bench-{task}-d{d}-{codec}-{os.getpid()}"


def produce_topics(bench: Bench, bootstrap: str) -> None:
    sizes = bench.sizes
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for d in sizes.dims:
        for task in ("regression", "binary"):
            binary_records = max(sizes.strict_binary[d], sizes.micro[d])
            if task == "regression" and d == 16:
                binary_records = max(binary_records, sizes.rss_total, sizes.first_record)
            features, labels = dataset(task, d, binary_records)
            for codec, n in (("binary", binary_records), ("json", sizes.strict_json[d])):
                topic = topic_name(task, d, codec)
                ensure_topic(admin, topic, 1)
                seconds = produce(bootstrap, topic, encode(features[:n], labels[:n], codec), codec)
                bench.log(f"produced {n:,} {codec} records to {topic} in {seconds:.1f}s")


def end_to_end(bench: Bench, bootstrap: str) -> None:
    sizes = bench.sizes
    for d in sizes.dims:
        for codec in ("binary", "json"):
            n = sizes.strict_binary[d] if codec == "binary" else sizes.strict_json[d]
            topic = topic_name("regression", d, codec)
            raw = partial(raw_consume, bootstrap, topic, n)
            bench.measure("ceiling", f"raw consume + decode ({codec})", "-", d, raw, reps=sizes.reps_other)
            if codec == "binary":
                with_headers = partial(raw_consume, bootstrap, topic, n, read_headers=True)
                row = bench.measure(
                    "ceiling", f"{RAW_BINARY}, header read)", "-", d, with_headers, reps=sizes.reps_other
                )
                row.note = "also Message.headers() per record, which the worker no longer calls"
        for model, (task, _loss) in MODELS.items():
            # Compaction on (the default: every 2,000 records) and off, side by side; at d=16 also
            # with each batch's compiled loop on the poll loop's thread (--no-overlap; by default it
            # runs in a background thread while the next batch is polled).
            n = sizes.strict_binary[d]
            topic = topic_name(task, d, "binary")
            strict_variants: list[tuple[str, bool, bool | None]] = [
                (STRICT_BINARY, True, None),
                (STRICT_BINARY_OFF, False, None),
            ]
            if d == 16:
                strict_variants.append((STRICT_BINARY_INLINE, False, False))
            runs = [
                (
                    "worker",
                    name,
                    model,
                    d,
                    partial(
                        _worker_rate,
                        bootstrap,
                        topic,
                        model,
                        n,
                        d=d,
                        update_batch=1,
                        compaction=on,
                        overlap=overlap,
                    ),
                )
                for name, on, overlap in strict_variants
            ]
            for row in bench.side_by_side(runs, reps=sizes.reps if d == 16 else sizes.reps_other):
                row.note = _breakdown(row)
            run = partial(
                _worker_rate,
                bootstrap,
                topic_name(task, d, "json"),
                model,
                sizes.strict_json[d],
                d=d,
                update_batch=1,
            )
            row = bench.measure("worker", STRICT_JSON, model, d, run, reps=sizes.reps_other)
            row.note = _breakdown(row)
            name = f"worker micro-batch B={sizes.micro_batch} (binary)"
            variants: list[tuple[str, bool, bool | None]] = [(name, True, None)]
            if sizes.micro_no_compaction:
                variants.append((f"{name[:-1]}, --no-compaction)", False, None))
                variants.append((f"{name[:-1]}, --no-compaction, --no-overlap)", False, False))
            runs = [
                (
                    "worker",
                    label,
                    model,
                    d,
                    partial(
                        _worker_rate,
                        bootstrap,
                        topic,
                        model,
                        sizes.micro[d],
                        d=d,
                        update_batch=sizes.micro_batch,
                        compaction=on,
                        overlap=overlap,
                        from_assignment=True,
                    ),
                )
                for label, on, overlap in variants
            ]
            # The ceiling is measured alongside: load that comes and goes hits both sides.
            runs.append(
                (
                    "ceiling",
                    RAW_PAIRED,
                    model,
                    d,
                    partial(raw_consume, bootstrap, topic, sizes.micro[d], from_assignment=True),
                )
            )
            # The micro-batch target's rows: as many repetitions as the strict d=16 ones.
            for row in bench.side_by_side(runs, reps=sizes.reps if d == 16 else sizes.reps_other):
                if row.section == "worker":
                    row.note = _breakdown(row)


def _worker_rate(*args: Any, **kwargs: Any) -> Timing:
    """``run_worker``'s timing (imported here: the worker's modules load torch and numba)."""
    from bench.worker_runs import run_worker

    return run_worker(*args, **kwargs)[0]


def _breakdown(row: Row) -> str:
    """Median microseconds per steady-state record, by step (see bench/worker_runs.py)."""

    def median(key: str) -> float | None:
        values = [t.extra[key] for t in row.timings if key in t.extra]
        return statistics.median(values) if values else None

    keys = (
        ("us_learn_start", "learn start"),
        ("us_learn", "learn"),
        ("us_wait", "wait"),
        ("us_learn_finish", "learn finish"),
        ("us_decode", "decode"),
        ("us_keep", "keep"),
        ("us_prequential", "preq"),
        ("us_process_rest", "msgs+metrics"),
        ("us_compact", "compact"),
        ("us_checkpoint", "ckpt"),
        ("us_lag", "lag"),
        ("us_consume", "consume"),
    )
    parts = []
    for key, label in keys:
        value = median(key)
        if value is not None and (value or key not in ("us_keep", "us_compact")):
            parts.append(f"{label} {value:.2f}")
    note = "us/rec: " + ", ".join(parts) if parts else ""
    gc_time = median("us_gc")
    if gc_time is not None:
        note += f" (gc {gc_time:.2f} within them)"
    join = median("join_s")
    if join is not None:
        note += f"; join {join:.1f}s"
    return note


def child(
    bench: Bench,
    bootstrap: str,
    model: str,
    records: int,
    *,
    numba_cache: str | None,
    warm: int = 0,
) -> dict[str, Any] | None:
    env = dict(os.environ)
    if numba_cache is not None:
        env["NUMBA_CACHE_DIR"] = numba_cache
    topic = topic_name("regression", 16, "binary")
    command = [
        sys.executable,
        "-m",
        "bench.child",
        "--bootstrap",
        bootstrap,
        "--model",
        model,
        "--topic",
        topic,
    ]
    command += ["--records", str(records), "--warm-up-records", str(warm)]
    completed = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False
    )
    if completed.returncode != 0:
        bench.log(f"child failed ({completed.returncode}): {completed.stderr.strip()[-2000:]}")
        return None
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def startup_and_memory(bench: Bench, bootstrap: str) -> dict[str, Any]:
    sizes = bench.sizes
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="streamtrainer-numba-") as cache:
        # The compiled loop alone, with an empty numba cache, then from it: in-process and blocking,
        # torch already loaded (as in a worker): numba's import, its one-time start-up with the
        # standardizer, and one training loop (MLP, SGD). A worker pays this in a child process
        # (kernels.prepare), so its own threads are never held up by it. Then, apart, the MLP's
        # grouped variant (micro-batches by matrix products), which is compiled after it.
        code = (
            "import time, torch; t=time.perf_counter(); from streamtrainer.training import fused_loops as f; "
            "i=time.perf_counter()-t; f.compile_standardizer(); f.compile_variant(0, True); "
            "c=time.perf_counter()-t-i; g=time.perf_counter(); f.compile_variant(0, True, True); "
            "print(i, c, time.perf_counter()-g)"
        )
        for state in ("cold", "warm") if sizes.warm_children else ("cold",):
            completed = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=True,
                env={**os.environ, "NUMBA_CACHE_DIR": cache},
            )
            numba_import, compile_s, grouped_s = (float(v) for v in completed.stdout.split())
            out[f"kernel_{state}"] = {
                "numba_import_s": numba_import,
                "compile_s": compile_s,
                "grouped_compile_s": grouped_s,
            }
            bench.log(
                f"fused loop {state}: numba import {numba_import:.2f}s + compile/load {compile_s:.2f}s"
                f" (then the grouped MLP variant: {grouped_s:.2f}s)"
            )
    with tempfile.TemporaryDirectory(prefix="streamtrainer-numba-") as cache:
        # --quick: the memory run below, on the now warm cache, gives the warm first-record time.
        for state in ("cold", "warm") if sizes.warm_children else ("cold",):
            result = child(bench, bootstrap, "linear", sizes.first_record, numba_cache=cache)
            out[f"first_record_{state}"] = result
            if result is not None:
                bench.log(
                    f"first record ({state} caches): {result.get('first_record_s', float('nan')):.2f}s after "
                    f"assignment (join {result.get('join_s', float('nan')):.1f}s, learner "
                    f"{result.get('learner_created_s') or float('nan'):.2f}s, fused from "
                    f"{result.get('fused_from_s', float('nan')):.2f}s)"
                )
        result = child(
            bench,
            bootstrap,
            "linear",
            sizes.rss_total,
            numba_cache=cache,
            warm=sizes.rss_warm,
        )
        out["rss"] = result
        if result is not None:
            bench.log(
                f"RSS {result['rss_warm_mb']:.0f} MB at {sizes.rss_warm:,} records -> "
                f"{result['rss_end_mb']:.0f} MB at {sizes.rss_total:,} ({result['steady_rate']:,.0f} rec/s)"
            )
    return out


# -- report ------------------------------------------------------------------------


def ratio_stats(a: Row | None, b: Row | None) -> tuple[float, float, float, bool]:
    """a / b in records/s: (median, low, high, paired).

    Rows measured side by side (same group, interleaved repetitions) pair up: the
    median and range of the per-repetition ratios. Otherwise: the ratio of the
    medians, and the widest range the repetitions allow (min a / max b .. max a / min b).
    """
    nan = float("nan")
    if a is None or b is None or not a.timings or not b.timings or not b.median:
        return nan, nan, nan, False
    if a.group is not None and a.group == b.group and len(a.rates) == len(b.rates):
        ratios = [x / y for x, y in zip(a.rates, b.rates, strict=True)]
        return statistics.median(ratios), min(ratios), max(ratios), True
    return a.median / b.median, min(a.rates) / max(b.rates), max(a.rates) / min(b.rates), False


def ratio(a: Row | None, b: Row | None) -> float:
    return ratio_stats(a, b)[0]


def targets(bench: Bench, extras: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    sizes = bench.sizes

    def add(name: str, a: Row | None, b: Row | None, goal: float | None, *, time_ratio: bool = False) -> None:
        """A ratio of two rows; ``time_ratio``: b's rate over a's (how many times longer a takes)."""
        value, low, high, paired = ratio_stats(b, a) if time_ratio else ratio_stats(a, b)
        entry: dict[str, Any] = {
            "target": name,
            "value": value,
            "low": low,
            "high": high,
            "paired": paired,
            "goal": goal,
            "unit": "x",
        }
        if goal is not None:
            entry["met"] = bool(value <= goal) if time_ratio else bool(value >= goal)
            entry["below"] = time_ratio
        out.append(entry)

    def check(name: str, value: float, goal: float, *, unit: str) -> None:
        out.append(
            {"target": name, "value": value, "goal": goal, "unit": unit, "below": True, "met": value < goal}
        )

    # Like for like: the naive loop and River update once per record, so the targets take the
    # worker with compaction off (one update per record too). With compaction on (the default)
    # it also trains 3 epochs over every 2,000-record window: 4 updates per record; the context
    # rows below give that ratio as well.
    for model in MODELS:
        add(
            f"strict binary d=16 {model} vs naive (>= 100x)",
            bench.find(STRICT_BINARY_OFF, model, 16),
            bench.find(NAIVE, model, 16),
            100,
        )
    add(
        "strict binary d=16 linear vs River (>= 8x)",
        bench.find(STRICT_BINARY_OFF, "linear", 16),
        bench.find(RIVER, "linear", 16),
        8,
    )
    add(
        "context: strict binary d=16 logistic vs River",
        bench.find(STRICT_BINARY_OFF, "logistic", 16),
        bench.find(RIVER, "logistic", 16),
        None,
    )
    for model in MODELS:
        add(
            f"context: strict binary d=16 {model} vs naive, compaction on (4 updates per record)",
            bench.find(STRICT_BINARY, model, 16),
            bench.find(NAIVE, model, 16),
            None,
        )
    for model in MODELS:
        add(
            f"strict JSON d=16 {model} vs naive (>= 20x)",
            bench.find(STRICT_JSON, model, 16),
            bench.find(NAIVE, model, 16),
            20,
        )
    micro = f"worker micro-batch B={sizes.micro_batch} (binary)"
    micro_off = f"{micro[:-1]}, --no-compaction)"
    micro_inline = f"{micro[:-1]}, --no-compaction, --no-overlap)"
    for model in MODELS:
        raw = bench.find(RAW_PAIRED, model, 16)
        add(f"micro-batch d=16 {model} vs raw consume (>= 0.7x)", bench.find(micro_off, model, 16), raw, 0.7)
        for label, name in (("--no-overlap", micro_inline), ("compaction on", micro)):
            add(
                f"context: micro-batch d=16 {model}, {label}, vs raw consume",
                bench.find(name, model, 16),
                raw,
                None,
            )
    for d in (16, 128):
        for model in MODELS:
            add(
                f"compaction epochs d={d} {model} vs plain loop, W={sizes.compaction_window:,} (>= 0.8x)",
                bench.find(COMPACTION, model, d),
                bench.find(PLAIN, model, d),
                0.8,
            )
    add(
        f"replay read+collect {sizes.replay:,} records: time vs raw consume (<= 1.5x)",
        bench.find(REPLAY, "-", 16),
        bench.find(RAW_FROM_ASSIGNMENT, "-", 16),
        1.5,
        time_ratio=True,
    )
    # Context, not targets: what compaction (on by default) costs the worker; how far above the
    # naive loop the broker alone (no training) goes here.
    for model in MODELS:
        for mode, default, inline in (
            ("strict binary", STRICT_BINARY_OFF, STRICT_BINARY_INLINE),
            ("micro-batch", micro_off, micro_inline),
        ):
            add(
                f"context: {mode} d=16 {model}, default (--overlap) / --no-overlap",
                bench.find(default, model, 16),
                bench.find(inline, model, 16),
                None,
            )
    for d in sizes.dims:
        for model in MODELS:
            add(
                f"context: strict binary d={d} {model}, compaction on / off",
                bench.find(STRICT_BINARY, model, d),
                bench.find(STRICT_BINARY_OFF, model, d),
                None,
            )
            if sizes.micro_no_compaction:
                add(
                    f"context: micro-batch d={d} {model}, compaction on / off",
                    bench.find(micro, model, d),
                    bench.find(f"{micro[:-1]}, --no-compaction)", model, d),
                    None,
                )
    for name in (f"{RAW_BINARY})", f"{RAW_BINARY}, header read)"):
        for model in MODELS:
            add(
                f"context: {name} vs naive {model}",
                bench.find(name, "-", 16),
                bench.find(NAIVE, model, 16),
                None,
            )
    rss = extras.get("rss")
    if rss:
        check(
            f"RSS growth {sizes.rss_warm / 1e6:g}M -> {sizes.rss_total / 1e6:g}M records (< 50 MB)",
            rss["rss_end_mb"] - rss["rss_warm_mb"],
            50,
            unit="MB",
        )
    cold = extras.get("first_record_cold")
    if cold and "first_record_s" in cold:
        check("assignment -> first trained record, empty caches (< 5 s)", cold["first_record_s"], 5, unit="s")
    kernel = extras.get("kernel_cold")
    if kernel:
        total = kernel["numba_import_s"] + kernel["compile_s"]
        check("fused loop cold compile incl. numba import (< 5 s)", total, 5, unit="s")
    return [
        goal
        for goal in out
        if not (goal["unit"] == "x" and goal["value"] != goal["value"] and goal["goal"] is None)
    ]


def print_table(bench: Bench, goals: list[dict[str, Any]]) -> None:
    naive = {(r.model, r.d): r for r in bench.rows if r.name == NAIVE and r.timings}
    print()
    header = (
        f"{'measurement':<50} {'model':<8} {'d':>4} {'median rec/s':>13} {'range':>21} {'x naive':>8}  note"
    )
    print(header)
    print("-" * len(header))
    section = None
    for row in bench.rows:
        if row.section != section:
            section = row.section
            print(f"[{section}]")
        if not row.timings:
            print(f"{row.name:<50} {row.model:<8} {row.d:>4} {row.status:>13} {'':>21} {'':>8}  {row.note}")
            continue
        span = f"{min(row.rates):,.0f}-{max(row.rates):,.0f}"
        base = naive.get((row.model, row.d))
        # Compaction rows count record-steps (W x epochs): not comparable with the naive loop.
        comparable = base is not None and row.model != "-" and row.section != "compaction"
        times = f"{row.median / base.median:,.1f}" if base is not None and comparable else ""
        print(
            f"{row.name:<50} {row.model:<8} {row.d:>4} {row.median:>13,.0f} {span:>21} {times:>8}  {row.note}"
        )
    print()
    title = "target (ratios: median [range] over repetitions; * = paired, side by side)"
    print(f"{title:<84} {'value':>22} {'goal':>7}  result")
    for goal in goals:
        if goal["unit"] == "x":
            star = "*" if goal.get("paired") else " "
            value = f"{goal['value']:.2f}x [{goal['low']:.2f}-{goal['high']:.2f}]{star}"
        else:
            value = f"{goal['value']:.2f}{goal['unit']}"
        if goal["goal"] is None:
            print(f"{goal['target']:<84} {value:>22}")
            continue
        sign = "<=" if goal.get("below") and goal["unit"] == "x" else ("<" if goal.get("below") else ">=")
        result = "MET" if goal["met"] else "MISSED"
        print(f"{goal['target']:<84} {value:>22} {sign}{goal['goal']:>5g}  {result}")


def code_paths() -> dict[str, bool]:
    """Which integration the measured code has (the bench runs the product code as it is)."""
    from streamtrainer.consumer import worker
    from streamtrainer.training import learner

    return {
        "learner_uses_kernels": "kernels.fused_call" in inspect.getsource(learner),
        "worker_prepares_kernels": "kernels.prepare" in inspect.getsource(worker),
    }


def machine_info() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "git_commit": commit.stdout.strip(),
        "git_dirty": bool(dirty.stdout.strip()),
        "loadavg_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="streamtrainer benchmark (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="fewer records and repetitions (< 2 minutes)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks that everything runs; numbers mean nothing"
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON output (default bench/results/<time>.json)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    set_intra_op_threads(1)

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    bench = Bench({"smoke": SMOKE, "quick": QUICK, "full": FULL}[mode], reps=args.reps)
    info = machine_info()
    info["mode"] = mode
    bench.log(f"{mode} run, {bench.reps} repetitions; load {info['loadavg_start']}")
    info.update(code_paths())
    in_memory(bench)
    compaction(bench)
    extras: dict[str, Any] = {}
    with EmbeddedBroker() as broker:
        produce_topics(bench, broker.bootstrap_servers)
        extras = startup_and_memory(bench, broker.bootstrap_servers)
        end_to_end(bench, broker.bootstrap_servers)
        replay(bench, broker.bootstrap_servers)

    goals = targets(bench, extras)
    info["loadavg_end"] = os.getloadavg()
    info["seconds"] = time.perf_counter() - bench.started
    print_table(bench, goals)
    out = (
        args.out
        or RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}{'' if mode == 'full' else '-' + mode}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "info": info,
                "rows": [r.as_json() for r in bench.rows],
                "startup_and_memory": extras,
                "targets": goals,
            },
            indent=1,
            default=str,
        )
    )
    if not info["worker_prepares_kernels"]:
        print(
            "\nnote: Worker.run does not call kernels.prepare yet: torch's optimizer machinery loads and"
            " the loop compiles after the partition assignment (first-record and fused-from times)."
        )
    print(f"{info['seconds']:.0f}s; load {info['loadavg_start']} -> {info['loadavg_end']}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
