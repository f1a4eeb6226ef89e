"""Checkpoint files: atomic, bounded, verified, never unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamtrainer.training.checkpoint import CheckpointStore
from streamtrainer.training.exceptions import CheckpointError


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {"model.weight": torch.full((4, 3), value), "optimizer.0.step": torch.tensor(value)}


def _debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_save_and_load_round_trip_with_metadata(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path) as store:
        saved = store.save(_tensors(1.5), {"positions": {"t:0": 10}, "records_applied": 10})
        loaded = store.load_latest()
    assert loaded is not None
    assert loaded.version == saved.version == 1
    assert torch.equal(loaded.tensors["model.weight"], torch.full((4, 3), 1.5))
    assert loaded.metadata["positions"] == {"t:0": 10}
    assert len(loaded.metadata["tensors_sha256"]) == 64
    assert loaded.metadata["created_at"]


def test_after_100_saves_exactly_keep_remain_and_no_temporary_files(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path, keep=3) as store:
        for i in range(100):
            store.save(_tensors(float(i)), {"i": i})
        assert store.versions() == [98, 99, 100]
        latest = store.load_latest()
    assert latest is not None and latest.metadata["i"] == 99
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock")
    assert len(names) == 6  # 3 x (json + safetensors)
    assert _debris(tmp_path) == []


def test_versions_increase_across_reopen(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path) as store:
        store.save(_tensors(1.0), {})
    with CheckpointStore(tmp_path) as store:
        assert store.save(_tensors(2.0), {}).version == 2


def test_random_truncations_and_bit_flips_fall_back_to_the_newest_valid(tmp_path: Path) -> None:
    rng = random.Random(1234)
    detected = 0
    for trial in range(60):
        directory = tmp_path / f"trial-{trial}"
        with CheckpointStore(directory, keep=3) as store:
            store.save(_tensors(1.0), {"n": 1})
            store.save(_tensors(2.0), {"n": 2})
            victim = directory / rng.choice(["000000000002.safetensors", "000000000002.json"])
            data = bytearray(victim.read_bytes())
            if rng.random() < 0.5:
                data = data[: rng.randrange(0, len(data))]
            else:
                position = rng.randrange(len(data))
                data[position] ^= 1 << rng.randrange(8)
            victim.write_bytes(bytes(data))
            loaded = store.load_latest()
        assert loaded is not None
        # A damaged newest checkpoint is never loaded: we get the previous one. (A bit flip inside
        # JSON whitespace or a key's letter case can leave it valid and identical in meaning.)
        if loaded.version == 1:
            detected += 1
            assert torch.equal(loaded.tensors["model.weight"], torch.full((4, 3), 1.0))
        else:
            assert torch.equal(loaded.tensors["model.weight"], torch.full((4, 3), 2.0))
            assert loaded.metadata["n"] == 2
    assert detected >= 50


def test_non_finite_values_are_never_checkpointed(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path) as store:
        with pytest.raises(CheckpointError, match="non-finite"):
            store.save({"model.weight": torch.tensor([1.0, float("nan")])}, {})
        assert store.versions() == []


def test_one_writer_per_directory(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path), pytest.raises(CheckpointError, match="in use by another worker"):
        CheckpointStore(tmp_path).open()


class _Canary:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.path}",))


def test_a_planted_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    directory = tmp_path / "ckpt"
    with CheckpointStore(directory) as store:
        store.save(_tensors(1.0), {})
    evil = pickle.dumps(_Canary(str(canary)))
    (directory / "model.pt").write_bytes(evil)
    (directory / "000000000007.pkl").write_bytes(evil)
    # A pickle disguised as the newest checkpoint, with a marker whose checksum matches it.
    (directory / "000000000009.safetensors").write_bytes(evil)
    marker = {
        "format": "streamtrainer-checkpoint/1",
        "version": 9,
        "tensors_file": "000000000009.safetensors",
        "tensors_sha256": hashlib.sha256(evil).hexdigest(),
    }
    (directory / "000000000009.json").write_text(json.dumps(marker))
    with CheckpointStore(directory) as store:
        loaded = store.load_latest()
    assert loaded is not None and loaded.version == 1
    assert not canary.exists()


_SAVER = """
import sys, torch
from pathlib import Path
from streamtrainer.training.checkpoint import CheckpointStore
store = CheckpointStore(Path(sys.argv[1]), keep=3).open()
print("ready", flush=True)
i = 0
while True:
    i += 1
    store.save({"w": torch.full((256, 256), float(i))}, {"i": i})
"""


def test_kill_during_save_many_times_leaves_a_valid_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    env = {**os.environ, "STREAMTRAINER_TEST_CHECKPOINT_WRITE_DELAY_S": "0.01"}
    rng = random.Random(7)
    kills = mid_write = 0
    last_version = 0
    for _ in range(20):
        process = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(directory)], stdout=subprocess.PIPE, env=env
        )
        assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        names = {p.name for p in directory.iterdir()}
        markers = {n.removesuffix(".json") for n in names if n.endswith(".json")}
        orphans = {n.removesuffix(".safetensors") for n in names if n.endswith(".safetensors")} - markers
        if _debris(directory) or orphans:
            mid_write += 1
        with CheckpointStore(directory, keep=3) as store:
            loaded = store.load_latest()
            assert loaded is not None
            assert loaded.version >= last_version
            assert torch.equal(loaded.tensors["w"], torch.full((256, 256), float(loaded.metadata["i"])))
            last_version = loaded.version
            assert _debris(directory) == []  # reopening cleans what the crash left
    print(f"checkpoint kill test: {kills} kills, {mid_write} in the middle of a write")
    assert mid_write >= 3
