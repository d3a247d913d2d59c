"""Argument handling the heavy commands share (workload, bench, report, run): one-line usage errors
with exit status 2, and durations such as ``30s`` or ``2m``."""

from __future__ import annotations

import argparse

from wattledger.agent.config import parse_duration_seconds

EXIT_USAGE = 2
EXIT_FAILED = 1


class UsageParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``PROG: error: ... (see --help)``) and exit status 2."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def duration_arg(allow_zero: bool = True):
    """An argparse ``type`` for durations; zero allowed or not."""

    def parse(text: str) -> float:
        try:
            seconds = parse_duration_seconds(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if seconds < 0 or (seconds == 0 and not allow_zero):
            raise argparse.ArgumentTypeError("duration must be positive" if not allow_zero
                                             else "duration must not be negative")
        return seconds

    return parse
