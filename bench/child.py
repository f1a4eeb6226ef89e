"""One worker run in a fresh process: time to the first trained record, and resident memory.

``python -m bench.child --bootstrap HOST:PORT --topic T --model linear --records N``
prints one JSON object. A fresh process is the only honest way to measure a
cold start (nothing imported, nothing compiled) and memory growth (no other
benchmark's garbage in the heap). The parent points ``NUMBA_CACHE_DIR`` at an
empty directory for a cold compile.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from bench.worker_runs import RssSampler, TimedWorker, read_rss_mb, worker_settings
from streamtrainer.training import kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True, help="a d=16 topic")
    parser.add_argument("--model", default="linear")
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--warm-up-records", type=int, default=0, help="RSS growth is measured from here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    worker = TimedWorker(worker_settings(args.bootstrap, args.topic, args.model, args.records, d=16))
    rss_start = read_rss_mb()
    with RssSampler(worker) as sampler:
        worker.run()
    timing = worker.timing()
    every = max(1, len(sampler.samples) // 60)
    result = {
        "records_trained": worker.records_trained,
        "steady_rate": timing.rate,
        **timing.extra,
        "compile_state": kernels.compile_state(),
        "rss_start_mb": rss_start,
        "rss_warm_mb": sampler.rss_at(args.warm_up_records),
        "rss_end_mb": sampler.rss_at(args.records),
        "rss_max_mb": max((s[2] for s in sampler.samples), default=float("nan")),
        "rss_samples": [[round(t, 2), n, round(rss, 1)] for t, n, rss in sampler.samples[::every]],
        "at": time.time(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
