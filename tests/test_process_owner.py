"""probes/cgroups.py and probes/process_owner.py: from a host PID to its process and owner (issue 13 item 2).

Three parts: the /proc/PID/cgroup files under tests/fixtures/cgroups/ (real shapes, each case citing where
its shape comes from, synthetic ids), hypothesis properties of the parser (never raises; kubepods paths
built by the kubelet's and the runtimes' naming rules come back as the uid, QoS, runtime and id they were
built from), and fake /proc trees (tests/host_tree.py plus comm, cgroup and ns/pid) for the reader: a
container process, a PID that is gone or goes mid-read, a zombie, a PID in another namespace, and whether
a /proc shows the host's PIDs. A few reads of this machine's own /proc check the real formats end to end.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattledger.probes import process_owner
from wattledger.probes.cgroups import (
    QOS_BESTEFFORT,
    QOS_BURSTABLE,
    QOS_GUARANTEED,
    RUNTIME_CONTAINERD,
    RUNTIME_CRIO,
    RUNTIME_DOCKER,
    RUNTIME_PODMAN,
    CgroupOwner,
    owner_from_cgroup,
    owner_from_path,
    parse_cgroup_lines,
)
from wattledger.probes.process_owner import (
    HOST_PID_NAMESPACE_INODE,
    ProcessOwnerError,
    ProcessOwnerReader,
    parse_boot_time_s,
    parse_namespace_link,
    read_pid_view,
    read_process_owner,
)

from host_tree import Proc, build_proc, stat_line, write_process  # tests/ is on sys.path through conftest.py

FIXTURES = Path(__file__).parent / "fixtures" / "cgroups"
CONTAINER_NAMESPACE_INODE = 4026532301  # any inode but the host's: a container's PID namespace
BOOT_TIME_S = 1732262400  # the btime line host_tree.proc_stat_text writes
CLK_TCK = 100


def fixture_ids(case: str) -> tuple[str, str]:
    """The synthetic (pod uid, container id) of a fixture (tests/fixtures/cgroups/README.md)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "wattledger-fixture/" + case)), hashlib.sha256(case.encode()).hexdigest()


STATIC_POD_UID = hashlib.md5(b"static-pod-manifest").hexdigest()

