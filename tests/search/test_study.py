"""The study engine on a real SQLite storage: resume, interrupt, divergence, workers, constraint."""

from __future__ import annotations

import copy
import math
import re

import optuna
import pytest
import torch
from optuna.trial import TrialState
from processes import alive
from study_files import tiny_study_toml

from dmdopt.errors import UserError, WorkersFailed
from dmdopt.search import load_study_file, run_study
from dmdopt.search import objective as objective_module
from dmdopt.search.sampler import TrialSeededSampler
from dmdopt.search.storage import load_study
from dmdopt.search.summary import summarize


@pytest.fixture
def study_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config_for(tmp_path, **kwargs):
    path = tmp_path / "s.toml"
    path.write_text(tiny_study_toml(**kwargs))
    return load_study_file(path)


def complete(study):
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def run(config, **kwargs):
    kwargs.setdefault("tracking", False)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("echo", lambda *_: None)
    return run_study(config, **kwargs)


def test_a_crash_before_the_reference_leaves_no_study_behind(study_dir, monkeypatch):
    """The empty study of a launch that failed before its reference would make the corrected
    file meet "a different configuration"; it is deleted, and the corrected file runs."""
    import dmdopt.search.study as study_module

    def crash(*args, **kwargs):
        raise MemoryError("no room for the reference")

    config = config_for(study_dir, n_trials=1)
    with monkeypatch.context() as patch:
        patch.setattr(study_module, "reference_run", crash)
        with pytest.raises(MemoryError):
            run(config)
    assert not optuna.get_all_study_names(storage=config.storage)
    corrected = config_for(study_dir, n_trials=1, training='optimizer = "adam"\nlr = 0.02\n'
                           'max_steps = 60\neval_every = 10')
    assert len(complete(run(corrected))) == 1


def test_a_study_deleted_by_another_launcher_during_the_reference_is_created_again(study_dir,
                                                                                 monkeypatch):
    """Launchers start together; one stopped before its reference deletes the empty study
    (above) while another trains its reference: that one lost it, with a KeyError traceback."""
    import dmdopt.search.study as study_module

    config = config_for(study_dir, n_trials=1)
    real = study_module.reference_run

    def reference_while_another_launcher_drops(config_, dataset):
        reference = real(config_, dataset)
        optuna.delete_study(study_name=config_.name, storage=config_.storage)
        return reference

    monkeypatch.setattr(study_module, "reference_run", reference_while_another_launcher_drops)
    study = run(config)
    assert len(complete(study)) == 1 and study.user_attrs["reference"]["cost_bpe"] == 60
    assert study.user_attrs["config_digest"] and summarize(study)["study_uid"]


