"""From a TCP port to the process that listens on it, and from a process to its ancestors, through procfs.

How the kernel shows it (man 5 proc, ``/proc/net/tcp``; net/ipv4/tcp_ipv4.c ``get_tcp4_sock``,
net/ipv6/tcp_ipv6.c ``get_tcp6_sock``): one line per socket, ``sl local_address rem_address st ... inode``.
An address is ``HEX:PORT``: the IPv4 address is the 32-bit ``s_addr`` printed with ``%08X``, so its bytes
appear in host byte order (``0100007F`` is 127.0.0.1 on a little-endian machine); an IPv6 address is its
four 32-bit words printed the same way, each in host byte order. The port is printed after ``ntohs``, so
it reads as it is. State ``0A`` is ``TCP_LISTEN``. A socket bound to ``[::]`` also takes IPv4 (unless
``IPV6_V6ONLY``), and an IPv4-mapped address (``::ffff:a.b.c.d``) is the IPv4 address.

The socket's inode is then found among the processes' open files: ``/proc/PID/fd/N`` links to
``socket:[INODE]``. Reading another user's ``fd`` directory needs root (or ``CAP_SYS_PTRACE``); in a
container, the host's processes are visible only with ``hostPID``, and the host's sockets only with
``hostNetwork`` (``<root>/net/tcp`` is the network namespace of the process reading it). Scanning every
pid's fds is the costly part, so :class:`ListeningSocketFinder` remembers ``(pid, start ticks, inode)`` and
scans again only when the port's inode changes or that pid is gone (or is another process by now).

Where several processes hold the listening socket (a server that forks its workers after binding, e.g.
vLLM with ``--api-server-count`` above 1), the one that started first is taken: the parent that bound it.

Every failure is a :class:`ListeningSocketError` (one line); nothing here imports torch or pandas.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass

from wattledger.probes.procfs import ProcfsParseError, parse_pid_stat

TCP_LISTEN = 0x0A  # include/net/tcp_states.h TCP_LISTEN
# A ppid chain longer than this is not a process tree we follow (Linux's pid_max allows deep chains, but
# no serving engine's workers sit 64 levels below it); it also stops a loop in a corrupt fake tree.
MAX_ANCESTOR_DEPTH = 64
_SOCKET_LINK_PREFIX = "socket:["
_ADDRESS = ipaddress.IPv4Address | ipaddress.IPv6Address


class ListeningSocketError(Exception):
    """The listening process cannot be found; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class NotListening(ListeningSocketError):
    """No socket in LISTEN state on that port (in the agent's network namespace)."""


class ListenerNotVisible(ListeningSocketError):
    """The socket exists but no process the agent can see holds it (pid namespace, or no permission)."""


@dataclass(frozen=True)
class TcpSocket:
    """One line of ``/proc/net/tcp`` or ``/proc/net/tcp6``."""

    local_address: _ADDRESS  # an IPv4-mapped IPv6 address is given as the IPv4 address
    local_port: int
    state: int  # TCP_LISTEN = 0x0A
    inode: int

    @property
    def listening(self) -> bool:
        return self.state == TCP_LISTEN


def parse_hex_address(text: str, byteorder: str = sys.byteorder) -> _ADDRESS:
    """``0100007F`` (8 hex digits) or 32 hex digits, each 32-bit word in host byte order -> the address."""
    if len(text) not in (8, 32):
        raise ValueError(f"address {text!r} is not 8 or 32 hex digits")
    words = [int(text[i:i + 8], 16).to_bytes(4, byteorder) for i in range(0, len(text), 8)]
    packed = b"".join(words)
    if len(packed) == 4:
        return ipaddress.IPv4Address(packed)
    address = ipaddress.IPv6Address(packed)
    return address.ipv4_mapped or address


