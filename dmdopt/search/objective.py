"""The trial objective: DMD knobs from the trial -> train -> (cost, validation error).

Objectives (both minimised, metric names `cost_bpe`, `val_rel_l2`):
- cost_bpe:   backprop-equivalent cost to first reach the reference's final validation error
              (time-to-accuracy); a trial that never reaches it counts its whole spend.
- val_rel_l2: validation relative L2 error at the end of the (shared) step budget.
So the reference (plain training) sits at (its budget, its final error), and a point left of it
is a speed-up. In `cost_to_target` mode the single objective is the cost to reach the target
error; training stops there, and a trial is pruned once its cost passes the best trial's
while it is still short of the target (`_BestCost`): it can no longer win, so the rule never
prunes a trial that would have won, and early learning curves -- identical up to the first jump
and noisy after it -- decide nothing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import optuna
import torch

from dmdopt.search.config import LINE_SEARCH_PRESETS, StudyConfig
from dmdopt.training.config import DMDConfig
from dmdopt.training.loop import Diverged, TrainResult, train

METRIC_NAMES = ["cost_bpe", "val_rel_l2"]
CURVE_POINTS = 100


def curve_summary(result: TrainResult) -> list[list[float]]:
    """[[cost, val_error], ...] down-sampled to at most CURVE_POINTS, last point kept."""
    curve = [[round(p["cost"], 4), p["val_error"]] for p in result.curve]
    if len(curve) > CURVE_POINTS:  # every stride-th point and the last: CURVE_POINTS at most
        stride = math.ceil((len(curve) - 1) / (CURVE_POINTS - 1))
        curve = curve[::stride] + ([curve[-1]] if (len(curve) - 1) % stride else [])
    return curve


def suggest_dmd(trial: optuna.Trial, config: StudyConfig) -> DMDConfig:
    """Sample window, rank, horizon (and optional knobs); rank is clipped to window - 2
    (the DMD modes a window of snapshots supports).

    The rank range is static (samplers model it independently of window); the rank actually
    used is recorded as the user attribute `rank_effective` and in `dmd`.
    """
    space = config.space
    window = trial.suggest_int("window", space.window.low, space.window.high, log=space.window.log)
    if space.rank.kind == "int":
        rank: int | float = trial.suggest_int("rank", int(space.rank.low), int(space.rank.high))
        rank = min(rank, window - 2)
    else:
        rank = trial.suggest_float("rank", space.rank.low, space.rank.high)
    horizon: float = trial.suggest_float("horizon", space.horizon.low, space.horizon.high, log=True)
    if space.horizon.include_inf and trial.suggest_categorical("horizon_inf", [False, True]):
        horizon = math.inf
    extra = dict(config.dmd)
    if space.optimizer_state:
        extra["optimizer_state"] = trial.suggest_categorical("optimizer_state", list(space.optimizer_state))
    if space.growing:
        extra["growing"] = trial.suggest_categorical("growing", list(space.growing))
    if space.line_search:
        preset = trial.suggest_categorical("line_search", list(space.line_search))
        extra["line_search"] = LINE_SEARCH_PRESETS[preset]
    trial.set_user_attr("rank_effective", rank)
    return DMDConfig.from_dict(extra | {"window": window, "rank": rank, "horizon": horizon})


class Objective:
    """Callable objective bound to a study config, its dataset and its reference result."""

    def __init__(self, config: StudyConfig, dataset, reference: dict) -> None:
        from dmdopt._util import git_commit, versions

        self.config = config
        self.dataset = dataset
        self.reference = reference
        # the code that produced each trial's figures (an export's provenance): a study may be
        # resumed, or exported, after an upgrade
        self.code = {"versions": versions(), "git_commit": git_commit()}

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        cfg = self.config
        dmd = suggest_dmd(trial, cfg)
        training = cfg.training
        if cfg.space.lr is not None:
            lr = trial.suggest_float("lr", cfg.space.lr.low, cfg.space.lr.high, log=cfg.space.lr.log)
            training = replace(training, lr=lr)
        single = cfg.mode == "cost_to_target"
        target = cfg.target_error if cfg.target_error is not None else self.reference["val_rel_l2"]
        if single:
            training = replace(training, target_error=target)
        if (earlier := _same_settings(trial, dmd, training)) is not None:
            return self._reuse(trial, earlier)
        trial.set_user_attr("training", training.to_dict())
        trial.set_user_attr("dmd", dmd.to_dict())

        best = _BestCost(trial.study) if single else None

        def on_eval(point: dict) -> None:
            if best is None:
                return
            # the objective so far as the intermediate value (a pruned trial's stored value is
            # its last report; a val error there read as 0.3 bpe): its cost, charged like a miss
            # while short of the target, so samplers do not favour fewer forward passes
            so_far = point["cost"] * (1.0 + point["val_error"] / target
                                      if point["val_error"] > target else 1.0)
            trial.report(so_far, point["step"])
            bound = best.value()
            if bound is not None and point["val_error"] > target and point["cost"] >= bound:
                reason = (f"pruned at step {point['step']}: {point['cost']:.0f} bpe spent, short of "
                          f"the target, past the {bound:.0f} bpe of the best trial so far "
                          f"({best.number})")
                trial.set_user_attr("fail_reason", reason)
                trial.set_user_attr("pruned_at_cost", point["cost"])
                raise optuna.TrialPruned(reason)

        try:
            result = train(dataset=self.dataset, model=cfg.model, training=training, dmd=dmd,
                           on_eval=on_eval)
        except Diverged as exc:
            trial.set_user_attr("fail_reason", f"diverged: {exc}")
            raise

        reached = result.cost_to_reach(self.reference["val_rel_l2"])
        cost_total = result.backprop_equivalent
        cost = reached[0] if reached else cost_total
        wall_to = reached[1] if reached else result.wall_time
        # the speed-ups compare like with like: the point's cost (its spend, to the study's
        # target in cost_to_target) with plain training's cost to the same error. A target
        # other than the reference's error is reached by plain training on its way (or not
        # at all): `to_target` holds where. Without it, the reference's budget.
        to_target = self.reference.get("to_target") if single else None
        point_cost = cost_total if single else cost
        ref_cost = to_target["cost_bpe"] if to_target else self.reference["cost_bpe"]
        ref_first = (to_target["cost_bpe"] if to_target
                     else self.reference.get("first_passage_bpe", self.reference["cost_bpe"]))
        attrs = {
            "cost_total": cost_total, "cost_to_reference": cost, "reached_reference": bool(reached),
            "val_error": result.val_error, "test_error": result.metrics["test_rel_l2"],
            "val_r2": result.metrics["val_r2"], "wall_time": result.wall_time,
            "wall_to_reference": wall_to, "dmd_time": result.dmd_time,
            "speedup": ref_cost / point_cost if point_cost > 0 else math.inf,
            # the stricter ratio: the reference's own first passage to its final error (its
            # curve may touch that error before the budget ends), over this trial's cost
            "speedup_first_passage": ref_first / point_cost if point_cost > 0 else math.inf,
            "jumps_accepted": result.jumps_accepted, "jumps_rejected": result.jumps_rejected,
            "curve": curve_summary(result), "device": result.device,
            # CPU results depend on it (reductions split by thread): production compares
            "cpu_threads": torch.get_num_threads(),
            # and on the vector kernels torch picked for this CPU (AVX2, AVX512, ...): the same
            # trial ended 0.8% apart on two machines with the same threads (README's tour)
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "forward_passes": result.cost["forward_passes"], "backprop_steps": result.cost["backprop_steps"],
            "code": self.code,
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if cfg.max_error_ratio is not None:
            trial.set_constraint(
                "max_error_ratio", result.val_error - cfg.max_error_ratio * self.reference["val_rel_l2"]
            )
        if single:
            if result.stopped_by != "target":
                # never reached the target: it ran the whole budget, so at least twice any
                # hit's cost, and misses rank by how far they ended from the target (by their
                # spend alone, nearly equal, the sampler was steered to fewer forward passes)
                return cost_total * (1.0 + result.val_error / target)
            return cost_total
        return cost, result.val_error

    def _reuse(self, trial: optuna.Trial, earlier: optuna.trial.FrozenTrial):
        """Return an earlier trial's result for the same settings instead of training again.

        Samplers (NSGA-II's crossover and mutation above all) may propose settings already
        run; training is seeded, so a retrain would give the same result (bit for bit on CPU),
        and the compute is saved (Optuna's FAQ does the same). The copy counts as a trial of
        its own.
        """
        for key, value in earlier.user_attrs.items():
            if key not in _OWN_ATTRS:
                trial.set_user_attr(key, value)
        trial.set_user_attr("duplicate_of", earlier.number)
        if self.config.max_error_ratio is not None:
            trial.set_constraint("max_error_ratio", earlier.user_attrs["val_error"]
                                 - self.config.max_error_ratio * self.reference["val_rel_l2"])
        return earlier.value if len(earlier.values) == 1 else tuple(earlier.values)


# a trial's own story, not its result: a copy must not claim the earlier trial's re-run or failure
_OWN_ATTRS = frozenset({"worker", "rerun_of", "fail_reason", "pruned_at_cost"})


class _BestCost:
    """The best COMPLETE trial's cost to the target, re-read from the storage at most every
    `refresh` seconds (other workers may finish better trials while this one trains)."""

    def __init__(self, study: optuna.Study, refresh: float = 15.0) -> None:
        self.study, self.refresh = study, refresh
        self.number: int | None = None
        self._value: float | None = None
        self._read_at = -math.inf

    def value(self) -> float | None:
        if time.monotonic() - self._read_at >= self.refresh:
            self._read_at = time.monotonic()
            try:
                trial = self.study.best_trial
            except ValueError:  # no COMPLETE trial yet
                return self._value
            self.number, self._value = trial.number, trial.value
        return self._value


def _same_settings(trial: optuna.Trial, dmd: DMDConfig, training) -> optuna.trial.FrozenTrial | None:
    """The earliest COMPLETE trial of this study that trained with exactly these settings.

    Compared are the effective settings the trials recorded, not the sampled parameters, so
    a different `horizon` under `horizon_inf` or a rank clipped to the same value counts as
    the same run; trials without those records (another objective's) never match.
    """
    def as_stored(dmd_record, training_record):
        # user attributes come back from an RDB storage through JSON: compare in that form;
        # an unset (None) setting equals an absent one (a record from before it existed)
        data = json.loads(json.dumps({"dmd": dmd_record, "training": training_record}))
        return {k: {f: v for f, v in r.items() if v is not None} if isinstance(r, dict) else r
                for k, r in data.items()}

    wanted = as_stored(dmd.to_dict(), training.to_dict())
    for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = other.user_attrs
        if (other.number != trial.number and "val_error" in attrs
                and as_stored(attrs.get("dmd"), attrs.get("training")) == wanted):
            return other
    return None


def reference_run(config: StudyConfig, dataset) -> dict:
    """Plain training with the study's optimiser, budget and seed: the point every plot shows."""
    result = train(dataset=dataset, model=config.model, training=config.training, dmd=None)
    # where the reference's curve first reaches its own final error: the budget when the curve
    # still improves at its end, earlier when it is noisy there (then `speedup` flatters DMD)
    first_passage = result.cost_to_reach(result.val_error)
    reference = {
        "cost_bpe": result.backprop_equivalent, "cost_total": result.backprop_equivalent,
        "first_passage_bpe": first_passage[0] if first_passage else result.backprop_equivalent,
        "val_rel_l2": result.val_error, "test_rel_l2": result.metrics["test_rel_l2"],
        "wall_time": result.wall_time, "curve": curve_summary(result),
        "training": config.training.to_dict(), "device": result.device,
    }
    if config.mode == "cost_to_target" and config.target_error is not None:
        # plain training's point against the study's own target: where its (full) curve first
        # reaches it, else its budget and final error (it never did: a speed-up is then a
        # lower bound). The trials' speed-ups and the reference row of the table use it. As a
        # trial does, it stops at an evaluation after a step, never at the start: a target at
        # or above the starting error put it at cost 0, every speed-up 0 (exports refused).
        hit = next((p for p in result.curve
                    if p["step"] > 0 and p["val_error"] <= config.target_error), None)
        reference["to_target"] = {
            "target_error": config.target_error, "reached": hit is not None,
            "cost_bpe": hit["cost"] if hit else result.backprop_equivalent,
            "val_rel_l2": hit["val_error"] if hit else result.val_error}
    return reference
