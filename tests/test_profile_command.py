"""``wattledger run -- CMD``: profiling a command end to end on the mock GPU (CPU only, about 40 s)."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from wattledger.workloads.bench.rundata import load_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "summary.schema.json").read_text())
FIXTURES = Path(__file__).parent / "fixtures" / "expositions"


def wattledger_run(args: list[str], cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wattledger.agent.cli", "run", *args], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


def latest_run(tmp_path: Path) -> Path:
    link = tmp_path / "runs" / "latest"
    assert link.is_symlink(), "runs/latest should point at the new run"
    return link.resolve()


def check_summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    jsonschema.validate(summary, SCHEMA)
    assert summary["kind"] == "run" and summary["simulated"] is True
    assert list(summary["regimes"]) == ["command"]
    assert (run_dir / "report.html").exists()
    return summary


def raw_token_total(run_dir: Path, column: str) -> int:
    """The last cumulative count in samples.jsonl's per-tick tokens records (whole run, no window)."""
    tokens = load_run(run_dir).tokens
    return int(tokens[column].iloc[-1]) if column in tokens else 0


# The child reports CHUNK generated tokens every STEP_S seconds through the agent's accounting API.
CHUNK, STEPS, STEP_S = 37, 13, 0.5
REPORTING_CHILD = f"""
import json, os, time, urllib.request
url, name = os.environ["WATTLEDGER_AGENT_URL"], os.environ["WATTLEDGER_WORKLOAD"]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
for _ in range({STEPS}):
    body = json.dumps({{"workload": name, "kind": "generated", "count": {CHUNK}}}).encode()
    request = urllib.request.Request(url + "/v1/tokens", data=body, method="POST",
                                     headers={{"Content-Type": "application/json"}})
    opener.open(request, timeout=5).read()
    time.sleep({STEP_S})
print("child done", name, flush=True)
"""


