"""Running a study: storage, sampler, the reference run, workers, resume, tracking.

`run_study(config)` is idempotent: re-running resumes (finished trials are kept; the study
stops once `n_trials` trials have a result -- COMPLETE, or PRUNED by `cost_to_target`'s cost
bound (`_has_result`) -- counted over every worker on every machine; FAIL trials do not count,
so a killed worker's trial is re-run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from dmdopt._util import (
    DEFAULT_CACHE,
    Terminated,
    deferred_interrupts,
    interruptible,
    mask_url,
    sigterm_as_interrupt,
)
from dmdopt.errors import UserError, WorkersFailed
from dmdopt.search.config import StudyConfig, parse_study
from dmdopt.search.objective import METRIC_NAMES, Objective, reference_run
from dmdopt.search.sampler import make_sampler, nsga2_population
from dmdopt.search.storage import made_by_another_tool, open_storage
from dmdopt.search.summary import INTERRUPTED, UID_PREFIX, is_surplus, study_uid, summarize
from dmdopt.training.config import DMDConfig
from dmdopt.training.loop import Diverged, resolve_device

log = logging.getLogger("dmdopt")


# Range keys earlier versions accepted and ignored (they now are errors): a study created with
# one must still resume from its file with the key removed.
_IGNORED_RANGE_KEYS = {"window": ("include_inf", "kind"), "rank": ("log", "include_inf"),
                       "horizon": ("log", "kind"), "lr": ("include_inf", "kind")}


def config_digest(config: StudyConfig | dict) -> str:
    """What must match for a re-run to resume this study (storage & n_trials may differ).
    `config`: a StudyConfig, or the raw dict a study stored (its `config` attribute)."""
    return hashlib.sha256(json.dumps(_digested(config), sort_keys=True, default=str)
                          .encode()).hexdigest()[:16]


def config_differences(stored: dict, config: StudyConfig) -> str:
    """The settings that keep `config` from resuming the study that stored `stored` (its
    `config` attribute), as a refusal or a warning names them: '' when none, else up to three
    `section.key: A in the study, B in the file`."""
    changed = _differences(stored, config)
    return "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")


def _differences(stored: dict, config: StudyConfig) -> list[str]:
    def walk(old: Any, new: Any, where: str) -> Iterator[str]:
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new), key=str):
                yield from walk(old.get(key, _ABSENT), new.get(key, _ABSENT),
                                f"{where}.{key}" if where else str(key))
        elif json.dumps(old, default=str) != json.dumps(new, default=str):
            yield f"{where}: {_shown(old)} in the study, {_shown(new)} in the file"

    try:  # both sides as they read, or (a stored file this dmdopt refuses) both as written:
        old, new = _meaning(stored), _meaning(config)  # a mix names every default filled in
    except _UNREADABLE:
        old, new = _raw_digested(stored), _raw_digested(config)
    as_stored = json.loads(json.dumps(new, default=str))  # as the study keeps it
    return list(walk(old, as_stored, ""))


_ABSENT = object()


def _shown(value: Any) -> str:
    return "not set" if value is _ABSENT else json.dumps(value, default=str)


def _digested(config: StudyConfig | dict) -> dict:
    """The part of a study's configuration its digest covers, as this dmdopt reads it: every
    section parsed, its defaults filled in and its numbers in one spelling. So `high = 200`
    and `200.0`, or a default written out (`momentum = 0.0`), are the study they mean; a
    resume was refused for them, sending the user to a new study name. A stored file that no
    longer parses (a key this dmdopt refuses) is compared as written, as before."""
    try:
        return _meaning(config)
    except _UNREADABLE:
        return _raw_digested(config)


_UNREADABLE = (UserError, ValueError, TypeError, AttributeError)  # a file this dmdopt refuses


def _meaning(config: StudyConfig | dict) -> dict:
    """`_digested`'s reading of a file; raises `_UNREADABLE` for one this dmdopt refuses."""
    from dmdopt.problem import ProblemConfig

    # (a stored file: parsed with its own n_trials/timeout, which the digest leaves out)
    parsed = config if isinstance(config, StudyConfig) else parse_study(
        dict(_raw_digested(config), study=config.get("study") or {}))

    space = dataclasses.asdict(parsed.space)
    if parsed.space.rank.kind == "energy":  # `high = 1` is the fraction 1.0
        space["rank"] |= {"low": float(parsed.space.rank.low), "high": float(parsed.space.rank.high)}
    searched = ("window", "rank", "horizon")
    dmd = DMDConfig.from_dict(parsed.dmd | {"window": 20, "rank": 1, "horizon": 10}).to_dict()
    return {
        "study": {"name": parsed.name, "sampler": parsed.sampler, "seed": parsed.seed,
                  "mode": parsed.mode, "target_error": _float_or_none(parsed.target_error),
                  "max_error_ratio": _float_or_none(parsed.max_error_ratio)},
        "problem": ProblemConfig.from_dict(parsed.problem).to_dict(),
        "model": parsed.model.to_dict(),
        "training": parsed.training.to_dict(),
        "dmd": {k: v for k, v in dmd.items() if k not in searched},
        "search": space,
    }


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def _raw_digested(config: StudyConfig | dict) -> dict:
    """The file as written, less what may differ between launchers of one study (storage,
    n_trials, timeout) and range keys earlier versions ignored."""
    raw = {k: v for k, v in (config.raw if isinstance(config, StudyConfig) else config).items()}
    study = dict(raw.get("study", {}))
    for key in ("storage", "n_trials", "timeout"):
        study.pop(key, None)
    raw["study"] = study
    search = raw.get("search")
    if isinstance(search, dict):
        search = dict(search)
        for table, keys in _IGNORED_RANGE_KEYS.items():
            if isinstance(search.get(table), dict):
                search[table] = {k: v for k, v in search[table].items() if k not in keys}
        raw["search"] = search
    return raw


