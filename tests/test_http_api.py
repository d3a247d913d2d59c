"""The agent's HTTP API: real servers on 127.0.0.1, the WSGI app called in-process, and the OpenAPI
document as a contract.

Every refused request must leave the accounting exactly as it was, so the bad-input tests snapshot the
store before and after. Requests that must look non-loopback never leave the process: the WSGI app is
called directly (or wrapped) with a documentation address (192.0.2.0/24) as REMOTE_ADDR.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import logging
import math
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from wattledger.agent.accounting import MAX_SPANS_PER_CALL, SPAN_KINDS, TOKEN_KINDS, Accounting
from wattledger.agent.client import AgentClient, AgentClientError
from wattledger.agent.http_api import ROUTES, ServerStartError, is_loopback, make_app, serve

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
REMOTE = "192.0.2.7"  # TEST-NET-1: never routed, only ever used as a fake REMOTE_ADDR here
TOKEN = "s3cret-token"
WRITE_PATHS = [path for path, methods in ROUTES.items() if "POST" in methods]


# -- helpers ------------------------------------------------------------------------------------


def make_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("wattledger_test_events_total", "Events seen by the test.", registry=registry).inc(3)
    Gauge("wattledger_test_power_watts", "A gauge in the test.", ["gpu"], registry=registry).labels("0").set(123.5)
    return registry


def snapshot(accounting: Accounting) -> tuple:
    return accounting.tokens(), accounting.workloads(), accounting.recent_spans()


def seeded_accounting(**kwargs) -> Accounting:
    """GPUs 0 and 1; "chat" running on GPU 0 with tokens, memory and a span; "idle" stopped."""
    accounting = Accounting([0, 1], **kwargs)
    accounting.start("chat", [0], pid=4242)
    accounting.add_tokens("chat", "generated", 7)
    accounting.set_memory("chat", 0, 1 << 30)
    accounting.add_spans([accounting.make_span("chat", "compute", 10, 20, [0])])
    accounting.start("idle", [1])
    accounting.stop("idle")
    return accounting


def call_app(app, method: str, path: str, body: bytes | None = None, *, content_type="application/json",
             remote_addr="127.0.0.1", headers: dict | None = None, content_length: str | None = None):
    """Call the WSGI app in-process; returns (status, headers dict with lower-case names, body)."""
    environ: dict = {}
    setup_testing_defaults(environ)
    path, _, query = path.partition("?")
    environ.update(REQUEST_METHOD=method, PATH_INFO=path, QUERY_STRING=query, REMOTE_ADDR=remote_addr)
    if body is not None:
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body)) if content_length is None else content_length
    elif content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    captured: dict = {}

    def start_response(status, response_headers, exc_info=None):
        captured["status"] = int(status.split()[0])
        captured["headers"] = {k.lower(): v for k, v in response_headers}

    out = b"".join(app(environ, start_response))
    return captured["status"], captured["headers"], out


def http_request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request over a real connection to 127.0.0.1; returns (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def post_json(server, path: str, value, headers: dict | None = None):
    return http_request(server, "POST", path, json.dumps(value).encode(),
                        {"Content-Type": "application/json", **(headers or {})})


def assert_json_error(status: int, headers: dict, body: bytes, expected: int) -> str:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    document = json.loads(body)
    assert set(document) == {"error"}
    message = document["error"]
    assert isinstance(message, str) and message and "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def live():
    """Start servers on 127.0.0.1 with a free port; all are shut down after the test."""
    servers = []

    def start(accounting: Accounting, registry: CollectorRegistry | None = None, wrap=None, **kwargs):
        app = make_app(accounting, registry or make_registry(), lambda: True, **kwargs)
        server = serve(wrap(app) if wrap else app, "127.0.0.1", 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


# -- the OpenAPI document as a contract -----------------------------------------------------------

OPENAPI = yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8"))
_DOC_URI = "urn:wattledger:openapi"
_SCHEMAS = Registry().with_resource(_DOC_URI, Resource.from_contents(OPENAPI, default_specification=DRAFT202012))
_validators: dict[str, Draft202012Validator] = {}


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


def doc_validator(pointer: str) -> Draft202012Validator:
    if pointer not in _validators:
        _validators[pointer] = Draft202012Validator({"$ref": _DOC_URI + pointer}, registry=_SCHEMAS)
    return _validators[pointer]


def documented_response(path: str, method: str, status: int) -> tuple[dict, str] | None:
    """The response object documented for ``status`` and its JSON pointer, a components $ref followed."""
    pointer = _pointer("paths", path, method.lower(), "responses", str(status))
    response = OPENAPI["paths"][path][method.lower()]["responses"].get(str(status))
    if response is not None and "$ref" in response:
        pointer = response["$ref"]
        response = OPENAPI["components"]["responses"][pointer.rsplit("/", 1)[1]]
    return None if response is None else (response, pointer)


def check_against_doc(path: str, method: str, status: int, headers: dict, body: bytes) -> None:
    """The answer's status is documented for the operation and its JSON body fits the schema there."""
    found = documented_response(path, method, status)
    assert found is not None, f"{method} {path} answered {status}, which docs/openapi.yaml does not list"
    response, pointer = found
    if headers.get("content-type") == "application/json":
        assert "application/json" in response["content"], (path, status)
        validator = doc_validator(pointer + "/content/application~1json/schema")
        errors = list(validator.iter_errors(json.loads(body)))
        assert not errors, errors[0].message


