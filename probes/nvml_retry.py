"""NVML that is not there yet: retry opening it with backoff, and tell a GPU node from a machine without one.

``--backend auto`` on a node whose NVIDIA driver is installed but not usable yet (a pod that starts before
the driver container has loaded the module, device nodes that appear late, a driver being reinstalled)
must neither give up on the GPUs nor serve simulated ones. ``RetryingNvmlBackend`` is a ``GpuBackend``
with no devices that tries to open ``NvmlBackend`` again with exponential backoff; until it works every
``sample()`` raises ``NvmlNotReady``, which the sampler records as ``wattledger_probe_success{probe="gpu"}
0`` (and logs once). Once NVML opens, the devices appear and ``devices_generation`` moves on, which tells
the sampler to hand the new device list to the ledger.

``nvidia_driver_evidence`` decides whether a machine should have GPUs: the NVIDIA device nodes, the
kernel module's /proc entry, or an NVML library that loaded but failed. A laptop has none of them, and
there ``auto`` keeps falling back to the mock, saying so.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from .base import FieldStatus, GpuBackend, GpuInfo, GpuSample, ProbeOutcome, ProbeUnavailable

RETRY_INITIAL_S = 1.0  # first retry after the failure at start
RETRY_MAX_S = 30.0  # the delay doubles up to this

_DEVICE_NODE = re.compile(r"nvidia(ctl|\d+)$")


class NvmlNotReady(Exception):
    """``sample()`` of a ``RetryingNvmlBackend`` before NVML could be opened. One line: why, and what next."""


def nvidia_driver_evidence(
    failure: ProbeUnavailable, dev_root: str | os.PathLike = "/dev", procfs: str | os.PathLike = "/proc"
) -> str | None:
    """What says this machine has an NVIDIA driver (so NVML should work), or None on a machine without one.

    ``failure`` is why NVML did not open: an NVML library that loaded but failed (driver not loaded, no
    permission, no GPUs visible yet) is evidence by itself. Otherwise the device nodes (/dev/nvidiactl,
    /dev/nvidia0, ...) or the kernel module's /proc/driver/nvidia are.
    """
    if getattr(failure, "library_found", False):
        return "the NVML library is installed"
    try:
        nodes = sorted(name for name in os.listdir(dev_root) if _DEVICE_NODE.match(name))
    except OSError:
        nodes = []
    if nodes:
        return f"{Path(dev_root) / nodes[0]} exists"
    if (Path(procfs) / "driver" / "nvidia").exists():
        return f"{Path(procfs) / 'driver' / 'nvidia'} exists (the NVIDIA kernel module is loaded)"
    return None


class RetryingNvmlBackend:
    """A ``GpuBackend`` that opens NVML on a later tick, retrying with backoff until it works.

    ``open_nvml`` builds the real backend (raising ``ProbeUnavailable`` while NVML cannot be used);
    ``first_failure`` is the one-line reason of the attempt already made at start. ``clock_ns`` paces the
    retries: the first after ``RETRY_INITIAL_S``, then doubling up to ``RETRY_MAX_S``. Once open, every
    call goes to the real backend (``xid_counts``, ``error_counts``, ``probe_status`` too); before that they
    are empty: the "gpu" probe itself says that NVML is not open.
    """

    name = "nvml"
    simulated = False

    def __init__(
        self,
        open_nvml: Callable[[], GpuBackend],
        first_failure: str,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        logger: logging.Logger | None = None,
    ) -> None:
        self._open_nvml = open_nvml
        self._clock = clock_ns
        self._log = logger or logging.getLogger(__name__)
        self._inner: GpuBackend | None = None
        self._failure = first_failure
        self._delay_s = RETRY_INITIAL_S
        self._retry_at_ns = clock_ns() + int(RETRY_INITIAL_S * 1e9)
        self._closed = False
        self.attempts = 1  # the one at start
        # Moves on when the device list changes (here: once, when NVML opens); the sampler watches it.
        self.devices_generation = 0

    @property
    def opened(self) -> bool:
        return self._inner is not None

    def devices(self) -> list[GpuInfo]:
        return self._inner.devices() if self._inner is not None else []

    def sample(self) -> list[GpuSample]:
        """The real backend's reading once NVML is open; before that ``NvmlNotReady``, retrying when due."""
        if self._inner is None and not self._try_open():
            # The same text every tick, so the sampler logs it once and counts the rest.
            raise NvmlNotReady(f"{self._failure}; retrying NVML with backoff (up to every {RETRY_MAX_S:.0f} s)")
        return self._inner.sample()

    def field_status(self, index: int) -> list[FieldStatus]:
        if self._inner is None:
            raise IndexError(f"no GPU with index {index}: NVML is not open yet ({self._failure})")
        return self._inner.field_status(index)

    def close(self) -> None:
        self._closed = True
        if self._inner is not None:
            self._inner.close()

    def xid_counts(self) -> dict[tuple[int, int], int]:
        return self._inner.xid_counts() if self._inner is not None else {}

    def error_counts(self) -> dict[tuple[int | None, str, str], int]:
        return self._inner.error_counts() if self._inner is not None else {}

    def probe_status(self) -> list[ProbeOutcome]:
        return self._inner.probe_status() if self._inner is not None else []

    def _try_open(self) -> bool:
        """One attempt if the backoff has passed. True once NVML is open."""
        if self._closed or self._clock() < self._retry_at_ns:
            return False
        self.attempts += 1
        try:
            self._inner = self._open_nvml()
        except ProbeUnavailable as err:
            failure = str(err).splitlines()[0] if str(err) else type(err).__name__
            if failure != self._failure:
                self._log.warning("%s; retrying NVML with backoff", failure)
            self._failure = failure
            self._delay_s = min(self._delay_s * 2, RETRY_MAX_S)
            self._retry_at_ns = self._clock() + int(self._delay_s * 1e9)
            return False
        self.devices_generation += 1
        self._log.info("NVML opened after %d attempts: %d GPU(s)", self.attempts, len(self._inner.devices()))
        return True
