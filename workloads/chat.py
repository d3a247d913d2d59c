"""Chat serving: open-loop human traffic with a daily cycle, served with continuous batching.

Requests arrive on the wall clock from a diurnal process (``arrivals.py``: Gamma renewal for
conversation, an on/off source for API traffic), with prompt and output lengths from the Azure 2023
conversation tables (``lengths.py``). One loop serves them; at every step it

1. admits waiting requests, first come first served, while the batch has room (``max_batch``) and the KV
   budget holds each one's prompt + output tokens (reserved whole at admission, so nothing is preempted);
2. prefills the admitted prompts in one batched ``forward_cached`` (each with its own length); the first
   output token comes from the prefill logits, which is what time to first token measures;
3. decodes one token for every request that already had its first token (one batched ``forward_cached``
   with one token each, or the static decoder under ``--compile``);
4. reads the sampled tokens back (greedy argmax on the device): the step's one host sync, which a server
   needs anyway to stream tokens. Requests that reached their target length leave and free their slot;
   EOS is ignored, so every output is exactly its target length.

A request admitted at a step joins the decode batch at the next one. With nothing to run the loop sleeps
until the next arrival: no span is reported, the GPU's idle time is the absence of compute.

On the simulated device (``RunOptions.simulation``, issue 14) the loop runs on a ``PacedClock``: each step
still runs the CPU model (tokens, batching), then costs the device time of its work on the simulated GPU
with the timing preset's shape (``simulated_serving.SimulatedServing``), and every decision reads the
scheduled time. Each computed token stands for ``token_scale`` simulated ones (round(1 / length_scale): 5
for tiny), so the simulated requests have the trace's real lengths: a step's prefill chunks at k times
their lengths, fused with the first of k decode passes, is one span (seconds summed, activity weighted by
seconds); the summary splits its time into prefill and decode by each part's own device time, and the
tokens reported and counted are the simulated ones.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from wattledger.workloads.arrivals import (
    CONVERSATION_MEAN_RATE_PER_S,
    DEFAULT_PEAK_TROUGH_RATIO,
    TRAFFIC_KINDS,
    ArrivalConfig,
    generate_arrivals,
    interarrival_cv,
)
from wattledger.workloads.common import RunOptions, percentiles, seed_everything, summary_header
from wattledger.workloads.flags import number_flag, parsed_flag
from wattledger.workloads.lengths import LengthSampler, fitted_scale
from wattledger.workloads.model import KVCache, ModelConfig, StaticDecoder, bucket, build_model
from wattledger.workloads.paced_clock import PacedClock
from wattledger.workloads.reporter import DECODE_ACTIVITY, PREFILL_ACTIVITY, Reporter
from wattledger.workloads.simulated_serving import SimulatedServing, simulated_tokens, token_scale_for

log = logging.getLogger(__name__)

WORKLOAD = "chat"


@dataclass
class ChatConfig:
    """What the chat workload serves, and how.

    Arrivals: ``mean_rate_per_s`` (weekday daily mean, requests/s), one simulated day per ``day_seconds``
    of wall time, ``peak_trough_ratio``, ``peak_fraction`` and ``start_fraction`` (positions in the day;
    the defaults start at the trough), ``weekend_factor`` on days 5 and 6 from ``start_day``, ``traffic``
    ``conversation`` or ``api``. Serving: at most ``max_batch`` requests at once (one cache slot each),
    ``kv_budget_tokens`` (tokens, not bytes: prompt + output reserved per running request; None = the
    whole cache, ``max_batch * max_len``), ``max_len`` per slot (None = the preset's maximum sequence
    length), ``length_scale`` on the length tables (None = the largest that fits ``max_len``).

    ``trace``, when given, replaces generated traffic with explicit (arrival_s, prompt_tokens,
    output_tokens) requests (tests, replays). ``keep_requests`` puts per-request records in the summary.
    ``token_scale``: on the simulated device, simulated tokens per computed token (``simulated_serving``;
    None = round(1 / length_scale) for generated traffic, 1 for a trace); ignored on the CPU's own time.

    Defaults: the tiny preset on two CPU cores at the Azure 2023 conversation rate, starting at the
    trough; serving then takes a fraction of the wall time and the (mock) GPU is mostly idle.
    """

    mean_rate_per_s: float = CONVERSATION_MEAN_RATE_PER_S  # Azure LLM inference trace 2023, conversation
    day_seconds: float = 600.0  # one simulated day in 10 minutes, troughs included
    peak_trough_ratio: float = DEFAULT_PEAK_TROUGH_RATIO  # Azure LLM inference trace 2024 (plots)
    peak_fraction: float = 0.5
    start_fraction: float = 0.0
    weekend_factor: float = 1.0  # Azure 2024: weekends about 0.3-0.5 of weekdays; off by default
    start_day: int = 0
    traffic: str = "conversation"
    max_batch: int = 8  # ASSUMPTION: sized for the tiny preset on CPU; raise it on a GPU
    kv_budget_tokens: int | None = None
    length_scale: float | None = None
    max_len: int | None = None
    trace: tuple[tuple[float, int, int], ...] | None = None
    keep_requests: bool = False
    token_scale: int | None = None
    log_every_s: float = 10.0

    def __post_init__(self) -> None:
        self.arrival_config()  # validates the arrival fields
        _positive_int("max batch", self.max_batch)
        if self.kv_budget_tokens is not None and _positive_int("KV budget", self.kv_budget_tokens) < 2:
            raise ValueError(f"KV budget must hold at least 2 tokens, got {self.kv_budget_tokens}")
        if self.max_len is not None and _positive_int("max length", self.max_len) < 2:
            raise ValueError(f"max length must be at least 2 tokens, got {self.max_len}")
        if self.length_scale is not None:
            LengthSampler(scale=self.length_scale)  # validates it
        if self.token_scale is not None:
            _positive_int("token scale", self.token_scale)
        if not (isinstance(self.log_every_s, (int, float)) and self.log_every_s > 0):
            raise ValueError(f"log interval must be positive seconds, got {self.log_every_s!r}")
        if self.trace is not None:
            self.trace = tuple(tuple(entry) for entry in self.trace)
            for entry in self.trace:
                if (len(entry) != 3 or not isinstance(entry[0], (int, float)) or not math.isfinite(entry[0])
                        or entry[0] < 0 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                               for n in entry[1:])):
                    raise ValueError(f"a trace request is (arrival_s >= 0, prompt >= 1, output >= 1), got {entry!r}")

    def arrival_config(self) -> ArrivalConfig:
        return ArrivalConfig(mean_rate_per_s=self.mean_rate_per_s, day_seconds=self.day_seconds,
                             peak_trough_ratio=self.peak_trough_ratio, peak_fraction=self.peak_fraction,
                             start_fraction=self.start_fraction, start_day=self.start_day,
                             weekend_factor=self.weekend_factor, traffic=self.traffic)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(slots=True)
class _Request:
    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    slot: int = -1
    generated: int = 0
    last_token: int = 0
    admit_step: int = -1
    last_step: int = -1
    admitted_ns: int = 0
    first_token_ns: int = 0
    finished_ns: int = 0

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass
class _Totals:
    prompt: int = 0
    generated: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    prefill_batches: list[int] = field(default_factory=list)
    decode_batches: list[int] = field(default_factory=list)


class _StepClock:
    """Splits a step's wall time (start to the token read-back) into its prefill and decode parts.

    On CPU the forward calls return when done, so the CPU clock between them is the split. On CUDA they
    only queue kernels: events around each part time them on the device, and are read after the step's
    sync (by then they have completed, so reading them waits for nothing).
    """

    def __init__(self, device: torch.device, clock_ns: Callable[[], int] = time.monotonic_ns):
        self.clock_ns = clock_ns
        self.cuda = device.type == "cuda"
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if self.cuda else []
        self.start_ns = self.mid_ns = 0

    def begin(self) -> None:
        self.start_ns = self.clock_ns()
        if self.cuda:
            self.events[0].record()

    def between(self) -> None:
        if self.cuda:
            self.events[1].record()
        else:
            self.mid_ns = self.clock_ns()

    def before_sync(self) -> None:
        if self.cuda:
            self.events[2].record()

    def split(self, end_ns: int, prefilled: bool, decoded: bool) -> int:
        """The moment prefill handed over to decode, given the step ended (tokens read) at ``end_ns``."""
        if not decoded:
            return end_ns
        if not prefilled:
            return self.start_ns
        if not self.cuda:
            return self.mid_ns
        prefill_ms = self.events[0].elapsed_time(self.events[1])
        decode_ms = self.events[1].elapsed_time(self.events[2])
        share = prefill_ms / (prefill_ms + decode_ms) if prefill_ms + decode_ms > 0 else 0.5
        return self.start_ns + round((end_ns - self.start_ns) * share)


def _column(tokens: list[int], device: torch.device) -> torch.Tensor:
    """``[len, 1]`` token ids on ``device``. From pinned memory with a non-blocking copy on CUDA: a plain
    ``torch.tensor(..., device=cuda)`` copies with memcpy_and_sync, which would wait for the prefill."""
    column = torch.tensor(tokens, dtype=torch.long)[:, None]
    if device.type == "cuda":
        return column.pin_memory().to(device, non_blocking=True)
    return column


def _stats(values: list[float]) -> dict[str, float | None]:
    result = percentiles(values)
    result["mean"] = statistics.fmean(values) if values else None
    return result


def _warm_up(model, cache: KVCache, decoder: StaticDecoder | None, max_batch: int, device) -> None:
    """First calls pay for kernel selection, allocator growth and, under --compile, one compilation per
    decode bucket: do them before the clock starts, so the first request's TTFT is a serving figure."""
    widths = sorted({bucket(n) for n in range(1, max_batch + 1)}) if decoder is not None else [max_batch]
    for width in widths:
        batch = min(width, max_batch)
        slots = list(range(batch))
        logits = model.forward_cached(torch.zeros(batch, 4, dtype=torch.long, device=device), [4] * batch,
                                      slots, cache)
        tokens = logits.argmax(-1).tolist()
        if decoder is not None:
            decoder.step(tokens, slots).argmax(-1).tolist()
        else:
            model.forward_cached(_column(tokens, device), [1] * batch, slots, cache).argmax(-1).tolist()
        for slot in slots:
            cache.reset(slot)


