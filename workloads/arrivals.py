"""Request arrival times for the chat workload: a daily cycle, and bursts within it. Pure Python.

The rate follows a compressed day::

    lambda(t) = mean * w(day) * (1 + A * cos(2 pi (u(t) - peak))),   A = (R - 1) / (R + 1)

where ``u(t) = start_day + start_fraction + t / day_seconds`` is the position in simulated days, ``R`` the
peak/trough ratio, ``peak`` the fraction of the day where the rate peaks (the trough is half a day away) and
``w`` the weekend factor on days 5 and 6 of each week (1 on weekdays).

Within that rate, arrivals are drawn in *operational time* ``s = Lambda(t)`` (the integral of lambda, so one
unit of ``s`` holds one expected arrival) by a stationary process of unit rate, and mapped back through
``Lambda^-1``. The local rate then follows lambda(t) and the inter-arrival gaps, rescaled by the rate
(``Lambda(t_i) - Lambda(t_i-1)``), have the stationary process's CV whatever the time of day:

- ``conversation``: a Gamma renewal process, shape ``k = 1 / CV^2``.
- ``api``: an on/off source (an interrupted Poisson process): exponential on periods holding Poisson
  arrivals, silent exponential off periods. Its gap CV is ``sqrt(1 + 2 B (1 - f)^2)`` for ``B`` arrivals
  per on period and ``f`` the share of time on, which is solved for ``B`` to hit the target CV.
"""

from __future__ import annotations

import bisect
import math
import random
import statistics
from dataclasses import dataclass

TRAFFIC_KINDS: tuple[str, ...] = ("conversation", "api")

# Azure LLM inference trace 2023, conversation (computed; docs/workload-figures.md, "Chat"):
# 5.53 requests/s over 58 min, inter-arrival CV 1.09. The Gamma shape is 1/CV^2 = 0.84 (a moment fit that
# matches the CV; the reference's "shape about 0.87" is a different fit of the same gaps).
CONVERSATION_MEAN_RATE_PER_S = 5.53
CONVERSATION_CV = 1.09
# Azure LLM inference trace 2023, code (computed): inter-arrival CV 13.2, 73% of 1 s windows empty, gaps up
# to 217 s. ASSUMPTION: the empty share is read as the share of time the source is off (at the trace's rate
# an on second almost always holds an arrival), so the source is on 27% of the time.
API_CV = 13.2
API_ON_FRACTION = 0.27
# Azure LLM inference trace 2024 (read from plots): conversation peak/trough about 2.5x (code about 10x);
# weekends about 0.3-0.5 of weekdays (off by default: a compressed day is usually a weekday).
DEFAULT_PEAK_TROUGH_RATIO = 2.5
WEEKEND_DAYS: tuple[int, ...] = (5, 6)
# Past this the trough rate is so close to zero that Lambda^-1 loses precision; real traces stay near 10.
MAX_PEAK_TROUGH_RATIO = 1000.0