def _load_dataset(config: StudyConfig, cache_dir: str | os.PathLike, progress: bool):
    from dmdopt.problem import ProblemConfig, load_dataset

    return load_dataset(ProblemConfig.from_dict(config.problem), cache_dir=cache_dir, progress=progress)


def resolved_settings(config: StudyConfig) -> dict:
    """The settings the file means once this dmdopt's defaults fill it in: the dataset's hash
    (every [problem] field and the solver version), the model and the base training.

    The digest covers only what the file says, so a worker of another dmdopt version, whose
    defaults or solver differ, would join the study and train another problem; and an export
    would write the exporter's defaults, not the ones the trials ran with."""
    from dmdopt.problem import ProblemConfig

    problem = ProblemConfig.from_dict(config.problem)
    # only what every trial shares: a searched setting has no study-wide value (the default
    # ladder stays when a study may pick the `default` line-search preset, which is that ladder)
    space = config.space
    searched = {"window", "rank", "horizon"}
    searched |= {knob for knob in ("optimizer_state", "growing") if getattr(space, knob)}
    if space.line_search and "default" not in space.line_search:
        searched.add("line_search")
    dmd = {k: v for k, v in (DMDConfig().to_dict() | dict(config.dmd)).items() if k not in searched}
    training = config.training.to_dict()
    if space.lr is not None:
        training.pop("lr")
    return {"dataset_hash": problem.config_hash(), "problem": problem.to_dict(),
            "model": config.model.to_dict(), "training": training, "dmd": dmd}


def _check_resolved(study: optuna.Study, config: StudyConfig, storage_url: str) -> None:
    """Refuse to work on a study whose trials ran settings this dmdopt resolves differently."""
    stored = study.user_attrs.get("resolved")
    if not isinstance(stored, dict):  # a study made before dmdopt stored them
        return
    here = json.loads(json.dumps(resolved_settings(config), default=str))
    for section in ("problem", "model", "training", "dmd"):
        theirs, ours = stored.get(section) or {}, here[section]
        # a key only one side has is a field added (or dropped) between the versions, whose
        # default keeps the older behaviour (as `export._ADDED_LATER` assumes): not compared
        for key in sorted(set(theirs) & set(ours)):
            if theirs[key] != ours[key]:
                raise UserError(
                    f"study {config.name!r} in {mask_url(storage_url)} was created by a dmdopt "
                    f"whose defaults give {section}.{key} = {theirs[key]!r}; this one gives "
                    f"{ours[key]!r}: run the version that created it (its trials' `code` "
                    f"attribute names it), or write {section}.{key} in a study of another name")
    # the hash covers every [problem] field and the solver version: with the same fields it
    # differs only by the solver (with a field added, it differs anyway)
    same_fields = set(stored.get("problem") or {}) == set(here["problem"])
    if same_fields and stored.get("dataset_hash") != here["dataset_hash"]:
        raise UserError(
            f"study {config.name!r} in {mask_url(storage_url)} was created by a dmdopt whose "
            f"solver builds dataset {stored.get('dataset_hash')}; this one builds "
            f"{here['dataset_hash']}: run the version that created it")