@dataclass(frozen=True)
class _Shape:
    """The serving sizes the config resolves to, in tokens (and the length tables' scale)."""

    max_len: int  # per cache slot
    kv_budget: int  # prompt + output tokens the running requests may reserve together
    max_total: int  # one request's prompt + output: it must fit its slot and the budget on its own
    length_scale: float


def _serving_shape(config: ChatConfig, options: RunOptions, model_config: ModelConfig) -> _Shape:
    """The config's sizes with their defaults filled in; ValueError (one line) if the slot outgrows the model."""
    max_len = config.max_len or model_config.max_seq_len
    if max_len > model_config.max_seq_len:
        raise ValueError(f"max length {max_len} exceeds the {options.preset} preset's {model_config.max_seq_len}")
    kv_budget = config.kv_budget_tokens or config.max_batch * max_len
    max_total = min(max_len, kv_budget)
    scale = config.length_scale if config.length_scale is not None else fitted_scale(max_total)
    return _Shape(max_len=max_len, kv_budget=kv_budget, max_total=max_total, length_scale=scale)


def _requests(config: ChatConfig, options: RunOptions, shape: _Shape,
              arrivals_config: ArrivalConfig) -> list[_Request]:
    """The run's requests, in arrival order: the trace's, or drawn from the arrival process and the length
    tables. Seeds torch too (the prompts' token ids come from its generator)."""
    rng = seed_everything(options.seed)
    # Separate streams, so the arrival times do not change with the length settings.
    arrival_rng = random.Random(rng.getrandbits(64))
    length_rng = random.Random(rng.getrandbits(64))
    sampler = LengthSampler(scale=shape.length_scale, max_total=shape.max_total)
    if config.trace is None:
        arrival_times = generate_arrivals(arrivals_config, options.duration_s, arrival_rng)
        return [_Request(i, t, *sampler.sample(length_rng)) for i, t in enumerate(arrival_times)]
    requests = [_Request(i, float(a), p, o) for i, (a, p, o) in enumerate(sorted(config.trace))]
    for request in requests:
        if request.kv_tokens > shape.max_total:
            raise ValueError(f"trace request {request.index} needs {request.kv_tokens} tokens; a slot and "
                             f"the KV budget hold {shape.max_total}")
    return requests


