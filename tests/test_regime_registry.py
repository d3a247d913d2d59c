"""A fourth regime is one module and one registry line: a toy regime (``toy_regime.py``, no torch in it)
registered with one line flows through ``wattledger workload`` and ``wattledger bench``."""

from __future__ import annotations

import json

import pytest

from wattledger.workloads import registry

TOY = registry.Regime("toy", "toy_regime", "ToyConfig", "a toy regime: tokens and spans, no model", "generated",
                      "#777777")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.REGIMES, "toy", TOY)  # the one line a new regime takes
    return TOY


def test_the_bench_accepts_a_registered_regime_and_only_registered_ones(toy, monkeypatch):
    import argparse

    from wattledger.workloads.bench.cli import _workloads

    assert _workloads("toy,chat") == ("toy", "chat")
    monkeypatch.delitem(registry.REGIMES, "toy")
    with pytest.raises(argparse.ArgumentTypeError, match="choose from training, chat, agentic"):
        _workloads("toy")


def test_the_workload_command_lists_a_registered_regime_without_importing_any(toy, capsys):
    from wattledger.workloads.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "a toy regime: tokens and spans, no model" in capsys.readouterr().out


@pytest.mark.slow
def test_workload_toy_runs_and_prints_its_summary(toy, capsys):
    pytest.importorskip("torch")  # the shared run options (workloads.common) are torch's
    from wattledger.workloads.cli import main

    assert main(["toy", "--duration", "1s", "--json", "--tokens-per-step", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["workload"] == "toy" and summary["interrupted"] is False
    assert summary["steps"] > 0 and summary["tokens"]["generated"] == 3 * summary["steps"]


@pytest.mark.slow
def test_bench_runs_a_registered_regime_into_its_summary(toy, tmp_path, capsys):
    pytest.importorskip("torch")
    from wattledger.workloads.bench.cli import bench_main

    code = bench_main(["--workloads", "toy", "--backend", "mock", "--quick", "--duration", "6s", "--idle", "0s",
                       "--cooldown", "0s", "--output", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "latest" / "summary.json").read_text())
    assert summary["settings"]["workloads"] == ["toy"] and list(summary["regimes"]) == ["toy"]
    toy_summary = summary["regimes"]["toy"]
    assert toy_summary["workload"]["workload"] == "toy"
    assert toy_summary["workload"]["tokens"]["generated"] > 0
