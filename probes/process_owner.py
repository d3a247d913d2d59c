"""One host PID -> the process (command name, start time, PID namespace) and its owner from its cgroup.

For issue 13 item 2 (from process to owner). NVML lists the processes on each GPU by PID, and those are
host PIDs whatever namespace the caller is in ("the nvidia-driver itself does not support pid-namespaces,
so anytime you query it for the set of processes that are using GPUs, you will always get the host pids",
NVIDIA/nvidia-docker#1483). So the agent can look them up only in a /proc that shows the host's PID
namespace: on Kubernetes, a pod with ``hostPID: true``; on a systemd node, the agent outside any PID
namespace. :func:`read_pid_view` says whether ``procfs_root`` is such a /proc, and the wiring must refuse to
attribute by PID when it is not (``PidView.shows_host_pids`` not True): a PID from NVML then names nothing,
or worse, an unrelated process of the agent's own namespace.

:class:`ProcessOwnerReader` reads, for one PID, everything through one directory descriptor of
``<procfs_root>/<pid>``: on procfs, a descriptor opened before the process exits goes on naming that
process (reads then fail with ENOENT or ESRCH) and never a later process that reuses the PID, so the stat,
comm, cgroup and namespace read are always one process's. A PID that is gone, or exits during the read, or
is a zombie, gives None: a race, not an error. Anything else that stops the read (PermissionError under
``hidepid``, a malformed file in a fake tree) raises :class:`ProcessOwnerError`, one line.

What the wiring needs from it: one reader per agent (it reads the boot time and the agent's namespace
once), and a cache keyed by ``ProcessOwner.identity``, ``(pid, start_ticks)``: for each PID NVML lists,
``start_ticks(pid)`` (one read of /proc/PID/stat), then ``read(pid)`` only when that pair is new (a PID
reused by a new process has another start time). The
process's owner is ``ProcessOwner.cgroup`` (probes/cgroups.py): a pod UID, a container, a systemd unit, or
nothing, in which case the wiring groups by ``comm``.

What the agent needs, privileges: /proc/PID/stat, comm and cgroup are world-readable (unless /proc is
mounted with ``hidepid``); /proc/PID/ns/pid needs ptrace-read access to the process (man 7 namespaces,
man 2 ptrace "Ptrace access mode checking": the same uid and no capability the agent lacks, or
CAP_SYS_PTRACE). Without it ``pid_namespace`` is None and nothing else is lost. A /proc mounted with
``hidepid=invisible`` (or 2) hides other users' processes from an agent without that access: their PIDs
then read as gone (None), so a wiring that sees NVML list a PID it never finds should say so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .cgroups import CgroupOwner, owner_from_cgroup
from .errors import one_line
from .procfs import ProcfsParseError, default_clk_tck, parse_pid_stat

__all__ = [
    "HOST_PID_NAMESPACE_INODE",
    "PidView",
    "ProcessOwner",
    "ProcessOwnerError",
    "ProcessOwnerReader",
    "parse_boot_time_s",
    "parse_namespace_link",
    "read_pid_view",
    "read_process_owner",
]

# The initial (host) PID namespace has a fixed inode: PROC_PID_INIT_INO = 0xEFFFFFFCU
# (include/linux/proc_ns.h, since Linux 3.8), so `readlink /proc/1/ns/pid` on the host is pid:[4026531836].
HOST_PID_NAMESPACE_INODE = 0xEFFFFFFC

# Process states that have exited (man 5 proc, /proc/PID/stat field 3): Z zombie, X and x dead.
_EXITED_STATES = frozenset("ZXx")
# An exited process's files: ENOENT once the directory is gone, ESRCH while the task is being reaped.
_GONE = (FileNotFoundError, ProcessLookupError)
_READ_SIZE_BYTES = 64 * 1024  # one read() of a /proc file returns it whole up to a page or so; cgroup fits


class ProcessOwnerError(Exception):
    """The process is there but could not be read; the message is one line, naming the PID and the file."""


@dataclass(frozen=True, slots=True)
class PidView:
    """Whose PIDs ``procfs_root`` shows: the host's, so that NVML's PIDs can be looked up in it, or not.

    ``procfs_pid_namespace``: inode of the namespace of the /proc's PID 1 (the namespace the /proc was
    mounted for; inferred, see :func:`read_pid_view`, when that link cannot be read);
    ``agent_pid_namespace``: the agent's own (``self``). ``shows_host_pids`` is None when it cannot be
    told; ``detail`` is one line saying why, for the agent's log and its status endpoint."""

    procfs_root: str
    procfs_pid_namespace: int | None
    agent_pid_namespace: int | None
    shows_host_pids: bool | None
    detail: str


