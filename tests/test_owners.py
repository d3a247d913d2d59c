"""agent/owners.py: from a host PID on a GPU to its owner's labels (issue 13 item 2, the resolver).

Fake /proc trees (tests/host_tree.py plus comm, cgroup, ns links and a container root with the pod's own
files), the cgroup files of tests/fixtures/cgroups/, and the fake kubelet (tests/pod_resources_server.py, a
real gRPC server on a Unix socket, one per module, reset between tests) behind the real client.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pytest

from wattledger.agent.owners import (
    KIND_COMMAND,
    KIND_CONTAINER,
    KIND_POD,
    KIND_UNIT,
    KUBELET_STALE_AFTER_INTERVALS,
    OwnerLabels,
    ProcOwnerResolver,
    ScriptedOwnerResolver,
    read_file_in_root,
)
from wattledger.probes.process_owner import HOST_PID_NAMESPACE_INODE

from host_tree import Proc, build_proc, stat_line, write_process  # tests/ is on sys.path through conftest.py

FIXTURES = Path(__file__).parent / "fixtures" / "cgroups"
CONTAINER_PID_NAMESPACE = 4026532301  # any inode but the host's
HOST_UTS_NAMESPACE = 4026531838  # the initial UTS namespace's inode (PROC_UTS_INIT_INO, include/linux/proc_ns.h)
POD_UTS_NAMESPACE = 4026532400  # a pod's own UTS namespace
AGENT_PID = 4242
CLK_TCK = 100
INTERVAL_S = 10.0
NS_PER_S = 1_000_000_000
SHORT_TIMEOUT_S = 0.2  # seconds: the slow-kubelet test costs this, not the fake's 30 s delay

GPU_A = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
GPU_B = "GPU-9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff"
GPU_ELSEWHERE = "GPU-e15e0000-dead-beef-0000-000000000001"
NODE_GPUS = {GPU_A, GPU_B}
POD_CGROUP_CASES = ("containerd_systemd_v2_besteffort", "crio_systemd_v2_burstable")


def fixture_cgroup(case: str) -> str:
    return (FIXTURES / f"{case}.cgroup").read_text()


def fixture_pod_uid(case: str) -> str:
    """The synthetic pod UID of a fixture (tests/fixtures/cgroups/README.md)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "wattledger-fixture/" + case))


# ---------------------------------------------------------------------------------------------------------
# Fake /proc trees.


def add_process(proc: Path, pid: int, comm: str = "python3", cgroup: str = "0::/init.scope\n",
                starttime: int = 123456, state: str = "S", pid_namespace: int = HOST_PID_NAMESPACE_INODE,
                uts_namespace: int = HOST_UTS_NAMESPACE) -> Path:
    """A process with the files the resolver reads; returns its (empty) root directory."""
    base = proc / str(pid)
    if base.exists():
        shutil.rmtree(base)
    write_process(proc, pid, Proc(comm=comm, ppid=1, starttime=starttime))
    (base / "stat").write_text(stat_line(pid, comm, 1, 100, 20, starttime, state=state))
    (base / "comm").write_text(comm + "\n")
    (base / "cgroup").write_text(cgroup)
    (base / "ns").mkdir()
    os.symlink(f"pid:[{pid_namespace}]", base / "ns" / "pid")
    os.symlink(f"uts:[{uts_namespace}]", base / "ns" / "uts")
    (base / "root").mkdir()
    return base / "root"


def write_pod_files(root: Path, hostname: str | None, namespace: str | None) -> None:
    """A pod container's root as Kubernetes makes it: /etc/hostname, and the service account's namespace
    behind the image's absolute /var/run -> /run link and the kubelet's ..data links (atomic_writer.go)."""
    if hostname is not None:
        (root / "etc").mkdir()
        (root / "etc" / "hostname").write_text(hostname + "\n")
    if namespace is not None:
        account = root / "run" / "secrets" / "kubernetes.io" / "serviceaccount"
        (account / "..2026_12_02_03_00_00.123456789").mkdir(parents=True)
        (account / "..2026_12_02_03_00_00.123456789" / "namespace").write_text(namespace)
        os.symlink("..2026_12_02_03_00_00.123456789", account / "..data")
        os.symlink("..data/namespace", account / "namespace")
        (root / "var").mkdir()
        os.symlink("/run", root / "var" / "run")