def _open_study(config: StudyConfig, storage, storage_url: str,
                n_trials: int | None) -> optuna.Study:
    """Create (with its uid, config and objectives) or load the study; refuse another config."""
    directions = ["minimize"] if config.mode == "cost_to_target" else ["minimize", "minimize"]
    # cost_to_target prunes in the objective (`_BestCost`): a median rule on val error pruned
    # 22 of the first 26 trials of a 2,000-step Adam study, 17 at step 20, on one jump's float noise
    pruner = optuna.pruners.NopPruner()
    # Exactly one launcher creates the study (the storage's unique name decides) and writes
    # its configuration; the others wait for that record and compare theirs with it. When
    # every launcher wrote its own, the writes of two files interleaved: both trained into
    # one study, each passing a check against its own half of the record.
    try:
        storage.create_new_study(
            [optuna.study.StudyDirection.MINIMIZE for _ in directions], config.name)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    try:
        study = optuna.create_study(study_name=config.name, storage=storage,
                                    sampler=make_sampler(config), pruner=pruner,
                                    directions=directions, load_if_exists=True)
    except ValueError as exc:  # direction mismatch with an existing study
        raise UserError(f"study {config.name!r}: {exc}") from None
    digest = config_digest(config)
    existing = study.user_attrs.get("config_digest")
    if made_by_another_tool(study):  # its trials would be counted and shown as ours
        raise UserError(f"study {config.name!r} in {mask_url(storage_url)} was not made by "
                        "dmdopt (it has trials but no dmdopt configuration); give this one "
                        "another [study] name")
    deadline = time.monotonic() + _CREATOR_WAIT_S
    while not created and existing is None and time.monotonic() < deadline:
        time.sleep(0.2)  # its creator is writing the record (milliseconds, unless it died)
        existing = study.user_attrs.get("config_digest")
    if existing is None:  # ours, or one whose creator died before its record: adopted
        if study_uid(study) is None:
            # MLflow tells studies apart by this, not by name: two storages (or a re-created
            # optuna.db) may hold studies of one name. Launchers starting together may each
            # add one; all of them read the smallest (see `study_uid`).
            study.set_user_attr(f"{UID_PREFIX}{uuid.uuid4().hex}", True)
        # the digest last: each attribute commits on its own, and a launcher joining meanwhile
        # takes a digest as a study whose record is complete
        study.set_user_attr("config", json.loads(json.dumps(config.raw, default=str)))
        study.set_user_attr("resolved", json.loads(json.dumps(resolved_settings(config), default=str)))
        study.set_user_attr("config_digest", digest)
        quota = n_trials if n_trials is not None else config.n_trials
        study.set_user_attr("nsga2_population", nsga2_population(quota))
        if config.mode == "cost_to_target":
            study.set_metric_names(["cost_bpe"])
        else:
            study.set_metric_names(METRIC_NAMES)
        _refuse_another_config(study, config, storage_url)  # a launcher that wrote after us
    elif existing != digest:
        _refuse_another_config(study, config, storage_url)
    if existing is not None:
        _check_resolved(study, config, storage_url)
    return study


_CREATOR_WAIT_S = 30.0  # how long a launcher waits for the creator's configuration record


def _refuse_another_config(study: optuna.Study, config: StudyConfig, storage_url: str) -> None:
    """UserError when the stored study holds another configuration than `config`.

    Checked on opening, again before the reference is stored and before every trial: a study
    deleted and made again meanwhile (`drop_empty_study`), or a creator that died before its
    record was adopted by another file, must not take this launcher's trials."""
    stored = study.user_attrs
    digest = config_digest(config)
    existing = stored.get("config_digest")
    # (the second test: a study whose stored digest counted a range key now refused)
    if existing is None or existing == digest or config_digest(stored.get("config") or {}) == digest:
        return
    changed = config_differences(stored.get("config") or {}, config)
    what = f" ({changed})" if changed else ""
    raise UserError(
        f"study {config.name!r} already exists in {mask_url(storage_url)} with a different "
        f"configuration{what}; give this one another [study] name or use another storage"
    )


def prepare_study(config: StudyConfig, *, storage_url: str, cache_dir=DEFAULT_CACHE,
                  progress: bool = True, echo=print,
                  n_trials: int | None = None) -> tuple[optuna.Study, object]:
    """Create or resume the study, build the dataset, run the reference once.

    `n_trials`: the effective quota (`--n-trials` or the file's); a new study stores the NSGA-II
    population it implies, which its workers and resumes keep."""
    storage = open_storage(storage_url)
    study = _open_study(config, storage, storage_url, n_trials)

    def drop_empty_study() -> None:
        """No reference, no study: delete the empty one so that a corrected file runs under the
        same name instead of meeting "a different configuration" (another machine may have
        deleted it first, or started trials: then leave it)."""
        with suppress(Exception):
            if study.user_attrs.get("reference") is None and not study.get_trials(deepcopy=False):
                optuna.delete_study(study_name=config.name, storage=storage)

    def reopened_if_deleted(study: optuna.Study) -> optuna.Study:
        """Another launcher, stopped before its reference, may have deleted the (then empty)
        study while this one built the dataset or trained: create it again."""
        try:
            study.user_attrs  # noqa: B018 - raises KeyError ("Record does not exist") if gone
            return study
        except KeyError:
            return _open_study(config, storage, storage_url, n_trials)

    try:
        dataset = _load_dataset(config, cache_dir, progress)
    except BaseException:  # a crash, an interrupt: nothing was finished, nothing is lost
        drop_empty_study()
        raise
    study = reopened_if_deleted(study)
    if study.user_attrs.get("reference") is None:
        echo(f"reference: plain {config.training.optimizer} for {config.training.max_steps} steps ...")
        try:
            reference = reference_run(config, dataset)
        except Diverged as exc:  # the settings' fault, before any trial: one line, exit 2
            drop_empty_study()
            t = config.training
            raise UserError(f"training: the reference run (plain {t.optimizer} at lr {t.lr:g}) "
                            f"diverged: {exc}; lower training.lr") from None
        except BaseException:
            drop_empty_study()
            raise
        start, final = reference["curve"][0][1], reference["val_rel_l2"]
        if not final < start and config.target_error is None:
            # every trial would "reach" this error at cost 0 (an infinite speed-up): no study.
            drop_empty_study()
            t = config.training
            raise UserError(
                f"training: plain {t.optimizer} at lr {t.lr:g} for {t.max_steps} steps ends at "
                f"validation error {final:.4g}, no better than where it started ({start:.4g}); "
                "lower training.lr or change training.max_steps")
        bound = (config.max_error_ratio or math.inf) * final
        target = config.target_error if config.target_error is not None else final
        if config.mode == "cost_to_target" and target > bound:
            # a trial stops at the target, so it ends near it: every hit would be infeasible,
            # the study would have nothing to recommend and its pruning bound would never set
            drop_empty_study()
            raise UserError(
                f"study: target_error = {target:g}"
                + (" (the reference's error)" if config.target_error is None else "")
                + " is above max_error_ratio x the "
                f"reference's error ({config.max_error_ratio:g} x {final:.4g} = {bound:.4g}), so "
                "a trial, which stops at its first evaluation at or below the target, would "
                "end beyond the bound; lower "
                "study.target_error or raise study.max_error_ratio")
        # Workers starting together on a new study each train the reference; the first one
        # stored wins, so every worker (and every plot) uses the same reference.
        study = reopened_if_deleted(study)
        _refuse_another_config(study, config, storage_url)  # not a reference for another's
        if study.user_attrs.get("reference") is None:
            study.set_user_attr("reference", reference)
    reference = study.user_attrs["reference"]
    echo(f"reference: cost {reference['cost_bpe']:.0f} bpe, val error {reference['val_rel_l2']:.4f}, "
         f"wall {reference['wall_time']:.1f} s")
    if to_target := reference.get("to_target"):
        echo(f"reference: reaches the target {to_target['target_error']:g} at "
             f"{to_target['cost_bpe']:.0f} bpe" if to_target["reached"] else
             f"reference: never reaches the target {to_target['target_error']:g} in its "
             f"{to_target['cost_bpe']:.0f} bpe (speed-ups against it are lower bounds)")
    return study, dataset