@dataclass(frozen=True, slots=True)
class ProcessOwner:
    """One process and what owns it.

    ``start_ticks`` is field 22 of /proc/PID/stat (clock ticks after boot), exact: ``(pid, start_ticks)``
    tells a reused PID apart. ``start_time_s`` is the same instant in seconds since the Unix epoch
    (``btime + start_ticks / clk_tck``, man 5 proc), for people and logs: ``btime`` is whole seconds,
    derived from the wall clock, and moves when the clock is stepped, so only ``start_ticks`` is an
    identity. ``comm`` is /proc/PID/comm (at most 15 bytes, TASK_COMM_LEN - 1), bytes that are not UTF-8
    as ``\\xNN``. ``pid_namespace`` is the
    inode of /proc/PID/ns/pid (None when unreadable: see the module docstring) and
    ``in_agent_pid_namespace`` whether it is the agent's own (None when either is unknown): False for a
    containerised process seen by an agent with ``hostPID``, which is expected, since the PID is read in
    the host's view; whether that view is the host's is :class:`PidView`'s to say, once per agent."""

    pid: int
    start_ticks: int
    start_time_s: float
    comm: str
    pid_namespace: int | None
    in_agent_pid_namespace: bool | None
    cgroup: CgroupOwner

    @property
    def identity(self) -> tuple[int, int]:
        """``(pid, start_ticks)``: one process, across PID reuse."""
        return self.pid, self.start_ticks

    @property
    def pod_uid(self) -> str | None:
        return self.cgroup.pod_uid

    @property
    def qos(self) -> str | None:
        return self.cgroup.qos

    @property
    def runtime(self) -> str | None:
        return self.cgroup.runtime

    @property
    def container_id(self) -> str | None:
        return self.cgroup.container_id

    @property
    def systemd_unit(self) -> str | None:
        return self.cgroup.systemd_unit


def parse_boot_time_s(text: str) -> int:
    """``btime`` from /proc/stat: the boot time, in whole seconds since the Unix epoch (man 5 proc)."""
    for line in text.split("\n"):
        if line.startswith("btime "):
            token = line[len("btime "):].strip()
            if token.isascii() and token.isdigit() and len(token) <= 20:
                return int(token)
            raise ProcfsParseError(f"/proc/stat: btime should be a whole number of seconds, got {token[:40]!r}")
    raise ProcfsParseError("/proc/stat: no btime line")


def parse_namespace_link(target: str, kind: str = "pid") -> int | None:
    """The inode in a namespace link's target, ``"pid:[4026531836]"`` -> 4026531836; None for any other text."""
    head = f"{kind}:["
    if not (target.startswith(head) and target.endswith("]")):
        return None
    digits = target[len(head):-1]
    return int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 20 else None


def _namespace_inode(path: str, dir_fd: int | None = None) -> int | None:
    """The PID namespace inode a ``ns/pid`` link names; raises OSError as readlink does."""
    return parse_namespace_link(os.readlink(path, dir_fd=dir_fd))


