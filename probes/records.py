"""The recorded-sample format: JSON lines that the file exporter writes and the replay backend plays.

Line 1 is a header ``{"type": "header", "format": "wattledger-samples", "version": 1, "backend": ...,
"simulated": ..., "gpus": [GpuInfo...]}``. Every later line is one record with a ``type``: ``gpu`` (a
GpuSample), ``host`` (a HostSample) or ``span`` (a workload span). Field names are those of the
dataclasses, so units are in the names.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from wattledger.probes.base import GpuInfo, GpuProcess, GpuSample, HostSample, MigInstance, ProcessSample

FORMAT_NAME = "wattledger-samples"
FORMAT_VERSION = 1

_GPU_FIELDS = tuple(f.name for f in dataclasses.fields(GpuSample))
_HOST_FIELDS = tuple(f.name for f in dataclasses.fields(HostSample))
_INFO_FIELDS = tuple(f.name for f in dataclasses.fields(GpuInfo))


class RecordError(ValueError):
    """A line of a sample file that cannot be read."""


def header(backend: str | None, simulated: bool, gpus: list[GpuInfo], interval_seconds: float) -> dict:
    return {
        "type": "header",
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "backend": backend,
        "simulated": simulated,
        "interval_seconds": interval_seconds,
        "gpus": [{name: getattr(info, name) for name in _INFO_FIELDS} for info in gpus],
    }


def gpu_sample_to_record(sample: GpuSample) -> dict:
    out: dict[str, Any] = {"type": "gpu"}
    for name in _GPU_FIELDS:
        value = getattr(sample, name)
        if value is None:
            continue  # absent means "not available", as in the sample
        if name == "throttle_reasons":
            value = sorted(value)
        elif name in ("processes", "mig_instances"):
            value = [dataclasses.asdict(item) for item in value]
        out[name] = value
    return out


def host_sample_to_record(sample: HostSample) -> dict:
    out: dict[str, Any] = {"type": "host"}
    for name in _HOST_FIELDS:
        value = getattr(sample, name)
        if value is None or value == ():
            continue
        if name == "processes":
            value = [dataclasses.asdict(p) for p in value]
        out[name] = value
    return out


def gpu_info_from_record(record: dict) -> GpuInfo:
    try:
        return GpuInfo(**{k: record[k] for k in _INFO_FIELDS if k in record})
    except TypeError as err:
        raise RecordError(f"bad gpu entry in header: {err}") from None


_GPU_NUMBER_FIELDS = tuple(
    f.name for f in dataclasses.fields(GpuSample)
    if f.name not in ("uuid", "up", "throttle_reasons", "throttle_seconds", "processes", "mig_instances")
)


def _check_gpu_record(values: dict) -> None:
    """Types a replayed sample must have: the ledger does arithmetic on every number."""
    for name in ("index", "uuid", "monotonic_ns"):
        if name not in values:
            raise RecordError(f"gpu record without {name}")
    if not isinstance(values["uuid"], str):
        raise RecordError("gpu record: uuid must be a string")
    for name in _GPU_NUMBER_FIELDS:
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RecordError(f"gpu record: {name} must be a number")
    for name in ("index", "monotonic_ns"):
        if not isinstance(values[name], int) or values[name] < 0:
            raise RecordError(f"gpu record: {name} must be a whole number >= 0")
    if not isinstance(values.get("up", True), bool):
        raise RecordError("gpu record: up must be true or false")
    reasons = values.get("throttle_reasons")
    if reasons is not None and not (isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)):
        raise RecordError("gpu record: throttle_reasons must be a list of names")
    seconds = values.get("throttle_seconds")
    if seconds is not None and not (isinstance(seconds, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in seconds.values())):
        raise RecordError("gpu record: throttle_seconds must map reasons to numbers")


def gpu_sample_from_record(record: dict) -> GpuSample:
    values = {k: record[k] for k in _GPU_FIELDS if k in record}
    _check_gpu_record(values)
    try:
        if "throttle_reasons" in values:
            values["throttle_reasons"] = frozenset(values["throttle_reasons"])
        if "processes" in values:
            values["processes"] = tuple(GpuProcess(**p) for p in values["processes"])
        if "mig_instances" in values:
            values["mig_instances"] = tuple(MigInstance(**m) for m in values["mig_instances"])
        return GpuSample(**values)
    except (TypeError, AttributeError) as err:
        raise RecordError(f"bad gpu record: {err}") from None


def host_sample_from_record(record: dict) -> HostSample:
    values = {k: record[k] for k in _HOST_FIELDS if k in record}
    try:
        if "processes" in values:
            values["processes"] = tuple(ProcessSample(**p) for p in values["processes"])
        if "cpu_busy_seconds_per_core" in values:
            values["cpu_busy_seconds_per_core"] = tuple(values["cpu_busy_seconds_per_core"])
        return HostSample(**values)
    except TypeError as err:
        raise RecordError(f"bad host record: {err}") from None


def parse_line(line: str, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordError(f"line {number}: not JSON ({err.msg})") from None
    if not isinstance(record, dict) or "type" not in record:
        raise RecordError(f"line {number}: not a record object with a 'type'")
    return record


def dumps(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"), allow_nan=False)
