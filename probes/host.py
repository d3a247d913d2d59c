"""Host backends: CPU busy time, memory, RAPL energy and registered workload processes.

``ProcfsHostBackend`` reads Linux ``/proc`` and ``/sys`` directly (roots injectable, so tests use fake
trees); ``PsutilHostBackend`` is the fallback for machines without a Linux ``/proc`` (macOS laptops in
mock mode) and has no locked, pinned or RAPL figures. :func:`open_host_backend` picks one.

Both run on the sampler thread at 10-100 Hz: the machine-wide files are read on every ``sample()``;
workload processes (and their descendants) only every ``process_interval_s``, with the previous tuple
returned in between. ``watch_process`` / ``unwatch_process`` may be called from another thread.

The procfs backend keeps the files it reads again and again open (``KeptFile``: /proc/stat, meminfo,
each live watched process's stat and status, the RAPL counters) and rereads them with ``os.pread`` at
offset 0, which procfs and sysfs answer with fresh content: no open and close per read. Outside a real
procfs or sysfs mount (the fake trees of the tests) it checks before each read that the path still
names the file it holds. ``probe_status`` reports each part of the read as its own probe.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable

import psutil

from wattledger.probes.base import FieldStatus, HostSample, ProbeOutcome, ProbeUnavailable, ProcessSample
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
from wattledger.probes.rapl import RaplReader, read_sysfs_file

__all__ = ["KeptFile", "KeptFiles", "ProcfsHostBackend", "PsutilHostBackend", "mounted_filesystem_type",
           "open_host_backend"]

log = logging.getLogger(__name__)


def _read_text(path: str) -> str:
    # latin-1 never fails to decode; the fields parsed are ASCII, and comm may hold any bytes.
    with open(path, "rb", buffering=0) as f:
        return f.read().decode("latin-1")


def _unescape_mount_path(field: str) -> str:
    """A mountinfo path with its octal escapes (``\\040`` for a space, ...) undone."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted_filesystem_type(root: str, mountinfo_path: str = "/proc/self/mountinfo") -> str | None:
    """The type of the filesystem mounted at ``root`` ("proc", "sysfs", ...), from this process's mount
    table; None when ``root`` is no mount point (a fake tree in tests) or the table cannot be read."""
    target = os.path.realpath(root)
    try:
        text = _read_text(mountinfo_path)
    except OSError:
        return None
    fstype = None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and len(fields) >= 5 and _unescape_mount_path(fields[4]) == target:
            fstype = right.split(maxsplit=1)[0] if right.strip() else None  # a later mount hides an earlier one
    return fstype


