"""Plain-data view of a study (see CONTRACT.md): what tracking/, dashboards and export read."""

from __future__ import annotations

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from dmdopt._util import mask_url
from dmdopt.errors import UserError
from dmdopt.pareto import missed_target

INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"
"""The `fail_reason` of a trial stopped by the user (shown in MLflow and the trial lines)."""


def is_surplus(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial pruned before training because the quota was already full: not a result.
    (A retry copies its dead origin's user attributes, reason included: hence the state.)"""
    return (trial.state == TrialState.PRUNED
            and str(trial.user_attrs.get("fail_reason", "")).startswith("surplus"))


def _params(trial: optuna.trial.FrozenTrial) -> dict:
    params = dict(trial.params)
    if params.pop("horizon_inf", False):
        params["horizon"] = "inf"
    if "rank_effective" in trial.user_attrs:
        params["rank"] = trial.user_attrs["rank_effective"]
    return params


UID_PREFIX = "uid:"
"""User attributes `uid:<hex>` name a study's identity in MLflow (see `study_uid`)."""


def study_uid(study: optuna.Study) -> str | None:
    """The study's identity for MLflow: the smallest `uid:` attribute (launchers that created
    the study at the same moment may each have added one; all of them read the same). None for
    a study made before uids existed: MLflow then matches its runs by name, as it did."""
    uids = sorted(k[len(UID_PREFIX):] for k in study.user_attrs if k.startswith(UID_PREFIX))
    return uids[0] if uids else None


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Within the study's constraints (`max_error_ratio`), as Optuna's best_trial(s) judge it."""
    return all(v <= 0.0 for v in trial.constraints.values())


def _points(trial: optuna.trial.FrozenTrial, single: bool) -> list[float] | None:
    """A COMPLETE trial's (cost_bpe, val_rel_l2). In a cost_to_target study the objective is
    the cost to the target, raised for a trial that never reached it (so it ranks below all
    that did); the point is the cost it spent and the error it ended at."""
    if trial.state != TrialState.COMPLETE or trial.values is None:
        return None
    if not single:
        return list(trial.values)
    attrs = trial.user_attrs
    if "val_error" not in attrs:
        return None
    return [float(attrs.get("cost_total", trial.values[0])), float(attrs["val_error"])]


def no_faster(summary: dict, trial: dict) -> bool:
    """The trial reached the target no sooner than plain training did: its first-passage
    speed-up is <= 1 (plain's cost to the target, or without one its first passage to its
    own final error, over the trial's; the two-objective mode's filter, `recommend`)."""
    from dmdopt.pareto import speedup_first_passage

    ratio = speedup_first_passage(summary, trial)
    return ratio is not None and ratio <= 1.0


def hypervolume_reference_point(study: optuna.Study) -> list[float]:
    """Fixed per study: 1.5 x the reference's (cost, error), so every history is comparable."""
    ref = study.user_attrs.get("reference") or {}
    return [1.5 * ref.get("cost_bpe", 1.0), 1.5 * ref.get("val_rel_l2", 1.0)]


def hypervolume_history(trials: list, ref_point: list[float]) -> list[list[float]]:
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    history, points = [], []
    # COMPLETE trials only, and before sorting: a WAITING trial (a dead worker's, re-queued)
    # has neither datetime, and comparing None with a datetime raised in every summary
    # Infeasible trials (beyond max_error_ratio) are off the front: they add no volume, but
    # they are completed trials, so they count on the x axis (CONTRACT.md: n_complete)
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None
            and len(t.values) == 2]
    for t in sorted(done, key=lambda t: t.datetime_complete or t.datetime_start):
        if is_feasible(t) and all(v < r for v, r in zip(t.values, ref_point, strict=True)):
            points.append(list(t.values))
        hv = compute_hypervolume(np.asarray(points), np.asarray(ref_point)) if points else 0.0
        history.append([len(history) + 1, float(hv)])
    return history


def pareto_numbers(study: optuna.Study) -> list[int]:
    if len(study.directions) != 2:
        try:  # Optuna's choice: the cheapest *feasible* trial, as `study status` prints it
            return [study.best_trial.number]
        except ValueError:  # no COMPLETE trial, or none within max_error_ratio
            return []
    # A trial that reused an earlier one's result (same settings) is the same point: listed
    # once, under the earlier number (Optuna's best_trials keeps both).
    front = [t for t in study.best_trials if "duplicate_of" not in t.user_attrs]
    return [t.number for t in sorted(front, key=lambda t: (t.values[0], t.values[1], t.number))]


def summarize(study: optuna.Study, *, storage_url: str | None = None, policy: str = "knee",
              value: float | None = None) -> dict:
    trials = study.get_trials(deepcopy=False)
    ref_point = hypervolume_reference_point(study)
    # a dead worker's trial (failed by the heartbeat, so without a reason of its own) -> the
    # trial that re-ran it. A retry's history lists the chain before it (the callback may also
    # have appended a trial's own number to its cached history in this process: skipped).
    retried_as = {}
    for t in trials:
        chain = [n for n in RetryHeartbeatStaleTrialCallback.retry_history(t) if n != t.number]
        if chain:
            for lost, rerun in zip(chain, chain[1:] + [t.number], strict=True):
                retried_as[lost] = rerun
    # the other way round, for both kinds of re-run: a heartbeat retry (Optuna's
    # `failed_trial`) and an interrupted trial's queued settings (dmdopt's `rerun_of`)
    rerun_of = {rerun: lost for lost, rerun in retried_as.items()}
    # (a heartbeat retry copies its dead origin's user attributes, a `rerun_of` included:
    # that one names the origin's own origin, so the retry chain wins for it)
    interrupted_as = {t.user_attrs["rerun_of"]: t.number for t in trials
                      if isinstance(t.user_attrs.get("rerun_of"), int) and t.number not in rerun_of}
    single = len(study.directions) == 1
    rows = []
    for t in trials:
        rows.append({
            "number": t.number, "state": t.state.name, "surplus": is_surplus(t),
            "feasible": is_feasible(t),
            "params": _params(t),
            # a PRUNED trial's values are Optuna's last reported intermediate value (its
            # cost so far), not the objectives: only a COMPLETE trial has a point
            "values": _points(t, single),
            "objective": t.values[0] if single and t.values and t.state == TrialState.COMPLETE
            else None,
            "user_attrs": dict(t.user_attrs),
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
        })
        if t.number in rerun_of:
            rows[-1]["user_attrs"]["rerun_of"] = rerun_of[t.number]
        if t.user_attrs.get("fail_reason") == INTERRUPTED and t.number in interrupted_as:
            rows[-1]["user_attrs"]["fail_reason"] = (f"{INTERRUPTED}; re-run as trial "
                                                     f"{interrupted_as[t.number]}")
        if t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs:
            reason = t.system_attrs.get("fail_reason") or (
                f"its worker stopped heart-beating; re-run as trial {retried_as[t.number]}"
                if t.number in retried_as else "failed (see the worker's log)")
            rows[-1]["user_attrs"]["fail_reason"] = reason
    summary = {
        "study_name": study.study_name,
        "study_uid": study_uid(study),
        "mode": "cost_to_target" if single else "multi",
        "objectives": study.metric_names or (["cost_bpe"] if single else ["cost_bpe", "val_rel_l2"]),
        "metric_names": ["cost_bpe", "val_rel_l2"],  # what each trial's `values` hold
        "storage": mask_url(storage_url),
        "config": study.user_attrs.get("config", {}),
        "resolved": study.user_attrs.get("resolved"),  # the file over its creator's defaults
        "reference": study.user_attrs.get("reference"),
        "trials": rows,
        "pareto": pareto_numbers(study),
        "recommended": None,
        "hypervolume_history": hypervolume_history(trials, ref_point),
        "hypervolume_reference_point": ref_point,
    }
    if single and summary["pareto"]:
        # the best, unless it never reached the target (export refuses it then: MLflow and the
        # dashboard showed as recommended a trial slower than plain training to nowhere) or
        # reached it no sooner than plain training did (the two-objective mode's "nothing
        # beats plain training")
        best = next(r for r in rows if r["number"] == summary["pareto"][0])
        if not missed_target(best) and not no_faster(summary, best):
            summary["recommended"] = {"number": best["number"], "policy": "best"}
    elif summary["pareto"] and summary["reference"]:
        from dmdopt.search.recommend import points_from_summary, recommend
        try:
            number = recommend(points_from_summary(summary), summary["reference"],
                               policy=policy, value=value)
            summary["recommended"] = {"number": number, "policy": policy}
        except UserError:  # no qualifying point: the summary simply has no recommendation
            summary["recommended"] = None
    return summary