def request_schema_valid(path: str, value) -> bool:
    pointer = _pointer("paths", path, "post", "requestBody", "content", "application/json", "schema")
    return doc_validator(pointer).is_valid(value)


def test_openapi_document_is_valid_openapi_3_1():
    assert OPENAPI["openapi"].startswith("3.1")
    validate_openapi(OPENAPI)


def test_every_route_is_documented_and_every_documented_route_is_served():
    documented = {
        path: sorted(m.upper() for m in item if m in ("get", "post", "put", "delete", "patch", "head"))
        for path, item in OPENAPI["paths"].items()
    }
    served = {path: sorted(m for m in methods if m != "HEAD") for path, methods in ROUTES.items()}
    assert documented == served
    # ROUTES is what the app really routes: each documented operation is neither 404 nor 405 ...
    app = make_app(seeded_accounting(), make_registry(), lambda: True)
    for path, methods in documented.items():
        for method in methods:
            status, _, _ = call_app(app, method, path, b"{}" if method == "POST" else None)
            assert status not in (404, 405), (method, path, status)
    # ... and paths that are not documented are 404.
    for path in ("/v1", "/metrics/", "/v1/workloads/", "/v2/tokens", "/openapi.yaml"):
        assert call_app(app, "GET", path)[0] == 404


def test_documented_examples_are_valid_and_accepted():
    accounting = Accounting([0])
    app = make_app(accounting, make_registry(), lambda: True)
    order = ["/v1/workloads/start", "/v1/memory", "/v1/tokens", "/v1/spans", "/v1/workloads/stop",
             "/v1/workloads/forget"]
    assert sorted(order) == sorted(WRITE_PATHS)
    for path in order:
        example = OPENAPI["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        assert request_schema_valid(path, example), path
        status, headers, body = call_app(app, "POST", path, json.dumps(example).encode())
        assert status == 200, (path, body)
        check_against_doc(path, "POST", status, headers, body)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("/v1/tokens", {"workload": "Chat", "kind": "generated", "count": 1}),
        ("/v1/tokens", {"workload": "chat", "kind": "words", "count": 1}),
        ("/v1/tokens", {"workload": "chat", "kind": "generated", "count": 10**9 + 1}),
        ("/v1/tokens", {"workload": "chat", "kind": "generated", "count": 1, "extra": 1}),
        ("/v1/spans", {"workload": "chat", "kind": "nap", "start_ns": 1, "end_ns": 2, "gpus": [0]}),
        ("/v1/spans", {"spans": [{"workload": "chat"}]}),
        ("/v1/workloads/start", {"workload": "chat", "gpus": []}),
        ("/v1/memory", {"workload": "chat", "gpu": 0, "bytes": -1}),
    ],
)
def test_documented_schemas_refuse_what_the_server_refuses(path, value):
    assert not request_schema_valid(path, value)
    app = make_app(seeded_accounting(), make_registry(), lambda: True)
    assert call_app(app, "POST", path, json.dumps(value).encode())[0] == 422


# -- every route works ----------------------------------------------------------------------------


