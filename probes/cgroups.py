"""Who owns a process, read from the text of its ``/proc/PID/cgroup``: pure parsing, no I/O.

For issue 13 item 2 (from process to owner): NVML names the processes on a GPU by host PID; this module turns
the cgroup file of such a PID into its owner: a Kubernetes pod (UID, QoS class) and container (runtime,
container id), or off Kubernetes a container of a plain runtime (docker, podman) or a systemd unit.
``probes/process_owner.py`` reads the file; this module never opens one, never raises on any text (a
hypothesis test holds it to that), and gives an empty :class:`CgroupOwner` for a process it cannot place
(the wiring then groups by command name).

What the wiring needs from it: :func:`owner_from_cgroup` per PID (cached by text: every process of a container
has the same file); the owner is then ``pod_uid`` (and ``container_id``), else ``(runtime, container_id)``,
else ``systemd_unit``, else the command name. The kubelet's pod-resources API (``PodResources``: name,
namespace, containers by name with their devices) carries neither pod UIDs nor container ids, so turning
``pod_uid`` into a namespace and pod name needs one more source (the kubelet's ``/pods``, the CRI runtime's
labels, or the GPU device ids when a GPU is one container's alone): that choice is the wiring's.

The file (man 7 cgroups, "/proc/[pid]/cgroup"): one line per hierarchy, ``hierarchy-ID:controller-list:
cgroup-path``. cgroup v1 has a line per mounted hierarchy (``4:memory:/...``, ``1:name=systemd:/...``);
cgroup v2 has the one line ``0::/...``; systemd's hybrid mode has both. The path can hold ``:`` (containerd
1.4 wrote ``kubepods-...slice:cri-containerd:<id>`` as a path), so a line is split at its first two colons
only. A v2 path ends in `` (deleted)`` when the cgroup was removed (kernel/cgroup/cgroup.c,
proc_cgroup_show). A reader in a cgroup namespace (a container: the default for Kubernetes pods on cgroup
v2) sees paths relative to its own cgroup, with leading ``..`` segments
(``0::/../../kubepods-besteffort-pod<uid>.slice/...``): those are skipped, and what is left still names
the pod and container; only the cgroupfs driver's QoS segment can be lost that way (``qos`` is then None).

The names, and where they come from:

- kubelet, systemd driver (pkg/kubelet/cm/cgroup_manager_linux.go, ``CgroupName.ToSystemd``): the internal
  name ``kubepods/burstable/pod<uid>`` becomes ``/kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid with - as _>.slice`` (``escapeSystemdCgroupName``: systemd reads ``-`` as
  its slice separator); a Guaranteed pod has no class segment: ``kubepods-pod<uid>.slice``.
- kubelet, cgroupfs driver (``CgroupName.ToCgroupfs``): ``/kubepods/burstable/pod<uid>``, Guaranteed
  ``/kubepods/pod<uid>``.
- Container scopes under the pod, systemd driver: containerd ``cri-containerd-<id>.scope``, CRI-O
  ``crio-<id>.scope`` and its monitor ``crio-conmon-<id>.scope`` (cri-o internal/config/cgmgr/systemd.go),
  docker (dockershim, cri-dockerd) ``docker-<id>.scope``; cgroupfs driver: the bare ``<id>`` for containerd
  and docker (the runtime is then unknown: None), ``crio-<id>`` and ``crio-conmon-<id>`` for CRI-O
  (cri-o internal/config/cgmgr/cgroupfs.go). Off Kubernetes: ``/system.slice/docker-<id>.scope`` and
  ``/docker/<id>`` (docker's two drivers), ``libpod-<id>.scope`` (podman).
- Pod UIDs are RFC 4122 UUIDs from the API server, or for static pods the kubelet's 32-hex-digit hash of
  the manifest (pkg/kubelet/config/common.go); container ids are 64 hex digits (all three runtimes).
- systemd units: the deepest ``.service`` or ``.scope`` segment (``system.slice/vllm.service``;
  ``user.slice/user-1000.slice/user@1000.service/app.slice/x.scope`` gives ``x.scope``); slices hold no
  processes of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "CgroupLine",
    "CgroupOwner",
    "QOS_BESTEFFORT",
    "QOS_BURSTABLE",
    "QOS_GUARANTEED",
    "RUNTIME_CONTAINERD",
    "RUNTIME_CRIO",
    "RUNTIME_DOCKER",
    "RUNTIME_PODMAN",
    "owner_from_cgroup",
    "owner_from_path",
    "parse_cgroup_lines",
]

QOS_GUARANTEED = "guaranteed"
QOS_BURSTABLE = "burstable"
QOS_BESTEFFORT = "besteffort"

RUNTIME_CONTAINERD = "containerd"
RUNTIME_CRIO = "cri-o"
RUNTIME_DOCKER = "docker"
RUNTIME_PODMAN = "podman"

# Scope and cgroup name prefixes -> runtime (see the module docstring for where each comes from).
_RUNTIME_OF_PREFIX = {
    "cri-containerd": RUNTIME_CONTAINERD,
    "crio": RUNTIME_CRIO,
    "docker": RUNTIME_DOCKER,
    "libpod": RUNTIME_PODMAN,
}

_HEX = "[0-9a-fA-F]"


def _uid_pattern(separator: str) -> str:
    """A pod UID: a UUID with ``separator`` between its groups, or a static pod's 32 hex digits."""
    groups = separator.join(f"{_HEX}{{{width}}}" for width in (8, 4, 4, 4, 12))
    return f"{groups}|{_HEX}{{32}}"


