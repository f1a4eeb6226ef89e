"""The Prometheus HTTP endpoint, health probes and opt-in POST actions (e.g. ``POST /compact``).

Paths: ``GET /metrics`` (the registry), ``GET /healthz`` (alive), ``GET /ready`` (ready to serve its
purpose, e.g. a worker with partitions that trains), and each action's path (``POST`` only). Any
other path is 404.
"""

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

Probe = Callable[[], tuple[bool, str]]
"""A health probe: (healthy, one line saying why), called on each GET of its path."""

METRICS_PATH = "/metrics"
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/ready"


def _always() -> tuple[bool, str]:
    return True, "ok"


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # A scrape every few seconds must not fill the worker's log.
        return


class MetricsServer:
    """Serves ``registry`` on ``host:port`` while open; port 0 picks a free port, -1 serves nothing.

    ``GET /metrics`` serves the registry. ``GET /healthz`` answers 200 while ``liveness`` says the
    process is alive (default: always), ``GET /ready`` 200 while ``readiness`` says it is ready
    (default: as ``liveness``), 503 otherwise, the probe's one line as the body. ``actions`` maps a
    path (``"/compact"``) to a callable run on ``POST``; its one-line answer is the response body.
    Any other path is 404.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str,
        port: int,
        actions: Mapping[str, Action] | None = None,
        liveness: Probe | None = None,
        readiness: Probe | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.actions = dict(actions or {})
        self.probes: dict[str, Probe] = {
            LIVENESS_PATH: liveness or _always,
            READINESS_PATH: readiness or liveness or _always,
        }
        self.port: int | None = None
        self._metrics_app: Callable[..., Iterable[bytes]] = make_wsgi_app(registry)
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    @property
    def url(self) -> str | None:
        """The metrics page's URL once started (None before, or when disabled)."""
        return f"http://{self.host}:{self.port}{METRICS_PATH}" if self.port is not None else None

    def start(self) -> MetricsServer:
        """Bind and serve in a daemon thread (a port in use is a :class:`ConfigurationError`)."""
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
        if self.actions:
            logger.warning(
                "admin endpoints enabled on %s:%d: %s (anyone who reaches the port can call them)",
                self.host,
                self.port,
                ", ".join(f"POST {path}" for path in sorted(self.actions)),
            )
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        action = self.actions.get(path)
        if action is not None:
            if method != "POST":
                return _plain(start_response, "405 Method Not Allowed", f"POST {path}", [("Allow", "POST")])
            answer = action()
            logger.info("POST %s: %s", path, answer)
            return _plain(start_response, "202 Accepted", answer)
        if path not in self.probes and path != METRICS_PATH:
            return _plain(start_response, "404 Not Found", f"no {path} here")
        if method not in ("GET", "HEAD"):
            allow = [("Allow", "GET, HEAD")]
            return _plain(start_response, "405 Method Not Allowed", f"GET {path}", allow)
        probe = self.probes.get(path)
        if probe is None:
            return self._metrics_app(environ, start_response)
        try:
            healthy, why = probe()
        except Exception as error:  # a probe that fails says "not healthy", never 500 with a traceback
            logger.exception("%s probe failed", path)
            healthy, why = False, f"probe failed: {error}"
        return _plain(start_response, "200 OK" if healthy else "503 Service Unavailable", why)

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _plain(
    start_response: Callable[..., Any],
    status: str,
    body: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), *(headers or [])])
    return [body.encode() + b"\n"]