def fake_proc(tmp_path: Path, init_pid_namespace: int = HOST_PID_NAMESPACE_INODE,
              agent_pid_namespace: int = HOST_PID_NAMESPACE_INODE) -> Path:
    proc = build_proc(tmp_path)
    add_process(proc, 1, "systemd", starttime=1, pid_namespace=init_pid_namespace)
    add_process(proc, AGENT_PID, "wattledger", "0::/system.slice/wattledger.service\n",
                pid_namespace=agent_pid_namespace)
    os.symlink(str(AGENT_PID), proc / "self")
    return proc


class FakeClock:
    """Monotonic ns the test moves by hand."""

    def __init__(self) -> None:
        self.now_ns = 1_000 * NS_PER_S

    def __call__(self) -> int:
        return self.now_ns

    def advance_intervals(self, count: float) -> int:
        self.now_ns += int(count * INTERVAL_S * NS_PER_S)
        return self.now_ns


def resolver_for(proc: Path, clock: FakeClock, client=None, **kwargs) -> ProcOwnerResolver:
    kwargs.setdefault("kubelet_in_background", False)
    return ProcOwnerResolver(str(proc), client, lambda: set(NODE_GPUS), clock, INTERVAL_S, clk_tck=CLK_TCK,
                             **kwargs)


# ---------------------------------------------------------------------------------------------------------
# The fake kubelet, one per module, behind the real client.


@pytest.fixture(scope="module")
def kubelet_server():
    pytest.importorskip("grpc")
    import pod_resources_server

    with pod_resources_server.running_kubelet("wl-owners-") as kubelet:
        yield kubelet


@pytest.fixture
def kubelet(kubelet_server):
    kubelet_server.reset()
    yield kubelet_server
    kubelet_server.reset()


@pytest.fixture
def client(kubelet):
    from wattledger.probes.pod_resources import PodResourcesClient

    with PodResourcesClient(kubelet.socket_path, timeout_s=SHORT_TIMEOUT_S) as made:
        yield made


def node_pods():
    """vLLM alone on GPU A; two pods on GPU B's time-sliced replicas; a pod with a GPU and no process; a
    pod allocated another node's GPU."""
    from pod_resources_server import FakeContainer, FakePod

    return [
        FakePod("serving", "vllm-0", (FakeContainer("engine", (("nvidia.com/gpu", (GPU_A,)),)),)),
        FakePod("serving", "sglang-0", (FakeContainer("engine", (("nvidia.com/gpu.shared", (f"{GPU_B}::0",)),)),
                                        FakeContainer("metrics"))),
        FakePod("notebooks", "alice", (FakeContainer("lab", (("nvidia.com/gpu.shared", (f"{GPU_B}::3",)),)),)),
        FakePod("batch", "idle-job", (FakeContainer("worker", (("nvidia.com/gpu.shared", (f"{GPU_B}::5",)),)),)),
        FakePod("batch", "lost", (FakeContainer("worker", (("nvidia.com/gpu", (GPU_ELSEWHERE,)),)),)),
    ]


# ---------------------------------------------------------------------------------------------------------
# Kubernetes: the GPU join, the pod's own files.


@pytest.mark.parametrize("case", POD_CGROUP_CASES)
def test_exclusive_gpu_is_joined_by_uuid(tmp_path, kubelet, client, case):
    kubelet.pods = node_pods()
    proc = fake_proc(tmp_path)
    add_process(proc, 5001, "vllm", fixture_cgroup(case), pid_namespace=CONTAINER_PID_NAMESPACE,
                uts_namespace=POD_UTS_NAMESPACE)  # no pod files in its root: the join needs none
    clock = FakeClock()
    resolver = resolver_for(proc, clock, client)
    resolver.refresh(clock())
    labels = resolver.resolve(5001, gpu_uuid=GPU_A)
    assert labels == OwnerLabels(KIND_POD, "serving", "vllm-0", "engine")
    assert labels.command == "vllm"
    assert resolver.status() is None


