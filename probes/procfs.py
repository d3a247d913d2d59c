"""Pure parsers for Linux ``/proc`` text: no I/O, no global state.

Each function takes the text of one file and returns numbers in SI base units (seconds, bytes). Input
that does not have the file's documented shape raises :class:`ProcfsParseError` (a ``ValueError``) with a
one-line message; no other exception type escapes. Formats are those of ``man 5 proc``.

Clock ticks (``USER_HZ``, almost always 100) are converted with a ``clk_tck`` argument that defaults to
``os.sysconf("SC_CLK_TCK")``, read at call time, never at import time.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

__all__ = [
    "CpuBusy",
    "ProcfsParseError",
    "PidStat",
    "PidStatus",
    "default_clk_tck",
    "parse_meminfo",
    "parse_meminfo_lines",
    "parse_pid_stat",
    "parse_pid_status",
    "parse_pid_status_lines",
    "parse_proc_stat",
    "parse_proc_stat_cpus",
    "parse_proc_stat_cpus_lines",
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

    The kernel's own layout (the aggregate line first, every line as wide) is read by
    :func:`_cpu_busy_uniform` in a few whole-table operations; anything else, and every error, by the line by
    line :func:`parse_proc_stat_cpus_lines`. Both give the same figures (a property test holds them to it).
    """
    tck = _check_clk_tck(clk_tck)
    busy = _cpu_busy_uniform(text, tck)
    return busy if busy is not None else parse_proc_stat_cpus_lines(text, tck)


# The kernel's cpu lines at the top of /proc/stat: a label, then at least 4 columns of at most 19 digits
# (so each fits in 64 bits; a 20-digit one takes the general path), separated by spaces.
_CPU_BLOCK = re.compile(r"(?:cpu[0-9]{0,19}(?: +[0-9]{1,19}){4,}\n)+")


def _cpu_busy_uniform(text: str, tck: int) -> CpuBusy | None:
    """:func:`parse_proc_stat_cpus` for the kernel's layout, ``None`` for anything else: the cpu lines first
    (the aggregate ``cpu``, then ``cpuN`` in ascending N), all as wide, and no other cpu line further down.

    One regex checks every number of the block; the labels are taken out of the split block by a stride,
    and that the stride finds exactly the labels proves every line is as wide, so a column is one more
    stride. Each step is one C-level pass over the table, not Python work per number or per line:
    /proc/stat has a line per core, and the host probe reads it at up to 10 Hz."""
    block = _CPU_BLOCK.match(text)
    if block is None or text.find("\ncpu", block.end() - 1) >= 0:
        return None
    lines = block.group().count("\n")
    tokens = block.group().split()
    width = len(tokens) // lines  # label + columns, if every line is as wide (checked below)
    if width * lines != len(tokens):
        return None
    labels = " ".join(tokens[::width])
    core_numbers = list(map(int, labels.replace("cpu", "").split()))
    # Each line's label holds one "cpu": as many as lines means the stride met labels only. The aggregate
    # first, then one number per line after it, ascending: the kernel's order (anything else goes the
    # general way, which sorts, and names a duplicate).
    if (tokens[0] != "cpu" or labels.count("cpu") != lines or len(core_numbers) != lines - 1
            or sorted(set(core_numbers)) != core_numbers):
        return None
    del tokens[::width]
    columns = width - 1
    # Integer sums of the busy columns (old kernels print fewer), then one division per line: the very
    # figures the line-by-line path computes.
    busy_ticks = map(sum, zip(*[map(int, tokens[column::columns]) for column in _BUSY_COLUMNS if column < columns]))
    seconds = [ticks / tck for ticks in busy_ticks]
    return CpuBusy(seconds[0], tuple(zip(core_numbers, seconds[1:])))


def parse_proc_stat_cpus_lines(text: str, clk_tck: int | None = None) -> CpuBusy:
    """:func:`parse_proc_stat_cpus` line by line: the general path, whose errors name the first bad line."""
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


def _line_rest(text: str, key: str) -> str | None:
    """What follows ``key:`` on the one line that starts with it, ``None`` when no line does.

    Raises :class:`_Unusual` when two lines start with it: the caller's general path then says so."""
    head = key + ":"
    if text.startswith(head):
        start = len(head)
    else:
        found = text.find("\n" + head)
        if found < 0:
            return None
        start = found + 1 + len(head)
    end = text.find("\n", start)
    if end < 0:
        end = len(text)
    if text.find("\n" + head, end) >= 0:
        raise _Unusual(key)
    return text[start:end]


class _Unusual(Exception):
    """A fast path met text it leaves to the general path (which gives the error, in line order)."""


def _kb_fields(text: str, keys: dict[str, str], source: str) -> dict[str, int]:
    """``{field: bytes}`` for the ``keys`` (file key -> field name) present in ``text``: a few ``find``
    calls instead of a partition of every line. :class:`_Unusual` (a duplicate) or a ProcfsParseError
    (a bad value) sends the caller to its general path, which reports the first problem in line order."""
    out: dict[str, int] = {}
    for key, field in keys.items():
        rest = _line_rest(text, key)
        if rest is not None:
            out[field] = _kb_line(key, rest, source)
    return out


_MEMINFO_FIELDS = {key: key for key in MEMINFO_KEYS}


def parse_meminfo(text: str) -> dict[str, int]:
    """``MemTotal``, ``MemAvailable`` and ``Mlocked`` from /proc/meminfo, converted from kB to bytes.

    Keys missing from the text are missing from the result (``MemAvailable`` appeared in Linux 3.14);
    ``MemTotal`` is required. Other lines are not inspected.
    """
    try:
        out = _kb_fields(text, _MEMINFO_FIELDS, "/proc/meminfo")
    except (_Unusual, ProcfsParseError):
        return parse_meminfo_lines(text)
    if "MemTotal" not in out:
        raise ProcfsParseError("/proc/meminfo: no MemTotal line")
    return out


def parse_meminfo_lines(text: str) -> dict[str, int]:
    """:func:`parse_meminfo` line by line: the general path, whose errors name the first bad line."""
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
    try:
        found = _kb_fields(text, _STATUS_KEYS, "/proc/PID/status")
    except (_Unusual, ProcfsParseError):
        return parse_pid_status_lines(text)
    return PidStatus(found.get("rss_bytes"), found.get("locked_bytes"), found.get("pinned_bytes"))


def parse_pid_status_lines(text: str) -> PidStatus:
    """:func:`parse_pid_status` line by line: the general path, whose errors name the first bad line."""
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
