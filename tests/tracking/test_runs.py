"""MLflow runs of a study: parent/children, idempotent sync, races, masking, dead servers."""

from __future__ import annotations

import csv
import io
import multiprocessing
import socket
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from dmdopt.tracking import StudyTracker, load_logged_model, log_model_run

FINISHED = (0, 1, 2, 3)  # trial 4 is RUNNING


def _runs(uri: str, study: str, role: str | None = None):
    """Active runs of a study via the fluent search API (a DataFrame)."""
    # the fluent API's URI is process-global once any test called set_tracking_uri: set it here
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        df = mlflow.search_runs(experiment_names=[study])
    finally:
        mlflow.set_tracking_uri(previous)
    return df if role is None else df[df["tags.dmdopt.role"] == role]


def test_parent_children_metrics_and_artifacts(mlflow_store, make_summary, study_name,
                                               find_external_refs):
    summary = make_summary(study_name)
    summary["trials"][3]["user_attrs"]["duplicate_of"] = 0  # a sampler repeated trial 0's settings
    tracker = StudyTracker(mlflow_store, study_name)
    parent = tracker.ensure_parent(summary)
    ids = {n: tracker.log_trial(summary, n) for n in (0, 1, 2, 3, 4)}
    assert ids[4] is None and all(ids[n] for n in FINISHED)
    assert tracker.refresh_parent(summary) == parent
    assert tracker.log_trial(summary, 0) is None  # already logged: nothing new

    parents, children = _runs(mlflow_store, study_name, "parent"), _runs(mlflow_store, study_name, "child")
    assert list(parents["run_id"]) == [parent]
    assert sorted(children["tags.dmdopt.trial_number"].astype(int)) == list(FINISHED)
    assert set(children["tags.mlflow.parentRunId"]) == {parent}
    assert set(children["tags.dmdopt.study"]) == {study_name}
    by_no = {int(r["tags.dmdopt.trial_number"]): r for _, r in children.iterrows()}
    assert by_no[2]["tags.dmdopt.trial_state"] == "FAIL"
    assert by_no[2]["status"] == "FAILED"
    assert by_no[2]["tags.dmdopt.fail_reason"] == "loss became NaN at step 12"
    assert by_no[0]["status"] == "FINISHED"
    assert by_no[3]["tags.dmdopt.duplicate_of"] == "0"
    assert by_no[1]["params.horizon"] == "inf"
    assert by_no[0]["params.training.lr"] == "0.001" and by_no[0]["params.dmd.grouping"] == "layer"
    assert by_no[0]["metrics.cost_bpe"] == 300.0 and by_no[0]["metrics.speedup"] == 2.0
    assert by_no[3]["metrics.jumps_accepted"] == 8.0
    for key in ("cost_total", "test_error", "wall_time", "jumps_rejected", "val_error"):
        assert by_no[0][f"metrics.{key}"] > 0, key

    client = MlflowClient(mlflow_store)
    curve = summary["trials"][0]["user_attrs"]["curve"]
    history = sorted(client.get_metric_history(ids[0], "val_error"), key=lambda m: m.step)
    assert [m.step for m in history] == [int(round(c)) for c, _ in curve]
    assert history[-1].value == pytest.approx(0.07)

    ptags = parents.iloc[0]
    assert ptags["tags.dmdopt.sampler"] == "nsga2"
    assert ptags["params.study.n_trials"] == "5"
    assert ptags["tags.dmdopt.version.torch"] == version("torch")
    assert ptags["tags.dmdopt.recommended_trial"] == "0"
    assert {a.path for a in client.list_artifacts(parent)} >= {
        "pareto.html", "pareto.png", "pareto.csv", "dashboard.html"}

    local = Path(client.download_artifacts(parent, "pareto.csv"))
    rows = list(csv.DictReader(io.StringIO(local.read_text())))
    assert [r["trial"] for r in rows] == ["reference", "1", "0", "3"]
    assert [r["is_reference"] for r in rows] == ["True", "False", "False", "False"]
    assert [r["is_recommended"] for r in rows] == ["False", "False", "True", "False"]
    assert rows[1]["horizon"] == "inf"
    html = Path(client.download_artifacts(parent, "pareto.html")).read_text()
    assert find_external_refs(html) == [] and len(html) > 1_000_000  # plotly.js inlined

    tracker.refresh_parent(summary)  # refreshing again overwrites, never duplicates history
    hv = client.get_metric_history(parent, "hypervolume")
    assert sorted((m.step, m.value) for m in hv) == [(1, 100.0), (2, 150.0), (3, 170.0)]


