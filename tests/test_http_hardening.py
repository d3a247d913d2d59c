"""HTTP hardening over real loopback sockets (issue 8, item 13): Host against DNS rebinding, a deadline
per request, a connection cap, framing errors, JSON protocol errors, the scrape cache and query strings,
the largest span batch, and a token with a trailing newline."""

from __future__ import annotations

import json
import select
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from test_http_api import (
    OPENAPI, REMOTE, TOKEN, assert_json_error, call_app, check_against_doc, http_request, make_registry,
    request_schema_valid, seeded_accounting, snapshot,
)
from wattledger.agent.accounting import MAX_SPANS_PER_CALL, Accounting
from wattledger.agent.http_api import (
    DEFAULT_MAX_SPAN_BODY_BYTES, host_is_served, host_of, make_app, serve,
)

TOKENS = json.dumps({"workload": "chat", "kind": "generated", "count": 1}).encode()


def raw_exchange(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), lines[0]
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.fixture
def server():
    servers = []

    def start(accounting=None, registry=None, app_kwargs=None, **limits):
        accounting = accounting if accounting is not None else seeded_accounting()
        app = make_app(accounting, registry or make_registry(), lambda: True, **(app_kwargs or {}))
        running = serve(app, "127.0.0.1", 0, **limits)
        servers.append(running)
        return running, accounting

    yield start
    for running in servers:
        running.shutdown()


# -- Host and DNS rebinding ---------------------------------------------------------------------------


def test_a_rebinding_page_cannot_write_or_list_workloads_from_loopback(server):
    running, accounting = server(app_kwargs={"bearer_token": TOKEN})
    before = snapshot(accounting)
    evil = {"Host": f"attacker.example:{running.port}", "Content-Type": "application/json"}
    status, headers, body = http_request(running, "POST", "/v1/tokens", TOKENS, evil)
    assert "DNS" in assert_json_error(status, headers, body, 403)
    check_against_doc("/v1/tokens", "POST", status, headers, body)
    status, headers, body = http_request(running, "GET", "/v1/workloads", None, {"Host": "attacker.example"})
    assert_json_error(status, headers, body, 403)
    check_against_doc("/v1/workloads", "GET", status, headers, body)
    assert snapshot(accounting) == before
    # Scrapes never check Host; a request with the token is not loopback-trusted, so Host is not needed.
    assert http_request(running, "GET", "/metrics", None, {"Host": "attacker.example"})[0] == 200
    assert http_request(running, "POST", "/v1/tokens", TOKENS, {**evil, "Authorization": f"Bearer {TOKEN}"})[0] == 200
    for host in (f"127.0.0.1:{running.port}", "localhost", f"[::1]:{running.port}", "agent.localhost"):
        assert http_request(running, "POST", "/v1/tokens", TOKENS,
                            {"Host": host, "Content-Type": "application/json"})[0] == 200, host


@pytest.mark.parametrize(("host", "bound", "served"), [
    ("127.0.0.1:9478", "127.0.0.1", True), ("127.5.5.5", "127.0.0.1", True), ("[::1]:9478", "::1", True),
    ("localhost", "127.0.0.1", True), ("LOCALHOST.:9478", "127.0.0.1", True), ("x.localhost", "0.0.0.0", True),
    ("10.1.2.3:9478", "10.1.2.3", True), ("10.1.2.3", "127.0.0.1", False), ("10.1.2.3", "0.0.0.0", True),
    ("[2001:db8::5]", "::", True), ("node-a", "0.0.0.0", True), ("attacker.example", "0.0.0.0", False),
    ("attacker.example", "127.0.0.1", False), ("localhost.attacker.example", "127.0.0.1", False),
    ("127.0.0.1.nip.io", "127.0.0.1", False), ("a,b", "127.0.0.1", False), ("localhost:80x", "127.0.0.1", False),
    ("::1", "::1", False), ("", "127.0.0.1", False), ("[::1", "::1", False),
])
def test_host_is_served(host, bound, served):
    assert host_is_served(host, bound, {"node-a"}) is served


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_host_parsing_never_raises_and_dns_names_need_listing(header):
    host = host_of(header)
    served = host_is_served(header, "0.0.0.0", set())
    assert host is None or host == host.lower()
    if served and host is not None and not host.replace(".", "").replace(":", "").isalnum():
        assert host == "localhost" or host.endswith(".localhost") or ":" in host or host[0].isdigit()