def test_every_route_works_over_http(live):
    accounting = Accounting([0, 1])
    registry = make_registry()
    server = live(accounting, registry)
    assert server.url == f"http://127.0.0.1:{server.port}"

    status, headers, body = http_request(server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b'href="/metrics"' in body
    assert http_request(server, "GET", "/healthz")[::2] == (200, b"ok\n")

    assert post_json(server, "/v1/workloads/start", {"workload": "chat", "gpus": [0, 1], "pid": 1234})[0] == 200
    status, headers, body = post_json(server, "/v1/tokens", {"workload": "chat", "kind": "generated", "count": 128})
    assert (status, json.loads(body)) == (200, {"ok": True, "workload": "chat"})
    assert post_json(server, "/v1/tokens", {"workload": "chat", "kind": "prompt", "count": 0})[0] == 200
    assert post_json(server, "/v1/memory", {"workload": "chat", "gpu": 1, "bytes": 5 << 30})[0] == 200
    single = {"workload": "chat", "kind": "compute", "start_ns": 100, "end_ns": 200, "gpus": [0],
              "activity": {"gpu": 1, "sm": 0.8, "tensor": 0.5, "dram": 0.25}}
    status, _, body = post_json(server, "/v1/spans", single)
    assert (status, json.loads(body)) == (200, {"ok": True, "spans": 1})
    batch = {"spans": [{"workload": "chat", "kind": "tool_call", "start_ns": 200, "end_ns": 300, "gpus": [1]},
                       {"workload": "rag", "kind": "transfer", "start_ns": 300, "end_ns": 300, "gpus": [0, 1]}]}
    status, headers, body = post_json(server, "/v1/spans", batch)
    assert (status, json.loads(body)) == (200, {"ok": True, "spans": 2})
    check_against_doc("/v1/spans", "POST", status, headers, body)

    assert accounting.tokens() == {("chat", "generated"): 128, ("chat", "prompt"): 0}
    assert [s.to_json() for s in accounting.recent_spans()] == [single, *batch["spans"]]
    assert accounting.declared_memory_bytes(1) == 5 << 30

    status, headers, body = http_request(server, "GET", "/v1/workloads")
    assert status == 200 and headers["content-type"] == "application/json"
    listed = json.loads(body)
    assert doc_validator(_pointer("paths", "/v1/workloads", "get", "responses", "200", "content",
                                  "application/json", "schema")).is_valid(listed)
    assert listed == [
        {"name": "chat", "running": True, "gpus": [0, 1], "pid": 1234,
         "tokens": {"prompt": 0, "generated": 128, "trained": 0}, "memory_bytes": {"1": 5 << 30}},
        {"name": "rag", "running": False, "gpus": [], "pid": None,
         "tokens": {"prompt": 0, "generated": 0, "trained": 0}, "memory_bytes": {}},
    ]

    stamp = time.monotonic_ns()
    assert post_json(server, "/v1/workloads/stop", {"workload": "chat", "timestamp_ns": stamp})[0] == 200
    (chat,) = [w for w in accounting.workloads() if w.name == "chat"]
    assert not chat.running and chat.pid is None and chat.memory_bytes == {}
    assert accounting.running_on(0, 0, stamp + 10)[-1][2] == stamp
    # A stopped workload starts again, and explicit nulls mean "absent".
    body = {"workload": "chat", "gpus": [0], "pid": None, "timestamp_ns": None}
    assert post_json(server, "/v1/workloads/start", body)[0] == 200


def test_metrics_is_the_registry_exposition_with_negotiation_and_gzip(live):
    registry = make_registry()
    server = live(Accounting([0]), registry)
    status, headers, body = http_request(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert body == generate_latest(registry)
    assert b'wattledger_test_power_watts{gpu="0"} 123.5' in body

    status, headers, body = http_request(server, "GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == generate_latest(registry)

    status, headers, body = http_request(server, "GET", "/metrics",
                                         headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["content-type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")

    status, _, body = http_request(server, "GET", "/metrics?name[]=wattledger_test_power_watts")
    assert b"wattledger_test_power_watts" in body and b"events_total" not in body

    status, headers, body = http_request(server, "HEAD", "/metrics")
    assert status == 200 and body == b"" and int(headers["content-length"]) == len(generate_latest(registry))


def test_healthz_follows_is_healthy_and_survives_a_raising_check(caplog):
    healthy = [True]
    app = make_app(Accounting([0]), make_registry(), lambda: healthy[0])
    assert call_app(app, "GET", "/healthz")[::2] == (200, b"ok\n")
    healthy[0] = False
    assert call_app(app, "GET", "/healthz")[::2] == (503, b"unhealthy\n")

    def broken() -> bool:
        raise RuntimeError("sampler exploded")

    app = make_app(Accounting([0]), make_registry(), broken)
    with caplog.at_level(logging.ERROR, logger="wattledger.agent.http_api"):
        assert call_app(app, "GET", "/healthz")[0] == 503
    assert "sampler exploded" in caplog.text


def test_head_requests_get_headers_but_no_body():
    app = make_app(seeded_accounting(), make_registry(), lambda: True)
    _, _, full = call_app(app, "GET", "/v1/workloads")
    status, headers, body = call_app(app, "HEAD", "/v1/workloads")
    assert status == 200 and body == b"" and int(headers["content-length"]) == len(full) > 0


# -- bad input: a 4xx with a JSON error, and nothing changes ------------------------------------

GOOD_SPAN = {"workload": "chat", "kind": "compute", "start_ns": 1, "end_ns": 2, "gpus": [0]}


def _tokens(**overrides):
    return {"workload": "chat", "kind": "generated", "count": 5, **overrides}


def _span(**overrides):
    return {**GOOD_SPAN, **overrides}


RAW_BODIES = [
    # (case id, path, raw body, expected status)
    ("malformed", "/v1/tokens", b'{"workload": "chat", "kind": ', 400),
    ("empty body", "/v1/tokens", b"", 400),
    ("not utf-8", "/v1/tokens", b'{"workload": "ch\xffat", "kind": "generated", "count": 1}', 400),
    ("utf-16", "/v1/tokens", json.dumps(_tokens()).encode("utf-16"), 400),
    ("array", "/v1/tokens", b"[1, 2, 3]", 400),
    ("string", "/v1/spans", b'"spans"', 400),
    ("null", "/v1/workloads/start", b"null", 400),
    ("NaN count", "/v1/tokens", b'{"workload": "chat", "kind": "generated", "count": NaN}', 400),
    ("Infinity count", "/v1/tokens", b'{"workload": "chat", "kind": "generated", "count": Infinity}', 400),
    ("-Infinity ratio", "/v1/spans",
     json.dumps(_span()).encode()[:-1] + b', "activity": {"sm": -Infinity}}', 400),
    ("duplicate key", "/v1/tokens", b'{"workload": "chat", "kind": "generated", "count": 1, "count": 2}', 400),
    ("huge literal", "/v1/tokens", b'{"workload": "chat", "kind": "generated", "count": ' + b"9" * 5000 + b"}", 400),
    ("deep nesting", "/v1/tokens", b"[" * 30_000 + b"]" * 30_000, 400),
    ("count 1e400", "/v1/tokens", b'{"workload": "chat", "kind": "generated", "count": 1e400}', 422),
    ("over 64 KiB", "/v1/tokens", json.dumps(_tokens()).encode() + b" " * 65536, 413),
]

BAD_VALUES = [
    # (case id, path, JSON value, expected status)
    ("count string", "/v1/tokens", _tokens(count="5"), 422),
    ("count float", "/v1/tokens", _tokens(count=1.5), 422),
    ("count 1.0", "/v1/tokens", _tokens(count=1.0), 422),
    ("count bool", "/v1/tokens", _tokens(count=True), 422),
    ("count negative", "/v1/tokens", _tokens(count=-1), 422),
    ("count huge", "/v1/tokens", _tokens(count=10**9 + 1), 422),
    ("count null", "/v1/tokens", _tokens(count=None), 422),
    ("unknown token kind", "/v1/tokens", _tokens(kind="words"), 422),
    ("token kind list", "/v1/tokens", _tokens(kind=["generated"]), 422),
    ("unknown field", "/v1/tokens", _tokens(extra=1), 422),
    ("missing field", "/v1/tokens", {"workload": "chat", "kind": "generated"}, 422),
    ("name upper case", "/v1/tokens", _tokens(workload="Chat"), 422),
    ("name digit first", "/v1/tokens", _tokens(workload="9lives"), 422),
    ("name too long", "/v1/tokens", _tokens(workload="a" * 65), 422),
    ("name empty", "/v1/tokens", _tokens(workload=""), 422),
    ("name newline", "/v1/tokens", _tokens(workload="chat\n"), 422),
    ("name slash", "/v1/workloads/start", {"workload": "a/b", "gpus": [0]}, 422),
    ("name number", "/v1/tokens", _tokens(workload=5), 422),
    ("span end before start", "/v1/spans", _span(start_ns=10, end_ns=9), 422),
    ("span unknown kind", "/v1/spans", _span(kind="nap"), 422),
    ("span unknown gpu", "/v1/spans", _span(gpus=[7]), 422),
    ("span negative ns", "/v1/spans", _span(start_ns=-1), 422),
    ("span float ns", "/v1/spans", _span(end_ns=2.5), 422),
    ("span ns over int64", "/v1/spans", _span(end_ns=2**63), 422),
    ("span from the future", "/v1/spans", _span(end_ns=time.time_ns()), 422),
    ("span ratio over 1", "/v1/spans", _span(activity={"sm": 1.5}), 422),
    ("span unknown activity", "/v1/spans", _span(activity={"power": 0.5}), 422),
    ("span activity list", "/v1/spans", _span(activity=[0.5]), 422),
    ("span missing gpus", "/v1/spans", {k: v for k, v in GOOD_SPAN.items() if k != "gpus"}, 422),
    ("batch with one bad span", "/v1/spans", {"spans": [GOOD_SPAN, _span(end_ns=0)]}, 422),
    ("batch not a list", "/v1/spans", {"spans": GOOD_SPAN}, 422),
    ("batch item not an object", "/v1/spans", {"spans": [GOOD_SPAN, 3]}, 422),
    ("batch and span fields", "/v1/spans", {"spans": [GOOD_SPAN], "workload": "chat"}, 422),
    ("start unknown gpu", "/v1/workloads/start", {"workload": "new", "gpus": [7]}, 422),
    ("start no gpus", "/v1/workloads/start", {"workload": "new", "gpus": []}, 422),
    ("start repeated gpu", "/v1/workloads/start", {"workload": "new", "gpus": [0, 0]}, 422),
    ("start gpus not a list", "/v1/workloads/start", {"workload": "new", "gpus": 0}, 422),
    ("start bad pid", "/v1/workloads/start", {"workload": "new", "gpus": [0], "pid": -1}, 422),
    ("start wall-clock stamp", "/v1/workloads/start",
     {"workload": "new", "gpus": [0], "timestamp_ns": time.time_ns()}, 422),
    ("start already running", "/v1/workloads/start", {"workload": "chat", "gpus": [1]}, 409),
    ("stop not running", "/v1/workloads/stop", {"workload": "idle"}, 409),
    ("stop unknown", "/v1/workloads/stop", {"workload": "ghost"}, 409),
    ("stop before start", "/v1/workloads/stop", {"workload": "chat", "timestamp_ns": 0}, 422),
    ("memory not running", "/v1/memory", {"workload": "idle", "gpu": 1, "bytes": 1}, 409),
    ("memory other gpu", "/v1/memory", {"workload": "chat", "gpu": 1, "bytes": 1}, 422),
    ("memory unknown gpu", "/v1/memory", {"workload": "chat", "gpu": 9, "bytes": 1}, 422),
    ("memory negative", "/v1/memory", {"workload": "chat", "gpu": 0, "bytes": -1}, 422),
    ("memory 2**50", "/v1/memory", {"workload": "chat", "gpu": 0, "bytes": 2**50}, 422),
]


@pytest.fixture(scope="module")
def seeded_server():
    """One server for the tests of refused requests, which must not change it (each test checks)."""
    accounting = seeded_accounting()
    server = serve(make_app(accounting, make_registry(), lambda: True), "127.0.0.1", 0)
    yield server, accounting
    server.shutdown()


@pytest.mark.parametrize(("case", "path", "raw", "expected"), RAW_BODIES, ids=[c[0] for c in RAW_BODIES])
def test_malformed_bodies_are_refused_and_change_nothing(seeded_server, case, path, raw, expected):
    server, accounting = seeded_server
    before = snapshot(accounting)
    status, headers, body = http_request(server, "POST", path, raw, {"Content-Type": "application/json"})
    assert_json_error(status, headers, body, expected)
    check_against_doc(path, "POST", status, headers, body)
    assert snapshot(accounting) == before


@pytest.mark.parametrize(("case", "path", "value", "expected"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_values_are_refused_and_change_nothing(seeded_server, case, path, value, expected):
    server, accounting = seeded_server
    before = snapshot(accounting)
    raw = json.dumps(value).encode()
    status, headers, body = http_request(server, "POST", path, raw, {"Content-Type": "application/json"})
    assert_json_error(status, headers, body, expected)
    check_against_doc(path, "POST", status, headers, body)
    assert snapshot(accounting) == before


def test_batch_error_names_the_bad_span(seeded_server):
    server, accounting = seeded_server
    status, headers, body = post_json(server, "/v1/spans", {"spans": [GOOD_SPAN, GOOD_SPAN, _span(gpus=[5])]})
    assert assert_json_error(status, headers, body, 422).startswith("spans[2]: gpu 5 does not exist")


def test_too_many_spans_in_one_batch_is_refused():
    accounting = seeded_accounting()
    app = make_app(accounting, make_registry(), lambda: True, max_body_bytes=1 << 20)
    before = snapshot(accounting)
    raw = json.dumps({"spans": [GOOD_SPAN] * (MAX_SPANS_PER_CALL + 1)}).encode()
    assert_json_error(*call_app(app, "POST", "/v1/spans", raw), 422)
    assert snapshot(accounting) == before
    raw = json.dumps({"spans": [GOOD_SPAN] * MAX_SPANS_PER_CALL}).encode()
    assert call_app(app, "POST", "/v1/spans", raw)[0] == 200
    assert len(accounting.recent_spans()) == len(before[2]) + MAX_SPANS_PER_CALL


@pytest.mark.parametrize(
    ("method", "path", "raw", "headers", "expected", "allow"),
    [
        ("POST", "/v1/tokens", json.dumps(_tokens()).encode(), {"Content-Type": "text/plain"}, 415, None),
        ("POST", "/v1/tokens", json.dumps(_tokens()).encode(), {}, 415, None),
        ("POST", "/v1/tokens", json.dumps(_tokens()).encode(),
         {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
        ("POST", "/v1/tokens", json.dumps(_tokens()).encode(),
         {"Content-Type": "application/json; charset=latin-1"}, 415, None),
        ("GET", "/v1/tokens", None, {}, 405, "POST"),
        ("PUT", "/v1/spans", b"{}", {"Content-Type": "application/json"}, 405, "POST"),
        ("POST", "/metrics", b"{}", {"Content-Type": "application/json"}, 405, "GET, HEAD"),
        ("DELETE", "/v1/workloads", None, {}, 405, "GET, HEAD"),
        ("GET", "/nope", None, {}, 404, None),
        ("POST", "/v1/token", json.dumps(_tokens()).encode(), {"Content-Type": "application/json"}, 404, None),
    ],
)
def test_wrong_method_path_or_content_type(seeded_server, method, path, raw, headers, expected, allow):
    server, accounting = seeded_server
    before = snapshot(accounting)
    status, response_headers, body = http_request(server, method, path, raw, headers)
    assert_json_error(status, response_headers, body, expected)
    assert response_headers.get("allow") == allow
    assert snapshot(accounting) == before


def test_content_type_with_utf8_charset_is_accepted(live):
    accounting = seeded_accounting()
    server = live(accounting)
    raw = json.dumps(_tokens(count=1)).encode()
    for content_type in ("application/json; charset=utf-8", "Application/JSON;charset=\"UTF-8\""):
        assert http_request(server, "POST", "/v1/tokens", raw, {"Content-Type": content_type})[0] == 200
    assert accounting.tokens()[("chat", "generated")] == 9


def test_missing_content_length_is_411_and_oversize_claims_are_refused_before_reading(seeded_server):
    server, accounting = seeded_server
    before = snapshot(accounting)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.putrequest("POST", "/v1/tokens")
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    response = conn.getresponse()
    assert_json_error(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read(), 411)
    conn.close()

    # A 10 MB claim with no body sent: answered from the header alone. A server that waited for the body
    # would answer 408 at its request deadline instead, so the status proves it (no stopwatch needed).
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/v1/tokens")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10_000_000))
    conn.endheaders()
    response = conn.getresponse()
    assert_json_error(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read(), 413)
    conn.close()
    assert snapshot(accounting) == before


@pytest.mark.parametrize(
    ("content_length", "raw", "headers", "expected"),
    [
        ("abc", b"{}", {}, 400),
        ("-1", b"{}", {}, 400),
        ("100", b'{"workload": "chat"}', {}, 400),  # body shorter than announced
        (None, b"{}", {"Transfer-Encoding": "chunked"}, 411),
    ],
)
def test_bad_content_length_in_process(content_length, raw, headers, expected):
    accounting = seeded_accounting()
    before = snapshot(accounting)
    app = make_app(accounting, make_registry(), lambda: True)
    environ_length = content_length if content_length is not None else ""
    status, response_headers, body = call_app(app, "POST", "/v1/tokens", raw, headers=headers,
                                              content_length=environ_length)
    assert_json_error(status, response_headers, body, expected)
    assert snapshot(accounting) == before


def test_body_limit_is_inclusive():
    accounting = Accounting([0])
    app = make_app(accounting, make_registry(), lambda: True, max_body_bytes=64)
    raw = json.dumps(_tokens(count=1)).encode()
    exact = raw + b" " * (64 - len(raw))
    assert call_app(app, "POST", "/v1/tokens", exact)[0] == 200
    assert_json_error(*call_app(app, "POST", "/v1/tokens", exact + b" "), 413)
    assert accounting.tokens() == {("chat", "generated"): 1}


def test_too_many_workloads(live):
    accounting = Accounting([0, 1], max_workloads=2)
    server = live(accounting)
    assert post_json(server, "/v1/workloads/start", {"workload": "a", "gpus": [0]})[0] == 200
    assert post_json(server, "/v1/tokens", {"workload": "b", "kind": "prompt", "count": 3})[0] == 200
    before = snapshot(accounting)
    for path, value in [
        ("/v1/workloads/start", {"workload": "c", "gpus": [1]}),
        ("/v1/tokens", {"workload": "c", "kind": "prompt", "count": 1}),
        ("/v1/spans", _span(workload="c")),
        ("/v1/spans", {"spans": [_span(workload="a"), _span(workload="c")]}),
    ]:
        status, headers, body = post_json(server, path, value)
        assert "too many workloads" in assert_json_error(status, headers, body, 409)
        check_against_doc(path, "POST", status, headers, body)
        assert snapshot(accounting) == before
    # Known workloads still write.
    assert post_json(server, "/v1/spans", {"spans": [_span(workload="a"), _span(workload="b")]})[0] == 200


def test_unexpected_exception_is_a_logged_500_without_traceback(caplog):
    accounting = seeded_accounting()

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    accounting.add_tokens = explode  # an instance attribute shadows the method
    app = make_app(accounting, make_registry(), lambda: True)
    with caplog.at_level(logging.ERROR, logger="wattledger.agent.http_api"):
        status, headers, body = call_app(app, "POST", "/v1/tokens", json.dumps(_tokens()).encode())
    message = assert_json_error(status, headers, body, 500)
    assert "disk on fire" not in message
    assert "disk on fire" in caplog.text and "Traceback" in caplog.text


# -- who may write --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
        ("::ffff:127.1.2.3", True), (REMOTE, False), ("::ffff:192.0.2.7", False), ("10.0.0.1", False),
        ("2001:db8::1", False), ("0.0.0.0", False), ("", False), (None, False), ("localhost", False),
        ("garbage", False), ("128.0.0.1", False),
    ],
)
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_non_loopback_writes_without_a_configured_token_are_forbidden():
    accounting = seeded_accounting()
    app = make_app(accounting, make_registry(), lambda: True)
    before = snapshot(accounting)
    raw = json.dumps(_tokens()).encode()
    for remote in (REMOTE, "::ffff:192.0.2.7", "2001:db8::1"):
        assert_json_error(*call_app(app, "POST", "/v1/tokens", raw, remote_addr=remote), 403)
        # Even a well-formed bearer header does not help when no token is configured.
        assert_json_error(*call_app(app, "POST", "/v1/tokens", raw, remote_addr=remote,
                                    headers={"Authorization": f"Bearer {TOKEN}"}), 403)
    # Authorization comes before parsing: a malformed body from outside is still 403, not 400.
    assert_json_error(*call_app(app, "POST", "/v1/tokens", b"{oops", remote_addr=REMOTE), 403)
    assert snapshot(accounting) == before
    # Reads are open to everyone.
    for path in ("/", "/metrics", "/healthz", "/v1/workloads"):
        assert call_app(app, "GET", path, remote_addr=REMOTE)[0] == 200


def test_bearer_token_lets_non_loopback_clients_write():
    accounting = seeded_accounting()
    app = make_app(accounting, make_registry(), lambda: True, bearer_token=TOKEN)
    before = snapshot(accounting)
    raw = json.dumps(_tokens(count=1)).encode()
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": TOKEN}):
        status, response_headers, body = call_app(app, "POST", "/v1/tokens", raw, remote_addr=REMOTE,
                                                  headers=headers)
        assert_json_error(status, response_headers, body, 401)
        assert response_headers["www-authenticate"].startswith("Bearer")
    assert snapshot(accounting) == before

    for scheme in ("Bearer", "bearer"):
        status, _, body = call_app(app, "POST", "/v1/tokens", raw, remote_addr=REMOTE,
                                   headers={"Authorization": f"{scheme} {TOKEN}"})
        assert status == 200, body
    # Loopback clients still need no token.
    assert call_app(app, "POST", "/v1/tokens", raw, remote_addr="::ffff:127.0.0.1")[0] == 200
    assert accounting.tokens()[("chat", "generated")] == 7 + 3


def test_empty_bearer_token_is_a_configuration_error():
    with pytest.raises(ValueError, match="bearer_token"):
        make_app(Accounting([0]), make_registry(), lambda: True, bearer_token="  ")


def test_token_over_real_http_from_a_remote_looking_client(live):
    """The server sees every request as coming from 192.0.2.7 (no traffic leaves 127.0.0.1)."""

    def as_remote(app):
        def wrapped(environ, start_response):
            environ["REMOTE_ADDR"] = REMOTE
            return app(environ, start_response)
        return wrapped

    accounting = Accounting([0])
    server = live(accounting, wrap=as_remote, bearer_token=TOKEN)
    AgentClient(server.url, token=TOKEN).add_tokens("chat", "trained", 11)
    for token, status in ((None, 401), ("nope", 401)):
        with pytest.raises(AgentClientError) as error:
            AgentClient(server.url, token=token).add_tokens("chat", "trained", 1)
        assert error.value.status == status
    assert AgentClient(server.url).workloads()[0]["tokens"]["trained"] == 11
    assert accounting.tokens() == {("chat", "trained"): 11}


# -- the parser under fuzzing ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
names = st.sampled_from(["chat", "idle", "new", "Chat", "", "a" * 65]) | st.text(max_size=8) | st.integers()
gpu_lists = st.lists(st.sampled_from([0, 1, 2, -1, True, 0.0, "0"]), max_size=3) | json_values
ns = st.integers(-2, 2**63) | st.sampled_from([0, 10, 20, 2**63 - 1]) | st.floats() | st.none()
ratios = st.floats(-0.5, 1.5) | st.integers(-1, 2) | st.booleans() | st.text(max_size=3)
activities = st.none() | st.dictionaries(st.sampled_from(["gpu", "sm", "tensor", "dram", "power"]), ratios, max_size=4)
span_fields = {
    "workload": names, "kind": st.sampled_from([*SPAN_KINDS, "nap", "generated"]),
    "start_ns": ns, "end_ns": ns, "gpus": gpu_lists, "activity": activities, "extra": json_values,
}
FIELDS = {
    "/v1/tokens": {
        "workload": names, "kind": st.sampled_from([*TOKEN_KINDS, "compute", "words"]),
        "count": st.integers(-2, 10**9 + 2) | st.sampled_from([0, 10**9]) | st.floats() | st.booleans(),
        "extra": json_values,
    },
    "/v1/workloads/start": {
        "workload": names, "gpus": gpu_lists, "pid": st.none() | st.integers(-1, 2**31) | st.text(max_size=3),
        "timestamp_ns": ns, "extra": json_values,
    },
    "/v1/workloads/stop": {"workload": names, "timestamp_ns": ns, "extra": json_values},
    "/v1/workloads/forget": {"workload": names, "extra": json_values},
    "/v1/memory": {
        "workload": names, "gpu": st.integers(-1, 3) | json_values,
        "bytes": st.integers(-1, 2**50 + 1) | st.floats(), "extra": json_values,
    },
    "/v1/spans": span_fields,
}


good_names = st.sampled_from(["chat", "idle", "new", "train-2"]) | st.from_regex(r"[a-z][a-z0-9_-]{0,8}",
                                                                               fullmatch=True)
seeded_names = st.sampled_from(["chat", "chat", "chat", "idle", "new"])  # chat runs on GPU 0
good_gpus = st.lists(st.sampled_from([0, 1]), min_size=1, max_size=2, unique=True)
good_stamps = st.none() | st.integers(0, 10**12)
good_activity = st.none() | st.dictionaries(st.sampled_from(["gpu", "sm", "tensor", "dram"]),
                                            st.floats(0, 1) | st.integers(0, 1), max_size=4)


@st.composite
def good_spans(draw) -> dict:
    start = draw(st.integers(0, 10**12))
    span = {"workload": draw(good_names), "kind": draw(st.sampled_from(SPAN_KINDS)), "start_ns": start,
            "end_ns": start + draw(st.integers(0, 10**9)), "gpus": draw(good_gpus)}
    if draw(st.booleans()):
        span["activity"] = draw(good_activity)
    return span


GOOD_BODIES = {
    "/v1/tokens": st.fixed_dictionaries({"workload": good_names, "kind": st.sampled_from(TOKEN_KINDS),
                                         "count": st.integers(0, 10**9)}),
    "/v1/workloads/start": st.fixed_dictionaries(
        {"workload": good_names, "gpus": good_gpus},
        optional={"pid": st.none() | st.integers(1, 2**31 - 1), "timestamp_ns": good_stamps}),
    "/v1/workloads/stop": st.fixed_dictionaries({"workload": seeded_names},
                                                optional={"timestamp_ns": st.none() | st.integers(0, 10**12)}),
    "/v1/workloads/forget": st.fixed_dictionaries({"workload": seeded_names}),
    "/v1/memory": st.fixed_dictionaries({"workload": seeded_names, "gpu": st.sampled_from([0, 0, 1]),
                                         "bytes": st.integers(0, 2**50 - 1)}),
    "/v1/spans": good_spans(),
}


@st.composite
def mutated(draw, good: st.SearchStrategy, fields: dict) -> dict:
    """A good body, or one with a field dropped, given a bad value, or an unknown field added."""
    body = dict(draw(good))
    action = draw(st.sampled_from(["keep", "keep", "drop", "replace", "add"]))
    if action == "drop" and body:
        del body[draw(st.sampled_from(sorted(body)))]
    elif action == "replace":
        key = draw(st.sampled_from(sorted(k for k in fields if k != "extra")))
        body[key] = draw(fields[key])
    elif action == "add":
        body[draw(st.text(max_size=8))] = draw(json_values)
    return body


def _near_valid(path: str) -> st.SearchStrategy:
    """Bodies for ``path`` that are valid, or valid but for one thing, or any mix of the route's
    field names with good or bad values; for /v1/spans also batches of such spans."""
    fields = FIELDS[path]
    near = mutated(GOOD_BODIES[path], fields)
    mixed = st.fixed_dictionaries({}, optional=fields)
    if path == "/v1/spans":
        return near | mixed | st.fixed_dictionaries({"spans": st.lists(near | mixed, max_size=3)})
    return near | mixed


def _fuzz_once(path: str, raw: bytes) -> None:
    accounting = seeded_accounting()
    app = make_app(accounting, make_registry(), lambda: True)
    before = snapshot(accounting)
    status, headers, body = call_app(app, "POST", path, raw)
    assert 200 <= status < 500, body
    assert headers["content-type"] == "application/json"
    check_against_doc(path, "POST", status, headers, body)
    if status >= 300:
        assert_json_error(status, headers, body, status)
        assert snapshot(accounting) == before
    else:
        # Whatever the server accepts, the documented request schema accepts too.
        assert request_schema_valid(path, json.loads(raw)), raw


FUZZ_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(path=st.sampled_from(WRITE_PATHS), raw=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(path, raw):
    _fuzz_once(path, raw)


@FUZZ_SETTINGS
@given(path=st.sampled_from(WRITE_PATHS), value=json_values)
def test_fuzz_arbitrary_json_values(path, value):
    _fuzz_once(path, json.dumps(value).encode())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_near_valid_bodies(data):
    path = data.draw(st.sampled_from(WRITE_PATHS))
    _fuzz_once(path, json.dumps(data.draw(_near_valid(path))).encode())


@FUZZ_SETTINGS
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH"]) | st.text(max_size=8),
    path=st.sampled_from(list(ROUTES) + ["/x", "//", ""]) | st.text(max_size=20),
    content_type=st.none() | st.sampled_from(["application/json", "application/json; charset=utf-8"])
    | st.text(max_size=30),
    content_length=st.none() | st.sampled_from(["", "0", "-5", "1e3", " 12 ", "99999999999999999999"])
    | st.integers(0, 100).map(str) | st.text(max_size=6),
    authorization=st.none() | st.text(max_size=30),
    remote=st.sampled_from(["127.0.0.1", REMOTE, "::1", "", "nonsense"]),
    raw=st.binary(max_size=50),
)
def test_fuzz_request_envelope(method, path, content_type, content_length, authorization, remote, raw):
    accounting = seeded_accounting()
    app = make_app(accounting, make_registry(), lambda: True, bearer_token=TOKEN)
    before = snapshot(accounting)
    headers = {} if authorization is None else {"Authorization": authorization}
    status, response_headers, body = call_app(app, method, path, raw, content_type=content_type,
                                              remote_addr=remote, headers=headers,
                                              content_length=content_length)
    assert status < 500, body
    if status >= 300:
        assert snapshot(accounting) == before
    if status >= 400 and method != "HEAD" and response_headers.get("content-type") == "application/json":
        assert_json_error(status, response_headers, body, status)


# -- concurrency, the client, the server ----------------------------------------------------------


def test_concurrent_writes_add_up_exactly(live):
    accounting = Accounting([0, 1])
    server = live(accounting)
    threads, per_thread = 8, 25
    failures: list = []

    def worker(n: int) -> None:
        try:
            for i in range(per_thread):
                status, _, body = post_json(server, "/v1/tokens", {"workload": f"w{n % 2}", "kind": "generated",
                                                                    "count": 3})
                assert status == 200, body
                status, _, body = post_json(server, "/v1/spans", _span(workload="shared", start_ns=i, end_ns=i + 1))
                assert status == 200, body
        except BaseException as exc:  # reported on the main thread
            failures.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=30)
    assert not failures, failures[0]
    total = threads * per_thread
    assert accounting.tokens() == {("w0", "generated"): 3 * total // 2, ("w1", "generated"): 3 * total // 2}
    assert len(accounting.recent_spans()) == total


def test_client_against_a_live_server(live):
    accounting = Accounting([0, 1])
    server = live(accounting)
    client = AgentClient(server.url + "/")
    assert client.healthy()
    client.start("train", [0, 1], pid=999)
    client.add_tokens("train", "trained", 4096)
    client.set_memory("train", 1, 80 << 30)
    client.add_spans([_span(workload="train", kind="checkpoint", gpus=[0, 1])])
    (view,) = client.workloads()
    assert view == {"name": "train", "running": True, "gpus": [0, 1], "pid": 999,
                    "tokens": {"prompt": 0, "generated": 0, "trained": 4096}, "memory_bytes": {"1": 80 << 30}}
    stamp = time.monotonic_ns()
    client.stop("train", timestamp_ns=stamp)
    assert accounting.running_on(0, 0, stamp + 1)[-1][2] == stamp

    before = snapshot(accounting)
    with pytest.raises(AgentClientError) as error:
        client.stop("train")
    assert error.value.status == 409 and "is not running" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(AgentClientError) as error:
        client.add_spans([_span(workload="train"), _span(workload="train", end_ns=0)])
    assert error.value.status == 422 and "spans[1]" in str(error.value)
    with pytest.raises(AgentClientError) as error:
        client.add_tokens("train", "generated", math.nan)
    assert error.value.status is None
    assert snapshot(accounting) == before


def test_client_reports_an_unreachable_agent():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = AgentClient(f"http://127.0.0.1:{port}", timeout_s=1.0)
    with pytest.raises(AgentClientError) as error:
        client.workloads()
    assert error.value.status is None and "cannot reach the agent" in str(error.value)
    assert not client.healthy()


def test_server_errors_are_one_line_and_shutdown_frees_the_port(live):
    accounting = Accounting([0])
    server = live(accounting)
    with pytest.raises(ServerStartError) as error:
        serve(make_app(accounting, make_registry(), lambda: True), "127.0.0.1", server.port)
    assert isinstance(error.value, OSError)
    assert str(error.value) == f"cannot listen on 127.0.0.1:{server.port}: address already in use"
    with pytest.raises(ServerStartError, match="port must be 0 to 65535"):
        serve(make_app(accounting, make_registry(), lambda: True), "127.0.0.1", 70000)

    port = server.port
    server.shutdown()
    server.shutdown()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    again = serve(make_app(accounting, make_registry(), lambda: True), "127.0.0.1", port)
    with again:
        assert http_request(again, "GET", "/healthz")[0] == 200


def test_requests_are_not_logged_to_stderr(live, capfd):
    server = live(seeded_accounting())
    http_request(server, "GET", "/metrics")
    http_request(server, "GET", "/missing")
    http_request(server, "POST", "/v1/tokens", b"{bad", {"Content-Type": "application/json"})
    post_json(server, "/v1/tokens", _tokens())
    assert capfd.readouterr().err == ""


def test_odd_paths_are_a_json_404(live):
    server = live(Accounting([0]))
    path = "/" + urllib.parse.quote("métrics\n\x00")
    assert_json_error(*http_request(server, "GET", path), 404)
