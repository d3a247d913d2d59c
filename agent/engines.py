"""Joules per token off Kubernetes: the agent reads a serving engine's token counters and charges them to
the owner of the process that listens on the engine's port (issue 13, docs/attribution.md "Engines off
Kubernetes").

On Kubernetes, Prometheus joins the engines' own token counters with the agent's per-pod energy on the
``namespace`` and ``pod`` labels (deploy/prometheus/rules/engines.yml). Off Kubernetes there is no such
label, so the agent does the join itself: given an engine's ``/metrics`` URL (``--engine URL``, or
``engines = [...]`` in the config file), :class:`EngineWatcher`

1. reads the engine every ``interval_s`` (default 5 s) on its own thread, with the per-series, reset-aware
   reader of ``probes/engine_counters.py`` (its docstring states the counting rules for vLLM, SGLang and
   TGI). The first successful read is the baseline: only tokens counted after the agent started count;
2. finds the process that listens on the URL's port (``probes/listening_socket.py``: ``/proc/net/tcp*``
   and the processes' fds);
3. hands the increases to the sampler thread, which charges them to that process's owner as the
   attribution's resolver names it (:meth:`EngineWatcher.settle`, called from
   :meth:`EngineAwareResolver.refresh` at every tick, so the resolver is only ever used from one thread).

Tokens are cumulative per (owner, engine kind, model name, token kind), exported as
``wattledger_owner_tokens_total`` (exporters/engine_tokens.py) beside the owner's energy.

The energy side must land on the same owner: vLLM's API server listens on the port while its EngineCore
child process (comm ``VLLM::EngineCor``) holds the GPU, and a plain command's owner is its comm. So
:class:`EngineAwareResolver` wraps the attribution's resolver: a pid that is an engine's listening process
or one of its descendants resolves to the listening process's owner labels; every other pid is the inner
resolver's.

Limits
------
- The listening socket is looked up in the agent's network namespace (``<procfs>/net/tcp``): an engine in
  another one (``docker run -p`` without ``--network host``, a pod without ``hostNetwork`` seen from the
  host) is not found (status "no process listens on port P"), though its URL may answer through a proxy.
- Processes of the engine that are not descendants of the listening process (Ray workers started by a Ray
  daemon, a tensor-parallel worker launched apart) keep their own owners: their energy is not the engine's.
- One engine per URL, one listening process per engine: with several processes holding the socket, the one
  that started first is taken. Tokens read while the listener cannot be found (or its owner is unknown) are
  not charged to anyone; they are counted in ``wattledger_engine_unplaced_tokens_total``.
- An engine's owner is the attribution's: when the owner cap puts it into ``owner_kind="other"`` for
  energy, its tokens still carry its own labels, and the join finds no energy for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from wattledger.probes.engine_counters import (
    TOKEN_KINDS,
    EngineReading,
    EngineReadError,
    EngineScraper,
    TokenCounters,
    fetch_url,
)
from wattledger.probes.errors import bounded_line
from wattledger.probes.listening_socket import (
    Listener,
    ListeningSocketError,
    ListeningSocketFinder,
    NotListening,
    ProcfsTree,
)

log = logging.getLogger(__name__)

DEFAULT_ENGINE_INTERVAL_S = 5.0  # as agent/config.py's engine_interval default
DEFAULT_PORTS = {"http": 80, "https": 443}  # RFC 9110 section 4.2
STATUS_OK = "ok"
MODEL_LABEL = "model_name"  # vLLM's and SGLang's served-model label (probes/engine_counters.py)
OwnerKey = tuple[str, str, str, str, str]  # (owner_kind, namespace, pod, container, group), as the ledger's
MAX_REASON_CHARS = 200  # a status is a label value: bounded, as the attribution status's reason


@dataclass(frozen=True)
class EngineUrl:
    url: str
    host: str
    port: int


def parse_engine_url(url: str) -> EngineUrl:
    """An engine's ``/metrics`` URL: http(s), a host, and a port (or the scheme's). ValueError, one line."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as err:
        raise ValueError(f"engine {url!r} is not a URL ({err})") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"engine {url!r}: expected an http:// or https:// URL of a /metrics endpoint, "
                         "e.g. http://127.0.0.1:8000/metrics")
    return EngineUrl(url.strip(), parts.hostname, port or DEFAULT_PORTS[parts.scheme])