# -- deadline, connection cap -----------------------------------------------------------------------


def test_a_client_trickling_bytes_is_answered_408_at_the_deadline(server):
    running, accounting = server(request_deadline_s=0.5)
    before = snapshot(accounting)
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
        request = b"POST /v1/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        answered = False
        for byte in request:  # one byte every 0.1 s, far under any per-recv timeout
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.1)[0]:
                answered = True
                break
        assert answered, "the server waited for the whole trickle"
        answer = read_until_closed(sock)
    status, headers, body = parse_response(answer)
    assert status == 408 and headers["content-type"] == "application/json"
    assert "did not arrive" in json.loads(body)["error"]
    assert snapshot(accounting) == before


def test_a_body_that_trickles_past_the_deadline_is_408(server):
    running, _ = server(request_deadline_s=0.5)
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        answer = read_until_closed(sock)
    status, headers, body = parse_response(answer)
    assert_json_error(status, headers, body, 408)


def wait_for_open_connections(running, count: int, fewer: bool = False, timeout_s: float = 30.0) -> None:
    """Until the server holds at least ``count`` connections (with ``fewer``: at most ``count``). Its accept
    loop and connection threads run on their own: on a busy host they take a while to get there, and a
    fixed sleep here was a race with the scheduler. The timeout only ends a hung server."""
    deadline = time.monotonic() + timeout_s
    while (running._server._open_connections > count) if fewer else (running._server._open_connections < count):
        if time.monotonic() > deadline:
            raise AssertionError(f"the server never held {'at most' if fewer else 'at least'} {count} connections")
        time.sleep(0.01)