def test_time_sliced_gpu_falls_back_to_the_pods_own_files(tmp_path, kubelet, client):
    kubelet.pods = node_pods()
    proc = fake_proc(tmp_path)
    case = "crio_systemd_v2_burstable"
    root = add_process(proc, 5002, "python3", fixture_cgroup(case), pid_namespace=CONTAINER_PID_NAMESPACE,
                       uts_namespace=POD_UTS_NAMESPACE)
    write_pod_files(root, "sglang-0", "serving")
    clock = FakeClock()
    resolver = resolver_for(proc, clock, client)
    resolver.refresh(clock())
    # GPU B is held by three pods: the files name the pod, and its one container on GPU B names the container
    # (its other container, "metrics", holds no GPU).
    assert resolver.resolve(5002, gpu_uuid=GPU_B) == OwnerLabels(KIND_POD, "serving", "sglang-0", "engine")
    # Without the GPU the pod is still named, the container is not guessed.
    assert resolver.resolve(5002) == OwnerLabels(KIND_POD, "serving", "sglang-0", "")


def test_hostname_cut_to_63_characters_is_matched_to_the_pods_full_name(tmp_path, kubelet, client):
    from pod_resources_server import FakeContainer, FakePod

    long_name = "llama-70b-instruct-finetune-" + "x" * 50  # 78 characters: the kubelet cuts its hostname
    kubelet.pods = [FakePod("train", long_name, (FakeContainer("trainer", (("nvidia.com/gpu.shared",
                                                                             (f"{GPU_B}::1",)),)),)),
                    FakePod("train", "other", (FakeContainer("trainer", (("nvidia.com/gpu.shared",
                                                                          (f"{GPU_B}::2",)),)),))]
    proc = fake_proc(tmp_path)
    root = add_process(proc, 5003, "torchrun", fixture_cgroup("containerd_systemd_v2_besteffort"),
                       uts_namespace=POD_UTS_NAMESPACE)
    write_pod_files(root, long_name[:63], "train")
    clock = FakeClock()
    resolver = resolver_for(proc, clock, client)
    resolver.refresh(clock())
    assert resolver.resolve(5003, gpu_uuid=GPU_B) == OwnerLabels(KIND_POD, "train", long_name, "trainer")


def test_host_network_pod_hostname_is_not_taken_for_its_name(tmp_path):
    proc = fake_proc(tmp_path)
    case = "containerd_systemd_v2_besteffort"
    root = add_process(proc, 5004, "python3", fixture_cgroup(case), uts_namespace=HOST_UTS_NAMESPACE)
    write_pod_files(root, "gpu-node-17", "serving")  # the node's hostname: hostNetwork shares its UTS namespace
    clock = FakeClock()
    labels = resolver_for(proc, clock).resolve(5004)
    assert labels == OwnerLabels(KIND_POD, group=fixture_pod_uid(case))  # kept apart by its UID, not misnamed


def test_pod_files_are_read_inside_the_pods_root(tmp_path):
    # A container's /etc/hostname linking to an absolute path, or climbing with "..", names the container's
    # own file at that path, never the agent's.
    secret = tmp_path / "agent-secret"
    secret.write_text("root:x:0:0\n")
    root = tmp_path / "container-root"
    (root / "etc").mkdir(parents=True)
    os.symlink(str(secret), root / "etc" / "hostname")
    with pytest.raises(FileNotFoundError):
        read_file_in_root(str(root), "etc/hostname")
    inside = root / str(secret).lstrip("/")
    inside.parent.mkdir(parents=True)
    inside.write_text("vllm-0\n")
    assert read_file_in_root(str(root), "etc/hostname") == b"vllm-0\n"
    os.unlink(root / "etc" / "hostname")
    os.symlink("../" * 20 + str(secret).lstrip("/"), root / "etc" / "hostname")
    assert read_file_in_root(str(root), "etc/hostname") == b"vllm-0\n"
    os.unlink(root / "etc" / "hostname")
    os.symlink("hostname", root / "etc" / "hostname")  # a loop
    with pytest.raises(OSError, match="symbolic links"):
        read_file_in_root(str(root), "etc/hostname")


