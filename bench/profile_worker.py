"""Where the worker's time goes, end to end: ``python -m bench.profile_worker``.

Runs the real worker (``bench.worker_runs.TimedWorker``: the product code path,
timed per polled batch) strict, binary codec, d=16, linear (``--model mlp``,
``--update-batch B`` for micro-batches, ``--no-overlap``), through the embedded
broker, with ``--no-compaction`` and with the defaults (compaction every 2,000
records), interleaved with a bare consumer reading the same topic (the ceiling),
and reports for the steady state (first trained batch to last):

* wall microseconds per record, by step: consume, decode, learn, keep
  (compactor.keep), prequential, the rest of ``_start_update``/``_finish_update`` (per-message loop,
  offsets, metrics), compaction, checkpoint, lag refresh;
* CPU microseconds per record: the worker's main thread, librdkafka's threads,
  the broker process, everything else on the machine, and idle core time; this
  says whether a slow stretch is work or waiting (for the broker, or for a core
  another process holds);
* ``--cprofile``: one more run of each under cProfile (main thread, steady
  state only; cProfile's per-call overhead inflates Python-heavy parts);
* ``--py-spy``: one more run of each sampled by py-spy (attached to this process
  for the steady state, non-blocking, idle samples included so waiting shows),
  attributed by stack to the same steps and to the hottest source lines.

``--contend N`` runs N busy-looping processes alongside the measured runs, to
see what CPU contention does to each step. ``--records`` (default 200,000) per
run, ``--reps`` (2) repetitions. Writes
``bench/results/profile-<time>.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from bench.worker_runs import TimedWorker, worker_settings
from bench.workloads import Timing, dataset, encode, produce, raw_consume
from streamtrainer.broker import EmbeddedBroker
from streamtrainer.connection import ensure_topic
from streamtrainer.consumer import worker as worker_module
from streamtrainer.training import kernels
from streamtrainer.training.threads import set_intra_op_threads

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TICK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting -------------------------------------------------------------------


def _ticks(stat_line: str) -> int:
    fields = stat_line.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)


def cpu_snapshot(broker_pid: int | None) -> dict[str, Any]:
    """CPU seconds so far: this process's threads by kind, the broker, and the whole machine."""
    main, rdkafka, other = 0, 0, 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                ticks = _ticks(stat.read())
            with open(f"/proc/self/task/{tid}/comm") as comm:
                name = comm.read().strip()
        except OSError:
            continue
        if int(tid) == os.getpid():
            main += ticks
        elif name.startswith("rdk:"):
            rdkafka += ticks
        else:
            other += ticks
    broker = 0
    if broker_pid is not None:
        with open(f"/proc/{broker_pid}/stat") as stat:
            broker = _ticks(stat.read())
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    steal = values[7] if len(values) > 7 else 0
    busy = sum(values[:8]) - idle - steal
    return {
        "wall": time.perf_counter(),
        "main": main / TICK,
        "rdkafka": rdkafka / TICK,
        "threads": other / TICK,
        "broker": broker / TICK,
        "machine_busy": busy / TICK,
        "machine_idle": idle / TICK,
        "steal": steal / TICK,
    }


def cpu_per_record(start: dict[str, Any], end: dict[str, Any], records: int) -> dict[str, float]:
    """Microseconds per record of each CPU consumer over a window (and its wall time)."""
    delta = {k: end[k] - start[k] for k in start}
    ours = delta["main"] + delta["rdkafka"] + delta["threads"]
    out = {k: 1e6 * v / records for k, v in delta.items()}
    out["others"] = 1e6 * (delta["machine_busy"] - ours - delta["broker"]) / records
    out["cores_busy"] = delta["machine_busy"] / delta["wall"] if delta["wall"] > 0 else float("nan")
    return out


# -- the worker, observed ---------------------------------------------------------------