def _arrival_ns(request: _Request) -> int:
    """A request's arrival after the start, in whole ns rounded up: ``arrive`` and ``wake_ns`` compare the
    same integer, so a wait until the next arrival always reaches it (on a schedule that moves only by
    such waits, a float compared with a rounded integer could leave it 1 ns short forever)."""
    return math.ceil(request.arrival_s * 1e9)


class _Queue:
    """The requests from arrival to their last token: ``pending`` (not arrived yet), ``waiting`` (arrived,
    first come first served) and ``running`` (each holding a cache slot and its KV reservation)."""

    def __init__(self, requests: list[_Request], max_batch: int, kv_budget_tokens: int):
        self.total = len(requests)
        self.pending = deque(requests)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.free_slots = list(range(max_batch - 1, -1, -1))
        self.reserved = 0  # KV tokens (prompt + output) reserved by the running requests
        self.max_batch = max_batch
        self.kv_budget_tokens = kv_budget_tokens

    def arrive(self, start_ns: int, now_ns: int) -> None:
        """Move the requests whose arrival time has come to ``waiting``."""
        while self.pending and start_ns + _arrival_ns(self.pending[0]) <= now_ns:
            self.waiting.append(self.pending.popleft())

    def admit(self, now_ns: int, cache: KVCache) -> list[_Request]:
        """Take waiting requests in order while the batch has room and the KV budget holds each one whole."""
        admitted: list[_Request] = []
        while (self.waiting and len(self.running) + len(admitted) < self.max_batch
               and self.reserved + self.waiting[0].kv_tokens <= self.kv_budget_tokens):
            request = self.waiting.popleft()
            request.slot = self.free_slots.pop()
            request.admitted_ns = now_ns
            cache.reset(request.slot)
            self.reserved += request.kv_tokens
            admitted.append(request)
        return admitted

    def wake_ns(self, start_ns: int, end_ns: int) -> int:
        """When an idle server has something to do: the next arrival, or the end."""
        return min(end_ns, start_ns + _arrival_ns(self.pending[0])) if self.pending else end_ns

    def retire(self, served: list[_Request], tokens: list[int], step: int, step_end_ns: int,
               first_token_ns: int | None = None) -> None:
        """Give each served request its token; those at their target length leave and free their slot.
        ``first_token_ns``: when a request's first token was out, if before the step's end (simulated, token
        scale above 1: at the end of the step's first pass)."""
        still_running = []
        for request, token in zip(served, tokens):
            if request.generated == 0:
                request.first_token_ns = step_end_ns if first_token_ns is None else first_token_ns
                request.admit_step = step
            request.generated += 1
            request.last_token = token
            request.last_step = step
            if request.generated == request.output_tokens:
                request.finished_ns = step_end_ns
                self.free_slots.append(request.slot)
                self.reserved -= request.kv_tokens
            else:
                still_running.append(request)
        self.running = still_running


