"""Keep CPU cores busy for a bounded time: the load the suite must pass under.

    python tests/busy.py --workers 2 --seconds 900 &     # both cores of a 2-core machine, at most 15 min
    python -m pytest -q                                   # the suite, beside it
    kill %1                                               # or let it end on its own

Each worker is a separate process spinning on integer arithmetic (no I/O, no memory growth), so the
scheduler sees as many always-runnable processes as ``--workers``. The parent ends every worker after
``--seconds``, on SIGTERM/SIGINT, and (workers poll their parent) when the parent itself is killed, so a
forgotten load never outlives its bound. Prints one line when the load starts and one when it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import sys
import time

POLL_EVERY = 200_000  # spin iterations between checks of the deadline and the parent (about 10 ms)


def spin(deadline_monotonic_s: float, parent_pid: int) -> None:
    """Burn one core until the deadline, or until the parent process is gone."""
    counter = 0
    while True:
        for _ in range(POLL_EVERY):
            counter = (counter * 1103515245 + 12345) & 0xFFFFFFFF
        if time.monotonic() >= deadline_monotonic_s or os.getppid() != parent_pid:
            return


@contextlib.contextmanager
def spinning(count: int, seconds: float):
    """``count`` processes burning a core each for at most ``seconds``; ended on leaving, in every case."""
    deadline = time.monotonic() + seconds
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=spin, args=(deadline, os.getpid()), daemon=True) for _ in range(count)]
    try:
        for worker in workers:
            worker.start()
        yield workers
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(5)


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=positive(int), default=os.cpu_count() or 1,
                        help="busy processes (default: one per core)")
    parser.add_argument("--seconds", type=positive(float), default=600.0, help="how long, at most (default 600)")
    args = parser.parse_args(argv)

    def end(signum, frame):  # noqa: ARG001 - the signal handler's signature
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, end)
    started = time.monotonic()
    try:
        with spinning(args.workers, args.seconds) as workers:
            print(f"busy: {args.workers} worker(s) spinning for at most {args.seconds:g} s (pid {os.getpid()})",
                  flush=True)
            for worker in workers:
                worker.join(max(0.0, started + args.seconds - time.monotonic()) + 1.0)
    finally:
        print(f"busy: done after {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
