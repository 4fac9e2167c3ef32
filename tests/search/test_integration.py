"""A study end to end against real stores: Optuna's own tools read it, MLflow gets one parent
and one child per finished trial, and a dead tracking server loses nothing (sync backfills)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from optuna.trial import TrialState
from study_files import tiny_study_toml

from dmdopt.cli import main
from dmdopt.pareto import CSV_COLUMNS
from dmdopt.search import load_study_file, run_study
from dmdopt.search.objective import Objective


def _search_runs(uri: str, experiment: str) -> list:
    """Runs of one experiment, without leaving the process-global tracking URI changed."""
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def tracked_study(tmp_path_factory):
    """One tiny study, run once with MLflow tracking to a sqlite store."""
    root = tmp_path_factory.mktemp("tracked")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        path = root / "s.toml"
        path.write_text(tiny_study_toml("tracked", n_trials=3))
        config = load_study_file(path)
        uri = f"sqlite:///{root}/mlflow.db"
        parent_seen = []  # the parent run's status as each trial starts training
        call = Objective.__call__

        def watched(self, trial):
            parents = [r for r in _search_runs(uri, "tracked")
                       if r.data.tags.get("dmdopt.role") == "parent"]
            parent_seen.append([r.info.status for r in parents])
            return call(self, trial)

        Objective.__call__ = watched
        try:
            study = run_study(config, tracking=True, tracking_uri=uri, progress=False,
                              echo=lambda *_: None)
        finally:
            Objective.__call__ = call
    finally:
        os.chdir(cwd)
    return root, config, study, uri, parent_seen


def test_the_parent_run_is_running_for_the_whole_study_then_finished(tracked_study):
    """With one worker the storage shows no RUNNING trial between two trials, and each
    refresh set the parent FINISHED: it read FINISHED while trials 1 and 2 trained."""
    root, config, study, uri, parent_seen = tracked_study
    assert parent_seen == [["RUNNING"]] * 3
    parents = [r for r in _search_runs(uri, "tracked") if r.data.tags.get("dmdopt.role") == "parent"]
    assert [p.info.status for p in parents] == ["FINISHED"] and parents[0].info.end_time


def test_mlflow_has_one_parent_and_one_child_per_finished_trial(tracked_study):
    root, config, study, uri, _ = tracked_study
    runs = _search_runs(uri, "tracked")
    parents = [r for r in runs if r.data.tags.get("dmdopt.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    finished = [t for t in study.get_trials(deepcopy=False)
                if t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)]
    assert len(parents) == 1
    assert len(children) == len(finished) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["dmdopt.trial_number"]) for c in children) == [t.number for t in finished]
    child = children[0]
    assert {"cost_bpe", "val_error", "speedup", "wall_time"} <= set(child.data.metrics)
    assert {"window", "rank", "horizon"} <= {k.split(".")[-1] for k in child.data.params}
    history = mlflow.MlflowClient(uri).get_metric_history(child.info.run_id, "val_error")
    assert len(history) > 2  # the learning curve, cost as step
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parents[0].info.run_id)}
    assert {"pareto.html", "pareto.png", "pareto.csv", "dashboard.html"} <= artifacts
    assert "hypervolume" in parents[0].data.metrics


def test_optuna_cli_reads_the_front_with_metric_names(tracked_study):
    root, config, study, _, _ = tracked_study
    storage = f"sqlite:///{root}/dmdopt-runs/optuna.db"
    optuna_cli = Path(sys.executable).parent / "optuna"
    out = subprocess.run([str(optuna_cli), "best-trials", "--study-name", "tracked",
                          "--storage", storage, "-f", "json"], capture_output=True, text=True,
                         check=True)
    rows = json.loads(out.stdout)
    assert sorted(r["number"] for r in rows) == sorted(t.number for t in study.best_trials)
    assert set(rows[0]["values"]) == {"cost_bpe", "val_rel_l2"}


def test_optuna_dashboard_opens_the_storage(tracked_study):
    from optuna_dashboard import wsgi

    root, *_ = tracked_study
    from wsgiref.util import setup_testing_defaults

    app = wsgi(f"sqlite:///{root}/dmdopt-runs/optuna.db")
    environ = {"PATH_INFO": "/api/studies"}
    setup_testing_defaults(environ)
    status = {}
    body = b"".join(app(environ, lambda s, h, *_: status.setdefault("code", s)))
    assert status["code"].startswith("200")
    assert "tracked" in body.decode()


def test_pareto_cli_lists_reference_and_front(tracked_study, capsys, monkeypatch):
    root, config, study, _, _ = tracked_study
    monkeypatch.chdir(root)
    assert main(["study", "pareto", "tracked", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["trial"] == "reference" and rows[0]["speedup"] == 1.0
    assert [r["trial"] for r in rows[1:]] == [t.number for t in
                                             sorted(study.best_trials, key=lambda t: t.values)]
    # The CLI's table is the MLflow CSV's table: same keys, same rows, one recommended point.
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert rows[0]["is_reference"] and not any(r["is_reference"] for r in rows[1:])
    assert sum(r["is_recommended"] for r in rows) == 1
    assert main(["study", "pareto", "tracked", "--csv"]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out  # LF lines, as the MLflow pareto.csv (csv's default is CRLF)
    csv_rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["trial"] for r in csv_rows] == [str(r["trial"]) for r in rows]


def test_dead_tracking_server_loses_nothing_and_sync_backfills(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.toml"
    path.write_text(tiny_study_toml("offline", n_trials=2))
    config = load_study_file(path)
    study = run_study(config, tracking=True, tracking_uri="http://127.0.0.1:9/", progress=False,
                      echo=lambda *_: None)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2  # trials finished anyway
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["study", "sync-mlflow", "offline", "--tracking-uri", uri]) == 0
    assert "2 trial run(s) added" in capsys.readouterr().out
    assert main(["study", "sync-mlflow", "offline", "--tracking-uri", uri]) == 0
    assert "0 trial run(s) added" in capsys.readouterr().out
    runs = _search_runs(uri, "offline")
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId")]) == 2


def test_an_interrupted_trial_reaches_mlflow_when_the_study_resumes(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM end a trial without Optuna's callback: the resume logs it (FAILED,
    reason "interrupted") beside the trials that finished normally."""
    from dmdopt.search import objective as objective_module

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.toml"
    path.write_text(tiny_study_toml("cut", n_trials=2))
    config = load_study_file(path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    real_train, calls = objective_module.train, {"n": 0}

    def interrupted_train(**kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # call 1 is the reference, call 2 trial 0, call 3 trial 1
            raise KeyboardInterrupt
        return real_train(**kwargs)

    monkeypatch.setattr(objective_module, "train", interrupted_train)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, tracking=True, tracking_uri=uri, progress=False, echo=lambda *_: None)
    monkeypatch.setattr(objective_module, "train", real_train)
    run_study(config, tracking=True, tracking_uri=uri, progress=False, echo=lambda *_: None)
    children = {int(r.data.tags["dmdopt.trial_number"]): r for r in _search_runs(uri, "cut")
                if r.data.tags.get("mlflow.parentRunId")}
    assert sorted(children) == [0, 1, 2]
    assert children[1].info.status == "FAILED"
    # the resume re-ran its settings first (trial 2), and the reason says so
    assert children[1].data.tags["dmdopt.fail_reason"] == "interrupted (Ctrl-C or SIGTERM); re-run as trial 2"
    assert children[2].data.tags["dmdopt.rerun_of"] == "1"


def test_a_study_stopped_by_an_interrupt_leaves_no_parent_running(tmp_path, monkeypatch):
    """The parent stays RUNNING between trials while the launcher trains; an interrupt (or
    workers giving up, a storage lost) skipped the launcher's final refresh, and it read
    RUNNING for good."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny_study_toml("stopped", n_trials=3))
    config = load_study_file(tmp_path / "s.toml")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    calls, call = [], Objective.__call__

    def interrupted_on_the_second(self, trial):
        calls.append(trial.number)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return call(self, trial)

    monkeypatch.setattr(Objective, "__call__", interrupted_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, tracking=True, tracking_uri=uri, progress=False, echo=lambda *_: None)
    parents = [r for r in _search_runs(uri, "stopped") if r.data.tags.get("dmdopt.role") == "parent"]
    assert [p.info.status for p in parents] == ["FINISHED"]
    children = [r for r in _search_runs(uri, "stopped") if r.data.tags.get("mlflow.parentRunId")]
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]  # both logged