class _Server:
    """The model, its KV cache (one slot per request) and the serving step."""

    def __init__(self, config: ChatConfig, options: RunOptions, model_config: ModelConfig, device: torch.device,
                 dtype: torch.dtype, max_len: int, reporter: Reporter, clock_ns: Callable[[], int]):
        self.device = device
        self.vocab = model_config.vocab_size
        self.max_batch = config.max_batch
        self.model = build_model(model_config, device, dtype, seed=options.seed).eval()
        # The static decoder writes its padding rows into a spare slot that no request owns.
        self.cache = KVCache(model_config, config.max_batch + (1 if options.compile else 0), max_len, device, dtype)
        self.decoder = StaticDecoder(self.model, self.cache, compile=True) if options.compile else None
        weight_bytes = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        self.memory_bytes = weight_bytes + self.cache.nbytes()
        self.reporter = reporter
        self.clock_ns = clock_ns
        self.clock = _StepClock(device, clock_ns)
        self.token_scale = 1  # simulated tokens per computed token (set by the simulated run)
        reporter.set_memory(self.memory_bytes)

    def warm_up(self) -> float:
        """Warm up before the clock starts (see ``_warm_up``), reported as a prefill span; returns its seconds."""
        warm_start = self.clock_ns()
        _warm_up(self.model, self.cache, self.decoder, self.max_batch, self.device)
        warm_end = self.clock_ns()
        self.reporter.span("compute", warm_start, warm_end, PREFILL_ACTIVITY)
        return (warm_end - warm_start) / 1e9

    def simulated_warm_up(self, simulation: SimulatedServing) -> float:
        """Warm up on the CPU, then cost the warm-up's work on the simulated device at the schedule's start
        (its span, a prefill of 4 tokens and a decode for ``max_batch`` requests); returns its device seconds."""
        _warm_up(self.model, self.cache, self.decoder, self.max_batch, self.device)
        # One pass, unscaled: the warm-up is no request, only the server's first kernels.
        device_step = simulation.step([5] * self.max_batch, [(4, 0)] * self.max_batch)
        start_ns, end_ns = simulation.spend(device_step)
        self.reporter.span("compute", start_ns, end_ns, device_step.activity)
        return device_step.seconds

    def step(self, admitted: list[_Request], decoding: list[_Request], totals: _Totals) -> tuple[list[int], int]:
        """Prefill ``admitted``, decode one token for ``decoding``, read the tokens back; report the spans
        and tokens and add them to ``totals``. Returns (the tokens, admitted first, and the read's monotonic ns)."""
        clock, reporter = self.clock, self.reporter
        clock.begin()
        # Announced now (its first span starts here, prefill if any), so an in-process mock GPU counts the
        # step while it runs: a step longer than the mock's lag (seen on a busy host) would come too late.
        reporter.span_started("compute", clock.start_ns, PREFILL_ACTIVITY if admitted else DECODE_ACTIVITY)
        tokens = self._forward(admitted, decoding, clock)
        step_end_ns = self.clock_ns()
        mid_ns = clock.split(step_end_ns, bool(admitted), bool(decoding))
        if admitted:
            reporter.span("compute", clock.start_ns, mid_ns, PREFILL_ACTIVITY)
        if decoding:
            reporter.span("compute", mid_ns, step_end_ns, DECODE_ACTIVITY)
        self._count(admitted, decoding, tokens, totals, (mid_ns - clock.start_ns) / 1e9, (step_end_ns - mid_ns) / 1e9)
        return tokens, step_end_ns

    def simulated_step(self, admitted: list[_Request], decoding: list[_Request], totals: _Totals,
                       simulation: SimulatedServing) -> tuple[list[int], int, int]:
        """``step`` on the simulated device: the CPU computes the tokens, the step costs the device time of
        its work at the token scale (one span: prefill and the first decode pass fused, then the further
        decode passes, ``SimulatedServing.scaled_step``), its time split into prefill and decode by each
        part's own device time. Returns (the tokens, the step's scheduled end and the scheduled time the
        admitted requests' first token was out, in ns)."""
        prefill_chunks = [(r.prompt_tokens, 0) for r in admitted]
        # A decoding request feeds its last token and attends to its prompt and every token generated so far.
        contexts = [r.prompt_tokens + r.generated for r in decoding]
        scaled = simulation.scaled_step(contexts, prefill_chunks)
        self.reporter.span_started("compute", simulation.clock.now_ns(), scaled.step.activity)
        tokens = self._forward(admitted, decoding, None)
        start_ns, end_ns = simulation.spend(scaled)
        self.reporter.span("compute", start_ns, end_ns, scaled.step.activity)
        self._count(admitted, decoding, tokens, totals, scaled.prefill_seconds, scaled.decode_seconds)
        first_token_ns = end_ns if len(scaled.parts) == 1 else start_ns + round(scaled.first_pass_seconds * 1e9)
        return tokens, end_ns, first_token_ns

    def _forward(self, admitted: list[_Request], decoding: list[_Request], clock: _StepClock | None) -> list[int]:
        """The CPU (or GPU) model's step: prefill ``admitted``, decode ``decoding``, read the tokens back."""
        sampled = []
        if admitted:
            # Random prompt ids (content does not matter, lengths do); padding beyond each length is dropped.
            width = max(r.prompt_tokens for r in admitted)
            prompts = torch.randint(0, self.vocab, (len(admitted), width), device=self.device)
            logits = self.model.forward_cached(prompts, [r.prompt_tokens for r in admitted],
                                               [r.slot for r in admitted], self.cache)
            sampled.append(logits.argmax(-1))
        if clock is not None:
            clock.between()
        if decoding:
            last = [r.last_token for r in decoding]
            slots = [r.slot for r in decoding]
            if self.decoder is not None:
                logits = self.decoder.step(last, slots)
            else:
                logits = self.model.forward_cached(_column(last, self.device), [1] * len(decoding), slots, self.cache)
            sampled.append(logits.argmax(-1))
        if clock is not None:
            clock.before_sync()
        # The step's one host sync: the tokens go back to their clients. Spans end after it.
        return (torch.cat(sampled) if len(sampled) > 1 else sampled[0]).tolist()

    def _count(self, admitted: list[_Request], decoding: list[_Request], tokens: list[int], totals: _Totals,
               prefill_s: float, decode_s: float) -> None:
        """Report the step's tokens (after its spans) and add the step to ``totals`` (seconds)."""
        # Both always (each is 0 without its part): under a token scale the admitted requests' further
        # decode passes are decode time even in a step with nothing else decoding.
        totals.prefill_seconds += prefill_s
        totals.decode_seconds += decode_s
        if admitted:
            totals.prefill_batches.append(len(admitted))
        if decoding:
            totals.decode_batches.append(len(decoding))
        # Simulated: each computed token stands for token_scale simulated ones (reported and counted).
        prompt_tokens = simulated_tokens(sum(r.prompt_tokens for r in admitted), self.token_scale)
        generated_tokens = simulated_tokens(len(tokens), self.token_scale)
        self.reporter.add_tokens("prompt", prompt_tokens)
        self.reporter.add_tokens("generated", generated_tokens)
        totals.prompt += prompt_tokens
        totals.generated += generated_tokens


