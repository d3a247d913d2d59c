"""A serving loop's steps on the simulated device's time (issue 14): chat and agentic share it.

The CPU runs the tiny model on lengths scaled down to fit its small cache (``length_scale``: 0.125 for tiny
agentic sessions, 0.193 for tiny chat requests); the simulated device runs the timing preset (8b) on the
trace's lengths. So each computed token stands for ``token_scale`` = k simulated tokens (k = round(1 /
length_scale), at least 1: 8 and 5 for tiny, so the simulated lengths are 1.0 and 0.97 of the trace's,
k x length_scale, the rounding's share): a prefill chunk of n
new and c cached tokens is one of k*n and k*c on the device, and one decode token of a request at context
t is k decode passes at contexts k*t, k*t + 1, ..., k*t + k - 1. A computed step is ONE span on the schedule
(``ScaledStep``): its seconds are the sum of those passes' and its activity their seconds-weighted mean.
With k = 1 that is exactly the computed step (one pass, its own DeviceStep).

Why: with the scaled lengths on the device too, the device did 1/8 of a real request's work per request,
about what the CPU takes for the tiny model's, so a loaded CPU fell 27-36 s behind the schedule. With real
lengths the simulated work per computed token is about k times larger and the CPU has headroom.

The tokens reported to the agent and counted in the summaries are the simulated ones: ``simulated_tokens``
is the one place that multiplies by k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from wattledger.probes.activity import Activity
from wattledger.workloads.common import SimulatedTiming
from wattledger.workloads.device_time import DeviceStep, serving_step_work, simulated_device
from wattledger.workloads.model import model_config
from wattledger.workloads.paced_clock import PacedClock

_ACTIVITY_FIELDS = tuple(f.name for f in dataclasses.fields(Activity))


def token_scale_for(length_scale: float) -> int:
    """Simulated tokens per computed token when the computed lengths are the trace's times ``length_scale``:
    round(1 / length_scale), at least 1 (a scale above 0.5 computes the trace's lengths, near enough)."""
    if not length_scale > 0:
        raise ValueError(f"length scale must be positive, got {length_scale!r}")
    return max(1, round(1.0 / length_scale))


def simulated_tokens(computed_tokens: int, token_scale: int) -> int:
    """The simulated tokens ``computed_tokens`` stand for: THE one multiplication by the token scale (chat
    and agentic report and count every token through it)."""
    return computed_tokens * token_scale


def weighted_activity(parts: Sequence[DeviceStep]) -> Activity:
    """The seconds-weighted mean of the parts' activities: what the device shows over their sum, as the
    mock's counters average an interval (a part of zero seconds weighs nothing)."""
    total = sum(part.seconds for part in parts)
    if total <= 0:
        return parts[0].activity
    return Activity(**{name: sum(getattr(p.activity, name) * p.seconds for p in parts) / total
                       for name in _ACTIVITY_FIELDS})


@dataclass(frozen=True)
class ScaledStep:
    """One computed step on the simulated device: its passes (``parts``: the fused prefill + first decode
    pass, then the k - 1 further decode passes), as one DeviceStep (``step``) and split into prefill and
    decode seconds (the fused pass split by each part's own device time, the further passes all decode)."""

    parts: tuple[DeviceStep, ...]
    step: DeviceStep
    prefill_seconds: float
    decode_seconds: float
    first_pass_seconds: float  # the fused pass: the prefilled requests' first token is out at its end (s)


class SimulatedServing:
    """A serving loop's steps on the simulated device's time (chat and agentic share it).

    ``scaled_step`` gives a computed step's ``ScaledStep`` from its work with the timing preset's shape
    (``SimulatedTiming.timing_preset``, e.g. 8b) at ``token_scale`` times the computed lengths on the
    simulated GPU; ``spend`` costs it on the ``PacedClock`` and returns the span's (start_ns, end_ns). The
    batch composition is the one the CPU model ran, so the control flow is real and the timing the GPU's."""

    def __init__(self, simulation: SimulatedTiming, clock: PacedClock, computed_preset: str, token_scale: int = 1):
        if isinstance(token_scale, bool) or not isinstance(token_scale, int) or token_scale < 1:
            raise ValueError(f"token scale must be a positive integer, got {token_scale!r}")
        self.simulation = simulation
        self.device = simulated_device(simulation.device)
        self.timing_config = model_config(simulation.timing_preset)
        self.clock = clock
        self.computed_preset = computed_preset
        self.token_scale = token_scale
        self.busy_seconds = 0.0  # device seconds spent on compute and transfers (s)
        self.bound_seconds: dict[str, float] = {}  # device seconds by what bound each pass (s)

    def step(self, decode_contexts, prefill_chunks) -> DeviceStep:
        """The ``DeviceStep`` of ONE pass: a decode token per context and (new, cached) prefill chunks, in
        simulated tokens (not scaled here)."""
        return self.device.step(serving_step_work(self.timing_config, list(decode_contexts), list(prefill_chunks)))

    def scaled_step(self, decode_contexts: Sequence[int], prefill_chunks: Sequence[tuple[int, int]],
                    prefill_emits: bool = True) -> ScaledStep:
        """A computed step in computed tokens: a decode token per context (the positions it attends to) and
        (new, cached) prefill chunks. ``prefill_emits``: each chunk's prefill yields a token (its request
        then decodes k - 1 more at contexts k*(new + cached) + j); False for a recompute of dropped KV."""
        k = self.token_scale
        chunks = [(k * new, k * cached) for new, cached in prefill_chunks]
        contexts = [k * context for context in decode_contexts]
        fused = self.step(contexts, chunks)
        prefill_alone = self.step([], chunks).seconds if chunks else 0.0
        decode_alone = self.step(contexts, []).seconds if contexts else 0.0
        share = prefill_alone / (prefill_alone + decode_alone) if prefill_alone + decode_alone > 0 else 0.0
        after_prefill = [new + cached for new, cached in chunks] if prefill_emits else []
        further = tuple(self.step([c + j for c in contexts + after_prefill], []) for j in range(1, k)
                        if contexts or after_prefill)
        parts = (fused, *further)
        return ScaledStep(parts=parts, step=_combined(parts), prefill_seconds=fused.seconds * share,
                          decode_seconds=fused.seconds * (1 - share) + sum(p.seconds for p in further),
                          first_pass_seconds=fused.seconds)

    def spend(self, step: ScaledStep | DeviceStep) -> tuple[int, int]:
        """The device runs the step (a computed step, or one pass) now: its span's scheduled (start_ns,
        end_ns), paced to the wall clock."""
        parts, device_step = (step.parts, step.step) if isinstance(step, ScaledStep) else ((step,), step)
        for part in parts:
            self.bound_seconds[part.bound] = self.bound_seconds.get(part.bound, 0.0) + part.seconds
        return self.spend_seconds(device_step.seconds)

    def spend_seconds(self, seconds: float) -> tuple[int, int]:
        """``seconds`` of device time (a transfer): the span's scheduled (start_ns, end_ns)."""
        self.busy_seconds += seconds
        return self.clock.spend(seconds)

    def summary(self, scheduled_seconds: float, tokens: dict[str, int]) -> dict:
        """The ``simulated_device`` summary key (docs/summary.schema.json): device, presets, pacing, token scale, rates
        (simulated tokens per scheduled second)."""
        per_s = {kind: (count / scheduled_seconds if scheduled_seconds > 0 else None) for kind, count in tokens.items()}
        return {"device": self.device.describe()["name"], "timing_preset": self.simulation.timing_preset,
                "computed_preset": self.computed_preset, **self.clock.report(),
                "device_busy_seconds": self.busy_seconds, "scheduled_seconds": scheduled_seconds,
                "token_scale": self.token_scale,
                "token_scale_note": f"each computed token stands for {self.token_scale} simulated tokens",
                "tokens_per_simulated_second": per_s, "bound_seconds": dict(sorted(self.bound_seconds.items()))}


def _combined(parts: Sequence[DeviceStep]) -> DeviceStep:
    """The passes as one DeviceStep: summed seconds, seconds-weighted activity, the bound of the most
    seconds. One pass is returned as it is (k = 1 reproduces the unscaled step exactly)."""
    if len(parts) == 1:
        return parts[0]
    by_bound: dict[str, float] = {}
    for part in parts:
        by_bound[part.bound] = by_bound.get(part.bound, 0.0) + part.seconds
    return DeviceStep(sum(p.seconds for p in parts), weighted_activity(parts), max(by_bound, key=by_bound.get))
