"""Averaging rounds of a ``--distributed`` worker: when they come, what each carries, how runs end.

The ranks are the processes of one torchrun launch (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
from its environment), joined in a gloo process group whose timeout is --collective-timeout-s.

**Cadence.** Every rank must enter the same rounds in the same order, and none may wait for a
rank that has nothing to do, so a round is not triggered by a rank's own records. Each round
ends with every rank knowing the same figures (they are all-reduced): the round's agreed time
(the mean of the ranks' clocks as they entered) and the records the group trained since the last
round. From those every rank computes the same next round time: the agreed time plus
``--average-every-records`` / (the group's last rate), at most ``--average-interval-s``. A rank
with no data just waits for that time; a busy rank takes no more records per poll than it can
train before then (at its last update's speed), so the ranks arrive within a few ms of each
other. A rank that does not come (hung, stopped, killed) makes the others' round raise after
--collective-timeout-s: the worker exits with an error and torchrun restarts the group, which
resumes from the last checkpoint.

**A round** (``run``) is two all-reduces: a header of a few floats per partition (the agreed time,
records trained and read, whether each rank wants to stop, which ranks have a model and of how
many features, and every partition's position and applied count, each contributed by the rank
that owns it), then the model itself (training/averaging.py). A rank without a model yet (no
record seen) creates one of the agreed number of features before the second; when no rank has a
model the second is skipped (every rank knows it from the header).

**Checkpoints** are taken by rank 0 only, right after a round (its model is then the group's and
the header gave it every partition's position): it holds the averaged model, optimizer and
scaler, and the next offset of every partition. A checkpoint between rounds would hold rank 0's
model alone. On start rank 0 reads the newest checkpoint and broadcasts it (safetensors bytes and
JSON metadata: no pickle), so every rank starts from the same model and positions.

**Ending.** A rank that has finished on its own (--max-records, --stop-at-end, --max-seconds)
keeps coming to the rounds, with no records, until every rank has; a signal to any rank (torchrun
forwards SIGTERM to all) ends every rank at the next round. The last round's model is then
checkpointed by rank 0 and its positions committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import orjson
import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

# (torch.distributed re-exports these without declaring them: mypy sees them here only)
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from streamtrainer.consumer.durability import Durability
from streamtrainer.consumer.exceptions import CollectiveError
from streamtrainer.consumer.model_state import ModelState, new_decoder
from streamtrainer.consumer.rank_membership import RankMembership
from streamtrainer.exceptions import ConfigurationError
from streamtrainer.metrics import WorkerMetrics
from streamtrainer.settings import WorkerSettings
from streamtrainer.training import OnlineLearner
from streamtrainer.training.averaging import ModelAverager, RunningStatistics
from streamtrainer.training.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

# The first round comes this soon after the start round (no group rate known yet); an interval
# at most doubles from one round to the next (a first round slowed by start-up, e.g. the compiled
# loop still compiling, would otherwise put the next one --average-interval-s away: measured, 2
# rounds in a 7 s run of 300,000 records); and no two rounds closer than _MIN_INTERVAL_S: under
# that the ranks' arrival spread (a few ms) dominates.
_FIRST_INTERVAL_S = 0.25
_MIN_INTERVAL_S = 0.05
# How long an idle rank (or a finished one) sleeps at most between looks at the clock.
_IDLE_POLL_S = 0.2

# Header slots before the per-partition ones.
_TIME, _TRAINED, _READ, _DONE, _STOP, _HAS_MODEL, _N_FEATURES = range(7)
_HEADER = 7


@contextlib.contextmanager
def collective(what: str, rank: int, timeout_s: float) -> Iterator[None]:
    """A failed collective (gloo's timeout, a rank gone) as one line and exit 1: torchrun restarts."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistBackendError is a RuntimeError
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CollectiveError(
            f"rank {rank}: {what} failed: another rank did not come within --collective-timeout-s "
            f"{timeout_s:g} s, or left ({first[:300]}); exiting so that torchrun restarts the group "
            "from the last checkpoint"
        ) from None


def _launch_store(rank: int, world_size: int, timeout: timedelta) -> Store:
    """torchrun's store, under a prefix of its own for each restart of the ranks.

    torchrun restarts the ranks on the same store (its agent's), where the last life's ranks left
    their gloo addresses under the same keys: a new rank could read a dead one's and wait in
    ``connectFullMesh`` past any timeout (seen: over a minute, with a 30 s timeout, after a
    ``kill -9``). The restart count makes each life's keys its own.

    On several nodes (torchrun agents) the restart counts differ: an agent counts the failures of
    its own ranks only, and restarts for another node's failure without counting it, so one life's
    ranks would join under different keys and wait for each other until the collective timeout,
    life after life. Launched with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (docker-compose.yml
    does), torchrun gives each life a fresh port on rank 0's host and rank 0 hosts the store
    itself: a store of that life alone, with no stale keys, so no restart count is needed.
    """
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = TCPStore(
        host, port, world_size=world_size, is_master=not agent_store and rank == 0, timeout=timeout
    )
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if agent_store and local_world < world_size and rank == 0:
        logger.warning(
            "the %d ranks run under several torchrun agents on the agents' shared store: after a rank "
            "fails their restart counts differ and no later life can join (each fails after "
            "--collective-timeout-s); launch the agents with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "(docs/semantics.md, several nodes)",
            world_size,
        )
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if agent_store else "own-store"
    return PrefixStore(f"streamtrainer/{run}/{restart}/{world_size}/", store)


def launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a usage error without it."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ConfigurationError(
            "--distributed runs under torchrun (RANK and WORLD_SIZE unset): "
            "torchrun --nproc-per-node=N -m streamtrainer worker --distributed ..."
        ) from None
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


