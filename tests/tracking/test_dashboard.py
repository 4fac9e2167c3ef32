"""The offline dashboard page and the figures behind it."""

from __future__ import annotations

import json
import math
import re

import pytest

from dmdopt.tracking import figures, render_dashboard, write_dashboard
from dmdopt.tracking.dashboard import PLOT_IDS


def _figures(html: str) -> dict:
    """The figure JSON the page hands to Plotly.newPlot."""
    match = re.search(r'<script type="application/json" id="dmdopt-figures">(.*?)</script>',
                      html, re.S)
    assert match, "figure data missing"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def page(make_summary) -> str:
    return render_dashboard(make_summary("offline"))


def test_page_is_self_contained(page, find_external_refs):
    assert find_external_refs(page) == []
    assert page.count("<script") == 3  # plotly.js (inlined once), the data, the bootstrap
    assert "Plotly.newPlot" in page and len(page) > 1_000_000
    assert not re.search(r"@import|fonts\.googleapis|<link", page)


def test_every_plot_has_a_div_and_a_figure(page):
    for pid in PLOT_IDS:
        assert f'<div class="plot" id="{pid}"></div>' in page
    figs = _figures(page)
    assert set(figs) == set(PLOT_IDS)
    pareto_names = [t.get("name", "") for t in figs["pareto"]["data"]]
    assert "reference (plain training)" in pareto_names
    assert any(n.startswith("recommended (trial 0") for n in pareto_names)
    assert "<title>dmdopt study: offline</title>" in page
    assert "3 complete, 1 failed" in page and "trial #0: window=20" in page


def test_inf_horizon_sits_at_the_right_edge(page):
    xs, axis = figures.knob_positions([100.0, "inf", 10.0, 1000], "horizon")
    assert xs == [100.0, 10000.0, 10.0, 1000.0]
    assert axis["type"] == "log" and axis["ticktext"][-1] == "inf"
    assert axis["tickvals"][-1] == 10000.0 and axis["range"][1] > math.log10(10000.0)
    only_inf, axis = figures.knob_positions(["inf", float("inf")], "horizon")
    assert only_inf[0] == only_inf[1] and axis["ticktext"] == ["inf"]
    layout = _figures(page)["knob-horizon"]["layout"]
    assert layout["xaxis"]["ticktext"][-1] == "inf" and layout["xaxis"]["type"] == "log"


def test_study_without_complete_trials(make_summary, tmp_path, find_external_refs):
    summary = make_summary("empty", complete=False)
    path = write_dashboard(summary, tmp_path / "sub" / "dashboard.html")
    html = path.read_text()
    assert find_external_refs(html) == []
    assert "0 complete, 1 failed" in html and "no qualifying trial yet" in html
    figs = _figures(html)
    assert set(figs) == set(PLOT_IDS)
    for pid in PLOT_IDS:
        notes = [a["text"] for a in figs[pid]["layout"].get("annotations", [])]
        assert any(n.startswith("no ") for n in notes), pid
    assert [p.name for p in path.parent.iterdir()] == ["dashboard.html"]  # no temp left over
    assert figures.pareto_csv(summary).splitlines() == [",".join(figures.CSV_COLUMNS)]


def test_png_is_written(make_summary, tmp_path):
    path = figures.write_pareto_png(make_summary("png"), tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_first_passage_speedup_shown_only_when_it_differs(make_summary, page):
    assert "speedup 2.00x" in page and "first passage" not in page  # no stored first passage
    summary = make_summary("first-passage")
    summary["reference"]["first_passage_bpe"] = 480.0  # the reference touched its error early
    html = render_dashboard(summary)
    assert "speedup 2.00x (against the reference's first passage 1.60x)" in html


def test_unwritable_output_is_one_line_exit_2(make_summary, tmp_path, monkeypatch, capsys):
    """`dmdopt dashboard -o` under a regular file: one line naming the path, exit 2."""
    from dmdopt import cli

    monkeypatch.setattr(cli, "_summary", lambda args: ("s", None, make_summary("s")))
    blocker = tmp_path / "tuned.toml"
    blocker.write_text("a file, not a folder\n")
    assert cli.main(["dashboard", "s", "-o", str(blocker / "q.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--output" in err and str(blocker / "q.html") in err