def study_sampler(study: optuna.Study, config: StudyConfig):
    """The sampler of an existing study, with the NSGA-II population it was created with."""
    population = study.user_attrs.get("nsga2_population")
    if population is None:  # a study from before the attribute: its creating file's n_trials
        created = ((study.user_attrs.get("config") or {}).get("study") or {}).get("n_trials")
        population = nsga2_population(created)
    return make_sampler(config, population=population)


def _count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _fail_stale_trials(study: optuna.Study) -> None:
    """Fail RUNNING trials whose worker stopped heart-beating (and re-queue them, see storage)."""
    try:
        optuna.storages.fail_stale_trials(study)
    except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next poll tries again
        log.warning("checking for dead workers' trials failed: %s", exc)


class _Tracking:
    """Logs finished trials to MLflow; never lets a tracking problem fail a trial."""

    def __init__(self, study_name: str, storage_url: str, tracking_uri: str | None, enabled: bool):
        self.tracker = None
        self.storage_url = storage_url
        if not enabled:
            return
        try:
            from dmdopt.tracking import StudyTracker
            self.tracker = StudyTracker(tracking_uri, study_name)
            self.tracker.training = True  # a launcher's or worker's: trials follow
        except Exception as exc:  # noqa: BLE001 - tracking is best-effort by design
            log.warning("MLflow tracking disabled: %s", exc)

    def start(self, study: optuna.Study) -> None:
        if self.tracker is not None:
            summary = summarize(study, storage_url=self.storage_url)
            self.tracker.study_uid = summary["study_uid"]
            self.tracker.ensure_parent(summary)
            # a resume: trials an interrupt or a killed worker ended never reached a callback;
            # the parent's front and status follow (an interrupted run left it RUNNING)
            self.tracker.sync(summary)

    def finish(self, study: optuna.Study) -> None:
        """After the workers ended: their last refreshes raced (the one written last may be an
        older summary's), and a tracking pause may have skipped trials, so the launcher logs
        what is missing and writes the final front and status, pause or not."""
        if self.tracker is not None:
            self.tracker.unpause()
            self.tracker.training = False  # the final status: FINISHED unless others train
            try:
                self.start(study)
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow: could not refresh the parent run: %s", exc)

    def abandon(self, study: optuna.Study) -> None:
        """The launcher stops on an error or an interrupt: the parent must not stay RUNNING
        (`training` kept it so between trials). Best effort, and no waiting on a paused store:
        a resume or `study sync-mlflow` logs the rest."""
        if self.tracker is None:
            return
        self.tracker.training = False
        try:
            self.tracker.sync(summarize(study, storage_url=self.storage_url))
        except Exception as exc:  # noqa: BLE001 - the storage itself may be what failed
            log.debug("MLflow: no final refresh of the parent run: %s", exc)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.tracker is None:
            return
        try:
            summary = summarize(study, storage_url=self.storage_url)
            self.tracker.study_uid = summary["study_uid"]
            if is_surplus(trial):  # no result to log, but it may be the last trial to end:
                self.tracker.refresh_parent(summary)  # the parent's status follows
                return
            # this trial, and every finished one MLflow lacks: a retry's lost trials (failed by
            # the heartbeat, no worker's callback saw them end) and any a tracking pause skipped
            self.tracker.sync(summary)
        except Exception as exc:  # noqa: BLE001 - the trial is safe in the Optuna storage
            log.warning("MLflow logging of trial %d failed: %s (run `dmdopt study sync-mlflow`)",
                        trial.number, exc)