def test_a_trial_that_never_reached_the_reference_logs_no_cost_to_it(mlflow_store, make_summary,
                                                                     study_name):
    """Its stored cost_to_reference is its whole spend (the objective's penalty): logged under
    that name, MLflow showed a cost to an error the trial never reached."""
    summary = make_summary(study_name)
    for number, reached in ((0, True), (1, False)):
        attrs = summary["trials"][number]["user_attrs"]
        attrs.update(reached_reference=reached, cost_to_reference=attrs["cost_total"] * 0.9)
    tracker = StudyTracker(mlflow_store, study_name)
    tracker.ensure_parent(summary)
    for number in (0, 1):
        tracker.log_trial(summary, number)
    by_no = {int(r["tags.dmdopt.trial_number"]): r
             for _, r in _runs(mlflow_store, study_name, "child").iterrows()}
    assert by_no[0]["metrics.cost_to_reference"] > 0 and by_no[0]["metrics.reached_reference"] == 1
    assert by_no[1]["metrics.reached_reference"] == 0
    assert "metrics.cost_to_reference" not in by_no[1] or by_no[1]["metrics.cost_to_reference"] != \
        by_no[1]["metrics.cost_to_reference"]  # absent: NaN in the runs frame


def test_sync_is_idempotent(mlflow_store, make_summary, study_name):
    summary = make_summary(study_name)
    tracker = StudyTracker(mlflow_store, study_name)
    assert tracker.sync(summary) == len(FINISHED)
    n_runs = len(_runs(mlflow_store, study_name))
    assert n_runs == len(FINISHED) + 1
    assert StudyTracker(mlflow_store, study_name).sync(summary) == 0  # a fresh tracker too
    assert tracker.sync(summary) == 0
    assert len(_runs(mlflow_store, study_name)) == n_runs


def test_surplus_trials_get_no_run(mlflow_store, make_summary, study_name):
    """A trial the summary flags as surplus (pruned before training, the quota full) is no
    result: no child run, by the callback or by a sync; an ordinary PRUNED trial gets one."""
    summary = make_summary(study_name)
    pruned = {"number": 5, "state": "PRUNED", "params": {"window": 9, "rank": 3, "horizon": 5.0},
              "values": None, "user_attrs": {"fail_reason": "surplus: full"},
              "datetime_start": "2026-01-01T10:05:00", "datetime_complete": "2026-01-01T10:05:01"}
    summary["trials"] += [dict(pruned, surplus=True),
                          dict(pruned, number=6, surplus=False, user_attrs={"pruned_at_cost": 9.0})]
    tracker = StudyTracker(mlflow_store, study_name)
    assert tracker.log_trial(summary, 5) is None
    assert tracker.sync(summary) == len(FINISHED) + 1
    assert sorted(tracker.logged_trials()) == sorted([*FINISHED, 6])


def test_sync_stops_at_the_first_error_and_does_not_claim_success(mlflow_store, make_summary,
                                                                  study_name, monkeypatch):
    """A server lost part-way through a backfill: each further trial would wait out its own
    retry cycle, and the sync would report the trials as added. It stops and says None."""
    summary = make_summary(study_name)
    tracker = StudyTracker(mlflow_store, study_name)
    real, calls = tracker._create_child, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("server gone")
        return real(*args, **kwargs)

    monkeypatch.setattr(tracker, "_create_child", dying)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tracker.sync(summary) is None
    assert len(calls) == 2 < len(FINISHED)
    assert len(_runs(mlflow_store, study_name, "child")) == 1
    assert StudyTracker(mlflow_store, study_name).sync(summary) == len(FINISHED) - 1  # the rest