def test_invalid_names_in_pod_files_are_not_labels(tmp_path):
    proc = fake_proc(tmp_path)
    case = "containerd_systemd_v2_besteffort"
    root = add_process(proc, 5005, "python3", fixture_cgroup(case), uts_namespace=POD_UTS_NAMESPACE)
    write_pod_files(root, 'evil"} 1\nwattledger_fake{x="', "serving")
    clock = FakeClock()
    assert resolver_for(proc, clock).resolve(5005) == OwnerLabels(KIND_POD, group=fixture_pod_uid(case))


# ---------------------------------------------------------------------------------------------------------
# Processes: reuse, gone, no host PIDs.


def test_reused_pid_gets_the_new_process_owner(tmp_path):
    proc = fake_proc(tmp_path)
    add_process(proc, 6001, "python3", "0::/system.slice/vllm.service\n", starttime=5000)
    clock = FakeClock()
    resolver = resolver_for(proc, clock)
    assert resolver.resolve(6001) == OwnerLabels(KIND_UNIT, group="vllm.service")
    add_process(proc, 6001, "bash", "0::/system.slice/trainer.service\n", starttime=9000)  # the PID, reused
    assert resolver.resolve(6001) == OwnerLabels(KIND_UNIT, group="trainer.service")
    assert resolver.resolve(6001).command == "bash"


def test_gone_pid_and_zombie_are_none(tmp_path):
    proc = fake_proc(tmp_path)
    add_process(proc, 6002, "python3", "0::/system.slice/vllm.service\n")
    add_process(proc, 6003, "python3", "0::/system.slice/vllm.service\n", state="Z")
    clock = FakeClock()
    resolver = resolver_for(proc, clock)
    assert resolver.resolve(6002) is not None
    shutil.rmtree(proc / "6002")
    assert resolver.resolve(6002) is None  # the cache holds it, but its start time is no longer there
    assert resolver.resolve(6003) is None
    assert resolver.resolve(6999) is None


def test_agent_without_host_pids_resolves_nothing_and_says_why(tmp_path):
    # A pod without hostPID: its /proc's PID 1 and the agent share the container's namespace.
    proc = fake_proc(tmp_path, init_pid_namespace=CONTAINER_PID_NAMESPACE, agent_pid_namespace=CONTAINER_PID_NAMESPACE)
    add_process(proc, 6004, "python3", "0::/system.slice/vllm.service\n")
    clock = FakeClock()
    resolver = resolver_for(proc, clock)
    assert resolver.resolve(6004) is None and resolver.resolve(1) is None
    reason = resolver.status()
    assert "hostPID: true" in reason and "\n" not in reason and resolver.describe() == reason


# ---------------------------------------------------------------------------------------------------------
# Off Kubernetes, and without a kubelet.


@pytest.mark.parametrize("cgroup, kind, group", [
    (fixture_cgroup("systemd_service_v2"), KIND_UNIT, "vllm.service"),
    (fixture_cgroup("systemd_user_app_scope_v2"), KIND_UNIT,
     "vte-spawn-3418d75e-ee86-57d2-abba-8f013df3bf52.scope"),
    (fixture_cgroup("docker_host_systemd_v1"), KIND_CONTAINER,
     hashlib.sha256(b"docker_host_systemd_v1").hexdigest()[:12]),
    (fixture_cgroup("docker_host_cgroupfs_v1"), KIND_CONTAINER,
     hashlib.sha256(b"docker_host_cgroupfs_v1").hexdigest()[:12]),
    (fixture_cgroup("host_root_v1"), KIND_COMMAND, "train.py"),
    (fixture_cgroup("systemd_init_scope_v2"), KIND_COMMAND, "train.py"),
    ("0::/user.slice/user-1000.slice/session-4.scope\n", KIND_COMMAND, "train.py"),
])
def test_off_kubernetes_owners(tmp_path, cgroup, kind, group):
    proc = fake_proc(tmp_path)
    add_process(proc, 7001, "train.py", cgroup)
    clock = FakeClock()
    labels = resolver_for(proc, clock).resolve(7001)
    assert labels == OwnerLabels(kind, group=group) and labels.command == "train.py"


