"""The ``wattledger`` command as a user runs it: real processes, real HTTP on loopback, real signals."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

WATTLEDGER = [sys.executable, "-m", "wattledger.agent.cli"]


def start_agent(*args: str, env: dict | None = None, printed: list | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``wattledger agent`` and return it with its metrics URL once it is serving.

    The lines it printed up to then are appended to ``printed``."""
    process = subprocess.Popen(
        WATTLEDGER + ["agent", "--address", "127.0.0.1", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + 60  # a bound on a hung start, not a speed: imports are slow on a busy host
    lines = printed if printed is not None else []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"metrics at (http://\S+/metrics)", line)
        if match:
            return process, match.group(1)
    process.kill()
    raise AssertionError(f"agent did not start: {lines} {process.stderr.read()}")


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


def post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status


def metrics_containing(url: str, needle: str) -> str | None:
    text = get(url)[1]
    return text if needle in text else None


def wait_for(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_version():
    result = subprocess.run(WATTLEDGER + ["--version"], capture_output=True, text=True)
    assert result.returncode == 0 and re.fullmatch(r"wattledger \S+\n", result.stdout)


def test_agent_on_the_mock_serves_records_and_stops_cleanly(tmp_path):
    record = tmp_path / "trace.jsonl"
    printed: list[str] = []
    process, url = start_agent("--backend", "mock", "--mock-gpus", "2", "--record", str(record),
                               "--mock-delay", "0", printed=printed)
    try:
        base = url.rsplit("/", 1)[0]
        assert get(base + "/healthz") == (200, "ok\n")
        post(base + "/v1/workloads/start", {"workload": "chat", "gpus": [0]})
        post(base + "/v1/tokens", {"workload": "chat", "kind": "generated", "count": 128})
        post(base + "/v1/spans", {"workload": "chat", "kind": "compute", "gpus": [0],
                                  "start_ns": time.monotonic_ns() - 10**8, "end_ns": time.monotonic_ns()})
        text = wait_for(lambda: metrics_containing(url, "wattledger_workload_energy_joules_total{"))
        assert 'simulated="true"' in text
        assert 'wattledger_workload_tokens_total{kind="generated",workload="chat"} 128.0' in text
        assert text.count("wattledger_gpu_up{") == 2
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert "SIMULATED" in printed[0]
    assert "Traceback" not in err
    lines = record.read_text().splitlines()
    assert json.loads(lines[0])["type"] == "header"
    assert any(json.loads(line)["type"] == "span" for line in lines)
    assert sum(1 for line in lines if json.loads(line)["type"] == "gpu") >= 4


def test_sigint_stops_it_too():
    process, url = start_agent("--backend", "mock")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0 and "stopped" in out and "Traceback" not in err


def test_replay_of_a_recording_serves_the_recorded_gpus(tmp_path):
    fixture = Path(__file__).parent / "fixtures" / "mock_recording.jsonl"
    process, url = start_agent("--replay", str(fixture), "--replay-speed", "5", "--replay-loop")
    try:
        text = wait_for(lambda: metrics_containing(url, "wattledger_gpu_energy_joules_total{"))
        assert 'wattledger_build_info{backend="replay"' in text
        assert 'simulated="true"' in text  # the recording came from the mock, and says so
    finally:
        process.terminate()
        process.communicate(timeout=10)
    assert process.returncode == 0


@pytest.mark.parametrize("args, message", [
    (["agent", "--interval", "1ms"], "at least 10ms"),
    (["agent", "--backend", "cuda"], "invalid choice"),
    (["agent", "--mock-gpus", "0"], "mock-gpus"),
    (["agent", "--replay", "/no/such/file.jsonl"], "cannot read replay file"),
    (["frobnicate"], "invalid choice"),
    (["devices", "--replay", "/no/such/file.jsonl"], "cannot read replay file"),
    (["agent", "--backend", "mock", "--record", "/proc/forbidden.jsonl"], "not writable"),
    (["agent", "--mock-processes", "/no/such/processes.json"], "goes with --backend mock"),
    (["agent", "--backend", "mock", "--mock-processes", "/no/such/processes.json"], "cannot read"),
    (["devices", "--backend", "mock", "--mock-processes", "/proc/self/status"], "is not JSON"),
])
def test_bad_usage_is_one_line_and_changes_nothing(args, message, tmp_path):
    result = subprocess.run(WATTLEDGER + args, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode in (1, 2)
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_exit_2():
    result = subprocess.run(WATTLEDGER + ["agent", "--interval", "1ms"], capture_output=True, text=True)
    assert result.returncode == 2
    bad_file = subprocess.run(WATTLEDGER + ["agent", "--backend", "mock", "--mock-processes", "/no/such.json"],
                              capture_output=True, text=True, timeout=30)
    assert bad_file.returncode == 2


def test_agent_help_lists_the_mock_processes_file():
    result = subprocess.run(WATTLEDGER + ["agent", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--mock-processes FILE" in result.stdout


def test_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(WATTLEDGER + ["agent", "--backend", "mock", "--address", "127.0.0.1", "--port",
                                              str(port)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_environment_and_config_file_settings(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nbackend = "mock"\nmock_gpus = 3\n')
    env = dict(os.environ, WATTLEDGER_MOCK_PRESET="h200-141gb")
    process, url = start_agent("--config", str(config), env=env)
    try:
        text = get(url)[1]
        assert text.count('model_name="NVIDIA H200"') == 3
    finally:
        process.terminate()
        process.communicate(timeout=10)


def test_devices_lists_fields_and_says_simulated():
    result = subprocess.run(WATTLEDGER + ["devices", "--backend", "mock", "--mock-gpus", "2"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("wattledger: SIMULATED")
    assert "GPU 1: NVIDIA H100 80GB HBM3 [SIMULATED]" in result.stdout
    assert re.search(r"processes\s+not available: no processes scripted", result.stdout)
    data = json.loads(subprocess.run(WATTLEDGER + ["devices", "--backend", "mock", "--json"], capture_output=True,
                                     text=True, timeout=30).stdout)
    assert data["simulated"] is True and data["gpus"][0]["fields"]["power_watts"]["supported"] is True


def _without_wattledger_settings() -> dict:
    """This process's environment less WATTLEDGER_* (a WATTLEDGER_BACKEND=mock would be asking for the mock)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WATTLEDGER_")}


def test_devices_without_a_gpu_says_so_and_exits_1_unless_the_mock_is_asked_for():
    # Issue 9: `wattledger devices` on a machine without a GPU listed the mock's simulated H100 and exited 0,
    # so a script could take it for this machine's GPU.
    from wattledger.probes.base import ProbeUnavailable
    from wattledger.probes.nvml import NvmlBackend

    try:
        NvmlBackend().close()
        pytest.skip("this machine has a working NVML")
    except ProbeUnavailable:
        pass
    env = _without_wattledger_settings()
    plain = subprocess.run(WATTLEDGER + ["devices"], capture_output=True, text=True, timeout=30, env=env)
    assert plain.returncode == 1, plain.stdout
    assert plain.stdout == "" and "SIMULATED" not in plain.stderr and "H100" not in plain.stderr
    assert plain.stderr.startswith("wattledger: no GPU found (NVML unavailable:")
    assert "`wattledger devices --backend mock` lists simulated GPUs" in plain.stderr
    assert plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    as_json = subprocess.run(WATTLEDGER + ["devices", "--json"], capture_output=True, text=True, timeout=30, env=env)
    assert as_json.returncode == 1
    data = json.loads(as_json.stdout)
    assert data["gpus"] == [] and data["simulated"] is False and data["no_gpu"].startswith("NVML unavailable:")
    asked = subprocess.run(WATTLEDGER + ["devices", "--backend", "mock"], capture_output=True, text=True, timeout=30,
                           env=env)
    assert asked.returncode == 0 and "GPU 0: NVIDIA H100 80GB HBM3 [SIMULATED]" in asked.stdout
    from_env = subprocess.run(WATTLEDGER + ["devices"], capture_output=True, text=True, timeout=30,
                              env={**env, "WATTLEDGER_BACKEND": "mock"})
    assert from_env.returncode == 0 and "[SIMULATED]" in from_env.stdout  # asked for, through the environment


def test_devices_auto_falling_back_to_the_mock_is_no_gpu_on_any_machine(monkeypatch, capsys):
    """The same rule with the backend opening injected, so it holds on a GPU node too."""
    from wattledger.agent import cli, daemon
    from wattledger.agent.config import build_config
    from wattledger.probes.mock import MockGpuBackend

    opened = []

    def fallback(config, *args, **kwargs):
        mock = MockGpuBackend(1)
        opened.append(mock)
        return daemon.OpenedGpuBackend(mock, ["NVML unavailable: libnvidia-ml.so.1 not found; using the mock GPU "
                                              "backend instead (SIMULATED figures)"])

    monkeypatch.setattr(daemon, "open_gpu_backend", fallback)
    assert cli.run_devices(build_config({"backend": "auto"}, {}), as_json=False) == cli.EXIT_FAILED
    out, err = capsys.readouterr()
    assert out == "" and err == ("wattledger: no GPU found (NVML unavailable: libnvidia-ml.so.1 not found); "
                                 "`wattledger devices --backend mock` lists simulated GPUs instead\n")
    assert cli.run_devices(build_config({"backend": "mock"}, {}), as_json=False) == 0
    assert "[SIMULATED]" in capsys.readouterr().out


def test_without_nvml_backend_nvml_exits_1_with_one_line():
    # Issue 8, item 7: this used to run the host probes only, healthy forever, against deploy/'s promise
    # that the supervisor restarts it. (auto on a GPU node keeps the host probes and retries NVML:
    # tests/test_nvml_retry.py.)
    from wattledger.probes.base import ProbeUnavailable
    from wattledger.probes.nvml import NvmlBackend

    try:
        NvmlBackend().close()
        pytest.skip("this machine has a working NVML")
    except ProbeUnavailable:
        pass
    done = subprocess.run(WATTLEDGER + ["agent", "--address", "127.0.0.1", "--port", "0", "--backend", "nvml"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("wattledger: NVML unavailable:") and done.stderr.count("\n") == 1


def packages_loaded_after(script: str, packages: tuple[str, ...]) -> list[str]:
    """The modules of ``packages`` that a fresh interpreter holds after running ``script``."""
    script += f"import sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r}))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip())


IMPORT_EVERY_MODULE_OF = (  # then the packages named in ``packages``
    "import pkgutil, importlib\n"
    "for pkg in packages:\n"
    "    for m in pkgutil.iter_modules(pkg.__path__):\n"
    "        importlib.import_module(pkg.__name__ + '.' + m.name)\n")


def test_the_agent_never_imports_torch_or_pandas():
    script = (
        "import time, wattledger.agent, wattledger.probes, wattledger.exporters\n"
        "packages = (wattledger.agent, wattledger.probes, wattledger.exporters)\n" + IMPORT_EVERY_MODULE_OF +
        "from wattledger.agent.config import build_config\n"
        "from wattledger.agent.daemon import Agent\n"
        "agent = Agent(build_config({'backend': 'mock', 'mock_gpus': 2, 'port': 0, 'address': '127.0.0.1'}, {}))\n"
        "agent.start(); time.sleep(0.5)\n"
        "import urllib.request; urllib.request.urlopen(agent.metrics_url).read()\n"
        "agent.stop()\n"
    )
    assert packages_loaded_after(script, ("torch", "pandas", "matplotlib", "numpy")) == []


def test_the_measurement_never_imports_torch():
    # `wattledger run` and `report` install with the bench extra alone: no module of the measurement may
    # load torch (the regimes it runs load it through the registry, only when a benchmark runs them).
    script = ("import wattledger.workloads.bench\npackages = (wattledger.workloads.bench,)\n" + IMPORT_EVERY_MODULE_OF
              + "import wattledger.workloads.registry, wattledger.workloads.reporter, wattledger.workloads.cli_args\n")
    assert packages_loaded_after(script, ("torch",)) == []


def without_torch(*argv: str, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
    """``wattledger ARGV`` in a process where ``import torch`` fails, as on a machine without it."""
    script = ("import sys\nsys.modules['torch'] = None\nfrom wattledger.agent.cli import main\n"
              f"sys.exit(main({list(argv)!r}))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("command", ["report", "run"])
def test_report_and_run_need_no_torch(command):
    result = without_torch(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: wattledger {command}")


def test_run_profiles_a_command_without_torch(tmp_path):
    result = without_torch("run", "--backend", "mock", "--idle", "0", "--output", str(tmp_path), "--json", "--",
                           sys.executable, "-c", "pass", timeout=120)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["summary"]["status"] == "complete" and "command" in record["summary"]["regimes"]


@pytest.mark.parametrize("command, extra", [("bench", "workloads"), ("workload", "workloads")])
def test_commands_that_run_the_regimes_say_they_need_torch(command, extra):
    result = without_torch(command, "--help")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"wattledger: error: '{command}' needs the {extra} extra (no torch); install with: "
                             "pip install torch==2.13.0 'wattledger[workloads]'\n")


def gpu_lines_on_disk(path) -> list[str]:
    """The complete GPU lines in the file now (a buffer flushed mid-line leaves a partial last line)."""
    text = path.read_text() if path.exists() else ""
    return [line for line in text[:text.rfind("\n") + 1].splitlines() if '"type":"gpu"' in line]


def test_sigkill_keeps_what_the_recording_had_flushed(tmp_path):
    # What the recorder flushed (it does so at least every 2 s: JsonlWriter's own test, on a fake clock)
    # survives a SIGKILL and replays. Waits on the file itself, not on a number of seconds.
    record = tmp_path / "trace.jsonl"
    process, url = start_agent("--backend", "mock", "--record", str(record))
    deadline = time.monotonic() + 120
    while len(gpu_lines_on_disk(record)) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    flushed = gpu_lines_on_disk(record)
    process.kill()
    process.communicate(timeout=10)
    gpu_lines = gpu_lines_on_disk(record)
    assert len(flushed) >= 20 and gpu_lines[:len(flushed)] == flushed
    replayed = subprocess.run(WATTLEDGER + ["devices", "--replay", str(record)], capture_output=True, text=True,
                              timeout=30)
    assert replayed.returncode == 0 and "GPU 0" in replayed.stdout


def test_concurrent_scrapes_while_sampling_all_parse():
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client.parser import text_string_to_metric_families

    process, url = start_agent("--backend", "mock", "--mock-gpus", "4", "--interval", "20ms")
    try:
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda _: get(url), range(80)))
    finally:
        process.terminate()
        process.communicate(timeout=10)
    for status, text in texts:
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert len(families["wattledger_gpu_up"].samples) == 4
        energy = families["wattledger_gpu_energy_joules"].samples
        assert all(s.value >= 0 for s in energy)
