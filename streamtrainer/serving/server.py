"""``streamtrainer serve``: the model source, the slot and the HTTP server, started and stopped together."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType

import uvicorn

from streamtrainer.serving.app import build_app
from streamtrainer.serving.gate import PromotionGate
from streamtrainer.serving.metrics import ServeMetrics
from streamtrainer.serving.slot import ModelSlot
from streamtrainer.serving.sources import CheckpointDirSource, ModelsTopicSource, default_model_name
from streamtrainer.settings import ServeSettings

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling: :meth:`ModelServer.run` installs its own, so that
    SIGTERM and SIGINT stop the server gracefully and the process exits 0 (uvicorn raises the signal
    again once stopped: the process would die of it)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ModelServer:
    """The whole server of ``settings``: :meth:`run` in the foreground (the CLI), or :meth:`start`
    on a thread and :meth:`stop` (tests, an embedding process). ``port`` is the bound port (a
    ``--port 0`` server's free one) once constructed."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else ServeMetrics()
        self.slot = ModelSlot(PromotionGate(settings.gate_metric, settings.gate_margin), self.metrics)
        self.source: CheckpointDirSource | ModelsTopicSource
        if settings.checkpoint_dir is not None:
            self.source = CheckpointDirSource(
                self.slot, settings.checkpoint_dir, interval_s=settings.poll_interval_s
            )
        else:
            assert settings.models_topic is not None  # the settings hold one source
            model = settings.model_name or default_model_name(settings.models_topic)
            self.source = ModelsTopicSource(self.slot, settings, settings.models_topic, model)
        # Bound here, so that a busy port is an error before anything starts, and port 0 is known.
        self._socket = socket.create_server((settings.host, settings.port), reuse_port=False)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            build_app(self.slot, self.metrics),
            lifespan="off",
            log_config=None,  # our logging, not uvicorn's
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        self._server = _Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://{self.settings.host}:{self.port}"

    def run(self) -> None:
        """Serve in the foreground until SIGINT or SIGTERM (uvicorn's handlers), then stop the source."""
        self.source.start()
        logger.info("serving on %s", self.url)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._server.run(sockets=[self._socket])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.source.stop()
            self._socket.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # The first asks for a graceful stop (requests in flight finish); a second forces it.
        if self._server.should_exit:
            self._server.force_exit = True
        self._server.should_exit = True
        logger.info("%s: stopping", signal.Signals(signum).name)

    def start(self) -> ModelServer:
        """Serve on a background thread (returns once the server listens)."""
        self.source.start()
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="serve-http", daemon=True
        )
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (requests in flight finish) and stop following the source."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10.0)
        self.source.stop()
        self._socket.close()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


def run_serve(settings: ServeSettings) -> None:
    """The ``serve`` command: serve until a signal stops it."""
    ModelServer(settings).run()
