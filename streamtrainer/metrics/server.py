"""The Prometheus HTTP endpoint."""

from __future__ import annotations

import logging
from threading import Thread
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from streamtrainer.exceptions import ConfigurationError

logger = logging.getLogger(__name__)


class MetricsServer:
    """Serves ``registry`` on ``host:port`` while open; port 0 picks a free port, -1 serves nothing."""

    def __init__(self, registry: CollectorRegistry, *, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    @property
    def url(self) -> str | None:
        return f"http://{self.host}:{self.port}/metrics" if self.port is not None else None

    def start(self) -> MetricsServer:
        if self.requested_port < 0:
            return self
        try:
            self._server, self._thread = start_http_server(
                self.requested_port, addr=self.host, registry=self.registry
            )
        except OSError as error:
            raise ConfigurationError(
                f"cannot serve metrics on {self.host}:{self.requested_port}: {error.strerror}"
            ) from None
        self.port = int(self._server.server_address[1])
        logger.info("metrics on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