_UID = _uid_pattern("-")
_SYSTEMD_UID = _uid_pattern("_")  # the kubelet's systemd driver writes the UUID's dashes as underscores
_CONTAINER_ID = r"[0-9a-f]{64}"

# kubepods-pod<uid>.slice, kubepods-burstable-pod<uid>.slice, kubepods-besteffort-pod<uid>.slice
_SYSTEMD_POD = re.compile(rf"kubepods(?:-(burstable|besteffort))?-pod({_SYSTEMD_UID})\.slice")
_CGROUPFS_POD = re.compile(rf"pod({_UID})")
# <prefix>[-conmon]-<id>[.scope]: the scope of a container (or of CRI-O's / podman's monitor, conmon).
_PREFIXED_CONTAINER = re.compile(rf"(cri-containerd|crio|docker|libpod)(-conmon)?-({_CONTAINER_ID})(?:\.scope)?")
_BARE_CONTAINER = re.compile(_CONTAINER_ID)
# containerd 1.4 with the systemd cgroup driver but cgroupfs paths: "<pod slice>:cri-containerd:<id>".
_COLON_CONTAINER = re.compile(rf"([^:]+\.slice):(cri-containerd|crio|docker):({_CONTAINER_ID})")
# systemd.unit(5): a unit name is ASCII letters, digits, ":", "-", "_", ".", "\\" and "@" (templates), so a
# unit read from any cgroup path is a safe label value.
_UNIT = re.compile(r"[A-Za-z0-9:_.\\@-]+\.(?:service|scope)")
_QOS_SEGMENTS = {"burstable": QOS_BURSTABLE, "besteffort": QOS_BESTEFFORT}
_DELETED = " (deleted)"
_MAX_HIERARCHY_DIGITS = 10  # hierarchy ids are small ints; a longer token is not a cgroup line


@dataclass(frozen=True, slots=True)
class CgroupLine:
    """One line of /proc/PID/cgroup. ``controllers`` is empty for the v2 line (``0::/path``); v1 names
    them (``("cpu", "cpuacct")``, ``("name=systemd",)``)."""

    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str

    @property
    def unified(self) -> bool:
        """The cgroup v2 line (hierarchy 0, no controllers)."""
        return self.hierarchy_id == 0 and not self.controllers


