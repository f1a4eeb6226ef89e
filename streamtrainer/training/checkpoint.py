"""Durable checkpoints: safetensors for tensors, JSON for everything else. Never pickle.

A checkpoint is two files named by its version, ``<version>.safetensors`` and
``<version>.json``. The JSON is written last and holds the SHA-256 of the
tensor file, so it is the commit marker: a checkpoint exists once its JSON is
in place, and it is valid only while the checksum matches. Each file is written
to a temporary name, fsynced, renamed, and the directory fsynced, so a crash at
any instant leaves either the previous checkpoints or the new one, never a torn
file that loads.

Loading reads JSON and safetensors only (no pickle, no ``torch.load``): a
planted file of any other kind is ignored, and one that pretends to be a
checkpoint fails its checksum or its parse and is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from streamtrainer.training.exceptions import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "streamtrainer-checkpoint/1"
_NAME = re.compile(r"^(\d{12})\.json$")
_TEMP_MARK = ".tmp-"
# Test instrumentation: widen the window between writing the tensors and the commit marker,
# so that crash tests can kill a worker in the middle of a checkpoint write.
_TEST_DELAY_ENV = "STREAMTRAINER_TEST_CHECKPOINT_WRITE_DELAY_S"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    version: int
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    path: Path


class CheckpointStore:
    """The checkpoints of one worker in one directory, newest ``keep`` retained.

    One writer per directory: the store holds an exclusive lock on the directory
    while open, so two workers can never interleave their checkpoints.
    """

    def __init__(self, directory: Path, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = directory
        self.keep = keep
        self._lock: IO[bytes] | None = None

    # -- lifecycle --------------------------------------------------------------

    def open(self) -> CheckpointStore:
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = open(self.directory / ".lock", "a+b")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise CheckpointError(
                f"checkpoint directory {self.directory} is in use by another worker "
                "(give each worker its own --checkpoint-dir)"
            ) from None
        self._lock = lock
        self._remove_debris()
        return self

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> CheckpointStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------

    def save(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Checkpoint:
        """Write a new checkpoint durably and return it (with its version)."""
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"refusing to checkpoint non-finite values in {name!r}")
        version = self.latest_version() + 1
        stem = f"{version:012d}"
        contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        payload = save_tensors(contiguous)
        tensor_file = self.directory / f"{stem}.safetensors"
        write_durably(tensor_file, payload)
        _fsync_directory(self.directory)  # the tensors' name is durable before the marker names them
        delay = os.environ.get(_TEST_DELAY_ENV)
        if delay:
            time.sleep(float(delay))
        document = {
            "format": FORMAT,
            "version": version,
            "created_at": datetime.now(UTC).isoformat(),
            "tensors_file": tensor_file.name,
            "tensors_sha256": hashlib.sha256(payload).hexdigest(),
            **metadata,
        }
        write_durably(
            self.directory / f"{stem}.json", json.dumps(document, indent=1, sort_keys=True).encode()
        )
        _fsync_directory(self.directory)
        self._expire()
        return Checkpoint(version, contiguous, document, self.directory / f"{stem}.json")

    # -- reading ------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Versions whose commit marker exists, oldest first (not yet verified)."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _NAME.match(entry.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_version(self) -> int:
        versions = self.versions()
        return versions[-1] if versions else 0

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; corrupted ones are skipped with a warning."""
        for version in reversed(self.versions()):
            try:
                return self.load(version)
            except CheckpointError as error:
                logger.warning("skipping checkpoint %d: %s", version, error)
        return None

    def load(self, version: int) -> Checkpoint:
        stem = f"{version:012d}"
        marker = self.directory / f"{stem}.json"
        try:
            document = json.loads(marker.read_bytes())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{marker.name} is unreadable: {error}") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise CheckpointError(f"{marker.name} is not a {FORMAT} document")
        if document.get("tensors_file") != f"{stem}.safetensors" or document.get("version") != version:
            raise CheckpointError(f"{marker.name} does not describe checkpoint {version}")
        tensor_file = self.directory / f"{stem}.safetensors"
        try:
            payload = tensor_file.read_bytes()
        except OSError as error:
            raise CheckpointError(f"{tensor_file.name} is unreadable: {error}") from None
        if hashlib.sha256(payload).hexdigest() != document.get("tensors_sha256"):
            raise CheckpointError(f"{tensor_file.name} does not match its checksum (truncated or corrupted)")
        try:
            tensors = load_tensors(payload)
        except (SafetensorError, ValueError) as error:
            raise CheckpointError(f"{tensor_file.name} is not a safetensors file: {error}") from None
        return Checkpoint(version, tensors, document, marker)

    # -- housekeeping ---------------------------------------------------------------

    def _expire(self) -> None:
        versions = self.versions()
        for version in versions[: max(0, len(versions) - self.keep)]:
            stem = f"{version:012d}"
            # The marker goes first: from then on the checkpoint no longer exists.
            (self.directory / f"{stem}.json").unlink(missing_ok=True)
            (self.directory / f"{stem}.safetensors").unlink(missing_ok=True)

    def _remove_debris(self) -> None:
        """Temporary files and tensor files without a marker are what a crash mid-save leaves."""
        markers = {f"{v:012d}" for v in self.versions()}
        for entry in self.directory.iterdir():
            orphan = entry.suffix == ".safetensors" and entry.stem not in markers and entry.stem.isdigit()
            if _TEMP_MARK in entry.name or orphan:
                logger.info("removing %s left by an interrupted checkpoint", entry.name)
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


def write_durably(path: Path, data: bytes, *, sync_directory: bool = False) -> None:
    """``data`` at ``path`` whole or not at all: a temporary file, fsynced, renamed over ``path``
    (and, with ``sync_directory``, the directory fsynced so the rename itself survives a crash)."""
    temporary = path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    if sync_directory:
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
