"""A small synthetic run directory, as ``wattledger bench`` writes it, for the report tests.

``make_run_dir`` writes the raw files (events.jsonl, samples.jsonl with header, gpu, host, tokens and, when
simulated, truth records, spans.jsonl) that ``load_run`` reads, and returns the loaded ``RunData`` with a
summary dict shaped like summary.json (docs/summary.schema.json). The shapes are made to be recognisable
in the figures: training is flat near full utilization, chat is spiky (request bursts on a quiet
baseline), agentic runs steadily but is broken by gaps where every session waits on a tool call.

Deterministic: one seeded ``random.Random``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from wattledger.workloads.bench.rundata import RunData, load_run
from wattledger.workloads.registry import REGIMES

ORIGIN_NS = 1_000_000_000_000  # the host's monotonic clock at run start
INTERVAL_S = 0.2  # sampling interval
IDLE_S = 4.0  # idle baseline
PHASE_S = 15.0  # each regime's phase
GAP_S = 1.0  # cool-down between phases
RAMP_S = 1.0  # excluded from the steady-state window at the start of a phase
IDLE_W = 72.0  # per GPU
LIMIT_W = 700.0
GIB = 2**30
GPU_HOUR_USD = 2.49
KWH_USD = 0.12
GCO2_PER_KWH = 380.0
PUE = 1.2

# Main token kind and cumulative kinds each regime reports, with rates (tokens/s at full activity).
TOKEN_RATES = {
    "training": {"trained": 52_000.0},
    "chat": {"prompt": 9_000.0, "generated": 2_400.0},
    "agentic": {"prompt": 6_500.0, "generated": 900.0},
}
MAIN_KIND = {name: REGIMES[name].main_token_kind for name in TOKEN_RATES}
CREATED = "2024-06-01T09:30:00+00:00"
HOST = {"hostname": "bench-host", "cpu_model": "AMD EPYC 9454 48-Core", "cpu_count": 32, "memory_total_bytes": 512 * GIB}


def _settings(simulated: bool) -> dict:
    return {"preset": "tiny", "device": "cpu" if simulated else "cuda", "sampling_interval_seconds": INTERVAL_S,
            "versions": {"wattledger": "0.1.0", "torch": "2.4.0"}}


def _activity(regime: str, x: float, rng: random.Random, bursts: list[tuple[float, float]],
              tools: list[tuple[float, float]]) -> float:
    """Utilization (0..1) of one GPU ``x`` seconds into ``regime``'s phase."""
    if regime == "training":
        return min(1.0, 0.97 + rng.uniform(-0.02, 0.02))  # flat
    if regime == "chat":
        base = 0.12 + 0.08 * math.sin(x / 3.0) ** 2
        if any(start <= x < end for start, end in bursts):
            return min(1.0, 0.75 + rng.uniform(0.0, 0.25))  # a spike: a burst of requests
        return max(0.0, base + rng.uniform(-0.05, 0.05))
    if regime == "agentic":
        if any(start <= x < end for start, end in tools):
            return rng.uniform(0.0, 0.03)  # every session is in a tool call: the GPU waits
        return min(1.0, 0.72 + rng.uniform(-0.08, 0.08))
    return 0.0


def _windows(rng: random.Random, count: int, min_len: float, max_len: float) -> list[tuple[float, float]]:
    starts = sorted(rng.uniform(RAMP_S, PHASE_S - max_len) for _ in range(count))
    return [(s, s + rng.uniform(min_len, max_len)) for s in starts]


