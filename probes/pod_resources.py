"""The kubelet's pod-resources API (v1) over its Unix socket: which pod and container holds which GPU.

Issue 13, item 2 ("from process to owner"), the Kubernetes part. The kubelet serves, on a node-local Unix
socket, the gRPC service ``v1.PodResourcesLister``; its ``List`` method returns every pod on the node with,
per container, the devices the device plugins allocated to it. For GPUs that is the NVIDIA device plugin's
resource name (``nvidia.com/gpu``, ``nvidia.com/mig-1g.10gb``, ``nvidia.com/gpu.shared`` under
time-slicing or MPS with ``renameByDefault``) and its device ids. This covers a GPU allocated to a pod that
has no process on it yet, and shared replicas, which the processes' cgroups alone cannot tell.

What this module gives the wiring (next session: sampler -> ledger -> exposition):

- :class:`PodResourcesClient` (or :func:`list_gpu_allocations` for one call): ``List`` with a timeout,
  returning :class:`PodGpuAllocation` records ``(namespace, pod, container, resource_name, device_ids)``
  for the GPU resources only. One channel per client: gRPC reconnects on its own after a kubelet restart,
  so the sampler keeps one client and calls it every few seconds (the kubelet rate-limits this endpoint
  to 100 calls/s, burst 10: pkg/kubelet/apis/podresources/grpc/ratelimit.go, far above what we need).
- :func:`split_by_node`: keeps the allocations whose devices this node's NVML reports (GPU and MIG UUIDs),
  and returns the others apart, so that a socket from the wrong node, or a device plugin configured with
  ``deviceIDStrategy: index``, shows up as "not on this node" instead of a silent zero.
- :class:`DeviceId`: a device id parsed into the device (``GPU-...``, ``MIG-...``, or an index) and the
  replica number of time-sliced and MPS replicas (``GPU-...::3``, the device plugin's annotated id:
  NVIDIA/k8s-device-plugin internal/rm/devices.go, ``NewAnnotatedID``). Several replicas of one GPU held
  by different pods are how the attribution model learns that a GPU is shared, and by whom.
- Errors: every failure is a :class:`PodResourcesError` subclass with a one-line message that says what to
  do (socket absent, permission denied, nobody listening, timeout, UNIMPLEMENTED, any other gRPC status).
  grpcio or protobuf not installed is :class:`GrpcNotInstalled` (``pip install 'wattledger[kubernetes]'``),
  raised when a client is made, never at import: the agent installs and runs without them.

What the agent needs on Kubernetes: the socket's directory, ``/var/lib/kubelet/pod-resources``, mounted
into its container (a hostPath; read-only is enough, since connecting to a socket needs no write access to
the filesystem, and mounting the directory rather than the socket file lets it reconnect after a kubelet
restart, as the Kubernetes 1.28 GA post on this API recommends), and permission to connect: the kubelet
(root) creates the socket, writable by root alone under the usual umask, and connecting to a Unix socket
needs write permission on it, so the agent runs as root or the connect is refused.

Schema: only the fields this module reads are declared, with the numbers of the public
``k8s.io/kubelet/pkg/apis/podresources/v1/api.proto``; protobuf skips the fields it does not know
(``cpu_ids``, ``memory``, ``topology``, ``dynamic_resources``, the pod-level fields of newer kubelets). The
message classes are built at first use from a ``FileDescriptorProto`` written below, in a private
descriptor pool: no code generation, no generated file. Devices allocated through DRA
(``dynamic_resources``) are not read yet.
"""

from __future__ import annotations

import fnmatch
import os
import socket
import stat
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, NamedTuple

__all__ = [
    "DEFAULT_GPU_RESOURCE_PATTERNS",
    "DEFAULT_SOCKET_PATH",
    "DEFAULT_TIMEOUT_S",
    "INSTALL_HINT",
    "LIST_METHOD",
    "DeviceId",
    "GrpcNotInstalled",
    "KubeletCallFailed",
    "KubeletNotListening",
    "KubeletPermissionDenied",
    "KubeletSocketAbsent",
    "KubeletTimeout",
    "KubeletUnimplemented",
    "NodeSplit",
    "PodGpuAllocation",
    "PodResourcesClient",
    "PodResourcesError",
    "is_gpu_resource",
    "list_gpu_allocations",
    "message_classes",
    "parse_device_id",
    "schema_file_proto",
    "split_by_node",
]

