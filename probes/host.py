"""Host backends: CPU busy time, memory, RAPL energy and registered workload processes.

``ProcfsHostBackend`` reads Linux ``/proc`` and ``/sys`` directly (roots injectable, so tests use fake
trees); ``PsutilHostBackend`` is the fallback for machines without a Linux ``/proc`` (macOS laptops in
mock mode) and has no locked, pinned or RAPL figures. :func:`open_host_backend` picks one.

Both run on the sampler thread at 10-100 Hz: the machine-wide files are read on every ``sample()``;
workload processes (and their descendants) only every ``process_interval_s``, with the previous tuple
returned in between. ``watch_process`` / ``unwatch_process`` may be called from another thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

import psutil

from wattledger.probes.base import FieldStatus, HostSample, ProbeUnavailable, ProcessSample
from wattledger.probes.errors import one_line
from wattledger.probes.procfs import (
    ProcfsParseError,
    default_clk_tck,
    parse_meminfo,
    parse_pid_stat,
    parse_pid_status,
    parse_proc_stat,
    parse_proc_stat_cpus,
)
from wattledger.probes.rapl import RaplReader

__all__ = ["ProcfsHostBackend", "PsutilHostBackend", "open_host_backend"]

log = logging.getLogger(__name__)


def _read_text(path: str) -> str:
    # latin-1 never fails to decode; the fields parsed are ASCII, and comm may hold any bytes.
    with open(path, "rb", buffering=0) as f:
        return f.read().decode("latin-1")


def _read_proc_text(path: str) -> str:
    # /proc/stat grows with the core count (and the `intr` line): read until EOF in large chunks.
    with open(path, "rb", buffering=0) as f:
        chunks = []
        while chunk := f.read(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("latin-1")


class _Watched:
    """Registered roots, shared between the caller's thread and the sampler thread, and when the sampler
    reads their processes again: every ``interval_ns`` nanoseconds, and at once after a watch or unwatch."""

    def __init__(self, interval_ns: int) -> None:
        self._lock = threading.Lock()
        self._pids: dict[int, None] = {}  # ordered: processes are reported in registration order
        self.changed = False  # a watch or unwatch happened since the last refresh
        self._interval_ns = interval_ns
        self._next_refresh_ns: int | None = None

    def refresh_due(self, now_ns: int) -> bool:
        """Whether the processes are to be read at ``now_ns``; if so, the next read is one interval on."""
        if self.changed or self._next_refresh_ns is None or now_ns >= self._next_refresh_ns:
            self._next_refresh_ns = now_ns + self._interval_ns
            return True
        return False

    def add(self, pid: int) -> None:
        with self._lock:
            self._pids[int(pid)] = None
            self.changed = True

    def remove(self, pid: int) -> None:
        with self._lock:
            self._pids.pop(int(pid), None)
            self.changed = True

    def drop_exited(self, pid: int) -> None:
        """Forget a root that exited; unlike ``remove`` this does not ask for another refresh."""
        with self._lock:
            self._pids.pop(pid, None)

    def snapshot(self) -> list[int]:
        with self._lock:
            self.changed = False
            return list(self._pids)


class _FieldLog:
    """The last error per field, logged once on each transition into failing."""

    def __init__(self) -> None:
        self.errors: dict[str, str | None] = {}

    def ok(self, name: str) -> None:
        if self.errors.get(name) is not None:
            log.info("host field %s readable again", name)
        self.errors[name] = None

    def fail(self, name: str, reason: str) -> None:
        if self.errors.get(name) is None:
            log.warning("host field %s unavailable: %s", name, reason)
        self.errors[name] = reason

    def status(self) -> list[FieldStatus]:
        return [FieldStatus(name, error is None, error) for name, error in self.errors.items()]


class _WatchesProcesses:
    """The HostBackend's process registration, the same for both backends: roots go to ``self._watched``."""

    _watched: _Watched

    def watch_process(self, pid: int) -> None:
        """Report ``pid`` and its descendants from the next sample on (the next sample refreshes them)."""
        self._watched.add(pid)

    def unwatch_process(self, pid: int) -> None:
        self._watched.remove(pid)