# case -> (what the owner must be, with "uid"/"id" standing for the case's fixture ids). Each shape's source:
CASES: dict[str, dict[str, object]] = {
    # Bottlerocket, containerd, systemd driver, hybrid (v1 lines then 0::): neuvector/neuvector
    # share/system/cgroup_test.go TestK8sBottleRocket.
    "containerd_systemd_v1_hybrid_besteffort": dict(pod_uid="uid", qos=QOS_BESTEFFORT, runtime=RUNTIME_CONTAINERD,
                                                    container_id="id", cgroup_driver="systemd"),
    # containerd 1.6.4, Kubernetes 1.24, cgroup v2: neuvector cgroup_test.go TestContainerd_Container_Cgroupv2.
    "containerd_systemd_v2_besteffort": dict(pod_uid="uid", qos=QOS_BESTEFFORT, runtime=RUNTIME_CONTAINERD,
                                             container_id="id", cgroup_driver="systemd"),
    # CRI-O 1.19 (OpenShift 4.6), v1 with an rdma line at the root: neuvector TestK8sCrio_v1_19.
    "crio_systemd_v1_besteffort": dict(pod_uid="uid", qos=QOS_BESTEFFORT, runtime=RUNTIME_CRIO, container_id="id",
                                       cgroup_driver="systemd"),
    # CRI-O 1.17, a static pod (32 hex digits, no dashes): neuvector TestK8sCrio_v1_17.
    "crio_systemd_v1_burstable_static_pod": dict(pod_uid=STATIC_POD_UID, qos=QOS_BURSTABLE, runtime=RUNTIME_CRIO,
                                                 container_id="id", cgroup_driver="systemd"),
    # CRI-O, Kubernetes 1.22, cgroup v2: neuvector TestCrio_Container_Cgroupv2.
    "crio_systemd_v2_burstable": dict(pod_uid="uid", qos=QOS_BURSTABLE, runtime=RUNTIME_CRIO, container_id="id",
                                      cgroup_driver="systemd"),
    # CRI-O's conmon scope: the CGroup line of `systemctl status crio-conmon-<id>.scope` in
    # opencontainers/runc#4620 (a v2 node, so its /proc/PID/cgroup is "0::" and that path).
    "crio_conmon_systemd_v2_burstable": dict(pod_uid="uid", qos=QOS_BURSTABLE, runtime=RUNTIME_CRIO,
                                             container_id="id", runtime_monitor=True, cgroup_driver="systemd"),
    # cgroupfs driver (runtime not named by the path): Qard/container-info test/fixtures/cgroup.
    "cgroupfs_v1_besteffort": dict(pod_uid="uid", qos=QOS_BESTEFFORT, container_id="id", cgroup_driver="cgroupfs"),
    # v1 with several controllers on one hierarchy: neuvector TestDockerIDKubepods3.
    "cgroupfs_v1_merged_controllers": dict(pod_uid="uid", qos=QOS_BESTEFFORT, container_id="id",
                                           cgroup_driver="cgroupfs"),
    # a process in a cgroup below its container's (kube-proxy): neuvector TestK8sProxyProcess.
    "cgroupfs_v1_subcgroup": dict(pod_uid="uid", qos=QOS_BESTEFFORT, container_id="id", cgroup_driver="cgroupfs"),
    # Guaranteed pod (no class slice), docker, systemd driver: CJLove/rt-operator notes/cgroupv1_notes.md
    # (Kubernetes 1.23.5 with docker), lines as neuvector TestDockerIDKubepods2.
    "docker_systemd_v1_guaranteed": dict(pod_uid="uid", qos=QOS_GUARANTEED, runtime=RUNTIME_DOCKER, container_id="id",
                                         cgroup_driver="systemd"),
    # Guaranteed pod, cgroupfs (K3s, containerd): CJLove/rt-operator notes/cgroupv1_notes.md, lines as
    # neuvector TestK8sContainerd_v1_2_13.
    "cgroupfs_v1_guaranteed": dict(pod_uid="uid", qos=QOS_GUARANTEED, container_id="id", cgroup_driver="cgroupfs"),
    # containerd 1.4.4 writing "slice:cri-containerd:id" as a path: neuvector TestK8sContainerd_v1_4_4.
    "containerd14_colon_form_v1": dict(pod_uid="uid", qos=QOS_BESTEFFORT, runtime=RUNTIME_CONTAINERD,
                                       container_id="id", cgroup_driver="systemd"),
    # read from inside a cgroup namespace (relative path), docker 20.10 on Kubernetes, Ubuntu 21.10: neuvector
    # TestDockerK8s_Ubuntu_Container_Cgroupv2.
    "docker_systemd_v2_cgroupns_besteffort": dict(pod_uid="uid", qos=QOS_BESTEFFORT, runtime=RUNTIME_DOCKER,
                                                  container_id="id", cgroup_driver="systemd"),
    # CRI-O with the cgroupfs manager: the path cri-o internal/config/cgmgr/cgroupfs.go ContainerCgroupPath
    # builds ("<parent>/crio-<id>") under the kubelet's CgroupName.ToCgroupfs pod cgroup.
    "crio_cgroupfs_v2_burstable": dict(pod_uid="uid", qos=QOS_BURSTABLE, runtime=RUNTIME_CRIO, container_id="id",
                                       cgroup_driver="cgroupfs"),
    # docker off Kubernetes, systemd driver (CentOS): neuvector TestDockerIDCentOS.
    "docker_host_systemd_v1": dict(runtime=RUNTIME_DOCKER, container_id="id"),
    # docker off Kubernetes, cgroupfs driver (Ubuntu): neuvector TestDockerIDUbuntu.
    "docker_host_cgroupfs_v1": dict(runtime=RUNTIME_DOCKER, container_id="id"),
    # docker 20.10 container seen from a cgroup namespace: neuvector TestDockerNative_Container_Cgroupv2.
    "docker_host_v2_cgroupns": dict(runtime=RUNTIME_DOCKER, container_id="id"),
    # a desktop user's app scope: unonweb/doc.it linux/_linux.cgroups.md (`cat /proc/$$/cgroup`).
    "systemd_user_app_scope_v2": dict(systemd_unit="vte-spawn-uid.scope"),
    # a system service: systemd-cgls's "/system.slice/dbus.service" (heterotopian/technotes systemdcgls),
    # as the v2 line; the service name is ours.
    "systemd_service_v2": dict(systemd_unit="vllm.service"),
    # the host's PID 1: neuvector TestCrio_Host_Proc1_Cgroupv2.
    "systemd_init_scope_v2": dict(systemd_unit="init.scope"),
    # a host process at every hierarchy's root: neuvector TestHostProcess.
    "host_root_v1": dict(),
    # pre-v205 systemd session naming (not a unit name today): neuvector TestNsEnterProcess.
    "old_systemd_session_v1": dict(),
    # the machine these tests were written on (Linux 6.18 sandbox, hybrid, a non-systemd memory cgroup).
    "sandbox_hybrid_v1": dict(),
}


