"""Multi-machine path: several `dmdopt study run` processes on one PostgreSQL study, one of
them SIGKILLed in the middle of a trial.

Needs a PostgreSQL server ($DMDOPT_TEST_POSTGRES_URL) and, for the MLflow checks, a tracking
server ($DMDOPT_TEST_MLFLOW_URI); `.ci/services.sh ENV_FILE` starts both and writes the
variables. Short heartbeats (1 s, grace 4 s) make the dead worker's trial stale quickly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

POSTGRES_URL = os.environ.get("DMDOPT_TEST_POSTGRES_URL")
MLFLOW_URI = os.environ.get("DMDOPT_TEST_MLFLOW_URI")

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not POSTGRES_URL, reason="DMDOPT_TEST_POSTGRES_URL is not set"),
]

N_TRIALS = 6
N_WORKERS = 3
HEARTBEAT = {"DMDOPT_HEARTBEAT_INTERVAL": "1", "DMDOPT_GRACE_PERIOD": "4"}
DEADLINE_S = 170  # the whole scenario; a trial takes a few seconds on 2 busy cores

SMOKE = Path(__file__).resolve().parents[2] / "studies" / "smoke.toml"


def _load(name: str):
    import optuna

    from dmdopt.search.storage import open_storage

    try:
        return optuna.load_study(study_name=name, storage=open_storage(POSTGRES_URL))
    except KeyError:  # not created yet
        return None


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return f"--- {path.name}\n" + "\n".join(text.splitlines()[-lines:])


def test_workers_on_postgres_survive_a_killed_worker(tmp_path, monkeypatch):
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    if os.environ.get("DMDOPT_TESTS_NO_SKIP") == "1":  # CI: the MLflow half must run too
        assert MLFLOW_URI, "DMDOPT_TEST_MLFLOW_URI is not set (see .ci/services.sh)"
    for key, value in HEARTBEAT.items():  # also for this process's own storage handle
        monkeypatch.setenv(key, value)
    name = f"pgtest-{uuid.uuid4().hex[:10]}"
    study_file = tmp_path / "smoke.toml"
    study_file.write_text(SMOKE.read_text().replace('name = "smoke"', f'name = "{name}"'))
    cmd = [sys.executable, "-m", "dmdopt", "study", "run", str(study_file),
           "--storage", POSTGRES_URL, "--n-trials", str(N_TRIALS),
           "--cache-dir", str(tmp_path / "data"), "--quiet"]
    cmd += ["--tracking-uri", MLFLOW_URI] if MLFLOW_URI else ["--no-mlflow"]
    env = {**os.environ, **HEARTBEAT, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)

    logs = [tmp_path / f"worker-{i}.log" for i in range(N_WORKERS)]
    procs = []
    for log in logs:  # all at once, like the tasks of a Slurm array on a fresh study
        with log.open("w") as out:
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out,
                                          stderr=subprocess.STDOUT))
    by_worker = {f"{socket.gethostname()}:{p.pid}": p for p in procs}
    started = time.monotonic()

    def all_logs() -> str:
        return "\n".join(_tail(log) for log in logs)

    try:
        # 1. Wait until half the quota is COMPLETE and a worker is in the middle of a trial
        #    (each trial records its worker as `host:pid`; its `dmd` attribute is written after
        #    the last parameter is sampled, just before training starts: a trial seen with only
        #    some of its parameters would be retried with the rest sampled anew), then SIGKILL
        #    that worker.
        victim = victim_trial = None
        while victim is None:
            assert time.monotonic() - started < DEADLINE_S, "no trial to interrupt\n" + all_logs()
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, f"a worker exited early (rc {dead[0].returncode})\n" + all_logs()
            study = _load(name)
            trials = study.get_trials(deepcopy=False) if study is not None else []
            n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
            running = [t for t in trials if t.state == TrialState.RUNNING
                       and t.user_attrs.get("worker") in by_worker and "dmd" in t.user_attrs]
            if n_complete >= N_TRIALS // 2 and running:
                victim_trial = running[-1]
                victim = by_worker[victim_trial.user_attrs["worker"]]
                victim.send_signal(signal.SIGKILL)
            else:
                time.sleep(0.25)
        victim.wait(timeout=10)
        kill_time = time.monotonic() - started

        # 2. The others finish the study: they fail the stale trial after the grace period,
        #    re-run it, and exit once N trials are COMPLETE.
        for proc in procs:
            if proc is not victim:
                left = DEADLINE_S - (time.monotonic() - started)
                try:
                    proc.wait(timeout=max(left, 1))
                except subprocess.TimeoutExpired:
                    pytest.fail("the surviving workers did not finish the study\n" + all_logs())
                assert proc.returncode == 0, all_logs()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"\n{name}: killed pid {victim.pid} in trial {victim_trial.number} at "
          f"{kill_time:.0f} s; done at {time.monotonic() - started:.0f} s")

    # 3. The storage: exactly N COMPLETE, nothing left RUNNING/WAITING, numbers unique.
    study = _load(name)
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        print(f"  trial {t.number}: {t.state.name:8} worker {t.user_attrs.get('worker')} "
              f"retry-of {RetryHeartbeatStaleTrialCallback.retried_trial_number(t)}")
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), numbers
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == N_TRIALS, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({t._trial_id for t in trials}) == len(trials)

    # 4. The killed trial ended FAIL and was re-queued once, with its parameters, and re-run.
    lost = next(t for t in trials if t.number == victim_trial.number)
    assert lost.state == TrialState.FAIL
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
               == lost.number]
    assert len(retries) == 1, [t.number for t in retries]
    retry = retries[0]
    assert RetryHeartbeatStaleTrialCallback.retry_history(retry) == [lost.number]
    assert retry.params == lost.params
    assert retry.state in (TrialState.COMPLETE, TrialState.FAIL)  # FAIL only if it diverged
    assert retry.user_attrs.get("worker") in set(by_worker) - {victim_trial.user_attrs["worker"]}

    if MLFLOW_URI:
        _check_mlflow(name, {t.number for t in complete}, killed=lost.number)
    optuna.delete_study(study_name=name, storage=study._storage)  # kept when a check failed


def _check_mlflow(name: str, complete: set[int], killed: int) -> None:
    # 5. MLflow: one parent for the study; one child per COMPLETE trial, under that parent.
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=MLFLOW_URI)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r}"
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`dmdopt.study` = '{name}'",
                              run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
    parents = [r for r in runs if r.data.tags.get("dmdopt.role") == "parent"]
    assert len(parents) == 1, [r.info.run_id for r in parents]
    children = [r for r in runs if r.data.tags.get("dmdopt.role") == "child"]
    child_numbers = [int(r.data.tags["dmdopt.trial_number"]) for r in children]
    assert len(child_numbers) == len(set(child_numbers)), sorted(child_numbers)
    complete_children = {int(r.data.tags["dmdopt.trial_number"]): r for r in children
                         if r.data.tags.get("dmdopt.trial_state") == "COMPLETE"}
    assert set(complete_children) == complete
    # the killed trial's FAIL child, logged when its retry ended (no sync-mlflow needed)
    failed = [r for r in children if int(r.data.tags["dmdopt.trial_number"]) == killed]
    assert [r.data.tags.get("dmdopt.trial_state") for r in failed] == ["FAIL"], sorted(child_numbers)
    for run in children:
        assert run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    for number, run in complete_children.items():
        assert run.info.status == "FINISHED"
        assert "cost_bpe" in run.data.metrics and "val_rel_l2" in run.data.metrics, number


def test_a_postgresql_tracking_store_that_cannot_work_is_refused_in_seconds(tmp_path):
    """A wrong password cost minutes of MLflow's retries per client while the study ran
    untracked; the Optuna database as the tracking store got MLflow's tables beside Optuna's
    and exit 0. Both are one line, exit 2, before the study is created."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from dmdopt._util import with_sql_driver

    url = make_url(with_sql_driver(POSTGRES_URL))
    engine = sqlalchemy.create_engine(url)
    tables = set(sqlalchemy.inspect(engine).get_table_names())
    name = f"pgtrack-{uuid.uuid4().hex[:10]}"
    study_file = tmp_path / "smoke.toml"
    study_file.write_text(SMOKE.read_text().replace('name = "smoke"', f'name = "{name}"'))
    wrong = url.set(password="not-" + (url.password or "")).render_as_string(hide_password=False)
    for storage, tracking, needle in (
            (f"sqlite:///{tmp_path / 'o.db'}", wrong, "password authentication failed"),
            (POSTGRES_URL, POSTGRES_URL, "database of the Optuna storage"),
            (f"sqlite:///{tmp_path / 'o.db'}", POSTGRES_URL, "holds an Optuna storage")):
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "dmdopt", "study", "run", str(study_file),
                              "--storage", storage, "--tracking-uri", tracking, "--quiet"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        err = out.stderr.strip()
        assert out.returncode == 2 and err.count("\n") == 0 and needle in err, err
        assert took < 60, took  # MLflow alone retried for about 100 s
        assert (url.password or "\0") not in err
    assert set(sqlalchemy.inspect(engine).get_table_names()) == tables
    assert not (tmp_path / "o.db").exists()
    engine.dispose()


