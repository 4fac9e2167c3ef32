"""Figures of a study summary (CONTRACT.md): Pareto front, knobs, hypervolume, learning curves.

Plotly figures feed both the MLflow artifacts and the offline dashboard, so one builder per
plot keeps the two views identical. Only plain summary dicts come in: no optuna, no mlflow.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dmdopt.pareto import (
    CSV_COLUMNS,
    as_float,
    complete_trials,
    pareto_rows,
    pareto_trials,
    recommended_number,
    reference_point,
)

_REF_COLOR = "#d62728"
_FRONT_COLOR = "#1f77b4"
_REC_COLOR = "#2ca02c"
_OTHER_COLOR = "#9a9a9a"
_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
           "font": {"family": "system-ui, -apple-system, 'Segoe UI', sans-serif", "size": 12}}


def _hover(trial: dict) -> str:
    params = trial.get("params") or {}
    knobs = "<br>".join(f"{k}={params[k]}" for k in params)
    cost, err = trial["values"][:2]
    return f"trial {trial['number']}<br>cost={cost:.4g}<br>val_rel_l2={err:.4g}<br>{knobs}"


def _empty(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font={"size": 16, "color": "#666"})
    return fig


def pareto_csv(summary: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in pareto_rows(summary):
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
    return buf.getvalue()


# ---------------------------------------------------------------- plotly figures
def pareto_figure(summary: dict) -> go.Figure:
    """All complete trials, the front as a staircase, the reference and the recommendation."""
    fig = go.Figure()
    fig.update_layout(**_LAYOUT, title="Pareto front: cost vs validation error",
                      xaxis_title="cost (backprop-equivalent steps)",
                      yaxis_title="validation relative L2 error", yaxis_type="log",
                      legend={"orientation": "h", "y": -0.18})
    done = complete_trials(summary)
    front = pareto_trials(summary)
    ref = reference_point(summary)
    if not done and ref is None:
        return _empty(fig, "no complete trials yet")
    front_numbers = {t["number"] for t in front}
    others = [t for t in done if t["number"] not in front_numbers]
    if others:
        fig.add_trace(go.Scatter(
            x=[t["values"][0] for t in others], y=[t["values"][1] for t in others],
            mode="markers", name="trials", marker={"color": _OTHER_COLOR, "size": 7},
            hovertext=[_hover(t) for t in others], hoverinfo="text"))
    if front:
        fig.add_trace(go.Scatter(
            x=[t["values"][0] for t in front], y=[t["values"][1] for t in front],
            mode="lines+markers", line={"shape": "hv", "color": _FRONT_COLOR},
            marker={"size": 9}, name="Pareto front",
            hovertext=[_hover(t) for t in front], hoverinfo="text"))
    if ref is not None:
        fig.add_trace(go.Scatter(
            x=[ref[0]], y=[ref[1]], mode="markers", name="reference (plain training)",
            marker={"symbol": "star", "size": 16, "color": _REF_COLOR},
            hovertext=[f"reference<br>cost={ref[0]:.4g}<br>val_rel_l2={ref[1]:.4g}"],
            hoverinfo="text"))
    rec = recommended_number(summary)
    rec_trial = next((t for t in done if t["number"] == rec), None)
    if rec_trial is not None:
        policy = (summary.get("recommended") or {}).get("policy", "")
        fig.add_trace(go.Scatter(
            x=[rec_trial["values"][0]], y=[rec_trial["values"][1]], mode="markers",
            name=f"recommended (trial {rec}{', ' + policy if policy else ''})",
            marker={"symbol": "circle-open", "size": 20, "color": _REC_COLOR,
                    "line": {"width": 3}},
            hovertext=[_hover(rec_trial)], hoverinfo="text"))
    if not done:
        _empty(fig, "no complete trials yet")
    return fig


def knob_positions(values: list[Any], knob: str) -> tuple[list[Any], dict]:
    """x positions and x-axis settings for one knob.

    Horizons go on a log axis with `inf` placed one decade past the largest finite horizon and
    labelled "inf"; other numeric knobs are linear; non-numeric values become categories.
    """
    nums = [as_float(v) for v in values]
    if any(n is None for n in nums):
        return [str(v) for v in values], {"type": "category", "title": knob}
    if knob != "horizon":
        return nums, {"type": "linear", "title": knob}
    finite = [n for n in nums if math.isfinite(n) and n > 0]
    lo = math.floor(math.log10(min(finite))) if finite else 0
    hi = math.floor(math.log10(max(finite))) + 1 if finite else 1
    inf_at = 10.0 ** hi
    xs = [inf_at if math.isinf(n) and n > 0 else (n if n > 0 else None) for n in nums]
    ticks = [10.0 ** k for k in range(lo, hi)] if finite else []
    axis = {"type": "log", "title": "horizon (steps; inf = converged state)",
            "tickvals": ticks + [inf_at],
            "ticktext": [f"{t:g}" for t in ticks] + ["inf"],
            "range": [lo - 0.15, hi + 0.15]}
    return xs, axis


def knob_figure(summary: dict, knob: str) -> go.Figure:
    """Cost (left) and validation error (right) against one DMD knob."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=(f"cost vs {knob}", f"validation error vs {knob}"))
    fig.update_layout(**_LAYOUT, showlegend=True, legend={"orientation": "h", "y": -0.22})
    done = [t for t in complete_trials(summary) if knob in (t.get("params") or {})]
    # a repeat of a plotted trial is the same point: drawn once (its grey copy hid the front)
    shown = {t["number"] for t in done}
    done = [t for t in done if (t.get("user_attrs") or {}).get("duplicate_of") not in shown]
    fig.update_yaxes(title_text="cost (backprop-eq. steps)", row=1, col=1)
    fig.update_yaxes(title_text="val rel. L2", type="log", row=1, col=2)
    if not done:
        return _empty(fig, f"no complete trials with {knob} yet")
    xs, axis = knob_positions([t["params"][knob] for t in done], knob)
    title = axis.pop("title")
    front = set(summary.get("pareto") or [])
    groups = (("other trials", _OTHER_COLOR, False), ("Pareto", _FRONT_COLOR, True))  # front on top
    for name, color, on_front in groups:
        idx = [i for i, t in enumerate(done) if (t["number"] in front) == on_front
               and xs[i] is not None]
        if not idx:
            continue
        for col, k in ((1, 0), (2, 1)):
            fig.add_trace(go.Scatter(
                x=[xs[i] for i in idx], y=[done[i]["values"][k] for i in idx], mode="markers",
                name=name, legendgroup=name, showlegend=col == 1,
                marker={"color": color, "size": 8},
                hovertext=[_hover(done[i]) for i in idx], hoverinfo="text"), row=1, col=col)
    ref = reference_point(summary)
    if ref is not None:
        line = {"color": _REF_COLOR, "dash": "dash"}
        fig.add_hline(y=ref[0], line=line, row=1, col=1, annotation_text="reference",
                      annotation_font_color=_REF_COLOR)
        # no annotation on the log axis: plotly places it in log10 units, stretching the range
        fig.add_hline(y=ref[1], line=line, row=1, col=2)
    fig.update_xaxes(title_text=title, **axis)
    return fig