# The kubelet's socket: pod-resources/kubelet.sock under its --root-dir (/var/lib/kubelet by default);
# no flag moves it on its own.
DEFAULT_SOCKET_PATH = "/var/lib/kubelet/pod-resources/kubelet.sock"
# Seconds. A kubelet answers List in milliseconds; 2 s bounds how long a sampler tick can wait on a stuck one.
DEFAULT_TIMEOUT_S = 2.0
SERVICE_NAME = "v1.PodResourcesLister"
LIST_METHOD = f"/{SERVICE_NAME}/List"
# Bytes. gRPC's default receive limit is 4 MiB; a node with hundreds of pods and their CPU ids can pass it.
# 16 MiB is what the kubelet's own e2e client uses (test/e2e_node/util.go, defaultPodResourcesMaxSize).
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# The NVIDIA device plugin's resource names: whole GPUs, their shared (time-sliced or MPS) replicas renamed
# with a suffix, and MIG profiles under the "mixed" strategy. fnmatch patterns; the caller can pass its own
# (a plugin config may rename resources freely).
DEFAULT_GPU_RESOURCE_PATTERNS = ("nvidia.com/gpu", "nvidia.com/gpu.*", "nvidia.com/mig-*")
INSTALL_HINT = "pip install 'wattledger[kubernetes]'"
# The device plugin's separator between a device id and its replica number (time-slicing, MPS).
REPLICA_SEPARATOR = "::"


# ---------------------------------------------------------------------------------------------------------
# Errors: one line each, saying what is wrong and what to do.


class PodResourcesError(Exception):
    """The kubelet's pod-resources API could not be read; ``str()`` is one line."""


class GrpcNotInstalled(PodResourcesError):
    """grpcio or protobuf is not installed (they are the ``kubernetes`` extra)."""


class KubeletSocketAbsent(PodResourcesError):
    """No file at the socket path: not a Kubernetes node, or the directory is not mounted into the agent."""


class KubeletPermissionDenied(PodResourcesError):
    """The socket (or a directory above it) refuses this user."""


class KubeletNotListening(PodResourcesError):
    """The socket file exists but nothing accepts on it (the kubelet is down or restarting), or it is no
    socket at all."""


class KubeletTimeout(PodResourcesError):
    """The kubelet did not answer within the timeout."""


class KubeletUnimplemented(PodResourcesError):
    """The kubelet does not serve ``v1.PodResourcesLister/List`` (too old, or it is something else)."""


class KubeletCallFailed(PodResourcesError):
    """Any other gRPC failure (rate limit, internal error, an answer that does not decode)."""


# ---------------------------------------------------------------------------------------------------------
# Records.


@dataclass(frozen=True)
class DeviceId:
    """One device id as the kubelet reports it, split into the device and the replica number."""

    raw: str  # as reported: "GPU-<uuid>", "GPU-<uuid>::2", "MIG-<uuid>", "0" (deviceIDStrategy: index)
    device: str  # raw without the replica suffix: what NVML calls the device (UUID) or its index
    replica: int | None  # the time-slicing / MPS replica number; None for a device that is not replicated

    @property
    def kind(self) -> str:
        """``"gpu-uuid"``, ``"mig-uuid"`` (both MIG UUID forms: ``MIG-<uuid>`` and the pre-R470
        ``MIG-GPU-<uuid>/<gi>/<ci>``), ``"index"`` (``"0"``, or ``"0:1"`` for a MIG device by index), or
        ``"other"``."""
        if self.device.startswith("GPU-"):
            return "gpu-uuid"
        if self.device.startswith("MIG-"):
            return "mig-uuid"
        if all(part.isdigit() for part in self.device.split(":")):
            return "index"
        return "other"


@dataclass(frozen=True)
class PodGpuAllocation:
    """GPU devices of one resource allocated to one container, from the kubelet."""

    namespace: str
    pod: str
    container: str
    resource_name: str  # e.g. "nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-1g.10gb"
    device_ids: tuple[DeviceId, ...]