def expected_owner(case: str) -> dict[str, object]:
    uid, container_id = fixture_ids(case)
    fields = {"pod_uid": None, "qos": None, "runtime": None, "container_id": None, "runtime_monitor": False,
              "systemd_unit": None, "cgroup_driver": None}
    for name, value in CASES[case].items():
        if value == "uid":
            value = uid
        elif value == "id":
            value = container_id
        elif isinstance(value, str):
            value = value.replace("-uid.", f"-{uid}.")
        fields[name] = value
    return fields


def owner_fields(owner: CgroupOwner) -> dict[str, object]:
    return {name: getattr(owner, name) for name in
            ("pod_uid", "qos", "runtime", "container_id", "runtime_monitor", "systemd_unit", "cgroup_driver")}


def test_every_fixture_has_a_case():
    assert sorted(path.stem for path in FIXTURES.glob("*.cgroup")) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixture_owner(case):
    text = (FIXTURES / f"{case}.cgroup").read_text()
    owner = owner_from_cgroup(text)
    assert owner_fields(owner) == expected_owner(case)
    assert owner.placed == any(CASES[case].get(key) for key in ("pod_uid", "container_id", "systemd_unit"))
    assert owner.cgroup_path in {line.path for line in parse_cgroup_lines(text)}


def test_v1_prefers_memory_line_and_v2_line_is_unified():
    # Hierarchies that disagree (a process moved in some of them only): the memory hierarchy, where the
    # kubelet always places a container, names the pod, over name=systemd's unit.
    uid, container_id = fixture_ids("disagree")
    text = ("1:name=systemd:/system.slice/sshd.service\n"
            f"4:memory:/kubepods/besteffort/pod{uid}/{container_id}\n"
            "0::/system.slice/sshd.service\n")
    assert owner_from_cgroup(text).container_id == container_id
    lines = parse_cgroup_lines(text)
    assert [line.unified for line in lines] == [False, False, True]
    assert lines[1].controllers == ("memory",)


def test_unit_comes_from_name_systemd_before_memory():
    text = "5:memory:/system.slice\n1:name=systemd:/system.slice/vllm.service\n"
    assert owner_from_cgroup(text).systemd_unit == "vllm.service"


def test_deleted_cgroup_and_colons_in_path():
    # kernel/cgroup/cgroup.c proc_cgroup_show appends " (deleted)" to a v2 path whose cgroup was removed.
    assert parse_cgroup_lines("0::/system.slice/vllm.service (deleted)\n")[0].path == "/system.slice/vllm.service"
    assert parse_cgroup_lines("3:cpu:/a:b:c\n")[0].path == "/a:b:c"