def test_past_the_connection_cap_a_client_is_answered_503_at_once_and_scrapes_resume(server):
    running, _ = server(max_connections=2, request_deadline_s=30)
    idle = [socket.create_connection(("127.0.0.1", running.port), timeout=5) for _ in range(2)]
    try:
        wait_for_open_connections(running, 2)  # both accepted and holding a slot
        status, headers, body = parse_response(raw_exchange(running.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 503 and headers["retry-after"] == "1"
        assert "too many connections" in json.loads(body)["error"]
    finally:
        for sock in idle:
            sock.close()
    # The slots free as the idle connections' threads see them close (however long the host takes).
    wait_for_open_connections(running, 0, fewer=True)
    assert http_request(running, "GET", "/metrics")[0] == 200


def test_one_client_cannot_take_every_connection(server):
    running, _ = server(max_connections=10, max_connections_per_client=2, request_deadline_s=30)
    idle = [socket.create_connection(("127.0.0.1", running.port), timeout=5) for _ in range(2)]
    try:
        wait_for_open_connections(running, 2)
        status, _, _ = parse_response(raw_exchange(running.port, b"GET /healthz HTTP/1.0\r\n\r\n"))
        assert status == 503
    finally:
        for sock in idle:
            sock.close()


# -- framing and protocol errors --------------------------------------------------------------------


def test_two_different_content_lengths_are_a_400_and_change_nothing(server):
    running, accounting = server()
    before = snapshot(accounting)
    for lengths in ((len(TOKENS), len(TOKENS) + 5), (len(TOKENS), 0)):
        head = (b"POST /v1/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + b"".join(b"Content-Length: %d\r\n" % n for n in lengths) + b"\r\n")
        status, headers, body = parse_response(raw_exchange(running.port, head + TOKENS))
        assert "Content-Length" in assert_json_error(status, headers, body, 400)
    assert snapshot(accounting) == before
    # The same length twice is one length (RFC 9110 lets a recipient accept it).
    head = (b"POST /v1/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n" % len(TOKENS) * 2 + b"\r\n")
    assert parse_response(raw_exchange(running.port, head + TOKENS))[0] == 200


@pytest.mark.parametrize(("request_bytes", "expected"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\n\r\n", 505),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /v1/workloads HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n", 400),
])
def test_protocol_errors_get_a_status_line_and_the_json_error(server, request_bytes, expected):
    running, _ = server()
    status, headers, body = parse_response(raw_exchange(running.port, request_bytes))
    assert_json_error(status, headers, body, expected)


# -- the scrape cache and query strings --------------------------------------------------------------


class CountingCollector(Collector):
    def __init__(self):
        self.collections = 0

    def collect(self):
        self.collections += 1
        family = GaugeMetricFamily("wattledger_test_value", "A value.", labels=["n"])
        family.add_metric(["1"], 1.0)
        yield family
        yield GaugeMetricFamily("wattledger_test_other", "Another.", value=2.0)


def test_query_strings_cannot_bypass_the_scrape_cache_and_name_filters_still_work():
    collector = CountingCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    app = make_app(Accounting([0]), registry, lambda: True, scrape_cache_seconds=60)
    plain = call_app(app, "GET", "/metrics")
    for path in ("/metrics?x=1", "/metrics?x=2&y=3", "/metrics?" + "z=1&" * 50, "/metrics?name[]"):
        assert call_app(app, "GET", path)[2] == plain[2]
    assert collector.collections == 1
    status, _, body = call_app(app, "GET", "/metrics?name[]=wattledger_test_other&junk=1")
    assert status == 200 and b"wattledger_test_other 2.0" in body and b"test_value" not in body
    same = call_app(app, "GET", "/metrics?name[]=wattledger_test_other&name[]=wattledger_test_other&x=9")
    assert same[2] == body
    openmetrics = call_app(app, "GET", "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics[2].endswith(b"# EOF\n")
    assert collector.collections == 1  # one collection served every format and filter


def test_too_many_name_filters_are_a_400():
    app = make_app(Accounting([0]), make_registry(), lambda: True)
    query = "&".join(f"name[]=m{i}" for i in range(201))
    assert_json_error(*call_app(app, "GET", "/metrics?" + query), 400)


# -- the largest documented span batch, and a Secret's newline --------------------------------------


def largest_documented_span() -> dict:
    return {"workload": "a" + "z" * 63, "kind": "checkpoint", "start_ns": 2**63 - 2, "end_ns": 2**63 - 1,
            "gpus": list(range(64)),
            "activity": {k: 0.30000000000000004 for k in ("gpu", "sm", "tensor", "dram")}}


def test_the_largest_documented_span_batch_fits_the_body_limit():
    schema = OPENAPI["components"]["schemas"]
    assert schema["SpanBatch"]["properties"]["spans"]["maxItems"] == MAX_SPANS_PER_CALL
    assert schema["GpuList"]["maxItems"] == 64
    batch = {"spans": [largest_documented_span() for _ in range(MAX_SPANS_PER_CALL)]}
    raw = json.dumps(batch).encode()
    assert request_schema_valid("/v1/spans", batch)
    assert len(raw) <= DEFAULT_MAX_SPAN_BODY_BYTES
    accounting = Accounting(range(64))
    app = make_app(accounting, make_registry(), lambda: True, max_future_ns=None)
    status, headers, body = call_app(app, "POST", "/v1/spans", raw)
    assert status == 200, body
    assert len(accounting.recent_spans()) == MAX_SPANS_PER_CALL


def test_a_token_read_from_a_secret_with_a_trailing_newline_still_matches():
    accounting = seeded_accounting()
    app = make_app(accounting, make_registry(), lambda: True, bearer_token=TOKEN + "\n")
    status, _, body = call_app(app, "POST", "/v1/tokens", TOKENS, remote_addr=REMOTE,
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    assert_json_error(*call_app(app, "POST", "/v1/tokens", TOKENS, remote_addr=REMOTE,
                                headers={"Authorization": "Bearer wrong"}), 401)
