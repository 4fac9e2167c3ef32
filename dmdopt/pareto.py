"""The Pareto table of a study summary: plain data in, plain rows out.

One builder serves `dmdopt study pareto` (text, JSON, CSV), the CSV logged to the study's
MLflow parent run and the dashboard, so they all show the same rows under the same keys.
It reads the summary dict of `dmdopt.search.summary` (see `search/CONTRACT.md`) and imports
neither optuna nor mlflow nor plotly.
"""

from __future__ import annotations

import math
from typing import Any

KNOBS = ("window", "rank", "horizon")
CSV_COLUMNS = ("trial", "cost_bpe", "val_rel_l2", "speedup", "speedup_first_passage", "window",
               "rank", "horizon", "is_reference", "is_recommended", "reached_reference")
# reached_reference False: the trial never reached the reference's error, so its cost is its
# whole spend, not a cost to that error (None: a study stored before the flag existed)


# ---------------------------------------------------------------- summary access
def as_float(value: Any) -> float | None:
    """A number from a summary field ("inf" strings included); None for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def complete_trials(summary: dict) -> list[dict]:
    """COMPLETE trials with two finite objective values, in trial order."""
    out = []
    for t in summary.get("trials") or []:
        values = t.get("values")
        if t.get("state") == "COMPLETE" and values and len(values) >= 2 and all(
                (v := as_float(x)) is not None and math.isfinite(v) for x in values[:2]):
            out.append(t)
    return sorted(out, key=lambda t: t["number"])


def pareto_trials(summary: dict) -> list[dict]:
    """The Pareto trials in the summary's order (sorted by cost)."""
    by_number = {t["number"]: t for t in complete_trials(summary)}
    return [by_number[n] for n in summary.get("pareto") or [] if n in by_number]


def missed_target(trial: dict) -> bool:
    """Whether a cost_to_target trial (a summary row) never reached its target: its objective
    is its spend raised by how far it ended from it (`cost_total` x (1 + error/target)), so it
    ranks below every hit; a hit's objective is its spend."""
    spent = (trial.get("values") or [None])[0]
    objective = trial.get("objective")
    return objective is not None and spent is not None and objective > spent


def recommended_number(summary: dict) -> int | None:
    rec = summary.get("recommended")
    return rec.get("number") if isinstance(rec, dict) else None


def _to_target(summary: dict) -> dict | None:
    """Plain training's point at a cost_to_target study's own target (CONTRACT.md), if any."""
    to_target = (summary.get("reference") or {}).get("to_target")
    return to_target if summary.get("mode") == "cost_to_target" and isinstance(to_target, dict) else None


def reference_point(summary: dict) -> tuple[float, float] | None:
    """(cost_bpe, val_rel_l2) of plain training, when the summary has it. In a cost_to_target
    study with its own target, the point where plain training first reached that target
    (`to_target`, CONTRACT.md): the cost the trials' costs compare with."""
    ref = _to_target(summary) or summary.get("reference") or {}
    cost, err = as_float(ref.get("cost_bpe")), as_float(ref.get("val_rel_l2"))
    return (cost, err) if cost is not None and err is not None else None


def _recorded(summary: dict, trial: dict, key: str) -> float | None:
    """A trial's recorded ratio, which divides by its cost to the reference's error: that is
    its point's cost in a two-objective study. A cost_to_target point's cost is its spend to
    the study's target (see CONTRACT.md), so there the ratio is recomputed from the point."""
    if summary.get("mode") == "cost_to_target":
        return None
    return as_float((trial.get("user_attrs") or {}).get(key))


def speedup(summary: dict, trial: dict) -> float | None:
    """The trial's recorded speedup, else reference cost / the point's cost."""
    attr = _recorded(summary, trial, "speedup")
    if attr is not None:
        return attr
    ref = reference_point(summary)
    cost = as_float((trial.get("values") or [None])[0])
    return ref[0] / cost if ref and cost else None


def speedup_first_passage(summary: dict, trial: dict) -> float | None:
    """The trial's recorded first-passage speedup, else the reference's first passage / trial cost.

    The reference's curve may touch its final error before its budget ends (a noisy end); the
    plain `speedup` then credits DMD with that noise, this one does not. Studies made before
    the reference stored its first passage fall back to its budget, i.e. to `speedup`.
    """
    attr = _recorded(summary, trial, "speedup_first_passage")
    if attr is not None:
        return attr
    if _to_target(summary) is not None:
        return speedup(summary, trial)  # its cost to the target is a first passage already
    ref = summary.get("reference") or {}
    first = as_float(ref.get("first_passage_bpe"))
    cost = as_float((trial.get("values") or [None])[0])
    return first / cost if first and cost else speedup(summary, trial)


# ---------------------------------------------------------------- the Pareto table
def pareto_rows(summary: dict) -> list[dict]:
    """The reference row first, then the Pareto trials by cost, marked as CSV_COLUMNS says."""
    rows = []
    ref = reference_point(summary)
    if ref is not None:
        rows.append({"trial": "reference", "cost_bpe": ref[0], "val_rel_l2": ref[1],
                     "speedup": 1.0, "speedup_first_passage": 1.0,
                     "window": None, "rank": None, "horizon": None,
                     "is_reference": True, "is_recommended": False, "reached_reference": True})
    rec = recommended_number(summary)
    for t in pareto_trials(summary):
        params = t.get("params") or {}
        rows.append({"trial": t["number"], "cost_bpe": t["values"][0],
                     "val_rel_l2": t["values"][1], "speedup": speedup(summary, t),
                     "speedup_first_passage": speedup_first_passage(summary, t),
                     **{k: params.get(k) for k in KNOBS},
                     "is_reference": False, "is_recommended": t["number"] == rec,
                     "reached_reference": (t.get("user_attrs") or {}).get("reached_reference")})
    return rows