def _host_sample(now_ns: int, cpu_busy_seconds: float | None, cpu_busy_seconds_per_core: tuple[float, ...] | None,
                 memory_total_bytes: int | None, memory_available_bytes: int | None,
                 processes: tuple[ProcessSample, ...], **linux_only) -> HostSample:
    """A HostSample whose derived fields both backends fill alike: the CPU count is the number of per-core
    figures, memory used is total - available (None when either is unknown, never a guess). ``linux_only``:
    the fields only procfs and sysfs have (core ids, locked memory, RAPL energy)."""
    known = memory_total_bytes is not None and memory_available_bytes is not None
    return HostSample(
        monotonic_ns=now_ns,
        cpu_busy_seconds=cpu_busy_seconds,
        cpu_busy_seconds_per_core=cpu_busy_seconds_per_core,
        cpu_count=len(cpu_busy_seconds_per_core) if cpu_busy_seconds_per_core is not None else None,
        memory_total_bytes=memory_total_bytes,
        memory_used_bytes=memory_total_bytes - memory_available_bytes if known else None,
        memory_available_bytes=memory_available_bytes,
        processes=processes,
        **linux_only,
    )


class ProcfsHostBackend(_WatchesProcesses):
    """HostBackend over Linux procfs and the RAPL powercap tree.

    Units: CPU busy in seconds (ticks / ``clk_tck``), memory in bytes, RAPL energy in joules.
    ``clock_ns`` stamps samples and paces the process refresh (nanoseconds, monotonic).
    ``clk_tck`` defaults to ``sysconf(SC_CLK_TCK)``. Raises :class:`ProbeUnavailable` when
    ``<procfs_root>/stat`` cannot be read.
    """

    name = "procfs"

    def __init__(
        self,
        procfs_root: str = "/proc",
        sysfs_root: str = "/sys",
        clock_ns: Callable[[], int] = time.monotonic_ns,
        process_interval_s: float = 1.0,
        clk_tck: int | None = None,
        rapl: RaplReader | None = None,
    ) -> None:
        if process_interval_s < 0:
            raise ValueError(f"process_interval_s must be >= 0, got {process_interval_s}")
        self.procfs_root = procfs_root
        self.sysfs_root = sysfs_root
        self._clock_ns = clock_ns
        self._clk_tck = clk_tck if clk_tck is not None else default_clk_tck()
        self._stat_path = os.path.join(procfs_root, "stat")
        self._meminfo_path = os.path.join(procfs_root, "meminfo")
        try:
            parse_proc_stat(_read_proc_text(self._stat_path), self._clk_tck)
        except (OSError, ProcfsParseError) as exc:
            raise ProbeUnavailable(f"procfs host probe: cannot use {self._stat_path}: {one_line(exc)}") from None
        self._rapl = rapl if rapl is not None else RaplReader(sysfs_root)
        self._watched = _Watched(int(process_interval_s * 1e9))
        self._start_ticks: dict[int, int] = {}  # root pid -> starttime when first seen: detects pid reuse
        self._processes: tuple[ProcessSample, ...] = ()
        self._process_error: str | None = None
        self._fields = _FieldLog()

    # -- HostBackend ---------------------------------------------------------------------------------

    def sample(self) -> HostSample:
        now_ns = self._clock_ns()
        cpu_total = cpu_per_core = core_ids = None
        try:
            busy = parse_proc_stat_cpus(_read_proc_text(self._stat_path), self._clk_tck)
            cpu_total = busy.total_seconds
            core_ids = tuple(core for core, _ in busy.cores)
            cpu_per_core = tuple(seconds for _, seconds in busy.cores)
            self._fields.ok("cpu_busy_seconds")
        except (OSError, ProcfsParseError) as exc:
            self._fields.fail("cpu_busy_seconds", f"{self._stat_path}: {one_line(exc)}")

        total = available = locked = None
        try:
            mem = parse_meminfo(_read_text(self._meminfo_path))
            total, available, locked = mem.get("MemTotal"), mem.get("MemAvailable"), mem.get("Mlocked")
            self._fields.ok("memory_total_bytes")
            if available is None:
                self._fields.fail("memory_available_bytes", "no MemAvailable in meminfo (Linux < 3.14)")
            else:
                self._fields.ok("memory_available_bytes")
            if locked is None:
                self._fields.fail("memory_locked_bytes", "no Mlocked in meminfo")
            else:
                self._fields.ok("memory_locked_bytes")
        except (OSError, ProcfsParseError) as exc:
            for name in ("memory_total_bytes", "memory_available_bytes", "memory_locked_bytes"):
                self._fields.fail(name, f"{self._meminfo_path}: {one_line(exc)}")

        energy = self._rapl.read()

        if self._watched.refresh_due(now_ns):
            self._processes = self._refresh_processes()
        return _host_sample(now_ns, cpu_total, cpu_per_core, total, available, self._processes,
                            cpu_core_ids=core_ids, memory_locked_bytes=locked, rapl_energy_joules=energy or None)

    def field_status(self) -> list[FieldStatus]:
        """CPU and memory fields (after at least one ``sample()``), then one entry per RAPL zone."""
        return self._fields.status() + self._rapl.field_status()

    def close(self) -> None:
        """Nothing stays open between samples."""

    # -- processes -----------------------------------------------------------------------------------

    def _children(self, pid: int) -> list[int]:
        """Direct children of every thread of ``pid``, from /proc/PID/task/TID/children."""
        task_dir = os.path.join(self.procfs_root, str(pid), "task")
        out: list[int] = []
        try:
            tids = os.listdir(task_dir)
        except OSError:  # exited since its stat was read; its children are reparented and not ours
            return out
        for tid in tids:
            try:
                text = _read_text(os.path.join(task_dir, tid, "children"))
            except OSError:  # thread exited, or a kernel without CONFIG_PROC_CHILDREN
                continue
            out.extend(int(tok) for tok in text.split() if tok.isascii() and tok.isdigit())
        return out

    def _read_process(self, pid: int, root: int) -> tuple[ProcessSample, int] | None:
        """``(sample, start_ticks)`` for one pid under watched ``root``, or ``None`` when it no longer exists."""
        base = os.path.join(self.procfs_root, str(pid))
        try:
            stat = parse_pid_stat(_read_text(os.path.join(base, "stat")), self._clk_tck)
            status = parse_pid_status(_read_text(os.path.join(base, "status")))
        except (FileNotFoundError, ProcessLookupError):  # exited: ESRCH once the task is being reaped
            return None
        except (OSError, ProcfsParseError) as exc:  # e.g. PermissionError under hidepid: report, no figures
            self._process_error = f"pid {pid}: {one_line(exc)}"
            return ProcessSample(pid, None, None, None, None, root_pid=root), -1
        return (
            ProcessSample(
                pid=pid,
                rss_bytes=status.rss_bytes,
                cpu_seconds=stat.cpu_seconds,
                locked_bytes=status.locked_bytes,
                pinned_bytes=status.pinned_bytes,
                root_pid=root,
            ),
            stat.start_ticks,
        )

    def _refresh_processes(self) -> tuple[ProcessSample, ...]:
        out: list[ProcessSample] = []
        seen: set[int] = set()
        self._process_error = None
        for root in self._watched.snapshot():
            first = self._read_process(root, root)
            known_start = self._start_ticks.get(root)
            if first is None or (known_start is not None and first[1] >= 0 and first[1] != known_start):
                # Exited, or exited and its pid was reused by an unrelated process: stop watching.
                self._watched.drop_exited(root)
                self._start_ticks.pop(root, None)
                continue
            if known_start is None and first[1] >= 0:
                self._start_ticks[root] = first[1]
            queue: deque[tuple[int, tuple[ProcessSample, int] | None]] = deque([(root, first)])
            while queue:
                pid, reading = queue.popleft()
                if pid in seen:
                    continue
                seen.add(pid)
                if reading is None:
                    reading = self._read_process(pid, root)
                    if reading is None:
                        continue
                out.append(reading[0])
                queue.extend((child, None) for child in self._children(pid))
        for pid in list(self._start_ticks):
            if pid not in seen:
                self._start_ticks.pop(pid)
        if self._process_error is None:
            self._fields.ok("processes")
        else:
            self._fields.fail("processes", self._process_error)
        return tuple(out)


