"""Builds fake /proc and /sys/class/powercap trees for host-probe tests (in ``tmp_path``).

The checked-in tree under ``tests/fixtures/host/`` is a fixed 4-core machine; this module makes the
variations (wraparound, unreadable counters, missing directories, processes that come and go). The text
it writes has the kernel's layout (``man 5 proc``), so the same parsers read both.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "host"
FIXTURE_PROC = FIXTURE_ROOT / "proc"
FIXTURE_SYS = FIXTURE_ROOT / "sys"

# Makes energy_uj a directory: reading it raises IsADirectoryError (an OSError), as a root-only file
# would raise PermissionError for a non-root agent. Tests run as root, so chmod 000 would not do.
UNREADABLE = "<unreadable>"


def stat_line(
    pid: int,
    comm: str,
    ppid: int,
    utime: int,
    stime: int,
    starttime: int = 123456,
    state: str = "S",
    num_threads: int = 1,
    rss_pages: int = 0,
) -> str:
    """One /proc/PID/stat line with all 52 fields; times in clock ticks."""
    fields = [
        state, ppid, pid, pid, 0, -1, 4194560,  # state ppid pgrp session tty_nr tpgid flags
        15123, 0, 12, 0,  # minflt cminflt majflt cmajflt
        utime, stime, 0, 0,  # utime stime cutime cstime
        20, 0, num_threads, 0, starttime,  # priority nice num_threads itrealvalue starttime
        1_234_567_168, rss_pages, 18446744073709551615,  # vsize rss rsslim
        94_000_000_000_000, 94_000_000_100_000, 140_730_000_000_000, 0, 0,  # startcode endcode startstack kstk*
        0, 0, 16781312, 17642,  # signal blocked sigignore sigcatch
        1, 0, 0, 17, 2, 0, 0, 0, 0, 0,  # wchan .. cgtime (fields 35-44)
        94_000_000_200_000, 94_000_000_300_000, 94_000_010_000_000,  # start_data end_data start_brk
        140_730_000_100_000, 140_730_000_100_100, 140_730_000_100_100, 140_730_000_200_000, 0,  # arg/env/exit
    ]
    assert len(fields) == 50
    return f"{pid} ({comm}) " + " ".join(str(f) for f in fields) + "\n"


def status_text(
    name: str,
    pid: int,
    ppid: int,
    rss_kb: int | None,
    lck_kb: int | None = 0,
    pin_kb: int | None = 0,
    threads: int = 1,
) -> str:
    """A /proc/PID/status as Linux 6.x prints it; ``rss_kb=None`` leaves out every Vm line (kernel thread)."""
    lines = [
        f"Name:\t{name}", "Umask:\t0022", "State:\tS (sleeping)", f"Tgid:\t{pid}", "Ngid:\t0", f"Pid:\t{pid}",
        f"PPid:\t{ppid}", "TracerPid:\t0", "Uid:\t1000\t1000\t1000\t1000", "Gid:\t1000\t1000\t1000\t1000",
        "FDSize:\t256", "Groups:\t4 24 27 1000 ", f"NStgid:\t{pid}", f"NSpid:\t{pid}", f"NSpgid:\t{pid}",
        f"NSsid:\t{pid}", f"Kthread:\t{1 if rss_kb is None else 0}",
    ]
    if rss_kb is not None:
        vm = [("VmPeak", rss_kb * 3), ("VmSize", rss_kb * 3), ("VmLck", lck_kb), ("VmPin", pin_kb),
              ("VmHWM", rss_kb), ("VmRSS", rss_kb), ("RssAnon", rss_kb // 2), ("RssFile", rss_kb - rss_kb // 2),
              ("RssShmem", 0), ("VmData", rss_kb), ("VmStk", 132), ("VmExe", 2836), ("VmLib", 10404),
              ("VmPTE", 120), ("VmSwap", 0), ("HugetlbPages", 0)]
        lines += [f"{key}:\t{value:8d} kB" for key, value in vm if value is not None]
    lines += [
        "CoreDumping:\t0", "THP_enabled:\t1", f"Threads:\t{threads}", "SigQ:\t0/127448",
        "SigPnd:\t0000000000000000", "ShdPnd:\t0000000000000000", "SigBlk:\t0000000000000000",
        "SigIgn:\t0000000001001000", "SigCgt:\t0000000180004002", "CapInh:\t0000000000000000",
        "CapPrm:\t0000000000000000", "CapEff:\t0000000000000000", "CapBnd:\t000001ffffffffff",
        "CapAmb:\t0000000000000000", "NoNewPrivs:\t0", "Seccomp:\t0", "Seccomp_filters:\t0",
        "Cpus_allowed:\tf", "Cpus_allowed_list:\t0-3", "Mems_allowed:\t00000001", "Mems_allowed_list:\t0",
        "voluntary_ctxt_switches:\t1802", "nonvoluntary_ctxt_switches:\t37",
    ]
    return "\n".join(lines) + "\n"


def proc_stat_text(cores: list[tuple[int, ...]]) -> str:
    """/proc/stat from per-core rows of 10 tick columns; the aggregate ``cpu`` line is their sum."""
    total = [sum(col) for col in zip(*cores)]
    lines = ["cpu  " + " ".join(map(str, total))]
    lines += [f"cpu{i} " + " ".join(map(str, row)) for i, row in enumerate(cores)]
    lines += ["intr 5583912 9 0 0 0 0 0 0 0 1 0 0 0 0 0 0 0", "ctxt 9876543", "btime 1732262400",
              "processes 45123", "procs_running 2", "procs_blocked 0",
              "softirq 1234567 0 234567 12 34567 8901 0 4567 345678 0 123456"]
    return "\n".join(lines) + "\n"


def meminfo_text(total_kb: int, available_kb: int | None, mlocked_kb: int | None) -> str:
    """A short /proc/meminfo; ``None`` leaves a line out."""
    lines = [f"MemTotal:       {total_kb:8d} kB", f"MemFree:        {total_kb // 4:8d} kB"]
    if available_kb is not None:
        lines.append(f"MemAvailable:   {available_kb:8d} kB")
    lines += ["Buffers:          123456 kB", "Cached:          4567890 kB", "Unevictable:       10240 kB"]
    if mlocked_kb is not None:
        lines.append(f"Mlocked:        {mlocked_kb:8d} kB")
    lines += ["HugePages_Total:       0", "Hugepagesize:       2048 kB"]
    return "\n".join(lines) + "\n"


@dataclass
class Proc:
    """One process for :func:`build_proc`; ``children`` maps a thread id to that thread's child pids."""

    comm: str
    ppid: int
    utime: int = 100
    stime: int = 20
    rss_kb: int | None = 10240
    lck_kb: int | None = 0
    pin_kb: int | None = 0
    starttime: int = 123456
    children: dict[int, list[int]] = field(default_factory=dict)


