"""A fake kubelet for tests: a real gRPC server on a Unix socket serving ``v1.PodResourcesLister/List``.

It speaks the wire format of ``k8s.io/kubelet/pkg/apis/podresources/v1/api.proto`` through a generic handler
(no generated code), over descriptors of its own written from that .proto, independently of the client's:
a wrong field number on either side makes the client read nothing. They include fields the client does not
declare (``ContainerResources.cpu_ids = 3``, ``ContainerDevices.topology = 3`` with ``TopologyInfo`` and
``NUMANode``), and the fake fills them: a client that choked on unknown fields would fail here as it would
against a real kubelet.

What it answers is set per test on the :class:`FakeKubelet` (one server per test module, reset between
tests):

- ``pods``: what ``List`` returns;
- ``delay_s``: wait this long before answering, or until the caller gives up (a slow kubelet that costs
  the test only the client's timeout);
- ``serves_v1 = False``: ``List`` is not registered, so gRPC itself answers UNIMPLEMENTED (a kubelet
  without the v1 API);
- ``abort_with``: answer with this gRPC status code instead (the kubelet's rate limit is
  RESOURCE_EXHAUSTED "rejected by rate limit", pkg/kubelet/apis/podresources/grpc/ratelimit.go).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


@dataclass(frozen=True)
class FakeContainer:
    """A container: its name, its devices as (resource name, device ids) pairs, exclusive CPU ids."""

    name: str
    devices: tuple[tuple[str, tuple[str, ...]], ...] = ()
    cpu_ids: tuple[int, ...] = ()
    numa_node: int = 0


@dataclass(frozen=True)
class FakePod:
    namespace: str
    name: str
    containers: tuple[FakeContainer, ...] = ()


# The fake kubelet's schema, written out on its own from the public api.proto (not derived from the client's,
# so that a wrong field number in the client fails the tests): message -> (field, number, type, repeated,
# message type). It has fields the client does not declare (cpu_ids, topology) and fills them.
_INT64, _STRING, _MESSAGE = "int64", "string", "message"
# package v1, service PodResourcesLister, rpc List: the method's full name on the wire.
LIST_METHOD = "/v1.PodResourcesLister/List"
KUBELET_V1_MESSAGES = {
    "ListPodResourcesRequest": (),
    "ListPodResourcesResponse": (("pod_resources", 1, _MESSAGE, True, "PodResources"),),
    "PodResources": (("name", 1, _STRING, False, None), ("namespace", 2, _STRING, False, None),
                     ("containers", 3, _MESSAGE, True, "ContainerResources")),
    "ContainerResources": (("name", 1, _STRING, False, None),
                           ("devices", 2, _MESSAGE, True, "ContainerDevices"),
                           ("cpu_ids", 3, _INT64, True, None)),
    "ContainerDevices": (("resource_name", 1, _STRING, False, None), ("device_ids", 2, _STRING, True, None),
                         ("topology", 3, _MESSAGE, False, "TopologyInfo")),
    "TopologyInfo": (("nodes", 1, _MESSAGE, True, "NUMANode"),),
    "NUMANode": (("ID", 1, _INT64, False, None),),
}


def kubelet_message_classes() -> dict[str, type]:
    """Message classes of :data:`KUBELET_V1_MESSAGES` (package ``v1``), in a descriptor pool of their own."""
    field_proto = descriptor_pb2.FieldDescriptorProto
    kinds = {_INT64: field_proto.TYPE_INT64, _STRING: field_proto.TYPE_STRING, _MESSAGE: field_proto.TYPE_MESSAGE}
    file_proto = descriptor_pb2.FileDescriptorProto(name="fake_kubelet/podresources_v1.proto", package="v1",
                                                    syntax="proto3")
    for message_name, fields in KUBELET_V1_MESSAGES.items():
        message = file_proto.message_type.add(name=message_name)
        for name, number, kind, repeated, type_name in fields:
            message.field.add(name=name, number=number, type=kinds[kind],
                              label=field_proto.LABEL_REPEATED if repeated else field_proto.LABEL_OPTIONAL,
                              type_name=f".v1.{type_name}" if type_name else None)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(file_proto.SerializeToString())
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"v1.{name}"))
            for name in KUBELET_V1_MESSAGES}


@dataclass
class FakeKubelet:
    """The server and what it answers; ``start`` binds ``socket_path``."""

    socket_path: str
    pods: list[FakePod] = field(default_factory=list)
    delay_s: float = 0.0
    serves_v1: bool = True
    abort_with: grpc.StatusCode | None = None
    calls: int = 0
    _server: Any = None
    _classes: dict[str, type] = field(default_factory=kubelet_message_classes)

    def reset(self) -> None:
        self.pods, self.delay_s, self.serves_v1, self.abort_with, self.calls = [], 0.0, True, None, 0

    def start(self) -> FakeKubelet:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[_Handler(self)])
        self._server.add_insecure_port(f"unix://{self.socket_path}")
        self._server.start()
        return self

    def stop(self) -> None:
        # grace 0: cancel whatever is in flight (a slow answer) instead of waiting for it.
        self._server.stop(grace=0).wait()

    def answer(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        if self.delay_s > 0:
            caller_gone = threading.Event()
            context.add_callback(caller_gone.set)  # runs when the RPC ends: deadline passed, cancelled
            caller_gone.wait(self.delay_s)
        if self.abort_with is not None:
            context.abort(self.abort_with, "rejected by rate limit")
        return self.response()

    def response(self) -> Any:
        classes = self._classes
        response = classes["ListPodResourcesResponse"]()
        for pod in self.pods:
            pod_message = response.pod_resources.add(name=pod.name, namespace=pod.namespace)
            for container in pod.containers:
                container_message = pod_message.containers.add(name=container.name)
                container_message.cpu_ids.extend(container.cpu_ids)
                for resource_name, device_ids in container.devices:
                    devices = container_message.devices.add(resource_name=resource_name)
                    devices.device_ids.extend(device_ids)
                    devices.topology.nodes.add(ID=container.numa_node)
        return response


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self._kubelet = kubelet

    def service(self, handler_call_details: Any) -> Any:
        kubelet = self._kubelet
        if handler_call_details.method != LIST_METHOD or not kubelet.serves_v1:
            return None  # gRPC answers UNIMPLEMENTED, as a kubelet without the method does
        classes = kubelet._classes
        return grpc.unary_unary_rpc_method_handler(
            kubelet.answer, request_deserializer=classes["ListPodResourcesRequest"].FromString,
            response_serializer=classes["ListPodResourcesResponse"].SerializeToString)


@contextlib.contextmanager
def running_kubelet(prefix: str, directory_mode: int | None = None) -> Iterator[FakeKubelet]:
    """A started FakeKubelet on a socket in a fresh folder under /tmp, stopped and removed afterwards.

    /tmp, not pytest's tmp_path: a short path stays below the 108-byte sun_path limit, and pytest's base
    folder is mode 0700, which a test connecting as another user cannot pass (``directory_mode`` opens it)."""
    directory = tempfile.mkdtemp(prefix=prefix)
    if directory_mode is not None:
        os.chmod(directory, directory_mode)
    kubelet = FakeKubelet(os.path.join(directory, "kubelet.sock")).start()
    try:
        yield kubelet
    finally:
        kubelet.stop()
        shutil.rmtree(directory, ignore_errors=True)
