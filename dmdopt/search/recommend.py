"""Pick one trial from a (cost, error) trade-off: the settings a user should take home.

Pure functions on plain dicts (no optuna), so the summary, the CLI and export share one rule.
Both objectives are minimised: `cost_bpe` (backprop-equivalent cost to reach the reference's
error) and `val_rel_l2` (validation error at the end of the budget).

Policies
--------
knee (default)
    Normalise both objectives to [0, 1] over the non-dominated front (cheapest point at
    (0, 1), most accurate at (1, 0)) and take the point farthest *below* the straight line
    joining those two extremes, i.e. the largest `1 - c' - e'`. That is where the front bends:
    moving away from it buys little of one objective for a lot of the other. A front of one
    point gives that point; a front of two points (or any front with no point below the line)
    gives the most accurate extreme by the tie-break below: when nothing bends, accuracy wins.
max-error-ratio=R
    The cheapest point whose error is at most R x the reference's error ("as good as plain
    training, within R, for the least cost").
budget=C
    The most accurate point that costs at most C backprop-equivalent steps, in the front's
    cost (a two-objective study's: the cost to reach the reference's error; the trial's whole
    spend is `cost_total`, and it ends more accurate than that error).

Every policy chooses among the front's points that plain training (the reference) does not
weakly dominate: a point that costs at least the reference's budget (or its first passage to
its own final error, when its curve got there earlier) and ends no more accurate (by more
than `ERROR_RTOL` relative, which rounding at another thread count does not reach) is no reason
to use DMD (a trial that never reaches the reference's error is charged its
whole spend, so such points do reach the front).

Ties are broken deterministically: knee -> lower error, then lower cost, then lower trial
number; max-error-ratio -> lower error, then lower number; budget -> lower cost, then lower
number. When no point qualifies (or there are no points) a `UserError` says why.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from dmdopt.errors import UserError

POLICIES = ("knee", "max-error-ratio", "budget")
_NEEDS_VALUE = {"max-error-ratio": "a ratio R > 0 (e.g. 1.05)",
                "budget": "a cost C > 0 in backprop-equivalent steps (e.g. 300)"}


def _is_number(value: Any) -> bool:
    """Any real number (numpy's scalars too: a front built from a DataFrame has them)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite_points(points: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Points with a finite (cost, error); others cannot be compared and are left out."""
    kept = []
    for p in points:
        cost, err = p.get("cost_bpe"), p.get("val_rel_l2")
        if _is_number(cost) and _is_number(err) and math.isfinite(cost) and math.isfinite(err):
            kept.append({"number": int(p["number"]), "cost_bpe": float(cost), "val_rel_l2": float(err)})
    return kept


def pareto_front(points: Iterable[Mapping[str, Any]]) -> list[dict]:
    """The non-dominated points (both objectives minimised), sorted by cost, error, number.

    Points with equal (cost, error) do not dominate each other, so duplicates all stay.
    """
    pts = sorted(_finite_points(points), key=lambda p: (p["cost_bpe"], p["val_rel_l2"], p["number"]))
    front: list[dict] = []
    best_err = math.inf
    for p in pts:
        # sorted by cost: p is dominated iff an earlier point has lower error, or equal error
        # at strictly lower cost
        if p["val_rel_l2"] < best_err:
            front.append(p)
            best_err = p["val_rel_l2"]
        elif p["val_rel_l2"] == best_err and front and front[-1]["cost_bpe"] == p["cost_bpe"] \
                and front[-1]["val_rel_l2"] == p["val_rel_l2"]:
            front.append(p)  # an exact duplicate of a front point
    return front


def points_from_summary(summary: Mapping[str, Any]) -> list[dict]:
    """(number, cost_bpe, val_rel_l2) of the summary's candidates for a recommendation.

    The summary's `pareto` list when it has one (it already respects constraints such as a
    study's max_error_ratio), else every COMPLETE trial. Single-objective studies record one
    value (the cost); the error then comes from the `val_error` user attribute.
    """
    wanted = summary.get("pareto")
    wanted = set(wanted) if wanted is not None else None
    points = []
    for t in summary.get("trials", []):
        if t.get("state") != "COMPLETE" or not t.get("values"):
            continue
        if wanted is not None and t["number"] not in wanted:
            continue
        values = t["values"]
        err = values[1] if len(values) >= 2 else t.get("user_attrs", {}).get("val_error")
        points.append({"number": t["number"], "cost_bpe": values[0], "val_rel_l2": err})
    return points


def parse_policy(text: str, value: float | str | None = None) -> tuple[str, float | None]:
    """`"knee"`, `"max-error-ratio=1.05"`, `"budget=300"` (or the name plus `value`) -> (policy, value)."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"policy must be one of {', '.join(POLICIES)}, got {text!r}")
    name, sep, inline = text.strip().partition("=")
    name = name.strip().lower().replace("_", "-")
    if name not in POLICIES:
        raise UserError(f"policy must be one of {', '.join(POLICIES)}, got {text!r}")
    if sep and value is not None:
        raise UserError(f"policy {text!r} already has a value; do not also pass --value {value!r}")
    raw: Any = inline.strip() if sep else value
    if name == "knee":
        if raw is not None:
            raise UserError(f"policy knee takes no value, got {raw!r}")
        return "knee", None
    if raw is None or raw == "":
        raise UserError(f"policy {name} needs a value: {_NEEDS_VALUE[name]}, e.g. {name}=...")
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise UserError(f"policy {name} value must be {_NEEDS_VALUE[name]}, got {raw!r}") from None
    if isinstance(raw, bool) or not (math.isfinite(number) and number > 0):
        raise UserError(f"policy {name} value must be {_NEEDS_VALUE[name]}, got {raw!r}")
    return name, number


def format_policy(policy: str, value: float | None) -> str:
    """Inverse of `parse_policy`: `("budget", 300.0)` -> `"budget=300"`."""
    return policy if value is None else f"{policy}={value:g}"


def _knee(front: list[dict]) -> dict:
    c_lo, c_hi = front[0]["cost_bpe"], front[-1]["cost_bpe"]
    errs = [p["val_rel_l2"] for p in front]
    e_lo, e_hi = min(errs), max(errs)

    def below_line(p: dict) -> float:
        c = (p["cost_bpe"] - c_lo) / (c_hi - c_lo) if c_hi > c_lo else 0.0
        e = (p["val_rel_l2"] - e_lo) / (e_hi - e_lo) if e_hi > e_lo else 0.0
        return 1.0 - c - e

    # compare distances rounded to 12 digits so that float noise does not break ties
    return min(front, key=lambda p: (-round(below_line(p), 12), p["val_rel_l2"], p["cost_bpe"],
                                     p["number"]))


ERROR_RTOL = 1e-6
"""How much lower than the reference's error a point's must be to beat it in error."""


def recommend(points: Iterable[Mapping[str, Any]], reference: Mapping[str, Any] | None, *,
              policy: str = "knee", value: float | None = None) -> int:
    """The trial number the policy picks from `points` (see the module docstring)."""
    policy, value = parse_policy(policy, value)
    front = pareto_front(points)
    if not front:
        raise UserError("no completed trial with finite cost and error to recommend from")
    ref_cost, ref_err = ((reference or {}).get(k) for k in ("cost_bpe", "val_rel_l2"))
    first = (reference or {}).get("first_passage_bpe")
    if _is_number(first) and _is_number(ref_cost):
        # plain training reached its own final error already there (a noisy end): a trial
        # that did no better (no jump kept: plain training itself) is no recommendation,
        # though its cost to that error beats the budget (a "4.42x" with fp x 0.88)
        ref_cost = min(ref_cost, first)
    among, them = "", ""  # how the messages below name the points chosen from
    if _is_number(ref_cost) and _is_number(ref_err):
        n_front = len(front)
        # better in error by more than rounding: a trial that kept no jump is plain training,
        # and at another thread count (a study's --workers K, another machine) its error
        # differs from the reference's by summation order alone (5e-10 was measured)
        beaten = ref_err * (1.0 - ERROR_RTOL)
        front = [p for p in front if p["cost_bpe"] < ref_cost or p["val_rel_l2"] < beaten]
        if len(front) < n_front:  # say so: a dropped point may be cheaper or more accurate
            among = (f" of the {len(front)} (of {n_front}) that beat plain training in cost or "
                     "in error")
            them = " of those"
        if not front:
            raise UserError(f"no trial beats plain training (the reference: {ref_cost:.4g} bpe, "
                            f"val_rel_l2 {ref_err:.4g}) in cost or in error: nothing to recommend "
                            "(`dmdopt export NAME --trial N` exports one anyway)")
    if policy == "knee":
        return _knee(front)["number"]
    if policy == "budget":
        ok = [p for p in front if p["cost_bpe"] <= value]
        if not ok:
            cheapest = front[0]
            raise UserError(
                f"policy budget={value:g}: no Pareto point{among} costs <= {value:g} "
                f"backprop-equivalent steps (the cheapest{them}, trial {cheapest['number']}, "
                f"costs {cheapest['cost_bpe']:.4g})")
        return min(ok, key=lambda p: (p["val_rel_l2"], p["cost_bpe"], p["number"]))["number"]
    # max-error-ratio
    ref_err = (reference or {}).get("val_rel_l2")
    if not _is_number(ref_err) or not math.isfinite(ref_err) or ref_err <= 0:
        raise UserError(f"policy max-error-ratio needs the reference's val_rel_l2, got {ref_err!r}")
    limit = value * ref_err
    ok = [p for p in front if p["val_rel_l2"] <= limit]
    if not ok:
        best = min(front, key=lambda p: (p["val_rel_l2"], p["number"]))
        raise UserError(
            f"policy max-error-ratio={value:g}: no Pareto point{among} has val_rel_l2 <= "
            f"{value:g} x reference {ref_err:.4g} = {limit:.4g} (the most accurate{them}, trial "
            f"{best['number']}, has {best['val_rel_l2']:.4g})")
    return min(ok, key=lambda p: (p["cost_bpe"], p["val_rel_l2"], p["number"]))["number"]
