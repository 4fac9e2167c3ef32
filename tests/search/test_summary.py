"""The study summary of a constrained `cost_to_target` study, and what status/export make of it.

Built from synthetic trials (no training): the point is which trial each command picks.
"""

from __future__ import annotations

import optuna
from optuna.distributions import IntDistribution

from dmdopt.cli import main
from dmdopt.export import load_tuned_config
from dmdopt.search.summary import summarize
from dmdopt.training import DMDConfig, TrainConfig

REF_ERROR = 0.5


def single_objective_study(url: str, name: str, trials: list[tuple[float, float, bool]]):
    """Trials as (objective, val_error, reached): a cost_to_target study with max_error_ratio 1."""
    study = optuna.create_study(study_name=name, storage=url, directions=["minimize"])
    study.set_metric_names(["cost_bpe"])
    study.set_user_attr("config", {"study": {"name": name, "mode": "cost_to_target",
                                             "max_error_ratio": 1.0}})
    study.set_user_attr("reference", {"cost_bpe": 400.0, "val_rel_l2": REF_ERROR})
    for window, (objective, val_error, reached) in enumerate(trials, start=5):
        trial = study.ask({"window": IntDistribution(3, 60)})
        cost_total = objective if reached else objective / 2  # the objective doubles a miss
        for key, value in {"val_error": val_error, "cost_total": cost_total,
                           "dmd": DMDConfig(window=window, rank=2, horizon=50).to_dict(),
                           "training": TrainConfig().to_dict()}.items():
            trial.set_user_attr(key, value)
        trial.set_constraint("max_error_ratio", val_error - REF_ERROR)
        study.tell(trial, objective)
    return study


def test_the_best_trial_is_the_cheapest_feasible_one_everywhere(tmp_path, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path}/c.db"
    # trial 0: cheapest but beyond the error bound; 1: feasible; 2: never reached the target
    study = single_objective_study(url, "c2t", [(100.0, 0.7, True), (150.0, 0.45, True),
                                                (600.0, 0.48, False)])
    summary = summarize(study)
    assert summary["mode"] == "cost_to_target" and summary["objectives"] == ["cost_bpe"]
    assert summary["pareto"] == [1]  # was [0]: the constraint was ignored
    assert summary["recommended"] == {"number": 1, "policy": "best"}
    rows = {r["number"]: r for r in summary["trials"]}
    assert [rows[n]["feasible"] for n in range(3)] == [False, True, True]
    # the point is what the trial spent and where it ended, not the doubled objective
    assert rows[2]["values"] == [300.0, 0.48] and rows[2]["objective"] == 600.0

    assert main(["study", "status", "c2t", "--storage", url]) == 0
    printed = capsys.readouterr().out
    assert "best       trial 1 " in printed
    # the command it suggests runs as printed (it lacked -o and the storage)
    how = printed.split("(`")[1].split("`")[0]
    assert how == f"dmdopt export c2t --storage {url} -o tuned.toml"
    monkeypatch.chdir(tmp_path)
    assert main(how.split()[1:]) == 0 and load_tuned_config(tmp_path / "tuned.toml")
    out = tmp_path / "tuned.toml"
    assert main(["export", "c2t", "--storage", url, "-o", str(out)]) == 0
    tuned = load_tuned_config(out)
    assert tuned.provenance["trial_number"] == 1
    assert tuned.provenance["policy"] == "best (cost_to_target)"
    assert tuned.expected["cost_bpe"] == 150.0 and tuned.dmd.window == 6
    # a trade-off policy has no front to act on here: said, not silently ignored
    capsys.readouterr()
    assert main(["export", "c2t", "--storage", url, "-o", str(out), "--policy", "budget=120"]) == 0
    assert "--policy does not apply to a cost_to_target study" in capsys.readouterr().err
    assert load_tuned_config(out).provenance["trial_number"] == 1


