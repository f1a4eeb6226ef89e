"""Crash recovery is deterministic with compaction on: kill -9 changes nothing in the final model.

A compaction's result depends on more than the checkpointed model: on the
records in the compaction store (its window), on the trigger's count since the
previous compaction and on the compaction's number (its shuffle seed). A
restarted worker refills the store from the log and restores the count and the
number from the checkpoint, so a run killed again and again ends with the very
model of a run that never stopped. One partition, the default MLP, a count
trigger small enough for several compactions, a few undecodable records (they
are dead-lettered, so they are in no window), compared with compaction on and
off.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from streamtrainer.producer.synthetic import SyntheticSpec, generate
from streamtrainer.records import encode_binary
from streamtrainer.training.checkpoint import CheckpointStore
from tests.processes import WorkerProcess, kill_survivors, latest_state, wait_until

pytestmark = pytest.mark.integration

N_RECORDS = 4_000
RATE = 400  # records a second: the stream outlasts the killed lives, so the kills land mid-stream
INVALID_EVERY = 499  # an undecodable record now and then: dead-lettered, never in a window
EVERY = 500  # records per compaction: seven of them


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    yield
    kill_survivors()


def _model(checkpoint_dir: Path) -> dict[str, np.ndarray]:
    checkpoint = CheckpointStore(checkpoint_dir).load_latest()
    assert checkpoint is not None
    return {name: t.numpy().copy() for name, t in checkpoint.tensors.items() if name.startswith("model.")}


def _produce_paced(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    started = time.monotonic()
    for i, value in enumerate(values):
        producer.produce(topic, value=value, partition=0)
        if i % 100 == 99:
            producer.poll(0)
            time.sleep(max(0.0, started + (i + 1) / RATE - time.monotonic()))
    assert producer.flush(30) == 0


def _applied(checkpoint_dir: Path) -> int:
    state = latest_state(checkpoint_dir) if checkpoint_dir.exists() else None
    return int(state[0]["records_applied"]) if state else 0  # type: ignore[call-overload]


@pytest.mark.parametrize("compaction", [True, False], ids=["compaction", "no-compaction"])
def test_a_run_killed_again_and_again_ends_with_the_uninterrupted_model(
    bootstrap: str, topic_factory: Callable[..., str], group_id: str, tmp_path: Path, compaction: bool
) -> None:
    topic = topic_factory(partitions=1)
    samples = generate(SyntheticSpec(task="regression", n_features=6, nonlinear=True, seed=7), N_RECORDS)
    values = [
        b"not a record" if i % INVALID_EVERY == INVALID_EVERY - 1 else encode_binary(sample)
        for i, sample in enumerate(samples)
    ]
    producer = threading.Thread(target=_produce_paced, args=(bootstrap, topic, values), daemon=True)
    producer.start()
    trainable = N_RECORDS - N_RECORDS // INVALID_EVERY
    options = [
        "--model",
        "mlp",
        "--task",
        "regression",
        "--compaction-epochs",
        "3",  # the linear models' count: fewer steps through autograd in each short life
        "--seed",
        "3",
        # Every step through autograd. With the compiled loop each life's first batches still go
        # through autograd while the loop loads (several seconds on a busy machine), and the two
        # agree only to float32 rounding: ~1e-6 of noise in the final MLP that has nothing to do
        # with what is tested here.
        "--no-fused",
        "--checkpoint-every-records",
        "300",
        "--checkpoint-interval-s",
        "0.3",
        # Small polls: many checkpoints (so many states to be killed in) in the few seconds a life lasts.
        "--poll-batch",
        "200",
        *(["--compaction-every-records", str(EVERY), "--compaction-window", "800"] if compaction else []),
        *([] if compaction else ["--no-compaction"]),
    ]

    def run(name: str, kills: int) -> tuple[dict[str, np.ndarray], int, dict[str, object]]:
        checkpoints = tmp_path / name
        log = tmp_path / f"{name}.log"
        worker = WorkerProcess(bootstrap, topic, f"{group_id}-{name}", checkpoints, log, *options)
        rng = random.Random(1234)
        lives = 0
        for _ in range(kills):
            before = _applied(checkpoints)
            if before >= trainable:
                break
            worker.start()
            lives += 1
            assert wait_until(lambda b=before: _applied(checkpoints) > b, timeout=60), log.read_text()[-3000:]
            time.sleep(rng.uniform(0.0, 1.0))
            worker.kill()
        worker.start()
        assert wait_until(worker.running_loop, timeout=60)
        assert wait_until(lambda: _applied(checkpoints) >= trainable, timeout=120), log.read_text()[-3000:]
        assert worker.terminate() == 0
        state = latest_state(checkpoints)
        assert state is not None and state[0]["records_applied"] == trainable
        return _model(checkpoints), lives, state[0]

    # The crashed run reads the stream while it is produced; the uninterrupted one reads it whole.
    crashed, lives, crashed_metadata = run("crashed", kills=3 if compaction else 2)
    producer.join(timeout=60)
    uninterrupted, _, clean_metadata = run("clean", kills=0)
    delta = max(float(np.abs(crashed[name] - uninterrupted[name]).max()) for name in uninterrupted)
    print(f"compaction={compaction}: {lives} kill -9, max |crashed - uninterrupted| = {delta}")
    assert lives >= 2
    assert crashed.keys() == uninterrupted.keys()
    assert delta <= 1e-6
    if compaction:
        # Several compactions, numbered on across the lives (the number seeds a compaction's shuffles).
        for metadata in (clean_metadata, crashed_metadata):
            assert metadata["compaction"]["total"] == trainable // EVERY  # type: ignore[index]
