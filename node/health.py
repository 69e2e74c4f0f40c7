"""HTTP health and metrics endpoints, served from a thread independent of asyncio.

Routes (GET or HEAD; machines read the status code, humans the JSON body):
- `/metrics`: Prometheus text from the node's own registry.
- `/livez` (alias `/healthz`): 200 unless `live_fn` reports a stale heartbeat; 503 otherwise.
- `/readyz`: 200 only while `ready_fn` says ready; body `{"status": "ok"|"fail", "checks": {...}}`.
  Every answer also sets the `swarm_ready` gauge, so the metric mirrors what probes saw.
- `/status`: the current `NodeStatus` snapshot as JSON; 500 with `{"error": ...}` if building it fails.
- `/` (+ `/page.js`, `/page.css`): the node's page, polling `/page.json` (503 until its first sample).
- anything else: 404; a method other than GET or HEAD: 405 (every route is read-only).

The server is stdlib `wsgiref` with one thread per request in a daemon thread, so `/livez`
keeps answering (with 503) while the event loop or the training loop is hung; that is the
point of a liveness probe. The callbacks therefore run on HTTP threads: they must be thread-safe
and cheap (read a snapshot; never touch the loop). One that raises fails closed (503).
"""
from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app

from swarm_node.metrics import NodeMetrics
from swarm_node.status import NodeStatus

if TYPE_CHECKING:
    from swarm_node.page.state import PageState

log = logging.getLogger(__name__)

LiveFn = Callable[[], tuple[bool, str]]
ReadyFn = Callable[[], tuple[bool, dict[str, bool]]]
StatusFn = Callable[[], NodeStatus]
PageFn = Callable[[], "PageState | None"]

STATIC_DIR = Path(__file__).resolve().parent / "page" / "static"
# path -> (file, content type); the page loads nothing from anywhere else
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript; charset=utf-8"),
          "/page.css": ("page.css", "text/css; charset=utf-8")}