class PsutilHostBackend(_WatchesProcesses):
    """HostBackend over psutil, for hosts without a Linux /proc.

    CPU busy seconds are every ``cpu_times`` column except idle, iowait, steal, guest and guest_nice (the last
    two are already in user and nice on Linux); memory used is ``total - available`` as in the procfs
    backend. Locked and pinned memory and RAPL energy are ``None``: psutil has no such figures.
    """

    name = "psutil"

    # As the procfs backend: node_exporter's usual utilisation leaves out idle, iowait and steal.
    _NOT_BUSY = frozenset({"idle", "iowait", "steal", "guest", "guest_nice"})

    def __init__(self, clock_ns: Callable[[], int] = time.monotonic_ns, process_interval_s: float = 1.0) -> None:
        if process_interval_s < 0:
            raise ValueError(f"process_interval_s must be >= 0, got {process_interval_s}")
        self._clock_ns = clock_ns
        self._watched = _Watched(int(process_interval_s * 1e9))
        self._handles: dict[int, psutil.Process] = {}  # psutil.Process keeps create_time: pid reuse is detected
        self._processes: tuple[ProcessSample, ...] = ()
        self._fields = _FieldLog()

    @classmethod
    def _busy_seconds(cls, times: tuple) -> float:
        """Seconds in every column of a psutil ``scputimes`` named tuple except the idle-like ones."""
        fields: tuple[str, ...] = times._fields  # type: ignore[attr-defined]
        return float(sum(value for name, value in zip(fields, times) if name not in cls._NOT_BUSY))

    def sample(self) -> HostSample:
        now_ns = self._clock_ns()
        cpu_total = cpu_per_core = None
        try:
            cpu_total = self._busy_seconds(psutil.cpu_times())
            cpu_per_core = tuple(self._busy_seconds(t) for t in psutil.cpu_times(percpu=True))
            self._fields.ok("cpu_busy_seconds")
        except (OSError, psutil.Error) as exc:
            self._fields.fail("cpu_busy_seconds", one_line(exc))
        total = available = None
        try:
            vm = psutil.virtual_memory()
            total, available = int(vm.total), int(vm.available)
            self._fields.ok("memory_total_bytes")
        except (OSError, psutil.Error) as exc:
            self._fields.fail("memory_total_bytes", one_line(exc))
        if self._watched.refresh_due(now_ns):
            self._processes = self._refresh_processes()
        return _host_sample(now_ns, cpu_total, cpu_per_core, total, available, self._processes)

    def _handle(self, pid: int) -> psutil.Process:
        handle = self._handles.get(pid)
        if handle is None:
            handle = self._handles[pid] = psutil.Process(pid)
        return handle

    def _refresh_processes(self) -> tuple[ProcessSample, ...]:
        out: list[ProcessSample] = []
        seen: set[int] = set()
        error: str | None = None
        for root in self._watched.snapshot():
            try:
                handle = self._handle(root)
                if not handle.is_running():  # exited, or the pid now belongs to another process
                    raise psutil.NoSuchProcess(root)
                family = [handle, *handle.children(recursive=True)]
            except psutil.NoSuchProcess:  # ZombieProcess included: it has exited
                self._watched.drop_exited(root)
                continue
            except psutil.AccessDenied as exc:
                error = one_line(exc)
                family = [self._handles[root]] if root in self._handles else []
            for proc in family:
                if proc.pid in seen:
                    continue
                try:
                    with proc.oneshot():
                        cpu = proc.cpu_times()
                        rss = proc.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                except psutil.AccessDenied as exc:
                    error = one_line(exc)
                    seen.add(proc.pid)
                    out.append(ProcessSample(proc.pid, None, None, None, None, root_pid=root))
                    continue
                seen.add(proc.pid)
                out.append(ProcessSample(proc.pid, int(rss), float(cpu.user + cpu.system), None, None, root_pid=root))
        for pid in list(self._handles):
            if pid not in seen:
                del self._handles[pid]
        if error is None:
            self._fields.ok("processes")
        else:
            self._fields.fail("processes", error)
        return tuple(out)

    def field_status(self) -> list[FieldStatus]:
        return self._fields.status() + [
            FieldStatus("memory_locked_bytes", False, "psutil has no locked-memory figure (Linux /proc/meminfo only)"),
            FieldStatus("process_pinned_bytes", False, "psutil has no VmPin figure (Linux /proc/PID/status only)"),
            FieldStatus("rapl", False, "RAPL is read from Linux sysfs; this host uses the psutil backend"),
        ]

    def close(self) -> None:
        """Nothing to release."""


def open_host_backend(
    procfs_root: str = "/proc",
    sysfs_root: str = "/sys",
    clock_ns: Callable[[], int] = time.monotonic_ns,
    process_interval_s: float = 1.0,
    clk_tck: int | None = None,
) -> ProcfsHostBackend | PsutilHostBackend:
    """The procfs backend when ``<procfs_root>/stat`` exists (Linux), the psutil backend otherwise."""
    if os.path.exists(os.path.join(procfs_root, "stat")):
        return ProcfsHostBackend(procfs_root, sysfs_root, clock_ns=clock_ns,
                                 process_interval_s=process_interval_s, clk_tck=clk_tck)
    log.info("no %s/stat: using the psutil host backend", procfs_root)
    return PsutilHostBackend(clock_ns=clock_ns, process_interval_s=process_interval_s)
