"""The offline study dashboard: one self-contained HTML page from a study summary.

The page layout lives in the shipped template (`dashboards/study.html`); this module only
builds the figures (figures.py) and the summary table and inlines plotly.js once, so the page
opens from a laptop, an MLflow artifact or an air-gapped cluster with no network.
"""

from __future__ import annotations

import html
import json
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path
from string import Template

import plotly.io as pio
from plotly.offline import get_plotlyjs

from dmdopt import pareto
from dmdopt._util import atomic_file, mask_url, versions
from dmdopt.tracking import figures

TEMPLATE_NAME = "study.html"
PLOT_IDS = ("pareto", "knob-window", "knob-rank", "knob-horizon", "hypervolume", "curves")


@cache
def _template() -> Template:
    """The shipped page definition; the repo folder when dmdopt.dashboards isn't mapped."""
    try:
        text = resources.files("dmdopt.dashboards").joinpath(TEMPLATE_NAME).read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        path = Path(__file__).resolve().parents[2] / "dashboards" / TEMPLATE_NAME
        text = path.read_text("utf-8")
    missing = [i for i in PLOT_IDS if f'id="{i}"' not in text]
    if missing:
        raise RuntimeError(f"dashboard template {TEMPLATE_NAME} lacks plot divs {missing}")
    return Template(text)


def build_figures(summary: dict) -> dict:
    """Plot id -> plotly figure, one per `<div class="plot">` of the page."""
    figs = {"pareto": figures.pareto_figure(summary)}
    for knob in pareto.KNOBS:
        figs[f"knob-{knob}"] = figures.knob_figure(summary, knob)
    figs["hypervolume"] = figures.hypervolume_figure(summary)
    figs["curves"] = figures.curves_figure(summary)
    return figs


def _fmt(value: object) -> str:
    num = pareto.as_float(value)
    if num is not None and not isinstance(value, int):
        return f"{num:.4g}"
    return html.escape(str(value))


def _summary_table(summary: dict) -> str:
    """Study, trial counts, reference and recommended settings as a small HTML table."""
    trials = summary.get("trials") or []
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.get("state", "?")] = counts.get(t.get("state", "?"), 0) + 1
    rows = [("study", html.escape(str(summary.get("study_name", "")))),
            ("storage", html.escape(str(mask_url(summary.get("storage")) or "-"))),
            ("trials", f"{len(trials)} total: {counts.get('COMPLETE', 0)} complete, "
                       f"{counts.get('FAIL', 0)} failed, {counts.get('PRUNED', 0)} pruned, "
                       f"{counts.get('RUNNING', 0) + counts.get('WAITING', 0)} running/waiting"),
            ("Pareto front", ", ".join(f"#{n}" for n in summary.get("pareto") or []) or "-")]
    ref = pareto.reference_point(summary)
    rows.append(("reference (plain training)",
                 f"cost {_fmt(ref[0])} &middot; val error {_fmt(ref[1])}" if ref else "-"))
    rec_no = pareto.recommended_number(summary)
    rec = next((t for t in pareto.complete_trials(summary) if t["number"] == rec_no), None)
    if rec is None:
        rows.append(("recommended", "- (no qualifying trial yet)"))
    else:
        policy = (summary.get("recommended") or {}).get("policy", "")
        knobs = ", ".join(f"{html.escape(str(k))}={_fmt(v)}"
                          for k, v in (rec.get("params") or {}).items())
        sp, fp = pareto.speedup(summary, rec), pareto.speedup_first_passage(summary, rec)
        rows.append((f"recommended ({html.escape(str(policy))})",
                     f"trial #{rec_no}: {knobs} &middot; cost {_fmt(rec['values'][0])} &middot; "
                     f"val error {_fmt(rec['values'][1])}"
                     + (f" &middot; speedup {sp:.2f}x" if sp else "")
                     # shown only when the reference's noisy end makes the two differ
                     + (f" (against the reference's first passage {fp:.2f}x)"
                        if sp and fp and abs(fp - sp) > 5e-3 else "")))
    body = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="summary">\n{body}\n</table>'


def _figures_json(summary: dict) -> str:
    """All figures as JSON safe to embed in a <script> element."""
    parts = [f"{json.dumps(pid)}:{pio.to_json(fig, validate=False)}"
             for pid, fig in build_figures(summary).items()]
    text = "{" + ",".join(parts) + "}"
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_dashboard(summary: dict) -> str:
    """The whole page as one HTML string (plotly.js inlined once, works offline)."""
    title = html.escape(str(summary.get("study_name", "study")))
    return _template().substitute(
        title=title,
        dmdopt_version=html.escape(versions().get("dmdopt", "dev")),
        generated=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        # the study's objectives (one in cost_to_target mode), not the columns of its points
        metric_names=html.escape(", ".join(summary.get("objectives")
                                           or summary.get("metric_names") or [])),
        summary_table=_summary_table(summary),
        plotlyjs=get_plotlyjs(),
        figures_json=_figures_json(summary),
    )


def write_dashboard(summary: dict, path: str | Path) -> Path:
    """Render and write atomically (temp file + rename): readers never see half a page."""
    path = Path(path)
    text = render_dashboard(summary)
    with atomic_file(path) as fh:
        fh.write(text)
    return path
