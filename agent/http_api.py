"""The agent's HTTP server: /metrics for Prometheus, and a small JSON API for workloads.

Workloads in other processes report themselves here (start, stop, tokens, spans, declared GPU memory);
``agent.accounting`` validates every value and this module maps requests onto it. The routes, bodies
and status codes are documented in ``docs/openapi.yaml``.

Who may write: loopback clients always; any client when a bearer token is configured and the request
carries ``Authorization: Bearer <token>``. Reads (GET) are open, as /metrics must be for Prometheus.

A rejected request changes nothing and gets a 4xx with a one-line JSON body ``{"error": "..."}``; an
unexpected exception is logged here and answered 500, never with a traceback.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app

from wattledger.agent.scrape_cache import ScrapeCache
from prometheus_client.registry import CollectorRegistry

from wattledger.agent.accounting import MAX_SPANS_PER_CALL, TOKEN_KINDS, Accounting, AccountingError, Span

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024
# Timestamps further ahead of the agent's clock than this are refused: almost always a client that
# used time.time_ns() (wall clock, ~1.7e18) where time.monotonic_ns() was meant.
DEFAULT_MAX_FUTURE_NS = 60 * 10**9
# Bodies refused before they are read (401, 413, ...) are still read and discarded up to this size, so
# the client sees our answer: closing a socket with unread input makes Linux send a reset, which can
# destroy the response before the client reads it.
_DRAIN_LIMIT_BYTES = 1 << 20
_ERROR_MESSAGE_CHARS = 300

_READ = ("GET", "HEAD")
_WRITE = ("POST",)
# Every path the app serves and its methods. The OpenAPI contract test compares docs/openapi.yaml with this.
ROUTES: dict[str, tuple[str, ...]] = {
    "/": _READ,
    "/metrics": _READ,
    "/healthz": _READ,
    "/v1/workloads": _READ,
    "/v1/workloads/start": _WRITE,
    "/v1/workloads/stop": _WRITE,
    "/v1/tokens": _WRITE,
    "/v1/spans": _WRITE,
    "/v1/memory": _WRITE,
}

_INDEX_HTML = b"""<!doctype html>
<html><head><title>wattledger agent</title></head>
<body><h1>wattledger agent</h1>
<p><a href="/metrics">/metrics</a> &middot; <a href="/healthz">/healthz</a>
&middot; <a href="/v1/workloads">/v1/workloads</a></p></body></html>
"""

_Response = tuple[int, list[tuple[str, str]], bytes]


class HttpError(Exception):
    """A request refused with ``status``; ``message`` is the one line the client reads."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def _one_line(message: str) -> str:
    line = " ".join(str(message).split())
    if len(line) > _ERROR_MESSAGE_CHARS:
        line = line[: _ERROR_MESSAGE_CHARS - 3] + "..."
    return line


def _json_response(status: int, value: object, headers: Iterable[tuple[str, str]] = ()) -> _Response:
    body = json.dumps(value, separators=(",", ":")).encode("ascii") + b"\n"
    return status, [("Content-Type", "application/json"), *headers], body


