"""One measurement session: the in-process agent, the run directory, and what every run records.

``wattledger bench`` and ``wattledger run`` are both a session: an agent built through its public face
(``agent/daemon.py``) samples the GPUs in this process and serves /metrics and the accounting API; a
``RunRecorder`` writes the run directory's raw files while the run goes on (``rundata.py`` reads them);
at the end ``runs/latest`` points at it and ``build_outputs`` turns it into ``summary.json`` and
``report.html``. What differs between the two commands is only what runs in the phases.

    session = MeasurementSession.open(SessionOptions(output_dir=...), require_devices=True)
    session.record_run_start(settings, kind="run")
    session.start()                      # sampling and serving
    ... session.event("phase_start", phase=...) ... session.event("phase_end", ...)
    session.drain()                      # the mock simulates a little behind: let it cover the end
    session.close(status)                # run_end, agent stopped, files closed
    summary = session.publish(pricing, settings, kind="run", regimes=(name,))
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wattledger.agent.config import build_config
from wattledger.agent.daemon import Agent, ProbeUnavailable, ServerStartError
from wattledger.exporters.jsonl import JsonlRecorder, JsonlWriter
from wattledger.workloads import registry
from wattledger.workloads.registry import DEFAULT_REGIMES

# The span-driven mock simulates time t once t is this old (its lag): a span counts by its own timestamps
# if it reaches the mock within the lag of its start. Training announces each step when it starts (never
# late: its steps took up to 1.02 s beside 6 busy processes on 2 cores); chat and agentic steps reach the
# mock when they end, and took at most about 0.6 s there. Later spans are counted ("late spans" in the
# run's checks), never silently lost.
MOCK_DELAY_SECONDS = 1.0
# After the last phase the session waits the mock's lag and this many sampling intervals, so that the
# samples (and the ledger) cover the phase's end before the agent stops.
DRAIN_INTERVALS = 3


class SessionError(Exception):
    """The session could not open (no GPU to measure, an agent that cannot start, no run directory);
    the message is one line."""


@dataclass(frozen=True)
class SessionOptions:
    """How the session's agent samples and serves, and where its run directory goes."""

    output_dir: Path = Path("runs")
    backend: str = "auto"  # auto, nvml or mock
    mock_gpus: int = 1
    interval_s: float = 0.05  # sampling interval, seconds: counter edges are located within half of it
    address: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    mock_preset: str = "h100-sxm-80gb"  # the GPU model the mock simulates (probes/mock_presets.py)


@dataclass(frozen=True)
class GpuAttribution:
    """The GPUs (NVML indices) one workload is charged for, how they were found, and the line that says
    so when it is not the plain case (None).

    ``method``: "uuid" (its CUDA devices matched to NVML's by UUID), "mock" (mock GPU 0 stands in for the
    one device a workload uses), "cpu" (the workload runs on the CPU: GPU 0 alone, its idle power),
    "unmatched" (a CUDA UUID NVML does not list: every GPU, an upper bound), "no-devices" (NVML is being
    retried and lists none yet: GPU 0)."""

    gpus: tuple[int, ...]
    method: str
    note: str | None = None


def uuid_key(uuid: str) -> str:
    """A UUID's hex digits, lower case: NVML's "GPU-5c1b0e6e-..." (or "MIG-...") and torch's "5c1b0e6e-..."
    (``cudaDeviceProp.uuid`` as text, no prefix) compare equal whatever the prefix, case and dashes."""
    text = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        text = text.removeprefix(prefix)
    return "".join(c for c in text if c in "0123456789abcdef")


def attribute_gpus(cuda_devices: Sequence[tuple[int, str | None]], nvml_devices: Sequence,
                   simulated: bool) -> GpuAttribution:
    """The NVML GPUs of a workload whose CUDA devices are ``cuda_devices`` ((torch index, CUDA UUID or
    None) each, ``registry.cuda_devices``), among ``nvml_devices`` (the agent's ``devices()``: each with an
    ``index`` and a ``uuid``; ``simulated``: the mock).

    torch numbers the devices it can see (``CUDA_VISIBLE_DEVICES=3``: NVML's GPU 3 is ``cuda:0``), NVML
    numbers every GPU, so the two are tied by UUID, never by index. A UUID NVML does not list (a MIG
    instance, a container that shows NVML other GPUs) charges every GPU: an upper bound, said in one line,
    rather than a guess that could charge the wrong GPU."""
    indices = [device.index for device in nvml_devices]
    if not indices:
        return GpuAttribution((0,), "no-devices", "NVML lists no GPU yet (it is being retried): the workload is "
                              "charged GPU 0")
    first = (min(indices),)
    if simulated:
        return GpuAttribution(first, "mock", f"mock GPU: each workload is charged mock GPU {first[0]} alone (it "
                              "stands in for the one device a workload uses); no CUDA device is looked up")
    if not cuda_devices:
        return GpuAttribution(first, "cpu", f"the workload runs on the CPU: it is charged GPU {first[0]} alone, "
                              "whose energy is then idle power")
    by_key = {uuid_key(device.uuid): device.index for device in nvml_devices if device.uuid}
    matched = [by_key.get(uuid_key(uuid)) if uuid else None for _, uuid in cuda_devices]
    if all(index is not None for index in matched):
        return GpuAttribution(tuple(sorted(set(matched))), "uuid")
    missing = ", ".join(f"cuda:{index} ({uuid or 'no UUID from torch'})"
                        for (index, uuid), found in zip(cuda_devices, matched) if found is None)
    listed = ", ".join(f"{device.index}: {device.uuid}" for device in nvml_devices)
    return GpuAttribution(tuple(sorted(indices)), "unmatched",
                          f"{missing} is not among the GPUs NVML lists ({listed}): the workload is charged all "
                          f"{len(indices)} GPUs, an upper bound")