# no inline script, no outside origin: a peer-supplied string that slipped into markup still could not run
PAGE_HEADERS = [("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
                 "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
                ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")]

_REASONS = {200: "200 OK", 404: "404 Not Found", 405: "405 Method Not Allowed",
            500: "500 Internal Server Error", 503: "503 Service Unavailable"}


class Heartbeat:
    """A thread-safe monotonic timestamp: the loop being watched calls `beat()`, probes read `age_s()`.

    The age counts from construction until the first beat, so a loop that never starts goes stale.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = time.monotonic()

    def beat(self) -> None:
        with self._lock:
            self._last = time.monotonic()

    def age_s(self) -> float:
        with self._lock:
            return time.monotonic() - self._last


def make_live_fn(beats: Mapping[str, Heartbeat], max_age_s: float) -> LiveFn:
    """A `live_fn` that fails when any named heartbeat is older than `max_age_s`.

    The detail string names each stale beat and its age, e.g. "train: 93.1s > 60.0s".
    """

    def live() -> tuple[bool, str]:
        stale = [f"{name}: {hb.age_s():.1f}s > {max_age_s:.1f}s" for name, hb in beats.items() if hb.age_s() > max_age_s]
        return (not stale, "; ".join(stale) or "ok")

    return live


class _QuietHandler(WSGIRequestHandler):
    """wsgiref logs every request to stderr; probes every few seconds would flood the log."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request stuck in a callback must not block stop() or exit

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall
        # for seconds in a network namespace without DNS; the name is only cosmetic.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class HealthServer:
    """Serves `/metrics`, `/livez`, `/healthz`, `/readyz` and `/status` on `host:port`.

    `start()` binds (port 0 = ephemeral) and returns the bound `(host, port)`; a bind
    failure raises `OSError` from `start()`. `stop()` is idempotent and never blocks longer
    than `timeout_s` plus one poll interval.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: NodeMetrics,
        status_fn: StatusFn,
        live_fn: LiveFn,
        ready_fn: ReadyFn,
        page_fn: PageFn | None = None,
    ) -> None:
        self._host, self._port = host, port
        self._page_fn = page_fn
        self._metrics = metrics
        self._status_fn, self._live_fn, self._ready_fn = status_fn, live_fn, ready_fn
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound `(host, port)` after `start()`, else None."""
        return None if self._server is None else self._server.server_address[:2]

    def start(self) -> tuple[str, int]:
        if self._server is not None:
            raise RuntimeError("HealthServer already started")
        cls = _Server6 if ":" in self._host else _Server
        server = cls((self._host.strip("[]"), self._port), _QuietHandler)
        server.set_app(self._app)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="swarm-health-http", daemon=True
        )
        self._thread.start()
        host, port = server.server_address[:2]
        log.debug("health server listening on %s:%d", host, port)
        return host, port

    def stop(self, timeout_s: float = 5.0) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.shutdown()  # returns within one poll interval: requests run on their own threads
        server.server_close()
        thread.join(timeout_s)

    # --- WSGI -----------------------------------------------------------------------------

    def _app(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics" and method in ("GET", "HEAD"):
            return self._metrics_app(environ, start_response)
        routes = {"/livez": self._livez, "/healthz": self._livez, "/readyz": self._readyz, "/status": self._status}
        if self._page_fn is not None:
            routes["/page.json"] = self._page
        route = routes.get(path)
        page = self._page_fn is not None and path in STATIC
        if route is None and not page and path != "/metrics":
            code, body = 404, {"error": f"no route {path}", "routes": ["/metrics", *routes, *(STATIC if self._page_fn else ())]}
        elif method not in ("GET", "HEAD"):
            code, body = 405, {"error": f"{method} not allowed: every route is read-only"}
        elif page:
            return self._static(path, method, start_response)
        else:
            code, body = route()
        data = json.dumps(body, allow_nan=False, default=str).encode() + b"\n"
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Cache-Control", "no-store")]
        if code == 405:
            headers.append(("Allow", "GET, HEAD"))
        start_response(_REASONS[code], headers)
        return [b""] if method == "HEAD" else [data]

    def _static(self, path: str, method: str, start_response: Callable) -> Iterable[bytes]:
        name, ctype = STATIC[path]
        data = (STATIC_DIR / name).read_bytes()
        start_response(_REASONS[200], [("Content-Type", ctype), ("Content-Length", str(len(data))),
                                       ("Cache-Control", "no-cache"), *PAGE_HEADERS])
        return [b""] if method == "HEAD" else [data]

    def _page(self) -> tuple[int, dict]:
        try:
            state = self._page_fn()
        except Exception as e:
            log.exception("page_fn raised")
            return 500, {"error": f"page state unavailable: {e!r}"}
        if state is None:
            return 503, {"error": "no page sample yet: the node is starting"}
        return 200, _finite(state.model_dump(mode="json"))

    def _livez(self) -> tuple[int, dict]:
        try:
            ok, detail = self._live_fn()
        except Exception as e:  # fail closed: a broken check must not report healthy
            log.exception("live_fn raised")
            ok, detail = False, f"live check raised: {e!r}"
        return (200 if ok else 503), {"status": "ok" if ok else "fail", "detail": detail}

    def _readyz(self) -> tuple[int, dict]:
        try:
            ok, checks = self._ready_fn()
            body: dict = {"status": "ok" if ok else "fail", "checks": dict(checks)}
        except Exception as e:
            log.exception("ready_fn raised")
            ok, body = False, {"status": "fail", "checks": {}, "error": repr(e)}
        self._metrics.ready.set(1 if ok else 0)
        return (200 if ok else 503), body

    def _status(self) -> tuple[int, dict]:
        try:
            return 200, _finite(self._status_fn().model_dump(mode="json"))
        except Exception as e:
            log.exception("status_fn raised")
            return 500, {"error": f"status unavailable: {e!r}"}


def _finite(value):
    """Replace NaN/inf (e.g. a diverged loss) by None: strict JSON has no NaN and parsers reject it."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