@dataclass(frozen=True, slots=True)
class CgroupOwner:
    """What a process's cgroup path says about who owns it; every field None (or False) when it says nothing.

    ``pod_uid`` with dashes, as the API server writes it; ``qos`` one of the ``QOS_*`` values (None when the
    path does not show it); ``runtime`` one of the ``RUNTIME_*`` values (None under the cgroupfs driver for
    containerd and docker, which name a container's cgroup by its bare id); ``runtime_monitor`` for CRI-O's
    and podman's conmon (a process of the pod, not of the container); ``systemd_unit`` only for a process in
    neither a pod nor a container; ``cgroup_driver`` "systemd" or "cgroupfs" for a pod; ``cgroup_path`` the
    path it was read from (for logs), None when the file had no cgroup line.
    """

    pod_uid: str | None = None
    qos: str | None = None
    runtime: str | None = None
    container_id: str | None = None
    runtime_monitor: bool = False
    systemd_unit: str | None = None
    cgroup_driver: str | None = None
    cgroup_path: str | None = None

    @property
    def placed(self) -> bool:
        """Whether the path named a pod, a container or a unit (False: group the process by command name)."""
        return self.pod_uid is not None or self.container_id is not None or self.systemd_unit is not None


def parse_cgroup_lines(text: str) -> tuple[CgroupLine, ...]:
    """The lines of a /proc/PID/cgroup that have its shape, in file order; any other line is skipped.

    Never raises: the file is read from processes the agent does not control, and a line it does not
    understand must not cost the other processes their owners."""
    out: list[CgroupLine] = []
    for line in text.split("\n"):
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2 and hierarchy.isascii() and hierarchy.isdigit()
                and len(hierarchy) <= _MAX_HIERARCHY_DIGITS and path.startswith("/")):
            continue
        if path.endswith(_DELETED):
            path = path[: -len(_DELETED)]
        names = tuple(name for name in controllers.split(",") if name)
        out.append(CgroupLine(int(hierarchy), names, path))
    return tuple(out)


def _segments(path: str) -> list[str]:
    """The path's names, without empty, ``.`` and ``..`` segments (a cgroup namespace's relative paths)."""
    return [segment for segment in path.split("/") if segment not in ("", ".", "..")]


def _container(segment: str) -> tuple[str | None, str, bool] | None:
    """``(runtime, id, monitor)`` when ``segment`` names a container's cgroup, else None."""
    prefixed = _PREFIXED_CONTAINER.fullmatch(segment)
    if prefixed:
        return _RUNTIME_OF_PREFIX[prefixed.group(1)], prefixed.group(3), prefixed.group(2) is not None
    if _BARE_CONTAINER.fullmatch(segment):
        return None, segment, False
    return None


def _pod(segments: list[str], index: int, relative: bool) -> tuple[str, str | None, str] | None:
    """``(uid, qos, driver)`` when ``segments[index]`` is a pod's cgroup, else None."""
    segment = segments[index]
    systemd = _SYSTEMD_POD.fullmatch(segment)
    if systemd:
        qos = _QOS_SEGMENTS.get(systemd.group(1) or "", QOS_GUARANTEED)
        return systemd.group(2).replace("_", "-"), qos, "systemd"
    cgroupfs = _CGROUPFS_POD.fullmatch(segment)
    if cgroupfs is None:
        return None
    parent = segments[index - 1] if index > 0 else None
    if parent == "kubepods":
        return cgroupfs.group(1), QOS_GUARANTEED, "cgroupfs"
    if parent in _QOS_SEGMENTS:
        return cgroupfs.group(1), _QOS_SEGMENTS[parent], "cgroupfs"
    # Without its parents, "pod<uuid>" is still the kubelet's: a cgroup namespace cut them off.
    return (cgroupfs.group(1), None, "cgroupfs") if relative and parent is None else None


def _pod_segments(path: str) -> list[str]:
    """:func:`_segments`, with containerd 1.4's ``<pod slice>:cri-containerd:<id>`` split into the two
    segments the other runtimes write (the pod's slice, then the container's scope)."""
    out: list[str] = []
    for segment in _segments(path):
        colon = _COLON_CONTAINER.fullmatch(segment)
        out += [colon.group(1), f"{colon.group(2)}-{colon.group(3)}.scope"] if colon else [segment]
    return out