TWO_PI = 2.0 * math.pi


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ArrivalConfig:
    """The arrival process. Times are wall-clock seconds from the start of the run.

    ``mean_rate_per_s`` is the weekday mean (requests per second averaged over a day); ``day_seconds`` is
    how long one simulated day lasts; ``peak_fraction`` and ``start_fraction`` are positions in the day
    (0 to 1: with the defaults, peak at mid-day and the run starts at the trough); ``start_day`` is the day
    of the week at the start (0-6; days 5 and 6 are the weekend). ``cv`` is the target CV of the
    rate-rescaled gaps (None: the source's figure for the traffic kind); ``on_fraction`` is the api
    source's share of time on.
    """

    mean_rate_per_s: float = CONVERSATION_MEAN_RATE_PER_S
    day_seconds: float = 600.0
    peak_trough_ratio: float = DEFAULT_PEAK_TROUGH_RATIO
    peak_fraction: float = 0.5
    start_fraction: float = 0.0
    start_day: int = 0
    weekend_factor: float = 1.0
    traffic: str = "conversation"
    cv: float | None = None
    on_fraction: float = API_ON_FRACTION

    def __post_init__(self) -> None:
        if _finite("mean rate", self.mean_rate_per_s) <= 0:
            raise ValueError(f"mean rate must be positive (requests per second), got {self.mean_rate_per_s}")
        if _finite("day length", self.day_seconds) <= 0:
            raise ValueError(f"day length must be positive seconds, got {self.day_seconds}")
        if not 1 <= _finite("peak/trough ratio", self.peak_trough_ratio) <= MAX_PEAK_TROUGH_RATIO:
            raise ValueError(f"peak/trough ratio must be within [1, {MAX_PEAK_TROUGH_RATIO:g}] (1 = flat), "
                             f"got {self.peak_trough_ratio}")
        for name, value in (("peak fraction", self.peak_fraction), ("start fraction", self.start_fraction)):
            if not 0 <= _finite(name, value) < 1:
                raise ValueError(f"{name} must be a position in the day, 0 <= x < 1, got {value}")
        if isinstance(self.start_day, bool) or not isinstance(self.start_day, int) or not 0 <= self.start_day <= 6:
            raise ValueError(f"start day must be a day of the week 0-6 (5 and 6 are the weekend), "
                             f"got {self.start_day!r}")
        if _finite("weekend factor", self.weekend_factor) <= 0:
            raise ValueError(f"weekend factor must be positive (1 = no weekend dip), got {self.weekend_factor}")
        if self.traffic not in TRAFFIC_KINDS:
            raise ValueError(f"traffic must be one of {', '.join(TRAFFIC_KINDS)}, got {self.traffic!r}")
        if self.cv is not None:
            cv = _finite("cv", self.cv)
            if self.traffic == "conversation" and cv <= 0:
                raise ValueError(f"cv must be positive, got {cv}")
            if self.traffic == "api" and cv <= 1:
                raise ValueError(f"cv of an on/off source must exceed 1 (1 is Poisson), got {cv}")
        if not 0 < _finite("on fraction", self.on_fraction) < 1:
            raise ValueError(f"on fraction must be between 0 and 1 (exclusive), got {self.on_fraction}")

    # -- the rate ---------------------------------------------------------------------------------------

    @property
    def amplitude(self) -> float:
        """A = (R - 1) / (R + 1): the cosine's relative swing around the mean."""
        return (self.peak_trough_ratio - 1.0) / (self.peak_trough_ratio + 1.0)

    @property
    def target_cv(self) -> float:
        if self.cv is not None:
            return self.cv
        return CONVERSATION_CV if self.traffic == "conversation" else API_CV

    @property
    def gamma_shape(self) -> float:
        """Shape k = 1 / CV^2 of the conversation renewal process (mean gap 1 in operational time)."""
        return 1.0 / self.target_cv ** 2

    @property
    def burst_size(self) -> float:
        """Mean arrivals per on period of the api source: B = (CV^2 - 1) / (2 (1 - f)^2)."""
        return (self.target_cv ** 2 - 1.0) / (2.0 * (1.0 - self.on_fraction) ** 2)

    @property
    def start_position(self) -> float:
        """Simulated days since the start of the week at t = 0."""
        return self.start_day + self.start_fraction

    def day_weight(self, day: int) -> float:
        return self.weekend_factor if day % 7 in WEEKEND_DAYS else 1.0

    def position(self, t: float) -> float:
        """Simulated days since the start of the week at ``t`` seconds into the run."""
        return self.start_position + t / self.day_seconds

    def rate_at(self, t: float) -> float:
        """lambda(t), requests per second at ``t`` seconds into the run."""
        u = self.position(t)
        return self.mean_rate_per_s * self.day_weight(math.floor(u)) * (
            1.0 + self.amplitude * math.cos(TWO_PI * (u - self.peak_fraction)))

    def _shape_integral(self, u: float) -> float:
        """F(u) = integral over [0, u] (days) of w(day) (1 + A cos 2 pi (x - peak)) dx, u >= 0.

        Each full day contributes its weight (the cosine integrates to zero over a day), so F is O(1).
        """
        day = math.floor(u)
        weeks, rest = divmod(day, 7)
        weekend_days = 2 * weeks + max(0, rest - WEEKEND_DAYS[0])
        full_days = day + (self.weekend_factor - 1.0) * weekend_days
        a, p = self.amplitude, self.peak_fraction
        partial = (u - day) + a / TWO_PI * (math.sin(TWO_PI * (u - p)) - math.sin(TWO_PI * (day - p)))
        return full_days + self.day_weight(day) * partial

    def _density(self, u: float) -> float:
        return self.day_weight(math.floor(u)) * (1.0 + self.amplitude * math.cos(TWO_PI * (u - self.peak_fraction)))

    def cumulative(self, t: float) -> float:
        """Lambda(t): expected arrivals in [0, t] (the operational time of ``t``)."""
        scale = self.mean_rate_per_s * self.day_seconds
        return scale * (self._shape_integral(self.position(t)) - self._shape_integral(self.start_position))

    def inverse_cumulative(self, s: float, after: float = 0.0) -> float:
        """Lambda^-1(s): the time by which ``s`` arrivals are expected. ``after`` is a time known to lie
        at or before the answer (the previous arrival), which keeps sequential inversion short.

        Safeguarded Newton on F: the density is at least min(w) (1 - A) > 0, which gives a bracket.
        """
        scale = self.mean_rate_per_s * self.day_seconds
        target = self._shape_integral(self.start_position) + s / scale
        lo = self.position(max(0.0, after))
        f_lo = self._shape_integral(lo)
        if f_lo > target:
            lo = self.start_position
            f_lo = self._shape_integral(lo)
        min_density = min(1.0, self.weekend_factor) * (1.0 - self.amplitude)
        hi = lo + (target - f_lo) / min_density
        x = min(hi, lo + (target - f_lo) / self._density(lo))
        tolerance = 1e-13 * max(1.0, target)
        for _ in range(100):
            error = self._shape_integral(x) - target
            if abs(error) <= tolerance:
                break
            if error > 0:
                hi = x
            else:
                lo = x
            step = x - error / self._density(x)
            x = step if lo < step < hi else 0.5 * (lo + hi)
            if hi - lo <= 1e-15 * max(1.0, hi):
                break
        return (x - self.start_position) * self.day_seconds


