"""Serving engines' tokens charged to owners, off Kubernetes (agent/engines.py; docs/attribution.md
"Engines off Kubernetes"): only registered when the agent is given ``--engine URL``.

- ``wattledger_owner_tokens_total{owner_kind,namespace,pod,container,group,engine,model,kind}``: tokens
  the engine counted since the agent started, charged to the owner of the process listening on its port;
  the five owner labels are the owner energy series' own, so ``rate(energy) / rate(tokens)`` joins on them.
  ``engine`` is the engine kind (vllm, sglang, tgi), ``model`` its ``model_name`` label ("" for TGI),
  ``kind`` prompt or generated.
- ``wattledger_engine_unplaced_tokens_total{url,engine,kind}``: tokens read while no owner could be named.
- ``wattledger_engine_up{url,engine}``: 1 while the engine is read and its listener found, else 0;
  ``wattledger_engine_status{url,engine,reason}``: value 1, the reason in one line ("ok" when up). Both are
  bounded: one series per configured URL.

The collector reads a duck-typed source (``tokens()``, ``unplaced()``, ``statuses()``): exporters import
nothing of the agent but its ledger and version (tests/test_layers.py).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from wattledger.agent.ledger import OWNER_LABEL_NAMES
from wattledger.exporters.render import CounterFamily, GaugeFamily

P = "wattledger_"
TOKEN_LABELS = [*OWNER_LABEL_NAMES, "engine", "model", "kind"]


class EngineTokensCollector(Collector):
    """The families above, from an ``agent.engines.EngineWatcher`` (or anything with its three methods)."""

    def __init__(self, source):
        self._source = source

    def collect(self) -> Iterator[Metric]:
        tokens = CounterFamily(P + "owner_tokens", "Tokens a serving engine counted since the agent started, "
                               "charged to the owner of the process listening on the engine's port.",
                               labels=TOKEN_LABELS)
        for row in self._source.tokens():
            tokens.add_metric([*row.owner, row.engine, row.model, row.kind], row.tokens)
        yield tokens
        unplaced = CounterFamily(P + "engine_unplaced_tokens", "Tokens an engine counted while no owner could be "
                                 "named (no listening process found, or its owner unknown).",
                                 labels=["url", "engine", "kind"])
        for (url, engine, kind), count in sorted(self._source.unplaced().items()):
            unplaced.add_metric([url, engine, kind], count)
        yield unplaced
        up = GaugeFamily(P + "engine_up", "1 while the engine's token counters are read and its listening process "
                         "found.", labels=["url", "engine"])
        status = GaugeFamily(P + "engine_status", "The engine watcher's state of each engine, in one line (value "
                             "1; reason \"ok\" while it works).", labels=["url", "engine", "reason"])
        for engine in self._source.statuses():
            up.add_metric([engine.url, engine.engine], 1.0 if engine.up else 0.0)
            status.add_metric([engine.url, engine.engine, engine.reason], 1.0)
        yield up
        yield status