class RunRecorder:
    """Writes the raw files of a run directory while the run goes on: every tick's samples with the token
    counts (and the simulator's truth on the mock), every span, and the events."""

    def __init__(self, run_dir: Path, agent: Agent, interval_s: float):
        run_dir.mkdir(parents=True, exist_ok=False)
        self.run_dir = run_dir
        self.agent = agent
        self.samples = JsonlRecorder(run_dir / "samples.jsonl", agent.gpu_backend_name, agent.simulated,
                                     agent.devices(), interval_s)
        self.spans = JsonlWriter(run_dir / "spans.jsonl")
        self.events = JsonlWriter(run_dir / "events.jsonl", flush_interval_seconds=0.0)
        agent.add_sample_sink(self._on_tick)
        agent.add_span_listener(lambda span: self.spans.write(span.to_json()))

    def _on_tick(self, gpu_samples, host_sample) -> None:
        self.samples.write_samples(gpu_samples, host_sample)
        counts = {f"{name}/{kind}": n for (name, kind), n in self.agent.tokens().items()}
        extra = [{"type": "tokens", "monotonic_ns": time.monotonic_ns(), "counts": counts}]
        truth = self.agent.simulator_truth()
        if truth is not None and gpu_samples:
            # Ground truth at the simulated time the samples were taken (tests compare against it).
            extra.append({"type": "truth", "monotonic_ns": gpu_samples[0].monotonic_ns, "energy_joules": truth})
        self.samples.write_records(extra)

    def event(self, type_: str, **fields) -> None:
        self.events.write({"type": type_, "monotonic_ns": time.monotonic_ns(), **self._mock_lateness(), **fields})

    def _mock_lateness(self) -> dict:
        """The span-driven mock's late spans so far (cumulative; a phase's are its phase_end's less its
        phase_start's), and its lag. Empty when the GPU is not the span-driven mock."""
        late = self.agent.mock_lateness()
        if late is None:
            return {}
        return {"mock_late_spans": late.spans, "mock_late_span_seconds": late.seconds,
                "mock_lag_seconds": late.lag_seconds}

    def close(self) -> None:
        self.samples.close()
        self.spans.close()
        self.events.close()