def write_process(proc_root: Path, pid: int, p: Proc) -> None:
    """Writes /proc/PID/{stat,status} and task/TID/children for every thread in ``p.children``."""
    base = proc_root / str(pid)
    base.mkdir(parents=True, exist_ok=True)
    (base / "stat").write_text(stat_line(pid, p.comm, p.ppid, p.utime, p.stime, p.starttime))
    (base / "status").write_text(status_text(p.comm, pid, p.ppid, p.rss_kb, p.lck_kb, p.pin_kb))
    threads = p.children or {pid: []}
    for tid, kids in threads.items():
        task = base / "task" / str(tid)
        task.mkdir(parents=True, exist_ok=True)
        (task / "children").write_text("".join(f"{k} " for k in kids))


def remove_process(proc_root: Path, pid: int) -> None:
    shutil.rmtree(proc_root / str(pid))


def build_proc(
    root: Path,
    cores: list[tuple[int, ...]] | None = None,
    meminfo: str | None = None,
    processes: dict[int, Proc] | None = None,
) -> Path:
    """Makes ``root/proc`` with stat, meminfo and the given processes; returns the proc root."""
    proc = root / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    cores = cores or [(100, 0, 50, 1000, 10, 0, 5, 0, 0, 0)] * 4
    (proc / "stat").write_text(proc_stat_text(cores))
    (proc / "meminfo").write_text(meminfo or meminfo_text(16_000_000, 12_000_000, 4096))
    for pid, p in (processes or {}).items():
        write_process(proc, pid, p)
    return proc


def build_powercap(root: Path, zones: dict[str, dict[str, object]]) -> Path:
    """Makes ``root/sys/class/powercap/<zone>/{name,energy_uj,max_energy_range_uj}``; returns the sys root.

    ``zones`` maps a directory name ("intel-rapl:0", "intel-rapl:0:2") to its files, e.g.
    ``{"name": "package-0", "energy_uj": 900, "max_energy_range_uj": 1000}``. An ``energy_uj`` of
    :data:`UNREADABLE` makes it a directory, which cannot be read.
    """
    sys_root = root / "sys"
    powercap = sys_root / "class" / "powercap"
    powercap.mkdir(parents=True, exist_ok=True)
    for zone, files in zones.items():
        (powercap / zone).mkdir(exist_ok=True)
        for name, value in files.items():
            set_zone_file(sys_root, zone, name, value)
    return sys_root


def set_zone_file(sys_root: Path, zone: str, name: str, value: object) -> None:
    """Writes one powercap file (``energy_uj`` etc.); :data:`UNREADABLE` makes it a directory."""
    path = sys_root / "class" / "powercap" / zone / name
    if path.is_dir():
        path.rmdir()
    elif path.exists() and value == UNREADABLE:
        os.unlink(path)
    if value == UNREADABLE:
        path.mkdir()
    else:
        path.write_text(f"{value}\n")
