"""What the benchmark measures, one function per way of training (or just reading) a stream.

Every function returns a :class:`Timing`: records and seconds of the steady
part of the run (startup such as a consumer-group join is reported apart, not
averaged in).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import torch
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from torch.nn import functional as F  # noqa: N812 - the conventional name

from streamtrainer.producer.synthetic import SyntheticSpec, generate_arrays
from streamtrainer.records import CODEC_HEADER, BatchDecoder, encode_binary_rows
from streamtrainer.records.codec import BINARY_CODEC, JSON_CODEC
from streamtrainer.settings import WorkerSettings
from streamtrainer.training.compaction import CompactionStore, train_epochs
from streamtrainer.training.learner import LearnerConfig, OnlineLearner, make_optimizer, prepare_training
from streamtrainer.training.models import build_model
from streamtrainer.training.scaler import RunningStandardizer

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

# model name -> (task, loss) of the benchmark; the MLP is d -> 64 -> 1 on the regression task.
MODELS: dict[str, tuple[str, str]] = {
    "linear": ("regression", "mse"),
    "logistic": ("binary", "bce"),
    "mlp": ("regression", "mse"),
}
HIDDEN = 64
# Records per poll, and per learn_many call, in the worker (its default): the raw ceiling polls the same.
WORKER_POLL: int = WorkerSettings.model_fields["poll_batch"].default


def lr_for(d: int) -> float:
    """Plain SGD (the worker's default optimizer) at its default 0.01, or 0.001 for wide inputs.

    Per-record SGD on d standardized features diverges once lr * d nears 2 (the
    linear model at d=128 does at 0.01, to NaN): a diverged model would make the
    worker refuse its checkpoints and measure something else.
    """
    return 0.01 if d <= 32 else 0.001


@dataclass
class Timing:
    records: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("nan")


# -- data -----------------------------------------------------------------------


def dataset(task: str, d: int, n: int, seed: int = 7) -> tuple[F32, F32]:
    return generate_arrays(SyntheticSpec(task=task, n_features=d, seed=seed, noise=0.1), n)


def encode(features: F32, labels: F32, codec: str) -> list[bytes]:
    """Record values in the wire format (the same bytes the producer command writes)."""
    if codec == BINARY_CODEC:
        return encode_binary_rows(features, labels)
    return [
        orjson.dumps({"features": row, "label": label})
        for row, label in zip(features.tolist(), labels.tolist(), strict=True)
    ]


def produce(bootstrap: str, topic: str, values: list[bytes], codec: str) -> float:
    """Publish ``values`` to partition 0 of ``topic``; returns the seconds it took."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "acks": 1,
        }
    )
    headers: list[tuple[str, str | bytes | None]] = [(CODEC_HEADER, codec.encode())]
    failed = 0

    def on_delivery(error: object, _message: object) -> None:
        nonlocal failed
        if error is not None:
            failed += 1

    started = time.perf_counter()
    for value in values:
        while True:
            try:
                producer.produce(topic, value=value, partition=0, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
    remaining = producer.flush(120)
    if remaining or failed:
        raise RuntimeError(f"producing to {topic}: {failed} failed, {remaining} undelivered")
    return time.perf_counter() - started


# -- 1. the naive loop ---------------------------------------------------------------


def naive_loop(model_name: str, values: list[bytes]) -> Timing:
    """What a PyTorch user writes first: json.loads, standardize, one autograd step, per record."""
    _task, loss_name = MODELS[model_name]
    first = json.loads(values[0])
    d = len(first["features"])
    model = build_model(model_name, n_features=d, n_outputs=1, hidden=HIDDEN)
    optimizer = make_optimizer("sgd", model.parameters(), lr_for(d))
    scaler = RunningStandardizer(d)
    loss_fn = F.mse_loss if loss_name == "mse" else F.binary_cross_entropy_with_logits
    started = time.perf_counter()
    for value in values:
        document = json.loads(value)
        row = np.asarray(document["features"], dtype=np.float32).reshape(1, d)
        x = torch.from_numpy(scaler.learn_transform(row))
        y = torch.tensor([float(document["label"])])
        loss = loss_fn(model(x).reshape(-1), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Timing(len(values), time.perf_counter() - started)


# -- 2. River --------------------------------------------------------------------


def river_available() -> bool:
    try:
        import river  # noqa: F401
    except ImportError:
        return False
    return True


def river_loop(model_name: str, features: F32, labels: F32) -> Timing:
    """River's test-then-train (predict_one, learn_one) with its StandardScaler, on ready dicts."""
    from river import linear_model, optim, preprocessing

    rows = [dict(enumerate(row)) for row in features.tolist()]
    targets = labels.tolist()
    lr = lr_for(features.shape[1])
    if model_name == "linear":
        estimator: Any = linear_model.LinearRegression(optimizer=optim.SGD(lr), intercept_lr=lr)
        predict = "predict_one"
    else:
        estimator = linear_model.LogisticRegression(optimizer=optim.SGD(lr), intercept_lr=lr)
        predict = "predict_proba_one"
    pipeline = preprocessing.StandardScaler() | estimator
    predict_one = getattr(pipeline, predict)
    learn_one = pipeline.learn_one
    started = time.perf_counter()
    for row, target in zip(rows, targets, strict=True):
        predict_one(row)
        learn_one(row, target if model_name == "linear" else bool(target))
    return Timing(len(rows), time.perf_counter() - started)


# -- the learner alone, in memory (fused kernels) ------------------------------------------


def learner_loop(
    model_name: str, features: F32, labels: F32, *, batch_size: int = 1, chunk: int | None = None
) -> Timing:
    """``OnlineLearner.learn_many`` on in-memory arrays, ``chunk`` records per call as the worker's polls.

    The learner's own path: the fused kernels once compiled (waited for here, as the
    worker's ``prepare_training`` would have them ready by its first batch).
    """
    task, _loss = MODELS[model_name]
    d = features.shape[1]
    config = LearnerConfig(model=model_name, task=task, optimizer="sgd", lr=lr_for(d), hidden=HIDDEN)
    learner = OnlineLearner(config, d)
    if not learner.settle_path(timeout_s=300, batch_size=batch_size):
        raise RuntimeError(f"the fused loop for {model_name} did not get ready")
    chunk = chunk or WORKER_POLL
    started = time.perf_counter()
    for start in range(0, features.shape[0], chunk):
        learner.learn_many(
            features[start : start + chunk], labels[start : start + chunk], batch_size=batch_size
        )
    return Timing(features.shape[0], time.perf_counter() - started)


# -- 6. compaction epochs vs a plain mini-batch loop ------------------------------------------


def plain_epochs_loop(
    model_name: str, features: F32, labels: F32, *, epochs: int, batch_size: int, seed: int
) -> Timing:
    """A straightforward in-memory mini-batch loop through autograd (what compaction epochs compare to).

    The features are standardized beforehand (untimed) and held as tensors; each
    epoch is a seeded shuffle, then ``model``, loss, ``zero_grad``, ``backward``,
    ``step`` per mini-batch. Records = rows x epochs.
    """
    _task, loss = MODELS[model_name]
    n, d = features.shape
    model = build_model(model_name, n_features=d, n_outputs=1, hidden=HIDDEN)
    optimizer = make_optimizer("sgd", model.parameters(), lr_for(d))
    x = torch.from_numpy(RunningStandardizer(d).learn_transform(features))
    y = torch.from_numpy(np.ascontiguousarray(labels))
    loss_fn = F.mse_loss if loss == "mse" else F.binary_cross_entropy_with_logits
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        x_epoch, y_epoch = x[order], y[order]
        for start in range(0, n, batch_size):
            out = model(x_epoch[start : start + batch_size]).reshape(-1)
            value = loss_fn(out, y_epoch[start : start + batch_size])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    return Timing(n * epochs, time.perf_counter() - started)


def compaction_epochs(
    model_name: str,
    features: F32,
    labels: F32,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    directory: Path,
    memory_records: int,
    retain_records: int | None = 1_000_000,
    chunk: int = 2000,
) -> Timing:
    """One compaction as the worker runs it: ``store.window(last=W)`` then ``train_epochs``.

    Untimed set-up: a learner (the worker's config: SGD, the bench's lr) with the
    compiled loop ready and the scaler's statistics of the records (as after
    online learning), and a :class:`CompactionStore` fed ``chunk`` records per
    append (the worker's poll size) until all W are in it, ``memory_records`` per
    shard: most of the window is spilled to memory-mapped shards on disk, the
    rest in memory. Timed: building the window (reading the shards back, copying
    into one block) and the epochs (standardize, seeded shuffles, mini-batch
    steps through ``learner.fit_rows``). Records = W x epochs.
    """
    task, _loss = MODELS[model_name]
    n, d = features.shape
    config = LearnerConfig(model=model_name, task=task, optimizer="sgd", lr=lr_for(d), hidden=HIDDEN)
    learner = OnlineLearner(config, d)
    if not learner.settle_path(timeout_s=300, batch_size=batch_size):
        raise RuntimeError(f"the fused loop for {model_name} did not get ready")
    if learner.scaler is not None:
        learner.scaler.learn_transform(features)
    with CompactionStore(directory, memory_records=memory_records, retain_records=retain_records) as store:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            store.append(
                features[start:stop],
                labels[start:stop],
                np.zeros(stop - start, np.int32),
                np.arange(start, stop, dtype=np.int64),
                [None] * (stop - start),  # the bench's records have no key, like the worker's here
                np.full(stop - start, 1_700_000_000_000, np.int64),
            )
        on_disk, in_memory, shards = store.records_on_disk, store.records_in_memory, len(store.shards)
        started = time.perf_counter()
        data = store.window(last=n)
        windowed = time.perf_counter()
        report = train_epochs(learner, data, epochs=epochs, batch_size=batch_size, seed=seed)
        ended = time.perf_counter()
    if data.count != n or report.records != n * epochs:
        raise RuntimeError(f"compaction trained {report.records} of {n} x {epochs} records")
    return Timing(
        n * epochs,
        ended - started,
        {
            "window_s": windowed - started,
            "epochs_s": ended - windowed,
            "records_on_disk": on_disk,
            "records_in_memory": in_memory,
            "shards": shards,
            "fused": learner._fused_ready(n, data.labels),  # which path fit_rows took
            "epoch_losses": report.epoch_losses,
        },
    )


# -- 7. replay: read a range into a compaction store ---------------------------------------------


def replay_read(bootstrap: str, topic: str, n: int, *, directory: Path, model: str = "linear") -> Timing:
    """The replay command's reading half on ``[0, n)`` of partition 0, no training.

    ``RangeReader.read`` (direct assignment, per-record content hash) feeding the
    replay's ``_Collector`` (``BatchDecoder``, label check, ``CompactionStore.append``
    spilling to shards under ``directory``), exactly as ``run_replay`` wires them.
    Timed: ``read`` (assignment to the last record); ``window_s`` in the extras is
    what run_replay does next before training: ``store.window()`` and the
    canonical (partition, offset) order. Reader set-up (metadata, watermarks) is
    reported apart (``setup_s``).
    """
    from streamtrainer.consumer.ranges import parse_bound
    from streamtrainer.consumer.replay import RangeReader, _Collector
    from streamtrainer.settings import ReplaySettings

    task, _loss = MODELS[model]
    settings = ReplaySettings.model_validate(
        {
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "from_": "0:0",
            "to": f"0:{n}",
            "out": directory,
            "model": model,
            "task": task,
            "progress": False,
        }
    )

    def make_learner(n_features: int) -> OnlineLearner:
        config = LearnerConfig(model=model, task=task, optimizer="sgd", lr=lr_for(n_features), hidden=HIDDEN)
        return OnlineLearner(config, n_features)

    began = time.perf_counter()
    prepare_training(model, "sgd")  # as run_replay does, before it resolves the range
    store_dir = directory / "shards"
    with (
        CompactionStore(store_dir, memory_records=settings.memory_records, retain_records=None) as store,
        RangeReader(settings, topic) as reader,
    ):
        ranges = reader.resolve(parse_bound(settings.from_, "from"), parse_bound(settings.to, "to"))
        collector = _Collector(store, BatchDecoder(), topic, make_learner, None)
        started = time.perf_counter()
        read = reader.read(ranges, collector)
        ended = time.perf_counter()
        on_disk, shards = store.records_on_disk, len(store.shards)
        data = store.window()
        data = data.subset(np.lexsort((data.offsets, data.partitions)))
        windowed = time.perf_counter()
    records = sum(read.records.values())
    if records != n or collector.valid != n:
        raise RuntimeError(f"replay read {records} records ({collector.valid} valid) of {n} from {topic}")
    return Timing(
        records,
        ended - started,
        {
            "setup_s": started - began,
            "window_s": windowed - ended,
            "read_and_window_rate": records / (windowed - started),
            "records_on_disk": on_disk,
            "shards": shards,
        },
    )


# -- 5. raw consume + decode: the ceiling ----------------------------------------------------


def raw_consume(
    bootstrap: str,
    topic: str,
    n: int,
    poll_batch: int | None = None,
    *,
    read_headers: bool = False,
    from_assignment: bool = False,
) -> Timing:
    """Read and decode ``n`` records of partition 0, no training, no group (assigned directly).

    The same librdkafka settings and poll size as the worker (``poll_batch``: its
    default) and the same per-message work the worker cannot avoid (error check,
    value), then one BatchDecoder call per polled batch (values name their codec).
    ``read_headers=True`` also reads each record's codec header, as the worker did
    before values named their codec:
    ``Message.headers()`` converts librdkafka's headers to Python on first access,
    ~1.7 us per record, as much as polling itself. ``from_assignment``: time everything from ``assign`` to
    the n-th record (the first fetch included), as the replay's read is timed.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-raw",  # required by librdkafka; nothing is committed
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.queue.backoff.ms": 5,
            "queued.min.messages": 200000,
        }
    )
    decoder = BatchDecoder()
    poll = poll_batch or WORKER_POLL
    done = 0
    first_batch_done = 0
    started = time.perf_counter() if from_assignment else math.nan
    consumer.assign([TopicPartition(topic, 0, 0)])
    try:
        while done < n:
            messages = consumer.consume(num_messages=min(poll, n - done), timeout=1.0)
            # The worker's way: list comprehensions over the batch, not a loop body per record.
            if any([message.error() is not None for message in messages]):
                messages = [message for message in messages if message.error() is None]
            values: list[bytes | None] = [message.value() for message in messages]
            codecs: list[str | None] = [_codec_of(message) for message in messages] if read_headers else []
            if not values:
                continue
            batch = decoder.decode(values, codecs if read_headers else None)
            done += len(values)
            if batch.errors:
                raise RuntimeError(f"{len(batch.errors)} records of {topic} did not decode")
            if math.isnan(started):
                # Steady state from the end of the first batch, as for the worker.
                started = time.perf_counter()
                first_batch_done = done
        elapsed = time.perf_counter() - started
    finally:
        consumer.close()
    return Timing(done - first_batch_done, elapsed)


def _codec_of(message: Message) -> str:
    headers = message.headers()
    if isinstance(headers, list):
        for name, value in headers:
            if name == CODEC_HEADER and isinstance(value, bytes):
                return value.decode()
    return JSON_CODEC