def _quota_place(trial: optuna.trial.FrozenTrial) -> tuple[int, int]:
    """A trial's place in the quota order. A retry of a dead worker's trial takes the place of
    the trial it re-runs, so a killed trial is re-run rather than replaced by a newer one."""
    origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    history = RetryHeartbeatStaleTrialCallback.retry_history(trial) if origin is not None else []
    return (history[0] if history else trial.number, trial.number)


def _quota_full_ahead(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Whether `n_trials` trials ahead of trial `number` (in quota order) are complete, running
    or queued, so that this trial would overshoot the quota. Every worker applies the same
    total order, so concurrent workers agree on which trials are surplus."""
    trials = study.get_trials(deepcopy=False)
    mine = next(_quota_place(t) for t in trials if t.number == number)
    live = (TrialState.RUNNING, TrialState.WAITING)
    ahead = [t for t in trials if (t.state in live or _has_result(t)) and _quota_place(t) < mine]
    return len(ahead) >= n_trials


def _has_result(trial: optuna.trial.FrozenTrial) -> bool:
    """Counts toward `n_trials`: COMPLETE, or PRUNED by the cost bound (an evaluated setting:
    in `cost_to_target` most trials end so once a good one exists, and counting only COMPLETE
    ones would run such a study far past its quota). Not a surplus trial, nor one an earlier
    pruner stopped (studies made before the bound keep their old count)."""
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.PRUNED and "pruned_at_cost" in trial.user_attrs
        and not is_surplus(trial))


def _count_results(study: optuna.Study) -> int:
    return sum(_has_result(t) for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def trial_knobs(trial: optuna.trial.FrozenTrial) -> str:
    """"window W rank R horizon H" of a trial, as the trial lines and `study status` print it:
    the rank actually used, an energy fraction and the horizon rounded."""
    p = trial.params
    rank = trial.user_attrs.get("rank_effective", p.get("rank"))
    rank = format(rank, ".4g") if isinstance(rank, float) else rank  # an energy fraction
    horizon = "inf" if p.get("horizon_inf") else format(p.get("horizon", float("nan")), ".3g")
    return f"window {p.get('window')} rank {rank} horizon {horizon}"


def trial_cost(trial: optuna.trial.FrozenTrial) -> tuple[float, str]:
    """(cost, note) as the trial lines and `study status` print it. A cost_to_target
    objective charges a miss its spend x (1 + error / target), so that it ranks below every
    hit: the line shows what the trial spent, and says that it missed."""
    cost = trial.values[0]
    spent = trial.user_attrs.get("cost_total")
    if len(trial.values) == 1 and spent is not None and cost > spent:
        return spent, "  (target not reached)"
    return cost, ""


def _echo_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, echo=print) -> None:
    knobs = trial_knobs(trial)
    if trial.state == TrialState.COMPLETE:
        a = trial.user_attrs
        cost, missed = trial_cost(trial)
        echo(f"trial {trial.number:>3} complete  cost {cost:8.1f} bpe{missed} "
             f"({a.get('speedup', float('nan')):.2f}x)  val error {a.get('val_error', float('nan')):.4f}  "
             f"jumps {a.get('jumps_accepted', 0)}/{a.get('jumps_accepted', 0) + a.get('jumps_rejected', 0)}  {knobs}"
             + (f"  (trial {a['duplicate_of']}'s settings: its result, not retrained)"
                if "duplicate_of" in a else ""))
    else:
        reason = trial.user_attrs.get("fail_reason", "")
        echo(f"trial {trial.number:>3} {trial.state.name.lower()}  {knobs}  {reason}")


class _NoInterruptTraceback(logging.Filter):
    """Optuna logs a trial stopped by Ctrl-C or SIGTERM with the interrupt's traceback (~30
    lines), then a second line "failed with value None". The user stopped it: one line per
    trial says what became of it, as Optuna's own record."""

    def __init__(self) -> None:
        super().__init__()
        self._interrupted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        number = re.match(r"Trial (\d+) failed with ", message)
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
            if number:
                self._interrupted.add(number[1])
                record.msg, record.args = (f"Trial {number[1]} interrupted: marked FAIL; `study "
                                           "run` runs its settings again on resume"), ()
        elif number and message.endswith("failed with value None.") \
                and number[1] in self._interrupted:
            self._interrupted.discard(number[1])
            return False  # the interrupted trial's second line: said already
        return True


def _quiet_interrupts() -> None:
    """Install `_NoInterruptTraceback` on the logger of Optuna's trial loop (once)."""
    logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoInterruptTraceback) for f in logger.filters):
        logger.addFilter(_NoInterruptTraceback())


class StorageLost(WorkersFailed):
    """The Optuna storage went away while the study ran (a database server stopped, a lost
    network): not the user's mistake, and nothing to fix in dmdopt: exit code 1, one line."""


STORAGE_LOST_EXIT = 4  # a worker process's exit code for StorageLost