def read_pid_view(procfs_root: str = "/proc") -> PidView:
    """Whether ``procfs_root`` shows the host's PIDs (see :class:`PidView`).

    The /proc's PID 1 is the init of the namespace it was mounted for, so ``1/ns/pid`` naming the host's
    inode settles it. Reading that link needs ptrace access to PID 1; when it is refused, an agent that is
    itself in the host's namespace and finds itself (``self``) in this /proc sees the host's PIDs (a process
    is visible only in its own namespace and its ancestors, and the host's has none)."""
    try:
        agent = _namespace_inode(os.path.join(procfs_root, "self", "ns", "pid"))
    except OSError as exc:
        agent, agent_problem = None, one_line(exc)
    else:
        agent_problem = None
    try:
        procfs = _namespace_inode(os.path.join(procfs_root, "1", "ns", "pid"))
    except OSError as exc:
        procfs, procfs_problem = None, one_line(exc)
    else:
        procfs_problem = None
    host = f"pid:[{HOST_PID_NAMESPACE_INODE}]"
    if procfs is not None:
        shows = procfs == HOST_PID_NAMESPACE_INODE
        detail = (f"{procfs_root} shows the host's PID namespace ({host}): NVML's PIDs can be looked up" if shows
                  else f"{procfs_root} shows PID namespace pid:[{procfs}], not the host's ({host}): NVML reports "
                       f"host PIDs, which it cannot look up; run the agent with hostPID: true, or outside a "
                       f"PID namespace")
        return PidView(procfs_root, procfs, agent, shows, detail)
    if agent == HOST_PID_NAMESPACE_INODE:
        return PidView(procfs_root, agent, agent, True,
                       f"the agent is in the host's PID namespace ({host}) and {procfs_root} shows it")
    problem = procfs_problem or "no namespace in the link"
    if agent_problem is not None:
        problem += f"; {procfs_root}/self/ns/pid: {agent_problem}"
    return PidView(procfs_root, None, agent, None,
                   f"cannot tell whether {procfs_root} shows the host's PIDs: {procfs_root}/1/ns/pid: {problem}")