def test_an_mlflow_store_in_a_schema_of_its_own_in_the_optuna_database_is_accepted(tmp_path):
    """`?options=-csearch_path=SCHEMA` puts MLflow's tables (its alembic_version among them)
    in a schema apart from Optuna's: the check refused it as 'the database of the Optuna
    storage'. Now the study runs, and MLflow's tables are in that schema only."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from dmdopt._util import with_sql_driver

    url = make_url(with_sql_driver(POSTGRES_URL))
    engine = sqlalchemy.create_engine(url)
    schema = f"mlflow_{uuid.uuid4().hex[:10]}"
    public = set(sqlalchemy.inspect(engine).get_table_names())
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    name = f"pgschema-{uuid.uuid4().hex[:10]}"
    study_file = tmp_path / "smoke.toml"
    study_file.write_text(SMOKE.read_text().replace('name = "smoke"', f'name = "{name}"'))
    tracking = f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}options=-csearch_path%3D{schema}"
    try:
        out = subprocess.run([sys.executable, "-m", "dmdopt", "study", "run", str(study_file),
                              "--storage", POSTGRES_URL, "--tracking-uri", tracking,
                              "--n-trials", "1", "--quiet"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        inspector = sqlalchemy.inspect(engine)
        mine = set(inspector.get_table_names(schema=schema))
        assert {"experiments", "runs", "alembic_version"} <= mine, mine
        assert not {"experiments", "runs"} & (set(inspector.get_table_names()) - public)
        with engine.connect() as conn:  # the study's parent run and its trial are there
            runs = conn.execute(sqlalchemy.text(f'SELECT COUNT(*) FROM "{schema}".runs')).scalar()
        assert runs >= 2, runs
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def test_a_search_path_naming_no_schema_fails_at_once(monkeypatch):
    """InvalidSchemaName is a ProgrammingError, which was taken for a schema-creation race
    and retried 6 times (about 10 s) before the one line."""
    import dmdopt.search.storage as storage
    from dmdopt.errors import UserError

    slept = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    url = f"{POSTGRES_URL}?options=-csearch_path%3Dno_such_schema_{uuid.uuid4().hex[:8]}"
    with pytest.raises(UserError, match="cannot open") as err:
        storage.open_storage(url)
    assert slept == [] and "\n" not in str(err.value)


def test_a_held_mlflow_setup_lock_does_not_hang_a_new_worker(monkeypatch, caplog):
    """pg_advisory_lock waits forever: a holder that stalled, or whose link died (its session
    lives until TCP keepalive), hung every new worker without a word."""
    import logging

    from sqlalchemy import create_engine, text

    import dmdopt.tracking.runs as runs

    schema = f"setup_lock_{uuid.uuid4().hex[:8]}"
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    engine = create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg2://", 1),
                           isolation_level="AUTOCOMMIT")
    with engine.connect() as holder:
        holder.execute(text(f"CREATE SCHEMA {schema}"))
        try:
            key = runs._setup_lock_key(runs.with_sql_driver(url))
            assert key != runs._setup_lock_key(runs.with_sql_driver(POSTGRES_URL))  # per schema
            assert holder.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            monkeypatch.setattr(runs, "SETUP_LOCK_WAIT_S", 1.0)
            with caplog.at_level(logging.WARNING, logger="dmdopt.tracking.runs"):
                client = runs.open_client(url)  # waits 1 s, then goes on
            assert client.search_experiments(max_results=1) is not None
            assert "held its set-up lock" in caplog.text
        finally:
            holder.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()