def test_study_runs_and_records_reference_and_objectives(study_dir):
    config = config_for(study_dir, n_trials=3)
    study = run(config)
    trials = complete(study)
    assert len(trials) == 3
    assert study.metric_names == ["cost_bpe", "val_rel_l2"]
    ref = study.user_attrs["reference"]
    assert ref["cost_bpe"] == 60 and 0 < ref["val_rel_l2"] < 1
    # the reference's first passage: where its own curve first reaches its final error
    passage = next(c for c, e in ref["curve"] if e <= ref["val_rel_l2"])
    assert 0 < ref["first_passage_bpe"] == passage <= ref["cost_bpe"]
    for t in trials:
        cost, err = t.values
        assert cost > 0 and 0 < err < 1
        assert t.user_attrs["rank_effective"] <= t.params["window"] - 2
        assert math.isclose(t.user_attrs["speedup"], ref["cost_bpe"] / cost)
        assert math.isclose(t.user_attrs["speedup_first_passage"], ref["first_passage_bpe"] / cost)
        assert t.user_attrs["curve"][0][0] == 0.0
        assert "dmdopt" in t.user_attrs["code"]["versions"]  # what an export's provenance names
        assert t.user_attrs["cpu_threads"] == torch.get_num_threads()  # production compares it
        assert t.user_attrs["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # and it
    assert (study_dir / "dmdopt-runs" / "optuna.db").exists()
    uid = summarize(study)["study_uid"]  # its identity in MLflow, beside its name
    assert isinstance(uid, str) and len(uid) == 32
    assert summarize(run(config))["study_uid"] == uid  # a resume keeps it


def test_cost_objective_is_the_cost_to_the_reference_error(study_dir):
    """Time to accuracy: the first curve point at or below the reference's error (the whole
    spend only for a trial that never gets there)."""
    study = run(config_for(study_dir, n_trials=3))
    ref = study.user_attrs["reference"]["val_rel_l2"]
    done = complete(study)
    for t in done:
        attrs = t.user_attrs
        first = next((c for c, e in attrs["curve"] if e <= ref), None)
        assert attrs["reached_reference"] == (first is not None)
        expected = first if first is not None else attrs["cost_total"]
        assert t.values[0] == pytest.approx(expected, abs=1e-3)  # curve costs: 4 decimals
    assert any(t.values[0] < t.user_attrs["cost_total"] for t in done)  # the case is exercised


def test_rerun_resumes_and_keeps_finished_trials(study_dir):
    config = config_for(study_dir, n_trials=2)
    first = {t.number: t.values for t in complete(run(config))}
    study = run(config, n_trials=3)
    after = {t.number: t.values for t in complete(study)}
    assert len(after) == 3
    assert all(after[n] == v for n, v in first.items())
    # re-running a finished study runs nothing more
    assert len(complete(run(config, n_trials=3))) == 3


def test_a_file_that_means_the_same_settings_resumes_however_it_spells_them(study_dir):
    """`high = 200` for `200.0`, or a default written out, was "a different configuration":
    the user was told to start a new study and lost the resume."""
    config = config_for(study_dir, n_trials=1)
    run(config)
    path = study_dir / "s.toml"
    text = path.read_text().replace("high = 200.0", "high = 200").replace(
        "lr = 0.01", "lr = 0.01\nmomentum = 0.0")
    text = text.replace("n_samples = 60", "n_samples = 60\nseed = 0")  # ProblemConfig's default
    path.write_text(text)
    respelled = load_study_file(path)
    assert len(complete(run(respelled, n_trials=2))) == 2
    # a real change is still refused, and named in the file's spelling of its meaning
    path.write_text(text.replace("high = 200", "high = 300"))
    with pytest.raises(UserError, match=r"search\.horizon\.high: 200\.0 in the study, 300\.0 in the file"):
        run(load_study_file(path), n_trials=3)


def test_a_stored_file_this_dmdopt_refuses_is_compared_as_written(study_dir):
    """Its side fell back to the text while the file's was read with every default filled in,
    so the refusal listed defaults as differences and hid the real one behind '...'."""
    import json

    from dmdopt.search.study import config_differences

    config = config_for(study_dir, n_trials=1)
    stored = json.loads(json.dumps(config.raw))
    stored["problem"]["source_x"] = [5.0, 9.0]  # accepted by an earlier dmdopt, refused now
    assert config_differences(stored, config) == \
        "problem.source_x: [5.0, 9.0] in the study, not set in the file"
    # and numbers of [study] in one spelling too
    text = (study_dir / "s.toml").read_text().replace('seed = 0', 'seed = 0\nmax_error_ratio = 2')
    (study_dir / "s.toml").write_text(text)
    two = load_study_file(study_dir / "s.toml")
    (study_dir / "s.toml").write_text(text.replace("max_error_ratio = 2", "max_error_ratio = 2.0"))
    assert config_differences(two.raw, load_study_file(study_dir / "s.toml")) == ""


@pytest.mark.parametrize("section, key, theirs", [("model", "activation", "relu"),
                                                 ("dmd", "grouping", "global"),
                                                 ("training", "seed", 7),
                                                 ("problem", "source_width", 0.07)])
def test_a_study_made_by_a_dmdopt_with_other_defaults_is_refused_before_any_training(
        study_dir, monkeypatch, section, key, theirs):
    """The digest covers only what the file says: a worker whose dmdopt fills the rest with
    other defaults (or whose solver builds another dataset) trained another problem into the
    same front. It is one line naming the field and both values; the finished trials stay."""
    from dmdopt.errors import UserError

    config = config_for(study_dir, n_trials=1)
    study = run(config)
    resolved = study.user_attrs["resolved"]
    assert resolved["model"] == config.model.to_dict()
    assert resolved["dataset_hash"] and resolved["dmd"]["grouping"] == "layer"
    assert key not in config.raw.get(section, {})  # the file leaves it to the defaults
    resolved[section][key] = theirs  # as a creator with another default wrote it
    study.set_user_attr("resolved", resolved)
    count = count_training(monkeypatch)
    with pytest.raises(UserError, match=rf"{section}\.{key} = {theirs!r}; this one gives"):
        run(config, n_trials=2)
    assert count["n"] == 0 and len(complete(load_study(config.name, config.storage))) == 1
    resolved = study.user_attrs["resolved"] | {"dataset_hash": "0" * 16}
    resolved[section] = run_resolved(config)[section]
    study.set_user_attr("resolved", resolved)
    with pytest.raises(UserError, match="whose solver builds dataset 0000000000000000"):
        run(config, n_trials=2)
    study.set_user_attr("resolved", run_resolved(config))  # the same dmdopt: it resumes
    assert len(complete(run(config, n_trials=2))) == 2


def test_fields_added_between_versions_and_searched_knobs_are_not_compared(study_dir):
    """A field one version has and the other lacks (`accept_rows` was added so) keeps the older
    behaviour by default, and a searched knob has no study-wide value: neither may make a
    study un-resumable (the first version of this check refused both)."""
    from dmdopt.errors import UserError
    from dmdopt.search.study import _check_resolved

    search = '[search]\ngrowing = ["drop", "drift"]\n[search.lr]\nlow = 0.001\nhigh = 0.1'
    config = config_for(study_dir, search=search)
    study = optuna.create_study(directions=["minimize", "minimize"])
    here = run_resolved(config)
    assert "growing" not in here["dmd"] and "lr" not in here["training"]
    assert here["dmd"]["line_search"]  # the default ladder: not searched here
    older = copy.deepcopy(here)
    del older["training"]["accept_rows"], older["problem"]["source_width"]
    older["dataset_hash"] = "0" * 16  # a field fewer: another hash for the same data
    older["dmd"]["growing"], older["training"]["lr"] = "drop", 5.0  # as other defaults had it
    study.set_user_attr("resolved", older)
    _check_resolved(study, config, "sqlite://")  # nothing to refuse
    older["training"]["max_steps"] = 61
    study.set_user_attr("resolved", older)
    with pytest.raises(UserError, match="training.max_steps = 61; this one gives 60"):
        _check_resolved(study, config, "sqlite://")


def run_resolved(config):
    import json

    from dmdopt.search.study import resolved_settings

    return json.loads(json.dumps(resolved_settings(config), default=str))


def test_interrupt_keeps_finished_trials_then_resumes(study_dir, monkeypatch, capfd):
    config = config_for(study_dir, n_trials=3)
    real_train = objective_module.train
    calls = {"n": 0}

    def flaky_train(**kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # call 1 is the reference run, call 2 trial 0
            raise KeyboardInterrupt
        return real_train(**kwargs)

    monkeypatch.setattr(objective_module, "train", flaky_train)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "failed with value None" not in err, err
    said = [line for line in err.splitlines() if re.search(r"Trial \d+ ", line)]
    assert len(said) == 1 and "interrupted: marked FAIL" in said[0], err  # one line, not 2 + 30
    study = load_study("tiny", config.storage)
    assert len(complete(study)) == 1
    cut = next(t for t in study.trials if t.state == TrialState.FAIL)
    monkeypatch.setattr(objective_module, "train", real_train)
    resumed = complete(run(config))
    assert len(resumed) == 3
    # the interrupted trial's settings are trained on resume (they were dropped; a SIGKILLed
    # worker's trial is re-queued by the heartbeat): an interrupt does not change the study
    rerun = [t for t in resumed if t.user_attrs.get("rerun_of") == cut.number]
    assert len(rerun) == 1 and rerun[0].params == cut.params
    # the summary (and MLflow's fail_reason tag) links the two both ways
    rows = {r["number"]: r for r in summarize(load_study("tiny", config.storage))["trials"]}
    assert rows[cut.number]["user_attrs"]["fail_reason"].endswith(f"re-run as trial {rerun[0].number}")


def count_training(monkeypatch) -> dict:
    """From now on, count the objective's calls of `train` in the returned dict's "n"."""
    calls = {"n": 0}
    real_train = objective_module.train

    def counting_train(**kwargs):
        calls["n"] += 1
        return real_train(**kwargs)

    monkeypatch.setattr(objective_module, "train", counting_train)
    return calls


def test_repeated_settings_reuse_the_earlier_result_without_training(study_dir, monkeypatch):
    config = config_for(study_dir, n_trials=1, extra="max_error_ratio = 2.0")
    first = complete(run(config))[0]
    # a sampler proposing trial 0's settings again (NSGA-II does): enqueue them
    load_study("tiny", config.storage).enqueue_trial(first.params)
    calls = count_training(monkeypatch)
    study = run(config, n_trials=2)
    again = complete(study)[1]
    assert calls["n"] == 0  # the reference is stored, and trial 1 is trial 0's settings
    assert again.params == first.params and again.values == first.values
    assert again.user_attrs["duplicate_of"] == first.number
    assert again.user_attrs["curve"] == first.user_attrs["curve"]
    assert (again.system_attrs["constraints:max_error_ratio"]
            == first.system_attrs["constraints:max_error_ratio"])
    # Optuna's front has both; the summary's (Pareto table, MLflow, dashboard) lists the point once
    assert {t.number for t in study.best_trials} == {first.number, again.number}
    assert summarize(study)["pareto"] == [first.number]


def test_reuse_compares_effective_settings_not_sampled_parameters(study_dir, monkeypatch):
    from dmdopt.search.study import prepare_study

    config = config_for(study_dir, n_trials=4)
    study, _ = prepare_study(config, storage_url=config.storage, progress=False,
                             echo=lambda *_: None)  # the study and its reference, no trial yet
    # an `inf` horizon ignores the sampled horizon value; rank 6 is clipped to window - 2 = 4,
    # the most modes 6 snapshots support (a clip to window - 1 trained rank 5, the same fit)
    study.enqueue_trial({"window": 8, "rank": 3, "horizon": 10.0, "horizon_inf": True})
    study.enqueue_trial({"window": 8, "rank": 3, "horizon": 50.0, "horizon_inf": True})
    study.enqueue_trial({"window": 6, "rank": 4, "horizon": 20.0, "horizon_inf": False})
    study.enqueue_trial({"window": 6, "rank": 6, "horizon": 20.0, "horizon_inf": False})
    calls = count_training(monkeypatch)
    trials = complete(run(config))
    assert calls["n"] == 2
    assert [t.user_attrs.get("duplicate_of") for t in trials] == [None, 0, None, 2]
    assert trials[1].values == trials[0].values and trials[3].values == trials[2].values


@pytest.mark.parametrize("timeout", [None, 600.0])  # with a timeout too: it printed "done"
def test_diverging_trials_fail_with_reason_and_study_goes_on(study_dir, timeout):
    config = config_for(study_dir, n_trials=1,
                        training='optimizer = "sgd"\nlr = 0.01\nmax_steps = 30\neval_every = 10',
                        search="[search.lr]\nlow = 1e4\nhigh = 1e5\nlog = true\n")
    # the worker gives up after 3 x n_trials: an error naming the cause, not "done" (exit 0)
    with pytest.raises(WorkersFailed, match=r"0 of 1 trials have a result; 3 failed \(last: diverged"):
        run(config, timeout=timeout)
    study = load_study("tiny", config.storage)
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert len(failed) == 3 and not complete(study)
    assert all("diverged" in t.user_attrs["fail_reason"] for t in failed)


@pytest.mark.slow
def test_worker_processes_that_give_up_are_one_error_line(study_dir, capsys):
    """--workers processes whose trials all fail exit with GAVE_UP_EXIT; the launcher turns that
    into one line and exit 1 (it read as "died" or, with a timeout, as "done")."""
    from dmdopt.cli import main

    (study_dir / "s.toml").write_text(tiny_study_toml(
        n_trials=1, training='optimizer = "sgd"\nlr = 0.01\nmax_steps = 30\neval_every = 10',
        search="[search.lr]\nlow = 1e4\nhigh = 1e5\nlog = true\n"))
    assert main(["study", "run", "s.toml", "--workers", "2", "--no-mlflow", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dmdopt: error: study tiny: 0 of 1 trials have a result; ")
    assert "(last: diverged" in err[-1]


@pytest.mark.slow
def test_two_worker_processes_no_duplicate_or_lost_trials(study_dir):
    config = config_for(study_dir, n_trials=4)
    run(config, workers=2)
    study = load_study("tiny", config.storage)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers)))
    assert len(complete(study)) == 4
    assert all(t.values is not None for t in complete(study))
    # both workers read the same seed from the file: their draws must still differ
    settings = [tuple(sorted(t.params.items())) for t in complete(study)]
    assert len(set(settings)) == len(settings)
    assert not any("duplicate_of" in t.user_attrs for t in complete(study))


def test_constraint_marks_infeasible_trials(study_dir):
    config = config_for(study_dir, n_trials=2, extra="max_error_ratio = 0.001")
    study = run(config)
    for t in complete(study):
        constraint = t.system_attrs["constraints:max_error_ratio"]
        assert constraint > 0  # error far above 0.001 x reference: infeasible
    assert study.best_trials == []  # Optuna ignores infeasible trials on the front
    from dmdopt.errors import UserError
    from dmdopt.export import export_tuned_config

    with pytest.raises(UserError, match=r"none of the 2 COMPLETE.*max_error_ratio = 0.001.*--trial"):
        export_tuned_config(summarize(study), study_dir / "t.toml")


def test_single_objective_mode_prunes_or_reaches_target(study_dir, capsys):
    from dmdopt.cli import main

    config = config_for(study_dir, n_trials=3, extra='mode = "cost_to_target"\ntarget_error = 0.9')
    study = run(config)
    assert len(study.directions) == 1
    done = complete(study)
    assert done
    for t in done:  # stopped at the target: its cost is what it spent, not a miss's 2x
        assert t.user_attrs["curve"][-1][1] <= 0.9
        assert t.value == t.user_attrs["cost_total"] and t.user_attrs["backprop_steps"] < 60
    capsys.readouterr()
    assert main(["study", "status", "tiny", "--storage", config.storage]) == 0
    assert f"best       trial {study.best_trial.number}  cost" in capsys.readouterr().out
    assert isinstance(study.sampler, TrialSeededSampler)
    assert isinstance(study.sampler._factory(0), optuna.samplers.RandomSampler)


def test_a_target_met_at_the_start_is_reached_by_the_reference_at_its_first_evaluation(
        study_dir, tmp_path):
    """A target at or above where training starts was 'reached' by the reference at cost 0,
    while a trial stops only at an evaluation after a step: every speed-up was 0, and the
    export of the best trial refused ('speedup must be > 0')."""
    from dmdopt.export import export_tuned_config

    config = config_for(study_dir, n_trials=2, extra='mode = "cost_to_target"\ntarget_error = 50')
    study = run(config)
    to_target = study.user_attrs["reference"]["to_target"]
    assert to_target["reached"] and to_target["cost_bpe"] == 10  # its first evaluation
    summary = summarize(study, storage_url=config.storage)
    tuned = export_tuned_config(summary, tmp_path / "t.toml", number=study.best_trial.number)
    assert tuned.expected["speedup"] > 0


def test_cost_to_target_prunes_only_trials_that_can_no_longer_win(study_dir):
    config = config_for(study_dir, n_trials=8, extra='mode = "cost_to_target"',
                        training='optimizer = "adam"\nlr = 0.003\nmax_steps = 70\neval_every = 5')
    study = run(config)
    target = study.user_attrs["reference"]["val_rel_l2"]
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [t.value for t in trials]  # the rule did something in this study
    assert len(trials) == 8  # pruned trials are evaluated settings: they count toward n_trials
    for t in pruned:  # one worker: the bound is the best of the trials finished before it
        best = min((o for o in trials if o.state == TrialState.COMPLETE and o.number < t.number),
                   key=lambda o: (o.value, o.number))
        assert t.user_attrs["pruned_at_cost"] >= best.value
        assert t.intermediate_values[max(t.intermediate_values)] > target  # short of the target
        assert t.user_attrs["fail_reason"].endswith(
            f"past the {best.value:.0f} bpe of the best trial so far ({best.number})")


def _quota_study(tmp_path, n_complete: int):
    """A real SQLite study with `n_complete` finished trials and one killed trial after them."""
    from optuna.distributions import FloatDistribution

    storage = f"sqlite:///{tmp_path}/quota.db"
    study = optuna.create_study(study_name="quota", storage=storage, directions=["minimize"])
    dist = {"x": FloatDistribution(0, 1)}
    for i in range(n_complete):
        study.add_trial(optuna.trial.create_trial(params={"x": i / 10}, distributions=dist,
                                                  values=[float(i)]))
    killed = study.ask(dist)
    study.tell(killed, state=TrialState.FAIL)  # what fail_stale_trials does to a dead worker's
    return study, dist, study.get_trials(deepcopy=False)[-1]


def test_quota_order_lets_a_retry_take_its_killed_trials_place(tmp_path):
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from dmdopt.search.study import _quota_full_ahead

    study, dist, killed = _quota_study(tmp_path, 5)  # quota 6: trials 0-4 done, 5 killed
    # A new trial that started in the instant between the kill being noticed and the retry
    # being queued: it saw a free place, and trains.
    newer = study.ask(dist)
    assert not _quota_full_ahead(study, newer.number, 6)
    # The retry of trial 5 is queued after it, but keeps trial 5's place: it runs...
    RetryHeartbeatStaleTrialCallback(max_retry=3)(study, killed)
    retry = study.ask(dist)
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(
        study.get_trials(deepcopy=False)[retry.number]) == killed.number
    assert not _quota_full_ahead(study, retry.number, 6)
    # ...and the newer one, checked again when it ends, is the surplus.
    assert _quota_full_ahead(study, newer.number, 6)


def test_quota_counts_queued_trials_ahead(tmp_path):
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from dmdopt.search.study import _quota_full_ahead

    study, dist, killed = _quota_study(tmp_path, 5)
    RetryHeartbeatStaleTrialCallback(max_retry=3)(study, killed)  # queued, not yet picked up
    # Another worker's new trial, created while the retry still waits in the queue: the retry
    # will run, so this one would be the 7th.
    newer_id = study._storage.create_new_trial(study._study_id)
    newer = study._storage.get_trial(newer_id)
    assert newer.state == TrialState.RUNNING
    assert _quota_full_ahead(study, newer.number, 6)
    retry = study.ask(dist)  # the queued retry, picked up
    assert not _quota_full_ahead(study, retry.number, 6)
    # With a larger quota both run; the killed (FAIL) trial never holds a place.
    assert not _quota_full_ahead(study, newer.number, 7)


def test_a_retry_ending_logs_its_dead_origin_too(tmp_path):
    """The killed trial is failed by the heartbeat, so no worker's callback saw it end: its
    retry's callback logs it (with a reason) rather than leaving it to `sync-mlflow`, and so
    for every trial of a chain whose retries were killed as well. (The callback logs every
    finished trial MLflow lacks, as `log_missing` does.)"""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from dmdopt.search.study import _Tracking

    study, dist, killed = _quota_study(tmp_path, 2)
    RetryHeartbeatStaleTrialCallback(max_retry=3)(study, killed)
    retry = study.ask(dist)
    study.tell(retry, state=TrialState.FAIL)  # the retry's worker dies too
    RetryHeartbeatStaleTrialCallback(max_retry=3)(study, study.get_trials(deepcopy=False)[-1])
    last = study.ask(dist)
    study.tell(last, [0.5])
    logged = {}

    class Recorder:  # what StudyTracker.log_missing would log, without MLflow
        def log_missing(self, summary):
            for t in summary["trials"]:
                if t["state"] in ("COMPLETE", "FAIL", "PRUNED") and t["number"] not in logged:
                    logged[t["number"]] = (t["state"], t["user_attrs"].get("fail_reason"))
            return len(logged)

        def refresh_parent(self, summary):
            pass

        def sync(self, summary):  # StudyTracker.sync: log_missing, then the parent
            self.log_missing(summary)
            self.refresh_parent(summary)

    tracking = _Tracking("quota", f"sqlite:///{tmp_path}/quota.db", None, enabled=False)
    tracking.tracker = Recorder()
    tracking(study, study.get_trials(deepcopy=False)[last.number])
    reason = "its worker stopped heart-beating; re-run as trial {}".format
    assert logged[last.number] == ("COMPLETE", None)
    assert logged[killed.number] == ("FAIL", reason(retry.number))
    assert logged[retry.number] == ("FAIL", reason(last.number))
    # a heartbeat re-run names the trial it re-ran as an interrupt's re-run does (rerun_of)
    rows = {r["number"]: r for r in summarize(study)["trials"]}
    assert rows[retry.number]["user_attrs"]["rerun_of"] == killed.number
    assert rows[last.number]["user_attrs"]["rerun_of"] == retry.number


BUSY_STORAGE = "sqlite:///dmdopt-runs/optuna.db"


def _two_busy_workers(study_dir):
    """`dmdopt study run --workers 2` in its own session, once both workers train a trial
    (4,000-step trials: they are still training when the caller acts). -> (launcher, pids)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from contextlib import suppress

    training = 'optimizer = "adam"\nlr = 0.001\nmax_steps = 4000\neval_every = 100'
    (study_dir / "s.toml").write_text(tiny_study_toml(n_trials=6, training=training))
    cmd = [sys.executable, "-m", "dmdopt", "study", "run", "s.toml", "--workers", "2",
           "--no-mlflow", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=study_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    deadline = time.monotonic() + 240
    workers: set[int] = set()
    while len(workers) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            # a live launcher past the deadline is killed first: communicate() would wait on it
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"two workers never trained at once (exit {proc.returncode}):\n"
                        f"{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.5)
        try:
            trials = load_study("tiny", BUSY_STORAGE).get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001 - the study is not created yet
            continue
        workers = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials
                   if t.state == TrialState.RUNNING and "dmd" in t.user_attrs}
    return proc, workers


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "group"])
def test_sigterm_stops_the_workers_like_ctrl_c(study_dir, target):
    """`kill PID` of `dmdopt study run --workers 2` (a scheduler's stop, a preempted machine)
    must not leave its worker processes training on, and `timeout` / `kill -TERM -PGID` /
    Slurm, which signal every process of the group (the launcher then passes it on: a second
    SIGTERM), must not break Optuna's bookkeeping: no trial left RUNNING, no traceback."""
    import os
    import signal
    import time

    proc, workers = _two_busy_workers(study_dir)
    if target == "launcher":
        proc.send_signal(signal.SIGTERM)  # as `kill PID` does
    else:
        os.killpg(proc.pid, signal.SIGTERM)  # as `timeout` and `kill -TERM -PGID` do
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    for pid in workers:
        for _ in range(40):
            if not alive(pid):
                break
            time.sleep(0.25)
        assert not alive(pid), f"worker {pid} still running after the launcher was stopped"
    states = [t.state for t in load_study("tiny", BUSY_STORAGE).get_trials(deepcopy=False)]
    assert TrialState.RUNNING not in states and states.count(TrialState.FAIL) >= 2


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_an_interrupt_while_optuna_records_a_trial_waits_for_the_record(signum):
    """SIGTERM or Ctrl-C landing while Optuna writes a finished trial must not leave it RUNNING
    (Optuna's own `finally` then raised an UnboundLocalError that hid the interrupt): the
    worker loop defers it to the end of the bookkeeping, while one during training stops the
    trial at once, and the caller's SIGINT handler is back afterwards."""
    import os
    import signal

    from dmdopt._util import deferred_interrupts, interruptible, sigterm_as_interrupt

    sig = getattr(signal, signum)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    write = storage.set_trial_state_values

    def signalled_write(*args, **kwargs):
        os.kill(os.getpid(), sig)  # delivered here, mid-bookkeeping
        return write(*args, **kwargs)

    sigint_before = signal.getsignal(signal.SIGINT)
    storage.set_trial_state_values = signalled_write
    with sigterm_as_interrupt():
        with pytest.raises(KeyboardInterrupt), deferred_interrupts():
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1, catch=(Exception,))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]

    storage.set_trial_state_values = write

    def training(trial):
        with interruptible():
            trial.suggest_float("x", 0, 1)
            os.kill(os.getpid(), sig)
            raise AssertionError("an interrupt during training must stop it")

    with sigterm_as_interrupt():
        with pytest.raises(KeyboardInterrupt), deferred_interrupts():
            study.optimize(training, n_trials=1, catch=(Exception,))
    assert [t.state for t in study.get_trials()][-1] == TrialState.FAIL
    assert signal.getsignal(signal.SIGINT) is sigint_before


