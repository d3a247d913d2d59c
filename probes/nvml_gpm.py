"""GPM (GPU Performance Monitoring) sample pairs for the NVML backend.

GPM is NVML's counter interface on Hopper and newer. It needs no profiler lock, so it coexists with Nsight
and DCGM profiling. A metric is computed over two samples taken some time apart: NVML subtracts the
hardware counters in ``sample1`` from those in ``sample2`` and divides by the time between them. So each
device (and each MIG GPU instance) keeps two sample buffers, fills one per tick and swaps them; the first
tick after start or after a device comes back has no earlier sample and yields no metrics.

This module does not import ``pynvml``: the backend passes the module (or a test stub) in, and every NVML
error propagates to the backend's single translation point in ``probes/nvml.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GpmMetric:
    """One GPM metric and the GpuSample / MigInstance field it fills."""

    constant: str  # name of the metric id in pynvml, e.g. "NVML_GPM_METRIC_SM_UTIL"
    field: str  # GpuSample field name, which is also the probe name in field_status
    scale: float  # multiply NVML's value by this to get the field's unit
    is_ratio: bool  # percentages become ratios clamped to 0..1

    def convert(self, value: float) -> float | None:
        """NVML's value in the field's unit; NaN (no data) becomes None."""
        if math.isnan(value):
            return None
        converted = value * self.scale
        if self.is_ratio:
            # GPM percentages are ratios of two counters read a few microseconds apart, and come out a
            # hair above 100 (or below 0) at the edges; the ledger treats ratios as 0..1.
            converted = min(max(converted, 0.0), 1.0)
        return converted


# Device-level metrics. The util metrics are percentages 0.0 - 100.0; the bandwidths are MiB/s.
DEVICE_METRICS: tuple[GpmMetric, ...] = (
    GpmMetric("NVML_GPM_METRIC_SM_UTIL", "sm_activity_ratio", 0.01, True),
    GpmMetric("NVML_GPM_METRIC_SM_OCCUPANCY", "sm_occupancy_ratio", 0.01, True),
    GpmMetric("NVML_GPM_METRIC_ANY_TENSOR_UTIL", "tensor_activity_ratio", 0.01, True),
    GpmMetric("NVML_GPM_METRIC_DRAM_BW_UTIL", "dram_activity_ratio", 0.01, True),
    GpmMetric("NVML_GPM_METRIC_PCIE_TX_PER_SEC", "pcie_transmit_bytes_per_second", MIB, False),
    GpmMetric("NVML_GPM_METRIC_PCIE_RX_PER_SEC", "pcie_receive_bytes_per_second", MIB, False),
    GpmMetric("NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC", "nvlink_transmit_bytes_per_second", MIB, False),
    GpmMetric("NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC", "nvlink_receive_bytes_per_second", MIB, False),
)

# Per MIG GPU instance (nvmlGpmMigSampleGet): SM busy only, which is what MigInstance carries.
MIG_METRICS: tuple[GpmMetric, ...] = (GpmMetric("NVML_GPM_METRIC_SM_UTIL", "sm_activity_ratio", 0.01, True),)


def metrics_request(nvml: Any, sample1: Any, sample2: Any, metric_ids: list[int]) -> Any:
    """An ``nvmlGpmMetricsGet_t`` asking for ``metric_ids`` over (older ``sample1``, newer ``sample2``)."""
    request = nvml.c_nvmlGpmMetricsGet_t()
    request.version = nvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = len(metric_ids)
    request.sample1 = sample1
    request.sample2 = sample2
    for slot, metric_id in enumerate(metric_ids):
        request.metrics[slot].metricId = metric_id
    return request


def metrics_answer(request: Any) -> dict[int, tuple[int, float]]:
    """``{metric id: (nvmlReturn, value)}`` from a request that ``nvmlGpmMetricsGet`` has filled in."""
    out: dict[int, tuple[int, float]] = {}
    for slot in range(request.numMetrics):
        metric = request.metrics[slot]
        out[int(metric.metricId)] = (int(metric.nvmlReturn), float(metric.value))
    return out


class GpmPair:
    """Two GPM sample buffers for one device or one MIG GPU instance, swapped after every tick.

    ``tick`` fills the current buffer, computes the requested metrics over (previous, current) when
    there is a previous sample, then swaps. Buffers are allocated by ``nvmlGpmSampleAlloc`` and must be
    released with ``free``.
    """

    def __init__(self, nvml: Any, gpu_instance_id: int | None = None) -> None:
        self._nvml = nvml
        self._gpu_instance_id = gpu_instance_id  # None: the whole device
        self._previous = nvml.nvmlGpmSampleAlloc()
        try:
            self._current = nvml.nvmlGpmSampleAlloc()
        except nvml.NVMLError:
            nvml.nvmlGpmSampleFree(self._previous)
            raise
        self._have_previous = False
        self._freed = False

    def tick(self, handle: Any, metric_ids: list[int]) -> dict[int, tuple[int, float]] | None:
        """Take a sample now; return ``{metric id: (nvmlReturn, value)}`` over the last two samples.

        Returns None on the first tick (no earlier sample). NVML errors propagate; if taking the sample
        fails, the previous sample is kept, so the next metrics span the longer interval.
        """
        nvml = self._nvml
        if self._gpu_instance_id is None:
            nvml.nvmlGpmSampleGet(handle, self._current)
        else:
            nvml.nvmlGpmMigSampleGet(handle, self._gpu_instance_id, self._current)
        result = None
        if self._have_previous and metric_ids:
            result = self._metrics(metric_ids)
        # Swap only after the metrics are read: the sample just taken becomes the next tick's sample1.
        self._previous, self._current = self._current, self._previous
        self._have_previous = True
        return result

    def _metrics(self, metric_ids: list[int]) -> dict[int, tuple[int, float]]:
        request = metrics_request(self._nvml, self._previous, self._current, metric_ids)
        self._nvml.nvmlGpmMetricsGet(request)
        return metrics_answer(request)

    def reset(self) -> None:
        """Forget the previous sample (the device went away; counters may have restarted)."""
        self._have_previous = False

    def free(self) -> None:
        """Release both buffers. Raises the NVML error of the first free that fails, after trying both."""
        if self._freed:
            return
        self._freed = True
        first_error = None
        for sample in (self._previous, self._current):
            try:
                self._nvml.nvmlGpmSampleFree(sample)
            except self._nvml.NVMLError as err:
                first_error = first_error or err
        if first_error is not None:
            raise first_error
