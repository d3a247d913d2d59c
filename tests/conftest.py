"""Suite-wide settings: helpers on the import path, one compute thread per process, the fast lane.

The suite must give the same answer on a machine that other processes keep busy. Two things here serve
that:

- every test process runs torch (and any OpenMP/MKL library) on one thread. Set in ``os.environ`` before
  any test module imports torch, so this process picks it up at torch's first parallel region and every
  subprocess a test starts (the CLI, torchrun's ranks, the bench) inherits it. On a busy 2-core machine a
  second OpenMP thread only spins waiting for a core: one test went from 70.7 s to 14.8 s with this alone.
  torch itself is not imported here (most tests never need it, and the daemon's tests check it stays out).
- ``integration`` tests are also ``slow``, so ``pytest -m "not slow"`` is the edit-test loop (see the
  README); CI runs everything.
"""

import os
import sys
from pathlib import Path

import pytest

# Test helpers (fakes, stubs, fixture-tree builders) live beside the tests and import by plain name.
sys.path.insert(0, str(Path(__file__).parent))

# One thread per process, for this one and for the subprocesses tests start (they inherit os.environ).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
for _name in THREAD_VARIABLES:
    os.environ[_name] = "1"


@pytest.fixture(autouse=True)
def _torch_on_one_thread():
    """Put torch back on one thread around every test that has it loaded (a test may change it).

    Looks torch up in ``sys.modules`` rather than importing it: a test that does not use torch stays free
    of it."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    """Integration tests (real servers, subprocesses, whole workloads) are slow by nature: mark them so."""
    slow = pytest.mark.slow
    for item in items:
        if item.get_closest_marker("integration") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(slow)