def test_deferred_interrupts_leave_no_state_behind():
    """A second Ctrl-C raises at once and leaves nothing pending for the next study; a caller's
    own SIGINT handler is called, not replaced; off the main thread the blocks do nothing."""
    import os
    import signal
    import threading

    from dmdopt import _util
    from dmdopt._util import deferred_interrupts, interruptible

    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        os.kill(os.getpid(), signal.SIGINT)  # noted
        os.kill(os.getpid(), signal.SIGINT)  # the user insists: raised here
        raise AssertionError("the second Ctrl-C must raise at once")
    assert _util._TERM == {"deferred": False, "pending": None}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with deferred_interrupts():
        pass  # a later study starts clean: nothing left to raise

    with pytest.raises(KeyboardInterrupt) as info, deferred_interrupts():
        os.kill(os.getpid(), signal.SIGINT)  # noted, then an error (a stalled worker's) ends it
        raise ValueError("the trial was given up")
    assert isinstance(info.value.__cause__, ValueError)  # the interrupt is not lost to it
    assert _util._TERM == {"deferred": False, "pending": None}

    with deferred_interrupts(), interruptible(), deferred_interrupts():
        pass  # nested the way worker_loop nests them: each restores what it found
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert _util._TERM == {"deferred": False, "pending": None}

    calls = []
    previous = signal.signal(signal.SIGINT, lambda *_: calls.append(1))
    try:
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
        assert calls == [1]
    finally:
        signal.signal(signal.SIGINT, previous)

    seen = []

    def in_thread():
        with deferred_interrupts():
            seen.append(dict(_util._TERM))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [{"deferred": False, "pending": None}]