def _error_response(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> _Response:
    return _json_response(status, {"error": _one_line(message)}, headers)


def is_loopback(remote_addr: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.x.y.z)."""
    if not remote_addr:
        return False
    try:
        address = ipaddress.ip_address(remote_addr.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def parse_json_object(body: bytes) -> dict:
    """The request body as a JSON object, or HttpError(400): strict UTF-8, no NaN/Infinity, no
    duplicate keys."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HttpError(400, f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_reject_duplicates)
    except RecursionError:
        raise HttpError(400, "malformed JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, our hooks, and ints over Python's digit limit
        raise HttpError(400, f"malformed JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HttpError(400, f"body must be a JSON object, got {type(value).__name__}")
    return value


def _check_fields(body: dict, required: tuple[str, ...], optional: tuple[str, ...] = (), where: str = "") -> None:
    """422 for unknown or missing fields; the types are Accounting's to check."""
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        names = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise AccountingError(f"{where}unknown field(s) {names}; allowed: {', '.join(required + optional)}")
    missing = [name for name in required if name not in body]
    if missing:
        raise AccountingError(f"{where}missing field(s): {', '.join(missing)}")


class _AgentApp:
    """The WSGI application ``make_app`` returns."""

    routes = ROUTES

    def __init__(
        self,
        accounting: Accounting,
        registry: CollectorRegistry,
        is_healthy: Callable[[], bool],
        bearer_token: str | None,
        max_body_bytes: int,
        clock_ns: Callable[[], int],
        max_future_ns: int | None,
        scrape_cache_seconds: float,
    ):
        if bearer_token is not None and not bearer_token.strip():
            raise ValueError("bearer_token must not be empty (use None to accept loopback writes only)")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")
        self._accounting = accounting
        self._metrics_app = make_wsgi_app(registry)
        self._scrape_cache = ScrapeCache(self._render_metrics, scrape_cache_seconds)
        self._is_healthy = is_healthy
        self._token = bearer_token.encode("utf-8") if bearer_token is not None else None
        self._max_body_bytes = max_body_bytes
        self._clock_ns = clock_ns
        self._max_future_ns = max_future_ns
        self._posts = {
            "/v1/workloads/start": self._post_start,
            "/v1/workloads/stop": self._post_stop,
            "/v1/tokens": self._post_tokens,
            "/v1/spans": self._post_spans,
            "/v1/memory": self._post_memory,
        }
        self._gets = {
            "/": self._get_index,
            "/metrics": self._get_metrics,
            "/healthz": self._get_healthz,
            "/v1/workloads": self._get_workloads,
        }

    # -- WSGI entry point -----------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        body_state = {"read": False}
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            status, headers, body = self._dispatch(environ, method, body_state)
        except HttpError as exc:
            status, headers, body = _error_response(exc.status, exc.message, exc.headers)
        except AccountingError as exc:
            status, headers, body = _error_response(exc.status, str(exc))
        except Exception:  # the one place an unexpected failure turns into a 500
            log.exception("%s %s failed", method, environ.get("PATH_INFO", ""))
            status, headers, body = _error_response(500, "internal error; see the agent's log")
        if not body_state["read"]:
            self._drain(environ)
        headers = [h for h in headers if h[0].lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        start_response(f"{status} {phrase}", headers)
        return [b"" if method == "HEAD" else body]

    def _dispatch(self, environ: dict, method: str, body_state: dict) -> _Response:
        path = environ.get("PATH_INFO", "") or "/"
        methods = ROUTES.get(path)
        if methods is None:
            raise HttpError(404, f"no such path: {path[:100]!r}; see docs/openapi.yaml")
        if method not in methods:
            allow = ", ".join(methods)
            raise HttpError(405, f"{method[:20]} is not allowed on {path}; use {allow}", [("Allow", allow)])
        if method in _READ:
            return self._gets[path](environ)
        self._authorize(environ)
        payload = self._read_json(environ, body_state)
        return _json_response(200, self._posts[path](payload))

    # -- request plumbing -----------------------------------------------------------------------

    def _authorize(self, environ: dict) -> None:
        if is_loopback(environ.get("REMOTE_ADDR")):
            return
        if self._token is None:
            raise HttpError(403, "writes are accepted from loopback only; configure a bearer token to "
                                 "accept them from other hosts")
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise HttpError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                            [("WWW-Authenticate", 'Bearer realm="wattledger"')])
        # Header values arrive as latin-1-decoded str (PEP 3333); encoding back gives the wire bytes.
        offered = credentials.strip().encode("latin-1", errors="replace")
        if not hmac.compare_digest(offered, self._token):
            raise HttpError(401, "wrong bearer token",
                            [("WWW-Authenticate", 'Bearer realm="wattledger", error="invalid_token"')])

    def _read_json(self, environ: dict, body_state: dict) -> dict:
        content_type = environ.get("CONTENT_TYPE", "")
        media_type, *params = [part.strip() for part in content_type.split(";")]
        if media_type.lower() != "application/json":
            raise HttpError(415, f"Content-Type must be application/json, got {content_type[:60]!r}")
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
                raise HttpError(415, f"the body must be UTF-8 JSON, got {param[:60]!r}")
        if environ.get("HTTP_TRANSFER_ENCODING"):
            raise HttpError(411, "chunked bodies are not supported; send Content-Length")
        length_header = (environ.get("CONTENT_LENGTH") or "").strip()
        if not length_header:
            raise HttpError(411, "Content-Length is required")
        if not (length_header.isascii() and length_header.isdigit()):
            raise HttpError(400, f"bad Content-Length {length_header[:30]!r}")
        length = int(length_header)
        if length > self._max_body_bytes:
            raise HttpError(413, f"body of {length} bytes is over the limit of {self._max_body_bytes}")
        body = self._read_body(environ, length, body_state)
        return parse_json_object(body)

    def _read_body(self, environ: dict, length: int, body_state: dict) -> bytes:
        body_state["read"] = True
        stream = environ["wsgi.input"]
        chunks: list[bytes] = []
        received = 0
        try:
            while received < length:
                chunk = stream.read(min(length - received, 65536))
                if not chunk:
                    break
                received += len(chunk)
                if received > self._max_body_bytes:  # a stream that returns more than asked for
                    raise HttpError(413, f"body is over the limit of {self._max_body_bytes} bytes")
                chunks.append(chunk)
        except TimeoutError:
            raise HttpError(408, f"timed out reading the body after {received} of {length} bytes") from None
        except OSError as exc:
            raise HttpError(400, f"could not read the body: {exc}") from None
        if received < length:
            raise HttpError(400, f"body ended after {received} of {length} bytes (Content-Length)")
        return b"".join(chunks)

    def _drain(self, environ: dict) -> None:
        """Read and drop an unread body so the client receives the answer (see _DRAIN_LIMIT_BYTES)."""
        try:
            length = int((environ.get("CONTENT_LENGTH") or "0").strip())
        except ValueError:
            return
        if not 0 < length <= _DRAIN_LIMIT_BYTES:
            return
        stream = environ.get("wsgi.input")
        try:
            while length > 0:
                chunk = stream.read(min(length, 65536))
                if not chunk:
                    return
                length -= len(chunk)
        except (OSError, AttributeError):
            return

    def _check_not_future(self, value: object, what: str) -> None:
        if self._max_future_ns is None or isinstance(value, bool) or not isinstance(value, int):
            return  # type errors are Accounting's to report
        now = self._clock_ns()
        if value > now + self._max_future_ns:
            raise AccountingError(
                f"{what} is {(value - now) / 1e9:.3g} s ahead of the agent's clock; "
                "timestamps are time.monotonic_ns(), not time.time_ns()"
            )

    # -- reads ----------------------------------------------------------------------------------

    def _get_index(self, environ: dict) -> _Response:
        return 200, [("Content-Type", "text/html; charset=utf-8")], _INDEX_HTML

    def _get_healthz(self, environ: dict) -> _Response:
        try:
            healthy = bool(self._is_healthy())
        except Exception:
            log.exception("health check raised; answering 503")
            healthy = False
        if healthy:
            return 200, [("Content-Type", "text/plain; charset=utf-8")], b"ok\n"
        return 503, [("Content-Type", "text/plain; charset=utf-8")], b"unhealthy\n"

    def _get_metrics(self, environ: dict) -> _Response:
        # Everything that changes prometheus_client's answer is in the key.
        key = (environ.get("HTTP_ACCEPT", ""), environ.get("HTTP_ACCEPT_ENCODING", ""),
               environ.get("QUERY_STRING", ""))
        return self._scrape_cache.get(key)

    def _render_metrics(self, key: tuple) -> _Response:
        accept, accept_encoding, query = key
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "HTTP_ACCEPT": accept,
                   "HTTP_ACCEPT_ENCODING": accept_encoding, "QUERY_STRING": query}
        # prometheus_client's app does content negotiation (OpenMetrics), gzip and ?name[]= filtering.
        captured: dict = {}

        def capture(status: str, headers: list, exc_info=None) -> None:
            captured["status"], captured["headers"] = status, headers

        chunks = self._metrics_app(environ, capture)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        return int(captured["status"].split()[0]), list(captured["headers"]), body

    def _get_workloads(self, environ: dict) -> _Response:
        views = sorted(self._accounting.workloads(), key=lambda view: view.name)
        return _json_response(200, [
            {
                "name": view.name,
                "running": view.running,
                "gpus": list(view.gpus),
                "pid": view.pid,
                "tokens": {kind: view.tokens.get(kind, 0) for kind in TOKEN_KINDS},
                "memory_bytes": {str(gpu): n for gpu, n in sorted(view.memory_bytes.items())},
            }
            for view in views
        ])

    # -- writes ---------------------------------------------------------------------------------
    # Each handler checks the whole request before the one Accounting call that changes state.

    def _post_start(self, body: dict) -> dict:
        _check_fields(body, ("workload", "gpus"), ("pid", "timestamp_ns"))
        timestamp = body.get("timestamp_ns")
        self._check_not_future(timestamp, "timestamp_ns")
        self._accounting.start(body["workload"], body["gpus"], pid=body.get("pid"), at_ns=timestamp)
        return {"ok": True, "workload": body["workload"]}

    def _post_stop(self, body: dict) -> dict:
        _check_fields(body, ("workload",), ("timestamp_ns",))
        timestamp = body.get("timestamp_ns")
        self._check_not_future(timestamp, "timestamp_ns")
        self._accounting.stop(body["workload"], at_ns=timestamp)
        return {"ok": True, "workload": body["workload"]}

    def _post_tokens(self, body: dict) -> dict:
        _check_fields(body, ("workload", "kind", "count"))
        self._accounting.add_tokens(body["workload"], body["kind"], body["count"])
        return {"ok": True, "workload": body["workload"]}

    def _post_memory(self, body: dict) -> dict:
        _check_fields(body, ("workload", "gpu", "bytes"))
        self._accounting.set_memory(body["workload"], body["gpu"], body["bytes"])
        return {"ok": True, "workload": body["workload"]}

    def _post_spans(self, body: dict) -> dict:
        if "spans" in body:
            _check_fields(body, ("spans",))
            items = body["spans"]
            if not isinstance(items, list):
                raise AccountingError("spans must be a list of span objects")
            if len(items) > MAX_SPANS_PER_CALL:
                raise AccountingError(f"at most {MAX_SPANS_PER_CALL} spans per call, got {len(items)}")
            spans = [self._make_span(item, f"spans[{i}]: ") for i, item in enumerate(items)]
        else:
            spans = [self._make_span(body, "")]
        self._accounting.add_spans(spans)  # all or nothing
        return {"ok": True, "spans": len(spans)}

    def _make_span(self, item: object, where: str) -> Span:
        if not isinstance(item, dict):
            raise AccountingError(f"{where}a span must be an object")
        _check_fields(item, ("workload", "kind", "start_ns", "end_ns", "gpus"), ("activity",), where)
        try:
            span = self._accounting.make_span(item["workload"], item["kind"], item["start_ns"],
                                              item["end_ns"], item["gpus"], item.get("activity"))
            self._check_not_future(span.end_ns, "end_ns")
        except AccountingError as exc:
            raise AccountingError(f"{where}{exc}", exc.status) from None
        return span


def make_app(
    accounting: Accounting,
    registry: CollectorRegistry,
    is_healthy: Callable[[], bool],
    bearer_token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    clock_ns: Callable[[], int] = time.monotonic_ns,
    max_future_ns: int | None = DEFAULT_MAX_FUTURE_NS,
    scrape_cache_seconds: float = 0.0,
) -> Callable:
    """The agent's WSGI application.

    ``registry`` is what /metrics exposes; ``is_healthy`` answers /healthz. ``bearer_token`` lets
    non-loopback clients write. ``clock_ns`` should be the Accounting's clock: timestamps more than
    ``max_future_ns`` ahead of it are refused (None turns that check off). Scrapes within
    ``scrape_cache_seconds`` of each other share one rendering (the agent uses its sampling interval;
    0 renders every scrape).
    """
    return _AgentApp(accounting, registry, is_healthy, bearer_token, max_body_bytes, clock_ns, max_future_ns,
                     scrape_cache_seconds)


# -- the server -----------------------------------------------------------------------------------


class ServerStartError(OSError):
    """The server could not listen; the message is one line naming the address and the reason."""


class _QuietHandler(WSGIRequestHandler):
    # A client that stops sending mid-request frees its thread after this long.
    timeout = 30

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # socketserver's default backlog of 5 makes the 6th simultaneous scraper wait for a SYN retry (1 s+).
    request_queue_size = 128

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can hang for
        # seconds on hosts without DNS; the WSGI environ only needs the bound address.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port
        self.setup_environ()

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("error while serving %s", client_address, exc_info=True)


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


_BIND_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EADDRNOTAVAIL: "address not available on this host",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AgentServer:
    """A threaded WSGI server running on a background thread until ``shutdown()``."""

    def __init__(self, app: Callable, address: str, port: int, poll_interval_s: float = 0.1):
        host = address.strip("[]")
        server_class = _ThreadingWSGIServer6 if ":" in host else _ThreadingWSGIServer
        try:
            server = server_class((host, port), _QuietHandler)
        except socket.gaierror as exc:
            raise ServerStartError(f"cannot listen on {_host_port(host, port)}: bad address ({exc.strerror})") from None
        except OverflowError:
            raise ServerStartError(f"cannot listen on {_host_port(host, port)}: port must be 0 to 65535") from None
        except OSError as exc:
            reason = _BIND_REASONS.get(exc.errno, exc.strerror or str(exc))
            error = ServerStartError(f"cannot listen on {_host_port(host, port)}: {reason}")
            error.errno = exc.errno
            raise error from None
        server.set_app(app)
        self._server = server
        self.address = host
        self.port: int = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, args=(poll_interval_s,), name=f"http-{self.port}", daemon=True
        )
        self._thread.start()
        self._stopped = False

    @property
    def url(self) -> str:
        """Where clients reach the server; a wildcard address is given as the loopback one."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.address, self.address)
        return f"http://{_host_port(host, self.port)}"

    def shutdown(self) -> None:
        """Stop serving and close the socket (idempotent). Requests in flight finish on their threads."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> AgentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def serve(app: Callable, address: str, port: int) -> AgentServer:
    """Serve ``app`` on ``address:port`` (port 0 picks a free one) from a background thread.

    Raises ServerStartError (an OSError) with a one-line message when it cannot listen.
    """
    return AgentServer(app, address, port)
