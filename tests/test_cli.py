"""The command line: help works, user mistakes are one line with exit code 2."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest
import torch

from dmdopt.cli import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "dmdopt", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    # the subcommand list itself ("ui" in "build" or "export" in the description would pass)
    listed = re.search(r"\{([a-z,-]+)\}", out.stdout).group(1).split(",")
    assert set(listed) == {"study", "export", "train", "dashboard", "ui", "bench", "data"}


@pytest.mark.parametrize("argv", [
    ["train", "--steps", "0"],
    ["train", "--optimizer", "lbfgs"],
    ["study", "run"],
    ["nonsense"],
    ["study", "run", "x.toml", "--workers", "-3"],
    ["study", "run", "x.toml", "--timeout", "-5"],
    ["bench", "--methods", "lbfgs"],
    ["bench", "--dmd", "growing=grow"],
    ["bench", "--lr", "gd=fast"],
    ["bench", "--seeds", "0"],
    ["bench", "--methods", ","],
    ["study", "status", "x", "--storage", ""],  # not "the study file's storage" by accident
    ["bench", "--dmd", "line_search=fast"],
    ["bench", "--methods", "adam,adam"],  # was: each pair run twice, two rows named adam
    ["bench", "--dmd", "window=10,window=12"],  # was: window 12, silently
    ["train", "--config", ""],  # was: a default plain run, as if no --config was given
    ["train", "--config", "t.toml", "--tracking-uri", ""],  # was: the default store
    ["study", "run", "x.toml", "--tracking-uri", " "],
    ["export", "x", "-o", ""],
    ["train", "--config", "t.toml", "--device", ""],  # was: the config's device, silently
    ["train", "--config", "t.toml", "--checkpoint-dir", ""],  # was: the default folder
    ["train", "--cache-dir", ""],  # was: the dataset cached in the current folder
    ["data", "--cache-dir", ""],
    ["train", "--config", "t.toml", "--tracking-uri", "sqlite:///x.db", "--no-mlflow"],  # one ignored
    ["study", "run", "x.toml", "--tracking-uri", "sqlite:///x.db", "--no-mlflow"],
])
def test_bad_arguments_one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dmdopt")


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://", "sqlite:///",
                                 "sqlite+pysqlite://", "sqlite+pysqlite:///:memory:",
                                 "sqlite:///:memory:?cache=shared"])
def test_an_in_memory_storage_is_refused(url, tmp_path, monkeypatch, capsys):
    """Each worker got its own empty database (tracebacks), and nothing outlived the command."""
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny_study_toml())
    assert main(["study", "run", "s.toml", "--storage", url, "--no-mlflow", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "in-memory database" in err and err.count("\n") == 0


@pytest.mark.parametrize("url", ["http://127.0.0.1:5000", "HTTPS://u:secret@mlflow.example"])
def test_an_http_url_as_storage_is_named_a_tracking_uri(url, tmp_path, monkeypatch, capsys):
    """SQLAlchemy said "Can't load plugin: sqlalchemy.dialects:http"; the likely mix-up is an
    MLflow server's URL given as the Optuna storage."""
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny_study_toml())
    assert main(["study", "run", "s.toml", "--storage", url, "--no-mlflow", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tracking-uri" in err and "secret" not in err, err


@pytest.mark.parametrize(("argv", "needle"), [
    (["train", "--config", "tuned.toml", "--lr", "5"], "--lr does not apply with --config"),
    (["train", "--config", "tuned.toml", "--dmd-window", "5"], "--dmd-window does not apply"),
    (["train", "--steps", "3", "--tracking-uri", "sqlite:///x.db"], "--tracking-uri applies only"),
    (["train", "--steps", "3", "--checkpoint-dir", "ck"], "--checkpoint-dir applies only"),
    (["train", "--steps", "3", "--dmd-horizon", "0"], "dmd.horizon"),  # was: DMD silently off
    (["train", "--steps", "10", "--dmd-window", "11"], "exceeds --steps 10"),  # so was this
    (["train", "--steps", "10", "--accept-rows", "8"], "applies only with DMD"),  # was: ignored
    (["train", "--steps", "10", "--momentum", "0.5"], "applies to optimizer 'sgd' only"),  # so was this
])
def test_train_flags_that_do_not_apply_are_refused(argv, needle, tmp_path, monkeypatch, capsys):
    _refused_in_one_line(argv, needle, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize(("argv", "needle"), [
    # was "--seeds, --steps and --jobs must be positive integers": which, and what value?
    (["bench", "--seeds", "0"], "--seeds must be a positive integer, got 0"),
    (["bench", "--jobs", "-2"], "--jobs must be a positive integer, got -2"),
    (["bench", "--json", ""], "--json: give a file path"),  # was "cannot write : it is a directory"
    (["export", "x", "-o", "t.toml", "--policy", ""], "policy must be one of"),  # was: knee
    # was "got '10=20.0'"
    (["export", "x", "-o", "t.toml", "--policy", "budget=10", "--value", "20"], "already has a value"),
])
def test_bad_flag_values_name_the_flag_and_the_value(argv, needle, tmp_path, monkeypatch, capsys):
    _refused_in_one_line(argv, needle, tmp_path, monkeypatch, capsys)


def _refused_in_one_line(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's error(), as the bench options report
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0, err
    assert not list(tmp_path.iterdir())  # refused before any data, checkpoint or store


def test_pareto_of_a_study_without_reference_or_trials(tmp_path, monkeypatch, capsys):
    import optuna

    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    optuna.create_study(study_name="bare", storage=storage, directions=["minimize", "minimize"])
    assert main(["study", "pareto", "bare", "--storage", storage, "--csv"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "trial,cost_bpe,val_rel_l2,speedup,speedup_first_passage,window,rank," \
                          "horizon,is_reference,is_recommended,reached_reference"
    assert main(["study", "pareto", "bare", "--storage", storage]) == 0
    out, err = capsys.readouterr()
    assert "0 point(s)" in out and "no reference run yet" in err


def test_sync_to_a_dead_server_is_one_error_line_with_the_reason(tmp_path):
    """The real command line (pytest records warnings itself). It printed a long warning, then
    an error line pointing at it: now the error line carries the first failure itself."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    optuna.create_study(study_name="bare", storage=storage, directions=["minimize", "minimize"])
    out = subprocess.run([sys.executable, "-m", "dmdopt", "study", "sync-mlflow", "bare",
                          "--storage", storage, "--tracking-uri", "http://127.0.0.1:9"],
                         capture_output=True, text=True, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("dmdopt: error: sync-mlflow: the MLflow tracking store "
                               "http://127.0.0.1:9 failed ("), lines
    assert "no parent run" not in lines[0]  # the cause, not a later effect of it


def test_unknown_study_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "status", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nosuch" in err and err.count("\n") == 0


def test_unreachable_storage_is_one_line(capsys):
    code = main(["study", "status", "x", "--storage", "postgresql://u:pw@127.0.0.1:1/db"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "pw" not in err


def test_train_bad_value_is_one_line(capsys):
    assert main(["train", "--lr", "-1", "--quiet"]) == 2
    assert "lr" in capsys.readouterr().err


def test_train_on_an_absent_gpu_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    assert main(["train", "--device", "cuda", "--steps", "5", "--quiet", "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()  # names the flag the user typed, not a config field
    assert err.count("\n") == 0 and "--device is 'cuda'" in err and "Traceback" not in err


def test_study_on_an_absent_gpu_is_one_line_and_creates_nothing(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    training = 'optimizer = "adam"\nlr = 0.01\nmax_steps = 60\neval_every = 10\ndevice = "cuda"'
    (tmp_path / "s.toml").write_text(tiny_study_toml(n_trials=1, training=training))
    db = tmp_path / "o.db"
    assert main(["study", "run", "s.toml", "--storage", f"sqlite:///{db}", "--no-mlflow",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training.device" in err and "Traceback" not in err
    assert not db.exists()


def _mysql_driver() -> bool:
    """Whether a MySQL driver is installed: without one a mysql:// store is refused at once."""
    import importlib.util

    return any(importlib.util.find_spec(m) for m in ("MySQLdb", "pymysql"))


def test_a_tracking_uri_mlflow_cannot_open_is_refused_before_any_trial(tmp_path, monkeypatch,
                                                                       capsys):
    """`localhost:5000` (no http://) used to cost one warning, after which the whole study ran
    untracked; an unknown scheme is now one line, exit 2, before the study is created."""
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny_study_toml(n_trials=1))
    db = tmp_path / "o.db"
    storage = f"sqlite:///{db}"
    assert main(["study", "run", "s.toml", "--storage", storage, "--tracking-uri",
                 "localhost:5000", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tracking-uri" in err and "localhost:5000" in err
    assert not db.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://u:secret@host")
    assert main(["study", "run", "s.toml", "--storage", storage, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "$MLFLOW_TRACKING_URI" in err and "secret" not in err and not db.exists()
    with socket.socket() as free:  # a port the UI could listen on: the URI is what fails
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["ui", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "$MLFLOW_TRACKING_URI" in err and "secret" not in err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    for uri, needle in (("http://[::1:5000", "not a URI"), ("127.0.0.1:5000", "http://127.0.0.1:5000"),
                        ("usr:secret@host:5000", "no tracking store"),
                        # stores that could never work, which ran the study untracked after a
                        # warning (a folder: after 3.5 min of MLflow's retries)
                        ("mlruns", "MLflow file store"), (f"file://{tmp_path}/m", "MLflow file store"),
                        (f"sqlite:///{tmp_path}", "not a database file"),
                        *([] if _mysql_driver() else [("mysql://u:secret@h/db",
                                                       "needs the Python driver")])):
        assert main(["study", "run", "s.toml", "--storage", storage, "--tracking-uri", uri,
                     "--quiet"]) == 2, uri
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err and "secret" not in err, err
    assert not db.exists()
    import optuna

    optuna.create_study(study_name="bare", storage=storage, directions=["minimize", "minimize"])
    assert main(["study", "sync-mlflow", "bare", "--storage", storage, "--tracking-uri",
                 "localhost:5000"]) == 2
    assert "http://localhost:5000" in capsys.readouterr().err  # the scheme it lacks


def test_data_and_train_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "--grid", "16", "--samples", "40", "--workers", "1", "--quiet"]) == 0
    assert "config_hash" in capsys.readouterr().out
    assert main(["train", "--grid", "16", "--samples", "40", "--steps", "20", "--width", "16",
                 "--quiet", "--eval-every", "10"]) == 0
    out = capsys.readouterr().out
    assert "val_rel_l2" in out and "cost_total" in out


def test_a_diverging_run_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """A learning rate too large gave a Diverged traceback (exit 1), in `train` and in a
    study's reference run; the study is dropped, as any study whose reference never finished."""
    import optuna
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--grid", "16", "--samples", "40", "--steps", "5", "--optimizer", "sgd",
                 "--lr", "1e30", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "training diverged: training loss is" in err and "--lr" in err and err.count("\n") == 0
    (tmp_path / "s.toml").write_text(tiny_study_toml(
        training='optimizer = "sgd"\nlr = 1e30\nmax_steps = 60\neval_every = 10'))
    assert main(["study", "run", "s.toml", "--no-mlflow", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the reference run (plain sgd at lr 1e+30) diverged" in err and err.count("\n") == 0
    storage = f"sqlite:///{tmp_path / 'dmdopt-runs' / 'optuna.db'}"
    assert optuna.get_all_study_names(storage=storage) == []


def test_one_dmd_flag_leaves_the_others_at_dmdconfigs_defaults(tmp_path, monkeypatch):
    """`--dmd-window 5` alone ran rank 8 and horizon 100, not the documented defaults."""
    import dmdopt.training as training_pkg
    from dmdopt.training import DMDConfig

    seen = []
    monkeypatch.setattr(training_pkg, "train", lambda **kw: seen.append(kw["dmd"]) or 1 / 0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZeroDivisionError):  # stop once train() has its arguments
        main(["train", "--grid", "16", "--samples", "40", "--steps", "20", "--dmd-window", "5",
              "--quiet"])
    assert seen == [DMDConfig(window=5)]


def test_unwritable_cache_dir_is_one_line_before_any_solving(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    code = main(["data", "--grid", "16", "--samples", "20", "--quiet",
                 "--cache-dir", str(blocked / "data")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cache_dir" in err and err.count("\n") == 0


def test_study_run_gives_back_the_callers_sigterm_handler(tmp_path, monkeypatch):
    """`main` may run inside a notebook or a test: its SIGTERM handling ends with the command."""
    import signal

    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny_study_toml(n_trials=1))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["study", "run", "s.toml", "--no-mlflow", "--quiet"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_bench_refuses_an_unwritable_json_path_before_running(tmp_path, monkeypatch, capsys):
    """The rows of a 37-minute benchmark must not be lost to a bad --json path at its end."""
    import dmdopt.bench

    def no_run(**kwargs):
        raise AssertionError("the benchmark ran before its output path was checked")

    monkeypatch.setattr(dmdopt.bench, "run_benchmark", no_run)
    blocker = tmp_path / "tuned.toml"
    blocker.write_text("a file, not a folder\n")
    with pytest.raises(SystemExit) as info:
        main(["bench", "--quick", "--seeds", "1", "--methods", "gd", "--json", str(blocker / "b.json")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--json" in err and "b.json" in err
    with pytest.raises(SystemExit) as info:  # a folder's name, written as a file before
        main(["bench", "--json", f"{tmp_path}/out/"])
    assert info.value.code == 2 and "directory" in capsys.readouterr().err


def test_study_export_train_round_trip(tmp_path, monkeypatch, capsys):
    """The user's path: a study, its export (policy and --trial honoured), production training
    that reproduces the trial."""
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny_study_toml(n_trials=3))
    assert main(["study", "run", "s.toml", "--no-mlflow", "--quiet"]) == 0
    assert main(["export", "tiny", "-o", "t.toml", "--policy", "budget=1"]) == 2  # nothing that cheap
    assert not (tmp_path / "t.toml").exists()
    capsys.readouterr()
    for rule in (["--policy", "knee"], ["--value", "2"]):  # silently ignored, was
        assert main(["export", "tiny", "-o", "t.toml", "--trial", "1", *rule]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--trial" in err and rule[0] in err, err
        assert not (tmp_path / "t.toml").exists()
    assert main(["export", "tiny", "-o", "t.toml", "--trial", "1"]) == 0
    assert "exported trial 1 (manual)" in capsys.readouterr().out
    assert main(["train", "--config", "t.toml", "--no-mlflow", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"reproduced: True", out) and re.search(r"val_rel_diff: 0\b", out)


def test_export_refuses_to_overwrite_the_study_file(tmp_path, monkeypatch, capsys):
    """`export s.toml -o s.toml` replaced the study's definition with a tuned config."""
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny_study_toml())
    before = (tmp_path / "s.toml").read_text()
    for command in ("export", "dashboard"):
        assert main([command, "s.toml", "-o", "./s.toml"]) == 2
        err = capsys.readouterr().err.strip()
        assert "is the study file itself" in err and err.count("\n") == 0
    assert (tmp_path / "s.toml").read_text() == before
    assert main(["dashboard", "s.toml", "-o", "out/"]) == 2  # wrote a file named `out`
    assert "is a directory" in capsys.readouterr().err and not (tmp_path / "out").is_file()
    # the study named by name, its file beside: `export tiny -o s.toml` replaced it too
    assert main(["study", "run", "s.toml", "--n-trials", "1", "--no-mlflow", "--quiet"]) == 0
    capsys.readouterr()
    for command in ("export", "dashboard"):
        assert main([command, "tiny", "-o", "s.toml"]) == 2
        err = capsys.readouterr().err.strip()
        assert "is a study file" in err and err.count("\n") == 0, err
    assert (tmp_path / "s.toml").read_text() == before
    (tmp_path / "S2.TOML").write_text(before)  # export writes .TOML as TOML: it was replaced
    assert main(["export", "tiny", "-o", "S2.TOML"]) == 2
    assert "is a study file" in capsys.readouterr().err
    assert (tmp_path / "S2.TOML").read_text() == before
    (tmp_path / "s3.toml").write_text(before + "lr = = 3\n")  # a study file mid-edit
    assert main(["export", "tiny", "-o", "s3.toml"]) == 2
    assert "is a study file" in capsys.readouterr().err
    assert (tmp_path / "s3.toml").read_text() == before + "lr = = 3\n"
    (tmp_path / "d.png").write_bytes(b"png")
    assert main(["dashboard", "tiny", "-o", "d.png"]) == 2  # any file, written over as HTML
    assert "name it .html" in capsys.readouterr().err and (tmp_path / "d.png").read_bytes() == b"png"
    assert main(["export", "tiny", "-o", "t.toml"]) == 0  # a tuned config is no study file
    assert main(["export", "tiny", "-o", "t.toml", "--trial", "0"]) == 0  # ... and is replaced


@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_an_unreadable_study_file_is_one_line(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if kind == "binary":
        (tmp_path / "s.toml").write_bytes(b"\xff\xfe[study]\n")
    else:
        (tmp_path / "s.toml").mkdir()
    for argv in (["study", "run", "s.toml", "--no-mlflow"], ["study", "status", "s.toml"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and ("not UTF-8" in err if kind == "binary" else "is a directory" in err)


def test_reading_a_missing_sqlite_storage_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'sub' / 'none.db'}?timeout=30"
    for command in ("status", "pareto"):
        assert main(["study", command, "x", "--storage", url]) == 2
        err = capsys.readouterr().err.strip()
        assert "none.db does not exist" in err and err.count("\n") == 0
    assert not list(tmp_path.iterdir())


def test_a_study_not_made_by_dmdopt_is_refused(tmp_path, monkeypatch, capsys):
    """Was: its trials shown as a dmdopt front, and exported as a tuned config."""
    import optuna

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'other.db'}"
    other = optuna.create_study(study_name="other", storage=url, directions=["minimize"] * 2)
    other.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=2)
    for argv in (["study", "status", "other"], ["study", "pareto", "other"],
                 ["export", "other", "-o", "tuned.toml"]):
        assert main([*argv, "--storage", url]) == 2
        err = capsys.readouterr().err.strip()
        assert "not made by dmdopt" in err and err.count("\n") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]  # nothing exported
    from study_files import tiny_study_toml

    (tmp_path / "other.toml").write_text(tiny_study_toml("other"))  # nor taken over by a run
    assert main(["study", "run", "other.toml", "--storage", url, "--no-mlflow", "--quiet"]) == 2
    assert "not made by dmdopt" in capsys.readouterr().err
    assert "config_digest" not in optuna.load_study(study_name="other", storage=url).user_attrs


def test_a_read_only_sqlite_storage_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """Optuna raised a 60-line StorageInternalError at its first commit. (CI runs as root,
    which may write anything, so the permission check itself is what is simulated.)"""
    import optuna
    from study_files import tiny_study_toml

    from dmdopt.search import storage as storage_module

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'o.db'}"
    optuna.create_study(study_name="other", storage=url)
    (tmp_path / "s.toml").write_text(tiny_study_toml())
    real_access = storage_module.os.access
    monkeypatch.setattr(storage_module.os, "access",
                        lambda path, mode: False if str(path).endswith("o.db") else real_access(path, mode))
    assert main(["study", "run", "s.toml", "--storage", url, "--no-mlflow", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "o.db is read-only" in err and err.count("\n") == 0
    assert not (tmp_path / "dmdopt-runs").exists()  # refused before the dataset was built
    assert main(["study", "status", "other", "--storage", url]) == 0  # reading still works


def test_more_workers_than_trials_left_start_no_more_processes(tmp_path, monkeypatch, capsys):
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny_study_toml(n_trials=2))
    assert main(["study", "run", "s.toml", "--no-mlflow", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["study", "run", "s.toml", "--no-mlflow", "--workers", "100000"]) == 0
    assert "2 finished trial(s)" in (out := capsys.readouterr().out) and "1 worker(s)" in out


def test_ui_on_a_port_in_use_is_one_line_and_exit_2(capsys):
    """The MLflow server logged the bind error and exited 0: `dmdopt ui` reported success."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 0


def test_a_model_too_large_for_memory_is_one_line(tmp_path, monkeypatch, capsys):
    """torch's allocator error was a traceback; the dataset here is tiny, the model is not."""
    monkeypatch.chdir(tmp_path)
    for width in ("10000000000", str(2**63 - 1)):  # the second overflowed torch's size count
        assert main(["train", "--grid", "8", "--samples", "20", "--steps", "2", "--quiet",
                     "--width", width]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dmdopt: error: out of memory") and err.count("\n") == 0


def test_a_model_past_the_machines_memory_is_refused_before_it_is_built(tmp_path, monkeypatch,
                                                                        capsys):
    """Linux lends memory it lacks: width 1e9 was allocated, then killed by the OOM killer
    (exit 137, no message) while it filled the pages."""
    import dmdopt.training.loop as loop

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "build_regressor", never)
    # 64 GiB of memory, whatever this machine has (a host with over 1 TiB would build it)
    real = loop.os.sysconf
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 64 * 2**30 // 4096}
    monkeypatch.setattr(loop.os, "sysconf", lambda name: pages.get(name) or real(name))
    assert main(["train", "--grid", "8", "--samples", "20", "--steps", "2", "--quiet",
                 "--width", "1000000000", "--depth", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "71,000,000,064 parameters need at least 1,058.0 GiB (weights, gradients, " \
           "optimiser state), more than the" in err and err.count("\n") == 0


def test_a_read_only_mlflow_store_fails_at_once(tmp_path, monkeypatch, capsys):
    """MLflow retried its writes to a read-only SQLite file for 108 s before sync-mlflow's
    error (210 s in a study). Simulated: CI runs as root, which may write anything."""
    import time

    import optuna

    from dmdopt.tracking import runs

    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    optuna.create_study(study_name="bare", storage=storage, directions=["minimize", "minimize"])
    (tmp_path / "m.db").touch()
    real_access = runs.os.access
    monkeypatch.setattr(runs.os, "access",
                        lambda path, mode: False if str(path).endswith("m.db") else real_access(path, mode))
    start = time.monotonic()
    import warnings

    with warnings.catch_warnings(record=True) as warned:  # one line, not a warning and a line
        warnings.simplefilter("always")
        code = main(["study", "sync-mlflow", "bare", "--storage", storage,
                     "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert code == 2 and time.monotonic() - start < 30
    assert not [w for w in warned if issubclass(w.category, RuntimeWarning)]
    err = capsys.readouterr().err.strip()
    assert "tracking store" in err and "m.db is read-only" in err and "\n" not in err, err


def test_a_storage_that_is_no_optuna_database_is_refused_and_left_untouched(tmp_path, monkeypatch,
                                                                           capsys):
    """`study status quick --storage sqlite:///dmdopt-runs/mlflow.db` (one mistyped flag) wrote
    Optuna's tables into MLflow's database, said 'please update optuna', and from then on MLflow's
    store was refused as holding an Optuna storage. A read-only command now writes nothing to a
    database without Optuna's tables (another program's, an empty file), and MLflow's database
    is refused as a storage by `study run` too, before anything runs."""
    import sqlite3

    import sqlalchemy
    from mlflow.tracking import MlflowClient
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny_study_toml(n_trials=1))
    mlflow_db, app_db, empty = tmp_path / "mlflow.db", tmp_path / "app.db", tmp_path / "empty.db"
    MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}").create_experiment("mine")
    with sqlite3.connect(app_db) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER)")
    empty.touch()
    capsys.readouterr()  # MLflow's own log lines

    def tables(path):
        engine = sqlalchemy.create_engine(f"sqlite:///{path}")
        try:
            return set(sqlalchemy.inspect(engine).get_table_names())
        finally:
            engine.dispose()

    before = {path: tables(path) for path in (mlflow_db, app_db)}
    for path, needle in ((mlflow_db, "is an MLflow tracking store"),
                         (app_db, "holds no Optuna storage"), (empty, "holds no Optuna storage")):
        for command in (["study", "status", "quick"], ["study", "pareto", "quick"],
                        ["export", "quick", "-o", "t.toml"]):
            assert main([*command, "--storage", f"sqlite:///{path}"]) == 2, (command, path)
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and needle in err, err
    assert main(["study", "run", "s.toml", "--storage", f"sqlite:///{mlflow_db}", "--no-mlflow",
                 "--quiet"]) == 2
    assert "is an MLflow tracking store" in capsys.readouterr().err
    assert {path: tables(path) for path in (mlflow_db, app_db)} == before
    assert empty.stat().st_size == 0 and not (tmp_path / "t.toml").exists()
    # and MLflow's store still works as one
    assert main(["study", "run", "s.toml", "--tracking-uri", f"sqlite:///{mlflow_db}",
                 "--quiet"]) == 0


def test_mlflows_default_store_is_no_new_optuna_storage(tmp_path, monkeypatch, capsys):
    """`storage = "sqlite:///dmdopt-runs/mlflow.db"` with --no-mlflow made Optuna's tables
    there; every tracked command was then refused, naming $MLFLOW_TRACKING_URI though unset."""
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "s.toml").write_text(tiny_study_toml(n_trials=1))
    assert main(["study", "run", "s.toml", "--storage", "sqlite:///dmdopt-runs/mlflow.db",
                 "--no-mlflow", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is MLflow's default store" in err, err
    assert not (tmp_path / "dmdopt-runs" / "mlflow.db").exists()
    # a default store that does hold an Optuna storage (made by an earlier dmdopt) is named
    # as what it is, not as the unset variable
    assert main(["study", "run", "s.toml", "--storage", "sqlite:///dmdopt-runs/o.db",
                 "--no-mlflow", "--quiet"]) == 0
    (tmp_path / "dmdopt-runs" / "o.db").rename(tmp_path / "dmdopt-runs" / "mlflow.db")
    assert main(["study", "sync-mlflow", "tiny", "--storage", "sqlite:///dmdopt-runs/mlflow.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the default tracking store: " in err and "$MLFLOW_TRACKING_URI" not in err, err


def test_a_tracking_store_in_an_optuna_database_is_refused(tmp_path, monkeypatch, capsys):
    """MLflow pointed at the Optuna storage created its tables beside Optuna's and the command
    exited 0. The same database under the same or another URL (a fresh study: no tables yet)
    and any database already holding an Optuna storage are one line, exit 2, nothing written."""
    import optuna
    import sqlalchemy
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny_study_toml(n_trials=1))
    db = tmp_path / "o.db"
    for uri in (f"sqlite:///{db}", "sqlite:///./o.db"):  # the same file, also spelled relative
        assert main(["study", "run", "s.toml", "--storage", f"sqlite:///{db}", "--tracking-uri",
                     uri, "--quiet"]) == 2, uri
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "database of the Optuna storage" in err, err
        assert not db.exists()
    other = tmp_path / "other.db"
    optuna.create_study(study_name="theirs", storage=f"sqlite:///{other}")
    tables = set(sqlalchemy.inspect(sqlalchemy.create_engine(f"sqlite:///{other}")).get_table_names())
    assert main(["study", "run", "s.toml", "--storage", f"sqlite:///{db}", "--tracking-uri",
                 f"sqlite:///{other}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds an Optuna storage" in err and not db.exists(), err
    optuna.create_study(study_name="bare", storage=f"sqlite:///{db}",
                        directions=["minimize", "minimize"])
    assert main(["study", "sync-mlflow", "bare", "--storage", f"sqlite:///{db}",
                 "--tracking-uri", f"sqlite:///{db}"]) == 2
    assert "database of the Optuna storage" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["ui", "--port", str(port)]) == 2
    assert "holds an Optuna storage" in capsys.readouterr().err
    after = set(sqlalchemy.inspect(sqlalchemy.create_engine(f"sqlite:///{other}")).get_table_names())
    assert after == tables  # no MLflow table was made there


@pytest.mark.parametrize(("a", "b", "same"), [
    ("postgresql://u:pw@db.example/optuna", "postgresql+psycopg2://v:other@db.example:5432/optuna", True),
    ("postgres://u@localhost/optuna", "postgresql://u@127.0.0.1:5432/optuna?sslmode=disable", True),
    ("postgresql://u@db.example/optuna", "postgresql://u@db.example/mlflow", False),
    ("postgresql://u@db.example:5433/optuna", "postgresql://u@db.example/optuna", False),
    ("postgresql://u@db.example/optuna", "mysql://u@db.example/optuna", False),
    ("sqlite:///a.db", "sqlite:///./a.db?timeout=5", True),
    ("sqlite:///a.db", "sqlite:///b.db", False),
    ("sqlite://", "sqlite://", False),  # in memory: one database per connection
    ("http://host:5000", "postgresql://u@host/db", False),
    # one PostgreSQL database, two schemas: two sets of tables, each its own alembic_version
    ("postgresql://u@db.example/optuna", "postgresql://u@db.example/optuna?options=-csearch_path%3Dmlflow", False),
    ("postgresql://u@h/db?options=-c%20search_path%3Dmlflow", "postgresql://v@h/db?options=-csearch_path%3Dmlflow", True),
    # tables are made in the first schema of the path; none given is public
    ("postgresql://u@h/db", "postgresql://u@h/db?options=-csearch_path%3Dpublic", True),
    ("postgresql://u@h/db?options=-csearch_path%3Dmlflow,public", "postgresql://u@h/db?options=-csearch_path%3Dmlflow", True),
])
def test_same_database_reads_past_spelling(a, b, same, tmp_path, monkeypatch):
    from dmdopt._util import same_database

    monkeypatch.chdir(tmp_path)
    assert same_database(a, b) is same and same_database(b, a) is same


def test_an_unescaped_password_gets_a_hint():
    from dmdopt._util import url_encoding_hint

    for url in ("postgresql://u:p@ss@h/db", "postgresql://u:a/b@h/db", "postgresql://u:a:b@h/db",
                "postgresql://u:50%@h/db", "postgresql://u:a#b@h/db",
                "postgresql://u:12/34@h/db"):  # digits, then no ? before the @: no port
        assert "percent-encoded" in url_encoding_hint(url), url
    from dmdopt._util import redact_password

    said = 'could not translate host name "word@127.0.0.1" to address (pass)'
    assert redact_password(said, "postgresql://u:secret@word@127.0.0.1/db") == \
        'could not translate host name "***@127.0.0.1" to address (pass)'
    for url in ("postgresql://u:p%40ss@h/db", "postgresql://u:plain@h:5432/db",
                "postgresql://h/db", "sqlite:///a.db", "http://h:5000",
                # an "@" in the query string is no password's (it was read as one, to its last @)
                "postgresql://u:pw@h/db?application_name=me@laptop",
                "postgresql://h/db?application_name=me@laptop",
                "postgresql://h:5432/db?application_name=me@laptop",  # a port, no password
                "postgresql://h:5432?application_name=me@laptop"):
        assert url_encoding_hint(url) == "", url
    said = 'connection to server at "h" failed: password authentication failed for user "u" (db)'
    assert redact_password(said, "postgresql://u:pw@h/db?application_name=me@laptop") == said
    said = 'connection to server at "h", port 5432 failed: database "db" does not exist'
    assert redact_password(said, "postgresql://h:5432/db?application_name=me@laptop") == said


@pytest.mark.parametrize(("url", "connect_args"), [
    ("postgresql://u:pw@h/db", {"connect_timeout": 10}),
    ("postgresql+pg8000://u:pw@h/db", {"timeout": 10}),  # pg8000 refuses connect_timeout
    ("mysql+pymysql://u:pw@h/db", {"connect_timeout": 10}),
    ("mssql+pyodbc://u:pw@h/db", {}),
])
def test_the_storage_bounds_a_connection_attempt_in_its_drivers_own_keyword(url, connect_args,
                                                                             monkeypatch):
    """A pg8000 storage got libpq's `connect_timeout`, which pg8000 refuses (every open failed,
    'unexpected keyword argument'); a MySQL one got no timeout at all."""
    import dmdopt.search.storage as storage

    seen = {}

    def fake_storage(url, *, engine_kwargs, **_):
        seen.update(engine_kwargs)
        return "storage"

    checked = {}
    monkeypatch.setattr(storage, "RDBStorage", fake_storage)
    monkeypatch.setattr(storage, "_check_tables",  # its connection is bounded the same way
                        lambda url, args, *, writable: checked.update(args))
    assert storage.open_storage(url) == "storage"
    assert seen["connect_args"] == connect_args == checked


@pytest.mark.parametrize("command", [
    ["dashboard", "tiny", "-o", "afile/x.html"],
    ["data", "--cache-dir", "afile/c"],
    ["study", "run", "s.toml", "--storage", "sqlite:///afile/x.db", "--no-mlflow", "--quiet"],
    # MLflow's mkdir failed on every write: the whole study ran untracked, exit 0
    ["study", "run", "s.toml", "--tracking-uri", "sqlite:///afile/m.db", "--quiet"],
    ["bench", "--quick", "--seeds", "1", "--methods", "gd", "--json", "afile/x.json"],
])
def test_a_file_where_a_folder_must_be_is_named(command, tmp_path, monkeypatch, capsys):
    """A path under a file said 'File exists', which reads as 'the output exists'."""
    from study_files import tiny_study_toml

    from dmdopt._util import unwritable

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny_study_toml(n_trials=1))
    (tmp_path / "afile").write_text("")
    try:
        code = main(command)
    except SystemExit as exc:  # bench refuses through its argument parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "afile is a file, not a folder" in err, err
    assert not (tmp_path / "dmdopt-runs" / "optuna.db").exists()  # nothing ran
    assert unwritable("afile/tuned.toml") == "afile is a file, not a folder"  # export -o


def test_the_next_hint_names_the_study_files_storage_and_a_timeout_stop_says_so(
        tmp_path, monkeypatch, capsys):
    """'done. next: dmdopt study pareto alt' dropped the storage the study file named, so the
    hint failed ('not found in sqlite:///dmdopt-runs/optuna.db'); a stop at --timeout short of
    the quota printed the same 'done.' as a finished study."""
    from study_files import tiny_study_toml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "alt.toml").write_text(
        tiny_study_toml("alt", n_trials=3, extra='storage = "sqlite:///alt/optuna.db"'))
    # the first trial starts within microseconds and takes far more than 50 ms
    assert main(["study", "run", "alt.toml", "--no-mlflow", "--timeout", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "stopped at the timeout (0.05 s) with 1 of 3 trials finished" in out, out
    hint = out.strip().splitlines()[-1]  # the file names the storage (a URL may hold a password)
    assert hint == "done. next: dmdopt study pareto alt.toml", hint
    assert main(hint.removeprefix("done. next: dmdopt ").split()) == 0
    assert "alt" in capsys.readouterr().out


def test_a_finished_command_line_process_ignores_a_late_ctrl_c(monkeypatch):
    """Ctrl-C in the seconds between 'done.' and the process's exit (threads winding down)
    turned a finished study's exit code 0 into 130. A command-line run (argv from sys.argv)
    ignores SIGINT once its command returned; a call with argv (tests, scripts) leaves it."""
    import signal

    import dmdopt.cli as cli

    before = signal.getsignal(signal.SIGINT)
    try:
        monkeypatch.setattr(sys, "argv", ["dmdopt", "study", "status", "x"])
        monkeypatch.setattr(cli, "cmd_study_status", lambda args: 130)  # interrupted: not done
        assert main() == 130
        assert signal.getsignal(signal.SIGINT) is before  # a second Ctrl-C still stops it
        monkeypatch.setattr(cli, "cmd_study_status", lambda args: 0)
        assert main(["study", "status", "x"]) == 0
        assert signal.getsignal(signal.SIGINT) is before
        assert main() == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_small_mistakes_get_the_line_that_fits_them(tmp_path, capsys):
    """A folder as --config was "unknown extension ''"; a tuned config asking for CUDA on a
    machine without one did not say how to run it anyway."""
    import torch

    from dmdopt.export import TunedConfig, write_tuned_config
    from dmdopt.model import ModelConfig
    from dmdopt.problem import ProblemConfig
    from dmdopt.training.config import DMDConfig, TrainConfig
    from dmdopt.training.loop import resolve_device

    assert main(["train", "--config", str(tmp_path)]) == 2
    assert f"tuned config {tmp_path} is a directory" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the hint only where the command takes --device
        write_tuned_config(TunedConfig(
            dmd=DMDConfig(window=5, rank=3), training=TrainConfig(max_steps=10, device="cuda"),
            model=ModelConfig(width=8, depth=1), problem=ProblemConfig(grid=8, n_samples=20)),
            tmp_path / "gpu.toml")
        assert main(["train", "--config", str(tmp_path / "gpu.toml"), "--no-mlflow"]) == 2
        assert "no CUDA device is visible (--device cpu runs it on the CPU)" in capsys.readouterr().err
        with pytest.raises(ValueError, match="visible$"):  # a study file or the library: no hint
            resolve_device("cuda")