def test_kubelet_absent_off_kubernetes_still_groups(tmp_path):
    from wattledger.probes.pod_resources import PodResourcesClient

    proc = fake_proc(tmp_path)
    add_process(proc, 7002, "python3", fixture_cgroup("systemd_service_v2"))
    clock = FakeClock()
    with PodResourcesClient(str(tmp_path / "no-kubelet" / "kubelet.sock")) as absent:
        resolver = resolver_for(proc, clock, absent)
        resolver.refresh(clock())
        assert resolver.resolve(7002, gpu_uuid=GPU_A) == OwnerLabels(KIND_UNIT, group="vllm.service")
        assert resolver.status() is None and "not a Kubernetes node" in resolver.describe()
        # A pod process on the same node: it is Kubernetes after all, and the socket is not mounted.
        root = add_process(proc, 7003, "python3", fixture_cgroup("containerd_systemd_v2_besteffort"),
                           uts_namespace=POD_UTS_NAMESPACE)
        write_pod_files(root, "vllm-0", "serving")
        assert resolver.resolve(7003, gpu_uuid=GPU_A) == OwnerLabels(KIND_POD, "serving", "vllm-0", "")
        reason = resolver.status()
        assert "mount the host's" in reason and "\n" not in reason
        assert resolver.pods_without_processes() == ()


def test_slow_kubelet_never_holds_the_tick(tmp_path, kubelet, client):
    kubelet.pods, kubelet.delay_s = node_pods(), 30.0
    proc = fake_proc(tmp_path)
    add_process(proc, 7004, "vllm", fixture_cgroup("containerd_systemd_v2_besteffort"),
                uts_namespace=POD_UTS_NAMESPACE)
    clock = FakeClock()
    resolver = resolver_for(proc, clock, client, kubelet_in_background=True)
    resolver.refresh(clock())  # starts the call on the kubelet thread and returns
    assert resolver.resolve(7004, gpu_uuid=GPU_A).pod == ""  # no answer yet: the UID, not a guess
    resolver.wait_for_kubelet(timeout_s=5.0)
    resolver.refresh(clock())
    assert "did not answer" in resolver.status()


def test_failed_kubelet_keeps_its_last_answer_for_a_while(tmp_path, kubelet, client):
    import grpc

    kubelet.pods = node_pods()
    proc = fake_proc(tmp_path)
    add_process(proc, 7005, "vllm", fixture_cgroup("containerd_systemd_v2_besteffort"),
                uts_namespace=POD_UTS_NAMESPACE)
    clock = FakeClock()
    resolver = resolver_for(proc, clock, client)
    resolver.refresh(clock())
    kubelet.abort_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    resolver.refresh(clock.advance_intervals(1))
    assert "RESOURCE_EXHAUSTED" in resolver.status()
    assert resolver.resolve(7005, gpu_uuid=GPU_A).pod == "vllm-0"  # a kubelet restart: last answer kept
    for _ in range(KUBELET_STALE_AFTER_INTERVALS):
        resolver.refresh(clock.advance_intervals(1))
    assert resolver.resolve(7005, gpu_uuid=GPU_A).pod == ""  # stale: a deleted pod must not keep the GPU


# ---------------------------------------------------------------------------------------------------------
# Who holds idle GPUs.