def test_lines_without_the_shape_are_skipped():
    text = "garbage\n:memory:/x\nx:memory:/x\n3:memory:relative\n" + "9" * 11 + ":cpu:/x\n2:cpu:/ok\n"
    assert [line.path for line in parse_cgroup_lines(text)] == ["/ok"]
    assert owner_from_cgroup("") == CgroupOwner()


def test_container_scope_off_kubernetes_outermost_wins():
    outer, inner = hashlib.sha256(b"outer").hexdigest(), hashlib.sha256(b"inner").hexdigest()
    owner = owner_from_path(f"/docker/{outer}/docker/{inner}")  # docker-in-docker (neuvector TestDockerIDRancherOS)
    assert (owner.runtime, owner.container_id) == (RUNTIME_DOCKER, outer)
    # podman's systemd manager: machine.slice/libpod-<id>.scope, and its conmon beside it.
    podman = owner_from_path(f"/machine.slice/libpod-conmon-{outer}.scope")
    assert (podman.runtime, podman.container_id, podman.runtime_monitor) == (RUNTIME_PODMAN, outer, True)


def test_pod_without_container_and_pod_segment_out_of_place():
    uid, _ = fixture_ids("pod-only")
    owner = owner_from_path(f"/kubepods/burstable/pod{uid}")
    assert (owner.pod_uid, owner.qos, owner.container_id) == (uid, QOS_BURSTABLE, None)
    # "pod<uuid>" under an unrelated parent is not the kubelet's.
    assert owner_from_path(f"/system.slice/pod{uid}").pod_uid is None


# -- properties ------------------------------------------------------------------------------------------

cgroup_alphabet = st.sampled_from(list("0123456789abcdef:/,._-=\n ") + ["kubepods", "pod", ".slice", ".scope",
                                                                        "cri-containerd-", "crio-", "docker-",
                                                                        "..", "name=systemd", "burstable"])


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), st.lists(cgroup_alphabet, max_size=80).map("".join)))
def test_parser_never_raises(text):
    owner = owner_from_cgroup(text)
    assert isinstance(owner, CgroupOwner)
    for value in (owner.pod_uid, owner.container_id, owner.systemd_unit):  # label values: ASCII, one line
        assert value is None or (value.isascii() and "\n" not in value)
    for line in parse_cgroup_lines(text):
        assert line.path.startswith("/") and line.hierarchy_id >= 0


uids = st.one_of(st.uuids().map(str), st.binary(min_size=16, max_size=16).map(bytes.hex))  # API server; static pod
container_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)
SYSTEMD_SCOPE_PREFIX = {RUNTIME_CONTAINERD: "cri-containerd", RUNTIME_CRIO: "crio", RUNTIME_DOCKER: "docker"}


def kubepods_path(driver: str, qos: str, uid: str, runtime: str, container_id: str, relative: bool) -> str:
    """The container's cgroup path by the kubelet's rules (pkg/kubelet/cm/cgroup_manager_linux.go) and the
    runtimes' (cri-o internal/config/cgmgr, containerd's "cri-containerd" systemd prefix); ``relative``: as a
    reader in another pod's cgroup namespace sees it, every segment above the pod's replaced by "..". """
    if driver == "systemd":
        escaped = uid.replace("-", "_")
        pod = f"kubepods-pod{escaped}.slice" if qos == QOS_GUARANTEED else f"kubepods-{qos}-pod{escaped}.slice"
        above = [] if qos == QOS_GUARANTEED else [f"kubepods-{qos}.slice"]
        segments = ["kubepods.slice", *above, pod, f"{SYSTEMD_SCOPE_PREFIX[runtime]}-{container_id}.scope"]
    else:
        above = [] if qos == QOS_GUARANTEED else [qos]
        container = f"crio-{container_id}" if runtime == RUNTIME_CRIO else container_id
        segments = ["kubepods", *above, f"pod{uid}", container]
    if relative:
        segments = [".."] * (len(segments) - 2) + segments[-2:]
    return "/" + "/".join(segments)