# -- generation ----------------------------------------------------------------------------------------


def _gamma_renewal(config: ArrivalConfig, horizon: float, rng: random.Random) -> list[float]:
    """Unit-rate Gamma renewal points in [0, horizon), started in equilibrium."""
    k = config.gamma_shape
    # The first point is the residual of a gap straddling 0: uniform times a length-biased gap, and the
    # length-biased Gamma(k, 1/k) is Gamma(k + 1, 1/k). Without it a run starts with an arrival pattern
    # no later instant has.
    s = rng.random() * rng.gammavariate(k + 1.0, 1.0 / k)
    points = []
    while s < horizon:
        points.append(s)
        s += rng.gammavariate(k, 1.0 / k)
    return points


def _on_off(config: ArrivalConfig, horizon: float, rng: random.Random) -> list[float]:
    """Unit-rate interrupted Poisson points in [0, horizon), started in equilibrium.

    On periods last Exp(mean B f), off periods Exp(mean B (1 - f)), arrivals come at rate 1/f while on,
    so the long-run rate is 1 and a gap's CV^2 is 1 + 2 B (1 - f)^2 (after an arrival the source is on;
    the gap is the on time to the next arrival, Exp(1/f), plus the off periods that interrupt it, a
    geometric number with mean 1/B).
    """
    f, burst = config.on_fraction, config.burst_size
    mean_on, mean_off, on_rate = burst * f, burst * (1.0 - f), 1.0 / f
    points: list[float] = []
    s = 0.0
    on = rng.random() < f  # exponential periods are memoryless, so the residual has the same law
    while s < horizon:
        if on:
            period_end = s + rng.expovariate(1.0 / mean_on)
            s += rng.expovariate(on_rate)
            while s < period_end and s < horizon:
                points.append(s)
                s += rng.expovariate(on_rate)
            s = period_end
        else:
            s += rng.expovariate(1.0 / mean_off)
        on = not on
    return points


def generate_arrivals(config: ArrivalConfig, duration_s: float, rng: random.Random) -> list[float]:
    """Arrival times in [0, duration_s), seconds from the start, sorted."""
    if _finite("duration", duration_s) <= 0:
        raise ValueError(f"duration must be positive seconds, got {duration_s}")
    horizon = config.cumulative(duration_s)
    points = (_gamma_renewal if config.traffic == "conversation" else _on_off)(config, horizon, rng)
    arrivals = []
    previous = 0.0
    for s in points:
        previous = config.inverse_cumulative(s, after=previous)
        arrivals.append(previous)
    return [t for t in arrivals if t < duration_s]


# -- what tests and reports measure ----------------------------------------------------------------------