def test_summary_of_a_study_with_a_waiting_and_a_pruned_trial(tmp_path):
    """A re-queued trial (WAITING, no datetimes) must not break the summary, and a PRUNED
    trial's Optuna value (its last reported val error) is not an objective value."""
    from optuna.distributions import FloatDistribution

    study = optuna.create_study(study_name="w", storage=f"sqlite:///{tmp_path}/w.db",
                                directions=["minimize", "minimize"])
    study.set_user_attr("reference", {"cost_bpe": 100.0, "val_rel_l2": 0.5})
    dist = {"window": FloatDistribution(5, 60)}
    study.add_trial(optuna.trial.create_trial(params={"window": 20}, distributions=dist,
                                              values=[50.0, 0.4]))
    study.add_trial(optuna.trial.create_trial(params={"window": 30}, distributions=dist,
                                              state=TrialState.PRUNED, intermediate_values={10: 0.6}))
    study.enqueue_trial({"window": 40})
    summary = summarize(study)
    by_number = {r["number"]: r for r in summary["trials"]}
    assert [r["state"] for r in summary["trials"]] == ["COMPLETE", "PRUNED", "WAITING"]
    assert by_number[1]["values"] is None and by_number[0]["values"] == [50.0, 0.4]
    assert summary["pareto"] == [0] and len(summary["hypervolume_history"]) == 1

    single = optuna.create_study(study_name="p", storage=f"sqlite:///{tmp_path}/w.db")
    trial = single.ask(dist)
    trial.report(0.6, 10)
    single.tell(trial, state=TrialState.PRUNED)  # Optuna stores 0.6 as the trial's value
    assert single.trials[0].values == [0.6]
    assert summarize(single)["trials"][0]["values"] is None