def owner_key(labels) -> OwnerKey:
    """An ``OwnerLabels`` as the owner series' label values."""
    return (labels.kind, labels.namespace, labels.pod, labels.container, labels.group)


def split_by_model(reading: EngineReading) -> dict[str, EngineReading]:
    """One reading per ``model_name`` label value ("" where the engine has none, as TGI)."""
    by_model: dict[str, dict[str, dict]] = {}
    for kind, series in reading.series.items():
        for key, value in series.items():
            model = dict(key[1]).get(MODEL_LABEL, "")
            by_model.setdefault(model, {k: {} for k in TOKEN_KINDS})[kind][key] = value
    return {model: EngineReading(reading.engine, reading.read_at_s, series) for model, series in by_model.items()}


class ModelCounters:
    """:class:`TokenCounters` per model name: the same counting rules, with the model kept apart.

    A model first seen after the baseline gets counters whose baseline is an empty reading at the previous
    successful read, so its series count by the "first seen after a read that did not show it" rule."""

    def __init__(self) -> None:
        self.by_model: dict[str, TokenCounters] = {}
        self._last: EngineReading | None = None
        self._baseline_failed_at_s: float | None = None
        self._failed_since_last = False

    def set_baseline(self, reading: EngineReading) -> None:
        for model, part in split_by_model(reading).items():
            self.by_model.setdefault(model, TokenCounters()).set_baseline(part)
        self._last = reading

    def baseline_failed(self, at_s: float) -> None:
        self._baseline_failed_at_s = at_s

    def note_failed_read(self) -> None:
        self._failed_since_last = True
        for counters in self.by_model.values():
            counters.note_failed_read()

    def update(self, reading: EngineReading) -> dict[str, dict[str, int]]:
        """model -> kind -> tokens counted since the previous reading."""
        parts = split_by_model(reading)
        for model in parts.keys() - self.by_model.keys():
            self.by_model[model] = self._new_counters(reading)
        empty = {kind: {} for kind in TOKEN_KINDS}
        increases = {model: counters.update(parts.get(model) or EngineReading(reading.engine, reading.read_at_s,
                                                                               empty))
                     for model, counters in self.by_model.items()}
        self._last, self._failed_since_last = reading, False
        return increases

    def _new_counters(self, reading: EngineReading) -> TokenCounters:
        counters = TokenCounters()
        if self._last is not None:
            counters.set_baseline(EngineReading(reading.engine, self._last.read_at_s, {}))
            if self._failed_since_last:
                counters.note_failed_read()
        else:
            counters.baseline_failed(self._baseline_failed_at_s if self._baseline_failed_at_s is not None
                                     else reading.read_at_s)
        return counters

    @property
    def lower_bound(self) -> bool:
        return any(counters.lower_bound for counters in self.by_model.values())


@dataclass
class _Charge:
    """Token increases read from one engine, waiting for the sampler thread to name their owner."""

    url: str
    engine: str
    pid: int
    increases: dict[str, dict[str, int]]  # model -> kind -> tokens


@dataclass
class EngineState:
    """One configured engine: its reader, counters, listener and one-line status."""

    target: EngineUrl
    scraper: EngineScraper
    counters: ModelCounters = field(default_factory=ModelCounters)
    baseline_taken: bool = False
    fetched: bool = False  # the last fetch returned a body (so a failed read is "not an engine")
    listener: Listener | None = None
    status: str = "not read yet"
    unowned_pid: int | None = None  # a listener whose owner the attribution could not name, at the last charge
    reads: int = 0
    errors: int = 0

    @property
    def engine_name(self) -> str:
        return self.scraper.engine.name if self.scraper.engine is not None else ""


@dataclass(frozen=True)
class EngineStatus:
    url: str
    engine: str  # "vllm", "sglang", "tgi"; "" before the engine was recognised
    up: bool
    reason: str  # STATUS_OK, or one line


@dataclass(frozen=True)
class OwnerTokens:
    owner: OwnerKey
    engine: str
    model: str
    kind: str  # "prompt" | "generated"
    tokens: int  # cumulative since the agent started