def test_racing_parents_resolve_to_the_earliest(mlflow_store, make_summary, study_name,
                                                monkeypatch):
    summary = make_summary(study_name)
    first, second = StudyTracker(mlflow_store, study_name), StudyTracker(mlflow_store, study_name)
    client = MlflowClient(mlflow_store)
    tags = {"dmdopt.study": study_name, "dmdopt.role": "parent"}
    now = int(time.time() * 1000)
    late = client.create_run(first.experiment_id, start_time=now, tags=tags).info.run_id
    early = client.create_run(first.experiment_id, start_time=now - 5, tags=tags).info.run_id
    assert first.ensure_parent(summary) == early
    assert second.ensure_parent(summary) == early

    # a tracker whose search raced past both creations makes a third parent, then yields
    third = StudyTracker(mlflow_store, study_name)
    real, calls = third._parents, []

    def blind_first_search() -> list:
        calls.append(1)
        return real() if len(calls) > 1 else []

    monkeypatch.setattr(third, "_parents", blind_first_search)
    assert third.ensure_parent(summary) == early
    assert len(calls) == 2
    active = set(_runs(mlflow_store, study_name, "parent")["run_id"])
    assert active == {early, late}  # its own losing duplicate was deleted


def test_storage_password_is_masked(mlflow_store, make_summary, study_name):
    summary = make_summary(study_name, storage="postgresql://u:secret@h/db")
    tracker = StudyTracker(mlflow_store, study_name)
    tracker.sync(summary)
    run = MlflowClient(mlflow_store).get_run(tracker.ensure_parent(summary))
    assert run.data.tags["dmdopt.storage"] == "postgresql://u:***@h/db"
    assert run.data.params["study.storage"] == "postgresql://u:***@h/db"
    everything = [*run.data.tags.values(), *run.data.params.values()]
    assert not any("secret" in value for value in everything)
    dash = Path(MlflowClient(mlflow_store).download_artifacts(run.info.run_id, "dashboard.html"))
    assert "secret" not in dash.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_server_warns_once_and_returns_none(make_summary, monkeypatch):
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(key, "x")  # so teardown restores "unset" after the tracker sets it
        monkeypatch.delenv(key)
    summary = make_summary("dead")
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = StudyTracker(f"http://127.0.0.1:{_free_port()}", "dead")
        results = [tracker.ensure_parent(summary), tracker.log_trial(summary, 0),
                   tracker.refresh_parent(summary), tracker.sync(summary),
                   tracker.log_trial(summary, 1)]
    elapsed = time.monotonic() - start
    assert results == [None] * 5
    ours = [w for w in caught if "MLflow tracking" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "127.0.0.1" in str(ours[0].message)
    assert elapsed < 15, elapsed


def _log_from_process(uri: str, study: str, summary: dict, numbers: list[int]) -> None:
    tracker = StudyTracker(uri, study)
    for n in numbers:
        if tracker.log_trial(summary, n) is None:
            raise SystemExit(f"trial {n} was not logged")


@pytest.mark.slow  # two spawned interpreters each import mlflow: ~10 s on a small machine
def test_children_from_two_processes_share_one_parent(mlflow_store, make_summary, study_name):
    summary = make_summary(study_name)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_log_from_process, args=(mlflow_store, study_name, summary, nums))
             for nums in ([0, 2], [1, 3])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    parents = _runs(mlflow_store, study_name, "parent")
    children = _runs(mlflow_store, study_name, "child")
    assert len(parents) == 1
    assert sorted(children["tags.dmdopt.trial_number"].astype(int)) == list(FINISHED)
    assert set(children["tags.mlflow.parentRunId"]) == set(parents["run_id"])