@pytest.mark.slow
def test_workers_killed_before_the_quota_is_an_error_not_done(study_dir):
    """Workers dying (OOM killer, SIGKILL) must not end `study run` with "done" and exit 0."""
    import os
    import signal

    proc, workers = _two_busy_workers(study_dir)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 1, (out, err)
    assert "done" not in out and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "dmdopt: error: 2 of 2 worker process(es) died (signal 9, signal 9) with ")


def test_a_trial_given_up_by_other_workers_does_not_stop_this_one(study_dir, monkeypatch, capfd):
    """A worker stalled past the grace period (SIGSTOP, swap, a lost database link) finds its
    trial failed by the others; Optuna then cannot tell it. The worker goes on."""
    config = config_for(study_dir, n_trials=2)
    real_train = objective_module.train
    calls = {"n": 0}

    def stalled_train(**kwargs):
        calls["n"] += 1
        result = real_train(**kwargs)
        if calls["n"] == 2:  # trial 0 (call 1 is the reference): failed by "another worker"
            study = load_study("tiny", config.storage)
            (running,) = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            study._storage.set_trial_state_values(running._trial_id, TrialState.FAIL)
        return result

    monkeypatch.setattr(objective_module, "train", stalled_train)
    study = run(config, echo=print)
    assert "trial 0: given up by the other workers" in capfd.readouterr().out
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states[0] == TrialState.FAIL and states.count(TrialState.COMPLETE) == 2


def test_a_reference_that_ends_no_better_than_it_started_is_a_user_error(study_dir, monkeypatch):
    from dmdopt.errors import UserError
    from dmdopt.search import study as study_module

    config = config_for(study_dir)
    real = study_module.reference_run

    def worse(config, dataset):
        reference = real(config, dataset)
        return reference | {"val_rel_l2": reference["curve"][0][1] * 1.2}

    monkeypatch.setattr(study_module, "reference_run", worse)
    with pytest.raises(UserError, match=r"training: plain adam at lr 0.01 for 60 steps ends at "
                       r"validation error .*, no better than where it started"):
        run(config)
    monkeypatch.setattr(study_module, "reference_run", real)
    assert len(complete(run(config))) == 3  # the same file runs once the cause is fixed


def test_a_trial_given_up_after_its_last_write_does_not_stop_this_one(study_dir, monkeypatch, capfd):
    """The same, when the others fail the trial after the objective's last storage write:
    Optuna's tell then met its own "Should not reach" assertion."""
    config = config_for(study_dir, n_trials=2)
    real_call, calls = objective_module.Objective.__call__, {"n": 0}

    def stalled_call(self, trial):
        values = real_call(self, trial)
        calls["n"] += 1
        if calls["n"] == 1:  # trial 0, finished training and recorded: failed by "another worker"
            trial.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return values

    monkeypatch.setattr(objective_module.Objective, "__call__", stalled_call)
    study = run(config, echo=print)
    assert "trial 0: given up by the other workers" in capfd.readouterr().out
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states[0] == TrialState.FAIL and states.count(TrialState.COMPLETE) == 2


