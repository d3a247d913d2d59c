"""wattledger.workloads.bench: the measurement (``wattledger bench``, ``run`` and ``report``).

It runs a regime or any command beside an in-process agent, records a run directory, and turns it into
``summary.json`` and ``report.html``. Nothing here imports torch: the regimes are loaded through the
registry (``wattledger.workloads.registry``) only when a benchmark runs them.
"""
