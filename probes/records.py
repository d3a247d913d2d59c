"""The recorded-sample format: JSON lines that the file exporter writes and the replay backend plays.

Line 1 is a header ``{"type": "header", "format": "wattledger-samples", "version": 1, "backend": ...,
"simulated": ..., "gpus": [GpuInfo...]}``. Every later line is one record with a ``type``: ``gpu`` (a
GpuSample), ``host`` (a HostSample) or ``span`` (a workload span). Field names are those of the
dataclasses, so units are in the names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from wattledger.probes.base import GpuInfo, GpuProcess, GpuSample, HostSample, MigInstance

FORMAT_NAME = "wattledger-samples"
FORMAT_VERSION = 1
RATIO_SLACK = 1e-9  # how far outside 0..1 a recorded ratio may be and still count as float rounding

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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    """A whole number >= 0 (an index, a byte count, nanoseconds)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# GpuInfo fields: (check, what the error says it must be).
_INFO_CHECKS = {
    "index": (_is_count, "a whole number >= 0"),
    "uuid": (lambda v: isinstance(v, str), "a string"),
    "model_name": (lambda v: isinstance(v, str), "a string"),
    "driver_version": (lambda v: isinstance(v, str), "a string"),
    "memory_total_bytes": (lambda v: v is None or _is_count(v), "a whole number >= 0 or null"),
    "power_limit_default_watts": (lambda v: v is None or (_is_number(v) and math.isfinite(v) and v >= 0),
                                  "a finite number >= 0 or null"),
    "simulated": (lambda v: isinstance(v, bool), "true or false"),
    "pci_bus_id": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "mig_enabled": (lambda v: isinstance(v, bool), "true or false"),
}
_INFO_REQUIRED = tuple(f.name for f in dataclasses.fields(GpuInfo) if f.default is dataclasses.MISSING)


def gpu_info_from_record(record: object) -> GpuInfo:
    """A header's GPU entry, every field type-checked."""
    if not isinstance(record, dict):
        raise RecordError("a gpu entry in the header is not an object")
    for name in _INFO_REQUIRED:
        if name not in record:
            raise RecordError(f"a gpu entry in the header has no {name}")
    for name, (check, must_be) in _INFO_CHECKS.items():
        if name in record and not check(record[name]):
            raise RecordError(f"header gpu {name} must be {must_be}, got {_short(record[name])}")
    return GpuInfo(**{k: record[k] for k in _INFO_FIELDS if k in record})


def header_from_record(head: dict) -> tuple[list[GpuInfo], bool]:
    """A sample file's header -> (its GPUs, whether they were simulated); RecordError naming what is wrong."""
    if head.get("type") != "header" or head.get("format") != FORMAT_NAME:
        raise RecordError("not a wattledger-samples header")
    if head.get("version") != FORMAT_VERSION:
        raise RecordError(f"format version {_short(head.get('version'))} is not supported")
    gpus = head.get("gpus", [])
    if not isinstance(gpus, list):
        raise RecordError("gpus must be a list of GPU objects")
    simulated = head.get("simulated", False)
    if not isinstance(simulated, bool):
        raise RecordError("simulated must be true or false")
    infos = [gpu_info_from_record(g) for g in gpus]
    indices = [info.index for info in infos]
    if len(set(indices)) != len(indices):
        raise RecordError("a GPU index appears twice in the header")
    return infos, simulated


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_GPU_NUMBER_FIELDS = tuple(
    f.name for f in dataclasses.fields(GpuSample)
    if f.name not in ("uuid", "up", "throttle_reasons", "throttle_seconds", "processes", "mig_instances")
)


def _value_range(name: str) -> tuple[float, float] | None:
    """The values a GpuSample field can take, from the unit in its name; None: any finite value.

    The ledger turns these into busy seconds and joules, so a ratio of 7 or a negative energy counter
    would come out as figures that pass every later check."""
    if name.endswith("_ratio"):
        # A hair of slack for float rounding in integrals (the mock's GPM ratios); 1.5 is refused.
        return -RATIO_SLACK, 1.0 + RATIO_SLACK
    if name.endswith(("_bytes", "_joules", "_watts", "_hertz", "_bytes_per_second", "_errors", "_ns")) or name == "index":
        return 0.0, math.inf
    return None


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"gpu record: {name} must be a number, got {_short(value)}")
    if not math.isfinite(value):
        raise RecordError(f"gpu record: {name} must be finite, got {value!r}")
    bounds = _value_range(name)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        allowed = "0 to 1" if name.endswith("_ratio") else ">= 0"
        raise RecordError(f"gpu record: {name} must be {allowed}, got {value!r}")


def _check_items(name: str, items: object, required: tuple[str, ...]) -> None:
    """``processes`` / ``mig_instances``: lists of objects whose numbers are whole and >= 0."""
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise RecordError(f"gpu record: {name} must be a list of objects")
    for item in items:
        for key in required:
            if key not in item:
                raise RecordError(f"gpu record: an entry of {name} has no {key}")
        for key, value in item.items():
            if key.endswith("_ratio"):
                if value is not None:
                    _check_number(f"{name}.{key}", value)
            elif key == "uuid":
                if not isinstance(value, str):
                    raise RecordError(f"gpu record: {name}.uuid must be a string")
            elif value is not None and not _is_count(value):
                raise RecordError(f"gpu record: {name}.{key} must be a whole number >= 0, got {_short(value)}")


def _check_gpu_record(values: dict) -> None:
    """Types and ranges a replayed sample must have: the ledger does arithmetic on every number."""
    for name in ("index", "uuid", "monotonic_ns"):
        if name not in values:
            raise RecordError(f"gpu record without {name}")
    if not isinstance(values["uuid"], str):
        raise RecordError("gpu record: uuid must be a string")
    for name in _GPU_NUMBER_FIELDS:
        value = values.get(name)
        if value is not None:
            _check_number(name, value)
    for name in ("index", "monotonic_ns"):
        if not _is_count(values[name]):
            raise RecordError(f"gpu record: {name} must be a whole number >= 0")
    if not isinstance(values.get("up", True), bool):
        raise RecordError("gpu record: up must be true or false")
    reasons = values.get("throttle_reasons")
    if reasons is not None and not (isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)):
        raise RecordError("gpu record: throttle_reasons must be a list of names")
    seconds = values.get("throttle_seconds")
    if seconds is not None and not (isinstance(seconds, dict) and all(
            _is_number(v) and math.isfinite(v) and v >= 0 for v in seconds.values())):
        raise RecordError("gpu record: throttle_seconds must map reasons to finite seconds >= 0")
    if values.get("processes") is not None:
        _check_items("processes", values["processes"], ("pid",))
    if values.get("mig_instances") is not None:
        _check_items("mig_instances", values["mig_instances"], ("gpu_instance_id", "compute_instance_id", "uuid"))


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


def parse_line(line: str, number: int) -> dict:
    """One line of a sample file -> its record (a JSON object with a ``type``); RecordError naming the line."""
    record = load_json_line(line, number)
    if not isinstance(record, dict) or "type" not in record:
        raise RecordError(f"line {number}: not a record object with a 'type'")
    return record


def load_json_line(line: str, number: int) -> object:
    """One JSON line; RecordError naming the line for anything json cannot turn into a value."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordError(f"line {number}: not JSON ({err.msg})") from None
    except RecursionError:  # json's decoder recurses once per level: a few thousand ``[`` exhaust the stack
        raise RecordError(f"line {number}: JSON nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise RecordError(f"line {number}: not usable JSON ({err})") from None


def dumps(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"), allow_nan=False)
