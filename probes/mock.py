"""A simulated GPU for CPU-only machines and tests: deterministic physics behind the GpuBackend protocol.

Physics, per device (constants in ``mock_presets``; the assumptions are labelled there):

- demand power = idle + (limit - idle) * f(activity), f a weighted sum of SM, tensor and DRAM activity;
  the board draws min(demand, enforced limit). While clipped, the ``sw_power_cap`` reason is set and the
  SM clock drops in proportion.
- an energy counter in integer millijoules that only advances every 100 ms, as real counters do (the
  H100 updates its counter about every 100 ms: Yang et al., arXiv 2312.02741);
- a trailing 1 s boxcar average power, as ``nvmlDeviceGetPowerUsage`` reports on Ampere and newer;
- utilization.gpu as the busy fraction since the previous sample (at most the trailing second), as a
  driver whose utilization sample period matched the sampler's would report it;
- SM/tensor/DRAM ratios as exact means between two samples, as GPM computes them;
- a first-order lag from power to die temperature;
- memory used = what the activity source says workloads declared, plus what scripted processes hold;
- with scripted processes (``processes=``, probes/mock_processes.py), the GPU is as busy as the sum of
  their shares, and each sample's ``processes`` lists them with their shares, refreshed at NVML's ~1 Hz;
- with an activity source that knows the registered workloads' processes (``workload_processes``, as the
  agent's span source does), those are listed too, with their spans' shares, scripted processes or not.

Activity between samples is integrated exactly (it is piecewise constant), so ``true_energy_joules``
is the ground truth the tests compare the exported counter against.

The backend can run a fixed lag, ``delay_s``, behind its clock: it simulates time t only once t is
``delay_s`` old. Workloads report spans when they end (merged, batched, over HTTP), so a mock driven by
spans simulates in the past, where every span that arrived within the lag is already known and counts by
its own timestamps (``agent/span_activity.py`` counts the ones that arrive later). How busy the host is
then changes when spans arrive, not what the mock simulates. Samples carry the simulated time, and the
ledger attributes energy by those timestamps, so nothing is skewed; the energy counter, utilization and
``true_energy_joules`` all come from the one simulated timeline.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from uuid import NAMESPACE_URL, uuid5

from wattledger.probes.activity import IDLE, Activity, ActivitySegment, ActivitySource
from wattledger.probes.base import FieldStatus, FixedGpuBackend, GpuInfo, GpuSample, ProbeUnavailable
from wattledger.probes.mock_processes import ProcessSimulation, ScriptedProcesses
from wattledger.probes.mock_presets import MockPreset, power_demand_watts, preset as lookup_preset

NS_PER_S = 1_000_000_000
ENERGY_COUNTER_PERIOD_NS = 100_000_000  # the counter advances in 100 ms steps
FIRST_UTILIZATION_WINDOW_NS = NS_PER_S // 6  # NVML's shortest sample period
MAX_UTILIZATION_WINDOW_NS = NS_PER_S
BOXCAR_NS = NS_PER_S
HISTORY_NS = 2 * NS_PER_S  # history kept for the trailing windows


# Fields a fault may turn unsupported, by GpuSample field name.
FAULTABLE_FIELDS = (
    "utilization_gpu_ratio",
    "utilization_memory_controller_ratio",
    "sm_activity_ratio",
    "tensor_activity_ratio",
    "dram_activity_ratio",
    "memory_used_bytes",
    "power_watts",
    "power_average_watts",
    "energy_joules",
    "sm_clock_hertz",
    "temperature_gpu_celsius",
    "temperature_memory_celsius",
    "pcie_transmit_bytes",
    "pcie_receive_bytes",
    "throttle_reasons",
)


@dataclass(frozen=True, slots=True)
class Fault:
    """A scheduled fault. Times are seconds of simulated time after the backend starts.

    kinds: ``field_unsupported`` (``field`` reads as unsupported from ``at_s`` on, until ``until_s`` if
    given), ``gpu_lost`` (down from ``at_s`` to ``until_s``), ``energy_reset`` (the counter restarts from 0
    at ``at_s``, as after a driver reload), ``init_failure`` (the backend refuses to open, as NVML init
    failing).
    """

    kind: str
    at_s: float = 0.0
    gpu: int | None = None  # None: every GPU
    until_s: float | None = None
    field: str | None = None

    def __post_init__(self):
        if self.kind not in ("field_unsupported", "gpu_lost", "energy_reset", "init_failure"):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.kind == "field_unsupported" and self.field not in FAULTABLE_FIELDS:
            raise ValueError(f"field_unsupported needs field= one of {', '.join(FAULTABLE_FIELDS)}")
        if not (math.isfinite(self.at_s) and self.at_s >= 0):
            raise ValueError("at must be a finite number of seconds >= 0")
        if self.gpu is not None and self.gpu < 0:
            raise ValueError("gpu must be a GPU index >= 0")
        if self.until_s is not None and not math.isfinite(self.until_s):
            raise ValueError("until must be a finite number of seconds")
        if self.kind in ("gpu_lost", "field_unsupported") and self.until_s is not None and self.until_s <= self.at_s:
            raise ValueError(f"{self.kind}: until_s must come after at_s")

    def applies_to(self, gpu: int) -> bool:
        return self.gpu is None or self.gpu == gpu

    def active(self, elapsed_s: float) -> bool:
        """Whether a lasting fault (gpu_lost, field_unsupported) holds at ``elapsed_s``."""
        return self.at_s <= elapsed_s and (self.until_s is None or elapsed_s < self.until_s)


def parse_fault(text: str) -> Fault:
    """Parse ``kind[:key=value...]``, e.g. ``gpu_lost:gpu=0:at=10:until=20`` or
    ``field_unsupported:field=power_watts:at=5``. Raises ValueError with a one-line reason."""
    kind, *pairs = text.strip().split(":")
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in ("gpu", "at", "until", "field"):
            raise ValueError(f"bad fault option {pair!r} in {text!r}: use gpu=, at=, until=, field=")
        if key in values:  # the later one would silently win: say so instead
            raise ValueError(f"fault option {key}= given twice in {text!r}")
        values[key] = value
    try:
        return Fault(
            kind=kind,
            at_s=float(values.get("at", 0.0)),
            gpu=int(values["gpu"]) if "gpu" in values else None,
            until_s=float(values["until"]) if "until" in values else None,
            field=values.get("field"),
        )
    except ValueError as err:
        raise ValueError(f"bad fault {text!r}: {err}") from None


def _throttle_reasons(idle: bool, capped: bool) -> frozenset[str]:
    reasons = set()
    if idle:
        reasons.add("gpu_idle")
    if capped:
        reasons.add("sw_power_cap")
    return frozenset(reasons)


# The mock's active clock-event reasons by (idle, capped): four immutable sets, shared by every sample
# instead of one new set per sample.
_THROTTLE_REASONS = {(idle, capped): _throttle_reasons(idle, capped) for idle in (False, True) for capped in (False, True)}


@dataclass(slots=True)
class _Piece:
    """A stretch of simulated time with constant activity and power."""

    start_ns: int
    end_ns: int
    activity: Activity
    power_watts: float  # drawn: the demand, clipped at the enforced limit
    energy_before_joules: float  # true energy at start_ns
    demand_watts: float  # what the activity asks for (above power_watts while capped)
    # What a sample reads of this stretch besides its power (see _SimulatedGpu.stretch_figures), once known.
    figures: tuple | None = None


class _SimulatedGpu:
    """The physics of one device."""

    def __init__(self, index: int, spec: MockPreset, start_ns: int, enforced_limit_watts: float):
        self.index = index
        self.spec = spec
        self.enforced_limit_watts = enforced_limit_watts
        self.now_ns = start_ns
        self.true_energy_joules = 0.0
        self.counter_base_joules = 0.0  # true energy when the counter last reset
        self.counter_reset_ns: int | None = None  # when it last reset (an energy_reset fault)
        self.temperature_celsius = spec.ambient_celsius + spec.celsius_per_watt * spec.idle_power_watts
        self.pcie_transmit_bytes = 0.0
        self.pcie_receive_bytes = 0.0
        self.power_capped_seconds = 0.0
        self.history: deque[_Piece] = deque()
        self.last_sample_ns = start_ns
        self.last_sample_totals = (0.0, 0.0, 0.0)  # integrated sm, tensor, dram seconds at last sample
        self.integrated = [0.0, 0.0, 0.0]
        self.has_sampled = False
        # Before the first advance there is no piece: the board idles.
        self.idle_demand_watts = power_demand_watts(spec, IDLE)
        self.idle_power_watts = min(self.idle_demand_watts, enforced_limit_watts)
        # What _run computes from its activity alone, for the activity it was last given: (activity,
        # demand W, drawn W, steady temperature C). Activities are immutable and a stretch is integrated
        # in many steps (one per sample), so the model is evaluated once per stretch, not per step.
        self._model: tuple[Activity, float, float, float] | None = None
        # (dt s, exp(-dt / tau)) for the last step length: steps are mostly one sample interval long.
        self._decay: tuple[float, float] = (math.nan, math.nan)

    def power_watts(self, activity: Activity) -> float:
        return min(power_demand_watts(self.spec, activity), self.enforced_limit_watts)

    def advance(self, to_ns: int, segments: list[ActivitySegment]) -> None:
        """Integrate from now to ``to_ns``; ``segments`` cover that span (gaps idle)."""
        t = self.now_ns
        for seg in segments:
            if seg.start_ns > t:
                self._run(t, seg.start_ns, IDLE)
            self._run(max(t, seg.start_ns), seg.end_ns, seg.activity)
            t = max(t, seg.end_ns)
        if t < to_ns:
            self._run(t, to_ns, IDLE)
        self.now_ns = max(self.now_ns, to_ns)
        horizon = self.now_ns - HISTORY_NS
        while self.history and self.history[0].end_ns < horizon:
            self.history.popleft()

    def _run(self, start_ns: int, end_ns: int, activity: Activity) -> None:
        if end_ns <= start_ns:
            return
        dt = (end_ns - start_ns) / NS_PER_S
        model = self._model
        if model is None or model[0] is not activity:
            model = self._model = self._power_model(activity)
        _, demand, power, steady = model
        last = self.history[-1] if self.history else None
        if last is not None and last.end_ns == start_ns and (last.activity is activity or last.activity == activity):
            last.end_ns = end_ns  # same state continues: extend instead of adding a piece
        else:
            self.history.append(_Piece(start_ns, end_ns, activity, power, self.true_energy_joules, demand))
        self.true_energy_joules += power * dt
        if demand > self.enforced_limit_watts:
            self.power_capped_seconds += dt
        self.pcie_transmit_bytes += activity.pcie_transmit_bytes_per_second * dt
        self.pcie_receive_bytes += activity.pcie_receive_bytes_per_second * dt
        self.integrated[0] += activity.sm * dt
        self.integrated[1] += activity.tensor * dt
        self.integrated[2] += activity.dram * dt
        # First-order lag toward the steady temperature for this power: exact for constant power.
        decay_dt, decay = self._decay
        if dt != decay_dt:
            decay = math.exp(-dt / self.spec.thermal_time_constant_seconds)
            self._decay = (dt, decay)
        self.temperature_celsius = steady + (self.temperature_celsius - steady) * decay

    def _power_model(self, activity: Activity) -> tuple[Activity, float, float, float]:
        """``(activity, demand W, drawn W, steady temperature C)``: what _run needs of an activity."""
        demand = power_demand_watts(self.spec, activity)
        power = min(demand, self.enforced_limit_watts)
        return activity, demand, power, self.spec.ambient_celsius + self.spec.celsius_per_watt * power

    def energy_at(self, ns: int) -> float:
        """True energy (J) at time ``ns`` within the kept history."""
        for piece in reversed(self.history):
            if piece.start_ns <= ns:
                span_ns = min(ns, piece.end_ns) - piece.start_ns
                return piece.energy_before_joules + piece.power_watts * span_ns / NS_PER_S
        return self.history[0].energy_before_joules if self.history else self.true_energy_joules

    def busy_means(self, start_ns: int) -> tuple[float, float]:
        """Time-weighted means of the ``gpu`` and ``dram`` activity over [start_ns, now)."""
        span = self.now_ns - start_ns
        if span <= 0:
            return 0.0, 0.0
        gpu_total = dram_total = 0.0
        for piece in reversed(self.history):
            if piece.end_ns <= start_ns:
                break
            overlap = piece.end_ns - max(piece.start_ns, start_ns)
            gpu_total += overlap * piece.activity.gpu
            dram_total += overlap * piece.activity.dram
        return gpu_total / span, dram_total / span

    def current_activity(self) -> Activity:
        return self.history[-1].activity if self.history else IDLE

    def stretch_figures(self) -> tuple[Activity, float, float, int | float, frozenset[str], float]:
        """``(activity, demand W, drawn W, SM clock Hz, throttle reasons, HBM temperature offset C)`` now:
        the figures a sample reads that stay the same for as long as the newest piece lasts, worked out
        once per piece (a piece spans many samples)."""
        last = self.history[-1] if self.history else None
        if last is not None and last.figures is not None:
            return last.figures
        figures = self._figures(*self.current_state())
        if last is not None:
            last.figures = figures
        return figures

    def _figures(self, activity: Activity, demand: float, power: float) -> tuple:
        spec, limit = self.spec, self.enforced_limit_watts
        capped = demand > limit
        idle = activity.gpu == 0.0
        if idle:
            sm_clock = spec.sm_clock_idle_hertz
        elif capped:
            headroom = (limit - spec.idle_power_watts) / (demand - spec.idle_power_watts)
            sm_clock = spec.sm_clock_idle_hertz + (spec.sm_clock_max_hertz - spec.sm_clock_idle_hertz) * headroom
        else:
            sm_clock = spec.sm_clock_max_hertz
        hbm_offset = spec.hbm_offset_celsius * (activity.dram if activity.dram else 0.25)
        return activity, demand, power, sm_clock, _THROTTLE_REASONS[idle, capped], hbm_offset

    def current_state(self) -> tuple[Activity, float, float]:
        """``(activity, demand W, drawn W)`` now: the newest piece's, kept when it was integrated, so a
        sample does not compute the power model again."""
        if self.history:
            last = self.history[-1]
            return last.activity, last.demand_watts, last.power_watts
        return IDLE, self.idle_demand_watts, self.idle_power_watts


class MockGpuBackend(FixedGpuBackend):
    """Simulated GPUs behind the GpuBackend protocol. Deterministic for a given clock and source."""

    name = "mock"
    simulated = True

    def __init__(
        self,
        count: int = 1,
        preset: str = "h100-sxm-80gb",
        activity: ActivitySource | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        faults: Sequence[Fault] = (),
        delay_s: float = 0.0,
        power_limit_watts: float | None = None,
        processes: ScriptedProcesses | None = None,
        process_interval_s: float = 1.0,
    ):
        """``processes``: simulated compute processes (None: none scripted; then the samples list processes
        only when ``activity`` knows the workloads', see ``lists_processes``); ``process_interval_s``: how
        often the lists are refreshed, as NvmlBackend's."""
        if not 1 <= count <= 64:
            raise ValueError("the mock simulates 1 to 64 GPUs")
        self.spec = lookup_preset(preset)
        if any(f.kind == "init_failure" for f in faults):
            raise ProbeUnavailable("NVML failed to initialise (simulated init_failure fault)")
        limit = self.spec.power_limit_watts if power_limit_watts is None else power_limit_watts
        if not 0 < limit <= self.spec.power_limit_watts:
            raise ValueError(f"power limit must be in (0, {self.spec.power_limit_watts:g}] W for {preset}")
        self._clock_ns = clock_ns
        self._delay_ns = round(delay_s * NS_PER_S)
        self._source = activity
        self._workload_lister = getattr(activity, "workload_processes", None)
        self._faults = tuple(faults)
        self._fired: set[int] = set()  # energy_reset faults already applied
        start = self._sim_now()
        self._start_ns = start
        self._scripted = processes
        # Always there (with an empty script when none is given): the source that lists workloads' processes
        # may be set later (set_activity_source), and the lists need their refresh times from the start.
        self._processes = ProcessSimulation(
            ScriptedProcesses(()) if processes is None else processes, start, count, process_interval_s)
        self._gpus = [_SimulatedGpu(i, self.spec, start, limit) for i in range(count)]
        self._unsupported: dict[int, frozenset[str]] = {i: frozenset() for i in range(count)}
        self._infos = [
            GpuInfo(
                index=i,
                uuid="GPU-" + str(uuid5(NAMESPACE_URL, f"wattledger-mock/{preset}/{i}")),
                model_name=self.spec.model_name,
                driver_version="simulated",
                memory_total_bytes=self.spec.memory_total_bytes,
                power_limit_default_watts=self.spec.power_limit_watts,
                simulated=True,
                pci_bus_id=f"00000000:{0x18 + i:02X}:00.0",
            )
            for i in range(count)
        ]

    def _sim_now(self) -> int:
        return self._clock_ns() - self._delay_ns

    def set_activity_source(self, source: ActivitySource) -> None:
        self._source = source
        self._workload_lister = getattr(source, "workload_processes", None)

    @property
    def lists_processes(self) -> bool:
        """Whether samples carry process lists: processes are scripted, or the activity source lists the
        registered workloads' (``WorkloadProcessSource``); else ``processes`` is None, unsupported."""
        return self._scripted is not None or self._workload_lister is not None

    @property
    def activity_source(self) -> ActivitySource | None:
        """What drives the simulated devices (the agent's span source, a script, or None: idle)."""
        return self._source

    @property
    def lag_seconds(self) -> float:
        """How far behind its clock the mock simulates (``delay_s``): spans arriving within it count."""
        return self._delay_ns / NS_PER_S

    def devices(self) -> list[GpuInfo]:
        return list(self._infos)

    @property
    def scripted_processes(self) -> ScriptedProcesses | None:
        """The simulated processes (``mean_sm_share`` is their ground truth), or None."""
        return self._scripted

    def scripted_owner_labels(self) -> dict[int, dict[str, str]]:
        """pid -> the owner labels scripted for it (for agent/owners.py's ScriptedOwnerResolver); {} when
        no process is scripted."""
        return {} if self._scripted is None else self._scripted.owner_labels()

    def true_energy_joules(self, index: int) -> float:
        """Ground truth: the exact simulated energy of a device since the backend started."""
        return self._gpus[index].true_energy_joules

    def _apply_faults(self, now_ns: int) -> None:
        """Fires energy resets that are due and sets which fields read as unsupported now.

        Called once per ``sample()``, after every device has been advanced to ``now_ns``, so a reset
        finds each device's energy at the reset time in its history."""
        elapsed_s = (now_ns - self._start_ns) / NS_PER_S
        for number, fault in enumerate(self._faults):
            if fault.kind != "energy_reset" or number in self._fired or fault.at_s > elapsed_s:
                continue
            reset_ns = self._start_ns + round(fault.at_s * NS_PER_S)
            for gpu in self._gpus:
                if fault.applies_to(gpu.index):
                    gpu.counter_base_joules = gpu.energy_at(reset_ns)
                    gpu.counter_reset_ns = reset_ns
            self._fired.add(number)
        for gpu in self._gpus:
            self._unsupported[gpu.index] = frozenset(
                f.field for f in self._faults
                if f.kind == "field_unsupported" and f.applies_to(gpu.index) and f.active(elapsed_s)
            )

    def _is_lost(self, index: int, now_ns: int) -> bool:
        elapsed_s = (now_ns - self._start_ns) / NS_PER_S
        return any(f.kind == "gpu_lost" and f.applies_to(index) and f.active(elapsed_s) for f in self._faults)

    def sample(self) -> list[GpuSample]:
        now = self._sim_now()
        for gpu in self._gpus:
            if now > gpu.now_ns:
                segments = self._source.segments(gpu.index, gpu.now_ns, now) if self._source else []
                if self._scripted is not None:
                    segments = self._processes.with_segments(gpu.index, gpu.now_ns, now, segments)
                gpu.advance(now, segments)
        if self._faults:
            self._apply_faults(now)
        samples = []
        for gpu, info in zip(self._gpus, self._infos):
            if self._faults and self._is_lost(gpu.index, now):
                gpu.has_sampled = False  # GPM-style ratios restart after the device comes back
                if self.lists_processes:
                    self._processes.forget(gpu.index)  # as NVML's list and per-process samples are
                samples.append(GpuSample(index=gpu.index, uuid=info.uuid, monotonic_ns=gpu.now_ns, up=False))
                continue
            samples.append(self._read(gpu, info))
        return samples

    @staticmethod
    def _energy_counter_mj(gpu: _SimulatedGpu, now_ns: int) -> int:
        """The hardware counter: energy since the last reset at the newest 100 ms boundary, whole mJ.

        It is never negative: between a reset and the first boundary after it the counter reads 0, as a
        counter that restarted and has not ticked yet does (the reset time is not on the 100 ms grid)."""
        boundary = now_ns - now_ns % ENERGY_COUNTER_PERIOD_NS
        if gpu.counter_reset_ns is not None and boundary <= gpu.counter_reset_ns:
            return 0
        return max(0, math.floor((gpu.energy_at(boundary) - gpu.counter_base_joules) * 1000.0))

    def _read(self, gpu: _SimulatedGpu, info: GpuInfo) -> GpuSample:
        spec = self.spec
        now = gpu.now_ns
        counter_mj = self._energy_counter_mj(gpu, now)
        window_start = max(now - BOXCAR_NS, self._start_ns)
        # The newest piece's power figures, as _run computed them (no second evaluation of the model),
        # and what follows from them.
        activity, demand, power, sm_clock, throttle_reasons, hbm_offset = gpu.stretch_figures()
        average_power = (
            (gpu.true_energy_joules - gpu.energy_at(window_start)) * NS_PER_S / (now - window_start)
            if now > window_start else gpu.idle_power_watts
        )
        since_sample = gpu.has_sampled and now > gpu.last_sample_ns
        window = now - gpu.last_sample_ns if since_sample else FIRST_UTILIZATION_WINDOW_NS
        util_start = max(now - min(window, MAX_UTILIZATION_WINDOW_NS), self._start_ns)
        utilization_gpu, utilization_dram = gpu.busy_means(util_start)
        integrated = gpu.integrated
        if since_sample:
            span_s = (now - gpu.last_sample_ns) / NS_PER_S
            before = gpu.last_sample_totals
            sm = (integrated[0] - before[0]) / span_s
            tensor = (integrated[1] - before[1]) / span_s
            dram = (integrated[2] - before[2]) / span_s
            occupancy = 0.5 * sm  # ASSUMPTION: half the warp slots
        else:
            sm = tensor = dram = occupancy = None  # GPM needs two samples
        gpu.last_sample_ns = now
        gpu.last_sample_totals = (integrated[0], integrated[1], integrated[2])
        gpu.has_sampled = True
        allocated = self._source.allocated_bytes(gpu.index) if self._source else 0
        processes = None
        if self._scripted is not None:
            allocated += self._processes.memory_bytes(gpu.index, now)
        if self._scripted is not None or self._workload_lister is not None:
            # Workloads add no memory here: allocated_bytes already holds what they declared.
            processes = self._processes.process_list(gpu.index, now, self._workload_lister)
        temperature = round(gpu.temperature_celsius, 1)
        # Keyword arguments straight into the constructor: a dict of them built and unpacked per sample
        # was a fifth of the mock's cost.
        sample = GpuSample(
            index=gpu.index,
            uuid=info.uuid,
            monotonic_ns=now,
            utilization_gpu_ratio=utilization_gpu,
            utilization_memory_controller_ratio=utilization_dram,
            sm_activity_ratio=sm,
            sm_occupancy_ratio=occupancy,
            tensor_activity_ratio=tensor,
            dram_activity_ratio=dram,
            memory_used_bytes=min(allocated, spec.memory_total_bytes - spec.memory_reserved_bytes),
            memory_total_bytes=spec.memory_total_bytes,
            memory_reserved_bytes=spec.memory_reserved_bytes,
            power_watts=power,
            power_average_watts=average_power,
            energy_joules=counter_mj / 1000.0,
            power_limit_watts=gpu.enforced_limit_watts,
            sm_clock_hertz=sm_clock,
            memory_clock_hertz=spec.memory_clock_hertz,
            temperature_gpu_celsius=temperature,
            temperature_memory_celsius=round(temperature + hbm_offset, 1),
            pcie_transmit_bytes=int(gpu.pcie_transmit_bytes),
            pcie_receive_bytes=int(gpu.pcie_receive_bytes),
            throttle_reasons=throttle_reasons,
            throttle_seconds={"sw_power_cap": gpu.power_capped_seconds},
            ecc_corrected_errors=0,
            ecc_uncorrected_errors=0,
            processes=processes,
        )
        unsupported = self._unsupported[gpu.index]
        if unsupported:  # a field_unsupported fault: rare, so a second construction is no cost
            sample = replace(sample, **dict.fromkeys(unsupported))
        return sample

    def field_status(self, index: int) -> list[FieldStatus]:
        unsupported = self._unsupported[index]
        statuses = [
            FieldStatus(name, name not in unsupported, "simulated field_unsupported fault" if name in unsupported else None)
            for name in FAULTABLE_FIELDS
        ]
        if not self.lists_processes:
            statuses.append(FieldStatus("processes", False, "no processes scripted for the mock"))
        else:
            statuses += [FieldStatus("processes", True), FieldStatus("process_utilization", True)]
        statuses += [
            FieldStatus("nvlink", False, "the mock simulates a single PCIe GPU"),
            FieldStatus("mig", False, "the mock does not simulate MIG"),
            FieldStatus("xid_events", False, "the mock does not simulate XID events"),
        ]
        return statuses

    def close(self) -> None:
        pass