def _storage_failure(exc: BaseException) -> BaseException | None:
    """The database-connection error behind `exc`, if any. Optuna wraps it (its
    StorageInternalError blames "invalid data in the commit"), or its own bookkeeping then
    fails on it (an UnboundLocalError in optimize's finally): walk the chain."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, (OperationalError, InterfaceError)):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _storage_lost(cause: BaseException, storage_url: str) -> StorageLost:
    """The one line for `cause`, the error `_storage_failure` found."""
    orig = getattr(cause, "orig", None) or cause
    why = " ".join(str(orig).split())[:160]
    return StorageLost(f"the Optuna storage {mask_url(storage_url)} failed while the study ran "
                       f"({type(orig).__name__}: {why}); finished trials are kept: run the same "
                       "command again once it is back (a trial it cut off is retried)")


def worker_loop(config: StudyConfig, *, storage_url: str, n_trials: int | None,
                timeout: float | None, cache_dir=DEFAULT_CACHE, tracking: bool = True,
                tracking_uri: str | None = None, echo=print, progress: bool = False,
                tracker: _Tracking | None = None) -> int:
    """One worker: run trials until `n_trials` have a result in the storage (all workers
    together) or `timeout` seconds passed. Returns the trials this worker ran. A storage that
    goes away meanwhile is StorageLost (one line), not the 300-line chain Optuna leaves."""
    try:
        return _worker_loop(config, storage_url=storage_url, n_trials=n_trials,
                            timeout=timeout, cache_dir=cache_dir, tracking=tracking,
                            tracking_uri=tracking_uri, echo=echo, progress=progress,
                            tracker=tracker)
    except UserError:  # a storage that never opened: the user's (its cause stays chained)
        raise
    except Exception as exc:
        if (cause := _storage_failure(exc)) is None:
            raise
        raise _storage_lost(cause, storage_url) from None


def _worker_loop(config: StudyConfig, *, storage_url: str, n_trials: int | None,
                 timeout: float | None, cache_dir, tracking: bool, tracking_uri: str | None,
                 echo, progress: bool, tracker: _Tracking | None) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_interrupts()
    storage = open_storage(storage_url)
    study = optuna.load_study(study_name=config.name, storage=storage,
                              pruner=optuna.pruners.NopPruner())
    study.sampler = study_sampler(study, config)
    dataset = _load_dataset(config, cache_dir, progress)
    objective = Objective(config, dataset, study.user_attrs["reference"])
    if tracker is None:
        tracker = _Tracking(config.name, storage_url, tracking_uri, tracking)

    worker_id = f"{socket.gethostname()}:{os.getpid()}"

    def guarded(trial: optuna.Trial):
        # Which machine/process ran (or lost) the trial: the only trace a dead worker leaves.
        trial.set_user_attr("worker", worker_id)
        # Another worker may have filled the quota while we were asking: don't overshoot.
        if n_trials is not None and _quota_full_ahead(study, trial.number, n_trials):
            trial.set_user_attr("fail_reason", "surplus: the study already had enough trials")
            raise optuna.TrialPruned("surplus")
        current["id"] = trial._trial_id
        try:
            with interruptible():  # training stops at once; Optuna's bookkeeping waits
                values = objective(trial)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say so on the trial (and in MLflow)
            with suppress(Exception):
                trial.set_user_attr("fail_reason", INTERRUPTED)
            raise  # Optuna marks it FAIL; then `_queue_rerun` queues its settings
        except optuna.TrialPruned:  # by the cost bound: a result, so it faces the check below
            _surplus_at_end(trial)
            raise
        _surplus_at_end(trial)
        if storage.get_trial(trial._trial_id).state.is_finished():
            # failed as stale by the others after the objective's last write: Optuna's tell
            # would hit its "Should not reach" assertion; raise what it handles instead
            raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} was given up")
        return values

    def _surplus_at_end(trial: optuna.Trial) -> None:
        # Checked again at the end: a dead worker's trial may have been re-queued (it keeps
        # its place in the order) while this one trained. Rare; costs one trial's work.
        if n_trials is not None and _quota_full_ahead(study, trial.number, n_trials):
            trial.set_user_attr("fail_reason", "surplus: a re-queued trial filled the quota "
                                "while this one trained")
            raise optuna.TrialPruned("surplus")

    def after(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        _echo_trial(study_, trial, echo)
        tracker(study_, trial)

    ran = 0
    current: dict[str, int] = {}  # storage id of the trial this worker runs
    started = time.monotonic()
    poll = max(1.0, min(float(storage.get_heartbeat_interval() or 5), 5.0))
    while True:
        left = None if timeout is None else timeout - (time.monotonic() - started)
        if left is not None and left <= 0:
            break
        if n_trials is not None:
            complete = _count_results(study)
            if complete >= n_trials:
                break
            if complete + _count(study, (TrialState.RUNNING,)) >= n_trials and not _count(
                    study, (TrialState.WAITING,)):
                # The quota is in flight on other workers. Don't leave: one of them may be
                # dead, and its trial is only failed and re-queued (heartbeat) by a live
                # worker once `grace_period` has passed. Wait for that, or for completion.
                time.sleep(poll if left is None else min(poll, left))
                _fail_stale_trials(study)
                continue
        _refuse_another_config(study, config, storage_url)  # see there: a creation race
        current.clear()
        try:
            # SIGTERM and Ctrl-C wait while Optuna records a trial (see `deferred_interrupts`)
            with deferred_interrupts():
                study.optimize(guarded, n_trials=1, catch=(Exception,), callbacks=[after])
        except KeyboardInterrupt:
            _queue_rerun(study, storage, current.get("id"))
            raise
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError, AssertionError):
            # AssertionError: Optuna's "Should not reach" when the others failed the trial
            # between the check in `guarded` and Optuna's tell (re-raised unless it is FAIL).
            # This worker stalled past the grace period (SIGSTOP, swap, a lost database
            # link): the others failed its trial as stale and re-queued it, so Optuna can no
            # longer tell it. Go on with the next trial; anything else is a real error.
            given_up = storage.get_trial(current["id"]) if "id" in current else None
            if given_up is None or given_up.state != TrialState.FAIL:
                raise
            echo(f"trial {given_up.number}: given up by the other workers while this one was "
                 "stalled (heartbeat older than the grace period); going on")
        except UnboundLocalError as exc:
            # A second Ctrl-C (which is not deferred) inside Optuna's tell breaks its `finally`
            # and leaves the trial RUNNING: finish that bookkeeping, then stop as asked.
            if not isinstance(exc.__context__, KeyboardInterrupt) or "id" not in current:
                raise
            with suppress(Exception):
                if not storage.get_trial(current["id"]).state.is_finished():
                    storage.set_trial_user_attr(current["id"], "fail_reason", INTERRUPTED)
                    storage.set_trial_state_values(current["id"], TrialState.FAIL)
            _queue_rerun(study, storage, current["id"])
            raise KeyboardInterrupt from None
        ran += 1
        if n_trials is not None and ran >= 3 * n_trials:
            if _count_results(study) >= n_trials:  # the others filled it meanwhile
                break
            echo(f"stopping: this worker ran {ran} trials without the study completing {n_trials}")
            raise GaveUp(_gave_up_message(study, config.name, n_trials))
        if n_trials is not None and _count_results(study) >= n_trials:
            break
    return ran


class GaveUp(WorkersFailed):
    """A worker ran 3 x n_trials trials without the study reaching its quota (trials failing)."""


GAVE_UP_EXIT = 3  # a worker process's exit code for GaveUp


def _gave_up_message(study: optuna.Study, name: str, n_trials: int) -> str:
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    reason = "see the log above"
    if failed:
        last = failed[-1]
        reason = last.user_attrs.get("fail_reason") or last.system_attrs.get("fail_reason") or reason
    return (f"study {name}: {_count_results(study)} of {n_trials} trials have a result; "
            f"{len(failed)} failed (last: {str(reason).splitlines()[0][:200]}); finished "
            "trials are kept: fix the cause and run the same command again")


def _queue_rerun(study: optuna.Study, storage, trial_id: int | None) -> None:
    """Queue an interrupted trial's settings (once Optuna has marked it FAIL), so that a resume
    trains them first: a preempted trial's point was lost, where a SIGKILLed worker's is
    re-queued by the heartbeat, and an interrupt changed what the study explored."""
    if trial_id is None:
        return
    with suppress(Exception):
        trial = storage.get_trial(trial_id)
        if (trial.state == TrialState.FAIL and trial.params
                and trial.user_attrs.get("fail_reason") == INTERRUPTED):
            study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number})


def one_gpu(visible: str | None, index: int) -> str:
    """CUDA_VISIBLE_DEVICES for a worker that takes the launcher's `index`-th visible GPU. A
    launcher confined to some GPUs (Slurm, a scheduler: "2,3", or UUIDs) gave its workers "0"
    and "1", the machine's first GPUs, which were not its own."""
    listed = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    return listed[index] if index < len(listed) else str(index)


