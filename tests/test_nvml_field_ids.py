"""Throttle-time field ids follow the driver, not the pynvml binding (issue 8, item 6).

The fake driver of the stub numbers its fields as the real driver of that version does (nvml.h): 570 has
power smoothing at 251-268 and no thermal counters; 575.x and 580.65 have SW/HW thermal and HW power brake
at 251-253 (power smoothing at 256+); 580.82 and newer have them at 269-271 (power smoothing at 251 again).
Every binding numbering is installed against every driver generation, and power-smoothing values (large,
distinct sentinels) must never come out as throttle seconds.
"""

from __future__ import annotations

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvml_stub import DRIVER_NUMBERINGS, POWER_SMOOTHING_COUNT, FakeGpu, driver_numbering, make_nvml_stub
from wattledger.probes.nvml import NEWEST_CHECKED_DRIVER_BRANCH, NvmlBackend, parse_driver_version, throttle_field_ids

THROTTLE_NS = {
    "sw_power_cap": 2_000_000_000,
    "sync_boost": 3_000_000_000,
    "sw_thermal_slowdown": 4_000_000_000,
    "hw_thermal_slowdown": 5_000_000_000,
    "hw_power_brake_slowdown": 6_000_000_000,
}
# Power-smoothing readings as nanoseconds would be 1000 s and up: nothing a throttle counter here holds.
SENTINELS = tuple(1_000_000_000_000 + k for k in range(POWER_SMOOTHING_COUNT))
THERMAL = ("sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")

# (driver version, the reasons that driver has counters for, as wattledger must read them)
DRIVERS = [
    ("535.183.01", {"sw_power_cap", "sync_boost"}),
    ("560.35.03", {"sw_power_cap", "sync_boost"}),
    ("570.172.08", {"sw_power_cap", "sync_boost"}),  # 251 is power smoothing here
    ("575.57.08", set(THROTTLE_NS)),  # 251-253
    ("580.65.06", set(THROTTLE_NS)),  # 251-253
    ("580.76.05", {"sw_power_cap", "sync_boost"}),  # between the numberings: not known, dropped
    ("580.82.07", set(THROTTLE_NS)),  # 269-271
    ("580.126.09", set(THROTTLE_NS)),
    ("590.48.01", set(THROTTLE_NS)),
    ("615.71", set(THROTTLE_NS)),
    (f"{NEWEST_CHECKED_DRIVER_BRANCH + 5}.10.01", {"sw_power_cap", "sync_boost"}),  # newer than checked
]
BINDINGS = [None, "251", "269"]  # the installed module's own constants, 12.575/13.580.65, 13.580.82+


def _gpu() -> FakeGpu:
    return FakeGpu(throttle_ns=dict(THROTTLE_NS), power_smoothing=SENTINELS)


def _read(driver: str, binding: str | None) -> tuple[NvmlBackend, dict[str, float] | None, list]:
    nvml = make_nvml_stub([_gpu()], driver_version=driver, binding_numbering=binding)
    backend = NvmlBackend(nvml, enable_xid=False, enable_gpm=False)
    try:
        return backend, backend.sample()[0].throttle_seconds, nvml.fake.field_requests[0]
    finally:
        backend.close()


@pytest.mark.parametrize("binding", BINDINGS, ids=lambda b: f"binding-{b or 'installed'}")
@pytest.mark.parametrize(("driver", "expected"), DRIVERS, ids=[d for d, _ in DRIVERS])
def test_throttle_counters_are_the_drivers_whatever_the_binding(driver, expected, binding):
    backend, throttle, request = _read(driver, binding)
    assert throttle == {reason: THROTTLE_NS[reason] / 1e9 for reason in expected}
    # No id the driver means as a power-smoothing field was even asked for.
    _, smoothing_first = DRIVER_NUMBERINGS[driver_numbering(driver)]
    if smoothing_first is not None:
        smoothing = set(range(smoothing_first, smoothing_first + POWER_SMOOTHING_COUNT))
        assert not smoothing & {field_id for field_id, _ in request}
    rows = {row.name: row for row in backend.field_status(0)}
    for reason in THERMAL:
        row = rows[f"throttle_seconds.{reason}"]
        assert row.supported is (reason in expected)
        if reason not in expected:
            assert row.reason and "\n" not in row.reason


@settings(max_examples=30, deadline=None)  # each example builds an autospec stub (~0.1 s)
@given(
    major=st.integers(450, 700), minor=st.integers(0, 200), patch=st.integers(0, 99),
    binding=st.sampled_from(BINDINGS),
)
def test_power_smoothing_is_never_read_as_throttle_time(major, minor, patch, binding):
    driver = f"{major}.{minor}.{patch:02d}"
    _, throttle, _ = _read(driver, binding)
    for reason, seconds in (throttle or {}).items():
        assert seconds == THROTTLE_NS[reason] / 1e9, (driver, binding, reason, seconds)


def test_a_throttle_id_answering_another_value_type_is_dropped():
    # Belt and braces: if the table were ever wrong, a counter id answering, say, an unsigned int (as
    # enablement flags do) is not nanoseconds and is dropped, not read.
    gpu = _gpu()
    gpu.field_value_types[269] = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    nvml = make_nvml_stub([gpu], driver_version="590.48.01")
    backend = NvmlBackend(nvml, enable_xid=False, enable_gpm=False)
    try:
        assert "sw_thermal_slowdown" not in backend.sample()[0].throttle_seconds
        backend.sample()
        assert 269 not in dict(nvml.fake.field_requests[-1])  # dropped: never asked again
        row = {r.name: r for r in backend.field_status(0)}["throttle_seconds.sw_thermal_slowdown"]
        assert not row.supported and "not a nanosecond counter" in row.reason
    finally:
        backend.close()


def test_field_id_table():
    assert throttle_field_ids("575.51.02")[0] == {"sw_power_cap": 74, "sync_boost": 76, "sw_thermal_slowdown": 251,
                                                  "hw_thermal_slowdown": 252, "hw_power_brake_slowdown": 253}
    assert throttle_field_ids("580.82.07")[0]["hw_power_brake_slowdown"] == 271
    ids, missing = throttle_field_ids("570.86.15")
    assert set(ids) == {"sw_power_cap", "sync_boost"} and "power-smoothing" in missing["sw_thermal_slowdown"]
    ids, missing = throttle_field_ids("garbage")
    assert set(ids) == {"sw_power_cap", "sync_boost"} and "could not be read" in missing["hw_thermal_slowdown"]
    assert parse_driver_version(" 580.95.05\n") == (580, 95, 5) and parse_driver_version("r580") is None
