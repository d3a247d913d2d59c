"""The kubelet pod-resources client (probes/pod_resources.py) against a real gRPC server on a Unix socket.

The fake kubelet (tests/pod_resources_server.py) serves the public v1 wire format, with fields the client
does not declare filled in; one server for the module, its answers reset between tests. The parsing and
node-filter tests need no gRPC at all.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from wattledger.probes import pod_resources as pr
from wattledger.probes.pod_resources import DeviceId, PodGpuAllocation

GPU_A = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
GPU_B = "GPU-9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff"
GPU_ELSEWHERE = "GPU-e15e0000-dead-beef-0000-000000000001"
MIG_ON_B = "MIG-5c6d7e8f-1234-5678-9abc-def012345678"
NOBODY_UID = 65534
# Seconds: short, so the slow-kubelet test costs a fifth of a second; the fake would wait 30 s.
SHORT_TIMEOUT_S = 0.2


# ---------------------------------------------------------------------------------------------------------
# The fake kubelet, one per module.


@pytest.fixture(scope="module")
def kubelet_server():
    pytest.importorskip("grpc")
    import pod_resources_server

    # Mode 0755: the permission test connects as another user, who must reach the socket itself.
    with pod_resources_server.running_kubelet("wl-kubelet-", directory_mode=0o755) as kubelet:
        yield kubelet


@pytest.fixture
def kubelet(kubelet_server):
    kubelet_server.reset()
    yield kubelet_server
    kubelet_server.reset()


def node_pods():
    """A GPU node: a vLLM pod on GPU A, two pods sharing GPU B's time-sliced replicas, a MIG pod, a pod
    with a NIC only, a pod allocated a GPU of another node, and a training pod with a sidecar."""
    from pod_resources_server import FakeContainer, FakePod

    return [
        FakePod("serving", "vllm-0", (FakeContainer("engine", (("nvidia.com/gpu", (GPU_A,)),), cpu_ids=(2, 3)),)),
        FakePod("serving", "sglang-0", (FakeContainer("engine", (("nvidia.com/gpu.shared", (f"{GPU_B}::0",)),)),)),
        FakePod("notebooks", "alice", (FakeContainer("lab", (("nvidia.com/gpu.shared", (f"{GPU_B}::3",)),),
                                                     numa_node=1),)),
        FakePod("batch", "mig-job", (FakeContainer("worker", (("nvidia.com/mig-1g.10gb", (MIG_ON_B,)),)),)),
        FakePod("net", "router", (FakeContainer("dpdk", (("intel.com/sriov", ("0000:3b:02.1",)),)),)),
        FakePod("batch", "lost", (FakeContainer("worker", (("nvidia.com/gpu", (GPU_ELSEWHERE,)),)),)),
        FakePod("train", "llama-ft", (FakeContainer("trainer", (("nvidia.com/gpu", (GPU_A, GPU_B)),)),
                                      FakeContainer("log-shipper"))),
    ]


def allocation(namespace, pod, container, resource_name, *raw_ids):
    return PodGpuAllocation(namespace, pod, container, resource_name,
                            tuple(pr.parse_device_id(raw) for raw in raw_ids))


EXPECTED_GPU_ALLOCATIONS = (
    allocation("serving", "vllm-0", "engine", "nvidia.com/gpu", GPU_A),
    allocation("serving", "sglang-0", "engine", "nvidia.com/gpu.shared", f"{GPU_B}::0"),
    allocation("notebooks", "alice", "lab", "nvidia.com/gpu.shared", f"{GPU_B}::3"),
    allocation("batch", "mig-job", "worker", "nvidia.com/mig-1g.10gb", MIG_ON_B),
    allocation("batch", "lost", "worker", "nvidia.com/gpu", GPU_ELSEWHERE),
    allocation("train", "llama-ft", "trainer", "nvidia.com/gpu", GPU_A, GPU_B),
)


# ---------------------------------------------------------------------------------------------------------
# Device ids, resource names, the node filter: no gRPC.


@pytest.mark.parametrize("raw, device, replica, kind", [
    (GPU_A, GPU_A, None, "gpu-uuid"),
    (f"{GPU_A}::0", GPU_A, 0, "gpu-uuid"),
    (f"{GPU_A}::12", GPU_A, 12, "gpu-uuid"),
    (MIG_ON_B, MIG_ON_B, None, "mig-uuid"),
    (f"{MIG_ON_B}::1", MIG_ON_B, 1, "mig-uuid"),
    ("MIG-GPU-0a1b2c3d-0000-1111-2222-333344445555/1/0", "MIG-GPU-0a1b2c3d-0000-1111-2222-333344445555/1/0",
     None, "mig-uuid"),
    ("3", "3", None, "index"),
    ("0:1", "0:1", None, "index"),
    ("3::1", "3", 1, "index"),
    # Not the device plugin's annotation: kept whole, never guessed at.
    (f"{GPU_A}::x", f"{GPU_A}::x", None, "gpu-uuid"),
    ("::2", "::2", None, "other"),
])
def test_device_ids_split_into_device_and_replica(raw, device, replica, kind):
    parsed = pr.parse_device_id(raw)
    assert parsed == DeviceId(raw=raw, device=device, replica=replica)
    assert parsed.kind == kind


@pytest.mark.parametrize("resource_name, is_gpu", [
    ("nvidia.com/gpu", True),
    ("nvidia.com/gpu.shared", True),
    ("nvidia.com/mig-1g.10gb", True),
    ("nvidia.com/mig-3g.40gb.shared", True),
    ("nvidia.com/gpumem", False),
    ("amd.com/gpu", False),
    ("intel.com/sriov", False),
    ("NVIDIA.com/gpu", False),  # resource names are case-sensitive
])
def test_gpu_resource_names(resource_name, is_gpu):
    assert pr.is_gpu_resource(resource_name) is is_gpu


def test_gpu_resource_patterns_can_be_replaced():
    assert pr.is_gpu_resource("amd.com/gpu", ("amd.com/gpu", "nvidia.com/*"))
    assert not pr.is_gpu_resource("nvidia.com/gpu", ("amd.com/gpu",))


def test_split_by_node_keeps_this_nodes_devices_and_returns_the_rest():
    node_uuids = {GPU_A, GPU_B, MIG_ON_B}
    split = pr.split_by_node(EXPECTED_GPU_ALLOCATIONS, node_uuids)
    assert split.not_on_node == (allocation("batch", "lost", "worker", "nvidia.com/gpu", GPU_ELSEWHERE),)
    assert split.on_node == tuple(a for a in EXPECTED_GPU_ALLOCATIONS if a.pod != "lost")
    # Replicas match on their GPU; every device id lands on exactly one side.
    on_node_ids = [d.raw for a in split.on_node for d in a.device_ids]
    assert f"{GPU_B}::3" in on_node_ids
    assert sorted(on_node_ids + [GPU_ELSEWHERE]) == sorted(d.raw for a in EXPECTED_GPU_ALLOCATIONS
                                                            for d in a.device_ids)


def test_split_by_node_cuts_an_allocation_that_spans_nodes_in_two():
    spanning = allocation("train", "llama-ft", "trainer", "nvidia.com/gpu", GPU_A, GPU_ELSEWHERE)
    split = pr.split_by_node([spanning], [GPU_A])
    assert split.on_node == (allocation("train", "llama-ft", "trainer", "nvidia.com/gpu", GPU_A),)
    assert split.not_on_node == (allocation("train", "llama-ft", "trainer", "nvidia.com/gpu", GPU_ELSEWHERE),)


def test_index_device_ids_are_not_on_a_node_known_by_uuid():
    by_index = allocation("serving", "vllm-0", "engine", "nvidia.com/gpu", "0")
    assert pr.split_by_node([by_index], [GPU_A]).on_node == ()
    assert pr.split_by_node([by_index], [GPU_A, "0"]).on_node == (by_index,)


# ---------------------------------------------------------------------------------------------------------
# Against the fake kubelet.


def test_lists_the_gpu_allocations_of_every_pod(kubelet):
    kubelet.pods = node_pods()
    assert pr.list_gpu_allocations(kubelet.socket_path, timeout_s=2.0) == EXPECTED_GPU_ALLOCATIONS


def test_a_kubelet_with_no_pods_lists_nothing(kubelet):
    assert pr.list_gpu_allocations(kubelet.socket_path) == ()


def test_one_client_serves_many_calls_and_takes_a_unix_target(kubelet):
    kubelet.pods = node_pods()
    with pr.PodResourcesClient(f"unix://{kubelet.socket_path}", timeout_s=2.0) as client:
        assert client.socket_path == kubelet.socket_path
        first = client.list_gpu_allocations()
        kubelet.pods = node_pods()[:1]
        second = client.list_gpu_allocations()
    assert first == EXPECTED_GPU_ALLOCATIONS
    assert second == EXPECTED_GPU_ALLOCATIONS[:1]
    assert kubelet.calls == 2


def test_pods_whose_devices_are_not_on_this_node_come_back_apart(kubelet):
    kubelet.pods = node_pods()
    split = pr.split_by_node(pr.list_gpu_allocations(kubelet.socket_path), [GPU_A, GPU_B, MIG_ON_B])
    assert [(a.namespace, a.pod) for a in split.not_on_node] == [("batch", "lost")]
    assert ("batch", "lost") not in [(a.namespace, a.pod) for a in split.on_node]


def test_a_slow_kubelet_times_out(kubelet):
    kubelet.pods = node_pods()
    kubelet.delay_s = 30.0  # the fake stops waiting as soon as the caller gives up
    with pytest.raises(pr.KubeletTimeout) as caught:
        pr.list_gpu_allocations(kubelet.socket_path, timeout_s=SHORT_TIMEOUT_S)
    assert_one_line(caught.value, kubelet.socket_path, "did not answer within 0.2 s")


def test_a_kubelet_without_the_v1_api_is_unimplemented(kubelet):
    kubelet.serves_v1 = False
    with pytest.raises(pr.KubeletUnimplemented) as caught:
        pr.list_gpu_allocations(kubelet.socket_path)
    assert_one_line(caught.value, kubelet.socket_path, "v1alpha1")


def test_any_other_status_is_a_call_failure_naming_the_code(kubelet):
    import grpc

    kubelet.abort_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(pr.KubeletCallFailed) as caught:
        pr.list_gpu_allocations(kubelet.socket_path)
    assert_one_line(caught.value, kubelet.socket_path, "RESOURCE_EXHAUSTED: rejected by rate limit")


def test_an_absent_kubelet_says_what_to_mount(tmp_path):
    pytest.importorskip("grpc")
    missing = tmp_path / "pod-resources" / "kubelet.sock"
    with pytest.raises(pr.KubeletSocketAbsent) as caught:
        pr.list_gpu_allocations(str(missing))
    assert_one_line(caught.value, str(missing), f"mount the host's {missing.parent}")


def test_a_socket_nobody_listens_on(tmp_path):
    pytest.importorskip("grpc")
    path = socket_dir_path(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)  # bound, never listening: what a kubelet that died leaves behind
        with pytest.raises(pr.KubeletNotListening) as caught:
            pr.list_gpu_allocations(path, timeout_s=2.0)
    assert_one_line(caught.value, path, "nothing listens on it")


def test_a_path_that_is_no_socket(tmp_path):
    pytest.importorskip("grpc")
    path = tmp_path / "kubelet.sock"
    path.write_text("not a socket\n")
    with pytest.raises(pr.KubeletNotListening) as caught:
        pr.list_gpu_allocations(str(path), timeout_s=2.0)
    assert_one_line(caught.value, str(path), "is not a socket")


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to connect as another user (see the test below)")
def test_permission_denied_on_the_kubelet_socket_as_another_user(kubelet):
    """As root, connect as nobody to the (root's, mode 0755) socket: the refusal the agent meets when it
    does not run as root. One short subprocess: changing this process's uid would change gRPC's threads'."""
    os.chmod(kubelet.socket_path, 0o755)
    probe = ("import sys; from wattledger.probes import pod_resources as pr\n"
             "try:\n    pr.list_gpu_allocations(sys.argv[1], timeout_s=2.0)\n"
             "except pr.PodResourcesError as exc:\n    print(type(exc).__name__, exc)\n")
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups",
         sys.executable, "-c", probe, kubelet.socket_path],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("KubeletPermissionDenied "), result.stdout + result.stderr
    assert f"uid {NOBODY_UID}" in result.stdout
    assert kubelet.calls == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads through mode 000 (the test above covers root)")
