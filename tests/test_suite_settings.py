"""The suite's own settings (tests/conftest.py) and its load helper (tests/busy.py) do what they say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BUSY = Path(__file__).parent / "busy.py"


def test_subprocesses_a_test_starts_run_one_thread():
    # conftest sets these in os.environ, so the CLI, torchrun's ranks and the bench inherit them.
    script = "import os; print(','.join(os.environ.get(n, '-') for n in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS')))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "1,1"


def test_torch_in_the_test_process_runs_one_thread():
    torch = pytest.importorskip("torch")
    assert torch.get_num_threads() == 1


def test_conftest_does_not_load_torch_for_tests_that_do_not_need_it():
    # A fresh interpreter that loads the suite's conftest (as pytest does) has no torch in sys.modules.
    script = (f"import sys; sys.path.insert(0, {str(BUSY.parent)!r}); import conftest; "
              "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_integration_tests_are_slow_so_the_fast_lane_leaves_them_out(pytestconfig):
    import conftest

    class Item:
        def __init__(self, *markers):
            self.markers = {m: object() for m in markers}
            self.added = []

        def get_closest_marker(self, name):
            return self.markers.get(name) or next((m for m in self.added if m.name == name), None)

        def add_marker(self, marker):
            self.added.append(marker)

    integration, plain = Item("integration"), Item()
    conftest.pytest_collection_modifyitems(pytestconfig, [integration, plain])
    assert [m.name for m in integration.added] == ["slow"] and plain.added == []


def test_busy_keeps_workers_spinning_for_a_bounded_time():
    done = subprocess.run([sys.executable, str(BUSY), "--workers", "1", "--seconds", "0.5"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("busy: 1 worker(s) spinning for at most 0.5 s") and lines[-1].startswith("busy: done")


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--seconds", "-1"], ["--workers", "many"]])
def test_busy_bad_usage_exits_2_without_a_traceback(argv):
    done = subprocess.run([sys.executable, str(BUSY), *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
