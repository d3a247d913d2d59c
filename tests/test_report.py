"""The run report: a self-contained page with every figure and table, partial data handled, and a page that
headless Chromium loads with every image and no console error."""

from __future__ import annotations

import copy
import html
import json
import os
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
from run_fixture import make_run_dir
from wattledger.workloads.bench import report
from wattledger.workloads.bench.report import FIGURE_FILES, build_figures, render_report

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "summary.schema.json").read_text(encoding="utf-8"))
FIGURE_IDS = ("fig-utilization", "fig-activity", "fig-power", "fig-memory", "fig-joules_per_token", "fig-cost")
SECTIONS = ("id=\"regimes\"", "id=\"gpus\"", "id=\"pricing\"", "id=\"validity\"")


def validate(summary: dict) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(summary)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A complete simulated bench run and its rendered report."""
    run, summary = make_run_dir(tmp_path_factory.mktemp("full") / "run")
    page = render_report(run, summary, run.run_dir / "report.html")
    return run, summary, page, page.read_text(encoding="utf-8")


RAPL_WATTS = {"package-0": 95.0, "dram-0": 12.0}


def with_rapl(run):
    """The fixture's host samples with RAPL package and DRAM running totals (joules), as load_run reads
    them from a host whose powercap tree is readable."""
    for zone, watts in RAPL_WATTS.items():
        run.host[f"rapl_{zone}_joules"] = 5_000.0 + watts * run.host["t"]
    return run


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """The fixture run with RAPL, its summary as analysis.summarize computes it (the bench's own path: agentic
    sessions that do not finish, so no J/session), and the rendered report."""
    from wattledger.workloads.bench.analysis import summarize
    from wattledger.workloads.bench.economics import load_pricing

    run, _ = make_run_dir(tmp_path_factory.mktemp("analysed") / "run")
    with_rapl(run)
    summary = json.loads(json.dumps(summarize(run, load_pricing()), default=lambda v: v.item()))
    page = render_report(run, summary, run.run_dir / "report.html")
    return run, summary, page


def image_sources(text: str) -> list[str]:
    return re.findall(r"<img[^>]*\bsrc=['\"]([^'\"]*)['\"]", text)


def test_fixture_summaries_validate_against_the_schema(tmp_path):
    for name, kwargs in {"full": {}, "partial": {"partial": True, "gpus": 2},
                         "real": {"simulated": False, "regimes": ("chat",)}}.items():
        run, summary = make_run_dir(tmp_path / name, **kwargs)
        validate(summary)
        assert not run.gpu.empty and not run.host.empty and not run.tokens.empty
        assert summary["simulated"] == run.simulated == kwargs.get("simulated", True)


def test_page_is_self_contained(full):
    _, _, _, text = full
    assert not re.search(r"""(src|href)\s*=\s*['"]?\s*(https?:)?//""", text, re.IGNORECASE)
    assert "<script" not in text.lower()
    assert "url(" not in text  # no stylesheet fetches either
    sources = image_sources(text)
    assert len(sources) == len(FIGURE_FILES)
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    alts = re.findall(r"<img[^>]*\balt='([^']*)'", text)
    assert len(alts) == len(sources) and all(len(alt) > 30 for alt in alts)


def test_every_figure_is_on_the_page_and_saved(full):
    run, _, _, text = full
    for fig_id in FIGURE_IDS:
        assert re.search(f"<figure id='{fig_id}'[^>]*><img ", text), fig_id
    for name in FIGURE_FILES.values():
        png = run.run_dir / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "training" in text and "chat" in text and "agentic" in text
    assert "training (trained tokens)" in text and "chat (generated tokens)" in text  # J/token alt text


def test_tables_hold_every_figure_asked_for(full):
    _, summary, _, text = full
    for section in SECTIONS:
        assert section in text
    for label in ("utilization mean", "utilization p50 / p99", "idle fraction", "power mean / p99", "energy",
                  "tokens/s (main kind)", "J/token gross", "J/token dynamic", "$/M tokens measured",
                  "$/M tokens at full load", "CO₂ per M tokens", "TTFT p50 / p99", "TPOT p50 / p99",
                  "tool-time share", "spilled to host", "MFU", "goodput", "simulator truth"):
        assert f">{label}" in text, label
    # GPU, driver and power limit; pricing inputs with sources; every validity check with its detail.
    assert "NVIDIA H100 80GB HBM3 (mock)" in text and ">700 W<" in text
    pricing = summary["pricing"]
    for key, source in pricing["sources"].items():
        assert f">{key}</th><td" in text and html.escape(source) in text, key
    assert ">2.49<" in text  # inputs as given, not padded to significant figures
    for name, formula in pricing["formulas"].items():
        assert name in text and html.escape(formula) in text
    assert html.escape(pricing["notes"][0]) in text
    checks = summary["validity"] + [c for r in summary["regimes"].values() for c in r["validity"]]
    for check in checks:
        assert check["check"] in text and html.escape(check["detail"]) in text
    assert text.count("class='fail'") == sum(not c["passed"] for c in checks) == 1
    assert f"{sum(c['passed'] for c in checks)} of {len(checks)} passed" in text
    # Headline figures as the workloads reported them.
    assert "84.0 ms / 460 ms" in text  # chat TTFT p50 / p99
    assert "41.2 %" in text and "95.3 %" in text  # training MFU, goodput
    assert "5.37 GB" in text  # agentic spill


def test_simulated_is_the_first_line_and_the_title(full):
    _, _, _, text = full
    assert re.search(r"<title>SIMULATED \(mock GPU\)", text)
    body = re.sub(r"<[^>]+>", " ", text.split("<body>", 1)[1])
    assert body.split()[:3] == ["SIMULATED", "(mock", "GPU):"]
    assert "PARTIAL" not in text


def test_real_gpu_run_says_nothing_of_simulation(tmp_path):
    run, summary = make_run_dir(tmp_path / "run", simulated=False)
    text = render_report(run, summary, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "SIMULATED" not in text and "simulator truth" not in text


def test_partial_run_says_so_and_shows_what_it_has(tmp_path):
    run, summary = make_run_dir(tmp_path / "run", partial=True, gpus=2)
    validate(summary)
    assert run.event("run_end") is None and "agentic" not in summary["regimes"]
    text = render_report(run, summary, tmp_path / "report.html").read_text(encoding="utf-8")
    body = re.sub(r"<[^>]+>", " ", text.split("<body>", 1)[1]).split()
    assert body[0] == "SIMULATED" and "PARTIAL" in body[:30]
    assert "status: partial" in text and "PARTIAL" in text.split("</title>")[0]
    assert "no summary for agentic" in text and "not measured" in text
    assert len(image_sources(text)) == len(FIGURE_FILES)  # the cut-short phase is still drawn


def test_missing_regimes_none_values_and_no_cost_curves(tmp_path):
    run, summary = make_run_dir(tmp_path / "run", regimes=("chat", "agentic"))
    summary = copy.deepcopy(summary)
    summary.pop("economics")
    chat = summary["regimes"]["chat"]
    chat["joules_per_token"] = {"gross": None, "dynamic": None}
    chat["cost_usd_per_million_tokens"] = {"measured": None, "full_load": None}
    chat["gpu_utilization"]["p99"] = None
    chat["co2_grams_per_million_tokens"] = None
    chat.pop("workload")
    summary["gpus"][0]["power_limit_watts"] = None
    summary["idle"]["power_watts"] = None
    validate(summary)
    text = render_report(run, summary, tmp_path / "report.html").read_text(encoding="utf-8")
    words = re.sub(r"<img[^>]*>", "", text)
    assert "n/a" in words and not re.search(r"\b(None|nan|NaN|inf)\b", words)
    assert "training" not in re.sub(r"<img[^>]*>", "", text).split("id=\"regimes\"")[1].split("</table>")[0]
    assert "TTFT" not in text  # no chat workload summary, so no row for it
    assert "No cost curve for" in text  # agentic's measured point is drawn without a curve
    assert len(image_sources(text)) == len(FIGURE_FILES)


def test_empty_tables_and_an_empty_summary(tmp_path):
    run, _ = make_run_dir(tmp_path / "run", regimes=())
    run.gpu = run.gpu.iloc[0:0]
    run.host = run.host.iloc[0:0]
    text = render_report(run, {}, tmp_path / "report.html").read_text(encoding="utf-8")
    assert image_sources(text) == []
    assert text.count("class='missing'") == len(FIGURE_FILES)
    assert "n/a: no GPU utilization samples" in text and "n/a: no regime was measured" in text
    assert "n/a: the summary lists no validity checks" in text


# -- in a real browser -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_report_renders_in_headless_chromium(analysed, tmp_path):
    """The report of what analysis computes, looked at in a real browser: every figure drawn, the labels a
    reader needs on the page as Chromium lays it out (innerText, not the HTML source), and a screenshot."""
    from browser import check_page, require_chromium

    chromium = require_chromium()
    run, summary, page = analysed
    result = check_page(page, tmp_path / "report.png", chromium=chromium)
    assert result.title.startswith("SIMULATED (mock GPU)")
    assert len(result.images) == len(FIGURE_FILES)
    assert result.all_images_loaded, result.images
    assert [f["id"] for f in result.figures] == list(FIGURE_IDS) and all(f["img"] for f in result.figures)
    assert result.severe == []
    assert result.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = " ".join(result.text.split())
    for label in ("GPU temperature p99 / max", "peak host memory of the workload (RSS)",
                  "peak host memory used, whole machine", "SM / tensor / DRAM activity (window mean)",
                  "host CPU energy (RAPL, window)", "J/request (chat)", "J/session (agentic, whole phase)",
                  "One panel per regime, one time axis", "hatched: the steady-state window", "phase ran",
                  "Below: host CPU power from the RAPL energy counters (package-0, dram-0)"):
        assert label in text, label
    assert "GPU temperature max" not in text and "host DRAM" not in text  # the old, misleading labels
    chat = summary["regimes"]["chat"]
    assert f"{html.unescape(report.fmt_energy(chat['joules_per_request']))} per request" in text
    assert "n/a: " + summary["regimes"]["agentic"]["not_available"]["joules_per_session"] in text
    keep = os.environ.get("WATTLEDGER_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(result.screenshot, Path(keep) / "report.png")


def test_pricing_in_other_shapes_and_tokens_per_second_from_the_counts(tmp_path):
    run, summary = make_run_dir(tmp_path / "run", regimes=("training",))
    summary["pricing"] = {"gpu_hour_usd": 3.0, "gpu_hour_usd_source": "a contract quote",
                          "electricity": {"usd_per_kwh": 0.08, "source": "utility tariff"}}
    training = summary["regimes"]["training"]
    del training["tokens_per_second"]
    training["tokens"]["trained"], training["duration_seconds"] = 70_000, 20.0
    validate(summary)
    text = render_report(run, summary, tmp_path / "report.html").read_text(encoding="utf-8")
    assert ">3<" in text and "a contract quote" in text
    assert "usd_per_kwh 0.08" in text and "utility tariff" in text
    assert "3,500 trained/s" in text


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    import browser

    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    monkeypatch.setattr(browser, "try_install", lambda *packages: "install skipped in a unit test")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="headless Chromium unavailable"):
        browser.require_chromium()


def test_report_of_the_summary_analysis_computes(tmp_path):
    """The report reads what ``analysis.summarize`` writes for the same run directory, not only the fixture's
    hand-made summary."""
    analysis = pytest.importorskip("wattledger.workloads.bench.analysis")
    economics = pytest.importorskip("wattledger.workloads.bench.economics")
    run, _ = make_run_dir(tmp_path / "run", partial=True)
    summary = json.loads(json.dumps(analysis.summarize(run, economics.load_pricing()),
                                    default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    validate(summary)
    text = render_report(run, summary, tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(image_sources(text)) == len(FIGURE_FILES)
    assert "PARTIAL" in text and "SIMULATED" in text and "2024-06-01 09:30:00 UTC" in text
    for check in summary["validity"]:
        assert html.escape(check["detail"]) in text


# -- issue 9: one panel per regime, windows shaded, activity, RAPL, labels ------------------------------------

def _window_spans(ax) -> list[tuple[float, float]]:
    """(x0, x1) of the hatched patches on an axes: the steady-state windows (axvspan with hatch)."""
    out = []
    for patch in ax.patches:
        if patch.get_hatch():
            x0 = patch.get_x() if hasattr(patch, "get_x") else min(v[0] for v in patch.get_xy())
            width = patch.get_width() if hasattr(patch, "get_width") else max(v[0] for v in patch.get_xy()) - x0
            out.append((round(x0, 6), round(x0 + width, 6)))
    return out


def test_utilization_and_activity_have_one_panel_per_regime_on_one_time_axis(analysed):
    run, summary, _ = analysed
    figures = {f.key: f for f in build_figures(run, summary)}
    for key in ("utilization", "activity"):
        axes = figures[key].mpl.axes
        assert len(axes) == len(summary["regimes"]) == 3, key
        assert all(axes[0].get_shared_x_axes().joined(axes[0], ax) for ax in axes[1:]), key
        assert axes[-1].get_xlabel() == "seconds since the run started"
        for ax, (name, regime) in zip(axes, summary["regimes"].items()):
            window = (round(regime["window"]["start_seconds"], 6), round(regime["window"]["end_seconds"], 6))
            assert _window_spans(ax) == [window], (key, name)  # its own window, and only its own
            assert ax.get_xlim()[0] == 0 and ax.get_xlim() == axes[0].get_xlim()
    activity_lines = {line.get_label() for line in figures["activity"].mpl.axes[0].get_lines()}
    assert {"SM", "tensor", "DRAM"} <= activity_lines
    assert "SIMULATED" in figures["utilization"].mpl.get_suptitle()


def test_power_figure_shows_rapl_where_present_and_says_why_not(analysed, tmp_path):
    run, summary, _ = analysed
    power = {f.key: f for f in build_figures(run, summary)}["power"]
    assert len(power.mpl.axes) == 2
    rapl_lines = {line.get_label(): line for line in power.mpl.axes[1].get_lines()}
    assert set(rapl_lines) == {"RAPL package-0", "RAPL dram-0"}
    assert list(rapl_lines["RAPL package-0"].get_ydata()) == pytest.approx([95.0] * len(
        rapl_lines["RAPL package-0"].get_ydata()), rel=1e-6)
    for regime in summary["regimes"].values():
        assert regime["energy"]["rapl_joules"]["package-0"] == pytest.approx(95.0 * regime["duration_seconds"], rel=0.02)
        assert "rapl_joules" not in regime["not_available"]
    # Without RAPL: one panel, and the caption and table say why.
    bare, _ = make_run_dir(tmp_path / "bare", regimes=("training",))
    from wattledger.workloads.bench.analysis import summarize
    from wattledger.workloads.bench.economics import load_pricing

    bare_summary = summarize(bare, load_pricing(), regimes=("training",))
    reason = bare_summary["regimes"]["training"]["not_available"]["rapl_joules"]
    assert reason == "no RAPL counters in the host samples"
    figure = {f.key: f for f in build_figures(bare, bare_summary)}["power"]
    assert len(figure.mpl.axes) == 1 and reason in figure.note
    text = render_report(bare, bare_summary, tmp_path / "bare.html").read_text(encoding="utf-8")
    assert text.count(f"Host CPU energy (RAPL): {reason}") == 1 and "n/a (see below the table)" in text


def test_labels_say_what_they_measure(analysed):
    run, summary, page = analysed
    text = page.read_text(encoding="utf-8")
    training = summary["regimes"]["training"]
    assert training["energy"]["temperature_max_celsius"] <= run.gpu["temperature_gpu_celsius"].max()
    assert training["energy"]["temperature_p99_celsius"] <= training["energy"]["temperature_max_celsius"]
    assert ">GPU temperature p99 / max<" in text and "GPU temperature max<" not in text
    # The fixture's workload process holds 6 GiB while the machine uses 24-41 GiB: the two are not confused.
    assert training["memory"]["workload_host_rss_peak_bytes"] == 6 * 2**30
    assert training["memory"]["host_peak_bytes"] > 20 * 2**30
    assert ">peak host memory of the workload (RSS)<" in text and "6.44 GB" in text


def test_joules_per_request_and_per_session_or_why_not(analysed, tmp_path):
    from wattledger.workloads.bench.analysis import summarize
    from wattledger.workloads.bench.economics import load_pricing

    _, summary, _ = analysed
    chat, agentic = summary["regimes"]["chat"], summary["regimes"]["agentic"]
    assert chat["joules_per_request"] > 0 and "joules_per_request" not in chat["not_available"]
    # The fixture's agentic summary reports no finished sessions: the summary says why there is no figure.
    assert agentic["joules_per_session"] is None
    assert agentic["not_available"]["joules_per_session"] == "the agentic workload's summary has no session counts"
    run, _ = make_run_dir(tmp_path / "run", regimes=("agentic",))
    events = [json.loads(line) for line in (run.run_dir / "events.jsonl").read_text().splitlines()]
    for event in events:
        if event["type"] == "phase_end" and event["phase"] == "agentic":
            event["workload_summary"].update(sessions_started=4, sessions_completed=0)
    (run.run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    from wattledger.workloads.bench.rundata import load_run

    reason = summarize(load_run(run.run_dir), load_pricing(), regimes=("agentic",))["regimes"]["agentic"]
    assert reason["not_available"]["joules_per_session"] == (
        "none of the 4 sessions finished within the 15 s phase: sessions outlast it (a longer --duration lets "
        "some finish)")
    for event in events:
        if event["type"] == "phase_end" and event["phase"] == "agentic":
            event["workload_summary"]["sessions_completed"] = 2
    (run.run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    done = summarize(load_run(run.run_dir), load_pricing(), regimes=("agentic",))["regimes"]["agentic"]
    assert done["joules_per_session"] == pytest.approx(done["energy"]["whole_phase_joules"] / 2)


def _cut_chat(run_dir: Path, after_s: float, reason: str = "SIGTERM") -> None:
    """Rewrite events.jsonl as ``wattledger bench`` writes it when a stop arrives ``after_s`` into chat: the
    workload returns early and phase_end says so (interrupted, why, when the stop was asked for)."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    starts = {}
    for event in events:
        if event["type"] == "phase_start":
            event["planned_seconds"] = 4.0 if event["phase"] == "idle" else 15.0
            starts[event["phase"]] = event["monotonic_ns"]
        if event["type"] == "phase_end" and event["phase"] == "chat":
            event.update(interrupted=True, stop_reason=reason,
                         stop_requested_ns=starts["chat"] + round(after_s * 1e9))
        elif event["type"] == "phase_end":
            event["interrupted"] = False
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_an_interrupted_phase_fails_phase_finished_and_says_how_long_it_ran(tmp_path):
    from wattledger.workloads.bench.analysis import summarize
    from wattledger.workloads.bench.economics import load_pricing
    from wattledger.workloads.bench.rundata import load_run

    made, _ = make_run_dir(tmp_path / "run")
    _cut_chat(made.run_dir, 12.2)
    summary = json.loads(json.dumps(summarize(load_run(made.run_dir), load_pricing()), default=lambda v: v.item()))
    validate(summary)
    chat = summary["regimes"]["chat"]
    assert chat["phase"] == {"planned_seconds": 15.0, "ran_seconds": pytest.approx(12.2), "finished": False,
                             "stopped_by": "SIGTERM"}
    check = next(c for c in chat["validity"] if c["check"] == "phase finished")
    assert check == {"check": "phase finished", "passed": False,
                     "detail": "interrupted (SIGTERM) after 12.2 s of the planned 15 s: figures cover only what was "
                               "measured"}
    for name in ("training", "agentic"):
        timing = summary["regimes"][name]["phase"]
        assert timing["finished"] and timing["stopped_by"] is None and timing["ran_seconds"] == pytest.approx(15.0)
        assert next(c for c in summary["regimes"][name]["validity"] if c["check"] == "phase finished")["passed"]
    assert summary["idle"]["phase"]["finished"] is True
    text = render_report(load_run(made.run_dir), summary, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "12.2 s of 15.0 s planned (cut short: SIGTERM)" in text


def test_a_killed_phase_is_unfinished_with_what_it_ran(tmp_path):
    from wattledger.workloads.bench.analysis import summarize
    from wattledger.workloads.bench.economics import load_pricing

    run, _ = make_run_dir(tmp_path / "run", partial=True)
    agentic = summarize(run, load_pricing())["regimes"]["agentic"]
    assert agentic["phase"]["finished"] is False and agentic["phase"]["stopped_by"] == "killed (no phase_end)"
    assert agentic["phase"]["ran_seconds"] == pytest.approx(0.6 * 15.0, abs=0.3)  # to its last sample
    assert not next(c for c in agentic["validity"] if c["check"] == "phase finished")["passed"]


# -- the closing table --------------------------------------------------------------------------------------

def _closing_table(summary: dict) -> str:
    import io

    from wattledger.workloads.bench import table as bench_table

    buffer = io.StringIO()
    console = bench_table.console(file=buffer)  # what `wattledger bench > log` gets: not a terminal
    bench_table.print_table(summary, console)
    return buffer.getvalue()


def test_closing_table_fits_80_columns_and_prints_every_failed_check_under_its_regime(tmp_path):
    from wattledger.workloads.bench.analysis import summarize
    from wattledger.workloads.bench.economics import load_pricing
    from wattledger.workloads.bench.rundata import load_run

    made, _ = make_run_dir(tmp_path / "run")
    _cut_chat(made.run_dir, 3.0)
    summary = json.loads(json.dumps(summarize(load_run(made.run_dir), load_pricing()), default=lambda v: v.item()))
    out = _closing_table(summary)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "…" not in out
    header = next(line for line in lines if line.lstrip().startswith("regime"))
    assert header.split() == ["regime", "util", "idle", "W", "tok/s", "J/tok", "J/dyn", "$/Mtok", "$/Mfull", "checks"]
    for name in summary["regimes"]:
        assert any(line.split()[:1] == [name] for line in lines), name
    flat = " ".join(out.split())
    assert "J/dyn = the same above the idle baseline" in flat and "$/Mfull = the same at full load" in flat
    scopes = [(n, r["validity"]) for n, r in summary["regimes"].items()] + [("run", summary["validity"])]
    failing = [(scope, [c for c in checks if not c["passed"]]) for scope, checks in scopes]
    failing = [(scope, failed) for scope, failed in failing if failed]
    assert "chat" in [scope for scope, _ in failing]  # the cut phase fails "phase finished"
    headings = [flat.index(f"{scope}: {len(failed)} of ") for scope, failed in failing]
    assert headings == sorted(headings)
    for (scope, failed), start, end in zip(failing, headings, headings[1:] + [len(flat)]):
        section = flat[start:end]
        for check in failed:
            assert f"- {check['check']}: {' '.join(check['detail'].split())}" in section, (scope, check)


# -- the typed results and the regime registry ----------------------------------------------------------------

def test_summary_json_is_the_typed_result_serialised_and_reads_back_to_itself(analysed, tmp_path):
    from wattledger.workloads.bench.analysis import analyse
    from wattledger.workloads.bench.economics import load_pricing
    from wattledger.workloads.bench.results import RunSummary

    run, summary, page = analysed
    typed = analyse(run, load_pricing())
    assert isinstance(typed, RunSummary) and list(typed.regimes) == ["training", "chat", "agentic"]
    written = json.dumps(typed.to_json(), indent=2, default=lambda v: v.item())
    assert written == json.dumps(summary, indent=2)  # the same keys in the same order
    back = RunSummary.from_json(json.loads(written))
    assert json.dumps(back.to_json(), indent=2) == written
    validate(back.to_json())
    # The report reads either form and draws the same page.
    text = render_report(run, back, tmp_path / "typed.html").read_text(encoding="utf-8")
    assert text == page.read_text(encoding="utf-8")


def test_regimes_come_in_registry_order_in_their_records_colours(tmp_path):
    from wattledger.workloads.bench.results import as_summary
    from wattledger.workloads.registry import COMMAND_COLOR, REGIMES

    run, summary = make_run_dir(tmp_path / "run", regimes=("agentic", "chat", "training"))
    summary["regimes"] = dict(reversed(list(summary["regimes"].items())))
    summary["regimes"]["warm-up"] = summary["regimes"]["chat"]  # a phase name the registry does not know
    shown = report._regime_names(as_summary(summary), report.phases_of(run))
    assert list(shown) == [*REGIMES, "warm-up"]
    assert {name: shown[name] for name in REGIMES} == {name: r.color for name, r in REGIMES.items()}
    assert shown["warm-up"] == report.OTHER_COLORS[0]
    # In a profiled command's run, the command's phase takes the command colour.
    profiled = report._regime_names(as_summary({**summary, "kind": "run"}), report.phases_of(run))
    assert profiled["warm-up"] == COMMAND_COLOR


def test_a_profiled_commands_phase_is_reported_like_a_regime(tmp_path):
    """A `wattledger run` workload has a name of its own, outside the registry: it is summarised, tabled and
    drawn like a regime, quoted for the kind it produced most of, without per-unit rows."""
    from wattledger.workloads.bench.analysis import summarize
    from wattledger.workloads.bench.economics import load_pricing
    from wattledger.workloads.bench.rundata import load_run

    made, _ = make_run_dir(tmp_path / "run", regimes=("chat",))
    for name in ("events.jsonl", "samples.jsonl", "spans.jsonl"):  # the chat phase, renamed
        path = made.run_dir / name
        path.write_text(path.read_text().replace('"chat', '"vllm-serve'))
    run = load_run(made.run_dir)
    summary = json.loads(json.dumps(summarize(run, load_pricing(), kind="run", regimes=("vllm-serve",)),
                                    default=lambda v: v.item()))
    validate(summary)
    served = summary["regimes"]["vllm-serve"]
    assert served["main_token_kind"] == "prompt" and served["tokens"]["prompt"] > served["tokens"]["generated"]
    assert served["joules_per_request"] is None and "joules_per_request" not in served["not_available"]
    text = render_report(run, summary, tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(image_sources(text)) == len(FIGURE_FILES)
    assert "vllm-serve (prompt tokens)" in text and "J/request" not in text
    assert "vllm-serve" in _closing_table(summary)


# -- issue 14: regimes on a simulated device's time ---------------------------------------------------------

SIMULATED_CALIBRATION = {"name": "H100 SXM", "mock_preset": "h100-sxm-80gb", "compute_efficiency": 0.6,
                         "bandwidth_efficiency": 0.66, "overhead_s": 2e-4, "peak_bf16_flops": 989e12,
                         "hbm_bytes_per_s": 3.35e12, "power_limit_watts": 700.0, "idle_power_watts": 70.0,
                         "sources": {"fit": "ML.ENERGY leaderboard, Llama-3.1-8B on one H100 <vLLM>"}}


def _simulated_timing(run_dir: Path, lag_seconds: dict[str, float]) -> None:
    """Rewrite events.jsonl as a bench on simulated timing writes it: each regime's workload summary carries
    ``simulated_device`` (training on 1b: 8b does not fit), and the mock's delay is recorded (1 s)."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    for event in events:
        if event["type"] == "phase_end" and event["phase"] in lag_seconds:
            training = event["phase"] == "training"
            event["mock_lag_seconds"] = 1.0
            event["workload_summary"] = dict(event.get("workload_summary") or {}, simulated_device={
                "device": "H100 SXM", "timing_preset": "1b" if training else "8b", "computed_preset": "tiny",
                "timing_note": "8b training does not fit one H100 SXM" if training else None,
                "max_lag_seconds": lag_seconds[event["phase"]], "lagging_seconds": 0.0, "device_seconds": 9.0,
                "device_busy_seconds": 9.0, "calibration": SIMULATED_CALIBRATION})
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_simulated_timing_is_in_the_summary_the_checks_the_report_and_the_table(tmp_path):
    from wattledger.workloads.bench.analysis import KEPT_UP_CHECK, summarize
    from wattledger.workloads.bench.economics import load_pricing
    from wattledger.workloads.bench.rundata import load_run

    made, _ = make_run_dir(tmp_path / "run")
    _simulated_timing(made.run_dir, {"training": 0.02, "chat": 0.01, "agentic": 0.7})
    run = load_run(made.run_dir)
    summary = json.loads(json.dumps(summarize(run, load_pricing()), default=lambda v: v.item()))
    validate(summary)
    checks = {name: {c["check"]: c for c in r["validity"]} for name, r in summary["regimes"].items()}
    assert checks["training"][KEPT_UP_CHECK]["passed"] and checks["chat"][KEPT_UP_CHECK]["passed"]
    late = checks["agentic"][KEPT_UP_CHECK]
    assert not late["passed"] and "0.700 s behind" in late["detail"] and "1 s delay" in late["detail"]
    assert summary["regimes"]["training"]["simulated_device"]["timing_preset"] == "1b"

    text = render_report(run, summary, tmp_path / "report.html").read_text(encoding="utf-8")
    note = text.split("id='simulated-device'", 1)[1].split("</div>", 1)[0]
    assert "Simulated device (SIMULATED)" in note and "H100 SXM" in note
    assert "timing model 1b (8b training does not fit one H100 SXM), computed model tiny" in note
    assert html.escape("ML.ENERGY leaderboard, Llama-3.1-8B on one H100 <vLLM>") in note
    assert "compute efficiency (of dense bf16 peak) 0.6" in note

    out = _closing_table(summary)
    assert max(len(line) for line in out.splitlines()) <= 80
    flat = " ".join(out.split())
    assert "SIMULATED timing: H100 SXM device time of 8b work (training: 1b), tiny computed on the CPU" in flat
    assert f"- {KEPT_UP_CHECK}: {' '.join(late['detail'].split())}" in flat  # the failure is shown, not hidden


def test_without_simulated_timing_there_is_no_note_and_no_check(full):
    _, summary, _, text = full
    assert "simulated-device" not in text
    assert all("simulated_device" not in r for r in summary["regimes"].values())