def cgroup_file(path: str, layout: str) -> str:
    """/proc/PID/cgroup text for a process at ``path``: v2, v1 (a line per hierarchy, one at the root, as
    rdma is in the CRI-O fixtures) or hybrid (v1 then the unified line)."""
    v1 = f"5:memory:{path}\n4:cpu,cpuacct:{path}\n3:rdma:/\n2:pids:{path}\n1:name=systemd:{path}\n"
    return {"v2": f"0::{path}\n", "v1": v1, "hybrid": v1 + f"0::{path}\n"}[layout]


@settings(max_examples=200, deadline=None)
@given(driver=st.sampled_from(["systemd", "cgroupfs"]),
       qos=st.sampled_from([QOS_GUARANTEED, QOS_BURSTABLE, QOS_BESTEFFORT]), uid=uids,
       runtime=st.sampled_from(sorted(SYSTEMD_SCOPE_PREFIX)), container_id=container_ids, relative=st.booleans(),
       layout=st.sampled_from(["v2", "v1", "hybrid"]))
def test_kubepods_paths_round_trip(driver, qos, uid, runtime, container_id, relative, layout):
    owner = owner_from_cgroup(cgroup_file(kubepods_path(driver, qos, uid, runtime, container_id, relative), layout))
    assert (owner.pod_uid, owner.container_id, owner.cgroup_driver) == (uid, container_id, driver)
    # cgroupfs names containerd's and docker's container cgroups by the bare id: no runtime to read back.
    assert owner.runtime == (runtime if driver == "systemd" or runtime == RUNTIME_CRIO else None)
    # Relative cgroupfs paths lose the QoS segment; the systemd pod slice carries its class in its name.
    assert owner.qos == (None if relative and driver == "cgroupfs" else qos)
    assert owner.systemd_unit is None and not owner.runtime_monitor


# -- fake /proc trees ------------------------------------------------------------------------------------

AGENT_PID = 4242


def add_process(proc: Path, pid: int, comm: bytes = b"python3", cgroup: str = "0::/init.scope\n",
                namespace: int | None = HOST_PID_NAMESPACE_INODE, starttime: int = 123456, state: str = "S") -> None:
    """A process as tests/host_tree.py writes it, plus the files the owner reader reads: comm, cgroup and
    the ns/pid link (``namespace=None``: no link, as when it cannot be read)."""
    write_process(proc, pid, Proc(comm=comm.decode("latin-1"), ppid=1, starttime=starttime))
    base = proc / str(pid)
    (base / "stat").write_text(stat_line(pid, comm.decode("latin-1"), 1, 100, 20, starttime, state=state))
    (base / "comm").write_bytes(comm + b"\n")
    (base / "cgroup").write_text(cgroup)
    if namespace is not None:
        (base / "ns").mkdir()
        os.symlink(f"pid:[{namespace}]", base / "ns" / "pid")


def fake_proc(tmp_path: Path, agent_namespace: int = HOST_PID_NAMESPACE_INODE,
              init_namespace: int | None = HOST_PID_NAMESPACE_INODE) -> Path:
    """A /proc with PID 1 (in ``init_namespace``) and the agent (``self``, in ``agent_namespace``)."""
    proc = build_proc(tmp_path)
    add_process(proc, 1, b"systemd", namespace=init_namespace, starttime=1)
    add_process(proc, AGENT_PID, b"wattledger", namespace=agent_namespace)
    os.symlink(str(AGENT_PID), proc / "self")
    return proc


