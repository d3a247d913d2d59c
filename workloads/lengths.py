"""Prompt and output lengths for the chat workload, drawn from published quantile tables. Pure Python.

Sampling is by inverse CDF: a uniform draw is mapped through the quantile table by linear interpolation
between its points. Prompt and output are drawn independently (the trace's corr(log in, log out) is 0.09).

The tables stop short of the extremes, so each is closed at both ends (our choice, stated here):

- p0 is 1 token for both: a request has at least one prompt token and one output token, and nothing
  below p5 / p10 is known, so the lowest band is spread evenly down to 1.
- p100 of the output is the table's own maximum, 1000.
- p100 of the prompt extends the p90-p99 segment by one more percentile:
  4142 + (4142 - 2734) / 9 = 4298 (the table gives no maximum).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

Table = tuple[tuple[float, int], ...]  # (cumulative probability, tokens), increasing in both

# Azure LLM inference trace 2023, conversation (computed; docs/workload-figures.md, "Chat"):
# prompt p5 181, p25 396, p50 1020, p75 1189, p90 2734, p99 4142;
# output p10 54, p50 129, p75 395, p90 424, p99 601, max 1000. The p0 and prompt p100 rows are ours
# (module docstring).
CONVERSATION_PROMPT: Table = (
    (0.00, 1), (0.05, 181), (0.25, 396), (0.50, 1020), (0.75, 1189), (0.90, 2734), (0.99, 4142), (1.00, 4298),
)
CONVERSATION_OUTPUT: Table = (
    (0.00, 1), (0.10, 54), (0.50, 129), (0.75, 395), (0.90, 424), (0.99, 601), (1.00, 1000),
)

TABLES: dict[str, tuple[Table, Table]] = {"conversation": (CONVERSATION_PROMPT, CONVERSATION_OUTPUT)}


def quantile(table: Table, p: float) -> float:
    """The table's value at cumulative probability ``p`` (0 <= p <= 1), linearly interpolated."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be within [0, 1], got {p}")
    for (p0, v0), (p1, v1) in zip(table, table[1:]):
        if p <= p1:
            return v0 + (v1 - v0) * (p - p0) / (p1 - p0)
    return float(table[-1][1])


def fitted_scale(max_total: int, kind: str = "conversation") -> float:
    """The largest scale (at most 1) at which the longest prompt plus the longest output fit ``max_total``
    tokens, so a small model's cache holds any request the table can produce."""
    prompt, output = _tables(kind)
    return min(1.0, max_total / (prompt[-1][1] + output[-1][1]))


def _tables(kind: str) -> tuple[Table, Table]:
    try:
        return TABLES[kind]
    except KeyError:
        raise ValueError(f"unknown length table {kind!r}; choose from {', '.join(TABLES)}") from None


@dataclass(frozen=True)
class LengthSampler:
    """Draws (prompt_tokens, output_tokens) pairs.

    ``scale`` multiplies both lengths (rounded, at least 1), so a small preset keeps the shape of the
    distribution at a size its cache holds. ``max_total`` caps prompt + output (the cache's max length);
    with ``scale`` from ``fitted_scale(max_total)`` the cap only ever trims a rounding token. When it
    binds, the prompt is cut first (as a server truncates context), then the output.
    """

    kind: str = "conversation"
    scale: float = 1.0
    max_total: int | None = None

    def __post_init__(self) -> None:
        _tables(self.kind)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not (
                math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"length scale must be a positive number, got {self.scale!r}")
        if self.max_total is not None and (isinstance(self.max_total, bool) or not isinstance(self.max_total, int)
                                           or self.max_total < 2):
            raise ValueError(f"max total tokens must be an integer of at least 2, got {self.max_total!r}")

    @property
    def max_output(self) -> int:
        """The longest output this sampler returns."""
        longest = max(1, round(_tables(self.kind)[1][-1][1] * self.scale))
        return min(longest, self.max_total - 1) if self.max_total is not None else longest

    def sample(self, rng: random.Random) -> tuple[int, int]:
        prompt_table, output_table = _tables(self.kind)
        prompt = max(1, round(quantile(prompt_table, rng.random()) * self.scale))
        output = max(1, round(quantile(output_table, rng.random()) * self.scale))
        if self.max_total is not None and prompt + output > self.max_total:
            output = min(output, self.max_total - 1)
            prompt = min(prompt, self.max_total - output)
        return prompt, output