def _read_at(dir_fd: int, name: str) -> bytes:
    """The whole of file ``name`` in the directory ``dir_fd``."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, _READ_SIZE_BYTES):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _stat_state(stat_text: str) -> str:
    """Field 3 of /proc/PID/stat, the one-letter state after the ``(comm)`` field (found from its last ``)``)."""
    after = stat_text[stat_text.rfind(")") + 1:].split(maxsplit=1)
    return after[0] if after else ""


def _decode_comm(raw: bytes) -> str:
    """/proc/PID/comm without its newline; a process may name itself with any bytes (prctl PR_SET_NAME)."""
    return raw.removesuffix(b"\n").decode("utf-8", "backslashreplace")


class ProcessOwnerReader:
    """Reads :class:`ProcessOwner` records from one /proc (see the module docstring).

    The boot time (``btime`` of ``<procfs_root>/stat``) and the agent's own PID namespace are read once,
    at the first ``read``: both are fixed for the life of the agent, and one btime keeps every start time
    of this reader on the same scale."""

    def __init__(self, procfs_root: str = "/proc", clk_tck: int | None = None) -> None:
        self.procfs_root = procfs_root
        self._clk_tck = clk_tck if clk_tck is not None else default_clk_tck()
        self._boot_time_s: int | None = None
        self._agent_namespace: int | None = None
        self._agent_namespace_read = False

    @property
    def boot_time_s(self) -> int:
        """Boot time in seconds since the epoch; raises ProcessOwnerError when /proc/stat cannot tell."""
        if self._boot_time_s is None:
            path = os.path.join(self.procfs_root, "stat")
            try:
                with open(path, "rb") as f:
                    self._boot_time_s = parse_boot_time_s(f.read().decode("latin-1"))
            except (OSError, ProcfsParseError) as exc:
                raise ProcessOwnerError(f"{path}: {one_line(exc)}") from exc
        return self._boot_time_s

    def agent_pid_namespace(self) -> int | None:
        """The agent's PID namespace inode (``<procfs_root>/self/ns/pid``), None when unreadable."""
        if not self._agent_namespace_read:
            try:
                self._agent_namespace = _namespace_inode(os.path.join(self.procfs_root, "self", "ns", "pid"))
            except OSError:
                self._agent_namespace = None
            self._agent_namespace_read = True
        return self._agent_namespace

    def start_ticks(self, pid: int) -> int | None:
        """Field 22 of /proc/PID/stat alone (the cheap check that a cached owner is still this PID's);
        None when the process is gone or a zombie. Raises ProcessOwnerError as :meth:`read` does."""
        path = os.path.join(self.procfs_root, str(pid), "stat")
        try:
            with open(path, "rb", buffering=0) as f:
                text = f.read().decode("latin-1")
            return None if _stat_state(text) in _EXITED_STATES else parse_pid_stat(text, self._clk_tck).start_ticks
        except _GONE:
            return None
        except (OSError, ProcfsParseError) as exc:
            raise ProcessOwnerError(f"{path}: {one_line(exc)}") from exc

    def read(self, pid: int) -> ProcessOwner | None:
        """The process ``pid`` and its owner; None when it is gone, exits during the read, or is a zombie."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ProcessOwnerError(f"pid must be a positive integer, got {pid!r}")
        boot_time_s = self.boot_time_s
        path = os.path.join(self.procfs_root, str(pid))
        try:
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except _GONE:
            return None
        except OSError as exc:
            raise ProcessOwnerError(f"{path}: {one_line(exc)}") from exc
        try:
            return self._read_in(dir_fd, pid, path, boot_time_s)
        finally:
            os.close(dir_fd)

    def _read_in(self, dir_fd: int, pid: int, path: str, boot_time_s: int) -> ProcessOwner | None:
        """:meth:`read` with ``<procfs_root>/<pid>`` open as ``dir_fd``."""
        name = "stat"
        try:
            stat_text = _read_at(dir_fd, name).decode("latin-1")  # latin-1 never fails; comm may be any bytes
            if _stat_state(stat_text) in _EXITED_STATES:
                return None
            stat = parse_pid_stat(stat_text, self._clk_tck)
            name = "comm"
            comm = _decode_comm(_read_at(dir_fd, name))
            name = "cgroup"
            cgroup_text = _read_at(dir_fd, name).decode("utf-8", "backslashreplace")
            name = "ns/pid"
            namespace = _pid_namespace_of(dir_fd)
        except (*_GONE, _Vanished):
            return None
        except (OSError, ProcfsParseError) as exc:
            raise ProcessOwnerError(f"{path}/{name}: {one_line(exc)}") from exc
        agent = self.agent_pid_namespace()
        same = None if namespace is None or agent is None else namespace == agent
        return ProcessOwner(
            pid=pid,
            start_ticks=stat.start_ticks,
            start_time_s=boot_time_s + stat.start_ticks / self._clk_tck,  # man 5 proc: starttime, btime
            comm=comm,
            pid_namespace=namespace,
            in_agent_pid_namespace=same,
            cgroup=owner_from_cgroup(cgroup_text),
        )


class _Vanished(Exception):
    """The process exited while it was being read."""


def _pid_namespace_of(dir_fd: int) -> int | None:
    """The PID namespace inode of the process of ``dir_fd``; None when unreadable (no ptrace access, or a
    kernel without namespaces). Raises :class:`_Vanished` when the process exited meanwhile: its ``ns``
    links go with its namespaces at exit, before its directory does, so ENOENT alone does not tell."""
    try:
        return _namespace_inode("ns/pid", dir_fd=dir_fd)
    except _GONE:
        if _still_there(dir_fd):
            return None
        raise _Vanished from None
    except PermissionError:  # EACCES: no ptrace-read access to the process
        return None


def _still_there(dir_fd: int) -> bool:
    """Whether the process of ``dir_fd`` is still alive (its stat readable, and not a zombie's)."""
    try:
        return _stat_state(_read_at(dir_fd, "stat").decode("latin-1")) not in _EXITED_STATES
    except OSError:
        return False


def read_process_owner(pid: int, procfs_root: str = "/proc", clk_tck: int | None = None) -> ProcessOwner | None:
    """One PID's :class:`ProcessOwner` with a fresh reader (the wiring keeps one reader instead)."""
    return ProcessOwnerReader(procfs_root, clk_tck).read(pid)