def test_profiles_a_command_that_reports_its_tokens(tmp_path):
    result = wattledger_run(["--backend", "mock", "--idle", "2s", "--output", "runs", "--",
                             sys.executable, "-c", REPORTING_CHILD], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "SIMULATED" in lines[0]
    assert "child done command" in result.stdout  # the child's stdout is the terminal's
    assert "Traceback" not in result.stderr

    run_dir = latest_run(tmp_path)
    summary = check_summary(run_dir)
    assert summary["status"] == "complete"
    assert summary["idle"]["power_watts"] > 0
    regime = summary["regimes"]["command"]
    assert regime["energy_joules"] > 0
    assert regime["main_token_kind"] == "generated"
    assert regime["joules_per_token"]["gross"] is not None and regime["joules_per_token"]["gross"] > 0
    # The steady-state window leaves out ramp-up and drain: it holds some, not all, of the tokens.
    total = CHUNK * STEPS
    assert 0 < regime["tokens"]["generated"] <= total
    assert regime["tokens"]["prompt"] == 0
    # Over the whole phase, every token the child reported was recorded and attributed to the workload.
    assert raw_token_total(run_dir, "command/generated") == total
    workload = regime["workload"]
    assert workload["exit_code"] == 0
    assert workload["whole_phase"]["tokens"] == {"generated": total}
    # The ledger gave the workload the GPU's energy for the whole time the command ran: at the mock's
    # steady idle-level power, the window's mean power times the command's run time.
    whole = workload["whole_phase"]["energy_joules"]
    expected = regime["power_watts"]["mean"] * workload["wall_seconds"]
    assert whole == pytest.approx(expected, rel=0.05)
    assert workload["whole_phase"]["energy_joules"] > regime["energy_joules"]  # the window is shorter
    assert workload["processes"]["cpu_seconds_last_sampled"] is not None
    # settings record the command line, so `wattledger report` can rebuild the summary.
    assert summary["settings"]["command"][0] == sys.executable
    assert summary["settings"]["workloads"] == ["command"]


def test_exit_status_of_the_command_is_passed_through(tmp_path):
    child = "import time, sys; time.sleep(1.5); sys.exit(3)"
    result = wattledger_run(["--backend", "mock", "--idle", "0", "--output", "runs", "--json", "--",
                             sys.executable, "-c", child], tmp_path)
    assert result.returncode == 3, result.stderr
    assert "SIMULATED" in result.stderr.splitlines()[0]  # --json: progress on stderr
    printed = json.loads(result.stdout.splitlines()[-1])
    assert printed["exit_code"] == 3
    summary = check_summary(Path(printed["run_dir"]))
    assert summary["regimes"]["command"]["workload"]["exit_code"] == 3
    assert summary["status"] == "complete"  # the command ran to its end; its failure is its own


def test_a_command_that_exits_at_once_is_still_profiled(tmp_path):
    # The child may be a zombie before the workload is registered; the agent's "pid must be alive" check
    # would refuse it, and its exit check would race the command's own stop. `run` waits on the child.
    result = wattledger_run(["--backend", "mock", "--idle", "0", "--output", "runs", "--json", "--", "true"],
                            tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.splitlines()[-1])
    summary = check_summary(Path(printed["run_dir"]))
    assert summary["regimes"]["command"]["workload"]["exit_code"] == 0


class EngineServer:
    """A stand-in vLLM /metrics endpoint on 127.0.0.1 whose counters advance once it has been read once."""

    def __init__(self, steps: int, every_s: float, prompt_step: int, generated_step: int, fail_reads: int = 0,
                 done_file: Path | None = None):
        # Created once the counters have finished advancing and the run's poller has read the final values
        # twice since: so the command ends only after its tokens were counted inside the phase (on a busy
        # host a poll can come seconds late, and the last one, at the stop, falls after the phase's end).
        self.done_file = done_file
        self.reads_after_done = 0
        self.template = (FIXTURES / "vllm.prom").read_text()
        self.fail_reads = fail_reads  # the first reads answer 503 (an engine too busy to answer /metrics)
        self.prompt, self.generated = 120345, 45678  # engine="0"'s values in the fixture
        self.steps, self.every_s = steps, every_s
        self.prompt_step, self.generated_step = prompt_step, generated_step
        self.first_read = threading.Event()
        self.done = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    failing, server.fail_reads = server.fail_reads > 0, max(0, server.fail_reads - 1)
                if failing:
                    self.send_error(503)
                    return
                body = server.body().encode()
                server.first_read.set()
                server.count_read_after_done()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/metrics"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        threading.Thread(target=self._advance, daemon=True).start()

    PROMPT_LINE = 'vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} '
    GENERATED_LINE = 'vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} '

    def body(self) -> str:
        with self.lock:
            text = self.template.replace(self.PROMPT_LINE + "120345.0", self.PROMPT_LINE + f"{self.prompt}.0")
            return text.replace(self.GENERATED_LINE + "45678.0", self.GENERATED_LINE + f"{self.generated}.0")

    def count_read_after_done(self) -> None:
        with self.lock:
            if not self.done.is_set():
                return
            self.reads_after_done += 1
            finished = self.reads_after_done == 2
        if finished and self.done_file is not None:
            self.done_file.touch()

    def _advance(self) -> None:
        # Start only after the first read, which is the run's baseline: then every step counts.
        self.first_read.wait(30)
        for _ in range(self.steps):
            time.sleep(self.every_s)
            with self.lock:
                self.prompt += self.prompt_step
                self.generated += self.generated_step
        self.done.set()

    def command(self, metrics_out: Path | None = None) -> list[str]:
        """A command that runs until the counters have finished advancing and been read (a fixed sleep
        raced them on a busy host, where the run's first read, which starts them, can come seconds late);
        with ``metrics_out``, it then saves the profiling agent's /metrics there."""
        waits = (f"import os, time\ndeadline = time.monotonic() + 300\n"
                 f"while not os.path.exists({str(self.done_file)!r}) and time.monotonic() < deadline:\n"
                 f"    time.sleep(0.05)\n")
        if metrics_out is not None:
            waits += ("import urllib.request\n"
                      "body = urllib.request.urlopen(os.environ['WATTLEDGER_AGENT_URL'] + '/metrics').read()\n"
                      f"open({str(metrics_out)!r}, 'wb').write(body)\n")
        return [sys.executable, "-c", waits]

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_tokens_from_a_serving_engines_metrics(tmp_path):
    engine = EngineServer(steps=8, every_s=0.4, prompt_step=300, generated_step=100, done_file=tmp_path / "done")
    assert EngineServer.PROMPT_LINE + "120345.0" in engine.template  # the substitution finds its lines
    assert EngineServer.GENERATED_LINE + "45678.0" in engine.template
    try:
        result = wattledger_run(["--backend", "mock", "--idle", "0", "--output", "runs", "--name", "serve",
                                 "--tokens-from", engine.url, "--", *engine.command(tmp_path / "agent.prom")],
                                tmp_path)
    finally:
        engine.close()
    assert result.returncode == 0, result.stderr
    assert engine.done.is_set(), "the counters should have finished advancing while the command ran"
    # The engine's reads are a probe of the profiling agent, node_exporter style.
    exposition = (tmp_path / "agent.prom").read_text()
    assert 'wattledger_probe_success{probe="engine"} 1.0' in exposition
    assert 'wattledger_probe_duration_seconds{probe="engine"}' in exposition
    run_dir = latest_run(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    jsonschema.validate(summary, SCHEMA)
    regime = summary["regimes"]["serve"]
    workload = regime["workload"]
    assert workload["token_source"]["engine"] == "vllm"
    assert workload["token_source"]["tokens"] == {"prompt": 8 * 300, "generated": 8 * 100}
    assert workload["token_source"]["lower_bound"] is False and workload["token_source"]["series"] == 4
    assert workload["whole_phase"]["tokens"] == {"prompt": 8 * 300, "generated": 8 * 100}
    assert raw_token_total(run_dir, "serve/generated") == 8 * 100
    assert raw_token_total(run_dir, "serve/prompt") == 8 * 300
    assert regime["tokens"]["generated"] > 0
    assert summary["settings"]["tokens_from"] == engine.url


def test_tokens_from_an_engine_whose_first_read_fails_never_count_its_history(tmp_path):
    # The engine already holds 218,345 prompt tokens of history (two DP engines) and its first /metrics
    # read fails: the run counts from the first good read and its summary says the figure is a lower bound.
    engine = EngineServer(steps=6, every_s=0.4, prompt_step=300, generated_step=100, fail_reads=1,
                          done_file=tmp_path / "done")
    try:
        result = wattledger_run(["--backend", "mock", "--idle", "0", "--output", "runs", "--name", "serve",
                                 "--tokens-from", engine.url, "--", *engine.command()], tmp_path)
    finally:
        engine.close()
    assert result.returncode == 0, result.stderr
    assert "lower bound" in result.stderr and "HTTP 503" in result.stderr
    summary = json.loads((latest_run(tmp_path) / "summary.json").read_text())
    jsonschema.validate(summary, SCHEMA)
    source = summary["regimes"]["serve"]["workload"]["token_source"]
    assert source["errors"] == 1
    # The counters advance only after the first good read, so all of it is ours: 1,800 / 600 exactly.
    # (Counting the history, as before, gave 218,345 + 1,800 prompt tokens and 84,690 + 600 generated.)
    assert source["tokens"] == {"prompt": 6 * 300, "generated": 6 * 100}
    # Its series' _created is from before the run, so nothing could tell what it held at the run's start.
    assert source["lower_bound"] is True and "first read failed" in source["lower_bound_reasons"][0]


def test_sigterm_is_passed_on_and_the_run_is_partial(tmp_path):
    child = ("import signal, sys, time\n"
             "def handler(signum, frame):\n    print('child got', signum, flush=True); sys.exit(7)\n"
             "signal.signal(signal.SIGTERM, handler)\nprint('ready', flush=True)\ntime.sleep(30)\n")
    process = subprocess.Popen([sys.executable, "-m", "wattledger.agent.cli", "run", "--backend", "mock", "--idle",
                                "0", "--output", "runs", "--", sys.executable, "-c", child], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    watchdog = threading.Timer(60, process.kill)  # a hung run fails the test instead of hanging it
    watchdog.start()
    try:
        for line in process.stdout:
            if line.strip() == "ready":
                break
        time.sleep(1.0)  # a little of the command's phase on record
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 7, stderr
    assert "child got 15" in stdout
    summary = check_summary(latest_run(tmp_path))
    assert summary["status"] == "partial"
    assert summary["regimes"]["command"]["workload"]["interrupted"] is True


@pytest.mark.parametrize("args, message", [
    ([], "give the command to profile after --"),
    (["--idle", "1s"], "give the command to profile after --"),
    (["--"], "give the command to profile after --"),
    (["--idle", "banana", "--", "true"], "not a duration"),
    (["--nonsense", "--", "true"], "unrecognized arguments"),
    (["--tokens-engine", "vllm", "--", "true"], "--tokens-engine needs --tokens-from"),
    (["--tokens-from", "127.0.0.1:8000", "--", "true"], "--tokens-from"),
    (["--name", "Bad Name", "--", "true"], "workload name must match"),
])
def test_bad_usage_is_one_line_and_exit_2(tmp_path, args, message):
    result = wattledger_run(args, tmp_path, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_command_that_does_not_exist_is_127_without_a_traceback(tmp_path):
    result = wattledger_run(["--backend", "mock", "--", "wattledger-no-such-command-xyz", "--flag"], tmp_path,
                            timeout=30)
    assert result.returncode == 127
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(r"cannot start 'wattledger-no-such-command-xyz': command not found",
                                         lines[0]), result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_file_that_is_not_executable_is_126(tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("echo hi\n")
    os.chmod(script, 0o644)
    result = wattledger_run(["--backend", "mock", "--", str(script)], tmp_path, timeout=30)
    assert result.returncode == 126
    assert len(result.stderr.strip().splitlines()) == 1 and "permission denied" in result.stderr
