"""From a host PID on a GPU to its owner's labels: a pod, a systemd unit, a container, or a command.

Issue 13, item 2 ("from process to owner"), the part that turns what probes/process_owner.py,
probes/cgroups.py and probes/pod_resources.py read into the labels of the per-owner series
(``namespace, pod, container, group``, docs/attribution.md). Two resolvers share one protocol,
:class:`OwnerResolver`: :class:`ScriptedOwnerResolver` for the mock's scripted processes, and
:class:`ProcOwnerResolver` for a real node.

How :class:`ProcOwnerResolver` places a PID, in order (first that applies wins):

1. **No host PIDs, no answer.** NVML reports host PIDs (probes/process_owner.py); when the agent's /proc does
   not show the host's PID namespace (``PidView.shows_host_pids`` not True: a pod without ``hostPID: true``),
   every ``resolve`` is None and ``status()`` says why in one line. Guessing would name an unrelated process.
2. **The process.** ``(pid, start ticks)`` from ``/proc/PID/stat`` on every call (a PID reused by a new
   process has another start time), the rest (comm, cgroup) read once per such pair and cached. A PID that
   is gone, or a zombie, is None.
3. **A pod** (its cgroup names a pod UID). The kubelet's pod-resources API names pods and containers but
   carries no pod UID, so the join is on the GPU: with ``gpu_uuid`` given (the GPU, or MIG device, NVML
   listed the process on) and exactly one container on this node allocated that device, that container is
   the owner (kind "pod", all three names). Needs: the kubelet socket mounted, the device plugin reporting
   UUIDs (``deviceIDStrategy: uuid``, its default). A process in a MIG instance joins only when the caller
   passes the MIG device's UUID (the allocation names ``MIG-...``, not the parent ``GPU-...``).
4. **A pod on a shared device** (time-slicing or MPS replicas held by several containers), or with no GPU
   given, or no kubelet: the pod's name from ``/proc/PID/root/etc/hostname`` and its namespace from
   ``/proc/PID/root/var/run/secrets/kubernetes.io/serviceaccount/namespace``, read inside the process's own
   root (symlinks resolved against that root, never the agent's: a container controls its own files). The
   container name is then the one container of that pod holding the device, if the kubelet says so, else
   "". Needs: root (ptrace access to the process) and hostPID. Misses: a pod that sets ``spec.hostname``
   names itself (its hostname is not its name; the kubelet's list corrects this only when the namespace
   holds a matching pod), ``hostNetwork`` pods (their hostname is the node's: detected by the UTS namespace,
   and not used), pods with ``automountServiceAccountToken: false`` (no namespace file). A pod that none
   of this names keeps kind "pod" with its UID as ``group``, so two such pods are not merged.
5. **Off Kubernetes**: a docker or podman container -> kind "container", ``group`` the container's short
   id (the 12 hex digits ``docker ps`` shows; the name lives in the runtime's state, which the agent does
   not read); a systemd unit -> kind "unit", ``group`` the unit (``vllm.service``), except PID 1's
   ``init.scope`` and logind's ``session-N.scope`` (a login, not a workload: a user's job there is
   grouped by its command); else kind "command", ``group`` the comm.

The kubelet is asked every ``kubelet_interval_s`` from ``refresh`` (called every tick), on a thread of its
own so that a slow kubelet never holds the tick up; a failed call keeps the last good answer for
:data:`KUBELET_STALE_AFTER_INTERVALS` intervals (a kubelet restart), then forgets it (a pod that ended
meanwhile must not keep a GPU). :meth:`ProcOwnerResolver.pods_without_processes` lists the pods the
kubelet allocated GPUs on this node to that no resolved process belonged to recently: who holds idle GPUs.

No I/O at import, no torch, no gRPC import here (the caller makes the :class:`PodResourcesClient`).
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from wattledger.probes.errors import one_line
from wattledger.probes.pod_resources import (
    KubeletSocketAbsent,
    PodGpuAllocation,
    PodResourcesClient,
    PodResourcesError,
    split_by_node,
)
from wattledger.probes.process_owner import (
    PidView,
    ProcessOwner,
    ProcessOwnerError,
    ProcessOwnerReader,
    parse_namespace_link,
    read_pid_view,
)

__all__ = [
    "KIND_COMMAND",
    "KIND_CONTAINER",
    "KIND_OTHER",
    "KIND_POD",
    "KIND_UNIT",
    "KIND_WORKLOAD",
    "KUBELET_STALE_AFTER_INTERVALS",
    "OwnerLabels",
    "OwnerResolver",
    "ProcOwnerResolver",
    "ScriptedOwnerResolver",
    "read_file_in_root",
]

KIND_POD = "pod"
KIND_UNIT = "unit"
KIND_CONTAINER = "container"
KIND_COMMAND = "command"
KIND_WORKLOAD = "workload"
KIND_OTHER = "other"
_KINDS = frozenset({KIND_POD, KIND_UNIT, KIND_CONTAINER, KIND_COMMAND, KIND_WORKLOAD, KIND_OTHER})
_SCRIPTED_LABEL_KEYS = frozenset({"kind", "namespace", "pod", "container", "group", "command"})

NS_PER_S = 1_000_000_000
# A failed kubelet call keeps the last good answer this many intervals (30 s at the 10 s default): long
# enough to ride out a kubelet restart, short enough that a pod deleted meanwhile does not keep its GPU.
KUBELET_STALE_AFTER_INTERVALS = 3
# A pod counts as having processes when one of them was resolved within this many kubelet intervals: NVML
# lists processes about once a second, so one interval without any is already a clear "idle".
_SEEN_WINDOW_INTERVALS = 2
# Docker's short container id is the first 12 hex digits of the 64 (docker/cli stringid.TruncateID).
_SHORT_ID_DIGITS = 12
# The files of a pod read inside its root, and the most bytes read of each (a hostname is at most 64 bytes
# with its newline, HOST_NAME_MAX; a namespace name at most 63, RFC 1123 label): more is not ours to read.
_HOSTNAME_PATH = "etc/hostname"
_NAMESPACE_PATH = "var/run/secrets/kubernetes.io/serviceaccount/namespace"
_MAX_NAME_FILE_BYTES = 256
# Linux follows at most 40 symlinks in one lookup (MAXSYMLINKS, include/linux/namei.h); so do we.
_MAX_SYMLINK_HOPS = 40
# The kubelet truncates a pod's hostname to 63 characters (pkg/kubelet/kubelet_pods.go,
# truncatePodHostnameIfNeeded), so a longer pod name shows as its first 63 characters.
_MAX_HOSTNAME_CHARS = 63
# Kubernetes names (k8s.io/apimachinery validation): a namespace is an RFC 1123 label; a pod name a DNS
# subdomain (lowercase alphanumerics, '-' and '.', at most 253). Anything else read from a container's
# files is not exported as a label.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# logind's session scopes and PID 1's scope hold logins and the init system, not workloads.
_NOT_WORKLOAD_UNIT = re.compile(r"init\.scope|session-[A-Za-z0-9]+\.scope")

_PodKey = tuple[str, str]  # (namespace, pod)
_ContainerKey = tuple[str, str, str]  # (namespace, pod, container)


@dataclass(frozen=True)
class OwnerLabels:
    """Who owns a process: the labels of its per-owner series, and its command for the info metric.

    ``command`` does not take part in equality or hashing: two processes of one pod (``python3`` and
    ``nccl-worker``) are one owner, so an ``OwnerLabels`` is usable as the attribution model's owner key."""

    kind: str  # "pod" | "unit" | "container" | "command" | "workload" | "other"
    namespace: str = ""  # Kubernetes only
    pod: str = ""
    container: str = ""
    group: str = ""  # systemd unit, docker/podman container id, command name, workload name
    command: str = field(default="", compare=False)  # the process's comm (info metric only)