class KeptFile:
    """One small file read whole, again and again, through a descriptor kept open: ``os.pread`` at offset
    0 instead of open, read and close each time (procfs makes each read at offset 0 a fresh snapshot).

    ``check_replaced``: stat the path before each read and reopen when it names another file (device and
    inode) than the one held open. A kept descriptor keeps reading the file it was opened on; a rewrite in
    place is seen, a file replaced under the same name (a rename, or removed and made again, as tests do to
    fake trees) would not be. procfs never replaces its files (a /proc/PID file of a process that has exited
    fails with ESRCH instead), so the host backend sets it only for trees that are not a procfs mount.

    Any error on the kept descriptor closes it and the file is opened and read afresh once, so what a read
    returns or raises is what open-read-close would have at that moment. Not thread-safe: one reader.
    """

    __slots__ = ("path", "_check_replaced", "_fd", "_identity", "_size_bytes")

    def __init__(self, path: str, check_replaced: bool, size_bytes: int = 4096) -> None:
        self.path = path
        self._check_replaced = check_replaced
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._size_bytes = size_bytes  # read size; doubles while a read fills it (/proc/stat grows with cores)

    def read_text(self) -> str:
        """The whole file as text (latin-1: never fails, and the fields parsed are ASCII)."""
        return self.read_bytes().decode("latin-1")

    def read_bytes(self) -> bytes:
        """The whole file."""
        fd = self._fd
        if fd is not None:
            if self._check_replaced and self._replaced():
                self.close()
            else:
                try:
                    return self._read_whole(fd)
                except OSError:  # ESRCH: that process exited (its pid may be live again); EIO...: read afresh
                    self.close()
        return self._open_and_read()

    def _replaced(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:  # removed (FileNotFoundError): let go of the old file, and open() says why
            return True
        return (st.st_dev, st.st_ino) != self._identity

    def _open_and_read(self) -> bytes:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = self._read_whole(fd)
            if self._check_replaced:
                st = os.fstat(fd)
                self._identity = (st.st_dev, st.st_ino)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return data

    def _read_whole(self, fd: int) -> bytes:
        # A read shorter than asked is the end of the file: seq_file and regular files fill the buffer
        # while there is more. One that fills it is done again from 0 with twice the room, whole.
        while len(data := os.pread(fd, self._size_bytes, 0)) >= self._size_bytes:
            self._size_bytes *= 2
        return data

    def close(self, _os_close: Callable[[int], None] = os.close) -> None:
        # (os.close bound at definition: __del__ may run at interpreter exit, after the module's globals go.)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _os_close(fd)

    def __del__(self) -> None:  # a backend dropped without close() gives its descriptors back
        self.close()


class KeptFiles:
    """A ``read_file(path) -> bytes`` for :class:`RaplReader` that keeps each file open from its second
    read on (a :class:`KeptFile`): the energy counters are read every sample, a zone's name and range once.
    """

    def __init__(self, check_replaced: bool) -> None:
        self._check_replaced = check_replaced
        self._read_once: set[str] = set()
        self._kept: dict[str, KeptFile] = {}

    def __call__(self, path: str) -> bytes:
        kept = self._kept.get(path)
        if kept is not None:
            return kept.read_bytes()
        if path not in self._read_once:
            self._read_once.add(path)
            return read_sysfs_file(path)
        kept = self._kept[path] = KeptFile(path, self._check_replaced, size_bytes=64)
        return kept.read_bytes()

    def close(self) -> None:
        for kept in self._kept.values():
            kept.close()
        self._kept.clear()


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


# The fields /proc/meminfo gives, in the order field_status lists them.
_MEMORY_FIELDS = ("memory_total_bytes", "memory_available_bytes", "memory_locked_bytes")


class _FieldLog:
    """The last error per field, logged once on each transition into failing."""

    def __init__(self) -> None:
        self.errors: dict[str, str | None] = {}

    def ok(self, name: str) -> None:
        if self.errors.get(name) is not None:
            log.info("host field %s readable again", name)
        self.errors[name] = None

    def ok_all(self, names: tuple[str, ...]) -> None:
        """``ok`` for each of ``names``, in one call."""
        errors = self.errors
        for name in names:
            if errors.get(name) is not None:
                log.info("host field %s readable again", name)
            errors[name] = None

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


def _rapl_outcome(problem: str | None, duration_seconds: float) -> ProbeOutcome:
    return ProbeOutcome("host.rapl", problem is None, duration_seconds, problem)


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
        # Outside a procfs mount (a fake tree) files may be replaced under their names: check each read.
        self._check_replaced = mounted_filesystem_type(procfs_root) != "proc"
        self._stat_file = KeptFile(self._stat_path, self._check_replaced)
        self._meminfo_file = KeptFile(self._meminfo_path, self._check_replaced)
        self._pid_files: dict[int, tuple[KeptFile, KeptFile]] = {}  # pid -> (stat, status), while it lives
        try:
            parse_proc_stat(self._stat_file.read_text(), self._clk_tck)
        except (OSError, ProcfsParseError) as exc:
            raise ProbeUnavailable(f"procfs host probe: cannot use {self._stat_path}: {one_line(exc)}") from None
        self._rapl_files: KeptFiles | None = None
        if rapl is None:  # energy_uj kept open too (sysfs rereads an attribute at offset 0)
            self._rapl_files = KeptFiles(check_replaced=mounted_filesystem_type(sysfs_root) != "sysfs")
            rapl = RaplReader(sysfs_root, read_file=self._rapl_files)
        self._rapl = rapl
        self._watched = _Watched(int(process_interval_s * 1e9))
        self._start_ticks: dict[int, int] = {}  # root pid -> starttime when first seen: detects pid reuse
        self._processes: tuple[ProcessSample, ...] = ()
        self._process_error: str | None = None
        self._processes_seconds = 0.0  # how long the last refresh of the processes took
        self._fields = _FieldLog()
        self._outcomes: list[ProbeOutcome] = []

    # -- HostBackend ---------------------------------------------------------------------------------

    def sample(self) -> HostSample:
        clock_ns = self._clock_ns
        now_ns = clock_ns()
        cpu_total, cpu_per_core, core_ids = self._read_cpu()
        stat_done_ns = clock_ns()
        total, available, locked = self._read_memory()
        meminfo_done_ns = clock_ns()
        energy = self._rapl.read()
        rapl_done_ns = clock_ns()
        if self._watched.refresh_due(now_ns):
            self._processes = self._refresh_processes()
            self._processes_seconds = (clock_ns() - rapl_done_ns) / 1e9
        self._outcomes = self._sub_probe_outcomes((stat_done_ns - now_ns) / 1e9, (meminfo_done_ns - stat_done_ns) / 1e9,
                                                  (rapl_done_ns - meminfo_done_ns) / 1e9)
        return _host_sample(now_ns, cpu_total, cpu_per_core, total, available, self._processes,
                            cpu_core_ids=core_ids, memory_locked_bytes=locked, rapl_energy_joules=energy or None)

    def _sub_probe_outcomes(self, stat_seconds: float, meminfo_seconds: float,
                            rapl_seconds: float) -> list[ProbeOutcome]:
        errors = self._fields.errors
        return [
            ProbeOutcome("host.stat", errors["cpu_busy_seconds"] is None, stat_seconds, errors["cpu_busy_seconds"]),
            # A meminfo without MemAvailable or Mlocked (old kernels) is read all the same: fields, not the probe.
            ProbeOutcome("host.meminfo", errors["memory_total_bytes"] is None, meminfo_seconds,
                         errors["memory_total_bytes"]),
            ProbeOutcome("host.processes", self._process_error is None, self._processes_seconds, self._process_error),
            _rapl_outcome(self._rapl.problem(), rapl_seconds),
        ]

    def probe_status(self) -> list[ProbeOutcome]:
        """The sub-probes of the last ``sample()``: ``host.stat`` (/proc/stat), ``host.meminfo``,
        ``host.processes`` (the watched processes, as of their last refresh: every ``process_interval_s``)
        and ``host.rapl`` (failed, with the reason, when there is no RAPL or a zone cannot be read)."""
        return self._outcomes

    def _read_cpu(self) -> tuple[float | None, tuple[float, ...] | None, tuple[int, ...] | None]:
        """``(all cores, per core, core numbers)`` busy seconds from /proc/stat; Nones when unreadable."""
        try:
            busy = parse_proc_stat_cpus(self._stat_file.read_text(), self._clk_tck)
        except (OSError, ProcfsParseError) as exc:
            self._fields.fail("cpu_busy_seconds", f"{self._stat_path}: {one_line(exc)}")
            return None, None, None
        self._fields.ok("cpu_busy_seconds")
        core_ids, per_core = zip(*busy.cores) if busy.cores else ((), ())  # two tuples in one C-level pass
        return busy.total_seconds, per_core, core_ids

    def _read_memory(self) -> tuple[int | None, int | None, int | None]:
        """``(total, available, locked)`` bytes from /proc/meminfo; None for each figure it lacks."""
        try:
            mem = parse_meminfo(self._meminfo_file.read_text())
        except (OSError, ProcfsParseError) as exc:
            for name in _MEMORY_FIELDS:
                self._fields.fail(name, f"{self._meminfo_path}: {one_line(exc)}")
            return None, None, None
        total, available, locked = mem.get("MemTotal"), mem.get("MemAvailable"), mem.get("Mlocked")
        if available is not None and locked is not None:  # every modern kernel: one call for the three
            self._fields.ok_all(_MEMORY_FIELDS)
            return total, available, locked
        self._fields.ok("memory_total_bytes")
        if available is None:
            self._fields.fail("memory_available_bytes", "no MemAvailable in meminfo (Linux < 3.14)")
        else:
            self._fields.ok("memory_available_bytes")
        if locked is None:
            self._fields.fail("memory_locked_bytes", "no Mlocked in meminfo")
        else:
            self._fields.ok("memory_locked_bytes")
        return total, available, locked

    def field_status(self) -> list[FieldStatus]:
        """CPU and memory fields (after at least one ``sample()``), then one entry per RAPL zone."""
        return self._fields.status() + self._rapl.field_status()

    def close(self) -> None:
        """Closes the files kept open between samples (/proc/stat, meminfo, each live watched pid's, RAPL's)."""
        self._stat_file.close()
        self._meminfo_file.close()
        self._close_pid_files(keep=())
        if self._rapl_files is not None:
            self._rapl_files.close()

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
        stat_file, status_file = self._files_of(pid)
        try:
            stat = parse_pid_stat(stat_file.read_text(), self._clk_tck)
            status = parse_pid_status(status_file.read_text())
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

    def _files_of(self, pid: int) -> tuple[KeptFile, KeptFile]:
        """``/proc/PID/stat`` and ``status`` of ``pid``, kept open from one refresh to the next."""
        files = self._pid_files.get(pid)
        if files is None:
            base = os.path.join(self.procfs_root, str(pid))
            files = self._pid_files[pid] = (KeptFile(os.path.join(base, "stat"), self._check_replaced),
                                            KeptFile(os.path.join(base, "status"), self._check_replaced))
        return files

    def _close_pid_files(self, keep: set[int] | tuple[()]) -> None:
        """Closes the files of every pid not in ``keep`` (exited, or no longer watched)."""
        for pid in [pid for pid in self._pid_files if pid not in keep]:
            for kept in self._pid_files.pop(pid):
                kept.close()

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
        self._close_pid_files(keep={sample.pid for sample in out})  # not `seen`: that holds the exited too
        if self._process_error is None:
            self._fields.ok("processes")
        else:
            self._fields.fail("processes", self._process_error)
        return tuple(out)


_PSUTIL_NO_RAPL = "RAPL is read from Linux sysfs; this host uses the psutil backend"


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
        self._processes_seconds = 0.0
        self._fields = _FieldLog()
        self._outcomes: list[ProbeOutcome] = []

    @classmethod
    def _busy_seconds(cls, times: tuple) -> float:
        """Seconds in every column of a psutil ``scputimes`` named tuple except the idle-like ones."""
        fields: tuple[str, ...] = times._fields  # type: ignore[attr-defined]
        return float(sum(value for name, value in zip(fields, times) if name not in cls._NOT_BUSY))

    def sample(self) -> HostSample:
        clock_ns = self._clock_ns
        now_ns = clock_ns()
        cpu_total = cpu_per_core = None
        try:
            cpu_total = self._busy_seconds(psutil.cpu_times())
            cpu_per_core = tuple(self._busy_seconds(t) for t in psutil.cpu_times(percpu=True))
            self._fields.ok("cpu_busy_seconds")
        except (OSError, psutil.Error) as exc:
            self._fields.fail("cpu_busy_seconds", one_line(exc))
        cpu_done_ns = clock_ns()
        total = available = None
        try:
            vm = psutil.virtual_memory()
            total, available = int(vm.total), int(vm.available)
            self._fields.ok("memory_total_bytes")
        except (OSError, psutil.Error) as exc:
            self._fields.fail("memory_total_bytes", one_line(exc))
        memory_done_ns = clock_ns()
        if self._watched.refresh_due(now_ns):
            self._processes = self._refresh_processes()
            self._processes_seconds = (clock_ns() - memory_done_ns) / 1e9
        errors = self._fields.errors
        self._outcomes = [  # the procfs backend's names, for the same figures read another way
            ProbeOutcome("host.stat", errors["cpu_busy_seconds"] is None, (cpu_done_ns - now_ns) / 1e9,
                         errors["cpu_busy_seconds"]),
            ProbeOutcome("host.meminfo", errors["memory_total_bytes"] is None, (memory_done_ns - cpu_done_ns) / 1e9,
                         errors["memory_total_bytes"]),
            ProbeOutcome("host.processes", errors.get("processes") is None, self._processes_seconds,
                         errors.get("processes")),
            _rapl_outcome(_PSUTIL_NO_RAPL, 0.0),
        ]
        return _host_sample(now_ns, cpu_total, cpu_per_core, total, available, self._processes)

    def probe_status(self) -> list[ProbeOutcome]:
        """As the procfs backend's (``host.stat`` and ``host.meminfo`` are psutil's reads of the same
        figures); ``host.rapl`` always fails: psutil has no RAPL."""
        return self._outcomes

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
            FieldStatus("rapl", False, _PSUTIL_NO_RAPL),
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
