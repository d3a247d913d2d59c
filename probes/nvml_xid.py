"""XID error counting for the NVML backend, on its own daemon thread.

XIDs (driver-reported GPU faults: 13 graphics engine exception, 31 MMU fault, 48 double-bit ECC, 79 fallen
off the bus, ...) are not readable as a value: NVML only delivers them as events. A thread blocks in
``nvmlEventSetWait`` with a timeout, so it notices ``close()`` within one timeout.

NVML is thread-safe except for event sets, so every call on the event set after the thread starts
(waiting, registering a re-acquired device, freeing) happens on that one thread or after it has stopped.

This module does not import ``pynvml``; the backend passes the module and its error classifier in.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
from typing import Any, Callable

# How long one nvmlEventSetWait blocks. It bounds how long close() waits for the thread.
WAIT_MS = 500
# After an unexpected error from nvmlEventSetWait, wait this long before trying again (no busy loop).
ERROR_PAUSE_S = 1.0


def handle_address(handle: Any) -> int | None:
    """The address an NVML device handle points to; equal handles from NVML point to the same place."""
    return ctypes.cast(handle, ctypes.c_void_p).value


class XidWatcher:
    """Registers GPUs for XID critical-error events and counts them per (gpu index, xid).

    ``register`` runs before ``start`` (no thread yet, so no locking of the event set is needed);
    ``reregister`` queues a re-acquired device's new handle for the thread to register.
    """

    def __init__(self, nvml: Any, error_name: Callable[[int], str], logger: logging.Logger) -> None:
        self._nvml = nvml
        self._error_name = error_name
        self._log = logger
        self._event_set: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, int], int] = {}
        self._errors: dict[str, int] = {}
        self._index_by_address: dict[int, int] = {}
        self._pending: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        # gpu index -> None when registered, else why not (for field_status "xid_events")
        self.unsupported: dict[int, str] = {}
        self.registered: set[int] = set()

    def register(self, devices: list[tuple[int, Any]]) -> None:
        """Create the event set and register each (index, handle) for XID events. Call before start()."""
        nvml = self._nvml
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as err:
            reason = f"nvmlEventSetCreate: {self._error_name(err.value)}"
            for index, _ in devices:
                self.unsupported[index] = reason
            self._log.info("XID events unavailable: %s", reason)
            return
        for index, handle in devices:
            self._register_one(index, handle)

    def _register_one(self, index: int, handle: Any) -> None:
        nvml = self._nvml
        try:
            nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._event_set)
        except nvml.NVMLError as err:
            reason = f"nvmlDeviceRegisterEvents: {self._error_name(err.value)}"
            self.unsupported[index] = reason
            self.registered.discard(index)
            self._log.info("GPU %d: XID events unavailable (%s)", index, reason)
            return
        address = handle_address(handle)
        with self._lock:
            if address is not None:
                self._index_by_address[address] = index
        self.unsupported.pop(index, None)
        self.registered.add(index)

    def start(self) -> bool:
        """Start the thread if any device registered; otherwise free the event set. True if started."""
        if not self.registered:
            self._free_event_set()
            return False
        self._thread = threading.Thread(target=self._run, name="wattledger-nvml-xid", daemon=True)
        self._thread.start()
        return True

    def reregister(self, index: int, handle: Any) -> None:
        """A device was re-acquired with a new handle: the thread registers it between waits."""
        if self._thread is not None:
            self._pending.put((index, handle))

    def counts(self) -> dict[tuple[int, int], int]:
        with self._lock:
            return dict(self._counts)

    def errors(self) -> dict[str, int]:
        """Unexpected nvmlEventSetWait failures by NVML error name."""
        with self._lock:
            return dict(self._errors)

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            while not self._pending.empty():
                self._register_one(*self._pending.get())
            try:
                data = nvml.nvmlEventSetWait(self._event_set, WAIT_MS)
            except nvml.NVMLError as err:
                if err.value == nvml.NVML_ERROR_TIMEOUT:
                    continue  # no event in this window: check the stop flag and wait again
                name = self._error_name(err.value)
                with self._lock:
                    first = name not in self._errors
                    self._errors[name] = self._errors.get(name, 0) + 1
                if first:
                    self._log.warning("XID event wait failed: %s; retrying every %.0f s", name, ERROR_PAUSE_S)
                self._stop.wait(ERROR_PAUSE_S)
                continue
            if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            address = handle_address(data.device)
            with self._lock:
                index = self._index_by_address.get(address) if address is not None else None
                if index is not None:
                    key = (index, int(data.eventData))
                    self._counts[key] = self._counts.get(key, 0) + 1
            if index is None:
                self._log.warning("XID %d from a device handle this backend does not know", data.eventData)
            else:
                self._log.warning("GPU %d: XID %d", index, data.eventData)

    def close(self) -> None:
        """Stop the thread (within one wait timeout) and free the event set."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WAIT_MS / 1000 * 4)
            if self._thread.is_alive():
                # Freeing the set under a thread still inside nvmlEventSetWait is not safe; leave it.
                self._log.warning("XID thread did not stop within %d ms; not freeing its event set", WAIT_MS * 4)
                return
            self._thread = None
        self._free_event_set()

    def _free_event_set(self) -> None:
        if self._event_set is None:
            return
        event_set, self._event_set = self._event_set, None
        try:
            self._nvml.nvmlEventSetFree(event_set)
        except self._nvml.NVMLError as err:
            self._log.debug("nvmlEventSetFree failed: %s", self._error_name(err.value))