class Rounds:
    """A rank's side of the averaging rounds (see the module's docstring)."""

    def __init__(
        self,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        state: ModelState,
        *,
        rank: int,
        world_size: int,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = state
        self.rank = rank
        self.world_size = world_size
        self.ended = False
        self.count = 0
        self.next_at = float("inf")  # wall-clock time of the next round
        self._averager: ModelAverager | None = None
        self._learner: OnlineLearner | None = None
        self._last_time = 0.0
        self._interval = _FIRST_INTERVAL_S
        self._trained_at_last = 0
        self._read_at_last = 0
        # Seconds in rounds (the all-reduces and the wait for the other ranks), and since the start round.
        self.seconds = 0.0
        self._began = 0.0
        metrics.world_size.labels(str(rank)).set(world_size)
        # Exported at 0 from the start, not from the first round: a life of the ranks that never
        # finishes one is then seen by StreamtrainerAveragingRoundsStopped (deploy/prometheus).
        metrics.averaging_rounds.labels(str(rank))
        metrics.averaging_duration.labels(str(rank))

    # -- the process group and the start -----------------------------------------------

    def connect(self) -> None:
        """Join the process group (waits for every rank, at most --collective-timeout-s)."""
        if not dist.is_initialized():
            timeout = timedelta(seconds=self.settings.collective_timeout_s)
            with self._collective("joining the process group"):
                dist.init_process_group(
                    "gloo",
                    store=_launch_store(self.rank, self.world_size, timeout),
                    rank=self.rank,
                    world_size=self.world_size,
                    timeout=timeout,
                )
        pid = os.getpid()
        logger.info("rank %d of %d (pid %d) joined the process group", self.rank, self.world_size, pid)

    def _collective(self, what: str) -> contextlib.AbstractContextManager[None]:
        return collective(what, self.rank, self.settings.collective_timeout_s)

    def close(self) -> None:
        """Leave the process group (after a summary line: rounds, and their share of the run)."""
        if self.count:
            elapsed = time.perf_counter() - self._began
            logger.info(
                "rank %d: %d averaging round(s), %.2f ms each on average, %.2f%% of the %.1f s since "
                "the start",
                self.rank,
                self.count,
                1e3 * self.seconds / self.count,
                100 * self.seconds / elapsed if elapsed > 0 else 0.0,
                elapsed,
            )
        if dist.is_initialized():
            dist.destroy_process_group()

    def share_checkpoint(self, load: Callable[[], Checkpoint | None]) -> Checkpoint | None:
        """Rank 0 loads the checkpoint to start from (``load``) and every rank gets it."""
        payload = b""
        version = 0
        if self.rank == 0:
            checkpoint = load()
            if checkpoint is not None:
                version = checkpoint.version
                tensors = {name: t.contiguous() for name, t in checkpoint.tensors.items()}
                data = save_tensors(tensors)
                meta = orjson.dumps({"metadata": checkpoint.metadata, "path": str(checkpoint.path)})
                payload = len(data).to_bytes(8, "little") + data + meta
        size = torch.tensor([len(payload), version], dtype=torch.int64)
        with self._collective("sharing the checkpoint to start from"):
            dist.broadcast(size, src=0)
        if int(size[0]) == 0:
            return None
        buffer = torch.zeros(int(size[0]), dtype=torch.uint8)
        if self.rank == 0:
            buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        with self._collective("sharing the checkpoint to start from"):
            dist.broadcast(buffer, src=0)
        raw = buffer.numpy().tobytes()
        length = int.from_bytes(raw[:8], "little")
        tensors = load_tensors(raw[8 : 8 + length])
        meta = orjson.loads(raw[8 + length :])
        return Checkpoint(int(size[1]), dict(tensors), meta["metadata"], Path(meta["path"]))

    def adopt(self, learner: OnlineLearner) -> None:
        """The model the rounds average from now on (a new learner, or one a restore filled)."""
        statistics: list[RunningStatistics] = [
            s for s in (learner.scaler, learner.target_scaler) if s is not None
        ]
        self._averager = ModelAverager(
            learner.model,
            learner.optimizer,
            statistics=statistics,
            reduction=self.settings.average_reduction,
        )
        self._learner = learner

    def begin(self, trained: int, read: int) -> None:
        """The start round: every rank is up and the clocks agree on when the first round comes."""
        self._trained_at_last, self._read_at_last = trained, read
        self._began = time.perf_counter()
        header = torch.tensor([time.time()], dtype=torch.float64)
        with self._collective("the start round"):
            dist.all_reduce(header)
        self._last_time = float(header[0]) / self.world_size
        self._interval = min(_FIRST_INTERVAL_S, self.settings.average_interval_s)
        self.next_at = self._last_time + self._interval

    # -- pacing ---------------------------------------------------------------------------

    def due(self) -> bool:
        """The next round's time has come."""
        return time.time() >= self.next_at

    def poll_limits(self, budget: int, seconds_per_record: float | None) -> tuple[int, float]:
        """(records, seconds) a poll may take so that the rank reaches the next round on time."""
        left = self.next_at - time.time()
        if left <= 0:
            return 0, 0.0
        if seconds_per_record is not None and seconds_per_record > 0:
            budget = min(budget, max(1, int(left / seconds_per_record)))
        return budget, min(_IDLE_POLL_S, left)

    def wait(self, stop: Callable[[], bool]) -> None:
        """A finished rank: until the next round's time (or a signal)."""
        while not self.due() and not stop():
            time.sleep(max(0.0, min(_IDLE_POLL_S, self.next_at - time.time())))

    # -- a round --------------------------------------------------------------------------

    def run(
        self,
        *,
        membership: RankMembership,
        durability: Durability,
        trained: int,
        read: int,
        done: bool,
        stop: bool,
        create_learner: Callable[[int], OnlineLearner],
    ) -> None:
        """One round (every rank calls it in turn): averages the model and shares the positions.

        ``trained``/``read``: this rank's records trained/read in this run so far; ``done``: it has
        finished on its own; ``stop``: it was asked to stop.
        """
        started = time.perf_counter()
        settings, state = self.settings, self.state
        topic, partitions = settings.topic, membership.partitions
        learner = state.learner
        header = np.zeros(_HEADER + 2 * partitions)
        header[_TIME] = time.time()
        header[_TRAINED] = trained - self._trained_at_last
        header[_READ] = read - self._read_at_last
        header[_DONE] = float(done)
        header[_STOP] = float(stop)
        if learner is not None:
            header[_HAS_MODEL] = 1.0
            header[_N_FEATURES] = learner.n_features
        for _, partition in membership.assigned:
            position = state.offsets.next_offset(topic, partition)
            if position is not None:
                header[_HEADER + partition] = position + 1  # 0: not known
            header[_HEADER + partitions + partition] = durability.applied.get((topic, partition), 0)
        reduced = torch.from_numpy(header.copy())  # (all_reduce writes into it; header stays ours)
        with self._collective(f"averaging round {self.count + 1}"):
            dist.all_reduce(reduced)
        group = reduced.numpy()
        weight = float(header[_TRAINED])
        self._trained_at_last, self._read_at_last = trained, read
        models = round(group[_HAS_MODEL])
        if models:
            if learner is None:
                n_features = round(group[_N_FEATURES] / models)
                if n_features * models != round(group[_N_FEATURES]):
                    raise ConfigurationError("the ranks' models disagree on the number of features")
                if state.decoder.n_features is None:
                    state.decoder = new_decoder(settings, n_features, settings.feature_names)
                learner = state.learner = create_learner(n_features)
            if self._averager is None or self._learner is not learner:
                self.adopt(learner)
            assert self._averager is not None
            with self._collective(f"averaging round {self.count + 1}"):
                result = self._averager.average(weight)
            self.metrics.parameter_distance.labels(str(self.rank)).set(result.distance)
        # Every partition's position and applied count, as its owner has them.
        owned = {partition for _, partition in membership.assigned}
        for partition in range(partitions):
            if partition in owned:
                continue
            position = round(group[_HEADER + partition])
            if position > 0:
                state.offsets.done(topic, partition, position - 2)
            applied = round(group[_HEADER + partitions + partition])
            if applied > 0:
                durability.applied[(topic, partition)] = applied
        group_read = round(group[_READ])
        if group_read > 0:
            # The group's model moved: rank 0's next checkpoint (on its usual cadence) holds it.
            durability.dirty = True
            durability.since_checkpoint += group_read - round(header[_READ])
        agreed = float(group[_TIME]) / self.world_size
        elapsed = agreed - self._last_time
        rate = group[_TRAINED] / elapsed if elapsed > 0 else 0.0
        interval = min(settings.average_interval_s, 2 * self._interval)
        if rate > 0:
            interval = min(interval, max(_MIN_INTERVAL_S, settings.average_every_records / rate))
        self._interval = interval
        self._last_time, self.next_at = agreed, agreed + interval
        self.ended = round(group[_DONE]) == self.world_size or group[_STOP] > 0
        self.count += 1
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.metrics.averaging_rounds.labels(str(self.rank)).inc()
        self.metrics.averaging_duration.labels(str(self.rank)).observe(seconds)
        logger.debug(
            "round %d: %d records of the group (%d here), %.2f ms, next in %.3f s%s",
            self.count,
            round(group[_TRAINED]),
            round(weight),
            seconds * 1e3,
            interval,
            " (the group ends)" if self.ended else "",
        )