def parse_tcp_line(line: str, byteorder: str = sys.byteorder) -> TcpSocket:
    """One socket line (not the header) -> :class:`TcpSocket`; ValueError (one line) if malformed."""
    fields = line.split()
    if len(fields) < 10 or not fields[0].endswith(":"):
        raise ValueError(f"not a /proc/net/tcp socket line: {line.strip()[:80]!r}")
    address, colon, port = fields[1].partition(":")
    if not colon or len(port) != 4:
        raise ValueError(f"local address {fields[1]!r} is not HEX:PORT")
    try:
        return TcpSocket(parse_hex_address(address, byteorder), int(port, 16), int(fields[3], 16), int(fields[9]))
    except ValueError as err:
        raise ValueError(f"not a /proc/net/tcp socket line ({err}): {line.strip()[:80]!r}") from None


def parse_tcp_table(text: str, byteorder: str = sys.byteorder) -> list[TcpSocket]:
    """A whole ``/proc/net/tcp`` (header line first) -> its sockets."""
    return [parse_tcp_line(line, byteorder) for line in text.splitlines()[1:] if line.strip()]


def wanted_address(host: str) -> _ADDRESS | str | None:
    """What a URL's host says about the local address to match: an IP address; "loopback" for localhost;
    None (any address) for another name (it is not resolved: a DNS lookup could block the agent)."""
    host = host.strip("[]")
    if host.lower() in ("localhost", "localhost.localdomain"):
        return "loopback"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def address_matches(local: _ADDRESS, wanted: _ADDRESS | str | None) -> bool:
    """A LISTEN socket on ``local`` takes connections to ``wanted``: a wildcard takes all, loopback ones take
    loopback (127.0.0.0/8 and ::1 alike: either family is tried by a client of "localhost")."""
    if wanted is None or local.is_unspecified:
        return True
    if wanted == "loopback" or (not isinstance(wanted, str) and wanted.is_loopback):
        return local.is_loopback
    return local == wanted


@dataclass(frozen=True)
class Listener:
    pid: int
    start_ticks: int  # /proc/PID/stat field 22: a reused pid is another process
    inode: int


class ProcfsTree:
    """The process tree as ``procfs_root`` shows it: stat, ancestors, open sockets."""

    def __init__(self, procfs_root: str = "/proc"):
        self.root = procfs_root

    def stat(self, pid: int):
        """``PidStat`` of ``pid``, or None when it is gone (or its stat cannot be parsed)."""
        try:
            with open(os.path.join(self.root, str(pid), "stat"), encoding="utf-8", errors="replace") as handle:
                return parse_pid_stat(handle.read())
        except (OSError, ProcfsParseError):
            return None

    def start_ticks(self, pid: int) -> int | None:
        stat = self.stat(pid)
        return stat.start_ticks if stat is not None else None

    def ancestors(self, pid: int, max_depth: int = MAX_ANCESTOR_DEPTH) -> list[int]:
        """``pid``'s parent, its parent's parent ... up to pid 1 (or a parent we cannot see), at most
        ``max_depth`` of them."""
        chain: list[int] = []
        current = pid
        while len(chain) < max_depth:
            stat = self.stat(current)
            if stat is None or stat.ppid <= 0 or stat.ppid in chain or stat.ppid == pid:
                break
            chain.append(stat.ppid)
            current = stat.ppid
        return chain

    def pids(self) -> list[int]:
        try:
            return sorted(int(name) for name in os.listdir(self.root) if name.isdigit())
        except OSError as err:
            raise ListeningSocketError(f"cannot list {self.root}: {err.strerror or err}") from None

    def holds_socket(self, pid: int, inodes: set[int]) -> int | None:
        """The inode among ``inodes`` that one of ``pid``'s fds links to; None if none. PermissionError
        propagates (another user's fds without root)."""
        fd_dir = os.path.join(self.root, str(pid), "fd")
        try:
            names = os.listdir(fd_dir)
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            return None
        for name in names:
            try:
                link = os.readlink(os.path.join(fd_dir, name))
            except OSError:
                continue  # closed meanwhile
            if link.startswith(_SOCKET_LINK_PREFIX) and link.endswith("]"):
                inode = link[len(_SOCKET_LINK_PREFIX):-1]
                if inode.isdigit() and int(inode) in inodes:
                    return int(inode)
        return None