class OwnerResolver(Protocol):
    def resolve(self, pid: int, gpu_uuid: str | None = None) -> OwnerLabels | None:
        """The owner of host PID ``pid`` (on GPU or MIG device ``gpu_uuid`` when known); None: not visible
        or gone."""
        ...

    def refresh(self, now_ns: int) -> None:
        """Called every tick (monotonic ns); does its slow work on its own cadence."""
        ...

    def status(self) -> str | None:
        """None while owners can be found; else one line saying why not (``wattledger_attribution_status``'s
        reason)."""
        ...


# ---------------------------------------------------------------------------------------------------------
# The mock's resolver.


def labels_from_mapping(labels: Mapping[str, str], command: str = "") -> OwnerLabels:
    """A scripted process's plain labels -> :class:`OwnerLabels`. The kind is ``labels["kind"]`` when
    given, else "pod" with a pod, else "unit" for a ``group`` that is a systemd unit name (``.service``,
    ``.scope``), else "command". Raises ValueError (one line) for a key or kind it does not know."""
    unknown = sorted(set(labels) - _SCRIPTED_LABEL_KEYS)
    if unknown:
        raise ValueError(f"owner labels may only be {sorted(_SCRIPTED_LABEL_KEYS)}, got {unknown}")
    pod, group = labels.get("pod", ""), labels.get("group", "")
    kind = labels.get("kind") or (KIND_POD if pod else KIND_UNIT if group.endswith((".service", ".scope"))
                                  else KIND_COMMAND)
    if kind not in _KINDS:
        raise ValueError(f"owner kind must be one of {sorted(_KINDS)}, got {kind!r}")
    return OwnerLabels(kind=kind, namespace=labels.get("namespace", ""), pod=pod,
                       container=labels.get("container", ""), group=group,
                       command=labels.get("command", command))


