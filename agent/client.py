"""A client for workloads that run in another process and report to the agent over HTTP.

Standard library only, so a workload can copy this file without installing wattledger. Timestamps
are ``time.monotonic_ns()``, the same clock in every process on the host.

    client = AgentClient("http://127.0.0.1:9478")
    client.start("chat", gpus=[0], pid=os.getpid())
    client.add_tokens("chat", "generated", 128)
    client.stop("chat")
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence

# The most spans one POST /v1/spans may carry (the agent's MAX_SPANS_PER_CALL; a test keeps them equal).
# Written out here, not imported, so that this file stays standard library only.
MAX_SPANS_PER_REQUEST = 1000


class AgentClientError(Exception):
    """A call the agent refused or could not be made. ``status`` is the HTTP status, or None when the
    agent could not be reached; the message is the agent's one-line error."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class AgentClient:
    """Talks to one agent. Thread-safe: every call is an independent request."""

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 2.0):
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        # No proxies: the agent is on this host, and an http_proxy in the environment must not
        # carry workload reports (or the token) elsewhere.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- writes ---------------------------------------------------------------------------------

    def start(self, workload: str, gpus: Sequence[int], pid: int | None = None,
              timestamp_ns: int | None = None) -> None:
        """The workload runs on ``gpus`` from ``timestamp_ns`` (default: when the agent gets this)."""
        body: dict = {"workload": workload, "gpus": list(gpus)}
        if pid is not None:
            body["pid"] = pid
        if timestamp_ns is not None:
            body["timestamp_ns"] = timestamp_ns
        self._request("POST", "/v1/workloads/start", body)

    def stop(self, workload: str, timestamp_ns: int | None = None) -> None:
        body: dict = {"workload": workload}
        if timestamp_ns is not None:
            body["timestamp_ns"] = timestamp_ns
        self._request("POST", "/v1/workloads/stop", body)

    def add_tokens(self, workload: str, kind: str, count: int) -> None:
        """Add ``count`` tokens of ``kind`` (prompt, generated or trained)."""
        self._request("POST", "/v1/tokens", {"workload": workload, "kind": kind, "count": count})

    def add_spans(self, spans: list[dict]) -> None:
        """Record finished spans, all or none (at most ``MAX_SPANS_PER_REQUEST``). Each is a dict with
        workload, kind, start_ns, end_ns, gpus and optionally activity ({"gpu", "sm", "tensor", "dram"}
        ratios)."""
        self._request("POST", "/v1/spans", {"spans": list(spans)})

    def set_memory(self, workload: str, gpu: int, memory_bytes: int) -> None:
        """Declare the GPU memory the running workload holds on ``gpu``, in bytes."""
        self._request("POST", "/v1/memory", {"workload": workload, "gpu": gpu, "bytes": memory_bytes})

    # -- reads ----------------------------------------------------------------------------------

    def workloads(self) -> list[dict]:
        """Every workload the agent knows: name, running, gpus, pid, tokens by kind, memory_bytes."""
        return self._request("GET", "/v1/workloads", None)

    def healthy(self) -> bool:
        """True when the agent answers /healthz with 200."""
        try:
            self._send("GET", "/healthz", None)
        except AgentClientError:
            return False
        return True

    # -- plumbing -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None) -> object:
        raw = self._send(method, path, body)
        try:
            return json.loads(raw)
        except ValueError:
            raise AgentClientError(f"{method} {path}: the agent answered something that is not JSON") from None

    def _send(self, method: str, path: str, body: dict | None) -> bytes:
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            try:
                data = json.dumps(body, allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as exc:
                raise AgentClientError(f"{method} {path}: cannot send this body as JSON: {exc}") from None
            headers["Content-Type"] = "application/json"
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self._timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise AgentClientError(f"{method} {path}: {exc.code} {_error_line(exc.read())}",
                                       status=exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AgentClientError(f"cannot reach the agent at {self.base_url}: {reason}") from None


def _error_line(raw: bytes) -> str:
    try:
        message = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        message = raw[:200].decode("utf-8", errors="replace").strip() or "no error message"
    return " ".join(str(message).split())
