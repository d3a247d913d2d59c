"""probes/listening_socket.py: /proc/net/tcp* lines, the pid holding a LISTEN socket (fake trees and the
real /proc), its cache, ancestors, and the one-line errors."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattledger.probes.listening_socket import (
    ListenerNotVisible,
    ListeningSocketError,
    ListeningSocketFinder,
    NotListening,
    ProcfsTree,
    parse_tcp_line,
    parse_tcp_table,
)

FIXTURES = Path(__file__).parent / "fixtures" / "engines_offk8s"


def stat_line(pid: int, comm: str, ppid: int, start_ticks: int) -> str:
    """/proc/PID/stat as the kernel writes it (fs/proc/array.c do_task_stat): 52 fields."""
    rest = ["S", str(ppid), str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 12 + [str(start_ticks)] + ["0"] * 30
    return f"{pid} ({comm}) {' '.join(rest)}\n"


class FakeProc:
    """A procfs root in a temporary directory: net/tcp*, and per pid its stat and fd links."""

    def __init__(self, root: Path):
        self.root = root
        (root / "net").mkdir(parents=True)
        for name in ("tcp", "tcp6"):
            shutil.copy(FIXTURES / name, root / "net" / name)

    def add(self, pid: int, comm: str = "python3", ppid: int = 1, start_ticks: int = 1000,
            sockets: tuple[int, ...] = ()) -> None:
        (self.root / str(pid) / "fd").mkdir(parents=True, exist_ok=True)
        (self.root / str(pid) / "stat").write_text(stat_line(pid, comm, ppid, start_ticks))
        os.symlink("/dev/null", self.root / str(pid) / "fd" / "0")
        os.symlink("pipe:[9]", self.root / str(pid) / "fd" / "1")
        for number, inode in enumerate(sockets, start=3):
            os.symlink(f"socket:[{inode}]", self.root / str(pid) / "fd" / str(number))

    def remove(self, pid: int) -> None:
        shutil.rmtree(self.root / str(pid))


@pytest.fixture
def proc(tmp_path) -> FakeProc:
    fake = FakeProc(tmp_path / "proc")
    fake.add(1, "systemd", ppid=0, start_ticks=1)
    fake.add(500, "python3", ppid=1, start_ticks=5000, sockets=(41003, 41001))  # vLLM's API server
    fake.add(501, "VLLM::EngineCor", ppid=500, start_ticks=5100)  # its engine core: holds the GPU
    fake.add(502, "a) (b", ppid=501, start_ticks=5200)  # a comm with spaces and parentheses
    fake.add(600, "sglang", ppid=1, start_ticks=6000, sockets=(41002,))
    return fake


def test_the_kernels_tables_parse_as_written(proc):
    v4 = parse_tcp_table((FIXTURES / "tcp").read_text(), "little")
    assert [(str(s.local_address), s.local_port, s.state, s.inode) for s in v4[:2]] == [
        ("127.0.0.1", 8000, 0x0A, 41001), ("0.0.0.0", 30000, 0x0A, 41002)]
    assert not v4[2].listening and v4[3].local_address == ipaddress.ip_address("10.0.0.10")
    v6 = parse_tcp_table((FIXTURES / "tcp6").read_text(), "little")
    assert [str(s.local_address) for s in v6] == ["::", "127.0.0.1", "::1", "2001:db8::1"]  # mapped -> IPv4
    assert [s.local_port for s in v6] == [8001, 8002, 8003, 8004]


def test_a_big_endian_kernel_writes_the_same_address_the_other_way_round():
    line = "   0: 7F000001:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1 0 100 0 0 10 0"
    assert str(parse_tcp_line(line, "big").local_address) == "127.0.0.1"


def _kernel_line(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, state: int, inode: int,
                 byteorder: str) -> str:
    packed = address.packed
    words = "".join(f"{int.from_bytes(packed[i:i + 4], byteorder):08X}" for i in range(0, len(packed), 4))
    remote = "0" * len(words)
    return (f"  12: {words}:{port:04X} {remote}:0000 {state:02X} 00000000:00000000 00:00000000 00000000  1000  "
            f"      0 {inode} 1 0000000000000000 100 0 0 10 0")


addresses = st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                      st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address))


@settings(max_examples=300, deadline=None)
@given(addresses, st.integers(0, 65535), st.integers(1, 12), st.integers(0, 2**40), st.sampled_from(["little", "big"]))
def test_a_line_written_as_the_kernel_writes_it_parses_back(address, port, state, inode, byteorder):
    parsed = parse_tcp_line(_kernel_line(address, port, state, inode, byteorder), byteorder)
    expected = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
    assert (parsed.local_address, parsed.local_port, parsed.state, parsed.inode) == (expected, port, state, inode)
    assert parsed.listening == (state == 0x0A)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789ABCDEFabcdefx: \t-", max_size=120))
def test_any_other_text_is_a_one_line_value_error_or_a_socket(text):
    try:
        parse_tcp_line(text)
    except ValueError as err:
        assert "\n" not in str(err)


def test_the_listening_pid_is_found_on_loopback_wildcard_and_mapped_addresses(proc):
    proc.add(700, "tgi", sockets=(41004,))
    proc.add(701, "v6", sockets=(42001, 42002, 42003))
    finder = ListeningSocketFinder(str(proc.root), byteorder="little")
    listener = finder.find(8000, "127.0.0.1")
    assert (listener.pid, listener.start_ticks, listener.inode) == (500, 5000, 41001)  # not the ESTABLISHED one
    assert finder.find(8000, "localhost").pid == 500
    assert finder.find(30000, "192.168.1.4").pid == 600  # 0.0.0.0 takes every address
    assert finder.find(80, "10.0.0.10").pid == 700
    assert finder.find(8001, "127.0.0.1").pid == 701  # [::] takes IPv4 too
    assert finder.find(8002, "127.0.0.1").pid == 701 and finder.find(8003, "[::1]").pid == 701
    with pytest.raises(NotListening, match="no process listens on port 80"):
        finder.find(80, "10.0.0.11")  # bound to another address
    with pytest.raises(NotListening, match="port 8004"):
        finder.find(8004, "localhost")


def test_the_fd_scan_is_cached_until_the_pid_is_gone_or_the_inode_changes(proc):
    finder = ListeningSocketFinder(str(proc.root), byteorder="little")
    assert finder.find(8000, "127.0.0.1").pid == 500
    assert finder.find(8000, "127.0.0.1").pid == 500 and finder.scans == 1
    proc.remove(500)  # the engine restarted: same inode in the table for a moment, another process holds it
    proc.add(510, "python3", start_ticks=9000, sockets=(41001,))
    assert finder.find(8000, "127.0.0.1").pid == 510 and finder.scans == 2
    table = (proc.root / "net" / "tcp").read_text().replace(" 41001 ", " 41999 ")
    (proc.root / "net" / "tcp").write_text(table)
    proc.remove(510)
    proc.add(520, "python3", start_ticks=9500, sockets=(41999,))
    assert finder.find(8000, "127.0.0.1").pid == 520 and finder.scans == 3


def test_of_several_holders_the_first_started_is_taken(proc):
    proc.add(800, "api-1", ppid=799, start_ticks=8100, sockets=(42001,))
    proc.add(799, "api-server", start_ticks=8000, sockets=(42001,))
    assert ListeningSocketFinder(str(proc.root), byteorder="little").find(8001, "").pid == 799


def test_a_socket_nobody_visible_holds_says_why(proc):
    finder = ListeningSocketFinder(str(proc.root), byteorder="little")
    with pytest.raises(ListenerNotVisible, match="cannot see host pids"):
        finder.find(8004, "2001:db8::1")


def test_unreadable_fds_say_the_agent_needs_root(proc, monkeypatch):
    def denied(self, pid, inodes):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ProcfsTree, "holds_socket", denied)
    with pytest.raises(ListenerNotVisible, match="needs root or CAP_SYS_PTRACE") as info:
        ListeningSocketFinder(str(proc.root), byteorder="little").find(8000, "127.0.0.1")
    assert "\n" not in str(info.value)


def test_a_malformed_table_is_one_line(proc):
    (proc.root / "net" / "tcp").write_text("header\n   0: zz:1F40 00000000:0000 0A\n")
    with pytest.raises(ListeningSocketError, match="net/tcp: not a /proc/net/tcp socket line"):
        ListeningSocketFinder(str(proc.root)).find(8000)


def test_ancestors_follow_ppid_past_odd_comms_and_stop(proc):
    tree = ProcfsTree(str(proc.root))
    assert tree.ancestors(502) == [501, 500, 1]
    assert 500 in tree.ancestors(502) and 500 not in tree.ancestors(600) and tree.ancestors(99999) == []
    proc.add(900, "loop-a", ppid=901)
    proc.add(901, "loop-b", ppid=900)  # a corrupt tree: the walk ends
    assert tree.ancestors(900) == [901]
    assert len(tree.ancestors(502, max_depth=2)) == 2


def test_a_real_listening_socket_is_found_through_the_real_proc():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        listener = ListeningSocketFinder("/proc").find(port, "127.0.0.1")
        assert listener.pid == os.getpid()
        assert listener.inode == os.fstat(server.fileno()).st_ino
    finally:
        server.close()
    with pytest.raises(NotListening):
        ListeningSocketFinder("/proc").find(port, "127.0.0.1")