class NodeSplit(NamedTuple):
    """Allocations split by whether their devices are on this node (see :func:`split_by_node`)."""

    on_node: tuple[PodGpuAllocation, ...]
    not_on_node: tuple[PodGpuAllocation, ...]


def parse_device_id(raw: str) -> DeviceId:
    """Split ``"GPU-<uuid>::3"`` into device ``"GPU-<uuid>"`` and replica 3; an id without a decimal replica
    suffix is a device of its own (replica ``None``), kept whole rather than guessed at."""
    device, separator, suffix = raw.rpartition(REPLICA_SEPARATOR)
    if separator and device and suffix.isdigit():
        return DeviceId(raw=raw, device=device, replica=int(suffix))
    return DeviceId(raw=raw, device=raw, replica=None)


def is_gpu_resource(resource_name: str, patterns: Iterable[str] = DEFAULT_GPU_RESOURCE_PATTERNS) -> bool:
    """Whether a kubelet resource name is a GPU resource, by fnmatch patterns (case-sensitive, as
    Kubernetes resource names are)."""
    return any(fnmatch.fnmatchcase(resource_name, pattern) for pattern in patterns)


def split_by_node(allocations: Iterable[PodGpuAllocation], node_device_ids: Iterable[str]) -> NodeSplit:
    """Split allocations into those whose devices are on this node and the rest.

    ``node_device_ids`` are what this node's NVML reports: GPU UUIDs, MIG device UUIDs, and, where the
    device plugin runs with ``deviceIDStrategy: index``, the indices as strings. A device id matches on its
    device part (replica suffix dropped), exactly. An allocation with devices on both sides comes back as
    two records, one on each side, so that nothing is lost and nothing counted twice."""
    known = frozenset(node_device_ids)
    on_node: list[PodGpuAllocation] = []
    not_on_node: list[PodGpuAllocation] = []
    for allocation in allocations:
        here = tuple(d for d in allocation.device_ids if d.device in known)
        elsewhere = tuple(d for d in allocation.device_ids if d.device not in known)
        if here:
            on_node.append(_with_devices(allocation, here))
        if elsewhere:
            not_on_node.append(_with_devices(allocation, elsewhere))
    return NodeSplit(tuple(on_node), tuple(not_on_node))


def _with_devices(allocation: PodGpuAllocation, device_ids: tuple[DeviceId, ...]) -> PodGpuAllocation:
    if device_ids == allocation.device_ids:
        return allocation
    return PodGpuAllocation(allocation.namespace, allocation.pod, allocation.container,
                            allocation.resource_name, device_ids)


# ---------------------------------------------------------------------------------------------------------
# The schema: a subset of k8s.io/kubelet/pkg/apis/podresources/v1/api.proto, field numbers as there.

_PROTO_PACKAGE = "v1"
_STRING = "string"
_MESSAGE = "message"
# message name -> ((field name, field number, kind, repeated, message type name or None), ...), as in
# k8s.io/kubelet/pkg/apis/podresources/v1/api.proto (checked against kubernetes/kubernetes at 95f08499d652,
# staging/src/k8s.io/kubelet/pkg/apis/podresources/v1/api.proto). Fields left out are skipped on decode.
_MESSAGES: dict[str, tuple[tuple[str, int, str, bool, str | None], ...]] = {
    "ListPodResourcesRequest": (),
    "ListPodResourcesResponse": (("pod_resources", 1, _MESSAGE, True, "PodResources"),),
    "PodResources": (
        ("name", 1, _STRING, False, None),
        ("namespace", 2, _STRING, False, None),
        ("containers", 3, _MESSAGE, True, "ContainerResources"),
    ),
    "ContainerResources": (
        ("name", 1, _STRING, False, None),
        ("devices", 2, _MESSAGE, True, "ContainerDevices"),
    ),
    "ContainerDevices": (
        ("resource_name", 1, _STRING, False, None),
        ("device_ids", 2, _STRING, True, None),
    ),
}


def _import_protobuf() -> tuple[Any, Any, Any]:
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError as exc:
        raise GrpcNotInstalled(_missing_message(exc)) from None
    return descriptor_pb2, descriptor_pool, message_factory


