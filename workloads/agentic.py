"""Agentic sessions: long contexts grown step by step, tool calls that leave the GPU idle, KV spill to host.

A closed loop of ``sessions`` concurrent agent sessions, as a coding agent drives an inference server. Each
step of a session prefills only the tokens appended since its last step on top of its cached context (the
previous output and the tool's result), decodes an output greedily, then makes a tool call: the session
leaves the GPU while the CPU does real work (hashing, compression, parsing a generated JSON payload) in a
thread pool, so the other sessions keep the GPU busy meanwhile. When a session finishes its steps a new
one takes its place. Past ``compaction_threshold_tokens`` a session's context is compacted: its tail is
kept and prefilled again from position 0.

With a device KV budget (``kv_budget_bytes``) the sessions that have been in a tool call longest are
evicted when a resuming session needs room: ``offload`` copies their K/V to pinned host memory
(non-blocking, on a side CUDA stream), ``offload-pageable`` to ordinary host memory, ``recompute`` drops it
and prefills the whole context again on resume.

Every session draws its lengths, tool times and appended token ids from its own ``random.Random`` seeded
by (seed, session number), so two runs with one seed run the same sessions whatever the timing; with
``batch_decode=False`` each session's logits are then independent of which others share the GPU.

On the simulated device (``RunOptions.simulation``, issue 14) the loop runs on a ``PacedClock``: each forward
pass still runs on the CPU, then costs the device time of its work with the timing preset's shape
(``simulated_serving.SimulatedServing``) at the token scale: each computed token stands for k =
round(1 / length_scale) simulated ones (8 for tiny), so the simulated sessions have the trace's real lengths;
a tool call lasts its drawn time on the schedule (the CPU's tool work runs meanwhile and is stopped at its
scheduled end), trace time unscaled as on a GPU; a spill or restore costs its bytes (of the timing preset's
KV, at the simulated contexts) over the host link.

Figures and their sources: docs/workload-figures.md, "Agentic" and "KV cache and spill to host DRAM".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from wattledger.workloads.simulated_serving import SimulatedServing, simulated_tokens, token_scale_for
from wattledger.workloads.common import RunOptions, summary_header
from wattledger.workloads.flags import number_flag, parsed_flag
from wattledger.workloads.model import KVCache, ModelConfig, StaticDecoder, Transformer, build_model, padded_batch
from wattledger.workloads.paced_clock import PacedClock
from wattledger.workloads.reporter import DECODE_ACTIVITY, PREFILL_ACTIVITY, TRANSFER_ACTIVITY, Reporter

log = logging.getLogger(__name__)

SPILL_POLICIES = ("offload", "offload-pageable", "recompute")

# -- Figures (docs/workload-figures.md, "Agentic") ----------------------------------------------------------
# Tokens appended per step: median 875, mean about 1.7K (TraceLab coding-agent traces, 4,265 sessions, 357K
# steps). Lognormal sigma computed from them: sqrt(2 ln(mean / median)) = sqrt(2 ln(1700 / 875)) = 1.15.
APPENDED_MEDIAN_TOKENS = 875.0
APPENDED_SIGMA = 1.16
# Output tokens per step: median about 214 (TraceLab), rounded to 220 as docs/workload-figures.md's design does. The
# spread is not in TraceLab; ASSUMPTION: sigma from the GitHub Copilot coding-agent trace's mean of 528
# completion tokens per call with TraceLab's median, sqrt(2 ln(528 / 214)) = 1.34 (two traces combined).
OUTPUT_MEDIAN_TOKENS = 220.0
OUTPUT_SIGMA = 1.34
# Tool-call latency: p50 0.3 s, p90 13.6 s, p99 3.6 min (TraceLab). Sigma from p50 and p90:
# ln(13.6 / 0.3) / 1.2816 = 2.98. The cap trims the tail (TraceLab: the 4% of calls over a minute hold
# 85% of tool time); ASSUMPTION: 60 s, so a run of minutes is not decided by a few sessions idling for
# minutes. The cap applies to the sampled (trace) time, before tool_time_scale.
TOOL_MEDIAN_SECONDS = 0.3
TOOL_SIGMA = 3.0
TOOL_TIME_CAP_SECONDS = 60.0
# Steps per session: median about 20 (docs/workload-figures.md design, between TraceLab's p50 of 15 tool-initiated
# steps and 25 tool calls). Sigma computed from TraceLab's p90/p50: ln(135 / 15) / 1.2816 = 1.71 for steps,
# ln(176 / 25) / 1.2816 = 1.52 for tool calls; 1.6 between them. ASSUMPTION: at most 200 steps.
STEPS_MEDIAN = 20.0
STEPS_SIGMA = 1.6
STEPS_MAX = 200
# Compaction: context dropped past about 64K tokens (TraceLab, 4.5-18% of sessions); capped at the cache's
# max_len. ASSUMPTION: a compacted context keeps its last quarter (the summary plus recent turns).
COMPACTION_THRESHOLD_TOKENS = 65_536
COMPACTION_KEEP_FRACTION = 0.25
# Concurrent sessions: 16-32 on one H100 with the 8b shape; a few on CPU (docs/workload-figures.md design).
DEFAULT_SESSIONS_GPU = 16
DEFAULT_SESSIONS_CPU = 3
# Token lengths are used as published on a cache of this many tokens (the 1b and 8b presets); a smaller
# cache (tiny: 1024) scales them down in proportion, so a session fills its cache as it would on 8K.
LENGTH_REFERENCE_TOKENS = 8192
# ASSUMPTION: tool time multiplier when tool_time_scale is None. On CUDA tools take real trace time. On CPU
# the "GPU" is the CPU itself: the tiny model's step takes 0.1-0.2 s there while the tool threads compete
# for its cores, where 8b on an H100 takes about 2 s (220 decode steps at about 8 ms). Measured on a 2-core
# CPU with 3 sessions (4 s runs, one torch thread): scale 0.05 gives tools 62% of each session's time
# (TraceLab: 59% of step time) but a 78% busy "GPU"; 0.1 gives 83% and 45%; 0.07 gives 71% and about 64%,
# a GPU busy between always (training) and mostly idle (chat), which is what the mock telemetry shows.
CPU_TOOL_TIME_SCALE = 0.07
# On the simulated device, a spill or restore of the timing preset's KV (bf16, as served on an H100) costs
# bytes / host link rate: H100 pinned copies at about 53 GB/s GPU->host and 35 GB/s host->GPU
# (docs/measurement.md, from an nvbandwidth issue report). ASSUMPTION: offload-pageable uses the
# same rates (no published pageable figure in the reference; a pageable copy is usually slower).
GPU_TO_HOST_BYTES_PER_S = 53e9
HOST_TO_GPU_BYTES_PER_S = 35e9
SIMULATED_KV_DTYPE = torch.bfloat16
# On the simulated device the tiny model's token lengths are the trace's times length_scale (its 1K cache:
# 0.125) and each computed token stands for token_scale = round(1 / length_scale) simulated ones, so the
# simulated steps run the trace's lengths. Tool times (when tool_time_scale is None) are then scaled by
# length_scale x token_scale (1 at the default scales: trace time), so a session's tool : GPU time keeps
# the trace's proportion (TraceLab: tools 59% of step time).
# ASSUMPTION: there a tool call's CPU work is SIMULATED_TOOL_ROUNDS rounds (about a millisecond each), not
# its whole duration: the CPU stands in for the GPU, and tool threads spinning for seconds starve the model
# loop that must keep up with the simulated device (seen: 0.47 s of lag with 3 sessions on 2 cores).
SIMULATED_TOOL_ROUNDS = 1

# Back-to-back main-loop spans of one kind and activity closer than this are reported as one (decode steps
# a millisecond apart would otherwise be a thousand spans a second).
MERGE_GAP_NS = 1_000_000
# Longest single wait for a tool call to finish while the GPU has nothing to do (how fast ``stop`` is seen).
IDLE_POLL_SECONDS = 0.05
LOG_EVERY_STEPS = 100

_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"67108864"``, ``"64MiB"``, ``"1.5GB"``, ``"512KiB"`` -> bytes (KiB/MiB/GiB binary, KB/MB/GB decimal)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(f"not a size in bytes: {text!r} (examples: 67108864, 64MiB, 1.5GB)")
    value = float(match.group(1)) * _BYTE_UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"not a finite size: {text!r}")
    return int(value)


@dataclass
class AgenticConfig:
    """How the sessions behave (the model shape comes from ``RunOptions.preset``). Times in seconds."""

    sessions: int | None = None  # concurrent sessions; None = 16 on CUDA, 3 on CPU
    total_sessions: int | None = None  # stop once this many sessions have completed; None = run for duration
    appended_median_tokens: float = APPENDED_MEDIAN_TOKENS  # tokens appended per step (lognormal)
    appended_sigma: float = APPENDED_SIGMA
    output_median_tokens: float = OUTPUT_MEDIAN_TOKENS  # tokens decoded per step (lognormal)
    output_sigma: float = OUTPUT_SIGMA
    tool_median_seconds: float = TOOL_MEDIAN_SECONDS  # tool-call duration (lognormal, trace time)
    tool_sigma: float = TOOL_SIGMA
    tool_time_cap_seconds: float = TOOL_TIME_CAP_SECONDS  # cap on the trace time, before the scale
    tool_time_scale: float | None = None  # multiplies tool time; None = 1 on CUDA, CPU_TOOL_TIME_SCALE on CPU,
    # length_scale x token_scale on the simulated device (1 at the default scales)
    steps_median: float = STEPS_MEDIAN  # steps per session (lognormal)
    steps_sigma: float = STEPS_SIGMA
    steps_max: int = STEPS_MAX
    length_scale: float | None = None  # multiplies token lengths; None = min(1, max_len / 8192)
    # Simulated device only: simulated tokens per computed token; None = round(1 / length_scale)
    token_scale: int | None = None
    max_len: int | None = None  # cache tokens per session; None = the model's max_seq_len
    compaction_threshold_tokens: int | None = None  # None = min(64K, max_len)
    compaction_keep_tokens: int | None = None  # tail kept on compaction; None = a quarter of the threshold
    kv_budget_bytes: int | None = None  # device-resident KV limit; None = kv_budget_share decides
    # Without an explicit budget, the device holds this share of what all sessions could hold at their
    # largest (None: no limit). Agent contexts outgrow HBM in production (docs/workload-figures.md: 67.8K-token
    # prompts per call); at the presets' 8K contexts they would not, so the default budget makes the
    # spill to host DRAM part of the regime.
    kv_budget_share: float | None = 0.5
    spill_policy: str = "offload"  # offload | offload-pageable | recompute
    batch_decode: bool = True  # decode all decoding sessions in one batch; False: one at a time (exact tests)
    record_steps: bool = False  # put a per-step trace (contexts, token ids, logits) in the summary

    def validate(self) -> None:
        """Raise ValueError (one line) for a value that cannot work."""
        def positive(name: str, value, integer: bool = False) -> None:
            if value is None:
                return
            number = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not number or not value > 0 or not math.isfinite(value):
                kind = "a positive integer" if integer else "a positive number"
                raise ValueError(f"{name} must be {kind}, got {value!r}")

        positive("sessions", self.sessions, integer=True)
        positive("total_sessions", self.total_sessions, integer=True)
        for name in ("appended_median_tokens", "output_median_tokens", "tool_median_seconds", "steps_median",
                     "tool_time_cap_seconds", "tool_time_scale", "length_scale"):
            positive(name, getattr(self, name))
        for name in ("appended_sigma", "output_sigma", "tool_sigma", "steps_sigma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 20:
                raise ValueError(f"{name} must be a number from 0 to 20, got {value!r}")
        positive("steps_max", self.steps_max, integer=True)
        positive("token_scale", self.token_scale, integer=True)
        positive("max_len", self.max_len, integer=True)
        positive("compaction_threshold_tokens", self.compaction_threshold_tokens, integer=True)
        positive("compaction_keep_tokens", self.compaction_keep_tokens, integer=True)
        positive("kv_budget_bytes", self.kv_budget_bytes, integer=True)
        if self.kv_budget_share is not None and not 0 < self.kv_budget_share <= 1:
            raise ValueError(f"kv_budget_share must be in (0, 1], got {self.kv_budget_share!r}")
        if self.spill_policy not in SPILL_POLICIES:
            raise ValueError(f"spill policy must be one of {', '.join(SPILL_POLICIES)}, got {self.spill_policy!r}")
        threshold, keep = self.compaction_threshold_tokens, self.compaction_keep_tokens
        if threshold is not None and keep is not None and threshold - keep < 2:
            raise ValueError(f"compaction keeps {keep} tokens of a {threshold}-token threshold: keep at least "
                             "2 fewer than the threshold")


@dataclass(frozen=True)
class Plan:
    """The config's automatic values resolved for one model, device and dtype (token counts per session)."""

    sessions: int
    tool_time_scale: float
    length_scale: float
    token_scale: int  # simulated tokens per computed token (1 unless simulated)
    max_len: int
    threshold: int
    keep: int
    appended_cap: int  # per step, so that keep + appended + output <= threshold
    output_cap: int
    kv_bytes_per_token: int
    budget_tokens: int | None