class ProfiledWorker(TimedWorker):
    """TimedWorker that also snapshots CPU, and optionally profiles, over the steady window."""

    def __init__(self, settings: Any, *, broker_pid: int | None, mode: str, spy_out: Path | None) -> None:
        super().__init__(settings)
        self.broker_pid = broker_pid
        self.mode = mode  # "plain", "cprofile" or "py-spy"
        self.spy_out = spy_out
        self.cpu_start: dict[str, Any] | None = None
        self.cpu_end: dict[str, Any] | None = None
        self.records_at_start = 0
        self.profile: cProfile.Profile | None = None
        self._spy: subprocess.Popen[bytes] | None = None
        self.spy_log = ""

    def _finish_update(self) -> None:
        super()._finish_update()
        limit = self.settings.max_records or 0
        if self.cpu_start is None and self.records_trained:
            self.records_at_start = self.records_trained
            self._start_profiling()
            self.cpu_start = cpu_snapshot(self.broker_pid)
        elif self.cpu_end is None and self.records_trained >= limit:
            self.cpu_end = cpu_snapshot(self.broker_pid)
            self._stop_profiling()

    def _start_profiling(self) -> None:
        if self.mode == "cprofile":
            self.profile = cProfile.Profile()
            self.profile.enable()
        elif self.mode == "py-spy" and self.spy_out is not None:
            command = [
                *_py_spy(),
                "record",
                "--pid",
                str(os.getpid()),
                "--rate",
                "250",
                "--nonblocking",
                "--idle",
                "--format",
                "raw",
                "-o",
                str(self.spy_out),
            ]
            self._spy = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def _stop_profiling(self) -> None:
        if self.profile is not None:
            self.profile.disable()
        if self._spy is not None:
            self._spy.send_signal(signal.SIGINT)
            out, _ = self._spy.communicate(timeout=60)
            self.spy_log = out.decode(errors="replace")[-400:]


def _py_spy() -> list[str]:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return [found]


def run_variant(
    bootstrap: str,
    topic: str,
    records: int,
    *,
    compaction: bool,
    broker_pid: int | None,
    mode: str = "plain",
    model: str = "linear",
    update_batch: int = 1,
    overlap: bool = True,
) -> dict[str, Any]:
    settings = worker_settings(
        bootstrap,
        topic,
        model,
        records,
        d=16,
        update_batch=update_batch,
        compaction=compaction,
        overlap=overlap,
    )
    spy_out = (
        Path(tempfile.mkdtemp(prefix="streamtrainer-pyspy-")) / "stacks.txt" if mode == "py-spy" else None
    )
    worker = ProfiledWorker(settings, broker_pid=broker_pid, mode=mode, spy_out=spy_out)
    try:
        worker.run()
    finally:
        shutil.rmtree(settings.checkpoint_dir, ignore_errors=True)
    timing = worker.timing()
    result: dict[str, Any] = {
        "variant": "default (compaction on)" if compaction else "--no-compaction",
        "mode": mode,
        "rate": timing.rate,
        "us_per_record": 1e6 / timing.rate,
        **{k: v for k, v in timing.extra.items() if k.startswith("us_")},
        "records_per_batch": timing.extra.get("records_per_batch"),
        "compactions": timing.extra.get("compactions"),
    }
    if worker.cpu_start is not None and worker.cpu_end is not None:
        window = worker.records_trained - worker.records_at_start
        result["cpu_us"] = cpu_per_record(worker.cpu_start, worker.cpu_end, window)
    if worker.profile is not None:
        result["cprofile"] = summarize_cprofile(worker.profile, timing.records)
    if spy_out is not None:
        if spy_out.exists():
            result["py_spy"] = summarize_py_spy(spy_out.read_text(), result["us_per_record"])
        else:
            result["py_spy_error"] = worker.spy_log
        shutil.rmtree(spy_out.parent, ignore_errors=True)
    return result


def run_raw(bootstrap: str, topic: str, records: int, *, broker_pid: int | None) -> dict[str, Any]:
    start = cpu_snapshot(broker_pid)
    timing: Timing = raw_consume(bootstrap, topic, records)
    end = cpu_snapshot(broker_pid)
    # The CPU window includes the consumer's set-up and first batch (raw_consume times from there).
    return {
        "variant": "raw consume + decode",
        "rate": timing.rate,
        "us_per_record": 1e6 / timing.rate,
        "cpu_us_whole_call": cpu_per_record(start, end, records),
    }


# -- profiles, summarized ---------------------------------------------------------------

# Steps of the worker, by the function a stack passes through (outermost match wins; the
# name is matched against "function (file" of py-spy's frames and cProfile's keys).
STEPS: tuple[tuple[str, str, str], ...] = (
    ("compact", "_compact", "consumer/worker.py"),
    ("checkpoint", "_checkpoint_and_commit", "consumer/worker.py"),
    ("lag", "_refresh_lag", "consumer/worker.py"),
    ("decode", "decode", "records/codec.py"),
    ("learn start", "start_learn_many", "training/learner.py"),
    ("learn", "compute", "training/learner.py"),
    ("learn finish", "_finish_steps", "training/learner.py"),
    ("keep", "keep", "consumer/compactor.py"),
    ("prequential", "update", "training/progressive.py"),
    ("codec_of (headers)", "codec_of", "consumer/messages.py"),
    ("key_bytes", "key_bytes", "consumer/messages.py"),
    ("timestamp_of", "timestamp_of", "consumer/messages.py"),
    ("offsets.done", "done", "consumer/offsets.py"),
    ("prometheus", "", "prometheus_client/"),
    ("_start/_finish_update (own lines)", "_start_update", "consumer/worker.py"),  # PROCESS_OWN
    ("_start/_finish_update (own lines)", "_finish_update", "consumer/worker.py"),
)


