"""The Prometheus HTTP endpoint, plus a few POST actions (e.g. ``POST /compact``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from threading import Thread
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from streamtrainer.exceptions import ConfigurationError

logger = logging.getLogger(__name__)

Action = Callable[[], str]
"""A POST endpoint: does (or schedules) something and says what, in one line."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # A scrape every few seconds must not fill the worker's log.
        return


class MetricsServer:
    """Serves ``registry`` on ``host:port`` while open; port 0 picks a free port, -1 serves nothing.

    ``actions`` maps a path (``"/compact"``) to a callable run on ``POST``; its
    one-line answer is the response body. GET of any other path serves metrics.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str,
        port: int,
        actions: Mapping[str, Action] | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.actions = dict(actions or {})
        self.port: int | None = None
        self._metrics_app: Callable[..., Iterable[bytes]] = make_wsgi_app(registry)
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    @property
    def url(self) -> str | None:
        return f"http://{self.host}:{self.port}/metrics" if self.port is not None else None

    def start(self) -> MetricsServer:
        if self.requested_port < 0:
            return self
        try:
            self._server = make_server(
                self.host,
                self.requested_port,
                self._app,
                server_class=_ThreadingWSGIServer,
                handler_class=_QuietHandler,
            )
        except OSError as error:
            raise ConfigurationError(
                f"cannot serve metrics on {self.host}:{self.requested_port}: {error.strerror}"
            ) from None
        self.port = int(self._server.server_address[1])
        self._thread = Thread(target=self._server.serve_forever, name="metrics-server", daemon=True)
        self._thread.start()
        logger.info("metrics on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        action = self.actions.get(path)
        if action is None:
            return self._metrics_app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "POST":
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "POST")])
            return [f"POST {path}\n".encode()]
        answer = action()
        logger.info("POST %s: %s", path, answer)
        start_response("202 Accepted", [("Content-Type", "text/plain")])
        return [answer.encode() + b"\n"]

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