def test_permission_denied_on_the_socket_directory(tmp_path):
    pytest.importorskip("grpc")
    locked = tmp_path / "pod-resources"
    locked.mkdir(mode=0o000)
    try:
        with pytest.raises(pr.KubeletPermissionDenied) as caught:
            pr.list_gpu_allocations(str(locked / "kubelet.sock"))
    finally:
        locked.chmod(0o755)
    assert_one_line(caught.value, str(locked / "kubelet.sock"), "permission denied")


# ---------------------------------------------------------------------------------------------------------
# Without grpcio or protobuf: one line, the install hint, and the module still imports.


def test_without_grpcio_the_client_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "grpc", None)  # `import grpc` now raises ImportError
    with pytest.raises(pr.GrpcNotInstalled) as caught:
        pr.PodResourcesClient("/nonexistent/kubelet.sock")
    assert_one_line(caught.value, "grpc is not installed", pr.INSTALL_HINT)


def test_without_protobuf_the_schema_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    with pytest.raises(pr.GrpcNotInstalled) as caught:
        pr.schema_file_proto()
    assert_one_line(caught.value, "google.protobuf is not installed", pr.INSTALL_HINT)


@pytest.mark.integration
def test_the_module_imports_neither_grpc_nor_protobuf():
    """The agent imports its probes at start; this one must not pull in (or require) gRPC until used."""
    code = ("import sys; import wattledger.probes.pod_resources\n"
            "print(sorted(m for m in ('grpc', 'google.protobuf') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_timeout_must_be_positive():
    pytest.importorskip("grpc")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        pr.PodResourcesClient("/nonexistent/kubelet.sock", timeout_s=0)


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def assert_one_line(error: Exception, *fragments: str) -> None:
    message = str(error)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def socket_dir_path(tmp_path) -> str:
    """A socket path short enough for sun_path (108 bytes): pytest's tmp_path can be longer."""
    path = str(tmp_path / "k.sock")
    if len(path.encode()) < 100:
        return path
    return os.path.join(tempfile.mkdtemp(prefix="wl-"), "k.sock")