@torch.no_grad()
def run(config: ChatConfig, options: RunOptions, reporter: Reporter, stop: threading.Event | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns) -> dict:
    """Serve for ``options.duration_s`` seconds (or until ``stop``); return the summary.

    Beyond ``summary_header``: requests_arrived / _completed / _dropped_at_end (arrived but unfinished
    when the time ran out), ttft_seconds / tpot_seconds / e2e_seconds ({p50, p90, p99, mean}, from the
    scheduled arrival, queueing included; TPOT over requests with more than one output token),
    batch_size and prefill_batch_size ({mean, max} over decode and prefill steps), steps,
    arrival_rate_per_s (measured) and expected_arrival_rate_per_s (Lambda(T) / T), interarrival_cv
    (rate-rescaled; None for a trace), prompt_ and generated_tokens_per_s, prefill_ / decode_seconds,
    busy_fraction (compute span time / wall time, or device time / scheduled time when simulated; the
    warm-up before the clock starts is reported as a span but counted only in warm_up_seconds), the resolved
    settings, and ``requests`` (per-request records with admission and last step numbers) when
    ``config.keep_requests``.

    ``clock_ns`` is the monotonic clock (ns) that arrivals, the deadline and every span read: the tests pass
    one that advances a fixed amount per reading, so which step a request joins does not depend on how fast
    the host runs the model. An idle wait still sleeps in real time (at most until the next arrival).

    With ``options.simulation`` the loop reads a ``PacedClock`` paced to ``clock_ns`` (the wall clock) and
    sleeping with ``stop.wait``: steps cost the simulated device's time, the figures above are over the
    scheduled time, and ``simulated_device`` holds the pacing report (``SimulatedServing.summary``).
    """
    stop = stop if stop is not None else threading.Event()
    model_config, device, dtype = options.resolve()
    shape = _serving_shape(config, options, model_config)
    arrivals_config = config.arrival_config()
    requests = _requests(config, options, shape, arrivals_config)
    server = _Server(config, options, model_config, device, dtype, shape.max_len, reporter, clock_ns)
    simulation = None
    if options.simulation is None:
        warm_up_seconds = server.warm_up()
    else:
        server.token_scale = _token_scale(config, shape)
        simulation = SimulatedServing(options.simulation, PacedClock(wall_ns=clock_ns, stop=stop), options.preset,
                                      server.token_scale)
        clock_ns = simulation.clock  # from here on every decision and span reads the schedule
        warm_up_seconds = server.simulated_warm_up(simulation)

    queue = _Queue(requests, config.max_batch, shape.kv_budget)
    totals = _Totals()
    start_ns = clock_ns()
    end_ns = start_ns + round(options.duration_s * 1e9)
    next_log_ns = start_ns + round(config.log_every_s * 1e9)
    while not stop.is_set():
        now_ns = clock_ns()
        if now_ns >= end_ns:
            break
        queue.arrive(start_ns, now_ns)
        admitted = queue.admit(now_ns, server.cache)
        decoding = queue.running
        if not admitted and not decoding:
            # Nothing to run: sleep until the next arrival (or the end). No span: idle is no compute.
            if simulation is not None:
                simulation.clock.wait_until(queue.wake_ns(start_ns, end_ns))
            else:
                stop.wait(max(0.0, (queue.wake_ns(start_ns, end_ns) - now_ns) / 1e9))
            continue
        totals.steps += 1
        first_token_ns = None
        if simulation is not None:
            tokens, step_end_ns, first_token_ns = server.simulated_step(admitted, decoding, totals, simulation)
        else:
            tokens, step_end_ns = server.step(admitted, decoding, totals)
        queue.retire(admitted + decoding, tokens, totals.steps, step_end_ns, first_token_ns)
        if step_end_ns >= next_log_ns:
            next_log_ns += round(config.log_every_s * 1e9)
            _log_progress(queue, totals, (step_end_ns - start_ns) / 1e9)

    finished_ns = clock_ns()
    summary = _summary(config, options, device, dtype, requests, totals, start_ns, finished_ns, arrivals_config,
                       shape, server.memory_bytes, warm_up_seconds, server.token_scale)
    # Under --compile: whether every decode shape ran compiled, or dynamo's recompile limit sent some eager.
    summary["compile"] = server.decoder.compile_report() if server.decoder is not None else None
    if simulation is not None:
        summary["simulated_device"] = simulation.summary((finished_ns - start_ns) / 1e9,
                                                         {"prompt": totals.prompt, "generated": totals.generated})
    return summary


