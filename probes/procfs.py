"""Pure parsers for Linux ``/proc`` text: no I/O, no global state.

Each function takes the text of one file and returns numbers in SI base units (seconds, bytes). Input
that does not have the file's documented shape raises :class:`ProcfsParseError` (a ``ValueError``) with a
one-line message; no other exception type escapes. Formats are those of ``man 5 proc``.

Clock ticks (``USER_HZ``, almost always 100) are converted with a ``clk_tck`` argument that defaults to
``os.sysconf("SC_CLK_TCK")``, read at call time, never at import time.
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = [
    "CpuBusy",
    "ProcfsParseError",
    "PidStat",
    "PidStatus",
    "default_clk_tck",
    "parse_meminfo",
    "parse_pid_stat",
    "parse_pid_status",
    "parse_proc_stat",
    "parse_proc_stat_cpus",
]

# The kernel prints these counters as u64 / unsigned long: at most 20 decimal digits. Refusing longer
# tokens keeps every conversion to float finite and stays clear of int()'s digit limit.
_MAX_DIGITS = 20
_MAX_U64 = 2**64 - 1

# /proc/meminfo keys this package reads.
MEMINFO_KEYS: tuple[str, ...] = ("MemTotal", "MemAvailable", "Mlocked")

# /proc/PID/status keys this package reads, and the PidStatus field each one fills.
_STATUS_KEYS: dict[str, str] = {"VmRSS": "rss_bytes", "VmLck": "locked_bytes", "VmPin": "pinned_bytes"}


class ProcfsParseError(ValueError):
    """Text from /proc does not have the documented shape; the message names the file and the problem."""


class PidStatus(NamedTuple):
    """Memory figures from /proc/PID/status, in bytes; ``None`` where the line is absent (kernel threads
    have no ``Vm*`` lines at all)."""

    rss_bytes: int | None  # VmRSS: resident set size
    locked_bytes: int | None  # VmLck: mlock()ed memory
    pinned_bytes: int | None  # VmPin: pages pinned by drivers (RDMA, some pinned host buffers)


class PidStat(NamedTuple):
    """Figures from /proc/PID/stat."""

    pid: int
    ppid: int
    cpu_seconds: float  # utime + stime, seconds
    start_ticks: int  # field 22, starttime in clock ticks after boot: tells a reused pid apart


def default_clk_tck() -> int:
    """Clock ticks per second used by /proc (``USER_HZ``), from ``sysconf(SC_CLK_TCK)``."""
    return os.sysconf("SC_CLK_TCK")


def _uint(token: str, what: str) -> int:
    """A non-negative decimal integer of at most 20 ASCII digits (a kernel u64), else ProcfsParseError."""
    # str.isdigit() alone accepts non-ASCII digits and int() accepts "+1", " 1" and "1_0": be strict.
    if not (token.isascii() and token.isdigit()) or len(token) > _MAX_DIGITS:
        raise ProcfsParseError(f"{what}: expected a non-negative integer, got {token[:40]!r}")
    value = int(token)
    if value > _MAX_U64:
        raise ProcfsParseError(f"{what}: {token} does not fit in 64 bits")
    return value


def _check_clk_tck(clk_tck: int | None) -> int:
    if clk_tck is None:
        return default_clk_tck()
    if isinstance(clk_tck, bool) or not isinstance(clk_tck, int) or clk_tck <= 0:
        raise ProcfsParseError(f"clk_tck must be a positive integer, got {clk_tck!r}")
    return clk_tck


class CpuBusy(NamedTuple):
    """Busy CPU time from /proc/stat, in seconds since boot."""

    total_seconds: float  # the aggregate ``cpu`` line
    cores: tuple[tuple[int, float], ...]  # (core number N of ``cpuN``, seconds), ascending; offline cores absent


# /proc/stat columns, in order: user nice system idle iowait irq softirq steal guest guest_nice.
# Busy is node_exporter's usual utilisation (1 - idle - iowait - steal): user, nice, system, irq, softirq.
_BUSY_COLUMNS = (0, 1, 2, 5, 6)


def parse_proc_stat_cpus(text: str, clk_tck: int | None = None) -> CpuBusy:
    """CPU busy time from /proc/stat, all cores and per core by core number, in seconds since boot.

    Busy is every column except ``idle`` (4th), ``iowait`` (5th) and ``steal`` (8th): user, nice, system,
    irq, softirq, as node_exporter's usual ``1 - idle - iowait - steal`` utilisation counts it. Steal is
    time the hypervisor gave another guest, not work done here. ``guest`` and ``guest_nice`` are left out
    because the kernel already counts them inside ``user`` and ``nice``. Old kernels print fewer columns;
    at least user, nice, system and idle are required. Offline cores have no line and are absent.
    """
    tck = _check_clk_tck(clk_tck)
    total: float | None = None
    cores: list[tuple[int, float]] = []
    seen: set[int] = set()
    for line in text.split("\n"):
        if not line.startswith("cpu"):
            continue
        fields = line.split()
        label = fields[0]
        if len(fields) < 5:
            raise ProcfsParseError(f"/proc/stat: line {label!r} has {len(fields) - 1} columns, need at least 4")
        ticks = [_uint(tok, f"/proc/stat {label}") for tok in fields[1:]]
        busy_seconds = sum(ticks[i] for i in _BUSY_COLUMNS if i < len(ticks)) / tck
        if label == "cpu":
            if total is not None:
                raise ProcfsParseError("/proc/stat: more than one aggregate 'cpu' line")
            total = busy_seconds
        else:
            index = _uint(label[3:], "/proc/stat cpu line label")
            if index in seen:
                raise ProcfsParseError(f"/proc/stat: duplicate line {label!r}")
            seen.add(index)
            cores.append((index, busy_seconds))
    if total is None:
        raise ProcfsParseError("/proc/stat: no aggregate 'cpu' line")
    cores.sort()
    return CpuBusy(total, tuple(cores))


def parse_proc_stat(text: str, clk_tck: int | None = None) -> tuple[float, tuple[float, ...]]:
    """``(all cores, per core)`` busy seconds from /proc/stat (see :func:`parse_proc_stat_cpus`); per-core
    values in ``cpuN`` order, without the core numbers."""
    busy = parse_proc_stat_cpus(text, clk_tck)
    return busy.total_seconds, tuple(seconds for _, seconds in busy.cores)


def _kb_line(key: str, rest: str, source: str) -> int:
    """``'   1234 kB'`` -> 1234 * 1024 bytes."""
    parts = rest.split()
    if len(parts) != 2 or parts[1] != "kB":
        raise ProcfsParseError(f"{source}: {key} should be '<number> kB', got {rest.strip()[:40]!r}")
    return _uint(parts[0], f"{source} {key}") * 1024


def parse_meminfo(text: str) -> dict[str, int]:
    """``MemTotal``, ``MemAvailable`` and ``Mlocked`` from /proc/meminfo, converted from kB to bytes.

    Keys missing from the text are missing from the result (``MemAvailable`` appeared in Linux 3.14);
    ``MemTotal`` is required. Other lines are not inspected.
    """
    out: dict[str, int] = {}
    for line in text.split("\n"):
        key, sep, rest = line.partition(":")
        if sep and key in MEMINFO_KEYS:
            if key in out:
                raise ProcfsParseError(f"/proc/meminfo: duplicate {key} line")
            out[key] = _kb_line(key, rest, "/proc/meminfo")
    if "MemTotal" not in out:
        raise ProcfsParseError("/proc/meminfo: no MemTotal line")
    return out


def parse_pid_status(text: str) -> PidStatus:
    """VmRSS, VmLck and VmPin from /proc/PID/status, kB converted to bytes; ``None`` where absent.

    Kernel threads have no ``Vm*`` lines, so all three are ``None`` for them.
    """
    found: dict[str, int] = {}
    for line in text.split("\n"):
        key, sep, rest = line.partition(":")
        field = _STATUS_KEYS.get(key) if sep else None
        if field is not None:
            if field in found:
                raise ProcfsParseError(f"/proc/PID/status: duplicate {key} line")
            found[field] = _kb_line(key, rest, "/proc/PID/status")
    return PidStatus(found.get("rss_bytes"), found.get("locked_bytes"), found.get("pinned_bytes"))


def parse_pid_stat(text: str, clk_tck: int | None = None) -> PidStat:
    """pid, ppid, cpu seconds (utime + stime) and start time from /proc/PID/stat.

    The second field is the command name in parentheses; it may itself contain spaces and ``)``
    (``prctl(PR_SET_NAME)`` takes any bytes), so the fields after it are found from the *last* ``)``.
    """
    tck = _check_clk_tck(clk_tck)
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ProcfsParseError("/proc/PID/stat: no '(comm)' field")
    pid = _uint(text[:open_paren].strip(), "/proc/PID/stat pid")
    rest = text[close_paren + 1 :].split()
    # rest[0] is field 3 (state): field N of man 5 proc is rest[N - 3].
    if len(rest) < 20:
        raise ProcfsParseError(f"/proc/PID/stat: {len(rest)} fields after comm, need at least 20")
    ppid = _uint(rest[1], "/proc/PID/stat ppid")
    utime = _uint(rest[11], "/proc/PID/stat utime")
    stime = _uint(rest[12], "/proc/PID/stat stime")
    start_ticks = _uint(rest[19], "/proc/PID/stat starttime")
    return PidStat(pid=pid, ppid=ppid, cpu_seconds=(utime + stime) / tck, start_ticks=start_ticks)