def test_only_cost_bound_prunes_count_toward_the_quota(tmp_path):
    """Trials an earlier pruner (the median rule) stopped, or surplus ones, are no results."""
    from dmdopt.search.study import _count_results

    study = optuna.create_study(study_name="q", storage=f"sqlite:///{tmp_path}/q.db")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for attrs, state in [({}, TrialState.COMPLETE), ({}, TrialState.PRUNED),
                         ({"fail_reason": "surplus: full"}, TrialState.PRUNED),
                         ({"pruned_at_cost": 12.0}, TrialState.PRUNED)]:
        study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=dist,
                                                  state=state, user_attrs=attrs,
                                                  value=1.0 if state == TrialState.COMPLETE else None))
    assert _count_results(study) == 2


def test_a_resume_with_more_trials_keeps_the_nsga2_population(study_dir):
    """The config digest ignores n_trials, so a resume may raise it; NSGA-II's generations
    must keep the population they started with (4 here, not 40 // 4 = 10)."""
    from optuna.samplers import NSGAIISampler

    nsga2 = 'sampler = "nsga2"'
    path = study_dir / "s.toml"
    path.write_text(tiny_study_toml(n_trials=4).replace('sampler = "random"', nsga2))
    run(load_study_file(path))
    path.write_text(tiny_study_toml(n_trials=40).replace('sampler = "random"', nsga2))
    study = run(load_study_file(path), n_trials=6)
    key = NSGAIISampler._get_generation_key()  # "NSGAIISampler:generation" in trial system attrs
    generations = [t.system_attrs.get(key) for t in study.get_trials(deepcopy=False)]
    assert generations[:4] == [0, 0, 0, 0] and generations[4:] == [1, 1]


# --- the objective on a scripted learning curve (no training): what a trial records -------


def _scripted(monkeypatch, curves):
    """`train` replaced by one that walks the curve [(cost, val_error), ...] of the trial's
    window through on_eval, stopping at training.target_error like the real one."""
    from dmdopt.training.loop import TrainResult

    def fake_train(*, dataset, model, training, dmd, on_eval=None):
        curve, stopped = [], "budget"
        for i, (cost, err) in enumerate(curves[dmd.window]):
            point = {"step": i * 10, "cost": cost, "wall": 0.0, "train_error": err, "val_error": err}
            curve.append(point)
            if on_eval is not None:
                on_eval(point)
            if i and training.target_error is not None and err <= training.target_error:
                stopped = "target"
                break
        cost, err = curve[-1]["cost"], curve[-1]["val_error"]
        return TrainResult(curve=curve, metrics={"val_rel_l2": err, "test_rel_l2": err, "val_r2": 0.9},
                           cost={"backprop_equivalent": cost, "forward_passes": 0, "backprop_steps": 60},
                           wall_time=0.0, dmd_time=0.0, jumps_accepted=0, jumps_rejected=0,
                           device="cpu", stopped_by=stopped)

    monkeypatch.setattr(objective_module, "train", fake_train)


def _objective(study_lines: str):
    import tomllib

    from dmdopt.search.config import parse_study

    config = parse_study(tomllib.loads(tiny_study_toml("t", n_trials=2, extra=study_lines)))
    return objective_module.Objective(config, None, {"cost_bpe": 60.0, "val_rel_l2": 0.2,
                                                     "first_passage_bpe": 60.0})


def _enqueue(study, *windows):
    for w in windows:
        study.enqueue_trial({"window": w, "rank": 3, "horizon": 10.0, "horizon_inf": False})


def test_cost_to_target_misses_rank_by_how_close_they_came(monkeypatch):
    """Was: a miss scored 2 x its spend, so a miss at error 0.5 that spent 1 bpe less beat one
    that ended at 0.101, and export wrote the first."""
    _scripted(monkeypatch, {5: [(0, 1.0), (30, 0.3), (62, 0.101)], 8: [(0, 1.0), (30, 0.6), (61, 0.5)]})
    study = optuna.create_study(directions=["minimize"])
    _enqueue(study, 5, 8)
    study.optimize(_objective('mode = "cost_to_target"\ntarget_error = 0.1'), n_trials=2)
    near, far = study.trials
    assert near.value == pytest.approx(62 * (1 + 0.101 / 0.1))
    assert far.value == pytest.approx(61 * (1 + 0.5 / 0.1))
    assert study.best_trial.number == 0


def test_a_pruned_cost_to_target_trial_stores_a_cost_not_an_error(monkeypatch):
    """Optuna stores a pruned trial's last report as its value: it was a val error (0.3 read as
    a cost of 0.3 bpe, cheaper than every real trial)."""
    _scripted(monkeypatch, {5: [(0, 1.0), (20, 0.2), (40, 0.09)], 8: [(0, 1.0), (25, 0.6), (45, 0.3)]})
    study = optuna.create_study(directions=["minimize"])
    _enqueue(study, 5, 8)
    objective = _objective('mode = "cost_to_target"\ntarget_error = 0.1')
    study.optimize(objective, n_trials=2)
    hit, pruned = study.trials
    assert hit.state == TrialState.COMPLETE and hit.value == 40
    assert pruned.state == TrialState.PRUNED  # its cost so far, charged like a miss
    assert pruned.value == pytest.approx(45 * (1 + 0.3 / 0.1))


def test_a_repeated_trial_does_not_copy_the_earlier_trials_own_story(monkeypatch):
    """Was: the copy claimed `rerun_of` (and a fail_reason) of the trial it copied."""
    _scripted(monkeypatch, {5: [(0, 1.0), (30, 0.3), (60, 0.15)]})
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.enqueue_trial({"window": 5, "rank": 3, "horizon": 10.0, "horizon_inf": False},
                        user_attrs={"rerun_of": 7})
    _enqueue(study, 5)
    study.optimize(_objective(""), n_trials=2)
    first, copy = study.trials
    assert first.user_attrs["rerun_of"] == 7 and "duplicate_of" not in first.user_attrs
    assert copy.user_attrs["duplicate_of"] == 0 and "rerun_of" not in copy.user_attrs
    assert copy.values == first.values


def test_a_long_curve_is_summarised_in_at_most_curve_points():
    from dmdopt.training.loop import TrainResult

    for n in (100, 101, 150, 199, 200, 201, 1000):
        curve = [{"step": i, "cost": float(i), "val_error": 1.0 / (i + 1)} for i in range(n)]
        result = TrainResult(curve=curve, metrics={}, cost={}, wall_time=0.0, dmd_time=0.0,
                             jumps_accepted=0, jumps_rejected=0, device="cpu", stopped_by="budget")
        summary = objective_module.curve_summary(result)
        assert len(summary) <= objective_module.CURVE_POINTS, n  # 200 points gave 101
        assert summary[0][0] == 0.0 and summary[-1][0] == n - 1


def test_hypervolume_history_counts_infeasible_trials_on_its_axis():
    """CONTRACT.md: one [n_complete, hv] per completed trial. Trials beyond max_error_ratio
    add no volume, but the history numbered feasible trials only, so its x axis (and the
    MLflow parent's hypervolume steps) ran short of the completed count."""
    from optuna.distributions import FloatDistribution

    from dmdopt.search.summary import hypervolume_history

    dist = {"window": FloatDistribution(5, 60)}
    trials = [optuna.trial.create_trial(params={"window": w}, distributions=dist, values=v,
                                        constraints={"max_error_ratio": c})
              for w, v, c in [(10, [50.0, 0.4], -0.1), (20, [20.0, 0.3], 0.2),
                              (30, [40.0, 0.2], -0.05)]]
    history = hypervolume_history(trials, [100.0, 1.0])
    assert [n for n, _ in history] == [1, 2, 3]
    assert history[0][1] == history[1][1] == pytest.approx(50.0 * 0.6)  # the infeasible adds none
    assert history[2][1] > history[1][1]