def _worker_entry(path_or_raw, storage_url, n_trials, timeout, cache_dir, tracking, tracking_uri,
                  device_index, cpu_threads=None):
    """Entry point of a spawned worker process (binds one GPU when several are visible;
    on CPU, gets its share of the cores)."""
    if device_index is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = one_gpu(os.environ.get("CUDA_VISIBLE_DEVICES"),
                                                     device_index)
    if cpu_threads is not None:
        import torch
        torch.set_num_threads(cpu_threads)
    from dmdopt.search.config import parse_study

    config = parse_study(path_or_raw)
    prefix = f"[worker {os.getpid()}] "
    # one line, as in the launcher (cli.main): Python's default adds the warn() source line
    warnings.formatwarning = lambda message, *_args, **_kw: f"{prefix}warning: {message}\n"
    try:
        with sigterm_as_interrupt():  # for the whole life of this worker process
            worker_loop(config, storage_url=storage_url, n_trials=n_trials, timeout=timeout,
                        cache_dir=cache_dir, tracking=tracking, tracking_uri=tracking_uri,
                        echo=lambda line: print(prefix + line, flush=True))
    except KeyboardInterrupt:
        sys.exit(130)
    except GaveUp as exc:
        print(prefix + str(exc), flush=True)
        sys.exit(GAVE_UP_EXIT)
    except StorageLost as exc:
        print(prefix + str(exc), flush=True)
        sys.exit(STORAGE_LOST_EXIT)