class EngineWatcher:
    """The configured engines, read every ``interval_s`` on a thread of their own (module docstring).

    ``fetch(url) -> str`` and ``clock_s() -> float`` (Unix seconds, compared with the engines' ``_created``)
    are injectable for tests, as ``finder`` (a :class:`ListeningSocketFinder`). ``retention_s``: how long a
    token row whose owner no engine has any more keeps its series (as the owners' energy series)."""

    def __init__(self, urls: Iterable[str], procfs_root: str = "/proc", interval_s: float = DEFAULT_ENGINE_INTERVAL_S,
                 fetch: Callable[[str], str] | None = None, clock_s: Callable[[], float] = time.time,
                 finder: ListeningSocketFinder | None = None, retention_s: float = 600.0):
        self.interval_s = interval_s
        self._clock_s = clock_s
        self._fetch = fetch or fetch_url
        self._finder = finder or ListeningSocketFinder(procfs_root)
        self._retention_s = retention_s
        self._started_at_s = clock_s()
        self._engines = [self._engine_state(parse_engine_url(url)) for url in urls]
        self._by_url = {state.target.url: state for state in self._engines}
        if len(self._by_url) != len(self._engines):
            raise ValueError("engine URLs must differ (one engine per URL)")
        self._lock = threading.Lock()
        self._pending: list[_Charge] = []
        self._tokens: dict[tuple[OwnerKey, str, str, str], int] = {}
        self._moved_at_s: dict[tuple[OwnerKey, str, str, str], float] = {}
        self._current_owners: dict[str, OwnerKey] = {}  # url -> the owner its tokens were last charged to
        self._unplaced: dict[tuple[str, str, str], int] = {}  # (url, engine, kind) -> tokens charged to no one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def tree(self) -> ProcfsTree:
        return self._finder.tree

    def _engine_state(self, target: EngineUrl) -> EngineState:
        state: EngineState | None = None

        def fetch(url: str) -> str:
            text = self._fetch(url)
            state.fetched = True
            return text

        state = EngineState(target, EngineScraper(target.url, fetch=fetch, clock_s=self._clock_s))
        return state

    # -- the watcher's thread ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None and self._engines:
            self._thread = threading.Thread(target=self._run, name="wattledger-engines", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the thread (a read in flight ends within the fetch's own timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception as err:  # noqa: BLE001 - the thread must not die silently
                log.warning("engine watcher: %s", bounded_line(f"{type(err).__name__}: {err}", MAX_REASON_CHARS))
            if self._stop.wait(self.interval_s):
                return

    def poll(self) -> None:
        """Read every engine once and queue its token increases for :meth:`settle`. Never raises for an
        engine that cannot be read: its status says why."""
        for state in self._engines:
            self._poll_engine(state)

    def _poll_engine(self, state: EngineState) -> None:
        state.fetched = False
        try:
            reading = state.scraper.read()
        except EngineReadError as err:
            self._read_failed(state, err)
            return
        state.reads += 1
        if not state.baseline_taken:
            state.counters.set_baseline(reading)
            state.baseline_taken = True
            increases = {}
        else:
            increases = state.counters.update(reading)
        listener = self._find_listener(state)
        if any(n for kinds in increases.values() for n in kinds.values()):
            with self._lock:
                pid = listener.pid if listener is not None else -1
                self._pending.append(_Charge(state.target.url, state.engine_name, pid, increases))

    def _read_failed(self, state: EngineState, err: EngineReadError) -> None:
        state.errors += 1
        if not state.baseline_taken:  # the first read: nothing saw the engine before
            state.counters.baseline_failed(self._started_at_s)
            state.baseline_taken = True
        else:
            state.counters.note_failed_read()
        prefix = "not an engine" if state.fetched else "unreachable"
        self._set_status(state, f"{prefix}: {err}")

    def _find_listener(self, state: EngineState) -> Listener | None:
        try:
            state.listener = self._finder.find(state.target.port, state.target.host)
        except NotListening:
            state.listener = None
            self._set_status(state, f"no process listens on port {state.target.port} (in the agent's network "
                             "namespace)")
        except ListeningSocketError as err:
            state.listener = None
            self._set_status(state, str(err))
        else:
            self._set_status(state, STATUS_OK)
        return state.listener

    def _set_status(self, state: EngineState, status: str) -> None:
        status = bounded_line(status, MAX_REASON_CHARS)
        if status != state.status:
            (log.info if status == STATUS_OK else log.warning)("engine %s: %s", state.target.url, status)
        state.status = status

    # -- the sampler's thread ---------------------------------------------------------------------------

    def settle(self, resolve: Callable[[int], object | None]) -> None:
        """Charge the queued increases to the owner ``resolve(pid)`` names (None: not placed)."""
        with self._lock:
            pending, self._pending = self._pending, []
        now_s = self._clock_s()
        for charge in pending:
            labels = resolve(charge.pid) if charge.pid > 0 else None
            self._by_url[charge.url].unowned_pid = charge.pid if labels is None and charge.pid > 0 else None
            if labels is None:
                self._count_unplaced(charge)
                continue
            key = owner_key(labels)
            with self._lock:
                self._current_owners[charge.url] = key
                for model, kinds in charge.increases.items():
                    for kind, count in kinds.items():
                        if count > 0:
                            row = (key, charge.engine, model, kind)
                            self._tokens[row] = self._tokens.get(row, 0) + count
                            self._moved_at_s[row] = now_s
        self._forget_old_rows(now_s)

    def _count_unplaced(self, charge: _Charge) -> None:
        with self._lock:
            for kinds in charge.increases.values():
                for kind, count in kinds.items():
                    key = (charge.url, charge.engine, kind)
                    self._unplaced[key] = self._unplaced.get(key, 0) + count

    def _forget_old_rows(self, now_s: float) -> None:
        with self._lock:
            current = set(self._current_owners.values())
            for row in [r for r, moved in self._moved_at_s.items()
                        if r[0] not in current and now_s - moved > self._retention_s]:
                del self._tokens[row], self._moved_at_s[row]

    # -- any thread -------------------------------------------------------------------------------------

    def listeners(self) -> list[Listener]:
        """The engines' listening processes found at their last read."""
        return [state.listener for state in self._engines if state.listener is not None]

    def tokens(self) -> list[OwnerTokens]:
        with self._lock:
            return [OwnerTokens(*row, count) for row, count in sorted(self._tokens.items())]

    def unplaced(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self._unplaced)

    def statuses(self) -> list[EngineStatus]:
        return [self._status_of(state) for state in self._engines]

    @staticmethod
    def _status_of(state: EngineState) -> EngineStatus:
        reason = state.status
        if reason == STATUS_OK and state.unowned_pid is not None:
            reason = (f"the owner of pid {state.unowned_pid} (listening on port {state.target.port}) is unknown to "
                      "the attribution: its tokens are not charged")
        return EngineStatus(state.target.url, state.engine_name, reason == STATUS_OK, reason)

    def describe(self) -> str:
        urls = ", ".join(state.target.url for state in self._engines)
        return f"engines: reading token counters of {urls} every {self.interval_s:g}s"


class EngineAwareResolver:
    """The attribution's resolver, with the engines' processes as one owner (module docstring).

    Everything not named here (``status``, ``describe``, ``close``, ``pods_without_processes``...) is the
    inner resolver's."""

    def __init__(self, inner, watcher: EngineWatcher):
        self._inner = inner
        self._watcher = watcher

    def resolve(self, pid: int, gpu_uuid: str | None = None):
        listeners = self._watcher.listeners()
        if listeners:
            lineage = {pid, *self._watcher.tree.ancestors(pid)}
            for listener in listeners:
                if listener.pid in lineage:
                    labels = self._inner.resolve(listener.pid, gpu_uuid=gpu_uuid)
                    if labels is not None:
                        return labels
        return self._inner.resolve(pid, gpu_uuid=gpu_uuid)

    def refresh(self, now_ns: int) -> None:
        self._inner.refresh(now_ns)
        self._watcher.settle(lambda pid: self._inner.resolve(pid))

    def __getattr__(self, name: str):
        return getattr(self._inner, name)