def test_a_cost_to_target_speedup_compares_costs_to_the_same_error(monkeypatch):
    """With a target above the reference's final error a trial stops at the target, short of
    the reference's error; its speed-up divided that spend into the reference's whole budget
    (60 / 30 = 2x here), though plain training reached the target at 20 bpe (0.67x)."""
    import tomllib

    from dmdopt import pareto
    from dmdopt.search.config import parse_study

    _scripted(monkeypatch, {5: [(0, 1.0), (15, 0.5), (30, 0.29)]})
    config = parse_study(tomllib.loads(tiny_study_toml(
        "t", n_trials=1, extra='mode = "cost_to_target"\ntarget_error = 0.3')))
    reference = {"cost_bpe": 60.0, "val_rel_l2": 0.2, "first_passage_bpe": 60.0,
                 "to_target": {"target_error": 0.3, "reached": True, "cost_bpe": 20.0,
                               "val_rel_l2": 0.28}}
    study = optuna.create_study(directions=["minimize"])
    _enqueue(study, 5)
    study.optimize(objective_module.Objective(config, None, reference), n_trials=1)
    attrs = study.trials[0].user_attrs
    assert attrs["speedup"] == pytest.approx(20 / 30) == attrs["speedup_first_passage"]
    summary = {"mode": "cost_to_target", "reference": reference,
               "trials": [{"number": 0, "values": [30.0, 0.29], "user_attrs": attrs}]}
    assert pareto.reference_point(summary) == (20.0, 0.28)  # the table's reference row
    assert pareto.speedup(summary, summary["trials"][0]) == pytest.approx(20 / 30)
    assert pareto.speedup_first_passage(summary, summary["trials"][0]) == pytest.approx(20 / 30)
    older = {**summary, "reference": {k: v for k, v in reference.items() if k != "to_target"}}
    assert pareto.speedup(older, summary["trials"][0]) == pytest.approx(2.0)  # as it was


def test_reference_run_records_where_plain_training_reaches_the_studys_target(study_dir):
    import tomllib

    from dmdopt.search.config import parse_study
    from dmdopt.search.objective import reference_run

    config = parse_study(tomllib.loads(tiny_study_toml(
        "t", n_trials=1, extra='mode = "cost_to_target"\ntarget_error = 0.9')))
    from dmdopt.problem import ProblemConfig, load_dataset

    dataset = load_dataset(ProblemConfig.from_dict(config.problem), cache_dir=study_dir / "data",
                           progress=False)
    reference = reference_run(config, dataset)
    to_target = reference["to_target"]
    # its first evaluation after a step at or below the target (a trial stops there too; the
    # start, at cost 0, is below 0.9 on this problem and is not a stop)
    first = next(c for c, e in reference["curve"] if c > 0 and e <= 0.9)
    assert to_target["reached"] and to_target["cost_bpe"] == first < reference["cost_bpe"]
    assert to_target["val_rel_l2"] <= 0.9