def test_pods_with_gpus_but_no_process(tmp_path, kubelet, client):
    kubelet.pods = node_pods()
    proc = fake_proc(tmp_path)
    root = add_process(proc, 8001, "python3", fixture_cgroup("crio_systemd_v2_burstable"),
                       uts_namespace=POD_UTS_NAMESPACE)
    write_pod_files(root, "alice", "notebooks")
    add_process(proc, 8002, "vllm", fixture_cgroup("containerd_systemd_v2_besteffort"),
                uts_namespace=POD_UTS_NAMESPACE)
    clock = FakeClock()
    resolver = resolver_for(proc, clock, client)
    resolver.refresh(clock())
    assert resolver.resolve(8001, gpu_uuid=GPU_B).pod == "alice"
    assert resolver.resolve(8002, gpu_uuid=GPU_A).pod == "vllm-0"
    idle = {(a.namespace, a.pod) for a in resolver.pods_without_processes()}
    assert idle == {("serving", "sglang-0"), ("batch", "idle-job")}  # "lost" is another node's GPU
    assert [a.pod for a in resolver.allocations_not_on_node] == ["lost"]
    # Between kubelet calls too: a pod's last process seen over two intervals ago makes it idle.
    saved_ns = clock.now_ns
    clock.advance_intervals(2.5)
    assert {a.pod for a in resolver.pods_without_processes()} == {"sglang-0", "idle-job", "alice", "vllm-0"}
    clock.now_ns = saved_ns
    # vLLM's process keeps being listed; alice's stops: after the window her pod holds an idle GPU too.
    for _ in range(3):
        clock.advance_intervals(1)
        resolver.refresh(clock())
        resolver.resolve(8002, gpu_uuid=GPU_A)
    idle = {(a.namespace, a.pod) for a in resolver.pods_without_processes()}
    assert idle == {("serving", "sglang-0"), ("batch", "idle-job"), ("notebooks", "alice")}


# ---------------------------------------------------------------------------------------------------------
# The mock's resolver, and the labels as an owner key.


def test_scripted_resolver():
    resolver = ScriptedOwnerResolver({
        101: {"namespace": "llm", "pod": "vllm-0", "container": "vllm"},
        102: {"group": "trainer.service"},
        103: {"group": "python3"},
    })
    resolver.refresh(0)
    assert resolver.resolve(101) == OwnerLabels(KIND_POD, "llm", "vllm-0", "vllm")
    assert resolver.resolve(102, gpu_uuid=GPU_A) == OwnerLabels(KIND_UNIT, group="trainer.service")
    assert resolver.resolve(103) == OwnerLabels(KIND_COMMAND, group="python3")
    assert resolver.resolve(104) is None
    assert resolver.status() is None
    with pytest.raises(ValueError, match="pid 1: owner kind"):
        ScriptedOwnerResolver({1: {"kind": "pid", "group": "x"}})
    with pytest.raises(ValueError, match=r"pid 2: owner labels may only be .*\['model'\]"):
        ScriptedOwnerResolver({2: {"pod": "vllm-0", "model": "llama"}})


def test_command_is_not_part_of_the_owner_key():
    a = OwnerLabels(KIND_POD, "llm", "vllm-0", "vllm", command="python3")
    b = OwnerLabels(KIND_POD, "llm", "vllm-0", "vllm", command="nccl-worker")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != OwnerLabels(KIND_POD, "llm", "vllm-1", "vllm")


def test_node_gpu_uuids_failing_is_a_status_line(tmp_path, kubelet, client):
    kubelet.pods = node_pods()
    proc = fake_proc(tmp_path)
    clock = FakeClock()

    def nvml_lost() -> set[str]:
        raise RuntimeError("NVML_ERROR_GPU_IS_LOST")

    resolver = ProcOwnerResolver(str(proc), client, nvml_lost, clock, INTERVAL_S, kubelet_in_background=False,
                                 clk_tck=CLK_TCK)
    resolver.refresh(clock())
    reason = resolver.status()
    assert "GPU UUIDs" in reason and "GPU_IS_LOST" in reason
    assert kubelet.calls == 0 and resolver.pods_without_processes() == ()