def test_reads_a_container_process(tmp_path):
    proc = fake_proc(tmp_path)
    text = (FIXTURES / "containerd_systemd_v2_besteffort.cgroup").read_text()
    add_process(proc, 31337, b"vllm", text, namespace=CONTAINER_NAMESPACE_INODE, starttime=987654)
    owner = ProcessOwnerReader(str(proc), clk_tck=CLK_TCK).read(31337)
    uid, container_id = fixture_ids("containerd_systemd_v2_besteffort")
    assert (owner.pid, owner.comm, owner.start_ticks) == (31337, "vllm", 987654)
    assert owner.identity == (31337, 987654)
    assert owner.start_time_s == pytest.approx(BOOT_TIME_S + 987654 / CLK_TCK)  # man 5 proc: btime + starttime/HZ
    assert (owner.pod_uid, owner.qos, owner.runtime, owner.container_id) == (uid, QOS_BESTEFFORT, RUNTIME_CONTAINERD,
                                                                             container_id)
    # In a container's namespace while the agent is in the host's: the expected hostPID picture.
    assert (owner.pid_namespace, owner.in_agent_pid_namespace) == (CONTAINER_NAMESPACE_INODE, False)
    assert owner.systemd_unit is None


def test_process_in_the_agents_namespace_and_unreadable_namespace(tmp_path):
    proc = fake_proc(tmp_path)
    add_process(proc, 700, b"python3", "0::/system.slice/vllm.service\n")
    add_process(proc, 701, b"python3", "0::/system.slice/vllm.service\n", namespace=None)  # no ptrace access
    reader = ProcessOwnerReader(str(proc), clk_tck=CLK_TCK)
    same, unknown = reader.read(700), reader.read(701)
    assert (same.pid_namespace, same.in_agent_pid_namespace, same.systemd_unit) == (HOST_PID_NAMESPACE_INODE, True,
                                                                                     "vllm.service")
    assert (unknown.pid_namespace, unknown.in_agent_pid_namespace, unknown.systemd_unit) == (None, None, "vllm.service")


def test_gone_pid_and_zombie_give_none(tmp_path):
    proc = fake_proc(tmp_path)
    add_process(proc, 800, state="Z")
    reader = ProcessOwnerReader(str(proc), clk_tck=CLK_TCK)
    assert reader.read(799) is None and reader.start_ticks(799) is None
    assert reader.read(800) is None and reader.start_ticks(800) is None


def test_start_ticks_tells_a_reused_pid_apart(tmp_path):
    proc = fake_proc(tmp_path)
    add_process(proc, 850, b"vllm", starttime=5000)
    reader = ProcessOwnerReader(str(proc), clk_tck=CLK_TCK)
    first = reader.read(850)
    assert reader.start_ticks(850) == first.start_ticks == 5000
    shutil.rmtree(proc / "850")
    add_process(proc, 850, b"bash", starttime=9000)  # the PID, reused by a later process
    assert reader.start_ticks(850) == 9000 and reader.read(850).identity != first.identity


@pytest.mark.parametrize("gone_at", ["comm", "cgroup", "ns/pid"])
def test_pid_that_vanishes_mid_read(tmp_path, monkeypatch, gone_at):
    # The process exits after its directory was opened: on a tmpfs, as on procfs, later reads through the
    # held directory fail with ENOENT (the tree is gone), and the reader answers None, not an error.
    proc = fake_proc(tmp_path)
    add_process(proc, 900, cgroup="0::/system.slice/vllm.service\n", namespace=CONTAINER_NAMESPACE_INODE)
    real_read_at, real_readlink = process_owner._read_at, os.readlink

    def vanish() -> None:
        if (proc / "900").exists():
            shutil.rmtree(proc / "900")

    def read_at(dir_fd: int, name: str) -> bytes:
        if name == gone_at:
            vanish()
        return real_read_at(dir_fd, name)

    def readlink(path, *, dir_fd=None):
        if path == gone_at and dir_fd is not None:
            vanish()
        return real_readlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(process_owner, "_read_at", read_at)
    monkeypatch.setattr(process_owner.os, "readlink", readlink)
    assert ProcessOwnerReader(str(proc), clk_tck=CLK_TCK).read(900) is None