def _log_progress(queue: _Queue, totals: _Totals, elapsed: float) -> None:
    log.info("chat t=%.0fs: %d arrived, %d running, %d waiting, %.0f generated tok/s, busy %.0f%%",
             elapsed, queue.total - len(queue.pending), len(queue.running), len(queue.waiting),
             totals.generated / elapsed, 100 * (totals.prefill_seconds + totals.decode_seconds) / elapsed)


def _token_scale(config: ChatConfig, shape: _Shape) -> int:
    """Simulated tokens per computed token: the config's, else round(1 / length_scale) for generated traffic
    (the simulated requests then have the trace's real lengths) and 1 for a trace (its lengths as given)."""
    if config.token_scale is not None:
        return config.token_scale
    return 1 if config.trace is not None else token_scale_for(shape.length_scale)


def _summary(config, options, device, dtype, requests, totals, start_ns, finished_ns, arrivals_config,
             shape: _Shape, memory_bytes, warm_up_seconds, token_scale: int = 1) -> dict:
    elapsed = (finished_ns - start_ns) / 1e9
    arrived = [r for r in requests if r.arrival_s * 1e9 <= finished_ns - start_ns]
    completed = [r for r in arrived if r.finished_ns]

    def since_arrival(r: _Request, ns: int) -> float:
        return (ns - start_ns) / 1e9 - r.arrival_s

    ttft = [since_arrival(r, r.first_token_ns) for r in arrived if r.first_token_ns]
    e2e = [since_arrival(r, r.finished_ns) for r in completed]
    # Per output token as served: simulated, a request's output is token_scale times the computed one.
    tpot = [(r.finished_ns - r.first_token_ns) / 1e9 / (simulated_tokens(r.output_tokens, token_scale) - 1)
            for r in completed if simulated_tokens(r.output_tokens, token_scale) > 1]
    busy = totals.prefill_seconds + totals.decode_seconds
    summary = summary_header(WORKLOAD, options, device, dtype, elapsed,
                             {"prompt": totals.prompt, "generated": totals.generated})
    summary.update({
        "traffic": "trace" if config.trace is not None else config.traffic,
        "mean_rate_per_s": config.mean_rate_per_s,
        "day_seconds": config.day_seconds,
        "peak_trough_ratio": config.peak_trough_ratio,
        "start_fraction": config.start_fraction,
        "max_batch": config.max_batch,
        "max_len": shape.max_len,
        "kv_budget_tokens": shape.kv_budget,
        "length_scale": shape.length_scale,
        "memory_bytes": memory_bytes,
        "warm_up_seconds": warm_up_seconds,
        "requests_arrived": len(arrived),
        "requests_completed": len(completed),
        "requests_dropped_at_end": len(arrived) - len(completed),
        "ttft_seconds": _stats(ttft),
        "tpot_seconds": _stats(tpot),
        "e2e_seconds": _stats(e2e),
        "batch_size": {"mean": statistics.fmean(totals.decode_batches) if totals.decode_batches else None,
                       "max": max(totals.decode_batches, default=0)},
        "prefill_batch_size": {"mean": statistics.fmean(totals.prefill_batches) if totals.prefill_batches else None,
                               "max": max(totals.prefill_batches, default=0)},
        "steps": totals.steps,
        "arrival_rate_per_s": len(arrived) / elapsed if elapsed > 0 else None,
        "expected_arrival_rate_per_s": (arrivals_config.cumulative(elapsed) / elapsed
                                        if config.trace is None and elapsed > 0 else None),
        "interarrival_cv": (interarrival_cv([r.arrival_s for r in arrived], arrivals_config)
                            if config.trace is None else None),
        "prompt_tokens_per_s": totals.prompt / elapsed if elapsed > 0 else None,
        "generated_tokens_per_s": totals.generated / elapsed if elapsed > 0 else None,
        "prefill_seconds": totals.prefill_seconds,
        "decode_seconds": totals.decode_seconds,
        "busy_fraction": busy / elapsed if elapsed > 0 else None,
    })
    if config.keep_requests:
        summary["requests"] = [_record(r, start_ns) for r in arrived]
    return summary