def test_no_feasible_trial_is_a_line_not_a_traceback(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/c.db"
    single_objective_study(url, "none", [(100.0, 0.7, True)])
    assert main(["study", "status", "none", "--storage", url]) == 0  # was a ValueError traceback
    assert "best       none" in capsys.readouterr().out
    assert main(["export", "none", "--storage", url, "-o", str(tmp_path / "t.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no COMPLETE trial within its constraints" in err[0]
    assert not (tmp_path / "t.toml").exists()


def test_status_prints_what_a_trial_that_missed_the_target_spent(tmp_path, capsys):
    """Its objective is doubled (it ranks below every hit); status printed that as the cost."""
    url = f"sqlite:///{tmp_path}/c.db"
    single_objective_study(url, "miss", [(600.0, 0.48, False)])
    assert main(["study", "status", "miss", "--storage", url]) == 0
    assert "best       trial 0  cost 300.0 bpe  (target not reached)" in capsys.readouterr().out


def _refused_unless_asked(study, url, out, capsys) -> str:
    """The study's best trial 0 is no recommendation (MLflow's tag, the dashboard's mark):
    export refuses it in one line naming `--trial 0`, writes nothing, and exports it when
    asked. Returns the refusal."""
    name = study.study_name
    assert summarize(study, storage_url=url)["recommended"] is None
    assert main(["export", name, "--storage", url, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trial 0" in err[0] and not out.exists()
    assert main(["export", name, "--storage", url, "-o", str(out), "--trial", "0"]) == 0
    assert load_tuned_config(out).provenance["trial_number"] == 0
    capsys.readouterr()
    return err[0]


def test_a_study_whose_trials_all_missed_the_target_exports_only_on_request(tmp_path, capsys):
    """Its best trial never reached the target: export wrote it as the recommendation (a
    config slower than plain training), where the two-objective mode says nothing beats it."""
    url = f"sqlite:///{tmp_path}/c.db"
    study = single_objective_study(url, "miss", [(600.0, 0.48, False), (700.0, 0.55, False)])
    err = _refused_unless_asked(study, url, tmp_path / "t.toml", capsys)
    assert "no trial of study 'miss' reached its target" in err


def test_a_heartbeat_retry_of_an_interrupts_rerun_names_the_trial_it_retried():
    """Optuna's retry copies its dead origin's user attributes, `rerun_of` included: trial 2
    (the retry of trial 1, itself the queued re-run of interrupted trial 0) claimed to re-run
    trial 0, and trial 0's reason pointed at trial 2."""
    from optuna.trial import TrialState, create_trial

    from dmdopt.search.summary import INTERRUPTED

    study = optuna.create_study(directions=["minimize", "minimize"])
    dist = {"window": IntDistribution(2, 50)}
    study.add_trial(create_trial(state=TrialState.FAIL, params={"window": 10}, distributions=dist,
                                 user_attrs={"fail_reason": INTERRUPTED}))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"window": 10}, distributions=dist,
                                 user_attrs={"rerun_of": 0}))
    study.add_trial(create_trial(values=[1.0, 0.1], params={"window": 10}, distributions=dist,
                                 user_attrs={"rerun_of": 0},
                                 system_attrs={"failed_trial": 1, "retry_history": [1]}))
    rows = [t["user_attrs"] for t in summarize(study)["trials"]]
    assert rows[0]["fail_reason"] == f"{INTERRUPTED}; re-run as trial 1"
    assert rows[1]["rerun_of"] == 0 and rows[2]["rerun_of"] == 1


def test_a_best_trial_no_faster_than_plain_training_is_not_recommended(tmp_path, capsys):
    """It reached the target, but at 450 bpe where plain training took 400: it was marked
    recommended and exported with exit 0 (0.89x), where the two-objective mode refuses the like."""
    url = f"sqlite:///{tmp_path}/c.db"
    study = single_objective_study(url, "slow", [(450.0, 0.45, True), (500.0, 0.40, True)])
    err = _refused_unless_asked(study, url, tmp_path / "slow.toml", capsys)
    assert "reached its target sooner than plain training" in err and "0.89x" in err
    # status names the export that works (it suggested the refused one)
    assert main(["study", "status", "slow", "--storage", url]) == 0
    printed = capsys.readouterr().out
    assert "(no sooner than plain training)" in printed and "-o tuned.toml --trial 0`" in printed
    # faster than plain's budget (1.14x), but plain training first reached its final error,
    # the target, at 300 bpe: no sooner than that (it was exported at 0.86x)
    url = f"sqlite:///{tmp_path}/d.db"
    study = single_objective_study(url, "early", [(350.0, 0.45, True)])
    study.set_user_attr("reference", {"cost_bpe": 400.0, "val_rel_l2": REF_ERROR,
                                      "first_passage_bpe": 300.0})
    err = _refused_unless_asked(study, url, tmp_path / "early.toml", capsys)
    assert "0.86x plain's speed" in err
