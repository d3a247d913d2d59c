"""How a probe puts an exception into a field's or a zone's status: one line, the exception's type first."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """``"PermissionError: [Errno 13] ..."`` on one line: the field status and the log line it feeds are
    line-oriented (``devices`` prints one line per field, a log record is one line)."""
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")
