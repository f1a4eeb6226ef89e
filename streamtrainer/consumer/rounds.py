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

**Warm-up.** A new model (no checkpoint to start from) is averaged after every step of each rank
(one record, or one --update-batch) until the group has trained --average-warmup-records: the
group learns its first records as one process taking mini-batches of N steps would, instead of
every rank paying the cold start of a fresh model on its own (+10.6% whole-stream prequential
loss on a 1.5M-record stationary stream at 2 ranks without it, +1.4% with 2,000: bench/README).
These rounds are paced by records, not the clock: each rank polls at most one step's records
and comes to the next round; a rank with none comes at once (at most _IDLE_POLL_S when the whole
group had none). About 1,000 rounds of ~2 ms at 2 ranks: ~2 s once per model.

**A round** (``run``) is one all-reduce of a header of a few floats per partition (the agreed time,
records trained and read, whether each rank wants to stop, which ranks have a model and of how
many features, and every partition's position and applied count, each contributed by the rank
that owns it) together with the model itself (training/averaging.py), once every rank has a model.
Before that it is two: the header first, then, when some rank has a model, the model; a rank
without one yet (no record seen) creates one of the agreed number of features before the second.
(Two collectives a round cost ~6 ms at 2 busy ranks here, the warm-up's ~1,000 rounds 6 s.)

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
import numpy.typing as npt
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


def _agent_store() -> bool:
    """torchrun gives the ranks its agent's store (its default; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: not)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def _launch_store(rank: int, world_size: int, timeout: timedelta) -> Store:
    """The store the ranks join the process group on, under keys that are this life's alone.

    A life is one start of the ranks by torchrun (the first, or a restart). Two cases, as torchrun
    (checked with torch 2.13) hands the store to the ranks:

    * **The agent's store** (torchrun's default; one node): one store for the whole launch, on
      which torchrun restarts the ranks. The last life's ranks left their gloo addresses under the
      same keys: a new rank could read a dead one's and wait in ``connectFullMesh`` past any
      timeout (seen: over a minute, with a 30 s timeout, after a ``kill -9``). The agent's restart
      count (TORCHELASTIC_RESTART_COUNT) makes each life's keys its own. It is the agent's own
      count, so this holds on one node only: ``launch_environment`` refuses several.
    * **A store of the life's own** (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's
      environment: what several nodes need, ``--nnodes=MIN:MAX``): the rank-0 agent picks a new
      port (MASTER_PORT) at every rendezvous round and rank 0 hosts a new store there, so no key
      of an earlier life is in it. The restart count must stay out of the keys: the agents' counts
      differ after a membership change (a new agent counts from 0, and a restart for a node that
      joins counts on no agent: measured, counts 1 and 0 in the same life), and ranks that join
      under different keys wait for each other until the timeout, life after life.
    """
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    agent_store = _agent_store()
    store = TCPStore(
        host, port, world_size=world_size, is_master=not agent_store and rank == 0, timeout=timeout
    )
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    life = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if agent_store else "own"
    return PrefixStore(f"streamtrainer/{run}/{life}/{world_size}/", store)


def launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a usage error without it.

    Also a usage error: ranks on several nodes (torchrun agents) sharing the agent's store, whose
    lives cannot be told apart (``_launch_store``); and, under torch 2.13, a node that joins such a
    launch waits in the rendezvous itself for the store's address, which the running rank-0 agent
    never writes for the new round (measured: both agents stuck until the store's read timeout).
    """
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ConfigurationError(
            "--distributed runs under torchrun (RANK and WORLD_SIZE unset): "
            "torchrun --nproc-per-node=N -m streamtrainer worker --distributed ..."
        ) from None
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if nodes > 1 and _agent_store():
        raise ConfigurationError(
            f"--distributed on {nodes} nodes (torchrun agents) needs a store of each life's own: set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment on every node, with "
            "--rdzv-backend=c10d (the static rendezvous always shares its store; with a shared store "
            "the agents' restart counts, which key each life of the ranks, differ after a restart)"
        )
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
        # Group records still to train in the warm-up (0: rounds are paced by the clock), and
        # whether the group trained anything in the last round (a warm-up poll waits only then).
        self.warmup_left = 0
        self._group_busy = False
        # Every rank had a model at the last round (they keep it): the header then rides in the
        # model's all-reduce, one collective a round instead of two (see ``run``).
        self._every_rank_has_model = False
        self._n_features = 0
        # Seconds in rounds (the all-reduces and the wait for the other ranks), and since the start round.
        self.seconds = 0.0
        self._began = 0.0
        # The warm-up's rounds, its seconds in them, and when it ended (perf_counter; 0: not yet).
        self.warmup_rounds = 0
        self.warmup_seconds = 0.0
        self._warmup_ended = 0.0
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
            # The clock's rounds and their share of the time since the warm-up (if any) ended; the
            # warm-up's apart: a cost once per model, not a share of every run.
            # (A run that ends in the warm-up, e.g. stopped early: the warm-up lasted until now.)
            now = time.perf_counter()
            since = self._warmup_ended or (now if self.warmup_rounds else self._began)
            elapsed = now - since
            count, seconds = self.count - self.warmup_rounds, self.seconds - self.warmup_seconds
            warmup = ""
            if self.warmup_rounds:
                warmup = (
                    f"; warm-up: {self.warmup_rounds} round(s) in {since - self._began:.1f} s, "
                    f"{1e3 * self.warmup_seconds / self.warmup_rounds:.2f} ms each"
                    f"{'' if self._warmup_ended else ' (unfinished)'}"
                )
            logger.info(
                "rank %d: %d averaging round(s), %.2f ms each on average, %.2f%% of the %.1f s since "
                "the %s%s",
                self.rank,
                count,
                1e3 * seconds / count if count else 0.0,
                100 * seconds / elapsed if elapsed > 0 else 0.0,
                elapsed,
                "warm-up" if self.warmup_rounds else "start",
                warmup,
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
            # A new model: warm up (every rank knows, from the same broadcast); one rank has no one
            # to average with (measured: 2,000 rounds, 23% of a 1.5M-record run, for nothing).
            if self.world_size > 1:
                self.warmup_left = self.settings.average_warmup_records
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
        """The next round's time has come (in the warm-up: after every step)."""
        return self.warmup_left > 0 or time.time() >= self.next_at

    def poll_limits(self, budget: int, seconds_per_record: float | None) -> tuple[int, float]:
        """(records, seconds) a poll may take so that the rank reaches the next round on time."""
        if self.warmup_left > 0:
            return min(budget, self.settings.update_batch), 0.0 if self._group_busy else _IDLE_POLL_S
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

    def _average(
        self, learner: OnlineLearner, weight: float, header: npt.NDArray[np.float64] | None
    ) -> npt.NDArray[np.float64]:
        """The model's all-reduce (with ``header`` summed alongside, if given): the summed header."""
        if self._averager is None or self._learner is not learner:
            self.adopt(learner)
        assert self._averager is not None
        with self._collective(f"averaging round {self.count + 1}"):
            result = self._averager.average(weight, sums=header)
        self.metrics.parameter_distance.labels(str(self.rank)).set(result.distance)
        return result.sums

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
        weight = float(header[_TRAINED])
        self._trained_at_last, self._read_at_last = trained, read
        if self._every_rank_has_model:
            # One all-reduce: the header as the averager's summed extra (every rank takes this path:
            # they all saw the same header last round, and a model, once made, stays).
            if learner is None:
                if state.decoder.n_features is None:
                    state.decoder = new_decoder(settings, self._n_features, settings.feature_names)
                learner = state.learner = create_learner(self._n_features)
            group = self._average(learner, weight, header)
        else:
            reduced = torch.from_numpy(header.copy())  # (all_reduce writes into it; header stays ours)
            with self._collective(f"averaging round {self.count + 1}"):
                dist.all_reduce(reduced)
            group = reduced.numpy()
            models = round(group[_HAS_MODEL])
            if models:
                if learner is None:
                    n_features = round(group[_N_FEATURES] / models)
                    if n_features * models != round(group[_N_FEATURES]):
                        raise ConfigurationError("the ranks' models disagree on the number of features")
                    if state.decoder.n_features is None:
                        state.decoder = new_decoder(settings, n_features, settings.feature_names)
                    learner = state.learner = create_learner(n_features)
                self._average(learner, weight, None)
            if models == self.world_size:
                self._every_rank_has_model = True
                self._n_features = round(group[_N_FEATURES] / models)
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
        warming = self.warmup_left > 0
        if warming:
            self.warmup_left = max(0, self.warmup_left - round(group[_TRAINED]))
            self._group_busy = group[_TRAINED] > 0
            interval = self._interval  # the clock's cadence starts where the warm-up ends
        self._interval = interval
        self._last_time, self.next_at = agreed, agreed + interval
        self.ended = round(group[_DONE]) == self.world_size or group[_STOP] > 0
        self.count += 1
        seconds = time.perf_counter() - started
        self.seconds += seconds
        if warming:
            self.warmup_rounds += 1
            self.warmup_seconds += seconds
            if self.warmup_left == 0:
                self._warmup_ended = time.perf_counter()
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
