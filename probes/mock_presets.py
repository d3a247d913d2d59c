"""Simulated GPU models for the mock backend.

Memory sizes, power limits and clocks are the values NVML reports on the real boards (NVIDIA product
briefs; `nvidia-smi -q` on H100 SXM5 80GB and H200 141GB). Idle power, the thermal constants and the
power model's weights are **assumptions** of this simulator, not measurements: they give plausible
shapes, and every figure the mock produces is labelled simulated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from wattledger.probes.activity import Activity

_MIB = 1024**2


@dataclass(frozen=True, slots=True)
class MockPreset:
    """Everything the mock physics needs to know about one GPU model."""

    name: str
    model_name: str
    memory_total_bytes: int
    memory_reserved_bytes: int  # held by the driver and firmware, outside "used" (NVML memory v2)
    power_limit_watts: float  # default and maximum enforced board power limit
    idle_power_watts: float  # ASSUMPTION: power with no kernel running at idle clocks
    sm_clock_max_hertz: float
    sm_clock_idle_hertz: float
    memory_clock_hertz: float
    ambient_celsius: float = 30.0  # ASSUMPTION: inlet air
    celsius_per_watt: float = 0.07  # ASSUMPTION: steady-state rise over ambient per watt
    thermal_time_constant_seconds: float = 20.0  # ASSUMPTION: first-order lag of the die
    hbm_offset_celsius: float = 4.0  # ASSUMPTION: HBM runs this much warmer than the die at load


PRESETS: dict[str, MockPreset] = {
    "h100-sxm-80gb": MockPreset(
        name="h100-sxm-80gb",
        model_name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=81559 * _MIB,
        memory_reserved_bytes=512 * _MIB,
        power_limit_watts=700.0,
        idle_power_watts=70.0,
        sm_clock_max_hertz=1980e6,
        sm_clock_idle_hertz=345e6,
        memory_clock_hertz=2619e6,
    ),
    "h200-141gb": MockPreset(
        name="h200-141gb",
        model_name="NVIDIA H200",
        memory_total_bytes=143771 * _MIB,
        memory_reserved_bytes=512 * _MIB,
        power_limit_watts=700.0,
        idle_power_watts=75.0,
        sm_clock_max_hertz=1980e6,
        sm_clock_idle_hertz=345e6,
        memory_clock_hertz=3201e6,
    ),
}

# Board power above idle grows with these activity weights (power_demand_watts below). FITTED
# (python -m wattledger.workloads.device_time --fit, which reads them from here) so
# that simulated Llama-3.1-8B serving on the H100 preset draws ML.ENERGY's published 486 / 669 / 688 W at
# batch 8 / 128 / 512; the split between sm and dram is an ASSUMPTION (the points cannot separate them). A
# fully loaded GPU asks for well over its limit, so heavy work is clipped at the limit as on real boards.
POWER_WEIGHT_SM = 0.466
POWER_WEIGHT_TENSOR = 1.025
POWER_WEIGHT_DRAM = 0.278
POWER_WEIGHTS: dict[str, float] = {"sm": POWER_WEIGHT_SM, "tensor": POWER_WEIGHT_TENSOR, "dram": POWER_WEIGHT_DRAM}


def power_demand_watts(spec: MockPreset, activity: Activity, weights: Mapping[str, float] | None = None) -> float:
    """What the board would draw for ``activity`` with no power limit (W): idle + (limit - idle) x the
    weighted sm, tensor and dram activity. ``weights``: other weights than the mock's (the fit tries them)."""
    if weights is None:
        load = POWER_WEIGHT_SM * activity.sm + POWER_WEIGHT_TENSOR * activity.tensor + POWER_WEIGHT_DRAM * activity.dram
    else:
        load = weights["sm"] * activity.sm + weights["tensor"] * activity.tensor + weights["dram"] * activity.dram
    return spec.idle_power_watts + (spec.power_limit_watts - spec.idle_power_watts) * load


def preset(name: str) -> MockPreset:
    """The preset called ``name``; ValueError listing the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown mock preset {name!r}; choose from {', '.join(PRESETS)}") from None