def test_a_target_no_trial_can_reach_within_max_error_ratio_is_refused(study_dir, capsys):
    """A cost_to_target trial stops at its target, so a target above max_error_ratio x the
    reference's error made every hit infeasible: no front, no recommendation, no pruning."""
    from dmdopt.cli import main

    (study_dir / "s.toml").write_text(tiny_study_toml(
        n_trials=1, extra='mode = "cost_to_target"\ntarget_error = 0.9\nmax_error_ratio = 1.0'))
    assert main(["study", "run", "s.toml", "--no-mlflow", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target_error = 0.9 is above max_error_ratio x" in err[0]
    with pytest.raises(UserError, match="not found"):  # none left: the corrected file runs
        load_study("tiny", f"sqlite:///{study_dir}/dmdopt-runs/optuna.db")
    # no target_error: the target is the reference's own error, above any ratio < 1 of it
    (study_dir / "s.toml").write_text(tiny_study_toml(
        n_trials=1, extra='mode = "cost_to_target"\nmax_error_ratio = 0.9'))
    assert main(["study", "run", "s.toml", "--no-mlflow", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(the reference's error) is above max_error_ratio x" in err[0]


def test_a_storage_lost_mid_study_is_one_line_and_keeps_the_finished_trials(study_dir, capsys,
                                                                            monkeypatch):
    """PostgreSQL stopped while two launchers ran: each printed ~320 lines of chained
    tracebacks (psycopg2's OperationalError, Optuna's StorageInternalError blaming 'invalid
    data in the commit', then its UnboundLocalError). Here the storage fails after trial 0."""
    from sqlalchemy.exc import OperationalError

    import dmdopt.search.study as study_module
    from dmdopt.cli import main

    (study_dir / "s.toml").write_text(tiny_study_toml(n_trials=3))
    real, calls = study_module._count_results, []

    def server_gone_after_one_trial(study):
        calls.append(1)
        if real(study) >= 1:
            raise OperationalError("SELECT trials", {}, ConnectionRefusedError("Connection refused"))
        return real(study)

    monkeypatch.setattr(study_module, "_count_results", server_gone_after_one_trial)
    assert main(["study", "run", "s.toml", "--no-mlflow", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the Optuna storage sqlite:///dmdopt-runs/optuna.db failed" in err[0]
    assert "ConnectionRefusedError: Connection refused" in err[0] and "run the same command" in err[0]
    monkeypatch.setattr(study_module, "_count_results", real)
    assert len(complete(load_study("tiny", "sqlite:///dmdopt-runs/optuna.db"))) == 1  # kept


def test_the_storage_error_is_found_behind_optunas_wrappers():
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import OperationalError

    from dmdopt.search.study import _storage_failure

    lost = OperationalError("COMMIT", {}, ConnectionRefusedError("refused"))
    try:
        try:
            try:
                raise lost
            except OperationalError as exc:
                raise StorageInternalError("invalid data in the commit") from exc
        except StorageInternalError:
            raise UnboundLocalError("updated_state")  # noqa: B904 - as Optuna's finally does
    except UnboundLocalError as exc:
        assert _storage_failure(exc) is lost
    assert _storage_failure(ValueError("a bug")) is None


def test_a_storage_that_never_opened_stays_a_user_error_in_a_worker(tmp_path):
    """open_storage's UserError keeps its OperationalError chained (`from None` only hides it):
    a worker called that a storage lost mid-study (exit 1, 'once it is back')."""
    import tomllib

    from dmdopt.search.config import parse_study
    from dmdopt.search.study import worker_loop

    (tmp_path / "adir.db").mkdir()
    config = parse_study(tomllib.loads(tiny_study_toml(n_trials=1)))
    with pytest.raises(UserError, match="cannot open"):
        worker_loop(config, storage_url=f"sqlite:///{tmp_path}/adir.db", n_trials=1, timeout=None,
                    tracking=False)


def test_a_sqlite_storage_waits_out_another_writers_lock(tmp_path):
    """--workers processes share one SQLite file; sqlite3's default 5 s lock wait let a slow
    commit of one fail another's write with 'database is locked', read as the storage lost."""
    import sqlite3
    import threading
    import time

    from dmdopt.search.storage import open_storage

    url = f"sqlite:///{tmp_path}/o.db"
    storage = open_storage(url, writable=True)
    study = optuna.create_study(storage=storage, study_name="s")
    blocker = sqlite3.connect(tmp_path / "o.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the lock for 6 s
    threading.Timer(6.0, lambda: blocker.execute("COMMIT")).start()
    start = time.monotonic()
    study.set_user_attr("written", True)  # waits, does not raise
    assert time.monotonic() - start >= 5.5
    assert optuna.load_study(study_name="s", storage=url).user_attrs["written"] is True


@pytest.mark.slow
def test_worker_processes_warn_about_a_dead_tracking_server_in_one_line_each(study_dir, capfd):
    """Each worker's tracker warns once about an MLflow outage; in a spawned worker that was
    Python's default format (the message, then the warn() source line) without saying whose."""
    import socket

    from dmdopt.cli import main

    with socket.socket() as free:  # nothing listens there once closed
        free.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{free.getsockname()[1]}"
    (study_dir / "s.toml").write_text(tiny_study_toml(n_trials=2))
    assert main(["study", "run", "s.toml", "--workers", "2", "--tracking-uri", dead,
                 "--quiet"]) == 0
    err = capfd.readouterr().err
    warned = [line for line in err.splitlines() if "MLflow tracking at" in line]
    assert warned and "warnings.warn" not in err and "RuntimeWarning" not in err, err
    by_worker = [line for line in warned if line.startswith("[worker ")]
    assert by_worker and all(re.match(r"\[worker \d+\] warning: MLflow", line) for line in by_worker)


def test_an_edited_study_file_is_refused_naming_what_changed(study_dir):
    """The refusal said only 'with a different configuration': the user had to guess which of
    the file's settings kept it from resuming."""
    run(config_for(study_dir, n_trials=1))
    edited = config_for(study_dir, n_trials=1, training='optimizer = "adam"\nlr = 0.02\n'
                        'max_steps = 60\neval_every = 10')
    with pytest.raises(UserError) as err:
        run(edited)
    assert "with a different configuration (training.lr: 0.01 in the study, 0.02 in the file)" \
        in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_a_command_that_reads_a_study_by_its_edited_file_says_it_reads_the_stored_one(
        study_dir, capsys):
    """`export s.toml` after s.toml was edited exported the stored study's trial without a
    word, while `study run s.toml` refused the file."""
    from dmdopt.cli import main

    run(config_for(study_dir, n_trials=1))
    for command in (["study", "status", "s.toml"], ["study", "pareto", "s.toml"]):
        assert main(command) == 0
        assert "warning" not in capsys.readouterr().err
    config_for(study_dir, n_trials=1, training='optimizer = "adam"\nlr = 0.02\n'
               'max_steps = 60\neval_every = 10')
    for command in (["study", "status", "s.toml"], ["study", "pareto", "s.toml"],
                    ["export", "s.toml", "-o", "t.toml"]):
        assert main(command) == 0
        err = capsys.readouterr().err.strip()
        assert err == ("warning: s.toml differs from the stored study 'tiny' (training.lr: 0.01 "
                       "in the study, 0.02 in the file); this reads the stored study"), err


@pytest.mark.parametrize("after", ["config_digest", "reference"])
def test_a_launcher_whose_new_study_another_overwrote_at_once_refuses_it(study_dir, monkeypatch,
                                                                         after):
    """Two launchers creating one new study with different files both read "no configuration
    yet" and both wrote theirs; the one whose write came first trained its trials (from its
    own ranges) into the other's study and exited 0. Emulated here: the other launcher's
    writes land right after this one wrote its digest, or its reference."""
    from dmdopt.search.study import config_digest

    mine = config_for(study_dir, n_trials=2)
    (study_dir / "other").mkdir()
    theirs = config_for(study_dir / "other", n_trials=2, training='optimizer = "adam"\n'
                        'lr = 0.02\nmax_steps = 60\neval_every = 10')
    original = optuna.Study.set_user_attr
    fired = []

    def set_user_attr(self, key, value):
        original(self, key, value)
        if key == after and not fired:
            fired.append(key)
            original(self, "config", copy.deepcopy(theirs.raw))
            original(self, "config_digest", config_digest(theirs))

    monkeypatch.setattr(optuna.Study, "set_user_attr", set_user_attr)
    with pytest.raises(UserError, match="with a different configuration") as err:
        run(mine)
    assert "training.lr" in str(err.value) and fired == [after]
    study = load_study(mine.name, mine.storage)
    assert not study.get_trials(deepcopy=False)  # no trial of the wrong configuration


def test_a_launcher_joining_a_study_being_created_waits_for_its_record(study_dir, monkeypatch):
    """Two launchers creating one study with different files: only the storage's creator
    writes the configuration; a joiner arriving mid-write waits for the record and is refused
    against it (each used to write its own, and the halves of the two records interleaved)."""
    import threading

    from dmdopt.search.storage import open_storage
    from dmdopt.search.study import _open_study, config_digest

    mine = config_for(study_dir, n_trials=1)
    (study_dir / "other").mkdir()
    theirs = config_for(study_dir / "other", n_trials=1, training='optimizer = "adam"\n'
                        'lr = 0.02\nmax_steps = 60\neval_every = 10')
    original = optuna.Study.set_user_attr
    joiner: dict = {}

    def join() -> None:
        try:
            _open_study(theirs, open_storage(mine.storage), mine.storage, None)
            joiner["result"] = "joined"
        except UserError as exc:
            joiner["result"] = str(exc)

    def set_user_attr(self, key, value):
        if key == "config" and "thread" not in joiner:  # the creator, mid-record
            joiner["thread"] = threading.Thread(target=join)
            joiner["thread"].start()
            joiner["thread"].join(0.5)  # the joiner is waiting now, not writing
        original(self, key, value)

    monkeypatch.setattr(optuna.Study, "set_user_attr", set_user_attr)
    run(mine)
    joiner["thread"].join(60)
    assert "with a different configuration (training.lr: 0.01 in the study, 0.02 in the file)" \
        in joiner["result"], joiner
    study = load_study(mine.name, mine.storage)
    stored = study.user_attrs
    assert stored["config_digest"] == config_digest(mine) == config_digest(stored["config"])
    assert len(complete(study)) == 1


@pytest.mark.parametrize(("visible", "index", "expected"), [
    (None, 1, "1"),                      # nothing set: the machine's numbering
    ("2,3", 0, "2"), ("2,3", 1, "3"),    # a launcher confined to GPUs 2 and 3 (was "0", "1")
    ("GPU-aa11, GPU-bb22", 1, "GPU-bb22"),  # UUIDs, as schedulers may set them
    ("", 0, "0"),
])
def test_a_worker_takes_one_of_the_launchers_own_gpus(visible, index, expected):
    from dmdopt.search.study import one_gpu

    assert one_gpu(visible, index) == expected