def _may_listen_on(line: str, port_suffix: str) -> bool:
    """A quick look: the line's local address ends in ``:PORT`` and its state is LISTEN, or it is malformed
    (then parsing it says so)."""
    fields = line.split(None, 4)
    if len(fields) < 4:
        return bool(line.strip())
    return fields[1].upper().endswith(port_suffix) and fields[3].upper() == f"{TCP_LISTEN:02X}"


class ListeningSocketFinder:
    """``find(port, host)`` -> the :class:`Listener` holding the LISTEN socket, cached (module docstring)."""

    def __init__(self, procfs_root: str = "/proc", byteorder: str = sys.byteorder):
        self.tree = ProcfsTree(procfs_root)
        self._byteorder = byteorder
        self._cache: dict[tuple[int, str], Listener] = {}
        self.scans = 0  # full fd scans done (tests check the cache)

    def listening_inodes(self, port: int, host: str = "") -> set[int]:
        wanted = wanted_address(host)
        inodes = set()
        for name in ("tcp", "tcp6"):
            for sock in self._table(name, port):
                if sock.listening and sock.local_port == port and address_matches(sock.local_address, wanted):
                    inodes.add(sock.inode)
        return inodes - {0}

    def _table(self, name: str, port: int) -> list[TcpSocket]:
        """The LISTEN sockets on ``port`` in ``<root>/net/NAME`` (other lines are skipped unparsed: a busy
        server's table holds thousands of connections)."""
        path = os.path.join(self.tree.root, "net", name)
        try:
            with open(path, encoding="ascii", errors="replace") as handle:
                text = handle.read()
        except FileNotFoundError:
            return []  # no IPv6 in this kernel
        except OSError as err:
            raise ListeningSocketError(f"cannot read {path}: {err.strerror or err}") from None
        suffix = f":{port:04X}"
        lines = [line for line in text.splitlines()[1:] if _may_listen_on(line, suffix)]
        try:
            return [parse_tcp_line(line, self._byteorder) for line in lines]
        except ValueError as err:
            raise ListeningSocketError(f"{path}: {err}") from None

    def find(self, port: int, host: str = "") -> Listener:
        """The process listening on ``port`` (for connections to ``host``); ListeningSocketError if none."""
        inodes = self.listening_inodes(port, host)
        if not inodes:
            raise NotListening(f"no process listens on port {port}")
        cached = self._cache.get((port, host))
        if cached is not None and cached.inode in inodes and self.tree.start_ticks(cached.pid) == cached.start_ticks:
            return cached
        listener = self._scan(port, inodes)
        self._cache[(port, host)] = listener
        return listener

    def _scan(self, port: int, inodes: set[int]) -> Listener:
        self.scans += 1
        found: list[Listener] = []
        denied = 0
        for pid in self.tree.pids():
            try:
                inode = self.tree.holds_socket(pid, inodes)
            except PermissionError:
                denied += 1
                continue
            start = self.tree.start_ticks(pid) if inode is not None else None
            if inode is not None and start is not None:
                found.append(Listener(pid, start, inode))
        if found:
            return min(found, key=lambda listener: (listener.start_ticks, listener.pid))
        if denied:
            raise ListenerNotVisible(f"port {port} is listened on, but {denied} processes' fds are not readable: "
                                     "the agent needs root or CAP_SYS_PTRACE (and hostPID in a pod)")
        raise ListenerNotVisible(f"port {port} is listened on, but by no process visible in {self.tree.root}: "
                                 "cannot see host pids (run with hostPID, or the engine is in another pid "
                                 "namespace)")