def _missing_message(exc: ImportError) -> str:
    missing = exc.name or "grpcio/protobuf"
    return (f"reading the kubelet's pod-resources API needs grpcio and protobuf ({missing} is not "
            f"installed): {INSTALL_HINT}")


def schema_file_proto() -> Any:
    """A fresh ``FileDescriptorProto`` of the messages this module reads (package ``v1``, a subset of the
    public api.proto), for :func:`message_classes`; fresh each call, so a caller may change its copy."""
    descriptor_pb2, _, _ = _import_protobuf()
    field_proto = descriptor_pb2.FieldDescriptorProto
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="wattledger/kubelet_podresources_v1_subset.proto", package=_PROTO_PACKAGE, syntax="proto3")
    kinds = {_STRING: field_proto.TYPE_STRING, _MESSAGE: field_proto.TYPE_MESSAGE}
    for message_name, fields in _MESSAGES.items():
        message = file_proto.message_type.add(name=message_name)
        for field_name, number, kind, repeated, type_name in fields:
            label = field_proto.LABEL_REPEATED if repeated else field_proto.LABEL_OPTIONAL
            field = message.field.add(name=field_name, number=number, type=kinds[kind], label=label)
            if type_name is not None:
                field.type_name = f".{_PROTO_PACKAGE}.{type_name}"
    return file_proto


def message_classes(file_proto: Any) -> dict[str, type]:
    """Message classes for every message of ``file_proto``, built in a private descriptor pool (so that
    another ``v1`` package loaded in this process, a generated kubelet client say, cannot clash)."""
    _, descriptor_pool, message_factory = _import_protobuf()
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(file_proto.SerializeToString())
    return {message.name: message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{file_proto.package}.{message.name}"))
        for message in file_proto.message_type}


@lru_cache(maxsize=1)
def _our_message_classes() -> dict[str, type]:
    return message_classes(schema_file_proto())


def _import_grpc() -> Any:
    try:
        import grpc
    except ImportError as exc:
        raise GrpcNotInstalled(_missing_message(exc)) from None
    return grpc


# ---------------------------------------------------------------------------------------------------------
# The client.