def _record(r: _Request, start_ns: int) -> dict:
    def at(ns: int) -> float | None:
        return (ns - start_ns) / 1e9 if ns else None

    first, finished = at(r.first_token_ns), at(r.finished_ns)
    return {
        "index": r.index, "arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens, "generated_tokens": r.generated, "completed": bool(r.finished_ns),
        "admitted_s": at(r.admitted_ns), "first_token_s": first, "finished_s": finished,
        "ttft_s": first - r.arrival_s if first is not None else None,
        "e2e_s": finished - r.arrival_s if finished is not None else None,
        "admit_step": r.admit_step if r.admit_step > 0 else None,
        "last_step": r.last_step if r.last_step > 0 else None,
        "slot": r.slot if r.slot >= 0 else None,
    }


# -- command line ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Chat's options. Values are parsed in ``config_from_args``, so a bad one is a one-line ValueError."""
    d = ChatConfig()
    parser.add_argument("--rate", default=str(d.mean_rate_per_s),
                        help=f"mean requests per second over a day (default {d.mean_rate_per_s}: Azure 2023 "
                        "conversation)")
    parser.add_argument("--day", default="10m", help="wall time of one simulated day, e.g. 600, 10m, 1h (default 10m)")
    parser.add_argument("--peak-trough", default=str(d.peak_trough_ratio),
                        help=f"peak/trough rate ratio (default {d.peak_trough_ratio}, Azure 2024 conversation)")
    parser.add_argument("--peak-at", default=str(d.peak_fraction),
                        help="where in the day the peak is, 0-1 (default 0.5)")
    parser.add_argument("--start-at", default="trough", help="where in the day the run starts: trough, peak or 0-1")
    parser.add_argument("--start-day", default="0", help="day of the week at the start, 0-6; 5 and 6 are the weekend")
    parser.add_argument("--weekend-factor", default="1.0", help="rate multiplier on weekend days (default 1: off)")
    parser.add_argument("--traffic", default=d.traffic, help=f"arrival process: {' or '.join(TRAFFIC_KINDS)}")
    parser.add_argument("--max-batch", default=str(d.max_batch), help="most requests served at once (cache slots)")
    parser.add_argument("--kv-budget-tokens", default=None,
                        help="KV tokens (prompt + output) running requests may reserve (default: the whole cache)")
    parser.add_argument("--max-len", default=None, help="tokens per cache slot (default: the preset's maximum)")
    parser.add_argument("--length-scale", default="auto",
                        help="scale on the length tables; auto fits the longest request into --max-len")
    parser.add_argument("--keep-requests", action="store_true", help="per-request records in the --json summary")