def rescaled_gaps(arrivals: list[float], config: ArrivalConfig) -> list[float]:
    """Gaps in operational time, Lambda(t_i) - Lambda(t_i-1): mean 1 whatever the time of day."""
    operational = [config.cumulative(t) for t in arrivals]
    return [b - a for a, b in zip(operational, operational[1:])]


def interarrival_cv(arrivals: list[float], config: ArrivalConfig) -> float | None:
    """CV (standard deviation / mean) of the rate-rescaled gaps; None with fewer than three arrivals."""
    gaps = rescaled_gaps(sorted(arrivals), config)
    if len(gaps) < 2:
        return None
    mean = statistics.fmean(gaps)
    return statistics.pstdev(gaps, mean) / mean if mean > 0 else None


def _window_weights(config: ArrivalConfig, a: float, b: float) -> tuple[float, float]:
    """Integrals over [a, b] (days) of w(day) and of w(day) cos 2 pi (u - peak), split at midnights."""
    length = cosine = 0.0
    p = config.peak_fraction
    while a < b:
        day = math.floor(a)
        end = min(b, day + 1.0)
        weight = config.day_weight(day)
        length += weight * (end - a)
        cosine += weight * (math.sin(TWO_PI * (end - p)) - math.sin(TWO_PI * (a - p))) / TWO_PI
        a = end
    return length, cosine


def peak_trough_ratio(arrivals: list[float], config: ArrivalConfig, duration_s: float | None = None,
                      half_width: float = 1.0 / 24.0, corrected: bool = True) -> float:
    """The peak/trough ratio the arrivals show, from counts in windows of +- ``half_width`` days around
    every peak and every trough inside [0, duration_s] (default: up to the last arrival).

    Uncorrected, it is (peak count / peak window length) / (trough count / trough window length), lengths
    weighted by the weekend factor; that reads a little low because a window averages the cosine over its
    width. Corrected (default), the amplitude A is solved from the two counts, each expected to be
    mean (L + A C) with L the window length and C the integral of the cosine over it, and R = (1+A)/(1-A).
    """
    if not 0 < half_width < 0.25:
        raise ValueError(f"half width must be between 0 and a quarter day, got {half_width}")
    if not arrivals:
        raise ValueError("no arrivals to measure")
    duration = duration_s if duration_s is not None else max(arrivals)
    start, end = config.start_position, config.position(duration)
    sums = {"peak": [0.0, 0.0], "trough": [0.0, 0.0]}
    for kind, offset in (("peak", 0.0), ("trough", 0.5)):
        centre = config.peak_fraction + offset + math.floor(start - half_width - config.peak_fraction - offset)
        while centre - half_width < end:
            a, b = max(start, centre - half_width), min(end, centre + half_width)
            if b > a:
                length, cosine = _window_weights(config, a, b)
                sums[kind][0] += length
                sums[kind][1] += cosine
            centre += 1.0
    (peak_length, peak_cosine), (trough_length, trough_cosine) = sums["peak"], sums["trough"]
    if peak_length <= 0 or trough_length <= 0:
        raise ValueError("the arrivals span no peak window or no trough window")
    peak_count = trough_count = 0
    positions = sorted(config.position(t) for t in arrivals if 0 <= t <= duration)
    for u in positions:
        phase = (u - config.peak_fraction + 0.5) % 1.0 - 0.5  # in [-0.5, 0.5): 0 at the peak
        if abs(phase) <= half_width:
            peak_count += 1
        elif abs(phase) >= 0.5 - half_width:
            trough_count += 1
    if trough_count == 0:
        return math.inf
    if not corrected:
        return (peak_count / peak_length) / (trough_count / trough_length)
    denominator = peak_count * trough_cosine - trough_count * peak_cosine
    amplitude = (trough_count * peak_length - peak_count * trough_length) / denominator if denominator else 0.0
    if amplitude >= 1:
        return math.inf
    return (1.0 + amplitude) / (1.0 - amplitude)


def expected_counts(config: ArrivalConfig, edges: list[float]) -> list[float]:
    """Expected arrivals between consecutive ``edges`` (seconds), Lambda(b) - Lambda(a)."""
    values = [config.cumulative(t) for t in edges]
    return [b - a for a, b in zip(values, values[1:])]


def counts_between(arrivals: list[float], edges: list[float]) -> list[int]:
    """Observed arrivals between consecutive ``edges`` (sorted arrivals)."""
    positions = [bisect.bisect_left(arrivals, t) for t in edges]
    return [b - a for a, b in zip(positions, positions[1:])]