class ScriptedOwnerResolver:
    """Owners the mock's script declares: pid -> labels (``MockGpuBackend.scripted_owner_labels()``)."""

    def __init__(self, labels_by_pid: Mapping[int, Mapping[str, str]]) -> None:
        self._by_pid: dict[int, OwnerLabels] = {}
        for pid, labels in labels_by_pid.items():
            try:
                self._by_pid[int(pid)] = labels_from_mapping(labels)
            except ValueError as exc:
                raise ValueError(f"scripted process pid {pid}: {exc}") from None

    def resolve(self, pid: int, gpu_uuid: str | None = None) -> OwnerLabels | None:
        return self._by_pid.get(pid)

    def refresh(self, now_ns: int) -> None:
        return None

    def status(self) -> str | None:
        return None

    def describe(self) -> str:
        return "owners from the mock's scripted processes"

    def pods_without_processes(self) -> tuple[PodGpuAllocation, ...]:
        return ()


# ---------------------------------------------------------------------------------------------------------
# Reading a file inside a process's root.


def _split(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def _open_dirs(root_fd: int, components: list[str]) -> int:
    """A descriptor of ``root/components...``, each step a real directory (no symlink followed)."""
    fd = os.dup(root_fd)
    try:
        for name in components:
            next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _resolve_in_root(root_fd: int, path: str) -> list[str]:
    """``path`` as components of real entries under ``root_fd``, symlinks resolved against that root (an
    absolute target restarts at it, ``..`` stops at it): what openat2's RESOLVE_IN_ROOT does, which Python's
    ``os`` lacks. Raises OSError (ELOOP past :data:`_MAX_SYMLINK_HOPS`)."""
    pending, resolved, hops = deque(_split(path)), [], 0
    while pending:
        name = pending.popleft()
        if name == ".":
            continue
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        parent_fd = _open_dirs(root_fd, resolved)
        try:
            if not stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                resolved.append(name)
                continue
            target = os.readlink(name, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
        hops += 1
        if hops > _MAX_SYMLINK_HOPS:
            raise OSError(40, "too many levels of symbolic links", path)  # ELOOP
        if target.startswith("/"):
            resolved = []
        pending.extendleft(reversed(_split(target)))
    return resolved


def read_file_in_root(root: str, path: str, max_bytes: int = _MAX_NAME_FILE_BYTES) -> bytes:
    """At most ``max_bytes`` of the regular file ``path`` inside the directory ``root`` (``/proc/PID/root``),
    resolving every symlink inside ``root``: a container may make its ``/etc/hostname`` a link to
    ``/etc/shadow``, which must name the container's file, never the agent's. Raises OSError."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        components = _resolve_in_root(root_fd, path)
        if not components:
            raise IsADirectoryError(21, "is a directory", path)
        dir_fd = _open_dirs(root_fd, components[:-1])
        try:
            fd = os.open(components[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device would block or mean nothing
                raise OSError(22, "not a regular file", path)
            return os.read(fd, max_bytes)
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)


def _name_from_file(raw: bytes, pattern: re.Pattern[str]) -> str | None:
    """The one name a file holds (one line, whitespace trimmed), if it is a valid Kubernetes name."""
    text = raw.decode("ascii", "replace").strip()
    return text if pattern.fullmatch(text) else None


# ---------------------------------------------------------------------------------------------------------
# What the kubelet said, indexed for the join.


@dataclass(frozen=True)
class _KubeletView:
    """The kubelet's GPU allocations on this node, indexed: device -> containers; pod -> its GPU
    containers by device; (namespace, hostname) -> pod names (hostnames are pod names cut to 63)."""

    on_node: tuple[PodGpuAllocation, ...]
    not_on_node: tuple[PodGpuAllocation, ...]
    containers_by_device: Mapping[str, frozenset[_ContainerKey]]
    pods_by_hostname: Mapping[_PodKey, frozenset[str]]
    fetched_ns: int

    @classmethod
    def build(cls, on_node: tuple[PodGpuAllocation, ...], not_on_node: tuple[PodGpuAllocation, ...],
              fetched_ns: int) -> _KubeletView:
        by_device: dict[str, set[_ContainerKey]] = {}
        by_hostname: dict[_PodKey, set[str]] = {}
        for allocation in on_node:
            key = (allocation.namespace, allocation.pod, allocation.container)
            for device_id in allocation.device_ids:
                by_device.setdefault(device_id.device, set()).add(key)
            hostname = allocation.pod[:_MAX_HOSTNAME_CHARS]
            by_hostname.setdefault((allocation.namespace, hostname), set()).add(allocation.pod)
        return cls(on_node, not_on_node, {k: frozenset(v) for k, v in by_device.items()},
                   {k: frozenset(v) for k, v in by_hostname.items()}, fetched_ns)

    def sole_container(self, gpu_uuid: str | None, pod: _PodKey | None = None) -> _ContainerKey | None:
        """The one container allocated ``gpu_uuid`` (of pod ``pod`` when given), else None."""
        if gpu_uuid is None:
            return None
        holders = self.containers_by_device.get(gpu_uuid, frozenset())
        if pod is not None:
            holders = frozenset(key for key in holders if key[:2] == pod)
        return next(iter(holders)) if len(holders) == 1 else None

    def pod_name(self, namespace: str, hostname: str) -> str | None:
        """The pod of ``namespace`` whose hostname is ``hostname``, when exactly one is."""
        names = self.pods_by_hostname.get((namespace, hostname[:_MAX_HOSTNAME_CHARS]), frozenset())
        return next(iter(names)) if len(names) == 1 else None


@dataclass
class _KubeletPoll:
    """The one call to the kubelet in flight (on its thread), and what it brought back."""

    thread: threading.Thread | None = None
    result: tuple[tuple[PodGpuAllocation, ...], tuple[PodGpuAllocation, ...]] | None = None
    error: str | None = None
    error_kind: type | None = None
    done: bool = False


# ---------------------------------------------------------------------------------------------------------
# The resolver of a real node.


class ProcOwnerResolver:
    """PID -> :class:`OwnerLabels` from ``procfs_root`` and the kubelet (see the module docstring).

    ``pod_resources``: a kubelet client, or None off Kubernetes (or with ``kubelet_socket: ""``);
    ``node_gpu_uuids``: this node's GPU and MIG UUIDs (the devices NVML reports), to keep the kubelet's
    allocations of this node; ``clock_ns``: monotonic ns, as ``refresh`` is given; ``kubelet_interval_s``:
    seconds between kubelet calls. ``kubelet_in_background=False`` calls the kubelet in ``refresh`` itself
    (tests; a caller with a thread of its own)."""

    def __init__(self, procfs_root: str = "/proc", pod_resources: PodResourcesClient | None = None,
                 node_gpu_uuids: Callable[[], set[str]] = set, clock_ns: Callable[[], int] | None = None,
                 kubelet_interval_s: float = 10.0, *, kubelet_in_background: bool = True,
                 clk_tck: int | None = None) -> None:
        if not kubelet_interval_s > 0:
            raise ValueError(f"kubelet_interval_s must be > 0 seconds, got {kubelet_interval_s!r}")
        self.procfs_root = procfs_root
        self._reader = ProcessOwnerReader(procfs_root, clk_tck)
        self._kubelet = pod_resources
        self._node_gpu_uuids = node_gpu_uuids
        self._clock_ns = clock_ns or time.monotonic_ns
        self._interval_ns = int(kubelet_interval_s * NS_PER_S)
        self._in_background = kubelet_in_background
        self._lock = threading.Lock()
        self._pid_view: PidView | None = None
        self._owners: dict[tuple[int, int], ProcessOwner] = {}
        self._identity_seen_ns: dict[tuple[int, int], int] = {}
        self._pod_files: dict[str, _PodKey | None] = {}  # pod UID -> names from its files
        self._pod_seen_ns: dict[_PodKey, int] = {}
        self._view: _KubeletView | None = None
        self._poll = _KubeletPoll()
        self._next_due_ns: int | None = None
        self._kubelet_error: str | None = None
        self._kubelet_error_kind: type | None = None
        self._pods_seen = False  # a process in a pod was resolved: this is a Kubernetes node
        self._last_read_error: str | None = None

    # -- the host-PID gate -------------------------------------------------------------------------------

    @property
    def pid_view(self) -> PidView:
        """Whose PIDs ``procfs_root`` shows, read once (it is fixed for the agent's life)."""
        if self._pid_view is None:
            self._pid_view = read_pid_view(self.procfs_root)
        return self._pid_view

    def status(self) -> str | None:
        """None while owners can be found; else one line why not: the PIDs cannot be looked up, or the
        kubelet cannot be read (except a missing socket while no process in a pod was seen: a node
        without Kubernetes)."""
        view = self.pid_view
        if view.shows_host_pids is not True:
            return view.detail
        with self._lock:
            error, pods_seen, kind = self._kubelet_error, self._pods_seen, self._kubelet_error_kind
        if error is not None and (pods_seen or not issubclass(kind, KubeletSocketAbsent)):
            return f"pods named from their own files only (no container names, no idle holders): {error}"
        return None

    def describe(self) -> str:
        """One line for the agent's log: where owners come from, or why they cannot be found."""
        problem = self.status()
        if problem is not None:
            return problem
        if self._kubelet is None:
            return "owners from /proc (kubelet not asked: pods named from their own files)"
        if self._kubelet_error is not None:  # no socket, no pod seen: a node without Kubernetes, as expected
            return "owners from /proc (no kubelet socket: not a Kubernetes node)"
        return "owners from /proc and the kubelet's pod-resources API"

    # -- resolve ------------------------------------------------------------------------------------------

    def resolve(self, pid: int, gpu_uuid: str | None = None) -> OwnerLabels | None:
        """The owner of host PID ``pid``, on GPU or MIG device ``gpu_uuid`` when the caller knows it."""
        if self.pid_view.shows_host_pids is not True:
            return None
        owner = self._process(pid)
        if owner is None:
            return None
        now_ns = self._clock_ns()
        self._identity_seen_ns[owner.identity] = now_ns
        if owner.pod_uid is None:
            return _host_labels(owner)
        labels = self._pod_labels(owner, gpu_uuid)
        with self._lock:
            self._pods_seen = True
            if labels.pod:
                self._pod_seen_ns[(labels.namespace, labels.pod)] = now_ns
        return labels

    def _process(self, pid: int) -> ProcessOwner | None:
        """The cached process of ``pid`` when its start time still matches, else a fresh read."""
        try:
            start_ticks = self._reader.start_ticks(pid)
            if start_ticks is None:
                return None
            owner = self._owners.get((pid, start_ticks))
            if owner is None:
                owner = self._reader.read(pid)
                if owner is None:
                    return None
                self._owners[owner.identity] = owner
            return owner
        except ProcessOwnerError as exc:
            # hidepid, a malformed file: this PID stays unplaced (its energy unattributed), the others go on.
            self._last_read_error = str(exc)
            return None

    def _pod_labels(self, owner: ProcessOwner, gpu_uuid: str | None) -> OwnerLabels:
        view = self._current_view()
        if view is not None:
            sole = view.sole_container(gpu_uuid)
            if sole is not None:
                return OwnerLabels(KIND_POD, *sole, command=owner.comm)
        names = self._names_from_files(owner)
        if names is None:
            return OwnerLabels(KIND_POD, group=owner.pod_uid or "", command=owner.comm)
        namespace, pod = names
        container = ""
        if view is not None:
            pod = view.pod_name(namespace, pod) or pod
            sole = view.sole_container(gpu_uuid, (namespace, pod))
            container = sole[2] if sole is not None else ""
        return OwnerLabels(KIND_POD, namespace, pod, container, command=owner.comm)

    def _names_from_files(self, owner: ProcessOwner) -> _PodKey | None:
        """(namespace, hostname) from the pod's own files, read once per pod UID (all its containers share
        them); None when unreadable, invalid, or the hostname is the node's (``hostNetwork``)."""
        uid = owner.pod_uid or ""
        if uid in self._pod_files:
            return self._pod_files[uid]
        root = os.path.join(self.procfs_root, str(owner.pid), "root")
        try:
            namespace = _name_from_file(read_file_in_root(root, _NAMESPACE_PATH), _DNS_LABEL)
            hostname = None if self._shares_host_uts(owner.pid) else _name_from_file(
                read_file_in_root(root, _HOSTNAME_PATH), _DNS_SUBDOMAIN)
        except FileNotFoundError:
            if not os.path.isdir(root):
                return None  # the process is gone: ask again through its pod's next process
            namespace = hostname = None  # no such file in the pod (automountServiceAccountToken: false)
        except OSError:
            return None  # no ptrace access, say: not cached, tried again on the next call
        names = (namespace, hostname) if namespace and hostname else None
        self._pod_files[uid] = names
        return names

    def _shares_host_uts(self, pid: int) -> bool:
        """Whether the process is in PID 1's UTS namespace (a ``hostNetwork`` pod: its hostname is the
        node's); False when either link cannot be read."""
        try:
            mine = parse_namespace_link(os.readlink(os.path.join(self.procfs_root, str(pid), "ns", "uts")), "uts")
            host = parse_namespace_link(os.readlink(os.path.join(self.procfs_root, "1", "ns", "uts")), "uts")
        except OSError:
            return False
        return mine is not None and mine == host

    # -- the kubelet --------------------------------------------------------------------------------------

    def refresh(self, now_ns: int) -> None:
        """Every tick: take in a finished kubelet call; every ``kubelet_interval_s``, forget processes not
        seen lately and start the next kubelet call (unless one is still in flight)."""
        if self._kubelet is not None:
            self._collect_poll(now_ns)
        if self._next_due_ns is not None and now_ns < self._next_due_ns:
            return
        self._next_due_ns = now_ns + self._interval_ns
        self._prune(now_ns)
        if self._kubelet is not None and self._poll.thread is None:
            self._start_poll(now_ns)

    def _start_poll(self, now_ns: int) -> None:
        poll = _KubeletPoll()
        try:
            node_devices = set(self._node_gpu_uuids())
        except Exception as exc:  # NVML lost mid-call, say: try again next interval
            poll.error, poll.error_kind, poll.done = f"this node's GPU UUIDs: {one_line(exc)}", type(exc), True
            self._poll = poll
            self._collect_poll(now_ns)
            return
        self._poll = poll
        if self._in_background:
            poll.thread = threading.Thread(target=self._call_kubelet, args=(poll, node_devices),
                                           name="wattledger-kubelet", daemon=True)
            poll.thread.start()
        else:
            self._call_kubelet(poll, node_devices)
            self._collect_poll(now_ns)

    def _call_kubelet(self, poll: _KubeletPoll, node_devices: set[str]) -> None:
        """On the kubelet thread: one List call; never raises."""
        try:
            split = split_by_node(self._kubelet.list_gpu_allocations(), node_devices)
            poll.result = (split.on_node, split.not_on_node)
        except PodResourcesError as exc:
            poll.error, poll.error_kind = str(exc), type(exc)
        except Exception as exc:  # the kubelet thread must not die silently
            poll.error, poll.error_kind = one_line(exc), type(exc)
        poll.done = True

    def _collect_poll(self, now_ns: int) -> None:
        poll = self._poll
        if not poll.done:
            return
        with self._lock:
            if poll.result is not None:
                self._view = _KubeletView.build(*poll.result, fetched_ns=now_ns)
                self._kubelet_error = self._kubelet_error_kind = None
            elif poll.error is not None:
                self._kubelet_error, self._kubelet_error_kind = poll.error, poll.error_kind
        self._poll = _KubeletPoll()

    def wait_for_kubelet(self, timeout_s: float | None = None) -> None:
        """Block until a kubelet call in flight ends (tests, shutdown); its answer is taken in at the next
        ``refresh``."""
        thread = self._poll.thread
        if thread is not None:
            thread.join(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """At shutdown: wait up to ``timeout_s`` for a kubelet call in flight (the client's own timeout
        bounds it); the client itself is the caller's to close."""
        self.wait_for_kubelet(timeout_s)

    def _current_view(self) -> _KubeletView | None:
        """The kubelet's last good answer, unless it is older than the stale limit."""
        view = self._view
        if view is None:
            return None
        if self._clock_ns() - view.fetched_ns > KUBELET_STALE_AFTER_INTERVALS * self._interval_ns:
            return None
        return view

    def _prune(self, now_ns: int) -> None:
        """Forget processes and pods not seen for a while: NVML stops listing a process when it exits."""
        horizon_ns = now_ns - _SEEN_WINDOW_INTERVALS * self._interval_ns
        for identity in [key for key, seen in self._identity_seen_ns.items() if seen < horizon_ns]:
            del self._identity_seen_ns[identity]
            self._owners.pop(identity, None)
        for identity in [key for key in self._owners if key not in self._identity_seen_ns]:
            del self._owners[identity]
        live_uids = {owner.pod_uid for owner in self._owners.values()}
        for uid in [uid for uid in self._pod_files if uid not in live_uids]:
            del self._pod_files[uid]
        with self._lock:
            for pod in [key for key, seen in self._pod_seen_ns.items() if seen < horizon_ns]:
                del self._pod_seen_ns[pod]

    # -- who holds idle GPUs ------------------------------------------------------------------------------

    def pods_without_processes(self) -> tuple[PodGpuAllocation, ...]:
        """The kubelet's GPU allocations on this node (one record per container and resource) of pods none
        of whose processes was resolved in the last :data:`_SEEN_WINDOW_INTERVALS` kubelet intervals."""
        view = self._current_view()
        if view is None:
            return ()
        horizon_ns = self._clock_ns() - _SEEN_WINDOW_INTERVALS * self._interval_ns
        with self._lock:
            busy = {pod for pod, seen in self._pod_seen_ns.items() if seen >= horizon_ns}
        return tuple(a for a in view.on_node if (a.namespace, a.pod) not in busy)

    @property
    def allocations_not_on_node(self) -> tuple[PodGpuAllocation, ...]:
        """What the kubelet allocated that this node's NVML does not report (a socket from another node, or
        a device plugin with ``deviceIDStrategy: index``): for the agent's log."""
        view = self._view
        return view.not_on_node if view is not None else ()

    @property
    def last_read_error(self) -> str | None:
        """The last /proc read that failed for another reason than the process being gone (one line)."""
        return self._last_read_error


def _host_labels(owner: ProcessOwner) -> OwnerLabels:
    """The owner of a process in no pod: a plain container, a systemd unit, or its command."""
    cgroup = owner.cgroup
    if cgroup.container_id is not None:
        return OwnerLabels(KIND_CONTAINER, group=cgroup.container_id[:_SHORT_ID_DIGITS], command=owner.comm)
    unit = cgroup.systemd_unit
    if unit is not None and not _NOT_WORKLOAD_UNIT.fullmatch(unit):
        return OwnerLabels(KIND_UNIT, group=unit, command=owner.comm)
    return OwnerLabels(KIND_COMMAND, group=owner.comm, command=owner.comm)
