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


def test_a_study_name_with_dollar_signs_is_text_in_the_png(make_summary, tmp_path):
    """matplotlib read "$_$" as a formula that failed to parse: no artifacts, parent RUNNING."""
    for name in ("a$_$b", "run$^$", "cost$x$"):
        path = figures.write_pareto_png(make_summary(name), tmp_path / "p.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_knob_plot_draws_a_repeated_point_once_with_the_front_on_top(make_summary):
    """A repeat of a front trial (its settings: its result) was drawn grey over the blue one."""
    summary = make_summary("repeat")
    summary["trials"][3]["user_attrs"]["duplicate_of"] = 0
    summary["trials"][3]["params"] = dict(summary["trials"][0]["params"])
    summary["trials"][3]["values"] = list(summary["trials"][0]["values"])
    summary["pareto"] = [1, 0]
    fig = figures.knob_figure(summary, "window")
    left = [t for t in fig.data if t.xaxis in (None, "x")]
    assert [t.name for t in left] == ["Pareto"]  # trial 3 was the only "other" point
    assert sorted(text.split("<br>")[0] for text in left[0].hovertext) == ["trial 0", "trial 1"]
    summary["trials"][3]["user_attrs"].pop("duplicate_of")  # a distinct trial is drawn, under
    names = [t.name for t in figures.knob_figure(summary, "window").data if t.xaxis in (None, "x")]
    assert names == ["other trials", "Pareto"]


def test_cost_to_target_speed_ups_are_of_the_cost_shown_beside_them(make_summary):
    """The point's cost there is the spend to the study's target; the recorded speed-up divides
    by the cost to the reference's error: 600 / 400 was shown as 2.4."""
    from dmdopt.pareto import pareto_rows

    summary = make_summary("c2t")
    for trial in summary["trials"][:4]:  # the reference's error came earlier than the target
        if trial["values"]:
            trial["user_attrs"]["speedup"] = 600.0 / (0.8 * trial["values"][0])
    multi = {r["trial"]: r["speedup"] for r in pareto_rows(summary)}
    assert multi[0] == pytest.approx(2.5)  # two objectives: the recorded ratio is the point's
    summary["mode"] = "cost_to_target"
    rows = {r["trial"]: r for r in pareto_rows(summary)}
    for number in (0, 1, 3):
        assert rows[number]["speedup"] == pytest.approx(600.0 / rows[number]["cost_bpe"])


def test_a_front_point_that_never_reached_the_reference_is_marked(make_summary, tmp_path,
                                                                   monkeypatch, capsys):
    """Its cost is its whole spend, not a cost to the reference's error, and the table said
    "cost = bpe to reach the reference's error" of every row without a mark."""
    from dmdopt import cli
    from dmdopt.pareto import pareto_rows

    summary = make_summary("nr")
    summary["trials"][1]["user_attrs"]["reached_reference"] = False
    rows = {r["trial"]: r for r in pareto_rows(summary)}
    assert rows[1]["reached_reference"] is False and rows["reference"]["reached_reference"]
    assert rows[0]["reached_reference"] is not False
    monkeypatch.setattr(cli, "_load_study", lambda args: ("nr", "sqlite://", type(
        "S", (), {"directions": [1, 1]})()))
    monkeypatch.setattr("dmdopt.search.summary.summarize", lambda *a, **k: summary)
    assert cli.main(["study", "pareto", "nr"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "never reached the reference's error" in lines["1"]
    assert "never reached" not in lines["0"]