def test_unreadable_file_is_an_error_not_a_vanish(tmp_path):
    proc = fake_proc(tmp_path)
    add_process(proc, 1000)
    (proc / "1000" / "cgroup").unlink()
    (proc / "1000" / "cgroup").mkdir()  # reading it raises IsADirectoryError, as hidepid raises EACCES (root here)
    with pytest.raises(ProcessOwnerError, match=r"1000/cgroup: IsADirectoryError"):
        ProcessOwnerReader(str(proc), clk_tck=CLK_TCK).read(1000)


def test_bad_pid_and_missing_btime(tmp_path):
    proc = fake_proc(tmp_path)
    with pytest.raises(ProcessOwnerError, match="positive integer"):
        ProcessOwnerReader(str(proc), clk_tck=CLK_TCK).read(0)
    (proc / "stat").write_text("cpu  1 2 3 4\n")
    with pytest.raises(ProcessOwnerError, match="no btime line"):
        ProcessOwnerReader(str(proc), clk_tck=CLK_TCK).read(1)


def test_comm_with_bytes_that_are_not_utf8(tmp_path):
    proc = fake_proc(tmp_path)
    add_process(proc, 1100, comm=b"gpu\xffjob")
    assert read_process_owner(1100, str(proc), clk_tck=CLK_TCK).comm == "gpu\\xffjob"


def test_parse_helpers():
    assert parse_boot_time_s("cpu 1 2 3 4\nbtime 1732262400\n") == 1732262400
    assert parse_namespace_link("pid:[4026531836]") == HOST_PID_NAMESPACE_INODE
    assert parse_namespace_link("net:[4026531840]") is None
    assert parse_namespace_link("pid:[x]") is None


# -- whose PIDs a /proc shows --------------------------------------------------------------------------------

def test_pid_view_host(tmp_path):
    view = read_pid_view(str(fake_proc(tmp_path)))
    assert (view.shows_host_pids, view.procfs_pid_namespace, view.agent_pid_namespace) == (
        True, HOST_PID_NAMESPACE_INODE, HOST_PID_NAMESPACE_INODE)


def test_pid_view_container_without_host_pid(tmp_path):
    # A pod without hostPID: its /proc's PID 1 and the agent share the container's namespace.
    proc = fake_proc(tmp_path, agent_namespace=CONTAINER_NAMESPACE_INODE, init_namespace=CONTAINER_NAMESPACE_INODE)
    view = read_pid_view(str(proc))
    assert view.shows_host_pids is False and view.procfs_pid_namespace == CONTAINER_NAMESPACE_INODE
    assert "hostPID: true" in view.detail and "\n" not in view.detail


def test_pid_view_when_pid_1_cannot_be_read(tmp_path):
    # No ptrace access to PID 1: an agent in the host's namespace that finds itself still knows the answer.
    host = read_pid_view(str(fake_proc(tmp_path / "host", init_namespace=None)))
    assert host.shows_host_pids is True
    # A containerised agent (bind-mounted host /proc, say) cannot tell: the wiring then refuses.
    unknown = read_pid_view(str(fake_proc(tmp_path / "pod", agent_namespace=CONTAINER_NAMESPACE_INODE,
                                          init_namespace=None)))
    assert unknown.shows_host_pids is None and unknown.detail.startswith("cannot tell")


# -- this machine's own /proc ---------------------------------------------------------------------------------

linux_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@linux_proc
def test_real_process_then_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        owner = ProcessOwnerReader().read(child.pid)
        assert owner is not None and owner.pid == child.pid
        assert owner.comm == psutil.Process(child.pid).name()
        # psutil computes create_time from the same two fields; btime is whole seconds.
        assert abs(owner.start_time_s - psutil.Process(child.pid).create_time()) <= 1.0
        assert isinstance(owner.cgroup, CgroupOwner)
    finally:
        child.kill()
    child.wait()
    assert ProcessOwnerReader().read(child.pid) is None


@linux_proc
def test_real_zombie_gives_none():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(500):  # until it has exited but is not reaped yet (state Z): a wait, not a timing check
            if psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.01)
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
        assert ProcessOwnerReader().read(child.pid) is None
    finally:
        child.wait()
