"""RAPL energy counters from the Linux powercap sysfs tree (``/sys/class/powercap/intel-rapl:*``).

Layout (the ``intel_rapl`` driver; AMD's RAPL driver registers under the same names)::

    intel-rapl:0/            name = package-0    whole CPU package (socket)
    intel-rapl:0/intel-rapl:0:0  name = core     inside package-0
    intel-rapl:0/intel-rapl:0:1  name = uncore   inside package-0
    intel-rapl:0/intel-rapl:0:2  name = dram     memory attached to package 0, outside the package
    intel-rapl:1/            name = psys         whole platform: overlaps package and dram

Only package zones and their ``dram`` sub-zones are exported ("package-0", "dram-0"): core and uncore
are already inside the package, and psys covers package and dram, so exporting either would double
count. ``intel-rapl-mmio:*`` zones repeat the package counter through another interface and are skipped
for the same reason.

``energy_uj`` is a counter in microjoules that wraps at ``max_energy_range_uj``. This module unwraps it
into a running total in joules per zone that only grows while the reader lives. Since CVE-2020-8694
(Platypus) ``energy_uj`` is readable by root only, and containers often lack /sys/class/powercap:
either way the zone is absent from readings and :meth:`RaplReader.field_status` says why.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from wattledger.probes.base import FieldStatus
from wattledger.probes.errors import one_line

__all__ = ["RaplReader", "read_sysfs_file"]

log = logging.getLogger(__name__)

_TOP_ZONE = re.compile(r"intel-rapl:(\d+)")
_SUB_ZONE = re.compile(r"intel-rapl:(\d+):(\d+)")
_MMIO_ZONE = re.compile(r"intel-rapl-mmio:\d+")
_MAX_DIGITS = 20


def read_sysfs_file(path: str) -> bytes:
    """The whole content of one sysfs file (a single read: sysfs attributes are at most a page)."""
    with open(path, "rb", buffering=0) as f:
        return f.read()


class _BadCounter(ValueError):
    """A counter file held something other than a non-negative integer."""


def _parse_uint(raw: bytes, path: str) -> int:
    token = raw.strip()
    if not token.isdigit() or len(token) > _MAX_DIGITS:  # bytes.isdigit() is ASCII only
        raise _BadCounter(f"{path}: expected a non-negative integer, got {raw[:40]!r}")
    return int(token)


@dataclass(slots=True)
class _Zone:
    label: str  # exported name: "package-0", "dram-0"
    directory: str
    energy_path: str
    max_range_uj: int | None = None
    previous_uj: int | None = None  # last raw reading
    total_uj: int | None = None  # running unwrapped total, starts at the first raw reading
    error: str | None = None  # why the last read failed; None while it works
    permanent: bool = False  # PermissionError or bad max range: not retried


class RaplReader:
    """Reads and unwraps RAPL package and DRAM energy counters.

    ``sysfs_root`` is where sysfs is mounted (tests pass a fake tree). ``read_file(path) -> bytes`` is the
    one function that touches files; tests inject failures through it. Zones are discovered once, in the
    constructor; nothing is read at import time.
    """

    def __init__(self, sysfs_root: str = "/sys", read_file: Callable[[str], bytes] = read_sysfs_file) -> None:
        self.sysfs_root = sysfs_root
        self._read = read_file
        self._powercap = os.path.join(sysfs_root, "class", "powercap")
        self._zones: list[_Zone] = []
        self._skipped: list[FieldStatus] = []
        self._missing_reason: str | None = None
        self._discover()
        self._read_max_ranges()

    # -- discovery -----------------------------------------------------------------------------------

    def _zone_name(self, directory: str) -> str | None:
        try:
            return self._read(os.path.join(directory, "name")).decode("ascii", "replace").strip()
        except OSError as exc:
            self._skipped.append(FieldStatus(f"rapl:{os.path.basename(directory)}", False,
                                             f"cannot read zone name: {one_line(exc)}"))
            log.warning("RAPL zone %s skipped: cannot read its name: %s", directory, one_line(exc))
            return None

    def _discover(self) -> None:
        try:
            entries = sorted(os.listdir(self._powercap))
        except OSError as exc:
            self._missing_reason = (
                f"{self._powercap} not readable ({type(exc).__name__}): no RAPL driver, not an x86 host, "
                "or /sys not mounted into the container"
            )
            log.debug("RAPL unavailable: %s", self._missing_reason)
            return
        packages: dict[int, str] = {}  # zone index -> package label
        subzones: list[tuple[int, int, str]] = []
        for entry in entries:
            if (m := _TOP_ZONE.fullmatch(entry)) is not None:
                directory = os.path.join(self._powercap, entry)
                name = self._zone_name(directory)
                if name is None:
                    continue
                if name.startswith("package-"):
                    packages[int(m.group(1))] = name
                    self._zones.append(_Zone(name, directory, os.path.join(directory, "energy_uj")))
                else:
                    self._skipped.append(FieldStatus(
                        f"rapl:{name}", False, f"not exported: {entry} ({name}) overlaps package and dram zones"))
            elif (m := _SUB_ZONE.fullmatch(entry)) is not None:
                subzones.append((int(m.group(1)), int(m.group(2)), entry))
            elif _MMIO_ZONE.fullmatch(entry):
                self._skipped.append(FieldStatus(
                    f"rapl:{entry}", False, f"not exported: {entry} repeats a package counter through MMIO"))
        for parent, _, entry in subzones:  # named after the package index, as dram-N is
            directory = os.path.join(self._powercap, entry)
            name = self._zone_name(directory)
            if name is None:
                continue
            parent_label = packages.get(parent)
            if name != "dram":
                inside = parent_label or "its package"
                self._skipped.append(FieldStatus(
                    f"rapl:{name}-{parent}", False, f"not exported: {entry} ({name}) is inside {inside}"))
            elif parent_label is None:
                self._skipped.append(FieldStatus(
                    f"rapl:{entry}", False, f"not exported: dram zone {entry} has no package zone intel-rapl:{parent}"))
            else:
                # package-0 -> dram-0, package-0-die-1 -> dram-0-die-1: the package's own suffix.
                label = "dram" + parent_label[len("package"):]
                self._zones.append(_Zone(label, directory, os.path.join(directory, "energy_uj")))
        if not self._zones:
            self._missing_reason = f"no package or dram zone under {self._powercap}"
            log.debug("RAPL unavailable: %s", self._missing_reason)

    def _read_max_ranges(self) -> None:
        for zone in self._zones:
            path = os.path.join(zone.directory, "max_energy_range_uj")
            try:
                zone.max_range_uj = _parse_uint(self._read(path), path)
                if zone.max_range_uj == 0:
                    raise _BadCounter(f"{path} is 0")
            except (OSError, _BadCounter) as exc:
                self._fail(zone, f"cannot read max_energy_range_uj, so wraparound cannot be undone: {one_line(exc)}",
                           permanent=True)

    # -- reading -------------------------------------------------------------------------------------

    def _fail(self, zone: _Zone, reason: str, permanent: bool = False) -> None:
        if zone.error is None:  # log on the transition into failing, not on every read
            log.warning("RAPL zone %s unreadable: %s", zone.label, reason)
        zone.error = reason
        zone.permanent = zone.permanent or permanent

    def read(self) -> dict[str, float]:
        """Unwrapped energy per readable zone, in joules; empty when no zone can be read.

        A reading below the previous one means the counter wrapped once: the delta is then
        ``raw + max_energy_range_uj - previous``. The first reading of a zone starts its total.
        A zone that fails is absent from this reading and reported by :meth:`field_status`; it is tried
        again next time unless the failure cannot heal (permission denied, no wrap range).
        """
        out: dict[str, float] = {}
        for zone in self._zones:
            if zone.permanent:
                continue
            try:
                raw = _parse_uint(self._read(zone.energy_path), zone.energy_path)
            except PermissionError as exc:
                self._fail(zone, "energy_uj is root-only since CVE-2020-8694: run the agent as root or grant "
                                 f"read access ({one_line(exc)})", permanent=True)
                continue
            except (OSError, _BadCounter) as exc:
                self._fail(zone, f"cannot read energy_uj: {one_line(exc)}")
                continue
            if zone.error is not None:
                log.info("RAPL zone %s readable again", zone.label)
                zone.error = None
            if zone.previous_uj is None or zone.total_uj is None:
                zone.total_uj = raw
            elif raw >= zone.previous_uj:
                zone.total_uj += raw - zone.previous_uj
            else:
                assert zone.max_range_uj is not None  # zones without a range are permanent failures
                zone.total_uj += raw + zone.max_range_uj - zone.previous_uj
            zone.previous_uj = raw
            out[zone.label] = zone.total_uj / 1e6
        return out

    def problem(self) -> str | None:
        """Why RAPL energy is not all read now, in one line (no powercap tree, no package zone, the first
        exported zone whose last read failed); None while every exported zone reads."""
        if self._missing_reason is not None:
            return self._missing_reason
        failing = next((zone for zone in self._zones if zone.error is not None), None)
        return f"{failing.label}: {failing.error}" if failing is not None else None

    @property
    def zones(self) -> tuple[str, ...]:
        """Labels of the exported zones found at discovery ("package-0", "dram-0", ...), readable or not."""
        return tuple(zone.label for zone in self._zones)

    def field_status(self) -> list[FieldStatus]:
        """One entry per zone found (``rapl:package-0`` ...), with a one-line reason where it is not
        read; a single ``rapl`` entry when there is no powercap tree or no package zone."""
        out: list[FieldStatus] = []
        if self._missing_reason is not None:
            out.append(FieldStatus("rapl", False, self._missing_reason))
        for zone in self._zones:
            out.append(FieldStatus(f"rapl:{zone.label}", zone.error is None, zone.error))
        out.extend(self._skipped)
        return out