PROCESS_OWN = "_start/_finish_update (own lines)"


def _frame_step(function: str, filename: str) -> str | None:
    for step, name, where in STEPS:
        if where in filename and (not name or function == name):
            return step
    return None


def _consume_lines() -> set[int]:
    """Line numbers of Worker.run that call consumer.consume (a C call: py-spy shows run's line)."""
    import inspect

    lines, first = inspect.getsourcelines(worker_module.Worker.run)
    return {first + i for i, line in enumerate(lines) if ".consume(" in line}


def summarize_py_spy(raw: str, us_per_record: float) -> dict[str, Any]:
    """Main-thread samples inside Worker.run, by step, as microseconds per record of wall time."""
    consume_lines = _consume_lines()
    steps: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        # py-spy names methods Class.method: Worker.run is the worker's loop, in the main thread only.
        run_at = next(
            (i for i, f in enumerate(frames) if f.startswith("Worker.run (") and "consumer/worker.py" in f),
            None,
        )
        if run_at is None:
            continue  # another thread, or outside the worker's loop
        count = int(count_text)
        total += count
        inner = frames[run_at + 1 :]
        # The outermost step below the loop, except that _start/_finish_update only take what none of the
        # steps inside it (decode, learn, keep, ...) claims.
        matched = [
            _frame_step(qualified.rsplit(".", 1)[-1], where)
            for qualified, _, where in (frame.partition(" (") for frame in inner)
        ]
        specific = [m for m in matched if m is not None and m != PROCESS_OWN]
        step = specific[0] if specific else (PROCESS_OWN if PROCESS_OWN in matched else None)
        if step is None:
            run_line = int(frames[run_at].rsplit(":", 1)[1].rstrip(")") or 0)
            step = "consume" if not inner and run_line in consume_lines else "run loop (other)"
        steps[step] += count
        leaves[frames[-1]] += count
    scale = us_per_record / total if total else float("nan")
    return {
        "samples": total,
        "steps_us": {k: v * scale for k, v in steps.most_common()},
        "top_lines_us": {k: v * scale for k, v in leaves.most_common(25)},
    }


def summarize_cprofile(profile: cProfile.Profile, records: int) -> dict[str, Any]:
    """Top functions by own time, and cumulative time of the worker's steps, in us per record."""
    stats = pstats.Stats(profile)
    table = stats.stats  # type: ignore[attr-defined]
    own = []
    cumulative: dict[str, float] = {}
    for (filename, _line, function), (_cc, _nc, tottime, cumtime, _callers) in table.items():
        where = f"{function} ({Path(filename).name}:{_line})" if filename != "~" else function
        own.append((tottime, where))
        step = _frame_step(function, filename)
        if "consume" in function and "Consumer" in function:
            step = "consume (C call)"
        elif step == PROCESS_OWN:
            step = "_start/_finish_update (total)"
        if step is not None and step != "prometheus":
            # The outermost function of a step has the largest cumulative time (nested ones of the
            # same name, e.g. an update called inside ProgressiveMetrics.update, do not add).
            cumulative[step] = max(cumulative.get(step, 0.0), cumtime)
    own.sort(reverse=True)
    return {
        "cumulative_us": {k: 1e6 * v / records for k, v in sorted(cumulative.items(), key=lambda kv: -kv[1])},
        "top_own_us": {where: 1e6 * t / records for t, where in own[:25]},
        "total_us": 1e6 * sum(t for t, _ in own) / records,
    }


# -- the command ------------------------------------------------------------------------