def config_from_args(args: argparse.Namespace) -> ChatConfig:
    from wattledger.agent.config import parse_duration_seconds

    peak = number_flag("--peak-at", args.peak_at)
    start_text = str(args.start_at).strip().lower()
    if start_text == "peak":
        start = peak
    elif start_text == "trough":
        start = (peak + 0.5) % 1.0
    else:
        start = number_flag("--start-at", start_text)
    day = parsed_flag("--day", args.day, parse_duration_seconds)
    scale_text = str(args.length_scale).strip().lower()
    return ChatConfig(
        mean_rate_per_s=number_flag("--rate", args.rate),
        day_seconds=day,
        peak_trough_ratio=number_flag("--peak-trough", args.peak_trough),
        peak_fraction=peak,
        start_fraction=start,
        start_day=number_flag("--start-day", args.start_day, int),
        weekend_factor=number_flag("--weekend-factor", args.weekend_factor),
        traffic=str(args.traffic),
        max_batch=number_flag("--max-batch", args.max_batch, int),
        kv_budget_tokens=number_flag("--kv-budget-tokens", args.kv_budget_tokens, int),
        max_len=number_flag("--max-len", args.max_len, int),
        length_scale=None if scale_text == "auto" else number_flag("--length-scale", scale_text),
        keep_requests=bool(getattr(args, "keep_requests", False)),
    )
