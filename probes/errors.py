"""One-line messages: how a probe puts an exception into a field's or a zone's status (the exception's type
first), and how any status, reason label or error body is kept to one bounded line."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """``"PermissionError: [Errno 13] ..."`` on one line: the field status and the log line it feeds are
    line-oriented (``devices`` prints one line per field, a log record is one line)."""
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def bounded_line(text: object, limit: int = 200) -> str:
    """``text`` on one line (runs of whitespace, newlines included, become one space), cut to at most
    ``limit`` characters with "..." (a label value or an error body that grows without bound is a bug)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."