def hypervolume_figure(summary: dict) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(**_LAYOUT, title="Hypervolume after each completed trial",
                      xaxis_title="completed trials", yaxis_title="hypervolume")
    hist = summary.get("hypervolume_history") or []
    if not hist:
        return _empty(fig, "no completed trials yet")
    fig.add_trace(go.Scatter(x=[h[0] for h in hist], y=[h[1] for h in hist],
                             mode="lines+markers", name="hypervolume",
                             line={"color": _FRONT_COLOR}))
    fig.update_xaxes(tick0=1, dtick=max(1, math.ceil(len(hist) / 10)))  # whole trial counts
    return fig


def curves_figure(summary: dict) -> go.Figure:
    """Learning curves (val error vs cost) of the Pareto trials and the reference."""
    fig = go.Figure()
    fig.update_layout(**_LAYOUT, title="Learning curves: Pareto trials and reference",
                      xaxis_title="cost (backprop-equivalent steps)",
                      yaxis_title="validation relative L2 error", yaxis_type="log")
    drawn = 0
    ref = summary.get("reference") or {}
    if ref.get("curve"):
        fig.add_trace(go.Scatter(x=[p[0] for p in ref["curve"]], y=[p[1] for p in ref["curve"]],
                                 mode="lines", name="reference",
                                 line={"color": _REF_COLOR, "width": 3, "dash": "dash"}))
        drawn += 1
    rec = recommended_number(summary)
    for t in pareto_trials(summary):
        curve = (t.get("user_attrs") or {}).get("curve") or []
        if not curve:
            continue
        fig.add_trace(go.Scatter(
            x=[p[0] for p in curve], y=[p[1] for p in curve], mode="lines",
            name=f"trial {t['number']}" + (" (recommended)" if t["number"] == rec else ""),
            line={"width": 3 if t["number"] == rec else 1.5}))
        drawn += 1
    if not drawn:
        _empty(fig, "no learning curves yet")
    return fig


def pareto_html(summary: dict) -> str:
    """Stand-alone interactive Pareto page; plotly.js inlined so it opens offline."""
    return pareto_figure(summary).to_html(include_plotlyjs=True, full_html=True,
                                          config={"displaylogo": False})


# ---------------------------------------------------------------- static PNG
def write_pareto_png(summary: dict, path: str | Path) -> Path:
    """The Pareto plot as a PNG (matplotlib, Agg): readable without a browser."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)  # Agg canvas on this figure only: no pyplot, no global backend switch
    ax = fig.add_subplot()
    done = complete_trials(summary)
    front = pareto_trials(summary)
    ref = reference_point(summary)
    if done:
        ax.scatter([t["values"][0] for t in done], [t["values"][1] for t in done],
                   c=_OTHER_COLOR, s=18, label="trials")
    if front:
        ax.step([t["values"][0] for t in front], [t["values"][1] for t in front], where="post",
                color=_FRONT_COLOR, marker="o", label="Pareto front")
    if ref is not None:
        ax.scatter([ref[0]], [ref[1]], marker="*", s=220, c=_REF_COLOR,
                   label="reference (plain training)", zorder=5)
    rec = next((t for t in done if t["number"] == recommended_number(summary)), None)
    if rec is not None:
        ax.scatter([rec["values"][0]], [rec["values"][1]], s=260, facecolors="none",
                   edgecolors=_REC_COLOR, linewidths=2.5,
                   label=f"recommended (trial {rec['number']})", zorder=6)
    if done or ref is not None:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no complete trials yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("cost (backprop-equivalent steps)")
    ax.set_ylabel("validation relative L2 error")
    # parse_math=False: a study name is text; "a$_$b" was a formula that failed to parse
    ax.set_title(f"{summary.get('study_name', 'study')}: Pareto front", parse_math=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