def _median(results: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else float("nan")


def _print_report(report: dict[str, Any]) -> None:
    runs = report["runs"]
    variants = ("--no-compaction", "default (compaction on)")
    raw = [r for r in runs if r["variant"] == "raw consume + decode"]
    print(f"\nsteady state, {report['records']:,} records per run, {report['reps']} repetitions (median)")
    print(
        f"raw consume + decode: {_median(raw, 'us_per_record'):.2f} us/record ({_median(raw, 'rate'):,.0f}/s)"
    )
    keys = (
        "us_consume",
        "us_decode",
        "us_learn_start",
        "us_learn",
        "us_wait",
        "us_learn_finish",
        "us_keep",
        "us_prequential",
        "us_process_rest",
        "us_compact",
        "us_checkpoint",
        "us_lag",
        "us_gc",
        "us_gc_full",
    )
    print(f"\n{'wall us/record':<22}" + "".join(f"{v:>26}" for v in variants))
    for key in ("us_per_record", *keys):
        cells = [
            _median([r for r in runs if r["variant"] == v and r["mode"] == "plain"], key) for v in variants
        ]
        print(f"{key.removeprefix('us_'):<22}" + "".join(f"{c:>26.2f}" for c in cells))
    print(f"\n{'CPU us/record':<22}" + "".join(f"{v:>26}" for v in variants) + f"{'raw (whole call)':>26}")
    cpu_keys = ("main", "rdkafka", "threads", "broker", "others", "machine_idle", "steal", "cores_busy")
    for key in cpu_keys:
        cells = []
        for v in variants:
            values = [
                r["cpu_us"][key] for r in runs if r["variant"] == v and "cpu_us" in r and r["mode"] == "plain"
            ]
            cells.append(statistics.median(values) if values else float("nan"))
        raw_values = [r["cpu_us_whole_call"][key] for r in raw]
        cells.append(statistics.median(raw_values) if raw_values else float("nan"))
        print(f"{key:<22}" + "".join(f"{c:>26.2f}" for c in cells))
    for run in runs:
        for kind, section in (("cprofile", "cumulative_us"), ("py_spy", "steps_us")):
            if kind not in run:
                continue
            print(f"\n{kind} {run['variant']}: {run['us_per_record']:.2f} us/record under it")
            for name, value in run[kind][section].items():
                print(f"  {name:<40} {value:8.2f}")
            top = run[kind]["top_own_us" if kind == "cprofile" else "top_lines_us"]
            print("  top:")
            for name, value in list(top.items())[:15]:
                print(f"    {value:8.2f}  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="where the worker's time goes (see the module docstring)")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--cprofile", action="store_true", help="also one run of each under cProfile")
    parser.add_argument("--py-spy", action="store_true", help="also one run of each sampled by py-spy")
    parser.add_argument(
        "--contend",
        type=int,
        default=0,
        help="run N busy-looping processes alongside the measured runs (what CPU contention does)",
    )
    parser.add_argument("--model", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--update-batch", type=int, default=1, help="records per update (1: strict)")
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="the worker with --no-overlap (the compiled loop on the poll loop's thread)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    shape = {"model": args.model, "update_batch": args.update_batch, "overlap": not args.no_overlap}
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    set_intra_op_threads(1)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "records": args.records,
        "reps": args.reps,
        "loadavg_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        **shape,
        "runs": [],
    }
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        broker_pid = broker._process.pid if broker._process is not None else None
        topic = f"profile-regression-d16-binary-{os.getpid()}"
        ensure_topic(AdminClient({"bootstrap.servers": bootstrap}), topic, 1)
        features, labels = dataset("regression", 16, args.records)
        seconds = produce(bootstrap, topic, encode(features, labels, "binary"), "binary")
        log(f"produced {args.records:,} records in {seconds:.1f}s")
        # Warm: imports, torch's optimizer machinery, the compiled loop (the worker's prepare: instant).
        kernels.prepare(args.model, "sgd")
        kernels.wait_until_ready(timeout_s=300)
        run_variant(
            bootstrap, topic, min(20_000, args.records), compaction=True, broker_pid=broker_pid, **shape
        )
        log("warmed up")
        hogs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
            for _ in range(args.contend)
        ]
        report["contend"] = args.contend
        try:
            plan: list[tuple[str, bool | None]] = [("raw", None), ("plain", False), ("plain", True)]
            for rep in range(args.reps):
                for mode, compaction in plan:
                    if mode == "raw":
                        result = run_raw(bootstrap, topic, args.records, broker_pid=broker_pid)
                    else:
                        assert compaction is not None
                        result = run_variant(
                            bootstrap,
                            topic,
                            args.records,
                            compaction=compaction,
                            broker_pid=broker_pid,
                            **shape,
                        )
                    report["runs"].append(result)
                    log(f"rep {rep + 1} {result['variant']}: {result['rate']:,.0f} records/s")
            for mode, wanted in (("cprofile", args.cprofile), ("py-spy", args.py_spy)):
                if not wanted:
                    continue
                for compaction in (False, True):
                    result = run_variant(
                        bootstrap,
                        topic,
                        args.records,
                        compaction=compaction,
                        broker_pid=broker_pid,
                        mode=mode,
                        **shape,
                    )
                    report["runs"].append(result)
                    log(f"{mode} {result['variant']}: {result['rate']:,.0f} records/s")
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    report["loadavg_end"] = os.getloadavg()
    _print_report(report)
    out = args.out or RESULTS_DIR / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