def _pod_owner(path: str) -> CgroupOwner | None:
    """The pod (and container) a path names, else None."""
    segments = _pod_segments(path)
    relative = path.startswith("/..")
    for index in range(len(segments)):
        pod = _pod(segments, index, relative)
        if pod is None:
            continue
        uid, qos, driver = pod
        container = _container(segments[index + 1]) if index + 1 < len(segments) else None
        if container is None:
            return CgroupOwner(pod_uid=uid, qos=qos, cgroup_driver=driver, cgroup_path=path)
        runtime, container_id, monitor = container
        return CgroupOwner(pod_uid=uid, qos=qos, runtime=runtime, container_id=container_id,
                           runtime_monitor=monitor, cgroup_driver=driver, cgroup_path=path)
    return None


def _plain_container_owner(path: str) -> CgroupOwner | None:
    """A container outside Kubernetes (docker, podman): the outermost one the path names, else None.

    Outermost: docker-in-docker nests ``/docker/<a>/docker/<b>``, and the host's runtime knows ``<a>``."""
    segments = _segments(path)
    for index, segment in enumerate(segments):
        prefixed = _PREFIXED_CONTAINER.fullmatch(segment)
        if prefixed:
            return CgroupOwner(runtime=_RUNTIME_OF_PREFIX[prefixed.group(1)], container_id=prefixed.group(3),
                               runtime_monitor=prefixed.group(2) is not None, cgroup_path=path)
        if segment == "docker" and index + 1 < len(segments) and _BARE_CONTAINER.fullmatch(segments[index + 1]):
            return CgroupOwner(runtime=RUNTIME_DOCKER, container_id=segments[index + 1], cgroup_path=path)
    return None


def owner_from_path(path: str) -> CgroupOwner:
    """The owner one cgroup path names: a pod, else a plain container, else a systemd unit, else nothing."""
    owner = _pod_owner(path) or _plain_container_owner(path)
    if owner is not None:
        return owner
    units = [segment for segment in _segments(path) if _UNIT.fullmatch(segment)]
    return CgroupOwner(systemd_unit=units[-1] if units else None, cgroup_path=path)


def _preference(line: CgroupLine, for_unit: bool) -> int:
    """Rank of a line as the source of the owner (lower first).

    Pods and containers: v1's ``memory`` and ``cpu`` hierarchies first (the kubelet and the runtimes always
    place a container in them), then ``name=systemd``, then v2's line. Units: systemd places a process by
    unit in ``name=systemd`` (v1) or the unified tree (v2, hybrid), so those first; ``memory`` may only show
    a parent slice when the unit has no memory accounting."""
    if "memory" in line.controllers:
        rank = 2 if for_unit else 0
    elif "cpu" in line.controllers:
        rank = 3 if for_unit else 1
    elif "name=systemd" in line.controllers:
        rank = 0 if for_unit else 2
    elif line.unified:
        rank = 1 if for_unit else 3
    else:
        rank = 4
    return rank


@lru_cache(maxsize=4096)
def owner_from_cgroup(text: str) -> CgroupOwner:
    """The owner the text of a /proc/PID/cgroup names (see the module docstring); never raises.

    The first line, in preference order, that names a pod or a container gives the owner; failing that, the
    first that names a systemd unit; failing that, an empty owner with the preferred line's path. Cached by
    text (the owner is frozen): every process of a container has the same file."""
    lines = parse_cgroup_lines(text)
    if not lines:
        return CgroupOwner()
    by_container = sorted(lines, key=lambda line: _preference(line, for_unit=False))
    for line in by_container:
        owner = _pod_owner(line.path) or _plain_container_owner(line.path)
        if owner is not None:
            return owner
    for line in sorted(lines, key=lambda line: _preference(line, for_unit=True)):
        owner = owner_from_path(line.path)
        if owner.systemd_unit is not None:
            return owner
    return CgroupOwner(cgroup_path=by_container[0].path)
