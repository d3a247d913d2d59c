"""The agent's HTTP server: /metrics for Prometheus, and a small JSON API for workloads.

Workloads in other processes report themselves here (start, stop, tokens, spans, declared GPU memory);
``agent.accounting`` validates every value and this module maps requests onto it. The routes, bodies
and status codes are documented in ``docs/openapi.yaml``.

Who may write: loopback clients always; any client when a bearer token is configured and the request
carries ``Authorization: Bearer <token>``. Reads (GET) are open, as /metrics must be for Prometheus.

DNS rebinding: a web page whose name resolves to 127.0.0.1 reaches the agent from loopback. So a
request that is trusted for being loopback (the /v1 API without a valid token) must name in ``Host`` an
address or name this agent serves: a loopback address, ``localhost`` or ``*.localhost``, the address it
is bound to (any IP literal when bound to a wildcard: rebinding needs a DNS name), the node's hostname,
or a name in ``allowed_hosts``. /metrics, /healthz and / do not check Host: Prometheus scrapes with pod
IPs, node names and service names this process cannot know, and they expose nothing a rebinding page
could not read from the network anyway.

Connections: each has ``request_deadline_s`` (default 10 s) for its whole request, head and body
(a client trickling a byte at a time is answered 408 and dropped), and at most ``max_connections``
(default 64, fewer under a low open-files limit) are served at once, ``max_connections_per_client`` of
them from one address; past either, the connection is answered 503 at once. Protocol errors (a bad
request line, headers too long, two different Content-Length values) get a status line and the same
JSON error body as the API.

A rejected request changes nothing and gets a 4xx with a one-line JSON body ``{"error": "..."}``; an
unexpected exception is logged here and answered 500, never with a traceback.
"""

from __future__ import annotations

import errno
import hmac
import io
import ipaddress
import json
import logging
import resource
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from urllib.parse import parse_qs
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from prometheus_client.exposition import gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

from wattledger.agent.accounting import MAX_SPANS_PER_CALL, TOKEN_KINDS, Accounting, AccountingError, Span
from wattledger.agent.scrape_cache import ScrapeCache
from wattledger.exporters.render import RowFamily, choose_renderer, compress
from wattledger.probes.errors import bounded_line

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024
# /v1/spans takes batches of up to MAX_SPANS_PER_CALL spans; the longest documented span (a 64-character
# name, int64 timestamps, 64 GPUs, four 17-digit ratios) is about 600 bytes as json.dumps writes it, so
# the largest batch is about 0.6 MB: 1 MiB leaves room for spacing.
DEFAULT_MAX_SPAN_BODY_BYTES = 1024 * 1024
# A whole request (line, headers and body) must arrive within this many seconds of the connection.
DEFAULT_REQUEST_DEADLINE_SECONDS = 10.0
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 32
# Writing a response to a client that stopped reading gives up after this long.
_WRITE_TIMEOUT_SECONDS = 10.0
# At most this many name[] filters in one scrape (the agent exports fewer families).
_MAX_NAME_FILTERS = 200
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
    "/v1/workloads/forget": _WRITE,
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


def _json_response(status: int, value: object, headers: Iterable[tuple[str, str]] = ()) -> _Response:
    body = json.dumps(value, separators=(",", ":")).encode("ascii") + b"\n"
    return status, [("Content-Type", "application/json"), *headers], body


def _error_response(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> _Response:
    return _json_response(status, {"error": bounded_line(message, _ERROR_MESSAGE_CHARS)}, headers)


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


def host_of(header: str) -> str | None:
    """The host in a ``Host`` header value, lower case, without port, brackets or a trailing dot; None
    when the value is malformed (two values joined by a comma, a bad port, an unbracketed IPv6)."""
    value = header.strip()
    if not value or "," in value or any(c.isspace() for c in value):
        return None
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1:]
        if end < 0 or (rest and not (rest[:1] == ":" and rest[1:].isascii() and rest[1:].isdigit())):
            return None
    else:
        host, sep, port = value.partition(":")
        if sep and not (port.isascii() and port.isdigit()):
            return None
    host = host.lower().rstrip(".")
    return host or None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def host_is_served(host_header: str, bound_address: str, names: Iterable[str]) -> bool:
    """Whether a ``Host`` header names this agent (see the module docstring for the rule)."""
    host = host_of(host_header)
    if host is None:
        return False
    address = _ip(host)
    if address is not None:
        if address.is_loopback:
            return True
        bound = _ip(bound_address) if bound_address else None
        return bound is None or bound.is_unspecified or bound == address
    return host == "localhost" or host.endswith(".localhost") or host in names