def _write_jsonl(path: Path, records: list[dict], cut_last: bool = False) -> None:
    lines = [json.dumps(r, separators=(",", ":")) for r in records]
    text = "\n".join(lines) + "\n"
    if cut_last:  # a kill in the middle of a write leaves half a line
        text += lines[-1][: len(lines[-1]) // 2]
    path.write_text(text, encoding="utf-8")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def make_run_dir(path: str | Path, simulated: bool = True, regimes=("training", "chat", "agentic"),
                 partial: bool = False, gpus: int = 1) -> tuple[RunData, dict]:
    """Write a synthetic run directory under ``path`` and return ``(load_run(path), summary)``.

    ``partial``: the run was killed during its last regime: that phase has no phase_end, there is no
    run_end, samples.jsonl ends in half a line, and the summary (status "partial") leaves the unfinished
    regime out.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20240601)
    regimes = tuple(regimes)

    def ns(t: float) -> int:
        return ORIGIN_NS + round(t * 1e9)

    # The timeline: idle baseline, then each regime after a cool-down gap.
    phases: list[tuple[str, float, float]] = [("idle", 0.0, IDLE_S)]
    t = IDLE_S
    for regime in regimes:
        t += GAP_S
        phases.append((regime, t, t + PHASE_S))
        t += PHASE_S
    end_s = t + GAP_S
    if partial and regimes:
        name, start, _ = phases[-1]
        end_s = start + PHASE_S * 0.6  # killed 60 % of the way through the last regime
        phases[-1] = (name, start, end_s)

    shapes = {"chat": (_windows(rng, 6, 0.4, 1.0), []), "agentic": ([], _windows(rng, 3, 1.2, 2.0))}
    uuids = [f"GPU-00000000-0000-4000-8000-{i:012d}" for i in range(gpus)]
    gpu_infos = [{"index": i, "uuid": uuids[i], "model_name": "NVIDIA H100 80GB HBM3",
                  "driver_version": "simulated" if simulated else "550.54.15", "memory_total_bytes": 80 * GIB,
                  "power_limit_default_watts": LIMIT_W, "simulated": simulated,
                  "pci_bus_id": f"00000000:{0x18 + i:02X}:00.0", "mig_enabled": False} for i in range(gpus)]
    samples: list[dict] = [{"type": "header", "format": "wattledger-samples", "version": 1,
                            "backend": "mock" if simulated else "nvml", "simulated": simulated,
                            "interval_seconds": INTERVAL_S, "gpus": gpu_infos}]
    energy = [1.0e6 + 1.0e5 * i for i in range(gpus)]  # counters since driver load
    truth = [0.0] * gpus
    tokens: dict[str, float] = {f"{r}/{k}": 0.0 for r in regimes for k in TOKEN_RATES.get(r, {})}
    per_sample: list[dict] = []  # (t, regime, util per GPU, power per GPU) for the summary
    steps = round(end_s / INTERVAL_S)
    for step in range(1, steps + 1):
        t = step * INTERVAL_S
        regime, x = None, 0.0
        for name, start, stop in phases:
            if start <= t < stop and name != "idle":
                regime, x = name, t - start
        utils, powers = [], []
        for i in range(gpus):
            bursts, tools = shapes.get(regime, ([], []))
            util = _activity(regime, x, rng, bursts, tools) if regime else 0.0
            power = IDLE_W + (LIMIT_W - IDLE_W - 60.0) * util ** 1.3 + rng.uniform(-3.0, 3.0)
            energy[i] += power * INTERVAL_S
            truth[i] += power * INTERVAL_S * 1.004  # the counter reads a shade low, as on real boards
            hbm = {"training": 62 * GIB, "chat": 41 * GIB, "agentic": 70 * GIB}.get(regime, 0.6 * GIB)
            temperature = 33.0 + 40.0 * util + rng.uniform(-0.5, 0.5)
            samples.append({
                "type": "gpu", "index": i, "uuid": uuids[i], "monotonic_ns": ns(t) + 1000 * i, "up": True,
                "utilization_gpu_ratio": round(util, 4),
                "utilization_memory_controller_ratio": round(util * 0.6, 4),
                "sm_activity_ratio": round(util * 0.85, 4), "tensor_activity_ratio": round(util * 0.5, 4),
                "dram_activity_ratio": round(util * 0.45, 4),
                "memory_used_bytes": int(hbm + rng.uniform(0, 0.3) * GIB), "memory_total_bytes": 80 * GIB,
                "power_watts": round(power, 2), "energy_joules": round(energy[i], 3),
                "power_limit_watts": LIMIT_W, "temperature_gpu_celsius": round(temperature, 1),
                "sm_clock_hertz": 1.98e9, "throttle_reasons": [],
            })
            utils.append(util)
            powers.append(power)
        pinned = 8 * GIB if regime == "agentic" else 0
        host_used = (24 + (14 if regime == "agentic" else 0) + (3 if regime == "training" else 0)) * GIB
        samples.append({
            "type": "host", "monotonic_ns": ns(t) + 500, "cpu_busy_seconds": 10.0 + t * 3.1, "cpu_count": 32,
            "memory_total_bytes": 512 * GIB, "memory_used_bytes": int(host_used + rng.uniform(0, 0.5) * GIB),
            "memory_available_bytes": int(512 * GIB - host_used),
            "processes": [{"pid": 4242, "rss_bytes": 6 * GIB, "cpu_seconds": t, "locked_bytes": 0,
                           "pinned_bytes": pinned}],
        })
        if regime in TOKEN_RATES:
            share = sum(utils) / len(utils)
            for kind, rate in TOKEN_RATES[regime].items():
                tokens[f"{regime}/{kind}"] += rate * share * INTERVAL_S * gpus
        samples.append({"type": "tokens", "monotonic_ns": ns(t) + 700,
                        "counts": {k: int(v) for k, v in tokens.items()}})
        if simulated:
            samples.append({"type": "truth", "monotonic_ns": ns(t) + 800, "energy_joules": [round(e, 3) for e in truth]})
        per_sample.append({"t": t, "regime": regime, "utils": utils, "power": sum(powers)})
    _write_jsonl(path / "samples.jsonl", samples, cut_last=partial)

    # Spans: training steps and chat bursts as compute, agentic tool calls and the idle gaps they make.
    spans: list[dict] = []
    for name, start, stop in phases:
        if name == "training":
            spans.append({"workload": name, "kind": "compute", "start_ns": ns(start), "end_ns": ns(stop)})
        elif name == "chat":
            spans += [{"workload": name, "kind": "compute", "start_ns": ns(start + a), "end_ns": ns(start + b)}
                      for a, b in shapes["chat"][0] if start + b <= stop]
        elif name == "agentic":
            for a, b in shapes["agentic"][1]:
                if start + b <= stop:
                    spans.append({"workload": name, "kind": "tool_call", "start_ns": ns(start + a - 0.3),
                                  "end_ns": ns(start + b)})
                    spans.append({"workload": name, "kind": "idle", "start_ns": ns(start + a),
                                  "end_ns": ns(start + b)})
    _write_jsonl(path / "spans.jsonl", spans)

    # Events and the workloads' own summaries.
    workload_summaries = {
        "training": {"workload": "training", "mfu": 0.412, "goodput": 0.953,
                     "step_time_seconds": {"mean": 0.31, "p50": 0.30, "p90": 0.34}},
        "chat": {"workload": "chat", "ttft_seconds": {"p50": 0.084, "p90": 0.21, "p99": 0.46, "mean": 0.11},
                 "tpot_seconds": {"p50": 0.0192, "p90": 0.027, "p99": 0.041, "mean": 0.021},
                 "requests_completed": 412},
        "agentic": {"workload": "agentic", "tool_calls": 57,
                    "tool_time_share": {"per_session_mean": 0.38, "of_session_wall": 0.34},
                    "spill": {"policy": "offload", "spills": 14, "spilled_bytes": 5_368_709_120,
                              "restored_bytes": 4_831_838_208, "achieved_gb_per_s": 31.7}},
    }
    for name, summary in workload_summaries.items():  # the header every workload summary starts with
        counts = {k: int(tokens.get(f"{name}/{k}", 0)) for k in ("prompt", "generated", "trained")}
        summary.update({"preset": "tiny", "device": "cpu" if simulated else "cuda", "dtype": "bfloat16",
                        "duration_seconds": PHASE_S, "tokens": counts})
    events: list[dict] = [{"type": "run_start", "monotonic_ns": ORIGIN_NS, "kind": "bench",
                           "wall_time": CREATED, "host": HOST, "settings": _settings(simulated)}]
    for index, (name, start, stop) in enumerate(phases):
        events.append({"type": "phase_start", "phase": name, "monotonic_ns": ns(start)})
        unfinished = partial and index == len(phases) - 1 and name != "idle"
        if not unfinished:
            events.append({"type": "phase_end", "phase": name, "monotonic_ns": ns(stop),
                           "workload_summary": workload_summaries.get(name)})
    if not partial:
        events.append({"type": "run_end", "monotonic_ns": ns(end_s), "status": "complete"})
    _write_jsonl(path / "events.jsonl", events)

    summary = _summary(phases, per_sample, tokens, workload_summaries, simulated, partial, gpu_infos)
    return load_run(path), summary


def _summary(phases, per_sample, tokens, workload_summaries, simulated, partial, gpu_infos) -> dict:
    gpus = len(gpu_infos)
    idle = [s["power"] for s in per_sample if s["t"] < IDLE_S]
    idle_w = sum(idle) / len(idle)
    usd_per_joule_energy = KWH_USD * PUE / 3.6e6
    regimes, economics = {}, {}
    finished = phases[1:-1] if partial else phases[1:]
    for name, start, stop in finished:
        window = [s for s in per_sample if start + RAMP_S <= s["t"] < stop]
        utils = [u for s in window for u in s["utils"]]
        powers = [s["power"] for s in window]
        duration = len(window) * INTERVAL_S
        energy = sum(powers) * INTERVAL_S
        kinds = {k: int(tokens.get(f"{name}/{k}", 0) * duration / (stop - start)) for k in TOKEN_RATES[name]}
        counts = {"prompt": kinds.get("prompt", 0), "generated": kinds.get("generated", 0),
                  "trained": kinds.get("trained", 0)}
        main = MAIN_KIND[name]
        main_tokens = counts[main]
        mean_util = sum(utils) / len(utils)
        gpu_usd = GPU_HOUR_USD * gpus * duration / 3600
        measured = (gpu_usd + energy * usd_per_joule_energy) / main_tokens * 1e6
        full_tokens_per_s = main_tokens / duration / mean_util
        full_load = (GPU_HOUR_USD * gpus / 3600 + (IDLE_W + LIMIT_W - IDLE_W - 60) * gpus * usd_per_joule_energy) \
            / full_tokens_per_s * 1e6
        regimes[name] = {
            "duration_seconds": round(duration, 3),
            "phase_seconds": round(stop - start, 3),
            "window": {"start_seconds": start + RAMP_S, "end_seconds": stop},
            "gpu_utilization": {"mean": mean_util, "p50": _percentile(utils, 0.5), "p99": _percentile(utils, 0.99),
                                "idle_fraction": sum(u < 0.05 for u in utils) / len(utils)},
            "power_watts": {"mean": sum(powers) / len(powers), "p99": _percentile(powers, 0.99)},
            "energy_joules": energy,
            "tokens": counts,
            "tokens_per_second": {k: v / duration for k, v in counts.items() if v},
            "main_token_kind": main,
            "joules_per_token": {"gross": energy / main_tokens,
                                 "dynamic": (energy - idle_w * duration) / main_tokens},
            "cost_usd_per_million_tokens": {"measured": measured, "full_load": full_load},
            "energy_share_of_cost": energy * usd_per_joule_energy / (gpu_usd + energy * usd_per_joule_energy),
            "co2_grams_per_million_tokens": energy / 3.6e6 * PUE * GCO2_PER_KWH / main_tokens * 1e6,
            "workload": workload_summaries[name],
            "validity": [
                {"check": "steady_state_window", "passed": True,
                 "detail": f"{duration:.1f} s after a {RAMP_S:.0f} s ramp excluded"},
                {"check": "counter_vs_integrated_power", "passed": True,
                 "detail": "energy counter and integrated power agree within 0.4 %"},
            ],
        }
        if simulated:
            regimes[name]["mock_truth"] = {"energy_joules": energy * 1.004,
                                           "joules_per_token": energy * 1.004 / main_tokens}
        economics[name] = {"cost_curve": [
            {"utilization": u / 20, "usd_per_million_tokens": full_load / (u / 20)} for u in range(1, 21)]}
    if "chat" in regimes:  # one failing check, so the report has one to show
        regimes["chat"]["validity"].append({"check": "tokens_reported", "passed": False,
                                            "detail": "3 of 412 requests finished after the window closed"})
    summary = {
        "schema_version": 1,
        "kind": "bench",
        "status": "partial" if partial else "complete",
        "backend": "mock" if simulated else "nvml",
        "simulated": simulated,
        "created": CREATED,
        "host": HOST,
        "settings": _settings(simulated),
        "gpus": [{"index": g["index"], "uuid": g["uuid"], "model_name": g["model_name"],
                  "driver_version": g["driver_version"], "power_limit_watts": LIMIT_W,
                  "memory_total_bytes": g["memory_total_bytes"], "simulated": simulated} for g in gpu_infos],
        "idle": {"power_watts": idle_w, "duration_seconds": IDLE_S, "energy_joules": idle_w * IDLE_S},
        "regimes": regimes,
        "validity": [
            {"check": "idle_baseline_stable", "passed": True, "detail": "idle power spread 6 W over 4 s"},
            {"check": "sampling_interval", "passed": True, "detail": f"median interval {INTERVAL_S * 1000:.0f} ms"},
            {"check": "thermal_steady_state", "passed": not partial,
             "detail": "temperature settled within 2 °C" if not partial else "run ended before the last phase settled"},
        ],
        # The shape economics.pricing_record writes: inputs, their sources, formulas, notes.
        "pricing": {
            "currency": "USD",
            "gpu_cost_model": "hourly",
            "gpu_hour_usd": GPU_HOUR_USD,
            "gpu_purchase_usd": None,
            "amortisation_years": 4.0,
            "hosting_usd_per_gpu_hour": 0.0,
            "electricity_usd_per_kwh": KWH_USD,
            "pue": PUE,
            "grid_carbon_g_per_kwh": GCO2_PER_KWH,
            "gpu_cost_usd_per_gpu_hour": GPU_HOUR_USD,
            "sources": {
                "gpu_hour_usd": "on-demand H100 list price, a public cloud's price page",
                "gpu_purchase_usd": "not given",
                "amortisation_years": "assumption: 4 years",
                "hosting_usd_per_gpu_hour": "assumption: 0",
                "electricity_usd_per_kwh": "EIA average US commercial electricity price",
                "pue": "Uptime Institute global survey",
                "grid_carbon_g_per_kwh": "EPA eGRID US average",
            },
            "formulas": {
                "facility_energy_kwh": "energy_joules / 3.6e6 * pue",
                "co2_grams_per_million_tokens": "facility_energy_kwh * grid_carbon_g_per_kwh / tokens * 1e6",
            },
            "notes": ["PUE applies to paid-for energy and CO2 only; measured joules never include it"],
        },
        "economics": economics,
    }
    return summary