class PodResourcesClient:
    """A client of the kubelet's ``v1.PodResourcesLister`` on one Unix socket; keep one and call
    :meth:`list_gpu_allocations` as often as needed, :meth:`close` at the end (or use it as a context
    manager). Raises :class:`GrpcNotInstalled` when made without grpcio or protobuf."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET_PATH, timeout_s: float = DEFAULT_TIMEOUT_S,
                 gpu_resource_patterns: Iterable[str] = DEFAULT_GPU_RESOURCE_PATTERNS) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self._grpc = _import_grpc()
        classes = _our_message_classes()
        self.socket_path = _socket_path_of(socket_path)
        self.timeout_s = float(timeout_s)
        self.gpu_resource_patterns = tuple(gpu_resource_patterns)
        self._request_class = classes["ListPodResourcesRequest"]
        self._response_class = classes["ListPodResourcesResponse"]
        # Made on first use: a channel is cheap but owns a background thread.
        self._channel: Any = None
        self._list: Any = None

    def __enter__(self) -> PodResourcesClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; the next call opens a new one."""
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._list = None

    def list_pod_resources(self) -> Any:
        """The raw ``ListPodResourcesResponse`` (the message declared above), or a
        :class:`PodResourcesError`."""
        # Checked before dialling: for a missing or forbidden path gRPC would only say "failed to connect
        # to all addresses". One lstat, no connection.
        try:
            os.lstat(self.socket_path)
        except OSError as exc:
            raise _error_for_os_error(self.socket_path, exc) from None
        try:
            return self._list_method()(self._request_class(), timeout=self.timeout_s, wait_for_ready=False)
        except self._grpc.RpcError as exc:
            raise self._error_for(exc) from None

    def list_gpu_allocations(self) -> tuple[PodGpuAllocation, ...]:
        """Every container's GPU devices on this node, one record per (container, GPU resource), in the
        kubelet's order; containers without GPU resources are left out."""
        return tuple(_gpu_allocations(self.list_pod_resources(), self.gpu_resource_patterns))

    def _list_method(self) -> Any:
        if self._list is None:
            self._channel = self._grpc.insecure_channel(
                f"unix://{self.socket_path}",
                options=[("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)])
            self._list = self._channel.unary_unary(
                LIST_METHOD, request_serializer=self._request_class.SerializeToString,
                response_deserializer=self._response_class.FromString)
        return self._list

    def _error_for(self, exc: Any) -> PodResourcesError:
        codes = self._grpc.StatusCode
        code, details = exc.code(), _one_line(exc.details())
        where = f"kubelet pod-resources {LIST_METHOD} at {self.socket_path}"
        if code == codes.DEADLINE_EXCEEDED:
            return KubeletTimeout(f"{where} did not answer within {self.timeout_s:g} s")
        if code == codes.UNIMPLEMENTED:
            return KubeletUnimplemented(
                f"{where}: not served (a kubelet before Kubernetes 1.20 serves only v1alpha1, which this "
                f"agent does not read)")
        if code == codes.UNAVAILABLE:
            return _diagnose_unreachable(self.socket_path, details)
        return KubeletCallFailed(f"{where} failed: {code.name}: {details}")


def list_gpu_allocations(socket_path: str = DEFAULT_SOCKET_PATH, timeout_s: float = DEFAULT_TIMEOUT_S,
                         gpu_resource_patterns: Iterable[str] = DEFAULT_GPU_RESOURCE_PATTERNS,
                         ) -> tuple[PodGpuAllocation, ...]:
    """One ``List`` call on a fresh channel (for a command-line check; the sampler keeps a client)."""
    with PodResourcesClient(socket_path, timeout_s, gpu_resource_patterns) as client:
        return client.list_gpu_allocations()


def _socket_path_of(socket_path: str) -> str:
    """Accept a path or a ``unix://`` / ``unix:`` target, as the kubelet's own flags do; return the path."""
    for prefix in ("unix://", "unix:"):
        if socket_path.startswith(prefix):
            socket_path = socket_path[len(prefix):]
            break
    if not socket_path:
        raise ValueError("the kubelet pod-resources socket path is empty")
    return os.path.abspath(socket_path)


def _gpu_allocations(response: Any, patterns: tuple[str, ...]) -> Iterable[PodGpuAllocation]:
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if devices.device_ids and is_gpu_resource(devices.resource_name, patterns):
                    yield PodGpuAllocation(
                        namespace=pod.namespace, pod=pod.name, container=container.name,
                        resource_name=devices.resource_name,
                        device_ids=tuple(parse_device_id(raw) for raw in devices.device_ids))


def _diagnose_unreachable(socket_path: str, grpc_details: str) -> PodResourcesError:
    """gRPC says only UNAVAILABLE; find out why by looking at the file and connecting once ourselves
    (only on this failure path: the normal path never opens a second connection)."""
    try:
        if not stat.S_ISSOCK(os.stat(socket_path).st_mode):
            return KubeletNotListening(f"kubelet pod-resources socket {socket_path} is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)  # seconds; a listening socket accepts into its backlog at once
            probe.connect(socket_path)
    except OSError as exc:
        return _error_for_os_error(socket_path, exc)
    return KubeletCallFailed(
        f"kubelet pod-resources socket {socket_path}: gRPC could not reach the kubelet: {grpc_details}")


def _error_for_os_error(socket_path: str, exc: OSError) -> PodResourcesError:
    where = f"kubelet pod-resources socket {socket_path}"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return KubeletSocketAbsent(
            f"no {where}: on Kubernetes, mount the host's {os.path.dirname(socket_path)} into the agent "
            f"(hostPath, read-only)")
    if isinstance(exc, PermissionError):
        return KubeletPermissionDenied(
            f"{where}: permission denied for uid {os.geteuid()} (the kubelet's socket is root's: run the "
            f"agent as root)")
    if isinstance(exc, ConnectionRefusedError):
        return KubeletNotListening(f"{where}: nothing listens on it (the kubelet is down or restarting)")
    return KubeletCallFailed(f"{where}: {type(exc).__name__}: {_one_line(str(exc))}")


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())