class MeasurementSession:
    """An agent and its run directory, from ``open`` to ``publish`` (see the module docstring)."""

    def __init__(self, agent: Agent, recorder: RunRecorder, options: SessionOptions):
        self.agent = agent
        self.recorder = recorder
        self.options = options
        self.run_dir = recorder.run_dir
        self._closed = False

    @classmethod
    def open(cls, options: SessionOptions, require_devices: bool = False) -> MeasurementSession:
        """Build the agent (not started yet) and create the run directory; SessionError (one line) when
        there is no GPU backend (or, with ``require_devices``, no GPU found) or no directory."""
        config = build_config({
            "backend": options.backend, "mock_gpus": options.mock_gpus, "mock_preset": options.mock_preset,
            "mock_delay": MOCK_DELAY_SECONDS,
            "interval": options.interval_s, "address": options.address, "port": options.port,
        }, {})
        try:
            agent = Agent(config)
        except ProbeUnavailable as err:
            raise SessionError(str(err)) from None
        if agent.gpu_backend_name is None or (require_devices and not agent.devices()):
            agent.stop()
            raise SessionError(f"no GPU to measure ({'; '.join(agent.notes) or 'the backend found none'})")
        try:
            recorder = RunRecorder(new_run_dir(options.output_dir), agent, options.interval_s)
        except OSError as err:
            agent.stop()
            raise SessionError(f"cannot create the run directory under {options.output_dir}: "
                               f"{err.strerror or err}") from None
        return cls(agent, recorder, options)

    # -- what the agent found ------------------------------------------------------------------------

    @property
    def gpus(self) -> list[int]:
        """The indices of the GPUs being measured (empty while NVML is being retried)."""
        return [info.index for info in self.agent.devices()]

    @property
    def simulated(self) -> bool:
        return self.agent.simulated

    @property
    def mock_preset(self) -> str | None:
        """The GPU model the mock simulates ("h100-sxm-80gb"); None on real GPUs."""
        return self.options.mock_preset if self.simulated else None

    def attribute(self, device: str) -> GpuAttribution:
        """The GPUs a workload run on ``device`` is charged for (``attribute_gpus``). Asks torch for the CUDA
        devices (imports it) only on real GPUs; a torch or CUDA error there charges every GPU, with why."""
        devices = self.agent.devices()
        if self.simulated or not devices:
            return attribute_gpus([], devices, self.simulated)
        try:
            cuda_devices = registry.cuda_devices(device)
        except Exception as err:  # noqa: BLE001 - a broken CUDA setup must not stop the bench here
            return GpuAttribution(tuple(sorted(d.index for d in devices)), "unmatched",
                                  f"cannot read the CUDA devices of {device!r} ({type(err).__name__}: "
                                  f"{first_line(err)}): the workload is charged every GPU, an upper bound")
        return attribute_gpus(cuda_devices, devices, False)

    @property
    def notes(self) -> list[str]:
        """What the agent chose and why, one line each (printed at the start)."""
        return list(self.agent.notes)

    # -- the run -----------------------------------------------------------------------------------------

    def event(self, type_: str, **fields) -> None:
        """One line in events.jsonl, stamped now (a ``monotonic_ns`` field overrides the stamp)."""
        self.recorder.event(type_, **fields)

    def record_run_start(self, settings: dict, kind: str | None = None) -> None:
        """The run_start event: the run's settings and the facts about this host the summary reports."""
        kind_field = {"kind": kind} if kind is not None else {}
        self.event("run_start", **kind_field,
                   wall_time=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                   backend=self.agent.gpu_backend_name, simulated=self.simulated, settings=settings,
                   host={"hostname": socket.gethostname(), "machine": platform.machine(), "cpus": os.cpu_count()},
                   rapl=[{"name": st.name, "supported": st.supported, "reason": st.reason}
                         for st in self.agent.rapl_status()])

    def start(self) -> None:
        """Start sampling and serving. ServerStartError (the port cannot be bound) closes the session as
        partial, with the error in its run_end, before it is raised."""
        try:
            self.agent.start()
        except ServerStartError as err:
            self.close("partial", error=str(err))
            raise

    @property
    def base_url(self) -> str:
        """Where the agent serves the accounting API during the run (after ``start``)."""
        return self.agent.base_url

    @property
    def metrics_url(self) -> str:
        return self.agent.metrics_url

    def drain(self) -> None:
        """Wait until the span-driven mock (it simulates ``MOCK_DELAY_SECONDS`` behind) and the ledger have
        covered the last phase's end."""
        time.sleep(MOCK_DELAY_SECONDS + DRAIN_INTERVALS * self.options.interval_s)

    def close(self, status: str, **fields) -> None:
        """The run_end event (``status``: complete or partial, and ``fields``), then the agent stopped and
        the files closed. A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.event("run_end", status=status, **fields)
        finally:
            self.agent.stop()
            self.recorder.close()

    def publish(self, pricing, settings: dict | None, kind: str = "bench", regimes=DEFAULT_REGIMES) -> dict:
        """``runs/latest`` -> this run, then its Parquet tables, summary.json and report.html; the summary."""
        point_latest(self.run_dir)
        return build_outputs(self.run_dir, pricing, settings, kind=kind, regimes=regimes)


def first_line(err: BaseException) -> str:
    """An exception's message, first line only (CUDA errors append advice over several lines)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else "(no message)"


def new_run_dir(output_dir: Path) -> Path:
    """A fresh ``output_dir/YYYYmmdd-HHMMSS`` (``-2``, ``-3``... when that exists already)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = output_dir / stamp
    suffix = 1
    while path.exists():
        suffix += 1
        path = output_dir / f"{stamp}-{suffix}"
    return path


def point_latest(run_dir: Path) -> None:
    """``runs/latest`` -> the newest run (replaced atomically)."""
    link = run_dir.parent / "latest"
    temporary = run_dir.parent / f".latest-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(run_dir.name)
    os.replace(temporary, link)


def versions() -> dict:
    """The versions a run records: wattledger's, Python's, and torch's when it is installed (read from the
    package metadata: the measurement never imports torch)."""
    from importlib import metadata

    from wattledger.agent.version import VERSION

    out = {"wattledger": VERSION, "python": platform.python_version()}
    try:
        out["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        pass
    return out


def build_outputs(run_dir: Path, pricing, settings: dict | None = None, kind: str = "bench",
                  regimes=DEFAULT_REGIMES) -> dict:
    """Raw files -> Parquet tables, summary.json and report.html. Used at the end and by ``report``."""
    from wattledger.workloads.bench.analysis import summarize
    from wattledger.workloads.bench.report import render_report
    from wattledger.workloads.bench.rundata import load_run, write_parquet

    run = load_run(run_dir)
    write_parquet(run)
    summary = summarize(run, pricing, kind=kind, regimes=regimes, settings=settings)
    temporary = run_dir / "summary.json.tmp"
    temporary.write_text(json.dumps(summary, indent=2, default=json_default))
    os.replace(temporary, run_dir / "summary.json")
    render_report(run, summary, run_dir / "report.html")
    return summary


def json_default(value):
    """``json.dumps`` ``default`` for the summary: numpy scalars become Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
