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
from wattledger.workloads.report import FIGURE_FILES, render_report

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "summary.schema.json").read_text(encoding="utf-8"))
FIGURE_IDS = ("fig-utilization", "fig-power", "fig-memory", "fig-joules_per_token", "fig-cost")
SECTIONS = ("id=\"regimes\"", "id=\"gpus\"", "id=\"pricing\"", "id=\"validity\"")


def validate(summary: dict) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(summary)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A complete simulated bench run and its rendered report."""
    run, summary = make_run_dir(tmp_path_factory.mktemp("full") / "run")
    page = render_report(run, summary, run.run_dir / "report.html")
    return run, summary, page, page.read_text(encoding="utf-8")


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

def test_report_renders_in_headless_chromium(full, tmp_path):
    from browser import check_page, require_chromium

    chromium = require_chromium()
    _, _, page, _ = full
    result = check_page(page, tmp_path / "report.png", chromium=chromium)
    assert result.title.startswith("SIMULATED (mock GPU)")
    assert len(result.images) == len(FIGURE_FILES)
    assert result.all_images_loaded, result.images
    assert result.severe == []
    assert result.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
    analysis = pytest.importorskip("wattledger.workloads.analysis")
    economics = pytest.importorskip("wattledger.workloads.economics")
    run, _ = make_run_dir(tmp_path / "run", partial=True)
    summary = json.loads(json.dumps(analysis.summarize(run, economics.load_pricing()),
                                    default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    validate(summary)
    text = render_report(run, summary, tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(image_sources(text)) == len(FIGURE_FILES)
    assert "PARTIAL" in text and "SIMULATED" in text and "2024-06-01 09:30:00 UTC" in text
    for check in summary["validity"]:
        assert html.escape(check["detail"]) in text
