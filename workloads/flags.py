"""Command-line values of the regimes' flags, parsed with one-line errors that name the flag. No torch.

A regime's ``add_arguments`` takes its values as text and its ``config_from_args`` parses them here, so a
bad value is a ``ValueError`` with one line (``--rate expects a number, got 'fast'``) that the caller prints
as it prints every other config error, rather than argparse's usage dump and exit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def number_flag(flag: str, text, kind: type = float, *, positive: bool = False):
    """``text`` as a finite ``kind`` (``float`` or ``int``) for ``flag`` (e.g. ``"--rate"``); None stays None.

    ValueError (one line, naming the flag) for text that is not such a number, or with ``positive`` for a
    value that is not above 0.
    """
    if text is None:
        return None
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} expects {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{flag} expects a finite number, got {text!r}")
    if positive:
        _refuse_non_positive(flag, text, value)
    return value


def parsed_flag(flag: str, text: str, parse: Callable[[str], T], *, positive: bool = False) -> T:
    """``parse(text)`` (a duration, a size...) with its ValueError prefixed by ``flag``; with ``positive``,
    a value that is not above 0 is refused too."""
    try:
        value = parse(text)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None
    if positive:
        _refuse_non_positive(flag, text, value)
    return value


def _refuse_non_positive(flag: str, text, value) -> None:
    if not value > 0:
        raise ValueError(f"{flag} must be positive, got {text!r}")