def visible_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def run_study(config: StudyConfig, *, n_trials: int | None = None, storage: str | None = None,
              workers: int | str = 1, timeout: float | None = None, cache_dir=DEFAULT_CACHE,
              tracking: bool = True, tracking_uri: str | None = None, progress: bool = True,
              echo=print) -> optuna.Study:
    """Create or resume `config`'s study and run it to `n_trials` trials with a result.

    workers: an int, or "auto" = one per visible GPU (at least 1). With several GPUs each
    worker process sees exactly one (CUDA_VISIBLE_DEVICES).
    """
    storage_url = storage or config.storage
    n_trials = n_trials if n_trials is not None else config.n_trials
    timeout = timeout if timeout is not None else config.timeout
    gpus = visible_gpus()
    if workers == "auto":
        workers = max(1, gpus)
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers must be a positive integer or 'auto', got {workers!r}")
    try:  # a GPU study on a machine without one: this machine's mistake, before any storage
        resolve_device(config.training.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if tracking:  # a typo'd URI: refused before the reference run, not warned about after it
        from dmdopt.tracking.runs import check_tracking_uri

        check_tracking_uri(tracking_uri, storage=storage_url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, _ = prepare_study(config, storage_url=storage_url, cache_dir=cache_dir,
                             progress=progress, echo=echo, n_trials=n_trials)
    done = _count_results(study)
    if n_trials is not None and workers > 1:
        # more processes than trials left would only start up, find the quota taken and stop
        # (--workers 100000 on a finished study spawned processes until the machine choked)
        workers = max(1, min(workers, n_trials - done))
    echo(f"study {config.name}: {done} finished trial(s) in {mask_url(storage_url)}; "
         f"target {n_trials if n_trials is not None else 'until timeout'}; {workers} worker(s)")
    tracker = _Tracking(config.name, storage_url, tracking_uri, tracking)
    try:
        tracker.start(study)
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow: could not create the parent run: %s", exc)
    try:
        _run_workers(config, study, tracker, storage_url=storage_url, n_trials=n_trials,
                     timeout=timeout, cache_dir=cache_dir, tracking=tracking,
                     tracking_uri=tracking_uri, echo=echo, workers=workers, gpus=gpus)
    except BaseException:  # Ctrl-C, SIGTERM, workers that gave up or died, a storage lost
        tracker.abandon(study)
        raise
    tracker.finish(study)
    if timeout is not None and n_trials is not None and (done := _count_results(study)) < n_trials:
        echo(f"stopped at the timeout ({timeout:g} s) with {done} of {n_trials} trials finished; "
             "run the same command again to go on")
    return study


def _run_workers(config: StudyConfig, study: optuna.Study, tracker: _Tracking, *, storage_url,
                 n_trials, timeout, cache_dir, tracking, tracking_uri, echo, workers, gpus) -> None:
    """This process as the one worker, or `workers` spawned processes until they end."""
    if workers == 1:
        worker_loop(config, storage_url=storage_url, n_trials=n_trials, timeout=timeout,
                    cache_dir=cache_dir, tracking=tracking, tracking_uri=tracking_uri, echo=echo,
                    tracker=tracker)
    else:
        ctx = mp.get_context("spawn")
        # K CPU workers each using every core (torch's default) oversubscribe the machine:
        # give each its share, unless the user chose a thread count.
        cpu_threads = None
        if not gpus and "OMP_NUM_THREADS" not in os.environ:
            cpu_threads = max(1, (os.cpu_count() or 1) // workers)
        procs = [ctx.Process(target=_worker_entry, daemon=False,
                             args=(config.raw, storage_url, n_trials, timeout, str(cache_dir),
                                   tracking, tracking_uri, (i % gpus) if gpus > 1 else None,
                                   cpu_threads))
                 for i in range(workers)]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        except KeyboardInterrupt as exc:
            if isinstance(exc, Terminated):  # only this process got SIGTERM: pass it on
                for p in procs:
                    if p.is_alive():
                        p.terminate()
            # Workers mark their trials FAIL and exit within seconds; give them 30 s in all,
            # then stop the rest, so that none is left training once the launcher is gone.
            deadline = time.monotonic() + 30
            for p in procs:
                if p.pid is not None:
                    p.join(timeout=max(0.0, deadline - time.monotonic()))
            for p in procs:
                if p.pid is not None and p.is_alive():
                    p.kill()  # SIGTERM was theirs already: it is one-shot, then ignored
                    p.join(timeout=5)
            raise
        try:
            complete = _count_results(study)
        except Exception as exc:
            if (cause := _storage_failure(exc)) is None:
                raise
            raise _storage_lost(cause, storage_url) from None
        if any(p.exitcode == GAVE_UP_EXIT for p in procs) and n_trials is not None and complete < n_trials:
            raise GaveUp(_gave_up_message(study, config.name, n_trials))
        if any(p.exitcode == STORAGE_LOST_EXIT for p in procs) and (n_trials is None or complete < n_trials):
            raise StorageLost(f"the Optuna storage {mask_url(storage_url)} failed while the study "
                              "ran (the workers' lines above say how); finished trials are kept: "
                              "run the same command again once it is back")
        died = [p.exitcode for p in procs if p.exitcode != 0]
        if died and (n_trials is None or complete < n_trials):
            codes = ", ".join(f"signal {-c}" if c < 0 else f"exit code {c}" for c in died)
            of = f" of {n_trials}" if n_trials is not None else ""
            raise WorkersFailed(f"{len(died)} of {workers} worker process(es) died ({codes}) with "
                                f"{complete}{of} trials finished; finished trials are kept: run "
                                "the same command again to resume")
