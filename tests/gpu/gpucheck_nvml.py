"""The NVML steps of tests/gpu/check.py: the cost of each NVML call, ``wattledger devices --json`` against
``nvidia-smi``, and ``wattledger bench`` beside a 100 ms recording and nvidia-smi every second (counter
energy against integrated power). None of these imports torch; the bench it starts does.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpucheck_runner import REPO, Context, Skip, wattledger_command

# `devices --json` against nvidia-smi: the same NVML answers seen two ways, so names, UUIDs and the driver
# must be equal; memory is MiB in nvidia-smi (rounded), bytes in NVML; the power limit is W with 2 decimals.
MEMORY_TOLERANCE_MIB = 1.0
POWER_LIMIT_TOLERANCE_W = 1.0
# Counter energy against power integrated over the same window. The 100 ms samples read the instant power
# field (NVML_FI_DEV_POWER_INSTANT): the trapezoid over them misses only sub-100 ms swings, so 5%.
# nvidia-smi's power.draw is a 1 s average sampled once a second: 10%.
ENERGY_VS_RECORDING_TOLERANCE = 0.05
ENERGY_VS_NVIDIA_SMI_TOLERANCE = 0.10
# The mock's power is noisy sample to sample, and a dry run integrates only ~15 samples of it.
ENERGY_VS_RECORDING_TOLERANCE_DRY_RUN = 0.10
# The energy counter (nvmlDeviceGetTotalEnergyConsumption): updates at least every 100 ms, or the 100 ms
# recording cannot attribute energy tick by tick (Hopper is documented nowhere; the check measures it).
ENERGY_UPDATE_PERIOD_HIGH_MS = 100.0
BENCH_TIMEOUT_S = 240.0  # three regimes of 8 s, their set-up, idle, cooldowns and the report: ~2 minutes
RECORDING_KEEP_S = 30.0  # the slice of the recording kept for the replay tests
RECORDING_MAX_BYTES = 3 * 2**20
NVIDIA_SMI_FILE = "nvidia-smi.csv"
RECORDING_FILE = "recording.jsonl"
BENCH_SUMMARY_FILE = "bench_summary.json"


def nvidia_smi_or_skip(ctx: Context) -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None and not ctx.dry_run:
        raise Skip("no GPU: nvidia-smi not found")
    return None if ctx.dry_run else smi


# --- NVML call costs ----------------------------------------------------------------------------------


def nvml_costs(ctx: Context) -> None:
    """Return code and cost of every NVML call the backend makes (probes/nvml_costs.py), and how often the
    energy counter moves. A dry run times the NVML stub of tests/nvml_stub.py."""
    from wattledger.probes import nvml_costs as costs_module

    if ctx.dry_run:
        sys.path.insert(0, str(REPO / "tests"))
        from nvml_stub import make_nvml_stub

        nvml = make_nvml_stub()
        ctx.note("dry run: the NVML stub of tests/nvml_stub.py, not a driver")
    else:
        import pynvml as nvml
    nvml.nvmlInit()
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        costs = costs_module.measure_call_costs(nvml, handle, repeats=5 if ctx.dry_run else 200)
        period = costs_module.measure_energy_update_period(nvml, handle, duration_s=0.2 if ctx.dry_run else 3.0)
    finally:
        nvml.nvmlShutdown()
    ctx.figure("calls", {c.name: {"rc": c.return_code, "role": c.role, "median_us": c.median_us,
                                  "p99_us": c.p99_us} for c in costs})
    ctx.figure("tick_us_per_gpu", costs_module.tick_cost_us(costs))
    ctx.figure("energy_update", vars(period) if hasattr(period, "__dict__") else
               {k: getattr(period, k) for k in period.__slots__})
    failing = sorted(c.name for c in costs if c.role == costs_module.ROLE_TICK
                     and c.return_code != costs_module.SUCCESS)
    ctx.figure("tick_calls_not_succeeding", failing)
    # What the sampler's 100 ms tick can afford: all NVML calls of a tick for one GPU well under 10 ms.
    ctx.check_range("NVML per tick per GPU (us)", costs_module.tick_cost_us(costs), 0.0, 10_000.0)
    ctx.check("energy counter reads", period.return_code, costs_module.SUCCESS,
              period.return_code == costs_module.SUCCESS)
    if ctx.dry_run:
        ctx.note("dry run: the stub's energy counter moves only when told, so its period is not judged")
        return
    ctx.check_range("energy counter update period (ms)", period.median_interval_ms, 0.0, ENERGY_UPDATE_PERIOD_HIGH_MS)


# --- devices --json against nvidia-smi ----------------------------------------------------------------------

SMI_DEVICE_QUERY = "index,name,uuid,memory.total,power.default_limit,driver_version"


def devices_vs_nvidia_smi(ctx: Context) -> None:
    smi = nvidia_smi_or_skip(ctx)
    backend = ["--backend", "mock"] if ctx.dry_run else ["--backend", "nvml"]
    done = subprocess.run(wattledger_command("devices", "--json", *backend), capture_output=True, text=True,
                          timeout=60, check=False)
    ctx.check("devices --json rc", done.returncode, "0", done.returncode == 0)
    if done.returncode != 0:
        ctx.note(done.stderr.strip()[-1000:])
        return
    report = json.loads(done.stdout)
    ctx.figure("devices", [{k: g[k] for k in ("index", "model_name", "uuid", "memory_total_bytes",
                                             "power_limit_default_watts", "driver_version", "up")}
                           for g in report["gpus"]])
    if smi is None:
        ctx.note("dry run: nvidia-smi's answer is made from the mock's own devices (this checks the parsing)")
        smi_text = "\n".join(f"{g['index']}, {g['model_name']}, {g['uuid']}, {g['memory_total_bytes'] // 2**20}, "
                             f"{g['power_limit_default_watts']:.2f}, {g['driver_version']}" for g in report["gpus"])
    else:
        smi_text = subprocess.run([smi, f"--query-gpu={SMI_DEVICE_QUERY}", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=30, check=True).stdout
    compare_devices(ctx, report["gpus"], parse_smi_devices(smi_text))


def parse_smi_devices(text: str) -> dict[int, dict]:
    rows = {}
    for fields in csv.reader(io.StringIO(text.strip()), skipinitialspace=True):
        if len(fields) != 6:
            continue
        index, name, uuid, memory_mib, limit_w, driver = (f.strip() for f in fields)
        rows[int(index)] = {"name": name, "uuid": uuid, "memory_mib": _number(memory_mib),
                            "power_limit_w": _number(limit_w), "driver": driver}
    return rows


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def compare_devices(ctx: Context, gpus: list[dict], smi: dict[int, dict]) -> None:
    ctx.check("GPU count", len(gpus), f"{len(smi)} (nvidia-smi's)", len(gpus) == len(smi) and len(gpus) > 0)
    for g in gpus:
        row = smi.get(g["index"])
        label = f"GPU {g['index']}"
        if row is None:
            ctx.check(f"{label} in nvidia-smi", None, "present", False)
            continue
        ctx.check(f"{label} name", g["model_name"], row["name"], g["model_name"] == row["name"])
        ctx.check(f"{label} uuid", g["uuid"], row["uuid"], g["uuid"] == row["uuid"])
        ctx.check(f"{label} driver", g["driver_version"], row["driver"], g["driver_version"] == row["driver"])
        memory_mib = None if g["memory_total_bytes"] is None else g["memory_total_bytes"] / 2**20
        ctx.check(f"{label} memory MiB", memory_mib, f"{row['memory_mib']} +- {MEMORY_TOLERANCE_MIB:g}",
                  _within(memory_mib, row["memory_mib"], MEMORY_TOLERANCE_MIB))
        limit = g["power_limit_default_watts"]
        ctx.check(f"{label} default power limit W", limit, f"{row['power_limit_w']} +- {POWER_LIMIT_TOLERANCE_W:g}",
                  _within(limit, row["power_limit_w"], POWER_LIMIT_TOLERANCE_W))


def _within(value, reference, tolerance) -> bool:
    return value is not None and reference is not None and abs(value - reference) <= tolerance


# --- bench beside a recording and nvidia-smi: counter energy against integrated power -----------------------


def bench_energy(ctx: Context) -> None:
    """``wattledger bench --preset 1b`` (NVML) while ``wattledger agent --record`` samples every 100 ms and
    nvidia-smi every second; then energy from the counter against power integrated over the same window.
    A dry run records the mock for two seconds with no bench (the bench's own test covers it on CPU)."""
    smi = nvidia_smi_or_skip(ctx)
    recording = ctx.scratch / "recording-full.jsonl"
    smi_file = ctx.out_dir / NVIDIA_SMI_FILE
    wall_minus_monotonic_s = time.time() - time.monotonic()
    agent = subprocess.Popen(wattledger_command("agent", "--backend", "mock" if ctx.dry_run else "nvml",
                                                "--interval", "100ms", "--address", "127.0.0.1", "--port", "0",
                                                "--record", str(recording), "--log-level", "warning"),
                             stdout=subprocess.DEVNULL, stderr=(ctx.scratch / "agent.log").open("w"))
    sampler = None
    if smi is not None:
        sampler = subprocess.Popen([smi, "--query-gpu=timestamp,index,power.draw", "--format=csv,noheader,nounits",
                                    "-l", "1", "-f", str(smi_file)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    try:
        # The agent's first samples before the load starts, and its last ones after it ends.
        settle_s = 0.7 if ctx.dry_run else 2.0
        time.sleep(settle_s)
        if ctx.dry_run:
            time.sleep(0.5)
        else:
            _run_bench(ctx)
        time.sleep(settle_s)
    finally:
        for process in (agent, sampler):
            if process is not None:
                process.send_signal(signal.SIGINT)
        for process in (agent, sampler):
            if process is not None:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
    ctx.check("agent stopped cleanly", agent.returncode, "0", agent.returncode == 0)
    samples = read_recording(recording)
    ctx.check("recording has samples", sum(len(v) for v in samples.values()), "> 10",
              sum(len(v) for v in samples.values()) > 10)
    judge_energy(ctx, samples, wall_minus_monotonic_s, smi_file if smi is not None else None)
    keep_recording_slice(ctx, recording, ctx.out_dir / RECORDING_FILE)


def _run_bench(ctx: Context) -> None:
    output = ctx.scratch / "bench"
    budget = min(BENCH_TIMEOUT_S, max(30.0, ctx.remaining_s() - 20))
    done = subprocess.run(wattledger_command("bench", "--preset", "1b", "--backend", "nvml", "--duration", "8s",
                                             "--idle", "5s", "--cooldown", "2s", "--output", str(output)),
                          capture_output=True, text=True, timeout=budget, check=False)
    ctx.check("bench rc", done.returncode, "0", done.returncode == 0)
    (ctx.scratch / "bench.log").write_text(done.stdout[-20_000:] + "\n" + done.stderr[-20_000:])
    summaries = sorted(output.glob("*/summary.json"))
    if done.returncode != 0:
        ctx.note(f"bench stderr: {done.stderr.strip()[-1500:]}")
    if summaries:
        summary = summaries[-1]
        if summary.stat().st_size <= RECORDING_MAX_BYTES:
            shutil.copyfile(summary, ctx.out_dir / BENCH_SUMMARY_FILE)
        ctx.figure("bench_run_dir", str(summary.parent))
        judge_bench_summary(ctx, json.loads(summary.read_text()))


def judge_bench_summary(ctx: Context, summary: dict) -> None:
    """What only a real GPU can show of the bench: each regime charged the NVML GPU its CUDA device is
    (matched by UUID), the idle baseline taken with the CUDA context held, and both idle baselines."""
    ctx.check("no regime failed", summary.get("failed_regimes"), "[]", not summary.get("failed_regimes"))
    ctx.check("idle measured with the CUDA context held", summary.get("idle", {}).get("cuda_context_held"),
              "true", summary.get("idle", {}).get("cuda_context_held") is True)
    for name, regime in summary.get("regimes", {}).items():
        ctx.check(f"{name}: GPUs matched by UUID", [regime.get("gpu_attribution"), regime.get("gpus")],
                  "uuid, one GPU", regime.get("gpu_attribution") == "uuid" and len(regime.get("gpus") or []) == 1)
    ctx.figure("idle_power_watts", {"start": summary.get("idle", {}).get("power_watts"),
                                    "end": summary.get("idle_end", {}).get("power_watts")})


def read_recording(path: Path) -> dict[int, list[tuple[float, float | None, float | None]]]:
    """Per GPU index: (monotonic seconds, power W, energy J) of every sample, in time order."""
    per_gpu: dict[int, list] = {}
    if not path.exists():
        return per_gpu
    with path.open() as lines:
        for line in lines:
            record = json.loads(line)
            if record.get("type") == "gpu" and record.get("up", True):
                per_gpu.setdefault(record["index"], []).append(
                    (record["monotonic_ns"] / 1e9, record.get("power_watts"), record.get("energy_joules")))
    return {index: sorted(rows) for index, rows in per_gpu.items()}


def trapezoid_joules(points: list[tuple[float, float]]) -> float:
    """Integral of power over time, trapezoid rule: sum of (t1 - t0) x (p0 + p1) / 2, joules."""
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(points, points[1:]))


def energy_between(rows: list[tuple[float, float | None, float | None]], start_s: float, end_s: float) -> float | None:
    """Counter energy from ``start_s`` to ``end_s``, interpolated linearly between the samples around each."""
    points = [(t, e) for t, _, e in rows if e is not None]

    def at(moment: float) -> float | None:
        for (t0, e0), (t1, e1) in zip(points, points[1:]):
            if t0 <= moment <= t1:
                return e0 + (e1 - e0) * ((moment - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return None

    begin, end = at(start_s), at(end_s)
    return None if begin is None or end is None else end - begin


def judge_energy(ctx: Context, samples: dict, wall_minus_monotonic_s: float, smi_file: Path | None) -> None:
    smi_rows = read_smi_power(smi_file) if smi_file is not None else {}
    for index, rows in samples.items():
        power = [(t, p) for t, p, _ in rows if p is not None]
        if len(power) < 2:
            ctx.check(f"GPU {index} power samples", len(power), ">= 2", False)
            continue
        start, end = power[0][0], power[-1][0]
        counter = energy_between(rows, start, end)
        integrated = trapezoid_joules(power)
        ctx.figure(f"GPU {index} window s", end - start)
        ctx.figure(f"GPU {index} counter J", counter)
        ctx.figure(f"GPU {index} integrated 100 ms power J", integrated)
        ctx.figure(f"GPU {index} mean W", integrated / (end - start) if end > start else None)
        tolerance = ENERGY_VS_RECORDING_TOLERANCE_DRY_RUN if ctx.dry_run else ENERGY_VS_RECORDING_TOLERANCE
        ctx.check_range(f"GPU {index} integrated / counter", None if not counter else integrated / counter,
                        1 - tolerance, 1 + tolerance)
        smi_points = [(t - wall_minus_monotonic_s, p) for t, p in smi_rows.get(index, [])]
        smi_points = [(t, p) for t, p in smi_points if start <= t <= end]
        if smi_file is not None and len(smi_points) >= 2:
            smi_joules = trapezoid_joules(smi_points)
            smi_counter = energy_between(rows, smi_points[0][0], smi_points[-1][0])
            ctx.figure(f"GPU {index} nvidia-smi J", smi_joules)
            ctx.check_range(f"GPU {index} nvidia-smi / counter", None if not smi_counter else smi_joules / smi_counter,
                            1 - ENERGY_VS_NVIDIA_SMI_TOLERANCE, 1 + ENERGY_VS_NVIDIA_SMI_TOLERANCE)
        elif smi_file is not None:
            ctx.check(f"GPU {index} nvidia-smi samples in the window", len(smi_points), ">= 2", False)


def read_smi_power(path: Path) -> dict[int, list[tuple[float, float]]]:
    """nvidia-smi's ``timestamp, index, power.draw`` lines: per GPU, (wall seconds, W)."""
    per_gpu: dict[int, list] = {}
    if not path.exists():
        return per_gpu
    for fields in csv.reader(io.StringIO(path.read_text()), skipinitialspace=True):
        if len(fields) != 3:
            continue
        try:
            # Local time, as nvidia-smi prints it: "2026/12/02 03:14:15.926".
            moment = dt.datetime.strptime(fields[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            per_gpu.setdefault(int(fields[1]), []).append((moment, float(fields[2])))
        except ValueError:
            continue  # "[N/A]" or a torn last line
    return per_gpu


def keep_recording_slice(ctx: Context, source: Path, target: Path) -> None:
    """The header and the first RECORDING_KEEP_S seconds of samples, at most RECORDING_MAX_BYTES: a small
    real-GPU recording for the replay tests (tests/fixtures/)."""
    if not source.exists():
        ctx.check("recording written", False, "True", False)
        return
    kept, first_ns, size = [], None, 0
    with source.open() as lines:
        for line in lines:
            record = json.loads(line)
            stamp = record.get("monotonic_ns", record.get("start_ns"))
            if stamp is not None:
                first_ns = stamp if first_ns is None else first_ns
                if stamp - first_ns > RECORDING_KEEP_S * 1e9:
                    break
            if size + len(line) > RECORDING_MAX_BYTES:
                break
            kept.append(line)
            size += len(line)
    target.write_text("".join(kept))
    ctx.figure("recording_slice", {"file": target.name, "lines": len(kept), "bytes": size,
                                   "full_bytes": source.stat().st_size})
    # The slice is only useful if the replay backend reads it: load it as `wattledger agent --replay` would.
    from wattledger.probes.replay import ReplayGpuBackend

    replay = ReplayGpuBackend(target, speed=1000.0)
    ctx.check("recording slice replays", len(replay.devices()), ">= 1 GPU", len(replay.devices()) >= 1)