def plan(config: AgenticConfig, model: ModelConfig, device: torch.device, dtype: torch.dtype,
         simulated: bool = False) -> Plan:
    """Resolve the automatic values and check they fit the model; ValueError (one line) if not.
    ``simulated``: the timing is a simulated GPU's (the token scale applies, and tool times scale with the
    simulated lengths: ``SIMULATED_TOOL_ROUNDS``' comment)."""
    config.validate()
    cuda = device.type == "cuda"
    max_len = config.max_len or model.max_seq_len
    if max_len > model.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the {model.name} model's {model.max_seq_len} tokens")
    threshold = config.compaction_threshold_tokens or min(COMPACTION_THRESHOLD_TOKENS, max_len)
    if threshold > max_len:
        raise ValueError(f"compaction threshold {threshold} exceeds the cache's {max_len} tokens per session; "
                         "lower --compaction-threshold")
    keep = config.compaction_keep_tokens or max(1, int(threshold * COMPACTION_KEEP_FRACTION))
    if threshold - keep < 2:
        raise ValueError(f"compaction keeps {keep} of a {threshold}-token threshold: raise the threshold")
    room = threshold - keep
    appended_cap = max(1, room * 3 // 4)
    output_cap = max(1, room - appended_cap)
    bytes_per_token = model.kv_bytes_per_token(dtype)
    budget_tokens = None
    sessions = config.sessions or (DEFAULT_SESSIONS_GPU if cuda else DEFAULT_SESSIONS_CPU)
    if config.kv_budget_bytes is None and config.kv_budget_share is not None:
        budget_tokens = max(threshold, int(config.kv_budget_share * sessions * threshold))
    if config.kv_budget_bytes is not None:
        budget_tokens = config.kv_budget_bytes // bytes_per_token
        if budget_tokens < threshold:
            raise ValueError(
                f"KV budget {config.kv_budget_bytes} bytes holds {budget_tokens} tokens ({bytes_per_token} bytes "
                f"each), fewer than one session's largest context ({threshold}); raise --kv-budget or lower "
                "--compaction-threshold")
    length_scale = config.length_scale or min(1.0, max_len / LENGTH_REFERENCE_TOKENS)
    token_scale = (config.token_scale or token_scale_for(length_scale)) if simulated else 1
    default_tool_scale = 1.0 if cuda else length_scale * token_scale if simulated else CPU_TOOL_TIME_SCALE
    return Plan(
        sessions=sessions,
        tool_time_scale=config.tool_time_scale or default_tool_scale,
        length_scale=length_scale, token_scale=token_scale,
        max_len=max_len, threshold=threshold, keep=keep, appended_cap=appended_cap, output_cap=output_cap,
        kv_bytes_per_token=bytes_per_token, budget_tokens=budget_tokens,
    )


# -- Tool calls: real CPU work ------------------------------------------------------------------------------

_WORDS = ("assert", "expected", "got", "None", "timeout", "import", "module", "config", "value", "index",
          "error", "warning", "passed", "retry", "cache", "request", "path", "line", "return", "self")


def tool_payload(rng: random.Random, entries: int = 16) -> str:
    """A generated JSON document like a test runner's or a search tool's output (about 170 bytes an entry)."""
    results = [{
        "path": f"src/pkg{rng.randrange(40)}/module_{rng.randrange(1000)}.py",
        "line": rng.randrange(1, 2000),
        "status": rng.choice(("passed", "failed", "skipped")),
        "duration_ms": round(rng.expovariate(0.05), 3),
        "message": " ".join(rng.choices(_WORDS, k=12)),
    } for _ in range(entries)]
    return json.dumps({"tool": "run_tests", "exit_code": rng.choice((0, 1)), "results": results})


# Bytes hashed and compressed per round of tool work (like reading and diffing a source file).
TOOL_BUFFER_BYTES = 64 * 1024


@dataclass(frozen=True)
class ToolWork:
    """One tool call as it ran: monotonic ns bounds, CPU seconds of its thread, rounds of work."""

    start_ns: int
    end_ns: int
    cpu_seconds: float
    rounds: int
    bytes_processed: int


def tool_work(seconds: float, seed: int, cancel: threading.Event | None = None,
              max_rounds: int | None = None) -> ToolWork:
    """Keep the calling thread busy for ``seconds`` of wall time with what agent tools do on a CPU
    (or for at most ``max_rounds`` rounds).

    Each round hashes a 64 KiB buffer (SHA-256), compresses it (zlib level 6) and parses a generated JSON
    payload of about 3 KB; rounds repeat until the deadline (at least one). ``cancel`` ends it early. Most
    of a round runs without the GIL (hashlib and zlib release it for large buffers; json.loads holds it for
    about 1% of the time), so the tool threads leave the serving loop's thread its share of the interpreter.
    """
    start_ns = time.monotonic_ns()
    cpu_start = time.thread_time()
    rng = random.Random(seed)
    payload = tool_payload(rng)
    encoded = payload.encode()
    buffer = (encoded * (TOOL_BUFFER_BYTES // len(encoded) + 1))[:TOOL_BUFFER_BYTES]
    deadline = start_ns + int(seconds * 1e9)
    digest = hashlib.sha256()
    rounds = 0
    while True:
        digest.update(buffer)
        zlib.compress(buffer, 6)
        json.loads(payload)
        rounds += 1
        if (time.monotonic_ns() >= deadline or (cancel is not None and cancel.is_set())
                or (max_rounds is not None and rounds >= max_rounds)):
            break
    return ToolWork(start_ns, time.monotonic_ns(), time.thread_time() - cpu_start, rounds,
                    rounds * (2 * len(buffer) + len(encoded)))


class _EitherEvent:
    """Set when either event is: a simulated tool call ends at its scheduled end or when the run stops."""

    def __init__(self, first: threading.Event, second: threading.Event):
        self._events = (first, second)

    def is_set(self) -> bool:
        return any(event.is_set() for event in self._events)


# -- Sessions -----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Step:
    appended: list[int]  # token ids appended to the context (the previous tool's result)
    output_tokens: int  # tokens to decode
    tool_seconds: float  # real duration of the tool call after this step (scaled, capped)
    tool_seed: int
    compact: bool  # the context is compacted before this step's prefill
    context_before: int  # context tokens when the step began (before compaction)
    kv_came_back: bool = False  # restored from host or recomputed before this step
    cached_tokens: int = 0  # KV positions reused as they were (not computed in this step)
    generated: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    prompt_ids: list[int] | None = None  # the whole context at prefill (record_steps only)


@dataclass(eq=False)
class _Session:
    index: int
    rng: random.Random
    steps_total: int
    tokens: list[int] = field(default_factory=list)  # the whole context, on the CPU
    kv_tokens: int = 0  # KV positions held (on device, on host, or to recompute): len(tokens) - 1 after a step
    slot: int | None = None
    reserved: int = 0  # device KV tokens counted against the budget while it holds a slot
    host_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # offloaded K/V
    kv_dropped: bool = False  # recompute policy: the KV is gone, prefill tokens[:kv_tokens] on resume
    state: str = "ready"  # ready (wants the GPU) | decoding | tool
    idle_since_ns: int = 0  # when it last left the GPU (tool call start) or became ready
    steps_done: int = 0
    step: _Step | None = None
    tool_future: concurrent.futures.Future | None = None
    gpu_seconds: float = 0.0  # time of the forward passes it took part in
    tool_seconds: float = 0.0
    # Simulated device only: the tool call's scheduled bounds (ns) and the event that ends its CPU work.
    tool_start_ns: int = 0
    tool_end_ns: int = 0
    tool_done: threading.Event | None = None


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return rng.lognormvariate(math.log(median), sigma)


class _SpanLog:
    """Reports the main loop's back-to-back spans, merging neighbours of one kind and activity (or, with
    ``merge=False``, each at once: simulated steps each carry their own activity)."""

    def __init__(self, reporter: Reporter, merge: bool = True):
        self._reporter = reporter
        self._merge = merge
        self._open: list | None = None  # [kind, start_ns, end_ns, activity]

    def add(self, kind: str, start_ns: int, end_ns: int, activity) -> None:
        if not self._merge:
            self._reporter.span(kind, start_ns, end_ns, activity)
            return
        current = self._open
        # A merged span is held here until its kind changes, which can be seconds of back-to-back decode:
        # past the mock GPU's lag, so the mock lost its activity. Held at most the reporter's merge length.
        if current and current[2] - current[1] >= self._reporter.MAX_MERGED_NS:
            self.flush()
            current = None
        if current and current[0] == kind and current[3] is activity and start_ns - current[2] <= MERGE_GAP_NS:
            current[2] = end_ns
            return
        self.flush()
        self._open = [kind, start_ns, end_ns, activity]

    def flush(self) -> None:
        if self._open:
            kind, start_ns, end_ns, activity = self._open
            self._reporter.span(kind, start_ns, end_ns, activity)
            self._open = None


class _Transfers:
    """Moves one session's K/V between the device cache and host memory and times each move.

    CUDA with ``offload``: pinned host tensors, non-blocking copies on a side stream bracketed by CUDA
    events; the main stream waits on those events (no CPU wait) before it touches the slot or the restored
    KV, and the durations are read once the events have completed (polled each loop turn, all at the end).
    Otherwise (CPU, or ``offload-pageable``): plain copies, timed on the CPU clock; on CUDA the stream is
    synchronised around a pageable copy, which blocks anyway. With ``timed=False`` (the simulated device) a
    move is a plain copy, neither timed nor reported: the run costs it from its bytes.
    """

    def __init__(self, device: torch.device, policy: str, spans: _SpanLog, reporter: Reporter, timed: bool = True):
        self.asynchronous = device.type == "cuda" and policy == "offload" and timed
        self.timed = timed
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.asynchronous else None
        self._spans = spans
        self._reporter = reporter
        self._pending: list[tuple] = []  # (start event, end event, enqueue ns, tensors kept alive)
        self._slot_events: dict[int, torch.cuda.Event] = {}  # slot -> end of the spill still reading it
        self.seconds = 0.0

    def spill(self, cache: KVCache, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = cache.export(slot)
        if self.asynchronous:
            main = torch.cuda.current_stream()
            self.stream.wait_stream(main)  # the slot's last decode writes come first
            with torch.cuda.stream(self.stream):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (keys, values))
                host[0].copy_(keys, non_blocking=True)
                host[1].copy_(values, non_blocking=True)
                end.record()
            self._slot_events[slot] = end
            self._pending.append((start, end, time.monotonic_ns(), host))
            return host
        start_ns = self._synchronise()
        host = (keys.to("cpu", copy=True), values.to("cpu", copy=True))
        self._finish_sync(start_ns)
        return host

    def restore(self, cache: KVCache, slot: int, host: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.asynchronous:
            main = torch.cuda.current_stream()
            self.stream.wait_stream(main)  # the slot's previous owner's compute comes first
            with torch.cuda.stream(self.stream):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                cache.load(slot, host[0], host[1], non_blocking=True)
                end.record()
            main.wait_event(end)  # the prefill that follows reads the restored KV
            self._slot_events.pop(slot, None)  # stream order already puts this after any spill of the slot
            self._pending.append((start, end, time.monotonic_ns(), host))
            return
        start_ns = self._synchronise()
        cache.load(slot, host[0], host[1])
        self._finish_sync(start_ns)

    def claim(self, slot: int) -> None:
        """Before the main stream writes ``slot``: wait (on the device) for a spill still reading it."""
        event = self._slot_events.pop(slot, None)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def poll(self, wait: bool = False) -> None:
        """Account for the asynchronous copies that have finished (all of them, waiting, with ``wait``)."""
        still = []
        for start, end, enqueued_ns, host in self._pending:
            if wait:
                end.synchronize()
            elif not end.query():
                still.append((start, end, enqueued_ns, host))
                continue
            seconds = start.elapsed_time(end) / 1e3
            self.seconds += seconds
            # The CPU saw it done now; it ran for `seconds` at most since it was queued.
            now = time.monotonic_ns()
            self._reporter.span("transfer", max(enqueued_ns, now - int(seconds * 1e9)), now, TRANSFER_ACTIVITY)
        self._pending = still

    def _synchronise(self) -> int:
        if self.cuda:
            torch.cuda.current_stream().synchronize()
        return time.monotonic_ns()

    def _finish_sync(self, start_ns: int) -> None:
        if self.cuda:
            torch.cuda.current_stream().synchronize()
        if not self.timed:
            return
        end_ns = time.monotonic_ns()
        self.seconds += (end_ns - start_ns) / 1e9
        self._spans.add("transfer", start_ns, end_ns, TRANSFER_ACTIVITY)


# -- The run ------------------------------------------------------------------------------------------------


class _AgenticRun:
    def __init__(self, config: AgenticConfig, options: RunOptions, reporter: Reporter, stop: threading.Event,
                 wall_ns: Callable[[], int] = time.monotonic_ns):
        self.config = config
        self.options = options
        self.reporter = reporter
        self.stop = stop
        self.wall_ns = wall_ns  # what a simulated run's PacedClock paces to
        self.simulation: SimulatedServing | None = None  # set when the run starts, with options.simulation
        self._now = time.monotonic_ns  # what the loop decides by: the paced clock when simulated
        self._device_steps: list = []  # simulated: the DeviceSteps of the forward passes not yet spent
        self.simulated_transfer_bytes = 0  # simulated: bytes of the timing preset's KV moved (B)
        model_config, self.device, self.dtype = options.resolve()
        self.model_config = model_config
        self.plan = plan(config, model_config, self.device, self.dtype, simulated=options.simulation is not None)
        self.model: Transformer = build_model(model_config, self.device, self.dtype, seed=options.seed).eval()
        # One slot per concurrent session (plus the static decoder's spare slot for padding rows).
        slots = self.plan.sessions + (1 if options.compile else 0)
        self.cache = KVCache(model_config, slots, self.plan.max_len, self.device, self.dtype)
        self.decoder = StaticDecoder(self.model, self.cache, compile=True) if options.compile else None
        self.free_slots = list(range(self.plan.sessions))
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        reporter.set_memory(weights + self.cache.nbytes())

        simulated = options.simulation is not None
        self.spans = _SpanLog(reporter, merge=not simulated)
        self.transfers = _Transfers(self.device, config.spill_policy, self.spans, reporter, timed=not simulated)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.plan.sessions, thread_name_prefix="agentic-tool")
        self.cancel_tools = threading.Event()

        self.active: list[_Session] = []
        self.ready: list[_Session] = []  # FIFO of sessions waiting for the GPU
        self.decoding: list[_Session] = []
        self.sessions_started = 0
        self.sessions_completed = 0
        self.finished_tool_shares: list[float] = []  # per completed session (its context is dropped)
        self.steps = 0
        self.appended_tokens = 0
        self.generated_tokens = 0
        self.context_at_prefill: list[int] = []
        self.cached_tokens = 0
        self.prefill_context_tokens = 0
        self.compactions = 0
        self.compaction_tokens = 0
        self.tool_calls = 0
        self.tool_seconds = 0.0
        self.tool_cpu_seconds = 0.0
        self.compute_seconds = 0.0
        self.idle_seconds = 0.0
        self.spills = 0
        self.restores = 0
        self.spilled_bytes = 0
        self.restored_bytes = 0
        self.recomputed_tokens = 0
        self.trace: list[dict] = []

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self) -> dict:
        total = self.config.total_sessions
        with torch.inference_mode():
            if self.options.simulation is not None:
                self._warm_up()
                clock = PacedClock(wall_ns=self.wall_ns, stop=self.stop)
                self.simulation = SimulatedServing(self.options.simulation, clock, self.options.preset,
                                                   self.plan.token_scale)
                self._now = clock.now_ns
            self.start_ns = self._now()
            deadline_ns = self.start_ns + int(self.options.duration_s * 1e9)
            while not self.stop.is_set() and self._now() < deadline_ns:
                self._harvest_tool_calls()
                self.transfers.poll()
                while len(self.active) < self.plan.sessions and (total is None or self.sessions_started < total):
                    self._start_session()
                if not self.active:
                    break  # total_sessions done
                admitted = self._admit_ready()
                if self.decoding:
                    self._decode_once()
                elif not admitted:
                    if self.ready:
                        raise RuntimeError("agentic: a ready session could not be admitted with nothing decoding")
                    self._wait_for_a_tool_call(deadline_ns)
            end_ns = self._now()
            self.cancel_tools.set()
            self.pool.shutdown(wait=True)
            self._harvest_tool_calls(final=True)
            self.transfers.poll(wait=True)
            self.spans.flush()
        return self._summary((end_ns - self.start_ns) / 1e9)

    def _warm_up(self) -> None:
        """Before a simulated run's schedule starts: the first forward passes pay for allocator growth and
        kernel selection (seen: the first steps 70-100 ms behind the simulated device), so run a prefill and
        a decode on every slot first. Not reported: on the schedule it is the server's start-up."""
        slots = list(range(self.plan.sessions))
        self._forward([[0] * 4 for _ in slots], slots)
        self._forward([[0] for _ in slots], slots)
        for slot in slots:
            self.cache.reset(slot)

    def _start_session(self) -> None:
        index = self.sessions_started
        self.sessions_started += 1
        rng = random.Random(f"wattledger-agentic:{self.options.seed}:{index}")
        steps = min(self.config.steps_max,
                    max(1, round(_lognormal(rng, self.config.steps_median, self.config.steps_sigma))))
        session = _Session(index=index, rng=rng, steps_total=steps)
        self.active.append(session)
        self._begin_step(session)

    def _begin_step(self, s: _Session) -> None:
        """Draw the step's lengths and tool call (in a fixed order: the session's draws do not depend on timing)."""
        c, p = self.config, self.plan
        rng = s.rng
        appended = min(p.appended_cap, max(1, round(_lognormal(rng, c.appended_median_tokens * p.length_scale,
                                                               c.appended_sigma))))
        output = min(p.output_cap, max(1, round(_lognormal(rng, c.output_median_tokens * p.length_scale,
                                                           c.output_sigma))))
        tool = min(c.tool_time_cap_seconds, _lognormal(rng, c.tool_median_seconds, c.tool_sigma)) * p.tool_time_scale
        tool_seed = rng.getrandbits(32)
        ids = rng.choices(range(self.model_config.vocab_size), k=appended)
        context = len(s.tokens)
        s.step = _Step(appended=ids, output_tokens=output, tool_seconds=tool, tool_seed=tool_seed,
                       compact=context + appended + output > p.threshold, context_before=context)
        s.state = "ready"
        s.idle_since_ns = self._now()
        self.ready.append(s)

    # -- admission, eviction, restore ---------------------------------------------------------------------

    def _admit_ready(self) -> bool:
        """Give the GPU to ready sessions in arrival order (evicting idle ones as needed) and prefill them."""
        admitted = False
        while self.ready:
            s = self.ready[0]
            if not self._admit(s):
                break
            self.ready.pop(0)
            self._prefill_step(s)
            admitted = True
        return admitted

    def _kv_after_step(self, s: _Session) -> int:
        step = s.step
        context = self.plan.keep if step.compact else len(s.tokens)
        return context + len(step.appended) + step.output_tokens - 1  # the last output token is fed next step

    def _admit(self, s: _Session) -> bool:
        need = self._kv_after_step(s)
        extra = need - s.reserved if s.slot is not None else need
        if not self._make_room(s, extra, need_slot=s.slot is None):
            return False
        if s.slot is None:
            s.slot = self.free_slots.pop(0)
            self.transfers.claim(s.slot)
            self.cache.reset(s.slot)
            if s.step.compact:
                s.host_kv, s.kv_dropped = None, False  # compaction prefills its tail anew: nothing to bring back
            elif s.host_kv is not None:
                self.transfers.restore(self.cache, s.slot, s.host_kv)
                self._simulated_transfer(s.kv_tokens, to_host=False)
                self.restores += 1
                self.restored_bytes += s.kv_tokens * self.plan.kv_bytes_per_token
                s.host_kv = None
                s.step.kv_came_back = True
        s.reserved = need
        return True

    def _make_room(self, s: _Session, extra_tokens: int, need_slot: bool) -> bool:
        budget = self.plan.budget_tokens
        while True:
            resident = sum(o.reserved for o in self.active if o.slot is not None)
            if (budget is None or resident + extra_tokens <= budget) and (self.free_slots or not need_slot):
                return True
            # The most idle first: the longest in a tool call, then those waiting their turn.
            victims = [o for o in self.active if o.slot is not None and o is not s and o.state in ("tool", "ready")]
            if not victims:
                return False
            self._evict(min(victims, key=lambda o: (o.state != "tool", o.idle_since_ns)))

    def _evict(self, v: _Session) -> None:
        self.spills += 1
        if self.config.spill_policy == "recompute":
            v.kv_dropped = True
        else:
            v.host_kv = self.transfers.spill(self.cache, v.slot)
            self._simulated_transfer(v.kv_tokens, to_host=True)
            self.spilled_bytes += v.kv_tokens * self.plan.kv_bytes_per_token
        self.cache.reset(v.slot)
        self.free_slots.append(v.slot)
        self.free_slots.sort()
        v.slot, v.reserved = None, 0

    def _simulated_transfer(self, kv_tokens: int, to_host: bool) -> None:
        """On the simulated device: the move of ``kv_tokens`` of the timing preset's KV costs its bytes over
        the host link (the loop waits for it, as a synchronous copy does) and is reported with its rate."""
        if self.simulation is None:
            return
        simulated_kv_tokens = kv_tokens * self.plan.token_scale  # the simulated context's KV
        nbytes = simulated_kv_tokens * self.simulation.timing_config.kv_bytes_per_token(SIMULATED_KV_DTYPE)
        rate = GPU_TO_HOST_BYTES_PER_S if to_host else HOST_TO_GPU_BYTES_PER_S
        start_ns, end_ns = self.simulation.spend_seconds(nbytes / rate)
        self.transfers.seconds += nbytes / rate
        self.simulated_transfer_bytes += nbytes
        # PCIe as the GPU sees it: a spill transmits, a restore receives.
        activity = replace(TRANSFER_ACTIVITY, pcie_transmit_bytes_per_second=rate if to_host else 0.0,
                           pcie_receive_bytes_per_second=0.0 if to_host else rate)
        self.spans.add("transfer", start_ns, end_ns, activity)

    def _release(self, s: _Session) -> None:
        if s.slot is not None:
            self.cache.reset(s.slot)
            self.free_slots.append(s.slot)
            self.free_slots.sort()
        s.slot, s.reserved, s.host_kv = None, 0, None

    # -- the GPU work -------------------------------------------------------------------------------------

    def _forward(self, rows: list[list[int]], slots: list[int], cached: list[int] | None = None,
                 emits: bool = True) -> torch.Tensor:
        """Prefill ``rows`` on their slots (``cached``: KV positions each already holds, for the simulated
        device's work of the pass; ``emits``: the pass yields a token, so under a token scale its further
        decode passes follow, not for a compaction's or a recompute's KV)."""
        if self.simulation is not None and cached is not None:
            chunks = [(len(r), c) for r, c in zip(rows, cached)]
            self._device_steps.append(self.simulation.scaled_step([], chunks, prefill_emits=emits))
        tokens, lengths = padded_batch(rows, self.device)
        return self.model.forward_cached(tokens, lengths, slots, self.cache)

    def _account(self, start_ns: int, activity, sessions: list[_Session]) -> None:
        """The forward passes since ``start_ns`` are done: report them. On the CPU's clock, one span to now;
        on the simulated device, each pass's device time spent on the schedule, with its own activity."""
        if self.simulation is None:
            self._account_compute(start_ns, time.monotonic_ns(), activity, sessions)
            return
        steps, self._device_steps = self._device_steps, []
        for scaled in steps:
            step_start_ns, step_end_ns = self.simulation.spend(scaled)
            self._account_compute(step_start_ns, step_end_ns, scaled.step.activity, sessions)

    def _prefill_step(self, s: _Session) -> None:
        """Bring the session's context up to date on its slot and prefill the appended tokens."""
        step, p = s.step, self.plan
        start_ns = self._now()
        if step.compact:
            # Keep the tail; its positions restart at 0, so its KV is computed anew.
            s.tokens = s.tokens[-p.keep:]
            self.cache.reset(s.slot)
            if len(s.tokens) > 1:
                self._forward([s.tokens[:-1]], [s.slot], [0], emits=False)
            s.kv_tokens = len(s.tokens) - 1
            self.compactions += 1
            self.compaction_tokens += s.kv_tokens
        elif s.kv_dropped:
            self._forward([s.tokens[:s.kv_tokens]], [s.slot], [0], emits=False)
            self.recomputed_tokens += s.kv_tokens
            self.restores += 1
            s.kv_dropped = False
            step.kv_came_back = True
        else:
            step.cached_tokens = s.kv_tokens
        new = s.tokens[s.kv_tokens:] + step.appended  # the last output token (fed now) and the tool's result
        s.tokens.extend(step.appended)
        logits = self._forward([new], [s.slot], [s.kv_tokens])
        first = logits.argmax(-1).tolist()  # waits for the device: the span ends here
        s.kv_tokens = len(s.tokens)
        self._account(start_ns, PREFILL_ACTIVITY, [s])
        self._add_tokens("prompt", len(step.appended))
        self.context_at_prefill.append(len(s.tokens))
        self.cached_tokens += step.cached_tokens
        self.prefill_context_tokens += len(s.tokens)
        if self.config.record_steps:
            step.prompt_ids = list(s.tokens)
        s.state = "decoding"
        self._add_tokens("generated", 1)
        self._emit(s, first[0], logits[0])

    def _decode_once(self) -> None:
        """One decode step for every decoding session (one batch, or one at a time)."""
        batch = list(self.decoding)
        groups = [batch] if self.config.batch_decode else [[s] for s in batch]
        for group in groups:
            start_ns = self._now()
            slots = [s.slot for s in group]
            if self.simulation is not None:
                # Each session feeds its last token at position kv_tokens and attends to kv_tokens + 1 positions.
                self._device_steps.append(self.simulation.scaled_step([s.kv_tokens + 1 for s in group], []))
            if self.decoder is not None:
                logits = self.decoder.step([s.tokens[-1] for s in group], slots)
            else:
                logits = self._forward([[s.tokens[-1]] for s in group], slots)
            chosen = logits.argmax(-1).tolist()  # waits for the device
            self._account(start_ns, DECODE_ACTIVITY, group)
            self._add_tokens("generated", len(group))
            for s in group:
                s.kv_tokens += 1
            for row, s in enumerate(group):
                self._emit(s, chosen[row], logits[row])

    def _add_tokens(self, kind: str, computed: int) -> None:
        """Report and count ``computed`` tokens of ``kind`` ("prompt": appended, "generated"): simulated,
        as the simulated tokens they stand for (the token scale)."""
        tokens = simulated_tokens(computed, self.plan.token_scale)
        self.reporter.add_tokens(kind, tokens)
        if kind == "prompt":
            self.appended_tokens += tokens
        else:
            self.generated_tokens += tokens

    def _emit(self, s: _Session, token: int, logits: torch.Tensor) -> None:
        """A decoded token (the caller reported and counted it): append it; the step ends at its output length."""
        step = s.step
        s.tokens.append(token)
        step.generated.append(token)
        if self.config.record_steps:
            step.logits.append(logits.detach().float().cpu().clone())
        if len(step.generated) >= step.output_tokens:
            self._finish_step(s)
        elif s not in self.decoding:
            self.decoding.append(s)

    def _account_compute(self, start_ns: int, end_ns: int, activity, sessions: list[_Session]) -> None:
        seconds = (end_ns - start_ns) / 1e9
        self.compute_seconds += seconds
        for s in sessions:
            s.gpu_seconds += seconds
        self.spans.add("compute", start_ns, end_ns, activity)

    def _finish_step(self, s: _Session) -> None:
        step = s.step
        if s in self.decoding:
            self.decoding.remove(s)
        s.steps_done += 1
        self.steps += 1
        if self.config.record_steps:
            self.trace.append({
                "session": s.index, "step": s.steps_done - 1, "context_before": step.context_before,
                "compacted": step.compact, "appended": len(step.appended), "generated": len(step.generated),
                "context_after": len(s.tokens), "kv_came_back": step.kv_came_back,
                "tool_seconds": step.tool_seconds,
                "prompt_ids": step.prompt_ids, "tokens": list(step.generated), "logits": torch.stack(step.logits),
            })
        if self.steps % LOG_EVERY_STEPS == 0:
            log.info("agentic: %d steps, %d sessions done, %d spills, GPU compute %.1f s of %.1f s", self.steps,
                     self.sessions_completed, self.spills, self.compute_seconds, (self._now() - self.start_ns) / 1e9)
        if s.steps_done >= s.steps_total:
            self._release(s)
            self.active.remove(s)
            self.sessions_completed += 1
            self.finished_tool_shares.append(s.tool_seconds / (s.tool_seconds + s.gpu_seconds))
            return
        # The tool call: the session leaves the GPU while the CPU works.
        s.state = "tool"
        s.idle_since_ns = self._now()
        cancel, bound = self.cancel_tools, {}
        if self.simulation is not None:
            # It lasts its drawn time on the schedule; its CPU work is stopped at that end (or ends by itself
            # after that much wall time), so a slow CPU never lengthens it.
            s.tool_start_ns, s.tool_end_ns = s.idle_since_ns, s.idle_since_ns + round(step.tool_seconds * 1e9)
            s.tool_done = threading.Event()
            cancel, bound = _EitherEvent(self.cancel_tools, s.tool_done), {"max_rounds": SIMULATED_TOOL_ROUNDS}
        s.tool_future = self.pool.submit(tool_work, step.tool_seconds, step.tool_seed, cancel, **bound)

    # -- tool calls ---------------------------------------------------------------------------------------

    def _tool_call_over(self, s: _Session, final: bool) -> bool:
        if self.simulation is None:
            return s.tool_future.done()
        return final or self._now() >= s.tool_end_ns

    def _harvest_tool_calls(self, final: bool = False) -> None:
        for s in [o for o in self.active if o.state == "tool" and self._tool_call_over(o, final)]:
            if s.tool_done is not None:
                s.tool_done.set()  # simulated: its scheduled end has come; the CPU work stops within a round
            work: ToolWork = s.tool_future.result()  # a failed tool call is a bug here: let it raise
            s.tool_future = None
            start_ns, end_ns = work.start_ns, work.end_ns
            if self.simulation is not None:
                start_ns, end_ns = s.tool_start_ns, min(s.tool_end_ns, self._now())
            seconds = (end_ns - start_ns) / 1e9
            self.reporter.span("tool_call", start_ns, end_ns)
            self.tool_calls += 1
            self.tool_seconds += seconds
            self.tool_cpu_seconds += work.cpu_seconds
            s.tool_seconds += seconds
            if not final:
                self._begin_step(s)

    def _wait_for_a_tool_call(self, deadline_ns: int) -> None:
        in_tools = [s for s in self.active if s.state == "tool"]
        start_ns = self._now()
        if self.simulation is not None:
            # The GPU idles until the first tool call's scheduled end (or the deadline).
            self.simulation.clock.wait_until(min([deadline_ns, *(s.tool_end_ns for s in in_tools)]))
        else:
            timeout = max(0.0, min(IDLE_POLL_SECONDS, (deadline_ns - start_ns) / 1e9))
            concurrent.futures.wait([s.tool_future for s in in_tools], timeout=timeout,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        end_ns = self._now()
        self.idle_seconds += (end_ns - start_ns) / 1e9
        self.spans.add("idle", start_ns, end_ns, None)

    # -- the summary --------------------------------------------------------------------------------------

    def _summary(self, wall: float) -> dict:
        summary = summary_header("agentic", self.options, self.device, self.dtype, wall, self.reporter.tokens)
        # Under --compile: whether every decode shape ran compiled, or the recompile limit sent some eager.
        summary["compile"] = self.decoder.compile_report() if self.decoder is not None else None
        shares = self.finished_tool_shares + [s.tool_seconds / (s.tool_seconds + s.gpu_seconds)
                                              for s in self.active if s.gpu_seconds > 0]
        contexts = self.context_at_prefill
        # Simulated: the timing preset's KV bytes, which the transfer seconds were costed from.
        moved = self.spilled_bytes + self.restored_bytes
        if self.simulation is not None:
            moved = self.simulated_transfer_bytes
        c, p = self.config, self.plan
        summary.update({
            "config": {
                "sessions": p.sessions, "total_sessions": c.total_sessions, "length_scale": p.length_scale,
                "token_scale": p.token_scale,
                "tool_time_scale": p.tool_time_scale, "tool_time_cap_seconds": c.tool_time_cap_seconds,
                "max_len": p.max_len, "compaction_threshold_tokens": p.threshold,
                "compaction_keep_tokens": p.keep, "kv_budget_bytes": c.kv_budget_bytes,
                "kv_budget_tokens": p.budget_tokens,
                "kv_bytes_per_token": p.kv_bytes_per_token, "batch_decode": c.batch_decode,
                "static_decode": self.decoder is not None,
            },
            "sessions_started": self.sessions_started,
            "sessions_completed": self.sessions_completed,
            "steps": self.steps,
            "appended_tokens": self.appended_tokens,
            "generated_tokens": self.generated_tokens,
            # Context the model sees at each step's prefill (cached + new), and the share of it reused.
            "context_tokens": {"mean": round(sum(contexts) / len(contexts), 1) if contexts else None,
                               "max": max(contexts) if contexts else None},
            "prefix_cached_share": (round(self.cached_tokens / self.prefill_context_tokens, 4)
                                    if self.prefill_context_tokens else None),
            "tool_calls": self.tool_calls,
            "tool_seconds": round(self.tool_seconds, 3),
            "tool_cpu_seconds": round(self.tool_cpu_seconds, 3),
            "tool_time_share": {
                # Per session: tool time / (tool time + time of the forward passes it took part in).
                "per_session_mean": round(sum(shares) / len(shares), 4) if shares else None,
                # Tool time over all session-time: tool seconds / (concurrent sessions x wall).
                "of_session_wall": round(self.tool_seconds / (p.sessions * wall), 4) if wall > 0 else None,
            },
            "compute_seconds": round(self.compute_seconds, 3),
            "compute_busy_fraction": round(self.compute_seconds / wall, 4) if wall > 0 else None,
            "idle_fraction": round(self.idle_seconds / wall, 4) if wall > 0 else None,
            "spill": {
                "policy": c.spill_policy,
                "spills": self.spills,
                "restores": self.restores,
                "spilled_bytes": self.spilled_bytes,
                "restored_bytes": self.restored_bytes,
                "transfer_seconds": round(self.transfers.seconds, 6),
                "achieved_gb_per_s": (round(moved / self.transfers.seconds / 1e9, 3)
                                      if moved and self.transfers.seconds > 0 else None),
                "recomputed_tokens": self.recomputed_tokens,
            },
            "compactions": self.compactions,
            "compaction_prefill_tokens": self.compaction_tokens,
        })
        if c.record_steps:
            summary["steps_trace"] = self.trace
        if self.simulation is not None:
            summary["simulated_device"] = self.simulation.summary(wall, {"prompt": self.reporter.tokens["prompt"],
                                                                         "generated": self.generated_tokens})
        return summary


def run(config: AgenticConfig, options: RunOptions, reporter: Reporter, stop: threading.Event | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns) -> dict:
    """Run the sessions until ``options.duration_s``, ``stop``, or ``config.total_sessions``; return the summary.

    The caller starts and stops ``reporter``. Tokens: appended -> "prompt", decoded -> "generated" (the
    KV recomputed after a spill or a compaction is compute, not new tokens). Spans: "compute" for prefill
    and decode, "tool_call" per tool call (overlapping other sessions' compute), "transfer" for spills and
    restores, "idle" while every session is in a tool call.

    With ``options.simulation`` the run is on the simulated device's time (module docstring): a
    ``PacedClock`` paced to ``clock_ns`` (the wall clock, injectable for tests) sleeping with ``stop.wait``;
    the fractions are over the scheduled time and ``simulated_device`` holds the pacing report.
    """
    runner = _AgenticRun(config, options, reporter, stop or threading.Event(), clock_ns)
    threads_before = torch.get_num_threads()
    if runner.device.type == "cpu":
        # The tool threads need cores of their own: intra-op threads spinning on cores that tool calls
        # occupy slow every forward pass several times over (seen: 50 ms instead of 1 ms for a tiny decode).
        torch.set_num_threads(min(threads_before, max(1, _cpu_count() - runner.plan.sessions)))
    try:
        summary = runner.run()
        summary["config"]["torch_threads"] = torch.get_num_threads()
        return summary
    finally:
        torch.set_num_threads(threads_before)
        runner.cancel_tools.set()
        runner.pool.shutdown(wait=True)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- Command line -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This workload's options (the shared ones, --preset --duration --device --seed, are the caller's)."""
    parser.add_argument("--sessions", default=None, help="concurrent sessions (default: 16 on CUDA, 3 on CPU)")
    parser.add_argument("--total-sessions", default=None, help="stop once this many sessions completed "
                        "(default: run for --duration)")
    parser.add_argument("--tool-time-scale", default=None, help="multiply tool-call times (default: 1 on CUDA, "
                        f"{CPU_TOOL_TIME_SCALE} on CPU)")
    parser.add_argument("--tool-time-cap", default=None, help="cap on a tool call's trace time before the scale, "
                        f"e.g. 60s (default {TOOL_TIME_CAP_SECONDS:g}s)")
    parser.add_argument("--kv-budget", default=None, help="device KV budget in bytes, e.g. 64MiB, 4GiB, or "
                        "none for no limit (default: half of what all sessions could hold at their largest); "
                        "(default: no limit)")
    parser.add_argument("--spill-policy", default="offload", help="past the budget: offload (pinned host), "
                        "offload-pageable, recompute")
    parser.add_argument("--compaction-threshold", default=None, help="compact a context past this many tokens "
                        "(default: min(65536, cache length))")
    parser.add_argument("--length-scale", default=None, help="multiply token lengths (default: cache length / 8192, "
                        "at most 1)")


def config_from_args(args: argparse.Namespace) -> AgenticConfig:
    """The config from parsed arguments; ValueError (one line) for a bad value."""
    from wattledger.agent.config import parse_duration_seconds

    cap = TOOL_TIME_CAP_SECONDS
    if args.tool_time_cap is not None:
        cap = parsed_flag("--tool-time-cap", args.tool_time_cap, parse_duration_seconds, positive=True)
    budget = None
    share = AgenticConfig.kv_budget_share
    if args.kv_budget is not None and args.kv_budget.strip().lower() == "none":
        share = None
    elif args.kv_budget is not None:
        budget = parsed_flag("--kv-budget", args.kv_budget, parse_bytes, positive=True)
    if args.spill_policy not in SPILL_POLICIES:
        raise ValueError(f"--spill-policy must be one of {', '.join(SPILL_POLICIES)}, got {args.spill_policy!r}")
    config = AgenticConfig(
        sessions=number_flag("--sessions", args.sessions, int, positive=True),
        total_sessions=number_flag("--total-sessions", args.total_sessions, int, positive=True),
        tool_time_scale=number_flag("--tool-time-scale", args.tool_time_scale, positive=True),
        tool_time_cap_seconds=cap,
        kv_budget_bytes=budget,
        kv_budget_share=share,
        spill_policy=args.spill_policy,
        compaction_threshold_tokens=number_flag("--compaction-threshold", args.compaction_threshold, int,
                                                positive=True),
        length_scale=number_flag("--length-scale", args.length_scale, positive=True),
    )
    config.validate()
    return config