def test_model_round_trip(mlflow_store, capfd):
    import torch  # here, not at the top: spawned workers re-import this module

    from dmdopt.model import ModelConfig, Regressor

    torch.manual_seed(0)
    model = Regressor(n_inputs=3, n_outputs=5, config=ModelConfig(width=8, depth=2))
    run_id = log_model_run(tracking_uri=mlflow_store, experiment="production", run_name="prod-1",
                           model=model, params={"training": {"lr": 1e-3}},
                           metrics={"test_error": 0.05}, tags={"dmdopt.config": "tuned.toml"})
    run = MlflowClient(mlflow_store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.lr"] == "0.001" and run.data.metrics["test_error"] == 0.05
    loaded = load_logged_model(mlflow_store, run_id)
    assert type(loaded) is Regressor
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert mlflow.active_run() is None
    # pickling is deliberate (the real class comes back): MLflow's caution about it is not shown
    err = capfd.readouterr().err
    assert "Pickle" not in err and "pickle" not in err


def test_ui_refuses_remote_hosts_without_opt_in(tmp_path, monkeypatch):
    from dmdopt.errors import UserError
    from dmdopt.tracking import start_ui
    from dmdopt.tracking.ui import is_loopback, server_command

    # a free port: the default 5000 may be taken (a developer's own `mlflow ui`), and the
    # port is checked before the store
    port = _free_port()

    with pytest.raises(UserError, match="0.0.0.0.*--allow-remote"):
        start_ui(host="0.0.0.0", port=port, backend_store_uri=f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(UserError, match="already a tracking server"):
        start_ui(port=port, backend_store_uri="http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # `dmdopt ui` reads it
    with pytest.raises(UserError, match=r"^\$MLFLOW_TRACKING_URI: .*already a tracking server"):
        start_ui(port=port)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(UserError, match=r"u:\*\*\*@") as info:  # the password is not shown
        start_ui(port=port, backend_store_uri="https://u:secret@127.0.0.1:5000")
    assert "secret" not in str(info.value)
    assert is_loopback("localhost") and is_loopback("::1") and not is_loopback("10.0.0.5")
    cmd = server_command(host="127.0.0.1", port=5001, backend_store_uri="sqlite:///x.db",
                         artifacts="/tmp/art")
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert "--serve-artifacts" in cmd and cmd[cmd.index("--artifacts-destination") + 1] == "/tmp/art"
    assert not list(tmp_path.iterdir())  # refused before touching the store


def test_two_studies_of_one_name_keep_their_own_runs(mlflow_store, make_summary, study_name):
    """Another storage (or a re-created optuna.db) may hold a study of the same name: MLflow
    matched runs by name only, so the second study reused the first one's parent, logged no
    trial ("already logged") and overwrote the first one's front."""
    first = make_summary(study_name, storage="sqlite:///a.db") | {"study_uid": "aaaa"}
    second = make_summary(study_name, storage="sqlite:///b.db") | {"study_uid": "bbbb",
                                                                   "pareto": [1]}
    a = StudyTracker(mlflow_store, study_name, first["study_uid"])
    assert a.sync(first) == len(FINISHED)
    b = StudyTracker(mlflow_store, study_name, second["study_uid"])
    assert b.sync(second) == len(FINISHED)  # was 0
    parent_a, parent_b = a.ensure_parent(first), b.ensure_parent(second)
    assert parent_a != parent_b
    client = MlflowClient(mlflow_store)
    assert client.get_run(parent_a).data.tags["dmdopt.pareto"] == "1,0,3"  # not overwritten
    assert client.get_run(parent_b).data.tags["dmdopt.pareto"] == "1"
    children = _runs(mlflow_store, study_name, "child")
    assert sorted(children.groupby("tags.mlflow.parentRunId").size()) == [4, 4]
    # a study made before uids (none in its summary) still finds runs made without the tag
    legacy = make_summary(study_name)
    assert StudyTracker(mlflow_store, study_name).sync(legacy) == len(FINISHED)
    assert StudyTracker(mlflow_store, study_name).sync(legacy) == 0


def test_a_child_cut_off_while_written_is_replaced_by_the_next_sync(mlflow_store, make_summary,
                                                                  study_name, monkeypatch):
    """The store failing between a child's creation and its last write left it RUNNING and
    empty for good: every later log_trial and sync saw "already logged"."""
    import dmdopt.tracking.runs as runs

    summary = make_summary(study_name)
    tracker = StudyTracker(mlflow_store, study_name)
    tracker.ensure_parent(summary)
    real = runs.log_batch

    def store_gone(client, run_id, **kw):
        if kw.get("metrics"):
            raise ConnectionError("server went away")
        return real(client, run_id, **kw)

    monkeypatch.setattr(runs, "log_batch", store_gone)
    monkeypatch.setattr(MlflowClient, "delete_run", lambda *a, **k: (_ for _ in ()).throw(
        ConnectionError("server went away")))  # gone for the clean-up too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tracker.log_trial(summary, 0) is None  # failed (tolerated, warned)
    monkeypatch.setattr(runs, "log_batch", real)
    monkeypatch.undo()
    half = _runs(mlflow_store, study_name, "child")
    assert list(half["status"]) == ["RUNNING"]

    # just now: it may be another process still writing it, so it is left alone, and said so
    other = StudyTracker(mlflow_store, study_name)
    assert other.sync(summary) == len(FINISHED) - 1 and other.pending == {0}
    assert len(_runs(mlflow_store, study_name, "child")) == len(FINISHED)
    # ... until it is older than a write can take: then it is replaced (it stayed for good)
    monkeypatch.setattr(runs, "_HALF_LOGGED_AFTER_S", 0)
    assert StudyTracker(mlflow_store, study_name).sync(summary) == 1
    children = _runs(mlflow_store, study_name, "child")
    assert len(children) == len(FINISHED) and set(children["status"]) <= {"FINISHED", "FAILED"}
    trial0 = children[children["tags.dmdopt.trial_number"] == "0"].iloc[0]
    assert trial0["metrics.cost_bpe"] == 300.0


def test_the_tracker_that_was_cut_off_replaces_its_own_child_at_once(mlflow_store, make_summary,
                                                                     study_name, monkeypatch):
    """It could tell its own half-written child from another process's only by age, so a
    failure in a run's last two minutes stayed unrepaired by that run's final sync (and the
    sync said "0 added"). It deletes the child when it can, and replaces it when it cannot."""
    import dmdopt.tracking.runs as runs

    summary = make_summary(study_name)
    tracker = StudyTracker(mlflow_store, study_name)
    tracker.ensure_parent(summary)
    real = runs.log_batch

    def metrics_fail_for_trial_0(client, run_id, **kw):
        if kw.get("metrics") and client.get_run(run_id).data.tags.get("dmdopt.trial_number") == "0":
            raise ConnectionError("server went away")
        return real(client, run_id, **kw)

    monkeypatch.setattr(runs, "log_batch", metrics_fail_for_trial_0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tracker.log_trial(summary, 0) is None
    assert _runs(mlflow_store, study_name, "child").empty  # deleted: nothing half-written
    real_delete = MlflowClient.delete_run
    monkeypatch.setattr(MlflowClient, "delete_run", lambda *a, **k: (_ for _ in ()).throw(
        ConnectionError("server went away")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker.unpause()
        assert tracker.log_trial(summary, 0) is None  # cut off again, and could not delete
    assert list(_runs(mlflow_store, study_name, "child")["status"]) == ["RUNNING"]
    monkeypatch.setattr(runs, "log_batch", real)
    monkeypatch.setattr(MlflowClient, "delete_run", real_delete)
    tracker.unpause()
    assert tracker.sync(summary) == len(FINISHED) and not tracker.pending  # at once, not in 2 min
    children = _runs(mlflow_store, study_name, "child")
    assert len(children) == len(FINISHED) and set(children["status"]) <= {"FINISHED", "FAILED"}


def test_two_processes_logging_one_trial_at_once_leave_one_child(mlflow_store, make_summary,
                                                                study_name, monkeypatch):
    """A resume's log_missing and a worker's callback both search, find no child, and both
    create one: the later one deletes its own."""
    summary = make_summary(study_name)
    first, second = StudyTracker(mlflow_store, study_name), StudyTracker(mlflow_store, study_name)
    first.ensure_parent(summary)
    second.ensure_parent(summary)
    real_search = StudyTracker._search
    calls = {"n": 0}

    def searched_before_the_other_wrote(self, filter_string):
        calls["n"] += 1
        return [] if calls["n"] == 1 else real_search(self, filter_string)

    assert first.log_trial(summary, 0)
    monkeypatch.setattr(StudyTracker, "_search", searched_before_the_other_wrote)
    assert second.log_trial(summary, 0) is None  # it made a twin, then deleted it
    monkeypatch.setattr(StudyTracker, "_search", real_search)
    children = _runs(mlflow_store, study_name, "child")
    assert list(children["tags.dmdopt.trial_number"]) == ["0"]


def test_after_the_first_failure_the_tracker_is_off(mlflow_store, make_summary, study_name,
                                                    monkeypatch):
    """The warning says tracking is off for the rest of the command: against a server that
    accepts but never answers, every later trial still waited out its timeouts (10 s each)."""
    summary = make_summary(study_name)
    tracker = StudyTracker(mlflow_store, study_name)
    calls = []

    def hung(*args, **kwargs):
        calls.append(1)
        raise TimeoutError("read timed out")

    monkeypatch.setattr(tracker, "_parents", hung)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [tracker.ensure_parent(summary), tracker.log_trial(summary, 0),
                   tracker.refresh_parent(summary), tracker.sync(summary)]
    assert results == [None] * 4 and len(calls) == 1
    assert len([w for w in caught if "MLflow tracking" in str(w.message)]) == 1


def test_a_figure_that_fails_costs_the_parent_nothing_else(mlflow_store, make_summary,
                                                           study_name, monkeypatch):
    from dmdopt.tracking import figures

    def broken(summary, path):
        raise ValueError("bad title")

    monkeypatch.setattr(figures, "write_pareto_png", broken)
    summary = make_summary(study_name)
    summary["trials"] = [t for t in summary["trials"] if t["state"] != "RUNNING"]
    tracker = StudyTracker(mlflow_store, study_name)
    with pytest.warns(RuntimeWarning, match="pareto.png .*could not be written"):
        parent = tracker.refresh_parent(summary)
    assert parent is not None
    client = MlflowClient(mlflow_store)
    assert {a.path for a in client.list_artifacts(parent)} == {"pareto.html", "pareto.csv",
                                                              "dashboard.html"}
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["dmdopt.recommended_trial"] == "0"
    assert tracker.log_trial(summary, 0) is not None  # a figure's failure does not stop tracking


def test_sync_is_not_a_success_when_the_parent_refresh_fails(mlflow_store, make_summary,
                                                             study_name, monkeypatch):
    summary = make_summary(study_name)
    tracker = StudyTracker(mlflow_store, study_name)
    monkeypatch.setattr(tracker.client, "log_artifacts",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tracker.sync(summary) is None  # was: the children added, exit 0


def test_sync_after_the_parent_was_deleted_logs_the_trials_again(mlflow_store, make_summary,
                                                                  study_name):
    """Children of a deleted parent counted as logged: the new parent stayed empty."""
    summary = make_summary(study_name)
    assert StudyTracker(mlflow_store, study_name).sync(summary) == len(FINISHED)
    old = _runs(mlflow_store, study_name, "parent")["run_id"].iloc[0]
    MlflowClient(mlflow_store).delete_run(old)
    assert StudyTracker(mlflow_store, study_name).sync(summary) == len(FINISHED)
    parents = _runs(mlflow_store, study_name, "parent")
    assert len(parents) == 1 and parents["run_id"].iloc[0] != old
    children = _runs(mlflow_store, study_name, "child")
    new_children = children[children["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]]
    assert sorted(new_children["tags.dmdopt.trial_number"].astype(int)) == list(FINISHED)


def test_an_existing_store_at_a_relative_path_is_usable(mlflow_store, tmp_path, monkeypatch):
    """The default store, sqlite:///dmdopt-runs/mlflow.db, is relative: its database check
    raised ValueError (no file URI for a relative path) once the file existed."""
    import shutil

    from dmdopt.tracking.runs import prepare_local_store

    (tmp_path / "dmdopt-runs").mkdir()
    shutil.copy(mlflow_store.removeprefix("sqlite:///"), tmp_path / "dmdopt-runs" / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    prepare_local_store("sqlite:///dmdopt-runs/mlflow.db")  # a database: no error
    (tmp_path / "dmdopt-runs" / "mlflow.db").write_text("not a database")
    with pytest.raises(OSError, match="not a SQLite database"):
        prepare_local_store("sqlite:///dmdopt-runs/mlflow.db")


def test_ui_refuses_a_store_that_is_not_a_database(tmp_path, capsys):
    """Was: the URL printed, then the server's 69-line traceback (exit 1)."""
    from dmdopt.errors import UserError
    from dmdopt.tracking import start_ui

    (tmp_path / "bad.db").write_text("not a database")
    with pytest.raises(UserError, match="bad.db is not a SQLite database"):
        start_ui(port=_free_port(), backend_store_uri=f"sqlite:///{tmp_path / 'bad.db'}")
    assert "MLflow UI:" not in capsys.readouterr().out


def test_a_postgresql_store_uses_the_driver_that_is_installed(monkeypatch):
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; the [postgres] extra installs psycopg2.
    The Optuna storage picked the installed one, MLflow did not: every trial warned
    `No module named 'psycopg'` and the study ran untracked."""
    import importlib.util

    from dmdopt._util import with_sql_driver
    from dmdopt.tracking.runs import check_tracking_uri

    if importlib.util.find_spec("psycopg2") is None:
        pytest.skip("needs psycopg2 (the [postgres] extra; [test] installs it)")
    url = "postgresql://u:pw@db.example/mlflow"
    expected = url if importlib.util.find_spec("psycopg") else url.replace("postgresql", "postgresql+psycopg2", 1)
    assert with_sql_driver(url) == expected
    import dmdopt.tracking.runs as runs

    # a driver is there: not refused (the connection check has tests of its own)
    monkeypatch.setattr(runs, "_probe_database", lambda *args: None)
    assert check_tracking_uri(url) == url

    opened = []

    class Client:
        def __init__(self, tracking_uri):
            opened.append(tracking_uri)

        def search_experiments(self, **kwargs):
            return []

    import contextlib

    monkeypatch.setattr(runs, "MlflowClient", Client)
    monkeypatch.setattr(runs, "_store_setup_lock", lambda uri: contextlib.nullcontext())
    StudyTracker(url, "s").client  # noqa: B018 - the client is made on first use
    assert opened == [expected]


def test_a_cost_to_target_parent_logs_the_reference_point_its_front_shows(mlflow_store,
                                                                         make_summary, study_name):
    """pareto.csv (and the dashboard) put plain training where it reached the study's target;
    the parent's reference metrics still said its whole budget."""
    summary = make_summary(study_name)
    summary["mode"] = "cost_to_target"
    summary["reference"]["to_target"] = {"target_error": 0.1, "reached": True,
                                         "cost_bpe": 250.0, "val_rel_l2": 0.099}
    tracker = StudyTracker(mlflow_store, study_name)
    assert tracker.sync(summary) is not None
    parent = _runs(mlflow_store, study_name, "parent").iloc[0]
    assert parent["metrics.reference_cost_bpe"] == 250.0
    assert parent["metrics.reference_val_rel_l2"] == pytest.approx(0.099)
    assert parent["metrics.reference_test_rel_l2"] == pytest.approx(0.081)  # its own figures


def test_a_sqlite_store_another_writer_holds_is_not_refused(tmp_path, monkeypatch):
    """The connection check at start refused a store whose file another process was writing
    ("database is locked" after the probe's timeout): a writer's lock is no reason to refuse."""
    import sqlite3

    import dmdopt.tracking.runs as runs

    monkeypatch.setattr(runs, "_PROBE_TIMEOUT_S", 0.2)
    db = tmp_path / "mlflow.db"
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("CREATE TABLE experiments (id INTEGER)")
    writer.execute("BEGIN EXCLUSIVE")
    try:
        assert runs.check_tracking_uri(f"sqlite:///{db}") == f"sqlite:///{db}"
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_database_store_that_never_answers_is_given_up_on_time(tmp_path, monkeypatch):
    """The driver's connect timeout did not bound the probe (a DNS lookup, a driver with no
    timeout keyword): a store that never answered held the command without end."""
    import threading

    import sqlalchemy

    import dmdopt.tracking.runs as runs
    from dmdopt.errors import UserError

    db = tmp_path / "mlflow.db"
    sqlite3 = pytest.importorskip("sqlite3")
    sqlite3.connect(db).execute("CREATE TABLE experiments (id INTEGER)").connection.close()
    release = threading.Event()

    def hangs(engine):
        release.wait(30)
        raise RuntimeError("gave up")

    monkeypatch.setattr(sqlalchemy, "inspect", hangs)
    monkeypatch.setattr(runs, "_PROBE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(runs, "_PROBE_GRACE_S", 0.3)
    started = time.monotonic()
    try:
        with pytest.raises(UserError, match=r"^--tracking-uri: cannot use '[^']*' as a tracking "
                                            r"store: no answer within 0\.5 s$"):
            runs.check_tracking_uri(f"sqlite:///{db}")
        assert time.monotonic() - started < 5
    finally:
        release.set()


def test_processes_opening_a_fresh_sqlite_store_at_once_set_it_up_one_at_a_time(tmp_path):
    """MLflow creates and migrates its schema on first open, without a lock: three processes
    opening one fresh store together failed 2 or 3 of 3 ("duplicate column name: step") and
    could leave `_alembic_tmp_*` tables behind."""
    import sqlite3
    import subprocess
    import sys

    db = tmp_path / "mlflow.db"
    code = ("import sys; from dmdopt.tracking.runs import open_client; "
            "open_client('sqlite:///' + sys.argv[1]).search_experiments()")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-800:] for _, err in outs]
    tables = {name for (name,) in sqlite3.connect(db).execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "experiments" in tables and not any(t.startswith("_alembic_tmp") for t in tables)


def test_ui_sets_a_fresh_store_up_under_the_set_up_lock_before_the_server(tmp_path, monkeypatch,
                                                                         capsys):
    """The MLflow server migrated a fresh store itself, outside the lock that study workers
    opening the same store take (`open_client`)."""
    import contextlib
    import sqlite3

    import dmdopt.tracking.runs as runs
    import dmdopt.tracking.ui as ui

    locked, started = [], []
    real_lock = runs._store_setup_lock

    @contextlib.contextmanager
    def lock(uri):
        with real_lock(uri):
            locked.append(uri)
            yield

    class Server:  # stands in for the MLflow server process: what the store holds at its start
        def __init__(self, *args, **kwargs):
            started.append({name for (name,) in sqlite3.connect(tmp_path / "m.db").execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")})
            raise OSError("not started in this test")

    monkeypatch.setattr(runs, "_store_setup_lock", lock)
    monkeypatch.setattr(ui.subprocess, "Popen", Server)
    with pytest.raises(OSError, match="not started in this test"):
        ui.start_ui(port=_free_port(), backend_store_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert locked and "experiments" in started[0] and "alembic_version" in started[0]
    # a store that was not there: said (`dmdopt ui` in another folder served an empty one)
    assert f"note: no MLflow store at {tmp_path / 'm.db'} yet" in capsys.readouterr().err
    with pytest.raises(OSError, match="not started in this test"):  # now it is: no note
        ui.start_ui(port=_free_port(), backend_store_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert "note:" not in capsys.readouterr().err