def node_host_names() -> frozenset[str]:
    """The node's hostname (and its first label), as clients on the node may call the agent."""
    name = socket.gethostname().lower().rstrip(".")
    return frozenset({name, name.split(".")[0]} - {""})


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
        max_span_body_bytes: int = DEFAULT_MAX_SPAN_BODY_BYTES,
        allowed_hosts: Iterable[str] = (),
    ):
        if bearer_token is not None and not bearer_token.strip():
            raise ValueError("bearer_token must not be empty (use None to accept loopback writes only)")
        if max_body_bytes < 1 or max_span_body_bytes < 1:
            raise ValueError("max_body_bytes and max_span_body_bytes must be at least 1")
        self._accounting = accounting
        self._registry = registry
        self._scrape_cache = ScrapeCache(self._render_metrics, scrape_cache_seconds)
        # One collection (one ledger snapshot) serves every scrape within the cache age, whatever its
        # format or name[] filter: no query string makes the agent collect again.
        self._families = _FamilyCache(registry, scrape_cache_seconds)
        self._is_healthy = is_healthy
        # A token read from a file or a Kubernetes Secret often ends in a newline; clients send it without.
        self._token = bearer_token.strip().encode("utf-8") if bearer_token is not None else None
        self._host_names = node_host_names() | {name.lower().rstrip(".") for name in allowed_hosts}
        self._max_body_bytes = max_body_bytes
        self._max_span_body_bytes = max_span_body_bytes
        self._clock_ns = clock_ns
        self._max_future_ns = max_future_ns
        self._posts = {
            "/v1/workloads/start": self._post_start,
            "/v1/workloads/stop": self._post_stop,
            "/v1/workloads/forget": self._post_forget,
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
            if path.startswith("/v1/") and is_loopback(environ.get("REMOTE_ADDR")):
                self._check_host(environ)
            return self._gets[path](environ)
        self._authorize(environ)
        limit = self._max_span_body_bytes if path == "/v1/spans" else self._max_body_bytes
        payload = self._read_json(environ, body_state, limit)
        return _json_response(200, self._posts[path](payload))

    # -- request plumbing -----------------------------------------------------------------------

    def _check_host(self, environ: dict) -> None:
        """403 for a loopback request naming a host this agent does not serve (DNS rebinding)."""
        host = environ.get("HTTP_HOST")
        if host is None:
            return  # HTTP/1.0 without Host: no browser sends that, so no rebinding either
        if not host_is_served(host, environ.get("SERVER_NAME", ""), self._host_names):
            raise HttpError(403, f"Host {host[:80]!r} is not an address or name of this agent (a DNS "
                                 "rebinding page?); use 127.0.0.1, localhost, the node's name, or a bearer token")

    def _has_valid_token(self, environ: dict) -> bool:
        if self._token is None:
            return False
        scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").strip().partition(" ")
        offered = credentials.strip().encode("latin-1", errors="replace")
        return scheme.lower() == "bearer" and hmac.compare_digest(offered, self._token)

    def _authorize(self, environ: dict) -> None:
        if is_loopback(environ.get("REMOTE_ADDR")):
            if not self._has_valid_token(environ):
                self._check_host(environ)  # trusted for being loopback: the Host must be ours
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

    def _read_json(self, environ: dict, body_state: dict, max_body_bytes: int) -> dict:
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
        if length > max_body_bytes:
            raise HttpError(413, f"body of {length} bytes is over the limit of {max_body_bytes}")
        body = self._read_body(environ, length, body_state, max_body_bytes)
        return parse_json_object(body)

    def _read_body(self, environ: dict, length: int, body_state: dict, max_body_bytes: int) -> bytes:
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
                if received > max_body_bytes:  # a stream that returns more than asked for
                    raise HttpError(413, f"body is over the limit of {max_body_bytes} bytes")
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
        # The key holds what changes the answer, normalised: the format chosen (not the Accept header's
        # spelling), whether gzip is accepted, and the sorted, unique name[] filters. Other query
        # parameters are ignored, so no query string can bypass the cache.
        encoder, content_type = choose_renderer(environ.get("HTTP_ACCEPT", ""))
        names = sorted(set(parse_qs(environ.get("QUERY_STRING", "")).get("name[]", [])))
        if len(names) > _MAX_NAME_FILTERS:
            raise HttpError(400, f"at most {_MAX_NAME_FILTERS} name[] filters per scrape")
        key = (content_type, gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")), tuple(names))
        return self._scrape_cache.get(key, lambda key: self._render_metrics(key, encoder))

    def _render_metrics(self, key: tuple, encoder: Callable | None = None) -> _Response:
        """The exposition for a cache key, as prometheus_client's own app would answer it (the agent's
        families written by the direct renderer, ``exporters/render.py``; gzip at its measured level)."""
        content_type, use_gzip, names = key
        if encoder is None:
            encoder, _ = choose_renderer(content_type)
        families = self._families.get()
        if names:
            families = _restricted(families, set(names))
        body = encoder(families)
        headers = [("Content-Type", content_type)]
        if use_gzip:
            body = compress(body)
            headers.append(("Content-Encoding", "gzip"))
        return 200, headers, body

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

    def _post_forget(self, body: dict) -> dict:
        _check_fields(body, ("workload",))
        self._accounting.forget(body["workload"])
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


def _restricted(families: list[Metric], names: set[str]) -> list[Metric]:
    """The samples named (prometheus_client's name[] semantics: sample names), family by family.

    A row family whose samples are all named is kept whole (the direct renderer still writes it); one
    with none named is skipped without building its samples; the rest are filtered sample by sample."""
    out = []
    for family in families:
        if isinstance(family, RowFamily):
            wanted = family.sample_names & names
            if not wanted or not family.rows:
                continue
            if wanted == family.sample_names:
                out.append(family)
                continue
        samples = [sample for sample in family.samples if sample.name in names]
        if samples:
            restricted = Metric(family.name, family.documentation, family.type, family.unit)
            restricted.samples = samples
            out.append(restricted)
    return out


class _FamilyCache:
    """The registry's families, collected at most once per ``max_age_seconds`` (0: every time)."""

    def __init__(self, registry: CollectorRegistry, max_age_seconds: float,
                 clock: Callable[[], float] = time.monotonic):
        self._registry = registry
        self._max_age = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._collected: tuple[float, list[Metric]] | None = None

    def get(self) -> list[Metric]:
        with self._lock:
            now = self._clock()
            if self._collected is not None and now - self._collected[0] < self._max_age:
                return self._collected[1]
            families = list(self._registry.collect())
            self._collected = (now, families)
            return families


def make_app(
    accounting: Accounting,
    registry: CollectorRegistry,
    is_healthy: Callable[[], bool],
    bearer_token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    clock_ns: Callable[[], int] = time.monotonic_ns,
    max_future_ns: int | None = DEFAULT_MAX_FUTURE_NS,
    scrape_cache_seconds: float = 0.0,
    max_span_body_bytes: int = DEFAULT_MAX_SPAN_BODY_BYTES,
    allowed_hosts: Iterable[str] = (),
) -> Callable:
    """The agent's WSGI application.

    ``registry`` is what /metrics exposes; ``is_healthy`` answers /healthz. ``bearer_token`` lets
    non-loopback clients write. ``clock_ns`` should be the Accounting's clock: timestamps more than
    ``max_future_ns`` ahead of it are refused (None turns that check off). Scrapes within
    ``scrape_cache_seconds`` of each other share one rendering (the agent uses its sampling interval;
    0 renders every scrape). /v1/spans bodies may be ``max_span_body_bytes``, others ``max_body_bytes``.
    ``allowed_hosts`` adds names a loopback client may use in ``Host`` (see the module docstring).
    """
    return _AgentApp(accounting, registry, is_healthy, bearer_token, max_body_bytes, clock_ns, max_future_ns,
                     scrape_cache_seconds, max_span_body_bytes, allowed_hosts)


# -- the server -----------------------------------------------------------------------------------


class ServerStartError(OSError):
    """The server could not listen; the message is one line naming the address and the reason."""


class _DeadlineReader(io.RawIOBase):
    """A socket's input that fails with TimeoutError once ``deadline`` (time.monotonic) has passed, however
    the client spaces its bytes: a per-recv timeout alone lets a byte every few seconds hold a thread."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(_WRITE_TIMEOUT_SECONDS)  # sends keep their own, longer timeout


def _framing_problem(headers) -> str | None:
    """Why the request's framing headers cannot be trusted (request smuggling), or None."""
    lengths = {part.strip() for value in headers.get_all("Content-Length", []) for part in value.split(",")}
    if len(lengths) > 1:
        return "conflicting Content-Length values: " + ", ".join(sorted(lengths))[:80]
    if len(headers.get_all("Host", [])) > 1:
        return "more than one Host header"
    return None


class _QuietHandler(WSGIRequestHandler):
    """wsgiref's handler with a deadline for the whole request and JSON error answers."""

    timeout = _WRITE_TIMEOUT_SECONDS
    # An HTTP/0.9 answer has no status line; we never give one.
    default_request_version = "HTTP/1.0"
    # What send_error and the access log read when a request timed out before its line was parsed.
    requestline = ""
    command = ""
    request_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # socketserver's reader (nothing read yet): its reference would keep the fd open
        deadline = time.monotonic() + self.server.request_deadline_s
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

    def handle(self) -> None:
        """Handle a single HTTP request (wsgiref's, with timeouts and framing checks answered)."""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414, "request line too long")
                return
            if not self.raw_requestline:
                return  # the client closed without a request
            if not self.parse_request():  # parse_request answered (through send_error)
                return
        except TimeoutError:
            self.send_error(408, f"the request did not arrive within {self.server.request_deadline_s:g} s")
            return
        problem = _framing_problem(self.headers)
        if problem is not None:
            self.send_error(400, problem)
            return
        handler = ServerHandler(self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=False)
        handler.request_handler = self  # back pointer for logging
        handler.run(self.server.get_app())

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """A status line, and the API's JSON error body (http.server would send HTML)."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        body = json.dumps({"error": bounded_line(message or phrase, _ERROR_MESSAGE_CHARS)}).encode("ascii") + b"\n"
        self.close_connection = True
        if getattr(self, "request_version", "") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        try:
            self.send_response(code, phrase)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass  # the client is gone

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def default_max_connections() -> int:
    """DEFAULT_MAX_CONNECTIONS, or fewer when the open-files limit is low: each connection is a file
    descriptor, and running out of them would stop the agent from accepting even a scrape."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return DEFAULT_MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(4, min(DEFAULT_MAX_CONNECTIONS, (soft - 32) // 2))


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # socketserver's default backlog of 5 makes the 6th simultaneous scraper wait for a SYN retry (1 s+).
    request_queue_size = 128
    request_deadline_s = DEFAULT_REQUEST_DEADLINE_SECONDS
    max_connections = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client = DEFAULT_MAX_CONNECTIONS_PER_CLIENT

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can hang for
        # seconds on hosts without DNS; the WSGI environ only needs the bound address.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port
        self.setup_environ()
        self._slots_lock = threading.Lock()
        self._open_connections = 0
        self._open_by_client: dict[str, int] = {}

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.05)  # out of descriptors: do not spin on a listening socket that stays readable
            raise

    def process_request(self, request, client_address) -> None:
        client = str(client_address[0])
        with self._slots_lock:
            full = (self._open_connections >= self.max_connections
                    or self._open_by_client.get(client, 0) >= self.max_connections_per_client)
            if not full:
                self._open_connections += 1
                self._open_by_client[client] = self._open_by_client.get(client, 0) + 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # e.g. no thread could be started
            self._release(client)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(str(client_address[0]))

    def _release(self, client: str) -> None:
        with self._slots_lock:
            self._open_connections -= 1
            left = self._open_by_client.get(client, 1) - 1
            if left:
                self._open_by_client[client] = left
            else:
                self._open_by_client.pop(client, None)

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 on the accepting thread without waiting for the client, then close."""
        body = json.dumps({"error": f"too many connections (at most {self.max_connections}, "
                                    f"{self.max_connections_per_client} per client); retry"}).encode() + b"\n"
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)
            try:
                request.recv(65536)  # what has arrived already: closing with unread input sends a reset
            except OSError:
                pass
            request.send(head + body)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

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
    """A threaded WSGI server running on a background thread until ``shutdown()``.

    ``request_deadline_s``: time for a connection's whole request; ``max_connections`` (default: see
    ``default_max_connections``) and ``max_connections_per_client``: connections served at once."""

    def __init__(self, app: Callable, address: str, port: int, poll_interval_s: float = 0.1,
                 request_deadline_s: float = DEFAULT_REQUEST_DEADLINE_SECONDS, max_connections: int | None = None,
                 max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT):
        host = address.strip("[]")
        server_class = _ThreadingWSGIServer6 if ":" in host else _ThreadingWSGIServer
        try:
            server = server_class((host, port), _QuietHandler, bind_and_activate=False)
            server.request_deadline_s = request_deadline_s
            server.max_connections = max_connections if max_connections is not None else default_max_connections()
            server.max_connections_per_client = max_connections_per_client
            try:
                server.server_bind()
                server.server_activate()
            except BaseException:
                server.server_close()
                raise
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


def serve(app: Callable, address: str, port: int, **limits: object) -> AgentServer:
    """Serve ``app`` on ``address:port`` (port 0 picks a free one) from a background thread. ``limits``
    are AgentServer's (request_deadline_s, max_connections, max_connections_per_client).

    Raises ServerStartError (an OSError) with a one-line message when it cannot listen.
    """
    return AgentServer(app, address, port, **limits)
