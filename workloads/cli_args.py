"""Argument handling the heavy commands share (workload, bench, report, run): one-line usage errors
with exit status 2, and durations such as ``30s`` or ``2m``."""

from __future__ import annotations

import argparse

# One usage parser and one set of exit statuses for every command: the agent's (agent/config.py).
from wattledger.agent.config import EXIT_FAILED, EXIT_USAGE, ConfigError, UsageParser, check_port, parse_duration_seconds

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "UsageParser", "duration_arg", "port_arg"]


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


def port_arg(text: str) -> int:
    """An argparse ``type`` for a TCP port: 1-65535, or 0 for any free one (checked as the agent checks it)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    try:
        check_port(port)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return port
